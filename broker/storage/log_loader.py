"""Loading a partition log from its directory, recovering it after a crash.

Theory of operation. Loading runs explicit passes over the directory:

1. remove leftovers of interrupted work: `*.deleted` (segments retention already gave up),
   `*.tmp` (checkpoints never renamed into place), `*.cleaned` (a compaction's unfinished
   output), and index files without a log; then complete interrupted compaction swaps: a
   `<base>.log.swap` is a compacted segment, complete and durable, so it replaces its
   `<base>.log` and that segment's indexes are rebuilt; a `.swap` whose `.log` is gone belongs
   to a segment that retention deleted meanwhile, and is removed; and complete an
   interrupted `truncate_fully_and_start_at`: its intent file (`truncate-fully-and-start-at`)
   was written durably before it changed anything, so when it is there every segment goes,
   one empty segment starts at the offset it holds, the leader-epoch checkpoint is emptied
   and the high watermark checkpoint set to that offset, and the intent file goes last;
2. read the clean-shutdown marker, and remove it durably so that a crash from now on is
   never mistaken for a clean shutdown;
3. open the segments in offset order. After a clean shutdown a segment is trusted once its
   indexes pass a consistency check (otherwise it is recovered, which rebuilds them). After a
   crash, every segment whose end lies beyond the recovery point (the offset below which data
   was known durable), and at least the last one, is recovered: each batch is checked and the
   file is truncated at the first bad byte. Data after a bad byte is not trusted, so every
   later segment is deleted; so are they when a recovered segment's offsets run into the next
   segment's. Gaps in offsets are not damage: compaction leaves them;
4. make what recovery kept durable (fdatasync, directory fsync) and record the new recovery
   point, so that the whole log is durable when loading returns;
5. load the leader-epoch cache from its checkpoint (rebuilt from the batch headers when the
   file is missing or unreadable) and the high watermark checkpoint, and clip both to the
   recovered log: epochs starting at or after its end are dropped, the first one starts at
   the log start, and the high watermark lies in [log start, log end];
6. load the idempotent producers' state (`load_producer_state`, also what a truncation
   runs): from the latest producer-state snapshot at or below the log end, then from the
   headers of the batches after it. A snapshot `{offset:020d}.snapshot` holds the table
   for the batches below its offset; the log writes one at each segment roll and at a clean
   close, so after a clean close nothing is scanned, and after a crash only what was written
   since the last roll. Snapshots above the log end (its tail was cut by recovery or a
   truncation) or below the log start are deleted, and so is a damaged one (CRC), the next
   older one being tried; without any, every batch header of the log is read. A log without
   batches reads nothing and needs no snapshot file.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from .checkpoint import (
    TEMPORARY_SUFFIX,
    fsync_directory,
    write_atomically,
    read_offset_checkpoint,
    write_offset_checkpoint,
)
from .batch_scanner import iterate_headers
from .errors import StorageError
from .leader_epoch_cache import LeaderEpochCache, parse_checkpoint
from .log_config import LogConfig
from .producer_state import SNAPSHOT_BYTES_MAX, ProducerStateTable, parse_snapshot
from .segment import (
    CLEANED_SUFFIX,
    DELETED_SUFFIX,
    LOG_SUFFIX,
    OFFSET_INDEX_SUFFIX,
    SEGMENT_SUFFIXES,
    SWAP_SUFFIX,
    TIME_INDEX_SUFFIX,
    Segment,
    segment_file_name,
)

CLEAN_SHUTDOWN_FILE = ".clean-shutdown"
RECOVERY_POINT_FILE = "recovery-point"
HIGH_WATERMARK_FILE = "high-watermark"
LEADER_EPOCH_CHECKPOINT_FILE = "leader-epoch-checkpoint"
TRUNCATE_FULLY_FILE = "truncate-fully-and-start-at"  # the intent of a full truncation
PRODUCER_SNAPSHOT_SUFFIX = ".snapshot"
PRODUCER_SNAPSHOTS_KEPT = 3  # the latest ones; older ones only serve a deeper truncation
_SEGMENT_FILE_PATTERN = re.compile(r"([0-9]{20})(\.log|\.index|\.timeindex)")
_SNAPSHOT_FILE_PATTERN = re.compile(r"([0-9]{20})\.snapshot")
_SWAP_FILE_PATTERN = re.compile(r"([0-9]{20})\.log\.swap")

logger = logging.getLogger("dwal.storage")


@dataclass(frozen=True)
class LoadedSegments:
    segments: list[Segment]  # in offset order, the last one active, everything durable
    recovered_after_crash: bool  # not shut down cleanly: segments were checked batch by batch
    leader_epochs: LeaderEpochCache  # clipped to the log, and checkpointed as it is
    high_watermark: int | None  # the checkpointed one clipped to the log, None if none
    producers: LoadedProducerState


@dataclass(frozen=True)
class LoadedProducerState:
    table: ProducerStateTable  # the producers of the batches in the log
    snapshot_offsets: list[int]  # of the snapshot files kept, ascending
    snapshot_is_current: bool  # the latest snapshot is at the log end and holds `table`


def load_segments(directory: pathlib.Path, config: LogConfig, *, now_ms: int) -> LoadedSegments:
    """Load (creating if needed) the log in `directory`. Raises StorageError. Blocking."""
    try:
        _ensure_directory(directory)
        _remove_leftovers(directory)
        _complete_full_truncation(directory)
        swapped = _complete_swaps(directory)
        bases, snapshot_offsets = _list_segment_bases(directory)
        clean = _consume_clean_shutdown_marker(directory)
    except OSError as error:
        raise StorageError(f"cannot load {directory}: {error}") from error
    segments: list[Segment] = []
    try:
        recovered = _open_segments(directory, bases, config, clean, swapped, segments)
        if not segments:
            segments.append(Segment.create(directory, 0, index_interval_bytes=_interval(config)))
            recovered.append(segments[0])
        else:
            segments[-1].activate()
        if recovered:
            _make_durable(directory, recovered, segments[-1].next_offset)
        if not clean and bases:
            logger.debug(
                "%s: recovered after an unclean shutdown: %d of %d segment(s) checked batch "
                "by batch, log ends at offset %d",
                directory,
                len(recovered),
                len(segments),
                segments[-1].next_offset,
            )
        _set_rolling_baseline(segments[-1], now_ms)
        leader_epochs = _load_leader_epochs(directory, segments)
        high_watermark = read_offset_checkpoint(directory / HIGH_WATERMARK_FILE)
        if high_watermark is not None:
            clipped = min(max(high_watermark, segments[0].base_offset), segments[-1].next_offset)
            if clipped != high_watermark:
                # A checkpoint beyond the recovered log (a power loss cut its tail) is
                # rewritten: left as it is, it would be restored again after the next crash,
                # once the log has grown back past it with records not known committed.
                write_offset_checkpoint(directory / HIGH_WATERMARK_FILE, clipped)
                high_watermark = clipped
        producers = load_producer_state(
            directory, segments, snapshot_offsets, producers_max=config.producers_max
        )
    except (OSError, StorageError) as error:
        for segment in segments:
            segment.close()
        raise StorageError(f"cannot load {directory}: {error}") from error
    return LoadedSegments(
        segments,
        recovered_after_crash=not clean and bool(bases),
        leader_epochs=leader_epochs,
        high_watermark=high_watermark,
        producers=producers,
    )


def _load_leader_epochs(directory: pathlib.Path, segments: list[Segment]) -> LeaderEpochCache:
    """Read the leader-epoch checkpoint, or rebuild it from the batch headers; clip it to
    the log and rewrite it if that changed anything."""
    path = directory / LEADER_EPOCH_CHECKPOINT_FILE
    try:
        cache = parse_checkpoint(path.read_bytes())
    except FileNotFoundError:
        cache = None
    changed = cache is None
    if cache is None:
        cache = _rebuild_leader_epochs(segments)
        logger.debug("%s: rebuilt the leader-epoch cache from the batch headers", directory)
    changed |= cache.truncate_from_end(segments[-1].next_offset)
    changed |= cache.truncate_from_start(segments[0].base_offset)
    if changed:
        write_atomically(path, cache.checkpoint_bytes())
    return cache


def _rebuild_leader_epochs(segments: list[Segment]) -> LeaderEpochCache:
    """Scan every batch header: each epoch starts at its first batch. An epoch below the
    latest one (a log written before epochs were checked) is skipped, as Kafka does."""
    cache = LeaderEpochCache()
    for segment in segments:
        for _, header in iterate_headers(segment.log_fd, 0, segment.size_bytes):
            if header.partition_leader_epoch > cache.latest_epoch:
                cache.assign(header.partition_leader_epoch, header.base_offset)
    return cache


# The producers' state.


def producer_snapshot_path(directory: pathlib.Path, offset: int) -> pathlib.Path:
    return directory / segment_file_name(offset, PRODUCER_SNAPSHOT_SUFFIX)


def write_producer_snapshot(
    directory: pathlib.Path, offset: int, table: ProducerStateTable
) -> None:
    """Durably write the snapshot of `table`, which holds the batches below `offset`.
    Raises OSError. Blocking (a small file and two fsyncs)."""
    write_atomically(producer_snapshot_path(directory, offset), table.snapshot_bytes(offset))


def load_producer_state(
    directory: pathlib.Path,
    segments: Sequence[Segment],
    snapshot_offsets: Iterable[int],
    *,
    producers_max: int,
) -> LoadedProducerState:
    """The producers' state of the log made of `segments` (see pass 6 of the theory of
    operation), given the offsets of the snapshot files in `directory`: the latest sound
    snapshot at or below the log end, then every batch header after it. Deletes the
    snapshots outside [log start, log end] (durably, for those above the end: one must
    never come back once the log grows past it with other batches) and damaged ones, and
    keeps the latest PRODUCER_SNAPSHOTS_KEPT. Raises OSError, StorageError (a batch header
    the file contradicts). Blocking."""
    start, end = segments[0].base_offset, segments[-1].next_offset
    offsets = sorted(set(snapshot_offsets))
    candidates = [offset for offset in offsets if start <= offset <= end]
    for offset in offsets:
        if not start <= offset <= end:
            producer_snapshot_path(directory, offset).unlink(missing_ok=True)
    if offsets and offsets[-1] > end:
        fsync_directory(directory)
    table, from_offset = None, start
    while candidates and table is None:
        table = _read_producer_snapshot(directory, candidates[-1], producers_max)
        if table is None:
            logger.warning(
                "%s: producer-state snapshot %s is damaged: deleted, an older one is used",
                directory,
                producer_snapshot_path(directory, candidates[-1]).name,
            )
            producer_snapshot_path(directory, candidates.pop()).unlink(missing_ok=True)
        else:
            from_offset = candidates[-1]
    loaded = table is not None
    if table is None:
        table = ProducerStateTable(producers_max=producers_max)
    version = table.version
    _replay_producer_batches(table, segments, from_offset)
    table.truncate_head(start)
    for offset in candidates[:-PRODUCER_SNAPSHOTS_KEPT]:
        producer_snapshot_path(directory, offset).unlink(missing_ok=True)
    return LoadedProducerState(
        table,
        snapshot_offsets=candidates[-PRODUCER_SNAPSHOTS_KEPT:],
        snapshot_is_current=loaded and from_offset == end and table.version == version,
    )


def _read_producer_snapshot(
    directory: pathlib.Path, offset: int, producers_max: int
) -> ProducerStateTable | None:
    """The table in the snapshot at `offset`, or None when it is missing or damaged."""
    try:
        with open(producer_snapshot_path(directory, offset), "rb") as file:
            size_bytes = os.fstat(file.fileno()).st_size
            if size_bytes > SNAPSHOT_BYTES_MAX:
                return None
            data = file.read(size_bytes)
    except FileNotFoundError:
        return None
    parsed = parse_snapshot(data, producers_max=producers_max)
    if parsed is None or parsed[0] != offset:
        return None
    return parsed[1]


def _replay_producer_batches(
    table: ProducerStateTable, segments: Sequence[Segment], from_offset: int
) -> None:
    """Record in `table` every batch at or after `from_offset`, reading only headers (from
    the closest offset-index entry in the first segment)."""
    for segment in segments:
        if segment.next_offset <= from_offset or segment.size_bytes == 0:
            continue
        position = 0
        if segment.base_offset < from_offset:
            position = segment.index_position(from_offset)
        for _, header in iterate_headers(segment.log_fd, position, segment.size_bytes):
            if header.base_offset >= from_offset:
                table.record(header)


def _interval(config: LogConfig) -> int:
    return config.index_interval_bytes


def _ensure_directory(directory: pathlib.Path) -> None:
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        fsync_directory(directory.parent)


def _remove_leftovers(directory: pathlib.Path) -> None:
    for entry in os.scandir(directory):
        if entry.name.endswith((DELETED_SUFFIX, TEMPORARY_SUFFIX, CLEANED_SUFFIX)):
            os.unlink(entry.path)


def _complete_full_truncation(directory: pathlib.Path) -> None:
    """Finish a full truncation that a crash interrupted, if its intent file is there: remove
    every segment (and compaction output), create an empty log file at the intent's offset,
    empty the leader-epoch checkpoint, record the offset as high watermark and recovery
    point, then remove the intent file. Idempotent. Raises OSError, StorageError (an intent
    file that holds no offset: it is written atomically, so it was not written by us)."""
    intent = directory / TRUNCATE_FULLY_FILE
    if not intent.exists():
        return
    offset = read_offset_checkpoint(intent)
    if offset is None:
        raise StorageError(f"{intent} does not hold an offset")
    for entry in os.scandir(directory):
        if (
            _SEGMENT_FILE_PATTERN.fullmatch(entry.name)
            or _SNAPSHOT_FILE_PATTERN.fullmatch(entry.name)
            or entry.name.endswith(SWAP_SUFFIX)
        ):
            os.unlink(entry.path)
    fd = os.open(directory / segment_file_name(offset, LOG_SUFFIX), os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)  # empty: made durable by the directory fsyncs below
    write_atomically(
        directory / LEADER_EPOCH_CHECKPOINT_FILE, LeaderEpochCache().checkpoint_bytes()
    )
    write_offset_checkpoint(directory / HIGH_WATERMARK_FILE, offset)
    write_offset_checkpoint(directory / RECOVERY_POINT_FILE, offset)
    intent.unlink()
    fsync_directory(directory)
    logger.warning(
        "%s: completed an interrupted full truncation: the log is empty and starts at offset %d",
        directory,
        offset,
    )


def _complete_swaps(directory: pathlib.Path) -> set[int]:
    """Put each compacted `<base>.log.swap` in place of its `<base>.log` (removing the old
    indexes first, so that none is ever trusted with the new log); return those bases, whose
    indexes must be rebuilt. A `.swap` without its `.log`, or any other `.swap`, is removed."""
    swapped: set[int] = set()
    for entry in os.scandir(directory):
        if not entry.name.endswith(SWAP_SUFFIX):
            continue
        match = _SWAP_FILE_PATTERN.fullmatch(entry.name)
        log_path = directory / entry.name.removesuffix(SWAP_SUFFIX)
        if match is None or not log_path.exists():
            os.unlink(entry.path)
            continue
        base = int(match.group(1))
        for suffix in (OFFSET_INDEX_SUFFIX, TIME_INDEX_SUFFIX):
            (directory / segment_file_name(base, suffix)).unlink(missing_ok=True)
        os.rename(entry.path, log_path)
        logger.info("%s: completed the compaction of segment %s", directory, log_path.name)
        swapped.add(base)
    if swapped:
        fsync_directory(directory)
    return swapped


def _list_segment_bases(directory: pathlib.Path) -> tuple[list[int], list[int]]:
    """Return the base offsets of the segments' log files, removing orphan index files, and
    the offsets of the producer-state snapshots."""
    bases: set[int] = set()
    index_files: list[tuple[int, str]] = []
    snapshot_offsets: list[int] = []
    for entry in os.scandir(directory):
        match = _SEGMENT_FILE_PATTERN.fullmatch(entry.name)
        if match is None:
            snapshot = _SNAPSHOT_FILE_PATTERN.fullmatch(entry.name)
            if snapshot is not None:
                snapshot_offsets.append(int(snapshot.group(1)))
            continue
        if match.group(2) == LOG_SUFFIX:
            bases.add(int(match.group(1)))
        else:
            index_files.append((int(match.group(1)), entry.path))
    for base, path in index_files:
        if base not in bases:
            os.unlink(path)
    return sorted(bases), sorted(snapshot_offsets)


def _consume_clean_shutdown_marker(directory: pathlib.Path) -> bool:
    marker = directory / CLEAN_SHUTDOWN_FILE
    if not marker.exists():
        return False
    marker.unlink()
    fsync_directory(directory)
    return True


def _open_segments(
    directory: pathlib.Path,
    bases: list[int],
    config: LogConfig,
    clean: bool,
    swapped: set[int],
    segments: list[Segment],
) -> list[Segment]:
    """Open, check or recover each segment into `segments`; return the recovered ones.
    Segments in `swapped` (just replaced by their compacted file) are always recovered."""
    recovery_point = None if clean else read_offset_checkpoint(directory / RECOVERY_POINT_FILE)
    recovered: list[Segment] = []
    for number, base in enumerate(bases):
        next_base = bases[number + 1] if number + 1 < len(bases) else None
        segment = Segment.open_existing(directory, base, index_interval_bytes=_interval(config))
        segments.append(segment)
        must_recover = base in swapped or (
            not clean
            and (next_base is None or recovery_point is None or next_base > recovery_point)
        )
        if not must_recover and segment.load_indexes(next_base):
            continue
        removed = segment.recover()
        recovered.append(segment)
        # A segment may end before the next one starts (compaction removed its last
        # records), but one cut short by recovery, or running into the next, is damaged.
        if next_base is not None and (removed or segment.next_offset > next_base):
            _delete_segments_after(directory, segment, bases[number + 1 :])
            break
    return recovered


def _delete_segments_after(directory: pathlib.Path, segment: Segment, bases: list[int]) -> None:
    """Delete the segments at `bases`: they follow a damaged segment."""
    for base in bases:
        logger.warning(
            "%s: deleting segment %s: it follows damaged segment %s, ending at offset %d",
            directory,
            segment_file_name(base, LOG_SUFFIX),
            segment.log_path.name,
            segment.next_offset,
        )
        for suffix in SEGMENT_SUFFIXES:
            (directory / segment_file_name(base, suffix)).unlink(missing_ok=True)


def _make_durable(directory: pathlib.Path, recovered: list[Segment], end_offset: int) -> None:
    """fsync what recovery kept, then record that the whole log is durable."""
    for segment in recovered:
        os.fdatasync(segment.log_fd)
        segment.sync_index_files()
    fsync_directory(directory)
    write_offset_checkpoint(directory / RECOVERY_POINT_FILE, end_offset)


def _set_rolling_baseline(active: Segment, now_ms: int) -> None:
    """Age a reopened active segment from its first batch's timestamp (never from the
    future), so that restarts do not keep postponing its roll."""
    first_timestamp = active.first_batch_timestamp()
    if first_timestamp is not None:
        active.rolling_baseline_ms = min(first_timestamp, now_ms)
