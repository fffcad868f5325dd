"""The partition log as a replica sees it: a high watermark told from outside and
checkpointed, progress signals, the leader-epoch cache, follower appends and reads up to
the log end."""

import pytest
import trio
from storage_test_support import append_batches, make_batch, small_config

from broker.storage import CorruptRecordError, OffsetOutOfRangeError, PartitionLog, StorageError
from broker.storage.leader_epoch_cache import EpochEntry, LeaderEpochError
from protocol.record_batch import complete_prefix_bytes, parse_header, scan_batches


def open_log(directory, *, managed=True, **overrides) -> PartitionLog:
    return PartitionLog.open(
        directory, small_config(**overrides), now_ms=0, high_watermark_managed_externally=managed
    )


def read_all(log: PartitionLog, offset: int = 0, *, up_to="log_end") -> bytes:
    """Every whole batch from `offset` to the limit, read slice by slice."""
    data = b""
    while True:
        with log.read(offset, 1 << 20, up_to=up_to) as fetched:
            piece = fetched.read_bytes()
        piece = piece[: complete_prefix_bytes(piece)]
        if not piece:
            return data
        data += piece
        *_, last = scan_batches(piece)
        offset = last.header.next_offset


def leader_with_epochs(directory, epochs: list[int], **overrides) -> PartitionLog:
    """A default-mode log with one 1-to-3-record batch appended per item of `epochs`."""
    log = open_log(directory, managed=False, **overrides)
    for number, epoch in enumerate(epochs):
        log.append(make_batch(number, records=1 + number % 3), now_ms=0, leader_epoch=epoch)
    return log


# The high watermark as an input.


async def test_in_replica_mode_appends_and_fsyncs_never_move_the_high_watermark(tmp_path):
    for fsync in ("always", "never"):
        log = open_log(tmp_path / f"{fsync}-0", fsync=fsync)
        append_batches(log, 5)
        await log.flush()
        assert log.durable_offset == log.log_end_offset > 0
        assert log.high_watermark == 0
        log.update_config(small_config(fsync="interval"))
        assert log.high_watermark == 0
        log.close()


async def test_set_high_watermark_clamps_never_goes_back_and_wakes_fetchers(tmp_path):
    log = open_log(tmp_path / "t-0")
    append_batches(log, 6)  # offsets 0..14, batches of 1, 2, 3, 4, 1, 2 records
    event = log.new_data_event
    assert log.set_high_watermark(3) == 3
    assert event.is_set() and not log.new_data_event.is_set()
    event = log.new_data_event
    assert log.set_high_watermark(2) == 3  # never back
    assert not event.is_set()
    assert log.set_high_watermark(10**6) == log.log_end_offset  # clamped to the log end
    assert event.is_set()
    log.close()


async def test_a_waiting_fetcher_wakes_when_the_high_watermark_is_set(tmp_path):
    log = open_log(tmp_path / "t-0")
    append_batches(log, 3)
    woke = []

    async def fetcher():
        await log.new_data_event.wait()
        woke.append(log.high_watermark)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetcher)
        await trio.testing.wait_all_tasks_blocked()
        log.set_high_watermark(1)
    assert woke == [1]
    log.close()


def test_consumer_reads_stop_at_the_high_watermark_followers_read_to_the_log_end(tmp_path):
    log = open_log(tmp_path / "t-0")
    written = append_batches(log, 12)
    assert log.segment_count > 1
    boundary = parse_header(written[0]).record_count + parse_header(written[1]).record_count
    log.set_high_watermark(boundary)
    assert read_all(log, up_to="high_watermark") == written[0] + written[1]
    assert read_all(log) == b"".join(written)  # up_to="log_end"
    # Between the high watermark and the log end a consumer gets nothing, never an error.
    for offset in range(boundary, log.log_end_offset + 1):
        assert log.read(offset, 1000).length == 0
    with pytest.raises(OffsetOutOfRangeError):
        log.read(log.log_end_offset + 1, 1000)
    with pytest.raises(OffsetOutOfRangeError):
        log.read(log.log_end_offset + 1, 1000, up_to="log_end")
    log.close()


def test_a_high_watermark_inside_a_batch_hides_that_batch(tmp_path):
    log = open_log(tmp_path / "t-0")
    log.append(make_batch(1, records=2), now_ms=0)
    log.append(make_batch(2, records=4), now_ms=0)  # offsets 2..5
    log.set_high_watermark(4)
    assert [b.header.base_offset for b in scan_batches(read_all(log, up_to="high_watermark"))] == [
        0
    ]
    assert log.read(2, 1000).length == 0
    log.close()


async def test_the_high_watermark_is_checkpointed_and_restored_clipped(tmp_path):
    log = open_log(tmp_path / "t-0")
    append_batches(log, 8)
    log.set_high_watermark(6)
    await log.write_high_watermark_checkpoint()
    assert (log.directory / "high-watermark").read_text() == "0\n6\n"
    log.set_high_watermark(10)
    log.close()  # close records it too
    reopened = open_log(log.directory)
    assert reopened.high_watermark == 10 and reopened.restored_high_watermark == 10
    visible = [
        parse_header(batch).next_offset
        for batch in split(read_all(reopened, up_to="high_watermark"))
    ]
    assert visible[-1] == 10
    reopened.close()
    # A checkpoint above the recovered log (its tail was lost) is clipped to the log end.
    (log.directory / "high-watermark").write_text("0\n1000\n")
    reopened = open_log(log.directory)
    assert reopened.high_watermark == reopened.log_end_offset
    assert reopened.restored_high_watermark == reopened.log_end_offset
    reopened.close()
    # The default mode ignores it: everything is durable after opening.
    (log.directory / "high-watermark").write_text("0\n3\n")
    default = open_log(log.directory, managed=False)
    assert default.high_watermark == default.log_end_offset
    assert default.restored_high_watermark == 3
    default.manage_high_watermark_externally(high_watermark=default.restored_high_watermark)
    assert default.high_watermark == 3
    default.close()


async def test_flush_checkpoints_the_high_watermark(tmp_path):
    log = open_log(tmp_path / "t-0")
    append_batches(log, 4)
    log.set_high_watermark(3)
    await log.flush()
    assert (log.directory / "high-watermark").read_text() == "0\n3\n"
    log.close()


def test_without_a_checkpoint_a_replica_starts_at_the_log_start(tmp_path):
    log = open_log(tmp_path / "t-0", managed=False)
    append_batches(log, 4)
    log.close()
    (log.directory / "high-watermark").unlink()
    reopened = open_log(log.directory)
    assert reopened.high_watermark == 0 and reopened.restored_high_watermark is None
    reopened.close()


def test_switching_mode_keeps_the_high_watermark(tmp_path):
    log = open_log(tmp_path / "t-0", managed=False)
    append_batches(log, 4)
    end = log.log_end_offset
    log.manage_high_watermark_externally()
    assert log.high_watermark_managed_externally and log.high_watermark == end
    log.append(make_batch(9), now_ms=0)
    assert log.high_watermark == end
    log.close()


async def test_progress_event_fires_on_append_and_on_fsync(tmp_path):
    log = open_log(tmp_path / "t-0", fsync="always")
    event = log.progress_event
    log.append(make_batch(1), now_ms=0)
    assert event.is_set() and not log.progress_event.is_set()
    event = log.progress_event
    await log.wait_durable(log.log_end_offset)
    assert event.is_set() and log.durable_offset == 2
    event = log.progress_event
    await log.wait_durable(log.log_end_offset)  # nothing moved
    assert not event.is_set()
    log.close()


# The leader-epoch cache through the log.


def test_append_records_each_new_epoch_at_its_first_offset(tmp_path):
    log = leader_with_epochs(tmp_path / "t-0", [0, 0, 2, 2, 2, 5])
    # batches of 1, 2, 3, 1, 2, 3 records: epoch 2 starts at 3, epoch 5 at 9
    assert log.leader_epochs.entries() == (EpochEntry(0, 0), EpochEntry(2, 3), EpochEntry(5, 9))
    assert log.latest_leader_epoch == log.statistics().latest_leader_epoch == 5
    assert log.end_offset_for_leader_epoch(2) == (2, 9)
    assert log.end_offset_for_leader_epoch(5) == (5, log.log_end_offset)
    checkpoint = (log.directory / "leader-epoch-checkpoint").read_bytes()
    assert checkpoint == b"0\n3\n0 0\n2 3\n5 9\n"
    end = log.log_end_offset
    refused = make_batch(9)
    original = bytes(refused)
    with pytest.raises(LeaderEpochError):
        log.append(refused, now_ms=0, leader_epoch=4)
    assert log.log_end_offset == end  # nothing written
    assert refused == original  # not even patched
    log.close()


def test_the_epoch_cache_is_loaded_or_rebuilt_from_batch_headers(tmp_path):
    log = leader_with_epochs(tmp_path / "t-0", [1, 1] + [3] * 12 + [7] * 12)
    expected = log.leader_epochs.entries()
    assert log.segment_count > 1
    log.close()
    reopened = open_log(log.directory)
    assert reopened.leader_epochs.entries() == expected
    reopened.close()
    checkpoint = log.directory / "leader-epoch-checkpoint"
    for damage in (None, b"0\n9\n1 0\n"):
        if damage is None:
            checkpoint.unlink()
        else:
            checkpoint.write_bytes(damage)
        rebuilt = open_log(log.directory)
        assert rebuilt.leader_epochs.entries() == expected
        assert checkpoint.read_bytes() == rebuilt.leader_epochs.checkpoint_bytes()
        rebuilt.close()


def test_retention_moves_the_first_epoch_up(tmp_path):
    log = leader_with_epochs(tmp_path / "t-0", [1] * 20 + [2] * 20, retention_bytes=0)
    assert log.apply_retention(now_ms=0) > 0
    start = log.log_start_offset
    assert log.leader_epochs.entries()[0].start_offset == start
    assert log.leader_epochs.entries()[-1].epoch == 2
    log.close()
    reopened = open_log(log.directory)
    assert reopened.leader_epochs.entries()[0].start_offset == start
    reopened.close()


# Follower appends.


def test_follower_append_keeps_the_leaders_offsets_and_epochs(tmp_path):
    leader = leader_with_epochs(tmp_path / "leader-0", [0] * 10 + [3] * 10 + [4] * 10)
    data = read_all(leader)
    follower = open_log(tmp_path / "follower-0")
    copied = 0
    while copied < len(data):
        chunk = data[copied : copied + 300]
        chunk = chunk[: complete_prefix_bytes(chunk)] or data[copied:]
        batches = list(scan_batches(chunk))
        info = follower.append_as_follower(chunk, now_ms=0)
        assert info.base_offset == batches[0].header.base_offset
        assert info.last_offset == batches[-1].header.last_offset
        copied += len(chunk)
    assert follower.segment_count > 1
    assert read_all(follower) == data  # byte for byte: offsets and epochs as the leader's
    assert follower.log_end_offset == leader.log_end_offset
    assert follower.leader_epochs.entries() == leader.leader_epochs.entries()
    assert follower.high_watermark == 0  # replica-managed: the leader tells it
    follower.close()
    reopened = open_log(follower.directory)
    assert read_all(reopened) == data
    assert reopened.leader_epochs.entries() == leader.leader_epochs.entries()
    reopened.close()
    leader.close()


def test_follower_append_refuses_bad_input_and_writes_nothing(tmp_path):
    leader = leader_with_epochs(tmp_path / "leader-0", [1, 1, 2, 5])
    batches = [bytes(b) for b in split(read_all(leader))]
    follower = open_log(tmp_path / "follower-0")
    follower.append_as_follower(batches[0] + batches[1], now_ms=0)
    before = (follower.log_end_offset, follower.size_bytes, follower.leader_epochs.entries())
    with pytest.raises(StorageError, match="overlaps"):
        follower.append_as_follower(batches[1] + batches[2], now_ms=0)
    with pytest.raises(StorageError, match="overlaps"):
        follower.append_as_follower(batches[3] + batches[2], now_ms=0)  # offsets go back
    damaged = bytearray(batches[2])
    damaged[-1] ^= 1
    with pytest.raises(CorruptRecordError, match="CRC"):
        follower.append_as_follower(bytes(damaged), now_ms=0)
    stale = bytearray(batches[2])
    stale[12:16] = (0).to_bytes(4, "big")  # epoch 0 after epoch 1 (outside the CRC)
    with pytest.raises(LeaderEpochError):
        follower.append_as_follower(bytes(stale), now_ms=0)
    # A new epoch (5) followed by one going back (2): refused as a whole, the cache intact.
    new_then_back = bytearray(batches[3])
    new_then_back[0:8] = parse_header(batches[2]).base_offset.to_bytes(8, "big")
    back = bytearray(batches[2])
    back[0:8] = parse_header(batches[3]).base_offset.to_bytes(8, "big")
    with pytest.raises(LeaderEpochError):
        follower.append_as_follower(bytes(new_then_back + back), now_ms=0)
    after = (follower.log_end_offset, follower.size_bytes, follower.leader_epochs.entries())
    assert after == before
    follower.append_as_follower(batches[2] + batches[3], now_ms=0)
    assert read_all(follower) == b"".join(batches)
    follower.close()
    leader.close()


def test_follower_append_in_default_mode_publishes_like_append(tmp_path):
    leader = leader_with_epochs(tmp_path / "leader-0", [1, 2])
    follower = open_log(tmp_path / "follower-0", managed=False)
    follower.append_as_follower(read_all(leader), now_ms=0)
    assert follower.high_watermark == follower.log_end_offset == leader.log_end_offset
    follower.close()
    leader.close()


def test_follower_append_accepts_a_gap_left_by_compaction(tmp_path):
    leader = leader_with_epochs(tmp_path / "leader-0", [1, 1, 1])
    batches = split(read_all(leader))
    follower = open_log(tmp_path / "follower-0")
    follower.append_as_follower(batches[0], now_ms=0)
    info = follower.append_as_follower(batches[2], now_ms=0)  # batches[1] was compacted away
    assert info.base_offset == parse_header(batches[2]).base_offset
    assert follower.log_end_offset == leader.log_end_offset
    follower.close()
    leader.close()


def split(data: bytes) -> list[bytes]:
    return [
        data[batch.position : batch.position + batch.header.size_bytes]
        for batch in scan_batches(data)
    ]


# Recovery.


def test_recovery_clips_the_high_watermark_and_the_epochs_to_the_log_end(tmp_path):
    log = leader_with_epochs(tmp_path / "t-0", [1, 1, 2, 2, 6])
    log.manage_high_watermark_externally()
    headers = [parse_header(batch) for batch in split(read_all(log))]
    directory = log.directory
    log.close()
    # A crash lost the last batch (epoch 6) but its checkpoints had been written.
    last_segment = sorted(directory.glob("*.log"))[-1]
    with open(last_segment, "r+b") as file:
        file.truncate(last_segment.stat().st_size - headers[-1].size_bytes)
    (directory / ".clean-shutdown").unlink()
    recovered = open_log(directory)
    assert recovered.recovered_after_crash
    assert recovered.log_end_offset == headers[-1].base_offset
    assert recovered.high_watermark == recovered.log_end_offset
    assert recovered.leader_epochs.latest_epoch == 2
    assert b"6 " not in (directory / "leader-epoch-checkpoint").read_bytes()
    recovered.close()
