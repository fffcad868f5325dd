"""The narrow storage interface the Raft node reads (etcd's Storage) and MemoryStorage.

The node only *reads* storage (entries, terms, the latest snapshot) plus, from
RaftNode.compact, asks it to create a snapshot and discard the log before it. Everything
else is written by the driver, from Ready, before it sends the messages of that Ready:
`apply_snapshot(ready.snapshot)`, `append(ready.entries)`, `set_hard_state(ready.hard_state)`.

Index space: entries [first_index(), last_index()] are readable; term(first_index() - 1) is
known too (it is the snapshot's, or a compacted entry's, term). An empty log without a
snapshot has first_index() == 1, last_index() == 0 and term(0) == 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .messages import Configuration, Entry, HardState, Snapshot, entry_bytes


class CompactedError(LookupError):
    """The requested index was discarded by compaction (a snapshot covers it)."""


class UnavailableError(LookupError):
    """The requested index is beyond the last entry in storage."""


class LogStorage(Protocol):
    def initial_state(self) -> tuple[HardState, Configuration]:
        """The persisted hard state and the configuration of the latest snapshot (or the
        bootstrap configuration when there is no snapshot). Configuration changes in the
        log after the snapshot are re-applied by the node itself."""
        ...

    def entries(self, low: int, high: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries [low, high), at most max_bytes (by entry_bytes) but at least one if any.
        Raises CompactedError if low < first_index(), UnavailableError if
        high > last_index() + 1."""
        ...

    def term(self, index: int) -> int:
        """Term of the entry at index, for first_index() - 1 <= index <= last_index().
        Raises CompactedError below that range and UnavailableError above it."""
        ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot:
        """The latest snapshot (index 0 when there is none)."""
        ...

    def create_snapshot(self, index: int, configuration: Configuration, data: bytes) -> Snapshot:
        """Record the application's snapshot at `index` (<= last_index(), > snapshot index).
        Called only by RaftNode.compact, synchronously."""
        ...

    def compact(self, index: int) -> None:
        """Discard entries <= index; index <= snapshot().index. Called only by
        RaftNode.compact, right after create_snapshot."""
        ...


class MemoryStorage:
    """LogStorage in memory: the test double, and the simulation's "disk"."""

    def __init__(self, initial: Configuration, hard_state: HardState = HardState()) -> None:
        self._initial = initial
        self._hard_state = hard_state
        self._snapshot = Snapshot(index=0, term=0, configuration=initial, data=b"")
        # _entries[0] is a placeholder for the last compacted entry: its index and term.
        self._entries: list[Entry] = [Entry(term=0, index=0)]

    # -- LogStorage ---------------------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, Configuration]:
        return self._hard_state, self._snapshot.configuration

    def entries(self, low: int, high: int, max_bytes: int | None = None) -> list[Entry]:
        offset = self._entries[0].index
        if low <= offset:
            raise CompactedError(f"index {low} is compacted (first index {offset + 1})")
        if high > self.last_index() + 1:
            raise UnavailableError(f"index {high - 1} is beyond the last index")
        assert low <= high, f"invalid range [{low}, {high})"
        selected = self._entries[low - offset : high - offset]
        if max_bytes is None:
            return selected
        return limit_bytes(selected, max_bytes)

    def term(self, index: int) -> int:
        offset = self._entries[0].index
        if index < offset:
            raise CompactedError(f"index {index} is compacted (first index {offset + 1})")
        if index > self.last_index():
            raise UnavailableError(f"index {index} is beyond the last index")
        return self._entries[index - offset].term

    def first_index(self) -> int:
        return self._entries[0].index + 1

    def last_index(self) -> int:
        return self._entries[0].index + len(self._entries) - 1

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- written by the driver ------------------------------------------------------------

    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    def set_hard_state(self, hard_state: HardState) -> None:
        self._hard_state = hard_state

    def append(self, entries: Sequence[Entry]) -> None:
        """Append entries, replacing every stored entry at or after entries[0].index."""
        if not entries:
            return
        offset = self._entries[0].index
        first = entries[0].index
        assert first <= self.last_index() + 1, f"gap: appending {first} after {self.last_index()}"
        if entries[-1].index <= offset:
            return  # entirely covered by the snapshot
        if first <= offset:
            entries = entries[offset + 1 - first :]
            first = offset + 1
        del self._entries[first - offset :]
        self._entries.extend(entries)

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Replace the whole log by `snapshot` (received from a leader)."""
        assert snapshot.index > self._snapshot.index, "snapshot is older than the stored one"
        self._snapshot = snapshot
        self._entries = [Entry(term=snapshot.term, index=snapshot.index)]

    def create_snapshot(self, index: int, configuration: Configuration, data: bytes) -> Snapshot:
        assert self._snapshot.index < index <= self.last_index(), f"bad snapshot index {index}"
        snapshot = Snapshot(
            index=index, term=self.term(index), configuration=configuration, data=data
        )
        self._snapshot = snapshot
        return snapshot

    def compact(self, index: int) -> None:
        offset = self._entries[0].index
        assert index <= self._snapshot.index, "compact only what a snapshot covers"
        if index <= offset:
            return
        del self._entries[: index - offset]
        self._entries[0] = Entry(term=self._entries[0].term, index=index)


def limit_bytes(entries: list[Entry], max_bytes: int) -> list[Entry]:
    """The longest prefix of entries within max_bytes, but at least one entry."""
    total = 0
    for count, entry in enumerate(entries):
        total += entry_bytes(entry)
        if total > max_bytes and count > 0:
            return entries[:count]
    return entries
