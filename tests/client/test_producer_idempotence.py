"""The idempotent producer (on by default with acks=all): one producer id, per-partition
sequences, one batch per partition in a request, retries the broker can recognise (the
same bytes), order kept across retries, and the epoch bump after a batch with a sequence
failed for good. Against scripted fake brokers (fake_broker.FakeBroker) or their toy storage
(fake_broker.PartitionLogs), which checks sequences as a broker does, time a MockClock; and
once against a real broker process."""

from __future__ import annotations

import re
from typing import Any

import pytest
import trio
import trio.testing
from fake_broker import FakeBroker, FakeCluster, FakeTopic, PartitionLogs, produce_answer

import client
from client import Admin
from client.connection import BrokerConnection
from client.producer import (
    PRODUCER_EPOCH_MAX,
    SEQUENCE_WRAP,
    DeliveryOutcomeUnknown,
    Producer,
)
from protocol import ApiKey, BatchHeader, DwalError, ErrorCode, Request, scan_batches
from protocol.record_batch import with_producer_state


async def start_logs(
    nursery: trio.Nursery, partitions: int = 2
) -> tuple[FakeCluster, PartitionLogs]:
    fake = await FakeCluster.start(nursery, 1, {"t": FakeTopic(partitions=partitions)})
    return fake, await PartitionLogs(fake).start(nursery)


async def start_fake(nursery: trio.Nursery, partitions: int = 2, **options: Any) -> FakeBroker:
    fake = FakeBroker({"t": FakeTopic(partitions=partitions)}, **options)
    await nursery.start(fake.serve)
    return fake


def chunks_of(request: Request) -> list[tuple[int, bytes]]:
    """(partition, its data) of every partition of a Produce request, in request order."""
    out = []
    start = 0
    for entry in request.body["topics"]:
        for part in entry["partitions"]:
            out.append((part["partition"], bytes(request.tail[start : start + part["size"]])))
            start += part["size"]
    return out


def headers_of(request: Request) -> list[tuple[int, BatchHeader]]:
    """(partition, header) of every batch of a Produce request, in request order."""
    return [
        (partition, batch.header)
        for partition, chunk in chunks_of(request)
        for batch in scan_batches(chunk)
    ]


def stamps_of(requests: list[Request]) -> list[tuple[int, int, int, int, int]]:
    """(partition, producer id, epoch, base sequence, record count) of every batch sent."""
    return [
        (p, h.producer_id, h.producer_epoch, h.base_sequence, h.record_count)
        for request in requests
        for p, h in headers_of(request)
    ]


def answer_by_partition(request: Request, codes: dict[int, ErrorCode]) -> dict:
    """A Produce answer giving each partition its code in `codes` (success: offset 0)."""
    answer = produce_answer(request, 0)
    for entry in answer["topics"]:
        for part in entry["partitions"]:
            code = codes.get(part["partition"], ErrorCode.NONE)
            part["error_code"] = int(code)
            if code:
                part["base_offset"] = -1
    return answer


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "idempotent"),
    [
        ({"acks": "all"}, True),
        ({"acks": -1, "max_in_flight_per_partition": 5}, True),
        ({"acks": 1}, False),
        ({"acks": 0}, False),
        ({}, False),  # the default acks is 1
        # options that rule it out turn the default off, as in Kafka
        ({"acks": "all", "retries": 0}, False),
        ({"acks": "all", "max_in_flight_per_partition": 6}, False),
        ({"acks": "all", "enable_idempotence": False}, False),
    ],
)
def test_idempotence_is_on_by_default_with_acks_all(options, idempotent):
    producer = Producer(None, **options)  # type: ignore[arg-type]  # the cluster is not used yet
    assert producer.idempotent is idempotent


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"acks": 1}, "enable_idempotence=True needs acks='all' (not 1)"),
        ({"acks": 0}, "enable_idempotence=True needs acks='all' (not 0)"),
        ({"acks": "all", "retries": 0}, "enable_idempotence=True needs retries > 0"),
        (
            {"acks": "all", "max_in_flight_per_partition": 6},
            "enable_idempotence=True needs max_in_flight_per_partition <= 5 (not 6)",
        ),
    ],
)
def test_explicit_idempotence_with_a_conflicting_option_raises(options, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        Producer(None, enable_idempotence=True, **options)  # type: ignore[arg-type]


# -- producer id, stamps and sequences ----------------------------------------------------


async def test_one_producer_id_stamps_every_batch_with_sequences_per_partition(
    nursery, autojump_clock
):
    fake, logs = await start_logs(nursery)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, acks="all", linger_ms=60_000) as producer:
            for count in (3, 2, 1):  # batches of 3, 2 and 1 records in each partition
                for number in range(count):
                    for partition in (0, 1):
                        await producer.send("t", b"%d-%d" % (count, number), partition=partition)
                await producer.flush()
        statistics = producer.statistics()
    assert fake.view.producer_ids == [1000]  # asked for once
    assert (statistics.idempotent, statistics.producer_id, statistics.producer_epoch) == (
        True,
        1000,
        0,
    )
    assert statistics.producer_ids_obtained == 1
    for partition in (0, 1):
        sent = [s for s in stamps_of(logs.produce_requests) if s[0] == partition]
        assert sent == [
            (partition, 1000, 0, 0, 3),
            (partition, 1000, 0, 3, 2),
            (partition, 1000, 0, 5, 1),
        ]
    assert logs.duplicates == []


async def test_one_batch_per_partition_per_request_and_five_requests_in_flight(
    nursery, autojump_clock
):
    fake = await start_fake(nursery)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, acks="all", linger_ms=60_000, batch_size=1) as producer:
            deliveries = [
                await producer.send("t", b"%d" % number, partition=partition)
                for number in range(8)
                for partition in (0, 1)
            ]  # 16 batches of one record (batch_size=1 seals each at once)
            flushed = trio.Event()

            async def flush() -> None:
                await producer.flush()
                flushed.set()

            nursery.start_soon(flush)
            with trio.fail_after(5):
                first = [await fake.next_request(ApiKey.METADATA) for _ in range(5)]
            await trio.testing.wait_all_tasks_blocked()
            assert producer.statistics().inflight_requests == 5
            assert fake.requests.statistics().current_buffer_used == 0  # no sixth request
            for received in first:
                await received.answer(produce_answer(received.request, 0))
            rest = [await fake.next_request(ApiKey.METADATA) for _ in range(3)]
            for received in rest:
                await received.answer(produce_answer(received.request, 0))
            await flushed.wait()
    assert all(d.error is None for d in deliveries)
    requests = [received.request for received in first + rest]
    for request in requests:  # each request: partitions 0 and 1, one batch each
        assert [partition for partition, _ in headers_of(request)] == [0, 1]
    for partition in (0, 1):
        sequences = [s[3] for s in stamps_of(requests) if s[0] == partition]
        assert sequences == list(range(8))


async def test_sequences_wrap_from_the_largest_int32_to_0(nursery, autojump_clock):
    fake = await start_fake(nursery, partitions=1)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, acks="all", linger_ms=60_000) as producer:
            await producer.send("t", b"first")
            producer._queues[("t", 0)].next_sequence = SEQUENCE_WRAP - 2  # white box: skip ahead
            answered: list[Request] = []

            async def answer_all() -> None:
                while True:
                    received = await fake.next_request(ApiKey.METADATA)
                    answered.append(received.request)
                    await received.answer(produce_answer(received.request, 0))

            nursery.start_soon(answer_all)
            await producer.flush()
            for number in range(3):
                await producer.send("t", b"%d" % number)
            await producer.flush()
            await producer.send("t", b"after")
    assert [s[3:] for s in stamps_of(answered)] == [
        (SEQUENCE_WRAP - 2, 1),
        (SEQUENCE_WRAP - 1, 3),  # holds SEQUENCE_WRAP - 1, 0 and 1
        (2, 1),
    ]


async def test_the_producer_id_is_asked_for_before_the_first_batch_and_retried(
    nursery, autojump_clock
):
    fake = await start_fake(nursery, partitions=1, answer_init_producer_id=False)
    with trio.fail_after(30):  # virtual seconds: a missing request fails the test
        async with client.connect(fake.bootstrap) as cluster:
            async with Producer(cluster, acks="all", linger_ms=0) as producer:
                delivery = await producer.send("t", b"v")
                refused = await fake.next_request(ApiKey.METADATA)
                assert refused.api_key == ApiKey.INIT_PRODUCER_ID
                await refused.answer({}, ErrorCode.NOT_CONTROLLER, "not yet")  # retriable
                cut = await fake.next_request(ApiKey.METADATA)
                assert cut.api_key == ApiKey.INIT_PRODUCER_ID
                await cut.connection.close()
                answered = await fake.next_request(ApiKey.METADATA)
                assert answered.api_key == ApiKey.INIT_PRODUCER_ID
                await answered.answer({"producer_id": 77, "producer_epoch": 0})
                produce = await fake.next_request(ApiKey.METADATA)
                assert produce.api_key == ApiKey.PRODUCE
                assert stamps_of([produce.request]) == [(0, 77, 0, 0, 1)]
                await produce.answer(produce_answer(produce.request, 5))
            assert (await delivery.wait()).offset == 5
            assert producer.statistics().producer_ids_obtained == 1


async def test_batches_fail_when_no_producer_id_comes_within_the_delivery_timeout(
    nursery, autojump_clock
):
    fake = await start_fake(nursery, answer_init_producer_id=False)
    produce_requests = 0

    async def refuse_producer_ids() -> None:
        nonlocal produce_requests
        while True:
            received = await fake.next_request(ApiKey.METADATA)
            if received.api_key == ApiKey.PRODUCE:
                produce_requests += 1
            await received.answer({}, ErrorCode.COORDINATOR_NOT_AVAILABLE)

    nursery.start_soon(refuse_producer_ids)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, acks="all", linger_ms=0, delivery_timeout_ms=2000) as producer:
            started = trio.current_time()
            delivery = await producer.send("t", b"v")
            with pytest.raises(DwalError) as raised, trio.fail_after(10):
                await delivery.wait()
    assert trio.current_time() - started == pytest.approx(2.0)
    assert raised.value.code == ErrorCode.COORDINATOR_NOT_AVAILABLE
    assert "no producer id could be obtained within delivery_timeout_ms" in raised.value.message
    assert produce_requests == 0


@pytest.mark.parametrize("explicit", [False, True])
async def test_a_broker_without_producer_ids(nursery, autojump_clock, explicit):
    """A broker that does not know InitProducerId: a producer that was not asked for
    idempotence explicitly goes on without it; one that was fails its batches."""
    fake = await start_fake(nursery, partitions=1, answer_init_producer_id=False)
    produced: list[Request] = []

    async def answer() -> None:
        while True:
            received = await fake.next_request(ApiKey.METADATA)
            if received.api_key == ApiKey.INIT_PRODUCER_ID:
                await received.answer({}, ErrorCode.UNKNOWN_API_KEY, "unknown api key 22")
            else:
                produced.append(received.request)
                await received.answer(produce_answer(received.request, 3))

    nursery.start_soon(answer)
    options = {"enable_idempotence": True} if explicit else {}
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, acks="all", linger_ms=0, **options) as producer:
            delivery = await producer.send("t", b"v")
            await trio.testing.wait_all_tasks_blocked()
    if explicit:
        assert isinstance(delivery.error, DwalError)
        assert delivery.error.code == ErrorCode.UNKNOWN_API_KEY
        assert produced == []
    else:
        assert (await delivery.wait()).offset == 3
        assert stamps_of(produced) == [(0, -1, -1, -1, 1)]
        assert not producer.statistics().idempotent


async def test_without_idempotence_batches_carry_no_producer_id(nursery, autojump_clock):
    fake, logs = await start_logs(nursery, partitions=1)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, acks=1, linger_ms=60_000, batch_size=1) as producer:
            for number in range(3):
                await producer.send("t", b"%d" % number)
    assert fake.view.producer_ids == []
    assert stamps_of(logs.produce_requests) == [(0, -1, -1, -1, 1)] * 3
    assert len(logs.produce_requests) == 1  # several batches of a partition in one request


# -- retries --------------------------------------------------------------------------------


async def test_a_cut_connection_resends_the_same_bytes_and_the_batch_is_stored_once(
    nursery, autojump_clock
):
    fake, logs = await start_logs(nursery, partitions=1)
    logs.lost_answers = 1  # stored, then the connection breaks before the answer
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, acks="all", linger_ms=0) as producer:
            delivery = await producer.send("t", b"once")
            assert (await delivery.wait()).offset == 0
    first, resent = logs.produce_requests
    assert chunks_of(resent) == chunks_of(first)
    assert logs.records[("t", 0)] == [b"once"]
    assert logs.duplicates == [("t", 0, 0)]


@pytest.mark.parametrize("fault", ["answer_timed_out", "maybe_appended"])
async def test_an_unknown_outcome_is_resent_as_is(nursery, autojump_clock, fault):
    fake = await start_fake(nursery, partitions=1)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, acks="all", linger_ms=0, request_timeout_ms=1000) as producer:
            delivery = await producer.send("t", b"v")
            first = await fake.next_request(ApiKey.METADATA)
            if fault == "maybe_appended":
                lost = produce_answer(first.request, 0, ErrorCode.NOT_LEADER_OR_FOLLOWER)
                lost["topics"][0]["partitions"][0]["maybe_appended"] = True
                await first.answer(lost)
            resent = await fake.next_request(ApiKey.METADATA)  # after 6 s when timed out
            assert chunks_of(resent.request) == chunks_of(first.request)
            if fault == "answer_timed_out":  # a broker answers in order: the abandoned first
                await first.answer(produce_answer(first.request, 9))
            await resent.answer(produce_answer(resent.request, 9))  # a duplicate: same offset
    assert (await delivery.wait()).offset == 9


async def test_a_duplicate_sequence_answer_is_a_success(nursery, autojump_clock):
    fake = await start_fake(nursery, partitions=1)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, acks="all", linger_ms=0) as producer:
            delivery = await producer.send("t", b"v")
            received = await fake.next_request(ApiKey.METADATA)
            await received.answer(
                produce_answer(received.request, -1, ErrorCode.DUPLICATE_SEQUENCE_NUMBER)
            )
    assert (await delivery.wait()).offset == -1


async def test_out_of_order_behind_a_retried_batch_is_retried_after_it_in_order(
    nursery, autojump_clock
):
    """Batches a and b are in flight; a is refused (NOT_ENOUGH_REPLICAS), so b, whose
    sequence follows a's, is refused OUT_OF_ORDER_SEQUENCE_NUMBER. Both go back in line:
    a alone first (refused once more), b only once a is stored."""
    fake, logs = await start_logs(nursery, partitions=1)
    refused = ErrorCode.NOT_ENOUGH_REPLICAS
    logs.produce_errors[("t", 0)] = [refused, None, refused]  # a, b (checked), a again
    logs.gates[0] = trio.Event()
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, acks="all", linger_ms=0) as producer:
            a = await producer.send("t", b"a")
            await logs.held.wait()
            b = await producer.send("t", b"b")
            await trio.testing.wait_all_tasks_blocked()
            assert producer.statistics().inflight_requests == 2
            logs.gates[0].set()
            assert [(await a.wait()).offset, (await b.wait()).offset] == [0, 1]
    assert logs.records[("t", 0)] == [b"a", b"b"]
    sequences = [s[3] for s in stamps_of(logs.produce_requests)]
    assert sequences == [0, 1, 0, 0, 1]
    assert producer.statistics().epoch_bumps == 0


# -- sequence gaps: the epoch bump ---------------------------------------------------------


async def test_a_batch_failed_for_good_bumps_the_epoch_and_sequences_restart(
    nursery, autojump_clock
):
    """Batch 'doomed' is refused for good; 'later', in flight behind it, is refused
    OUT_OF_ORDER_SEQUENCE_NUMBER (its sequence follows the missing one): it gets sequence 0
    of the next epoch, as does the next batch of the other partition."""
    fake, logs = await start_logs(nursery)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, acks="all", linger_ms=0) as producer:
            for partition in (0, 1):
                await (await producer.send("t", b"before", partition=partition)).wait()
            logs.produce_errors[("t", 0)] = [ErrorCode.INVALID_RECORD]
            logs.gates[0] = trio.Event()
            doomed = await producer.send("t", b"doomed", partition=0)
            await logs.held.wait()
            later = await producer.send("t", b"later", partition=0)
            await trio.testing.wait_all_tasks_blocked()
            assert producer.statistics().inflight_requests == 2
            logs.gates[0].set()
            with pytest.raises(DwalError) as raised:
                await doomed.wait()
            assert raised.value.code == ErrorCode.INVALID_RECORD
            assert (await later.wait()).offset == 1
            assert (await (await producer.send("t", b"other", partition=1)).wait()).offset == 1
        statistics = producer.statistics()
    assert (statistics.epoch_bumps, statistics.producer_epoch) == (1, 1)
    assert logs.records[("t", 0)] == [b"before", b"later"]
    assert logs.records[("t", 1)] == [b"before", b"other"]
    assert stamps_of(logs.produce_requests)[2:] == [
        (0, 1000, 0, 1, 1),  # doomed
        (0, 1000, 0, 2, 1),  # later: out of order
        (0, 1000, 1, 0, 1),  # later again, in the new epoch
        (1, 1000, 1, 0, 1),  # other
    ]


async def test_a_batch_that_may_be_stored_is_not_resent_under_a_new_epoch(nursery, autojump_clock):
    """One request: partition 0's batch times out at the broker (it may be stored), partition
    1's is refused for good. The epoch bump comes before partition 0's retry: resent under
    the new epoch the broker could not recognise it, so it fails as outcome unknown."""
    fake = await start_fake(nursery)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, acks="all", linger_ms=0) as producer:
            unknown = await producer.send("t", b"unknown", partition=0)
            doomed = await producer.send("t", b"doomed", partition=1)
            received = await fake.next_request(ApiKey.METADATA)
            assert [p for p, _ in headers_of(received.request)] == [0, 1]
            codes = {0: ErrorCode.REQUEST_TIMED_OUT, 1: ErrorCode.INVALID_RECORD}
            await received.answer(answer_by_partition(received.request, codes))
            with pytest.raises(DeliveryOutcomeUnknown) as raised:
                await unknown.wait()
            assert raised.value.code == ErrorCode.REQUEST_TIMED_OUT
            assert "epoch changed" in raised.value.message
            assert isinstance(doomed.error, DwalError)
            assert doomed.error.code == ErrorCode.INVALID_RECORD
            after = await producer.send("t", b"after", partition=0)
            received = await fake.next_request(ApiKey.METADATA)
            assert stamps_of([received.request]) == [(0, 1000, 1, 0, 1)]  # 'unknown' not resent
            await received.answer(produce_answer(received.request, 4))
        assert (await after.wait()).offset == 4


async def test_unknown_producer_id_bumps_the_epoch_and_resends_the_batch(nursery, autojump_clock):
    fake, logs = await start_logs(nursery, partitions=1)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, acks="all", linger_ms=0) as producer:
            await (await producer.send("t", b"a")).wait()
            logs.produce_errors[("t", 0)] = [ErrorCode.UNKNOWN_PRODUCER_ID]  # state lost
            assert (await (await producer.send("t", b"b")).wait()).offset == 1
        assert producer.statistics().epoch_bumps == 1
    assert stamps_of(logs.produce_requests) == [
        (0, 1000, 0, 0, 1),
        (0, 1000, 0, 1, 1),
        (0, 1000, 1, 0, 1),
    ]
    assert logs.records[("t", 0)] == [b"a", b"b"]


@pytest.mark.parametrize("cause", ["invalid_producer_epoch", "epoch_exhausted"])
async def test_a_new_producer_id_when_the_epoch_cannot_go_on(nursery, autojump_clock, cause):
    """INVALID_PRODUCER_EPOCH (the broker saw a newer epoch of our id) fails the batch and
    the producer asks for a new id; so does a bump past the largest epoch."""
    fake, logs = await start_logs(nursery, partitions=1)
    broker = fake.brokers[0]
    if cause == "epoch_exhausted":
        broker.producer_epoch_given = PRODUCER_EPOCH_MAX
        failure = ErrorCode.INVALID_RECORD
    else:
        failure = ErrorCode.INVALID_PRODUCER_EPOCH
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, acks="all", linger_ms=0) as producer:
            await (await producer.send("t", b"a")).wait()
            broker.producer_epoch_given = 0
            logs.produce_errors[("t", 0)] = [failure]
            with pytest.raises(DwalError) as raised:
                await (await producer.send("t", b"doomed")).wait()
            assert raised.value.code == failure
            assert (await (await producer.send("t", b"b")).wait()).offset == 1
        statistics = producer.statistics()
    assert fake.view.producer_ids == [1000, 1001]
    assert (statistics.producer_ids_obtained, statistics.epoch_bumps) == (2, 0)
    epoch = PRODUCER_EPOCH_MAX if cause == "epoch_exhausted" else 0
    assert stamps_of(logs.produce_requests) == [
        (0, 1000, epoch, 0, 1),
        (0, 1000, epoch, 1, 1),
        (0, 1001, 0, 0, 1),
    ]


def test_restamping_a_batch_changes_only_its_producer_fields_and_crc():
    from protocol import build_batch, parse_header

    batch = build_batch([(1, b"k", b"v"), (2, None, b"w")])
    stamped = with_producer_state(batch, producer_id=5, producer_epoch=6, base_sequence=7)
    [scanned] = scan_batches(stamped)  # its CRC checks
    header, original = scanned.header, parse_header(batch)
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (5, 6, 7)
    assert header._replace(producer_id=-1, producer_epoch=-1, base_sequence=-1, crc=0) == (
        original._replace(crc=0)
    )
    assert stamped[61:] == batch[61:]


# -- against a real broker ------------------------------------------------------------------


@pytest.mark.parametrize("idempotent", [True, False])
async def test_a_real_broker_stores_a_resent_batch_once(
    broker_launcher, tmp_path, monkeypatch, idempotent
):
    """The broker's answer to the first Produce request is lost (the client drops it and
    breaks the connection when it arrives, so the batch was stored for sure): the producer
    resends the batch, and the broker recognises it and answers its original offset. The
    control, at-least-once (idempotence off, retry_unknown_outcome), stores it twice."""
    broker = await broker_launcher.start(tmp_path / "data")
    dropped: list[dict] = []
    deliver = BrokerConnection._deliver

    def drop_first_produce_answer(connection: BrokerConnection, response) -> None:
        waiters = connection._waiters
        if not dropped and waiters and waiters[0].api_key == ApiKey.PRODUCE:
            dropped.append(response.body)
            raise ConnectionError("the test drops this Produce answer")  # fails the connection
        deliver(connection, response)

    monkeypatch.setattr(BrokerConnection, "_deliver", drop_first_produce_answer)
    options = {} if idempotent else {"enable_idempotence": False, "retry_unknown_outcome": True}
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("once")
        async with Producer(cluster, acks="all", linger_ms=0, **options) as producer:
            metadata = await (await producer.send("once", b"v")).wait()
        described = await Admin(cluster).describe_topic("once")
    [[lost]] = [entry["partitions"] for entry in dropped[0]["topics"]]
    assert (lost["error_code"], lost["base_offset"]) == (0, 0)  # the first attempt was stored
    assert producer.statistics().idempotent is idempotent
    if idempotent:
        assert metadata.offset == 0  # the resend's answer: the original offset
        assert described.partitions[0].high_watermark == 1
    else:
        assert metadata.offset == 1
        assert described.partitions[0].high_watermark == 2
