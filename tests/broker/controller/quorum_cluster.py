"""A metadata quorum of QuorumControllers on a MemoryNetwork, with brokers that heartbeat.

Each controller keeps its MemoryStorage across restarts (MemoryPersister writes a Ready
before its messages leave, so the storage is what a disk would hold after a crash). A crash
is one `cancel()` of the node's scope; a restart builds a new controller from the storage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import trio

from broker.controller import (
    EMPTY_IMAGE,
    BrokerRegistration,
    Listener,
    MetadataImage,
    MetadataRecord,
    apply,
    decode_entry,
    decode_snapshot,
    register_broker,
)
from broker.controller.quorum_controller import (
    NotControllerError,
    QuorumController,
    QuorumControllerConfig,
)
from broker.raft.config import RaftConfig
from broker.raft.log_storage import LogStorage, MemoryStorage
from broker.raft.memory_transport import MemoryNetwork
from broker.raft.messages import Configuration, Entry, EntryKind, Snapshot
from protocol.errors import DwalError

CONFIG = QuorumControllerConfig(tick_interval_seconds=0.01, cluster_id="test-cluster")


def raft_config(node_id: int, election_ticks: int = 10, heartbeat_ticks: int = 2) -> RaftConfig:
    return RaftConfig(
        node_id=node_id, election_ticks=election_ticks, heartbeat_ticks=heartbeat_ticks
    )


def replay(storage: LogStorage, commit: int) -> MetadataImage:
    """The image of the committed log in `storage`: its snapshot, then each entry."""
    snapshot = storage.snapshot()
    image = snapshot_image(snapshot)
    if commit > snapshot.index:
        image = apply_entries(image, storage.entries(snapshot.index + 1, commit + 1))
    return image


def snapshot_image(snapshot: Snapshot) -> MetadataImage:
    """The image a snapshot holds (the empty image for index 0, no snapshot)."""
    if snapshot.index:
        return decode_snapshot(snapshot.data, index=snapshot.index)
    return EMPTY_IMAGE


def apply_entries(image: MetadataImage, entries: list[Entry]) -> MetadataImage:
    """`image` after each of `entries`, in order."""
    for entry in entries:
        records = []
        if entry.kind == EntryKind.NORMAL and entry.data:
            records = decode_entry(entry.data)
        image = apply(image, records, entry_index=entry.index)
    return image


def committed_records(storage: LogStorage, commit: int) -> list[MetadataRecord]:
    """The records of the committed entries still in `storage`'s log (after its snapshot)."""
    first = storage.snapshot().index + 1
    records: list[MetadataRecord] = []
    for entry in storage.entries(first, commit + 1) if commit >= first else []:
        if entry.kind == EntryKind.NORMAL and entry.data:
            records.extend(decode_entry(entry.data))
    return records


def incarnation(broker_id: int, generation: int = 0) -> bytes:
    return bytes([generation + 1]) + broker_id.to_bytes(15, "big")


def registration(broker_id: int) -> BrokerRegistration:
    return BrokerRegistration(
        broker_id=broker_id,
        incarnation_id=incarnation(broker_id),
        listeners=(Listener("native", "127.0.0.1", 9000 + broker_id),),
    )


@dataclass(slots=True)
class ControllerNode:
    node_id: int
    storage: MemoryStorage
    controller: QuorumController | None = None
    scope: trio.CancelScope | None = None
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def alive(self) -> bool:
        return self.scope is not None and not self.scope.cancel_called


class ControllerCluster:
    def __init__(
        self,
        nursery: trio.Nursery,
        network: MemoryNetwork,
        node_ids: list[int],
        seed: int,
        config: QuorumControllerConfig = CONFIG,
        *,
        election_ticks: int = 10,
        heartbeat_ticks: int = 2,
    ) -> None:
        self.election_ticks = election_ticks
        self.heartbeat_ticks = heartbeat_ticks
        self.nursery = nursery
        self.network = network
        self.node_ids = node_ids
        self.random = random.Random(seed)
        self.config = config
        voters = Configuration(voters=frozenset(node_ids))
        self.nodes = {
            node_id: ControllerNode(node_id, MemoryStorage(voters)) for node_id in node_ids
        }
        self.heartbeating: set[int] = set()  # broker ids whose heartbeat task sends
        self.broker_epochs: dict[int, int] = {}

    async def start_all(self) -> None:
        for node_id in self.node_ids:
            await self.start(node_id)

    async def start(self, node_id: int) -> None:
        node = self.nodes[node_id]
        assert not node.alive
        node.controller = QuorumController(
            raft_config(node_id, self.election_ticks, self.heartbeat_ticks),
            node.storage,
            self.network.endpoint(node_id),
            config=self.config,
            random_source=random.Random(self.random.random()),
        )
        # Deterministic replay: a snapshot encoded in a worker thread would let the autojump
        # clock move by however long the thread takes (elections would depend on the host).
        node.controller.state.snapshot_off_loop = False
        node.stopped = trio.Event()
        node.scope = await self.nursery.start(self._run, node)

    async def _run(self, node: ControllerNode, *, task_status) -> None:
        try:
            with trio.CancelScope() as scope:
                assert node.controller is not None
                async with trio.open_nursery() as inner:
                    await inner.start(node.controller.run)
                    task_status.started(scope)
        finally:
            node.stopped.set()

    async def crash(self, node_id: int) -> None:
        node = self.nodes[node_id]
        assert node.scope is not None
        node.scope.cancel()
        self.network.detach(node_id)
        await node.stopped.wait()

    def alive(self) -> list[ControllerNode]:
        return [node for node in self.nodes.values() if node.alive]

    def controllers(self) -> list[QuorumController]:
        return [node.controller for node in self.alive() if node.controller is not None]

    def active(self, other_than: int | None = None) -> QuorumController | None:
        """The live active controller of the highest term (not `other_than`), if any."""
        active = [
            c for c in self.controllers() if c.active_term is not None and c.node_id != other_than
        ]
        return max(active, key=lambda c: c.active_term or 0, default=None)

    async def wait_active(
        self, timeout_seconds: float = 30.0, *, other_than: int | None = None
    ) -> QuorumController:
        with trio.fail_after(timeout_seconds):
            while True:
                controller = self.active(other_than)
                if controller is not None:
                    return controller
                await trio.sleep(0.01)

    async def wait_all_applied(self, index: int, timeout_seconds: float = 30.0) -> None:
        with trio.fail_after(timeout_seconds):
            for controller in self.controllers():
                await controller.wait_image_at_least(index)

    def check_images_equal_replay(self) -> None:
        """Every live node's image is the replay of its own committed log."""
        for node in self.alive():
            assert node.controller is not None
            image = node.controller.image
            assert image == replay(node.storage, image.last_applied_index), node.node_id

    # Brokers.

    async def register(self, broker_id: int) -> int:
        """Register a broker through the active controller; start its heartbeats."""
        while True:
            controller = await self.wait_active()
            try:
                index = await controller.submit(
                    lambda image: register_broker(image, registration(broker_id))
                )
            except NotControllerError:
                await trio.sleep(0.1)
                continue
            self.broker_epochs[broker_id] = controller.image.brokers[broker_id].epoch
            assert self.broker_epochs[broker_id] == index
            self.heartbeating.add(broker_id)
            return index

    async def heartbeat_forever(self, broker_id: int, interval_seconds: float = 1.0) -> None:
        """Heartbeat every interval while `broker_id` is in `heartbeating`, reporting as
        metadata offset the image of the node it talks to (a broker following the log)."""
        while True:
            controller = self.active()
            if broker_id in self.heartbeating and controller is not None:
                try:
                    await controller.heartbeat(
                        broker_id,
                        self.broker_epochs[broker_id],
                        metadata_offset=controller.image.last_applied_index,
                    )
                except DwalError:
                    pass
            await trio.sleep(interval_seconds)
