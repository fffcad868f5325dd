"""Producer and consumer throughput of one broker process and one client process.

Starts a fresh `dwal broker` per scenario (data in a temporary directory), produces with
acks=1 from this process through the client library, then consumes the topic from the start.
Prints one line per figure:

    dwal_produce_100B_fsync_never records/s=N MB/s=M p50_ms=X p99_ms=Y
    dwal_consume_100B records/s=N MB/s=M

Produce latency is measured on a sample of records: from `send()` to the broker's answer.
Usage: python bench/produce_consume.py [--seconds S] [--records N] [--policies always,never]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client  # noqa: E402
from bench.broker_process import run_broker  # noqa: E402
from client import Admin, Consumer, Producer  # noqa: E402

LATENCY_SAMPLE_EVERY = 997


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def produce(
    bootstrap: str,
    topic: str,
    value_bytes: int,
    seconds: float,
    records_max: int,
    buffer_bytes: int,
):
    latencies: list[float] = []
    value = os.urandom(value_bytes // 2).hex().encode()[:value_bytes]
    async with client.connect(bootstrap) as cluster:
        await Admin(cluster).create_topic(topic)
        async with trio.open_nursery() as nursery:
            async with Producer(
                cluster, acks=1, linger_ms=2, batch_size=256 * 1024, buffer_bytes_max=buffer_bytes
            ) as producer:
                send = producer.send_nowait
                await producer.send(topic, value)  # loads metadata
                count = 1
                burst = max(10, 100_000 // value_bytes)  # about 100 kB between checkpoints
                next_sample = LATENCY_SAMPLE_EVERY
                started = time.perf_counter()
                deadline = started + seconds
                while count < records_max and time.perf_counter() < deadline:
                    sent = 0
                    try:
                        while sent < burst:
                            send(topic, value)
                            sent += 1
                    except trio.WouldBlock:  # the buffer is full: wait for room
                        await producer.send(topic, value)
                        sent += 1
                    count += sent
                    if count >= next_sample:
                        next_sample += LATENCY_SAMPLE_EVERY
                        delivery = await producer.send(topic, value)
                        nursery.start_soon(
                            _sample_latency, delivery, time.perf_counter(), latencies
                        )
                        count += 1
                    await trio.lowlevel.checkpoint()
                await producer.flush()
                elapsed = time.perf_counter() - started
    return count, elapsed, latencies


async def _sample_latency(delivery, sent_at: float, latencies: list[float]) -> None:
    await delivery.wait()
    latencies.append((time.perf_counter() - sent_at) * 1000)


async def consume(bootstrap: str, topic: str, expected: int) -> tuple[int, float, int]:
    async with client.connect(bootstrap) as cluster:
        consumer = Consumer(
            cluster,
            auto_offset_reset="earliest",
            partition_max_bytes=16 << 20,
            fetch_max_bytes=32 << 20,
        )
        await consumer.assign_topic(topic)
        count = 0
        total_bytes = 0
        started = time.perf_counter()
        while count < expected:
            for records in (await consumer.poll(timeout_ms=1000)).values():
                count += len(records)
                total_bytes += len(records) * len(records[0].value)
        return count, time.perf_counter() - started, total_bytes


async def scenario(
    fsync: str,
    value_bytes: int,
    seconds: float,
    records_max: int,
    with_consume: bool,
    buffer_bytes: int,
):
    with tempfile.TemporaryDirectory(prefix="dwal-bench-") as data_dir:
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(run_broker, data_dir, "--fsync", fsync)
            bootstrap = broker.bootstrap
            label = f"{value_bytes}B" if value_bytes < 1024 else f"{value_bytes // 1024}KiB"
            count, elapsed, latencies = await produce(
                bootstrap, "bench", value_bytes, seconds, records_max, buffer_bytes
            )
            rate = count / elapsed
            print(
                f"dwal_produce_{label}_fsync_{fsync} records/s={rate:.0f} "
                f"MB/s={rate * value_bytes / 1e6:.1f} p50_ms={percentile(latencies, 0.5):.2f} "
                f"p99_ms={percentile(latencies, 0.99):.2f}",
                flush=True,
            )
            if with_consume:
                got, elapsed, total = await consume(bootstrap, "bench", count)
                print(
                    f"dwal_consume_{label} records/s={got / elapsed:.0f} "
                    f"MB/s={total / elapsed / 1e6:.1f}",
                    flush=True,
                )
            nursery.cancel_scope.cancel()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="produce duration per scenario")
    parser.add_argument("--records", type=int, default=5_000_000, help="max records per scenario")
    parser.add_argument("--policies", default="never,interval,always")
    parser.add_argument(
        "--buffer-mib",
        type=int,
        default=0,
        help="producer buffer_bytes_max in MiB (default: 8 for 100 B, 32 for 1 KiB)",
    )
    args = parser.parse_args()
    # The producer's buffer bounds how much is queued, so it trades latency for throughput:
    # records wait behind at most buffer_bytes_max of others.
    small, large = ((args.buffer_mib << 20,) * 2) if args.buffer_mib else (8 << 20, 32 << 20)
    for fsync in args.policies.split(","):
        await scenario(fsync, 100, args.seconds, args.records, fsync == "never", small)
    await scenario("never", 1024, args.seconds, args.records, True, large)


if __name__ == "__main__":
    trio.run(main)
