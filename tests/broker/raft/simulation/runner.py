"""One deterministic simulation run: a seed in, a report (or a SimulationFailure) out.

Theory of operation (FoundationDB's simulator, TigerBeetle's VOPR). Everything that could
vary between two runs is derived from the seed: every component gets its own
`random.Random(f"{seed}:{name}")` (network faults, disks, each node's election timer, each
client, the nemesis), time is `trio.testing.MockClock(autojump_threshold=0)` (virtual: a run
of seconds takes milliseconds, and never depends on the machine's speed), nothing runs in a
thread, and trio's own scheduler, which shuffles ready tasks on purpose, draws from its
module random that we seed too (with deterministic scheduling on, as pytest-trio and
Hypothesis do). So a seed replays a run exactly: `digest` must come out the same.

A run: start the cluster and the clients; the nemesis injects `fault_steps` faults at random
intervals while the invariant checker watches every Ready and every applied entry and, after
each step, every node; then every fault stops and the cluster must make progress (elect a
leader, commit and apply a proposal on every node) within `recovery_seconds_max` of
simulated time; finally the clients' history must be linearizable.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import trio
import trio.testing

from broker.raft.config import RaftConfig
from broker.raft.driver import DriverConfig
from broker.raft.memory_transport import MemoryNetwork
from broker.raft.node import RaftError

from .cluster import SimulatedCluster
from .invariants import InvariantChecker, InvariantViolation
from .linearizability import UNKNOWN, check_history, describe
from .workload import History, Nemesis, run_client


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulationSettings:
    nodes: int = 3  # bootstrap voters
    spares: int = 0  # more nodes, outside the configuration until the nemesis adds them
    fault_steps: int = 8
    step_seconds: tuple[float, float] = (0.05, 0.5)
    clients: int = 3
    keys: int = 2
    tick_seconds: float = 0.01
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    snapshot_interval_entries: int = 20
    recovery_seconds_max: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulationReport:
    seed: int
    nodes: int
    simulated_seconds: float
    operations: int
    completed: int
    unknown: int
    committed: int
    terms: int
    crashes: int
    snapshots: int
    digest: str


class SimulationFailure(AssertionError):
    def __init__(self, seed: int, reason: str, log: list[str]) -> None:
        tail = "\n".join(log[-40:])
        super().__init__(
            f"simulation seed {seed} failed: {reason}\n"
            f"replay: pytest tests/broker/raft/test_simulation.py --sim-seed {seed}\n"
            f"last events:\n{tail}"
        )
        self.seed = seed


def settings_for_seed(seed: int, fault_steps: int = 8) -> SimulationSettings:
    """Every third seed runs five voters, the others three; every other seed has one spare
    node that membership changes add (as learner or voter) and remove."""
    return SimulationSettings(
        nodes=5 if seed % 3 == 2 else 3, spares=seed % 2, fault_steps=fault_steps
    )


def run_simulation(seed: int, settings: SimulationSettings) -> SimulationReport:
    """Run one simulation. Raises SimulationFailure (with the seed) when a check fails."""
    trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    trio._core._run._r.seed(seed)
    log: list[str] = []
    try:
        return trio.run(
            _simulate, seed, settings, log, clock=trio.testing.MockClock(autojump_threshold=0)
        )
    except SimulationFailure:
        raise
    except Exception as error:  # an invariant, an assertion of the core, a crash of a task
        leaves = list(_leaves(error))
        for leaf in leaves:
            if isinstance(leaf, SimulationFailure):
                raise leaf from error
        first = next((leaf for leaf in leaves if isinstance(leaf, InvariantViolation)), leaves[0])
        kind = "invariant violated" if isinstance(first, InvariantViolation) else "error"
        reason = f"{kind}: {type(first).__name__}: {first}"
        raise SimulationFailure(seed, reason, log) from error


def _leaves(error: BaseException):
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def _random(seed: int, name: str) -> random.Random:
    return random.Random(f"{seed}:{name}")


async def _simulate(seed: int, settings: SimulationSettings, log: list[str]) -> SimulationReport:
    node_ids = list(range(1, settings.nodes + settings.spares + 1))
    voters = node_ids[: settings.nodes]
    checker = InvariantChecker()
    history = History()
    network = MemoryNetwork(_random(seed, "network"))
    options = DriverConfig(
        tick_interval_seconds=settings.tick_seconds,
        proposal_timeout_seconds=1.0,
        read_timeout_seconds=1.0,
        snapshot_interval_entries=settings.snapshot_interval_entries,
    )

    def raft_config(node_id: int) -> RaftConfig:
        return RaftConfig(
            node_id=node_id,
            election_ticks=settings.election_ticks,
            heartbeat_ticks=settings.heartbeat_ticks,
            max_append_entries=16,
            max_inflight_appends=16,
        )

    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        cluster = SimulatedCluster(
            nursery,
            network,
            node_ids,
            _random(seed, "cluster"),
            raft_config=raft_config,
            driver_options=options,
            observer=checker,
            initial_voters=voters,
        )
        await cluster.start_all()
        nemesis = Nemesis(cluster, checker, _random(seed, "nemesis"), log, settings.spares)
        keys = [b"k%d" % number for number in range(settings.keys)]
        async with trio.open_nursery() as clients:
            for client_id in range(1, settings.clients + 1):
                clients.start_soon(
                    run_client,
                    client_id,
                    cluster,
                    history,
                    _random(seed, f"client{client_id}"),
                    keys,
                )
            clients.start_soon(_watch, checker, settings.tick_seconds)
            for _ in range(settings.fault_steps):
                await trio.sleep(nemesis.random.uniform(*settings.step_seconds))
                await nemesis.step()
                checker.check_all()
            await nemesis.stop_faults()
            await _wait_for_progress(seed, cluster, settings, log)
            checker.check_all()
            clients.cancel_scope.cancel()
        report = _report(seed, settings, cluster, checker, history, nemesis)
        nursery.cancel_scope.cancel()
    result = check_history(history.operations)
    if not result.linearizable:
        raise SimulationFailure(seed, describe(result), log)
    return report


async def _watch(checker: InvariantChecker, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        checker.check_all()


async def _wait_for_progress(
    seed: int, cluster: SimulatedCluster, settings: SimulationSettings, log: list[str]
) -> None:
    """A leader, then a committed proposal applied on every node, in bounded time."""
    deadline = trio.current_time() + settings.recovery_seconds_max
    with trio.move_on_at(deadline):
        index = await _commit_marker(cluster)
        while not _applied_by_every_member(cluster, index):
            await trio.sleep(settings.tick_seconds)
        log.append(f"{trio.current_time():9.4f} progress: marker applied at {index} everywhere")
        return
    states = [
        (
            node.node_id,
            str(node.driver.node.role),
            node.driver.node.term,
            node.driver.node.applied_index,
        )
        for node in cluster.alive()
        if node.driver is not None
    ]
    raise SimulationFailure(
        seed, f"no progress {settings.recovery_seconds_max}s after faults stopped: {states}", log
    )


async def _commit_marker(cluster: SimulatedCluster) -> int:
    """Commit an empty proposal through whichever node leads; return its index."""
    while True:
        leader = cluster.leader()
        if leader is None or leader.driver is None:
            await trio.sleep(0.01)
            continue
        driver = leader.driver
        try:
            await driver.propose(b"", timeout_seconds=1.0)
        except RaftError:
            await trio.sleep(0.01)
            continue
        return driver.node.commit_index


def _applied_by_every_member(cluster: SimulatedCluster, index: int) -> bool:
    """Whether every member (voter or learner) of the current leader's configuration has
    applied `index`. A node removed meanwhile is not waited for: the leader stops sending
    it entries, so it may never even learn that it was removed."""
    leader = cluster.leader()
    if leader is None or leader.driver is None:
        return False
    configuration = leader.driver.node.configuration
    members = configuration.voters | configuration.learners
    return all(
        node.driver.node.applied_index >= index
        for node in cluster.alive()
        if node.node_id in members and node.driver is not None
    )


def _report(seed, settings, cluster, checker, history, nemesis) -> SimulationReport:
    digest = hashlib.sha256()
    for operation in history.operations:
        output = "unknown" if operation.output is UNKNOWN else operation.output
        fields = (operation.client, operation.kind, operation.key, operation.value)
        times = (operation.invoked_at, operation.completed_at)
        digest.update(repr((fields, times, output)).encode())
    digest.update(repr(sorted(checker.leaders_by_term.items())).encode())
    digest.update(repr(sorted(checker.commit_terms.items())).encode())
    digest.update(repr(trio.current_time()).encode())
    snapshots = sum(
        node.driver.statistics().snapshots_taken for node in cluster.alive() if node.driver
    )
    return SimulationReport(
        seed=seed,
        nodes=settings.nodes,
        simulated_seconds=trio.current_time(),
        operations=len(history.operations),
        completed=history.completed,
        unknown=history.unknown,
        committed=checker.committed_max,
        terms=len(checker.leaders_by_term),
        crashes=nemesis.crashes,
        snapshots=snapshots,
        digest=digest.hexdigest(),
    )
