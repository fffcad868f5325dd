"""The gRPC gateway end to end: a real grpcio client (tests/broker/grpc_test_support.py)
against real `dwal broker` processes serving `log.v1.Log` on --grpc-port.

Produce and Consume of the `wal` log and of other topics and partitions, ProduceStream's
ordered group commit, ConsumeStream following the log, cancellation and deadlines, the status
codes of bad input, health and reflection, a stop and restart under an open stream, and a
3-node cluster where every node serves every partition (forwarding to the leader).
"""

from __future__ import annotations

import contextlib
import functools
import pathlib
import queue
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import trio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from google.protobuf import descriptor_pool

import client
from grpc_test_support import (
    WAIT_S,
    LogClient,
    in_thread,
    messages_records,
    produce_request,
    record,
)
from protocol.grpc_api import log_pb2
from protocol.partitioning import partition_for_key

FAST = ("--fsync", "never")  # durability is not what these tests look at (but for restart)
SMALL_LIMITS = """\
[limits]
grpc_concurrent_rpcs_max = 4
grpc_message_bytes_max = 65536
"""
LOG_SERVICE = "log.v1.Log"
HEALTH_SERVICE = "grpc.health.v1.Health"


async def start_broker(broker_launcher, tmp_path: pathlib.Path, *, limits: bool = False):
    """A broker serving gRPC on a free port, fsync never; `limits`: SMALL_LIMITS."""
    extra = list(FAST)
    if limits:
        config = tmp_path / "limits.toml"
        config.write_text(SMALL_LIMITS)
        extra += ["--config", str(config)]
    broker = await broker_launcher.start(None, *extra, grpc_port=0)
    assert broker.grpc_port, broker.output.decode(errors="replace")
    return broker


async def create_topic(broker, name: str, partitions: int, **configs: str) -> None:
    async with client.connect(broker.bootstrap) as cluster:
        await client.Admin(cluster).create_topic(name, partitions, configs=configs)


async def still_serves(log: LogClient, topic: str = "wal") -> None:
    """The broker still appends and reads through the gateway."""
    answer = await log.produce_value(b"still serving", topic=topic)
    (found,) = await log.consume_records(answer.offset, 1, topic=topic, partition=answer.partition)
    assert found.value == b"still serving"


def answer_then_cancel(
    log: LogClient, requests: Iterator[log_pb2.ProduceRequest], count: int
) -> tuple[list[log_pb2.ProduceResponse], grpc.RpcError]:
    """Open a ProduceStream sending `requests`, take `count` answers, cancel it: the answers
    and the error it ended with (blocking: run it in a thread)."""
    call = log.stub.ProduceStream(requests, timeout=WAIT_S)
    answers = [next(call) for _ in range(count)]
    call.cancel()
    try:
        extra = next(call)
    except grpc.RpcError as error:
        return answers, error
    raise AssertionError(f"an answer after the cancel: {extra}")


async def assert_unwritten(log: LogClient, offset: int, **fields: object) -> None:
    """Nothing is stored at `offset` (Consume answers OUT_OF_RANGE)."""
    error = await log.error_of("Consume", log_pb2.ConsumeRequest(offset=offset, **fields))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE, (offset, fields, error)


def headers_of(message: log_pb2.Record) -> list[tuple[str, bytes]]:
    return [(header.key, header.value) for header in message.headers]


def now_ms() -> int:
    return int(time.time() * 1000)


# -- unary ---------------------------------------------------------------------------------


async def test_produce_and_consume_the_wal_log(broker_launcher, tmp_path):
    broker = await start_broker(broker_launcher, tmp_path)
    with LogClient(broker.grpc_port) as log:
        # before the first write: the empty log's end, with max_records; an error without
        empty = await log.consume(offset=0, max_records=10)
        assert (list(empty.records), empty.next_offset, empty.high_watermark) == ([], 0, 0)
        error = await log.error_of("Consume", log_pb2.ConsumeRequest(offset=0))
        assert error.code() == grpc.StatusCode.OUT_OF_RANGE, error

        before = now_ms()
        answers = [
            await log.produce_value(
                b"first",
                key=b"k1",
                timestamp=1_700_000_000_123,
                headers=[("trace", b"t-1"), ("empty", b""), ("trace", b"t-2")],
            ),
            await log.produce_value(b"second", key=b""),  # an empty key, not an absent one
            await log.produce_value(b""),  # no key, an empty value, the broker's clock
        ]
        after = now_ms()
        assert [(a.partition, a.offset) for a in answers] == [(0, 0), (0, 1), (0, 2)]

        first = (await log.consume(offset=0)).record
        assert (first.offset, first.value, first.key) == (0, b"first", b"k1")
        assert first.HasField("key") and first.timestamp == 1_700_000_000_123
        assert headers_of(first) == [("trace", b"t-1"), ("empty", b""), ("trace", b"t-2")]
        second = (await log.consume(offset=1)).record
        assert (second.offset, second.value) == (1, b"second")
        assert second.HasField("key") and second.key == b""
        assert before <= second.timestamp <= after, (before, second.timestamp, after)
        assert headers_of(second) == []
        third = (await log.consume(offset=2, topic="wal", partition=0)).record
        assert (third.offset, third.value) == (2, b"")
        assert not third.HasField("key")

        # `records`: one batch at consecutive offsets, each record its own key and headers
        batch = log_pb2.ProduceRequest(
            records=[
                record(b"b0", key=b"x"),
                record(b"b1"),
                record(b"b2", key=b"z", timestamp=5, headers=[("h", b"v")]),
            ]
        )
        assert (await log.produce(batch)).offset == 3
        assert (await log.produce_value(b"after", topic="wal")).offset == 6
        read = await log.consume_records(3, 4)
        assert [(r.offset, r.value) for r in read] == [
            (3, b"b0"),
            (4, b"b1"),
            (5, b"b2"),
            (6, b"after"),
        ]
        assert [r.key if r.HasField("key") else None for r in read] == [b"x", None, b"z", None]
        assert read[2].timestamp == 5 and headers_of(read[2]) == [("h", b"v")]
        for offset, expected in [(4, b"b1"), (5, b"b2")]:  # one record of a batch, alone
            single = await log.consume(offset=offset)
            assert (single.record.offset, single.record.value) == (offset, expected)
            assert not single.records

        # max_records: up to N records from the offset, in `records`
        some = await log.consume(offset=0, max_records=2)
        assert not some.HasField("record")
        assert [r.value for r in some.records] == [b"first", b"second"]
        assert (some.next_offset, some.high_watermark) == (2, 7)
        rest = await log.consume(offset=5, max_records=100)
        assert [(r.offset, r.value) for r in rest.records] == [(5, b"b2"), (6, b"after")]
        assert (rest.next_offset, rest.high_watermark) == (7, 7)
        # at the high watermark: no records (the end), not an error; beyond it: an error
        end = await log.consume(offset=7, max_records=100)
        assert (list(end.records), end.next_offset, end.high_watermark) == ([], 7, 7)
        beyond = await log.error_of("Consume", log_pb2.ConsumeRequest(offset=8, max_records=1))
        assert beyond.code() == grpc.StatusCode.OUT_OF_RANGE, beyond


async def test_other_topics_partitions_and_the_key_choice(broker_launcher, tmp_path):
    broker = await start_broker(broker_launcher, tmp_path)
    partitions = 4
    await create_topic(broker, "events", partitions)
    with LogClient(broker.grpc_port) as log:
        # an explicit partition
        answers = [
            await log.produce_value(b"p2-%d" % n, topic="events", partition=2) for n in range(2)
        ]
        assert [(a.partition, a.offset) for a in answers] == [(2, 0), (2, 1)]
        found = (await log.consume(topic="events", partition=2, offset=1)).record
        assert found.value == b"p2-1"
        await assert_unwritten(log, 0, topic="events", partition=3)  # nothing went elsewhere

        # no partition: the key's (the same hash as DWAL's client)
        keys = [b"user-%d" % n for n in range(12)]
        expected = {key: partition_for_key(key, partitions) for key in keys}
        assert len(set(expected.values())) >= 3, expected  # the sample spreads
        placed: dict[bytes, tuple[int, int]] = {}
        for key in keys:
            answer = await log.produce_value(b"v-" + key, topic="events", key=key)
            assert answer.partition == expected[key], (key, answer)
            placed[key] = (answer.partition, answer.offset)
        for key, (partition, offset) in placed.items():
            got = (await log.consume(topic="events", partition=partition, offset=offset)).record
            assert (got.key, got.value) == (key, b"v-" + key)
        # `records`: the first record's key picks the partition of the whole batch
        other = next(key for key in keys if expected[key] != expected[keys[0]])
        batch = log_pb2.ProduceRequest(
            topic="events", records=[record(b"r0", key=keys[0]), record(b"r1", key=other)]
        )
        answer = await log.produce(batch)
        assert answer.partition == expected[keys[0]]
        both = await log.consume_records(
            answer.offset, 2, topic="events", partition=answer.partition
        )
        assert [r.value for r in both] == [b"r0", b"r1"]

        # neither key nor partition: round-robin over the partitions
        keyless = [await log.produce_value(b"rr", topic="events") for _ in range(partitions)]
        assert sorted(a.partition for a in keyless) == list(range(partitions)), keyless

        # a ConsumeStream of another topic's partition reads it, then follows it
        mark = await log.produce_value(b"p2-mark", topic="events", partition=2)
        there = await log.consume_records(0, mark.offset + 1, topic="events", partition=2)
        assert [r.value for r in there[:2]] == [b"p2-0", b"p2-1"]
        stream = log.consume_stream(topic="events", partition=2, offset=0)
        assert await stream.records(len(there)) == there
        later = await log.produce_value(b"p2-later", topic="events", partition=2)
        (followed,) = await stream.records(1)
        assert (followed.offset, followed.value) == (later.offset, b"p2-later")


# -- streams -------------------------------------------------------------------------------


async def test_produce_stream_answers_in_order_and_group_commit_loses_nothing(
    broker_launcher, tmp_path
):
    broker = await start_broker(broker_launcher, tmp_path)
    await create_topic(broker, "mixed", 3)
    with LogClient(broker.grpc_port) as log:
        # Requests bound for different places, some of several records: each answered in
        # order with the offset of its first record, every record stored where it was said.
        # (The first request creates the wal log: meanwhile the others queue up, and runs of
        # them bound for the same place are appended as one batch.)
        requests = [produce_request(b"creates wal")]
        for n in range(400):
            kind = n % 6
            if kind in (1, 5):  # several records: 1 amid requests for partition 0, 5 for 1
                request = log_pb2.ProduceRequest(
                    topic="mixed",
                    partition=kind // 5,
                    records=[record(b"m%03d.%d" % (n, i)) for i in range(3)],
                )
            elif kind == 3:  # the key picks the partition
                request = produce_request(b"m%03d" % n, topic="mixed", key=b"key-%d" % (n % 7))
            else:  # 0, 2: partition 0; 4: partition 1
                request = produce_request(b"m%03d" % n, topic="mixed", partition=kind // 4)
            requests.append(request)
        answers, error = await log.produce_stream(requests)
        assert error is None, error
        assert len(answers) == len(requests)
        assert (answers[0].partition, answers[0].offset) == (0, 0)
        expected: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
        for request, answer in zip(requests[1:], answers[1:]):
            values = (
                [r.value for r in request.records] if request.records else [request.record.value]
            )
            if request.HasField("partition"):
                assert answer.partition == request.partition, (request, answer)
            else:
                assert answer.partition == partition_for_key(request.record.key, 3)
            # this stream is the only writer: each answer follows the previous one's records
            assert answer.offset == len(expected[answer.partition]), (request, answer)
            expected[answer.partition].extend(values)
        for partition, values in expected.items():
            stored = await log.consume_records(0, len(values), topic="mixed", partition=partition)
            assert [r.value for r in stored] == values, partition
            await assert_unwritten(log, len(values), topic="mixed", partition=partition)

        # the wal log, one partition: the answers are exactly 1, 2, 3, ...
        count = 600
        answers, error = await log.produce_stream(
            produce_request(b"w%04d" % n) for n in range(1, count + 1)
        )
        assert error is None, error
        assert [(a.partition, a.offset) for a in answers] == [(0, n) for n in range(1, count + 1)]
        stored = await log.consume_records(1, count)
        assert [r.value for r in stored] == [b"w%04d" % n for n in range(1, count + 1)]


async def test_consume_stream_reads_then_follows(broker_launcher, tmp_path):
    broker = await start_broker(broker_launcher, tmp_path)
    with LogClient(broker.grpc_port) as log:
        for n in range(3):
            await log.produce_value(b"v%d" % n)
        # from an offset: what is there, then each new record as it is written
        stream = log.consume_stream(offset=1)
        assert [(r.offset, r.value) for r in await stream.records(2)] == [(1, b"v1"), (2, b"v2")]
        await log.produce_value(b"v3")
        assert [(r.offset, r.value) for r in await stream.records(1)] == [(3, b"v3")]
        await log.produce(log_pb2.ProduceRequest(records=[record(b"v%d" % n) for n in (4, 5, 6)]))
        assert [(r.offset, r.value) for r in await stream.records(3)] == [
            (4, b"v4"),
            (5, b"v5"),
            (6, b"v6"),
        ]

        # max_records: responses of up to N records, in `records`
        chunked = log.consume_stream(offset=0, max_records=2)
        responses = []
        while sum(len(r.records) for r in responses) < 7:
            response = await chunked.next()
            assert response is not None
            responses.append(response)
        assert all(not r.HasField("record") and 1 <= len(r.records) <= 2 for r in responses)
        assert any(len(r.records) == 2 for r in responses), responses
        assert [r.offset for r in messages_records(responses)] == list(range(7))
        await log.produce(
            log_pb2.ProduceRequest(records=[record(b"v%d" % n) for n in range(7, 12)])
        )
        responses = []
        while sum(len(r.records) for r in responses) < 5:
            response = await chunked.next()
            assert response is not None
            responses.append(response)
        assert all(1 <= len(r.records) <= 2 for r in responses), responses
        assert [(r.offset, r.value) for r in messages_records(responses)] == [
            (n, b"v%d" % n) for n in range(7, 12)
        ]

        # from beyond the end: it waits until that offset is written, and starts there
        ahead = log.consume_stream(offset=15)
        await log.produce(
            log_pb2.ProduceRequest(records=[record(b"v%d" % n) for n in (12, 13, 14)])
        )
        for n in (15, 16):
            await log.produce_value(b"v%d" % n)
        assert [(r.offset, r.value) for r in await ahead.records(2)] == [(15, b"v15"), (16, b"v16")]
        # the first stream saw all of them, in order
        assert [r.offset for r in await stream.records(10)] == list(range(7, 17))


# -- cancellation and deadlines ------------------------------------------------------------


async def test_cancelled_and_expired_calls_end_on_the_broker(broker_launcher, tmp_path):
    """With grpc_concurrent_rpcs_max = 4, calls that the broker did not end when their
    client cancelled (or their deadline passed) would soon have it refuse every call."""
    broker = await start_broker(broker_launcher, tmp_path, limits=True)
    with LogClient(broker.grpc_port) as log:
        await log.produce_value(b"v0")
        # streams cancelled while they wait for new records (they read the only one)
        for _ in range(12):
            stream = log.consume_stream(offset=0)
            assert [r.value for r in await stream.records(1)] == [b"v0"]
            stream.cancel()
            error = await stream.error()
            assert error.code() == grpc.StatusCode.CANCELLED, error
        await still_serves(log)  # offset 1

        # a deadline ends a ConsumeStream that waits for records
        for _ in range(5):
            stream = log.consume_stream(offset=2, timeout_s=0.2)
            error = await stream.error()
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error

        # a ProduceStream whose client stops sending, then cancels or runs out of time: the
        # requests it answered are stored, no later one is
        answered: list[bytes] = []
        for attempt in range(7):
            release = threading.Event()
            values = [b"a%d-0" % attempt, b"a%d-1" % attempt, b"a%d-late" % attempt]

            def requests(values=values, release=release) -> Iterator[log_pb2.ProduceRequest]:
                yield produce_request(values[0])
                yield produce_request(values[1])
                release.wait(30)  # until the call has ended
                yield produce_request(values[2])

            try:
                if attempt < 5:
                    answers, error = await in_thread(
                        functools.partial(answer_then_cancel, log, requests(), 2)
                    )
                    expected = grpc.StatusCode.CANCELLED
                else:
                    answers, error = await log.produce_stream(requests(), timeout_s=0.5)
                    expected = grpc.StatusCode.DEADLINE_EXCEEDED
            finally:
                release.set()
            assert error is not None and error.code() == expected, error
            offsets = [a.offset for a in answers]
            assert offsets == list(range(2 + len(answered), 2 + len(answered) + len(offsets)))
            answered += values[: len(answers)]
        stored = await log.consume_records(2, len(answered))
        assert [r.value for r in stored] == answered
        await assert_unwritten(log, 2 + len(answered))  # no late request was stored

        # the limit is real: four open streams take every slot
        held = [log.consume_stream(offset=0) for _ in range(4)]
        for stream in held:
            await stream.records(1)
        refused = await log.error_of("Produce", produce_request(b"refused"))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused


# -- bad input and errors ------------------------------------------------------------------


async def test_errors_have_their_status_codes_and_the_broker_keeps_serving(
    broker_launcher, tmp_path
):
    broker = await start_broker(broker_launcher, tmp_path, limits=True)
    await create_topic(broker, "events", 2)
    codes = grpc.StatusCode

    async def expect(code: grpc.StatusCode, method: str, request, *, topic: str = "wal"):
        error = await log.error_of(method, request)
        assert error.code() == code, (method, request, error.code(), error.details())
        await still_serves(log, topic)
        return error

    with LogClient(broker.grpc_port) as log:
        # an unwritten offset: OUT_OF_RANGE, as with the original service (even for an
        # empty log)
        await expect(
            codes.OUT_OF_RANGE, "Consume", log_pb2.ConsumeRequest(offset=0), topic="events"
        )
        await log.produce_value(b"v")  # offset 1, after still_serves' 0
        for offset in (2, 3, 1000):
            await expect(codes.OUT_OF_RANGE, "Consume", log_pb2.ConsumeRequest(offset=offset))
        await expect(codes.OUT_OF_RANGE, "Consume", log_pb2.ConsumeRequest(offset=7, max_records=5))
        await expect(
            codes.OUT_OF_RANGE, "Consume", log_pb2.ConsumeRequest(topic="events", partition=1)
        )

        # an unknown topic or partition: NOT_FOUND
        await expect(codes.NOT_FOUND, "Produce", produce_request(b"x", topic="nope"))
        await expect(codes.NOT_FOUND, "Consume", log_pb2.ConsumeRequest(topic="nope"))
        await expect(codes.NOT_FOUND, "Produce", produce_request(b"x", partition=1))
        await expect(codes.NOT_FOUND, "Produce", produce_request(b"x", topic="events", partition=2))
        await expect(
            codes.NOT_FOUND, "Consume", log_pb2.ConsumeRequest(topic="events", partition=2)
        )
        error = await log.consume_stream(topic="nope").error()
        assert error.code() == codes.NOT_FOUND, error

        # bad requests: INVALID_ARGUMENT
        for name in ("bad name", "a/b", "..", "x" * 300):
            await expect(codes.INVALID_ARGUMENT, "Produce", produce_request(b"x", topic=name))
            await expect(codes.INVALID_ARGUMENT, "Consume", log_pb2.ConsumeRequest(topic=name))
            error = await log.consume_stream(topic=name).error()
            assert error.code() == codes.INVALID_ARGUMENT, error
        both = log_pb2.ProduceRequest(record=record(b"a"), records=[record(b"b")])
        await expect(codes.INVALID_ARGUMENT, "Produce", both)
        await expect(codes.INVALID_ARGUMENT, "Produce", log_pb2.ProduceRequest())
        await expect(codes.INVALID_ARGUMENT, "Produce", log_pb2.ProduceRequest(topic="events"))
        await expect(codes.INVALID_ARGUMENT, "Produce", produce_request(b"x", timestamp=-1))
        negative = log_pb2.ProduceRequest(records=[record(b"a"), record(b"b", timestamp=-5)])
        await expect(codes.INVALID_ARGUMENT, "Produce", negative)

        # a message larger than grpc_message_bytes_max (64 KiB here): RESOURCE_EXHAUSTED
        await expect(codes.RESOURCE_EXHAUSTED, "Produce", produce_request(b"x" * 100_000))

        # none of the refused requests stored anything
        stored = await log.consume(max_records=1000)
        assert {r.value for r in stored.records} == {b"v", b"still serving"}, stored


async def test_a_produce_stream_ends_at_its_first_bad_request(broker_launcher, tmp_path):
    broker = await start_broker(broker_launcher, tmp_path)
    await create_topic(broker, "small", 1, **{"max.message.bytes": "2000"})
    codes = grpc.StatusCode
    with LogClient(broker.grpc_port) as log:
        # Requests grouped into a batch too large for the topic's max.message.bytes are
        # appended one by one, each answered; one too large even alone ends the stream: every
        # request before it was answered, none after it stored. (The first request creates
        # the wal log: meanwhile the others queue up and are grouped, the too large one with
        # those before it.)
        small = [produce_request(b"s%02d" % n + b"." * 100, topic="small") for n in range(30)]
        too_large = produce_request(b"L" * 3000, topic="small")
        answers, error = await log.produce_stream(
            [produce_request(b"creates wal"), *small, too_large, *small[:3]]
        )
        assert error is not None and error.code() == codes.INVALID_ARGUMENT, error
        assert "request 31 of the stream" in error.details(), error.details()
        assert [(a.partition, a.offset) for a in answers] == [(0, 0)] + [(0, n) for n in range(30)]
        stored = await log.consume_records(0, 30, topic="small")
        assert [r.value for r in stored] == [r.record.value for r in small]
        await assert_unwritten(log, 30, topic="small")
        # requests each fine alone, too large together: all stored, answered in order
        answers, error = await log.produce_stream(
            produce_request(b"m%02d" % n + b"." * 700, topic="small") for n in range(12)
        )
        assert error is None, error
        assert [a.offset for a in answers] == list(range(30, 42))
        stored = await log.consume_records(30, 12, topic="small")
        assert [r.value[:3] for r in stored] == [b"m%02d" % n for n in range(12)]

        # a bad third request, found bad by the gateway or by the broker
        bad_thirds = [
            (codes.INVALID_ARGUMENT, produce_request(b"bad", timestamp=-1)),
            (codes.INVALID_ARGUMENT, log_pb2.ProduceRequest()),  # no record
            (codes.INVALID_ARGUMENT, produce_request(b"bad", topic="bad name")),
            (codes.NOT_FOUND, produce_request(b"bad", partition=5)),
        ]
        end = 1  # the wal log's next offset
        for code, bad in bad_thirds:
            requests = [
                produce_request(b"ok-%d" % end),
                produce_request(b"ok-%d" % (end + 1)),
                bad,
                produce_request(b"after"),
                produce_request(b"after"),
            ]
            answers, error = await log.produce_stream(requests)
            assert error is not None and error.code() == code, (bad, error)
            assert "request 2 of the stream" in error.details(), error.details()
            assert [a.offset for a in answers] == [end, end + 1], (bad, answers)
            stored = await log.consume_records(end, 2)
            assert [r.value for r in stored] == [b"ok-%d" % end, b"ok-%d" % (end + 1)]
            end += 2
            await assert_unwritten(log, end)
        await still_serves(log)


# -- health and reflection -----------------------------------------------------------------


async def test_health_and_reflection(broker_launcher, tmp_path):
    broker = await start_broker(broker_launcher, tmp_path)

    def ask() -> tuple[dict[str, int], list[str], list[str]]:
        with grpc.insecure_channel(f"127.0.0.1:{broker.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            statuses = {
                service: health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=10
                ).status
                for service in ("", LOG_SERVICE)
            }
            database = ProtoReflectionDescriptorDatabase(channel)
            services = list(database.get_services())
            pool = descriptor_pool.DescriptorPool(database)
            service = pool.FindServiceByName(LOG_SERVICE)
            methods = [method.name for method in service.methods]
            file = database.FindFileContainingSymbol(LOG_SERVICE)
            assert file.package == "log.v1", file
            (log_service,) = [s for s in file.service if s.name == "Log"]
            assert "Produce" in [method.name for method in log_service.method], log_service
            return statuses, services, methods

    statuses, services, methods = await in_thread(ask)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert statuses == {"": serving, LOG_SERVICE: serving}, statuses
    assert LOG_SERVICE in services and HEALTH_SERVICE in services, services
    assert methods == ["Produce", "Consume", "ProduceStream", "ConsumeStream"]


# -- a restart -----------------------------------------------------------------------------


async def test_a_stream_ends_when_the_broker_stops_and_resumes_after_a_restart(
    broker_launcher, tmp_path
):
    broker = await start_broker(broker_launcher, tmp_path)
    with LogClient(broker.grpc_port) as log:
        answers, error = await log.produce_stream(produce_request(b"r%03d" % n) for n in range(50))
        assert error is None and [a.offset for a in answers] == list(range(50)), error
        stream = log.consume_stream(offset=0)
        assert [r.value for r in await stream.records(50)] == [b"r%03d" % n for n in range(50)]
        for n in range(50, 60):
            assert (await log.produce_value(b"r%03d" % n)).offset == n
        assert [r.offset for r in await stream.records(10)] == list(range(50, 60))

        # a ProduceStream left open between requests
        pending: queue.Queue[log_pb2.ProduceRequest | None] = queue.Queue()

        def requests() -> Iterator[log_pb2.ProduceRequest]:
            while (request := pending.get()) is not None:
                yield request

        producer = log.stub.ProduceStream(requests())
        pending.put(produce_request(b"r060"))
        assert (await in_thread(lambda: next(producer))).offset == 60
        assert [r.offset for r in await stream.records(1)] == [60]

        # SIGTERM while the streams wait (for records; for requests): both end with
        # UNAVAILABLE at once, the consumer's saying where to resume
        ended: list[grpc.RpcError] = []

        async def wait_end() -> None:
            ended.append(await stream.error(timeout_s=5))

        def producer_end() -> grpc.RpcError:
            try:
                raise AssertionError(f"the producer's stream went on: {next(producer)}")
            except grpc.RpcError as error:
                return error

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_end)
            assert await broker_launcher.stop(broker) == 0
            producer_error = await in_thread(producer_end, 5)
        pending.put(None)
        consumer_error = ended[0]
        assert consumer_error.code() == grpc.StatusCode.UNAVAILABLE, consumer_error
        assert "resume from offset 61" in consumer_error.details(), consumer_error.details()
        assert producer_error.code() == grpc.StatusCode.UNAVAILABLE, producer_error
        assert producer_error.details().startswith("the broker is stopping"), producer_error
    output = broker.output.decode(errors="replace")
    assert "Traceback" not in output and "never retrieved" not in output, output

    broker = await broker_launcher.start(broker.data_dir, *FAST, grpc_port=0)
    with LogClient(broker.grpc_port) as log:
        stored = await log.consume_records(0, 61)
        assert [r.value for r in stored] == [b"r%03d" % n for n in range(61)]
        stream = log.consume_stream(offset=61)
        for n in range(61, 66):
            assert (await log.produce_value(b"r%03d" % n)).offset == n
        resumed = await stream.records(5)
        assert [(r.offset, r.value) for r in resumed] == [(n, b"r%03d" % n) for n in range(61, 66)]


# -- a cluster -----------------------------------------------------------------------------

CLUSTER_TESTS = pathlib.Path(__file__).resolve().parents[1] / "cluster"


@pytest.fixture
async def grpc_cluster(nursery, tmp_path):
    """Nodes 1, 2 and 3 of a cluster (tests/cluster/cluster_launcher.py), each serving
    gRPC, started and serving."""
    if str(CLUSTER_TESTS) not in sys.path:
        sys.path.insert(0, str(CLUSTER_TESTS))
    from cluster_launcher import CLUSTER_CONFIG, ClusterLauncher

    config_path = tmp_path / "cluster.toml"
    config_path.write_text(CLUSTER_CONFIG)
    launcher = ClusterLauncher(nursery, tmp_path, config_path)
    try:
        for node_id in (1, 2, 3):
            launcher.add_node(node_id, grpc=True)
        await launcher.start()
        yield launcher
    finally:
        launcher.kill_all()


async def test_every_cluster_node_serves_every_partition(grpc_cluster):
    from cluster_client import create_topic as create_cluster_topic, leaders_known
    from cluster_launcher import wait_for

    nodes = grpc_cluster.nodes
    await create_cluster_topic(nodes[1].bootstrap, "events", 3)

    async def leaders_everywhere() -> dict[int, int] | None:
        """The partitions' leaders once every node knows the same ones."""
        seen = [await leaders_known(node.bootstrap, "events") for node in nodes.values()]
        return seen[0] if seen[0] is not None and seen.count(seen[0]) == len(seen) else None

    leaders, _ = await wait_for(leaders_everywhere, timeout_s=15, what="leaders of events")
    partition, leader = next((p, node) for p, node in sorted(leaders.items()))
    others = [node_id for node_id in nodes if node_id != leader]
    with contextlib.ExitStack() as stack:
        logs = {n: stack.enter_context(LogClient(node.grpc_port)) for n, node in nodes.items()}
        # a ConsumeStream on a node that does not lead the partition, started before anything
        # is written there, follows it
        follower = logs[others[0]].consume_stream(topic="events", partition=partition)
        written = []
        for node_id in (*others, leader):  # Produce through every node
            value = b"via-%d" % node_id
            answer = await logs[node_id].produce_value(value, topic="events", partition=partition)
            assert (answer.partition, answer.offset) == (partition, len(written)), node_id
            written.append(value)
        for node_id in nodes:  # Consume through every node
            stored = await logs[node_id].consume_records(
                0, len(written), topic="events", partition=partition
            )
            assert [r.value for r in stored] == written, node_id
            single = await logs[node_id].consume(topic="events", partition=partition, offset=1)
            assert single.record.value == written[1]
        assert [r.value for r in await follower.records(len(written))] == written

        # a stream on the other non-leader, from beyond the end, and the key choice
        ahead = logs[others[1]].consume_stream(topic="events", partition=partition, offset=4)
        key = next(b"k%d" % n for n in range(100) if partition_for_key(b"k%d" % n, 3) == partition)
        for n in range(3, 6):
            answer = await logs[others[n % 2]].produce_value(b"n%d" % n, topic="events", key=key)
            assert (answer.partition, answer.offset) == (partition, n)
        assert [(r.offset, r.value) for r in await ahead.records(2)] == [(4, b"n4"), (5, b"n5")]
        assert [r.value for r in await follower.records(3)] == [b"n3", b"n4", b"n5"]
