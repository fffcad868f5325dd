"""One append of many batches spreads over as many segments as it needs (issue 13): the log
rolls between batches, never inside one, and refuses only a single batch above a limit."""

import os
import shutil
from pathlib import Path

import pytest
from storage_test_support import make_batch, read_batches, small_config

from broker.storage import PartitionLog, RecordTooLargeError, StorageError
from broker.storage.segment import Segment
from protocol.record_batch import scan_batches

CONFIG = small_config(segment_bytes=1024, index_interval_bytes=100)


def many_batches(count: int, *, first: int = 0) -> bytearray:
    """`count` batches of 1 to 3 records, back to back, as one produce request carries them."""
    return bytearray().join(
        make_batch(first + number, records=1 + number % 3, value_bytes=30)
        for number in range(count)
    )


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.log"))


def check_log_holds(log: PartitionLog, written: bytes) -> None:
    """The log holds exactly the batches of `written`, at dense offsets from 0, and no
    segment is larger than segment.bytes."""
    batches = read_batches(log)  # asserts dense offsets
    assert b"".join(data for _, data in batches) == written
    assert batches[0][0].base_offset == 0
    assert log.log_end_offset == batches[-1][0].next_offset
    for path in segment_files(log.directory):
        assert 0 < path.stat().st_size <= log.config.segment_bytes, path.name


def test_one_append_larger_than_a_segment_rolls_between_batches(tmp_path):
    log = PartitionLog.open(tmp_path / "t-0", CONFIG, now_ms=0)
    first = make_batch(0, value_bytes=30)
    log.append(first, now_ms=0)  # the active segment is part full (offsets patched in place)
    data = many_batches(60, first=1)
    assert len(data) > 5 * CONFIG.segment_bytes
    info = log.append(data, now_ms=0)
    records = sum(batch.header.record_count for batch in scan_batches(data))
    assert (info.base_offset, info.last_offset) == (2, 2 + records - 1)
    assert log.high_watermark == log.log_end_offset == info.last_offset + 1
    assert log.segment_count >= 6
    written = bytes(first) + bytes(data)
    check_log_holds(log, written)
    # Segment base offsets are batch base offsets: no batch was split.
    bases = {header.base_offset for header, _ in read_batches(log)}
    assert {int(path.stem) for path in segment_files(log.directory)} <= bases
    log.close()
    reopened = PartitionLog.open(log.directory, CONFIG, now_ms=0)
    check_log_holds(reopened, written)
    assert reopened.append(make_batch(99), now_ms=0).base_offset == info.last_offset + 1
    reopened.close()


def test_a_multi_segment_append_survives_a_crash(tmp_path):
    log = PartitionLog.open(tmp_path / "source" / "t-0", CONFIG, now_ms=0)
    data = many_batches(80)
    log.append(data, now_ms=0)
    expected = read_batches(log)
    assert log.segment_count >= 6
    crashed = tmp_path / "crashed" / "t-0"
    shutil.copytree(log.directory, crashed)  # open files, no clean-shutdown marker
    log.close()
    for path in crashed.glob("*index"):
        path.unlink()  # recovery must rebuild every index from the batches
    recovered = PartitionLog.open(crashed, CONFIG, now_ms=0)
    assert read_batches(recovered) == expected
    check_log_holds(recovered, bytes(data))
    recovered.close()


def batch_of_size(number: int, size_bytes: int) -> bytearray:
    """A one-record batch of exactly `size_bytes` (for sizes of about 400 to 60000 bytes)."""
    batch = make_batch(number, records=1, value_bytes=300)
    return make_batch(number, records=1, value_bytes=300 + size_bytes - len(batch))


def test_segments_fill_up_to_exactly_segment_bytes(tmp_path):
    log = PartitionLog.open(tmp_path / "t-0", CONFIG, now_ms=0)
    first = make_batch(0)
    log.append(first, now_ms=0)
    exact = batch_of_size(1, CONFIG.segment_bytes)
    data = (
        batch_of_size(2, CONFIG.segment_bytes - len(first))  # fills the first segment
        + exact  # alone in the second
        + make_batch(3)
    )
    info = log.append(data, now_ms=0)
    check_log_holds(log, bytes(first) + bytes(data))
    assert info.last_offset == log.log_end_offset - 1
    sizes = [path.stat().st_size for path in segment_files(log.directory)]
    assert sizes == [CONFIG.segment_bytes, CONFIG.segment_bytes, len(make_batch(3))]
    log.close()


@pytest.mark.parametrize(
    "limits, name",
    [
        (dict(segment_bytes=1024, max_message_bytes=1 << 20), "segment.bytes (1024)"),
        (dict(segment_bytes=1 << 20, max_message_bytes=1000), "max.message.bytes (1000)"),
    ],
)
def test_a_single_batch_above_a_limit_is_refused_naming_size_and_limit(tmp_path, limits, name):
    log = PartitionLog.open(tmp_path / "t-0", small_config(**limits), now_ms=0)
    log.append(make_batch(0), now_ms=0)
    before = [(path.name, path.stat().st_size) for path in segment_files(log.directory)]
    big = make_batch(1, value_bytes=1100)
    with pytest.raises(RecordTooLargeError) as refused:
        log.append(make_batch(2) + big + make_batch(3), now_ms=0)
    assert str(refused.value) == f"a record batch of {len(big)} bytes exceeds {name}"
    assert [(path.name, path.stat().st_size) for path in segment_files(log.directory)] == before
    assert log.log_end_offset == 2
    log.close()


def test_a_write_failing_after_a_roll_takes_the_log_offline_and_keeps_what_was_written(
    tmp_path, monkeypatch
):
    log = PartitionLog.open(tmp_path / "t-0", CONFIG, now_ms=0)
    data = many_batches(30)
    writes = []
    original = Segment.append

    def append_then_fail(segment, view, headers):
        if writes:
            raise StorageError("disk full (simulated)")
        writes.append(len(view))
        original(segment, view, headers)

    monkeypatch.setattr(Segment, "append", append_then_fail)
    with pytest.raises(StorageError, match="cut short"):
        log.append(data, now_ms=0)
    with pytest.raises(StorageError, match="offline"):
        log.append(make_batch(99), now_ms=0)
    monkeypatch.undo()
    directory = log.directory
    log.close()
    reopened = PartitionLog.open(directory, CONFIG, now_ms=0)
    kept = read_batches(reopened)
    assert b"".join(batch for _, batch in kept) == bytes(data[: writes[0]])
    reopened.close()


def test_a_failed_first_write_leaves_the_log_usable(tmp_path, monkeypatch):
    log = PartitionLog.open(tmp_path / "t-0", CONFIG, now_ms=0)

    def fail(segment, view, headers):
        raise StorageError("disk full (simulated)")

    monkeypatch.setattr(Segment, "append", fail)
    with pytest.raises(StorageError, match="simulated"):
        log.append(many_batches(30), now_ms=0)
    monkeypatch.undo()
    assert log.log_end_offset == 0
    assert log.append(make_batch(0), now_ms=0).base_offset == 0
    log.close()
    assert os.path.exists(log.directory)
