"""Produce throughput with partition replication: single node, RF 1, RF 3 acks=1 and acks=all.

One run, side by side, for 100-byte and 1 KiB records (`--sizes`), a topic of `--partitions`
(12) partitions per setup and size:

    single_node     one broker process (embedded one-voter controller), RF 1, acks=1
    rf1             three brokers (each a controller voter too), RF 1, acks=1
    rf3_acks1       three brokers, RF 3 (min.insync.replicas=2), acks=1
    rf3_acksall     three brokers, RF 3 (min.insync.replicas=2), acks=all

The three cluster setups share one cluster (one topic each per size). Every setup runs once
per fsync policy of `--fsync` (default `never,always`): `never` is what Kafka does by
default (the page cache, no fsync per write); under `always` a leader appends with an fsync
and a follower makes fetched data durable before its next fetch, so the high watermark, and
with it an acks=all answer, waits for fsyncs on two brokers.

Client settings (those of bench/produce_consume.py and bench/cluster_throughput.py): one
producer, keyless records (sticky partitioning), linger_ms=2, batch_size 256 KiB, producer
buffer 8 MiB for records under 1 KiB and 32 MiB from 1 KiB, max_in_flight_per_partition 5
(the default), no compression, bootstrapped on all brokers. Each setup produces for
`--seconds` (or `--records`); the time includes the final flush (every record answered).
Produce latency is sampled on every 997th record, from `send()` to the answer. After each
replicated run the bench waits until every follower caught up (HW = log end, full ISR) so the
next setup does not pay for the previous one's replication, and it checks that the topic holds
every acknowledged record (sum of the partitions' log end offsets); a shortfall or failed
batches are printed as PROBLEM lines.

Every setup starts with the same page cache: a measured topic is deleted once checked, and the
next setup waits until no broker holds a file of it. On this VM a write copies into the page
cache at 3-5 GB per CPU second while it reuses about the 1.5-2 GB of memory freed last, and
at 0.35-0.40 GB per CPU second beyond that (a 4 GB sequential write into a new file; the same
write again right after deleting it: 3-5 GB/s throughout). Before, the topics of every earlier
setup stayed on disk, so the last setup, rf3_acksall, wrote its three copies of the data into
that slow memory: in one cluster, 1 KiB rf3_acksall produced 173k records/s run first and 85k
run after rf1 and rf3_acks1, and the 1 KiB ratio below measured 0.17-0.28 where it measures
0.44-0.55 with the deletion.

Per setup the bench also prints the CPU time per MB produced (user and system) of the broker
processes, counted until the followers caught up, and of the client (this process) during the
run. They depend much less on what else runs on the machine than the records per second,
for which the four processes compete for 2 cores with whatever else is running.

The ratio printed last is rf3_acksall / rf1 (the issue's goal: at least 0.5, Kafka's
published ratio), and also rf3_acksall / single_node. On this 2-core machine the three broker
processes and the client share 2 cores; replication triples the bytes written and adds the
followers' fetch traffic on the same cores, so the ratio here is lower than on three
machines. rf1 is bound by the client, one process that is on a core or waiting for one
almost all the time (blocked 2% of it), rf3_acksall by the cores the brokers need besides it
(1 KiB records: about 6 ms per MB produced, the client's 2.1-2.4). Nothing is asserted about
time.

This module also holds the port picking and broker start used by bench/replication_failover.py
and bench/end_to_end_latency.py: ports are chosen by trying binds in 20000-32000 (below the
kernel's ephemeral range 32768-60999, so an outgoing connection cannot take one between the
check and the broker's bind) and every process is stopped by PID when its block exits
(`LocalBrokers` of bench/cluster_throughput.py).

Usage: python bench/replication_throughput.py [--seconds 4] [--records 5000000]
       [--sizes 100,1024] [--partitions 12] [--fsync never,always]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import random
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client  # noqa: E402
from bench.cluster_throughput import BrokerNode, LocalBrokers, size_label  # noqa: E402
from bench.produce_consume import percentile  # noqa: E402
from client import Admin, Producer  # noqa: E402
from client.admin import TopicDescription  # noqa: E402

PORT_RANGE = (20000, 32000)  # below the ephemeral range 32768-60999
LATENCY_SAMPLE_EVERY = 997
READY_TIMEOUT_S = 60.0  # until a topic has leaders and a full ISR everywhere
CATCH_UP_TIMEOUT_S = 20.0  # until followers reach the leaders' log end after a run
DELETE_TIMEOUT_S = 30.0  # until a deleted topic's files are gone from every broker
POLL_S = 0.05

_handed_out: set[int] = set()  # ports given to earlier clusters of this process


def low_free_ports(count: int) -> list[int]:
    """`count` distinct ports in PORT_RANGE that were free on 127.0.0.1 a moment ago (a bind
    succeeded), none handed out before by this process."""
    candidates = list(range(*PORT_RANGE))
    random.shuffle(candidates)
    ports: list[int] = []
    with contextlib.ExitStack() as stack:
        for port in candidates:
            if port in _handed_out:
                continue
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
            if len(ports) == count:
                break
    if len(ports) < count:
        raise RuntimeError(f"fewer than {count} free ports in {PORT_RANGE}")
    _handed_out.update(ports)
    return ports


@contextlib.asynccontextmanager
async def open_low_port_brokers(
    root: pathlib.Path, node_ids: Sequence[int], *, cluster: bool, options: Sequence[str] = ()
) -> AsyncIterator[LocalBrokers]:
    """As `open_brokers` of bench/cluster_throughput.py (every process stopped by PID when
    the block exits, however it exits), with ports from `low_free_ports`."""
    async with trio.open_nursery() as nursery:
        brokers = LocalBrokers(nursery, root, node_ids, cluster=cluster, options=options)
        ports = low_free_ports(2 * len(node_ids))
        brokers.nodes = {
            node_id: BrokerNode(node_id, ports[2 * i], ports[2 * i + 1], root / f"node-{node_id}")
            for i, node_id in enumerate(node_ids)
        }
        try:
            yield brokers
        finally:
            await brokers.stop_all()
            nursery.cancel_scope.cancel()


async def describe(bootstrap: str, topic: str) -> TopicDescription:
    async with client.connect(bootstrap, request_timeout_ms=5000) as cluster:
        return await Admin(cluster, timeout_ms=5000).describe_topic(topic)


@dataclasses.dataclass(frozen=True)
class ReplicaView:
    """One partition as every broker sees it: its leader's view and each replica's log end
    (describe_topic answers with the answering broker's local log)."""

    partition: int
    leader: int
    isr: tuple[int, ...]
    replicas: tuple[int, ...]
    high_watermark: int  # the leader's
    log_end_offset: int  # the leader's
    replica_log_ends: dict[int, int]

    @property
    def caught_up(self) -> bool:
        return (
            self.leader >= 0
            and set(self.isr) == set(self.replicas)
            and self.high_watermark == self.log_end_offset
            and all(end == self.log_end_offset for end in self.replica_log_ends.values())
        )

    def __str__(self) -> str:
        ends = ",".join(f"n{node}={end}" for node, end in sorted(self.replica_log_ends.items()))
        return (
            f"p{self.partition} leader={self.leader} isr={list(self.isr)} "
            f"hw={self.high_watermark} log_ends[{ends}]"
        )


async def replica_views(brokers: LocalBrokers, topic: str) -> list[ReplicaView]:
    """Each partition of `topic` as its leader and its replicas report it (running brokers
    only; a broker that does not answer leaves its replicas out)."""
    local: dict[int, TopicDescription] = {}
    for node in brokers.nodes.values():
        if node.process is None or node.process.returncode is not None:
            continue
        with contextlib.suppress(Exception):
            with trio.fail_after(5):
                local[node.node_id] = await describe(node.address, topic)
    views = []
    if not local:
        return views
    for entry in next(iter(local.values())).partitions:
        leader_description = local.get(entry.leader)
        leader_view = leader_description.partitions[entry.partition] if leader_description else None
        ends = {
            node: description.partitions[entry.partition].log_end_offset
            for node, description in local.items()
            if node in entry.replicas and description.partitions[entry.partition].local
        }
        views.append(
            ReplicaView(
                entry.partition,
                leader_view.leader if leader_view else -1,
                leader_view.isr if leader_view else (),
                entry.replicas,
                leader_view.high_watermark if leader_view else -1,
                leader_view.log_end_offset if leader_view else -1,
                ends,
            )
        )
    return views


async def wait_caught_up(
    brokers: LocalBrokers, topic: str, timeout_s: float
) -> tuple[bool, list[ReplicaView]]:
    """Wait until every partition has a leader, a full ISR, HW = log end and every replica at
    the leader's log end. Returns (whether that happened in time, the last views)."""
    views: list[ReplicaView] = []
    with trio.move_on_after(timeout_s):
        while True:
            views = await replica_views(brokers, topic)
            if views and all(view.caught_up for view in views):
                return True, views
            await trio.sleep(POLL_S)
    return False, views


@dataclasses.dataclass(frozen=True)
class Figures:
    records: int
    seconds: float
    value_bytes: int
    latencies_ms: tuple[float, ...]
    batches_failed: int
    brokers_cpu_s: float = 0.0  # the broker processes' user + system time, catch-up included
    client_cpu_s: float = 0.0  # this process's during the run

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds

    @property
    def brokers_cpu_ms_per_megabyte(self) -> float:
        return self.brokers_cpu_s * 1000 / (self.records * self.value_bytes / 1e6)

    @property
    def client_cpu_ms_per_megabyte(self) -> float:
        return self.client_cpu_s * 1000 / (self.records * self.value_bytes / 1e6)

    @property
    def megabytes_per_second(self) -> float:
        return self.records * self.value_bytes / self.seconds / 1e6


async def produce(
    bootstrap: str, topic: str, value_bytes: int, acks: int | str, seconds: float, records_max: int
) -> Figures:
    """Produce as bench/cluster_throughput.py does (keyless, sticky, to every partition)."""
    latencies: list[float] = []
    value = os.urandom(value_bytes // 2 + 1).hex().encode()[:value_bytes]
    buffer_bytes = (8 << 20) if value_bytes < 1024 else (32 << 20)
    async with client.connect(bootstrap) as cluster, trio.open_nursery() as nursery:
        async with Producer(
            cluster, acks=acks, linger_ms=2, batch_size=256 * 1024, buffer_bytes_max=buffer_bytes
        ) as producer:
            await (await producer.send(topic, value)).wait()  # loads metadata
            count = 1
            burst = max(10, 100_000 // value_bytes)  # about 100 kB between checkpoints
            next_sample = LATENCY_SAMPLE_EVERY
            started = time.perf_counter()
            deadline = started + seconds
            while count < records_max and time.perf_counter() < deadline:
                sent = 0
                try:
                    while sent < burst:
                        producer.send_nowait(topic, value)
                        sent += 1
                except trio.WouldBlock:  # the buffer is full: wait for room
                    await producer.send(topic, value)
                    sent += 1
                count += sent
                if count >= next_sample:
                    next_sample += LATENCY_SAMPLE_EVERY
                    delivery = await producer.send(topic, value)
                    nursery.start_soon(_sample_latency, delivery, time.perf_counter(), latencies)
                    count += 1
                await trio.lowlevel.checkpoint()
            await producer.flush()
            elapsed = time.perf_counter() - started
            failed = producer.statistics().batches_failed
    return Figures(count, elapsed, value_bytes, tuple(latencies), failed)


async def _sample_latency(delivery: client.Delivery, sent_at: float, latencies: list) -> None:
    with contextlib.suppress(client.DwalError):
        await delivery.wait()
        latencies.append((time.perf_counter() - sent_at) * 1000)


SETUPS = {
    # name: (nodes, replication factor, acks)
    "single_node": (1, 1, 1),
    "rf1": (3, 1, 1),
    "rf3_acks1": (3, 3, 1),
    "rf3_acksall": (3, 3, "all"),
}


async def run_setups(
    names: Sequence[str], node_count: int, fsync: str, arguments: argparse.Namespace
) -> dict[tuple[str, int], Figures]:
    results: dict[tuple[str, int], Figures] = {}
    with tempfile.TemporaryDirectory(prefix="dwal-replication-throughput-") as temporary:
        async with open_low_port_brokers(
            pathlib.Path(temporary),
            range(1, node_count + 1),
            cluster=node_count > 1,
            options=["--fsync", fsync],
        ) as brokers:
            await brokers.start_all()
            bootstrap = brokers.bootstrap()
            async with client.connect(bootstrap) as cluster:
                admin = Admin(cluster)
                for name in names:
                    for value_bytes in arguments.sizes:
                        await admin.create_topic(
                            f"{name}-{value_bytes}",
                            partitions=arguments.partitions,
                            replication_factor=SETUPS[name][1],
                        )
            for name in names:
                _, replicas, acks = SETUPS[name]
                for value_bytes in arguments.sizes:
                    topic = f"{name}-{value_bytes}"
                    ready, _ = await wait_caught_up(brokers, topic, READY_TIMEOUT_S)
                    if not ready:
                        print(f"PROBLEM fsync={fsync} {topic}: not ready in {READY_TIMEOUT_S} s")
                    brokers_cpu_s = brokers_cpu_seconds(brokers)
                    client_cpu_s = own_cpu_seconds()
                    figures = await produce(
                        bootstrap, topic, value_bytes, acks, arguments.seconds, arguments.records
                    )
                    client_cpu_s = own_cpu_seconds() - client_cpu_s
                    latencies = list(figures.latencies_ms)
                    print(
                        f"fsync={fsync} {name} produce_{size_label(value_bytes)} "
                        f"records/s={figures.records_per_second:.0f} "
                        f"MB/s={figures.megabytes_per_second:.1f} "
                        f"p50_ms={percentile(latencies, 0.5):.2f} "
                        f"p99_ms={percentile(latencies, 0.99):.2f} "
                        f"batches_failed={figures.batches_failed}",
                        flush=True,
                    )
                    if figures.batches_failed:
                        print(f"PROBLEM fsync={fsync} {topic}: {figures.batches_failed} failed")
                    await check_stored(brokers, topic, figures, fsync)
                    # the brokers' CPU until the followers caught up (acks=1 leaves them behind)
                    figures = dataclasses.replace(
                        figures,
                        brokers_cpu_s=brokers_cpu_seconds(brokers) - brokers_cpu_s,
                        client_cpu_s=client_cpu_s,
                    )
                    results[name, value_bytes] = figures
                    print(
                        f"  {topic}: cpu_ms_per_MB "
                        f"brokers={figures.brokers_cpu_ms_per_megabyte:.2f} "
                        f"client={figures.client_cpu_ms_per_megabyte:.2f}"
                    )
                    await delete_topic(brokers, topic, fsync)
    return results


def brokers_cpu_seconds(brokers: LocalBrokers) -> float:
    """The CPU time (user and system) the running broker processes have used so far."""
    total = 0.0
    for node in brokers.nodes.values():
        if node.process is not None and node.process.returncode is None:
            with contextlib.suppress(OSError):  # exited meanwhile
                total += process_cpu_seconds(node.process.pid)
    return total


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """The CPU time (user and system) of this process, the client's, so far."""
    times = os.times()
    return times.user + times.system


async def delete_topic(brokers: LocalBrokers, topic: str, fsync: str) -> None:
    """Delete a measured topic and wait until no broker holds a file of it, so that the next
    setup starts with the page cache the first one had (see the module's docstring)."""
    started = time.perf_counter()
    async with client.connect(brokers.bootstrap()) as cluster:
        await Admin(cluster).delete_topic(topic)
    with trio.move_on_after(DELETE_TIMEOUT_S):
        while any(topic_directories(node.data_dir, topic) for node in brokers.nodes.values()):
            await trio.sleep(POLL_S)
        waited_ms = (time.perf_counter() - started) * 1000
        print(f"  {topic}: deleted, files removed in {waited_ms:.0f} ms")
        return
    print(f"PROBLEM fsync={fsync} {topic}: files still there {DELETE_TIMEOUT_S} s after deletion")


def topic_directories(data_dir: pathlib.Path, topic: str) -> list[pathlib.Path]:
    """The partition directories of `topic` under a broker's data directory, those being
    removed after a deletion (``<topic>-<partition>.<id>-delete``) included."""
    if not data_dir.exists():
        return []
    return [entry for entry in data_dir.iterdir() if entry.name.startswith(f"{topic}-")]


async def check_stored(brokers: LocalBrokers, topic: str, figures: Figures, fsync: str) -> None:
    """Wait for the followers to catch up; report if the leaders hold fewer records than were
    produced while no batch failed (then every one of them was acknowledged; the records of
    a failed batch may or may not be stored) or if some replica did not catch up within
    CATCH_UP_TIMEOUT_S (then the partitions that did not)."""
    produced = figures.records
    started = time.perf_counter()
    caught_up, views = await wait_caught_up(brokers, topic, CATCH_UP_TIMEOUT_S)
    stored = sum(max(view.log_end_offset, 0) for view in views)
    waited_ms = (time.perf_counter() - started) * 1000
    print(f"  {topic}: stored={stored} produced={produced} catch_up_wait_ms={waited_ms:.0f}")
    if not caught_up:
        print(f"PROBLEM fsync={fsync} {topic}: replicas not caught up in {CATCH_UP_TIMEOUT_S} s:")
        for view in views:
            if not view.caught_up:
                print(f"    {view}")
    if stored < produced and not figures.batches_failed:
        print(f"PROBLEM fsync={fsync} {topic}: {produced - stored} acknowledged records missing")
    elif stored < produced:
        print(f"  ({produced - stored} fewer: records of the failed batches, not acknowledged)")


def print_table(fsync: str, results: dict[tuple[str, int], Figures], sizes: Sequence[int]) -> None:
    print()
    print(f"fsync={fsync}")
    header = "".join(
        f"{size_label(size) + ' rec/s':>16}{size_label(size) + ' MB/s':>14}" for size in sizes
    )
    print(f"{'setup':14}{header}")
    for name in SETUPS:
        row = "".join(
            f"{results[name, size].records_per_second:16.0f}"
            f"{results[name, size].megabytes_per_second:14.1f}"
            for size in sizes
        )
        print(f"{name:14}{row}")
    for base in ("rf1", "single_node"):
        ratios = []
        for size in sizes:
            ratio = results["rf3_acksall", size].records_per_second
            ratio /= results[base, size].records_per_second
            ratios.append(f"{size_label(size)}={ratio:.2f}")
        print(f"ratio rf3_acksall / {base}: {' '.join(ratios)}")
    print("CPU ms per MB produced, brokers + client:")
    for name in SETUPS:
        row = " ".join(
            f"{size_label(size)}={results[name, size].brokers_cpu_ms_per_megabyte:.2f}"
            f"+{results[name, size].client_cpu_ms_per_megabyte:.2f}"
            for size in sizes
        )
        print(f"  {name:14}{row}")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="produce duration per run")
    parser.add_argument("--records", type=int, default=5_000_000, help="max records per run")
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(size) for size in text.split(",")],
        default=[100, 1024],
        help="record value sizes in bytes, comma-separated",
    )
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument(
        "--fsync",
        type=lambda text: text.split(","),
        default=["never", "always"],
        help="fsync policies, comma-separated (never, interval, always)",
    )
    arguments = parser.parse_args()
    print(
        f"partitions={arguments.partitions} seconds={arguments.seconds} "
        f"records_max={arguments.records} fsync={','.join(arguments.fsync)} "
        f"cores={os.cpu_count()} client: linger_ms=2 batch_size=262144 "
        "buffer=8MiB(<1KiB)/32MiB max_in_flight_per_partition=5 compression=none",
        flush=True,
    )
    tables = []
    for fsync in arguments.fsync:
        results = await run_setups(["single_node"], 1, fsync, arguments)
        results |= await run_setups(["rf1", "rf3_acks1", "rf3_acksall"], 3, fsync, arguments)
        tables.append((fsync, results))
    for fsync, results in tables:
        print_table(fsync, results, arguments.sizes)


if __name__ == "__main__":
    trio.run(main)
