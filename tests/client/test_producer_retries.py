"""The producer across a broker crash and restart (real broker processes).

Records sent while the broker is down were never written to it: they are retried, in
order, once the broker is back. Records whose request was written before the crash may or
may not be stored: by default they fail with DeliveryOutcomeUnknown rather than risk a
duplicate; with `retry_unknown_outcome=True` they are resent (at-least-once).
"""

from __future__ import annotations

import os
import signal

import pytest
import trio
import trio.testing

import client
from client import Admin, Consumer, Producer
from client.producer import DeliveryOutcomeUnknown
from protocol import ErrorCode


async def read_values(cluster, topic: str, count: int) -> list[bytes]:
    consumer = Consumer(cluster, auto_offset_reset="earliest")
    await consumer.assign_topic(topic)
    values: list[bytes] = []
    while len(values) < count:
        for records in (await consumer.poll(timeout_ms=200)).values():
            values.extend(r.value for r in records)
    return values


async def test_records_sent_while_the_broker_is_down_are_retried(broker_launcher, tmp_path):
    data_dir = tmp_path / "data"
    broker = await broker_launcher.start(data_dir)
    port = broker.port
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("retry")
        async with Producer(cluster, retries=100, retry_backoff_ms=100, linger_ms=0) as producer:
            first = [await producer.send("retry", b"a%d" % i) for i in range(100)]
            await producer.flush()
            assert all(d.error is None for d in first)
            connection = await cluster.any_connection()
            await broker_launcher.kill(broker)
            await trio.testing.wait_all_tasks_blocked()  # the client sees the closed connection
            assert connection.closed
            second = [await producer.send("retry", b"b%d" % i) for i in range(100)]
            await trio.testing.wait_all_tasks_blocked()  # the sends meet the dead broker
            await broker_launcher.start(data_dir, port=port)
            await producer.flush()
        assert [d.error for d in second] == [None] * 100
        values = await read_values(cluster, "retry", 200)
        high_watermark = (await Admin(cluster).describe_topic("retry")).partitions[0].high_watermark
    assert values == [b"a%d" % i for i in range(100)] + [b"b%d" % i for i in range(100)]
    assert high_watermark == 200  # nothing stored twice


@pytest.mark.parametrize("retry_unknown_outcome", [False, True])
async def test_records_in_flight_at_a_crash_are_not_resent_unless_asked(
    broker_launcher, tmp_path, retry_unknown_outcome
):
    data_dir = tmp_path / "data"
    broker = await broker_launcher.start(data_dir)
    port = broker.port
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("crash")
        async with Producer(
            cluster,
            retries=100,
            retry_backoff_ms=100,
            linger_ms=0,
            retry_unknown_outcome=retry_unknown_outcome,
        ) as producer:
            first = await producer.send("crash", b"before")
            await first.wait()
            os.kill(broker.pid, signal.SIGSTOP)  # the kernel still takes the request's bytes
            in_flight = [await producer.send("crash", b"in flight %d" % i) for i in range(10)]
            await trio.testing.wait_all_tasks_blocked()  # written, awaiting an answer
            assert producer.statistics().inflight_requests == 1
            await broker_launcher.kill(broker)
            await broker_launcher.start(data_dir, port=port)
            await producer.flush()
            after = await producer.send("crash", b"after")
        await after.wait()
        if retry_unknown_outcome:
            assert [d.error for d in in_flight] == [None] * 10
            expected = [b"before"] + [b"in flight %d" % i for i in range(10)] + [b"after"]
        else:
            for delivery in in_flight:
                assert isinstance(delivery.error, DeliveryOutcomeUnknown)
                assert delivery.error.code == ErrorCode.NETWORK_EXCEPTION
                assert "may or may not have been stored" in delivery.error.message
            # the stopped broker never read the request: it was not stored after all
            expected = [b"before", b"after"]
        values = await read_values(cluster, "crash", len(expected))
    assert values == expected
