"""A rolling restart of a three-node cluster under acks=all load: what each broker's
controlled shutdown and return costs the producers, and whether anything acknowledged is lost.

Three nodes on 127.0.0.1, each a broker and a controller voter as in `make cluster` (ports
tried in 20000-32000, temporary data directories, fsync policy `--fsync`, default `never`;
every process is stopped by PID when the run ends, on errors too, and when the bench gets
SIGINT, SIGTERM or SIGHUP: `LocalBrokers` of bench/cluster_throughput.py via
`open_low_port_brokers` of bench/replication_throughput.py). One topic of `--partitions`
(6) partitions with RF 3 (min.insync.replicas 2, the default at RF 3).

Load: `--producers` (2) producers, each with its own client (metadata cache, connections),
acks=all and the client's defaults otherwise (linger 5 ms, retry backoff 100 ms or
`--retry-backoff-ms`, delivery timeout 120 s; a record whose request was written but not
answered fails with DeliveryOutcomeUnknown and is not resent). Together they send `--rate`
(2000) unique values per second, paced every 10 ms, round-robin over the partitions. For
every acknowledged record the bench keeps (partition, offset, value, send time, ack time).

After `--warmup` (3) seconds of steady load (the baseline row), for each node in turn:
SIGTERM it (a controlled shutdown: the active controller moves its leaderships away and
takes it out of the ISRs; when the node is the active controller itself, another must be
elected first), wait for the process to exit, start it again on the same data directory
and ports, wait (bounded, polling describe topics on every broker) until it is back in the
ISR of every partition, then keep the load running until `--duration-per-broker` (10)
seconds have passed since the SIGTERM (at least 1 s after the rejoin). Per node:

    led          partitions it led before the SIGTERM
    ctrl         whether it was the active controller
    stall_ms     the longest wait between two consecutive acknowledgements of one
                 partition (the worst partition) during the node's window
    any_gap_ms   the longest wait between two consecutive acknowledgements of any partition
    lat_max_ms   the longest send -> acknowledgement of a record sent in the window
    shutdown_ms  SIGTERM -> process exit
    start_s      restart -> the broker serves (its broker_started line)
    rejoin_s     restart -> the node is in every partition's ISR (as the leaders report it)
    unknown      records of the window whose outcome is unknown (DeliveryOutcomeUnknown)
    failed       records of the window that failed as not stored

At the end the load stops (every record answered), the bench waits until the replicas
caught up and reads every partition in full from its leader: `lost` counts acknowledged
records whose (partition, offset) does not hold their value, `duplicates` values stored
more than once, `unknown_stored` the unknown-outcome records that were stored anyway,
`unexpected` stored values that were never acknowledged nor unknown (a record that failed
as "not stored" but is). `--trace` prints, per node, the broker log lines around the
SIGTERM with their time relative to it, to see where a stall goes.

On this 2-core machine the three brokers and the client share 2 cores. Nothing is asserted
about time; lost acknowledged records are printed as a PROBLEM line.

Usage: python bench/rolling_restart.py [--duration-per-broker 10] [--rate 2000]
       [--partitions 6] [--producers 2] [--warmup 3] [--fsync never]
       [--retry-backoff-ms 100] [--trace]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import re
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client  # noqa: E402
from bench.cluster_throughput import LocalBrokers  # noqa: E402
from bench.replication_failover import active_controller  # noqa: E402
from bench.replication_throughput import (  # noqa: E402
    ReplicaView,
    open_low_port_brokers,
    replica_views,
    wait_caught_up,
)
from client import Admin, Consumer, DeliveryOutcomeUnknown, Producer  # noqa: E402
from protocol import DwalError  # noqa: E402

NODE_IDS = (1, 2, 3)
TOPIC = "rolling"
TICK_S = 0.01  # the producers' pacing
BURST_MAX = 5_000  # records one tick may send when it fell behind
READY_TIMEOUT_S = 60.0  # a leader and a full ISR for every partition
EXIT_TIMEOUT_S = 60.0  # SIGTERM -> process exit
REJOIN_TIMEOUT_S = 120.0  # restart -> back in every ISR
CATCH_UP_TIMEOUT_S = 60.0
READ_TIMEOUT_S = 120.0
POLL_S = 0.1
SETTLE_S = 1.0  # load kept running after a rejoin before the window closes
LOG_TIME = re.compile(r"^time=(\S+)Z ")
# routine lines left out of --trace
TRACE_NOISE = re.compile(r"event=(connection_opened|connection_closed|connection_idle_closed) ")
TRACE_BEFORE_S = 0.5
TRACE_AFTER_S = 4.0


@dataclasses.dataclass(slots=True)
class Ack:
    partition: int
    offset: int
    value: bytes
    sent_at: float
    acked_at: float


@dataclasses.dataclass
class Load:
    """What the producers saw."""

    acks: list[Ack] = dataclasses.field(default_factory=list)
    # (value, partition, when the outcome came)
    unknown: list[tuple[bytes, int, float]] = dataclasses.field(default_factory=list)
    failed: list[tuple[bytes, int, float]] = dataclasses.field(default_factory=list)
    errors: Counter = dataclasses.field(default_factory=Counter)
    sent: int = 0
    stop: trio.Event = dataclasses.field(default_factory=trio.Event)


@dataclasses.dataclass
class Window:
    label: str
    start: float
    end: float
    led: tuple[int, ...] = ()  # partitions the node led before its SIGTERM
    was_controller: bool = False
    shutdown_s: float = float("nan")
    start_s: float = float("nan")
    rejoin_s: float = float("nan")
    log_lines: list[tuple[float, int, str]] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- the load


async def produce(
    bootstrap: str, index: int, rate: float, partitions: int, load: Load, options: dict
) -> None:
    """Send `rate` records per second until `load.stop`, then flush: every record gets its
    outcome. Values are unique: producer index and sequence number. `options` are further
    Producer options."""
    async with client.connect(bootstrap) as cluster, trio.open_nursery() as waiters:
        async with Producer(cluster, acks="all", **options) as producer:
            started = trio.current_time()
            sequence = 0
            next_tick = started
            while not load.stop.is_set():
                due = min(int(rate * (trio.current_time() - started)) + 1 - sequence, BURST_MAX)
                groups: dict[int, list[tuple[bytes, client.Delivery]]] = defaultdict(list)
                sent_at = time.perf_counter()
                for _ in range(max(due, 0)):
                    partition = (sequence + index) % partitions
                    value = b"p%d-%010d" % (index, sequence)
                    sequence += 1
                    try:
                        delivery = producer.send_nowait(TOPIC, value, partition=partition)
                    except trio.WouldBlock:  # metadata not loaded yet, or the buffer is full
                        delivery = await producer.send(TOPIC, value, partition=partition)
                    groups[partition].append((value, delivery))
                load.sent += max(due, 0)
                for partition, group in groups.items():
                    waiters.start_soon(_await_group, partition, sent_at, group, load)
                next_tick += TICK_S
                await trio.sleep_until(max(next_tick, trio.current_time()))
            # leaving the block flushes: every record sent gets its outcome


async def _await_group(
    partition: int, sent_at: float, group: list[tuple[bytes, client.Delivery]], load: Load
) -> None:
    """The records of one partition sent in one tick: they share a batch, hence an answer."""
    for value, delivery in group:
        try:
            metadata = await delivery.wait()
        except DeliveryOutcomeUnknown as error:
            load.unknown.append((value, partition, time.perf_counter()))
            load.errors[f"unknown:{error.code.name}"] += 1
            continue
        except DwalError as error:
            load.failed.append((value, partition, time.perf_counter()))
            load.errors[f"failed:{type(error).__name__}:{error.code.name}"] += 1
            continue
        load.acks.append(Ack(partition, metadata.offset, value, sent_at, time.perf_counter()))


# ----------------------------------------------------------------------------- cluster state


async def wait_views(
    brokers: LocalBrokers, partitions: int, timeout_s: float, done
) -> list[ReplicaView]:
    """Poll every running broker's describe topics until `done(views)`; returns the views."""
    with trio.fail_after(timeout_s):
        while True:
            views = await replica_views(brokers, TOPIC)
            if len(views) == partitions and done(views):
                return views
            await trio.sleep(POLL_S)


def all_led_and_in_isr(node_ids: Sequence[int]):
    def done(views: list[ReplicaView]) -> bool:
        return all(
            view.leader in NODE_IDS and all(n in view.isr for n in node_ids) for view in views
        )

    return done


def leaders_text(views: list[ReplicaView]) -> str:
    counts = Counter(view.leader for view in views)
    return " ".join(f"node{node}={counts[node]}" for node in sorted(counts))


# ----------------------------------------------------------------------------- one restart


async def restart_node(
    brokers: LocalBrokers, node_id: int, partitions: int, duration_s: float, trace: bool
) -> Window:
    views = await wait_views(brokers, partitions, READY_TIMEOUT_S, all_led_and_in_isr(NODE_IDS))
    controller = await active_controller(brokers)
    node = brokers.nodes[node_id]
    process = node.process
    assert process is not None and process.returncode is None
    window = Window(f"node{node_id}", start=time.perf_counter(), end=float("nan"))
    window.led = tuple(view.partition for view in views if view.leader == node_id)
    window.was_controller = controller == node_id
    term_wall = time.time()
    window.start = time.perf_counter()
    os.kill(process.pid, signal.SIGTERM)
    with trio.fail_after(EXIT_TIMEOUT_S):
        await process.wait()
    window.shutdown_s = time.perf_counter() - window.start
    with trio.move_on_after(5):
        await node.exited.wait()  # its log read to the end
    stopped_log = node.output.decode(errors="replace")
    restarted_at = await brokers.spawn(node_id)
    window.start_s = await brokers.wait_started(node_id) - restarted_at
    await wait_views(brokers, partitions, REJOIN_TIMEOUT_S, all_led_and_in_isr(NODE_IDS))
    window.rejoin_s = time.perf_counter() - restarted_at
    until = max(window.start + duration_s, time.perf_counter() + SETTLE_S)
    await trio.sleep(until - time.perf_counter())
    window.end = time.perf_counter()
    if trace:
        # the stopped run's log, then the restarted one's (its registration moves leaders too)
        logs = {node_id: stopped_log + "\n" + node.output.decode(errors="replace")}
        logs.update(
            (other, brokers.nodes[other].output.decode(errors="replace"))
            for other in NODE_IDS
            if other != node_id
        )
        window.log_lines = trace_lines(logs, term_wall)
    return window


def trace_lines(logs: dict[int, str], origin_wall: float) -> list[tuple[float, int, str]]:
    """Log lines of interest within TRACE_BEFORE_S before and TRACE_AFTER_S after
    `origin_wall`, as (seconds from it, node, line)."""
    found = []
    for node_id, text in logs.items():
        for line in text.splitlines():
            match = LOG_TIME.match(line)
            if not match or TRACE_NOISE.search(line):
                continue
            stamp = datetime.datetime.fromisoformat(match.group(1)).replace(
                tzinfo=datetime.timezone.utc
            )
            offset = stamp.timestamp() - origin_wall
            if -TRACE_BEFORE_S <= offset <= TRACE_AFTER_S:
                found.append((offset, node_id, line))
    return sorted(found)


# ----------------------------------------------------------------------------- figures


def worst_gap(times: Sequence[float], start: float, end: float) -> float:
    """The longest interval between consecutive `times` (sorted) that overlaps
    [start, end]: the pair around `start` counts, so does the pair around `end`."""
    worst = 0.0
    for earlier, later in zip(times, times[1:]):
        if later > start and earlier < end:
            worst = max(worst, later - earlier)
    return worst


@dataclasses.dataclass
class WindowFigures:
    stall_s: float
    stall_partition: int
    any_gap_s: float
    latency_max_s: float
    unknown: int
    failed: int


def window_figures(load: Load, window: Window) -> WindowFigures:
    all_times = sorted(ack.acked_at for ack in load.acks)
    by_partition: dict[int, list[float]] = defaultdict(list)
    for ack in load.acks:
        by_partition[ack.partition].append(ack.acked_at)
    stall, stall_partition = 0.0, -1
    for partition, times in sorted(by_partition.items()):
        gap = worst_gap(sorted(times), window.start, window.end)
        if gap > stall:
            stall, stall_partition = gap, partition
    latencies = [
        ack.acked_at - ack.sent_at for ack in load.acks if window.start <= ack.sent_at < window.end
    ]
    return WindowFigures(
        stall,
        stall_partition,
        worst_gap(all_times, window.start, window.end),
        max(latencies, default=float("nan")),
        sum(window.start <= when < window.end for _, _, when in load.unknown),
        sum(window.start <= when < window.end for _, _, when in load.failed),
    )


# ----------------------------------------------------------------------------- the check


async def read_topic(brokers: LocalBrokers, partitions: int) -> dict[int, dict[int, bytes]]:
    """Every record of every partition up to its leader's high watermark: offset -> value."""
    caught_up, views = await wait_caught_up(brokers, TOPIC, CATCH_UP_TIMEOUT_S)
    if not caught_up:
        print("PROBLEM: replicas not caught up; reading to the leaders' high watermarks:")
        for view in views:
            print(f"  {view}")
    ends = {p: 0 for p in range(partitions)}  # a partition no broker described: nothing read
    ends.update((view.partition, view.high_watermark) for view in views)
    stored: dict[int, dict[int, bytes]] = {p: {} for p in range(partitions)}
    async with client.connect(brokers.bootstrap()) as cluster:
        consumer = Consumer(cluster, auto_offset_reset="earliest")
        consumer.assign([(TOPIC, p) for p in range(partitions)])
        with trio.fail_after(READ_TIMEOUT_S):
            while any((consumer.position((TOPIC, p)) or 0) < ends[p] for p in range(partitions)):
                for tp, records in (await consumer.poll(timeout_ms=500)).items():
                    for record in records:
                        if record.offset < ends[tp.partition]:
                            stored[tp.partition][record.offset] = record.value or b""
    return stored


@dataclasses.dataclass
class Check:
    stored: int
    lost: int
    duplicates: int
    unknown_stored: int
    unexpected: int
    lost_examples: list[str]


def check(load: Load, stored: dict[int, dict[int, bytes]]) -> Check:
    lost = [
        f"p{ack.partition}@{ack.offset}={ack.value.decode()}"
        for ack in load.acks
        if stored.get(ack.partition, {}).get(ack.offset) != ack.value
    ]
    counts = Counter(value for records in stored.values() for value in records.values())
    acked = {ack.value for ack in load.acks}
    unknown = {value for value, _, _ in load.unknown}
    return Check(
        stored=sum(len(records) for records in stored.values()),
        lost=len(lost),
        duplicates=sum(count - 1 for count in counts.values() if count > 1),
        unknown_stored=sum(value in counts for value in unknown),
        unexpected=sum(1 for value in counts if value not in acked and value not in unknown),
        lost_examples=lost[:10],
    )


# ----------------------------------------------------------------------------- main


def print_table(load: Load, windows: list[Window]) -> float:
    """Print one row per window; returns the worst stall (ms) of the restart windows."""
    print()
    header = (
        f"{'window':9} {'led':>3} {'ctrl':>4} {'stall_ms':>8} {'part':>4} {'any_gap_ms':>10} "
        f"{'lat_max_ms':>10} {'shutdown_ms':>11} {'start_s':>7} {'rejoin_s':>8} "
        f"{'unknown':>7} {'failed':>6}"
    )
    print(header)
    worst = 0.0
    for window in windows:
        figures = window_figures(load, window)
        if window.label != "baseline":
            worst = max(worst, figures.stall_s * 1000)
        print(
            f"{window.label:9} {len(window.led):>3} {'yes' if window.was_controller else 'no':>4} "
            f"{figures.stall_s * 1000:8.0f} {figures.stall_partition:>4} "
            f"{figures.any_gap_s * 1000:10.0f} {figures.latency_max_s * 1000:10.0f} "
            f"{window.shutdown_s * 1000:11.0f} {window.start_s:7.2f} {window.rejoin_s:8.2f} "
            f"{figures.unknown:>7} {figures.failed:>6}"
        )
    return worst


async def run(arguments: argparse.Namespace, root: pathlib.Path) -> None:
    partitions = arguments.partitions
    load = Load()
    windows: list[Window] = []
    options = ["--fsync", arguments.fsync]
    producer_options = {}
    if arguments.retry_backoff_ms is not None:
        producer_options["retry_backoff_ms"] = arguments.retry_backoff_ms
    async with open_low_port_brokers(root, NODE_IDS, cluster=True, options=options) as brokers:
        await brokers.start_all()
        async with client.connect(brokers.bootstrap()) as cluster:
            await Admin(cluster).create_topic(TOPIC, partitions=partitions, replication_factor=3)
        views = await wait_views(brokers, partitions, READY_TIMEOUT_S, all_led_and_in_isr(NODE_IDS))
        print(f"topic {TOPIC}: partitions led by {leaders_text(views)}", flush=True)
        async with trio.open_nursery() as nursery:
            for index in range(arguments.producers):
                nursery.start_soon(
                    produce,
                    brokers.bootstrap(),
                    index,
                    arguments.rate / arguments.producers,
                    partitions,
                    load,
                    producer_options,
                )
            baseline_start = time.perf_counter() + 1.0  # after the producers' start
            await trio.sleep(arguments.warmup)
            windows.append(Window("baseline", baseline_start, time.perf_counter()))
            for node_id in NODE_IDS:
                window = await restart_node(
                    brokers, node_id, partitions, arguments.duration_per_broker, arguments.trace
                )
                windows.append(window)
                figures = window_figures(load, window)
                views = await replica_views(brokers, TOPIC)
                print(
                    f"restarted node{node_id}: stall_ms={figures.stall_s * 1000:.0f} "
                    f"shutdown_ms={window.shutdown_s * 1000:.0f} rejoin_s={window.rejoin_s:.2f} "
                    f"now led by {leaders_text(views)}",
                    flush=True,
                )
                unknown = Counter(
                    partition
                    for _, partition, when in load.unknown
                    if window.start <= when < window.end
                )
                if arguments.trace:
                    print(
                        f"  node{node_id} led partitions {list(window.led)}; unknown outcomes "
                        f"by partition: {dict(sorted(unknown.items()))}"
                    )
                for offset, node, line in window.log_lines:
                    print(f"  {offset * 1000:+7.0f} ms node{node} {line}")
            load.stop.set()
        elapsed = time.perf_counter() - baseline_start + 1.0
        stored = await read_topic(brokers, partitions)
    result = check(load, stored)
    worst = print_table(load, windows)
    errors = ", ".join(f"{kind} x{count}" for kind, count in sorted(load.errors.items()))
    print()
    print(
        f"sent={load.sent} acked={len(load.acks)} lost={result.lost} "
        f"unknown={len(load.unknown)} unknown_stored={result.unknown_stored} "
        f"failed={len(load.failed)} duplicates={result.duplicates} "
        f"unexpected={result.unexpected} stored={result.stored} "
        f"rate_achieved={len(load.acks) / elapsed:.0f}/s"
    )
    print(f"producer errors: {errors or 'none'}")
    if result.lost:
        print(f"PROBLEM: {result.lost} acknowledged records lost, e.g. {result.lost_examples}")
    print(
        f"rolling_restart brokers={len(NODE_IDS)} acked={len(load.acks)} lost={result.lost} "
        f"unknown={len(load.unknown)} duplicates={result.duplicates} max_stall_ms={worst:.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration-per-broker",
        type=float,
        default=10.0,
        help="seconds from each SIGTERM to the next (at least until the rejoin + 1 s)",
    )
    parser.add_argument("--rate", type=float, default=2000.0, help="records/s, all producers")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before the first")
    parser.add_argument("--fsync", choices=["always", "interval", "never"], default="never")
    parser.add_argument(
        "--retry-backoff-ms",
        type=int,
        default=None,
        help="the producers' retry_backoff_ms (default: the client's, 100)",
    )
    parser.add_argument("--trace", action="store_true", help="print broker log lines per restart")
    arguments = parser.parse_args()
    print(
        f"nodes=3 rf=3 min_insync=2 acks=all partitions={arguments.partitions} "
        f"rate={arguments.rate:g}/s producers={arguments.producers} "
        f"duration_per_broker={arguments.duration_per_broker:g}s fsync={arguments.fsync} "
        f"retry_backoff_ms={arguments.retry_backoff_ms or 'default'} "
        f"cores={os.cpu_count()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="dwal-rolling-restart-") as temporary:
        signalled = trio.run(run_until_signalled, arguments, pathlib.Path(temporary))
    if signalled is not None:
        print(f"stopped by signal {signalled.name}; every broker process was stopped")
        sys.exit(128 + signalled)


async def run_until_signalled(
    arguments: argparse.Namespace, root: pathlib.Path
) -> signal.Signals | None:
    """`run`, cancelled by SIGINT, SIGTERM or SIGHUP (the brokers are then stopped by PID as
    on any exit: SIGTERM, SIGKILL after a timeout); returns the signal, None if none came."""
    received: list[signal.Signals] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def cancel_on_signal() -> None:
                async for signum in signals:
                    received.append(signal.Signals(signum))
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(cancel_on_signal)
            await run(arguments, root)
            nursery.cancel_scope.cancel()
    return received[0] if received else None


if __name__ == "__main__":
    main()
