"""`dwal produce` as a user runs it: long lines, record size limits, summaries, flags."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import trio
from dwal_process import REPO, dwal

MEBIBYTE = 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = MEBIBYTE + 12  # the broker's default max.message.bytes


def peak_memory_bytes(pid: int) -> int:
    """The process's peak resident set size (VmHWM), from /proc."""
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    kibibytes = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert kibibytes, status
    return int(kibibytes.group(1)) * 1024


async def drain(stream, into: bytearray, seen: bytes | None = None, event=None) -> None:
    while chunk := await stream.receive_some(65536):
        into += chunk
        if event is not None and seen is not None and seen in into:
            event.set()


async def test_a_200_mb_line_is_refused_at_once_in_bounded_memory(broker):
    b = ["--bootstrap", broker.bootstrap]
    await dwal("topic", "create", "long", *b)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "client.cli", "produce", "long", *b],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        out, err = bytearray(), bytearray()
        refused = trio.Event()
        chunk = b"x" * MEBIBYTE
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, process.stdout, out)
            nursery.start_soon(drain, process.stderr, err, b"MESSAGE_TOO_LARGE", refused)
            await process.stdin.send_all(b"first\n" + chunk + chunk)
            # Refused after 2 of its 200 MB, before the rest of the line is even written.
            with trio.fail_after(60):
                await refused.wait()
            for _ in range(198):
                await process.stdin.send_all(chunk)
            # Everything but what the pipe and one read hold has been read: 200 MB went
            # through without the process ever holding the line.
            peak = peak_memory_bytes(process.pid)
            await process.stdin.send_all(b"\nafter\n")
            await process.stdin.aclose()
            with trio.fail_after(60):
                returncode = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    assert peak < 64 * MEBIBYTE, f"peak memory {peak / MEBIBYTE:.0f} MiB"
    assert returncode == 1, err
    message = re.fullmatch(
        rb"error: line 2 of stdin has at least (\d+) bytes, over topic long's "
        rb"max\.message\.bytes of (\d+): line skipped \(MESSAGE_TOO_LARGE\)\n",
        bytes(err),
    )
    assert message, err
    assert int(message.group(1)) > DEFAULT_MAX_MESSAGE_BYTES
    assert int(message.group(2)) == DEFAULT_MAX_MESSAGE_BYTES
    assert out.startswith(b"produced 2 records to long in "), out
    assert out.endswith(b", 1 failed\n"), out
    consumed = await dwal("consume", "long", "--num", "2", *b)
    assert consumed.stdout == b"first\nafter\n"


async def test_lines_over_the_topic_limit_are_skipped_and_counted(broker):
    b = ["--bootstrap", broker.bootstrap]
    await dwal("topic", "create", "small", "--config", "max.message.bytes=1000", *b)
    stdin = b"a\n" + b"y" * 1001 + b"\nb\n" + b"z" * 5000  # the last line has no newline
    result = await dwal("produce", "small", *b, stdin=stdin, check=False)
    assert result.returncode == 1
    errors = result.stderr.decode().splitlines()
    assert len(errors) == 2, errors
    for line_number, error in zip((2, 4), errors):
        assert error.startswith(f"error: line {line_number} of stdin has at least "), error
        assert error.endswith(
            "bytes, over topic small's max.message.bytes of 1000: line skipped (MESSAGE_TOO_LARGE)"
        ), error
    assert result.stdout.startswith(b"produced 2 records to small in ")
    assert result.stdout.endswith(b", 2 failed\n")
    consumed = await dwal("consume", "small", "--num", "2", *b)
    assert consumed.stdout == b"a\nb\n"


async def test_a_segment_smaller_than_max_message_bytes_sets_the_limit(broker):
    b = ["--bootstrap", broker.bootstrap]
    await dwal("topic", "create", "seg", "--config", "segment.bytes=1024", *b)
    result = await dwal("produce", "seg", *b, stdin=b"s" * 2000 + b"\nok\n", check=False)
    assert result.returncode == 1
    assert re.fullmatch(
        rb"error: line 1 of stdin has at least \d+ bytes, over topic seg's segment\.bytes of "
        rb"1024: line skipped \(MESSAGE_TOO_LARGE\)\n",
        result.stderr,
    ), result.stderr
    assert result.stdout.startswith(b"produced 1 record to seg in ")


async def test_a_line_of_exactly_the_limit_reaches_the_producer(broker):
    """The CLI drops only lines longer than max.message.bytes; one exactly that long goes to
    the producer (which refuses it: a record batch has a header too)."""
    b = ["--bootstrap", broker.bootstrap]
    await dwal("topic", "create", "edge", "--config", "max.message.bytes=1000", *b)
    result = await dwal("produce", "edge", *b, stdin=b"w" * 1000 + b"\nok\n", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(b"error: line 1 of stdin: "), result.stderr
    assert b"at least" not in result.stderr, result.stderr
    assert result.stderr.endswith(b"(MESSAGE_TOO_LARGE)\n")
    assert result.stderr.count(b"\n") == 1
    assert result.stdout.startswith(b"produced 1 record to edge in "), result.stdout
    assert result.stdout.endswith(b", 1 failed\n")
    consumed = await dwal("consume", "edge", "--num", "1", *b)
    assert consumed.stdout == b"ok\n"


async def test_summary_wording(broker):
    b = ["--bootstrap", broker.bootstrap]
    await dwal("topic", "create", "words", *b)
    one = await dwal("produce", "words", *b, stdin=b"only\n")
    assert re.fullmatch(
        rb"produced 1 record to words in \d+\.\d\d s \(\d+ records/s\), 0 failed\n", one.stdout
    ), one.stdout
    none = await dwal("produce", "words", *b, stdin=b"")
    assert re.fullmatch(rb"produced 0 records to words in \d+\.\d\d s, 0 failed\n", none.stdout)


async def test_produce_refuses_a_partition_the_topic_does_not_have(broker):
    b = ["--bootstrap", broker.bootstrap]
    await dwal("topic", "create", "parts", "--partitions", "2", *b)
    result = await dwal("produce", "parts", "--partition", "99", *b, stdin=b"x\n", check=False)
    assert result.returncode == 1
    assert result.stderr == (
        b"error: topic parts has no partition 99 (it has 2: 0 to 1) (UNKNOWN_TOPIC_OR_PARTITION)\n"
    )
    await dwal("produce", "parts", "--partition", "1", *b, stdin=b"x\n")
    negative = await dwal("produce", "parts", "--partition", "-1", *b, check=False)
    assert negative.returncode == 2 and b"argument --partition/-p" in negative.stderr


async def test_producer_limits_are_checked_by_flag_name():
    for flag, value in (
        ("--batch-size", "0"),
        ("--batch-size", str(64 * MEBIBYTE + 1)),
        ("--batch-size", "many"),
        ("--linger-ms", "-1"),
        ("--linger-ms", "nan"),
    ):
        result = await dwal("produce", "t", flag, value, check=False)
        assert result.returncode == 2, (flag, value)
        assert result.stderr.startswith(b"usage: dwal produce "), result.stderr
        assert f"error: argument {flag}: must be ".encode() in result.stderr, result.stderr
        assert b"Traceback" not in result.stderr


async def test_bootstrap_from_the_environment_and_before_the_subcommand(broker):
    unreachable = "127.0.0.1:1"
    await dwal("topic", "create", "env", "--bootstrap", broker.bootstrap)
    env = {**os.environ, "DWAL_BOOTSTRAP": broker.bootstrap}
    assert (await dwal("topic", "list", env=env)).stdout == b"env\n"
    assert (await dwal("--bootstrap", broker.bootstrap, "topic", "list")).stdout == b"env\n"
    # The flag beats the environment, wherever it is given.
    env = {**os.environ, "DWAL_BOOTSTRAP": unreachable}
    assert (await dwal("topic", "list", "--bootstrap", broker.bootstrap, env=env)).stdout
    assert (await dwal("--bootstrap", broker.bootstrap, "topic", "list", env=env)).stdout
    failed = await dwal("topic", "list", env=env, check=False)
    assert failed.returncode == 1 and unreachable.encode() in failed.stderr
