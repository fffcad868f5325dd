"""The contract the replica layer relies on, checked against every partition log backend: the
file log (`PartitionLog`) and the in-memory one of the simulation (`MemoryPartitionLog`).

Each test gets a `logs` factory: `make(config, managed=False)` opens an empty log,
`reopen_after_crash(log)` gives what a restart after a process crash finds (the file log's
files as they are, with no clean-shutdown marker; the memory log's `crash(power_loss=False)`
image), and `reopen_after_close(log)` what a restart after a clean close finds.
Interleavings with a durability wait are made deterministic by an instrument that acts right
after the waiting task's first step, when it is parked at its first await.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Awaitable, Callable, Union

import pytest
import trio
from storage_test_support import (
    epochs_of,
    make_batch,
    make_idempotent_batch,
    read_all,
    small_config,
)

from broker.storage import (
    AppendInfo,
    CorruptRecordError,
    EpochEntry,
    InvalidProducerEpochError,
    InvalidRecordError,
    LeaderEpochError,
    LogConfig,
    MemoryPartitionLog,
    OffsetOutOfRangeError,
    OutOfOrderSequenceError,
    PartitionLog,
    ProducerStateTable,
    RecordTooLargeError,
    StorageError,
)
from protocol.record_batch import (
    PARTITION_LEADER_EPOCH,
    PARTITION_LEADER_EPOCH_POSITION,
    parse_header,
    scan_batches,
)

Log = Union[PartitionLog, MemoryPartitionLog]
CONFIG = small_config(segment_bytes=1024, index_interval_bytes=100)  # fsync=never
EPOCHS = [0] * 5 + [2] * 6 + [5] * 3 + [9] * 6  # one batch each


class FileLogs:
    """Partition logs in directories under `directory`."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._count = 0
        self._opened: list[PartitionLog] = []

    def make(self, config: LogConfig = CONFIG, managed: bool = False) -> PartitionLog:
        return self._open(config, managed, self._new_directory())

    def reopen_after_crash(self, log: Log) -> PartitionLog:
        """A copy of the files as they are now (without the clean-shutdown marker), opened."""
        assert isinstance(log, PartitionLog)
        crashed = self._new_directory()
        shutil.copytree(log.directory, crashed)
        log.close()
        return self._open(log.config, log.high_watermark_managed_externally, crashed)

    def reopen_after_close(self, log: Log) -> PartitionLog:
        assert isinstance(log, PartitionLog)
        log.close()
        return self._open(log.config, log.high_watermark_managed_externally, log.directory)

    def close_all(self) -> None:
        for log in self._opened:
            log.close()

    def _new_directory(self) -> Path:
        self._count += 1
        return self._directory / f"log-{self._count}" / "t-0"

    def _open(self, config: LogConfig, managed: bool, directory: Path) -> PartitionLog:
        log = PartitionLog.open(
            directory, config, now_ms=0, high_watermark_managed_externally=managed
        )
        self._opened.append(log)
        return log


class MemoryLogs:
    def make(self, config: LogConfig = CONFIG, managed: bool = False) -> MemoryPartitionLog:
        return MemoryPartitionLog("t-0", config, high_watermark_managed_externally=managed)

    def reopen_after_crash(self, log: Log) -> MemoryPartitionLog:
        assert isinstance(log, MemoryPartitionLog)
        return MemoryPartitionLog.recover(
            log.name,
            log.config,
            log.crash(power_loss=False),
            high_watermark_managed_externally=log.high_watermark_managed_externally,
        )

    def reopen_after_close(self, log: Log) -> MemoryPartitionLog:
        log.close()
        return self.reopen_after_crash(log)  # after close, a crash finds everything

    def close_all(self) -> None:
        pass


@pytest.fixture(params=["file", "memory"])
def logs(request, tmp_path):
    factory = FileLogs(tmp_path) if request.param == "file" else MemoryLogs()
    yield factory
    factory.close_all()


# Helpers.


def fill(log: Log, epochs: list[int] = EPOCHS) -> list[bytes]:
    """Append one batch of 1 to 3 records per item of `epochs`, with that leader epoch and
    timestamp 1000 + its number; return the batches as written."""
    written = []
    for number, epoch in enumerate(epochs):
        batch = make_batch(
            number, records=1 + number % 3, timestamp_ms=1_000 + number, value_bytes=40
        )
        log.append(batch, now_ms=0, leader_epoch=epoch)
        written.append(bytes(batch))
    return written


def bases_of(batches: list[bytes]) -> list[int]:
    """The base offset of each batch, then the offset after the last one."""
    bases = [parse_header(batch).base_offset for batch in batches]
    return bases + [parse_header(batches[-1]).next_offset if batches else 0]


def check_log(log: Log, batches: list[bytes], high_watermark: int) -> None:
    """The log holds exactly `batches`, with the marks and epochs they imply."""
    assert read_all(log) == batches
    assert log.log_start_offset == 0
    assert log.log_end_offset == bases_of(batches)[-1]
    assert log.high_watermark == high_watermark
    assert log.leader_epochs.entries() == epochs_of(batches)
    assert log.size_bytes == sum(map(len, batches))


def snapshot(log: Log) -> tuple:
    return (
        read_all(log),
        log.log_start_offset,
        log.log_end_offset,
        log.high_watermark,
        log.durable_offset,
        log.size_bytes,
        log.leader_epochs.entries(),
    )


def with_epoch(batch: bytes, epoch: int) -> bytes:
    """`batch` with another partition_leader_epoch (outside the CRC)."""
    patched = bytearray(batch)
    PARTITION_LEADER_EPOCH.pack_into(patched, PARTITION_LEADER_EPOCH_POSITION, epoch)
    return bytes(patched)


def with_base_offset(batch: bytes, base_offset: int) -> bytes:
    """`batch` with another base_offset (outside the CRC)."""
    return base_offset.to_bytes(8, "big") + batch[8:]


class AfterFirstStep(trio.abc.Instrument):
    """Calls `action` once, right after the first step of the task named `name`."""

    def __init__(self, name: str, action: Callable[[], object]) -> None:
        self.name = name
        self.action = action
        self.started = False
        self.completed = False

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name == self.name and not self.started:
            self.started = True
            self.action()
            self.completed = True


async def run_interleaved(
    wait: Callable[[], Awaitable[None]], action: Callable[[], object]
) -> StorageError | None:
    """Run `wait()` in a task and `action()` as soon as that task first awaits; return the
    StorageError `wait()` raised, or None."""
    failures: list[StorageError] = []

    async def waiter() -> None:
        try:
            await wait()
        except StorageError as error:
            failures.append(error)

    instrument = AfterFirstStep("interleaved-waiter", action)
    trio.lowlevel.add_instrument(instrument)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, name="interleaved-waiter")
    finally:
        trio.lowlevel.remove_instrument(instrument)
    assert instrument.completed, "the action did not run (or raised)"
    return failures[0] if failures else None


# Appending.


def test_appends_get_consecutive_offsets_patched_into_their_headers(logs):
    log = logs.make()
    written = []
    next_offset = 0
    for number in range(6):
        batch = make_batch(number, records=1 + number % 4)
        info = log.append(batch, now_ms=0)
        assert (info.base_offset, info.last_offset) == (next_offset, next_offset + number % 4)
        assert info.log_start_offset == 0
        assert parse_header(batch).base_offset == next_offset  # patched in place
        next_offset = info.last_offset + 1
        written.append(bytes(batch))
    several = make_batch(6, records=3) + make_batch(7, records=2)
    info = log.append(several, now_ms=0)
    assert (info.base_offset, info.last_offset) == (next_offset, next_offset + 4)
    headers = [batch.header for batch in scan_batches(several)]
    assert [header.base_offset for header in headers] == [next_offset, next_offset + 3]
    written += [bytes(several[: headers[0].size_bytes]), bytes(several[headers[0].size_bytes :])]
    assert log.log_end_offset == next_offset + 5
    assert read_all(log) == written
    assert log.size_bytes == sum(map(len, written))


def test_the_leader_epoch_is_stamped_and_recorded(logs):
    log = logs.make()
    assert log.latest_leader_epoch == -1
    assert log.end_offset_for_leader_epoch(0) == (-1, -1)
    written = fill(log)
    bases = bases_of(written)
    starts = {epoch: bases[EPOCHS.index(epoch)] for epoch in (0, 2, 5, 9)}
    assert [parse_header(batch).partition_leader_epoch for batch in read_all(log)] == EPOCHS
    assert log.leader_epochs.entries() == tuple(EpochEntry(*item) for item in starts.items())
    assert log.latest_leader_epoch == 9
    end = log.log_end_offset
    assert log.end_offset_for_leader_epoch(0) == (0, starts[2])
    assert log.end_offset_for_leader_epoch(3) == (2, starts[5])
    assert log.end_offset_for_leader_epoch(9) == (9, end)
    assert log.end_offset_for_leader_epoch(12) == (9, end)
    assert log.end_offset_for_leader_epoch(-1) == (-1, -1)
    assert log.statistics().latest_leader_epoch == 9


def test_an_append_with_an_older_epoch_is_refused_and_changes_nothing(logs):
    log = logs.make()
    log.append(make_batch(0), now_ms=0, leader_epoch=3)
    before = snapshot(log)
    batch = make_batch(1)
    original = bytes(batch)
    with pytest.raises(LeaderEpochError):
        log.append(batch, now_ms=0, leader_epoch=2)
    assert snapshot(log) == before
    assert bytes(batch) == original  # not even patched
    log.append(batch, now_ms=0, leader_epoch=3)
    assert log.leader_epochs.entries() == (EpochEntry(3, 0),)


def test_every_batch_is_checked_before_anything_is_stored(logs):
    log = logs.make(small_config(segment_bytes=1024, max_message_bytes=300))
    log.append(make_batch(0), now_ms=0)
    before = snapshot(log)
    damaged = make_batch(2)
    damaged[-1] ^= 0xFF
    for batches, error in [
        (make_batch(1) + damaged, CorruptRecordError),
        (make_batch(1) + make_batch(2)[:-3], CorruptRecordError),
        (bytearray(), CorruptRecordError),
        (make_batch(1) + make_batch(2, value_bytes=400), RecordTooLargeError),
    ]:
        with pytest.raises(error):
            log.append(batches, now_ms=0, leader_epoch=1)
        assert snapshot(log) == before
        with pytest.raises(error):  # checked before its offsets
            log.append_as_follower(bytes(batches), now_ms=0)
        assert snapshot(log) == before


# Following.


def test_a_follower_append_keeps_offsets_and_epochs(logs):
    leader = logs.make()
    written = fill(leader)
    follower = logs.make(managed=True)
    info = follower.append_as_follower(b"".join(written[:7]), now_ms=0)
    assert (info.base_offset, info.last_offset) == (0, parse_header(written[6]).last_offset)
    for batch in written[7:]:
        follower.append_as_follower(batch, now_ms=0)
    assert read_all(follower) == written
    assert follower.leader_epochs.entries() == leader.leader_epochs.entries()
    assert follower.end_offset_for_leader_epoch(4) == leader.end_offset_for_leader_epoch(4)
    assert follower.log_end_offset == leader.log_end_offset
    assert follower.high_watermark == 0  # managed: only the leader's word moves it


def test_a_follower_append_refuses_overlaps_and_epochs_going_back(logs):
    leader = logs.make()
    written = fill(leader)
    follower = logs.make(managed=True)
    follower.append_as_follower(b"".join(written[:12]), now_ms=0)  # epochs 0, 2 and 5
    before = snapshot(follower)
    for batches in (written[11], written[0], written[12] + written[11]):
        with pytest.raises(StorageError, match="overlaps"):
            follower.append_as_follower(batches, now_ms=0)
        assert snapshot(follower) == before
    for batches in (with_epoch(written[12], 2), written[12] + with_epoch(written[13], 4)):
        with pytest.raises(LeaderEpochError):
            follower.append_as_follower(batches, now_ms=0)
        assert snapshot(follower) == before
    follower.append_as_follower(b"".join(written[12:]), now_ms=0)
    assert read_all(follower) == written


def test_a_follower_append_may_leave_a_gap(logs):
    log = logs.make()
    first = bytes(make_batch(0, records=2))
    log.append_as_follower(first, now_ms=0)
    after_gap = with_base_offset(bytes(make_batch(1, records=2)), 7)
    assert log.append_as_follower(after_gap, now_ms=0).base_offset == 7
    assert log.log_end_offset == 9
    for offset in (2, 5, 7, 8):  # in the gap: reads start at the next batch
        with log.read(offset, 0, up_to="log_end") as fetched:
            assert fetched.read_bytes() == after_gap
    log.truncate_to(5)  # in the gap: the log ends after the batch before it
    assert read_all(log) == [first] and log.log_end_offset == 2


# Reading.


def test_reads_stop_at_the_high_watermark_or_the_log_end(logs):
    log = logs.make(managed=True)
    written = fill(log)
    bases = bases_of(written)
    end = log.log_end_offset
    log.set_high_watermark(bases[8])
    assert read_all(log, up_to="high_watermark") == written[:8]
    assert read_all(log, up_to="log_end") == written
    assert read_all(log, bases[4] + 1, up_to="high_watermark") == written[4:8]  # inside batch 4
    empty = [
        (bases[8], "high_watermark"),
        (bases[8] + 2, "high_watermark"),
        (end, "high_watermark"),
        (end, "log_end"),
    ]
    for offset, up_to in empty:
        with log.read(offset, 1 << 20, up_to=up_to) as fetched:
            assert fetched.length == 0 and fetched.read_bytes() == b""
    for offset in (-1, end + 1):
        for up_to in ("high_watermark", "log_end"):
            with pytest.raises(OffsetOutOfRangeError):
                log.read(offset, 1 << 20, up_to=up_to)
    log.set_high_watermark(bases[10] + 1)  # inside batch 10: not readable yet
    assert read_all(log, up_to="high_watermark") == written[:10]
    with log.read(bases[10], 1 << 20) as fetched:
        assert fetched.read_bytes() == b""


def test_a_read_holds_the_first_batch_whole_and_may_cut_the_last_at_max_bytes(logs):
    log = logs.make()
    written = fill(log)
    bases = bases_of(written)
    first, second = written[0], written[1]
    for max_bytes, expected in [
        (0, first),
        (1, first),
        (len(first), first),
        (len(first) + 10, (first + second)[: len(first) + 10]),
        (len(first) + len(second), first + second),
    ]:
        with log.read(0, max_bytes) as fetched:
            assert fetched.read_bytes() == expected
    for number in range(len(written)):  # any read: a prefix of the log from the batch on
        for max_bytes in (0, 150, 700, 1 << 20):
            with log.read(bases[number], max_bytes) as fetched:
                data = fetched.read_bytes()
            assert data.startswith(written[number])
            assert b"".join(written[number:]).startswith(data)
            assert len(data) <= max(max_bytes, len(written[number]))


async def test_read_batch_containing_returns_whole_batches_below_the_high_watermark(logs):
    log = logs.make(managed=True)
    written = fill(log)
    bases = bases_of(written)
    log.set_high_watermark(bases[10] + 1)  # inside batch 10 (2 records)
    for number in (0, 4, 9):
        for offset in range(bases[number], bases[number + 1]):
            assert await log.read_batch_containing(offset) == written[number]
    assert await log.read_batch_containing(bases[10]) is None  # straddles the high watermark
    for offset in (-1, bases[10] + 1, log.log_end_offset):
        with pytest.raises(OffsetOutOfRangeError):
            await log.read_batch_containing(offset)


def test_offset_for_timestamp_finds_the_first_batch_below_the_high_watermark(logs):
    log = logs.make(managed=True)
    written = fill(log)  # batch n has timestamp 1000 + n
    bases = bases_of(written)
    log.set_high_watermark(bases[6])
    assert log.offset_for_timestamp(0) == (0, 1_000)
    assert log.offset_for_timestamp(1_005) == (bases[5], 1_005)
    assert log.offset_for_timestamp(1_006) is None
    log.set_high_watermark(log.log_end_offset)
    assert log.offset_for_timestamp(1_019) == (bases[19], 1_019)


# The high watermark.


def test_set_high_watermark_moves_forward_only_clipped_to_the_log_end(logs):
    log = logs.make(managed=True)
    written = fill(log)
    bases = bases_of(written)
    event = log.new_data_event
    assert log.set_high_watermark(bases[3]) == bases[3]
    assert event.is_set() and not log.new_data_event.is_set()
    event = log.new_data_event
    assert log.set_high_watermark(bases[2]) == bases[3]  # never back
    assert log.set_high_watermark(bases[3]) == bases[3]
    assert not event.is_set()
    assert log.set_high_watermark(10**9) == log.log_end_offset
    assert event.is_set() and log.high_watermark == log.log_end_offset


async def test_the_default_mode_derives_the_high_watermark_from_the_fsync_policy(logs):
    never = logs.make()
    fill(never)
    assert never.high_watermark == never.log_end_offset and never.durable_offset == 0
    always = logs.make(small_config(segment_bytes=1024, fsync="always"))
    written = fill(always)
    assert always.high_watermark == always.durable_offset == 0
    await always.wait_durable(bases_of(written)[3])  # durable up to the end at the call
    assert always.high_watermark == always.durable_offset == always.log_end_offset
    always.append(make_batch(99), now_ms=0, leader_epoch=9)
    assert always.high_watermark < always.log_end_offset
    always.update_config(CONFIG)  # fsync=never: the high watermark jumps to the log end
    assert always.high_watermark == always.log_end_offset
    assert always.restored_high_watermark is None


async def test_in_the_managed_mode_only_the_replica_layer_moves_the_high_watermark(logs):
    for fsync in ("always", "never"):
        log = logs.make(small_config(segment_bytes=1024, fsync=fsync), managed=True)
        written = fill(log)
        await log.flush()
        assert log.durable_offset == log.log_end_offset and log.high_watermark == 0
        log.update_config(CONFIG)
        assert log.high_watermark == 0 and log.high_watermark_managed_externally
    unmanaged = logs.make()
    fill(unmanaged)
    assert unmanaged.high_watermark == unmanaged.log_end_offset
    unmanaged.manage_high_watermark_externally(high_watermark=bases_of(written)[4])
    assert unmanaged.high_watermark_managed_externally
    assert unmanaged.high_watermark == bases_of(written)[4]  # may go back when switching
    unmanaged.append(make_batch(99), now_ms=0, leader_epoch=9)
    assert unmanaged.high_watermark == bases_of(written)[4]
    unmanaged.manage_high_watermark_externally()  # idempotent, stays where it is
    assert unmanaged.high_watermark == bases_of(written)[4]
    unmanaged.manage_high_watermark_externally(high_watermark=10**9)  # clipped
    assert unmanaged.high_watermark == unmanaged.log_end_offset


# Truncation.


def test_truncation_at_every_batch_boundary(logs):
    log = logs.make(managed=True)
    written = fill(log)
    if isinstance(log, PartitionLog):
        assert log.segment_count >= 3
    bases = bases_of(written)
    high_watermark = bases[12]
    log.set_high_watermark(high_watermark)
    for kept in range(len(written) + 1):
        progress = log.progress_event
        log.truncate_to(bases[kept])
        expected_high_watermark = min(high_watermark, bases[kept])
        check_log(log, written[:kept], expected_high_watermark)
        if kept < len(written):
            assert progress.is_set()
            assert log.durable_offset == bases[kept]
        # A crash now finds what truncation kept, and the checkpoints it wrote.
        log = logs.reopen_after_crash(log)
        check_log(log, written[:kept], expected_high_watermark)
        assert log.restored_high_watermark == expected_high_watermark
        assert log.durable_offset == log.log_end_offset
        if kept < len(written):  # appending goes on
            log.append_as_follower(b"".join(written[kept:]), now_ms=0)
        log.set_high_watermark(high_watermark)
        check_log(log, written, high_watermark)


def test_in_the_default_mode_truncation_leaves_the_high_watermark_at_the_new_end(logs):
    log = logs.make()
    written = fill(log)
    bases = bases_of(written)
    log.truncate_to(bases[7])
    check_log(log, written[:7], bases[7])
    assert log.durable_offset == bases[7]
    info = log.append(make_batch(99), now_ms=0, leader_epoch=11)  # appending goes on
    assert info.base_offset == bases[7]
    assert log.leader_epochs.entries() == epochs_of(written[:7]) + (EpochEntry(11, bases[7]),)
    assert log.high_watermark == log.log_end_offset


def test_truncation_inside_a_batch_or_out_of_range_changes_nothing(logs):
    log = logs.make(managed=True)
    written = fill(log)
    bases = bases_of(written)
    log.set_high_watermark(bases[10])
    before = snapshot(log)
    progress = log.progress_event
    with pytest.raises(StorageError, match="inside"):
        log.truncate_to(bases[4] + 1)
    for offset in (-1, log.log_end_offset + 1):
        with pytest.raises(OffsetOutOfRangeError):
            log.truncate_to(offset)
    log.truncate_to(log.log_end_offset)  # nothing to do
    assert snapshot(log) == before and not progress.is_set()


# Truncating fully (a follower below its leader's log start).


def check_empty_at(log: Log, offset: int) -> None:
    """The log is empty and starts at `offset`; offsets below it are out of range."""
    assert log.log_start_offset == log.log_end_offset == offset
    assert log.durable_offset == log.high_watermark == offset
    assert log.size_bytes == 0 and log.leader_epochs.entries() == ()
    assert log.latest_leader_epoch == -1
    assert log.end_offset_for_leader_epoch(9) == (-1, -1)
    statistics = log.statistics()
    assert (statistics.log_start_offset, statistics.log_end_offset) == (offset, offset)
    for up_to in ("high_watermark", "log_end"):
        with log.read(offset, 1 << 20, up_to=up_to) as fetched:  # type: ignore[arg-type]
            assert fetched.read_bytes() == b""
        for outside in (offset - 1, 0, offset + 1):
            if outside != offset:
                with pytest.raises(OffsetOutOfRangeError):
                    log.read(outside, 1 << 20, up_to=up_to)  # type: ignore[arg-type]


@pytest.mark.parametrize("managed", [True, False])
async def test_truncating_fully_leaves_an_empty_log_starting_at_the_offset(logs, managed):
    log = logs.make(managed=managed)
    written = fill(log)
    if managed:
        log.set_high_watermark(bases_of(written)[12])
    start = log.log_end_offset + 1_000  # a follower far behind its leader's log start
    progress, new_data = log.progress_event, log.new_data_event
    log.truncate_fully_and_start_at(start)
    check_empty_at(log, start)
    assert progress.is_set() and new_data.is_set()
    with pytest.raises(OffsetOutOfRangeError):
        await log.read_batch_containing(start - 1)
    with pytest.raises(OffsetOutOfRangeError):
        log.truncate_to(start - 1)
    log.truncate_to(start)  # the log end: nothing to do
    log = logs.reopen_after_crash(log)  # what a crash right after it finds
    check_empty_at(log, start)
    assert log.restored_high_watermark == start
    # A leader appends from there, in a new epoch
    info = log.append(make_batch(0, records=3), now_ms=0, leader_epoch=12)
    assert (info.base_offset, info.last_offset, info.log_start_offset) == (start, start + 2, start)
    assert log.leader_epochs.entries() == (EpochEntry(12, start),)
    if managed:
        assert log.high_watermark == start
        log.set_high_watermark(start + 3)
    await log.flush()
    assert [parse_header(batch).base_offset for batch in read_all(log)] == [start]
    log = logs.reopen_after_crash(log)
    assert (log.log_start_offset, log.log_end_offset) == (start, start + 3)
    assert log.high_watermark == start + 3
    assert log.leader_epochs.entries() == (EpochEntry(12, start),)


def test_a_follower_copies_the_leader_from_the_offset_it_truncated_fully_at(logs):
    leader = logs.make()
    written = fill(leader)
    bases = bases_of(written)
    follower = logs.make(managed=True)
    follower.append_as_follower(b"".join(written[:3]), now_ms=0)  # a short stale log
    follower.truncate_fully_and_start_at(bases[9])
    check_empty_at(follower, bases[9])
    before = snapshot(follower)
    with pytest.raises(StorageError, match="overlaps"):
        follower.append_as_follower(written[8], now_ms=0)  # below its start
    assert snapshot(follower) == before
    follower.append_as_follower(b"".join(written[9:]), now_ms=0)
    assert read_all(follower) == written[9:]
    assert follower.log_end_offset == leader.log_end_offset
    assert follower.size_bytes == sum(map(len, written[9:]))
    assert follower.leader_epochs.entries() == epochs_of(written[9:])
    assert follower.end_offset_for_leader_epoch(9) == leader.end_offset_for_leader_epoch(9)
    assert follower.high_watermark == bases[9]  # the leader's word moves it from there
    follower.set_high_watermark(bases[15])  # not checkpointed: the reset's checkpoint holds
    follower = logs.reopen_after_crash(follower)
    assert read_all(follower) == written[9:]
    assert follower.log_start_offset == follower.high_watermark == bases[9]


def test_truncating_fully_at_any_offset(logs):
    """Below, inside or at the end of the log, at a batch boundary or inside a batch (at a
    segment's base too, for the file log): the log is empty there, and a crash keeps it."""
    probe = logs.make()
    written = fill(probe)
    bases = bases_of(written)
    offsets = sorted({0, 1, bases[4] + 1, probe.log_end_offset + 7, *bases})
    for offset in offsets:
        log = logs.make(managed=True)
        fill(log)
        log.set_high_watermark(bases[10])
        log.truncate_fully_and_start_at(offset)
        check_empty_at(log, offset)
        if isinstance(log, PartitionLog):
            assert log.segment_count == 1
        log = logs.reopen_after_crash(log)
        check_empty_at(log, offset)
        log.append(make_batch(1), now_ms=0, leader_epoch=1)
        assert log.leader_epochs.entries() == (EpochEntry(1, offset),)


def test_truncating_fully_at_a_negative_offset_is_refused_and_changes_nothing(logs):
    log = logs.make(managed=True)
    fill(log)
    log.set_high_watermark(7)
    before = snapshot(log)
    for offset in (-1, 2**63):
        with pytest.raises(OffsetOutOfRangeError):
            log.truncate_fully_and_start_at(offset)
        assert snapshot(log) == before


async def test_a_full_truncation_during_wait_durable_fails_it(logs):
    for already_durable in (False, True):  # both had their offsets removed
        log = logs.make(managed=True)
        log.append(make_batch(0), now_ms=0)
        log.append(make_batch(1), now_ms=0)
        end = log.log_end_offset
        if already_durable:
            await log.wait_durable(end)
        failure = await run_interleaved(
            lambda: log.wait_durable(end), lambda: log.truncate_fully_and_start_at(end + 100)
        )
        assert failure is not None and "truncated fully" in str(failure), already_durable
        log.append(make_batch(2), now_ms=0)
        await log.wait_durable(log.log_end_offset)  # waits after it are not affected
        assert log.durable_offset == log.log_end_offset > end + 100


# Durability.


async def test_wait_durable_makes_what_was_appended_durable(logs):
    log = logs.make(managed=True)
    written = fill(log)
    bases = bases_of(written)
    assert log.durable_offset == 0
    progress = log.progress_event
    await log.wait_durable(bases[3])
    assert log.durable_offset == log.log_end_offset and progress.is_set()
    progress = log.progress_event
    await log.wait_durable(bases[5])  # already durable: nothing moves
    assert not progress.is_set()
    log.append(make_batch(99), now_ms=0, leader_epoch=9)
    assert log.durable_offset == bases[-1]
    await log.flush()
    assert log.durable_offset == log.log_end_offset
    assert log.statistics().durable_offset == log.durable_offset


async def test_wait_durable_covers_what_was_appended_before_it_was_called(logs):
    log = logs.make(managed=True)
    log.append(make_batch(0), now_ms=0)
    end = log.log_end_offset
    failure = await run_interleaved(
        lambda: log.wait_durable(end), lambda: log.append(make_batch(1), now_ms=0)
    )
    assert failure is None
    assert log.durable_offset == end < log.log_end_offset


async def test_a_truncation_during_wait_durable_fails_it(logs):
    log = logs.make(managed=True)
    log.append(make_batch(0), now_ms=0)
    cut = log.log_end_offset
    log.append(make_batch(1), now_ms=0)
    end = log.log_end_offset
    failure = await run_interleaved(lambda: log.wait_durable(end), lambda: log.truncate_to(cut))
    assert failure is not None and "truncated" in str(failure)
    assert log.durable_offset == log.log_end_offset == cut
    log.append(make_batch(2), now_ms=0)  # the void wait vouches for nothing new
    assert log.durable_offset == cut


async def test_progress_and_new_data_events_fire(logs):
    log = logs.make(managed=True)
    progress, new_data = log.progress_event, log.new_data_event
    log.append(make_batch(0), now_ms=0)
    assert progress.is_set() and not log.progress_event.is_set() and not new_data.is_set()
    log.set_high_watermark(1)
    assert new_data.is_set() and not log.new_data_event.is_set()
    progress = log.progress_event
    log.truncate_to(0)
    assert progress.is_set()
    never = logs.make()
    new_data = never.new_data_event
    never.append(make_batch(0), now_ms=0)
    assert new_data.is_set()
    always = logs.make(small_config(segment_bytes=1024, fsync="always"))
    new_data = always.new_data_event
    always.append(make_batch(0), now_ms=0)
    assert not new_data.is_set()
    progress = always.progress_event
    await always.wait_durable(always.log_end_offset)
    assert progress.is_set() and new_data.is_set()


async def test_a_process_crash_keeps_everything_and_the_checkpointed_high_watermark(logs):
    log = logs.make(managed=True)
    written = fill(log)
    bases = bases_of(written)
    log.set_high_watermark(bases[6])
    await log.write_high_watermark_checkpoint()
    log.set_high_watermark(bases[15])  # not checkpointed
    recovered = logs.reopen_after_crash(log)  # nothing was made durable
    check_log(recovered, written, bases[6])
    assert recovered.restored_high_watermark == bases[6]
    assert recovered.durable_offset == recovered.log_end_offset
    assert recovered.append(make_batch(99), now_ms=0, leader_epoch=9).base_offset == bases[-1]
    recovered.set_high_watermark(bases[9])
    await recovered.flush()  # flush checkpoints the high watermark too
    again = logs.reopen_after_crash(recovered)
    assert again.high_watermark == again.restored_high_watermark == bases[9]


async def test_without_a_checkpoint_the_high_watermark_restarts_at_the_log_start(logs):
    managed = logs.make(managed=True)
    fill(managed)
    managed.set_high_watermark(managed.log_end_offset)
    recovered = logs.reopen_after_crash(managed)
    assert recovered.restored_high_watermark is None and recovered.high_watermark == 0
    unmanaged = logs.make()
    written = fill(unmanaged)
    await unmanaged.write_high_watermark_checkpoint()
    unmanaged.append(make_batch(99), now_ms=0, leader_epoch=9)
    recovered = logs.reopen_after_crash(unmanaged)
    assert recovered.restored_high_watermark == bases_of(written)[-1]
    assert recovered.high_watermark == recovered.log_end_offset  # the default mode


async def test_a_closed_log_refuses_use(logs):
    log = logs.make(managed=True)
    fill(log)
    log.set_high_watermark(4)
    log.close()
    with pytest.raises(StorageError):
        log.append(make_batch(99), now_ms=0)
    with pytest.raises(StorageError):
        log.append_as_follower(with_base_offset(bytes(make_batch(99)), 10**6), now_ms=0)
    with pytest.raises(StorageError):
        log.truncate_to(0)
    with pytest.raises(StorageError):
        log.truncate_fully_and_start_at(100)
    with pytest.raises(StorageError):
        await log.write_high_watermark_checkpoint()
    with pytest.raises(AssertionError):
        log.read(0, 1 << 20)
    assert log.set_high_watermark(10**6) == 4  # a replica task outliving the log: no-op
    log.close()  # again: nothing happens


# Idempotent producers.


def produce(
    log: Log,
    producer_id: int,
    epoch: int,
    sequence: int,
    records: int = 1,
    *,
    timestamp_ms: int = 1_000,
    leader_epoch: int = 0,
) -> AppendInfo:
    """Append one idempotent batch as a leader would."""
    batch = make_idempotent_batch(
        producer_id, epoch, sequence, records=records, timestamp_ms=timestamp_ms
    )
    return log.append(batch, now_ms=0, leader_epoch=leader_epoch)


def offsets(info: AppendInfo) -> tuple[int, int, bool]:
    return info.base_offset, info.last_offset, info.duplicate


def produce_mixed(log: Log) -> list[AppendInfo]:
    """Producer 1 writes 7 batches of 2 records (sequences 0-13); after its batches 0, 3 and
    6, producer 2 (epoch 4) writes one of sequences 0, 1, 2, then a plain batch follows.
    Returns producer 1's answers."""
    answers = []
    for number in range(7):
        answers.append(produce(log, 1, 0, 2 * number, records=2))
        if number % 3 == 0:
            produce(log, 2, 4, number // 3)
            log.append(make_batch(number), now_ms=0)
    return answers


def rebuilt_state(log: Log) -> ProducerStateTable:
    """The producers' state that recording every batch of the log gives."""
    table = ProducerStateTable(producers_max=log.config.producers_max)
    for batch in read_all(log):
        table.record(parse_header(batch))
    return table


def test_a_duplicate_returns_the_original_offsets_and_writes_nothing(logs):
    log = logs.make()
    answers = produce_mixed(log)
    assert [offsets(info)[2] for info in answers] == [False] * 7
    before = snapshot(log)
    progress = log.progress_event
    for number in range(2, 7):  # the last 5 batches of producer 1
        retry = produce(log, 1, 0, 2 * number, records=2)
        assert offsets(retry) == (answers[number].base_offset, answers[number].last_offset, True)
        assert retry.log_start_offset == 0
    assert snapshot(log) == before and not progress.is_set()
    with pytest.raises(OutOfOrderSequenceError):  # older than the last 5: not recognised
        produce(log, 1, 0, 2, records=2)
    assert snapshot(log) == before
    assert offsets(produce(log, 1, 0, 14)) == (log.log_end_offset - 1,) * 2 + (False,)
    assert log.statistics().producer_count == 2


def test_an_out_of_order_sequence_is_refused_and_writes_nothing(logs):
    log = logs.make()
    produce(log, 1, 0, 0, records=3)
    before = snapshot(log)
    for sequence, records in ((4, 1), (2, 1), (1, 3), (0, 2)):
        with pytest.raises(OutOfOrderSequenceError):
            produce(log, 1, 0, sequence, records=records)
        assert snapshot(log) == before
    assert produce(log, 1, 0, 3).base_offset == 3


def test_an_older_producer_epoch_is_fenced(logs):
    log = logs.make()
    produce(log, 1, 5, 0)
    before = snapshot(log)
    for epoch, sequence in ((4, 1), (4, 0), (0, 0)):
        with pytest.raises(InvalidProducerEpochError):
            produce(log, 1, epoch, sequence)
        assert snapshot(log) == before


def test_a_new_producer_epoch_starts_at_sequence_zero(logs):
    log = logs.make()
    first = produce(log, 1, 0, 0, records=2)
    produce(log, 1, 0, 2)
    before = snapshot(log)
    with pytest.raises(OutOfOrderSequenceError):
        produce(log, 1, 1, 3)
    assert snapshot(log) == before
    bumped = produce(log, 1, 1, 0, records=2)
    assert not bumped.duplicate and bumped.base_offset == 3
    assert offsets(produce(log, 1, 1, 0, records=2)) == (3, 4, True)  # the new epoch's batch
    with pytest.raises(InvalidProducerEpochError):  # the old epoch's batch is fenced
        produce(log, 1, 0, 0, records=2)
    assert first.base_offset == 0


def test_an_idempotent_batch_must_come_alone(logs):
    log = logs.make()
    produce(log, 1, 0, 0)
    before = snapshot(log)
    alone = make_idempotent_batch(1, 0, 1)
    for batches in (
        make_batch(1) + alone,
        alone + make_idempotent_batch(1, 0, 2),
        alone + make_idempotent_batch(2, 0, 0),
    ):
        original = bytes(batches)
        with pytest.raises(InvalidRecordError, match="one batch only"):
            log.append(batches, now_ms=0)
        assert snapshot(log) == before and bytes(batches) == original  # not even patched
    for bad in (make_idempotent_batch(1, 0, -1), make_idempotent_batch(1, -1, 1)):
        with pytest.raises(InvalidRecordError):
            log.append(bad, now_ms=0)
    assert snapshot(log) == before
    # A follower copies its leader's batches, several producers' in one append.
    follower = logs.make(managed=True)
    copied = read_all(log) + [
        make_idempotent_batch(1, 0, 1, records=2),
        make_idempotent_batch(2, 0, 0),
    ]
    offset = 0
    for number, batch in enumerate(copied):  # as the leader would have placed them
        copied[number] = with_base_offset(bytes(batch), offset)
        offset = parse_header(copied[number]).next_offset
    follower.append_as_follower(b"".join(copied), now_ms=0)
    assert read_all(follower) == copied


def test_a_follower_carries_the_state_so_a_new_leader_detects_duplicates(logs):
    leader = logs.make()
    answers = produce_mixed(leader)
    follower = logs.make(managed=True)
    written = read_all(leader)
    follower.append_as_follower(b"".join(written[:5]), now_ms=0)  # in two fetches
    follower.append_as_follower(b"".join(written[5:]), now_ms=0)
    assert follower.producer_state.producers() == leader.producer_state.producers()
    follower.manage_high_watermark_externally()  # it leads now (in a new leader epoch)
    before = snapshot(follower)
    retry = produce(follower, 1, 0, 12, records=2, leader_epoch=1)
    assert offsets(retry) == (answers[6].base_offset, answers[6].last_offset, True)
    # producer 2's last batch follows producer 1's last one
    assert offsets(produce(follower, 2, 4, 2)) == (answers[6].last_offset + 1,) * 2 + (True,)
    with pytest.raises(OutOfOrderSequenceError):
        produce(follower, 1, 0, 15, leader_epoch=1)
    with pytest.raises(InvalidProducerEpochError):
        produce(follower, 2, 3, 7, leader_epoch=1)
    assert snapshot(follower) == before
    assert produce(follower, 1, 0, 14, leader_epoch=1).base_offset == follower.log_end_offset - 1


def check_resumes(log: Log, answers: list[AppendInfo]) -> None:
    """Producer 1 of `produce_mixed` goes on in `log`: its retries are duplicates with their
    original offsets, its next batch is in sequence."""
    end = log.log_end_offset
    for number in range(2, 7):
        retry = produce(log, 1, 0, 2 * number, records=2)
        assert offsets(retry) == (answers[number].base_offset, answers[number].last_offset, True)
    assert log.log_end_offset == end
    with pytest.raises(OutOfOrderSequenceError):
        produce(log, 1, 0, 15)
    assert produce(log, 1, 0, 14).base_offset == end


def test_the_producers_state_survives_a_clean_close(logs):
    log = logs.make()
    answers = produce_mixed(log)
    state = log.producer_state.producers()
    log = logs.reopen_after_close(log)
    assert log.producer_state.producers() == state
    check_resumes(log, answers)
    log = logs.reopen_after_close(log)  # again, without appends in between
    assert log.producer_state.producers() == rebuilt_state(log).producers()
    empty = logs.reopen_after_close(logs.make())
    assert len(empty.producer_state) == 0


def test_the_producers_state_survives_a_crash(logs):
    log = logs.make()
    answers = produce_mixed(log)
    state = log.producer_state.producers()
    log = logs.reopen_after_crash(log)
    assert log.producer_state.producers() == state
    check_resumes(log, answers)
    log = logs.reopen_after_close(log)
    log.append(make_batch(99), now_ms=0)
    log = logs.reopen_after_crash(log)  # from the close's snapshot and the batch after it
    assert log.producer_state.producers() == rebuilt_state(log).producers()


def test_truncation_rebuilds_the_producers_state_from_what_is_kept(logs):
    log = logs.make(managed=True)
    produce_mixed(log)
    batches = read_all(log)
    bases = bases_of(batches)
    for kept in reversed(range(len(batches) + 1)):
        log.truncate_to(bases[kept])
        expected = rebuilt_state(log).producers()
        assert log.producer_state.producers() == expected
        log = logs.reopen_after_crash(log)
        assert log.producer_state.producers() == expected
    # Once producer 1's batches are gone, it is unknown: any sequence is accepted.
    assert offsets(produce(log, 1, 0, 12, records=2)) == (0, 1, False)


def test_a_batch_truncated_away_is_not_a_duplicate_any_more(logs):
    log = logs.make(managed=True)
    answers = produce_mixed(log)
    end = answers[5].base_offset
    log.truncate_to(end)  # producer 1's last two batches go
    assert offsets(produce(log, 1, 0, 10, records=2)) == (end, end + 1, False)  # written again
    kept = answers[4]
    assert offsets(produce(log, 1, 0, 8, records=2)) == (kept.base_offset, kept.last_offset, True)


def test_truncating_fully_clears_the_producers_state(logs):
    log = logs.make(managed=True)
    produce_mixed(log)
    log.truncate_fully_and_start_at(1_000)
    assert len(log.producer_state) == 0
    log = logs.reopen_after_crash(log)
    assert len(log.producer_state) == 0
    assert offsets(produce(log, 1, 0, 12, records=2)) == (1_000, 1_001, False)
    log = logs.reopen_after_close(log)
    assert offsets(produce(log, 1, 0, 12, records=2)) == (1_000, 1_001, True)


def test_expired_producers_are_forgotten_and_stay_so_after_a_clean_close(logs):
    log = logs.make(small_config(producer_id_expiration_ms=1_000))
    produce(log, 1, 0, 0, timestamp_ms=5_000)
    produce(log, 2, 0, 0, timestamp_ms=5_500)
    log = logs.reopen_after_close(log)  # its snapshot at the log end holds both
    assert log.expire_producers(5_999) == 0
    assert log.expire_producers(6_000) == 1  # producer 1's last batch is 1000 ms old
    assert log.producer_state.get(1) is None and log.producer_state.get(2) is not None
    log = logs.reopen_after_close(log)
    assert log.producer_state.get(1) is None and log.producer_state.get(2) is not None
    retry = produce(log, 1, 0, 0, timestamp_ms=5_000)  # unknown now: written again
    assert not retry.duplicate and retry.base_offset == 2
    assert log.expire_producers(10**6) == 2 and len(log.producer_state) == 0
