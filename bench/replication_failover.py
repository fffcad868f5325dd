"""Failover of a replicated partition: leader SIGKILL, and controlled shutdown (SIGTERM) of a
leader, each to the next acknowledged acks=all write on that partition.

Three nodes on 127.0.0.1 (each a broker and a controller voter; ports tried in 20000-32000,
temporary data directories, every process stopped by PID at the end, on errors too: see
bench/replication_throughput.py), fsync policy `--fsync` (default `never`), one topic of one
partition with RF 3 (min.insync.replicas=2). `--writers` (4) tasks keep writing unique values
to partition 0 through one producer with acks=all, linger_ms=0 and the client's defaults
otherwise (retries of "not stored" failures after a metadata refresh within the delivery
timeout; a write whose outcome is unknown, such as one in flight to a killed leader, fails with
DeliveryOutcomeUnknown and is counted, not resent). Each writer sends the next record as soon
as the previous one is answered.

Rounds, `--rounds` (3) of each:

1. SIGKILL the partition's current leader; the figure is from the kill until the first
   acknowledgement of a record sent after the kill. It includes the controller noticing the
   silence (the broker session timeout), electing a new leader from the ISR, the metadata
   reaching the surviving brokers and the producer finding the new leader. When the killed
   node was also the active controller, a controller election comes first (marked).
2. SIGTERM the partition's current leader (controlled shutdown: the controller moves its
   leaderships away before it stops); the figure is from the signal until the first
   acknowledgement of a record sent after it.

After each round the node is restarted on its data directory and the round waits until it is
back in the partition's ISR. All of it is done twice: with the default broker session (6 s,
heartbeat 1 s), then on a new cluster started with `--config` naming
`broker_session_timeout_ms = 2000` and `broker_heartbeat_interval_ms = 200`.

At the end of each cluster the partition is read in full from its leader and every
acknowledged value is looked for: missing ones are printed as PROBLEM lines (an acks=all
write with RF 3 and min.insync.replicas=2 must survive one crash). Prints each sample, then
min/median/max per figure. On this 2-core machine the three brokers and the client share 2
cores. Nothing is asserted about time.

Usage: python bench/replication_failover.py [--rounds 3] [--writers 4] [--fsync never]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client  # noqa: E402
from bench.cluster_throughput import LocalBrokers  # noqa: E402
from bench.replication_throughput import open_low_port_brokers, replica_views  # noqa: E402
from client import Admin, Consumer, Producer  # noqa: E402
from protocol import DwalError  # noqa: E402

NODE_IDS = (1, 2, 3)
TOPIC = "failover"
SHORT_SESSION_TOML = "broker_session_timeout_ms = 2000\nbroker_heartbeat_interval_ms = 200\n"
WAIT_TIMEOUT_S = 60.0  # a leader known, the ISR full again, the next acknowledgement
POLL_S = 0.05
READ_TIMEOUT_S = 60.0


@dataclasses.dataclass
class Writes:
    """What the writer tasks saw: (sent_at, acked_at) of every acknowledged record, the
    acknowledged values, failures by kind."""

    acks: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    acked_values: set[bytes] = dataclasses.field(default_factory=set)
    failures: Counter = dataclasses.field(default_factory=Counter)
    next_sequence: int = 0
    acked_event: trio.Event = dataclasses.field(default_factory=trio.Event)

    def first_ack_sent_after(self, moment: float) -> float | None:
        """The acknowledgement time of the first record sent at or after `moment`."""
        times = [acked for sent, acked in self.acks if sent >= moment]
        return min(times) if times else None

    def last_ack_before(self, moment: float) -> float | None:
        times = [acked for _, acked in self.acks if acked < moment]
        return max(times) if times else None


async def writer(producer: Producer, writes: Writes) -> None:
    while True:
        value = b"v%09d" % writes.next_sequence
        writes.next_sequence += 1
        sent_at = time.perf_counter()
        try:
            delivery = await producer.send(TOPIC, value, partition=0)
            await delivery.wait()
        except DwalError as error:
            writes.failures[f"{type(error).__name__}:{error.code.name}"] += 1
            await trio.sleep(0.01)  # the producer itself waits out leaderless moments
            continue
        writes.acks.append((sent_at, time.perf_counter()))
        writes.acked_values.add(value)
        writes.acked_event.set()
        writes.acked_event = trio.Event()


async def current_leader(brokers: LocalBrokers) -> tuple[int, tuple[int, ...]]:
    """The partition's leader and ISR as the leader reports them; waits until one is known."""
    with trio.fail_after(WAIT_TIMEOUT_S):
        while True:
            views = await replica_views(brokers, TOPIC)
            if views and views[0].leader in NODE_IDS:
                return views[0].leader, views[0].isr
            await trio.sleep(POLL_S)


async def wait_isr_full(brokers: LocalBrokers) -> float:
    """Wait until the partition's leader reports all three replicas in the ISR; returns the
    seconds that took."""
    started = time.perf_counter()
    with trio.fail_after(WAIT_TIMEOUT_S):
        while True:
            views = await replica_views(brokers, TOPIC)
            if views and views[0].leader in NODE_IDS and len(set(views[0].isr)) == 3:
                return time.perf_counter() - started
            await trio.sleep(POLL_S)


async def active_controller(brokers: LocalBrokers) -> int:
    try:
        with trio.fail_after(5):
            async with client.connect(brokers.bootstrap(), request_timeout_ms=2000) as cluster:
                return (await Admin(cluster, timeout_ms=2000).describe_cluster()).controller_id
    except (DwalError, client.ConnectionFailed, trio.TooSlowError):
        return -1


async def wait_next_ack(writes: Writes, since: float) -> float:
    """Seconds from `since` to the first acknowledgement of a record sent at or after it."""
    with trio.fail_after(WAIT_TIMEOUT_S):
        while (acked := writes.first_ack_sent_after(since)) is None:
            await writes.acked_event.wait()
    return acked - since


async def failover_round(
    brokers: LocalBrokers, writes: Writes, how: str, label: str, number: int
) -> float:
    await wait_isr_full(brokers)
    await trio.sleep(0.5)  # steady writing before the fault
    leader, isr = await current_leader(brokers)
    controller = await active_controller(brokers)
    process = brokers.nodes[leader].process
    assert process is not None
    failures_before = sum(writes.failures.values())
    exit_seconds = float("nan")
    if how == "sigkill":
        fault_at = await brokers.kill(leader)
        gap = await wait_next_ack(writes, fault_at)
    else:
        fault_at = time.perf_counter()
        os.kill(process.pid, signal.SIGTERM)
        gap = await wait_next_ack(writes, fault_at)
        with trio.fail_after(WAIT_TIMEOUT_S):
            await process.wait()
        exit_seconds = time.perf_counter() - fault_at
    last_before = writes.last_ack_before(fault_at)
    silence = (fault_at + gap - last_before) if last_before is not None else float("nan")
    new_leader, _ = await current_leader(brokers)
    restart_seconds = await brokers.restart(leader)
    rejoin_seconds = await wait_isr_full(brokers)
    failed = sum(writes.failures.values()) - failures_before
    print(
        f"{label} {how} round={number} leader={leader} isr_before={list(isr)} "
        f"was_controller={'yes' if controller == leader else 'no'} new_leader={new_leader} "
        f"fault_to_next_ack_ms={gap * 1000:.0f} last_ack_to_next_ack_ms={silence * 1000:.0f} "
        + (f"process_exit_ms={exit_seconds * 1000:.0f} " if how == "sigterm" else "")
        + f"writes_failed={failed} restart_ms={restart_seconds * 1000:.0f} "
        f"isr_rejoin_ms={rejoin_seconds * 1000:.0f}",
        flush=True,
    )
    return gap


async def read_partition(brokers: LocalBrokers) -> tuple[list[bytes], int]:
    """Every value of partition 0 up to its high watermark, and that high watermark."""
    views = await replica_views(brokers, TOPIC)
    end = views[0].high_watermark
    values: list[bytes] = []
    async with client.connect(brokers.bootstrap()) as cluster:
        consumer = Consumer(cluster, auto_offset_reset="earliest")
        consumer.assign([(TOPIC, 0)])
        position = 0
        with trio.fail_after(READ_TIMEOUT_S):
            while position < end:
                for records in (await consumer.poll(timeout_ms=500)).values():
                    for record in records:
                        if record.offset < end:
                            values.append(record.value)
                        position = record.offset + 1
    return values, end


async def run_cluster(
    root: pathlib.Path, label: str, options: Sequence[str], arguments: argparse.Namespace
) -> dict[str, list[float]]:
    gaps: dict[str, list[float]] = {"sigkill": [], "sigterm": []}
    async with open_low_port_brokers(root, NODE_IDS, cluster=True, options=options) as brokers:
        await brokers.start_all()
        async with client.connect(brokers.bootstrap()) as cluster:
            await Admin(cluster).create_topic(TOPIC, partitions=1, replication_factor=3)
        await wait_isr_full(brokers)
        writes = Writes()
        async with client.connect(brokers.bootstrap()) as cluster:
            async with Producer(cluster, acks="all", linger_ms=0) as producer:
                async with trio.open_nursery() as nursery:
                    for _ in range(arguments.writers):
                        nursery.start_soon(writer, producer, writes)
                    for how in ("sigkill", "sigterm"):
                        for number in range(1, arguments.rounds + 1):
                            gap = await failover_round(brokers, writes, how, label, number)
                            gaps[how].append(gap)
                    nursery.cancel_scope.cancel()
        values, end = await read_partition(brokers)
        stored = set(values)
        missing = writes.acked_values - stored
        duplicates = len(values) - len(stored)
        failures = ", ".join(f"{k} x{v}" for k, v in sorted(writes.failures.items())) or "none"
        print(
            f"{label} check: acked={len(writes.acked_values)} stored={len(values)} "
            f"(high watermark {end}) missing_acked={len(missing)} duplicates={duplicates} "
            f"failed_writes: {failures}",
            flush=True,
        )
        if missing:
            print(f"PROBLEM {label}: acknowledged values missing: {sorted(missing)[:20]}")
    return gaps


def summary(label: str, seconds: Sequence[float]) -> str:
    milliseconds = [value * 1000 for value in seconds]
    if not milliseconds:
        return f"{label}: n=0"
    return (
        f"{label}: n={len(milliseconds)} min_ms={min(milliseconds):.0f} "
        f"median_ms={statistics.median(milliseconds):.0f} max_ms={max(milliseconds):.0f}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each fault")
    parser.add_argument("--writers", type=int, default=4, help="concurrent acks=all writers")
    parser.add_argument("--fsync", choices=["always", "interval", "never"], default="never")
    arguments = parser.parse_args()
    print(
        f"rf=3 min_insync=2 acks=all linger_ms=0 writers={arguments.writers} "
        f"fsync={arguments.fsync} rounds={arguments.rounds} cores={os.cpu_count()}",
        flush=True,
    )
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="dwal-replication-failover-") as temporary:
        root = pathlib.Path(temporary)
        options = ["--fsync", arguments.fsync]
        label = "session_6000ms"
        results[label] = await run_cluster(root / "default", label, options, arguments)
        config = root / "short-session.toml"
        config.write_text(SHORT_SESSION_TOML)
        label = "session_2000ms"
        options += ["--config", str(config)]
        results[label] = await run_cluster(root / "short", label, options, arguments)
    print()
    for label, gaps in results.items():
        print(summary(f"{label} leader SIGKILL -> next acked write", gaps["sigkill"]))
        print(summary(f"{label} leader SIGTERM -> next acked write", gaps["sigterm"]))


if __name__ == "__main__":
    trio.run(main)
