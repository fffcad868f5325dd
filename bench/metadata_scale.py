"""Metadata scale: create N topics x P partitions in the controller; time, image size, restart.

Two parts, both printing figures only (nothing is asserted about time):

1. Pure core (no I/O, no trio). An image with 3 registered, unfenced brokers (racks a, b, c
   with --racks), then one topic creation per entry, as the active controller and every
   follower would do it: `create_topic` (the decision, replica placement included),
   `encode_entry`, `decode_entry`, `apply`. Run for each replication factor (3 and 1 unless
   --replication-factor is given). Prints the total and per-topic time, split by phase and
   for the first and the last tenth of the topics (growth there means per-topic cost grows
   with the image), the image size (the `encode_snapshot` bytes and the sum of the entries'
   bytes) and the time to rebuild the image from the snapshot (`decode_snapshot`) and by
   replaying every entry (decode + apply).

2. A single-voter QuorumController on DurableStorage in a temporary directory (real clock,
   fsync on, as `dwal broker` runs its embedded controller). Creates the topics with
   `submit`, sequentially, then (in another directory) with --submitters concurrent
   callers; prints topics/s and p50/p99 submit latency. Then stops the sequential one and
   restarts it: once with no snapshot (every entry replayed), once from a snapshot (taken
   by a restart with snapshot_interval_entries=1, not timed). Restart time is from opening
   the storage until the image has applied the last entry of the log before the stop; a
   single voter must win an election first (election_ticks x tick_interval_seconds, shown
   as `active_ms` — a committed entry of an earlier term is applied only after the new
   term's no-op commits).

Usage: python bench/metadata_scale.py [--topics 1000] [--partitions 10]
       [--replication-factor R] [--submitters 4] [--racks] [--skip-controller]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from broker.controller import (  # noqa: E402
    EMPTY_IMAGE,
    BrokerRegistration,
    ClusterIdRecord,
    Decision,
    Listener,
    MetadataImage,
    NewTopic,
    apply,
    create_topic,
    decode_entry,
    decode_snapshot,
    encode_entry,
    encode_snapshot,
    register_broker,
    unfence_broker,
)
from broker.controller.quorum_controller import (  # noqa: E402
    QuorumController,
    QuorumControllerConfig,
    open_metadata_storage,
)
from broker.raft.config import RaftConfig  # noqa: E402
from broker.raft.memory_transport import MemoryNetwork  # noqa: E402
from protocol.errors import DwalError  # noqa: E402

BROKER_IDS = (1, 2, 3)
NO_SNAPSHOT = 10**9  # snapshot_interval_entries that never triggers in this run
TICK_SECONDS = 0.01  # as the single-voter disk tests; election after 10-20 ticks


def topic_id(number: int, generation: int = 1) -> bytes:
    return bytes([generation]) + number.to_bytes(15, "big")  # never the zero uuid


def new_topic(number: int, partitions: int, replication_factor: int, prefix: str) -> NewTopic:
    return NewTopic(
        name=f"{prefix}-{number:05d}",
        partitions=partitions,
        replication_factor=replication_factor,
        topic_id=topic_id(number),
    )


def registration(broker_id: int, racks: bool) -> BrokerRegistration:
    return BrokerRegistration(
        broker_id=broker_id,
        incarnation_id=bytes([1]) + broker_id.to_bytes(15, "big"),
        listeners=(Listener("native", "127.0.0.1", 9090 + broker_id),),
        rack="abc"[broker_id - 1] if racks else None,
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


# ----------------------------------------------------------------------------- pure core


class PureLog:
    """An image and the bytes of every entry applied to it, one entry at a time."""

    def __init__(self) -> None:
        self.image = EMPTY_IMAGE
        self.entries: list[bytes] = []

    def commit(self, decision: Decision) -> None:
        assert not isinstance(decision, DwalError), decision
        data = encode_entry(decision)
        self.entries.append(data)
        self.image = apply(
            self.image, decode_entry(data), entry_index=self.image.last_applied_index + 1
        )


def pure_core(arguments: argparse.Namespace, replication_factor: int) -> None:
    log = PureLog()
    log.commit([ClusterIdRecord(cluster_id="bench")])
    for broker_id in BROKER_IDS:
        log.commit(register_broker(log.image, registration(broker_id, arguments.racks)))
        epoch = log.image.brokers[broker_id].epoch
        log.commit(unfence_broker(log.image, broker_id, epoch))
    setup_entries = len(log.entries)

    count = arguments.topics
    phases = {"decide": 0.0, "encode": 0.0, "decode": 0.0, "apply": 0.0}
    per_topic: list[float] = []
    image = log.image
    started = time.perf_counter()
    for number in range(count):
        t0 = time.perf_counter()
        decision = create_topic(
            image, new_topic(number, arguments.partitions, replication_factor, "topic")
        )
        t1 = time.perf_counter()
        assert not isinstance(decision, DwalError), decision
        data = encode_entry(decision)
        t2 = time.perf_counter()
        records = decode_entry(data)
        t3 = time.perf_counter()
        image = apply(image, records, entry_index=image.last_applied_index + 1)
        t4 = time.perf_counter()
        log.entries.append(data)
        phases["decide"] += t1 - t0
        phases["encode"] += t2 - t1
        phases["decode"] += t3 - t2
        phases["apply"] += t4 - t3
        per_topic.append(t4 - t0)
    total = time.perf_counter() - started
    log.image = image
    assert len(image.topics) == count

    tenth = max(1, count // 10)
    first, last = per_topic[:tenth], per_topic[-tenth:]
    label = f"pure rf={replication_factor} topics={count} partitions={arguments.partitions}"
    print(
        f"{label} create_total_s={total:.2f} per_topic_us={us(total / count)} "
        + " ".join(f"{name}_us={us(seconds / count)}" for name, seconds in phases.items())
    )
    print(
        f"{label} per_topic_us first_tenth_median={us(statistics.median(first))} "
        f"last_tenth_median={us(statistics.median(last))} "
        f"ratio={statistics.median(last) / statistics.median(first):.1f}"
    )

    t0 = time.perf_counter()
    snapshot = encode_snapshot(image)
    encode_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    from_snapshot = decode_snapshot(snapshot, index=image.last_applied_index)
    snapshot_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    replayed = EMPTY_IMAGE
    for index, data in enumerate(log.entries, start=1):
        replayed = apply(replayed, decode_entry(data), entry_index=index)
    replay_seconds = time.perf_counter() - t0
    assert from_snapshot == image and replayed == image, "rebuilt images differ"
    topic_bytes = sum(len(data) for data in log.entries[setup_entries:])
    print(
        f"{label} snapshot_bytes={len(snapshot)} entries_bytes={sum(map(len, log.entries))} "
        f"bytes_per_topic_entry={topic_bytes / count:.0f} encode_snapshot_ms={ms(encode_seconds)} "
        f"rebuild_from_snapshot_ms={ms(snapshot_seconds)} "
        f"rebuild_by_replay_ms={ms(replay_seconds)} ({len(log.entries)} entries)"
    )


# ----------------------------------------------------------------------------- controller


def controller_config(snapshot_interval_entries: int) -> QuorumControllerConfig:
    return QuorumControllerConfig(
        tick_interval_seconds=TICK_SECONDS,
        cluster_id="bench",
        session_timeout_seconds=3600,  # no heartbeats in this bench: nobody gets fenced
        decision_timeout_seconds=60,
        snapshot_interval_entries=snapshot_interval_entries,
    )


async def run_controller(
    directory: pathlib.Path,
    config: QuorumControllerConfig,
    body: Callable[[QuorumController, dict[str, float]], object],
) -> dict[str, float]:
    """Open, start, wait active, run `body`, stop. Returns timings (s since opening)."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    storage = open_metadata_storage(directory, [1])
    timings["open"] = time.perf_counter() - started
    try:
        controller = QuorumController(
            RaftConfig(node_id=1, election_ticks=10, heartbeat_ticks=2),
            storage,
            MemoryNetwork(random.Random(1)).endpoint(1),
            config=config,
            random_source=random.Random(1),
        )
        timings["constructed"] = time.perf_counter() - started  # snapshot restored here
        timings["started"] = started
        async with trio.open_nursery() as nursery:
            await nursery.start(controller.run)
            with trio.fail_after(120):
                await controller.wait_active()
                timings["active"] = time.perf_counter() - started
                await body(controller, timings)  # type: ignore[misc]
            nursery.cancel_scope.cancel()
    finally:
        storage.close()
    return timings


async def register_brokers(controller: QuorumController, racks: bool) -> None:
    for broker_id in BROKER_IDS:
        epoch = await controller.submit(
            lambda image, broker_id=broker_id: register_broker(
                image, registration(broker_id, racks)
            )
        )
        reply = await controller.heartbeat(broker_id, epoch, metadata_offset=epoch)
        assert not reply.fenced


async def create_topics(
    controller: QuorumController,
    arguments: argparse.Namespace,
    replication_factor: int,
    submitters: int,
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    numbers = iter(range(arguments.topics))

    async def submitter() -> None:
        for number in numbers:
            topic = new_topic(number, arguments.partitions, replication_factor, "topic")
            start = time.perf_counter()
            await controller.submit(lambda image, topic=topic: create_topic(image, topic))
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(submitters):
            nursery.start_soon(submitter)
    return time.perf_counter() - started, latencies


def latency_line(label: str, elapsed: float, latencies: list[float]) -> str:
    latencies = sorted(latencies)
    count = len(latencies)
    p50 = latencies[count // 2]
    p99 = latencies[min(count - 1, int(count * 0.99))]
    return (
        f"{label} topics/s={count / elapsed:.0f} total_s={elapsed:.2f} p50_ms={ms(p50)} "
        f"p99_ms={ms(p99)} max_ms={ms(latencies[-1])}"
    )


async def controller_part(arguments: argparse.Namespace, replication_factor: int) -> None:
    label = (
        f"controller rf={replication_factor} topics={arguments.topics} "
        f"partitions={arguments.partitions}"
    )
    with tempfile.TemporaryDirectory(prefix="dwal-metadata-scale-") as temporary:
        root = pathlib.Path(temporary)
        sequential_dir = root / "sequential"
        final: dict[str, object] = {}

        async def create(submitters: int, snapshot_interval: int, directory: pathlib.Path):
            interval = "never" if snapshot_interval == NO_SNAPSHOT else snapshot_interval

            async def body(controller: QuorumController, timings: dict[str, float]) -> None:
                await register_brokers(controller, arguments.racks)
                elapsed, latencies = await create_topics(
                    controller, arguments, replication_factor, submitters
                )
                statistics_ = controller.driver.statistics()
                print(
                    latency_line(
                        f"{label} submitters={submitters} snapshot_interval={interval}",
                        elapsed,
                        latencies,
                    )
                    + f" snapshots_taken={statistics_.snapshots_taken}"
                )
                final["image"] = controller.image
                final["last_index"] = controller.driver.node.last_index

            await run_controller(directory, controller_config(snapshot_interval), body)

        await create(1, NO_SNAPSHOT, sequential_dir)
        image: MetadataImage = final["image"]  # type: ignore[assignment]
        last_index: int = final["last_index"]  # type: ignore[assignment]
        log_bytes = sum(path.stat().st_size for path in sequential_dir.rglob("*") if path.is_file())
        if arguments.submitters > 1:
            await create(arguments.submitters, 1000, root / "concurrent")

        async def restart(snapshot_interval: int, what: str, timed: bool) -> None:
            async def body(controller: QuorumController, timings: dict[str, float]) -> None:
                await controller.wait_image_at_least(last_index)
                timings["caught_up"] = time.perf_counter() - timings["started"]
                assert dataclasses.replace(
                    controller.image, last_applied_index=0
                ) == dataclasses.replace(image, last_applied_index=0)
                snapshot = controller.driver.storage.snapshot()
                timings["snapshot_index"] = snapshot.index
                timings["snapshot_bytes"] = len(snapshot.data)
                if not timed:  # let the snapshot that snapshot_interval=1 triggers land
                    while controller.driver.statistics().snapshots_taken < 1:
                        await trio.sleep(0.01)
                    await trio.sleep(0.2)

            timings = await run_controller(
                sequential_dir, controller_config(snapshot_interval), body
            )
            if timed:
                print(
                    f"{label} restart {what}: caught_up_ms={ms(timings['caught_up'])} "
                    f"(open_ms={ms(timings['open'])} "
                    f"construct_ms={ms(timings['constructed'] - timings['open'])} "
                    f"active_ms={ms(timings['active'])}) created_log_entries={last_index} "
                    f"snapshot_index={timings['snapshot_index']:.0f} "
                    f"snapshot_bytes={timings['snapshot_bytes']:.0f}"
                )

        print(f"{label} metadata_dir_bytes={log_bytes} (log, no snapshot)")
        await restart(NO_SNAPSHOT, "replaying the whole log", timed=True)
        await restart(1, "(taking a snapshot)", timed=False)
        await restart(NO_SNAPSHOT, "from a snapshot", timed=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topics", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=10)
    parser.add_argument("--replication-factor", type=int, default=None, help="default: 3, then 1")
    parser.add_argument("--submitters", type=int, default=4, help="concurrent run (1: skip)")
    parser.add_argument("--racks", action="store_true", help="brokers on racks a, b, c")
    parser.add_argument("--skip-controller", action="store_true")
    arguments = parser.parse_args()
    factors = [arguments.replication_factor] if arguments.replication_factor else [3, 1]
    for factor in factors:
        pure_core(arguments, factor)
    if not arguments.skip_controller:
        for factor in factors:
            trio.run(controller_part, arguments, factor)


if __name__ == "__main__":
    main()
