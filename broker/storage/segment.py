"""One segment of a partition log: a file of back-to-back batches plus two sparse indexes.

Theory of operation. A segment is named by the offset of its first batch
(`{base_offset:020d}.log`, `.index`, `.timeindex`). Only the last segment of a log is
active: batches are appended to it with O_APPEND writes, and every `index_interval_bytes`
of log one entry goes to each index, in memory and (a few KiB at a time, see `IndexFile`)
to its file. When the segment stops being active (`finalize`) the time index gets one last
entry with the segment's largest timestamp and the index files are written out; the segment
is then immutable.

File descriptors. The log file is opened on demand through the process's
`FileDescriptorCache` (a bounded LRU of descriptors): a segment holds a descriptor only
while the cache keeps it, so idle partitions hold none. Methods hold the descriptor for
their duration (`pinned`); `log_fd` hands it to callers that use it at once (`os.dup` for
a reader or an fsync in another thread, one read, one fdatasync), leased to the calling
thread until it asks for another segment's `log_fd`. Index files hold no descriptor.

The index files are derived data. `load_indexes` trusts them after checking they are
consistent with the log; `recover` throws them away, checks every batch of the log from the
start, truncates the file at the first bad byte and rebuilds both indexes from the batches.

Offsets strictly increase from batch to batch but need not be dense: compaction (see
`log_cleaner`) rewrites a closed segment keeping only some records, each at its original
offset, so a closed segment may have gaps between batches, before its first batch and after
its last one, and may even be empty. A lookup of an offset inside a gap finds the next batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from typing import Iterable

from protocol.record_batch import HEADER_BYTES, BatchHeader

from .batch_scanner import CHUNK_BYTES, ValidatingScanner, iterate_headers, read_header
from .errors import StorageError
from .file_descriptor_cache import CachedFile, process_cache
from .offset_index import RELATIVE_OFFSET_MAX, OffsetIndex
from .time_index import TimeIndex

LOG_SUFFIX = ".log"
OFFSET_INDEX_SUFFIX = ".index"
TIME_INDEX_SUFFIX = ".timeindex"
DELETED_SUFFIX = ".deleted"
CLEANED_SUFFIX = ".cleaned"  # a compaction's new segment files, still being written
SWAP_SUFFIX = ".swap"  # a compacted log file, complete and durable, to replace the segment's
SEGMENT_SUFFIXES = (LOG_SUFFIX, OFFSET_INDEX_SUFFIX, TIME_INDEX_SUFFIX)
NO_TIMESTAMP = -1

logger = logging.getLogger("dwal.storage")


def segment_file_name(base_offset: int, suffix: str) -> str:
    return f"{base_offset:020d}{suffix}"


class Segment:
    """One segment; see the module's theory of operation."""

    def __init__(
        self,
        directory: pathlib.Path,
        base_offset: int,
        log_file: CachedFile,
        *,
        index_interval_bytes: int,
    ) -> None:
        self.directory = directory
        self.base_offset = base_offset
        self.index_interval_bytes = index_interval_bytes
        self.offset_index = OffsetIndex(self._path(OFFSET_INDEX_SUFFIX), base_offset)
        self.time_index = TimeIndex(self._path(TIME_INDEX_SUFFIX), base_offset)
        # Time (ms) the segment's age counts from when deciding to roll it; None while empty.
        self.rolling_baseline_ms: int | None = None
        self._log_file = log_file
        self._closed = False
        self._reset_contents()

    @classmethod
    def create(
        cls, directory: pathlib.Path, base_offset: int, *, index_interval_bytes: int
    ) -> Segment:
        """Create an empty active segment. Raises OSError (FileExistsError if it exists)."""
        path = directory / segment_file_name(base_offset, LOG_SUFFIX)
        file = process_cache().open([path], os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL)
        segment = cls(directory, base_offset, file, index_interval_bytes=index_interval_bytes)
        try:
            segment.offset_index.write_file()  # drop any stale index file of that name
            segment.time_index.write_file()
        except BaseException:
            segment.close()
            raise
        segment.activate()
        return segment

    @classmethod
    def create_cleaned(
        cls, directory: pathlib.Path, base_offset: int, *, index_interval_bytes: int
    ) -> Segment:
        """Create (replacing any leftover) `<base>.log.cleaned`, where a compaction writes the
        new content of the segment at `base_offset`. Its index files are written with
        `write_index_files(CLEANED_SUFFIX)`. The log file keeps its identity through the
        renames that install it (`.swap`, then the segment's own name): a reopen of an
        evicted descriptor finds it under either. Raises OSError."""
        log_path = directory / segment_file_name(base_offset, LOG_SUFFIX)
        paths = [
            log_path.with_name(log_path.name + CLEANED_SUFFIX),
            log_path.with_name(log_path.name + SWAP_SUFFIX),
            log_path,
        ]
        file = process_cache().open(paths, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC)
        return cls(directory, base_offset, file, index_interval_bytes=index_interval_bytes)

    @classmethod
    def open_existing(
        cls, directory: pathlib.Path, base_offset: int, *, index_interval_bytes: int
    ) -> Segment:
        """Open a segment's log file; call `load_indexes` or `recover` next. Raises OSError."""
        path = directory / segment_file_name(base_offset, LOG_SUFFIX)
        file = process_cache().open([path], os.O_RDWR | os.O_APPEND)
        segment = cls(directory, base_offset, file, index_interval_bytes=index_interval_bytes)
        try:
            with file.pinned() as fd:
                segment._size_bytes = os.fstat(fd).st_size
        except BaseException:
            file.close()
            raise
        return segment

    def _reset_contents(self) -> None:
        self._size_bytes = 0
        self._next_offset = self.base_offset
        self._max_timestamp = NO_TIMESTAMP
        self._last_batch_offset: int | None = None
        self._bytes_since_index_entry = 0
        self.offset_index.clear()
        self.time_index.clear()

    def _path(self, suffix: str) -> pathlib.Path:
        return self.directory / segment_file_name(self.base_offset, suffix)

    @property
    def log_path(self) -> pathlib.Path:
        return self._path(LOG_SUFFIX)

    @property
    def log_fd(self) -> int:
        """The log file's descriptor, opened if needed: use it at once (see the module's
        theory), and `os.dup` it to keep it. Raises OSError (it cannot be opened)."""
        assert not self._closed
        return self._log_file.descriptor()

    @property
    def log_file(self) -> CachedFile:
        """The log file, whose descriptor the process's cache opens on demand."""
        return self._log_file

    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    @property
    def next_offset(self) -> int:
        """The offset after the segment's last batch (its base offset while empty). For a
        closed segment loaded from its indexes: the next segment's base offset."""
        return self._next_offset

    @property
    def max_timestamp(self) -> int:
        """The largest batch max_timestamp in the segment, or NO_TIMESTAMP while empty."""
        return self._max_timestamp

    @property
    def is_closed(self) -> bool:
        return self._closed

    def fits_offsets(self, last_offset: int) -> bool:
        """True if `last_offset` can still be stored relative to the base offset."""
        return last_offset - self.base_offset <= RELATIVE_OFFSET_MAX

    # Loading and recovery.

    def load_indexes(self, next_offset: int | None) -> bool:
        """Load both index files and check them against the log.

        `next_offset` is the next segment's base offset, or None for the last segment, whose
        end is then found by checking the batches after the last index entry. Returns False
        (leaving the indexes empty) when a file is missing or inconsistent: the caller then
        calls `recover`. Raises OSError.
        """
        entries_max = self._size_bytes // HEADER_BYTES + 1
        loaded = self.offset_index.load(self._size_bytes, entries_max) and self.time_index.load(
            entries_max
        )
        with self._log_file.pinned() as fd:
            if not loaded or not self._load_end(fd, next_offset):
                self._reset_contents()
                self._size_bytes = os.fstat(fd).st_size
                return False
        return True

    def _load_end(self, fd: int, next_offset: int | None) -> bool:
        """Find the end offset and largest timestamp; return False on any inconsistency."""
        last_entry = self.offset_index.last_entry()
        entry_offset, entry_position = last_entry or (self.base_offset, 0)
        if next_offset is None:
            if not self._check_tail(fd, entry_offset, entry_position):
                return False
        elif self._size_bytes == 0:
            # A closed segment that compaction emptied: it has no index entry at all.
            if self.offset_index or self.time_index:
                return False
            self._next_offset = next_offset
            return True
        elif not self.time_index:
            return False  # `finalize` gave the time index an entry for the last batch
        elif not self._batch_starts_at(
            fd, entry_position, None if last_entry is None else entry_offset, next_offset
        ):
            return False
        else:
            self._next_offset = next_offset
        last_time_offset = self.time_index.last_offset
        if last_time_offset is not None and last_time_offset >= self._next_offset:
            return False
        if self.time_index.last_timestamp is not None:
            self._max_timestamp = max(self._max_timestamp, self.time_index.last_timestamp)
        return entry_offset < self._next_offset or self._size_bytes == 0

    def _batch_starts_at(
        self, fd: int, position: int, offset: int | None, next_offset: int
    ) -> bool:
        """True if a batch starts at `position` with base offset `offset` (an index entry's),
        or, for `offset` None (no index entry), if the first batch's base offset lies in
        [base offset, next_offset): compaction may have removed the first records."""
        try:
            base_offset = read_header(fd, position).base_offset
        except StorageError:
            return False
        if offset is not None:
            return base_offset == offset
        return self.base_offset <= base_offset < next_offset

    def _check_tail(self, fd: int, first_offset: int, start: int) -> bool:
        """Check and track the batches from the last index entry to the end of the file."""
        file_size = self._size_bytes
        self._size_bytes = start
        self._next_offset = first_offset
        scanner = ValidatingScanner(
            fd,
            start=start,
            end=file_size,
            first_offset=first_offset,
            offset_max=self.base_offset + RELATIVE_OFFSET_MAX,
        )
        for batch in scanner.batches():
            self._track_batch(batch.position, batch.header)
        return scanner.stop_reason is None and self._size_bytes == file_size

    def recover(self, *, chunk_bytes: int = CHUNK_BYTES) -> int:
        """Check every batch from the start (length, magic, CRC, strictly increasing offsets,
        gaps allowed), truncate the file at the first bad byte and rebuild both indexes.

        Returns the number of bytes removed. Raises OSError. Blocking.
        """
        with self._log_file.pinned() as fd:
            return self._recover(fd, chunk_bytes)

    def _recover(self, fd: int, chunk_bytes: int) -> int:
        file_size = os.fstat(fd).st_size
        self._reset_contents()
        scanner = ValidatingScanner(
            fd,
            start=0,
            end=file_size,
            first_offset=self.base_offset,
            offset_max=self.base_offset + RELATIVE_OFFSET_MAX,
            chunk_bytes=chunk_bytes,
        )
        for batch in scanner.batches():
            self._track_batch(batch.position, batch.header)
        if self._last_batch_offset is not None:  # as `finalize` does, should no append follow
            self._index_time(self._max_timestamp, self._last_batch_offset)
        removed = file_size - scanner.valid_end
        if removed:
            logger.warning(
                "%s: truncating segment %s at byte %d, removing %d bytes: %s",
                self.directory,
                self.log_path.name,
                scanner.valid_end,
                removed,
                scanner.stop_reason or "unexpected end of file",
            )
            self._log_file.mark_written()
            os.ftruncate(fd, scanner.valid_end)
            os.fsync(fd)
        self._size_bytes = scanner.valid_end
        self.write_index_files()
        return removed

    def truncate_to(self, position: int, offset: int) -> None:
        """Remove the batches from `position` on: a batch boundary, where the batch at
        `offset` starts. Both indexes keep their entries below `offset` and are rewritten
        (fsynced) with the index files closed; the batches after the last kept offset index
        entry are checked again (at most about an index interval) to find the end and the
        largest timestamp. The caller fsyncs the log file and calls `activate` if the
        segment goes on taking appends. Raises OSError, StorageError (a damaged batch)."""
        assert 0 <= position <= self._size_bytes
        self.offset_index.file.close()
        self.time_index.file.close()
        with self._log_file.pinned() as fd:
            self._log_file.mark_written()
            os.ftruncate(fd, position)
            self._truncate_indexes(fd, position, offset)
        self.write_index_files(sync=True)

    def _truncate_indexes(self, fd: int, position: int, offset: int) -> None:
        self.offset_index.truncate_to(offset)
        self.time_index.truncate_to(offset)
        start_offset, start = self.offset_index.last_entry() or (self.base_offset, 0)
        self._size_bytes = position
        self._max_timestamp = self.time_index.last_timestamp or NO_TIMESTAMP
        self._last_batch_offset = None
        self._bytes_since_index_entry = 0
        if not self._check_tail(fd, start_offset, start):
            raise StorageError(f"{self.log_path} is damaged before byte {position}")
        if self._size_bytes == 0:
            self.rolling_baseline_ms = None

    def write_index_files(self, suffix: str = "", *, sync: bool = False) -> None:
        """Write both index files from memory, to their names plus `suffix`, and fsync them
        if `sync`. The index files must not be open for appending. Raises OSError."""
        self.offset_index.write_file(suffix, sync=sync)
        self.time_index.write_file(suffix, sync=sync)

    def first_batch_timestamp(self) -> int | None:
        """The max_timestamp of the first batch, or None while empty. Raises StorageError."""
        if self._size_bytes == 0:
            return None
        with self._log_file.pinned() as fd:
            return read_header(fd, 0).max_timestamp

    # Appending.

    def activate(self) -> None:
        """Start appending to the index files: this segment becomes the active one."""
        self.offset_index.file.open_for_append()
        self.time_index.file.open_for_append()

    def append(self, data: memoryview, batches: Iterable[tuple[int, BatchHeader]]) -> None:
        """Write `data` (whole batches, offsets already assigned) at the end of the log, then
        index `batches` ((position in `data`, header) each).

        Raises StorageError when the write fails and the file was restored to its previous
        size; raises OSError when the segment may now be inconsistent.
        """
        start = self._size_bytes
        self._write_log(data)
        for position, header in batches:
            self._track_batch(start + position, header)

    def _write_log(self, data: memoryview) -> None:
        start = self._size_bytes
        with contextlib.ExitStack() as stack:
            try:
                fd = stack.enter_context(self._log_file.pinned())
            except OSError as error:  # nothing written: the segment is as it was
                raise StorageError(f"cannot open {self.log_path}: {error}") from error
            self._log_file.mark_written()
            try:
                while data:
                    data = data[os.write(fd, data) :]
            except OSError as error:
                os.ftruncate(fd, start)  # an OSError here leaves the segment torn
                raise StorageError(f"cannot write to {self.log_path}: {error}") from error

    def _track_batch(self, position: int, header: BatchHeader) -> None:
        """Account for a batch now in the file at `position`, adding index entries."""
        assert header.base_offset >= self._next_offset and position == self._size_bytes
        if self._bytes_since_index_entry > self.index_interval_bytes:
            self.offset_index.append(header.base_offset, position)
            self._index_time(max(self._max_timestamp, header.max_timestamp), header.base_offset)
            self._bytes_since_index_entry = 0
        self._bytes_since_index_entry += header.size_bytes
        self._max_timestamp = max(self._max_timestamp, header.max_timestamp)
        self._next_offset = header.next_offset
        self._last_batch_offset = header.base_offset
        self._size_bytes = position + header.size_bytes

    def _index_time(self, timestamp: int, offset: int) -> None:
        last_timestamp = self.time_index.last_timestamp
        if last_timestamp is None or timestamp > last_timestamp:
            self.time_index.append(timestamp, offset)

    def finalize(self) -> None:
        """Stop being active: record the largest timestamp in the time index, write out the
        index entries not yet in their files. Raises OSError."""
        if self._last_batch_offset is not None:
            self._index_time(self._max_timestamp, self._last_batch_offset)
        self.offset_index.file.finish()
        self.time_index.file.finish()

    # Lookups.

    def index_position(self, offset: int) -> int:
        """The position of the last indexed batch at or below `offset` (0 when none): where a
        scan of batch headers for `offset` starts. In memory, never touches the disk."""
        return self.offset_index.lookup(offset)[1]

    def find_batch(self, offset: int, end_position: int) -> tuple[int, BatchHeader] | None:
        """Return (position, header) of the first batch below `end_position` holding
        `offset` or, when `offset` lies in a gap, following it; None if there is none.
        Raises StorageError if the file is inconsistent."""
        _, start = self.offset_index.lookup(offset)
        with self._log_file.pinned() as fd:
            for position, header in iterate_headers(fd, start, end_position):
                if header.last_offset >= offset:
                    return position, header
        return None

    def find_timestamp(self, timestamp: int, end_position: int) -> BatchHeader | None:
        """Return the header of the first batch below `end_position` whose max_timestamp is
        >= `timestamp`, or None. Raises StorageError if the file is inconsistent."""
        _, position = self.offset_index.lookup(self.time_index.lookup(timestamp))
        with self._log_file.pinned() as fd:
            for _, header in iterate_headers(fd, position, end_position):
                if header.max_timestamp >= timestamp:
                    return header
        return None

    # Durability and removal.

    def sync_index_files(self) -> None:
        """fsync both index files (skipping any already renamed away). Blocking."""
        self.offset_index.file.fsync()
        self.time_index.file.fsync()

    def close(self) -> None:
        """Close the log file's descriptor (if the cache holds one) and stop appending to the
        index files (entries not yet written are dropped: `finalize` first to keep them);
        the segment can no longer be used."""
        if not self._closed:
            self._closed = True
            self.offset_index.file.close()
            self.time_index.file.close()
            self._log_file.close()

    def rename_to_deleted(self) -> list[pathlib.Path]:
        """Close the segment and rename its files with the `.deleted` suffix, so that a crash
        cannot bring them back. Returns the new paths. Raises OSError."""
        self.close()
        renamed = []
        for suffix in SEGMENT_SUFFIXES:
            path = self._path(suffix)
            deleted = path.with_name(path.name + DELETED_SUFFIX)
            try:
                os.rename(path, deleted)
            except FileNotFoundError:
                continue
            renamed.append(deleted)
        return renamed

    def delete_files(self) -> None:
        """Close the segment and remove its files now. Raises OSError."""
        self.close()
        for suffix in SEGMENT_SUFFIXES:
            self._path(suffix).unlink(missing_ok=True)
