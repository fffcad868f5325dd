"""Log compaction: in the closed segments of a log, keep only the last record of each key.

Theory of operation. `PartitionLog.compact` takes a snapshot in the trio thread: the closed
segments whose every offset lies below the high watermark (the ones to clean, oldest first)
and the later data up to the high watermark (the active segment's included), each as a
duplicated descriptor plus an end position. Bytes below those ends never change, so a worker
thread can read them while appends and fetches go on; data above the high watermark may
still be lost or truncated, so it never decides what is removed. The worker runs
`clean_segments`:

1. Map each key (as a 16-byte BLAKE2b digest, so memory per key is bounded) to the last
   offset holding it, reading from the first dirty segment (the first one not covered by the
   previous compaction) to the end of the snapshot. Earlier segments were cleaned against
   every key that came before them, so only newer records can supersede theirs. The map
   holds at most `keys_max` keys; when it is full, only the segments it covered whole are
   cleaned, and the next compaction maps on from there.
2. Copy each segment to clean into `<base>.log.cleaned`, dropping every record whose key has
   a later offset in the map, and tombstones (null values) whose batch max_timestamp is older
   than now - delete.retention.ms (younger ones stay, so that lagging consumers still see
   the delete). Records without a key are kept. Offsets never change: the DWAL batch body
   has no per-record offset, so each run of consecutive kept records of a batch becomes one
   batch based at its first offset, with the source batch's codec, leader epoch and producer
   fields; records keep their timestamps. Kafka-encoded batches (a Kafka producer's, stored
   verbatim: attribute bit 7 clear) are compacted the same way, keys and tombstones meaning
   the same, each run re-encoded as a Kafka batch (see "Kafka batches" below). A batch the
   cleaner cannot rewrite (control, transactional or log-append-time batches, undecodable
   bodies) is copied as it is. So that a copy never grows (positions are u32 and a segment
   has a size limit), a batch is also copied as it is when its rewrite would make the copy
   larger than the part of the original read so far: compaction guarantees the last value
   of each key, not that every older one is gone. So is the last batch of each idempotent
   producer the log knows (`retained_batch_offsets`, see "Idempotent producers" below). A
   segment where nothing would be removed is not written at all.
   A segment whose every record is removed becomes an empty file that keeps its name: the
   log start offset moves only by retention, never by compaction.
3. Make the copies durable (data and index files `<base>.index.cleaned`, ...), remove the
   old segments' index files (derived data, rebuilt if needed) and fsync the directory, so
   that no crash can pair an old index with a new log; then rename each copy to
   `<base>.log.swap` and fsync the directory again. From here on a crash completes the swap
   when the log is loaded.

Back in the trio thread, each `.swap` replaces its `.log` by rename (readers holding the old
file's descriptor keep reading the old inode) and the new segment object replaces the old
one, unless the segment was deleted by retention meanwhile or the log closed: then the
result is discarded. When a log closes, its abort event stops the worker at the next chunk.

Kafka batches. Kafka's own cleaner keeps a batch whole and leaves gaps in its offset
deltas; DWAL cannot, since every batch in a log has offsets base..base + record_count - 1
(`check_header` holds a stored batch to last_offset_delta == record_count - 1, and DWAL
bodies have no per-record offset). So a Kafka batch is split into runs like a DWAL one: each
run is a Kafka v2 batch with offset deltas 0..n-1 at the run's first offset, its records'
timestamps, keys, values and headers (a null header value stays null), the source batch's
codec (snappy re-encoded in the xerial framing every Kafka client reads), leader epoch and
producer fields, base sequence advanced by the run's start. Kafka consumers read such runs as
they read any batches (an offset gap between batches is what Kafka's own compaction leaves
too). This is safe because nothing depends on a Kafka batch's bytes once it is stored:
its CRC is recomputed with the run, producers' state keeps only header fields (and each
producer's last batch is never rewritten), and a Kafka record's per-record attributes byte,
unused in v2, is the only thing not carried over (it is written as 0, as every client
writes it). Batches whose records do not sit at base + index (a producer's check refuses
them, but a follower copies what its leader holds) are copied as they are.

Idempotent producers. Loading a log rebuilds the producers' state (`producer_state`) from a
snapshot and the batch headers after it, or from every header when no snapshot is sound.
Snapshots are taken at rolls, so they already cover every segment compaction may touch; but
a rebuild from the headers must still never find an older state than the log had. Hence the
rule, Kafka's: the last batch of each producer in the log's state is never rewritten, so its
epoch, last sequence and offsets survive (Kafka keeps it even emptied; DWAL copies it whole:
its older values of keys stay until the producer writes again). Earlier batches of a
producer may be rewritten as runs, each keeping its records' sequences, so a rebuild from
the headers may recognise fewer retries of those (they then fail as out of order rather
than being written twice). Producers already expired are not protected: a rebuild may
bring one back, with an older state, until the next expiration removes it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from protocol.errors import ProtocolError, ProtocolUsageError
from protocol.kafka_records import decode_kafka_body, encode_kafka_batch
from protocol.record_batch import (
    ATTRIBUTE_CONTROL,
    ATTRIBUTE_LOG_APPEND_TIME,
    ATTRIBUTE_MSGPACK_BODY,
    ATTRIBUTE_TRANSACTIONAL,
    HEADER_BYTES,
    SUPPORTED_COMPRESSION,
    BatchHeader,
    Compression,
    check_header,
    complete_prefix_bytes,
    decode_body,
    encode_batch,
    parse_header,
    scan_batches,
)

from .batch_scanner import CHUNK_BYTES, read_header
from .checkpoint import fsync_directory
from .errors import StorageError
from .segment import (
    CLEANED_SUFFIX,
    LOG_SUFFIX,
    OFFSET_INDEX_SUFFIX,
    SWAP_SUFFIX,
    TIME_INDEX_SUFFIX,
    Segment,
    segment_file_name,
)

KEY_DIGEST_BYTES = 16
WRITE_BUFFER_BYTES = 1024 * 1024
SEQUENCE_MODULUS = 2**31  # producer sequence numbers wrap to 0 after the i32 maximum
_NOT_REWRITABLE = ATTRIBUTE_CONTROL | ATTRIBUTE_TRANSACTIONAL | ATTRIBUTE_LOG_APPEND_TIME


@dataclass(frozen=True, kw_only=True, slots=True)
class CompactionResult:
    """What one compaction did: segments rewritten, records they lost, their sizes."""

    segments_cleaned: int
    records_removed: int
    bytes_before: int
    bytes_after: int


NOTHING_CLEANED = CompactionResult(
    segments_cleaned=0, records_removed=0, bytes_before=0, bytes_after=0
)


class CompactionAborted(Exception):
    """The log closed while its cleaner worked; the cleaner removed its own files."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SegmentSource:
    """[0, end_position) of one segment, read through a duplicated descriptor."""

    base_offset: int
    fd: int
    end_position: int
    end_offset: int  # the next segment's base offset (the log end offset for the last one)


@dataclass(frozen=True, kw_only=True, slots=True)
class CleaningPlan:
    """What the worker thread reads and may clean (see the theory of operation)."""

    directory: pathlib.Path
    sources: tuple[SegmentSource, ...]  # from the first segment to clean to the last readable
    clean_count: int  # the first `clean_count` sources are the segments to clean
    dirty_index: int  # the map starts at this source
    delete_horizon_ms: int  # tombstones in batches older than this are dropped
    keys_max: int
    index_interval_bytes: int
    # base offsets of the batches copied whole: each idempotent producer's last batch
    retained_batch_offsets: frozenset[int] = frozenset()


@dataclass(frozen=True, kw_only=True, slots=True)
class CleanedSegment:
    """A compacted copy: `segment` is open on the file now at `<base>.log.swap`."""

    base_offset: int
    segment: Segment
    records_removed: int
    bytes_before: int


@dataclass(frozen=True, kw_only=True, slots=True)
class CleaningOutcome:
    cleaned: list[CleanedSegment]  # only the segments that changed
    clean_count: int  # leading sources cleaned (changed or already clean)
    key_limit_reached: bool


def clean_segments(plan: CleaningPlan, abort: threading.Event) -> CleaningOutcome:
    """Compact the plan's segments into `.swap` files, durable and ready to replace them.

    Returns what changed. Raises StorageError (a damaged batch), OSError, or
    CompactionAborted when `abort` is set; its own files are removed first. Blocking: runs
    in a worker thread, touching the live segments only through the plan's descriptors.
    """
    assert 0 < plan.clean_count <= len(plan.sources) and plan.dirty_index <= plan.clean_count
    offsets, covered = _map_last_offsets(plan, abort)
    clean_count = min(plan.clean_count, covered)
    cleaned: list[CleanedSegment] = []
    try:
        for source in plan.sources[:clean_count]:
            result = _clean_segment(plan, source, offsets, abort)
            if result is not None:
                cleaned.append(result)
        if abort.is_set():
            raise CompactionAborted()
        _prepare_swaps(plan.directory, cleaned)
    except BaseException:
        for result in cleaned:
            discard_cleaned(plan.directory, result)
        raise
    return CleaningOutcome(
        cleaned=cleaned, clean_count=clean_count, key_limit_reached=covered < len(plan.sources)
    )


def swap_path(directory: pathlib.Path, base_offset: int) -> pathlib.Path:
    return directory / (segment_file_name(base_offset, LOG_SUFFIX) + SWAP_SUFFIX)


def cleaned_path(directory: pathlib.Path, base_offset: int, suffix: str) -> pathlib.Path:
    return directory / (segment_file_name(base_offset, suffix) + CLEANED_SUFFIX)


def discard_cleaned(directory: pathlib.Path, result: CleanedSegment) -> None:
    """Close a compacted copy and remove its files, as far as possible (a log deleted
    meanwhile has no directory any more). Blocking but short."""
    result.segment.close()
    base = result.base_offset
    paths = [cleaned_path(directory, base, suffix) for suffix in _SEGMENT_SUFFIXES]
    for path in (*paths, swap_path(directory, base)):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # left for the loader, which removes `.cleaned` and stray `.swap` files


def finish_swap(directory: pathlib.Path, base_offset: int) -> None:
    """After `<base>.log.swap` was renamed to `<base>.log`, put the new index files in
    place. Failing is harmless (indexes are rebuilt when missing), so errors are ignored."""
    for suffix in (OFFSET_INDEX_SUFFIX, TIME_INDEX_SUFFIX):
        try:
            os.rename(
                cleaned_path(directory, base_offset, suffix),
                directory / segment_file_name(base_offset, suffix),
            )
        except OSError:
            pass


_SEGMENT_SUFFIXES = (LOG_SUFFIX, OFFSET_INDEX_SUFFIX, TIME_INDEX_SUFFIX)


# Step 1: the map of each key's last offset.


def _map_last_offsets(plan: CleaningPlan, abort: threading.Event) -> tuple[dict[bytes, int], int]:
    """Map each key's digest to its last offset, from the first dirty source on. Returns the
    map and how many leading sources it covers whole (all unless the map filled up)."""
    offsets: dict[bytes, int] = {}
    for number in range(plan.dirty_index, len(plan.sources)):
        for header, batch in _read_batches(plan.sources[number], abort):
            records = _decode(header, batch)
            if records is None:
                continue
            for index, record in enumerate(records):
                key = record[1]
                if key is None:
                    continue
                digest = _key_digest(key)
                if digest not in offsets and len(offsets) >= plan.keys_max:
                    return offsets, number
                offsets[digest] = header.base_offset + index
    return offsets, len(plan.sources)


def _key_digest(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=KEY_DIGEST_BYTES).digest()


def _decode(header: BatchHeader, batch: memoryview) -> list[list[Any]] | None:
    """The records of a batch the cleaner may rewrite, as ``[timestamp_delta, key, value,
    headers]`` lists, DWAL or Kafka-encoded; None for one it must copy as it is (control,
    transactional or log-append-time batches, bad bodies)."""
    attributes = header.attributes
    if attributes & _NOT_REWRITABLE:
        return None
    try:
        if not attributes & ATTRIBUTE_MSGPACK_BODY:
            return _decode_kafka(header, batch[HEADER_BYTES:])
        if header.compression not in SUPPORTED_COMPRESSION:
            return None
        return decode_body(header, batch[HEADER_BYTES:])
    except ProtocolError:
        return None  # a producer's malformed body: the broker never judges bodies


def _decode_kafka(header: BatchHeader, body: memoryview) -> list[list[Any]] | None:
    """A Kafka batch's records shaped as a DWAL body's (null header values kept); None
    unless they sit at base_offset + index, the only layout the runs can keep."""
    records = decode_kafka_body(header, body)
    base_offset, base_timestamp = header.base_offset, header.base_timestamp
    if any(record.offset != base_offset + index for index, record in enumerate(records)):
        return None
    return [
        [record.timestamp - base_timestamp, record.key, record.value, record.headers]
        for record in records
    ]


# Reading a segment.


def _read_batches(
    source: SegmentSource, abort: threading.Event
) -> Iterator[tuple[BatchHeader, memoryview]]:
    """Yield each batch of the source with its bytes, checking lengths, CRCs and that
    offsets increase, reading bounded chunks. Raises StorageError or CompactionAborted."""
    position = 0
    next_offset = source.base_offset
    while position < source.end_position:
        if abort.is_set():
            raise CompactionAborted()
        chunk = _read_chunk(source, position)
        try:
            for batch in scan_batches(chunk):
                header = batch.header
                if header.base_offset < next_offset:
                    raise ProtocolError(f"base offset {header.base_offset} overlaps earlier ones")
                next_offset = header.next_offset
                yield header, chunk[batch.position : batch.position + header.size_bytes]
        except ProtocolError as error:
            raise StorageError(f"{_name(source)} near byte {position}: {error}") from None
        position += len(chunk)


def _read_chunk(source: SegmentSource, position: int) -> memoryview:
    """The whole batches from `position` that fit in CHUNK_BYTES, or the one batch there
    if it is larger. Raises StorageError if the file is cut short."""
    data = os.pread(source.fd, min(CHUNK_BYTES, source.end_position - position), position)
    try:
        whole = complete_prefix_bytes(data)
        if whole:
            return memoryview(data)[:whole]
        header = read_header(source.fd, position)
        check_header(header)
    except ProtocolError as error:
        raise StorageError(f"{_name(source)} at byte {position}: {error}") from None
    if position + header.size_bytes > source.end_position:
        raise StorageError(f"{_name(source)}: the batch at byte {position} is cut short")
    parts = []
    remaining = header.size_bytes
    while remaining:
        part = os.pread(source.fd, remaining, position + header.size_bytes - remaining)
        if not part:
            raise StorageError(f"{_name(source)}: the file ends inside a batch")
        parts.append(part)
        remaining -= len(part)
    return memoryview(b"".join(parts))


def _name(source: SegmentSource) -> str:
    return segment_file_name(source.base_offset, LOG_SUFFIX)


# Step 2: the compacted copy of one segment.


def _clean_segment(
    plan: CleaningPlan, source: SegmentSource, offsets: dict[bytes, int], abort: threading.Event
) -> CleanedSegment | None:
    """Write the compacted copy of one segment to `<base>.log.cleaned`; return it, or None
    when no record is removed (nothing is written then)."""
    writer = _CleanedWriter(plan, source, abort)
    try:
        for header, batch in _read_batches(source, abort):
            records = None
            if header.base_offset not in plan.retained_batch_offsets:
                records = _decode(header, batch)
            if records is None:
                writer.add(header, batch, None, 0)
                continue
            kept = [
                index
                for index, record in enumerate(records)
                if _keeps(header, index, record, offsets, plan.delete_horizon_ms)
            ]
            if len(kept) == len(records):
                writer.add(header, batch, None, 0)
            else:
                runs = _encode_runs(header, records, _consecutive_runs(kept))
                writer.add(header, batch, runs, len(records) - len(kept) if runs is not None else 0)
        return writer.finish()
    except BaseException:
        writer.discard()
        raise


def _keeps(
    header: BatchHeader, index: int, record: list[Any], offsets: dict[bytes, int], horizon: int
) -> bool:
    key, value = record[1], record[2]
    if key is None:
        return True
    latest = offsets.get(_key_digest(key))
    if latest is not None and latest > header.base_offset + index:
        return False  # a later record has the same key
    return value is not None or header.max_timestamp >= horizon


def _consecutive_runs(indexes: list[int]) -> list[range]:
    """Split increasing `indexes` into ranges of consecutive ones."""
    runs: list[range] = []
    for index in indexes:
        if runs and runs[-1].stop == index:
            runs[-1] = range(runs[-1].start, index + 1)
        else:
            runs.append(range(index, index + 1))
    return runs


def _encode_runs(
    header: BatchHeader, records: list[list[Any]], runs: list[range]
) -> list[bytes] | None:
    """The batches replacing the source batch; None (copy it as it is) when a run cannot
    be encoded (a Kafka timestamp delta that no longer fits a varlong from its new base)."""
    try:
        return [_encode_run(header, records, run) for run in runs]
    except ProtocolUsageError:
        return None


def _encode_run(header: BatchHeader, records: list[list[Any]], run: range) -> bytes:
    """One batch holding records[run] at their offsets and with their timestamps, in the
    source batch's encoding (DWAL msgpack or Kafka). Raises ProtocolUsageError."""
    chosen = records[run.start : run.stop]
    timestamps = [header.base_timestamp + record[0] for record in chosen]
    base_timestamp = min(timestamps)
    sequence = header.base_sequence
    if sequence >= 0:
        sequence = (sequence + run.start) % SEQUENCE_MODULUS
    if not header.attributes & ATTRIBUTE_MSGPACK_BODY:
        return encode_kafka_batch(
            [
                (timestamp, record[1], record[2], record[3])
                for timestamp, record in zip(timestamps, chosen)
            ],
            compression=Compression(header.compression),
            base_offset=header.base_offset + run.start,
            partition_leader_epoch=header.partition_leader_epoch,
            producer_id=header.producer_id,
            producer_epoch=header.producer_epoch,
            base_sequence=sequence,
        )
    return encode_batch(
        [
            [timestamp - base_timestamp, record[1], record[2], record[3]]
            for timestamp, record in zip(timestamps, chosen)
        ],
        base_timestamp=base_timestamp,
        max_timestamp=max(timestamps),
        compression=Compression(header.compression),
        base_offset=header.base_offset + run.start,
        partition_leader_epoch=header.partition_leader_epoch,
        producer_id=header.producer_id,
        producer_epoch=header.producer_epoch,
        base_sequence=sequence,
    )


class _CleanedWriter:
    """Writes a segment's compacted copy through a `Segment` (which builds its indexes),
    creating the file only at the first batch that changes: the unchanged batches before it
    are then copied from the source."""

    def __init__(self, plan: CleaningPlan, source: SegmentSource, abort: threading.Event):
        self._plan = plan
        self._source = source
        self._abort = abort
        self._segment: Segment | None = None
        self._consumed = 0  # source bytes handled so far
        self._written = 0  # bytes of the copy so far (counting the unwritten prefix)
        self._records_removed = 0
        self._buffer = bytearray()
        self._buffered: list[tuple[int, BatchHeader]] = []

    def add(
        self, header: BatchHeader, batch: memoryview, runs: list[bytes] | None, removed: int
    ) -> None:
        """Account for the source `batch`: replaced by `runs`, or kept when None."""
        start = self._consumed
        self._consumed += header.size_bytes
        if runs is not None and self._written + sum(map(len, runs)) > self._consumed:
            runs = None  # the rewrite would make the copy larger than the original so far
        if runs is None:
            self._written += header.size_bytes
            if self._segment is not None:
                self._write(batch, header)
            return
        if self._segment is None:
            self._start(start)
        self._records_removed += removed
        for run in runs:
            self._write(memoryview(run), parse_header(run))
            self._written += len(run)

    def _start(self, prefix_bytes: int) -> None:
        plan = self._plan
        self._segment = Segment.create_cleaned(
            plan.directory,
            self._source.base_offset,
            index_interval_bytes=plan.index_interval_bytes,
        )
        prefix = dataclasses.replace(self._source, end_position=prefix_bytes)
        for header, batch in _read_batches(prefix, self._abort):
            self._write(batch, header)

    def _write(self, batch: memoryview, header: BatchHeader) -> None:
        self._buffered.append((len(self._buffer), header))
        self._buffer += batch
        if len(self._buffer) >= WRITE_BUFFER_BYTES:
            self._flush()

    def _flush(self) -> None:
        assert self._segment is not None
        if self._buffered:
            self._segment.append(memoryview(self._buffer), self._buffered)
        self._buffer = bytearray()
        self._buffered = []

    def finish(self) -> CleanedSegment | None:
        if self._segment is None:
            return None
        self._flush()
        return CleanedSegment(
            base_offset=self._source.base_offset,
            segment=self._segment,
            records_removed=self._records_removed,
            bytes_before=self._source.end_position,
        )

    def discard(self) -> None:
        if self._segment is not None:
            self._segment.close()
            path = cleaned_path(self._plan.directory, self._source.base_offset, LOG_SUFFIX)
            path.unlink(missing_ok=True)


# Step 3: durable copies, renamed to `.swap`.


def _prepare_swaps(directory: pathlib.Path, cleaned: list[CleanedSegment]) -> None:
    if not cleaned:
        return
    for result in cleaned:
        segment = result.segment
        segment.finalize()
        segment.write_index_files(CLEANED_SUFFIX, sync=True)
        os.fdatasync(segment.log_fd)
    for result in cleaned:
        for suffix in (OFFSET_INDEX_SUFFIX, TIME_INDEX_SUFFIX):
            (directory / segment_file_name(result.base_offset, suffix)).unlink(missing_ok=True)
    fsync_directory(directory)
    for result in cleaned:
        base = result.base_offset
        os.rename(cleaned_path(directory, base, LOG_SUFFIX), swap_path(directory, base))
    fsync_directory(directory)
