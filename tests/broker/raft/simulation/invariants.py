"""Safety invariants of a simulated Raft cluster, checked as it runs (a DriverObserver).

- Election safety: at most one leader per term.
- Log matching: an (index, term) names one entry (same kind and data) and one previous term,
  so two logs that agree at an index agree on every entry before it. Checked on every entry
  a node persists.
- Leader completeness: an entry committed in term T is in the log of every leader of a term
  greater than T. Commit terms are observed when a node hands out a Ready (before any of its
  messages can tell a follower about the new commit index); each leader's log is checked once
  it has persisted its first Ready of the term, and again whenever an older commit is seen.
- State machine safety: every index is applied with one entry everywhere, each node applies
  indexes in order without gaps (a snapshot jumps ahead), nothing is applied before it was
  observed committed, and snapshots equal a replay of the applied entries.
- The commit index of a running node never goes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from broker.raft.driver import RaftDriver
from broker.raft.kv_demo import KeyValueStore
from broker.raft.log_storage import CompactedError, UnavailableError
from broker.raft.messages import Entry, EntryKind, Ready, Role, Snapshot


LIVELOCK_EVENTS_MAX = 20_000


class InvariantViolation(AssertionError):
    """A safety property of Raft does not hold."""


@dataclass(slots=True)
class _NodeRecord:
    node_id: int
    commit: int = 0
    applied: int = 0
    checked_leader_terms: set[int] = field(default_factory=set)


class InvariantChecker:
    def __init__(self) -> None:
        self.leaders_by_term: dict[int, int] = {}
        self.commit_terms: dict[int, tuple[int, int]] = {}  # index -> (entry term, commit term)
        self.committed_max = 0
        self.entries_by_id: dict[tuple[int, int], tuple[EntryKind, bytes, int | None]] = {}
        self.applied_entries: dict[int, Entry] = {}
        self.applied_max = 0
        self._snapshots_by_index: dict[int, bytes] = {}
        self._records: dict[int, _NodeRecord] = {}  # by id(driver): one per incarnation
        self._drivers: dict[int, RaftDriver] = {}
        self.events = 0
        self._event_time = -1.0
        self._events_at_time = 0

    def _count_event(self) -> None:
        """Fail a run that livelocks: many Readies while virtual time stands still (a
        message storm that needs no timer) would otherwise never end."""
        self.events += 1
        now = trio.current_time()
        if now != self._event_time:
            self._event_time = now
            self._events_at_time = 0
        self._events_at_time += 1
        if self._events_at_time > LIVELOCK_EVENTS_MAX:
            raise InvariantViolation(
                f"livelock: {LIVELOCK_EVENTS_MAX} Readies at time {now} without time passing"
            )

    def _record(self, driver: RaftDriver) -> _NodeRecord:
        record = self._records.get(id(driver))
        if record is None:
            record = _NodeRecord(driver.node_id, applied=driver.storage.snapshot().index)
            record.commit = driver.node.commit_index
            self._records[id(driver)] = record
            self._drivers[id(driver)] = driver
        return record

    def forget(self, driver: RaftDriver) -> None:
        """The driver crashed: stop checking its node."""
        self._records.pop(id(driver), None)
        self._drivers.pop(id(driver), None)

    # Observer hooks.

    def ready_taken(self, driver: RaftDriver, ready: Ready) -> None:
        self._count_event()
        record = self._record(driver)
        node = driver.node
        self._check_leader(driver)
        if node.commit_index < record.commit:
            raise InvariantViolation(
                f"node {node.node_id}: commit index went back {record.commit} -> "
                f"{node.commit_index}"
            )
        record.commit = node.commit_index
        # A commit index first seen here was computed by this node as leader, possibly just
        # before it stepped down (its Ready may have waited on a slow disk meanwhile); its
        # current term bounds the term it committed in from above.
        if node.commit_index > self.committed_max:
            for index in range(self.committed_max + 1, node.commit_index + 1):
                term = self._log_term(driver, ready, index)
                self.commit_terms[index] = (term, node.term)
                self._check_current_leaders(index, term, node.term)
            self.committed_max = node.commit_index

    def persisted(self, driver: RaftDriver, ready: Ready) -> None:
        storage = driver.storage
        for position, entry in enumerate(ready.entries):
            if position:
                previous_term: int | None = ready.entries[position - 1].term
            else:
                try:
                    previous_term = storage.term(entry.index - 1)
                except (CompactedError, UnavailableError):
                    previous_term = None
            self._check_log_matching(driver.node_id, entry, previous_term)
        node = driver.node
        record = self._record(driver)
        if node.role == Role.LEADER and node.term not in record.checked_leader_terms:
            record.checked_leader_terms.add(node.term)
            for index, (entry_term, commit_term) in self.commit_terms.items():
                if commit_term < node.term:
                    self._check_has_entry(driver, index, entry_term, commit_term)

    def applied(self, driver: RaftDriver, entry: Entry, result: object) -> None:
        record = self._record(driver)
        if entry.index != record.applied + 1:
            raise InvariantViolation(
                f"node {driver.node_id} applied {entry.index} after {record.applied}"
            )
        record.applied = entry.index
        if entry.index not in self.commit_terms:
            raise InvariantViolation(
                f"node {driver.node_id} applied {entry.index}, never seen committed"
            )
        known = self.applied_entries.get(entry.index)
        if known is None:
            self.applied_entries[entry.index] = entry
            self.applied_max = max(self.applied_max, entry.index)
        elif known != entry:
            raise InvariantViolation(
                f"index {entry.index} applied as {known} and as {entry} (node {driver.node_id})"
            )

    def restored(self, driver: RaftDriver, snapshot: Snapshot) -> None:
        record = self._record(driver)
        if snapshot.index < record.applied:
            raise InvariantViolation(
                f"node {driver.node_id} restored a snapshot at {snapshot.index} "
                f"behind its applied index {record.applied}"
            )
        record.applied = snapshot.index
        self._check_snapshot(snapshot)

    def snapshot_taken(self, driver: RaftDriver, snapshot: Snapshot) -> None:
        self._check_snapshot(snapshot)

    # Checks.

    def _check_leader(self, driver: RaftDriver) -> None:
        node = driver.node
        if node.role != Role.LEADER:
            return
        leader = self.leaders_by_term.setdefault(node.term, node.node_id)
        if leader != node.node_id:
            raise InvariantViolation(
                f"two leaders in term {node.term}: {leader} and {node.node_id}"
            )

    def check_all(self) -> None:
        """Checks over every running node (called after each simulation step)."""
        for driver in self._drivers.values():
            self._check_leader(driver)
            record = self._records[id(driver)]
            if driver.node.commit_index < record.commit:
                raise InvariantViolation(
                    f"node {driver.node_id}: commit index went back {record.commit} -> "
                    f"{driver.node.commit_index}"
                )
            record.commit = driver.node.commit_index

    def _log_term(self, driver: RaftDriver, ready: Ready, index: int) -> int:
        if ready.entries and index >= ready.entries[0].index:
            return ready.entries[index - ready.entries[0].index].term
        try:
            return driver.storage.term(index)
        except CompactedError:
            return self.applied_entries[index].term

    def _check_log_matching(self, node_id: int, entry: Entry, previous_term: int | None) -> None:
        key = (entry.index, entry.term)
        known = self.entries_by_id.get(key)
        if known is None:
            self.entries_by_id[key] = (entry.kind, entry.data, previous_term)
            return
        kind, data, known_previous = known
        if kind != entry.kind or data != entry.data:
            raise InvariantViolation(
                f"log matching: two different entries at {key} (node {node_id})"
            )
        if (
            previous_term is not None
            and known_previous is not None
            and previous_term != known_previous
        ):
            raise InvariantViolation(
                f"log matching: entry {key} follows term {previous_term} on node {node_id}, "
                f"term {known_previous} elsewhere"
            )
        if known_previous is None and previous_term is not None:
            self.entries_by_id[key] = (kind, data, previous_term)

    def _check_current_leaders(self, index: int, entry_term: int, commit_term: int) -> None:
        for driver in self._drivers.values():
            node = driver.node
            record = self._records[id(driver)]
            if (
                node.role == Role.LEADER
                and node.term > commit_term
                and (node.term in record.checked_leader_terms)
            ):
                self._check_has_entry(driver, index, entry_term, commit_term)

    def _check_has_entry(
        self, driver: RaftDriver, index: int, entry_term: int, commit_term: int
    ) -> None:
        storage = driver.storage
        if index <= storage.snapshot().index:
            return  # covered by the snapshot (whose content is checked separately)
        try:
            term = storage.term(index)
        except (CompactedError, UnavailableError):
            term = None
        if term != entry_term:
            raise InvariantViolation(
                f"leader completeness: leader {driver.node_id} of term {driver.node.term} has "
                f"term {term} at {index}, committed with term {entry_term} in term {commit_term}"
            )

    def _check_snapshot(self, snapshot: Snapshot) -> None:
        expected = self._snapshots_by_index.get(snapshot.index)
        if expected is None:
            missing = [i for i in range(1, snapshot.index + 1) if i not in self.applied_entries]
            if missing:
                raise InvariantViolation(
                    f"snapshot at {snapshot.index}: indexes {missing[:5]} never applied"
                )
            reference = KeyValueStore()
            for index in range(1, snapshot.index + 1):
                reference.apply(self.applied_entries[index])
            expected = self._snapshots_by_index[snapshot.index] = reference.snapshot()
        if expected != snapshot.data:
            raise InvariantViolation(
                f"snapshot at {snapshot.index} differs from the replayed state"
            )
