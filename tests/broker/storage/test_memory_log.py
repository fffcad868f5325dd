"""What only the in-memory log has: its model of the disk. A power loss keeps exactly the
durable prefix and the checkpoints as last written; recovery clips them; a crashed log is
closed. The contract shared with the file log is in test_log_conformance."""

from __future__ import annotations

import dataclasses

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from storage_test_support import make_batch, make_idempotent_batch, small_config
from storage_test_support import epochs_of, read_all
from test_log_conformance import bases_of

from broker.storage import (
    CorruptRecordError,
    DurableImage,
    EpochEntry,
    FetchSlice,
    MemoryPartitionLog,
    OffsetOutOfRangeError,
    ProducerStateTable,
    StorageError,
)
from protocol.record_batch import parse_header

CONFIG = small_config()  # fsync=never


def new_log(*, managed: bool = True, **overrides: object) -> MemoryPartitionLog:
    config = small_config(**overrides) if overrides else CONFIG
    return MemoryPartitionLog("t-0", config, high_watermark_managed_externally=managed)


def append(log: MemoryPartitionLog, count: int, *, epoch: int = 0, first: int = 0) -> list[bytes]:
    written = []
    for number in range(first, first + count):
        batch = make_batch(number, records=1 + number % 3)
        log.append(batch, now_ms=0, leader_epoch=epoch)
        written.append(bytes(batch))
    return written


async def test_a_power_loss_keeps_the_durable_prefix_and_clips_the_checkpoints():
    log = new_log()
    durable = append(log, 4, epoch=1)
    await log.flush()
    log.set_high_watermark(log.log_end_offset)
    unsynced = append(log, 3, epoch=4, first=4)
    log.set_high_watermark(log.log_end_offset)
    await log.write_high_watermark_checkpoint()  # a checkpoint above the durable offset
    bases = bases_of(durable + unsynced)
    image = log.crash(power_loss=True)
    assert image.batches == tuple(durable)
    assert image.leader_epochs == (EpochEntry(1, 0), EpochEntry(4, bases[4]))  # as written
    assert image.high_watermark == bases[-1]
    assert image.log_end_offset == bases[4]
    recovered = MemoryPartitionLog.recover(
        "t-0", CONFIG, image, high_watermark_managed_externally=True
    )
    assert read_all(recovered) == durable
    assert recovered.leader_epochs.entries() == (EpochEntry(1, 0),)
    assert recovered.restored_high_watermark == recovered.high_watermark == bases[4]
    assert recovered.durable_offset == recovered.log_end_offset == bases[4]
    assert recovered.append(make_batch(9), now_ms=0, leader_epoch=5).base_offset == bases[4]


def test_a_power_loss_before_any_fsync_leaves_an_empty_log():
    log = new_log(managed=False)
    append(log, 5, epoch=3)
    assert log.durable_offset == 0 and log.high_watermark == log.log_end_offset
    image = log.crash(power_loss=True)
    assert image == DurableImage(batches=(), leader_epochs=(EpochEntry(3, 0),), high_watermark=None)
    recovered = MemoryPartitionLog.recover("t-0", CONFIG, image)
    assert recovered.log_end_offset == recovered.high_watermark == recovered.size_bytes == 0
    assert recovered.leader_epochs.entries() == () and recovered.restored_high_watermark is None


def test_a_process_crash_keeps_the_unsynced_batches_but_not_the_unwritten_checkpoint():
    log = new_log()
    written = append(log, 5, epoch=2)
    log.set_high_watermark(3)
    image = log.crash(power_loss=False)
    assert image.batches == tuple(written) and image.high_watermark is None
    assert image.leader_epochs == (EpochEntry(2, 0),)


async def test_a_crashed_log_refuses_use():
    log = new_log()
    append(log, 3)
    log.set_high_watermark(2)
    log.crash(power_loss=True)
    with pytest.raises(StorageError, match="closed"):
        log.append(make_batch(9), now_ms=0)
    with pytest.raises(StorageError, match="closed"):
        log.truncate_to(0)
    with pytest.raises(StorageError, match="closed"):
        await log.flush()
    with pytest.raises(StorageError, match="closed"):
        await log.wait_durable(log.log_end_offset)
    with pytest.raises(StorageError, match="closed"):
        await log.write_high_watermark_checkpoint()
    with pytest.raises(AssertionError):
        log.read(0, 100)
    with pytest.raises(AssertionError):
        await log.read_batch_containing(0)
    assert log.set_high_watermark(100) == 2
    with pytest.raises(StorageError, match="already crashed"):
        log.crash(power_loss=False)


def test_after_a_clean_close_a_power_loss_keeps_everything():
    log = new_log()
    written = append(log, 4)
    log.set_high_watermark(3)
    log.close()
    image = log.crash(power_loss=True)
    assert image.batches == tuple(written) and image.high_watermark == 3


def test_recovery_checks_every_batch_of_the_image_again():
    log = new_log()
    written = append(log, 3)
    image = log.crash(power_loss=False)
    damaged = bytearray(written[1])
    damaged[-1] ^= 0x01
    for batches in (
        (written[0], bytes(damaged), written[2]),
        (written[0], written[2], written[1]),  # offsets going back
        (written[0], written[1] + written[2]),  # two batches in one item
        (written[0], written[1][:-1]),
    ):
        broken = DurableImage(batches=batches, leader_epochs=(), high_watermark=None)
        with pytest.raises(CorruptRecordError):
            MemoryPartitionLog.recover("t-0", CONFIG, broken)
    assert read_all(MemoryPartitionLog.recover("t-0", CONFIG, image)) == written


async def test_a_full_truncation_is_durable_at_once_and_its_start_survives_a_power_loss():
    log = new_log()
    before = append(log, 4, epoch=1)
    await log.flush()
    log.set_high_watermark(log.log_end_offset)
    log.truncate_fully_and_start_at(100)
    after = append(log, 3, epoch=4, first=4)  # not durable
    log.set_high_watermark(log.log_end_offset)
    image = log.crash(power_loss=True)
    assert image == DurableImage(
        batches=(),
        leader_epochs=(EpochEntry(4, 100),),  # written before the batches, clipped below
        high_watermark=100,
        log_start_offset=100,
    )
    assert image.log_end_offset == 100
    recovered = MemoryPartitionLog.recover(
        "t-0", CONFIG, image, high_watermark_managed_externally=True
    )
    assert recovered.log_start_offset == recovered.log_end_offset == 100
    assert recovered.high_watermark == recovered.restored_high_watermark == 100
    assert recovered.leader_epochs.entries() == ()
    for batch in after:
        recovered.append_as_follower(batch, now_ms=0)
    assert read_all(recovered) == after
    again = MemoryPartitionLog.recover("t-0", CONFIG, recovered.crash(power_loss=False))
    assert again.log_start_offset == 100 and read_all(again) == after
    # a batch below the image's log start: the image was not made by `crash`
    broken = DurableImage(
        batches=(before[0],), leader_epochs=(), high_watermark=None, log_start_offset=100
    )
    with pytest.raises(CorruptRecordError):
        MemoryPartitionLog.recover("t-0", CONFIG, broken)


async def test_retention_removes_whole_batches_below_the_high_watermark_durably():
    log = new_log()
    written = append(log, 3, epoch=1) + append(log, 3, epoch=2, first=3)
    bases = bases_of(written)
    log.set_high_watermark(bases[4])
    assert log.delete_records_before(bases[2] + 1) == 2  # the batch holding it stays
    assert log.log_start_offset == bases[2]
    assert read_all(log) == written[2:]
    assert log.delete_records_before(bases[6]) == 2  # never at or above the high watermark
    assert log.log_start_offset == bases[4]
    assert log.leader_epochs.entries() == (EpochEntry(2, bases[4]),)
    with pytest.raises(OffsetOutOfRangeError):
        log.read(bases[3], 1 << 20)
    for power_loss in (False, True):
        copy = new_log()
        for batch in written:
            copy.append(
                bytearray(batch), now_ms=0, leader_epoch=parse_header(batch).partition_leader_epoch
            )
        copy.set_high_watermark(bases[4])
        copy.delete_records_before(bases[4])
        recovered = MemoryPartitionLog.recover(
            "t-0", CONFIG, copy.crash(power_loss=power_loss), high_watermark_managed_externally=True
        )
        assert recovered.log_start_offset == bases[4], power_loss
        assert read_all(recovered) == ([] if power_loss else written[4:]), power_loss
        assert recovered.log_end_offset == (bases[4] if power_loss else bases[6])


def test_reads_return_in_memory_slices():
    log = new_log(managed=False)
    written = append(log, 3)
    fetched = log.read(0, 1 << 20)
    assert fetched.fd == -1 and fetched.position == 0
    assert fetched.length == sum(map(len, written))
    assert fetched.read_bytes() == b"".join(written)
    fetched.close()
    fetched.close()  # idempotent
    with FetchSlice.of_bytes(b"abc") as piece:
        assert (piece.fd, piece.length, piece.read_bytes()) == (-1, 3, b"abc")
    assert FetchSlice.empty().read_bytes() == b""


# A model of the disk, checked against random runs.


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_random_runs_lose_exactly_what_was_not_durable(data):
    trio.run(_random_run, data)


async def _random_run(data: st.DataObject) -> None:
    managed = data.draw(st.booleans(), label="managed")
    fsync = data.draw(st.sampled_from(["always", "never"]), label="fsync")
    config = small_config(fsync=fsync)
    log = MemoryPartitionLog("t-0", config, high_watermark_managed_externally=managed)
    model = _DiskModel()
    epoch = 0
    for step in range(data.draw(st.integers(1, 30), label="steps")):
        action = data.draw(
            st.sampled_from(
                [
                    "append",
                    "produce",
                    "close",
                    "flush",
                    "wait",
                    "truncate",
                    "truncate fully",
                    "hw",
                    "checkpoint",
                    "crash",
                    "power",
                ]
            )
        )
        if action == "append":
            epoch += data.draw(st.integers(0, 2), label="epoch step")
            for number in range(data.draw(st.integers(1, 4), label="batches")):
                batch = make_batch(step * 10 + number, records=1 + number % 3)
                log.append(batch, now_ms=0, leader_epoch=epoch)
                model.batches.append(bytes(batch))
        elif action == "produce":  # an idempotent producer: its next batch, or a retry
            producer_id = data.draw(st.integers(0, 2), label="producer")
            producer = log.producer_state.get(producer_id)
            sequence = 0 if producer is None else (producer.last_sequence + 1) % 2**31
            records = 1 + step % 2
            if producer is not None and data.draw(st.booleans(), label="retry"):
                retried = data.draw(st.sampled_from(producer.batches), label="retried")
                sequence = retried.first_sequence
                records = retried.last_sequence - retried.first_sequence + 1
            batch = make_idempotent_batch(producer_id, 0, sequence, records=records)
            info = log.append(batch, now_ms=0, leader_epoch=epoch)
            if not info.duplicate:
                model.batches.append(bytes(batch))
            else:
                assert (info.base_offset, info.last_offset) == retried[2:4]
        elif action == "close":  # and restart: the image holds a producer-state snapshot
            log.close()
            model.durable = len(model.batches)
            model.checkpoint = log.high_watermark
            image = log.crash(power_loss=False)
            model.crash(image, power_loss=False)
            log = MemoryPartitionLog.recover(
                "t-0", config, image, high_watermark_managed_externally=managed
            )
            model.check_recovered(log, managed)
        elif action == "flush":
            await log.flush()
            model.durable = len(model.batches)
            model.checkpoint = log.high_watermark
        elif action == "wait":
            offset = data.draw(st.integers(0, log.log_end_offset), label="offset")
            await log.wait_durable(offset)
            if offset > model.durable_offset:
                model.durable = len(model.batches)
        elif action == "truncate":
            kept = data.draw(st.integers(0, len(model.batches)), label="kept")
            log.truncate_to(model.bases()[kept])
            if kept < len(model.batches):
                del model.batches[kept:]
                model.durable = kept
                model.checkpoint = log.high_watermark
        elif action == "truncate fully":
            offset = data.draw(st.integers(0, log.log_end_offset + 50), label="start")
            log.truncate_fully_and_start_at(offset)
            model.batches, model.durable, model.start = [], 0, offset
            model.checkpoint = offset
        elif action == "hw":
            if managed:
                offset = data.draw(st.integers(0, log.log_end_offset + 3), label="hw")
                log.set_high_watermark(offset)
        elif action == "checkpoint":
            await log.write_high_watermark_checkpoint()
            model.checkpoint = log.high_watermark
        else:
            image = log.crash(power_loss=action == "power")
            model.crash(image, power_loss=action == "power")
            log = MemoryPartitionLog.recover(
                "t-0", config, image, high_watermark_managed_externally=managed
            )
            model.check_recovered(log, managed)
        model.check(log, managed=managed, fsync=fsync)


class _DiskModel:
    def __init__(self) -> None:
        self.batches: list[bytes] = []  # appended and not truncated
        self.durable = 0  # how many of them are durable
        self.checkpoint: int | None = None  # the high watermark checkpointed
        self.start = 0  # the log start offset

    def bases(self) -> list[int]:
        """The base offset of each batch, then the log end."""
        return bases_of(self.batches) if self.batches else [self.start]

    @property
    def durable_offset(self) -> int:
        return bases_of(self.batches[: self.durable])[-1] if self.durable else self.start

    def crash(self, image: DurableImage, *, power_loss: bool) -> None:
        assert image.leader_epochs == epochs_of(self.batches)  # written at every change
        assert image.high_watermark == self.checkpoint
        assert image.log_start_offset == self.start
        if power_loss:
            del self.batches[self.durable :]
        assert image.batches == tuple(self.batches)
        self.durable = len(self.batches)

    def check_recovered(self, log: MemoryPartitionLog, managed: bool) -> None:
        end = self.bases()[-1]
        restored = None if self.checkpoint is None else min(self.checkpoint, end)
        assert log.restored_high_watermark == restored
        self.checkpoint = restored  # a clipped checkpoint is rewritten (as the file log does)
        if managed:
            assert log.high_watermark == (self.start if restored is None else restored)

    def check(self, log: MemoryPartitionLog, *, managed: bool, fsync: str) -> None:
        assert read_all(log) == self.batches
        assert log.log_start_offset == self.start and log.log_end_offset == self.bases()[-1]
        assert log.leader_epochs.entries() == epochs_of(self.batches)
        assert log.durable_offset == self.durable_offset
        rebuilt = ProducerStateTable(producers_max=log.config.producers_max)
        for batch in self.batches:
            rebuilt.record(parse_header(batch))
        assert log.producer_state.producers() == rebuilt.producers()
        assert log.high_watermark <= log.log_end_offset
        if not managed:
            expected = log.durable_offset if fsync == "always" else log.log_end_offset
            assert log.high_watermark == expected


# Idempotent producers (the shared contract is in test_log_conformance).


def produce(log: MemoryPartitionLog, producer_id: int, sequence: int) -> tuple[int, int, bool]:
    info = log.append(make_idempotent_batch(producer_id, 0, sequence, records=2), now_ms=0)
    return info.base_offset, info.last_offset, info.duplicate


def states(log: MemoryPartitionLog) -> tuple:
    return log.producer_state.producers()


async def test_after_a_power_loss_the_producers_state_is_that_of_the_durable_prefix():
    log = new_log(managed=False)
    durable = [produce(log, 1, 2 * number) for number in range(3)]
    await log.flush()
    durable_state = states(log)
    lost = [produce(log, 1, 2 * number) for number in range(3, 5)]
    recovered = MemoryPartitionLog.recover("t-0", CONFIG, log.crash(power_loss=True))
    assert states(recovered) == durable_state
    for number, (base, last, _) in enumerate(durable):
        assert produce(recovered, 1, 2 * number) == (base, last, True)
    # The producer retries what the power loss took: written again, at the same offsets.
    assert [produce(recovered, 1, 2 * number) for number in range(3, 5)] == lost


def test_a_clean_close_leaves_a_snapshot_in_the_image_and_recovery_uses_it():
    log = new_log(managed=False, producer_id_expiration_ms=1_000)
    produce(log, 1, 0)
    produce(log, 2, 0)
    log.append(make_batch(5), now_ms=0)
    assert log.expire_producers(0) == 0
    empty = new_log()
    empty.close()
    assert empty.crash(power_loss=True).producer_snapshot is None  # no batch, no snapshot
    image = log.crash(power_loss=False)
    assert image.producer_snapshot is None  # not closed: a crash leaves none
    log = MemoryPartitionLog.recover("t-0", log.config, image)
    assert log.expire_producers(10**6) == 2
    log.close()
    image = log.crash(power_loss=True)
    assert image.producer_snapshot is not None and image.producer_snapshot[0] == 6
    assert len(MemoryPartitionLog.recover("t-0", log.config, image).producer_state) == 0
    damaged = dataclasses.replace(image, producer_snapshot=(6, b"\0" * 30))
    rebuilt = MemoryPartitionLog.recover("t-0", log.config, damaged)  # from the batches
    assert [producer.producer_id for producer in rebuilt.producer_state.producers()] == [1, 2]


def test_retention_forgets_the_batches_it_deletes():
    log = new_log(managed=False)
    produce(log, 9, 0)
    produce(log, 1, 0)
    produce(log, 1, 2)
    log.close()
    log = MemoryPartitionLog.recover("t-0", CONFIG, log.crash(power_loss=False))
    assert log.delete_records_before(4) == 2
    assert log.producer_state.get(9) is None
    producer = log.producer_state.get(1)
    assert producer is not None and [batch.first_offset for batch in producer.batches] == [4]
    assert produce(log, 9, 40) == (6, 7, False)  # unknown now: any sequence
    expected = states(log)
    image = log.crash(power_loss=False)
    assert image.producer_snapshot is not None and image.producer_snapshot[0] == 6
    assert states(MemoryPartitionLog.recover("t-0", CONFIG, image)) == expected
    assert log.log_start_offset == 4
