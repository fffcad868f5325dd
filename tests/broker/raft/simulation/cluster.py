"""A cluster of RaftDrivers with KeyValueStores on a MemoryNetwork and simulated disks.

Each node runs in its own cancel scope inside the cluster's nursery, so a crash is one
`cancel()`: its tasks stop at their current await, its endpoint leaves the network, its
page cache is forgotten. A restart builds a new driver from the durable disk image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import trio

from broker.raft.config import RaftConfig
from broker.raft.driver import DriverConfig, DriverObserver, RaftDriver
from broker.raft.kv_demo import KeyValueClient, KeyValueStore
from broker.raft.memory_transport import MemoryNetwork, MemoryTransport
from broker.raft.messages import Configuration, Role

from .disk import SimulatedDisk


@dataclass(slots=True)
class SimulatedNode:
    node_id: int
    disk: SimulatedDisk
    incarnation: int = 0
    driver: RaftDriver | None = None
    store: KeyValueStore | None = None
    transport: MemoryTransport | None = None
    scope: trio.CancelScope | None = None
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def alive(self) -> bool:
        return self.scope is not None and not self.scope.cancel_called

    def client(self) -> KeyValueClient:
        assert self.driver is not None and self.store is not None
        return KeyValueClient(self.driver, self.store)


class SimulatedCluster:
    def __init__(
        self,
        nursery: trio.Nursery,
        network: MemoryNetwork,
        node_ids: list[int],
        random_source: random.Random,
        *,
        raft_config: Callable[[int], RaftConfig],
        driver_options: DriverConfig,
        observer: DriverObserver | None = None,
        initial_voters: list[int] | None = None,
    ) -> None:
        self.nursery = nursery
        self.network = network
        self.node_ids = node_ids
        self.random = random_source
        self.raft_config = raft_config
        self.driver_options = driver_options
        self.observer = observer
        # Nodes outside the bootstrap voters start with an empty configuration: they join
        # when a leader adds them (see API.md, "Bootstrap and joining").
        voters = frozenset(node_ids if initial_voters is None else initial_voters)
        self.nodes = {
            node_id: SimulatedNode(
                node_id,
                SimulatedDisk(
                    Configuration(voters=voters if node_id in voters else frozenset()),
                    random.Random(random_source.random()),
                ),
            )
            for node_id in node_ids
        }

    async def start_all(self) -> None:
        for node_id in self.node_ids:
            await self.start(node_id)

    async def start(self, node_id: int) -> None:
        node = self.nodes[node_id]
        assert not node.alive
        node.incarnation += 1
        node.store = KeyValueStore()
        node.transport = self.network.endpoint(node_id)
        node.driver = RaftDriver(
            self.raft_config(node_id),
            node.disk.open(),
            node.transport,
            node.store,
            persister=node.disk,
            options=self.driver_options,
            random_source=random.Random(self.random.random()),
            observer=self.observer,
        )
        node.stopped = trio.Event()
        node.scope = await self.nursery.start(self._run_node, node)

    async def _run_node(self, node: SimulatedNode, *, task_status) -> None:
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as inner:
                    assert node.transport is not None and node.driver is not None
                    await inner.start(node.transport.run)
                    await inner.start(node.driver.run)
                    task_status.started(scope)
        finally:
            node.stopped.set()

    async def crash(self, node_id: int) -> None:
        node = self.nodes[node_id]
        assert node.scope is not None
        node.scope.cancel()
        self.network.detach(node_id)
        await node.stopped.wait()

    def alive(self) -> list[SimulatedNode]:
        return [node for node in self.nodes.values() if node.alive]

    def leader(self) -> SimulatedNode | None:
        """The live leader with the highest term, if any."""
        leaders = [
            node
            for node in self.alive()
            if node.driver is not None and node.driver.node.role == Role.LEADER
        ]
        if not leaders:
            return None
        return max(leaders, key=lambda node: node.driver.node.term if node.driver else 0)

    async def wait_leader(self, timeout_seconds: float = 30.0) -> SimulatedNode:
        with trio.fail_after(timeout_seconds):
            while True:
                leader = self.leader()
                if leader is not None:
                    return leader
                await trio.sleep(0.01)

    async def stop(self) -> None:
        for node in self.nodes.values():
            if node.alive:
                await self.crash(node.node_id)
