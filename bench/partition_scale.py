"""Partition scale: one real broker hosting many partitions, within an open-file limit.

Starts a single `dwal broker` (embedded controller) in a temporary data directory with the
open-file limit set to `--open-files` (soft and hard, inherited by the broker; default 20,000),
then prints figures only (nothing is asserted):

1. creation: `--topics` topics of `--partitions` partitions each, created by `--creators`
   concurrent Admin clients, one topic per request; partitions/s overall and per tenth (a
   rate falling from tenth to tenth means per-topic cost grows with the partition count);
2. the broker's RSS and open descriptors (/proc/PID/fd) with no topic, after creation, and
   after one record was produced to each of `--produce-partitions` partitions (spread over
   the topics) and read back; RSS per partition;
3. a stop by SIGTERM (time to exit) and a restart (time from spawn to `broker_started`), the
   same after SIGKILL (a restart that recovers every log), each followed by a produce and
   fetch of some partitions, with RSS and descriptors.

With `--existing` (and `--data-dir` holding the topics of an earlier run with the same
`--topics` and `--partitions`) the creation is skipped: step 3 only, from a first start.

Usage: python bench/partition_scale.py [--topics 5000] [--partitions 10] [--creators 8]
       [--produce-partitions 2000] [--open-files 20000] [--fsync always] [--data-dir DIR]
       [--existing]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client  # noqa: E402
from client import Admin, Consumer, Producer, TopicPartition  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTED = re.compile(rb"event=broker_started [^\n]*? port=(\d+)[^\n]*\n")
START_TIMEOUT_S = 900
STOP_TIMEOUT_S = 900


@dataclass
class Broker:
    process: trio.Process
    port: int = 0
    output: bytearray | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _drain(broker: Broker, started: trio.Event) -> None:
    assert broker.process.stderr is not None and broker.output is not None
    while chunk := await broker.process.stderr.receive_some(65536):
        broker.output += chunk
        if not started.is_set() and (match := STARTED.search(broker.output)):
            broker.port = int(match.group(1))
            started.set()
        del broker.output[:-65536]
    started.set()


async def start_broker(nursery: trio.Nursery, data_dir: str, fsync: str) -> tuple[Broker, float]:
    """Spawn the broker; return it and the seconds until its `broker_started` line."""
    began = time.monotonic()
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "client.cli",
            "broker",
            "--port",
            "0",
            "--http-port",
            "-1",
            "--grpc-port",
            "-1",
        ]
        + ["--data-dir", data_dir, "--fsync", fsync],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    broker = Broker(process, output=bytearray())
    started = trio.Event()
    nursery.start_soon(_drain, broker, started)
    with trio.fail_after(START_TIMEOUT_S):
        await started.wait()
    if not broker.port:
        assert broker.output is not None
        raise RuntimeError("broker exited:\n" + broker.output.decode(errors="replace"))
    return broker, time.monotonic() - began


async def stop_broker(broker: Broker, signum: int) -> float:
    """Send `signum`; return the seconds until the process exited."""
    began = time.monotonic()
    broker.process.send_signal(signum)
    with trio.fail_after(STOP_TIMEOUT_S):
        await broker.process.wait()
    return time.monotonic() - began


def kill_quietly(broker: Broker | None) -> None:
    if broker is not None and broker.process.returncode is None:
        try:
            os.kill(broker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def create_topics(bootstrap: str, topics: int, partitions: int, creators: int) -> None:
    tenth = max(topics // 10, 1)
    created = 0
    began = last = time.monotonic()
    numbers = iter(range(topics))

    async def creator(admin: Admin) -> None:
        nonlocal created, last
        for number in numbers:
            await admin.create_topic(f"scale-{number:06d}", partitions, replication_factor=1)
            created += 1
            if created % tenth == 0:
                now = time.monotonic()
                print(
                    f"  created {created * partitions:>7} partitions  "
                    f"{tenth * partitions / (now - last):8.0f} partitions/s in this tenth",
                    flush=True,
                )
                last = now

    async with client.connect(bootstrap) as cluster:
        admin = Admin(cluster)
        async with trio.open_nursery() as nursery:
            for _ in range(creators):
                nursery.start_soon(creator, admin)
    elapsed = time.monotonic() - began
    total = topics * partitions
    print(
        f"creation: {total} partitions in {elapsed:.1f} s = {total / elapsed:.0f} partitions/s "
        f"({creators} creators)",
        flush=True,
    )


def chosen_partitions(args: argparse.Namespace, seed: int = 0) -> list[TopicPartition]:
    """`--produce-partitions` partitions spread evenly over every topic."""
    total = args.topics * args.partitions
    count = min(args.produce_partitions, total)
    step = total / count if count else 1
    chosen = []
    for number in range(count):
        index = (int(number * step) + seed) % total
        chosen.append(
            TopicPartition(f"scale-{index // args.partitions:06d}", index % args.partitions)
        )
    return chosen


async def produce_and_fetch(bootstrap: str, partitions: list[TopicPartition], tag: str) -> None:
    """One record to each partition (acks=1), then read every partition from its start."""
    began = time.monotonic()
    async with client.connect(bootstrap) as cluster:
        async with Producer(cluster, acks=1, linger_ms=5) as producer:
            deliveries = [
                await producer.send(
                    tp.topic, f"{tag}-{tp.topic}-{tp.partition}", partition=tp.partition
                )
                for tp in partitions
            ]
            for delivery in deliveries:
                await delivery.wait()
        produced = time.monotonic()
        consumer = Consumer(cluster, auto_offset_reset="earliest")
        consumer.assign(partitions)
        await consumer.seek_to_beginning(partitions)
        found: set[TopicPartition] = set()
        with trio.fail_after(300):
            while len(found) < len(partitions):
                for tp, records in (await consumer.poll(timeout_ms=500)).items():
                    if any(r.value == f"{tag}-{tp.topic}-{tp.partition}".encode() for r in records):
                        found.add(tp)
    print(
        f"  produce to {len(partitions)} partitions: {produced - began:.1f} s, "
        f"fetch back: {time.monotonic() - produced:.1f} s",
        flush=True,
    )


def report(label: str, broker: Broker, partitions: int, base_rss: float | None) -> float:
    rss = rss_mib(broker.pid)
    per_partition = ""
    if base_rss is not None and partitions:
        per_partition = f"  ({(rss - base_rss) * 1024 / partitions:.1f} KiB per partition)"
    print(
        f"{label}: RSS {rss:.0f} MiB{per_partition}, open descriptors "
        f"{open_descriptors(broker.pid)}",
        flush=True,
    )
    return rss


def limit_open_files(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = min(count, hard) if hard != resource.RLIM_INFINITY else count
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    print(f"open-file limit for the broker: {limit} (soft and hard)", flush=True)


async def run(args: argparse.Namespace) -> None:
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="dwal-partition-scale-")
    total = args.topics * args.partitions
    broker: Broker | None = None
    try:
        async with trio.open_nursery() as nursery:
            base_rss = None
            if not args.existing:
                broker, start_s = await start_broker(nursery, data_dir, args.fsync)
                print(f"start (empty): {start_s:.1f} s", flush=True)
                base_rss = report("no topic", broker, 0, None)
                await create_topics(broker.bootstrap, args.topics, args.partitions, args.creators)
                report(f"{total} partitions", broker, total, base_rss)
                chosen = chosen_partitions(args)
                await produce_and_fetch(broker.bootstrap, chosen, "first")
                report(f"after produce to {len(chosen)}", broker, total, base_rss)
                stop_s = await stop_broker(broker, signal.SIGTERM)
                print(f"stop (SIGTERM): {stop_s:.1f} s", flush=True)

            broker, start_s = await start_broker(nursery, data_dir, args.fsync)
            print(f"restart after SIGTERM: {start_s:.1f} s to broker_started", flush=True)
            report("restarted", broker, total, base_rss)
            await produce_and_fetch(broker.bootstrap, chosen_partitions(args, 1), "second")
            report("after produce", broker, total, base_rss)
            print(f"kill (SIGKILL): {await stop_broker(broker, signal.SIGKILL):.1f} s", flush=True)

            broker, start_s = await start_broker(nursery, data_dir, args.fsync)
            print(f"restart after SIGKILL: {start_s:.1f} s to broker_started", flush=True)
            report("restarted", broker, total, base_rss)
            await produce_and_fetch(broker.bootstrap, chosen_partitions(args, 2), "third")
            report("after produce", broker, total, base_rss)
            print(f"stop (SIGTERM): {await stop_broker(broker, signal.SIGTERM):.1f} s", flush=True)
            nursery.cancel_scope.cancel()
    finally:
        kill_quietly(broker)
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topics", type=int, default=5000)
    parser.add_argument("--partitions", type=int, default=10)
    parser.add_argument("--creators", type=int, default=8)
    parser.add_argument("--produce-partitions", type=int, default=2000)
    parser.add_argument("--open-files", type=int, default=20_000)
    parser.add_argument("--fsync", choices=["always", "interval", "never"], default="always")
    parser.add_argument("--data-dir", help="keep the data here (default: a temporary directory)")
    parser.add_argument("--existing", action="store_true", help="--data-dir has the topics")
    args = parser.parse_args()
    if args.existing and not args.data_dir:
        parser.error("--existing needs --data-dir")
    limit_open_files(args.open_files)
    print(
        f"dwal_partition_scale topics={args.topics} partitions={args.partitions} "
        f"total={args.topics * args.partitions}",
        flush=True,
    )
    trio.run(run, args)


if __name__ == "__main__":
    main()
