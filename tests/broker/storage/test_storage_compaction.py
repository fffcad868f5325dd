"""Log compaction: the last value of each key survives at its offset, tombstones expire, the
swap is crash-safe, gaps are not damage, appends and reads go on during a compaction."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
from pathlib import Path
from typing import NamedTuple

import pytest
import trio
import trio.testing
from broker_test_support import create_topic, running_node
from storage_test_support import small_config

from broker.storage import CompactionResult, LogConfig, PartitionLog
from broker.storage import log_cleaner, partition_log
from broker.storage.segment import Segment
from protocol.record_batch import (
    BatchHeader,
    Compression,
    build_batch,
    complete_prefix_bytes,
    decode_records,
    scan_batches,
)

NOW_MS = 10**9  # far past every record's timestamp
DELETE_RETENTION_MS = 1000
SIZED = small_config(
    segment_bytes=1024,
    index_interval_bytes=128,
    cleanup_policy="compact",
    delete_retention_ms=DELETE_RETENTION_MS,
)
# Segments roll only when a test calls `roll` (appends use now_ms=0, segment.ms is 1).
MANUAL = dataclasses.replace(SIZED, segment_bytes=1 << 20, segment_ms=1)


class Appended(NamedTuple):
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    batch_max_timestamp: int


def append(
    log: PartitionLog, records, *, compression=Compression.NONE, now_ms: int = 0
) -> list[Appended]:
    """Append one batch of (timestamp, key, value[, headers]); return its records."""
    info = log.append(bytearray(build_batch(records, compression=compression)), now_ms=now_ms)
    batch_max = max(record[0] for record in records)
    return [
        Appended(
            info.base_offset + index,
            record[0],
            record[1],
            record[2],
            tuple(record[3]) if len(record) > 3 else (),
            batch_max,
        )
        for index, record in enumerate(records)
    ]


def roll(log: PartitionLog) -> int:
    """Close the active segment (of a MANUAL log); return the new active base offset."""
    assert log.roll_if_due(now_ms=10**12)
    return log.log_end_offset


def as_tuples(records) -> list[tuple]:
    return [
        (r.offset, r.timestamp, r.key, r.value, tuple(tuple(h) for h in r.headers)) for r in records
    ]


def read_all(log: PartitionLog, start: int | None = None) -> tuple[list[tuple], list[BatchHeader]]:
    """Every record (as tuples) and batch header from `start` to the high watermark, read
    through `PartitionLog.read` following gaps."""
    records: list[tuple] = []
    headers: list[BatchHeader] = []
    offset = log.log_start_offset if start is None else start
    while offset < log.high_watermark:
        with log.read(offset, 1 << 20) as fetched:
            data = fetched.read_bytes()
        data = data[: complete_prefix_bytes(data)]
        if not data:
            break
        for batch in scan_batches(data):
            headers.append(batch.header)
        records += [r for r in as_tuples(decode_records(data)) if r[0] >= offset]
        offset = headers[-1].next_offset
    return records, headers


def survivors(appended: list[Appended], cleaned_end: int, now_ms: int) -> list[tuple]:
    """What compaction of the offsets below `cleaned_end` must leave."""
    latest = {record.key: record.offset for record in appended if record.key is not None}
    horizon = now_ms - DELETE_RETENTION_MS
    kept = [
        record
        for record in appended
        if record.offset >= cleaned_end
        or record.key is None
        or (
            latest[record.key] == record.offset
            and (record.value is not None or record.batch_max_timestamp >= horizon)
        )
    ]
    return [record[:5] for record in kept]


def active_base(log: PartitionLog) -> int:
    return max(int(path.stem) for path in log.directory.glob("*.log"))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".cleaned", ".swap"))


def many_updates(log: PartitionLog, batches: int = 90, start: int = 0) -> list[Appended]:
    """Batches of 1 to 3 records of one key among four, now and then of a key written only
    once (with headers), and keyless batches; with SIZED segments they fill several
    segments."""
    appended: list[Appended] = []
    for number in range(start, start + batches):
        timestamp = 1_000 + 10 * number
        headers = []
        if number % 7 == 3:
            records = [(timestamp, None, b"keyless-%d" % number)] * 2
        else:
            key = b"key-%d" % (number % 4)
            if number % 11 == 5:
                key, headers = b"once-%d" % number, [("n", b"%d" % number)]
            records = [
                (timestamp + index, key, b"value-%d-%d" % (number, index), headers)
                for index in range(1 + number % 3)
            ]
        appended += append(log, records)
    return appended


def open_log(tmp_path: Path, config: LogConfig = SIZED) -> PartitionLog:
    return PartitionLog.open(tmp_path / "t-0", config, now_ms=0)


async def test_many_updates_keep_the_latest_value_per_key_at_its_offset(tmp_path):
    log = open_log(tmp_path)
    appended = many_updates(log)
    assert log.segment_count >= 5
    cleaned_end = active_base(log)
    start, end, size = log.log_start_offset, log.log_end_offset, log.size_bytes
    assert read_all(log)[0] == [record[:5] for record in appended]
    assert log.compaction_dirty_bytes > 0

    result = await log.compact(NOW_MS)

    expected = survivors(appended, cleaned_end, NOW_MS)
    records, _ = read_all(log)
    assert records == expected
    assert any(record[4] for record in records if record[0] < cleaned_end)  # headers kept
    assert (log.log_start_offset, log.log_end_offset) == (start, end)
    assert log.size_bytes < size
    assert result.segments_cleaned == log.segment_count - 1
    assert result.records_removed == len(appended) - len(expected)
    assert result.bytes_before - result.bytes_after == size - log.size_bytes
    assert log.size_bytes == sum(path.stat().st_size for path in log.directory.glob("*.log"))
    assert log.compaction_dirty_bytes == 0
    assert leftovers(log.directory) == []
    # A consumer starting at any offset, in a gap or not, gets the next surviving records.
    for offset in range(start, end):
        assert read_all(log, offset)[0] == [record for record in expected if record[0] >= offset]
    log.close()


async def test_every_batch_holds_what_the_reader_decodes(tmp_path):
    """Timestamps, offsets and the indexes of the rewritten segments agree."""
    log = open_log(tmp_path)
    many_updates(log)
    await log.compact(NOW_MS)
    records, headers = read_all(log)
    by_offset = {record[0]: record for record in records}
    for header in headers:
        offsets = range(header.base_offset, header.next_offset)
        assert all(offset in by_offset for offset in offsets)
        assert header.max_timestamp == max(by_offset[offset][1] for offset in offsets)
    for timestamp in range(900, 2_000, 7):
        later = [h for h in headers if h.max_timestamp >= timestamp]
        expected = (later[0].base_offset, later[0].max_timestamp) if later else None
        assert log.offset_for_timestamp(timestamp) == expected
    log.close()


async def test_a_newer_value_in_the_active_segment_removes_older_ones(tmp_path):
    log = open_log(tmp_path, MANUAL)
    old = append(log, [(100, b"k", b"old"), (101, b"other", b"kept")])
    roll(log)
    newer = append(log, [(200, b"k", b"new")])
    result = await log.compact(NOW_MS)
    assert read_all(log)[0] == [old[1][:5], newer[0][:5]]
    assert result == CompactionResult(
        segments_cleaned=1,
        records_removed=1,
        bytes_before=result.bytes_before,
        bytes_after=result.bytes_after,
    )
    log.close()


async def test_tombstones_are_dropped_once_older_than_delete_retention(tmp_path):
    log = open_log(tmp_path, MANUAL)
    appended = append(log, [(100, b"a", b"a1")])
    appended += append(log, [(200, b"a", None)])  # an old tombstone
    appended += append(log, [(300, b"b", b"b1")])
    appended += append(log, [(5_000, b"b", None)])  # a young tombstone
    appended += append(log, [(5_000, None, None)])  # keyless: never compacted
    cleaned_end = roll(log)
    appended += append(log, [(6_000, b"c", b"c1")])

    await log.compact(now_ms=5_500)  # the horizon is 4_500
    records = read_all(log)[0]
    assert records == survivors(appended, cleaned_end, 5_500)
    assert [(record[2], record[3]) for record in records] == [
        (b"b", None),
        (None, None),
        (b"c", b"c1"),
    ]

    await log.compact(now_ms=6_001)  # the horizon is 5_001: the last tombstone goes too
    records = read_all(log)[0]
    assert records == survivors(appended, cleaned_end, 6_001)
    assert [(record[2], record[3]) for record in records] == [(None, None), (b"c", b"c1")]
    log.close()


@pytest.mark.parametrize("codec", [Compression.ZSTD, Compression.LZ4, Compression.GZIP])
async def test_compression_is_preserved(tmp_path, codec):
    log = open_log(tmp_path, MANUAL)
    appended = append(log, [(100, b"gone", b"%d" % n) for n in range(20)], compression=codec)
    values = [bytes(range(number, number + 60)) for number in range(4)]
    appended += append(
        log,
        [(200 + n, bytes([key]), value) for n, (key, value) in enumerate(zip(b"xxzy", values))],
        compression=codec,
    )
    cleaned_end = roll(log)
    appended += append(log, [(300, b"y", b"newer"), (301, b"gone", b"newer")])
    await log.compact(NOW_MS)
    records, headers = read_all(log)
    assert records == survivors(appended, cleaned_end, NOW_MS)
    assert [record[3] for record in records] == [values[1], values[2], b"newer", b"newer"]
    # Offsets 21 and 22 survive from the second batch: one batch, compressed like the source.
    assert (headers[0].base_offset, headers[0].record_count) == (21, 2)
    assert headers[0].compression == codec
    log.close()


async def test_consecutive_survivors_share_a_batch_and_a_copy_never_grows(tmp_path):
    """Each run of kept records becomes one batch; but a batch whose rewrite would make its
    segment's copy larger than the original (here: the first batch of a segment, split into
    two runs) is kept as it is, superseded records included."""
    log = open_log(tmp_path, MANUAL)
    appended = append(log, [(100 + n, b"gone", b"v%d" % n) for n in range(20)])
    appended += append(
        log,
        [
            (200, b"k1", b"old"),
            (201, b"s1", b"a"),
            (202, b"s2", b"b"),
            (203, b"k2", b"old"),
            (204, b"s3", b"c"),
        ],
    )
    second_base = roll(log)
    unsplittable = append(
        log, [(300, b"k3", b"old"), (301, b"s4", b"d"), (302, b"k4", b"old"), (303, b"s5", b"e")]
    )
    cleaned_end = roll(log)
    appended += append(log, [(400, k, b"new") for k in (b"gone", b"k1", b"k2", b"k3", b"k4")])
    second_segment = log.directory / f"{second_base:020d}.log"
    second_bytes = second_segment.read_bytes()

    await log.compact(NOW_MS)
    records, headers = read_all(log)
    assert records == survivors(appended, cleaned_end, NOW_MS)[:3] + [
        record[:5] for record in unsplittable
    ] + [record[:5] for record in appended[-5:]]
    assert [(h.base_offset, h.record_count) for h in headers[:2]] == [(21, 2), (24, 1)]
    assert second_segment.read_bytes() == second_bytes
    log.close()


async def test_a_segment_emptied_by_compaction_keeps_its_place(tmp_path, monkeypatch):
    log = open_log(tmp_path, MANUAL)
    append(log, [(100, b"k", b"1"), (101, b"k", b"2")])
    second = roll(log)
    append(log, [(200, b"j", b"1")])
    third = roll(log)
    appended = append(log, [(300, b"k", b"3"), (301, b"j", b"2")])
    await log.compact(NOW_MS)
    assert [(path.name, path.stat().st_size) for path in sorted(log.directory.glob("*.log"))][
        :2
    ] == [
        (f"{0:020d}.log", 0),
        (f"{second:020d}.log", 0),
    ]
    assert log.log_start_offset == 0 and log.segment_count == 3
    expected = [record[:5] for record in appended]
    assert read_all(log)[0] == expected
    for offset in range(third + 1):
        assert read_all(log, offset)[0] == expected
    log.close()
    recovered = count_recoveries(monkeypatch)
    reopened = open_log(tmp_path, MANUAL)  # a clean shutdown: empty segments load as they are
    assert recovered == []
    assert read_all(reopened)[0] == expected and reopened.segment_count == 3
    reopened.update_config(dataclasses.replace(MANUAL, cleanup_policy="compact,delete"))
    assert reopened.apply_retention(now_ms=NOW_MS) == 2  # empty segments have no timestamp
    assert reopened.log_start_offset == third and read_all(reopened)[0] == expected
    reopened.close()


def count_recoveries(monkeypatch) -> list[int]:
    recovered: list[int] = []
    original = Segment.recover

    def recover(segment, **arguments):
        recovered.append(segment.base_offset)
        return original(segment, **arguments)

    monkeypatch.setattr(Segment, "recover", recover)
    return recovered


async def test_a_compacted_log_reopens_cleanly_and_recovers_after_a_crash(tmp_path, monkeypatch):
    log = open_log(tmp_path)
    many_updates(log)
    await log.compact(NOW_MS)
    compacted = read_all(log)
    timestamps = [log.offset_for_timestamp(t) for t in range(900, 2_000, 13)]
    crashed = tmp_path / "crashed" / "t-0"
    shutil.copytree(log.directory, crashed)  # open files, no clean-shutdown marker
    (crashed / "recovery-point").unlink()  # every segment is scanned
    log.close()
    recovered = count_recoveries(monkeypatch)

    reopened = open_log(tmp_path)
    assert recovered == []
    assert read_all(reopened) == compacted
    assert [reopened.offset_for_timestamp(t) for t in range(900, 2_000, 13)] == timestamps
    reopened.close()

    after_crash = PartitionLog.open(crashed, SIZED, now_ms=0)
    assert len(recovered) == after_crash.segment_count > 3  # gaps are not damage
    assert read_all(after_crash) == compacted
    after_crash.close()


async def test_overlapping_offsets_in_a_compacted_segment_are_damage(tmp_path):
    log = open_log(tmp_path, MANUAL)
    append(log, [(100, b"a", b"1"), (101, b"b", b"1"), (102, b"a", b"2")])  # keeps 1, 2
    append(log, [(103, b"c", b"1"), (104, b"d", b"1")])
    roll(log)
    append(log, [(200, b"e", b"1")])
    await log.compact(NOW_MS)
    records, headers = read_all(log)
    assert [(h.base_offset, h.record_count) for h in headers] == [(1, 2), (3, 2), (5, 1)]
    log.close()
    first = log.directory / f"{0:020d}.log"
    with open(first, "r+b") as file:  # the second batch now starts at offset 2, in the first
        file.seek(headers[0].size_bytes)
        file.write((2).to_bytes(8, "big"))
    (log.directory / ".clean-shutdown").unlink()
    (log.directory / "recovery-point").unlink()
    reopened = open_log(tmp_path, MANUAL)
    assert read_all(reopened)[0] == records[:2]  # the damage and every later segment go
    assert reopened.segment_count == 1 and reopened.log_end_offset == 3
    reopened.close()


# Crash safety of the swap.


def snapshot_on(monkeypatch, module, name: str, into: Path) -> list[Path]:
    """Copy the log directory each time `module.name` is called (before running it): the
    images a crash at that instant would leave."""
    images: list[Path] = []
    original = getattr(module, name)

    def copying(directory, *arguments):
        image = into / f"image-{len(images)}" / "t-0"
        shutil.copytree(directory, image)
        images.append(image)
        return original(directory, *arguments)

    monkeypatch.setattr(module, name, copying)
    return images


async def test_a_crash_at_any_step_of_the_swap_leaves_a_correct_log(tmp_path, monkeypatch):
    log = open_log(tmp_path)
    many_updates(log)
    before = read_all(log)
    # The cleaner fsyncs the directory twice: after removing the old index files (the copies
    # are then `.cleaned`) and after renaming the copies to `.swap`.
    images = snapshot_on(monkeypatch, log_cleaner, "fsync_directory", tmp_path / "cleaner")
    # Then each `.swap` is renamed over its `.log` before its new indexes are put in place.
    swapping = snapshot_on(monkeypatch, partition_log, "finish_swap", tmp_path / "swap")
    result = await log.compact(NOW_MS)
    after = read_all(log)
    log.close()
    assert len(images) == 2 and len(swapping) == result.segments_cleaned > 3

    cleaned_image, swap_image, halfway_image = images[0], images[1], swapping[2]
    assert any(name.endswith(".log.cleaned") for name in leftovers(cleaned_image))
    assert not (cleaned_image / f"{0:020d}.index").exists()  # already removed
    assert any(name.endswith(".log.swap") for name in leftovers(swap_image))
    for image, expected in ((cleaned_image, before), (swap_image, after), (halfway_image, after)):
        reopened = PartitionLog.open(image, SIZED, now_ms=0)
        assert read_all(reopened) == expected
        assert leftovers(image) == []
        reopened.close()
        again = PartitionLog.open(image, SIZED, now_ms=0)  # the indexes were rebuilt right
        assert read_all(again) == expected
        again.close()


def test_stray_swap_files_are_removed_on_open(tmp_path):
    log = open_log(tmp_path)
    many_updates(log, batches=10)
    before = read_all(log)
    log.close()
    # A segment deleted by retention while it was compacted: the `.swap` has no `.log`.
    (log.directory / f"{999:020d}.log.swap").write_bytes(b"junk")
    (log.directory / f"{0:020d}.index.swap").write_bytes(b"junk")
    (log.directory / f"{0:020d}.log.cleaned").write_bytes(b"junk")
    reopened = open_log(tmp_path)
    assert leftovers(log.directory) == []
    assert read_all(reopened) == before
    reopened.close()


# Retention and cleanup.policy.


def build_aged_log(tmp_path, policy: str, **overrides) -> PartitionLog:
    """Ten segments; the batches of segment i carry timestamps 1000 * i."""
    config = small_config(segment_bytes=1 << 20, segment_ms=500, cleanup_policy=policy, **overrides)
    log = PartitionLog.open(tmp_path / "t-0", config, now_ms=0)
    for segment in range(10):
        for number in range(3):
            now_ms = 1000 * segment
            append(log, [(now_ms, b"key-%d" % number, b"value-%d" % segment)], now_ms=now_ms)
    assert log.segment_count == 10
    return log


def test_retention_under_compact_alone_deletes_nothing(tmp_path):
    log = build_aged_log(tmp_path, "compact", retention_ms=0, retention_bytes=0)
    assert log.apply_retention(now_ms=NOW_MS) == 0
    assert log.segment_count == 10
    log.close()


def test_retention_under_compact_and_delete_deletes_by_age_and_size(tmp_path):
    log = build_aged_log(tmp_path, "compact,delete", retention_ms=4500)
    assert log.apply_retention(now_ms=7000) == 3
    segment_size = log.size_bytes // 7
    log.update_config(dataclasses.replace(log.config, retention_bytes=3 * segment_size))
    assert log.apply_retention(now_ms=7000) == 4
    assert log.segment_count == 3
    log.close()


async def test_compaction_only_runs_under_a_compact_policy(tmp_path):
    log = build_aged_log(tmp_path, "delete", retention_ms=-1)
    size = log.size_bytes
    assert log.compaction_dirty_bytes == 0
    assert await log.compact(NOW_MS) == CompactionResult(
        segments_cleaned=0, records_removed=0, bytes_before=0, bytes_after=0
    )
    assert log.size_bytes == size
    log.update_config(dataclasses.replace(log.config, cleanup_policy="compact,delete"))
    assert log.compaction_dirty_bytes > 0
    # The active segment holds the last value of each of the three keys.
    assert (await log.compact(NOW_MS)).records_removed == 27
    log.close()


async def test_the_key_map_is_bounded(tmp_path, caplog):
    log = open_log(tmp_path, MANUAL)
    appended: list[Appended] = []
    bases = []
    for keys in ((b"a", b"b"), (b"c", b"d"), (b"e", b"f")):
        appended += append(log, [(100, key, b"1") for key in keys])
        appended += append(log, [(101, key, b"2") for key in keys])
        bases.append(roll(log))
    appended += append(log, [(200, b"a", b"3")])
    third = log.directory / f"{bases[1]:020d}.log"
    third_bytes = third.read_bytes()

    with caplog.at_level(logging.WARNING, logger="dwal.storage"):
        assert await log.compact(NOW_MS, keys_max=1) == log_cleaner.NOTHING_CLEANED
    assert "cannot progress" in caplog.text

    first = await log.compact(NOW_MS, keys_max=4)  # a to d fit, e does not: two segments
    assert (first.segments_cleaned, first.records_removed) == (2, 4)
    assert third.read_bytes() == third_bytes
    assert log.compaction_dirty_bytes == len(third_bytes)
    second = await log.compact(NOW_MS, keys_max=4)  # maps on from the third segment
    assert (second.segments_cleaned, second.records_removed) == (2, 3)  # a=2 goes too
    assert read_all(log)[0] == survivors(appended, bases[-1], NOW_MS)
    log.close()


# Concurrency.


def block_cleaner(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make the cleaner thread wait, once started, until the returned `release` is set."""
    started, release = threading.Event(), threading.Event()
    original = partition_log.clean_segments

    def blocked(plan, abort):
        started.set()
        assert release.wait(timeout=30)
        return original(plan, abort)

    monkeypatch.setattr(partition_log, "clean_segments", blocked)
    return started, release


async def start_compaction(nursery, log, started, now_ms=NOW_MS) -> list[CompactionResult]:
    results: list[CompactionResult] = []

    async def compact():
        results.append(await log.compact(now_ms))

    nursery.start_soon(compact)
    assert await trio.to_thread.run_sync(started.wait, 30)
    return results


async def test_appends_and_reads_go_on_during_a_compaction(tmp_path, monkeypatch):
    log = open_log(tmp_path)
    appended = many_updates(log)
    cleaned_end = active_base(log)
    before = read_all(log)[0]
    started, release = block_cleaner(monkeypatch)
    async with trio.open_nursery() as nursery:
        results = await start_compaction(nursery, log, started)
        held = log.read(0, 1 << 20)  # a fetch in flight across the swap
        assert read_all(log)[0] == before
        later = many_updates(log, batches=30, start=90)  # rolls more segments
        assert read_all(log)[0] == before + [record[:5] for record in later]
        release.set()
    [result] = results
    assert result.segments_cleaned > 3
    expected = survivors(appended, cleaned_end, NOW_MS) + [record[:5] for record in later]
    assert read_all(log)[0] == expected
    assert decode_records(held.read_bytes(), allow_partial_tail=True)[0].value == b"value-0-0"
    held.close()
    # Later values only count in the next compaction.
    await log.compact(NOW_MS)
    assert read_all(log)[0] == survivors(appended + later, active_base(log), NOW_MS)
    log.close()


async def test_a_segment_deleted_during_a_compaction_is_not_brought_back(tmp_path, monkeypatch):
    config = dataclasses.replace(MANUAL, cleanup_policy="compact,delete", retention_ms=100_000)
    log = open_log(tmp_path, config)
    appended = append(log, [(1_000, b"k", b"1"), (1_000, b"k", b"2")])
    second = roll(log)
    appended += append(log, [(500_000, b"j", b"1"), (500_000, b"j", b"2")])
    cleaned_end = roll(log)
    appended += append(log, [(500_000, b"i", b"1")])
    started, release = block_cleaner(monkeypatch)
    async with trio.open_nursery() as nursery:
        results = await start_compaction(nursery, log, started)
        assert log.apply_retention(now_ms=200_000) == 1  # the first segment expires
        release.set()
    assert results == [
        CompactionResult(
            segments_cleaned=1,
            records_removed=1,
            bytes_before=results[0].bytes_before,
            bytes_after=results[0].bytes_after,
        )
    ]
    assert log.log_start_offset == second
    assert read_all(log)[0] == [r for r in survivors(appended, cleaned_end, NOW_MS) if r[0] >= 2]
    assert leftovers(log.directory) == []
    assert not (log.directory / f"{0:020d}.log").exists()
    log.close()
    reopened = open_log(tmp_path, config)
    assert reopened.log_start_offset == second
    reopened.close()


async def test_closing_the_log_during_a_compaction_discards_it(tmp_path, monkeypatch):
    log = open_log(tmp_path)
    many_updates(log)
    before = read_all(log)
    started, release = block_cleaner(monkeypatch)
    async with trio.open_nursery() as nursery:
        results = await start_compaction(nursery, log, started)
        log.close()
        release.set()
    assert results == [log_cleaner.NOTHING_CLEANED]
    assert leftovers(log.directory) == []
    reopened = open_log(tmp_path)
    assert read_all(reopened) == before
    reopened.close()


# The registry.


async def test_the_registry_compacts_only_compact_topics(tmp_path, caplog):
    async with running_node(tmp_path, LogConfig(fsync="never")) as node:
        registry = node.registry
        await create_topic(
            node, "table", 1, configs={"cleanup.policy": "compact", "segment.bytes": "1024"}
        )
        await create_topic(node, "events", 1, configs={"segment.bytes": "1024"})
        logs = [registry.log("table", 0), registry.log("events", 0)]
        for log in logs:
            many_updates(log, batches=40)
        # appended to the logs directly: the leader's replica task moves the HW over them
        await trio.testing.wait_all_tasks_blocked()
        sizes = [log.size_bytes for log in logs]
        with caplog.at_level(logging.INFO, logger="dwal.topics"):
            assert await registry.compact_logs() == 1
        assert logs[0].size_bytes < sizes[0] and logs[1].size_bytes == sizes[1]
        compacted = [r for r in caplog.records if r.getMessage() == "log_compacted"]
        assert [r.fields["partition"] for r in compacted] == ["table-0"]
        assert await registry.compact_logs() == 0  # no segment rolled since
        many_updates(logs[0], batches=20, start=40)
        await trio.testing.wait_all_tasks_blocked()
        assert await registry.compact_logs() == 1
