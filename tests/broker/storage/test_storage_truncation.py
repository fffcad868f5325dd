"""`truncate_to`: a follower removing the suffix where its log diverges from the leader's.
Checked at every batch boundary of a multi-segment log, against crashes, concurrent fsyncs
and a model of random appends and truncations."""

import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storage_test_support import epochs_of, make_batch, read_all, small_config

from broker.storage import OffsetOutOfRangeError, PartitionLog, StorageError, partition_log
from broker.storage.leader_epoch_cache import EpochEntry
from protocol.record_batch import parse_header

CONFIG = small_config(segment_bytes=1024, index_interval_bytes=100)


def open_log(directory: Path, **overrides) -> PartitionLog:
    config = CONFIG if not overrides else small_config(**{**_base(), **overrides})
    return PartitionLog.open(directory, config, now_ms=0, high_watermark_managed_externally=True)


def _base() -> dict:
    return dict(segment_bytes=1024, index_interval_bytes=100)


def check_log(log: PartitionLog, batches: list[bytes], high_watermark: int) -> None:
    """The log holds exactly `batches` (from offset 0), with consistent marks."""
    end = parse_header(batches[-1]).next_offset if batches else 0
    assert read_all(log) == batches
    assert log.log_end_offset == end
    assert log.high_watermark == high_watermark
    assert log.leader_epochs.entries() == epochs_of(batches)
    assert log.size_bytes == sum(map(len, batches))
    bases = sorted(int(path.stem) for path in log.directory.glob("*.log"))
    assert bases[0] == 0 and all(base <= end for base in bases)  # the active one may be empty
    assert log.segment_count == len(bases)


@pytest.fixture(scope="module")
def source_log(tmp_path_factory):
    """A closed log of several segments with epochs 0, 2, 5 and 9 and its batches."""
    directory = tmp_path_factory.mktemp("source") / "t-0"
    log = open_log(directory)
    epochs = [0] * 12 + [2] * 15 + [5] * 3 + [9] * 14
    for number, epoch in enumerate(epochs):
        batch = make_batch(number, records=1 + number % 3, timestamp_ms=1_000 + number)
        log.append(batch, now_ms=0, leader_epoch=epoch)
    log.set_high_watermark(parse_header(read_all(log)[30]).base_offset)
    batches = read_all(log)
    assert log.segment_count >= 4
    log.close()
    return directory, batches


def copy_of(directory: Path, into: Path) -> Path:
    target = into / directory.name
    shutil.copytree(directory, target)
    return target


def test_truncation_at_every_batch_boundary(source_log, tmp_path):
    directory, batches = source_log
    high_watermark = parse_header(batches[30]).base_offset
    for kept in range(len(batches) + 1):
        offset = parse_header(batches[kept]).base_offset if kept < len(batches) else None
        copy = copy_of(directory, tmp_path / f"cut-{kept}")
        log = open_log(copy)
        end_before = log.log_end_offset
        offset = end_before if offset is None else offset
        log.truncate_to(offset)
        expected_hw = min(high_watermark, offset)
        check_log(log, batches[:kept], expected_hw)
        assert log.durable_offset == offset
        assert (copy / "recovery-point").read_text() == f"0\n{offset}\n"
        assert (copy / "high-watermark").read_text() == f"0\n{expected_hw}\n"
        assert (copy / "leader-epoch-checkpoint").read_bytes() == (
            log.leader_epochs.checkpoint_bytes()
        )
        # A crash right now: the copy holds exactly what truncation kept.
        crashed = copy_of(copy, tmp_path / f"crash-{kept}")
        recovered = open_log(crashed)
        check_log(recovered, batches[:kept], expected_hw)
        recovered.close()
        # Appending again (as a follower) brings the whole log back.
        if kept < len(batches):
            log.append_as_follower(b"".join(batches[kept:]), now_ms=0)
        log.set_high_watermark(end_before)
        check_log(log, batches, end_before)
        log.close()
        reopened = open_log(copy)
        check_log(reopened, batches, end_before)
        reopened.close()
        shutil.rmtree(copy.parent)
        shutil.rmtree(crashed.parent)


def test_indexes_after_truncation_match_rebuilt_ones(source_log, tmp_path):
    directory, batches = source_log
    for kept in (3, 17, 25, 40):
        copy = copy_of(directory, tmp_path / f"cut-{kept}")
        log = open_log(copy)
        log.truncate_to(parse_header(batches[kept]).base_offset)
        log.append(make_batch(500, records=3, timestamp_ms=5_000), now_ms=0, leader_epoch=11)
        log.set_high_watermark(log.log_end_offset)
        timestamps = [log.offset_for_timestamp(t) for t in [*range(995, 1050), 5_000]]
        assert timestamps[-1] is not None
        log.close()
        index_files = {
            path.name: path.read_bytes()
            for path in copy.iterdir()
            if path.suffix in (".index", ".timeindex")
        }
        for name in index_files:
            (copy / name).unlink()
        (copy / "recovery-point").unlink()
        rebuilt = open_log(copy)  # no clean-shutdown marker is trusted without indexes
        rebuilt.close()
        rebuilt_files = {name: (copy / name).read_bytes() for name in index_files}
        assert rebuilt_files == index_files, kept
        reopened = open_log(copy)
        assert [reopened.offset_for_timestamp(t) for t in [*range(995, 1050), 5_000]] == timestamps
        reopened.close()


def test_truncation_refuses_offsets_inside_a_batch_or_outside_the_log(tmp_path):
    log = open_log(tmp_path / "t-0", retention_bytes=0)
    for number in range(40):
        log.append(make_batch(number, records=3), now_ms=0, leader_epoch=1)
    log.set_high_watermark(log.log_end_offset)
    snapshot = sorted((p.name, p.stat().st_size) for p in log.directory.iterdir())
    with pytest.raises(StorageError, match="inside the batch of offsets 6-8"):
        log.truncate_to(7)
    with pytest.raises(OffsetOutOfRangeError):
        log.truncate_to(log.log_end_offset + 1)
    log.truncate_to(log.log_end_offset)  # a no-op
    assert sorted((p.name, p.stat().st_size) for p in log.directory.iterdir()) == snapshot
    assert log.apply_retention(now_ms=0) > 0
    with pytest.raises(OffsetOutOfRangeError):
        log.truncate_to(log.log_start_offset - 3)
    log.truncate_to(log.log_start_offset)  # everything: the first segment stays, empty
    assert log.log_end_offset == log.log_start_offset == log.high_watermark
    assert log.segment_count == 1 and log.leader_epochs.entries() == ()
    log.append(make_batch(1), now_ms=0, leader_epoch=2)
    assert log.leader_epochs.entries() == (EpochEntry(2, log.log_start_offset),)
    log.close()


async def test_a_truncation_voids_an_fsync_in_flight_and_its_waiters(tmp_path, monkeypatch):
    log = open_log(tmp_path / "t-0", fsync="always", segment_bytes=1 << 20)
    log.append(make_batch(1), now_ms=0, leader_epoch=1)  # offsets 0-1
    await log.wait_durable(2)
    log.append(make_batch(2), now_ms=0, leader_epoch=1)  # offsets 2-3
    real_fdatasync = os.fdatasync
    entered, release = threading.Event(), threading.Event()

    def held_in_worker_threads(descriptor: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            release.wait(10)
        real_fdatasync(descriptor)

    monkeypatch.setattr(os, "fdatasync", held_in_worker_threads)
    outcome: list[object] = []

    async def waiter():
        try:
            await log.wait_durable(4)
            outcome.append("durable")
        except StorageError as error:
            outcome.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.to_thread.run_sync(entered.wait, 10)  # its fsync covers up to offset 4
        log.truncate_to(2)
        log.append(make_batch(3), now_ms=0, leader_epoch=2)  # new offsets 2-3, not synced
        release.set()
    [error] = outcome
    assert isinstance(error, StorageError) and "truncated" in str(error)
    assert log.durable_offset == 2  # the old fsync does not vouch for the new batch
    await log.wait_durable(4)
    assert log.durable_offset == 4
    log.close()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_appends_truncations_and_reopens_match_a_model(data):
    model: list[bytes] = []
    epoch = 0
    high_watermark = 0
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary) / "t-0"
        log = open_log(directory)
        try:
            for step in range(data.draw(st.integers(1, 25), label="steps")):
                action = data.draw(st.sampled_from(["append", "truncate", "reopen", "hw"]))
                if action == "append":
                    epoch += data.draw(st.integers(0, 2), label="epoch step")
                    count = data.draw(st.integers(1, 6), label="batches")
                    for number in range(count):
                        batch = make_batch(step * 10 + number, records=1 + number % 3)
                        log.append(batch, now_ms=0, leader_epoch=epoch)
                        model.append(bytes(batch))
                elif action == "truncate":
                    kept = data.draw(st.integers(0, len(model)), label="kept")
                    offset = parse_header(model[kept]).base_offset if kept < len(model) else None
                    log.truncate_to(log.log_end_offset if offset is None else offset)
                    del model[kept:]
                    high_watermark = min(high_watermark, log.log_end_offset)
                elif action == "hw":
                    high_watermark = log.set_high_watermark(
                        data.draw(st.integers(0, log.log_end_offset), label="hw")
                    )
                    high_watermark = max(high_watermark, 0)
                else:
                    log.close()
                    log = open_log(directory)
                check_log(log, model, high_watermark)
        finally:
            log.close()


def test_truncation_makes_what_it_keeps_durable(tmp_path):
    log = open_log(tmp_path / "t-0")  # fsync=never: nothing appended is synced yet
    for number in range(30):
        log.append(make_batch(number), now_ms=0, leader_epoch=1)  # 2 records each
    assert log.durable_offset == 0 and log.segment_count > 1
    log.truncate_to(20)
    assert log.durable_offset == log.log_end_offset == 20
    assert (log.directory / "recovery-point").read_text() == "0\n20\n"
    log.close()


async def test_a_compaction_running_during_a_truncation_installs_nothing(tmp_path, monkeypatch):
    config = dict(cleanup_policy="compact", segment_bytes=1024, index_interval_bytes=100)
    log = open_log(tmp_path / "t-0", **config)
    for number in range(60):  # 5 keys rewritten over and over: plenty to compact
        batch = make_batch(number % 5, records=2, timestamp_ms=1_000)
        log.append(batch, now_ms=0, leader_epoch=1)
    log.set_high_watermark(log.log_end_offset)
    assert log.segment_count >= 4
    started, release = threading.Event(), threading.Event()
    real_clean_segments = partition_log.clean_segments

    def held_clean_segments(*arguments):
        outcome = real_clean_segments(*arguments)  # copies of the segments as they were
        started.set()
        release.wait(10)
        return outcome

    monkeypatch.setattr(partition_log, "clean_segments", held_clean_segments)
    async with trio.open_nursery() as nursery:
        results = []

        async def compact():
            results.append(await log.compact(now_ms=10**9))

        nursery.start_soon(compact)
        await trio.to_thread.run_sync(started.wait, 10)
        log.truncate_to(40)  # inside a segment the cleaner has rewritten
        release.set()
    assert results[0].segments_cleaned == 0  # installing would bring back removed batches
    assert log.log_end_offset == 40
    kept = read_all(log)
    assert [parse_header(batch).base_offset for batch in kept] == list(range(0, 40, 2))
    assert not list(log.directory.glob("*.cleaned")) and not list(log.directory.glob("*.swap"))
    log.close()
