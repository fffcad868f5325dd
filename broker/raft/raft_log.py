"""The node's view of its log: what storage holds plus the unstable tail not yet persisted.

Theory of operation (etcd's raftLog/unstable). Entries the node appends, and a snapshot it
receives, first live in `Unstable`; they go out in Ready.entries / Ready.snapshot, the driver
persists them in storage, and advance() calls stable_to / stable_snapshot_to so they drop
out of `Unstable`. Reads combine both: indexes below `unstable.offset` come from storage,
the rest from the unstable tail (which wins where the two overlap: storage may still hold a
suffix the unstable tail is about to overwrite).

Three cursors: `committed` (known replicated on a quorum), `applying` (handed out in a
Ready's committed_entries), `applied` (the driver said so in advance()). Always
applied <= applying <= committed <= last_index().
"""

from __future__ import annotations

from .log_storage import CompactedError, LogStorage, UnavailableError, limit_bytes
from .messages import Entry, Snapshot


class Unstable:
    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset  # index of entries[0]

    def first_index(self) -> int | None:
        return self.snapshot.index + 1 if self.snapshot is not None else None

    def last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        return self.snapshot.index if self.snapshot is not None else None

    def term(self, index: int) -> int | None:
        if index < self.offset:
            if self.snapshot is not None and self.snapshot.index == index:
                return self.snapshot.term
            return None
        last = self.last_index()
        if last is None or index > last:
            return None
        return self.entries[index - self.offset].term

    def stable_to(self, index: int, term: int) -> None:
        if self.term(index) == term and index >= self.offset:
            del self.entries[: index + 1 - self.offset]
            self.offset = index + 1

    def stable_snapshot_to(self, index: int) -> None:
        if self.snapshot is not None and self.snapshot.index == index:
            self.snapshot = None

    def restore(self, snapshot: Snapshot) -> None:
        self.offset = snapshot.index + 1
        self.entries = []
        self.snapshot = snapshot

    def truncate_and_append(self, entries: list[Entry]) -> None:
        first = entries[0].index
        if first == self.offset + len(self.entries):
            self.entries.extend(entries)
        elif first <= self.offset:
            self.offset = first  # storage's entries from `first` on will be replaced
            self.entries = list(entries)
        else:
            del self.entries[first - self.offset :]
            self.entries.extend(entries)


class RaftLog:
    def __init__(self, storage: LogStorage) -> None:
        self.storage = storage
        self.unstable = Unstable(storage.last_index() + 1)
        start = storage.first_index() - 1
        self.committed = start
        self.applying = start
        self.applied = start

    # -- bounds and terms -----------------------------------------------------------------

    def first_index(self) -> int:
        first = self.unstable.first_index()
        return first if first is not None else self.storage.first_index()

    def last_index(self) -> int:
        last = self.unstable.last_index()
        return last if last is not None else self.storage.last_index()

    def term(self, index: int) -> int:
        """Raises CompactedError / UnavailableError outside [first_index() - 1, last_index()]."""
        if index < self.first_index() - 1:
            raise CompactedError(f"index {index} is compacted")
        if index > self.last_index():
            raise UnavailableError(f"index {index} is beyond the last index")
        term = self.unstable.term(index)
        return term if term is not None else self.storage.term(index)

    def term_or_zero(self, index: int) -> int:
        """The term at index, or 0 when it is not known (compacted or not there)."""
        try:
            return self.term(index)
        except (CompactedError, UnavailableError):
            return 0

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        try:
            return self.term(index) == term
        except (CompactedError, UnavailableError):
            return False

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """Whether a log ending at (last_index, term) is at least as up to date as ours."""
        our_term = self.last_term()
        return term > our_term or (term == our_term and last_index >= self.last_index())

    # -- appending ------------------------------------------------------------------------

    def maybe_append(
        self, index: int, log_term: int, committed: int, entries: tuple[Entry, ...]
    ) -> int | None:
        """Append entries anchored at (index, log_term), as a follower does for APPEND.

        Returns the last index known to match the leader's log, or None when our log does
        not contain (index, log_term). Entries we already have are not rewritten, so a stale
        or duplicated APPEND never truncates entries a later one added."""
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            assert conflict > self.committed, (
                f"entry {conflict} conflicts with the committed log (committed {self.committed})"
            )
            self.append(list(entries[conflict - (index + 1) :]))
        self.commit_to(min(committed, last_new))
        return last_new

    def append(self, entries: list[Entry]) -> int:
        if entries:
            assert entries[0].index > self.committed, "cannot rewrite committed entries"
            self.unstable.truncate_and_append(entries)
        return self.last_index()

    def find_conflict(self, entries: tuple[Entry, ...]) -> int:
        """Index of the first entry that is new or differs in term from ours, else 0."""
        for entry in entries:
            if not self.match_term(entry.index, entry.term):
                return entry.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest (i, term_at_i) with i <= index and term_at_i <= term.

        When a term cannot be read (compacted), returns (i, 0): a possible match."""
        while index > 0:
            try:
                our_term = self.term(index)
            except (CompactedError, UnavailableError):
                return index, 0
            if our_term <= term:
                return index, our_term
            index -= 1
        return 0, 0

    # -- reading --------------------------------------------------------------------------

    def entries_from(self, low: int, max_bytes: int, max_count: int) -> list[Entry]:
        """Up to max_count entries from low (at least one if any). Raises CompactedError."""
        high = min(self.last_index() + 1, low + max_count)
        return self.slice(low, high, max_bytes)

    def slice(self, low: int, high: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries [low, high) within max_bytes (at least one). Raises CompactedError."""
        if low < self.first_index():
            raise CompactedError(f"index {low} is compacted")
        assert low <= high <= self.last_index() + 1, f"bad slice [{low}, {high})"
        if low == high:
            return []
        offset = self.unstable.offset
        result: list[Entry] = []
        if low < offset:
            stored_high = min(high, offset)
            result = list(self.storage.entries(low, stored_high, max_bytes))
            if len(result) < stored_high - low:
                return result  # the byte limit was hit inside storage
        if high > offset:
            result.extend(self.unstable.entries[max(low, offset) - offset : high - offset])
        return result if max_bytes is None else limit_bytes(result, max_bytes)

    def unstable_entries(self) -> tuple[Entry, ...]:
        return tuple(self.unstable.entries)

    def snapshot(self) -> Snapshot:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    def has_pending_snapshot(self) -> bool:
        return self.unstable.snapshot is not None

    # -- commit and apply -----------------------------------------------------------------

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            assert index <= self.last_index(), f"commit {index} beyond last {self.last_index()}"
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        """Commit up to index if the entry there is of `term` (only current-term entries are
        committed by counting replicas). Returns whether the commit index moved."""
        if index > self.committed and self.term_or_zero(index) == term:
            self.commit_to(index)
            return True
        return False

    def has_next_committed(self) -> bool:
        return self.applying < self.committed and not self.has_pending_snapshot()

    def next_committed(self, max_bytes: int) -> list[Entry]:
        if not self.has_next_committed():
            return []
        return self.slice(self.applying + 1, self.committed + 1, max_bytes)

    def restore(self, snapshot: Snapshot) -> None:
        self.committed = snapshot.index
        self.applying = snapshot.index
        self.unstable.restore(snapshot)
