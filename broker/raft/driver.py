"""RaftDriver: the trio shell that runs a sans-I/O RaftNode over a transport and a storage.

Theory of operation. Three tasks share one node, in one nursery (`run`):

- the tick task calls `node.tick()` every `tick_interval_seconds` (under
  `trio.testing.MockClock` that costs no real time);
- the receive task steps every message that arrives on the transport;
- the ready task turns the node's output into effects, one Ready at a time, in the order
  etcd's contract demands:

      ready = node.ready()
      persist ready.snapshot, ready.entries, ready.hard_state   (Persister; may await a
                                                                 worker thread's fsync)
      send ready.messages          only now: they may promise what was just persisted
      restore ready.snapshot into the state machine, apply ready.committed_entries,
      answer read states whose index is applied
      node.advance(ready)

Every change of the node happens in synchronous code between awaits (STYLE rule 4): while
the ready task waits for an fsync, the other tasks keep stepping messages and proposals
into the node, which batches them into the next Ready (one fsync then covers every proposal
that arrived meanwhile: group commit). If persisting fails the node is never advanced and
the driver stops with the error: the node must not believe something was written that was
not.

Proposals (`propose`) wait until their entry is applied and return what the state machine
returned; the entry's term tells whether it is still the proposal (a new leader may have
put another entry at that index: ProposalDroppedError). A proposal whose outcome cannot be
known (timeout, a snapshot jumped over it, the driver stopped) raises
ProposalOutcomeUnknownError: it may or may not take effect. Reads (`read`) use the
read-index protocol: the leader confirms its leadership with a heartbeat round and returns
its commit index; once this node has applied that index the query runs on the state
machine.

Leadership changes are published, not queued: `leadership()` is the (term, leader) of the
last Ready handled, and `wait_leadership_change(previous)` returns the current one as soon
as it differs from what the caller saw last. One trio.Event, replaced on each change, wakes
every waiter; a slow consumer skips intermediate changes and sees the latest, so the ready
task never waits for consumers and nothing piles up.

Persisters decide how a Ready reaches stable storage: `MemoryPersister` (MemoryStorage,
inline), `DurablePersister` (DurableStorage: page-cache writes inline, fsyncs and file
replacement in a worker thread), and the simulation's disk in the tests.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import trio

from .config import RaftConfig
from .durable_storage import DurableStorage
from .log_storage import LogStorage, MemoryStorage
from .messages import (
    NO_NODE,
    ConfigChange,
    Entry,
    Message,
    MessageType,
    Ready,
    Snapshot,
    entry_bytes,
)
from .node import (
    ConfigChangeInProgressError,
    NotLeaderError,
    ProposalDroppedError,
    RaftError,
    RaftNode,
)
from .transport import Transport

logger = logging.getLogger("dwal.raft")
T = TypeVar("T")


class ProposalOutcomeUnknownError(RaftError):
    """The proposal may or may not take effect (timeout, snapshot, shutdown)."""


class ProposalTimeoutError(ProposalOutcomeUnknownError, TimeoutError):
    """No outcome within the proposal's timeout; it may still take effect."""


class ReadTimeoutError(RaftError, TimeoutError):
    """A linearizable read could not be confirmed in time (no leader, partition)."""


class DriverStoppedError(ProposalOutcomeUnknownError):
    """The driver stopped while the request was pending."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DriverConfig:
    tick_interval_seconds: float = 0.1
    proposal_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 5.0
    pending_proposals_max: int = 8192  # waiting callers of `propose`
    pending_reads_max: int = 4096  # waiting callers of `read`
    # Callers of `propose_config_change` in line, the one in progress included; more are
    # refused at once with ProposalDroppedError.
    pending_config_changes_max: int = 64
    snapshot_interval_entries: int = 0  # snapshot and compact every N applied (0: never)

    def validate(self) -> None:
        """Raise ValueError for an impossible setting."""
        if self.tick_interval_seconds <= 0:
            raise ValueError("tick_interval_seconds must be positive")
        if (
            min(self.pending_proposals_max, self.pending_reads_max, self.pending_config_changes_max)
            < 1
        ):
            raise ValueError("pending limits must be >= 1")
        if self.snapshot_interval_entries < 0:
            raise ValueError("snapshot_interval_entries must be >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class DriverStatistics:
    readies: int
    entries_persisted: int
    entries_applied: int
    messages_sent: int
    messages_dropped: int
    pending_proposals: int
    pending_reads: int
    pending_config_changes: int  # callers of propose_config_change in line
    snapshots_taken: int
    leadership_changes: int  # times leadership() changed since the driver was created


@dataclass(frozen=True, slots=True, kw_only=True)
class Leadership:
    """Who leads which term, as of the last Ready this node persisted (so a leader's own
    term and vote are durable when it sees itself here). `leader` is 0 while none is known
    (an election, a leader that stepped down). A leader that sees itself may not have
    committed an entry of its term yet: read through the log (`read`) before deciding."""

    term: int
    leader: int


class StateMachine(Protocol):
    """The application the log drives."""

    def apply(self, entry: Entry) -> object:
        """Apply a committed entry (every kind, including the leader's empty no-op and
        configuration changes, which the node has already acted on); return the result
        for the proposer."""
        ...

    def snapshot(self) -> bytes:
        """The state after the last applied entry. A state machine with a true attribute
        `snapshot_off_loop` has it called in a worker thread (nothing is applied meanwhile:
        the driver waits for it between Readies), so encoding a large state does not stall
        the event loop; it must then only read state that `apply` replaces, never mutates."""
        ...

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the state by a snapshot's."""
        ...


class Persister(Protocol):
    """How a Ready reaches stable storage."""

    async def persist(self, ready: Ready) -> None:
        """Make ready.snapshot, ready.entries and ready.hard_state durable as
        ready.must_sync demands; the node's storage shows them when this returns."""
        ...

    async def flush(self) -> None:
        """Make the storage's own changes (create_snapshot, compact) durable."""
        ...


class DriverObserver(Protocol):
    """Instrumentation hooks (tests check invariants through them); all synchronous."""

    def ready_taken(self, driver: RaftDriver, ready: Ready) -> None: ...

    def persisted(self, driver: RaftDriver, ready: Ready) -> None: ...

    def applied(self, driver: RaftDriver, entry: Entry, result: object) -> None: ...

    def restored(self, driver: RaftDriver, snapshot: Snapshot) -> None: ...

    def snapshot_taken(self, driver: RaftDriver, snapshot: Snapshot) -> None: ...


class MemoryPersister:
    """Persists into a MemoryStorage, inline (tests)."""

    def __init__(self, storage: MemoryStorage) -> None:
        self.storage = storage

    async def persist(self, ready: Ready) -> None:
        if ready.snapshot is not None:
            self.storage.apply_snapshot(ready.snapshot)
        self.storage.append(ready.entries)
        if ready.hard_state is not None:
            self.storage.set_hard_state(ready.hard_state)

    async def flush(self) -> None:
        pass


class DurablePersister:
    """Persists into a DurableStorage: page-cache writes in the trio thread, fsyncs and
    snapshot files in a worker thread. A Ready that needs no sync (only the commit index
    moved) is written to the page cache only, and a commit-only hard state change reaches
    the state file lazily (see DurableStorage.prepare_sync): a restarted node relearns its
    commit index from the leader."""

    def __init__(self, storage: DurableStorage) -> None:
        self.storage = storage

    async def persist(self, ready: Ready) -> None:
        storage = self.storage
        if ready.snapshot is not None:
            await trio.to_thread.run_sync(storage.write_snapshot_file, ready.snapshot)
            storage.install_snapshot(ready.snapshot)
        storage.write_entries(ready.entries)
        if ready.hard_state is not None:
            storage.set_persistent_hard_state(ready.hard_state)
        if ready.must_sync:
            await self.flush()

    async def flush(self) -> None:
        job = self.storage.prepare_sync(lazy_commit=True)
        if not job.is_empty:
            await trio.to_thread.run_sync(job.run)


def persister_for(storage: LogStorage) -> Persister:
    """The persister a driver uses for `storage` when none is given."""
    if isinstance(storage, DurableStorage):
        return DurablePersister(storage)
    assert isinstance(storage, MemoryStorage), "give a Persister for this storage"
    return MemoryPersister(storage)


@dataclass(slots=True)
class _Waiter:
    """One caller of `propose` or `read`, woken by `done`."""

    term: int = 0  # a proposal's term
    index: int = 0  # a read's confirmed index, once known
    done: trio.Event | None = None
    result: object = None
    error: BaseException | None = None

    def finish(self, result: object = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        assert self.done is not None
        self.done.set()


class RaftDriver:
    """Runs one Raft node; see the module's theory of operation."""

    def __init__(
        self,
        config: RaftConfig,
        storage: LogStorage,
        transport: Transport,
        state_machine: StateMachine,
        *,
        persister: Persister | None = None,
        options: DriverConfig = DriverConfig(),
        random_source: random.Random | None = None,
        observer: DriverObserver | None = None,
    ) -> None:
        options.validate()
        assert transport.node_id == config.node_id
        self.options = options
        self.storage = storage
        self.transport = transport
        self.state_machine = state_machine
        self.persister = persister or persister_for(storage)
        self.observer = observer
        snapshot = storage.snapshot()
        if snapshot.index > 0:
            state_machine.restore(snapshot)
        self._raft_config = config
        self.node = RaftNode(config, storage, random_source or random.Random())
        self._wakeup = trio.Event()
        self._proposals: dict[int, _Waiter] = {}
        self._reads: dict[bytes, _Waiter] = {}
        self._reads_awaiting_apply: list[_Waiter] = []
        self._read_counter = itertools.count(1)
        self._running = False
        self._stopped = False
        self._readies = self._entries_persisted = self._entries_applied = 0
        self._messages_sent = self._messages_dropped = self._snapshots_taken = 0
        self._leadership = Leadership(term=self.node.term, leader=NO_NODE)
        self._leadership_changed = trio.Event()
        self._leadership_changes = 0
        self._config_change_lock = trio.Lock()  # fair: changes go in arrival order
        self._config_changes_pending = 0
        self._applied_more = trio.Event()  # replaced whenever a Ready applied something

    @property
    def node_id(self) -> int:
        return self.node.node_id

    # Lifecycle.

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node until cancelled (or until persisting fails: the error propagates).
        Pending callers get DriverStoppedError when it stops. The transport is run by the
        caller."""
        assert not self._running, "a driver runs once"
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._tick_loop)
                await nursery.start(self._receive_loop)
                await nursery.start(self._ready_loop)
                task_status.started()
        finally:
            self._stopped = True
            self._fail_everything(DriverStoppedError("the raft driver stopped"))
            self._leadership_changed.set()  # waiters wake and see that we stopped
            self._applied_more.set()

    def _wake(self) -> None:
        self._wakeup.set()

    async def _tick_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        interval = self.options.tick_interval_seconds
        deadline = trio.current_time()
        while True:
            # A fixed cadence that does not drift with processing time; ticks missed while
            # the process stalled are dropped rather than fired in a burst (which would
            # start elections that no silence of the leader justified).
            deadline = max(deadline + interval, trio.current_time())
            await trio.sleep_until(deadline)
            self.node.tick()
            self._wake()

    async def _receive_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        async for message in self.transport.receive_channel:
            self.node.step(message)
            self._wake()

    async def _ready_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self.node.has_ready():
                await self._handle_ready(self.node.ready())

    async def _handle_ready(self, ready: Ready) -> None:
        self._readies += 1
        if self.observer is not None:
            self.observer.ready_taken(self, ready)
        await self.persister.persist(ready)
        self._entries_persisted += len(ready.entries)
        if self.observer is not None:
            self.observer.persisted(self, ready)
        self._send(ready.messages)
        if ready.snapshot is not None:
            self._restore(ready.snapshot)
        for entry in ready.committed_entries:
            self._apply(entry)
        self.node.advance(ready)
        self._publish_leadership(ready)
        if ready.committed_entries or ready.snapshot is not None:
            self._applied_more.set()
            self._applied_more = trio.Event()
        for state in ready.read_states:
            waiter = self._reads.pop(state.request_context, None)
            if waiter is not None:
                waiter.index = state.index
                self._reads_awaiting_apply.append(waiter)
        self._release_reads()
        await self._maybe_snapshot()

    def _publish_leadership(self, ready: Ready) -> None:
        previous = self._leadership
        term = previous.term if ready.hard_state is None else ready.hard_state.term
        leader = previous.leader if ready.soft_state is None else ready.soft_state.leader
        if (term, leader) == (previous.term, previous.leader):
            return
        self._leadership = Leadership(term=term, leader=leader)
        self._leadership_changes += 1
        self._leadership_changed.set()
        self._leadership_changed = trio.Event()

    def _send(self, messages: tuple[Message, ...]) -> None:
        config = self._raft_config
        for message in coalesce_appends(
            messages, config.max_append_entries, config.max_append_bytes
        ):
            delivered = self.transport.send(message)
            if delivered:
                self._messages_sent += 1
            else:
                self._messages_dropped += 1
            if message.type == MessageType.SNAPSHOT:
                self.node.report_snapshot(message.target, delivered)
            elif not delivered and message.type == MessageType.APPEND:
                self.node.report_unreachable(message.target)

    def _restore(self, snapshot: Snapshot) -> None:
        self.state_machine.restore(snapshot)
        if self.observer is not None:
            self.observer.restored(self, snapshot)
        for index in [index for index in self._proposals if index <= snapshot.index]:
            error = ProposalOutcomeUnknownError(f"a snapshot at {snapshot.index} replaced it")
            self._proposals.pop(index).finish(error=error)

    def _apply(self, entry: Entry) -> None:
        result = self.state_machine.apply(entry)
        self._entries_applied += 1
        if self.observer is not None:
            self.observer.applied(self, entry, result)
        waiter = self._proposals.pop(entry.index, None)
        if waiter is None:
            return
        if entry.term == waiter.term:
            waiter.finish(result)
        else:
            waiter.finish(error=ProposalDroppedError("a new leader replaced the proposal"))

    def _release_reads(self) -> None:
        if not self._reads_awaiting_apply:
            return
        applied = self.node.applied_index
        waiting = []
        for waiter in self._reads_awaiting_apply:
            if waiter.index <= applied:
                waiter.finish()
            else:
                waiting.append(waiter)
        self._reads_awaiting_apply = waiting

    async def _maybe_snapshot(self) -> None:
        interval = self.options.snapshot_interval_entries
        applied = self.node.applied_index
        if interval and applied - self.storage.snapshot().index >= interval:
            await self.snapshot_now()

    async def snapshot_now(self) -> None:
        """Snapshot the state machine at the applied index and compact the log up to it.
        Call only from the ready task (between Readies) or while the driver is not
        running: the state machine must be exactly at the applied index."""
        before = self.storage.snapshot().index
        applied = self.node.applied_index
        if getattr(self.state_machine, "snapshot_off_loop", False):
            data = await trio.to_thread.run_sync(self.state_machine.snapshot)
        else:
            data = self.state_machine.snapshot()
        assert self.node.applied_index == applied, "applied while the snapshot was taken"
        self.node.compact(applied, data)
        snapshot = self.storage.snapshot()
        if snapshot.index > before:
            self._snapshots_taken += 1
            await self.persister.flush()
            if self.observer is not None:
                self.observer.snapshot_taken(self, snapshot)

    def _fail_everything(self, error: BaseException) -> None:
        for waiter in self._proposals.values():
            waiter.finish(error=error)
        self._proposals.clear()
        for waiter in [*self._reads.values(), *self._reads_awaiting_apply]:
            waiter.finish(error=DriverStoppedError(str(error)))
        self._reads.clear()
        self._reads_awaiting_apply = []

    # Requests.

    async def propose(self, data: bytes, *, timeout_seconds: float | None = None) -> Any:
        """Replicate `data` and return what the state machine's `apply` returned for it.

        Raises NotLeaderError (`.leader` names the leader, 0 if unknown),
        ProposalDroppedError (refused or overwritten: it did not and will not take effect),
        ProposalOutcomeUnknownError / ProposalTimeoutError / DriverStoppedError (it may or
        may not take effect). Safe to cancel (the outcome is then unknown).
        """
        self._check_running()
        if len(self._proposals) >= self.options.pending_proposals_max:
            raise ProposalDroppedError("too many pending proposals")
        index = self.node.propose(data)  # NotLeaderError, ProposalDroppedError
        waiter = _Waiter(term=self.node.term, done=trio.Event())
        self._proposals[index] = waiter
        self._wake()
        timeout = _timeout(timeout_seconds, self.options.proposal_timeout_seconds)
        return await self._wait(waiter, timeout, lambda: self._forget_proposal(index, waiter))

    def _forget_proposal(self, index: int, waiter: _Waiter) -> BaseException:
        if self._proposals.get(index) is waiter:
            del self._proposals[index]
        return ProposalTimeoutError(f"no outcome for the proposal at index {index}")

    async def propose_config_change(
        self, change: ConfigChange, *, timeout_seconds: float | None = None
    ) -> None:
        """Replicate a membership change and wait until it is applied (in force).

        The node takes one change at a time, so concurrent callers (several learners
        registering at once) wait in line, first come first served, at most
        `pending_config_changes_max` of them; a change the node refuses only because an
        earlier one (or the leader's no-op) is not applied yet is proposed again as soon as
        more entries are applied. The timeout covers the wait in line too.

        Raises what `propose` raises, ConfigChangeError, and ProposalDroppedError (it did
        not and will not take effect) when the line is full or the timeout passes before the
        change could be proposed. Safe to cancel (the outcome is then unknown).
        """
        self._check_running()
        if self._config_changes_pending >= self.options.pending_config_changes_max:
            raise ProposalDroppedError("too many pending configuration changes")
        timeout = _timeout(timeout_seconds, self.options.proposal_timeout_seconds)
        deadline = trio.current_time() + timeout
        self._config_changes_pending += 1
        try:
            acquired = False
            with trio.move_on_at(deadline):
                await self._config_change_lock.acquire()
                acquired = True  # no checkpoint between acquiring and this line
            if not acquired:
                raise ProposalDroppedError("timed out behind earlier configuration changes")
            try:
                index = await self._propose_config_change_in_turn(change, deadline)
                waiter = _Waiter(term=self.node.term, done=trio.Event())
                self._proposals[index] = waiter
                self._wake()
                remaining = max(deadline - trio.current_time(), 0.0)
                await self._wait(waiter, remaining, lambda: self._forget_proposal(index, waiter))
            finally:
                self._config_change_lock.release()
        finally:
            self._config_changes_pending -= 1

    async def _propose_config_change_in_turn(self, change: ConfigChange, deadline: float) -> int:
        """Propose `change`, retrying while the node still applies an earlier change."""
        while True:
            self._check_running()
            try:
                return self.node.propose_config_change(change)
            except ConfigChangeInProgressError:
                applied_more = self._applied_more
            with trio.move_on_at(deadline):
                await applied_more.wait()
            if not applied_more.is_set():
                raise ProposalDroppedError("an earlier configuration change was not applied")

    async def read(self, query: Callable[[], T], *, timeout_seconds: float | None = None) -> T:
        """Run `query` (a synchronous function reading the state machine) linearizably: after
        this node has applied everything committed when the read began. Returns its result.

        Raises NotLeaderError (no leader known), ProposalDroppedError (too many reads),
        ReadTimeoutError, DriverStoppedError. Safe to cancel.
        """
        self._check_running()
        if len(self._reads) + len(self._reads_awaiting_apply) >= self.options.pending_reads_max:
            raise ProposalDroppedError("too many pending reads")
        context = f"{self.node_id}:{next(self._read_counter)}".encode()
        try:
            self.node.read_index(context)
        except ProposalDroppedError as error:
            if self.node.leader == 0:
                raise NotLeaderError(0) from error
            raise
        waiter = _Waiter(done=trio.Event())
        self._reads[context] = waiter
        self._wake()
        timeout = _timeout(timeout_seconds, self.options.read_timeout_seconds)
        await self._wait(waiter, timeout, lambda: self._forget_read(context, waiter))
        return query()

    def _forget_read(self, context: bytes, waiter: _Waiter) -> BaseException:
        self._reads.pop(context, None)
        if waiter in self._reads_awaiting_apply:
            self._reads_awaiting_apply.remove(waiter)
        return ReadTimeoutError("the read could not be confirmed in time")

    async def _wait(
        self, waiter: _Waiter, timeout: float, forget: Callable[[], BaseException]
    ) -> object:
        """Wait for `waiter`; on timeout or cancellation `forget` it (raising its error)."""
        assert waiter.done is not None
        finished = False
        try:
            with trio.move_on_after(timeout):
                await waiter.done.wait()
            finished = waiter.done.is_set()
        finally:
            if not finished:
                timeout_error = forget()
        if not finished:
            raise timeout_error
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    def _check_running(self) -> None:
        if self._stopped or not self._running:
            raise DriverStoppedError("the raft driver is not running")

    # Leadership.

    def leadership(self) -> Leadership:
        """The term and leader as of the last Ready handled (leader 0: none known)."""
        return self._leadership

    async def wait_leadership_change(self, previous: Leadership) -> Leadership:
        """Return the current Leadership once it differs from `previous` (at once if it
        already does). Changes are not queued: a caller that comes back late gets the
        latest one, having skipped those in between. Raises DriverStoppedError once the
        driver has stopped. Safe to cancel (nothing is consumed)."""
        while True:
            if self._stopped:
                raise DriverStoppedError("the raft driver stopped")
            if self._leadership != previous:
                return self._leadership
            await self._leadership_changed.wait()

    # Pass-throughs the application needs.

    def campaign(self) -> None:
        """Start an election now (bootstrap, tests)."""
        self.node.campaign()
        self._wake()

    def transfer_leadership(self, target: int) -> None:
        """Raises NotLeaderError, RaftError."""
        self.node.transfer_leadership(target)
        self._wake()

    def statistics(self) -> DriverStatistics:
        return DriverStatistics(
            readies=self._readies,
            entries_persisted=self._entries_persisted,
            entries_applied=self._entries_applied,
            messages_sent=self._messages_sent,
            messages_dropped=self._messages_dropped,
            pending_proposals=len(self._proposals),
            pending_reads=len(self._reads) + len(self._reads_awaiting_apply),
            pending_config_changes=self._config_changes_pending,
            snapshots_taken=self._snapshots_taken,
            leadership_changes=self._leadership_changes,
        )


def coalesce_appends(
    messages: tuple[Message, ...], entries_max: int, bytes_max: int
) -> list[Message]:
    """Merge each APPEND into the previous message to the same target when that one is an
    APPEND the new one continues (same term; anchored at the previous one's last entry), up
    to `entries_max` entries and `bytes_max` entry bytes.

    The core sends one APPEND per proposal; under load a Ready holds many small ones per
    follower. Merged, the follower persists and acknowledges them once, and the leader's
    in-flight window is released by that one acknowledgement (it frees everything up to the
    acknowledged index). Messages to a target keep their order.
    """
    out: list[Message] = []
    last_to: dict[int, int] = {}  # target -> position in `out` of the last message to it
    for message in messages:
        position = last_to.get(message.target)
        if position is not None and message.type == MessageType.APPEND:
            merged = _merge_appends(out[position], message, entries_max, bytes_max)
            if merged is not None:
                out[position] = merged
                continue
        last_to[message.target] = len(out)
        out.append(message)
    return out


def _merge_appends(
    first: Message, second: Message, entries_max: int, bytes_max: int
) -> Message | None:
    if first.type != MessageType.APPEND or first.term != second.term:
        return None
    if first.entries:
        anchor_index, anchor_term = first.entries[-1].index, first.entries[-1].term
    else:
        anchor_index, anchor_term = first.index, first.log_term
    if second.index != anchor_index or second.log_term != anchor_term:
        return None
    entries = first.entries + second.entries
    if len(entries) > entries_max or sum(entry_bytes(entry) for entry in entries) > bytes_max:
        return None
    return dataclasses.replace(first, entries=entries, commit=max(first.commit, second.commit))


def _timeout(given: float | None, default: float) -> float:
    timeout = default if given is None else given
    return math.inf if timeout <= 0 else timeout
