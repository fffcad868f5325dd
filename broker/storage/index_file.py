"""The on-disk copy of a sparse index: fixed-width big-endian entries back to back.

Index files are derived data. The entries that lookups use live in memory; the file is
appended to while its segment is active and rewritten whole after recovery, so that a clean
restart can load it instead of scanning the log.
"""

from __future__ import annotations

import os
import pathlib
import struct
from typing import Iterable


class IndexFile:
    """One index file; `append` writes through only while the file is open for appending."""

    def __init__(self, path: pathlib.Path, entry: struct.Struct) -> None:
        self.path = path
        self._entry = entry
        self._fd = -1

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def open_for_append(self) -> None:
        """Open (creating if needed) for appending. Raises OSError."""
        assert self._fd < 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, *values: int) -> None:
        """Write one entry if the file is open. Raises OSError."""
        if self._fd >= 0:
            _write_all(self._fd, self._entry.pack(*values))

    def rewrite(
        self, entries: Iterable[tuple[int, ...]], suffix: str = "", *, sync: bool = False
    ) -> None:
        """Replace the content of the file (named with `suffix` appended) with `entries`,
        fsyncing it if `sync`. The file must not be open for appending. Raises OSError."""
        assert self._fd < 0
        data = b"".join(self._entry.pack(*entry) for entry in entries)
        path = self.path.with_name(self.path.name + suffix)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def read_entries(self, entries_max: int) -> list[tuple[int, ...]] | None:
        """Return the file's entries, or None if it is missing, torn, or holds more than
        `entries_max` entries (the file is then not trusted and must be rebuilt)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return None
        if size % self._entry.size or size // self._entry.size > entries_max:
            return None
        with open(self.path, "rb") as file:
            data = file.read(size + 1)
        if len(data) != size:
            return None
        return list(self._entry.iter_unpack(data))

    def fsync(self) -> None:
        """Make the file durable; a file already renamed away is skipped. Blocking."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
