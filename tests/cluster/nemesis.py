"""A seeded nemesis against a real three-node cluster whose inter-broker links are proxied.

Theory of operation. `run_nemesis` starts nodes 1-3 (every broker-to-broker link through a
`FaultProxy`), creates an RF 3 topic and then, for `duration_s`, runs together:
- writers: acks=all producers sending unique values ``w<writer>-<n>`` to random partitions,
  recording each outcome (acknowledged with its offset, unknown, refused);
- consumers of one group, recording every record they are given, their position in each
  partition while they own it (one offset series per ownership) and, from an observer, the
  group's committed offsets over time;
- the schedule: faults chosen by `random.Random(seed)`, one at a time, each held for a few
  seconds and then undone: SIGKILL and restart, SIGSTOP and SIGCONT, isolating one node
  (a random one, the active controller, or a partition leader: the 1-2 split of three
  nodes), or cutting one node's outgoing links only.
Then it heals everything, restarts what is down, waits (bounded) for every broker to be
unfenced and every ISR full, stops the clients, reads every partition in full from its
leader, and hands the history to `history_checker.check`.

The seed fixes the schedule's choices; what the cluster does in between (who leads, how
many writes land) is not deterministic, so a seed reproduces a run's faults, not its
history.

Run long seeds with ``python tests/cluster/nemesis.py --seeds 5 --duration 60`` (or
``make nemesis SEEDS=5 DURATION=60``): one line per seed; the temp directory with every
node's data and output is kept when a seed fails.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import trio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import client  # noqa: E402
from client import TopicPartition  # noqa: E402
from cluster_launcher import CLUSTER_CONFIG, ClusterLauncher, wait_for  # noqa: E402
from fault_proxy import Direction  # noqa: E402
from history_checker import (  # noqa: E402
    Acknowledged,
    Consumed,
    FinalLogs,
    History,
    OffsetSample,
    Verdict,
    check,
)

TOPIC = "nemesis"
GROUP = "nemesis-readers"
NODES = (1, 2, 3)
PARTITIONS = 4
WRITERS = 3
CONSUMERS = 2
WRITER_INFLIGHT_MAX = 8  # sends awaiting their outcome, per writer
WRITE_INTERVAL_S = 0.01  # per writer: about 100 records a second each at most
REQUEST_TIMEOUT_MS = 5_000
DELIVERY_TIMEOUT_MS = 15_000
FAULT_HOLD_S = (1.5, 5.0)
QUIET_S = (1.0, 3.0)
RECOVERY_S = 2.0  # writers keep writing this long after the heal
HEALTHY_TIMEOUT_S = 40.0
FINAL_READ_TIMEOUT_S = 60.0
COMMITTED_INTERVAL_S = 0.5
CLIENT_RETRY_S = 0.2


@dataclass
class Run:
    """What one nemesis run shares between its tasks."""

    launcher: ClusterLauncher
    rng: random.Random
    log: Callable[[str], None]
    # the writers are idempotent producers: a value stored twice fails the run
    history: History = field(default_factory=lambda: History(exactly_once=True))
    started: float = 0.0
    writing: bool = True
    reading: bool = True
    events: list[str] = field(default_factory=list)
    healthy: bool = False

    def now(self) -> float:
        return trio.current_time() - self.started

    def note(self, message: str) -> None:
        line = f"t={self.now():6.2f} {message}"
        self.events.append(line)
        self.log(line)

    @property
    def bootstraps(self) -> list[str]:
        return [node.bootstrap for node in self.launcher.nodes.values()]


# -- the workload --------------------------------------------------------------------------


async def _writer(run: Run, writer: int) -> None:
    """Send unique values until `run.writing` ends; every value gets an outcome recorded."""
    sequence = 0
    rng = random.Random(run.rng.random())
    while run.writing:
        try:
            async with client.connect(run.bootstraps, request_timeout_ms=REQUEST_TIMEOUT_MS) as c:
                async with client.Producer(
                    c,
                    acks="all",
                    enable_idempotence=True,
                    request_timeout_ms=REQUEST_TIMEOUT_MS,
                    delivery_timeout_ms=DELIVERY_TIMEOUT_MS,
                ) as producer:
                    window = trio.Semaphore(WRITER_INFLIGHT_MAX)
                    async with trio.open_nursery() as outcomes:
                        while run.writing:
                            await window.acquire()
                            value = f"w{writer}-{sequence}".encode()
                            sequence += 1
                            try:
                                delivery = await producer.send(
                                    TOPIC, value, partition=rng.randrange(PARTITIONS)
                                )
                            except client.DwalError:
                                run.history.failed.append(value)
                                window.release()
                                raise
                            outcomes.start_soon(_record_outcome, run, delivery, value, window)
                            await trio.sleep(WRITE_INTERVAL_S)
        except (client.DwalError, client.ConnectionFailed, OSError):
            await trio.sleep(CLIENT_RETRY_S)


async def _record_outcome(
    run: Run, delivery: client.Delivery, value: bytes, window: trio.Semaphore
) -> None:
    try:
        metadata = await delivery.wait()
    except client.DeliveryOutcomeUnknown:
        run.history.unknown.append(value)
    except client.DwalError:
        run.history.failed.append(value)
    else:
        run.history.acknowledged.append(
            Acknowledged(
                partition=metadata.partition, offset=metadata.offset, value=value, at_s=run.now()
            )
        )
    finally:
        window.release()


async def _consumer(run: Run, name: str) -> None:
    """A member of GROUP: records what it reads and its positions per ownership."""
    incarnation = 0
    while run.reading:
        incarnation += 1
        series: dict[int, str] = {}
        terms = 0

        def assigned(partitions: set[TopicPartition]) -> None:
            nonlocal terms
            for tp in partitions:
                terms += 1
                series[tp.partition] = f"{name}.{incarnation}.{terms}"

        def revoked(partitions: set[TopicPartition]) -> None:
            for tp in partitions:
                series.pop(tp.partition, None)

        try:
            async with client.connect(run.bootstraps, request_timeout_ms=REQUEST_TIMEOUT_MS) as c:
                async with client.Consumer(
                    c,
                    group_id=GROUP,
                    auto_offset_reset="earliest",
                    auto_commit_interval_ms=500,
                    max_wait_ms=500,
                    on_assigned=assigned,
                    on_revoked=revoked,
                ) as consumer:
                    consumer.subscribe([TOPIC])
                    while run.reading:
                        records = await consumer.poll(timeout_ms=500)
                        _note_read(run, consumer, name, series, records)
        except (client.DwalError, client.ConnectionFailed, OSError) as error:
            run.log(f"t={run.now():6.2f} consumer {name} restarts after {error!r}")
            await trio.sleep(CLIENT_RETRY_S)


def _note_read(
    run: Run,
    consumer: client.Consumer,
    name: str,
    series: dict[int, str],
    records: dict[TopicPartition, list[client.Record]],
) -> None:
    at_s = run.now()
    for tp, batch in records.items():
        for record in batch:
            assert record.value is not None
            run.history.consumed.append(
                Consumed(
                    reader=name, partition=tp.partition, offset=record.offset, value=record.value
                )
            )
    for tp in consumer.assignment():
        position = consumer.position(tp)
        if position is not None and tp.partition in series:
            run.history.offsets.append(
                OffsetSample(
                    series=series[tp.partition], partition=tp.partition, offset=position, at_s=at_s
                )
            )


async def _committed_observer(run: Run) -> None:
    """Reads the group's committed offsets every COMMITTED_INTERVAL_S: a series that must
    never go back."""
    partitions = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    while run.reading:
        try:
            async with client.connect(run.bootstraps, request_timeout_ms=REQUEST_TIMEOUT_MS) as c:
                observer = client.Consumer(c, group_id=GROUP)
                while run.reading:
                    with trio.move_on_after(REQUEST_TIMEOUT_MS / 1000):
                        committed = await observer.committed(partitions)
                        at_s = run.now()
                        for tp, offset in sorted(committed.items()):
                            if offset >= 0:
                                run.history.offsets.append(
                                    OffsetSample(
                                        series="committed",
                                        partition=tp.partition,
                                        offset=offset,
                                        at_s=at_s,
                                    )
                                )
                    await trio.sleep(COMMITTED_INTERVAL_S)
        except (client.DwalError, client.ConnectionFailed, OSError):
            await trio.sleep(CLIENT_RETRY_S)


# -- the faults ----------------------------------------------------------------------------


async def _cluster_view(run: Run) -> tuple[int, dict[int, int]]:
    """(active controller, partition -> leader) as some live broker says; (-1, {}) when
    none answers soon."""
    for node in run.launcher.nodes.values():
        if not node.running:
            continue
        with trio.move_on_after(1.0):
            try:
                async with client.connect(node.bootstrap, request_timeout_ms=1000) as c:
                    admin = client.Admin(c, timeout_ms=1000)
                    controller = (await admin.describe_cluster()).controller_id
                    partitions = (await admin.describe_topic(TOPIC)).partitions
                    return controller, {p.partition: p.leader for p in partitions}
            except (client.DwalError, client.ConnectionFailed, OSError):
                continue
    return -1, {}


async def _pick_target(run: Run) -> tuple[int, str]:
    """A node to hurt: a random one, the active controller or a partition's leader."""
    how = run.rng.choice(["random", "controller", "leader"])
    fallback = run.rng.choice(NODES)
    if how == "random":
        return fallback, "random"
    controller, leaders = await _cluster_view(run)
    if how == "controller" and controller in NODES:
        return controller, "controller"
    if how == "leader":
        partition = run.rng.randrange(PARTITIONS)
        leader = leaders.get(partition, -1)
        if leader in NODES:
            return leader, f"leader of {partition}"
    return fallback, f"random ({how} unknown)"


async def _one_fault(run: Run) -> None:
    launcher = run.launcher
    kind = run.rng.choice(["kill", "pause", "isolate", "isolate", "cut_outgoing"])
    hold_s = run.rng.uniform(*FAULT_HOLD_S)
    target, why = await _pick_target(run)
    run.note(f"{kind} node {target} ({why}) for {hold_s:.1f} s")
    if kind == "kill":
        await launcher.kill(target)
        await trio.sleep(hold_s)
        await launcher.start(target)
    elif kind == "pause":
        launcher.pause(target)
        try:
            await trio.sleep(hold_s)
        finally:
            launcher.resume(target)
    elif kind == "isolate":
        launcher.partition({target})
        await trio.sleep(hold_s)
        launcher.heal()
    else:
        for (source, _), link in launcher.links.items():
            if source == target:
                for proxy in link.proxies:
                    proxy.cut(Direction.FORWARD)
        await trio.sleep(hold_s)
        launcher.heal()
    run.note(f"{kind} node {target} undone")


async def _schedule(run: Run, duration_s: float) -> None:
    while run.now() < duration_s:
        await _one_fault(run)
        await trio.sleep(run.rng.uniform(*QUIET_S))


async def _heal_all(run: Run) -> None:
    launcher = run.launcher
    launcher.heal()
    for node_id, node in launcher.nodes.items():
        if node.running:
            launcher.resume(node_id)
    down = [node_id for node_id, node in launcher.nodes.items() if not node.running]
    if down:
        await launcher.start(*down)
    run.note(f"healed (restarted {down or 'none'})")


async def _wait_healthy(run: Run) -> bool:
    """Every broker unfenced, every partition led with a full ISR; False after a bound."""

    async def healthy() -> bool:
        async with client.connect(run.bootstraps, request_timeout_ms=2000) as c:
            admin = client.Admin(c, timeout_ms=2000)
            brokers = (await admin.describe_cluster()).brokers
            partitions = (await admin.describe_topic(TOPIC)).partitions
        return (
            len(brokers) == len(NODES)
            and not any(b.fenced for b in brokers)
            and all(p.leader != -1 and len(p.isr) == len(NODES) for p in partitions)
        )

    try:
        _, waited_s = await wait_for(healthy, timeout_s=HEALTHY_TIMEOUT_S, what="healthy")
    except AssertionError as error:
        run.note(f"NOT HEALTHY: {error}")
        return False
    run.note(f"healthy after {waited_s:.1f} s")
    return True


# -- the end ---------------------------------------------------------------------------------


async def read_all(bootstraps: list[str]) -> FinalLogs:
    """Every record of TOPIC, read from each partition's leader up to its high watermark
    (which is its log end once the ISR is full and writers stopped)."""
    final: FinalLogs = {p: {} for p in range(PARTITIONS)}
    async with client.connect(bootstraps, request_timeout_ms=REQUEST_TIMEOUT_MS) as c:
        partitions = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
        ends, _ = await wait_for(
            lambda: client.list_offsets(c, partitions, -1), timeout_s=30, what="log ends"
        )
        consumer = client.Consumer(c, auto_offset_reset="earliest")
        consumer.assign(partitions)
        with trio.fail_after(FINAL_READ_TIMEOUT_S):
            while any((consumer.position(tp) or 0) < ends[tp] for tp in partitions):
                for tp, records in (await consumer.poll(timeout_ms=500)).items():
                    for record in records:
                        assert record.value is not None
                        final[tp.partition][record.offset] = record.value
    return final


async def _create_topic(run: Run) -> None:
    async def create() -> bool:
        async with client.connect(run.bootstraps, request_timeout_ms=5000) as c:
            try:
                await client.Admin(c, timeout_ms=5000).create_topic(
                    TOPIC, PARTITIONS, replication_factor=len(NODES)
                )
            except client.DwalError as error:
                if error.code != client.ErrorCode.TOPIC_ALREADY_EXISTS:
                    raise
        return True

    await wait_for(create, timeout_s=30, what="create the topic")
    await _wait_healthy(run)


async def run_nemesis(
    launcher: ClusterLauncher, seed: int, duration_s: float, log: Callable[[str], None]
) -> tuple[Verdict, Run]:
    """One nemesis run on `launcher` (proxied, no node declared yet); returns the verdict
    and the run (its events, history)."""
    assert launcher.proxied and not launcher.nodes
    run = Run(launcher, random.Random(seed), log, started=trio.current_time())
    for node_id in NODES:
        launcher.add_node(node_id)
    await launcher.start()
    await _create_topic(run)
    run.started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for writer in range(WRITERS):
            nursery.start_soon(_writer, run, writer)
        async with trio.open_nursery() as readers:
            for consumer in range(CONSUMERS):
                readers.start_soon(_consumer, run, f"c{consumer}")
            readers.start_soon(_committed_observer, run)
            await _schedule(run, duration_s)
            await _heal_all(run)
            await trio.sleep(RECOVERY_S)
            run.writing = False
            run.history.ended_s = run.now()
            run.healthy = await _wait_healthy(run)
            await trio.sleep(1.0)  # consumers read what was written last
            run.reading = False
        run.note("writers and readers stopping")
    stats = [proxy.statistics() for link in launcher.links.values() for proxy in link.proxies]
    run.note(
        f"clients stopped; proxies forwarded {sum(s.bytes_forwarded for s in stats)} bytes, "
        f"dropped {sum(s.bytes_dropped for s in stats)}, "
        f"reset {sum(s.connections_reset for s in stats)} connections"
    )
    final = await read_all(run.bootstraps)
    return check(run.history, final), run


def save_outputs(launcher: ClusterLauncher, run: Run | None, directory: pathlib.Path) -> None:
    """Every node's output (all runs) and the nemesis events, into `directory`."""
    for node in launcher.nodes.values():
        for number, process in enumerate(node.runs, 1):
            (directory / f"node-{node.node_id}-run-{number}.log").write_text(process.text)
    if run is not None:
        (directory / "nemesis-events.log").write_text("\n".join(run.events) + "\n")


async def run_seed(seed: int, duration_s: float, directory: pathlib.Path, verbose: bool) -> bool:
    """One seed in `directory`; prints its line (and findings); returns whether it passed."""
    config_path = directory / "cluster.toml"
    config_path.write_text(CLUSTER_CONFIG)
    run: Run | None = None
    async with trio.open_nursery() as nursery:
        launcher = ClusterLauncher(nursery, directory, config_path, proxied=True)
        try:
            verdict, run = await run_nemesis(
                launcher, seed, duration_s, print if verbose else lambda line: None
            )
            print(verdict.line(seed), flush=True)
            if not verdict.ok:
                print(verdict.details(), flush=True)
            return verdict.ok and run.healthy
        except BaseException:
            print(f"nemesis seed={seed} FAILED with an exception", flush=True)
            raise
        finally:
            save_outputs(launcher, run, directory)
            launcher.kill_all()
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="3", help="N (seeds 1..N) or a list: 4,7,9")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of faults")
    parser.add_argument("--verbose", action="store_true", help="print the fault events")
    options = parser.parse_args()
    seeds = (
        [int(s) for s in options.seeds.split(",") if s]
        if "," in options.seeds
        else list(range(1, int(options.seeds) + 1))
    )
    failed = []
    for seed in seeds:
        directory = pathlib.Path(tempfile.mkdtemp(prefix=f"nemesis-{seed}-"))
        passed = False
        try:
            passed = trio.run(run_seed, seed, options.duration, directory, options.verbose)
        finally:
            if passed:
                shutil.rmtree(directory, ignore_errors=True)
            else:
                failed.append(seed)
                print(f"nemesis seed={seed}: kept {directory}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
