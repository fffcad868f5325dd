import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storage_test_support import (
    append_batches,
    flip_byte,
    make_batch,
    read_batches,
    small_config,
)

from broker.storage import PartitionLog
from broker.storage.offset_index import RELATIVE_OFFSET_MAX
from broker.storage.segment import Segment

CONFIG = small_config(segment_bytes=1024, index_interval_bytes=100)


@pytest.fixture
def crashed_log(tmp_path):
    """A log of several segments left open, as a crash leaves it; returns its directory and
    its batches as (header, bytes)."""
    log = PartitionLog.open(tmp_path / "source" / "t-0", CONFIG, now_ms=0)
    append_batches(log, 40)
    log.append(make_batch(99, records=3, value_bytes=40), now_ms=0)  # a larger batch
    append_batches(log, 4)
    batches = read_batches(log)
    assert log.segment_count >= 3
    assert len(batches_in_segment(log.directory, batches, -1)) >= 4
    yield log.directory, batches
    log.close()


def batches_in_segment(directory: Path, batches, number: int) -> list[int]:
    """Indexes in `batches` of the batches of the segment `number` (in offset order)."""
    bases = sorted(int(path.stem) for path in directory.glob("*.log"))
    index = number % len(bases)
    start, end = bases[index], bases[index + 1] if index + 1 < len(bases) else 2**63
    return [n for n, (header, _) in enumerate(batches) if start <= header.base_offset < end]


def last_segment(directory: Path) -> Path:
    return sorted(directory.glob("*.log"))[-1]


def copy_log(directory: Path, into: Path) -> Path:
    target = into / directory.name
    shutil.copytree(directory, target)
    return target


def check_recovered(directory: Path, expected_batches) -> None:
    """Reopen `directory` and check it holds exactly `expected_batches` and appends go on
    at the next dense offset."""
    log = PartitionLog.open(directory, CONFIG, now_ms=0)
    try:
        assert read_batches(log) == expected_batches
        next_offset = expected_batches[-1][0].next_offset if expected_batches else 0
        assert log.log_end_offset == log.high_watermark == log.durable_offset == next_offset
        assert log.append(make_batch(1000), now_ms=0).base_offset == next_offset
        assert read_batches(log)[:-1] == expected_batches
    finally:
        log.close()


def test_truncation_at_every_byte_of_the_last_batch(crashed_log, tmp_path):
    directory, batches = crashed_log
    last_header, _ = batches[-1]
    segment_size = last_segment(directory).stat().st_size
    batch_start = segment_size - last_header.size_bytes
    for cut in range(batch_start, segment_size):
        copy = copy_log(directory, tmp_path / f"cut-{cut}")
        os.truncate(last_segment(copy), cut)
        check_recovered(copy, batches[:-1])
        shutil.rmtree(copy.parent)


def test_flipping_any_byte_of_the_last_batch(crashed_log, tmp_path):
    directory, batches = crashed_log
    last_header, _ = batches[-1]
    segment_size = last_segment(directory).stat().st_size
    batch_start = segment_size - last_header.size_bytes
    for position in range(batch_start, segment_size):
        copy = copy_log(directory, tmp_path / f"flip-{position}")
        flip_byte(last_segment(copy), position)
        recovered = PartitionLog.open(copy, CONFIG, now_ms=0)
        kept = read_batches(recovered, dense=False)
        recovered.close()
        if 12 <= position - batch_start < 16:
            # partition_leader_epoch is outside the CRC, like base_offset, and nothing else
            # constrains it: the batch is kept with the damaged epoch.
            assert [header.base_offset for header, _ in kept] == [h.base_offset for h, _ in batches]
        elif position - batch_start < 8:
            # base_offset is outside the CRC: only offsets going backwards tell (compaction
            # leaves gaps, so a base offset moved forwards is kept).
            field = bytearray(last_header.base_offset.to_bytes(8, "big", signed=True))
            field[position - batch_start] ^= 0xFF
            flipped = int.from_bytes(field, "big", signed=True)
            segment_base = int(last_segment(directory).stem)
            last_offset_max = segment_base + RELATIVE_OFFSET_MAX  # what the index can hold
            moved_last = flipped + last_header.last_offset_delta
            if batches[-2][0].next_offset <= flipped and moved_last <= last_offset_max:
                assert kept[:-1] == batches[:-1] and kept[-1][0].base_offset == flipped
            else:
                assert kept == batches[:-1]
        else:
            assert kept == batches[:-1], position - batch_start
        shutil.rmtree(copy.parent)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_damaged_batch_in_the_last_segment_ends_the_log(crashed_log, data):
    directory, batches = crashed_log
    in_last = batches_in_segment(directory, batches, -1)
    victim = data.draw(st.sampled_from(in_last), label="batch")
    header = batches[victim][0]
    # base_offset and partition_leader_epoch are outside the CRC: their damage is not always
    # detectable (see test_flipping_any_byte_of_the_last_batch).
    offset_in_batch = data.draw(
        st.integers(0, header.size_bytes - 1).filter(
            lambda value: not (value < 8 or 12 <= value < 16)
        ),
        label="byte",
    )
    mask = data.draw(st.integers(1, 255), label="mask")
    position = sum(h.size_bytes for h, _ in batches[in_last[0] : victim]) + offset_in_batch
    with tempfile.TemporaryDirectory() as temporary:
        copy = copy_log(directory, Path(temporary))
        flip_byte(last_segment(copy), position, mask)
        check_recovered(copy, batches[:victim])


def test_garbage_after_the_last_batch_is_truncated(crashed_log, tmp_path, caplog):
    directory, batches = crashed_log
    copy = copy_log(directory, tmp_path)
    segment = last_segment(copy)
    size = segment.stat().st_size
    with open(segment, "ab") as file:
        file.write(b"\x00" * 30 + os.urandom(200))
    with caplog.at_level(logging.WARNING, logger="dwal.storage"):
        check_recovered(copy, batches)
    assert segment.stat().st_size == size + len(make_batch(1000))  # plus the new append
    [message] = [record.getMessage() for record in caplog.records]
    assert str(copy) in message and segment.name in message and f"at byte {size}" in message


def test_damage_in_an_earlier_segment_removes_the_later_ones(crashed_log, tmp_path):
    directory, batches = crashed_log
    copy = copy_log(directory, tmp_path)
    (copy / "recovery-point").unlink()
    segments = sorted(copy.glob("*.log"))
    second_base = int(segments[1].stem)
    first_in_second = next(n for n, (h, _) in enumerate(batches) if h.base_offset == second_base)
    damaged = first_in_second + 1
    flip_byte(segments[1], batches[first_in_second][0].size_bytes + 30)
    check_recovered(copy, batches[:damaged])
    assert sorted(copy.glob("*.log")) == segments[:2]
    # The producer-state snapshots (of the last 3 rolls) were above the recovered end and
    # went; check_recovered's close (after a 2-record batch) wrote one.
    snapshots = sorted(int(path.stem) for path in copy.glob("*.snapshot"))
    assert snapshots == [batches[damaged - 1][0].next_offset + 2]
    # Two segments, the recovery point, the high watermark, the leader-epoch checkpoint,
    # the clean-shutdown marker and the snapshot.
    assert len(list(copy.iterdir())) == 2 * 3 + 4 + 1


def write_base_offset(batches, segment: Path, in_segment: list[int], victim: int, base: int):
    """Overwrite the base offset of batch `victim` (outside the CRC: only offsets tell)."""
    before = in_segment[: in_segment.index(victim)]
    position = sum(batches[number][0].size_bytes for number in before)
    with open(segment, "r+b") as file:
        file.seek(position)
        file.write(base.to_bytes(8, "big"))


def test_overlapping_offsets_are_damage(crashed_log, tmp_path):
    directory, batches = crashed_log
    copy = copy_log(directory, tmp_path)
    in_last = batches_in_segment(copy, batches, -1)
    second = in_last[1]
    overlapping = batches[second][0].base_offset - 1  # the first batch's last offset
    write_base_offset(batches, last_segment(copy), in_last, second, overlapping)
    check_recovered(copy, batches[:second])


def test_a_gap_in_offsets_is_kept(crashed_log, tmp_path):
    """Compaction leaves gaps between batches: recovery keeps them. Here the first segment
    loses its second and its last batch, and the log's last batch moves forwards."""
    directory, batches = crashed_log
    copy = copy_log(directory, tmp_path)
    (copy / "recovery-point").unlink()  # recover every segment
    in_first = batches_in_segment(copy, batches, 0)
    removed = {in_first[1], in_first[-1]}
    first_segment = sorted(copy.glob("*.log"))[0]
    first_segment.write_bytes(
        b"".join(batches[number][1] for number in in_first if number not in removed)
    )
    in_last = batches_in_segment(copy, batches, -1)
    header, data = batches[-1]
    write_base_offset(batches, last_segment(copy), in_last, in_last[-1], header.base_offset + 1)
    moved = (header._replace(base_offset=header.base_offset + 1), data)
    expected = [batch for number, batch in enumerate(batches[:-1]) if number not in removed]
    log = PartitionLog.open(copy, CONFIG, now_ms=0)
    try:
        kept = read_batches(log, dense=False)
        assert kept[:-1] == expected
        assert kept[-1][0] == moved[0] and kept[-1][1][8:] == data[8:]
        assert log.log_end_offset == header.next_offset + 1
    finally:
        log.close()


def count_recoveries(monkeypatch):
    recovered = []
    original = Segment.recover

    def recover(segment, **arguments):
        recovered.append(segment.base_offset)
        return original(segment, **arguments)

    monkeypatch.setattr(Segment, "recover", recover)
    return recovered


def test_only_segments_past_the_recovery_point_are_scanned(crashed_log, tmp_path, monkeypatch):
    directory, batches = crashed_log
    copy = copy_log(directory, tmp_path)
    (copy / "recovery-point").write_text(f"0\n{batches[-1][0].base_offset}\n")
    recovered = count_recoveries(monkeypatch)
    check_recovered(copy, batches)
    assert recovered == [int(last_segment(copy).stem)]
    without_recovery_point = copy_log(directory, tmp_path / "second")
    (without_recovery_point / "recovery-point").unlink()
    recovered.clear()
    check_recovered(without_recovery_point, batches)
    assert recovered == sorted(int(path.stem) for path in copy.glob("*.log"))


async def test_clean_shutdown_reopens_without_scanning(tmp_path, monkeypatch):
    log = PartitionLog.open(tmp_path / "t-0", CONFIG, now_ms=0)
    append_batches(log, 40)
    batches = read_batches(log)
    timestamps = [log.offset_for_timestamp(t) for t in range(995, 1045)]
    log.close()
    assert (log.directory / ".clean-shutdown").exists()
    recovered = count_recoveries(monkeypatch)
    reopened = PartitionLog.open(log.directory, CONFIG, now_ms=0)
    assert recovered == []
    assert not (log.directory / ".clean-shutdown").exists()
    assert read_batches(reopened) == batches
    assert [reopened.offset_for_timestamp(t) for t in range(995, 1045)] == timestamps
    assert reopened.append(make_batch(5), now_ms=0).base_offset == batches[-1][0].next_offset
    reopened.close()


def test_leftovers_are_removed_on_open(tmp_path):
    log = PartitionLog.open(tmp_path / "t-0", CONFIG, now_ms=0)
    append_batches(log, 5)
    log.close()
    leftovers = ("00000000000000000000.log.deleted", "recovery-point.tmp", f"{7:020d}.index")
    for name in (*leftovers, f"{11:020d}.snapshot.tmp"):
        (log.directory / name).write_bytes(b"junk")
    reopened = PartitionLog.open(log.directory, CONFIG, now_ms=0)
    assert sorted(path.name for path in log.directory.iterdir()) == [
        "00000000000000000000.index",
        "00000000000000000000.log",
        "00000000000000000000.timeindex",
        f"{log.log_end_offset:020d}.snapshot",  # written by the clean close
        "high-watermark",
        "leader-epoch-checkpoint",
        "recovery-point",
    ]
    reopened.close()


def test_recovery_reads_in_bounded_chunks(crashed_log, tmp_path):
    directory, batches = crashed_log
    for segment_path in sorted(directory.glob("*.log")):
        copy = copy_log(directory, tmp_path / segment_path.stem)
        segment = Segment.open_existing(copy, int(segment_path.stem), index_interval_bytes=100)
        size = segment.size_bytes
        for chunk_bytes in (61, 64, 100, 150, 1000):
            assert segment.recover(chunk_bytes=chunk_bytes) == 0
            assert segment.size_bytes == size
        flip_byte(copy / segment_path.name, size - 1)
        removed = segment.recover(chunk_bytes=61)
        assert removed in {header.size_bytes for header, _ in batches}
        assert segment.size_bytes == size - removed
        segment.close()


def test_an_unclean_start_says_it_recovered_and_a_clean_one_does_not(crashed_log, tmp_path):
    directory, batches = crashed_log
    copy = copy_log(directory, tmp_path)
    log = PartitionLog.open(copy, CONFIG, now_ms=0)
    assert log.recovered_after_crash
    assert log.log_end_offset == batches[-1][0].next_offset
    log.close()  # a clean shutdown: the next open checks nothing
    log = PartitionLog.open(copy, CONFIG, now_ms=0)
    assert not log.recovered_after_crash
    log.close()
    fresh = PartitionLog.open(tmp_path / "fresh-0", CONFIG, now_ms=0)  # nothing to recover
    assert not fresh.recovered_after_crash
    fresh.close()
