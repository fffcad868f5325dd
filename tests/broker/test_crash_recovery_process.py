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
    kill_after_acks = chooser.randrange(1_000, 20_000)
    kill_delay_s = chooser.random() * 0.05
    sent = 0

    async def collect_acknowledgements(receive) -> None:
        # Deliveries complete in order per partition; record each acknowledged offset and pull
        # the trigger at a random moment once enough acknowledgements have arrived.
        async for value, delivery in receive:
            try:
                acknowledged[(await delivery.wait()).offset] = value
            except client.DwalError:
                continue
            if len(acknowledged) == kill_after_acks:
                await trio.sleep(kill_delay_s)  # a random moment, not a wait for a condition
                broker.process.send_signal(signal.SIGKILL)

    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("crash", configs={"segment.bytes": "65536"})
        send_channel, receive_channel = trio.open_memory_channel(10_000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect_acknowledgements, receive_channel)
            async with send_channel:
                # a dead broker: records not yet sent wait for a leader until their delivery
                # timeout, kept short here so that the producer gives up soon after the kill
                async with Producer(
                    cluster,
                    acks=1,
                    retries=0,
                    linger_ms=1,
                    batch_size=4096,
                    delivery_timeout_ms=3000,
                ) as producer:
                    while not broker.exited.is_set() and sent < 500_000:
                        value = b"value-%d" % sent
                        await send_channel.send((value, await producer.send("crash", value)))
                        sent += 1
    assert len(acknowledged) >= kill_after_acks, "the broker died before the planned kill"
    await broker_launcher.signal(broker, signal.SIGKILL)
    restarted = await broker_launcher.start(data_dir, "--fsync", fsync)
    records = await read_everything(restarted.bootstrap, "crash")
    assert [r.offset for r in records] == list(range(len(records))), "offsets are not dense"
    stored = {r.offset: r.value for r in records}
    for offset, value in acknowledged.items():
        assert stored.get(offset) == value, f"acknowledged offset {offset} lost or changed"
    sent_values = {b"value-%d" % i for i in range(sent)}
    assert all(r.value in sent_values for r in records), "the log holds a record nobody sent"
    assert len({r.value for r in records}) == len(records), "a record was stored twice"
    # the restarted broker goes on appending densely after the recovered tail
    async with client.connect(restarted.bootstrap) as cluster:
        async with Producer(cluster) as producer:
            delivery = await producer.send("crash", b"after-restart")
        assert (await delivery.wait()).offset == len(records)
