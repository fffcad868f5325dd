"""The on-disk copy of a sparse index: fixed-width big-endian entries back to back.

Index files are derived data. The entries that lookups use live in memory; the file is
appended to while its segment is active and rewritten whole after recovery, so that a clean
restart can load it instead of scanning the log.

Appends are buffered: entries reach the file `APPEND_BUFFER_BYTES` at a time, and the rest
when the segment stops being active (`finish`), each time through a descriptor opened for
that write alone, so an active segment's index files hold no descriptor. The file of an
active segment may thus lag its memory by a few entries: nothing reads it before `finish`
(a clean shutdown finalizes the active segment), and after a crash the active segment is
recovered from its log, its indexes rebuilt.
"""

from __future__ import annotations

import os
import pathlib
import struct
from typing import Iterable

from .file_descriptor_cache import process_cache

APPEND_BUFFER_BYTES = 4096  # about 500 offset index entries: 2 MiB of log at the default


class IndexFile:
    """One index file; `append` writes through only between `open_for_append` and
    `finish` (or `close`)."""

    def __init__(self, path: pathlib.Path, entry: struct.Struct) -> None:
        self._path = os.fspath(path)  # a str: a Path costs several times its memory
        self._entry = entry
        self._appending = False
        self._buffer = bytearray()  # appended entries not yet in the file

    @property
    def path(self) -> pathlib.Path:
        return pathlib.Path(self._path)

    @property
    def is_open(self) -> bool:
        """True while appends go to the file."""
        return self._appending

    def open_for_append(self) -> None:
        """Start appending (the file is created at the first write if missing)."""
        assert not self._appending
        self._appending = True

    def append(self, *values: int) -> None:
        """Add one entry if appending; write the buffered ones once there are enough.
        Raises OSError."""
        if self._appending:
            self._buffer += self._entry.pack(*values)
            if len(self._buffer) >= APPEND_BUFFER_BYTES:
                self._write_buffer()

    def finish(self) -> None:
        """Write the buffered entries and stop appending. Raises OSError."""
        if self._appending:
            self._write_buffer()
            self._appending = False

    def _write_buffer(self) -> None:
        if not self._buffer:
            return
        fd = process_cache().open_transient(
            self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
        )
        try:
            _write_all(fd, self._buffer)
        finally:
            os.close(fd)
        self._buffer.clear()

    def rewrite(
        self, entries: Iterable[tuple[int, ...]], suffix: str = "", *, sync: bool = False
    ) -> None:
        """Replace the content of the file (named with `suffix` appended) with `entries`,
        fsyncing it if `sync`. The file must not be open for appending. Raises OSError."""
        assert not self._appending
        data = b"".join(self._entry.pack(*entry) for entry in entries)
        path = self.path.with_name(self.path.name + suffix)
        fd = process_cache().open_transient(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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
            fd = process_cache().open_transient(self._path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Stop appending, dropping the buffered entries (the file is rewritten or deleted
        next, or rebuilt when loaded)."""
        self._appending = False
        self._buffer.clear()


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
