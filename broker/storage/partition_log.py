"""The log of one topic-partition: appends, reads, group commit, rolling and retention.

Theory of operation. The log is a sorted map from base offset to `Segment`; the last segment
is active and takes every append. An append checks every batch of the request first (so a
bad or oversize batch writes nothing), assigns offsets by patching each batch's header in
place, and writes the batches with one write per segment: the active segment rolls before
any batch that would overfill it (or before the first one when it is old), so an append
larger than segment.bytes spreads over several segments and only a single batch above the
limits is refused. No record is ever decoded here: the broker only reads batch headers.

Three offsets move forward: the log end offset (the next offset to assign, moved by appends),
the durable offset (everything below it is fsynced, moved by `wait_durable`) and the high
watermark (what consumers may read). On a single node the high watermark is the durable
offset under fsync=always, and the log end offset under interval or never. Its file position
is remembered with it, so that reads stop at it without scanning.

Group commit: `wait_durable` callers share fsyncs. One fdatasync at a time runs on a worker
thread; it first captures the end of the log, so the fsync covers every batch appended
before it started, and only when it completes does the durable offset move to that captured
end. Callers arriving meanwhile wait for it, then start the next fsync if they still need
one. The fsync runs as a task of the broker's `FsyncRunner`, so every caller only waits on
an event and may give up (time out, be cancelled) while the disk is slow; the thread call
cannot be abandoned, so the fsync completes and counts all the same.

Compaction (cleanup.policy=compact, see `log_cleaner`) rewrites closed segments in a worker
thread and swaps each result in, in one synchronous step, for the segment it was made from;
retention (cleanup.policy=delete) deletes the oldest segments. Offsets strictly increase
but, after compaction, may have gaps: a read of an offset in a gap starts at the next batch.

Replicas. By default the log derives its high watermark as above (a single node). Opened
with `high_watermark_managed_externally` (or switched by `manage_high_watermark_externally`)
it leaves that to the replica layer: appends and fsyncs never move it, `set_high_watermark`
moves it forward (clipped to the log end) and only the truncations move it back. The layer
learns that the log end or the durable offset moved from `progress_event`. The high
watermark is checkpointed (`high-watermark`) at `flush` (with the recovery point, at most
every 10 s), at `write_high_watermark_checkpoint`, at truncation and at close, and restored
on open, clipped to the recovered log: a stale checkpoint only lags, which is safe (the
leader tells followers the real one; a leader recomputes it from its followers). The
leader-epoch cache (`leader_epoch_cache`) records where each leader epoch starts; it is
checkpointed (`leader-epoch-checkpoint`) at every change, before the batches that carry a
new epoch are written, so that after a crash it can only hold too much, which loading clips
to the recovered log end. A leader appends with `append(..., leader_epoch=E)`; a follower
copies the leader's batches with `append_as_follower` (offsets and epochs kept) and reads
nothing itself, while the leader serves it with `read(..., up_to="log_end")`; a follower
whose log diverged cuts it with `truncate_to` (fsynced before it returns), and one whose log
ends below its leader's log start replaces it with an empty log starting there
(`truncate_fully_and_start_at`, Kafka's truncateFullyAndStartAt). That one change of many
files is made crash-safe by an intent file written first (`truncate-fully-and-start-at`,
holding the offset): loading finds it and completes the change.

Idempotent producers. The log keeps the state of its idempotent producers
(`producer_state.ProducerStateTable`): a leader's append is judged by it before anything is
written (a duplicate writes nothing and answers the original offsets), and every written
batch, a follower's too, updates it. It is snapshotted to `{offset:020d}.snapshot` (holding
the state of the batches below that offset, CRC-checked) at each roll and at a clean close,
the last 3 kept; loading and `truncate_to` rebuild it from the latest snapshot at or below the
log end and the batch headers after it (see `log_loader`), `truncate_fully_and_start_at`
clears it, retention drops the deleted batches from it, and compaction never rewrites a
producer's last batch (see `log_cleaner`).

All state changes happen in synchronous code in the trio thread; worker threads only run
blocking system calls on duplicated file descriptors (or on files they create themselves),
so closing or deleting a segment meanwhile cannot pull a descriptor from under them.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import pathlib
import shutil
import struct
import threading
from dataclasses import dataclass
from typing import Awaitable, Callable, Literal

import trio
from sortedcontainers import SortedDict

from protocol.errors import ProtocolError
from protocol.record_batch import (
    PARTITION_LEADER_EPOCH_POSITION,
    BatchHeader,
    ScannedBatch,
    scan_batches,
)

from .batch_scanner import pread_cached, read_batch_containing
from .checkpoint import fsync_directory, write_atomically, write_offset_checkpoint
from .errors import CorruptRecordError, OffsetOutOfRangeError, RecordTooLargeError, StorageError
from .fetch_slice import FetchSlice
from .fsync_runner import FsyncRunner
from .leader_epoch_cache import LeaderEpochCache
from .log_cleaner import (
    NOTHING_CLEANED,
    CleanedSegment,
    CleaningOutcome,
    CleaningPlan,
    CompactionAborted,
    CompactionResult,
    SegmentSource,
    clean_segments,
    discard_cleaned,
    finish_swap,
    swap_path,
)
from broker.limits import Limits

from .log_config import LogConfig
from .log_loader import (
    CLEAN_SHUTDOWN_FILE,
    HIGH_WATERMARK_FILE,
    LEADER_EPOCH_CHECKPOINT_FILE,
    RECOVERY_POINT_FILE,
    TRUNCATE_FULLY_FILE,
    LoadedProducerState,
    PRODUCER_SNAPSHOTS_KEPT,
    load_producer_state,
    load_segments,
    producer_snapshot_path,
    write_producer_snapshot,
)
from .producer_state import BatchMetadata, ProducerStateTable
from .segment import Segment

RECOVERY_POINT_INTERVAL_SECONDS = 10.0
OFFSET_MAX = 2**63 - 1
logger = logging.getLogger("dwal.storage")
_BASE_OFFSET = struct.Struct(">q")
_LEADER_EPOCH = struct.Struct(">i")
ReadLimit = Literal["high_watermark", "log_end"]


@dataclass(frozen=True, kw_only=True, slots=True)
class AppendInfo:
    """Where an append went: offsets of its first and last records. A `duplicate` (the
    retry of an idempotent producer's batch already in the log) wrote nothing: the offsets
    are those the batch got when it was first appended."""

    base_offset: int
    last_offset: int
    log_append_time: int
    log_start_offset: int
    duplicate: bool = False

    @classmethod
    def of_duplicate(cls, original: BatchMetadata, log_start_offset: int) -> AppendInfo:
        """The answer to a retried batch: the offsets `original` got, nothing written."""
        return cls(
            base_offset=original.first_offset,
            last_offset=original.last_offset,
            log_append_time=-1,
            log_start_offset=log_start_offset,
            duplicate=True,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class LogStatistics:
    log_start_offset: int
    log_end_offset: int
    high_watermark: int
    durable_offset: int
    size_bytes: int
    segment_count: int
    pending_sync_waiters: int
    latest_leader_epoch: int  # -1 while no batch carries one
    producer_count: int  # idempotent producers with state in the partition


class PartitionLog:
    """One partition's log in its own directory; see the module's theory of operation.

    Use from one trio thread only. Create with `PartitionLog.open`.
    """

    def __init__(
        self,
        directory: pathlib.Path,
        config: LogConfig,
        segments: list[Segment],
        *,
        fsync_runner: FsyncRunner | None = None,
        leader_epochs: LeaderEpochCache | None = None,
        high_watermark_managed_externally: bool = False,
        restored_high_watermark: int | None = None,
        producers: LoadedProducerState | None = None,
    ):
        self._directory = directory
        self._fsync_runner = fsync_runner
        self._config = config
        self._segments: SortedDict[int, Segment] = SortedDict(
            (segment.base_offset, segment) for segment in segments
        )
        self._active = segments[-1]
        self._size_bytes = sum(segment.size_bytes for segment in segments)
        end = self._active.next_offset
        self._durable_offset = end
        self._high_watermark = end
        self._high_watermark_segment = self._active
        self._high_watermark_position = self._active.size_bytes
        self._leader_epochs = leader_epochs if leader_epochs is not None else LeaderEpochCache()
        if producers is None:
            producers = LoadedProducerState(
                ProducerStateTable(producers_max=config.producers_max), [], False
            )
        self._set_producer_state(producers)
        self._high_watermark_managed_externally = high_watermark_managed_externally
        self.restored_high_watermark = restored_high_watermark
        if high_watermark_managed_externally:
            restored = self.log_start_offset
            if restored_high_watermark is not None:
                restored = min(max(restored_high_watermark, restored), end)
            self._place_high_watermark(restored)
        self._new_data_event = trio.Event()
        self._progress_event = trio.Event()
        self._truncation_generation = 0  # counts truncations (to an offset, or fully)
        self._full_truncations = 0  # counts truncate_fully_and_start_at calls
        self._sync_done: trio.Event | None = None
        self._unsynced_segments: list[Segment] = []  # rolled since the last fsync
        self._directory_changed = False  # a segment was created since the last fsync
        self._pending_sync_waiters = 0
        # (deletion time ms, paths) of segments renamed to .deleted, oldest first.
        self._pending_deletions: collections.deque[tuple[int, list[pathlib.Path]]] = (
            collections.deque()
        )
        self._last_checkpoint_time: float | None = None
        self._checkpoint_running = False
        # Segments below this offset were cleaned by the last compaction (kept in memory only:
        # after a restart the first compaction maps the whole log again).
        self._first_dirty_offset = self.log_start_offset
        self._compaction_lock = trio.Lock()
        self._cleaner_abort = threading.Event()  # set on close: stops a running cleaner
        self._failure: str | None = None
        self._closed = False
        # opened after an unclean shutdown: its segments past the recovery point were checked
        self.recovered_after_crash = False

    @classmethod
    def open(
        cls,
        directory: pathlib.Path,
        config: LogConfig,
        *,
        now_ms: int,
        fsync_runner: FsyncRunner | None = None,
        high_watermark_managed_externally: bool = False,
    ) -> PartitionLog:
        """Open the log in `directory` (created if missing), recovering it after a crash.
        Group-commit fsyncs run in `fsync_runner` while it runs (see `wait_durable`). With
        `high_watermark_managed_externally` the log starts in replica-managed mode (see
        `manage_high_watermark_externally`) at its checkpointed high watermark, clipped to
        [log start, log end] (the log start without a checkpoint); otherwise the high
        watermark starts at the log end, as everything is durable.

        Returns the log with everything in it durable. Raises StorageError. Blocking.
        """
        loaded = load_segments(directory, config, now_ms=now_ms)
        log = cls(
            directory,
            config,
            loaded.segments,
            fsync_runner=fsync_runner,
            leader_epochs=loaded.leader_epochs,
            high_watermark_managed_externally=high_watermark_managed_externally,
            restored_high_watermark=loaded.high_watermark,
            producers=loaded.producers,
        )
        log.recovered_after_crash = loaded.recovered_after_crash
        return log

    # Properties.

    @property
    def directory(self) -> pathlib.Path:
        return self._directory

    @property
    def config(self) -> LogConfig:
        return self._config

    @property
    def fsync_policy(self) -> str:
        return self._config.fsync

    @property
    def log_start_offset(self) -> int:
        return self._segments.peekitem(0)[0]

    @property
    def log_end_offset(self) -> int:
        """The offset the next appended record gets."""
        return self._active.next_offset

    @property
    def high_watermark(self) -> int:
        """Consumers may read offsets below this one."""
        return self._high_watermark

    @property
    def durable_offset(self) -> int:
        """Every offset below this one is fsynced."""
        return self._durable_offset

    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def new_data_event(self) -> trio.Event:
        """An event set (and then replaced by a fresh one) when the high watermark advances."""
        return self._new_data_event

    @property
    def progress_event(self) -> trio.Event:
        """An event set (and then replaced by a fresh one) whenever the log end offset or the
        durable offset moves (an append, an fsync completing, a truncation). The replica
        layer of a leader waits on it to recompute the high watermark: take the event, read
        the offsets, then `await event.wait()` - no change between the two can be missed."""
        return self._progress_event

    @property
    def high_watermark_managed_externally(self) -> bool:
        return self._high_watermark_managed_externally

    @property
    def leader_epochs(self) -> LeaderEpochCache:
        """The log's leader-epoch history. Read it only: the log changes it (appends,
        truncations, retention) and checkpoints every change."""
        return self._leader_epochs

    @property
    def latest_leader_epoch(self) -> int:
        """The epoch of the last batch that carried one, or -1."""
        return self._leader_epochs.latest_epoch

    def end_offset_for_leader_epoch(self, epoch: int) -> tuple[int, int]:
        """OffsetsForLeaderEpoch: (largest epoch <= `epoch`, its end offset); see
        `LeaderEpochCache.end_offset_for`. (-1, -1) when undefined."""
        return self._leader_epochs.end_offset_for(epoch, self.log_end_offset)

    def statistics(self) -> LogStatistics:
        return LogStatistics(
            log_start_offset=self.log_start_offset,
            log_end_offset=self.log_end_offset,
            high_watermark=self._high_watermark,
            durable_offset=self._durable_offset,
            size_bytes=self._size_bytes,
            segment_count=len(self._segments),
            pending_sync_waiters=self._pending_sync_waiters,
            latest_leader_epoch=self._leader_epochs.latest_epoch,
            producer_count=len(self._producers),
        )

    def update_config(self, config: LogConfig) -> None:
        """Apply new settings; they govern the next appends, rolls and retention passes."""
        self._config = config
        self._active.index_interval_bytes = config.index_interval_bytes
        if config.fsync != "always" and not self._high_watermark_managed_externally:
            self._advance_high_watermark(self.log_end_offset)

    # Appending.

    def append(
        self, batches: bytearray | memoryview, *, now_ms: int, leader_epoch: int = 0
    ) -> AppendInfo:
        """Append back-to-back record batches, assigning their offsets in place.

        Every batch is checked before anything is written. The active segment rolls between
        batches whenever the next one would not fit, so an append of any size is stored
        (across several segments if need be); only a single batch above segment.bytes or
        max.message.bytes is refused. An idempotent producer's batch (producer id >= 0) must
        come alone, and is judged by the producers' state (see `producer_state`): the retry
        of a batch still cached there writes nothing and returns the original offsets
        (`duplicate`). Returns where they went. Raises CorruptRecordError (bad length, magic
        or CRC), RecordTooLargeError (a batch above a limit; nothing written), or
        StorageError (the disk failed; the log is then offline, unless nothing was written),
        LeaderEpochError (`leader_epoch` is below the log's latest epoch; nothing written),
        InvalidRecordError, InvalidProducerEpochError, OutOfOrderSequenceError (nothing
        written).

        `leader_epoch` is stamped in every batch and, when it is new (above the latest),
        recorded in the leader-epoch cache at the first appended offset; the cache's
        checkpoint is written (blocking, once per new epoch) before the batches.
        """
        # patched in place: a bytearray, or a writable view (a received frame's tail)
        assert isinstance(batches, bytearray) or not batches.readonly
        assert -(2**31) <= leader_epoch < 2**31
        self._check_usable()
        scanned = self._validate(batches)
        base_offset = self.log_end_offset
        self._leader_epochs.check_assignable(leader_epoch, base_offset)
        original = self._producers.check_leader_append([batch.header for batch in scanned])
        if original is not None:
            return AppendInfo.of_duplicate(original, self.log_start_offset)
        headers = _assign_offsets(batches, scanned, base_offset, leader_epoch)
        self._update_leader_epochs(lambda cache: cache.assign(leader_epoch, base_offset))
        self._write_appended(memoryview(batches), headers, now_ms)
        return AppendInfo(
            base_offset=base_offset,
            last_offset=self.log_end_offset - 1,
            log_append_time=-1,
            log_start_offset=self.log_start_offset,
        )

    def append_as_follower(
        self, batches: bytes | bytearray | memoryview, *, now_ms: int
    ) -> AppendInfo:
        """Append batches copied from the leader as they are: their offsets and leader
        epochs are kept (nothing is patched), and each new epoch goes to the leader-epoch
        cache (checkpointed before the batches are written).

        Every batch is checked before anything is written, as by `append` (length, magic,
        CRC, sizes); offsets must strictly increase, and the first batch must start at the
        log end offset or after it (a gap only arises where compaction on the leader removed
        records; never an overlap). In replica-managed mode the high watermark does not move
        (the leader tells it); otherwise it moves as after `append`. Every batch updates the
        producers' state, unchecked, so that this log judges retries as the leader did once
        it leads. Returns the offsets of the first and last appended records. Raises
        CorruptRecordError, RecordTooLargeError, StorageError (offsets that overlap the log
        or go back; a failing disk, as `append`), LeaderEpochError (an epoch below the log's
        latest, or going back between batches).
        """
        self._check_usable()
        scanned = self._validate(batches)
        headers = [(batch.position, batch.header) for batch in scanned]
        self._check_follower_offsets(headers)
        epochs = LeaderEpochCache(self._leader_epochs.entries())
        for _, header in headers:
            epochs.assign(header.partition_leader_epoch, header.base_offset)  # may raise

        def assign_epochs(cache: LeaderEpochCache) -> bool:
            changed = False
            for _, header in headers:
                changed |= cache.assign(header.partition_leader_epoch, header.base_offset)
            return changed

        self._update_leader_epochs(assign_epochs)
        self._write_appended(memoryview(batches), headers, now_ms)
        return AppendInfo(
            base_offset=headers[0][1].base_offset,
            last_offset=headers[-1][1].last_offset,
            log_append_time=-1,
            log_start_offset=self.log_start_offset,
        )

    def _check_follower_offsets(self, headers: list[tuple[int, BatchHeader]]) -> None:
        """Raise StorageError unless the batches' offsets strictly increase from the log end
        offset on."""
        expected = self.log_end_offset
        for _, header in headers:
            if header.base_offset < expected:
                raise StorageError(
                    f"a follower append at offset {header.base_offset} overlaps "
                    f"{self._directory.name}, which expects offset {expected} or above"
                )
            expected = header.next_offset
        if expected > 2**63 - 1:
            raise StorageError(f"offset {expected - 1} is beyond the largest offset")

    def _write_appended(
        self, data: memoryview, headers: list[tuple[int, BatchHeader]], now_ms: int
    ) -> None:
        """Write the batches (offsets assigned), then publish them: the high watermark moves
        in the default mode unless fsync=always, and progress is signalled. Raises
        StorageError; a write that stored nothing drops the epochs it recorded."""
        end_before = self.log_end_offset
        try:
            self._write_rolling(data, headers, now_ms)
        except StorageError:
            if self._failure is None and self.log_end_offset == end_before:
                self._update_leader_epochs(lambda cache: cache.truncate_from_end(end_before))
            raise
        finally:
            if self.log_end_offset != end_before:
                self._signal_progress()
        if self._config.fsync != "always" and not self._high_watermark_managed_externally:
            self._advance_high_watermark(self.log_end_offset)

    def _update_leader_epochs(self, change: Callable[[LeaderEpochCache], bool]) -> None:
        """Apply `change` to the leader-epoch cache and, if it changed anything, write the
        checkpoint. Blocking (a small file, fsynced) but rare: once per new epoch or
        truncation. Raises StorageError (the log is then offline)."""
        if not change(self._leader_epochs):
            return
        try:
            write_atomically(
                self._directory / LEADER_EPOCH_CHECKPOINT_FILE,
                self._leader_epochs.checkpoint_bytes(),
            )
        except OSError as error:
            raise self._fail(f"cannot write the leader-epoch checkpoint: {error}") from error

    def _signal_progress(self) -> None:
        self._progress_event.set()
        self._progress_event = trio.Event()

    # The idempotent producers' state.

    @property
    def producer_state(self) -> ProducerStateTable:
        """The idempotent producers of the batches in the log. Read it only: the log changes
        it (appends, truncations, retention, `expire_producers`)."""
        return self._producers

    def expire_producers(self, now_ms: int) -> int:
        """Forget the idempotent producers whose last batch's max timestamp is
        producer_id_expiration_ms old at `now_ms` (a batch of theirs is then accepted at any
        sequence). Returns how many were forgotten. Snapshots written from now on leave them
        out; a crash (or a truncation) may bring back those forgotten since the snapshot it
        rebuilds from, until this is called again."""
        self._check_usable()
        return self._producers.expire(now_ms, self._config.producer_id_expiration_ms)

    def _set_producer_state(self, loaded: LoadedProducerState) -> None:
        self._producers = loaded.table
        self._snapshot_offsets = list(loaded.snapshot_offsets)  # of the files, ascending
        # The table's version when the latest snapshot was written (or loaded, if it holds
        # the table as it is); None when that snapshot does not hold it.
        self._snapshot_version = loaded.table.version if loaded.snapshot_is_current else None

    def _write_producer_snapshot(self, offset: int) -> None:
        """Write the snapshot of the producers' state at `offset` (the log end), unless the
        latest one holds it already, and delete those beyond the last
        PRODUCER_SNAPSHOTS_KEPT. Blocking (a small file, fsynced). Raises OSError."""
        offsets = self._snapshot_offsets
        assert not offsets or offsets[-1] <= offset, "a snapshot above the log end"
        if offsets and offsets[-1] == offset and self._snapshot_version == self._producers.version:
            return
        write_producer_snapshot(self._directory, offset, self._producers)
        if not offsets or offsets[-1] != offset:
            offsets.append(offset)
        self._snapshot_version = self._producers.version
        while len(offsets) > PRODUCER_SNAPSHOTS_KEPT:
            producer_snapshot_path(self._directory, offsets.pop(0)).unlink(missing_ok=True)

    def _reload_producer_state(self) -> None:
        """Rebuild the producers' state from the latest snapshot at or below the log end and
        the batches after it (deleting the snapshots above the end, durably). Blocking.
        Raises OSError, StorageError."""
        self._set_producer_state(
            load_producer_state(
                self._directory,
                list(self._segments.values()),
                self._snapshot_offsets,
                producers_max=self._producers.producers_max,
            )
        )

    def _validate(self, batches: bytes | bytearray | memoryview) -> list[ScannedBatch]:
        """Return the scanned batches. Raises CorruptRecordError or RecordTooLargeError."""
        if not batches:
            raise CorruptRecordError("an append needs at least one record batch")
        scanned = []
        try:
            for batch in scan_batches(batches):
                self._check_batch_size(batch.header.size_bytes)
                scanned.append(batch)
        except ProtocolError as error:
            raise CorruptRecordError(str(error)) from None
        return scanned

    def _check_batch_size(self, size_bytes: int) -> None:
        for limit, name in (
            (self._config.max_message_bytes, "max.message.bytes"),
            (self._config.segment_bytes, "segment.bytes"),
        ):
            if size_bytes > limit:
                raise RecordTooLargeError(
                    f"a record batch of {size_bytes} bytes exceeds {name} ({limit})"
                )

    def _write_rolling(
        self, data: memoryview, headers: list[tuple[int, BatchHeader]], now_ms: int
    ) -> None:
        """Write the batches (offsets assigned) to the active segment, rolling before a batch
        that would overfill it (or the first one, when the segment is old). Each run of
        batches that fits goes in one write. Raises StorageError."""
        run_start = 0  # position in `data` of the first batch not yet written
        run: list[tuple[int, BatchHeader]] = []  # (position in the run, header)
        for position, header in headers:
            fill = self._active.size_bytes + position - run_start
            if (
                fill > 0
                and (
                    fill + header.size_bytes > self._config.segment_bytes
                    or (position == 0 and self._is_old(self._active, now_ms))
                )
            ) or not self._active.fits_offsets(header.last_offset):
                self._write_run(data[run_start:position], run, now_ms, partial=run_start > 0)
                self._roll(header.base_offset)  # a follower's batch may follow a gap
                run_start, run = position, []
            run.append((position - run_start, header))
        self._write_run(data[run_start:], run, now_ms, partial=run_start > 0)

    def _write_run(
        self,
        data: memoryview,
        headers: list[tuple[int, BatchHeader]],
        now_ms: int,
        *,
        partial: bool,
    ) -> None:
        """Append whole batches to the active segment. Raises StorageError; the log goes
        offline if the write failed after earlier batches of the same append (`partial`) went
        to disk, or if the segment may be torn."""
        if not data:
            return
        try:
            self._active.append(data, headers)
        except StorageError as error:
            if partial:
                raise self._fail(f"an append was cut short: {error}") from error
            raise
        except OSError as error:
            raise self._fail(f"cannot append to {self._active.log_path}: {error}") from error
        for _, header in headers:
            self._producers.record(header)
        if self._active.rolling_baseline_ms is None:
            self._active.rolling_baseline_ms = now_ms
        self._size_bytes += len(data)

    def _is_old(self, segment: Segment, now_ms: int) -> bool:
        baseline = segment.rolling_baseline_ms
        return baseline is not None and now_ms - baseline > self._config.segment_ms

    def roll_if_due(self, now_ms: int) -> bool:
        """Roll a non-empty active segment older than segment.ms, so that retention can
        reclaim it even when no append comes. Returns True if it rolled. Raises StorageError."""
        self._check_usable()
        if self._active.size_bytes == 0 or not self._is_old(self._active, now_ms):
            return False
        self._roll()
        return True

    def _roll(self, base_offset: int | None = None) -> None:
        """Start a new active segment at `base_offset` (by default the log end offset), after
        a producer-state snapshot at the log end. Raises StorageError."""
        previous = self._active
        try:
            previous.finalize()
            self._write_producer_snapshot(previous.next_offset)
            segment = Segment.create(
                self._directory,
                previous.next_offset if base_offset is None else base_offset,
                index_interval_bytes=self._config.index_interval_bytes,
            )
        except OSError as error:
            raise self._fail(f"cannot roll {previous.log_path}: {error}") from error
        self._segments[segment.base_offset] = segment
        self._active = segment
        self._unsynced_segments.append(previous)
        self._directory_changed = True

    # Durability.

    async def wait_durable(self, offset: int) -> None:
        """Return once every offset below `offset` is fsynced (`durable_offset >= offset`).

        Concurrent callers share fsyncs. Raises StorageError if an fsync fails, or if a
        truncation meanwhile removed offsets below `offset` (`truncate_to` above its new end,
        `truncate_fully_and_start_at` any: none of them is kept). Safe to
        cancel, and with an `FsyncRunner` running a cancelled caller returns at once: the
        fsync runs in the runner's task, completes and counts for the callers still waiting.
        Without a runner the caller that starts an fsync runs it, and a thread call cannot be
        abandoned, so that caller returns only once the disk has answered.
        """
        assert offset <= self.log_end_offset, "cannot wait for offsets not yet appended"
        generation = self._truncation_generation
        full_truncations = self._full_truncations
        removable = offset > self.log_start_offset  # a full truncation would remove some
        self._pending_sync_waiters += 1
        try:
            if self._durable_offset >= offset:
                await trio.lowlevel.checkpoint()
            while True:
                if removable and self._full_truncations != full_truncations:
                    raise StorageError(
                        f"offset {offset - 1} of {self._directory.name} was removed: the log "
                        f"was truncated fully and starts at offset {self.log_start_offset}"
                    )
                if self._durable_offset >= offset:
                    break
                self._check_usable()
                if self._truncation_generation != generation:
                    # truncate_to makes everything it keeps durable: `offset` was removed
                    raise StorageError(
                        f"offset {offset - 1} of {self._directory.name} was truncated away"
                    )
                if self._sync_done is None:
                    sync = self._begin_sync()
                    if self._fsync_runner is None or not self._fsync_runner.start_soon(
                        functools.partial(sync, raise_errors=False)
                    ):
                        await sync(raise_errors=True)
                        continue
                assert self._sync_done is not None
                await self._sync_done.wait()
        finally:
            self._pending_sync_waiters -= 1

    def _begin_sync(self) -> Callable[..., Awaitable[None]]:
        """Capture what the next fsync covers (everything appended so far, with descriptors
        of its files taken now, in the trio thread) and return the coroutine function that
        runs it. Callers arriving meanwhile wait on `_sync_done`. Raises StorageError."""
        done = self._sync_done = trio.Event()
        generation = self._truncation_generation
        target_offset = self.log_end_offset
        target_segment, target_position = self._active, self._active.size_bytes
        rolled = [segment for segment in self._unsynced_segments if not segment.is_closed]
        directory_changed = self._directory_changed
        self._unsynced_segments, self._directory_changed = [], False
        descriptors: list[int] = []

        def finish(synced: bool) -> None:
            for descriptor in descriptors:
                os.close(descriptor)
            descriptors.clear()
            if not synced:  # cancelled before the thread started, or failed
                self._unsynced_segments[:0] = rolled
                self._directory_changed |= directory_changed
            self._sync_done = None
            done.set()

        try:
            for segment in (*rolled, target_segment):
                descriptors.append(os.dup(segment.log_fd))
        except OSError as error:
            finish(False)
            raise self._fail(f"cannot fsync {self._directory}: {error}") from error

        async def sync(*, raise_errors: bool) -> None:
            synced = False
            try:
                await trio.to_thread.run_sync(
                    _sync_files,
                    list(descriptors),
                    rolled,
                    self._directory if directory_changed else None,
                )
                synced = True
                if generation == self._truncation_generation:  # else what it covered may be gone
                    self._mark_durable(target_offset, target_segment, target_position)
            except OSError as error:
                failure = self._fail(f"cannot fsync {self._directory}: {error}")
                if raise_errors:
                    raise failure from error
                # run by the FsyncRunner: the log is now offline, and its waiters raise that
            finally:
                finish(synced)

        return sync

    def _mark_durable(self, offset: int, segment: Segment, position: int) -> None:
        if offset > self._durable_offset:
            self._durable_offset = offset
            self._signal_progress()
        if self._config.fsync == "always" and not self._high_watermark_managed_externally:
            self._advance_high_watermark(offset, segment, position)

    def _advance_high_watermark(
        self, offset: int, segment: Segment | None = None, position: int | None = None
    ) -> None:
        """Move the high watermark forward to `offset`, which lies at `position` of
        `segment` (by default: the end of the active segment), and wake fetchers."""
        if offset <= self._high_watermark:
            return
        self._high_watermark = offset
        self._high_watermark_segment = segment or self._active
        self._high_watermark_position = (
            position if position is not None else self._high_watermark_segment.size_bytes
        )
        self._new_data_event.set()
        self._new_data_event = trio.Event()

    # The high watermark in replica-managed mode.

    def manage_high_watermark_externally(self, *, high_watermark: int | None = None) -> None:
        """Switch to replica-managed mode: from now on appends and fsyncs never move the
        high watermark; only `set_high_watermark` (forward) and the truncations do
        (`truncate_to` back, `truncate_fully_and_start_at` to its offset). `high_watermark`,
        if given, is where it starts (clipped to [log start, log end]; it may be below the
        current one: a log opened in the default mode whose replica layer restores
        `restored_high_watermark`); otherwise it stays where it is. Idempotent."""
        self._high_watermark_managed_externally = True
        if high_watermark is not None:
            offset = min(max(high_watermark, self.log_start_offset), self.log_end_offset)
            self._place_high_watermark(offset)

    def set_high_watermark(self, offset: int) -> int:
        """Move the high watermark forward to `offset`, clipped to the log end offset (never
        back: a lower offset changes nothing), and wake the fetchers waiting on
        `new_data_event`. Replica-managed mode only. Returns the high watermark. Reads the
        batch headers from the closest index entry when `offset` is not the log end. The
        checkpoint is written by `flush`, `write_high_watermark_checkpoint` and `close`.
        After `close` it changes nothing (a replica task may outlive the log briefly)."""
        assert self._high_watermark_managed_externally, "the log manages its high watermark"
        if self._closed:
            return self._high_watermark
        offset = min(offset, self.log_end_offset)
        if offset > self._high_watermark:
            self._place_high_watermark(offset)
            self._new_data_event.set()
            self._new_data_event = trio.Event()
        return self._high_watermark

    def _place_high_watermark(self, offset: int) -> None:
        """Put the high watermark at `offset` (forward or back) with its file position: the
        start of the batch holding it (a batch straddling it is not readable yet)."""
        assert self.log_start_offset <= offset <= self.log_end_offset
        self._high_watermark = offset
        if offset == self.log_end_offset:
            segment, position = self._active, self._active.size_bytes
        else:
            segment = self._segment_holding(offset)
            found = segment.find_batch(offset, segment.size_bytes)
            position = segment.size_bytes if found is None else found[0]
        self._high_watermark_segment = segment
        self._high_watermark_position = position

    async def write_high_watermark_checkpoint(self) -> None:
        """Record the high watermark in the `high-watermark` file (in a worker thread).
        Raises StorageError. Safe to cancel (the write then completes unseen)."""
        self._check_usable()
        path = self._directory / HIGH_WATERMARK_FILE
        try:
            await trio.to_thread.run_sync(write_offset_checkpoint, path, self._high_watermark)
        except OSError as error:
            raise StorageError(f"cannot checkpoint {self._directory}: {error}") from error

    async def flush(self) -> None:
        """Make the whole log durable (`wait_durable(log_end_offset)`), then record the
        recovery point and the high watermark if they were last recorded 10 s ago or more.
        Raises StorageError."""
        await self.wait_durable(self.log_end_offset)
        now = trio.current_time()
        last = self._last_checkpoint_time
        if self._checkpoint_running or (
            last is not None and now - last < RECOVERY_POINT_INTERVAL_SECONDS
        ):
            return
        self._checkpoint_running = True
        try:
            await trio.to_thread.run_sync(
                _write_checkpoints, self._directory, self._durable_offset, self._high_watermark
            )
            self._last_checkpoint_time = now
        except OSError as error:
            raise StorageError(
                f"cannot write the recovery point of {self._directory}: {error}"
            ) from error
        finally:
            self._checkpoint_running = False

    # Truncation.

    def truncate_to(self, offset: int) -> None:
        """Remove every batch at or after `offset`, which must be a batch's base offset, the
        log end (nothing to do), or an offset in a gap left by compaction (the log then ends
        after the last batch before it). The later segments are deleted (renamed `.deleted`,
        removed by `delete_pending_files`), the segment holding `offset` is cut and becomes
        the active one, its indexes keep their entries below `offset` and are rewritten;
        then everything left is fsynced (log files, indexes, directory), so the durable
        offset and the recovery point become the new log end. The leader-epoch cache drops
        the epochs starting at or after the new end, and the high watermark comes down to
        it if it was above (the one way it goes back); both checkpoints are written. The
        producers' state is rebuilt from the latest snapshot at or below the new end and the
        batch headers after it; the snapshots above the end are deleted.

        An fsync already running when truncation starts no longer counts; `wait_durable`
        callers waiting for removed offsets raise StorageError; a compaction running meanwhile
        installs nothing. Readers holding slices of removed batches may see them cut short.

        Raises OffsetOutOfRangeError outside [log_start_offset, log_end_offset], StorageError
        for an offset inside a batch (nothing is changed), or a failing disk (the log is then
        offline). Blocking: ftruncate and a few fsyncs; call it only when logs diverge.
        """
        self._check_usable()
        self._check_in_range(offset)
        if offset == self.log_end_offset:
            return
        segment = self._segment_holding(offset)
        found = segment.find_batch(offset, segment.size_bytes)
        position, cut_offset = segment.size_bytes, offset
        if found is not None:
            position, header = found
            if header.base_offset < offset:
                raise StorageError(
                    f"cannot truncate {self._directory.name} to offset {offset}: it is inside "
                    f"the batch of offsets {header.base_offset}-{header.last_offset}"
                )
            cut_offset = header.base_offset
        self._truncation_generation += 1
        try:
            self._cut_segments(segment, position, cut_offset)
            self._sync_after_truncation()
            self._reload_producer_state()
        except (OSError, StorageError) as error:
            raise self._fail(f"cannot truncate to offset {offset}: {error}") from error
        end = self.log_end_offset
        self._durable_offset = end
        self._first_dirty_offset = min(self._first_dirty_offset, end)
        self._update_leader_epochs(lambda cache: cache.truncate_from_end(end))
        self._place_high_watermark(min(self._high_watermark, end))
        if not self._high_watermark_managed_externally:
            self._advance_high_watermark(end)  # everything left is durable
        try:
            _write_checkpoints(self._directory, end, self._high_watermark)
        except OSError as error:
            raise self._fail(f"cannot checkpoint after truncation: {error}") from error
        self._signal_progress()

    def _cut_segments(self, segment: Segment, position: int, cut_offset: int) -> None:
        """Delete the segments after `segment`, cut it at `position` (where `cut_offset`
        starts) and make it the active segment. Raises OSError, StorageError."""
        for base_offset in list(self._segments.irange(minimum=segment.base_offset + 1)):
            self._remove_segment(self._segments[base_offset], now_ms=0)
        self._size_bytes -= segment.size_bytes
        segment.truncate_to(position, cut_offset)
        self._size_bytes += segment.size_bytes
        if segment in self._unsynced_segments:
            self._unsynced_segments.remove(segment)
        segment.activate()
        self._active = segment
        self._directory_changed = True

    def _sync_after_truncation(self) -> None:
        """fsync every segment not yet synced, the cut one and the directory. Blocking."""
        for segment in (*self._unsynced_segments, self._active):
            if not segment.is_closed:
                os.fdatasync(segment.log_fd)
                segment.sync_index_files()
        fsync_directory(self._directory)
        self._unsynced_segments, self._directory_changed = [], False

    def truncate_fully_and_start_at(self, offset: int) -> None:
        """Replace the whole log with an empty one starting at `offset` (Kafka's
        truncateFullyAndStartAt): what a follower does when its log ends below its leader's
        log start, whose records below were deleted by retention there. Every segment is
        deleted (renamed `.deleted`, removed by `delete_pending_files`) and one empty active
        segment starts at `offset` (the one already based there, emptied, if any), so that
        the log start, log end, durable offset and high watermark are all `offset` (the high
        watermark moves forward or back to it, in either mode). The leader-epoch cache and
        the producers' state are cleared (their snapshots deleted); both checkpoints and the
        recovery point are written; everything is fsynced
        (files and directory) before it returns.

        Crash-safe: the intent file (`truncate-fully-and-start-at`, holding `offset`) is
        written durably before anything else changes and removed last, and loading completes
        an interrupted change, so a reopened log is either the old one or the new empty one.

        An fsync already running no longer counts; `wait_durable` callers waiting for
        offsets above the old log start raise StorageError; a compaction running meanwhile
        installs nothing; new-data and progress waiters are woken.

        Raises OffsetOutOfRangeError for an offset outside [0, 2**63 - 1] (nothing changes),
        StorageError (closed or offline; a failing disk takes the log offline, and reopening
        it completes the change). Blocking: renames, a few small files and fsyncs.
        """
        self._check_usable()
        if not 0 <= offset <= OFFSET_MAX:
            raise OffsetOutOfRangeError(
                f"cannot start {self._directory.name} at offset {offset}: not in [0, {OFFSET_MAX}]"
            )
        self._truncation_generation += 1
        self._full_truncations += 1
        intent = self._directory / TRUNCATE_FULLY_FILE
        try:
            write_offset_checkpoint(intent, offset)  # from here on, reopening gives the new log
            self._replace_segments_with_empty(offset)
            for snapshot_offset in self._snapshot_offsets:
                producer_snapshot_path(self._directory, snapshot_offset).unlink(missing_ok=True)
            self._set_producer_state(
                LoadedProducerState(
                    ProducerStateTable(producers_max=self._producers.producers_max), [], False
                )
            )
            self._sync_after_truncation()
            self._update_leader_epochs(lambda cache: cache.truncate_from_end(0))
            _write_checkpoints(self._directory, offset, offset)
            intent.unlink()
            fsync_directory(self._directory)
        except (OSError, StorageError) as error:
            raise self._fail(
                f"cannot truncate fully and start at offset {offset}: {error}"
            ) from error
        self._durable_offset = offset
        self._first_dirty_offset = offset
        self._place_high_watermark(offset)
        self._new_data_event.set()
        self._new_data_event = trio.Event()
        self._signal_progress()

    def _replace_segments_with_empty(self, offset: int) -> None:
        """Make an empty active segment at `offset` (emptying the one based there, or
        creating it) and delete every other segment; the log always keeps a segment.
        Raises OSError, StorageError."""
        kept = self._segments.get(offset)
        if kept is None:
            kept = Segment.create(
                self._directory, offset, index_interval_bytes=self._config.index_interval_bytes
            )
            self._segments[offset] = kept
        else:
            kept.truncate_to(0, offset)
            kept.activate()
        self._directory_changed = True
        for base_offset in list(self._segments):
            if base_offset != offset:
                self._remove_segment(self._segments[base_offset], now_ms=0)
        if kept in self._unsynced_segments:
            self._unsynced_segments.remove(kept)
        self._active = kept
        self._size_bytes = 0

    # Reading.

    def read(
        self, fetch_offset: int, max_bytes: int, *, up_to: ReadLimit = "high_watermark"
    ) -> FetchSlice:
        """Return a slice of one segment starting at the batch holding `fetch_offset` (or the
        first batch after it, when compaction removed it).

        The slice holds whole batches up to `max_bytes`, except that the first batch is
        always whole and the last one may be cut short; it never goes past `up_to`: the
        high watermark (consumers) or the log end (followers: everything appended, durable
        or not). It is empty from that limit to the log end (a consumer at or above the high
        watermark waits for it). The caller must `close()` it. Raises OffsetOutOfRangeError
        outside [log_start_offset, log_end_offset], StorageError if the file is
        inconsistent.
        """
        assert max_bytes >= 0 and not self._closed
        assert up_to in ("high_watermark", "log_end")
        self._check_in_range(fetch_offset)
        limit = self._high_watermark if up_to == "high_watermark" else self.log_end_offset
        if fetch_offset >= limit:
            return FetchSlice.empty()
        first_base = self._segment_holding(fetch_offset).base_offset
        for base_offset in self._segments.irange(minimum=first_base):
            if base_offset >= limit:
                break
            segment = self._segments[base_offset]
            end = self._readable_end(segment) if up_to == "high_watermark" else segment.size_bytes
            # An offset in a gap left by compaction reads from the next batch, maybe in the
            # next segment. None at all below the high watermark only when compaction removed
            # the end of the segment that holds the high watermark: the slice is then empty.
            found = segment.find_batch(max(fetch_offset, base_offset), end)
            if found is not None:
                position, header = found
                length = min(end - position, max(max_bytes, header.size_bytes))
                return FetchSlice(fd=os.dup(segment.log_fd), position=position, length=length)
        return FetchSlice.empty()

    async def read_batch_containing(self, offset: int) -> bytes | None:
        """Return the whole record batch holding `offset` (base_offset <= offset <=
        last_offset), its CRC checked, or None when no batch holds it any more (compaction
        removed the record).

        Finds the segment by bisection and the scan start in its offset index (in memory),
        then reads batch headers from there and only the one batch: on the event loop when
        every byte of it is in the page cache (reads that never wait for the disk), else in
        a worker thread.

        Raises OffsetOutOfRangeError outside [log_start_offset, high_watermark),
        CorruptRecordError when the stored batch or a header before it is damaged (the log is
        left as it is), OSError. Safe to cancel: the thread then finishes its read unseen.
        """
        assert not self._closed
        if offset < 0:
            raise OffsetOutOfRangeError(f"offset {offset} is negative")
        start = self.log_start_offset
        if offset < start:
            raise OffsetOutOfRangeError(
                f"offset {offset} was deleted by retention; the log now starts at offset {start}"
            )
        if offset >= self._high_watermark:
            raise OffsetOutOfRangeError(
                f"offset {offset} has not been written yet (high watermark {self._high_watermark})"
            )
        segment = self._segment_holding(offset)
        read = functools.partial(
            read_batch_containing,
            start=segment.index_position(offset),
            end=self._readable_end(segment),
            offset=offset,
            file_name=f"{self._directory.name}/{segment.log_path.name}",
        )
        try:
            batch = read(segment.log_fd, read=pread_cached)
        except BlockingIOError:  # not in the page cache (or large): read in a worker thread
            pass
        else:
            await trio.lowlevel.checkpoint()
            return batch
        descriptor = os.dup(segment.log_fd)  # the segment may be deleted meanwhile
        try:
            return await trio.to_thread.run_sync(read, descriptor)
        finally:
            os.close(descriptor)

    def _check_in_range(self, offset: int) -> None:
        if not self.log_start_offset <= offset <= self.log_end_offset:
            raise OffsetOutOfRangeError(
                f"offset {offset} is outside [{self.log_start_offset}, {self.log_end_offset}]"
                f" in {self._directory.name}"
            )

    def _segment_holding(self, offset: int) -> Segment:
        index = self._segments.bisect_right(offset) - 1
        assert index >= 0
        return self._segments.peekitem(index)[1]

    def _readable_end(self, segment: Segment) -> int:
        """Position up to which `segment` holds offsets below the high watermark."""
        if segment is self._high_watermark_segment:
            return self._high_watermark_position
        if segment.base_offset >= self._high_watermark:
            return 0  # a segment after the high watermark's one
        return segment.size_bytes

    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None:
        """Return (base offset, max_timestamp) of the first batch below the high watermark
        whose max_timestamp >= `timestamp_ms`, or None if there is none."""
        assert not self._closed
        for segment in self._segments.values():
            if segment.base_offset >= self._high_watermark:
                break
            if segment.max_timestamp < timestamp_ms:
                continue
            header = segment.find_timestamp(timestamp_ms, self._readable_end(segment))
            if header is not None:
                return header.base_offset, header.max_timestamp
        return None

    # Retention.

    def apply_retention(self, now_ms: int) -> int:
        """Delete the oldest closed segments past retention.ms or beyond retention.bytes,
        never the active one nor one holding offsets at or above the high watermark, when
        cleanup.policy includes delete (never under compact alone). The producers' state
        forgets the deleted batches (and the producers left without any).

        Returns how many segments were removed; their files are renamed to `.deleted` and
        removed by `delete_pending_files`. Raises StorageError.
        """
        self._check_usable()
        if not self._config.deletes_old_segments:
            return 0
        removed = 0
        while len(self._segments) > 1:
            oldest = self._segments.peekitem(0)[1]
            next_base = self._segments.peekitem(1)[0]
            if next_base > self._high_watermark or not self._is_expired(oldest, now_ms):
                break
            self._remove_segment(oldest, now_ms)
            removed += 1
        if removed:
            start = self.log_start_offset
            self._update_leader_epochs(lambda cache: cache.truncate_from_start(start))
            self._producers.truncate_head(start)
            self._delete_producer_snapshots_below(start)
        return removed

    def _delete_producer_snapshots_below(self, offset: int) -> None:
        """Delete the snapshots below `offset` (the log start): their batches are gone, so
        loading could not go on from them. Raises StorageError."""
        while self._snapshot_offsets and self._snapshot_offsets[0] < offset:
            path = producer_snapshot_path(self._directory, self._snapshot_offsets[0])
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                raise self._fail(f"cannot delete {path}: {error}") from error
            del self._snapshot_offsets[0]

    def _is_expired(self, segment: Segment, now_ms: int) -> bool:
        retention_ms = self._config.retention_ms
        retention_bytes = self._config.retention_bytes
        too_old = retention_ms >= 0 and segment.max_timestamp < now_ms - retention_ms
        too_big = retention_bytes >= 0 and self._size_bytes - segment.size_bytes >= retention_bytes
        return too_old or too_big

    def _remove_segment(self, segment: Segment, now_ms: int) -> None:
        del self._segments[segment.base_offset]
        self._size_bytes -= segment.size_bytes
        if segment in self._unsynced_segments:
            self._unsynced_segments.remove(segment)
        try:
            paths = segment.rename_to_deleted()
        except OSError as error:
            raise self._fail(f"cannot delete {segment.log_path}: {error}") from error
        self._pending_deletions.append((now_ms + self._config.file_delete_delay_ms, paths))

    def delete_pending_files(self, now_ms: int | None = None) -> int:
        """Remove the `.deleted` files whose file.delete.delay.ms has passed at `now_ms`
        (all of them when None). Returns how many files were removed. Blocking: may be run
        in a worker thread. Raises OSError."""
        removed = 0
        pending = self._pending_deletions
        while pending and (now_ms is None or pending[0][0] <= now_ms):
            _, paths = pending.popleft()
            for path in paths:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # Compaction.

    @property
    def compaction_dirty_bytes(self) -> int:
        """Bytes of the closed segments below the high watermark that no compaction has
        covered yet; 0 unless cleanup.policy includes compact. Compaction is due when > 0."""
        if not self._config.compacts:
            return 0
        bases = self._segments.keys()
        first_dirty = max(self._first_dirty_offset, self.log_start_offset)
        dirty_bytes = 0
        first = max(self._segments.bisect_right(first_dirty) - 1, 0)
        for number in range(first, len(bases) - 1):
            if bases[number + 1] > self._high_watermark:
                break
            dirty_bytes += self._segments[bases[number]].size_bytes
        return dirty_bytes

    async def compact(
        self, now_ms: int, *, keys_max: int = Limits().cleaner_keys_max
    ) -> CompactionResult:
        """Keep only the last record of each key in the closed segments below the high
        watermark (see `log_cleaner`), if cleanup.policy includes compact; `now_ms` dates
        tombstones against delete.retention.ms. Offsets, the log start and end offsets do not
        change. Runs one compaction at a time (callers wait their turn); appends and reads go
        on meanwhile.

        Returns what was cleaned (nothing if the log closed meanwhile). Raises StorageError
        (a damaged segment, a failing disk: the log stays usable). Safe to cancel: a cleaner
        thread already started runs to the end and its result is installed or discarded.
        """
        self._check_usable()
        if not self._config.compacts:
            await trio.lowlevel.checkpoint()
            return NOTHING_CLEANED
        async with self._compaction_lock:
            self._check_usable()
            originals = list(self._segments.values())
            generation = self._truncation_generation
            plan = self._plan_compaction(now_ms, keys_max)
            if plan is None:
                return NOTHING_CLEANED
            try:
                outcome = await trio.to_thread.run_sync(clean_segments, plan, self._cleaner_abort)
            except CompactionAborted:
                return NOTHING_CLEANED
            except (OSError, StorageError) as error:
                if self._closed or generation != self._truncation_generation:
                    return NOTHING_CLEANED  # closed, or truncated under the cleaner's reads
                raise StorageError(f"cannot compact {self._directory}: {error}") from error
            finally:
                for source in plan.sources:
                    os.close(source.fd)
            if generation != self._truncation_generation:  # truncate_to changed the segments
                for cleaned in outcome.cleaned:
                    discard_cleaned(self._directory, cleaned)
                return NOTHING_CLEANED
            return self._install_cleaned(plan, originals, outcome)

    def _plan_compaction(self, now_ms: int, keys_max: int) -> CleaningPlan | None:
        """Snapshot what a compaction reads, with duplicated descriptors; None when no
        closed segment lies wholly below the high watermark."""
        segments = list(self._segments.values())
        clean_count = 0
        while (
            clean_count + 1 < len(segments)
            and segments[clean_count + 1].base_offset <= self._high_watermark
        ):
            clean_count += 1
        if clean_count == 0:
            return None
        first_dirty = max(self._first_dirty_offset, self.log_start_offset)
        dirty_index = min(self._segments.bisect_right(first_dirty) - 1, clean_count)
        sources: list[SegmentSource] = []
        try:
            for number, segment in enumerate(segments):
                last = number + 1 == len(segments)
                end_position = (
                    segment.size_bytes if number < clean_count else self._readable_end(segment)
                )
                if number >= clean_count and end_position == 0:
                    continue
                end_offset = segment.next_offset if last else segments[number + 1].base_offset
                sources.append(
                    SegmentSource(
                        base_offset=segment.base_offset,
                        fd=os.dup(segment.log_fd),
                        end_position=end_position,
                        end_offset=end_offset,
                    )
                )
        except OSError as error:
            for source in sources:
                os.close(source.fd)
            raise StorageError(f"cannot compact {self._directory}: {error}") from error
        return CleaningPlan(
            directory=self._directory,
            sources=tuple(sources),
            clean_count=clean_count,
            dirty_index=dirty_index,
            delete_horizon_ms=now_ms - self._config.delete_retention_ms,
            keys_max=keys_max,
            index_interval_bytes=self._config.index_interval_bytes,
            retained_batch_offsets=self._producers.last_batch_offsets(),
        )

    def _install_cleaned(
        self, plan: CleaningPlan, originals: list[Segment], outcome: CleaningOutcome
    ) -> CompactionResult:
        """Swap each compacted copy in for the segment it was made from, unless that segment
        is gone (retention deleted it, the log closed): that copy is discarded. Returns what
        was installed. Raises StorageError if a rename failed (that copy is discarded)."""
        by_base = {segment.base_offset: segment for segment in originals}
        installed: list[CleanedSegment] = []
        failure: OSError | None = None
        for cleaned in outcome.cleaned:
            original = by_base[cleaned.base_offset]
            if self._closed or self._segments.get(cleaned.base_offset) is not original:
                discard_cleaned(self._directory, cleaned)
                continue
            try:
                os.rename(swap_path(self._directory, cleaned.base_offset), original.log_path)
            except OSError as error:
                discard_cleaned(self._directory, cleaned)
                failure = error
                continue
            self._replace_segment(original, cleaned.segment)
            finish_swap(self._directory, cleaned.base_offset)
            installed.append(cleaned)
        if failure is not None:
            raise StorageError(f"cannot compact {self._directory}: {failure}") from failure
        if outcome.clean_count:
            cleaned_end = plan.sources[outcome.clean_count - 1].end_offset
            self._first_dirty_offset = max(self._first_dirty_offset, cleaned_end)
        if outcome.key_limit_reached and outcome.clean_count <= plan.dirty_index:
            logger.warning(
                "%s: compaction cannot progress: segment %d holds more than %d keys",
                self._directory,
                plan.sources[plan.dirty_index].base_offset,
                plan.keys_max,
            )
        return CompactionResult(
            segments_cleaned=len(installed),
            records_removed=sum(cleaned.records_removed for cleaned in installed),
            bytes_before=sum(cleaned.bytes_before for cleaned in installed),
            bytes_after=sum(cleaned.segment.size_bytes for cleaned in installed),
        )

    def _replace_segment(self, original: Segment, compacted: Segment) -> None:
        """Put `compacted` (already durable, already renamed to the segment's log file) in
        place of `original`, and close `original` (readers hold their own descriptors)."""
        self._segments[original.base_offset] = compacted
        self._size_bytes += compacted.size_bytes - original.size_bytes
        if original in self._unsynced_segments:
            self._unsynced_segments.remove(original)
        if self._high_watermark_segment is original:
            # Only a segment wholly below the high watermark is compacted: it ends there.
            self._high_watermark_segment = compacted
            self._high_watermark_position = compacted.size_bytes
        self._directory_changed = True  # the next fsync makes the rename durable
        original.close()

    # Shutdown.

    def close(self) -> None:
        """fsync everything, record the recovery point, a producer-state snapshot at the log
        end (unless the log holds no batch, or the latest snapshot holds the state already)
        and the clean-shutdown marker (unless the log is offline), and close every file.
        Blocking. Raises StorageError."""
        if self._closed:
            return
        self._closed = True
        self._cleaner_abort.set()
        try:
            if self._failure is None:
                self._write_clean_shutdown()
        except OSError as error:
            raise StorageError(f"cannot close {self._directory} cleanly: {error}") from error
        finally:
            for segment in self._segments.values():
                segment.close()

    def _write_clean_shutdown(self) -> None:
        self._active.finalize()
        for segment in (*self._unsynced_segments, self._active):
            if not segment.is_closed:
                os.fdatasync(segment.log_fd)
                segment.sync_index_files()
        fsync_directory(self._directory)
        self._durable_offset = self.log_end_offset
        _write_checkpoints(self._directory, self._durable_offset, self._high_watermark)
        if self._size_bytes > 0:  # a log without batches rebuilds an empty state for free
            self._write_producer_snapshot(self.log_end_offset)
        write_atomically(self._directory / CLEAN_SHUTDOWN_FILE, b"")

    def delete(self) -> None:
        """Close the log without syncing and remove its directory. Blocking. Raises OSError."""
        self._closed = True
        self._cleaner_abort.set()
        for segment in self._segments.values():
            segment.close()
        self._pending_deletions.clear()
        shutil.rmtree(self._directory)

    # Failures.

    def _check_usable(self) -> None:
        if self._closed:
            raise StorageError(f"{self._directory} is closed")
        if self._failure is not None:
            raise StorageError(f"{self._directory} is offline: {self._failure}")

    def _fail(self, reason: str) -> StorageError:
        """Take the log offline (after a failed write or fsync its state on disk is unknown
        until it is recovered by reopening); return the error to raise."""
        if self._failure is None:
            self._failure = reason
        return StorageError(f"{self._directory} is offline: {reason}")


def _assign_offsets(
    batches: bytearray | memoryview,
    scanned: list[ScannedBatch],
    base_offset: int,
    leader_epoch: int,
) -> list[tuple[int, BatchHeader]]:
    """Patch base_offset and partition_leader_epoch (outside the CRC) of each batch; return
    (position, patched header) of each."""
    headers = []
    offset = base_offset
    for batch in scanned:
        _BASE_OFFSET.pack_into(batches, batch.position, offset)
        epoch_position = batch.position + PARTITION_LEADER_EPOCH_POSITION
        _LEADER_EPOCH.pack_into(batches, epoch_position, leader_epoch)
        header = batch.header._replace(base_offset=offset, partition_leader_epoch=leader_epoch)
        headers.append((batch.position, header))
        offset = header.next_offset
    return headers


def _write_checkpoints(directory: pathlib.Path, recovery_point: int, high_watermark: int) -> None:
    """Record the recovery point and the high watermark. Blocking. Raises OSError."""
    write_offset_checkpoint(directory / RECOVERY_POINT_FILE, recovery_point)
    write_offset_checkpoint(directory / HIGH_WATERMARK_FILE, high_watermark)


def _sync_files(
    descriptors: list[int], rolled: list[Segment], directory: pathlib.Path | None
) -> None:
    """fdatasync the log files, fsync the rolled segments' index files and the directory.
    Blocking: runs in a worker thread."""
    for descriptor in descriptors:
        os.fdatasync(descriptor)
    for segment in rolled:
        segment.sync_index_files()
    if directory is not None:
        fsync_directory(directory)
