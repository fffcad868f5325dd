"""What an fsync makes durable and visible under fsync=always: exactly what was appended
before it started, never a batch appended while it ran."""

import trio
from storage_test_support import make_batch, read_batches, small_config

from broker.storage import PartitionLog
from protocol.record_batch import scan_batches


def open_log(tmp_path, **overrides) -> PartitionLog:
    config = small_config(fsync="always", segment_bytes=1 << 20, **overrides)
    return PartitionLog.open(tmp_path / "t-0", config, now_ms=0)


async def append_during_fsync(log: PartitionLog, fsync, during: bytearray):
    """Append `during` while an fsync covering everything before it is running (held by
    `fsync`, the test's `fdatasync_spy(hold=True)`); return once that fsync has completed."""
    end_before = log.log_end_offset
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.wait_durable, end_before)
        with trio.fail_after(10):
            await trio.to_thread.run_sync(fsync.entered.wait, 10)
        log.append(during, now_ms=0)
        fsync.release.set()


async def test_a_batch_appended_during_an_fsync_stays_invisible(tmp_path, fdatasync_spy):
    log = open_log(tmp_path)
    first = make_batch(1)
    log.append(first, now_ms=0)
    fsync = fdatasync_spy(hold=True)
    await append_during_fsync(log, fsync, make_batch(2))

    assert (log.durable_offset, log.high_watermark, log.log_end_offset) == (2, 2, 4)
    with log.read(0, 1 << 20) as fetched:
        data = fetched.read_bytes()
    assert data == bytes(first)  # not a byte of the second batch
    assert [batch.header.base_offset for batch in scan_batches(data)] == [0]
    assert log.read(2, 1 << 20).length == 0  # the high watermark: nothing to read yet
    assert log.offset_for_timestamp(0) == (0, 1_000)

    await log.wait_durable(log.log_end_offset)  # the next fsync covers the second batch
    assert log.high_watermark == 4
    assert [header.base_offset for header, _ in read_batches(log)] == [0, 2]
    log.close()


async def test_a_roll_during_an_fsync_keeps_the_new_segment_invisible(tmp_path, fdatasync_spy):
    log = open_log(tmp_path, segment_ms=10)
    log.append(make_batch(1), now_ms=0)
    fsync = fdatasync_spy(hold=True)
    end_before = log.log_end_offset
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.wait_durable, end_before)
        with trio.fail_after(10):
            await trio.to_thread.run_sync(fsync.entered.wait, 10)
        log.append(make_batch(2), now_ms=100)  # rolls: a new segment
        assert log.segment_count == 2
        fsync.release.set()
    assert log.high_watermark == 2
    assert [header.base_offset for header, _ in read_batches(log)] == [0]
    with log.read(0, 1 << 20) as fetched:
        assert [b.header.base_offset for b in scan_batches(fetched.read_bytes())] == [0]
    await log.flush()
    assert [header.base_offset for header, _ in read_batches(log)] == [0, 2]
    log.close()


async def test_the_durable_offset_never_covers_an_append_made_during_the_fsync(
    tmp_path, fdatasync_spy
):
    log = open_log(tmp_path)
    log.append(make_batch(1), now_ms=0)
    fsync = fdatasync_spy(hold=True)
    await append_during_fsync(log, fsync, make_batch(2))
    assert log.durable_offset == 2
    assert log.statistics().durable_offset == 2
    log.close()
