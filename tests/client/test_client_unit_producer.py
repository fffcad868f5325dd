"""The producer's promises, against an in-process broker: where records go (key hash,
explicit partition, sticky keyless batches) and how a broker's refusal reaches the
caller's Delivery."""

from __future__ import annotations

import pytest

import client
from client import Admin, DwalError, ErrorCode, Producer
from protocol import partition_for_key


async def read_all(cluster, topic: str, partition: int) -> list:
    consumer = client.Consumer(cluster, auto_offset_reset="earliest", max_wait_ms=0)
    consumer.assign([(topic, partition)])
    out = []
    while True:
        records = (await consumer.poll()).get(client.TopicPartition(topic, partition), [])
        if not records:
            return out
        out.extend(records)


async def test_keyed_records_go_to_the_partition_of_their_key(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("keyed", partitions=4)
        keys = [b"user-%d" % n for n in range(24)]
        async with Producer(cluster, linger_ms=0) as producer:
            deliveries = [await producer.send("keyed", b"v", key=key) for key in keys]
        placed = [(await d.wait()).partition for d in deliveries]
        assert placed == [partition_for_key(key, 4) for key in keys]
        assert len(set(placed)) > 1  # the keys really spread


async def test_records_of_one_key_keep_their_order_in_one_partition(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("ordered", partitions=3)
        async with Producer(cluster, linger_ms=0) as producer:
            for number in range(20):
                await producer.send("ordered", b"%d" % number, key=b"same")
        partition = partition_for_key(b"same", 3)
        records = await read_all(cluster, "ordered", partition)
        assert [r.value for r in records] == [b"%d" % n for n in range(20)]
        others = [p for p in range(3) if p != partition]
        assert [await read_all(cluster, "ordered", p) for p in others] == [[], []]


async def test_an_explicit_partition_wins_over_the_key(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("explicit", partitions=4)
        key = b"k"
        target = (partition_for_key(key, 4) + 1) % 4
        async with Producer(cluster, linger_ms=0) as producer:
            delivery = await producer.send("explicit", b"v", key=key, partition=target)
            assert (await delivery.wait()).partition == target
            with pytest.raises(DwalError) as caught:
                await producer.send("explicit", b"v", partition=4)
            assert caught.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION


async def test_keyless_records_of_one_batch_share_a_partition(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("sticky", partitions=8)
        async with Producer(cluster, linger_ms=60_000, batch_size=1 << 20) as producer:
            deliveries = [await producer.send("sticky", b"v%d" % n) for n in range(50)]
            await producer.flush()
        partitions = {(await d.wait()).partition for d in deliveries}
        assert len(partitions) == 1
        offsets = [(await d.wait()).offset for d in deliveries]
        assert offsets == list(range(50))


async def test_a_broker_refusal_reaches_the_delivery(broker):
    async with (
        client.connect(broker.bootstrap) as cluster,
        client.connect(broker.bootstrap) as other,
    ):
        admin = Admin(cluster)
        await admin.create_topic("doomed")
        await admin.create_topic("fine")
        async with Producer(cluster, linger_ms=0, retries=0) as producer:
            await (await producer.send("doomed", b"first")).wait()  # metadata now cached
            # deleted by another client: this one still believes in the topic, so it is the
            # broker's answer that refuses the record
            await Admin(other).delete_topic("doomed")
            lost = await producer.send("doomed", b"second")
            kept = await producer.send("fine", b"third")
            with pytest.raises(DwalError) as caught:
                await lost.wait()
            assert caught.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
            assert lost.done and lost.error is not None
            with pytest.raises(DwalError):
                lost.result()
            assert (await kept.wait()).offset == 0  # the other topic is not affected


async def test_a_record_too_large_for_the_topic_is_refused_at_send(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("small", configs={"max.message.bytes": "1000"})
        async with Producer(cluster, linger_ms=0) as producer:
            with pytest.raises(DwalError) as caught:
                await producer.send("small", b"x" * 2000)
            assert caught.value.code == ErrorCode.MESSAGE_TOO_LARGE
            assert (await (await producer.send("small", b"x" * 100)).wait()).offset == 0
