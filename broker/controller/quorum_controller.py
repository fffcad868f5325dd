"""QuorumController: the trio shell of the metadata quorum (KRaft's QuorumController).

Theory of operation
-------------------
One `RaftDriver` runs this node's Raft member over a transport and a log storage (durable:
`<data_dir>/__cluster_metadata/`, see `open_metadata_storage`). Its state machine,
`MetadataStateMachine`, decodes every committed entry with `decode_entry` and applies it to
the current `MetadataImage` with `apply(..., entry_index=index)`; the leader's no-op and
configuration changes are applied as empty entries, so `image.last_applied_index` is the
Raft applied index. A committed entry that does not decode stops the node with
`MetadataLogCorruptError`: skipping it would make this image differ from every other
node's. The image is published, not queued: `image` is the latest, and
`wait_image_at_least(index)` waits on one `trio.Event` replaced on every change. Snapshots:
the driver compacts the log every `snapshot_interval_entries` with `encode_snapshot(image)`,
and a node restores its image from the Raft snapshot (`decode_snapshot`) on start and when a
leader sends one.

The active controller is the Raft leader once it has read through the log. A task follows
`driver.wait_leadership_change`; when this node leads a term it waits until its image has
applied every entry of its own log (which includes the term's no-op, so everything committed
by earlier leaders is in the image), writes the ClusterIdRecord if the log has none (a new
cluster), and only then becomes active. Leaving the term cancels that term's tasks.

Decisions (`submit`) run one at a time, in arrival order (a fair lock): each waits until the
image has applied every entry of the leader's log (its own earlier proposals included, even
one whose outcome was unknown), then, with no checkpoint in between, runs the pure
`decide(image)` and proposes the encoded records as one entry, and returns once that entry
is committed and applied to this node's image. So no decision is taken on a stale image
(the wait alone guarantees it; the lock keeps the order fair); a PartitionChangeRecord's
compare-and-swap covers what a previous leader left uncommitted.

Broker sessions live only in the active controller's memory, as in Kafka: `heartbeat`
renews a broker's session (trio clock); a broker the active controller has not heard from
gets one session of grace from the moment it became active (or first saw the broker). A
fencing task fences every unfenced broker whose session expired (`fence_broker`: its
partitions' leadership moves within the ISR or goes to no leader); a heartbeat from a fenced
broker whose metadata offset reached the entry that fenced it (or registered it) unfences
it (`unfence_broker`).

Broker decisions change at most `partition_changes_per_entry_max` partitions per entry (see
decisions' module doc): a broker leading 50,000 partitions would not fit one entry. A task of
the active term finishes what they leave: after every committed entry holding a broker record,
on activation, and every session timeout as a safety net, it proposes `converge_leadership`
entry after entry, each decided on the latest image, until it returns [].

Automatic leader balancing (Kafka's `auto.leader.rebalance.enable`) is a task of the active
term: every `leader_imbalance_check_interval_seconds` it takes the partitions
`leader_imbalance` finds (a broker whose share of preferred leaderships it does not hold is
above `leader_imbalance_per_broker_percentage`) and elects their preferred leaders, at most
LEADER_ELECTIONS_PER_ENTRY_MAX per entry, each entry decided on the latest image (a partition
whose preferred leader can no longer lead by then is skipped).
"""

from __future__ import annotations

import base64
import functools
import logging
import pathlib
import random
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

from broker.controller.decisions import (
    LEADER_ELECTIONS_PER_ENTRY_MAX,
    PARTITION_CHANGES_PER_ENTRY_MAX,
    Decision,
    TopicPartition,
    converge_leadership,
    elect_preferred_leaders,
    fence_broker,
    leader_imbalance,
    unfence_broker,
)
from broker.controller.metadata_image import EMPTY_IMAGE, MetadataImage, apply
from broker.controller.metadata_records import (
    BrokerShutdownRecord,
    ClusterIdRecord,
    FenceBrokerRecord,
    MetadataDecodeError,
    MetadataRecord,
    RegisterBrokerRecord,
    UnfenceBrokerRecord,
    decode_entry,
    encode_entry,
)
from broker.controller.metadata_snapshot import decode_snapshot, encode_snapshot
from broker.raft.config import RaftConfig
from broker.raft.driver import (
    DriverConfig,
    DriverStoppedError,
    Leadership,
    Persister,
    ProposalOutcomeUnknownError,
    RaftDriver,
)
from broker.raft.durable_storage import DurableStorage
from broker.raft.log_storage import LogStorage
from broker.raft.messages import NO_NODE, Configuration, Entry, EntryKind, Role, Snapshot
from broker.raft.node import (
    NotLeaderError,
    ProposalDroppedError,
    ProposalTooLargeError,
    RaftError,
)
from broker.raft.transport import Transport
from protocol.errors import DwalError, ErrorCode

logger = logging.getLogger("dwal.controller")

METADATA_DIRECTORY_NAME = "__cluster_metadata"

# Records of the broker decisions that may leave partition changes to `converge_leadership`.
_BROKER_RECORDS = (
    RegisterBrokerRecord,
    FenceBrokerRecord,
    UnfenceBrokerRecord,
    BrokerShutdownRecord,
)


class MetadataLogCorruptError(Exception):
    """A committed entry or a snapshot of the metadata log does not decode. The node stops:
    applying anything after it would give an image that no replay of the log gives."""


class NotControllerError(DwalError):
    """NOT_CONTROLLER: this node is not the active controller. `controller_id` is the node
    believed to be (or to become) it, or None when no leader is known."""

    def __init__(self, controller_id: int | None, message: str | None = None) -> None:
        self.controller_id = controller_id
        if message is None:
            message = (
                "no active controller is known"
                if controller_id is None
                else f"the active controller is node {controller_id}"
            )
        super().__init__(ErrorCode.NOT_CONTROLLER, message)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuorumControllerConfig:
    session_timeout_seconds: float = 6.0  # a broker silent this long is fenced
    heartbeat_interval_seconds: float = 1.0  # brokers' cadence; also the fencing check's
    decision_timeout_seconds: float = 5.0  # a submit's wait in line, catch-up and commit
    snapshot_interval_entries: int = 1000  # snapshot the image and compact every N entries
    tick_interval_seconds: float = 0.1  # the Raft node's logical tick
    cluster_id: str | None = None  # for a new cluster; None: a random one
    # Kafka's auto.leader.rebalance.enable, leader.imbalance.check.interval.seconds and
    # leader.imbalance.per.broker.percentage (same defaults): the active controller gives
    # leadership back to preferred replicas on its own.
    auto_leader_rebalance_enable: bool = True
    leader_imbalance_check_interval_seconds: float = 300.0
    leader_imbalance_per_broker_percentage: int = 10
    # Partition changes a broker decision (and each step finishing it) puts in one entry; at
    # most PARTITION_CHANGES_PER_ENTRY_MAX, the most known to fit the entry limits.
    partition_changes_per_entry_max: int = PARTITION_CHANGES_PER_ENTRY_MAX

    def validate(self) -> None:
        """Raise ValueError for an impossible setting."""
        if not 1 <= self.partition_changes_per_entry_max <= PARTITION_CHANGES_PER_ENTRY_MAX:
            raise ValueError(
                f"partition_changes_per_entry_max must be in [1, {PARTITION_CHANGES_PER_ENTRY_MAX}]"
            )
        if self.leader_imbalance_check_interval_seconds <= 0:
            raise ValueError("leader_imbalance_check_interval_seconds must be positive")
        if not 0 <= self.leader_imbalance_per_broker_percentage <= 100:
            raise ValueError("leader_imbalance_per_broker_percentage must be in [0, 100]")
        if not 0 < self.heartbeat_interval_seconds < self.session_timeout_seconds:
            raise ValueError("need 0 < heartbeat_interval_seconds < session_timeout_seconds")
        if self.decision_timeout_seconds <= 0 or self.tick_interval_seconds <= 0:
            raise ValueError("timeouts and the tick interval must be positive")
        if self.snapshot_interval_entries < 1:
            raise ValueError("snapshot_interval_entries must be >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerHeartbeatReply:
    fenced: bool  # after this heartbeat (an unfence it caused included)
    shut_down: bool  # the broker must register again


@dataclass(frozen=True, slots=True, kw_only=True)
class QuorumControllerStatistics:
    active: bool
    leadership: Leadership
    image_index: int  # the image's last applied entry
    decisions_committed: int
    brokers_fenced: int  # by this node's session timeouts
    brokers_unfenced: int  # by this node, on heartbeats
    decisions_waiting: int  # callers of submit in line or deciding
    leaders_balanced: int  # preferred leaders elected by automatic leader balancing
    partitions_converged: int  # changes made by converge_leadership steps (broker decisions' rest)


def open_metadata_storage(data_dir: pathlib.Path, voters: Iterable[int]) -> DurableStorage:
    """Open the metadata log of `data_dir` (created with bootstrap `voters` on first use).
    Raises what DurableStorage.open raises. Blocking: call it in a worker thread."""
    return DurableStorage.open(
        data_dir / METADATA_DIRECTORY_NAME, Configuration(voters=frozenset(voters))
    )


class MetadataStateMachine:
    """The driver's state machine: committed entries in, `MetadataImage`s out."""

    # Images are immutable (apply replaces them): encoding one for a snapshot (~75 ms at
    # 1,000 topics x 10 partitions) runs in a worker thread, off the event loop.
    snapshot_off_loop = True

    def __init__(self) -> None:
        self.image: MetadataImage = EMPTY_IMAGE
        # broker id -> index of the entry that fenced (or registered fenced) its current
        # epoch; a broker is caught up once its metadata offset reaches it. Derived from the
        # log; after a snapshot restore, the snapshot's index (a later, safe bound).
        self.fenced_since: dict[int, int] = {}
        self._changed = trio.Event()
        self._stopped = False

    def apply(self, entry: Entry) -> int:
        """Apply a committed entry; return its index (what `propose` returns). Raises
        MetadataLogCorruptError for an entry that does not decode."""
        records: list[MetadataRecord] = []
        if entry.kind == EntryKind.NORMAL and entry.data:
            try:
                records = decode_entry(entry.data)
            except MetadataDecodeError as error:
                raise MetadataLogCorruptError(
                    f"committed metadata entry {entry.index} (term {entry.term}) does not "
                    f"decode: {error}"
                ) from error
        self._publish(apply(self.image, records, entry_index=entry.index))
        return entry.index

    def snapshot(self) -> bytes:
        return encode_snapshot(self.image)

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the image by the snapshot's. Raises MetadataLogCorruptError."""
        try:
            image = decode_snapshot(snapshot.data, index=snapshot.index)
        except MetadataDecodeError as error:
            raise MetadataLogCorruptError(
                f"metadata snapshot at {snapshot.index} does not decode: {error}"
            ) from error
        self.fenced_since = {
            broker_id: snapshot.index for broker_id, info in image.brokers.items() if info.fenced
        }
        self.image = image
        self._wake()

    def _publish(self, image: MetadataImage) -> None:
        before = self.image
        if image.brokers is not before.brokers:  # copy-on-write: unchanged maps are shared
            for broker_id, info in image.brokers.items():
                old = before.brokers.get(broker_id)
                if not info.fenced:
                    self.fenced_since.pop(broker_id, None)
                elif old is None or not old.fenced or old.epoch != info.epoch:
                    self.fenced_since[broker_id] = image.last_applied_index
        self.image = image
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def stop(self) -> None:
        self._stopped = True
        self._wake()

    async def wait_image_at_least(self, index: int) -> MetadataImage:
        """See QuorumController.wait_image_at_least."""
        while self.image.last_applied_index < index:
            if self._stopped:
                raise DriverStoppedError("the metadata quorum stopped")
            await self._changed.wait()
        return self.image


@dataclass(slots=True)
class _ActiveTerm:
    """What the active controller keeps in memory for its term."""

    term: int
    since: float  # trio time at which it became active
    # broker id -> (broker epoch, trio time its session expires)
    sessions: dict[int, tuple[int, float]] = field(default_factory=dict)


class QuorumController:
    """One member of the metadata quorum; see the module's theory of operation."""

    def __init__(
        self,
        raft_config: RaftConfig,
        storage: LogStorage,
        transport: Transport,
        *,
        config: QuorumControllerConfig = QuorumControllerConfig(),
        persister: Persister | None = None,
        random_source: random.Random | None = None,
    ) -> None:
        """Restores the image from the storage's snapshot (MetadataLogCorruptError)."""
        config.validate()
        self.config = config
        self.transport = transport
        self.state = MetadataStateMachine()
        self._random = random_source or random.Random()
        self.driver = RaftDriver(
            raft_config,
            storage,
            transport,
            self.state,
            persister=persister,
            options=DriverConfig(
                tick_interval_seconds=config.tick_interval_seconds,
                proposal_timeout_seconds=config.decision_timeout_seconds,
                snapshot_interval_entries=config.snapshot_interval_entries,
            ),
            random_source=random.Random(self._random.random()),
        )
        self._election_ticks = raft_config.election_ticks
        self._active: _ActiveTerm | None = None
        self._active_changed = trio.Event()
        self._decision_lock = trio.Lock()  # one decision in flight at a time
        self._decisions_waiting = 0
        self._decisions_committed = self._fenced = self._unfenced = 0
        self._leaders_balanced = 0
        self._partitions_converged = 0
        # Set when a committed broker decision may have left partition changes.
        self._convergence_wanted = trio.Event()
        self._stopped = False

    @property
    def node_id(self) -> int:
        return self.driver.node_id

    @property
    def image(self) -> MetadataImage:
        """The latest image this node applied (committed entries only)."""
        return self.state.image

    def election_timeout_seconds(self) -> float:
        """How long a leadership transfer may take before it aborts (election_ticks)."""
        return self._election_ticks * self.config.tick_interval_seconds

    @property
    def stopped(self) -> bool:
        """True once `run` has ended (waiters then get DriverStoppedError)."""
        return self._stopped

    @property
    def active_term(self) -> int | None:
        """The term in which this node is the active controller, or None (also from the
        moment its Raft node stops leading, before the term's tasks are cancelled)."""
        active = self._active
        return None if active is None or not self._leads(active.term) else active.term

    # Lifecycle.

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the transport, the Raft driver and the controller's tasks until cancelled.
        Raises (in an ExceptionGroup) MetadataLogCorruptError or a storage error, which
        stop the node. Waiters get DriverStoppedError / NotControllerError afterwards."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.transport.run)
                await nursery.start(self.driver.run)
                await nursery.start(self._follow_leadership)
                task_status.started()
        finally:
            self._stopped = True
            self._set_active(None)
            self.state.stop()

    async def _follow_leadership(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        seen = Leadership(term=-1, leader=NO_NODE)
        async with trio.open_nursery() as nursery:
            term_scope: trio.CancelScope | None = None
            while True:
                try:
                    seen = await self.driver.wait_leadership_change(seen)
                except DriverStoppedError:
                    if term_scope is not None:
                        term_scope.cancel()
                    return  # the driver's own error (if any) reaches run's caller
                if term_scope is not None:
                    term_scope.cancel()
                    term_scope = None
                if seen.leader == self.node_id:
                    term_scope = await nursery.start(self._lead, seen.term)

    async def _lead(self, term: int, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
                await self._activate(term)
                active = self._active
                assert active is not None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._converge_leadership)
                    if self.config.auto_leader_rebalance_enable:
                        nursery.start_soon(self._balance_leaders)
                    await self._fence_expired_sessions(active)
            finally:
                if self._active is not None and self._active.term == term:
                    self._set_active(None)

    async def _activate(self, term: int) -> None:
        """Read through the log, write the cluster id of a new cluster, become active."""
        while True:
            try:
                await self._wait_log_applied(term)
                if self.image.cluster_id is None:
                    cluster_id = self.config.cluster_id or _random_cluster_id(self._random)
                    data = encode_entry([ClusterIdRecord(cluster_id=cluster_id)])
                    await self.driver.propose(data)
                    continue  # read through again: another leader's id may have won
                break
            except (RaftError, NotControllerError) as error:
                if not self._leads(term):
                    await trio.sleep_forever()  # cancelled by the leadership change
                logger.info("node %d: activating in term %d: %s", self.node_id, term, error)
                # A refusal may come at once (a leadership transfer): retry a tick later.
                await trio.sleep(self.config.tick_interval_seconds)
        logger.info("node %d is the active controller in term %d", self.node_id, term)
        self._set_active(_ActiveTerm(term=term, since=trio.current_time()))

    def _set_active(self, active: _ActiveTerm | None) -> None:
        self._active = active
        self._active_changed.set()
        self._active_changed = trio.Event()

    def _leads(self, term: int) -> bool:
        node = self.driver.node
        return node.role == Role.LEADER and node.term == term and not self._stopped

    async def _wait_log_applied(self, term: int) -> None:
        """Wait until the image has applied every entry of this leader's log. Returns with
        no checkpoint after the last check, so a synchronous decision and proposal that
        follow see an image that includes every entry proposed before them. Raises
        NotControllerError once this node no longer leads `term`."""
        while True:
            if not self._leads(term):
                raise self._not_controller()
            last_index = self.driver.node.last_index
            if self.image.last_applied_index >= last_index:
                return
            await self.state.wait_image_at_least(last_index)

    def _not_controller(self) -> NotControllerError:
        leader = self.driver.leadership().leader
        if leader == self.node_id and not self._stopped:
            return NotControllerError(leader, f"node {leader} is becoming the active controller")
        return NotControllerError(None if leader == NO_NODE else leader)

    def require_active(self) -> None:
        """Raise NotControllerError (with the hint) unless this node is the active
        controller."""
        self._require_active()

    def _require_active(self) -> _ActiveTerm:
        active = self._active
        if active is None or not self._leads(active.term):
            raise self._not_controller()
        return active

    # Waiting for state.

    async def wait_image_at_least(self, index: int) -> MetadataImage:
        """Return the image once it has applied entry `index` (at once if it has).
        Raises DriverStoppedError once the node stopped. Safe to cancel."""
        return await self.state.wait_image_at_least(index)

    async def wait_active(self) -> int:
        """Return the term once this node is the active controller. Raises
        DriverStoppedError once the node stopped. Safe to cancel."""
        while self._active is None:
            if self._stopped:
                raise DriverStoppedError("the metadata quorum stopped")
            await self._active_changed.wait()
        return self._active.term

    # Decisions.

    async def submit(
        self,
        decide: Callable[[MetadataImage], Decision],
        *,
        timeout_seconds: float | None = None,
    ) -> int:
        """Decide on the latest image and commit the records as one entry.

        `decide` is a pure, synchronous function of the image. Returns the index of the
        committed entry, applied to `image` when this returns; for an empty decision
        (nothing to do), the index of the image it was decided on. Raises the DwalError
        the decision returned, NotControllerError (retriable, with the controller hint),
        DwalError(REQUEST_TIMED_OUT) when the outcome is unknown (it may still take
        effect). Safe to cancel (the outcome is then unknown).
        """
        timeout = (
            self.config.decision_timeout_seconds if timeout_seconds is None else timeout_seconds
        )
        deadline = trio.current_time() + timeout
        active = self._require_active()
        self._decisions_waiting += 1
        try:
            with trio.move_on_at(deadline):
                async with self._decision_lock:
                    return await self._decide_and_commit(active.term, decide, deadline)
        finally:
            self._decisions_waiting -= 1
        raise DwalError(ErrorCode.REQUEST_TIMED_OUT, "no outcome in time; it may take effect")

    async def _decide_and_commit(
        self, term: int, decide: Callable[[MetadataImage], Decision], deadline: float
    ) -> int:
        active = self._require_active()
        if active.term != term:
            raise self._not_controller()
        await self._wait_log_applied(term)
        image = self.image
        decision = decide(image)
        if isinstance(decision, DwalError):
            raise decision
        if not decision:
            return image.last_applied_index
        data = encode_entry(decision)
        remaining = max(deadline - trio.current_time(), 1e-9)
        try:
            index = await self.driver.propose(data, timeout_seconds=remaining)
        except NotLeaderError as error:
            raise NotControllerError(error.leader or None) from error
        except ProposalTooLargeError as error:
            raise DwalError(ErrorCode.INVALID_REQUEST, str(error)) from error
        except ProposalDroppedError as error:
            if not self._leads(term):
                raise self._not_controller() from error
            raise DwalError(ErrorCode.REQUEST_TIMED_OUT, f"proposal dropped: {error}") from error
        except ProposalOutcomeUnknownError as error:
            if self._stopped or not self._leads(term):
                raise self._not_controller() from error
            raise DwalError(ErrorCode.REQUEST_TIMED_OUT, str(error)) from error
        assert type(index) is int
        self._decisions_committed += 1
        if any(isinstance(record, _BROKER_RECORDS) for record in decision):
            self._convergence_wanted.set()
        return index

    # Broker sessions.

    async def heartbeat(
        self, broker_id: int, broker_epoch: int, *, metadata_offset: int
    ) -> BrokerHeartbeatReply:
        """Renew the broker's session; unfence it if it is fenced and its metadata offset
        (the last entry its image applied) reached the entry that fenced it.

        Raises NotControllerError, DwalError BROKER_NOT_AVAILABLE (unknown broker) or
        STALE_BROKER_EPOCH (another incarnation), and what `submit` raises for the unfence.
        """
        active = self._require_active()
        broker = self.image.brokers.get(broker_id)
        if broker is None:
            raise DwalError(ErrorCode.BROKER_NOT_AVAILABLE, f"broker {broker_id} is unknown")
        if broker.epoch != broker_epoch:
            raise DwalError(
                ErrorCode.STALE_BROKER_EPOCH,
                f"broker {broker_id} has epoch {broker.epoch}, not {broker_epoch}",
            )
        expires = trio.current_time() + self.config.session_timeout_seconds
        active.sessions[broker_id] = (broker_epoch, expires)
        if broker.fenced and not broker.shut_down and self._caught_up(broker_id, metadata_offset):

            def decide(image: MetadataImage) -> Decision:
                # Fenced anew meanwhile (a later fence entry): it must catch up with that too.
                if not self._caught_up(broker_id, metadata_offset):
                    return []
                return unfence_broker(
                    image,
                    broker_id,
                    broker_epoch,
                    changes_max=self.config.partition_changes_per_entry_max,
                )

            await self.submit(decide)
            if not self.image.brokers[broker_id].fenced:
                self._unfenced += 1
        broker = self.image.brokers[broker_id]
        return BrokerHeartbeatReply(fenced=broker.fenced, shut_down=broker.shut_down)

    def _caught_up(self, broker_id: int, metadata_offset: int) -> bool:
        broker = self.image.brokers.get(broker_id)
        if broker is None:
            return False
        return metadata_offset >= self.state.fenced_since.get(broker_id, broker.epoch)

    def _session_expiry(self, active: _ActiveTerm, broker_id: int, epoch: int) -> float:
        """When the broker's session expires; a broker not heard from in this term (or under
        another epoch) gets one session from now (its grace), at the earliest."""
        session = active.sessions.get(broker_id)
        if session is None or session[0] != epoch:
            session = (epoch, trio.current_time() + self.config.session_timeout_seconds)
            active.sessions[broker_id] = session
        return session[1]

    async def _fence_expired_sessions(self, active: _ActiveTerm) -> None:
        """Fence each unfenced broker whose session expired, until cancelled."""
        while True:
            now = trio.current_time()
            wake_at = now + self.config.heartbeat_interval_seconds
            for broker_id in self.image.unfenced_broker_ids():
                broker = self.image.brokers.get(broker_id)
                if broker is None or broker.fenced:
                    continue  # changed by a decision while this loop awaited
                expires = self._session_expiry(active, broker_id, broker.epoch)
                if expires > now:
                    wake_at = min(wake_at, expires)
                    continue
                await self._fence(active, broker_id, broker.epoch)
            await trio.sleep_until(max(wake_at, trio.current_time()))

    async def _fence(self, active: _ActiveTerm, broker_id: int, epoch: int) -> None:
        def decide(image: MetadataImage) -> Decision:
            if self._session_expiry(active, broker_id, epoch) > trio.current_time():
                return []  # it heartbeated while this decision waited in line
            return fence_broker(
                image, broker_id, epoch, changes_max=self.config.partition_changes_per_entry_max
            )

        try:
            await self.submit(decide)
        except DwalError as error:
            logger.warning("node %d: fencing broker %d: %s", self.node_id, broker_id, error)
            return
        broker = self.image.brokers.get(broker_id)
        if broker is not None and broker.epoch == epoch and broker.fenced:
            self._fenced += 1
            logger.info("node %d fenced broker %d (session expired)", self.node_id, broker_id)

    # Finishing broker decisions.

    async def _converge_leadership(self) -> None:
        """Propose `converge_leadership` steps until none is left, at once and again after
        each broker decision (or every session timeout), until cancelled (the term ends)."""
        while True:
            self._convergence_wanted = trio.Event()  # a wake during the steps runs them again
            await self._converge_until_done()
            with trio.move_on_after(self.config.session_timeout_seconds):
                await self._convergence_wanted.wait()

    async def _converge_until_done(self) -> None:
        while True:
            changed: list[int] = []
            decide = functools.partial(
                _converge,
                changes_max=self.config.partition_changes_per_entry_max,
                changed=changed,
            )
            try:
                await self.submit(decide)
            except DwalError as error:
                logger.warning("node %d: moving leadership: %s", self.node_id, error)
                await trio.sleep(self.config.heartbeat_interval_seconds)
                continue  # a lost term cancels this task; anything else is retried
            if not changed or not changed[-1]:
                return
            self._partitions_converged += changed[-1]
            logger.info(
                "node %d changed %d partitions left by broker decisions",
                self.node_id,
                changed[-1],
            )

    # Automatic leader balancing.

    async def _balance_leaders(self) -> None:
        """Every check interval, elect the preferred leaders `leader_imbalance` finds, until
        cancelled (the term ends)."""
        while True:
            await trio.sleep(self.config.leader_imbalance_check_interval_seconds)
            due = leader_imbalance(self.image, self.config.leader_imbalance_per_broker_percentage)
            for start in range(0, len(due), LEADER_ELECTIONS_PER_ENTRY_MAX):
                elected: list[int] = []
                decide = functools.partial(
                    _elect,
                    partitions=due[start : start + LEADER_ELECTIONS_PER_ENTRY_MAX],
                    elected=elected,
                )
                try:
                    await self.submit(decide)
                except DwalError as error:
                    logger.warning("node %d: leader balancing: %s", self.node_id, error)
                    break
                self._leaders_balanced += elected[-1]
                logger.info(
                    "node %d gave %d partitions back to their preferred leader "
                    "(automatic leader balancing)",
                    self.node_id,
                    elected[-1],
                )

    def statistics(self) -> QuorumControllerStatistics:
        return QuorumControllerStatistics(
            active=self._active is not None,
            leadership=self.driver.leadership(),
            image_index=self.image.last_applied_index,
            decisions_committed=self._decisions_committed,
            brokers_fenced=self._fenced,
            brokers_unfenced=self._unfenced,
            decisions_waiting=self._decisions_waiting,
            leaders_balanced=self._leaders_balanced,
            partitions_converged=self._partitions_converged,
        )


def _elect(
    image: MetadataImage, *, partitions: list[TopicPartition], elected: list[int]
) -> Decision:
    records = elect_preferred_leaders(image, partitions)
    elected.append(len(records))
    return records


def _converge(image: MetadataImage, *, changes_max: int, changed: list[int]) -> Decision:
    records = converge_leadership(image, changes_max=changes_max)
    changed.append(len(records))
    return records


def _random_cluster_id(random_source: random.Random) -> str:
    """A random cluster id in Kafka's form: a uuid in url-safe base64 without padding."""
    raw = uuid.UUID(int=random_source.getrandbits(128), version=4).bytes
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")
