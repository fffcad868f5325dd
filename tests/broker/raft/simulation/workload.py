"""Clients doing put/get/cas against the simulated cluster, recording a history for the
linearizability checker, and the nemesis that injects faults."""

from __future__ import annotations

import random

import trio

from broker.raft.driver import DriverStoppedError, ProposalOutcomeUnknownError, ReadTimeoutError
from broker.raft.memory_transport import NO_FAULTS, FaultModel
from broker.raft.messages import ConfigChange, ConfigChangeKind
from broker.raft.node import NotLeaderError, ProposalDroppedError, RaftError

from .cluster import SimulatedCluster
from .invariants import InvariantChecker
from .linearizability import Operation

OPERATION_TIMEOUT_SECONDS = 1.0


class History:
    def __init__(self) -> None:
        self.operations: list[Operation] = []
        self.written: dict[bytes, list[bytes]] = {}
        self.completed = 0
        self.unknown = 0

    def begin(self, operation: Operation) -> None:
        self.operations.append(operation)

    def discard(self, operation: Operation) -> None:
        """The operation certainly had no effect: leave it out."""
        self.operations.remove(operation)


async def run_client(
    client_id: int,
    cluster: SimulatedCluster,
    history: History,
    random_source: random.Random,
    keys: list[bytes],
) -> None:
    """Loop over random operations until cancelled; every operation that may have had an
    effect stays in the history (completed, or with an unknown outcome)."""
    target = random_source.choice(cluster.node_ids)
    count = 0
    while True:
        await trio.sleep(random_source.uniform(0.0, 0.03))
        node = cluster.nodes[target]
        if not node.alive:
            target = random_source.choice(cluster.node_ids)
            continue
        count += 1
        kind = random_source.choices(["put", "get", "cas"], [4, 4, 2])[0]
        key = random_source.choice(keys)
        value = f"{client_id}-{count}".encode()
        expected = None
        if kind == "cas":
            written = history.written.get(key, [])
            expected = random_source.choice([None, *written[-3:]])
        operation = Operation(
            client=client_id,
            kind=kind,
            key=key,
            value=value if kind != "get" else None,
            expected=expected,
            invoked_at=trio.current_time(),
        )
        history.begin(operation)
        if kind != "get":
            history.written.setdefault(key, []).append(value)
        finished = False
        try:
            output = await _perform(node.client(), operation)
            finished = True
        except NotLeaderError as error:
            history.discard(operation)
            target = error.leader or random_source.choice(cluster.node_ids)
            continue
        except ProposalDroppedError:
            history.discard(operation)
            continue
        except (ProposalOutcomeUnknownError, ReadTimeoutError, DriverStoppedError, RaftError):
            if kind == "get":
                history.discard(operation)  # a read that returned nothing had no effect
            else:
                history.unknown += 1
            target = random_source.choice(cluster.node_ids)
            continue
        finally:
            if not finished and kind == "get" and operation in history.operations:
                history.discard(operation)  # cancelled at the end of the run
        operation.completes(trio.current_time(), output)
        history.completed += 1


async def _perform(client, operation: Operation) -> object:
    timeout = OPERATION_TIMEOUT_SECONDS
    if operation.kind == "put":
        await client.put(operation.key, operation.value, timeout_seconds=timeout)
        return None
    if operation.kind == "get":
        return await client.get(operation.key, timeout_seconds=timeout)
    return await client.cas(
        operation.key, operation.expected, operation.value, timeout_seconds=timeout
    )


class Nemesis:
    """Seeded faults: partitions (symmetric, one-way, isolation), message loss, duplication
    and delay, crashes and restarts, slow disks, leadership transfers."""

    def __init__(
        self,
        cluster: SimulatedCluster,
        checker: InvariantChecker,
        random_source: random.Random,
        log: list[str],
        spares: int = 0,
    ) -> None:
        self.cluster = cluster
        self.checker = checker
        self.random = random_source
        self.log = log
        self.crashes = 0
        self.spares = spares
        self.changes_tried = 0

    async def step(self) -> None:
        actions = [
            (self.partition, 3),
            (self.one_way, 2),
            (self.isolate, 2),
            (self.heal, 3),
            (self.crash, 2),
            (self.crash_leader, 2),
            (self.crash_and_restart, 2),
            (self.crash_during_fsync, 2),
            (self.isolate_leader, 2),
            (self.restart, 3),
            (self.network_faults, 3),
            (self.slow_disk, 1),
            (self.transfer, 1),
            (self.change_membership, 3 if self.spares else 0),
        ]
        action = self.random.choices([a for a, _ in actions], [w for _, w in actions])[0]
        await action()

    def _say(self, what: str) -> None:
        self.log.append(f"{trio.current_time():9.4f} {what}")

    async def partition(self) -> None:
        nodes = list(self.cluster.node_ids)
        self.random.shuffle(nodes)
        cut = self.random.randrange(1, len(nodes))
        self.cluster.network.partition(nodes[:cut], nodes[cut:])
        self._say(f"partition {sorted(nodes[:cut])} | {sorted(nodes[cut:])}")

    async def one_way(self) -> None:
        for _ in range(self.random.randint(1, 3)):
            source, target = self.random.sample(self.cluster.node_ids, 2)
            self.cluster.network.cut(source, target)
            self._say(f"cut {source} -> {target}")

    async def isolate(self) -> None:
        node = self.random.choice(self.cluster.node_ids)
        self.cluster.network.isolate(node, self.cluster.node_ids)
        self._say(f"isolate {node}")

    async def heal(self) -> None:
        self.cluster.network.heal()
        self._say("heal")

    async def crash(self) -> None:
        alive = self.cluster.alive()
        if not alive:
            return
        node = self.random.choice(alive)
        assert node.driver is not None
        self.checker.forget(node.driver)
        await self.cluster.crash(node.node_id)
        self.crashes += 1
        self._say(f"crash {node.node_id}")

    async def crash_and_restart(self) -> None:
        """A quick reboot: the node comes back within moments, in the same term."""
        alive = self.cluster.alive()
        if not alive:
            return
        node = self.random.choice(alive)
        assert node.driver is not None
        self.checker.forget(node.driver)
        await self.cluster.crash(node.node_id)
        self.crashes += 1
        await trio.sleep(self.random.uniform(0.0, 0.05))
        await self.cluster.start(node.node_id)
        self._say(f"reboot {node.node_id}")

    async def crash_during_fsync(self) -> None:
        """Crash a node while its disk is syncing: whatever that fsync covered is lost."""
        alive = self.cluster.alive()
        if not alive:
            return
        node = self.random.choice(alive)
        with trio.move_on_after(0.2):
            await node.disk.wait_fsync_started()
            assert node.driver is not None
            self.checker.forget(node.driver)
            await self.cluster.crash(node.node_id)
            self.crashes += 1
            self._say(f"crash {node.node_id} during an fsync")
            if self.random.random() < 0.5:
                await self.cluster.start(node.node_id)
                self._say(f"restart {node.node_id}")

    async def crash_leader(self) -> None:
        leader = self.cluster.leader()
        if leader is None or leader.driver is None:
            return
        self.checker.forget(leader.driver)
        await self.cluster.crash(leader.node_id)
        self.crashes += 1
        self._say(f"crash leader {leader.node_id}")

    async def isolate_leader(self) -> None:
        leader = self.cluster.leader()
        if leader is None:
            return
        others = [n for n in self.cluster.node_ids if n != leader.node_id]
        companions = self.random.sample(others, self.random.randrange(0, len(others) // 2 + 1))
        self.cluster.network.partition(
            [leader.node_id, *companions], [n for n in others if n not in companions]
        )
        self._say(f"isolate leader {leader.node_id} with {sorted(companions)}")

    async def restart(self) -> None:
        down = [n for n in self.cluster.node_ids if not self.cluster.nodes[n].alive]
        if down:
            node_id = self.random.choice(down)
            await self.cluster.start(node_id)
            self._say(f"restart {node_id}")

    async def network_faults(self) -> None:
        if self.random.random() < 0.3:
            self.cluster.network.set_faults(NO_FAULTS)
            self._say("network faults off")
            return
        faults = FaultModel(
            loss_probability=self.random.choice([0.0, 0.05, 0.2, 0.4]),
            duplicate_probability=self.random.choice([0.0, 0.05, 0.2]),
            delay_seconds_min=0.0,
            delay_seconds_max=self.random.choice([0.0, 0.005, 0.03, 0.1]),
        )
        self.cluster.network.set_faults(faults)
        self._say(f"network {faults}")

    async def slow_disk(self) -> None:
        node = self.cluster.nodes[self.random.choice(self.cluster.node_ids)]
        node.disk.slow = not node.disk.slow
        self._say(f"disk of {node.node_id} slow={node.disk.slow}")

    async def transfer(self) -> None:
        leader = self.cluster.leader()
        if leader is None or leader.driver is None:
            return
        target = self.random.choice(self.cluster.node_ids)
        try:
            leader.driver.transfer_leadership(target)
        except RaftError:
            return
        self._say(f"transfer leadership {leader.node_id} -> {target}")

    async def change_membership(self) -> None:
        """Ask the leader for one random membership change (in the background: it waits
        until applied)."""
        leader = self.cluster.leader()
        if leader is None or leader.driver is None:
            return
        configuration = leader.driver.node.configuration
        members = configuration.voters | configuration.learners
        choices = []
        for node in self.cluster.node_ids:
            if node not in members:
                choices += [
                    (ConfigChangeKind.ADD_LEARNER, node),
                    (ConfigChangeKind.ADD_VOTER, node),
                ]
        for node in sorted(configuration.learners):
            choices += [(ConfigChangeKind.ADD_VOTER, node), (ConfigChangeKind.REMOVE_LEARNER, node)]
        if len(configuration.voters) > 2:
            choices += [
                (ConfigChangeKind.REMOVE_VOTER, node) for node in sorted(configuration.voters)
            ]
        if not choices:
            return
        kind, node = self.random.choice(choices)
        change = ConfigChange(kind=kind, node_id=node)
        self.changes_tried += 1
        self._say(f"membership {kind.name} {node} via {leader.node_id}")
        self.cluster.nursery.start_soon(self._propose_change, leader.driver, change)

    async def _propose_change(self, driver, change: ConfigChange) -> None:
        try:
            await driver.propose_config_change(change, timeout_seconds=1.0)
        except RaftError:
            return

    async def stop_faults(self) -> None:
        """Heal everything and bring every node back, disks fast."""
        self.cluster.network.heal()
        self.cluster.network.set_faults(NO_FAULTS)
        for node_id in self.cluster.node_ids:
            node = self.cluster.nodes[node_id]
            node.disk.slow = False
            if not node.alive:
                await self.cluster.start(node_id)
        self._say("faults stop: healed, every node up")
