import errno

import pytest
import trio
import trio.testing
from storage_test_support import make_batch, small_config

from broker.storage import FsyncRunner, PartitionLog, StorageError
from broker.storage.checkpoint import read_offset_checkpoint


def open_log(tmp_path, **overrides):
    config = small_config(fsync="always", segment_bytes=1 << 20, **overrides)
    return PartitionLog.open(tmp_path / "t-0", config, now_ms=0)


async def test_concurrent_waiters_share_fsyncs(tmp_path, fdatasync_spy):
    log = open_log(tmp_path)
    spy = fdatasync_spy()
    callers = 100
    finished = []

    async def produce(number):
        info = log.append(make_batch(number), now_ms=0)
        await log.wait_durable(info.last_offset + 1)
        assert log.durable_offset > info.last_offset
        assert log.high_watermark > info.last_offset
        finished.append(number)

    async with trio.open_nursery() as nursery:
        for number in range(callers):
            nursery.start_soon(produce, number)
    assert sorted(finished) == list(range(callers))
    assert 1 <= spy.calls <= callers // 10
    assert log.durable_offset == log.high_watermark == log.log_end_offset == 2 * callers
    assert log.statistics().pending_sync_waiters == 0
    log.close()


async def test_waiting_for_what_is_durable_runs_no_fsync(tmp_path, fdatasync_spy):
    log = open_log(tmp_path)
    log.append(make_batch(1), now_ms=0)
    spy = fdatasync_spy()
    await log.wait_durable(0)
    assert spy.calls == 0
    await log.flush()
    await log.flush()
    assert spy.calls == 1
    log.close()


async def test_cancelled_syncer_does_not_wedge_other_waiters(tmp_path, fdatasync_spy):
    log = open_log(tmp_path)
    spy = fdatasync_spy(hold=True)
    log.append(make_batch(1), now_ms=0)
    returned = []

    async def wait(name, offset, task_status=trio.TASK_STATUS_IGNORED):
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await log.wait_durable(offset)
            returned.append(name)

    async with trio.open_nursery() as nursery:
        syncer_scope = await nursery.start(wait, "syncer", 2)
        await trio.to_thread.run_sync(spy.entered.wait)  # its fdatasync is running
        log.append(make_batch(2), now_ms=0)
        nursery.start_soon(wait, "early", 2)
        nursery.start_soon(wait, "late", 4)
        await trio.testing.wait_all_tasks_blocked()
        assert log.statistics().pending_sync_waiters == 3
        syncer_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert log.durable_offset == 0  # the fsync has not completed: nothing is durable
        spy.release.set()
    assert sorted(returned) == ["early", "late"] or sorted(returned) == ["early", "late", "syncer"]
    assert log.durable_offset == log.high_watermark == 4
    assert spy.calls == 2
    log.close()


async def test_waiter_cancelled_before_the_fsync_changes_nothing(tmp_path, fdatasync_spy):
    log = open_log(tmp_path)
    log.append(make_batch(1), now_ms=0)
    spy = fdatasync_spy()
    with trio.CancelScope() as scope:
        scope.cancel()
        await log.wait_durable(2)
    assert scope.cancelled_caught
    assert spy.calls == 0 and log.durable_offset == 0 and log.high_watermark == 0
    await log.wait_durable(2)
    assert spy.calls == 1 and log.durable_offset == 2
    log.close()


async def test_failed_fsync_takes_the_log_offline(tmp_path, fdatasync_spy):
    log = open_log(tmp_path)
    log.append(make_batch(1), now_ms=0)
    fdatasync_spy(error=OSError(errno.EIO, "input/output error"))
    with pytest.raises(StorageError, match="offline"):
        await log.wait_durable(2)
    assert log.durable_offset == 0 and log.high_watermark == 0
    with pytest.raises(StorageError, match="offline"):
        log.append(make_batch(2), now_ms=0)
    with pytest.raises(StorageError, match="offline"):
        await log.wait_durable(2)
    log.close()
    assert not (log.directory / ".clean-shutdown").exists()


async def test_rolled_segments_are_synced_too(tmp_path, fdatasync_spy):
    log = open_log(tmp_path, segment_ms=10)
    spy = fdatasync_spy()
    log.append(make_batch(1), now_ms=0)
    log.append(make_batch(2), now_ms=100)
    assert log.segment_count == 2
    await log.flush()
    assert spy.calls == 2 and log.durable_offset == 4
    log.append(make_batch(3), now_ms=100)
    await log.flush()
    assert spy.calls == 3
    log.close()


async def test_flush_records_the_recovery_point_at_most_every_ten_seconds(tmp_path, mock_clock):
    log = open_log(tmp_path)
    checkpoint = log.directory / "recovery-point"
    log.append(make_batch(1), now_ms=0)
    await log.flush()
    assert read_offset_checkpoint(checkpoint) == 2
    log.append(make_batch(2), now_ms=0)
    mock_clock.jump(9.9)
    await log.flush()
    assert read_offset_checkpoint(checkpoint) == 2
    mock_clock.jump(0.1)
    await log.flush()
    assert read_offset_checkpoint(checkpoint) == 4
    log.close()


# -- fsyncs run by the broker's FsyncRunner ----------------------------------------------


async def test_with_a_runner_waiters_share_fsyncs_run_in_its_task(tmp_path, fdatasync_spy):
    runner = FsyncRunner()
    config = small_config(fsync="always", segment_bytes=1 << 20)
    log = PartitionLog.open(tmp_path / "t-0", config, now_ms=0, fsync_runner=runner)
    spy = fdatasync_spy()
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)

        async def produce(number):
            info = log.append(make_batch(number), now_ms=0)
            await log.wait_durable(info.last_offset + 1)
            assert log.high_watermark > info.last_offset

        async with trio.open_nursery() as producers:
            for number in range(50):
                producers.start_soon(produce, number)
        nursery.cancel_scope.cancel()
    assert 1 <= spy.calls <= 5
    assert log.durable_offset == log.log_end_offset == 100


async def test_with_a_runner_a_cancelled_waiter_returns_while_the_disk_hangs(
    tmp_path, fdatasync_spy
):
    runner = FsyncRunner()
    config = small_config(fsync="always", segment_bytes=1 << 20)
    log = PartitionLog.open(tmp_path / "t-0", config, now_ms=0, fsync_runner=runner)
    spy = fdatasync_spy(hold=True)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            log.append(make_batch(1), now_ms=0)
            waiter_scope = trio.CancelScope()
            waiter_done = trio.Event()

            async def waiter():
                with waiter_scope:
                    await log.wait_durable(2)
                waiter_done.set()

            nursery.start_soon(waiter)
            await trio.to_thread.run_sync(spy.entered.wait)  # its fsync is on the disk now
            waiter_scope.cancel()
            try:
                with trio.fail_after(10):  # the disk still hangs: only the runner waits for it
                    await waiter_done.wait()
            finally:
                spy.release.set()  # else a waiter stuck on the disk would hold the nursery
            assert waiter_scope.cancelled_caught
            assert log.durable_offset == log.high_watermark == 0
            with trio.fail_after(10):
                await log.wait_durable(2)  # the same fsync completes and counts
            assert spy.calls == 1 and log.durable_offset == log.high_watermark == 2
            nursery.cancel_scope.cancel()
    finally:
        spy.release.set()


async def test_with_a_runner_a_failed_fsync_fails_every_waiter(tmp_path, fdatasync_spy):
    runner = FsyncRunner()
    config = small_config(fsync="always", segment_bytes=1 << 20)
    log = PartitionLog.open(tmp_path / "t-0", config, now_ms=0, fsync_runner=runner)
    fdatasync_spy(error=OSError(errno.EIO, "Input/output error"))
    failures = []

    async def wait(offset):
        try:
            await log.wait_durable(offset)
        except StorageError as error:
            failures.append(str(error))

    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)  # a failing fsync must not crash the runner
        log.append(make_batch(1), now_ms=0)
        async with trio.open_nursery() as waiters:
            for _ in range(3):
                waiters.start_soon(wait, 2)
        nursery.cancel_scope.cancel()
    assert len(failures) == 3 and all("offline" in failure for failure in failures)
    assert log.durable_offset == log.high_watermark == 0
