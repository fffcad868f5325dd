"""What a leader knows about each follower, and quorum arithmetic over a configuration.

Theory of operation (etcd's tracker). A follower's progress is in one of three states:
- PROBE: we do not know where its log ends; send one APPEND per heartbeat interval (or per
  response) and move `next` back on rejection, guided by the follower's hint.
- REPLICATE: its log is known to match up to `match`; stream APPENDs optimistically
  (`next` runs ahead of `match`), at most max_inflight_appends unacknowledged.
- SNAPSHOT: it needs entries we compacted; a SNAPSHOT is on its way, send nothing else.
Learners have a progress too but are never counted in a quorum.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass

from .messages import Configuration


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressStatus:
    """A frozen copy of one peer's progress, for RaftNode.status()."""

    match: int
    next: int
    state: ProgressState
    recent_active: bool
    paused: bool
    inflight_appends: int
    is_learner: bool


class Inflights:
    """Last indexes of unacknowledged APPENDs to one follower, oldest first, bounded."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._last_indexes: collections.deque[int] = collections.deque()

    def __len__(self) -> int:
        return len(self._last_indexes)

    def full(self) -> bool:
        return len(self._last_indexes) >= self.capacity

    def add(self, last_index: int) -> None:
        assert not self.full(), "inflights overflow"
        self._last_indexes.append(last_index)

    def free_le(self, index: int) -> None:
        while self._last_indexes and self._last_indexes[0] <= index:
            self._last_indexes.popleft()

    def free_first_one(self) -> None:
        if self._last_indexes:
            self._last_indexes.popleft()

    def reset(self) -> None:
        self._last_indexes.clear()


class Progress:
    def __init__(self, *, next_index: int, max_inflight: int, is_learner: bool) -> None:
        self.match = 0
        self.next = next_index  # invariant: match < next
        self.state = ProgressState.PROBE
        self.pending_snapshot = 0
        self.recent_active = False
        self.probe_sent = False  # flow paused until a response or heartbeat response
        self.inflights = Inflights(max_inflight)
        self.is_learner = is_learner

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index
        self.next = snapshot_index + 1

    def sent_entries(self, count: int, last_index: int) -> None:
        """An APPEND with `count` entries ending at last_index went out."""
        if self.state == ProgressState.REPLICATE:
            if count:
                self.next = last_index + 1
                self.inflights.add(last_index)
        elif self.state == ProgressState.PROBE:
            self.probe_sent = True
        else:
            raise AssertionError(f"sending entries in state {self.state}")

    def maybe_update(self, index: int) -> bool:
        """The follower acknowledged up to index; False if that is old news."""
        if index <= self.match:
            return False
        self.match = index
        self.next = max(self.next, index + 1)
        self.probe_sent = False
        return True

    def maybe_decrease_to(self, rejected: int, match_hint: int) -> bool:
        """The follower rejected an APPEND anchored at `rejected`; False if that is stale."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        if rejected <= self.match:
            # The follower refused the entry at `match`, which it had acknowledged: its disk
            # lost acknowledged entries (fsync lied, a restore, a replaced disk). Keeping
            # `match` would pin `next` at match + 1 and resend this probe forever; forget it
            # (0 is the only index sure to match) and probe down from the hint. A stale
            # duplicate of an old rejection can land here too: it costs one extra probe.
            self.match = 0
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return self.inflights.full()
        return True

    def status(self) -> ProgressStatus:
        return ProgressStatus(
            match=self.match,
            next=self.next,
            state=self.state,
            recent_active=self.recent_active,
            paused=self.is_paused(),
            inflight_appends=len(self.inflights),
            is_learner=self.is_learner,
        )


class VoteResult(enum.Enum):
    PENDING = "pending"
    WON = "won"
    LOST = "lost"


class ProgressTracker:
    """The configuration in force, a Progress per member, and the votes of an election."""

    def __init__(self, configuration: Configuration, max_inflight: int) -> None:
        self.configuration = configuration
        self.max_inflight = max_inflight
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self.set_configuration(configuration, next_index=1)

    def quorum(self) -> int:
        return len(self.configuration.voters) // 2 + 1

    def set_configuration(self, configuration: Configuration, *, next_index: int) -> list[int]:
        """Switch to `configuration`, keeping the progress of members that stay.

        New members start probing at next_index and count as recently active (so a
        check-quorum right after the change does not depose the leader). Returns the ids of
        the new members."""
        self.configuration = configuration
        added = []
        for node in list(self.progress):
            if node not in configuration.members:
                del self.progress[node]
        for node in configuration.members:
            is_learner = node in configuration.learners
            progress = self.progress.get(node)
            if progress is None:
                progress = Progress(
                    next_index=next_index, max_inflight=self.max_inflight, is_learner=is_learner
                )
                progress.recent_active = True
                self.progress[node] = progress
                added.append(node)
            progress.is_learner = is_learner
        return added

    def committed_index(self) -> int:
        """The largest index replicated on a quorum of voters (0 without voters)."""
        voters = self.configuration.voters
        if not voters:
            return 0
        matches = sorted((self.progress[node].match for node in voters), reverse=True)
        return matches[self.quorum() - 1]

    def record_vote(self, node: int, granted: bool) -> None:
        self.votes.setdefault(node, granted)

    def reset_votes(self) -> None:
        self.votes = {}

    def vote_result(self) -> VoteResult:
        voters = self.configuration.voters
        granted = sum(1 for node in voters if self.votes.get(node) is True)
        rejected = sum(1 for node in voters if self.votes.get(node) is False)
        if voters and granted >= self.quorum():
            return VoteResult.WON
        if len(voters) - rejected < self.quorum():
            return VoteResult.LOST
        return VoteResult.PENDING

    def quorum_active(self, self_id: int) -> bool:
        """Whether a quorum of voters was recently active; clears the flags for the next
        round (our own stays set)."""
        active = 0
        for node in self.configuration.voters:
            progress = self.progress[node]
            if node == self_id or progress.recent_active:
                active += 1
        for node, progress in self.progress.items():
            progress.recent_active = node == self_id
        return active >= self.quorum()
