"""Sparse time index of one segment: largest timestamp so far -> batch base offset.

An entry (T, O) says every batch up to and including the one at offset O has a
max_timestamp <= T. Entries are added at the same sparse interval as offset index entries,
only when T grows, so timestamps are strictly increasing even if producers' clocks are not.
When a segment stops being active one more entry records its final largest timestamp, so a
reopened segment knows it without scanning the log. To find the first batch with
max_timestamp >= target, start scanning at the last entry whose T < target.
"""

from __future__ import annotations

import bisect
import pathlib
import struct
from array import array

from .index_file import IndexFile
from .offset_index import RELATIVE_OFFSET_MAX

ENTRY = struct.Struct(">qI")  # timestamp i64, relative_offset u32


class TimeIndex:
    """In-memory entries plus their file; offsets are stored relative to the base offset."""

    def __init__(self, path: pathlib.Path, base_offset: int) -> None:
        self.base_offset = base_offset
        self.file = IndexFile(path, ENTRY)
        self._timestamps = array("q")
        self._relative_offsets = array("I")

    def __len__(self) -> int:
        return len(self._timestamps)

    @property
    def last_timestamp(self) -> int | None:
        """The largest indexed timestamp, or None when empty."""
        return self._timestamps[-1] if self._timestamps else None

    @property
    def last_offset(self) -> int | None:
        return self.base_offset + self._relative_offsets[-1] if self._timestamps else None

    def append(self, timestamp: int, offset: int) -> None:
        """Add an entry with a larger timestamp than any before. Raises OSError."""
        relative = offset - self.base_offset
        assert 0 <= relative <= RELATIVE_OFFSET_MAX
        assert not self._timestamps or (
            timestamp > self._timestamps[-1] and relative >= self._relative_offsets[-1]
        )
        self.file.append(timestamp, relative)
        self._timestamps.append(timestamp)
        self._relative_offsets.append(relative)

    def lookup(self, timestamp: int) -> int:
        """Return the offset of the batch to start scanning at for the first batch whose
        max_timestamp >= `timestamp`: that of the last entry below it, else the base offset."""
        index = bisect.bisect_left(self._timestamps, timestamp) - 1
        if index < 0:
            return self.base_offset
        return self.base_offset + self._relative_offsets[index]

    def truncate_to(self, offset: int) -> None:
        """Forget the entries for offsets at or above `offset`, in memory (rewrite the file
        next); the entries kept only describe batches below `offset`."""
        relative = max(offset - self.base_offset, 0)
        keep = bisect.bisect_left(self._relative_offsets, relative)
        del self._timestamps[keep:]
        del self._relative_offsets[keep:]

    def clear(self) -> None:
        del self._timestamps[:]
        del self._relative_offsets[:]

    def load(self, entries_max: int) -> bool:
        """Load the file's entries; return False (and stay empty) if the file is missing or
        its entries are out of order. The caller checks `last_offset` against the log."""
        entries = self.file.read_entries(entries_max)
        if entries is None:
            return False
        for timestamp, relative in entries:
            if self._timestamps and (
                timestamp <= self._timestamps[-1] or relative < self._relative_offsets[-1]
            ):
                self.clear()
                return False
            self._timestamps.append(timestamp)
            self._relative_offsets.append(relative)
        return True

    def write_file(self, suffix: str = "", *, sync: bool = False) -> None:
        """Rewrite the file (named with `suffix` appended) from memory. Raises OSError."""
        self.file.rewrite(zip(self._timestamps, self._relative_offsets), suffix, sync=sync)
