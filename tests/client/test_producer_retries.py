"""The producer rides out a broker restart: requests that fail on the broken connection are
retried, in order, once the broker is back."""

from __future__ import annotations

import trio
import trio.testing

import client
from client import Admin, Consumer, Producer


async def test_retries_cover_a_broker_restart(broker_launcher, tmp_path):
    data_dir = tmp_path / "data"
    broker = await broker_launcher.start(data_dir)
    port = broker.port
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("retry")
        async with Producer(cluster, retries=100, retry_backoff_ms=100, linger_ms=0) as producer:
            first = [await producer.send("retry", b"a%d" % i) for i in range(100)]
            await producer.flush()
            assert all(d.error is None for d in first)
            await broker_launcher.kill(broker)
            second = [await producer.send("retry", b"b%d" % i) for i in range(100)]
            await trio.testing.wait_all_tasks_blocked()  # the sends meet the dead broker
            await broker_launcher.start(data_dir, port=port)
            await producer.flush()
        assert [d.error for d in second] == [None] * 100
        consumer = Consumer(cluster, auto_offset_reset="earliest")
        await consumer.assign_topic("retry")
        values = []
        with trio.fail_after(20):
            while len(values) < 200:
                for records in (await consumer.poll(timeout_ms=200)).values():
                    values.extend(r.value for r in records)
    assert values == [b"a%d" % i for i in range(100)] + [b"b%d" % i for i in range(100)]
