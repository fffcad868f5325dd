"""Reading record batches back from a segment file.

Lookups read one header per batch with `os.pread` (`iterate_headers`): they start from a
sparse index entry, so they touch a bounded number of batches. `read_batch_containing` reads
the 61-byte headers the same way, then only the one batch holding an offset, whose CRC it
checks; it can first be tried with `pread_cached`, which never waits for the disk (Linux
RWF_NOWAIT), so that a read served from the page cache needs no worker thread. Recovery reads
the file in bounded chunks and checks every batch in full (`ValidatingScanner`): length,
magic, CRC and that offsets strictly increase, without overlap, and stay below a bound (what
the segment's index can hold). Gaps between batches are allowed: compaction leaves them (each
kept record keeps its offset). A batch larger than a chunk is checked with an incremental
CRC, so memory stays bounded whatever the file holds.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Iterator

import crc32c

from protocol.errors import ProtocolError
from protocol.record_batch import (
    CRC_START,
    HEADER_BYTES,
    BatchHeader,
    ScannedBatch,
    check_header,
    crc_of,
    parse_header,
    scan_batches,
)

from .errors import CorruptRecordError, StorageError

CHUNK_BYTES = 8 * 1024 * 1024
# A cached read larger than this is refused (BlockingIOError), so the caller reads it in a
# worker thread: it bounds how long a read from the page cache holds up the event loop.
CACHED_READ_BYTES_MAX = 256 * 1024
_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)

Read = Callable[[int, int, int], bytes]  # (fd, length, position) -> bytes, like os.pread


def read_header(fd: int, position: int) -> BatchHeader:
    """Return the header of the batch at `position`. Raises StorageError if it is cut short."""
    data = os.pread(fd, HEADER_BYTES, position)
    if len(data) < HEADER_BYTES:
        raise StorageError(f"batch header at byte {position} is cut short")
    return parse_header(data)


def iterate_headers(fd: int, start: int, end: int) -> Iterator[tuple[int, BatchHeader]]:
    """Yield (position, header) of each batch in [start, end), trusting the file's lengths.

    Raises StorageError on a header that is cut short or inconsistent.
    """
    position = start
    while position < end:
        header = read_header(fd, position)
        try:
            check_header(header)
        except ProtocolError as error:
            raise StorageError(f"batch at byte {position}: {error}") from None
        yield position, header
        position += header.size_bytes


def pread_cached(fd: int, length: int, position: int) -> bytes:
    """Like `os.pread`, but never waits for the disk: raises BlockingIOError unless all
    `length` bytes are in the page cache (also past the end of the file, for more than
    CACHED_READ_BYTES_MAX bytes, and where the system cannot tell). Raises OSError."""
    if _RWF_NOWAIT is None or length > CACHED_READ_BYTES_MAX:
        raise BlockingIOError("not a cached read")
    buffer = bytearray(length)
    try:
        count = os.preadv(fd, [buffer], position, _RWF_NOWAIT)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
            raise BlockingIOError(error.errno, "not in the page cache") from None
        raise
    if count < length:  # partly cached, or the end of the file: a blocking read settles it
        raise BlockingIOError("not wholly in the page cache")
    return bytes(buffer)


def read_batch_containing(
    fd: int, *, start: int, end: int, offset: int, file_name: str, read: Read | None = None
) -> bytes | None:
    """Return the whole batch of [start, end) of the file open as `fd` that holds `offset`
    (base_offset <= offset <= last_offset), or None when no batch does (compaction removed
    it). `start` is a batch boundary at or before the batch (an offset index entry's).

    Reads, with `read` (default `os.pread`), only batch headers until the batch, then that
    batch, and checks its CRC. Raises CorruptRecordError (naming `file_name` and the byte
    position) when a header or the batch is damaged or cut short, and whatever `read` raises.
    Blocking with `os.pread`: run it in a worker thread; with `pread_cached` it never waits
    for the disk.
    """
    read = os.pread if read is None else read
    position = start
    while position < end:
        data = read(fd, HEADER_BYTES, position)
        if len(data) < HEADER_BYTES or position + HEADER_BYTES > end:
            raise CorruptRecordError(
                f"the batch header at byte {position} of {file_name} is cut short"
            )
        header = parse_header(data)
        try:
            check_header(header)
        except ProtocolError as error:
            raise CorruptRecordError(
                f"the batch at byte {position} of {file_name} is damaged: {error}"
            ) from None
        if header.base_offset > offset:
            return None
        if header.last_offset >= offset:
            return _read_checked_batch(fd, position, header, end, file_name, read)
        position += header.size_bytes
    return None


def _read_checked_batch(
    fd: int, position: int, header: BatchHeader, end: int, file_name: str, read: Read
) -> bytes:
    """Read the batch of `header` at `position` and check its CRC; raises
    CorruptRecordError. The length is checked against `end` before anything is read."""
    where = f"the batch of offsets {header.base_offset}-{header.last_offset} at byte {position}"
    if position + header.size_bytes > end:
        raise CorruptRecordError(f"{where} of {file_name} runs past the end of the data")
    parts = []
    remaining = header.size_bytes
    while remaining > 0:
        part = read(fd, remaining, position + header.size_bytes - remaining)
        if not part:
            raise CorruptRecordError(f"{where} of {file_name} is cut short")
        parts.append(part)
        remaining -= len(part)
    batch = parts[0] if len(parts) == 1 else b"".join(parts)
    if crc_of(batch) != header.crc:
        raise CorruptRecordError(f"{where} of {file_name} fails its CRC check")
    return batch


class ValidatingScanner:
    """Checks the batches of [start, end) of a file, stopping at the first bad byte.

    Iterate `batches()`; afterwards `valid_end` is the position after the last good batch
    and `stop_reason` says why the scan stopped early (None when it reached `end`).
    """

    def __init__(
        self,
        fd: int,
        *,
        start: int,
        end: int,
        first_offset: int,
        offset_max: int,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        assert 0 <= start <= end and chunk_bytes >= HEADER_BYTES
        self._fd = fd
        self._end = end
        self._offset_max = offset_max
        self._chunk_bytes = chunk_bytes
        self.valid_end = start
        self.next_offset = first_offset  # the lowest base offset the next batch may have
        self.stop_reason: str | None = None

    def batches(self) -> Iterator[ScannedBatch]:
        """Yield each good batch with its absolute file position, in order."""
        while self.valid_end < self._end and self.stop_reason is None:
            length = min(self._chunk_bytes, self._end - self.valid_end)
            chunk = os.pread(self._fd, length, self.valid_end)
            if len(chunk) < length:
                self._end = self.valid_end + len(chunk)  # the file is shorter than expected
            yield from self._scan_chunk(chunk)

    def _scan_chunk(self, chunk: bytes) -> Iterator[ScannedBatch]:
        """Yield the good batches that lie wholly in `chunk`, then settle what stopped the
        scan: the end of the chunk (the caller reads on), or a bad or oversize batch."""
        chunk_start = self.valid_end
        try:
            for batch in scan_batches(chunk):
                self.stop_reason = self._offsets_problem(batch.header)
                if self.stop_reason is not None:
                    return
                yield self._accept(ScannedBatch(chunk_start + batch.position, batch.header))
        except ProtocolError as error:
            yield from self._settle(chunk, self.valid_end - chunk_start, str(error))

    def _settle(self, chunk: bytes, position: int, error: str) -> Iterator[ScannedBatch]:
        """Decide about the batch at `position` of `chunk` that failed `scan_batches`."""
        absolute = self.valid_end
        if len(chunk) - position < HEADER_BYTES:
            if absolute + HEADER_BYTES > self._end:
                self.stop_reason = "batch header cut short at end of file"
            return  # otherwise the next chunk starts at this batch
        header = parse_header(chunk, position)
        try:
            check_header(header)
        except ProtocolError as bad_header:
            self.stop_reason = str(bad_header)
            return
        if position + header.size_bytes <= len(chunk):
            self.stop_reason = error  # the batch is whole, so it is damaged
        elif absolute + header.size_bytes > self._end:
            self.stop_reason = "batch cut short at end of file"
        elif header.size_bytes > self._chunk_bytes:
            yield from self._check_large_batch(header)
        # else: the batch continues in the next chunk, which starts at it

    def _check_large_batch(self, header: BatchHeader) -> Iterator[ScannedBatch]:
        """Check a batch larger than a chunk by an incremental CRC over bounded reads."""
        self.stop_reason = self._offsets_problem(header)
        if self.stop_reason is not None:
            return
        position = self.valid_end + CRC_START
        batch_end = self.valid_end + header.size_bytes
        crc = 0
        while position < batch_end:
            data = os.pread(self._fd, min(self._chunk_bytes, batch_end - position), position)
            if not data:
                self.stop_reason = "batch cut short at end of file"
                return
            crc = crc32c.crc32c(data, crc)
            position += len(data)
        if crc != header.crc:
            self.stop_reason = f"record batch at byte {self.valid_end} fails its CRC check"
            return
        yield self._accept(ScannedBatch(self.valid_end, header))

    def _offsets_problem(self, header: BatchHeader) -> str | None:
        if header.base_offset < self.next_offset:
            return (
                f"base offset {header.base_offset} overlaps earlier offsets "
                f"(at least {self.next_offset} was expected)"
            )
        if header.last_offset > self._offset_max:
            return f"offset {header.last_offset} is beyond the segment's {self._offset_max}"
        return None

    def _accept(self, batch: ScannedBatch) -> ScannedBatch:
        self.valid_end = batch.position + batch.header.size_bytes
        self.next_offset = batch.header.next_offset
        return batch
