"""A partition log held in memory, for the deterministic whole-cluster simulation.

Theory of operation. `MemoryPartitionLog` behaves as `PartitionLog` towards the replica layer
(appends, follower appends, reads, the high watermark in either mode, the leader-epoch cache,
truncation, durability) and passes the same conformance tests, but keeps its batches in a
list: (base offset, next offset, bytes) per batch, with a parallel list of base offsets to
bisect. It has no segments, no retention, no compaction and no time: `now_ms` is accepted and
ignored. It starts at offset 0 until `truncate_fully_and_start_at` replaces it with an empty
log starting at another offset.

What it adds is a model of the disk. Five things would survive a crash of a file log, and
the object tracks each of them apart from what was appended (the "page cache"):

- the batches below `durable_offset`. The durable batches are always a prefix of the log:
  the durable offset only moves forward, except at `truncate_to`, which makes what it keeps
  durable before it returns (the file log fsyncs there), so the prefix is the one record;
- the leader-epoch checkpoint, which the file log writes at every change of the cache,
  synchronously and before the batches carrying a new epoch: so it may hold epochs whose
  batches a power loss removed, and recovery clips it;
- the high-watermark checkpoint, written by `flush`, `write_high_watermark_checkpoint`,
  `truncate_to`, `truncate_fully_and_start_at` and `close`;
- the log start offset, which only `truncate_fully_and_start_at` moves, durably before it
  returns (the file log's intent file makes that change atomic);
- the producer-state snapshot: the file log writes one at each segment roll and at a clean
  close; this log has no segments, so only `close` writes one (when the log holds batches).

`crash(power_loss=...)` ends the object's life and returns that `DurableImage`: after a
process crash the operating system still holds every appended byte, so every batch survives;
after a power loss only the durable prefix does. `recover` builds the log a restart finds,
checking each batch again and clipping as `PartitionLog.open` does: epochs starting at or
after the recovered end are dropped, the restored high watermark lies in [start, end], and
the producers' state is the snapshot's (when it lies in [start, end]) updated by the batches
after it, or else rebuilt from every batch. A truncation rebuilds it the same way.

Durability is instant but not free of interleavings: `wait_durable` marks the log durable up
to the log end it saw when it was called, after one checkpoint, so a truncation or appends
during that checkpoint are seen as they would be during an fsync.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import trio

from protocol.errors import ProtocolError
from protocol.record_batch import BatchHeader, ScannedBatch, crc_of, parse_header, scan_batches

from .errors import CorruptRecordError, OffsetOutOfRangeError, RecordTooLargeError, StorageError
from .fetch_slice import FetchSlice
from .leader_epoch_cache import EpochEntry, LeaderEpochCache
from .log_config import LogConfig
from .partition_log import AppendInfo, LogStatistics, ReadLimit, _assign_offsets
from .producer_state import ProducerStateTable, parse_snapshot
from .replica_log import ReplicaLog

OFFSET_MAX = 2**63 - 1


@dataclass(frozen=True, kw_only=True, slots=True)
class DurableImage:
    """What a restart of a `MemoryPartitionLog` finds on its "disk"."""

    batches: tuple[bytes, ...]  # whole batches in offset order, one per item
    leader_epochs: tuple[EpochEntry, ...]  # the leader-epoch checkpoint as last written
    high_watermark: int | None  # the high-watermark checkpoint as last written; None: never
    log_start_offset: int = 0  # where the log starts (its first batch may start later)
    # the producer-state snapshot as last written: (offset, bytes); None: none
    producer_snapshot: tuple[int, bytes] | None = None

    @property
    def log_end_offset(self) -> int:
        return parse_header(self.batches[-1]).next_offset if self.batches else self.log_start_offset


class _StoredBatch(NamedTuple):
    base_offset: int
    next_offset: int
    data: bytes


class MemoryPartitionLog:
    """One partition's log in memory; see the module's theory of operation.

    Use from one trio thread only. Create empty, or from a `DurableImage` with `recover`.
    """

    def __init__(
        self, name: str, config: LogConfig, *, high_watermark_managed_externally: bool = False
    ) -> None:
        self._name = name
        self._config = config
        self._batches: list[_StoredBatch] = []
        self._base_offsets: list[int] = []  # parallel to _batches, for bisect
        self._log_start_offset = 0
        self._log_end_offset = 0
        self._size_bytes = 0
        self._durable_offset = 0
        self._high_watermark = 0
        self._high_watermark_managed_externally = high_watermark_managed_externally
        self._leader_epochs = LeaderEpochCache()
        self._producers = ProducerStateTable(producers_max=config.producers_max)
        self.restored_high_watermark: int | None = None
        # The durable image, besides the batches below the durable offset.
        self._checkpointed_epochs: tuple[EpochEntry, ...] = ()
        self._checkpointed_high_watermark: int | None = None
        self._producer_snapshot: tuple[int, bytes] | None = None
        self._new_data_event = trio.Event()
        self._progress_event = trio.Event()
        self._truncation_generation = 0  # counts truncations, which void durability waits
        self._full_truncations = 0  # counts truncate_fully_and_start_at calls
        self._pending_sync_waiters = 0
        self._closed = False
        self._crashed = False

    @classmethod
    def recover(
        cls,
        name: str,
        config: LogConfig,
        image: DurableImage,
        *,
        high_watermark_managed_externally: bool = False,
    ) -> MemoryPartitionLog:
        """The log a restart finds in `image`, everything in it durable: its epochs clipped
        to its end, `restored_high_watermark` the checkpoint clipped to [start, end] (None
        without one). With `high_watermark_managed_externally` the high watermark starts
        there (at the log start without a checkpoint), otherwise at the log end, as
        `PartitionLog.open`. Raises CorruptRecordError when a batch of `image` is damaged
        or out of order (the image was not made by `crash`)."""
        log = cls(name, config, high_watermark_managed_externally=high_watermark_managed_externally)
        start = log._log_start_offset = log._log_end_offset = image.log_start_offset
        for data in image.batches:
            log._store(_recovered_batch(name, data, log._log_end_offset))
        end = log._durable_offset = log._log_end_offset
        log._leader_epochs = LeaderEpochCache(image.leader_epochs)
        log._leader_epochs.truncate_from_end(end)
        log._leader_epochs.truncate_from_start(start)
        log._checkpointed_epochs = log._leader_epochs.entries()  # rewritten when clipped
        log._producer_snapshot = image.producer_snapshot
        log._reload_producer_state()
        restored = _clip(image.high_watermark, start, end)
        log._checkpointed_high_watermark = restored  # rewritten when clipped, as the file log
        log.restored_high_watermark = restored
        if high_watermark_managed_externally:
            log._high_watermark = start if restored is None else restored
        else:
            log._high_watermark = end
        return log

    # Properties.

    @property
    def name(self) -> str:
        return self._name

    @property
    def config(self) -> LogConfig:
        return self._config

    @property
    def fsync_policy(self) -> str:
        return self._config.fsync

    @property
    def log_start_offset(self) -> int:
        return self._log_start_offset

    @property
    def log_end_offset(self) -> int:
        """The offset the next appended record gets."""
        return self._log_end_offset

    @property
    def high_watermark(self) -> int:
        """Consumers may read offsets below this one."""
        return self._high_watermark

    @property
    def durable_offset(self) -> int:
        """Every offset below this one would survive a power loss."""
        return self._durable_offset

    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    @property
    def new_data_event(self) -> trio.Event:
        """An event set (and then replaced by a fresh one) when the high watermark advances."""
        return self._new_data_event

    @property
    def progress_event(self) -> trio.Event:
        """An event set (and then replaced by a fresh one) whenever the log end offset or the
        durable offset moves (an append, a durability wait completing, a truncation)."""
        return self._progress_event

    @property
    def high_watermark_managed_externally(self) -> bool:
        return self._high_watermark_managed_externally

    @property
    def leader_epochs(self) -> LeaderEpochCache:
        """The log's leader-epoch history. Read it only: the log changes it."""
        return self._leader_epochs

    @property
    def latest_leader_epoch(self) -> int:
        """The epoch of the last batch that carried one, or -1."""
        return self._leader_epochs.latest_epoch

    def end_offset_for_leader_epoch(self, epoch: int) -> tuple[int, int]:
        """OffsetsForLeaderEpoch: (largest epoch <= `epoch`, its end offset); see
        `LeaderEpochCache.end_offset_for`. (-1, -1) when undefined."""
        return self._leader_epochs.end_offset_for(epoch, self._log_end_offset)

    def statistics(self) -> LogStatistics:
        """The file log's record; the whole log counts as one segment."""
        return LogStatistics(
            log_start_offset=self._log_start_offset,
            log_end_offset=self._log_end_offset,
            high_watermark=self._high_watermark,
            durable_offset=self._durable_offset,
            size_bytes=self._size_bytes,
            segment_count=1,
            pending_sync_waiters=self._pending_sync_waiters,
            latest_leader_epoch=self._leader_epochs.latest_epoch,
            producer_count=len(self._producers),
        )

    def update_config(self, config: LogConfig) -> None:
        """Apply new settings; they govern the next appends."""
        self._config = config
        if config.fsync != "always" and not self._high_watermark_managed_externally:
            self._advance_high_watermark(self._log_end_offset)

    # Appending.

    def append(
        self, batches: bytearray | memoryview, *, now_ms: int, leader_epoch: int = 0
    ) -> AppendInfo:
        """Append back-to-back record batches, assigning their offsets and stamping
        `leader_epoch` in place, as `PartitionLog.append`. Every batch is checked before
        anything is stored; an idempotent batch comes alone and is judged by the producers'
        state: a duplicate stores nothing and returns the original offsets. Returns where
        they went. Raises CorruptRecordError, RecordTooLargeError (a batch above
        max.message.bytes or segment.bytes), LeaderEpochError (`leader_epoch` below the
        latest), InvalidRecordError, InvalidProducerEpochError, OutOfOrderSequenceError,
        StorageError (closed)."""
        assert isinstance(batches, bytearray) or not batches.readonly
        assert -(2**31) <= leader_epoch < 2**31
        self._check_usable()
        scanned = _validate(batches, self._config)
        base_offset = self._log_end_offset
        self._leader_epochs.check_assignable(leader_epoch, base_offset)
        original = self._producers.check_leader_append([batch.header for batch in scanned])
        if original is not None:
            return AppendInfo.of_duplicate(original, self._log_start_offset)
        headers = _assign_offsets(batches, scanned, base_offset, leader_epoch)
        assert headers[-1][1].last_offset <= OFFSET_MAX
        self._update_leader_epochs(lambda cache: cache.assign(leader_epoch, base_offset))
        self._store_appended(memoryview(batches), headers)
        return AppendInfo(
            base_offset=base_offset,
            last_offset=self._log_end_offset - 1,
            log_append_time=-1,
            log_start_offset=self._log_start_offset,
        )

    def append_as_follower(
        self, batches: bytes | bytearray | memoryview, *, now_ms: int
    ) -> AppendInfo:
        """Append batches copied from the leader with their offsets and epochs, as
        `PartitionLog.append_as_follower`: checked first, offsets strictly increasing from
        the log end on (a gap is allowed, an overlap is not); every batch updates the
        producers' state, unchecked. Returns the offsets of the first and last records.
        Raises CorruptRecordError, RecordTooLargeError, StorageError (an overlap, offsets
        going back; closed), LeaderEpochError (an epoch going back)."""
        self._check_usable()
        scanned = _validate(batches, self._config)
        headers = [(batch.position, batch.header) for batch in scanned]
        self._check_follower_offsets(headers)
        trial = LeaderEpochCache(self._leader_epochs.entries())
        for _, header in headers:
            trial.assign(header.partition_leader_epoch, header.base_offset)  # may raise

        def assign_epochs(cache: LeaderEpochCache) -> bool:
            changed = False
            for _, header in headers:
                changed |= cache.assign(header.partition_leader_epoch, header.base_offset)
            return changed

        self._update_leader_epochs(assign_epochs)
        self._store_appended(memoryview(batches), headers)
        return AppendInfo(
            base_offset=headers[0][1].base_offset,
            last_offset=headers[-1][1].last_offset,
            log_append_time=-1,
            log_start_offset=self._log_start_offset,
        )

    def _check_follower_offsets(self, headers: list[tuple[int, BatchHeader]]) -> None:
        expected = self._log_end_offset
        for _, header in headers:
            if header.base_offset < expected:
                raise StorageError(
                    f"a follower append at offset {header.base_offset} overlaps "
                    f"{self._name}, which expects offset {expected} or above"
                )
            expected = header.next_offset
        if expected > OFFSET_MAX:
            raise StorageError(f"offset {expected - 1} is beyond the largest offset")

    def _store_appended(self, data: memoryview, headers: list[tuple[int, BatchHeader]]) -> None:
        """Store the checked batches, signal progress and, in the default mode unless
        fsync=always, move the high watermark to the new log end."""
        for position, header in headers:
            batch = bytes(data[position : position + header.size_bytes])
            self._store(_StoredBatch(header.base_offset, header.next_offset, batch))
            self._producers.record(header)
        self._signal_progress()
        if self._config.fsync != "always" and not self._high_watermark_managed_externally:
            self._advance_high_watermark(self._log_end_offset)

    def _store(self, batch: _StoredBatch) -> None:
        assert batch.base_offset >= self._log_end_offset
        self._batches.append(batch)
        self._base_offsets.append(batch.base_offset)
        self._log_end_offset = batch.next_offset
        self._size_bytes += len(batch.data)

    # The idempotent producers' state.

    @property
    def producer_state(self) -> ProducerStateTable:
        """The idempotent producers of the batches in the log. Read it only."""
        return self._producers

    def expire_producers(self, now_ms: int) -> int:
        """Forget the producers whose last batch's max timestamp is
        producer_id_expiration_ms old at `now_ms`, as `PartitionLog.expire_producers`.
        Returns how many were forgotten. Raises StorageError (closed)."""
        self._check_usable()
        return self._producers.expire(now_ms, self._config.producer_id_expiration_ms)

    def _reload_producer_state(self) -> None:
        """Rebuild the producers' state as the file log does on loading or truncating: from
        the snapshot when it lies in [log start, log end] (else it is dropped), then from the
        batches after it."""
        table, from_offset = None, self._log_start_offset
        snapshot = self._producer_snapshot
        if snapshot is not None and self._log_start_offset <= snapshot[0] <= self._log_end_offset:
            parsed = parse_snapshot(snapshot[1], producers_max=self._config.producers_max)
            if parsed is not None and parsed[0] == snapshot[0]:
                from_offset, table = parsed
        if table is None:  # none, outside the log, or damaged: the file log deletes it
            self._producer_snapshot = None
            table = ProducerStateTable(producers_max=self._config.producers_max)
        for batch in self._batches[bisect.bisect_left(self._base_offsets, from_offset) :]:
            table.record(parse_header(batch.data))
        table.truncate_head(self._log_start_offset)
        self._producers = table

    def _update_leader_epochs(self, change: Callable[[LeaderEpochCache], bool]) -> None:
        """Apply `change` to the cache and, if it changed, "write" its checkpoint (the file
        log writes it at once, before the batches)."""
        if change(self._leader_epochs):
            self._checkpointed_epochs = self._leader_epochs.entries()

    def _signal_progress(self) -> None:
        self._progress_event.set()
        self._progress_event = trio.Event()

    # Durability.

    async def wait_durable(self, offset: int) -> None:
        """Return once every offset below `offset` is durable. When it is not yet, the log
        becomes durable up to the log end seen at the call, after one checkpoint (an fsync
        covers what was appended before it started). Raises StorageError if the log closed,
        or a truncation meanwhile removed offsets below `offset` (as `PartitionLog`'s). Safe
        to cancel (nothing then changes)."""
        assert offset <= self._log_end_offset, "cannot wait for offsets not yet appended"
        full_truncations = self._full_truncations
        removable = offset > self._log_start_offset  # a full truncation would remove some
        if self._durable_offset >= offset:
            await trio.lowlevel.checkpoint()
            self._check_not_truncated_fully(offset, removable, full_truncations)
            return
        self._check_usable()
        generation = self._truncation_generation
        target = self._log_end_offset
        self._pending_sync_waiters += 1
        try:
            await trio.lowlevel.checkpoint()
        finally:
            self._pending_sync_waiters -= 1
        self._check_not_truncated_fully(offset, removable, full_truncations)
        self._check_usable()
        if generation != self._truncation_generation:
            if self._durable_offset >= offset:
                return  # truncation made what it kept durable
            raise StorageError(f"offset {offset - 1} of {self._name} was truncated away")
        self._mark_durable(target)

    def _check_not_truncated_fully(
        self, offset: int, removable: bool, full_truncations: int
    ) -> None:
        if removable and self._full_truncations != full_truncations:
            raise StorageError(
                f"offset {offset - 1} of {self._name} was removed: the log was truncated fully "
                f"and starts at offset {self._log_start_offset}"
            )

    def _mark_durable(self, offset: int) -> None:
        if offset > self._durable_offset:
            self._durable_offset = offset
            self._signal_progress()
        if self._config.fsync == "always" and not self._high_watermark_managed_externally:
            self._advance_high_watermark(offset)

    async def flush(self) -> None:
        """Make the whole log durable, then checkpoint the high watermark. Raises
        StorageError (closed)."""
        await self.wait_durable(self._log_end_offset)
        self._check_usable()
        self._checkpointed_high_watermark = self._high_watermark

    async def write_high_watermark_checkpoint(self) -> None:
        """Checkpoint the high watermark. Raises StorageError (closed). Safe to cancel (the
        checkpoint is then written all the same)."""
        self._check_usable()
        self._checkpointed_high_watermark = self._high_watermark
        await trio.lowlevel.checkpoint()

    # The high watermark.

    def _advance_high_watermark(self, offset: int) -> None:
        """Move the high watermark forward to `offset` and wake fetchers."""
        if offset <= self._high_watermark:
            return
        self._high_watermark = offset
        self._new_data_event.set()
        self._new_data_event = trio.Event()

    def manage_high_watermark_externally(self, *, high_watermark: int | None = None) -> None:
        """Switch to replica-managed mode (see `PartitionLog`): only `set_high_watermark`
        (forward) and `truncate_to` (back) move the high watermark from now on.
        `high_watermark`, if given, is where it starts, clipped to [start, end]. Idempotent.
        (`truncate_fully_and_start_at` moves it too, to its offset.)"""
        self._high_watermark_managed_externally = True
        if high_watermark is not None:
            self._high_watermark = min(
                max(high_watermark, self._log_start_offset), self._log_end_offset
            )

    def set_high_watermark(self, offset: int) -> int:
        """Move the high watermark forward to `offset`, clipped to the log end (a lower
        offset changes nothing), and wake fetchers. Replica-managed mode only. Returns the
        high watermark. After close it changes nothing."""
        assert self._high_watermark_managed_externally, "the log manages its high watermark"
        if not self._closed:
            self._advance_high_watermark(min(offset, self._log_end_offset))
        return self._high_watermark

    # Truncation.

    def truncate_to(self, offset: int) -> None:
        """Remove every batch at or after `offset`, which must be a batch's base offset, the
        log end (nothing to do) or an offset in a gap (the log then ends after the last batch
        before it), as `PartitionLog.truncate_to`: what is kept becomes durable, the epochs
        starting at or after the new end are dropped, the high watermark comes down to it if
        it was above, and both checkpoints are written; the producers' state is rebuilt (a
        snapshot above the new end is dropped). Raises OffsetOutOfRangeError outside
        [log start, log end], StorageError for an offset inside a batch (nothing changes) or
        a closed log."""
        self._check_usable()
        self._check_in_range(offset)
        if offset == self._log_end_offset:
            return
        keep = bisect.bisect_left(self._base_offsets, offset)
        if keep > 0 and self._batches[keep - 1].next_offset > offset:
            holder = self._batches[keep - 1]
            raise StorageError(
                f"cannot truncate {self._name} to offset {offset}: it is inside the batch of "
                f"offsets {holder.base_offset}-{holder.next_offset - 1}"
            )
        self._truncation_generation += 1
        self._size_bytes -= sum(len(batch.data) for batch in self._batches[keep:])
        del self._batches[keep:]
        del self._base_offsets[keep:]
        end = self._batches[-1].next_offset if self._batches else self._log_start_offset
        self._log_end_offset = self._durable_offset = end
        self._update_leader_epochs(lambda cache: cache.truncate_from_end(end))
        self._reload_producer_state()
        self._high_watermark = min(self._high_watermark, end)
        if not self._high_watermark_managed_externally:
            self._advance_high_watermark(end)  # everything left is durable
        self._checkpointed_high_watermark = self._high_watermark
        self._signal_progress()

    def truncate_fully_and_start_at(self, offset: int) -> None:
        """Replace the whole log with an empty one starting at `offset`, as
        `PartitionLog.truncate_fully_and_start_at`: the log start, log end, durable offset
        and high watermark all become `offset`, the leader-epoch cache and the producers'
        state are cleared (the snapshot dropped), and the
        change is durable at once (the checkpoints and the log start too). `wait_durable`
        callers waiting for offsets above the old log start raise. Raises
        OffsetOutOfRangeError outside [0, 2**63 - 1], StorageError (closed)."""
        self._check_usable()
        if not 0 <= offset <= OFFSET_MAX:
            raise OffsetOutOfRangeError(
                f"cannot start {self._name} at offset {offset}: not in [0, {OFFSET_MAX}]"
            )
        self._truncation_generation += 1
        self._full_truncations += 1
        self._batches.clear()
        self._base_offsets.clear()
        self._size_bytes = 0
        self._log_start_offset = self._log_end_offset = self._durable_offset = offset
        self._update_leader_epochs(lambda cache: cache.truncate_from_end(0))
        self._producers = ProducerStateTable(producers_max=self._config.producers_max)
        self._producer_snapshot = None
        self._high_watermark = self._checkpointed_high_watermark = offset
        self._new_data_event.set()
        self._new_data_event = trio.Event()
        self._signal_progress()

    def delete_records_before(self, offset: int) -> int:
        """Retention, as `PartitionLog.apply_retention` deletes old segments: remove the
        oldest batches that end at or below `offset` and at or below the high watermark
        (never what followers or consumers have yet to read); the log start moves to the
        first batch kept, durably at once, and the leader-epoch cache and the producers'
        state drop what lies below it. Returns how many batches were removed. Raises
        StorageError (closed)."""
        self._check_usable()
        limit = min(offset, self._high_watermark)
        removed = 0
        while removed < len(self._batches) and self._batches[removed].next_offset <= limit:
            removed += 1
        if not removed:
            return 0
        last_removed = self._batches[removed - 1]
        self._size_bytes -= sum(len(batch.data) for batch in self._batches[:removed])
        del self._batches[:removed]
        del self._base_offsets[:removed]
        start = self._batches[0].base_offset if self._batches else last_removed.next_offset
        self._log_start_offset = start
        # what lies below the log start is gone from the disk too (nothing to make durable)
        self._durable_offset = max(self._durable_offset, start)
        self._update_leader_epochs(lambda cache: cache.truncate_from_start(start))
        self._producers.truncate_head(start)
        if self._producer_snapshot is not None and self._producer_snapshot[0] < start:
            self._producer_snapshot = None
        return removed

    # Reading.

    def read(
        self, fetch_offset: int, max_bytes: int, *, up_to: ReadLimit = "high_watermark"
    ) -> FetchSlice:
        """Return an in-memory slice starting at the batch holding `fetch_offset` (or the
        next one, in a gap), as `PartitionLog.read`: whole batches up to `max_bytes`, the
        first always whole, the last maybe cut short; only batches wholly below `up_to` (the
        high watermark or the log end); empty from that limit on. Raises
        OffsetOutOfRangeError outside [log start, log end]."""
        assert max_bytes >= 0 and not self._closed
        assert up_to in ("high_watermark", "log_end")
        self._check_in_range(fetch_offset)
        limit = self._high_watermark if up_to == "high_watermark" else self._log_end_offset
        if fetch_offset >= limit:
            return FetchSlice.empty()
        pieces: list[bytes] = []
        length = 0
        for batch in itertools.islice(self._batches, self._first_batch_from(fetch_offset), None):
            if batch.next_offset > limit or (pieces and length >= max_bytes):
                break
            pieces.append(batch.data)
            length += len(batch.data)
        if not pieces:
            return FetchSlice.empty()  # the limit lies inside the batch holding fetch_offset
        excess = length - max(max_bytes, len(pieces[0]))
        if excess > 0:
            pieces[-1] = pieces[-1][:-excess]
        return FetchSlice.of_bytes(b"".join(pieces))

    async def read_batch_containing(self, offset: int) -> bytes | None:
        """Return the whole batch holding `offset`, its CRC checked, or None when no batch
        below the high watermark holds it (a gap; or the batch straddles the high watermark).
        Raises OffsetOutOfRangeError outside [log start, high watermark), CorruptRecordError.
        Safe to cancel."""
        assert not self._closed
        if offset < self._log_start_offset:
            raise OffsetOutOfRangeError(
                f"offset {offset} is below the log start {self._log_start_offset}"
            )
        if offset >= self._high_watermark:
            raise OffsetOutOfRangeError(
                f"offset {offset} has not been written yet (high watermark {self._high_watermark})"
            )
        index = bisect.bisect_right(self._base_offsets, offset) - 1
        found: bytes | None = None
        if index >= 0:
            batch = self._batches[index]
            if offset < batch.next_offset <= self._high_watermark:
                found = batch.data
                if crc_of(found) != parse_header(found).crc:
                    raise CorruptRecordError(
                        f"the batch of offsets {batch.base_offset}-{batch.next_offset - 1} of "
                        f"{self._name} fails its CRC check"
                    )
        await trio.lowlevel.checkpoint()
        return found

    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None:
        """Return (base offset, max_timestamp) of the first batch below the high watermark
        whose max_timestamp >= `timestamp_ms`, or None if there is none. A linear scan."""
        assert not self._closed
        for batch in self._batches:
            if batch.next_offset > self._high_watermark:
                break
            header = parse_header(batch.data)
            if header.max_timestamp >= timestamp_ms:
                return header.base_offset, header.max_timestamp
        return None

    def _first_batch_from(self, offset: int) -> int:
        """Index of the batch holding `offset` or, in a gap, of the next one."""
        index = bisect.bisect_right(self._base_offsets, offset) - 1
        if index < 0 or self._batches[index].next_offset <= offset:
            index += 1
        return index

    def _check_in_range(self, offset: int) -> None:
        if not self._log_start_offset <= offset <= self._log_end_offset:
            raise OffsetOutOfRangeError(
                f"offset {offset} is outside [{self._log_start_offset}, {self._log_end_offset}]"
                f" in {self._name}"
            )

    # Shutdown and crashes.

    def close(self) -> None:
        """A clean shutdown: everything becomes durable, the high watermark is checkpointed
        and, when the log holds batches, the producers' state too. Later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        self._durable_offset = self._log_end_offset
        self._checkpointed_high_watermark = self._high_watermark
        if self._batches:
            end = self._log_end_offset
            self._producer_snapshot = (end, self._producers.snapshot_bytes(end))

    def crash(self, *, power_loss: bool) -> DurableImage:
        """Stop as a crash would (the log is closed from now on) and return what a restart
        finds: every appended batch after a process crash, only those below the durable
        offset after a power loss; the checkpoints as last written. After `close` everything
        is durable, so both give what the clean shutdown left. Raises StorageError when the
        log already crashed."""
        if self._crashed:
            raise StorageError(f"{self._name} already crashed")
        kept = len(self._batches)
        if power_loss:
            kept = bisect.bisect_left(self._base_offsets, self._durable_offset)
        image = DurableImage(
            batches=tuple(batch.data for batch in self._batches[:kept]),
            leader_epochs=self._checkpointed_epochs,
            high_watermark=self._checkpointed_high_watermark,
            log_start_offset=self._log_start_offset,
            producer_snapshot=self._producer_snapshot,
        )
        self._closed = self._crashed = True
        return image

    def _check_usable(self) -> None:
        if self._closed:
            raise StorageError(f"{self._name} is closed")


def _validate(batches: bytes | bytearray | memoryview, config: LogConfig) -> list[ScannedBatch]:
    """Return the scanned batches, each checked (length, magic, CRC, size limits). Raises
    CorruptRecordError or RecordTooLargeError."""
    if not batches:
        raise CorruptRecordError("an append needs at least one record batch")
    scanned = []
    try:
        for batch in scan_batches(batches):
            _check_batch_size(batch.header.size_bytes, config)
            scanned.append(batch)
    except ProtocolError as error:
        raise CorruptRecordError(str(error)) from None
    return scanned


def _check_batch_size(size_bytes: int, config: LogConfig) -> None:
    """The file log's limits: segment.bytes too, as a batch never spans segments there."""
    for limit, name in (
        (config.max_message_bytes, "max.message.bytes"),
        (config.segment_bytes, "segment.bytes"),
    ):
        if size_bytes > limit:
            raise RecordTooLargeError(
                f"a record batch of {size_bytes} bytes exceeds {name} ({limit})"
            )


def _recovered_batch(name: str, data: bytes, log_end_offset: int) -> _StoredBatch:
    """Check one batch of an image again (it was checked when appended). Raises
    CorruptRecordError unless `data` is exactly one sound batch at or after the log end."""
    try:
        [scanned] = scan_batches(data)
    except (ProtocolError, ValueError) as error:
        raise CorruptRecordError(f"a batch of the image of {name} is damaged: {error}") from None
    header = scanned.header
    if header.base_offset < log_end_offset:
        raise CorruptRecordError(
            f"the batch at offset {header.base_offset} of the image of {name} overlaps the "
            f"batches before it, which end at offset {log_end_offset}"
        )
    return _StoredBatch(header.base_offset, header.next_offset, data)


def _clip(high_watermark: int | None, log_start_offset: int, log_end_offset: int) -> int | None:
    if high_watermark is None:
        return None
    return min(max(high_watermark, log_start_offset), log_end_offset)


def _fits_the_replica_layer(log: MemoryPartitionLog) -> ReplicaLog:
    """Never called: mypy checks here that the replica layer can drive this log."""
    return log
