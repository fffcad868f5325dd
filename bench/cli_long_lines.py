"""How fast `dwal produce` reads long lines: linear now, quadratic before.

Three figures per line size (10, 20, 40 MB by default), one line each:

    splitter_<N>MB MB/s=X            LineSplitter alone, the line kept (limit above N MB)
    old_split_<N>MB MB/s=X           the former reader: (pending + chunk).split(b"\\n")
    dwal_produce_<N>MB s=S MB/s=X    `dwal produce` end to end on a topic with the default
                                     max.message.bytes (1 MiB): the line is refused at once
                                     and skipped, the short line after it is sent

and, so that short lines do not pay for it, the two readers on 2 million 13-byte lines:

    splitter_short_lines lines/s=X MB/s=Y
    old_split_short_lines lines/s=X MB/s=Y

Input arrives in 64 KiB pieces, what a read from a pipe returns. A fresh `dwal broker`
(data in a temporary directory) serves the end-to-end runs; it is stopped at the end.
Usage: python bench/cli_long_lines.py [--sizes-mb 10,20,40,200] [--old-max-mb 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import trio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.broker_process import run_broker  # noqa: E402
from client.line_splitter import LineSplitter  # noqa: E402

PIPE_READ_BYTES = 64 * 1024
MEGABYTE = 1_000_000


def pieces(size_bytes: int) -> list[bytes]:
    """One line of `size_bytes` bytes and its newline, cut as pipe reads would be."""
    piece = b"x" * PIPE_READ_BYTES
    out = [piece] * (size_bytes // PIPE_READ_BYTES)
    out.append(b"x" * (size_bytes % PIPE_READ_BYTES) + b"\n")
    return out


def splitter_seconds(size_bytes: int) -> float:
    chunks = pieces(size_bytes)
    started = time.perf_counter()
    splitter = LineSplitter(size_bytes)
    lines = [line for chunk in chunks for line in splitter.feed(chunk)]
    elapsed = time.perf_counter() - started
    assert len(lines) == 1 and len(lines[0]) == size_bytes
    return elapsed


def old_split_seconds(size_bytes: int) -> float:
    chunks = pieces(size_bytes)
    started = time.perf_counter()
    pending = b""
    lines: list[bytes] = []
    for chunk in chunks:
        split = (pending + chunk).split(b"\n")
        pending = split.pop()
        lines.extend(split)
    elapsed = time.perf_counter() - started
    assert len(lines) == 1 and len(lines[0]) == size_bytes
    return elapsed


def short_lines_seconds(split) -> tuple[int, int, float]:
    data = b"".join(b"line-%07d\n" % i for i in range(2_000_000))
    chunks = [data[i : i + PIPE_READ_BYTES] for i in range(0, len(data), PIPE_READ_BYTES)]
    started = time.perf_counter()
    count = split(chunks)
    return count, len(data), time.perf_counter() - started


def splitter_count(chunks: list[bytes]) -> int:
    splitter = LineSplitter(MEGABYTE)
    return sum(len(splitter.feed(chunk)) for chunk in chunks)


def old_split_count(chunks: list[bytes]) -> int:
    pending, count = b"", 0
    for chunk in chunks:
        split = (pending + chunk).split(b"\n")
        pending = split.pop()
        count += len(split)
    return count


async def dwal_produce_seconds(bootstrap: str, topic: str, size_bytes: int) -> float:
    command = [sys.executable, "-m", "client.cli", "produce", topic, "--bootstrap", bootstrap]
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        assert process.stdin is not None
        started = time.perf_counter()
        for chunk in pieces(size_bytes):
            await process.stdin.send_all(chunk)
        await process.stdin.send_all(b"after\n")
        await process.stdin.aclose()
        returncode = await process.wait()
        elapsed = time.perf_counter() - started
    finally:
        if process.returncode is None:
            os.kill(process.pid, 9)
    assert returncode == 1, "the long line should have been refused"
    return elapsed


async def end_to_end(sizes_mb: list[int]) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(60):
                broker = await nursery.start(run_broker, data_dir, "--fsync", "never")
            await trio.run_process(
                [sys.executable, "-m", "client.cli", "topic", "create", "long"]
                + ["--bootstrap", broker.bootstrap],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
            )
            for size_mb in sizes_mb:
                seconds = await dwal_produce_seconds(broker.bootstrap, "long", size_mb * MEGABYTE)
                print(f"dwal_produce_{size_mb}MB s={seconds:.2f} MB/s={size_mb / seconds:.0f}")
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mb", default="10,20,40", help="line sizes in MB (10,20,40)")
    parser.add_argument(
        "--old-max-mb", type=int, default=40, help="skip the old reader above this size (40)"
    )
    args = parser.parse_args()
    sizes_mb = [int(size) for size in args.sizes_mb.split(",")]
    for size_mb in sizes_mb:
        seconds = splitter_seconds(size_mb * MEGABYTE)
        print(f"splitter_{size_mb}MB MB/s={size_mb / seconds:.0f}")
    for size_mb in sizes_mb:
        if size_mb <= args.old_max_mb:
            seconds = old_split_seconds(size_mb * MEGABYTE)
            print(f"old_split_{size_mb}MB MB/s={size_mb / seconds:.0f}")
    for name, split in (("splitter", splitter_count), ("old_split", old_split_count)):
        count, size_bytes, seconds = short_lines_seconds(split)
        print(
            f"{name}_short_lines lines/s={count / seconds:.0f} "
            f"MB/s={size_bytes / MEGABYTE / seconds:.0f}"
        )
    trio.run(end_to_end, sizes_mb)


if __name__ == "__main__":
    main()
