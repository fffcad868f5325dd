"""The idempotent producers' state table alone (pure: headers in, decisions out): each rule
of `check_leader_append`, recording without checks, expiration, retention, the memory
bound, snapshots; then properties: a producer retrying and reordering up to 5 batches in
flight gets each batch written exactly once and in order, a follower's table equals its
leader's, and damaged snapshots are refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.answers import error_of
from broker.storage import (
    BatchMetadata,
    InvalidProducerEpochError,
    InvalidRecordError,
    OutOfOrderSequenceError,
    ProducerStateTable,
)
from broker.storage.producer_state import (
    BATCHES_PER_PRODUCER,
    SEQUENCE_MODULUS,
    last_sequence_of,
    parse_snapshot,
)
from protocol import ErrorCode
from protocol.record_batch import BatchHeader

SEQUENCE_MAX = SEQUENCE_MODULUS - 1


def header(
    producer_id: int = 7,
    epoch: int = 0,
    sequence: int = 0,
    *,
    records: int = 1,
    offset: int = 0,
    timestamp: int = 1_000,
) -> BatchHeader:
    """A batch header as the log sees it (`offset`: its base offset, once assigned)."""
    return BatchHeader(
        base_offset=offset,
        batch_length=100,
        partition_leader_epoch=0,
        magic=2,
        crc=0,
        attributes=0x80,
        last_offset_delta=records - 1,
        base_timestamp=timestamp,
        max_timestamp=timestamp,
        producer_id=producer_id,
        producer_epoch=epoch,
        base_sequence=sequence,
        record_count=records,
    )


class Leader:
    """A leader's log reduced to what the table sees: offsets assigned in order."""

    def __init__(self, producers_max: int = 100) -> None:
        self.table = ProducerStateTable(producers_max=producers_max)
        self.end = 0
        self.written: list[BatchHeader] = []

    def append(self, batch: BatchHeader) -> tuple[int, int, bool]:
        """(base offset, last offset, duplicate); raises what the table raises."""
        original = self.table.check_leader_append([batch])
        if original is not None:
            return original.first_offset, original.last_offset, True
        placed = batch._replace(base_offset=self.end)
        self.end = placed.next_offset
        self.table.record(placed)
        self.written.append(placed)
        return placed.base_offset, placed.last_offset, False


# The rules of check_leader_append.


def test_an_unknown_producer_is_accepted_at_any_sequence():
    leader = Leader()
    assert leader.append(header(producer_id=1, sequence=0)) == (0, 0, False)
    assert leader.append(header(producer_id=2, sequence=4_000, records=3)) == (1, 3, False)
    producer = leader.table.get(2)
    assert producer is not None and producer.epoch == 0
    assert producer.batches == (BatchMetadata(4_000, 4_002, 1, 3, 1_000),)
    assert (producer.last_sequence, producer.last_offset, producer.last_timestamp) == (
        4_002,
        3,
        1_000,
    )


def test_a_batch_must_follow_the_last_sequence():
    leader = Leader()
    leader.append(header(sequence=0, records=2))  # sequences 0-1
    # a gap, overlaps that are no cached batch, far away
    for sequence, records in ((3, 2), (1, 2), (0, 1), (5_000, 2)):
        with pytest.raises(OutOfOrderSequenceError, match="expected 2"):
            leader.append(header(sequence=sequence, records=records))
    assert leader.append(header(sequence=2)) == (2, 2, False)


def test_a_retry_of_any_of_the_last_five_batches_is_a_duplicate_with_its_offsets():
    leader = Leader()
    batches = [header(sequence=2 * number, records=2) for number in range(7)]
    answers = [leader.append(batch) for batch in batches]
    assert answers[3] == (6, 7, False)
    for batch, (base, last, _) in list(zip(batches, answers))[2:]:
        assert leader.append(batch) == (base, last, True)
    for batch in batches[:2]:  # no longer cached: neither a duplicate nor in sequence
        with pytest.raises(OutOfOrderSequenceError):
            leader.append(batch)
    partial = header(sequence=8, records=1)  # the first sequence of a cached batch only
    with pytest.raises(OutOfOrderSequenceError):
        leader.append(partial)
    assert leader.end == 14  # nothing was written by the retries


def test_an_older_epoch_is_fenced_even_for_a_retry():
    leader = Leader()
    first = header(epoch=3, sequence=0)
    leader.append(first)
    leader.append(header(epoch=4, sequence=0))
    for batch in (first, header(epoch=3, sequence=1), header(epoch=2, sequence=0)):
        with pytest.raises(InvalidProducerEpochError, match="epoch 4"):
            leader.append(batch)


def test_a_new_epoch_starts_at_sequence_zero_and_forgets_the_old_batches():
    leader = Leader()
    old = header(epoch=0, sequence=0, records=3)
    leader.append(old)
    leader.append(header(epoch=0, sequence=3))
    with pytest.raises(OutOfOrderSequenceError, match="not 0"):
        leader.append(header(epoch=1, sequence=4))
    assert leader.append(header(epoch=1, sequence=0, records=3)) == (4, 6, False)
    producer = leader.table.get(7)
    assert producer is not None and producer.epoch == 1 and len(producer.batches) == 1
    assert leader.append(header(epoch=1, sequence=0, records=3)) == (4, 6, True)
    with pytest.raises(InvalidProducerEpochError):
        leader.append(old)


def test_sequences_wrap_to_zero_after_the_int32_maximum():
    assert last_sequence_of(header(sequence=SEQUENCE_MAX - 1, records=3)) == 0
    leader = Leader()
    leader.append(header(sequence=SEQUENCE_MAX - 2, records=2))  # ... MAX - 1
    spanning = header(sequence=SEQUENCE_MAX, records=3)  # MAX, 0, 1
    assert leader.append(spanning) == (2, 4, False)
    assert leader.append(spanning) == (2, 4, True)
    with pytest.raises(OutOfOrderSequenceError, match="expected 2"):
        leader.append(header(sequence=0))
    assert leader.append(header(sequence=2)) == (5, 5, False)
    wrapping = Leader()
    wrapping.append(header(sequence=SEQUENCE_MAX - 1, records=2))  # ends at MAX
    assert wrapping.append(header(sequence=0)) == (2, 2, False)


def test_an_idempotent_batch_must_come_alone_with_an_epoch_and_a_sequence():
    table = ProducerStateTable(producers_max=10)
    plain = header(producer_id=-1, sequence=-1, epoch=-1)
    assert table.check_leader_append([plain, plain, plain]) is None  # not idempotent
    for headers in ([plain, header()], [header(), header(sequence=1)], [header(), plain]):
        with pytest.raises(InvalidRecordError, match="one batch only"):
            table.check_leader_append(headers)
    for bad in (header(sequence=-1), header(epoch=-1)):
        with pytest.raises(InvalidRecordError, match="needs both"):
            table.check_leader_append([bad])
    assert len(table) == 0


# Recording without checks (followers, loading).


def test_recording_takes_any_batch_without_checks():
    table = ProducerStateTable(producers_max=10)
    table.record(header(producer_id=-1, offset=0))  # not idempotent: nothing
    assert len(table) == 0
    table.record(header(epoch=5, sequence=10, offset=1))
    table.record(header(epoch=5, sequence=40, offset=2))  # a gap: taken as it is
    table.record(header(epoch=2, sequence=7, offset=3))  # an epoch going back: starts again
    producer = table.get(7)
    assert producer is not None and producer.epoch == 2
    assert producer.batches == (BatchMetadata(7, 7, 3, 3, 1_000),)
    for number in range(8):
        table.record(header(epoch=2, sequence=8 + number, offset=4 + number))
    producer = table.get(7)
    assert producer is not None and len(producer.batches) == BATCHES_PER_PRODUCER
    assert [batch.first_sequence for batch in producer.batches] == [11, 12, 13, 14, 15]


# Expiration, retention, the memory bound.


def test_expiration_removes_producers_whose_last_batch_is_old_enough():
    table = ProducerStateTable(producers_max=10)
    table.record(header(producer_id=1, timestamp=5_000, offset=0))
    table.record(header(producer_id=1, sequence=1, timestamp=1_000, offset=1))  # last: 1000
    table.record(header(producer_id=2, timestamp=2_000, offset=2))
    version = table.version
    assert table.expire(now_ms=10_999, expiration_ms=10_000) == 0
    assert table.version == version
    assert table.expire(now_ms=11_000, expiration_ms=10_000) == 1  # exactly that old: gone
    assert table.get(1) is None and table.get(2) is not None
    assert table.version != version
    assert table.expire(now_ms=12_000, expiration_ms=10_000) == 1
    assert len(table) == 0


def test_truncating_the_head_forgets_deleted_batches_and_producers_left_without():
    table = ProducerStateTable(producers_max=10)
    table.record(header(producer_id=1, sequence=0, records=2, offset=0))  # 0-1
    table.record(header(producer_id=2, sequence=0, offset=2))
    table.record(header(producer_id=1, sequence=2, offset=3))
    table.record(header(producer_id=3, sequence=0, offset=4))
    assert not table.truncate_head(0)
    assert table.truncate_head(3)
    assert [producer.producer_id for producer in table.producers()] == [1, 3]  # order kept
    producer = table.get(1)
    assert producer is not None and producer.batches == (BatchMetadata(2, 2, 3, 3, 1_000),)
    assert not table.truncate_head(3)


def test_the_least_recently_written_producer_is_evicted_beyond_the_limit():
    table = ProducerStateTable(producers_max=3)
    for producer_id in (1, 2, 3):
        table.record(header(producer_id=producer_id, offset=producer_id))
    table.record(header(producer_id=1, sequence=1, offset=4))  # 1 is the most recent now
    table.record(header(producer_id=4, offset=5))
    assert [producer.producer_id for producer in table.producers()] == [3, 1, 4]
    # An evicted producer is unknown: its next batch is accepted at any sequence.
    assert table.check_leader_append([header(producer_id=2, sequence=99)]) is None


def test_last_batch_offsets_are_each_producers_last_batch():
    table = ProducerStateTable(producers_max=10)
    table.record(header(producer_id=1, offset=0, records=2))
    table.record(header(producer_id=2, offset=2))
    table.record(header(producer_id=1, sequence=2, offset=3, records=2))
    assert table.last_batch_offsets() == frozenset({2, 3})


# Snapshots.


def filled_table(producers_max: int = 10) -> ProducerStateTable:
    table = ProducerStateTable(producers_max=producers_max)
    offset = 0
    for number in range(12):
        producer_id = number % 4
        table.record(header(producer_id, epoch=producer_id, sequence=number, offset=offset))
        offset += 1
    return table


def test_a_snapshot_round_trips_in_recency_order():
    table = filled_table()
    parsed = parse_snapshot(table.snapshot_bytes(12), producers_max=10)
    assert parsed is not None
    end, copy = parsed
    assert end == 12 and copy.producers() == table.producers()
    empty = parse_snapshot(ProducerStateTable(producers_max=5).snapshot_bytes(0), producers_max=5)
    assert empty is not None and empty[0] == 0 and len(empty[1]) == 0
    smaller = parse_snapshot(table.snapshot_bytes(12), producers_max=2)
    assert smaller is not None
    assert smaller[1].producers() == table.producers()[-2:]  # the most recent ones


def test_a_damaged_snapshot_is_refused():
    data = filled_table().snapshot_bytes(12)
    assert parse_snapshot(data[:-1], producers_max=10) is None  # cut short
    assert parse_snapshot(data + b"\0", producers_max=10) is None  # trailing bytes
    assert parse_snapshot(b"", producers_max=10) is None
    wrong_version = bytes([0, 9]) + data[2:]
    assert parse_snapshot(wrong_version, producers_max=10) is None
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        assert parse_snapshot(bytes(damaged), producers_max=10) is None, position


@settings(max_examples=50, deadline=None)
@given(position=st.integers(0, 10_000), mask=st.integers(1, 255))
def test_any_flipped_bits_make_a_snapshot_refused(position, mask):
    data = bytearray(filled_table().snapshot_bytes(12))
    data[position % len(data)] ^= mask
    assert parse_snapshot(bytes(data), producers_max=10) is None


# Properties.


@st.composite
def producer_runs(draw):
    """Actions of one producer with up to 5 batches in flight: create the next batch, send
    (or resend) any batch in flight (reordering), or take the answer of the oldest one."""
    return draw(
        st.lists(
            st.tuples(
                st.sampled_from(["create", "send", "answer"]),
                st.integers(0, BATCHES_PER_PRODUCER - 1),  # which batch in flight
                st.integers(1, 3),  # records of a created batch
            ),
            max_size=120,
        )
    )


@settings(max_examples=200, deadline=None)
@given(run=producer_runs(), start=st.sampled_from([0, 1_000, SEQUENCE_MAX - 4]))
def test_retried_and_reordered_batches_are_written_exactly_once_in_order(run, start):
    leader = Leader()
    follower = ProducerStateTable(producers_max=100)
    in_flight: list[BatchHeader] = []  # oldest first
    written: dict[int, tuple[int, int]] = {}  # first sequence -> offsets of the write
    next_sequence = start
    for action, index, records in run:
        if action == "create" and len(in_flight) < BATCHES_PER_PRODUCER:
            in_flight.append(header(sequence=next_sequence, records=records))
            next_sequence = (next_sequence + records) % SEQUENCE_MODULUS
        elif action == "send" and in_flight:
            batch = in_flight[index % len(in_flight)]
            was_written = batch.base_sequence in written
            try:
                base, last, duplicate = leader.append(batch)
            except OutOfOrderSequenceError:
                assert not was_written, "a retry of a written batch must be a duplicate"
                continue
            assert duplicate == was_written
            if duplicate:
                assert (base, last) == written[batch.base_sequence]
            else:
                written[batch.base_sequence] = (base, last)
                follower.record(leader.written[-1])
        elif action == "answer" and in_flight and in_flight[0].base_sequence in written:
            in_flight.pop(0)
    # Every batch written once, in the producer's order, its sequences dense from the first
    # one written (the producer is unknown until then: any sequence starts it).
    sequences = [batch.base_sequence for batch in leader.written]
    assert len(sequences) == len(set(sequences))
    expected = sequences[0] if sequences else start
    for batch in leader.written:
        assert batch.base_sequence == expected
        expected = (last_sequence_of(batch) + 1) % SEQUENCE_MODULUS
    assert follower.producers() == leader.table.producers()


@settings(max_examples=100, deadline=None)
@given(
    records=st.lists(
        st.tuples(st.integers(0, 12), st.integers(0, 3), st.integers(0, 50)), max_size=80
    ),
    producers_max=st.integers(1, 8),
)
def test_the_table_stays_bounded_and_its_snapshot_holds_it(records, producers_max):
    table = ProducerStateTable(producers_max=producers_max)
    recency: list[int] = []  # producer ids, least recently written first
    for offset, (producer_id, epoch, sequence) in enumerate(records):
        table.record(header(producer_id, epoch=epoch, sequence=sequence, offset=offset))
        if producer_id in recency:
            recency.remove(producer_id)
        recency.append(producer_id)
        assert len(table) <= producers_max
        assert all(len(p.batches) <= BATCHES_PER_PRODUCER for p in table.producers())
    assert [p.producer_id for p in table.producers()] == recency[-producers_max:]
    parsed = parse_snapshot(table.snapshot_bytes(len(records)), producers_max=producers_max)
    assert parsed is not None and parsed[1].producers() == table.producers()


def test_the_errors_answer_kafkas_codes():
    for error, code in (
        (InvalidRecordError("x"), ErrorCode.INVALID_RECORD),
        (OutOfOrderSequenceError("x"), ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER),
        (InvalidProducerEpochError("x"), ErrorCode.INVALID_PRODUCER_EPOCH),
    ):
        assert error_of(error) == (code, "x")
        assert not code.retriable  # the producer must act (reset its sequences, or stop)
