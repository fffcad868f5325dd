"""The producer against a scripted broker: misuse, closing, retries that never duplicate,
and size limits. Time is a MockClock (linger, backoff and timeouts pass at once)."""

from __future__ import annotations

import random
import re

import msgpack
import pytest
import trio
import trio.testing
from fake_broker import FakeBroker, FakeTopic, produce_answer
from hypothesis import given
from hypothesis import strategies as st

import client
from client.producer import (
    PACKED_RECORD_OVERHEAD_BYTES_MAX,
    RECORD_OVERHEAD_BYTES,
    DeliveryOutcomeUnknown,
    Producer,
    ProducerClosed,
    _packed_record_bytes,
)
from protocol import ApiKey, DwalError, ErrorCode, scan_batches


class Boom(Exception):
    pass


async def start_fake(nursery: trio.Nursery, **topic_options) -> FakeBroker:
    fake = FakeBroker({"t": FakeTopic(**topic_options)})
    await nursery.start(fake.serve)
    return fake


async def answer_every_produce(fake: FakeBroker, answered: list, error_code: int = 0) -> None:
    """Answer each Produce from now on (successfully, or with `error_code`)."""
    while True:
        received = await fake.next_request(ApiKey.METADATA)
        answered.append(received)
        await received.answer(produce_answer(received.request, 100, error_code))


async def test_misuse_outside_async_with_raises_at_once(nursery):
    fake = await start_fake(nursery)
    async with client.connect(fake.bootstrap) as cluster:
        producer = Producer(cluster)
        with pytest.raises(RuntimeError, match="async with"):
            await producer.send("t", b"v")
        with pytest.raises(RuntimeError, match="async with"):
            producer.send_nowait("t", b"v")
        with pytest.raises(RuntimeError, match="async with"):
            await producer.flush()
        nursery.start_soon(answer_every_produce, fake, [])
        async with producer:
            await producer.send("t", b"v")
        for call in (producer.send("t", b"v"), producer.flush()):
            with pytest.raises(RuntimeError, match="closed"):
                await call
        with pytest.raises(RuntimeError, match="one `async with`"):
            async with producer:
                pass


@pytest.mark.parametrize("ending", ["raises", "cancelled"])
async def test_records_left_when_the_block_ends_early_fail(nursery, autojump_clock, ending):
    fake = await start_fake(nursery)
    async with client.connect(fake.bootstrap) as cluster:
        with trio.CancelScope() as scope:
            try:
                async with Producer(
                    cluster, linger_ms=0, max_in_flight_per_partition=1
                ) as producer:
                    in_flight = await producer.send("t", b"in flight", partition=0)
                    await fake.next_request(ApiKey.METADATA)  # written; never answered
                    buffered = await producer.send("t", b"buffered", partition=0)
                    if ending == "raises":
                        raise Boom
                    scope.cancel()
                    await trio.sleep_forever()
            except Boom:
                pass
        assert in_flight.done and buffered.done  # nobody waits forever
        with pytest.raises(DeliveryOutcomeUnknown, match="may or may not have been stored"):
            await in_flight.wait()
        with pytest.raises(ProducerClosed, match="closed before the record was sent"):
            await buffered.wait()


@pytest.mark.parametrize("retry_unknown_outcome", [False, True])
async def test_a_batch_whose_request_was_written_is_resent_only_on_request(
    nursery, autojump_clock, retry_unknown_outcome
):
    fake = await start_fake(nursery)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(
            cluster, linger_ms=0, retry_unknown_outcome=retry_unknown_outcome
        ) as producer:
            delivery = await producer.send("t", b"v")
            received = await fake.next_request(ApiKey.METADATA)
            resent: list = []
            nursery.start_soon(answer_every_produce, fake, resent)
            await received.connection.close()  # the broker may have stored it: unknown
        if retry_unknown_outcome:  # at-least-once: sent again
            assert (await delivery.wait()).offset == 100
            assert len(resent) == 1
        else:
            assert isinstance(delivery.error, DeliveryOutcomeUnknown)
            assert delivery.error.code == ErrorCode.NETWORK_EXCEPTION
            assert "may or may not have been stored" in delivery.error.message
            assert resent == []


async def test_errors_answered_before_the_append_are_retried(nursery, autojump_clock):
    fake = await start_fake(nursery)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, linger_ms=0) as producer:
            delivery = await producer.send("t", b"v")
            received = await fake.next_request(ApiKey.METADATA)
            refused = produce_answer(received.request, 0, ErrorCode.NOT_LEADER_OR_FOLLOWER)
            await received.answer(refused)
            answered: list = []
            nursery.start_soon(answer_every_produce, fake, answered)
        assert (await delivery.wait()).offset == 100
        assert len(answered) == 1


async def test_a_timeout_after_the_append_is_not_retried(nursery, autojump_clock):
    fake = await start_fake(nursery)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, linger_ms=0) as producer:
            delivery = await producer.send("t", b"v")
            received = await fake.next_request(ApiKey.METADATA)
            timed_out = produce_answer(received.request, 0, ErrorCode.REQUEST_TIMED_OUT)
            await received.answer(timed_out)
            answered: list = []
            nursery.start_soon(answer_every_produce, fake, answered)
        assert isinstance(delivery.error, DeliveryOutcomeUnknown)
        assert delivery.error.code == ErrorCode.REQUEST_TIMED_OUT
        assert answered == []


async def test_not_leader_after_the_append_is_not_retried(nursery, autojump_clock):
    """A leader that lost its leadership while waiting for its followers answers
    NOT_LEADER_OR_FOLLOWER with maybe_appended: the batch may be kept by the new leader, so
    resending it could store it twice (a rolling restart stored 13 records twice so)."""
    fake = await start_fake(nursery)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, linger_ms=0) as producer:
            delivery = await producer.send("t", b"v")
            received = await fake.next_request(ApiKey.METADATA)
            lost = produce_answer(received.request, 0, ErrorCode.NOT_LEADER_OR_FOLLOWER)
            lost["topics"][0]["partitions"][0]["maybe_appended"] = True
            await received.answer(lost)
            answered: list = []
            nursery.start_soon(answer_every_produce, fake, answered)
        assert isinstance(delivery.error, DeliveryOutcomeUnknown)
        assert delivery.error.code == ErrorCode.NOT_LEADER_OR_FOLLOWER
        assert answered == []


async def test_no_answer_in_time_fails_the_records_as_unknown(nursery, autojump_clock):
    fake = await start_fake(nursery)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, linger_ms=0, request_timeout_ms=1000) as producer:
            delivery = await producer.send("t", b"v")
            await fake.next_request(ApiKey.METADATA)  # never answered
        assert isinstance(delivery.error, DeliveryOutcomeUnknown)
        assert delivery.error.code == ErrorCode.REQUEST_TIMED_OUT
        connection = await cluster.any_connection()
        assert not connection.closed and connection.statistics().abandoned == 1


async def test_a_record_too_large_for_the_topic_is_refused_at_send(nursery, autojump_clock):
    fake = await start_fake(nursery, max_message_bytes=1000)
    async with client.connect(fake.bootstrap) as cluster:
        answered: list = []
        nursery.start_soon(answer_every_produce, fake, answered)
        async with Producer(cluster) as producer:
            with pytest.raises(DwalError) as raised:
                await producer.send("t", b"x" * 932)
            assert raised.value.code == ErrorCode.MESSAGE_TOO_LARGE
            assert "1001 bytes" in raised.value.message
            assert "max.message.bytes (1000)" in raised.value.message
            largest = await producer.send("t", b"x" * 931)  # a batch of exactly 1000 bytes
        await largest.wait()
        assert [len(received.request.tail) for received in answered] == [1000]


@pytest.mark.parametrize("compression", ["none", "zstd"])
async def test_batches_and_requests_stay_within_the_topic_limits(
    nursery, autojump_clock, compression
):
    fake = await start_fake(nursery, max_message_bytes=1000, segment_bytes=2500)
    values = [random.Random(index).randbytes(index % 300) for index in range(500)]
    async with client.connect(fake.bootstrap) as cluster:
        answered: list = []
        nursery.start_soon(answer_every_produce, fake, answered)
        async with Producer(cluster, linger_ms=1000, compression=compression) as producer:
            for value in values:
                await producer.send("t", value, partition=0)
    batch_sizes = []
    stored = 0
    for received in answered:
        [entry] = received.request.body["topics"]
        [part] = entry["partitions"]
        assert part["size"] <= 2500  # one partition's data in a request: within segment.bytes
        for batch in scan_batches(received.request.tail):
            batch_sizes.append(batch.header.size_bytes)
            stored += batch.header.record_count
    assert stored == len(values)
    assert max(batch_sizes) <= 1000
    assert max(batch_sizes) > 900  # batches are filled up to the limit, not cut short


@given(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.one_of(st.none(), st.binary(max_size=300)),
    st.one_of(st.none(), st.integers(0, 70_000).map(lambda n: b"v" * n)),
    st.lists(st.tuples(st.text(max_size=40), st.binary(max_size=40)), max_size=20),
)
def test_packed_record_size_is_exact(delta, key, value, headers):
    packed = msgpack.packb([delta, key, value, headers], use_bin_type=True)
    assert _packed_record_bytes(delta, key, value, headers) == len(packed)


@given(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.one_of(st.none(), st.binary(max_size=300)),
    st.one_of(st.none(), st.integers(0, 70_000).map(lambda n: b"v" * n)),
)
def test_the_cheap_size_bound_of_a_record_without_headers_holds(delta, key, value):
    packed = msgpack.packb([delta, key, value, ()], use_bin_type=True)
    key_and_value = (len(key) if key is not None else 0) + (len(value) if value is not None else 0)
    bound = key_and_value + RECORD_OVERHEAD_BYTES + PACKED_RECORD_OVERHEAD_BYTES_MAX
    assert len(packed) <= bound


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"batch_size": 0}, "batch_size must be at least 1, not 0"),
        ({"batch_size": 2048, "buffer_bytes_max": 1024}, "buffer_bytes_max (1024) must be"),
        ({"linger_ms": -1}, "linger_ms must not be negative"),
        ({"retries": -2}, "retries must not be negative, not -2"),
        ({"max_in_flight_per_partition": 0}, "max_in_flight_per_partition must be at least 1"),
        ({"request_timeout_ms": 0}, "request_timeout_ms must be at least 1"),
    ],
)
def test_an_invalid_limit_is_named(options, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        Producer(None, **options)  # type: ignore[arg-type]  # checked before the cluster is used


async def test_a_retry_waits_out_the_backoff_even_with_requests_to_spare(nursery, autojump_clock):
    """A refused batch goes back in line, and its partition sends nothing for
    `retry_backoff_ms`, though more requests could be in flight."""
    fake = await start_fake(nursery)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(
            cluster, linger_ms=0, retry_backoff_ms=700, max_in_flight_per_partition=5
        ) as producer:
            delivery = await producer.send("t", b"v", partition=0)
            received = await fake.next_request(ApiKey.METADATA)
            refused_at = trio.current_time()
            await received.answer(
                produce_answer(received.request, 0, ErrorCode.NOT_ENOUGH_REPLICAS)
            )
            resent = await fake.next_request(ApiKey.METADATA)
            assert trio.current_time() - refused_at == pytest.approx(0.7, abs=0.01)
            await resent.answer(produce_answer(resent.request, 3))
        assert (await delivery.wait()).offset == 3
