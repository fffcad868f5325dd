"""The whole-cluster deterministic simulation: brokers, controllers and partition replicas of
three combined nodes in one trio run, under MockClock, on the in-memory network.

Theory of operation (FoundationDB's simulator, TigerBeetle's VOPR, and our own Raft and
controller simulations). Each node runs the real components a broker process runs, wired as
`broker/node.py` and `ClusterMember` wire them: a `QuorumController` (a voter of the
metadata quorum, on a `MemoryNetwork` endpoint, its Raft log in a `MemoryStorage` that
survives crashes), the `ControllerApis` it answers with while active, a `ControllerChannel`
to the active controller, a `MetadataPublisher` whose listeners open the partition logs and
then drive the `ReplicaManager` (leaders, followers with their `ReplicaFetcher`s, ISR
changes through AlterPartition), and a `BrokerLifecycle` that registers and heartbeats.
What differs is only the I/O underneath:

- partition logs are `MemoryPartitionLog`s: a crash keeps what the page cache had (a
  process crash) or only what was fsynced (a power loss), and a restart recovers from that;
- every request between nodes (controller calls, followers' fetches) and from clients
  (produce, consume) goes through `SimNetwork.call`: it crosses the `MemoryNetwork`'s links
  (cut links and lost messages never answer; the caller's deadline ends the wait), and is
  served by a task of the target node, so a crash of the target cancels it unanswered;
- the clock is `MockClock(autojump_threshold=0)` and trio's scheduler is seeded, so a seed
  replays a run exactly (`History.digest()`).

The workload: acks=all writers sending unique values ``w<writer>-<n>`` (one record per
batch) to the leaders of an RF 3, min.insync.replicas 2 topic, and readers following every
partition from offset 0 at its leader (below the high watermark). The writers are idempotent
producers, as the client is: a producer id from InitProducerId (any node hands it out from
the block the active controller allocated it), epoch 0 and a sequence per partition in each
batch; a write whose outcome is unknown (no answer in time, its leader crashed or lost the
leadership, the ISR shrank after the append) is sent again, the same bytes, to the leader of
the moment until answered - a resend found stored is answered with its original offset -
and one still unknown after DELIVERY_TIMEOUT_S bumps the writer's epoch (KIP-360). The
history is checked exactly once: a value stored twice fails the seed. The nemesis injects one
fault at a time: crash and restart a node (a process crash, or a power loss when the
settings' fsync policy makes that safe for the guarantee checked), crash every node at once,
isolate a node (a random one, the active controller, or a partition leader), cut one link
one way, mute a node (its answers to clients lost while it replicates) and then crash it;
and, as an operator would, it moves a partition to other replicas (2 or 3 of the
nodes, in a random order: a replica added, one removed, the leader leaving, the replication
factor changing) or cancels a move, through AlterPartitionReassignments, the move going on
under the faults that follow; the active controller also balances leaders on its own every
few seconds. Then it heals, restarts what is down, waits for every move to complete, every
ISR to be full and every replica at the leader's log end, reads every log, and hands the history to
`history_checker.check` (lost, reused, phantom, regressions, dup), plus two checks only a
simulation can make: every replica holds the same bytes as its leader, and no reader was
ever answered OFFSET_OUT_OF_RANGE.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import hashlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
import trio.testing

from history_checker import Acknowledged, Consumed, FinalLogs, History, OffsetSample, Verdict, check

from broker.answers import error_of
from broker.broker_lifecycle import NATIVE_LISTENER, BrokerLifecycle, ListenerAddress
from broker.cluster_member import leave_cluster
from broker.controller.controller_apis import ControllerApis
from broker.controller.controller_channel import ControllerChannel
from broker.controller.metadata_image import MetadataImage
from broker.controller.metadata_records import NO_LEADER
from broker.controller.quorum_controller import (
    NotControllerError,
    QuorumController,
    QuorumControllerConfig,
)
from broker.limits import Limits
from broker.metadata_publisher import MetadataPublisher
from broker.producer_ids import ProducerIdBlocks
from broker.raft.config import RaftConfig
from broker.raft.log_storage import MemoryStorage
from broker.raft.memory_transport import FaultModel, MemoryNetwork
from broker.raft.messages import Configuration
from broker.replication.broker_link import BrokerLinkError
from broker.replication.replica_manager import ReplicaManager
from broker.storage import LogConfig, OffsetOutOfRangeError, StorageError
from broker.storage.memory_log import DurableImage, MemoryPartitionLog
from broker.storage.producer_state import next_sequence
from protocol import ACKS_ALL, ApiKey, DwalError, ErrorCode, check_request
from protocol.api import check_response
from protocol.frame import Response
from protocol.record_batch import complete_prefix_bytes, decode_records, encode_batch

T = TypeVar("T")

# The node a task works for (set by each node's tasks and by the requests it serves), so that
# the broker's log events can be told apart in a run's story.
SIM_NODE: contextvars.ContextVar[int] = contextvars.ContextVar("sim_node", default=0)
STORY_LINES_MAX = 5000

NODES = (1, 2, 3)
# the network addresses of clients: the first writer's, reader's, and the operator's
WRITER_CLIENT, READER_CLIENT, OPERATOR_CLIENT = 100, 200, 300
TOPIC = "sim"
TICK_SECONDS = 0.02
ELECTION_TICKS, HEARTBEAT_TICKS = 5, 2
SESSION_TIMEOUT_SECONDS = 3.0
HEARTBEAT_INTERVAL_SECONDS = 0.5
LEADER_IMBALANCE_CHECK_INTERVAL_SECONDS = 5.0  # the real default is 300 s
REPLICA_LAG_TIME_MAX_MS = 3_000
FLUSH_INTERVAL_SECONDS = 10.0  # the background fsync (the real broker's is 60 s)
RETENTION_INTERVAL_SECONDS = 2.0
PRODUCE_TIMEOUT_SECONDS = 3.0
INIT_PRODUCER_ID_TIMEOUT_SECONDS = 5.0
# A write that may be stored is resent (the same batch) until answered, for at most this
# long and this many attempts (the client's delivery.timeout.ms, 120 s, is longer than a run
# needs: faults last at most 4 s); then its outcome is unknown and the writer's epoch bumped.
DELIVERY_TIMEOUT_S = 20.0
RESEND_ATTEMPTS_MAX = 200  # with the backoff, about as long as the delivery timeout
RETRY_BACKOFF_S = (0.05, 0.15)  # the client's retry_backoff_ms is 100
PRODUCER_EPOCH_MAX = 2**15 - 1  # an i16 in the batch header
CONVERGE_SECONDS_MAX = 120.0
RESEND_DELAY_S = (0.2, 1.0)  # a request or answer whose packet was lost arrives this late
FAULTS = FaultModel(loss_probability=0.005, delay_seconds_min=0.0, delay_seconds_max=0.004)
# refusals that come before anything is appended: the write is certainly not stored
REFUSED = frozenset(
    {
        ErrorCode.NOT_LEADER_OR_FOLLOWER,
        ErrorCode.LEADER_NOT_AVAILABLE,
        ErrorCode.NOT_ENOUGH_REPLICAS,
        ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
        ErrorCode.KAFKA_STORAGE_ERROR,
    }
)
# Refusals of an idempotent batch by the producers' state (nothing appended). A leader cut
# off from the others that has not learnt it was replaced answers OUT_OF_ORDER_SEQUENCE_NUMBER
# for a batch whose predecessor went to its successor; the others mean that a broker saw an
# epoch this writer never sent, or lost its state (an anomaly in this workload).
PRODUCER_FENCED = frozenset({ErrorCode.INVALID_PRODUCER_EPOCH, ErrorCode.UNKNOWN_PRODUCER_ID})
SEQUENCE_REFUSED = frozenset({ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER, *PRODUCER_FENCED})


@dataclass(frozen=True, slots=True)
class SimSettings:
    fsync: str = "never"  # the topic's fsync.policy
    duration_s: float = 30.0  # of simulated time under faults
    partitions: int = 3
    writers: int = 3
    readers: int = 1
    fault_gap_s: tuple[float, float] = (1.0, 3.0)  # quiet time between faults
    fault_hold_s: tuple[float, float] = (0.5, 4.0)  # how long a fault lasts
    # retention: every replica keeps about this many records below its high watermark (0:
    # keep everything), so followers long away find the leader's log start past their end
    retained_records: int = 0


def settings_for_seed(seed: int, duration_s: float = 30.0) -> SimSettings:
    """Odd seeds fsync every write (then power losses may hit any nodes, even all at once);
    even seeds never fsync (then a power loss hits one node while the others run). Every
    third seed runs retention (about 40 records, 3 s of writes, kept per replica)."""
    return SimSettings(
        fsync="always" if seed % 2 else "never",
        duration_s=duration_s,
        retained_records=40 if seed % 3 == 0 else 0,
    )


class Unanswered(Exception):
    """A request to a node that is down: refused at once, as a closed port is."""


# -- the network ------------------------------------------------------------------------


class SimNetwork:
    """Requests over the MemoryNetwork's links, served by tasks of the target node."""

    def __init__(self, cluster: SimCluster, network: MemoryNetwork, rng: random.Random) -> None:
        self.cluster = cluster
        self.network = network
        self.rng = rng
        self.requests = 0

    async def _cross(self, source: int, target: int) -> None:
        """One way across the link: a random delay, longer for a lost packet (TCP resends
        it); a cut link never delivers (the caller's deadline ends the wait)."""
        faults = self.network.faults
        delay = self.rng.uniform(faults.delay_seconds_min, faults.delay_seconds_max)
        if self.rng.random() < faults.loss_probability:
            delay += self.rng.uniform(*RESEND_DELAY_S)
        await trio.sleep(delay)
        if self.network.is_cut(source, target):
            await trio.sleep_forever()

    async def call(
        self,
        source: int,
        target: int,
        serve: Callable[[SimNode], Awaitable[T]],
        *,
        broker_port: bool = True,
    ) -> T:
        """Have node `target` run `serve(node)` for `source` and return its result (or raise
        its exception). Raises Unanswered when the target is down; never returns when the
        request or the answer is lost, or the target crashes meanwhile. A request to the
        broker port (not the controller port) waits until the node serves it, as a
        connection waits in the listen backlog of a broker still starting. Cancel it (a
        deadline) to give up."""
        self.requests += 1
        node = self.cluster.nodes.get(target)
        if node is None or node.nursery is None:
            await trio.sleep(0.001)
            raise Unanswered(f"node {target} is down")
        await self._cross(source, target)
        nursery, generation = node.nursery, node.generation
        if node.nursery is None or node.generation != generation:
            raise Unanswered(f"node {target} is down")
        done = trio.Event()
        box: dict[str, Any] = {}

        async def run() -> None:
            SIM_NODE.set(target)
            if broker_port:
                await node.serving.wait()
            try:
                box["result"] = await serve(node)
            except (DwalError, StorageError, OffsetOutOfRangeError) as error:
                box["error"] = error
            done.set()  # not when cancelled by the node's crash: no answer then

        nursery.start_soon(run)
        await done.wait()
        await self._cross(target, source)
        if "error" in box:
            raise box["error"]
        return box["result"]


class SimControllerChannel(ControllerChannel):
    """The real channel (its leader hint, rotation and retries); only `_send` differs."""

    def __init__(self, sim: SimCluster, node_id: int, controller: QuorumController, apis) -> None:
        super().__init__(node_id, controller, apis, voters={n: ("sim", n) for n in NODES})
        self.sim = sim

    async def _send(self, leader: int, api_key: ApiKey, body: dict[str, Any]) -> dict[str, Any]:
        body = check_request(api_key, body)

        async def serve(node: SimNode) -> dict[str, Any]:
            if node.apis is None:
                raise DwalError(ErrorCode.NOT_CONTROLLER, f"node {node.node_id} is starting")
            try:
                return check_response(api_key, await node.apis.handle(api_key, body))
            except NotControllerError as error:
                raise DwalError(ErrorCode.NOT_CONTROLLER, error.message) from None

        try:
            return await self.sim.net.call(self.node_id, leader, serve, broker_port=False)
        except Unanswered as error:
            raise DwalError(ErrorCode.NOT_CONTROLLER, str(error)) from None


class SimLink:
    """A follower's link to a leader (the FetchLink a ReplicaFetcher sends over)."""

    def __init__(self, sim: SimCluster, source: int, target: int) -> None:
        self.sim = sim
        self.source = source
        self.target = target
        self.correlation = 0

    async def request(
        self,
        api_key: ApiKey,
        body: dict[str, Any],
        *,
        timeout_seconds: float,
        tail: bytes | memoryview = b"",
    ) -> Response:
        assert api_key == ApiKey.FETCH
        body = check_request(api_key, body)
        limits = Limits()

        async def serve(node: SimNode) -> tuple[dict[str, Any], bytes]:
            assert node.replicas is not None
            answer, parts = await node.replicas.serve_replica_fetch(
                body,
                max_bytes=min(max(body["max_bytes"], 1), limits.fetch_bytes_max),
                max_wait_ms=min(max(body["max_wait_ms"], 0), limits.fetch_wait_ms_max),
            )
            try:
                return check_response(api_key, answer), b"".join(p.read_bytes() for p in parts)
            finally:
                for piece in parts:
                    piece.close()

        self.correlation += 1
        try:
            with trio.fail_after(timeout_seconds):
                answer, data = await self.sim.net.call(self.source, self.target, serve)
        except (trio.TooSlowError, Unanswered) as error:
            raise BrokerLinkError(f"node {self.target}: {error or 'no answer in time'}") from None
        return Response(
            correlation_id=self.correlation,
            error_code=ErrorCode.NONE,
            error_message=None,
            body=answer,
            tail=data,
        )

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


# -- the nodes --------------------------------------------------------------------------


class SimRegistry:
    """The node's partition logs (`logs`, what ReplicaManager reads), opened from its disk as
    the image makes this node a replica: the publisher's first listener, as
    TopicRegistry.apply_image is in the broker."""

    def __init__(self, node_id: int, disk: dict[tuple[str, int], DurableImage], fsync: str):
        self.node_id = node_id
        self.disk = disk
        self.config = LogConfig(fsync=fsync, min_insync_replicas=2)
        self.logs: dict[tuple[str, int], MemoryPartitionLog] = {}

    async def apply_image(self, previous: MetadataImage, image: MetadataImage) -> None:
        await trio.lowlevel.checkpoint()
        info = image.topics.get(TOPIC)
        if info is None:
            return
        for state in info.partitions:
            tp = (TOPIC, state.partition)
            if self.node_id not in state.replicas and tp in self.logs:
                # Moved away from this node: its copy is deleted, as TopicRegistry does.
                self.logs.pop(tp).close()
                continue
            if self.node_id not in state.replicas or tp in self.logs:
                continue
            name = f"{TOPIC}-{state.partition}@{self.node_id}"
            saved = self.disk.pop(tp, None)
            self.logs[tp] = (
                MemoryPartitionLog(name, self.config)
                if saved is None
                else MemoryPartitionLog.recover(name, self.config, saved)
            )

    def crash(self, *, power_loss: bool) -> None:
        for tp, log in self.logs.items():
            self.disk[tp] = log.crash(power_loss=power_loss)
        self.logs.clear()


@dataclass(eq=False)
class SimNode:
    node_id: int
    storage: MemoryStorage
    disk: dict[tuple[str, int], DurableImage] = field(default_factory=dict)
    generation: int = 0
    nursery: trio.Nursery | None = None  # while up
    scope: trio.CancelScope | None = None
    stopped: trio.Event = field(default_factory=trio.Event)
    controller: QuorumController | None = None
    apis: ControllerApis | None = None
    channel: SimControllerChannel | None = None
    publisher: MetadataPublisher | None = None
    lifecycle: BrokerLifecycle | None = None
    registry: SimRegistry | None = None
    replicas: ReplicaManager | None = None
    producer_ids: ProducerIdBlocks | None = None  # what InitProducerId hands out
    power_lost: bool = False  # its last crash lost unsynced writes
    serving: trio.Event = field(default_factory=trio.Event)  # its broker port answers
    produces: int = 0  # produce requests being served
    produces_answered: trio.Event = field(default_factory=trio.Event)  # set when it drops to 0

    @property
    def up(self) -> bool:
        return self.nursery is not None

    @property
    def image(self) -> MetadataImage | None:
        return None if self.publisher is None else self.publisher.image


# -- the cluster ------------------------------------------------------------------------


class SimCluster:
    def __init__(self, nursery: trio.Nursery, seed: int, settings: SimSettings) -> None:
        self.nursery = nursery
        self.seed = seed
        self.settings = settings
        self.rngs = {name: random.Random(f"{seed}:{name}") for name in ("net", "raft", "nemesis")}
        self.network = MemoryNetwork(self.rngs["net"], FAULTS)
        self.net = SimNetwork(self, self.network, random.Random(f"{seed}:calls"))
        voters = Configuration(voters=frozenset(NODES))
        self.nodes = {n: SimNode(n, MemoryStorage(voters)) for n in NODES}
        self.log_lines: collections.deque[str] = collections.deque(maxlen=STORY_LINES_MAX)
        self.moves = 0  # reassignments the operator asked for

    def note(self, text: str, node: int = 0) -> None:
        where = f"[{node}] " if node else ""
        self.log_lines.append(f"{trio.current_time():8.3f} {where}{text}")

    # -- lifecycle of a node --------------------------------------------------------------

    async def start(self, node_id: int) -> None:
        node = self.nodes[node_id]
        assert not node.up
        node.generation += 1
        node.stopped = trio.Event()
        node.serving = trio.Event()
        node.scope = trio.CancelScope()
        ready = trio.Event()
        self.nursery.start_soon(self._run_node, node, ready)
        await ready.wait()
        self.note(f"node {node_id} started (generation {node.generation})")

    async def _run_node(self, node: SimNode, ready: trio.Event) -> None:
        SIM_NODE.set(node.node_id)
        rng = random.Random(f"{self.seed}:node{node.node_id}:{node.generation}")
        controller = QuorumController(
            RaftConfig(
                node_id=node.node_id,
                election_ticks=ELECTION_TICKS,
                heartbeat_ticks=HEARTBEAT_TICKS,
            ),
            node.storage,
            self.network.endpoint(node.node_id),
            config=QuorumControllerConfig(
                tick_interval_seconds=TICK_SECONDS,
                session_timeout_seconds=SESSION_TIMEOUT_SECONDS,
                heartbeat_interval_seconds=HEARTBEAT_INTERVAL_SECONDS,
                snapshot_interval_entries=200,
                cluster_id="sim",
                leader_imbalance_check_interval_seconds=LEADER_IMBALANCE_CHECK_INTERVAL_SECONDS,
            ),
            random_source=rng,
        )
        controller.state.snapshot_off_loop = False  # no worker thread: replayable
        apis = ControllerApis(
            controller,
            log_defaults=LogConfig(fsync=self.settings.fsync),
            limits=Limits(),
            default_replication_factor=3,
        )
        channel = SimControllerChannel(self, node.node_id, controller, apis)
        registry = SimRegistry(node.node_id, node.disk, self.settings.fsync)
        lifecycle: BrokerLifecycle | None = None

        async def alter_partition(body: dict[str, Any]) -> dict[str, Any]:
            return await channel.call(ApiKey.ALTER_PARTITION, body, timeout_seconds=5.0)

        replicas = ReplicaManager(
            node.node_id,
            registry,  # type: ignore[arg-type]
            lambda: publisher.image,
            broker_epoch=lambda: lifecycle.broker_epoch if lifecycle else -1,
            alter_partition=alter_partition,
            replica_lag_time_max_ms=REPLICA_LAG_TIME_MAX_MS,
            link_factory=lambda leader, address: SimLink(self, node.node_id, leader),
        )
        publisher = MetadataPublisher(controller, [registry.apply_image, replicas.apply_image])
        lifecycle = BrokerLifecycle(
            node.node_id,
            channel,
            cluster_id=lambda: controller.image.cluster_id or "",
            listeners=[ListenerAddress(NATIVE_LISTENER, "sim", node.node_id)],
            rack=None,
            metadata_offset=lambda: publisher.image.last_applied_index,
            wait_metadata_offset=publisher.wait_published,
            heartbeat_interval_seconds=HEARTBEAT_INTERVAL_SECONDS,
            request_timeout_seconds=5.0,
        )
        lifecycle.incarnation_id = str(uuid.UUID(int=rng.getrandbits(128)))

        async def allocate_producer_ids() -> tuple[int, int]:
            # As RequestHandlers asks the active controller for a block (KIP-730).
            epoch = lifecycle.broker_epoch
            if epoch < 0:
                raise DwalError(ErrorCode.NOT_CONTROLLER, "not registered with the controller yet")
            body = {"broker_id": node.node_id, "broker_epoch": epoch}
            reply = await channel.call(ApiKey.ALLOCATE_PRODUCER_IDS, body, timeout_seconds=5.0)
            return reply["producer_id_start"], reply["producer_id_len"]

        node.producer_ids = ProducerIdBlocks(allocate_producer_ids)
        node.controller, node.apis, node.channel = controller, apis, channel
        node.registry, node.replicas, node.publisher = registry, replicas, publisher
        node.lifecycle = lifecycle
        assert node.scope is not None
        try:
            with node.scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(controller.run)
                    await nursery.start(replicas.run)
                    node.nursery = nursery
                    ready.set()
                    await lifecycle.register()
                    await nursery.start(publisher.run)
                    epoch = await nursery.start(lifecycle.run)
                    nursery.start_soon(self._flush_periodically, registry)
                    if self.settings.retained_records:
                        nursery.start_soon(self._apply_retention_periodically, registry)
                    # As ClusterMember does before the broker serves its port: wait until
                    # the published image shows this incarnation unfenced, so no request is
                    # answered from the stale image a restart begins with.
                    while True:
                        broker = publisher.image.brokers.get(node.node_id)
                        if broker is not None and (broker.epoch != epoch or not broker.fenced):
                            break
                        await publisher.wait_published(publisher.image.last_applied_index + 1)
                    node.serving.set()
                    self.note(f"node {node.node_id} serving (broker epoch {epoch})")
        finally:
            node.nursery = None
            ready.set()
            node.stopped.set()

    async def _apply_retention_periodically(self, registry: SimRegistry) -> None:
        """Each replica on its own, as the broker's retention loop: delete what lies more
        than `retained_records` below the high watermark."""
        while True:
            await trio.sleep(RETENTION_INTERVAL_SECONDS)
            for log in list(registry.logs.values()):
                try:
                    log.delete_records_before(log.high_watermark - self.settings.retained_records)
                except StorageError:
                    pass  # crashed meanwhile

    async def _flush_periodically(self, registry: SimRegistry) -> None:
        while True:
            await trio.sleep(FLUSH_INTERVAL_SECONDS)
            for log in list(registry.logs.values()):
                try:
                    await log.flush()
                except StorageError:
                    pass  # crashed meanwhile

    async def stop_gracefully(self, node_id: int) -> None:
        """A SIGTERM, as broker/node.py handles it: appends refused and those made
        replicated (at most 1 s), the graceful leave (controller leadership handed over,
        controlled shutdown, leaders moved), the produce requests being served answered (at
        most 1 s); then the process exits (its page cache survives)."""
        node = self.nodes[node_id]
        if not node.serving.is_set():
            await self.crash(node_id, power_loss=False)
            return
        assert node.replicas and node.controller and node.lifecycle and node.publisher
        with trio.move_on_after(1.0):
            await node.replicas.drain()
        accepted = await leave_cluster(
            node_id,
            list(NODES),
            node.controller,
            node.lifecycle,
            node.publisher,
            timeout_seconds=2.0,
        )
        with trio.move_on_after(1.0):
            while node.produces:
                await node.produces_answered.wait()
        self.note(
            f"node {node_id} left (controlled shutdown {'accepted' if accepted else 'not taken'})"
        )
        await self.crash(node_id, power_loss=False)

    async def crash(self, node_id: int, *, power_loss: bool) -> None:
        node = self.nodes[node_id]
        if not node.up:
            return
        assert node.scope is not None and node.registry is not None
        node.scope.cancel()
        await node.stopped.wait()
        node.registry.crash(power_loss=power_loss)
        node.power_lost = power_loss
        self.network.detach(node_id)
        self.note(f"node {node_id} {'lost power' if power_loss else 'crashed'}")

    # -- views ------------------------------------------------------------------------------

    async def watch(self) -> None:
        """Note every change of the partitions' leader, epoch and ISR, and of fenced
        brokers, as the active controller's image shows them (for a failing seed's story)."""
        last = None
        while True:
            active = self.active_controller()
            image = None if active is None else self.nodes[active].image
            if image is not None and TOPIC in image.topics:
                parts = tuple(
                    (p.partition, p.leader, p.leader_epoch, p.isr, p.replicas, p.adding_replicas)
                    for p in image.topics[TOPIC].partitions
                )
                fenced = tuple(sorted(b for b, info in image.brokers.items() if info.fenced))
                if (parts, fenced) != last:
                    last = (parts, fenced)
                    shown = " ".join(
                        f"p{p}:L{leader}e{epoch}isr{','.join(map(str, isr))}"
                        f"r{','.join(map(str, replicas))}"
                        + (f"+{','.join(map(str, adding))}" if adding else "")
                        for p, leader, epoch, isr, replicas, adding in parts
                    )
                    self.note(f"controller {active}: {shown} fenced={list(fenced)}")
            await trio.sleep(0.05)

    def up_nodes(self) -> list[SimNode]:
        return [node for node in self.nodes.values() if node.up]

    def active_controller(self) -> int | None:
        active = [
            (node.controller.active_term or 0, node.node_id)
            for node in self.up_nodes()
            if node.controller is not None and node.controller.active_term is not None
        ]
        return max(active)[1] if active else None

    def leader_of(self, partition: int, rng: random.Random) -> int | None:
        """The leader a client learns from a random live node's published image."""
        found = self.metadata_of(partition, rng)
        return None if found is None else found[0]

    def leads(self, node: SimNode, partition: int) -> bool:
        """Whether `node` leads `partition` in the leader epoch the active controller's image
        names it leader in (not a leader cut off that has not learnt it was replaced)."""
        active = self.active_controller()
        image = None if active is None else self.nodes[active].image
        state = None if image is None else image.partition(TOPIC, partition)
        if state is None or state.leader != node.node_id or node.replicas is None:
            return False
        try:
            return node.replicas.leader_epoch(TOPIC, partition) == state.leader_epoch
        except DwalError:
            return False

    def metadata_of(self, partition: int, rng: random.Random) -> tuple[int, int] | None:
        """(leader, leader epoch) of the partition in a random live node's published image
        (None when it knows no leader): what a client's metadata request returns."""
        nodes = self.up_nodes()
        if not nodes:
            return None
        image = rng.choice(nodes).image
        state = None if image is None else image.partition(TOPIC, partition)
        if state is None or state.leader == NO_LEADER:
            return None
        return state.leader, state.leader_epoch

    # -- set-up -----------------------------------------------------------------------------

    async def create_topic(self) -> None:
        body = {
            "topics": [
                {
                    "topic": TOPIC,
                    "partitions": self.settings.partitions,
                    "replication_factor": 3,
                    "configs": {"min.insync.replicas": "2"},
                }
            ],
            "validate_only": False,
        }
        while True:
            node = self.nodes[NODES[0]]
            assert node.channel is not None
            try:
                reply = await node.channel.call(ApiKey.CREATE_TOPICS, body, timeout_seconds=5.0)
            except DwalError:
                await trio.sleep(0.1)
                continue
            code = reply["topics"][0]["error_code"]
            if code in (ErrorCode.NONE, ErrorCode.TOPIC_ALREADY_EXISTS):
                return
            await trio.sleep(0.1)

    def converged(self) -> bool:
        """Every partition led, not being moved, its ISR all its replicas, every replica at
        the leader's log end and the leader's high watermark there too, the same on every
        node's published image, and no copy left on a node that is no replica."""
        if len(self.up_nodes()) != len(NODES):
            return False
        for partition in range(self.settings.partitions):
            states = []
            for node in self.nodes.values():
                image = node.image
                state = None if image is None else image.partition(TOPIC, partition)
                if state is None:
                    return False
                states.append((state.leader, state.leader_epoch, state.isr, state.replicas))
            leader, _, isr, replicas = states[0]
            if len(set(states)) != 1 or leader == NO_LEADER or set(isr) != set(replicas):
                return False
            if any(
                (TOPIC, partition) in node.registry.logs
                for node in self.nodes.values()
                if node.registry is not None and node.node_id not in replicas
            ):
                return False
            logs = [self.nodes[r].registry.logs.get((TOPIC, partition)) for r in replicas]
            if any(log is None for log in logs):
                return False
            ends = {log.log_end_offset for log in logs if log is not None}
            leader_log = self.nodes[leader].registry.logs[(TOPIC, partition)]
            if len(ends) != 1 or leader_log.high_watermark != leader_log.log_end_offset:
                return False
        return True

    def state(self) -> str:
        """Each node's view of each partition and its log's offsets (for a stuck run)."""
        lines = []
        for node in self.nodes.values():
            image = node.image
            brokers = (
                {} if image is None else {b: (i.epoch, i.fenced) for b, i in image.brokers.items()}
            )
            parts = []
            for partition in range(self.settings.partitions):
                state = None if image is None else image.partition(TOPIC, partition)
                log = None if node.registry is None else node.registry.logs.get((TOPIC, partition))
                where = "-" if log is None else f"leo{log.log_end_offset}hw{log.high_watermark}"
                shown = (
                    "-"
                    if state is None
                    else (
                        f"L{state.leader}e{state.leader_epoch}isr{','.join(map(str, state.isr))}"
                        f"r{','.join(map(str, state.replicas))}"
                        f"+{','.join(map(str, state.adding_replicas))}"
                    )
                )
                parts.append(f"p{partition}:{shown}:{where}")
            lines.append(
                f"node {node.node_id} up={node.up} image="
                f"{-1 if image is None else image.last_applied_index} brokers={brokers} "
                + " ".join(parts)
            )
        return "\n" + "\n".join(lines)

    def final_logs(self) -> tuple[FinalLogs, dict[int, int], list[str]]:
        """Every partition as its leader holds it, the leader's log start per partition
        (retention deleted what lies below), and where a replica differs from the leader
        (compared from the largest log start of the replicas: each applies retention on its
        own)."""
        final: FinalLogs = {}
        starts: dict[int, int] = {}
        diverged: list[str] = []
        for partition in range(self.settings.partitions):
            state = self.nodes[1].image.partition(TOPIC, partition)
            leader = state.leader
            logs = {r: self.nodes[r].registry.logs[(TOPIC, partition)] for r in state.replicas}
            starts[partition] = logs[leader].log_start_offset
            final[partition] = {r.offset: r.value for r in decode_records(read_all(logs[leader]))}
            common = max(log.log_start_offset for log in logs.values())
            copies = {node_id: read_all(log, common) for node_id, log in logs.items()}
            for node_id, data in copies.items():
                if data != copies[leader]:
                    diverged.append(f"partition {partition}: node {node_id} differs from {leader}")
        return final, starts, diverged


def read_all(log: MemoryPartitionLog, start: int | None = None) -> bytes:
    """Every batch of `log` from `start` (by default its log start) to its log end."""
    parts = []
    offset = log.log_start_offset if start is None else start
    while offset < log.log_end_offset:
        with log.read(offset, 1 << 20, up_to="log_end") as piece:
            data = piece.read_bytes()
        records = decode_records(data, allow_partial_tail=True)
        if not records:
            break
        parts.append(data[: complete_prefix_bytes(data)])
        offset = records[-1].offset + 1
    return b"".join(parts)


# -- the workload ---------------------------------------------------------------------------


@dataclass
class IdempotentProducer:
    """A writer's idempotent producer, as the client's: an id from InitProducerId (-1 until
    then), its epoch, and per partition the sequence its next batch gets."""

    producer_id: int = -1
    epoch: int = 0
    next_sequences: dict[int, int] = field(default_factory=dict)

    def start_new_epoch(self) -> None:
        """After a batch whose outcome stays unknown (or that the producers' state refused):
        the broker would refuse every later sequence of its partition, so every partition
        starts again at sequence 0 in the next epoch, as the client's bump (KIP-360); past
        the largest epoch, a new producer id is asked for."""
        self.next_sequences.clear()
        if self.epoch >= PRODUCER_EPOCH_MAX:
            self.producer_id, self.epoch = -1, 0
        else:
            self.epoch += 1


@dataclass
class Workload:
    cluster: SimCluster
    history: History
    anomalies: list[str] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)  # attempts
    resends: int = 0  # attempts of a batch after its first
    duplicate_answers: int = 0  # acknowledgements of a resend found stored: original offsets
    duplicates_moved: int = 0  # of those, answered by another node than the first attempt
    epochs_started: int = 0
    producer_ids: set[int] = field(default_factory=set)

    async def write(self, writer: int) -> None:
        """An idempotent producer's writes of one record each to random partitions, one at
        a time: a value refused before it was appended is given up (its sequence goes to
        the next value of the partition), one that may be stored is resent until answered
        (see `deliver`)."""
        rng = random.Random(f"{self.cluster.seed}:writer{writer}")
        client = WRITER_CLIENT + writer
        producer = IdempotentProducer()
        sent = 0
        while not self.stop.is_set():
            if producer.producer_id < 0:
                producer.producer_id = await self.init_producer_id(client, rng)
                continue
            partition = rng.randrange(self.cluster.settings.partitions)
            sent += 1
            value = f"w{writer}-{sent}".encode()
            sequence = producer.next_sequences.get(partition, 0)
            batch = encode_batch(
                [[0, None, value, []]],
                base_timestamp=int(trio.current_time() * 1000),
                producer_id=producer.producer_id,
                producer_epoch=producer.epoch,
                base_sequence=sequence,
            )
            outcome, result = await self.deliver(client, rng, partition, batch)
            if outcome == "ok":
                self.history.acknowledged.append(
                    Acknowledged(
                        partition=partition, offset=result, value=value, at_s=trio.current_time()
                    )
                )
                producer.next_sequences[partition] = next_sequence(sequence)
            elif outcome == "refused":
                self.history.failed.append(value)
                await trio.sleep(0.02)
            else:
                self.history.unknown.append(value)
            if outcome == "unknown" or (outcome == "refused" and result in SEQUENCE_REFUSED):
                producer.start_new_epoch()
                self.epochs_started += 1
            await trio.sleep(rng.uniform(0.002, 0.02))

    async def init_producer_id(self, client: int, rng: random.Random) -> int:
        """InitProducerId at a random node (any broker answers it, from the block of ids the
        active controller gave it), asked again until answered; -1 once the workload
        stops. A producer id handed out twice is an anomaly."""
        while not self.stop.is_set():
            via = rng.choice(NODES)
            producer_id = -1  # unless answered in time
            with trio.move_on_after(INIT_PRODUCER_ID_TIMEOUT_SECONDS):
                try:
                    producer_id = await self.cluster.net.call(client, via, init_producer_id)
                except (DwalError, Unanswered):
                    pass
            if producer_id >= 0:
                if producer_id in self.producer_ids:
                    self.anomalies.append(
                        f"{trio.current_time():.3f} producer id {producer_id} handed out twice"
                    )
                self.producer_ids.add(producer_id)
                return producer_id
            await trio.sleep(0.1)
        return -1

    async def deliver(
        self, client: int, rng: random.Random, partition: int, batch: bytes
    ) -> tuple[str, int]:
        """Send `batch` to the partition's leader and, once its outcome is unknown, send the
        same bytes (producer id, epoch and sequence) again to the leader of the moment, as
        the client does, until answered, for at most DELIVERY_TIMEOUT_S and
        RESEND_ATTEMPTS_MAX attempts. Returns ("ok", offset: the original one when a resend
        was found stored), ("refused", code) when nothing was appended, ("unknown", code)."""
        deadline = trio.current_time() + DELIVERY_TIMEOUT_S
        maybe_stored, attempts, code = False, 0, int(ErrorCode.LEADER_NOT_AVAILABLE)
        first_leader = None
        while True:
            leader = self.cluster.leader_of(partition, rng)
            if leader is not None:
                first_leader = leader if first_leader is None else first_leader
                attempts += 1
                self.resends += attempts > 1
                outcome, code, duplicate = await self.attempt(client, leader, partition, batch)
                if outcome == "ok":
                    self.duplicate_answers += duplicate
                    self.duplicates_moved += duplicate and leader != first_leader
                    return "ok", code
                if code in PRODUCER_FENCED:
                    self.anomalies.append(
                        f"{trio.current_time():.3f} partition {partition}: an idempotent "
                        f"write refused by {leader} with {ErrorCode(code).name} (the writer "
                        "never sent a newer epoch; no broker here forgets producers)"
                    )
                    return ("unknown" if maybe_stored else "refused"), code
                if outcome == "refused" and not maybe_stored:
                    return "refused", code
                maybe_stored = True
            if attempts >= RESEND_ATTEMPTS_MAX or trio.current_time() >= deadline:
                return ("unknown" if maybe_stored else "refused"), code
            await trio.sleep(rng.uniform(*RETRY_BACKOFF_S))

    async def attempt(
        self, client: int, leader: int, partition: int, batch: bytes
    ) -> tuple[str, int, bool]:
        """One Produce of `batch` to `leader`: (outcome, offset or error code, whether the
        batch was found stored already)."""
        outcome, result, duplicate = "unknown", int(ErrorCode.REQUEST_TIMED_OUT), False
        with trio.move_on_after(PRODUCE_TIMEOUT_SECONDS):
            try:
                outcome, result, duplicate = await self.cluster.net.call(
                    client, leader, lambda node: self.produce(node, partition, batch)
                )
            except Unanswered:
                outcome, result = "refused", int(ErrorCode.LEADER_NOT_AVAILABLE)
        shown = "duplicate" if duplicate else "" if outcome == "ok" else ErrorCode(result).name
        self.outcomes[f"{outcome}:{shown}" if shown else outcome] += 1
        return outcome, result, duplicate

    async def read(self, reader: int) -> None:
        rng = random.Random(f"{self.cluster.seed}:reader{reader}")
        client = READER_CLIENT + reader
        name = f"reader{reader}"
        positions = [0] * self.cluster.settings.partitions
        # As the client's metadata cache: per partition the leader of the newest epoch seen
        # (an answer with an older epoch, from a node whose image is behind, is ignored).
        known: dict[int, tuple[int, int]] = {}
        while not self.stop.is_set():
            partition = rng.randrange(self.cluster.settings.partitions)
            found = self.cluster.metadata_of(partition, rng)
            if found is not None and (partition not in known or found[1] >= known[partition][1]):
                known[partition] = found
            if partition not in known:
                await trio.sleep(0.05)
                continue
            leader, epoch = known[partition]
            position = positions[partition]
            data = None
            with trio.move_on_after(1.0):
                try:
                    data = await self.cluster.net.call(
                        client, leader, lambda node: consume(node, partition, position, epoch)
                    )
                except BelowLogStart as error:
                    positions[partition] = error.log_start_offset  # retention went past it
                except DwalError as error:
                    if error.code == ErrorCode.OFFSET_OUT_OF_RANGE:
                        self.anomalies.append(
                            f"{trio.current_time():.3f} {name}: offset {position} of partition "
                            f"{partition} out of range at leader {leader}: {error.message}"
                        )
                except Unanswered:
                    pass
            if data:
                for record in decode_records(data, allow_partial_tail=True):
                    if record.offset < position:
                        continue
                    self.history.consumed.append(
                        Consumed(
                            reader=name,
                            partition=partition,
                            offset=record.offset,
                            value=record.value or b"",
                        )
                    )
                    positions[partition] = record.offset + 1
                self.history.offsets.append(
                    OffsetSample(
                        series=name,
                        partition=partition,
                        offset=positions[partition],
                        at_s=trio.current_time(),
                    )
                )
            await trio.sleep(rng.uniform(0.01, 0.05))

    async def produce(self, node: SimNode, partition: int, batch: bytes) -> tuple[str, int, bool]:
        """`produce` on the leader, then, at the instant it answers, checks that only a
        simulation can make: under fsync=always every live member of the leader's maximal
        ISR has an acknowledged record on its disk (under never a member's page cache
        counts, which a power loss of that member may take: other members cover it, see
        guarantees.md); and OUT_OF_ORDER_SEQUENCE_NUMBER comes only from a leader cut off
        that has not learnt it was replaced: a writer's next sequence follows its batch
        acknowledged before (or starts a new epoch), so the leader the active controller
        names, in its leader epoch, holds that batch and must know it."""
        node.produces += 1
        try:
            outcome, result, duplicate = await produce(node, partition, batch)
        finally:
            node.produces -= 1
            if not node.produces:
                node.produces_answered.set()
                node.produces_answered = trio.Event()
        refused_sequence = outcome == "refused" and result == ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER
        if refused_sequence and self.cluster.leads(node, partition):
            self.anomalies.append(
                f"{trio.current_time():.3f} partition {partition}: its leader {node.node_id} "
                "refused a writer's next sequence (it lost a producer's batch or its state)"
            )
        if outcome == "ok" and self.cluster.settings.fsync == "always":
            assert node.replicas is not None
            leading = node.replicas._leading.get((TOPIC, partition))
            members = () if leading is None else leading.replicas.maximal_isr
            for member in members:
                other = self.cluster.nodes[member]
                log = (
                    None if other.registry is None else other.registry.logs.get((TOPIC, partition))
                )
                if other.up and log is not None and log.durable_offset <= result:
                    self.anomalies.append(
                        f"{trio.current_time():.3f} offset {result} of partition {partition} "
                        f"acknowledged by {node.node_id}, not on the disk of ISR member {member}"
                    )
        return outcome, result, duplicate


async def init_producer_id(node: SimNode) -> int:
    """InitProducerId as the broker answers it: the next id of this node's block. Raises
    DwalError (no block, the controller unreachable)."""
    assert node.producer_ids is not None
    return await node.producer_ids.next_producer_id()


async def produce(node: SimNode, partition: int, batch: bytes) -> tuple[str, int, bool]:
    """The leader's side of an acks=all write of one batch, as the Produce handler does it:
    ("ok", offset, duplicate) - a duplicate (the resend of an idempotent batch stored
    already) answers the original offset once that is replicated -, ("refused", code,
    False) before anything was appended, ("unknown", code, False)."""
    replicas = node.replicas
    assert replicas is not None
    now_ms = int(trio.current_time() * 1000)
    try:
        replicas.check_acks(TOPIC, partition, ACKS_ALL)
        log, info = replicas.append(TOPIC, partition, bytearray(batch), now_ms=now_ms)
    except (DwalError, StorageError) as error:
        code, _ = error_of(error)
        refused = code in REFUSED or code in SEQUENCE_REFUSED or not isinstance(error, DwalError)
        return ("refused" if refused else "unknown"), int(code), False
    end = info.last_offset + 1
    try:
        if log.config.fsync == "always" or replicas.isr_size(TOPIC, partition) <= 1:
            await log.wait_durable(end)
        await replicas.wait_replicated(TOPIC, partition, end)
    except (DwalError, StorageError) as error:
        code = error.code if isinstance(error, DwalError) else ErrorCode.KAFKA_STORAGE_ERROR
        return "unknown", int(code), False
    return "ok", info.base_offset, info.duplicate


async def consume(node: SimNode, partition: int, offset: int, leader_epoch: int) -> bytes:
    """A consumer's read at the leader, as the Fetch handler does it: the batches from
    `offset` below the high watermark, if this broker leads in the consumer's
    `leader_epoch`. Raises DwalError (leadership, leader epoch, OFFSET_OUT_OF_RANGE)."""
    await trio.lowlevel.checkpoint()
    assert node.replicas is not None
    log, _ = node.replicas.leader_log(TOPIC, partition, current_leader_epoch=leader_epoch)
    if offset < log.log_start_offset:
        raise BelowLogStart(log.log_start_offset)
    try:
        with log.read(offset, 64 * 1024) as piece:
            return piece.read_bytes()
    except OffsetOutOfRangeError as error:
        raise DwalError(ErrorCode.OFFSET_OUT_OF_RANGE, str(error)) from None


class BelowLogStart(DwalError):
    """OFFSET_OUT_OF_RANGE below the leader's log start: retention deleted those records (a
    consumer resets to the log start; no anomaly)."""

    def __init__(self, log_start_offset: int) -> None:
        super().__init__(ErrorCode.OFFSET_OUT_OF_RANGE, f"below the log start {log_start_offset}")
        self.log_start_offset = log_start_offset


# -- the nemesis ----------------------------------------------------------------------------


async def nemesis(cluster: SimCluster, until: float) -> int:
    """Inject faults, one at a time, until trio time `until`; returns how many."""
    rng = cluster.rngs["nemesis"]
    settings = cluster.settings
    faults = 0
    while trio.current_time() < until:
        await trio.sleep(rng.uniform(*settings.fault_gap_s))
        hold = rng.uniform(*settings.fault_hold_s)
        kind = rng.choice(
            [
                "crash",
                "crash",
                "power",
                "power",
                "crash_all",
                "isolate",
                "isolate",
                "cut",
                "restart",
                "restart",
                "mute",
                "mute",
            ]
        )
        faults += 1
        if kind == "restart":  # SIGTERM, then start again
            victim = _pick(cluster, rng)
            await cluster.stop_gracefully(victim)
            await trio.sleep(hold / 4)
            await cluster.start(victim)
        elif kind in ("crash", "power"):
            power = kind == "power"
            victim = _pick(cluster, rng)
            await cluster.crash(victim, power_loss=power)
            await trio.sleep(hold)
            await cluster.start(victim)
        elif kind == "crash_all":
            # A power loss of every node loses nothing only when every write was fsynced.
            power = settings.fsync == "always" and rng.random() < 0.5
            for node_id in NODES:
                await cluster.crash(node_id, power_loss=power)
            await trio.sleep(hold)
            for node_id in NODES:
                await cluster.start(node_id)
        elif kind == "mute":
            # Its answers to clients are lost (a hung client listener) while it goes on
            # replicating, then it crashes: the writes it stored meanwhile are resent to it,
            # then to the next leader, which must recognise them from the replicated batches.
            victim = _pick(cluster, rng)
            for client in clients_of(settings):
                cluster.network.cut(victim, client)
            cluster.note(f"node {victim} muted")
            await trio.sleep(hold / 2)
            await cluster.crash(victim, power_loss=False)
            cluster.network.heal()
            await trio.sleep(hold / 2)
            await cluster.start(victim)
        elif kind == "isolate":
            victim = _pick(cluster, rng)
            cluster.network.isolate(victim, NODES)
            cluster.note(f"node {victim} isolated")
            await trio.sleep(hold)
            cluster.network.heal()
            cluster.note("healed")
        else:
            source, target = rng.sample(NODES, 2)
            cluster.network.cut(source, target)
            cluster.note(f"link {source}->{target} cut")
            await trio.sleep(hold)
            cluster.network.heal()
            cluster.note("healed")
    return faults


MOVE_GAP_S = (1.0, 4.0)


async def operate(cluster: SimCluster, stop: trio.Event) -> None:
    """An operator moving partitions while the nemesis strikes, until `stop`: every few
    seconds, a random partition to 2 or 3 of the nodes in a random order, or (one time in
    four, when a move is in progress) a cancel of a move; sent as `dwal topic reassign` does,
    to a random node, which forwards it to the active controller. A refusal or no answer (a
    fault) is noted, not retried."""
    rng = random.Random(f"{cluster.seed}:operator")
    while not stop.is_set():
        await trio.sleep(rng.uniform(*MOVE_GAP_S))
        active = cluster.active_controller()
        image = None if active is None else cluster.nodes[active].image
        info = None if image is None else image.topics.get(TOPIC)
        moving = [] if info is None else [p.partition for p in info.partitions if p.reassigning]
        if moving and rng.random() < 0.25:
            partition, target = rng.choice(moving), None
        else:
            partition = rng.randrange(cluster.settings.partitions)
            target = rng.sample(NODES, rng.choice([2, 3]))
        await reassign(cluster, rng, partition, target)
        cluster.moves += 1


async def reassign(
    cluster: SimCluster, rng: random.Random, partition: int, target: list[int] | None
) -> None:
    """AlterPartitionReassignments of one partition through a random node."""
    entry = {"partition": partition, "replicas": target}
    body = {"topics": [{"topic": TOPIC, "partitions": [entry]}]}

    async def forward(node: SimNode) -> dict[str, Any]:
        assert node.channel is not None
        return await node.channel.call(
            ApiKey.ALTER_PARTITION_REASSIGNMENTS, body, timeout_seconds=5.0
        )

    via = rng.choice(NODES)
    outcome = "no answer"
    with trio.move_on_after(6.0):
        try:
            reply = await cluster.net.call(OPERATOR_CLIENT, via, forward)
            outcome = ErrorCode(reply["topics"][0]["partitions"][0]["error_code"]).name
        except DwalError as error:
            outcome = error.code.name
        except Unanswered:
            outcome = "node down"
    what = "cancel the move of" if target is None else f"move to {target}"
    cluster.note(f"operator via {via}: {what} partition {partition}: {outcome}")


def clients_of(settings: SimSettings) -> list[int]:
    """The network addresses of every client: writers, readers, the operator."""
    writers = [WRITER_CLIENT + writer for writer in range(settings.writers)]
    readers = [READER_CLIENT + reader for reader in range(settings.readers)]
    return [*writers, *readers, OPERATOR_CLIENT]


def _pick(cluster: SimCluster, rng: random.Random) -> int:
    """A random node, the active controller, or the leader of a random partition."""
    choice = rng.random()
    if choice < 0.3:
        active = cluster.active_controller()
        if active is not None:
            return active
    if choice < 0.7:
        leader = cluster.leader_of(rng.randrange(cluster.settings.partitions), rng)
        if leader is not None:
            return leader
    return rng.choice(NODES)


# -- one run --------------------------------------------------------------------------------


@dataclass
class SimResult:
    seed: int
    settings: SimSettings
    verdict: Verdict
    diverged: list[str]
    anomalies: list[str]
    faults: int
    digest: str
    requests: int
    log: list[str]
    history: History
    outcomes: collections.Counter[str]  # of every Produce attempt
    resends: int  # attempts of a batch after its first
    duplicate_answers: int  # acknowledgements with the original offset of a resent batch
    duplicates_moved: int  # of those, by another leader than the first attempt's
    epochs_started: int  # writers' epoch bumps after an outcome left unknown

    @property
    def ok(self) -> bool:
        return self.verdict.ok and not self.diverged and not self.anomalies

    def line(self) -> str:
        return (
            f"{self.verdict.line(self.seed).replace('nemesis', 'cluster-sim', 1)} "
            f"resent={self.resends} dup_answers={self.duplicate_answers} "
            f"dup_answers_moved={self.duplicates_moved} "
            f"fsync={self.settings.fsync} faults={self.faults} diverged={len(self.diverged)} "
            f"anomalies={len(self.anomalies)} digest={self.digest[:12]}"
        )


def retained(history: History, starts: dict[int, int]) -> History:
    """`history` without the records retention deleted from the final logs (below each
    partition's log start): their absence at the end is no loss."""
    return dataclasses.replace(
        history,
        acknowledged=[a for a in history.acknowledged if a.offset >= starts[a.partition]],
        consumed=[c for c in history.consumed if c.offset >= starts[c.partition]],
    )


def digest_of(history: History, final: FinalLogs) -> str:
    hasher = hashlib.sha256()
    for ack in history.acknowledged:
        hasher.update(f"a{ack.partition}/{ack.offset}/{ack.value!r}/{ack.at_s:.6f};".encode())
    for value in history.unknown:
        hasher.update(b"u" + value)
    for record in history.consumed:
        hasher.update(f"c{record.partition}/{record.offset};".encode())
    for partition in sorted(final):
        for offset, value in sorted(final[partition].items()):
            hasher.update(f"f{partition}/{offset}/{value!r};".encode())
    return hasher.hexdigest()


class _StoryHandler(logging.Handler):
    """The broker's log events (info and above) as lines of the run's story."""

    def __init__(self, cluster: SimCluster) -> None:
        super().__init__(logging.INFO)
        self.cluster = cluster

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None) or {}
        shown = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        self.cluster.note(f"{record.getMessage()} {shown}", SIM_NODE.get())


async def simulate(seed: int, settings: SimSettings) -> SimResult:
    async with trio.open_nursery() as nursery:
        cluster = SimCluster(nursery, seed, settings)
        story = _StoryHandler(cluster)
        dwal = logging.getLogger("dwal")
        dwal.addHandler(story)
        level, propagate = dwal.level, dwal.propagate
        dwal.setLevel(logging.INFO)
        dwal.propagate = False  # the story has them; pytest's capture need not
        nursery.start_soon(_remove_handler_on_exit, dwal, story, level, propagate)
        await nursery.start(cluster.network.run)
        nursery.start_soon(cluster.watch)
        for node_id in NODES:
            await cluster.start(node_id)
        with trio.fail_after(60):
            await cluster.create_topic()
            while not cluster.converged():
                await trio.sleep(0.1)
        # the writers are idempotent producers: a value stored twice fails the seed
        history = History(started_s=trio.current_time(), exactly_once=True)
        workload = Workload(cluster, history)
        async with trio.open_nursery() as clients:
            for writer in range(settings.writers):
                clients.start_soon(workload.write, writer)
            for reader in range(settings.readers):
                clients.start_soon(workload.read, reader)
            clients.start_soon(operate, cluster, workload.stop)
            faults = await nemesis(cluster, trio.current_time() + settings.duration_s)
            cluster.network.heal()
            for node_id in NODES:
                if not cluster.nodes[node_id].up:
                    await cluster.start(node_id)
            await trio.sleep(2.0)  # writes go on a little after the last fault
            workload.stop.set()
        history.ended_s = trio.current_time()
        stuck = []
        with trio.move_on_after(CONVERGE_SECONDS_MAX):
            while not cluster.converged():
                await trio.sleep(0.1)
        if not cluster.converged():
            stuck = [f"not converged {CONVERGE_SECONDS_MAX:g} s after healing: {cluster.state()}"]
            final, starts, diverged = {}, {}, []
        else:
            final, starts, diverged = cluster.final_logs()
        # what retention deleted is not checked for loss, but counts for availability and
        # duplicates (a value a reader saw at an offset since deleted, and again later)
        verdict = dataclasses.replace(
            check(retained(history, starts) if starts else history, final),
            acknowledged=len(history.acknowledged),
            max_unavailable_s=check(history, {}).max_unavailable_s,
            duplicates=check(history, final).duplicates,
        )
        result = SimResult(
            seed=seed,
            settings=settings,
            verdict=verdict,
            diverged=diverged + stuck,
            anomalies=workload.anomalies,
            faults=faults,
            digest=digest_of(history, final),
            requests=cluster.net.requests,
            log=list(cluster.log_lines),
            history=history,
            outcomes=workload.outcomes,
            resends=workload.resends,
            duplicate_answers=workload.duplicate_answers,
            duplicates_moved=workload.duplicates_moved,
            epochs_started=workload.epochs_started,
        )
        nursery.cancel_scope.cancel()
    return result


async def _remove_handler_on_exit(
    logger: logging.Logger, handler: logging.Handler, level: int, propagate: bool
) -> None:
    try:
        await trio.sleep_forever()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def run_simulation(seed: int, settings: SimSettings) -> SimResult:
    """One replayable run (see the module's theory of operation)."""
    trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[attr-defined]
    trio._core._run._r.seed(seed)  # type: ignore[attr-defined]
    return trio.run(simulate, seed, settings, clock=trio.testing.MockClock(autojump_threshold=0))
