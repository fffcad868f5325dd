"""RaftNode: the sans-I/O Raft state machine (etcd-io/raft's raft + RawNode).

Theory of operation. The node is driven by four kinds of input: tick() (logical time),
step(message) (a peer's message), the local requests (propose, propose_config_change,
read_index, transfer_leadership, campaign, compact) and advance(ready). It never does I/O;
every effect is collected and handed out by ready():

    ready = node.ready()
    persist ready.snapshot, ready.entries, ready.hard_state   (fsync if ready.must_sync)
    send ready.messages          # only now: they may promise what was just persisted
    apply ready.committed_entries; serve ready.read_states once applied >= index
    node.advance(ready)

Only one Ready is outstanding at a time. Messages in a Ready may depend on the entries and
hard state of the same Ready (a vote, an acknowledgement, a commit index), which is why
they are sent after persisting. The leader counts its own unpersisted entries towards the
commit index; that is safe because the commit is only acted upon (applied, or sent to
followers) after the Ready that carries those entries has been persisted.

Roles: FOLLOWER, PRE_CANDIDATE, CANDIDATE, LEADER; a learner is a FOLLOWER that is not a
voter of its configuration and so never campaigns. Pre-vote: a node whose election timer
fires first asks whether it *could* win (at term + 1) without changing any term; only if a
quorum says yes does it campaign for real, so a partitioned node cannot inflate terms.
Check-quorum: a leader that did not hear from a quorum within election_ticks steps down,
and a node that heard from a leader within election_ticks ignores (pre-)votes (leader
lease), except the forced ones that a leadership transfer causes.

Configuration changes (one voter or learner at a time): a CONFIG_CHANGE entry takes effect
on every node when the node hands it out in Ready.committed_entries (it is "applied" by the
core itself; the application only observes it). A leader allows one such entry to be
uncommitted/unapplied at a time, and none before its own no-op of the term is applied (the
single-server change fix from Ongaro's errata). A leader that is no longer a voter steps
down. A restarted node re-applies the CONFIG_CHANGE entries between its snapshot and its
commit index at construction, so its configuration is right before its first tick.
"""

from __future__ import annotations

import random as random_module
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .config import RaftConfig
from .log_storage import CompactedError, LogStorage
from .messages import (
    CAMPAIGN_TRANSFER,
    NO_NODE,
    ConfigChange,
    ConfigChangeKind,
    Configuration,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageType,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SoftState,
    decode_config_change,
    encode_config_change,
    entry_bytes,
)
from .progress import Progress, ProgressState, ProgressStatus, ProgressTracker, VoteResult
from .raft_log import RaftLog
from .read_only import ReadOnly, decode_round, encode_round


class RaftError(Exception):
    """A request to the node could not be carried out (an operating error)."""


class NotLeaderError(RaftError):
    """Only the leader accepts this request; `leader` is the known leader (0 if none)."""

    def __init__(self, leader: int) -> None:
        super().__init__(f"not the leader (leader is {leader or 'unknown'})")
        self.leader = leader


class ProposalDroppedError(RaftError):
    """The proposal (or read) was refused for now: leadership transfer in progress, too many
    uncommitted bytes or pending reads, an earlier config change still pending, no leader."""


class ProposalTooLargeError(ProposalDroppedError):
    """The entry can never be proposed: it is larger than max_append_bytes."""


class ConfigChangeInProgressError(ProposalDroppedError):
    """Retriable: an earlier configuration change (or the leader's no-op of this term) is
    not applied yet; the node takes one change at a time. Try again once more entries are
    applied (RaftDriver.propose_config_change does)."""


class ConfigChangeError(RaftError):
    """The configuration change is not allowed (e.g. removing the last voter)."""


_VOTE_RESPONSE = {
    MessageType.PRE_VOTE: MessageType.PRE_VOTE_RESPONSE,
    MessageType.VOTE: MessageType.VOTE_RESPONSE,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RaftStatus:
    node_id: int
    term: int
    vote: int
    commit: int
    applied: int
    last_index: int
    role: Role
    leader: int
    is_learner: bool
    configuration: Configuration
    lead_transferee: int
    progress: Mapping[int, ProgressStatus]  # per member, only on the leader (else empty)


class RaftNode:
    """One member of a Raft group. Not thread-safe; every method returns promptly."""

    def __init__(
        self, config: RaftConfig, storage: LogStorage, random: random_module.Random
    ) -> None:
        config.validate()
        self._config = config
        self._id = config.node_id
        self._random = random
        hard_state, configuration = storage.initial_state()
        self._log = RaftLog(storage)
        if hard_state.commit > self._log.last_index():
            raise RaftError(
                f"storage is damaged: commit index {hard_state.commit} is beyond the last "
                f"entry {self._log.last_index()} (committed entries were lost)"
            )
        self._log.committed = max(self._log.committed, hard_state.commit)
        self._term = hard_state.term
        self._vote = hard_state.vote
        self._leader = NO_NODE
        self._role = Role.FOLLOWER
        self._tracker = ProgressTracker(configuration, config.max_inflight_appends)
        start = self._log.first_index() - 1
        self._configuration_history: list[tuple[int, Configuration]] = [(start, configuration)]
        self._config_applied_index = start
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_election_timeout = config.election_ticks
        self._lead_transferee = NO_NODE
        self._pending_config_index = 0
        self._uncommitted_bytes = 0
        self._read_only = ReadOnly()
        self._reads_awaiting_commit: list[tuple[int, bytes]] = []
        self._outbox: list[Message] = []
        self._read_states: list[ReadState] = []
        self._outstanding: Ready | None = None
        self._apply_committed_config_changes()
        self._become_follower(self._term, NO_NODE)
        self._previous_soft_state = SoftState(leader=NO_NODE, role=Role.FOLLOWER)
        self._previous_hard_state = hard_state

    # -- observation ----------------------------------------------------------------------

    @property
    def node_id(self) -> int:
        return self._id

    @property
    def role(self) -> Role:
        return self._role

    @property
    def leader(self) -> int:
        return self._leader

    @property
    def term(self) -> int:
        return self._term

    @property
    def vote(self) -> int:
        return self._vote

    @property
    def commit_index(self) -> int:
        return self._log.committed

    @property
    def applied_index(self) -> int:
        return self._log.applied

    @property
    def last_index(self) -> int:
        return self._log.last_index()

    @property
    def configuration(self) -> Configuration:
        return self._tracker.configuration

    @property
    def is_learner(self) -> bool:
        return self._id in self._tracker.configuration.learners

    def status(self) -> RaftStatus:
        progress: dict[int, ProgressStatus] = {}
        if self._role == Role.LEADER:
            progress = {node: p.status() for node, p in self._tracker.progress.items()}
        return RaftStatus(
            node_id=self._id,
            term=self._term,
            vote=self._vote,
            commit=self._log.committed,
            applied=self._log.applied,
            last_index=self._log.last_index(),
            role=self._role,
            leader=self._leader,
            is_learner=self.is_learner,
            configuration=self._tracker.configuration,
            lead_transferee=self._lead_transferee,
            progress=progress,
        )

    def configuration_at(self, index: int) -> Configuration:
        """The configuration in force after applying the entry at index (index >= the
        snapshot's index and <= the last config-applied index)."""
        found = self._configuration_history[0][1]
        for applied_at, configuration in self._configuration_history:
            if applied_at > index:
                break
            found = configuration
        return found

    # -- local requests -------------------------------------------------------------------

    def tick(self) -> None:
        """Advance logical time by one tick."""
        if self._role == Role.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()

    def campaign(self) -> None:
        """Start an election now (pre-vote first if configured); a no-op for a leader, a
        learner or a node outside its configuration."""
        self._hup(transfer=False)

    def propose(self, data: bytes) -> int:
        """Append `data` as a NORMAL entry; returns its index (it is committed once it
        appears in a Ready's committed_entries with the same index and this term).
        Raises NotLeaderError, ProposalDroppedError, ProposalTooLargeError."""
        if self._role != Role.LEADER:
            raise NotLeaderError(self._leader)
        return self._propose(EntryKind.NORMAL, data)

    def propose_config_change(self, change: ConfigChange) -> int:
        """Propose one membership change; returns the entry's index. Raises NotLeaderError,
        ConfigChangeInProgressError (a ProposalDroppedError: an earlier change, or the
        leader's no-op of this term, is not applied yet), ProposalDroppedError (a transfer
        is in progress), ConfigChangeError."""
        if self._role != Role.LEADER:
            raise NotLeaderError(self._leader)
        if self._pending_config_index > self._log.applying:
            raise ConfigChangeInProgressError("an earlier configuration change is not applied yet")
        _check_config_change(self._tracker.configuration, change)
        index = self._propose(EntryKind.CONFIG_CHANGE, encode_config_change(change))
        self._pending_config_index = index
        return index

    def transfer_leadership(self, target: int) -> None:
        """Hand leadership to voter `target` once its log is caught up (TIMEOUT_NOW).
        Proposals are dropped meanwhile; the transfer aborts after election_ticks.
        Raises NotLeaderError, or RaftError if target is not a voter."""
        if self._role != Role.LEADER:
            raise NotLeaderError(self._leader)
        if target not in self._tracker.configuration.voters:
            raise RaftError(f"cannot transfer leadership to {target}: not a voter")
        if self._lead_transferee == target:
            return
        self._lead_transferee = NO_NODE
        if target == self._id:
            return
        self._election_elapsed = 0
        self._lead_transferee = target
        if self._tracker.progress[target].match == self._log.last_index():
            self._send(MessageType.TIMEOUT_NOW, target)
        else:
            self._send_append(target)

    def read_index(self, request_context: bytes) -> None:
        """Request a linearizable read; ReadState(index, request_context) appears in a later
        Ready (never, if leadership is lost meanwhile: the caller times out). A follower
        forwards the request to its leader. Raises ProposalDroppedError when no leader is
        known or too many reads are pending."""
        if self._role == Role.LEADER:
            if not self._leader_read_index(self._id, request_context):
                raise ProposalDroppedError("too many pending reads")
        elif self._leader != NO_NODE:
            message = Message(
                type=MessageType.READ_INDEX,
                source=self._id,
                target=self._leader,
                term=0,
                context=request_context,
            )
            self._outbox.append(message)
        else:
            raise ProposalDroppedError("no leader known")

    def report_unreachable(self, node_id: int) -> None:
        """The driver could not send to node_id: stop streaming to it and probe instead."""
        progress = self._leader_progress(node_id)
        if progress is not None and progress.state == ProgressState.REPLICATE:
            progress.become_probe()

    def report_snapshot(self, node_id: int, success: bool) -> None:
        """The driver finished sending a SNAPSHOT to node_id (success: it was delivered)."""
        progress = self._leader_progress(node_id)
        if progress is None or progress.state != ProgressState.SNAPSHOT:
            return
        if not success:
            progress.pending_snapshot = 0
        progress.become_probe()
        progress.probe_sent = True  # wait for its response (or a heartbeat round)

    def compact(self, index: int, data: bytes) -> None:
        """The application's snapshot `data` of its state at `index` (<= applied_index):
        asks storage to create_snapshot(index, configuration_at(index), data), then to
        compact(index). A no-op if storage already has a snapshot at or after index.
        Raises ValueError if index > applied_index. Runs synchronously."""
        if index > self._log.applied:
            raise ValueError(f"cannot snapshot at {index}: only {self._log.applied} applied")
        storage = self._log.storage
        if index <= storage.snapshot().index or self._log.has_pending_snapshot():
            return
        storage.create_snapshot(index, self.configuration_at(index), data)
        storage.compact(index)
        while len(self._configuration_history) > 1 and self._configuration_history[1][0] <= index:
            del self._configuration_history[0]

    # -- Ready / advance ------------------------------------------------------------------

    def has_ready(self) -> bool:
        """Whether ready() has anything to hand out (False while a Ready is outstanding)."""
        if self._outstanding is not None:
            return False
        return bool(
            self._outbox
            or self._read_states
            or self._log.unstable.entries
            or self._log.has_pending_snapshot()
            or self._log.has_next_committed()
            or self._read_only.has_unsent()
            or self._soft_state() != self._previous_soft_state
            or self._hard_state() != self._previous_hard_state
        )

    def ready(self) -> Ready:
        """Everything to persist, send and apply now; call advance(ready) when done."""
        assert self._outstanding is None, "advance() the previous Ready first"
        if self._read_only.has_unsent():
            self._read_only.start_round()
            self._broadcast_heartbeat()
        committed = self._log.next_committed(self._config.max_committed_bytes_per_ready)
        if committed:
            self._log.applying = committed[-1].index
            self._hand_out(committed)
        soft_state = self._soft_state()
        hard_state = self._hard_state()
        entries = self._log.unstable_entries()
        snapshot = self._log.unstable.snapshot
        previous = self._previous_hard_state
        ready = Ready(
            soft_state=None if soft_state == self._previous_soft_state else soft_state,
            hard_state=None if hard_state == previous else hard_state,
            snapshot=snapshot,
            entries=entries,
            messages=tuple(self._outbox),
            committed_entries=tuple(committed),
            read_states=tuple(self._read_states),
            must_sync=bool(entries)
            or snapshot is not None
            or hard_state.term != previous.term
            or hard_state.vote != previous.vote,
        )
        self._outbox = []
        self._read_states = []
        self._previous_soft_state = soft_state
        self._previous_hard_state = hard_state
        self._outstanding = ready
        return ready

    def advance(self, ready: Ready) -> None:
        """The driver persisted, sent and applied everything in `ready`."""
        assert ready is self._outstanding, "advance() takes the last Ready"
        self._outstanding = None
        if ready.snapshot is not None:
            self._log.unstable.stable_snapshot_to(ready.snapshot.index)
            self._log.applied = max(self._log.applied, ready.snapshot.index)
        if ready.entries:
            last = ready.entries[-1]
            self._log.unstable.stable_to(last.index, last.term)
        if ready.committed_entries:
            self._log.applied = max(self._log.applied, ready.committed_entries[-1].index)

    def _soft_state(self) -> SoftState:
        return SoftState(leader=self._leader, role=self._role)

    def _hard_state(self) -> HardState:
        return HardState(term=self._term, vote=self._vote, commit=self._log.committed)

    def _hand_out(self, committed: list[Entry]) -> None:
        if self._role == Role.LEADER:
            released = sum(len(entry.data) for entry in committed)
            self._uncommitted_bytes = max(0, self._uncommitted_bytes - released)
        for entry in committed:
            if entry.kind == EntryKind.CONFIG_CHANGE and entry.index > self._config_applied_index:
                self._apply_config_change(entry)

    # -- timers and elections -------------------------------------------------------------

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._promotable() and self._election_elapsed >= self._randomized_election_timeout:
            self._election_elapsed = 0
            self._hup(transfer=False)

    def _tick_heartbeat(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self._config.election_ticks:
            self._election_elapsed = 0
            if self._config.check_quorum and not self._tracker.quorum_active(self._id):
                self._become_follower(self._term, NO_NODE)
                return
            self._lead_transferee = NO_NODE  # a transfer that took this long is abandoned
        if self._heartbeat_elapsed >= self._config.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat()

    def _promotable(self) -> bool:
        return (
            self._id in self._tracker.configuration.voters and not self._log.has_pending_snapshot()
        )

    def _hup(self, *, transfer: bool) -> None:
        if self._role == Role.LEADER or not self._promotable():
            return
        if self._has_unapplied_config_change():
            return  # campaigning on a stale configuration could elect a second leader
        if self._config.pre_vote and not transfer:
            self._campaign(pre_vote=True, transfer=False)
        else:
            self._campaign(pre_vote=False, transfer=transfer)

    def _has_unapplied_config_change(self) -> bool:
        try:
            return any(
                entry.kind == EntryKind.CONFIG_CHANGE
                for entry in self._committed_entries_from(
                    max(self._log.applying, self._config_applied_index) + 1
                )
            )
        except CompactedError:
            return True  # cannot tell: be safe

    def _committed_entries_from(self, low: int) -> Iterator[Entry]:
        """Committed entries from low on, read in pages of bounded size."""
        while low <= self._log.committed:
            page = self._log.slice(
                low, self._log.committed + 1, self._config.max_committed_bytes_per_ready
            )
            yield from page
            low = page[-1].index + 1

    def _campaign(self, *, pre_vote: bool, transfer: bool) -> None:
        if pre_vote:
            self._become_pre_candidate()
            vote_type, term = MessageType.PRE_VOTE, self._term + 1
        else:
            self._become_candidate()
            vote_type, term = MessageType.VOTE, self._term
        self._tracker.record_vote(self._id, True)
        if self._tracker.vote_result() == VoteResult.WON:
            self._won_election(pre_vote)
            return
        last_index = self._log.last_index()
        last_term = self._log.last_term()
        for voter in sorted(self._tracker.configuration.voters):
            if voter != self._id:
                self._send(
                    vote_type,
                    voter,
                    term=term,
                    index=last_index,
                    log_term=last_term,
                    context=CAMPAIGN_TRANSFER if transfer else b"",
                )

    def _won_election(self, pre_vote: bool) -> None:
        if not self._promotable():
            self._become_follower(self._term, NO_NODE)  # our configuration changed meanwhile
        elif pre_vote:
            self._campaign(pre_vote=False, transfer=False)
        else:
            self._become_leader()
            self._broadcast_append()

    # -- role transitions -----------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self._term:
            self._term = term
            self._vote = NO_NODE
        self._leader = NO_NODE
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_election_timeout = self._config.election_ticks + self._random.randrange(
            self._config.election_ticks
        )
        self._lead_transferee = NO_NODE
        self._tracker.reset_votes()
        last_index = self._log.last_index()
        for node, progress in self._tracker.progress.items():
            fresh = Progress(
                next_index=last_index + 1,
                max_inflight=self._config.max_inflight_appends,
                is_learner=progress.is_learner,
            )
            if node == self._id:
                fresh.match = last_index
            self._tracker.progress[node] = fresh
        self._pending_config_index = 0
        self._uncommitted_bytes = 0
        self._read_only.reset()
        self._reads_awaiting_commit = []

    def _become_follower(self, term: int, leader: int) -> None:
        self._reset(term)
        self._role = Role.FOLLOWER
        self._leader = leader

    def _become_pre_candidate(self) -> None:
        assert self._role != Role.LEADER, "a leader does not campaign"
        # Neither the term nor the vote changes: a pre-vote is only a question.
        self._tracker.reset_votes()
        self._role = Role.PRE_CANDIDATE
        self._leader = NO_NODE

    def _become_candidate(self) -> None:
        assert self._role != Role.LEADER, "a leader does not campaign"
        self._reset(self._term + 1)
        self._vote = self._id
        self._role = Role.CANDIDATE

    def _become_leader(self) -> None:
        assert self._role == Role.CANDIDATE, "only a candidate becomes leader"
        self._reset(self._term)
        self._role = Role.LEADER
        self._leader = self._id
        own = self._tracker.progress[self._id]
        own.become_replicate()
        own.recent_active = True
        # The no-op commits every earlier-term entry (they are only committed by counting
        # through an entry of the current term) and gates config changes and reads.
        items = [(EntryKind.NORMAL, b"")]
        if self._log.last_index() == 0:
            items += _bootstrap_changes(self._tracker.configuration)
        self._pending_config_index = self._append(items)

    # -- configuration --------------------------------------------------------------------

    def _apply_committed_config_changes(self) -> None:
        """At start-up, re-apply the committed CONFIG_CHANGE entries after the snapshot."""
        for entry in self._committed_entries_from(self._log.first_index()):
            if entry.kind == EntryKind.CONFIG_CHANGE:
                self._apply_config_change(entry)

    def _apply_config_change(self, entry: Entry) -> None:
        change = decode_config_change(entry.data)
        configuration = self._tracker.configuration.apply(change)
        self._config_applied_index = entry.index
        self._configuration_history.append((entry.index, configuration))
        added = self._tracker.set_configuration(
            configuration, next_index=self._log.last_index() + 1
        )
        if self._role != Role.LEADER:
            return
        if self._id not in configuration.voters:
            self._become_follower(self._term, NO_NODE)
            return
        if self._lead_transferee not in configuration.voters:
            self._lead_transferee = NO_NODE
        if self._maybe_commit():
            self._broadcast_append()
        for node in added:
            if node != self._id:
                self._send_append(node)

    def _restore(self, snapshot: Snapshot) -> bool:
        """Install a leader's snapshot; False if it is not newer than what we have."""
        if snapshot.index <= self._log.committed:
            return False
        if self._log.match_term(snapshot.index, snapshot.term):
            self._log.commit_to(snapshot.index)  # we have that entry: just fast-forward
            return False
        self._log.restore(snapshot)
        configuration = snapshot.configuration
        self._configuration_history = [(snapshot.index, configuration)]
        self._config_applied_index = snapshot.index
        self._tracker.set_configuration(configuration, next_index=self._log.last_index() + 1)
        return True

    # -- proposals ------------------------------------------------------------------------

    def _propose(self, kind: EntryKind, data: bytes) -> int:
        if self._lead_transferee != NO_NODE:
            raise ProposalDroppedError("leadership transfer in progress")
        if entry_bytes(Entry(term=0, index=0, data=data)) > self._config.max_append_bytes:
            raise ProposalTooLargeError(f"entry of {len(data)} bytes exceeds max_append_bytes")
        size = len(data)
        if self._uncommitted_bytes and self._uncommitted_bytes + size > (
            self._config.max_uncommitted_bytes
        ):
            raise ProposalDroppedError("too many uncommitted bytes")
        self._uncommitted_bytes += size
        index = self._append([(kind, data)])
        self._broadcast_append()
        return index

    def _append(self, items: list[tuple[EntryKind, bytes]]) -> int:
        first = self._log.last_index() + 1
        entries = [
            Entry(term=self._term, index=first + offset, kind=kind, data=data)
            for offset, (kind, data) in enumerate(items)
        ]
        last = self._log.append(entries)
        self._tracker.progress[self._id].maybe_update(last)
        self._maybe_commit()
        return last

    def _maybe_commit(self) -> bool:
        if not self._log.maybe_commit(self._tracker.committed_index(), self._term):
            return False
        self._release_reads_awaiting_commit()
        return True

    # -- messages in ----------------------------------------------------------------------

    def step(self, message: Message) -> None:
        """Handle a message from a peer. Messages for another node, or from an old term
        (other than the few that need an answer), are ignored."""
        if message.target != self._id or message.source == self._id:
            return
        if not self._step_term(message):
            return
        if message.type in _VOTE_RESPONSE:
            self._handle_vote_request(message)
        elif self._role == Role.LEADER:
            self._step_leader(message)
        elif self._role == Role.FOLLOWER:
            self._step_follower(message)
        else:
            self._step_candidate(message)

    def _step_term(self, message: Message) -> bool:
        """Apply the term rules; returns whether the message should be handled further."""
        if message.term == 0:
            return True  # READ_INDEX and PROPOSE carry no term
        if message.term > self._term:
            if message.type in _VOTE_RESPONSE:
                forced = message.context == CAMPAIGN_TRANSFER
                in_lease = (
                    self._config.check_quorum
                    and self._leader != NO_NODE
                    and self._election_elapsed < self._config.election_ticks
                )
                if in_lease and not forced:
                    return False  # we heard from a leader recently: do not be disrupted
            if message.type == MessageType.PRE_VOTE:
                return True  # a question about the future: our term does not change
            if message.type == MessageType.PRE_VOTE_RESPONSE and not message.reject:
                return True  # granted for term + 1; we move there once a quorum agrees
            leader = NO_NODE
            if message.type in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
                leader = message.source
            self._become_follower(message.term, leader)
            return True
        if message.term < self._term:
            self._answer_stale(message)
            return False
        return True

    def _answer_stale(self, message: Message) -> None:
        if message.type in (MessageType.APPEND, MessageType.HEARTBEAT) and (
            self._config.check_quorum or self._config.pre_vote
        ):
            # Tell a deposed leader (or a node partitioned away) about our newer term, so
            # it steps down instead of being stuck (etcd #5451/#8501).
            self._send(MessageType.APPEND_RESPONSE, message.source)
        elif message.type == MessageType.PRE_VOTE:
            self._send(MessageType.PRE_VOTE_RESPONSE, message.source, reject=True)

    def _handle_vote_request(self, message: Message) -> None:
        can_vote = (
            self._vote == message.source
            or (self._vote == NO_NODE and self._leader == NO_NODE)
            or (message.type == MessageType.PRE_VOTE and message.term > self._term)
        )
        response = _VOTE_RESPONSE[message.type]
        if can_vote and self._log.is_up_to_date(message.index, message.log_term):
            self._send(response, message.source, term=message.term)
            if message.type == MessageType.VOTE:
                self._election_elapsed = 0
                self._vote = message.source
        else:
            self._send(response, message.source, reject=True)

    def _step_follower(self, message: Message) -> None:
        kind = message.type
        if kind in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
            self._election_elapsed = 0
            self._leader = message.source
            self._handle_from_leader(message)
        elif kind == MessageType.TIMEOUT_NOW:
            self._hup(transfer=True)
        elif kind == MessageType.READ_INDEX_RESPONSE:
            self._read_states.append(
                ReadState(index=message.index, request_context=message.context)
            )

    def _step_candidate(self, message: Message) -> None:
        kind = message.type
        if kind in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
            self._become_follower(message.term, message.source)
            self._handle_from_leader(message)
            return
        pre_vote = self._role == Role.PRE_CANDIDATE
        expected = MessageType.PRE_VOTE_RESPONSE if pre_vote else MessageType.VOTE_RESPONSE
        if kind != expected:
            return
        self._tracker.record_vote(message.source, not message.reject)
        result = self._tracker.vote_result()
        if result == VoteResult.WON:
            self._won_election(pre_vote)
        elif result == VoteResult.LOST:
            self._become_follower(self._term, NO_NODE)

    def _handle_from_leader(self, message: Message) -> None:
        if message.type == MessageType.APPEND:
            self._handle_append(message)
        elif message.type == MessageType.HEARTBEAT:
            if message.commit <= self._log.last_index():
                self._log.commit_to(message.commit)
            self._send(
                MessageType.HEARTBEAT_RESPONSE,
                message.source,
                commit=self._log.committed,
                context=message.context,
            )
        else:
            assert message.snapshot is not None
            restored = self._restore(message.snapshot)
            index = self._log.last_index() if restored else self._log.committed
            self._send(MessageType.APPEND_RESPONSE, message.source, index=index)

    def _handle_append(self, message: Message) -> None:
        log = self._log
        if message.index < log.committed:
            self._send(MessageType.APPEND_RESPONSE, message.source, index=log.committed)
            return
        last_new = log.maybe_append(
            message.index, message.log_term, message.commit, message.entries
        )
        if last_new is not None:
            self._send(MessageType.APPEND_RESPONSE, message.source, index=last_new)
            return
        # Our log does not contain (index, log_term). Hint the largest (index, term) of ours
        # that could match: the leader's terms before message.index are <= log_term, so
        # none of our entries with a greater term can match.
        hint_index = min(message.index, log.last_index())
        hint_index, hint_term = log.find_conflict_by_term(hint_index, message.log_term)
        self._send(
            MessageType.APPEND_RESPONSE,
            message.source,
            index=message.index,
            reject=True,
            reject_hint=hint_index,
            log_term=hint_term,
        )

    # -- leader ---------------------------------------------------------------------------

    def _step_leader(self, message: Message) -> None:
        kind = message.type
        if kind == MessageType.READ_INDEX:
            self._leader_read_index(message.source, message.context)
            return
        if kind == MessageType.PROPOSE:
            for entry in message.entries:
                if entry.kind != EntryKind.NORMAL:
                    break  # config changes must go through propose_config_change
                try:
                    self._propose(EntryKind.NORMAL, entry.data)
                except RaftError:
                    break
            return
        progress = self._tracker.progress.get(message.source)
        if progress is None:
            return
        if kind == MessageType.APPEND_RESPONSE:
            if message.index > self._log.last_index():
                return  # acknowledges entries we never had: not from a correct peer
            progress.recent_active = True
            if message.reject:
                self._handle_append_rejection(message, progress)
            else:
                self._handle_append_success(message, progress)
        elif kind == MessageType.HEARTBEAT_RESPONSE:
            self._handle_heartbeat_response(message, progress)

    def _handle_append_rejection(self, message: Message, progress: Progress) -> None:
        next_probe = message.reject_hint
        if message.log_term > 0:
            # Skip every index where our term exceeds the follower's term at the hint: no
            # probe there can succeed (terms only grow along a log).
            next_probe, _ = self._log.find_conflict_by_term(message.reject_hint, message.log_term)
        if progress.maybe_decrease_to(message.index, next_probe):
            if progress.state == ProgressState.REPLICATE:
                progress.become_probe()
            self._send_append(message.source)

    def _handle_append_success(self, message: Message, progress: Progress) -> None:
        source = message.source
        was_paused = progress.is_paused()
        updated = progress.maybe_update(message.index)
        reprobed = progress.match == message.index and progress.state == ProgressState.PROBE
        if not updated and not reprobed:
            return
        if progress.state == ProgressState.PROBE:
            progress.become_replicate()
        elif (
            progress.state == ProgressState.SNAPSHOT
            and progress.match + 1 >= self._log.first_index()
        ):
            progress.become_probe()
            progress.become_replicate()
        elif progress.state == ProgressState.REPLICATE:
            progress.inflights.free_le(message.index)
        if self._maybe_commit():
            self._broadcast_append()
        elif was_paused:
            self._send_append(source)
        while self._send_append(source, send_if_empty=False):
            pass
        if source == self._lead_transferee and progress.match == self._log.last_index():
            self._send(MessageType.TIMEOUT_NOW, source)

    def _handle_heartbeat_response(self, message: Message, progress: Progress) -> None:
        progress.recent_active = True
        progress.probe_sent = False
        if progress.state == ProgressState.SNAPSHOT and message.commit >= progress.pending_snapshot:
            # The follower installed the snapshot but its answer was lost (and the driver
            # did not report_snapshot): resume probing from after the snapshot.
            progress.become_probe()
        if progress.state == ProgressState.REPLICATE and progress.inflights.full():
            progress.inflights.free_first_one()  # let one APPEND through to unstick a loss
        if progress.match < self._log.last_index() or progress.state == ProgressState.PROBE:
            self._send_append(message.source)
        round_number = decode_round(message.context)
        if round_number and message.source in self._tracker.configuration.voters:
            self._read_only.acknowledge(message.source, round_number)
            self._release_confirmed_reads()

    def _leader_progress(self, node_id: int) -> Progress | None:
        if self._role != Role.LEADER or node_id == self._id:
            return None
        return self._tracker.progress.get(node_id)

    # -- messages out ---------------------------------------------------------------------

    def _send(
        self, kind: MessageType, target: int, *, term: int | None = None, **fields: Any
    ) -> None:
        self._outbox.append(
            Message(
                type=kind,
                source=self._id,
                target=target,
                term=self._term if term is None else term,
                **fields,
            )
        )

    def _send_append(self, target: int, *, send_if_empty: bool = True) -> bool:
        """Send the next APPEND (or a SNAPSHOT) to target unless its flow is paused."""
        progress = self._tracker.progress[target]
        if progress.is_paused():
            return False
        previous_index = progress.next - 1
        try:
            previous_term = self._log.term(previous_index)
            entries: list[Entry] = []
            if progress.next <= self._log.last_index():
                entries = self._log.entries_from(
                    progress.next, self._config.max_append_bytes, self._config.max_append_entries
                )
        except CompactedError:
            return self._send_snapshot(target, progress)
        if not entries and not send_if_empty:
            return False
        self._send(
            MessageType.APPEND,
            target,
            index=previous_index,
            log_term=previous_term,
            entries=tuple(entries),
            commit=self._log.committed,
        )
        progress.sent_entries(len(entries), entries[-1].index if entries else previous_index)
        return True

    def _send_snapshot(self, target: int, progress: Progress) -> bool:
        if not progress.recent_active:
            return False  # do not ship a snapshot to a node that may be down
        snapshot = self._log.snapshot()
        assert snapshot.index > 0, "entries were compacted without a snapshot"
        progress.become_snapshot(snapshot.index)
        self._send(MessageType.SNAPSHOT, target, snapshot=snapshot)
        return True

    def _broadcast_append(self) -> None:
        for node in sorted(self._tracker.progress):
            if node != self._id:
                self._send_append(node)

    def _broadcast_heartbeat(self) -> None:
        context = encode_round(self._read_only.round) if self._read_only.round else b""
        for node in sorted(self._tracker.progress):
            if node != self._id:
                commit = min(self._tracker.progress[node].match, self._log.committed)
                self._send(MessageType.HEARTBEAT, node, commit=commit, context=context)

    # -- linearizable reads ---------------------------------------------------------------

    def _leader_read_index(self, requester: int, context: bytes) -> bool:
        """Queue a read for confirmation; False if too many reads are pending."""
        pending = len(self._read_only) + len(self._reads_awaiting_commit)
        if pending >= self._config.max_pending_reads:
            return False
        if not self._committed_in_term():
            # The commit index may lag what an earlier leader committed until our no-op
            # commits; answering now could return a stale index.
            self._reads_awaiting_commit.append((requester, context))
        elif self._tracker.configuration.voters == {self._id}:
            self._answer_read(requester, self._log.committed, context)
        else:
            self._read_only.add(self._log.committed, requester, context)
        return True

    def _committed_in_term(self) -> bool:
        return self._log.term_or_zero(self._log.committed) == self._term

    def _release_reads_awaiting_commit(self) -> None:
        if not self._reads_awaiting_commit or not self._committed_in_term():
            return
        waiting, self._reads_awaiting_commit = self._reads_awaiting_commit, []
        for requester, context in waiting:
            self._leader_read_index(requester, context)

    def _release_confirmed_reads(self) -> None:
        voters = self._tracker.configuration.voters
        for request in self._read_only.confirmed(voters, self._id):
            self._answer_read(request.requester, request.index, request.context)

    def _answer_read(self, requester: int, index: int, context: bytes) -> None:
        if requester == self._id:
            self._read_states.append(ReadState(index=index, request_context=context))
        else:
            self._send(MessageType.READ_INDEX_RESPONSE, requester, index=index, context=context)


def _bootstrap_changes(configuration: Configuration) -> list[tuple[EntryKind, bytes]]:
    """The bootstrap configuration as CONFIG_CHANGE entries (no-ops for the nodes that
    started with it), so that a node joining later with an empty configuration rebuilds it
    from the log instead of wrongly applying later changes to an empty set."""
    changes = [
        ConfigChange(kind=ConfigChangeKind.ADD_VOTER, node_id=node)
        for node in sorted(configuration.voters)
    ]
    changes += [
        ConfigChange(kind=ConfigChangeKind.ADD_LEARNER, node_id=node)
        for node in sorted(configuration.learners)
    ]
    return [(EntryKind.CONFIG_CHANGE, encode_config_change(change)) for change in changes]


def _check_config_change(configuration: Configuration, change: ConfigChange) -> None:
    node = change.node_id
    if node <= 0:
        raise ConfigChangeError("node ids are positive")
    if change.kind == ConfigChangeKind.REMOVE_VOTER and configuration.voters == {node}:
        raise ConfigChangeError("cannot remove the last voter")
    if change.kind == ConfigChangeKind.ADD_LEARNER and node in configuration.voters:
        raise ConfigChangeError("a voter becomes a learner by REMOVE_VOTER, then ADD_LEARNER")
