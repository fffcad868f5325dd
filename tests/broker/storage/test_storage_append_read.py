import os

import pytest
from storage_test_support import append_batches, make_batch, read_batches, small_config

from broker.storage import (
    CorruptRecordError,
    OffsetOutOfRangeError,
    PartitionLog,
    RecordTooLargeError,
)
from protocol.record_batch import decode_records, parse_header


def open_log(tmp_path, **overrides) -> PartitionLog:
    return PartitionLog.open(tmp_path / "topic-0", small_config(**overrides), now_ms=0)


def test_round_trip_across_segments(tmp_path):
    log = open_log(tmp_path)
    expected_offset = 0
    written = []
    for number in range(60):
        batch = make_batch(number, records=1 + number % 4)
        info = log.append(batch, now_ms=0)
        assert info.base_offset == expected_offset
        assert info.last_offset == expected_offset + number % 4
        assert info.log_append_time == -1 and info.log_start_offset == 0
        expected_offset = info.last_offset + 1
        written.append(bytes(batch))
    assert log.segment_count >= 4
    assert log.log_end_offset == log.high_watermark == expected_offset
    assert [data for _, data in read_batches(log)] == written
    records = decode_records(b"".join(written))
    assert [record.offset for record in records] == list(range(expected_offset))
    assert log.size_bytes == sum(map(len, written))
    log.close()


def test_read_from_the_middle_of_a_batch(tmp_path):
    log = open_log(tmp_path)
    append_batches(log, 3)
    log.append(make_batch(99, records=4), now_ms=0)
    base = log.log_end_offset - 4
    with log.read(base + 2, 1000) as fetched:
        records = decode_records(fetched.read_bytes())
    assert records[0].offset == base
    assert [record.offset for record in records] == [base, base + 1, base + 2, base + 3]
    assert records[2].value.startswith(b"99-2:")
    log.close()


def test_read_at_high_watermark_is_empty_and_beyond_is_out_of_range(tmp_path):
    log = open_log(tmp_path)
    append_batches(log, 5)
    fetched = log.read(log.high_watermark, 1000)
    assert (fetched.fd, fetched.length, fetched.read_bytes()) == (-1, 0, b"")
    fetched.close()
    with pytest.raises(OffsetOutOfRangeError):
        log.read(log.high_watermark + 1, 1000)
    with pytest.raises(OffsetOutOfRangeError):
        log.read(-1, 1000)
    log.close()


def test_max_bytes_keeps_the_first_batch_whole(tmp_path):
    log = open_log(tmp_path, segment_bytes=1 << 20)
    written = append_batches(log, 5)
    first, second = len(written[0]), len(written[1])
    with log.read(0, 1) as fetched:
        assert fetched.read_bytes() == written[0]
    with log.read(0, first + second) as fetched:
        assert fetched.read_bytes() == written[0] + written[1]
    with log.read(0, first + 10) as fetched:
        data = fetched.read_bytes()
    assert data == written[0] + written[1][:10]
    assert len(decode_records(data, allow_partial_tail=True)) == 1
    log.close()


def test_a_read_stays_in_one_segment(tmp_path):
    log = open_log(tmp_path)
    append_batches(log, 40)
    assert log.segment_count > 1
    first_segment = sorted((tmp_path / "topic-0").glob("*.log"))[0]
    with log.read(0, 1 << 20) as fetched:
        assert fetched.length == first_segment.stat().st_size
    log.close()


def test_leader_epoch_is_stamped(tmp_path):
    log = open_log(tmp_path)
    log.append(make_batch(1), now_ms=0, leader_epoch=7)
    with log.read(0, 1000) as fetched:
        header = parse_header(fetched.read_bytes())
    assert header.partition_leader_epoch == 7 and header.base_offset == 0
    log.close()


def test_slice_survives_segment_deletion(tmp_path):
    log = open_log(tmp_path, retention_bytes=0)
    written = append_batches(log, 40)
    fetched = log.read(0, 1 << 20)
    assert log.apply_retention(now_ms=0) > 0
    log.delete_pending_files()
    assert fetched.read_bytes().startswith(written[0])
    fetched.close()
    fetched.close()  # closing twice is harmless
    log.close()


async def test_reads_are_capped_at_the_high_watermark_until_durable(tmp_path):
    log = open_log(tmp_path, fsync="always")
    log.append(make_batch(1), now_ms=0)
    assert log.high_watermark == 0 and log.durable_offset == 0
    assert log.read(0, 1000).length == 0
    assert log.read(1, 1000).length == 0  # between the high watermark and the log end: empty
    with pytest.raises(OffsetOutOfRangeError):
        log.read(3, 1000)
    event = log.new_data_event
    await log.wait_durable(log.log_end_offset)
    assert event.is_set() and not log.new_data_event.is_set()
    assert log.high_watermark == log.durable_offset == 2
    with log.read(0, 1000) as fetched:
        first = fetched.read_bytes()
    log.append(make_batch(2), now_ms=0)
    with log.read(0, 1 << 20) as fetched:
        assert fetched.read_bytes() == first  # the second batch is not durable yet
    await log.flush()
    with log.read(0, 1 << 20) as fetched:
        assert len(decode_records(fetched.read_bytes())) == 4
    log.close()


def test_high_watermark_follows_appends_without_fsync(tmp_path):
    log = open_log(tmp_path, fsync="interval")
    event = log.new_data_event
    log.append(make_batch(1), now_ms=0)
    assert event.is_set()
    assert log.high_watermark == log.log_end_offset == 2
    assert log.durable_offset == 0
    log.close()


def test_switching_away_from_always_publishes_the_log(tmp_path):
    log = open_log(tmp_path, fsync="always")
    log.append(make_batch(1), now_ms=0)
    assert log.high_watermark == 0
    log.update_config(small_config(fsync="never"))
    assert log.fsync_policy == "never" and log.high_watermark == 2
    log.close()


def file_sizes(directory):
    return {path.name: path.stat().st_size for path in directory.iterdir()}


def test_corrupt_batch_writes_nothing(tmp_path):
    log = open_log(tmp_path)
    append_batches(log, 3)
    before = (log.log_end_offset, file_sizes(log.directory))
    good, bad = make_batch(10), make_batch(11)
    bad[-1] ^= 0x01
    with pytest.raises(CorruptRecordError, match="CRC"):
        log.append(good + bad, now_ms=0)
    with pytest.raises(CorruptRecordError):
        log.append(good[:-1], now_ms=0)
    with pytest.raises(CorruptRecordError):
        log.append(bytearray(), now_ms=0)
    assert (log.log_end_offset, file_sizes(log.directory)) == before
    log.close()


def test_oversize_batch_writes_nothing(tmp_path):
    log = open_log(tmp_path, max_message_bytes=200)
    append_batches(log, 3)
    before = (log.log_end_offset, file_sizes(log.directory))
    with pytest.raises(RecordTooLargeError, match="max.message.bytes"):
        log.append(make_batch(1) + make_batch(2, records=20), now_ms=0)
    assert (log.log_end_offset, file_sizes(log.directory)) == before
    log.close()


def test_statistics(tmp_path):
    log = open_log(tmp_path)
    append_batches(log, 30)
    statistics = log.statistics()
    assert statistics.log_start_offset == 0
    assert statistics.log_end_offset == statistics.high_watermark == log.log_end_offset
    assert statistics.durable_offset == 0
    assert statistics.size_bytes == sum(path.stat().st_size for path in log.directory.glob("*.log"))
    assert statistics.segment_count == len(list(log.directory.glob("*.log"))) > 1
    assert statistics.pending_sync_waiters == 0
    log.close()


def test_open_creates_the_directory_and_an_empty_segment(tmp_path):
    log = open_log(tmp_path)
    assert sorted(os.listdir(log.directory)) == [
        "00000000000000000000.index",
        "00000000000000000000.log",
        "00000000000000000000.timeindex",
        "leader-epoch-checkpoint",  # empty: written once, so that no later open scans
        "recovery-point",
    ]
    assert (log.log_start_offset, log.log_end_offset, log.segment_count) == (0, 0, 1)
    log.close()


def test_delete_removes_the_directory(tmp_path):
    log = open_log(tmp_path)
    append_batches(log, 3)
    log.delete()
    assert not (tmp_path / "topic-0").exists()


def test_append_accepts_a_writable_view_of_a_larger_buffer(tmp_path):
    log = open_log(tmp_path)
    first, second = make_batch(1, records=2), make_batch(2, records=3)
    frame = bytearray(b"prefix") + first + second + bytearray(b"suffix")
    view = memoryview(frame)[6 : 6 + len(first) + len(second)]
    info = log.append(view, now_ms=0)
    assert (info.base_offset, info.last_offset) == (0, 4)
    assert frame[:6] == b"prefix" and frame[-6:] == b"suffix"  # patched only inside the view
    records = decode_records(b"".join(data for _, data in read_batches(log)))
    assert [r.offset for r in records] == [0, 1, 2, 3, 4]
    with pytest.raises(AssertionError):
        log.append(memoryview(bytes(first)), now_ms=0)  # read-only memory cannot be patched
    log.close()
