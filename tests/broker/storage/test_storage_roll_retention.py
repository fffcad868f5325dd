import pytest
from storage_test_support import append_batches, make_batch, read_batches, small_config

from broker.storage import OffsetOutOfRangeError, PartitionLog


def segment_sizes(log):
    return [path.stat().st_size for path in sorted(log.directory.glob("*.log"))]


def log_files(log):
    return sorted(path.name for path in log.directory.iterdir() if path.suffix != "")


def test_roll_by_size(tmp_path):
    log = PartitionLog.open(tmp_path / "t-0", small_config(segment_bytes=1024), now_ms=0)
    written = append_batches(log, 60)
    sizes = segment_sizes(log)
    assert len(sizes) == log.segment_count > 3
    assert all(size <= 1024 for size in sizes)
    assert all(size + 150 > 1024 for size in sizes[:-1])  # each closed segment was full
    bases = sorted(int(path.stem) for path in log.directory.glob("*.log"))
    headers = [header for header, _ in read_batches(log)]
    assert set(bases) <= {header.base_offset for header in headers}
    assert [data for _, data in read_batches(log)] == written
    log.close()


def test_roll_by_age(tmp_path):
    config = small_config(segment_bytes=1 << 20, segment_ms=1000)
    log = PartitionLog.open(tmp_path / "t-0", config, now_ms=0)
    log.append(make_batch(1), now_ms=100)
    log.append(make_batch(2), now_ms=1100)  # exactly segment.ms old: not yet
    assert log.segment_count == 1
    log.append(make_batch(3), now_ms=1101)
    assert log.segment_count == 2 and log.log_end_offset == 6
    assert sorted(path.name for path in log.directory.glob("*.log"))[-1] == f"{4:020d}.log"
    assert not log.roll_if_due(now_ms=2101)
    assert log.roll_if_due(now_ms=2102)
    assert log.segment_count == 3
    assert not log.roll_if_due(now_ms=10**9)  # the new active segment is empty
    log.close()


def test_reopened_segment_ages_from_its_first_batch(tmp_path):
    config = small_config(segment_bytes=1 << 20, segment_ms=1000)
    log = PartitionLog.open(tmp_path / "t-0", config, now_ms=0)
    log.append(make_batch(1, timestamp_ms=5000), now_ms=5000)
    log.close()
    reopened = PartitionLog.open(tmp_path / "t-0", config, now_ms=5500)
    assert not reopened.roll_if_due(now_ms=6000)
    assert reopened.roll_if_due(now_ms=6001)
    reopened.close()


def build_aged_log(tmp_path, **overrides):
    """Ten segments; the batches of segment i carry timestamps 1000 * i."""
    config = small_config(segment_bytes=1 << 20, segment_ms=500, **overrides)
    log = PartitionLog.open(tmp_path / "t-0", config, now_ms=0)
    for segment in range(10):
        for number in range(3):
            now_ms = 1000 * segment
            log.append(make_batch(number, timestamp_ms=now_ms), now_ms=now_ms)
    assert log.segment_count == 10
    return log


def test_retention_by_age(tmp_path):
    log = build_aged_log(tmp_path, retention_ms=4500)
    size = log.size_bytes
    before = read_batches(log)
    assert log.apply_retention(now_ms=7000) == 3  # timestamps 0, 1000, 2000 < 7000 - 4500
    assert log.log_start_offset == 18 and log.segment_count == 7
    assert log.size_bytes == size * 7 // 10
    assert read_batches(log) == before[9:]
    with pytest.raises(OffsetOutOfRangeError):
        log.read(17, 1000)
    deleted = [name for name in log_files(log) if name.endswith(".deleted")]
    assert len(deleted) == 9
    assert log.apply_retention(now_ms=7000) == 0
    assert log.delete_pending_files(now_ms=7000) == 9
    assert not any(name.endswith(".deleted") for name in log_files(log))
    log.close()


def test_retention_never_removes_the_active_segment(tmp_path):
    log = build_aged_log(tmp_path, retention_ms=0)
    assert log.apply_retention(now_ms=10**9) == 9
    assert log.segment_count == 1 and log.log_start_offset == log.log_end_offset - 6
    log.roll_if_due(now_ms=10**9)
    assert log.apply_retention(now_ms=10**9) == 1
    assert log.log_start_offset == log.log_end_offset
    assert log.read(log.log_start_offset, 1000).length == 0
    log.close()


def test_retention_by_size(tmp_path):
    log = build_aged_log(tmp_path, retention_bytes=1)
    segment_size = log.size_bytes // 10
    log.update_config(small_config(retention_bytes=4 * segment_size + 1))
    assert log.apply_retention(now_ms=0) == 5
    assert log.segment_count == 5 and log.size_bytes == 5 * segment_size
    log.update_config(small_config(retention_bytes=4 * segment_size))
    assert log.apply_retention(now_ms=0) == 1
    log.update_config(small_config(retention_bytes=0))
    assert log.apply_retention(now_ms=0) == 3
    assert log.segment_count == 1
    log.close()


def test_deleted_files_wait_for_the_delay(tmp_path):
    log = build_aged_log(tmp_path, retention_ms=-1, retention_bytes=0, file_delete_delay_ms=1000)
    assert log.apply_retention(now_ms=5000) == 9
    assert log.delete_pending_files(now_ms=5999) == 0
    assert log.delete_pending_files(now_ms=6000) == 27
    log.close()


def test_retention_stops_at_the_high_watermark(tmp_path):
    log = build_aged_log(tmp_path, retention_ms=0, fsync="always")
    assert log.high_watermark == 0
    assert log.apply_retention(now_ms=10**9) == 0
    log.close()


def test_retention_survives_reopening(tmp_path):
    log = build_aged_log(tmp_path, retention_ms=4500)
    log.apply_retention(now_ms=7000)
    remaining = read_batches(log)
    log.close()  # the .deleted files are left behind
    reopened = PartitionLog.open(tmp_path / "t-0", log.config, now_ms=7000)
    assert not any(name.endswith(".deleted") for name in log_files(reopened))
    assert reopened.log_start_offset == 18
    assert read_batches(reopened) == remaining
    reopened.close()
