"""Sparse offset index of one segment: batch base offset -> byte position in the log file.

One entry is added every `index.interval.bytes` of log written (the first batch of a
segment is implied at position 0). A lookup returns the closest entry at or below an
offset; the caller then scans batch headers forward from that position.
"""

from __future__ import annotations

import bisect
import pathlib
import struct
from array import array

from .index_file import IndexFile

ENTRY = struct.Struct(">II")  # relative_offset u32, position u32
RELATIVE_OFFSET_MAX = 2**32 - 1
assert array("I").itemsize == 4 and array("q").itemsize == 8


class OffsetIndex:
    """In-memory entries plus their file; offsets are stored relative to the base offset."""

    def __init__(self, path: pathlib.Path, base_offset: int) -> None:
        self.base_offset = base_offset
        self.file = IndexFile(path, ENTRY)
        self._relative_offsets = array("I")
        self._positions = array("I")

    def __len__(self) -> int:
        return len(self._positions)

    def append(self, offset: int, position: int) -> None:
        """Add an entry above every existing one. Raises OSError from the file write."""
        relative = offset - self.base_offset
        assert 0 <= relative <= RELATIVE_OFFSET_MAX
        assert not self._positions or (
            relative > self._relative_offsets[-1] and position > self._positions[-1]
        )
        self.file.append(relative, position)
        self._relative_offsets.append(relative)
        self._positions.append(position)

    def lookup(self, offset: int) -> tuple[int, int]:
        """Return (offset, position) of the last entry at or below `offset`, or the segment
        start (base_offset, 0) when there is none."""
        index = bisect.bisect_right(self._relative_offsets, offset - self.base_offset) - 1
        if index < 0:
            return self.base_offset, 0
        return self.base_offset + self._relative_offsets[index], self._positions[index]

    def last_entry(self) -> tuple[int, int] | None:
        """Return (offset, position) of the last entry, or None when empty."""
        if not self._positions:
            return None
        return self.base_offset + self._relative_offsets[-1], self._positions[-1]

    def truncate_to(self, offset: int) -> None:
        """Forget the entries at or above `offset`, in memory (rewrite the file next)."""
        keep = bisect.bisect_left(self._relative_offsets, max(offset - self.base_offset, 0))
        del self._relative_offsets[keep:]
        del self._positions[keep:]

    def clear(self) -> None:
        """Forget every entry in memory (the file is rewritten later with `write_file`)."""
        del self._relative_offsets[:]
        del self._positions[:]

    def load(self, log_size: int, entries_max: int) -> bool:
        """Load the file's entries; return False (and stay empty) if the file is missing or
        its entries are out of order or point outside a log of `log_size` bytes."""
        entries = self.file.read_entries(entries_max)
        if entries is None:
            return False
        previous_offset, previous_position = 0, 0
        for relative, position in entries:
            if relative <= previous_offset or position <= previous_position or position >= log_size:
                self.clear()
                return False
            self._relative_offsets.append(relative)
            self._positions.append(position)
            previous_offset, previous_position = relative, position
        return True

    def write_file(self, suffix: str = "", *, sync: bool = False) -> None:
        """Rewrite the file (named with `suffix` appended) from memory. Raises OSError."""
        self.file.rewrite(zip(self._relative_offsets, self._positions), suffix, sync=sync)
