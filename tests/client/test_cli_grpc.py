"""`dwal grpc produce` and `dwal grpc consume` as real processes against a real broker
process serving the gRPC API (`--grpc-port 0`): offsets and values back, topic, partition
and key, following (also across a broker restart), signals, and one-line errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from typing import AsyncIterator

import trio
from dwal_process import REPO, DwalProcess, dwal, kill, running_dwal

import client
from client import Admin
from protocol.partitioning import partition_for_key


async def start_broker(broker_launcher, data_dir=None, grpc_port: int = 0):
    broker = await broker_launcher.start(data_dir, "--fsync", "never", grpc_port=grpc_port)
    assert broker.grpc_port
    return broker


def address(broker) -> str:
    return f"127.0.0.1:{broker.grpc_port}"


async def grpc_dwal(command: str, broker_or_address, *args: str, **options):
    where = broker_or_address
    if not isinstance(where, str):
        where = address(where)
    return await dwal("grpc", command, "--address", where, *args, **options)


def error_line(result) -> str:
    """The command's stderr, checked to be exactly one ``error:`` line."""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@contextlib.asynccontextmanager
async def producing_dwal(*args: str) -> AsyncIterator[tuple[DwalProcess, trio.abc.SendStream]]:
    """`dwal ARGS` with a pipe on stdin (`running_dwal` closes stdin); killed by PID at the
    end."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "client.cli", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdin is not None
    process_handle = DwalProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            process_handle.open_streams = 2
            nursery.start_soon(process_handle._drain, process.stdout, process_handle.stdout)
            nursery.start_soon(process_handle._drain, process.stderr, process_handle.stderr)
            nursery.start_soon(process_handle._watch_exit)
            try:
                yield process_handle, process.stdin
            finally:
                kill(process)
    finally:
        kill(process)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_produce_prints_offsets_and_consume_reads_values_back(broker_launcher):
    broker = await start_broker(broker_launcher)
    values = [b"v%d" % i for i in range(250)] + [b"", b"last"]
    produced = await grpc_dwal("produce", broker, stdin=b"\n".join(values))  # no final \n
    assert produced.stdout.splitlines() == [b"0 %d" % i for i in range(252)]
    assert produced.stderr == b""

    consumed = await grpc_dwal("consume", broker)
    assert consumed.stdout.splitlines() == values
    tail = await grpc_dwal("consume", broker, "--offset", "250", "--format", "json")
    documents = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [(d["topic"], d["partition"], d["offset"], d["key"], d["value"]) for d in documents] == [
        ("wal", 0, 250, None, ""),
        ("wal", 0, 251, None, "last"),
    ]
    counted = await grpc_dwal("consume", broker, "--offset", "10", "--count", "3")
    assert counted.stdout.splitlines() == [b"v10", b"v11", b"v12"]

    at_end = await grpc_dwal("consume", broker, "--offset", "252")
    assert (at_end.stdout, at_end.stderr) == (b"", b"")
    beyond = await grpc_dwal("consume", broker, "--offset", "253", check=False)
    assert beyond.returncode == 1
    assert "OUT_OF_RANGE" in error_line(beyond) and "high watermark 252" in error_line(beyond)


async def test_topic_partition_and_key(broker_launcher):
    broker = await start_broker(broker_launcher)
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("events", partitions=3)
    pinned = await grpc_dwal(
        "produce", broker, "--topic", "events", "--partition", "2", "--key", "k1", stdin=b"a\nb\n"
    )
    assert pinned.stdout.splitlines() == [b"2 0", b"2 1"]

    keyed_partition = partition_for_key(b"user-7", 3)
    keyed = await grpc_dwal("produce", broker, "-t", "events", "-k", "user-7", stdin=b"c\n")
    first = 2 if keyed_partition == 2 else 0
    assert keyed.stdout.splitlines() == [b"%d %d" % (keyed_partition, first)]

    pinned_back = await grpc_dwal(
        "consume", broker, "--topic", "events", "--partition", "2", "--format", "json"
    )
    documents = [json.loads(line) for line in pinned_back.stdout.splitlines()][:2]
    assert [(d["topic"], d["partition"], d["offset"], d["key"], d["value"]) for d in documents] == [
        ("events", 2, 0, "k1", "a"),
        ("events", 2, 1, "k1", "b"),
    ]
    where = ["-t", "events", "-p", str(keyed_partition), "-o", str(first)]
    keyed_back = await grpc_dwal("consume", broker, *where, "-f", "json")
    document = json.loads(keyed_back.stdout)
    assert (document["partition"], document["key"], document["value"]) == (
        keyed_partition,
        "user-7",
        "c",
    )


async def test_follow_prints_later_records_and_stops_on_sigterm(broker_launcher):
    broker = await start_broker(broker_launcher)
    await grpc_dwal("produce", broker, "--quiet", stdin=b"one\n")
    following = ["grpc", "consume", "--address", address(broker), "--follow"]
    async with running_dwal(*following) as follower:
        await follower.wait_until(lambda d: d.stdout_lines == [b"one"])
        await grpc_dwal("produce", broker, "--quiet", stdin=b"two\nthree\n")
        await follower.wait_until(lambda d: d.stdout_lines == [b"one", b"two", b"three"])
        follower.process.send_signal(signal.SIGTERM)
        assert await follower.wait_exit() == 0
    assert follower.stderr_text == ""


async def test_follow_resumes_after_a_broker_restart_without_gaps_or_duplicates(
    broker_launcher, tmp_path
):
    data = tmp_path / "data"
    broker = await start_broker(broker_launcher, data)
    await grpc_dwal("produce", broker, "--quiet", stdin=b"a0\na1\na2\n")
    async with running_dwal(
        "grpc", "consume", "--address", address(broker), "--follow", "--format", "json"
    ) as follower:

        def offsets_and_values(d: DwalProcess) -> list[tuple[int, str]]:
            documents = [json.loads(line) for line in d.stdout_lines]
            return [(document["offset"], document["value"]) for document in documents]

        await follower.wait_until(lambda d: len(d.stdout_lines) == 3)
        assert await broker_launcher.stop(broker) == 0
        await follower.wait_until(lambda d: "reconnecting from offset 3" in d.stderr_text)
        restarted = await start_broker(broker_launcher, data, grpc_port=broker.grpc_port)
        await grpc_dwal("produce", restarted, "--quiet", stdin=b"b3\nb4\nb5\n")
        await follower.wait_until(lambda d: len(d.stdout_lines) >= 6)
        assert offsets_and_values(follower) == [
            (0, "a0"),
            (1, "a1"),
            (2, "a2"),
            (3, "b3"),
            (4, "b4"),
            (5, "b5"),
        ]
        assert "note: following again from offset 3" in follower.stderr_text
        follower.process.send_signal(signal.SIGINT)
        assert await follower.wait_exit() == 0
    assert len(follower.stdout_lines) == 6
    assert "Traceback" not in follower.stderr_text


async def test_errors_are_one_line_with_exit_1(broker_launcher):
    broker = await start_broker(broker_launcher)
    unknown = await grpc_dwal("produce", broker, "--topic", "nosuch", stdin=b"x\n", check=False)
    assert unknown.returncode == 1
    assert error_line(unknown).startswith("error: NOT_FOUND: ")
    assert "nosuch" in error_line(unknown) and "0 records acknowledged" in error_line(unknown)
    unknown = await grpc_dwal("consume", broker, "--topic", "nosuch", check=False)
    assert unknown.returncode == 1
    assert error_line(unknown).startswith("error: NOT_FOUND: ") and "nosuch" in error_line(unknown)

    nowhere = f"127.0.0.1:{closed_port()}"
    for command, stdin in (("produce", b"x\n"), ("consume", b"")):
        unreachable = await grpc_dwal(command, nowhere, stdin=stdin, check=False)
        assert unreachable.returncode == 1
        assert error_line(unreachable).startswith("error: UNAVAILABLE: ")

    usage = await grpc_dwal("produce", broker, "--batch", "0", check=False)
    assert usage.returncode == 2 and b"--batch" in usage.stderr

    # A line over the limit (1 MiB) is skipped and reported; the others are stored.
    oversize = b"a\n" + b"x" * (1024 * 1024 + 1) + b"\nb\n"
    skipped = await grpc_dwal("produce", broker, stdin=oversize, check=False)
    assert skipped.returncode == 1
    assert skipped.stdout.splitlines() == [b"0 0", b"0 1"]
    assert "line 2 of stdin has at least" in error_line(skipped)
    assert (await grpc_dwal("consume", broker)).stdout == b"a\nb\n"


async def test_producer_stops_on_a_signal_and_reports_acknowledged_records_on_failure(
    broker_launcher,
):
    broker = await start_broker(broker_launcher)
    async with producing_dwal("grpc", "produce", "--address", address(broker)) as (producer, stdin):
        await stdin.send_all(b"s0\n")
        await producer.wait_until(lambda d: d.stdout_lines == [b"0 0"])
        producer.process.send_signal(signal.SIGTERM)  # stdin stays open: it stops reading
        assert await producer.wait_exit() == 0
    assert "note: stopped by signal: 1 record acknowledged" in producer.stderr_text

    async with producing_dwal("grpc", "produce", "--address", address(broker)) as (producer, stdin):
        await stdin.send_all(b"p1\n")
        await producer.wait_until(lambda d: d.stdout_lines == [b"0 1"])
        await stdin.send_all(b"p2\n")
        await producer.wait_until(lambda d: d.stdout_lines == [b"0 1", b"0 2"])
        assert await broker_launcher.stop(broker) == 0
        assert await producer.wait_exit() == 1
    lines = producer.stderr_text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: UNAVAILABLE: "), lines
    assert lines[0].endswith(
        "; 2 records acknowledged (up to line 2 of stdin); later lines were not acknowledged"
    )
