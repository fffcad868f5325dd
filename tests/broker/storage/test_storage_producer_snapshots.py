"""What only the file log has of the idempotent producers' state: its snapshot files. They
are written at rolls and at a clean close (never for a log without batches), the last 3 are
kept; loading starts from the latest sound one at or below the log end and reads only the
batch headers after it; a damaged one, or one above a torn tail, is deleted and an older
one (or the whole log) used; truncation and retention delete those they invalidate;
compaction keeps each producer's last batch, so even a rebuild from the whole log finds it.
The behaviour shared with the memory log is in test_log_conformance."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storage_test_support import flip_byte, make_batch, make_idempotent_batch, small_config

from broker.storage import PartitionLog, ProducerStateTable
from broker.storage import log_loader
from protocol.record_batch import BatchHeader, parse_header

CONFIG = small_config(segment_bytes=1024, index_interval_bytes=100)  # fsync=never


def snapshot_offsets(directory: Path) -> list[int]:
    return sorted(int(path.name.split(".")[0]) for path in directory.glob("*.snapshot"))


def produce(log: PartitionLog, producer_id: int, sequence: int, *, key: bytes | None = None):
    batch = make_idempotent_batch(producer_id, 0, sequence, records=2, key=key)
    return log.append(batch, now_ms=0)


def fill(log: PartitionLog, count: int, *, first: int = 0) -> None:
    """`count` rounds of: producer 1, producer 2 and a plain batch (several segments)."""
    for number in range(first, first + count):
        produce(log, 1, 2 * number)
        produce(log, 2, 2 * number)
        log.append(make_batch(number, value_bytes=60), now_ms=0)


def headers_from(log: PartitionLog, offset: int) -> list[BatchHeader]:
    """The header of every batch from `offset` to the log end."""
    headers = []
    offset = max(offset, log.log_start_offset)
    while offset < log.log_end_offset:
        with log.read(offset, 0, up_to="log_end") as fetched:
            header = parse_header(fetched.read_bytes())
        headers.append(header)
        offset = header.next_offset
    return headers


def rebuilt(log: PartitionLog) -> ProducerStateTable:
    """The state recording every batch header of the log gives."""
    table = ProducerStateTable(producers_max=log.config.producers_max)
    for header in headers_from(log, 0):
        table.record(header)
    return table


class HeaderCounter:
    """Counts the batch headers loading reads for the producers' state."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = log_loader.iterate_headers

        def counting(fd, start, end):
            for item in original(fd, start, end):
                self.count += 1
                yield item

        monkeypatch.setattr(log_loader, "iterate_headers", counting)


def crash_copy(log: PartitionLog, into: Path) -> Path:
    """The log's files as a crash leaves them (no clean-shutdown marker)."""
    shutil.copytree(log.directory, into)
    return into


def test_snapshots_are_written_at_rolls_and_at_a_clean_close(tmp_path):
    log = PartitionLog.open(tmp_path / "t-0", CONFIG, now_ms=0)
    fill(log, 12)
    assert log.segment_count >= 5
    bases = sorted(int(path.stem) for path in log.directory.glob("*.log"))
    assert snapshot_offsets(log.directory) == bases[-3:]  # one per roll, the last 3 kept
    end = log.log_end_offset
    log.close()
    assert snapshot_offsets(log.directory) == [*bases[-2:], end]
    inode = (log.directory / f"{end:020d}.snapshot").stat().st_ino
    reopened = PartitionLog.open(log.directory, CONFIG, now_ms=0)
    reopened.close()  # nothing changed: the snapshot at the end is not written again
    assert snapshot_offsets(log.directory) == [*bases[-2:], end]
    assert (log.directory / f"{end:020d}.snapshot").stat().st_ino == inode


def test_a_log_without_batches_has_no_snapshot_file(tmp_path, monkeypatch):
    counter = HeaderCounter(monkeypatch)
    log = PartitionLog.open(tmp_path / "t-0", CONFIG, now_ms=0)
    log.close()
    log = PartitionLog.open(tmp_path / "t-0", CONFIG, now_ms=0)
    log.truncate_fully_and_start_at(500)
    log.close()
    PartitionLog.open(tmp_path / "t-0", CONFIG, now_ms=0).close()
    assert snapshot_offsets(tmp_path / "t-0") == [] and counter.count == 0


def test_loading_reads_only_the_headers_after_the_latest_snapshot(tmp_path, monkeypatch):
    log = PartitionLog.open(tmp_path / "t-0", CONFIG, now_ms=0)
    fill(log, 12)
    state = log.producer_state.producers()
    crashed = crash_copy(log, tmp_path / "crashed" / "t-0")
    active_base = max(int(path.stem) for path in log.directory.glob("*.log"))
    in_active = len(headers_from(log, active_base))
    assert 0 < in_active < len(headers_from(log, 0)) // 4
    log.close()
    counter = HeaderCounter(monkeypatch)
    reopened = PartitionLog.open(log.directory, CONFIG, now_ms=0)
    assert counter.count == 0  # the close's snapshot is at the end
    assert reopened.producer_state.producers() == state
    reopened.close()
    after_crash = PartitionLog.open(crashed, CONFIG, now_ms=0)
    assert counter.count == in_active  # from the last roll's snapshot on
    assert after_crash.producer_state.producers() == state
    after_crash.close()


def test_a_damaged_snapshot_is_deleted_and_an_older_one_used(tmp_path):
    log = PartitionLog.open(tmp_path / "t-0", CONFIG, now_ms=0)
    fill(log, 12)
    state = log.producer_state.producers()
    offsets = snapshot_offsets(log.directory)
    crashed = crash_copy(log, tmp_path / "crashed" / "t-0")
    log.close()
    flip_byte(crashed / f"{offsets[-1]:020d}.snapshot", 30)
    reopened = PartitionLog.open(crashed, CONFIG, now_ms=0)
    assert reopened.producer_state.producers() == state
    assert offsets[-1] not in snapshot_offsets(crashed)
    reopened.close()
    for offset in snapshot_offsets(crashed):  # every one damaged: the whole log is read
        flip_byte(crashed / f"{offset:020d}.snapshot", 10)
    reopened = PartitionLog.open(crashed, CONFIG, now_ms=0)
    assert reopened.producer_state.producers() == state
    assert snapshot_offsets(crashed) == []
    reopened.close()


def test_a_snapshot_above_a_torn_tail_is_deleted(tmp_path):
    log = PartitionLog.open(tmp_path / "t-0", CONFIG, now_ms=0)
    fill(log, 12)
    crashed = crash_copy(log, tmp_path / "crashed" / "t-0")
    log.close()
    offsets = snapshot_offsets(crashed)
    # A power loss: the segment before the last roll lost its tail, the later ones are gone.
    bases = sorted(int(path.stem) for path in crashed.glob("*.log"))
    for base in bases[-2:]:
        for path in crashed.glob(f"{base:020d}.*"):
            if not path.name.endswith(".snapshot"):
                path.unlink()
    torn = crashed / f"{bases[-3]:020d}.log"
    os.truncate(torn, torn.stat().st_size - 10)
    reopened = PartitionLog.open(crashed, CONFIG, now_ms=0)
    end = reopened.log_end_offset
    assert end < offsets[-2]
    assert snapshot_offsets(crashed) == [offset for offset in offsets if offset <= end]
    assert reopened.producer_state.producers() == rebuilt(reopened).producers()
    # The log grows back past the deleted snapshots' offsets with other batches: a crash
    # then rebuilds from what it holds, not from a stale snapshot.
    for number in range(12):
        produce(reopened, 3, 2 * number)
    assert reopened.log_end_offset > offsets[-1]
    again = crash_copy(reopened, tmp_path / "again" / "t-0")
    expected = reopened.producer_state.producers()
    reopened.close()
    recovered = PartitionLog.open(again, CONFIG, now_ms=0)
    assert recovered.producer_state.producers() == expected
    recovered.close()


def test_truncation_keeps_only_the_snapshots_at_or_below_the_new_end(tmp_path):
    log = PartitionLog.open(
        tmp_path / "t-0", CONFIG, now_ms=0, high_watermark_managed_externally=True
    )
    fill(log, 12)
    offsets = snapshot_offsets(log.directory)
    log.truncate_to(offsets[-2])  # a segment's base, where a snapshot was taken
    assert snapshot_offsets(log.directory) == offsets[:-1]
    assert log.producer_state.producers() == rebuilt(log).producers()
    below = [header.base_offset for header in headers_from(log, 0)]
    log.truncate_to(below[len(below) // 2])  # below every snapshot: rebuilt from the start
    assert log.log_end_offset < offsets[0]
    assert snapshot_offsets(log.directory) == []
    assert log.producer_state.producers() == rebuilt(log).producers()
    log.close()


def test_retention_forgets_deleted_batches_and_their_snapshots(tmp_path):
    config = small_config(segment_bytes=1024, index_interval_bytes=100, retention_bytes=1500)
    log = PartitionLog.open(tmp_path / "t-0", config, now_ms=0)
    produce(log, 9, 0)  # a producer whose only batch retention will delete
    fill(log, 12)
    assert log.producer_state.get(9) is not None
    assert log.apply_retention(now_ms=0) > 0
    start = log.log_start_offset
    assert log.producer_state.get(9) is None
    assert all(offset >= start for offset in snapshot_offsets(log.directory))
    assert log.producer_state.producers() == rebuilt(log).producers()
    state = log.producer_state.producers()
    log.close()
    reopened = PartitionLog.open(log.directory, config, now_ms=0)
    assert reopened.producer_state.producers() == state
    reopened.close()


async def test_compaction_keeps_each_producers_last_batch_whole(tmp_path):
    config = small_config(segment_bytes=1024, index_interval_bytes=100, cleanup_policy="compact")
    log = PartitionLog.open(tmp_path / "t-0", config, now_ms=0)
    last = produce(log, 1, 0, key=b"k")  # producer 1's only batch; its key is overwritten
    earlier = produce(log, 2, 0, key=b"k")
    last_of_two = produce(log, 2, 2, key=b"k")  # producer 2's last batch
    for number in range(30):
        log.append(make_batch(number, value_bytes=60), now_ms=0)  # keys key-<number>
        log.append(bytearray(make_idempotent_batch(-1, -1, -1, key=b"k")), now_ms=0)
    result = await log.compact(now_ms=10**9)
    assert result.records_removed > 0
    state = log.producer_state.producers()
    log.close()
    for path in log.directory.glob("*.snapshot"):
        path.unlink()  # a rebuild from every batch header
    reopened = PartitionLog.open(log.directory, config, now_ms=0)
    # Earlier batches compaction rewrote are not all found again; each last batch is.
    assert [
        (p.producer_id, p.epoch, p.last_batch) for p in reopened.producer_state.producers()
    ] == [(p.producer_id, p.epoch, p.last_batch) for p in state]
    for producer_id, sequence, info in ((1, 0, last), (2, 2, last_of_two)):
        retry = produce(reopened, producer_id, sequence, key=b"k")
        assert retry.duplicate
        assert (retry.base_offset, retry.last_offset) == (info.base_offset, info.last_offset)
    with reopened.read(earlier.base_offset, 0) as fetched:  # not a last batch: compacted
        assert parse_header(fetched.read_bytes()).base_offset > earlier.last_offset
    reopened.close()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_runs_keep_the_state_of_what_the_log_holds(tmp_path_factory, data):
    """Whatever happens (appends, retries, truncations, retention, clean and unclean restarts,
    torn tails, damaged snapshots), the state equals the one recording every batch the log
    holds gives; producers_max=2 of 3 producers makes evictions part of it."""
    root = tmp_path_factory.mktemp("run")
    config = small_config(segment_bytes=1024, index_interval_bytes=100, producers_max=2)
    directories = iter(root / f"copy-{number}" / "t-0" for number in range(1000))
    log = PartitionLog.open(next(directories), config, now_ms=0)
    try:
        for _ in range(data.draw(st.integers(1, 25), label="steps")):
            log = _random_step(log, data, config, directories)
            assert log.producer_state.producers() == rebuilt(log).producers()
    finally:
        log.close()


def _random_step(log: PartitionLog, data, config, directories) -> PartitionLog:
    action = data.draw(
        st.sampled_from(
            ["produce", "produce", "plain", "truncate", "retention", "close", "crash", "damage"]
        ),
        label="action",
    )
    if action == "produce":
        producer_id = data.draw(st.integers(0, 2), label="producer")
        producer = log.producer_state.get(producer_id)
        sequence = 0 if producer is None else (producer.last_sequence + 1) % 2**31
        info = produce(log, producer_id, sequence)
        assert not info.duplicate
        if data.draw(st.booleans(), label="retry"):
            retry = produce(log, producer_id, sequence)
            assert retry.duplicate and retry.base_offset == info.base_offset
    elif action == "plain":
        log.append(make_batch(7, value_bytes=60), now_ms=0)
    elif action == "truncate":
        bases = [header.base_offset for header in headers_from(log, 0)] + [log.log_end_offset]
        log.truncate_to(data.draw(st.sampled_from(bases), label="truncate to"))
    elif action == "retention":
        kept_bytes = data.draw(st.integers(0, 3000), label="retention bytes")
        log.update_config(dataclasses.replace(config, retention_bytes=kept_bytes))
        log.apply_retention(now_ms=0)
        log.update_config(config)
    elif action == "close":
        log.close()
        log = PartitionLog.open(log.directory, config, now_ms=0)
    else:  # a crash; the copy may lose a tail or have a damaged snapshot
        copy = crash_copy(log, next(directories))
        log.close()
        if action == "damage" and snapshot_offsets(copy):
            offset = data.draw(st.sampled_from(snapshot_offsets(copy)), label="damaged")
            flip_byte(copy / f"{offset:020d}.snapshot", 10)  # in the end offset
        last = max(copy.glob("*.log"))
        cut = data.draw(st.integers(0, last.stat().st_size), label="cut")
        os.truncate(last, cut)
        log = PartitionLog.open(copy, config, now_ms=0)
    return log
