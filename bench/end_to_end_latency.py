"""End-to-end latency, produce -> a consumer sees the record, RF 3 acks=all, at half the
maximum rate.

Three nodes on 127.0.0.1 (each a broker and a controller voter; ports tried in 20000-32000,
temporary data directories, every process stopped by PID at the end, on errors too: see
bench/replication_throughput.py), fsync policy `--fsync` (default `never`, as Kafka), topics
of `--partitions` (12) partitions with RF 3 (min.insync.replicas=2), `--size` (100) byte
values.

1. Maximum rate: for `--probe-seconds` (4) one producer writes as fast as it can to a probe
   topic while a consumer reads it (the same client process and settings as step 2), so
   the rate is that of the whole produce -> replicate -> consume pipeline on this machine.
   The rate is the records acknowledged per second (the final flush included).
2. Latency: for `--seconds` (15) the producer writes at half that rate to a fresh topic,
   paced every millisecond, each value starting with its send time (perf_counter_ns);
   a consumer reading the topic from its start takes, for every record, the time its
   poll returned minus the time in the value. Records sent in the first `--warmup`
   (1) seconds are left out.

Client settings: producer acks=all, linger_ms=`--linger-ms` (0), batch_size 256 KiB,
max_in_flight_per_partition 5, keyless records (sticky partitioning); consumer with
min_bytes 1 and max_wait_ms 500 (the broker answers a fetch as soon as the high watermark
passes the fetch position). Producer and consumer run in this one process (trio), so they
share one core, and the three brokers share the machine's 2 cores with it. Prints the
achieved rate and p50/p99/p99.9/max of end-to-end latency and of produce acknowledgement
(send -> answer). Nothing is asserted about time.

Usage: python bench/end_to_end_latency.py [--seconds 15] [--probe-seconds 4] [--size 100]
       [--partitions 12] [--linger-ms 0] [--fsync never] [--rate N (skips step 1)]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client  # noqa: E402
from bench.produce_consume import percentile  # noqa: E402
from bench.replication_throughput import open_low_port_brokers, wait_caught_up  # noqa: E402
from client import Admin, Consumer, Producer  # noqa: E402
from protocol import DwalError  # noqa: E402

NODE_IDS = (1, 2, 3)
READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 60.0  # for the consumer to see every acknowledged record
PACE_S = 0.001
STAMP_DIGITS = 20  # perf_counter_ns, zero-padded, at the start of every value


def producer_for(cluster: client.Cluster, arguments: argparse.Namespace) -> Producer:
    return Producer(
        cluster,
        acks="all",
        linger_ms=arguments.linger_ms,
        batch_size=256 * 1024,
        buffer_bytes_max=8 << 20,
    )


def consumer_for(cluster: client.Cluster) -> Consumer:
    return Consumer(cluster, auto_offset_reset="earliest", max_wait_ms=500, min_bytes=1)


async def count_consumed(cluster: client.Cluster, topic: str, counter: list[int]) -> None:
    consumer = consumer_for(cluster)
    await consumer.assign_topic(topic)
    while True:
        for records in (await consumer.poll(timeout_ms=500)).values():
            counter[0] += len(records)


async def probe_max_rate(bootstrap: str, topic: str, arguments: argparse.Namespace) -> float:
    """Records acknowledged per second with the producer flat out and a consumer reading."""
    value = b"x" * arguments.size
    consumed = [0]
    async with client.connect(bootstrap) as cluster, trio.open_nursery() as nursery:
        async with client.connect(bootstrap) as consumer_cluster:
            nursery.start_soon(count_consumed, consumer_cluster, topic, consumed)
            async with producer_for(cluster, arguments) as producer:
                await (await producer.send(topic, value)).wait()  # loads metadata
                count = 0
                started = time.perf_counter()
                deadline = started + arguments.probe_seconds
                while time.perf_counter() < deadline:
                    sent = 0
                    try:
                        while sent < 1000:
                            producer.send_nowait(topic, value)
                            sent += 1
                    except trio.WouldBlock:
                        await producer.send(topic, value)
                        sent += 1
                    count += sent
                    await trio.lowlevel.checkpoint()
                await producer.flush()
                elapsed = time.perf_counter() - started
                failed = producer.statistics().batches_failed
            nursery.cancel_scope.cancel()
    rate = count / elapsed
    print(
        f"probe: records={count} seconds={elapsed:.2f} acked_records/s={rate:.0f} "
        f"batches_failed={failed} consumed_meanwhile={consumed[0]}",
        flush=True,
    )
    if failed:
        print(f"PROBLEM probe: {failed} batches failed")
    return rate


async def paced_producer(
    cluster: client.Cluster,
    topic: str,
    rate: float,
    arguments: argparse.Namespace,
    ack_latencies_ms: list[float],
) -> tuple[int, float]:
    """Send `rate` records/s for `arguments.seconds`; returns (records sent, seconds)."""
    padding = b"x" * max(0, arguments.size - STAMP_DIGITS)
    failures = 0
    sample_every = max(1, int(rate // 200))  # about 200 acknowledgement samples a second

    async def sample(delivery: client.Delivery, sent_ns: int) -> None:
        nonlocal failures
        try:
            await delivery.wait()
        except DwalError:
            failures += 1
            return
        ack_latencies_ms.append((time.perf_counter_ns() - sent_ns) / 1e6)

    async with trio.open_nursery() as nursery:
        async with producer_for(cluster, arguments) as producer:
            sent = 0
            started = time.perf_counter()
            deadline = started + arguments.seconds
            while (now := time.perf_counter()) < deadline:
                due = int((now - started) * rate)
                while sent < due:
                    sent_ns = time.perf_counter_ns()
                    value = b"%020d" % sent_ns + padding
                    delivery = await producer.send(topic, value)
                    sent += 1
                    if sent % sample_every == 0:
                        nursery.start_soon(sample, delivery, sent_ns)
                await trio.sleep(PACE_S)
            await producer.flush()
            elapsed = time.perf_counter() - started
            failed = producer.statistics().batches_failed
    if failed or failures:
        print(f"PROBLEM latency run: {failed} batches failed ({failures} sampled records)")
    return sent, elapsed


async def measure_latency(
    bootstrap: str, topic: str, rate: float, arguments: argparse.Namespace
) -> None:
    latencies_ms: list[float] = []
    ack_latencies_ms: list[float] = []
    seen = [0]
    warmup_ns = [0]

    async def consume(cluster: client.Cluster) -> None:
        consumer = consumer_for(cluster)
        await consumer.assign_topic(topic)
        while True:
            polled = await consumer.poll(timeout_ms=500)
            now_ns = time.perf_counter_ns()
            for records in polled.values():
                seen[0] += len(records)
                for record in records:
                    sent_ns = int(record.value[:STAMP_DIGITS])
                    if sent_ns >= warmup_ns[0]:
                        latencies_ms.append((now_ns - sent_ns) / 1e6)

    async with client.connect(bootstrap) as cluster, client.connect(bootstrap) as consumer_cluster:
        async with trio.open_nursery() as nursery:
            warmup_ns[0] = time.perf_counter_ns() + int(arguments.warmup * 1e9)
            nursery.start_soon(consume, consumer_cluster)
            sent, elapsed = await paced_producer(cluster, topic, rate, arguments, ack_latencies_ms)
            with trio.move_on_after(DRAIN_TIMEOUT_S):
                while seen[0] < sent:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    print(
        f"latency run: target_records/s={rate:.0f} achieved_records/s={sent / elapsed:.0f} "
        f"sent={sent} consumed={seen[0]} measured={len(latencies_ms)} "
        f"(records sent in the first {arguments.warmup:g} s left out)",
        flush=True,
    )
    if seen[0] < sent:
        print(f"PROBLEM latency run: consumer saw {seen[0]} of {sent} acknowledged records")
    for label, values in (
        ("end_to_end (send -> consumer poll returned)", latencies_ms),
        ("produce_ack (send -> acks=all answer, sampled)", ack_latencies_ms),
    ):
        print(
            f"{label}: n={len(values)} p50_ms={percentile(values, 0.5):.2f} "
            f"p99_ms={percentile(values, 0.99):.2f} p99.9_ms={percentile(values, 0.999):.2f} "
            f"max_ms={max(values, default=float('nan')):.2f}",
            flush=True,
        )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="latency run duration")
    parser.add_argument("--probe-seconds", type=float, default=4.0, help="max rate probe")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds left out")
    parser.add_argument("--size", type=int, default=100, help="value bytes")
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--linger-ms", type=float, default=0.0)
    parser.add_argument("--fsync", choices=["always", "interval", "never"], default="never")
    parser.add_argument("--rate", type=float, default=0.0, help="records/s; skips the probe")
    arguments = parser.parse_args()
    print(
        f"rf=3 min_insync=2 acks=all partitions={arguments.partitions} size={arguments.size} "
        f"linger_ms={arguments.linger_ms:g} batch_size=262144 fsync={arguments.fsync} "
        f"cores={os.cpu_count()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="dwal-end-to-end-latency-") as temporary:
        async with open_low_port_brokers(
            pathlib.Path(temporary), NODE_IDS, cluster=True, options=["--fsync", arguments.fsync]
        ) as brokers:
            await brokers.start_all()
            bootstrap = brokers.bootstrap()
            async with client.connect(bootstrap) as cluster:
                for topic in ("probe", "latency"):
                    await Admin(cluster).create_topic(
                        topic, partitions=arguments.partitions, replication_factor=3
                    )
            for topic in ("probe", "latency"):
                ready, views = await wait_caught_up(brokers, topic, READY_TIMEOUT_S)
                if not ready:
                    print(f"PROBLEM {topic} not fully replicated: {[str(v) for v in views]}")
            rate = arguments.rate
            if not rate:
                rate = await probe_max_rate(bootstrap, "probe", arguments) / 2
                with contextlib.suppress(Exception):
                    await wait_caught_up(brokers, "probe", 30.0)  # followers done
            await measure_latency(bootstrap, "latency", rate, arguments)


if __name__ == "__main__":
    trio.run(main)
