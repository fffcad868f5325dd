"""The gRPC Log service's pure parts (broker/gateway/grpc_log_service.py), without a broker:
the status of each broker error, the checks of Produce and Consume requests, and how a
ProduceStream's queued requests are grouped into one batch."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from broker.gateway.grpc_log_service import (
    BATCH_BYTES,
    BadRequest,
    ProduceCall,
    _RequestQueue,
    _timeout_ms,
    grpc_status_of,
    parse_consume_request,
    parse_produce_request,
)
from protocol import ErrorCode
from protocol.grpc_api import log_pb2

S = grpc.StatusCode
CLOCK_MS = 1_750_000_000_000


@pytest.mark.parametrize(
    ("code", "stored", "status"),
    [
        (ErrorCode.OFFSET_OUT_OF_RANGE, False, S.OUT_OF_RANGE),
        (ErrorCode.OFFSET_OUT_OF_RANGE, True, S.OUT_OF_RANGE),
        (ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, False, S.NOT_FOUND),
        (ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, True, S.NOT_FOUND),
        (ErrorCode.NOT_ENOUGH_REPLICAS, False, S.UNAVAILABLE),
        (ErrorCode.NOT_ENOUGH_REPLICAS_AFTER_APPEND, False, S.UNAVAILABLE),
        (ErrorCode.LEADER_NOT_AVAILABLE, False, S.UNAVAILABLE),
        (ErrorCode.NOT_LEADER_OR_FOLLOWER, True, S.UNAVAILABLE),
        (ErrorCode.KAFKA_STORAGE_ERROR, False, S.UNAVAILABLE),
        (ErrorCode.NETWORK_EXCEPTION, True, S.UNAVAILABLE),
        (ErrorCode.FENCED_LEADER_EPOCH, False, S.UNAVAILABLE),
        # the append may have been stored: not "unavailable", which invites a blind retry
        (ErrorCode.REQUEST_TIMED_OUT, False, S.DEADLINE_EXCEEDED),
        (ErrorCode.REQUEST_TIMED_OUT, True, S.DEADLINE_EXCEEDED),
        # damaged in a request: the client's fault; read from the log: lost data
        (ErrorCode.CORRUPT_MESSAGE, False, S.INVALID_ARGUMENT),
        (ErrorCode.CORRUPT_MESSAGE, True, S.DATA_LOSS),
        (ErrorCode.INVALID_TOPIC, False, S.INVALID_ARGUMENT),
        (ErrorCode.INVALID_TOPIC, True, S.INVALID_ARGUMENT),
        (ErrorCode.INVALID_REQUEST, False, S.INVALID_ARGUMENT),
        (ErrorCode.INVALID_RECORD, False, S.INVALID_ARGUMENT),
        (ErrorCode.INVALID_TIMESTAMP, False, S.INVALID_ARGUMENT),
        (ErrorCode.INVALID_PARTITIONS, False, S.INVALID_ARGUMENT),
        (ErrorCode.INVALID_REQUIRED_ACKS, False, S.INVALID_ARGUMENT),
        (ErrorCode.INVALID_CONFIG, False, S.INVALID_ARGUMENT),
        (ErrorCode.MESSAGE_TOO_LARGE, False, S.INVALID_ARGUMENT),
        (ErrorCode.RECORD_LIST_TOO_LARGE, False, S.INVALID_ARGUMENT),
        (ErrorCode.POLICY_VIOLATION, False, S.INVALID_ARGUMENT),
        (ErrorCode.UNSUPPORTED_COMPRESSION_TYPE, False, S.INVALID_ARGUMENT),
        (ErrorCode.TOPIC_ALREADY_EXISTS, False, S.ALREADY_EXISTS),
        (ErrorCode.UNKNOWN_SERVER_ERROR, False, S.INTERNAL),
        (ErrorCode.UNKNOWN_SERVER_ERROR, True, S.INTERNAL),
    ],
)
def test_grpc_status_of(code, stored, status):
    assert grpc_status_of(code, stored=stored) == status


def test_no_error_code_maps_to_ok():
    for code in ErrorCode:
        for stored in (False, True):
            status = grpc_status_of(code, stored=stored)
            assert isinstance(status, grpc.StatusCode), (code, status)
            assert status != S.OK, code
            assert status != S.UNKNOWN, code  # every code has a deliberate status
            if code != ErrorCode.CORRUPT_MESSAGE:  # `stored` matters for that one only
                assert status == grpc_status_of(code), code


def test_every_invalid_code_is_invalid_argument_and_retriable_ones_may_be_retried():
    for code in ErrorCode:
        status = grpc_status_of(code)
        if code.name.startswith("INVALID_"):
            assert status == S.INVALID_ARGUMENT, code
        elif code.retriable and code != ErrorCode.CORRUPT_MESSAGE:
            assert status in (S.UNAVAILABLE, S.DEADLINE_EXCEEDED), code


# -- parse_produce_request -------------------------------------------------------------------


def record(value: bytes, *, key: bytes | None = None, timestamp: int = 0, headers=()):
    message = log_pb2.Record(value=value, timestamp=timestamp)
    if key is not None:
        message.key = key
    for name, header_value in headers:
        message.headers.add(key=name, value=header_value)
    return message


def parse(request: log_pb2.ProduceRequest, records_max: int = 100) -> ProduceCall:
    return parse_produce_request(request, records_max, CLOCK_MS)


def test_a_record_for_the_wal_log():
    call = parse(log_pb2.ProduceRequest(record=record(b"value")))
    assert (call.topic, call.partition) == ("wal", 0)  # the original service's log
    assert call.records == [(CLOCK_MS, None, b"value", [])]  # no key, the broker's clock
    assert call.size_bytes == 5
    assert call.first_key is None
    assert call.place == ("wal", 0, None)
    explicit = parse(log_pb2.ProduceRequest(record=record(b"v"), topic="wal", partition=3))
    assert explicit.partition == 3  # refused by the broker (wal has one partition), not here


def test_keys_timestamps_and_headers_are_kept():
    headers = [("a", b"1"), ("empty", b""), ("a", b"2")]
    call = parse(
        log_pb2.ProduceRequest(
            record=record(b"value", key=b"key", timestamp=1_600_000_000_001, headers=headers)
        )
    )
    assert call.records == [(1_600_000_000_001, b"key", b"value", headers)]
    assert call.size_bytes == len(b"value") + len(b"key")
    empty_key = parse(log_pb2.ProduceRequest(record=record(b"v", key=b"")))
    assert empty_key.records[0][1] == b""  # empty, not absent
    assert empty_key.first_key == b""


def test_records_of_another_topic():
    call = parse(
        log_pb2.ProduceRequest(
            topic="events",
            records=[record(b"a", key=b"k1"), record(b"bb"), record(b"", key=b"k3", timestamp=7)],
        )
    )
    assert call.topic == "events"
    assert call.partition is None  # the first key picks it
    assert call.records == [
        (CLOCK_MS, b"k1", b"a", []),
        (CLOCK_MS, None, b"bb", []),
        (7, b"k3", b"", []),
    ]
    assert call.size_bytes == 1 + 2 + 2 + 2
    assert call.place == ("events", None, b"k1")
    keyless = parse(log_pb2.ProduceRequest(topic="events", record=record(b"x")))
    assert keyless.place == ("events", None, None)
    placed = parse(
        log_pb2.ProduceRequest(topic="events", partition=0, record=record(b"x", key=b"k"))
    )
    assert placed.partition == 0  # an explicit 0 is not "absent"
    assert placed.place == ("events", 0, None)  # the key does not matter then


def test_records_up_to_the_limit():
    request = log_pb2.ProduceRequest(records=[record(b"%d" % n) for n in range(5)])
    assert len(parse(request, records_max=5).records) == 5
    with pytest.raises(BadRequest, match="5 records in one request; at most 4"):
        parse(request, records_max=4)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            log_pb2.ProduceRequest(record=record(b"a"), records=[record(b"b")]),
            "either record or records",
        ),
        (log_pb2.ProduceRequest(), "needs a record"),
        (log_pb2.ProduceRequest(topic="events", partition=1), "needs a record"),
        (log_pb2.ProduceRequest(record=record(b"a", timestamp=-1)), r"records\[0\].timestamp"),
        (
            log_pb2.ProduceRequest(records=[record(b"a"), record(b"b", timestamp=-5)]),
            r"records\[1\].timestamp must not be negative, got -5",
        ),
    ],
)
def test_bad_produce_requests(request_, message):
    with pytest.raises(BadRequest, match=message):
        parse(request_)


def test_an_empty_record_is_a_record():
    """A `record` with nothing set is present (proto3 message fields have presence)."""
    call = parse(log_pb2.ProduceRequest(record=log_pb2.Record()))
    assert call.records == [(CLOCK_MS, None, b"", [])]


# -- parse_consume_request -------------------------------------------------------------------


def test_consume_requests():
    call = parse_consume_request(log_pb2.ConsumeRequest(), 100)
    assert (call.topic, call.partition, call.offset, call.max_records) == ("wal", 0, 0, 0)
    call = parse_consume_request(
        log_pb2.ConsumeRequest(topic="events", partition=3, offset=42, max_records=7), 100
    )
    assert (call.topic, call.partition, call.offset, call.max_records) == ("events", 3, 42, 7)
    capped = parse_consume_request(log_pb2.ConsumeRequest(max_records=5000), 100)
    assert capped.max_records == 100


# -- _RequestQueue ---------------------------------------------------------------------------


def produce_call(
    topic: str = "t",
    partition: int | None = 0,
    *,
    key: bytes | None = None,
    records: int = 1,
    size: int = 1,
) -> ProduceCall:
    return ProduceCall(topic, partition, [(0, key, b"v", [])] * records, size)


def queued(*items) -> _RequestQueue:
    queue = _RequestQueue(size=1000)
    queue._items.extend(items)
    return queue


def rest(queue: _RequestQueue) -> list:
    return list(queue._items)


def test_take_same_place_takes_the_run_of_requests_for_the_same_place():
    first = produce_call()
    same = [produce_call() for _ in range(3)]
    elsewhere = produce_call(partition=1)
    later = produce_call()
    queue = queued(*same, elsewhere, later)
    assert queue.take_same_place(first, 100) == same
    # it stops at the first request bound elsewhere: the later one is not taken past it
    assert rest(queue) == [elsewhere, later]
    assert queue.take_same_place(first, 100) == []
    assert queued().take_same_place(first, 100) == []


@pytest.mark.parametrize(
    ("first", "other"),
    [
        (produce_call("a"), produce_call("b")),  # another topic
        (produce_call(partition=0), produce_call(partition=1)),
        (produce_call(partition=None, key=b"k1"), produce_call(partition=None, key=b"k2")),
        (produce_call(partition=None, key=b"k1"), produce_call(partition=None)),
        (produce_call(partition=None, key=b"k1"), produce_call(partition=0, key=b"k1")),
    ],
)
def test_take_same_place_does_not_mix_places(first, other):
    queue = queued(other)
    assert queue.take_same_place(first, 100) == []
    assert rest(queue) == [other]


def test_take_same_place_groups_by_key_without_a_partition_and_ignores_keys_with_one():
    keyed = produce_call(partition=None, key=b"k")
    assert queued(produce_call(partition=None, key=b"k")).take_same_place(keyed, 100)
    keyless = produce_call(partition=None)
    assert queued(produce_call(partition=None)).take_same_place(keyless, 100)
    placed = produce_call(partition=2, key=b"a")
    assert queued(produce_call(partition=2, key=b"b")).take_same_place(placed, 100)


def test_take_same_place_stops_at_a_bad_request_and_at_the_end():
    first = produce_call()
    good, bad = produce_call(), BadRequest("bad")
    queue = queued(good, bad, produce_call())
    assert queue.take_same_place(first, 100) == [good]
    assert rest(queue)[0] is bad
    queue = queued(good)
    queue.close()
    assert queue.take_same_place(first, 100) == [good]
    assert rest(queue) == [None]


def test_take_same_place_is_bounded_by_records():
    first = produce_call(records=2)
    threes = [produce_call(records=3) for _ in range(3)]
    queue = queued(*threes)
    assert queue.take_same_place(first, 8) == threes[:2]  # 2 + 3 + 3 = 8, not 11
    assert rest(queue) == threes[2:]
    assert queued(*threes).take_same_place(first, 4) == []  # 2 + 3 > 4
    assert queued(*threes).take_same_place(produce_call(records=20), 8) == []


def test_take_same_place_is_bounded_by_bytes():
    half = BATCH_BYTES // 2
    first = produce_call(size=half)
    fits, too_much = produce_call(size=half), produce_call(size=1)
    queue = queued(fits, too_much)
    assert queue.take_same_place(first, 100) == [fits]  # exactly BATCH_BYTES
    assert rest(queue) == [too_much]
    assert queued(produce_call(size=half + 1)).take_same_place(first, 100) == []


def test_the_queue_holds_at_most_its_size_and_keeps_order():
    async def main() -> None:
        queue = _RequestQueue(size=2)
        a, b, c = produce_call(size=1), produce_call(size=2), produce_call(size=3)
        await queue.put(a)
        await queue.put(b)
        put_c = asyncio.ensure_future(queue.put(c))
        for _ in range(5):  # let it run: it waits for room
            await asyncio.sleep(0)
        assert not put_c.done() and rest(queue) == [a, b]
        assert await queue.get() is a
        await asyncio.wait_for(put_c, 5)  # room came: it is queued
        queue.close()
        assert [await queue.get() for _ in range(3)] == [b, c, None]
        # a get waits for an item
        get = asyncio.ensure_future(queue.get())
        await asyncio.sleep(0)
        assert not get.done()
        await queue.put(a)
        assert await asyncio.wait_for(get, 5) is a

    asyncio.run(main())


def test_taking_a_group_makes_room_for_more():
    async def main() -> None:
        queue = _RequestQueue(size=2)
        first, second, third = produce_call(), produce_call(), produce_call()
        await queue.put(first)
        await queue.put(second)
        put_third = asyncio.ensure_future(queue.put(third))
        await asyncio.sleep(0)
        assert not put_third.done()
        assert await queue.get() is first
        assert queue.take_same_place(first, 100) == [second]
        await asyncio.wait_for(put_third, 5)
        assert rest(queue) == [third]

    asyncio.run(main())


def test_the_queue_holds_at_most_its_bytes_but_always_one_request():
    async def main() -> None:
        queue = _RequestQueue(size=100, bytes_max=10)
        big = produce_call(size=25)  # larger than the bound alone: still queued
        await asyncio.wait_for(queue.put(big), 5)
        small = produce_call(size=1)
        put_small = asyncio.ensure_future(queue.put(small))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not put_small.done() and rest(queue) == [big]  # 25 + 1 > 10: it waits
        assert await queue.get() is big
        await asyncio.wait_for(put_small, 5)
        fits = [produce_call(size=3) for _ in range(3)]  # 1 + 9 = 10: all fit
        for call in fits:
            await asyncio.wait_for(queue.put(call), 5)
        over = asyncio.ensure_future(queue.put(produce_call(size=1)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not over.done()
        assert queue.take_same_place(await queue.get(), 100) == fits  # frees 10 bytes
        await asyncio.wait_for(over, 5)
        over.result()

    asyncio.run(main())


# -- deadlines -------------------------------------------------------------------------------


class FakeContext:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def test_an_append_waits_no_longer_than_the_call_may():
    assert _timeout_ms(FakeContext(None), 30_000) == 30_000  # no deadline: the limit
    assert _timeout_ms(FakeContext(2.5), 30_000) == 2_500
    assert _timeout_ms(FakeContext(100.0), 30_000) == 30_000
    assert _timeout_ms(FakeContext(0.0), 30_000) == 1  # past: at least 1 ms
