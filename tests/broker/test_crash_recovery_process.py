"""A real broker process is SIGKILLed while a producer streams acks=1 records; after a
restart every acknowledged record is there with the same offset and value."""

from __future__ import annotations

import random
import signal

import pytest
import trio

import client
from client import Admin, Consumer, Producer


async def read_everything(bootstrap: str, topic: str) -> list:
    async with client.connect(bootstrap) as cluster:
        consumer = Consumer(cluster, auto_offset_reset="earliest")
        await consumer.assign_topic(topic)
        records = []
        with trio.fail_after(30):
            while True:
                got = await consumer.poll(timeout_ms=100)
                if not got:
                    return records
                for batch in got.values():
                    records.extend(batch)


@pytest.mark.parametrize("seed,fsync", [(1, "always"), (2, "always"), (3, "never")])
async def test_sigkill_loses_no_acknowledged_record(broker_launcher, tmp_path, seed, fsync):
    chooser = random.Random(seed)
    data_dir = tmp_path / "data"
    broker = await broker_launcher.start(data_dir, "--fsync", fsync)
    acknowledged: dict[int, bytes] = {}
    failed = 0
    kill_after = chooser.randrange(2_000, 20_000)
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("crash", configs={"segment.bytes": "65536"})
        async with Producer(cluster, acks=1, retries=0, linger_ms=1, batch_size=4096) as producer:
            pending = []
            sent = 0
            while broker.process.returncode is None and sent < 200_000:
                pending.append((b"value-%d" % sent, await producer.send("crash", b"value-%d" % sent)))
                sent += 1
                if sent % 500 == 0:
                    await trio.sleep(0)
                    still = []
                    for value, delivery in pending:
                        if not delivery.done:
                            still.append((value, delivery))
                        elif delivery.error is None:
                            acknowledged[delivery.result().offset] = value
                        else:
                            failed += 1
                    pending = still
                if sent == kill_after:
                    broker.process.send_signal(signal.SIGKILL)
            await producer.flush()
            for value, delivery in pending:
                if delivery.error is None:
                    acknowledged[delivery.result().offset] = value
    assert acknowledged, "the producer saw no acknowledgement before the kill"
    await broker_launcher.signal(broker, signal.SIGKILL)
    restarted = await broker_launcher.start(data_dir, "--fsync", fsync)
    records = await read_everything(restarted.bootstrap, "crash")
    assert [r.offset for r in records] == list(range(len(records))), "offsets are not dense"
    stored = {r.offset: r.value for r in records}
    for offset, value in acknowledged.items():
        assert stored.get(offset) == value, f"acknowledged offset {offset} lost or changed"
    sent_values = {b"value-%d" % i for i in range(kill_after + 100_000)}
    assert all(r.value in sent_values for r in records), "the log holds a record nobody sent"
    assert len({r.value for r in records}) == len(records), "a record was stored twice"
    # the restarted broker goes on appending densely after the recovered tail
    async with client.connect(restarted.bootstrap) as cluster:
        async with Producer(cluster) as producer:
            delivery = await producer.send("crash", b"after-restart")
        assert delivery.result().offset == len(records)
