"""The consumer's positions and the cluster's metadata cache, against an in-process broker:
seek semantics (including a seek while a prefetch is on its way), offset resets, and when
cached metadata is dropped or refreshed."""

from __future__ import annotations

import pytest
import trio

import client
from client import Admin, DwalError, ErrorCode, Producer, TopicPartition

TP = TopicPartition("t", 0)


async def fill(cluster, count: int, *, timestamps: list[int] | None = None) -> None:
    """Create topic t and write records "0".."count-1" at offsets 0..count-1, one batch
    each."""
    await Admin(cluster).create_topic("t")
    async with Producer(cluster, linger_ms=0) as producer:
        for number in range(count):
            timestamp = timestamps[number] if timestamps else None
            # one batch each: ListOffsets by timestamp answers at batch granularity
            await (await producer.send("t", b"%d" % number, timestamp_ms=timestamp)).wait()


async def poll_offsets(consumer, partition: TopicPartition = TP) -> list[int]:
    return [record.offset for record in (await consumer.poll()).get(partition, [])]


async def test_seek_then_poll_starts_exactly_there(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("t")
        async with Producer(cluster, linger_ms=60_000) as producer:  # one batch of ten
            for number in range(10):
                await producer.send("t", b"%d" % number)
        consumer = client.Consumer(cluster, max_wait_ms=100)
        consumer.assign([TP])
        consumer.seek(TP, 4)  # the middle of a batch: earlier records are not returned
        assert await poll_offsets(consumer) == [4, 5, 6, 7, 8, 9]
        assert consumer.position(TP) == 10
        assert consumer.high_watermark(TP) == 10


async def test_a_seek_discards_the_fetch_already_on_its_way(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await fill(cluster, 6)
        consumer = client.Consumer(cluster, auto_offset_reset="earliest", max_wait_ms=100)
        consumer.assign([TP])
        assert await poll_offsets(consumer) == list(range(6))  # a prefetch from 6 starts
        consumer.seek(TP, 2)
        assert await poll_offsets(consumer) == [2, 3, 4, 5]
        assert consumer.position(TP) == 6


async def test_positions_reset_as_auto_offset_reset_says(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await fill(cluster, 3)
        latest = client.Consumer(cluster, auto_offset_reset="latest", max_wait_ms=0)
        latest.assign([TP])
        assert await poll_offsets(latest) == []
        assert latest.position(TP) == 3
        earliest = client.Consumer(cluster, auto_offset_reset="earliest", max_wait_ms=0)
        earliest.assign([TP])
        assert await poll_offsets(earliest) == [0, 1, 2]
        strict = client.Consumer(cluster, auto_offset_reset="error", max_wait_ms=0)
        strict.assign([TP])
        with pytest.raises(DwalError) as caught:
            await strict.poll()
        assert caught.value.code == ErrorCode.OFFSET_OUT_OF_RANGE


async def test_a_position_beyond_the_end_is_reset_or_raises(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await fill(cluster, 3)
        consumer = client.Consumer(cluster, auto_offset_reset="earliest", max_wait_ms=0)
        consumer.assign([TP])
        consumer.seek(TP, 50)
        assert await poll_offsets(consumer) == []  # out of range: the position is dropped
        assert await poll_offsets(consumer) == [0, 1, 2]  # ...and reset to the earliest
        strict = client.Consumer(cluster, auto_offset_reset="error", max_wait_ms=0)
        strict.assign([TP])
        strict.seek(TP, 50)
        with pytest.raises(DwalError) as caught:
            await strict.poll()
        assert caught.value.code == ErrorCode.OFFSET_OUT_OF_RANGE


async def test_seek_to_beginning_end_and_timestamp(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await fill(cluster, 4, timestamps=[1_000, 2_000, 3_000, 4_000])
        consumer = client.Consumer(cluster, max_wait_ms=0)
        consumer.assign([TP])
        await consumer.seek_to_end()
        assert consumer.position(TP) == 4
        await consumer.seek_to_beginning()
        assert consumer.position(TP) == 0
        await consumer.seek_to_timestamp(2_500)
        assert consumer.position(TP) == 2
        assert await poll_offsets(consumer) == [2, 3]
        await consumer.seek_to_beginning()
        await consumer.seek_to_timestamp(9_000)  # after every record: the end
        assert consumer.position(TP) == 4


async def test_seek_refuses_unassigned_partitions_and_negative_offsets(broker):
    async with client.connect(broker.bootstrap) as cluster:
        consumer = client.Consumer(cluster)
        consumer.assign([TP])
        with pytest.raises(ValueError):
            consumer.seek(("t", 1), 0)
        with pytest.raises(ValueError):
            consumer.seek(TP, -1)
        assert consumer.position(TP) is None
        consumer.assign([TP, ("t", 1)])  # assigning again keeps known positions
        consumer.seek(TP, 7)
        consumer.assign([TP])
        assert consumer.position(TP) == 7 and consumer.assignment() == [TP]


# -- the metadata cache -------------------------------------------------------------------


async def test_metadata_is_cached_until_invalidated(broker):
    async with (
        client.connect(broker.bootstrap) as cluster,
        client.connect(broker.bootstrap) as other,
    ):
        await Admin(cluster).create_topic("grows", partitions=2)
        assert len((await cluster.topic("grows")).partitions) == 2
        await Admin(other).add_partitions("grows", 3)  # another client: no invalidation here
        assert len((await cluster.topic("grows")).partitions) == 2  # cached
        cluster.invalidate("grows")
        assert len((await cluster.topic("grows")).partitions) == 3
        await Admin(other).add_partitions("grows", 4)
        cluster.invalidate_all()
        assert len((await cluster.topic("grows")).partitions) == 4


async def test_a_topic_the_broker_no_longer_knows_leaves_the_cache(broker):
    async with (
        client.connect(broker.bootstrap) as cluster,
        client.connect(broker.bootstrap) as other,
    ):
        await Admin(cluster).create_topic("gone")
        await cluster.topic("gone")
        await Admin(other).delete_topic("gone")
        found = await cluster.refresh_metadata(["gone"])
        assert isinstance(found["gone"], DwalError)
        assert "gone" not in cluster.topics
        with pytest.raises(DwalError) as caught:
            await cluster.topic("gone")
        assert caught.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION


async def test_a_consumer_refreshes_metadata_for_a_partition_it_has_not_seen(broker):
    async with (
        client.connect(broker.bootstrap) as cluster,
        client.connect(broker.bootstrap) as other,
    ):
        await Admin(cluster).create_topic("t", partitions=1)
        await cluster.topic("t")  # cached: one partition
        await Admin(other).add_partitions("t", 2)
        async with Producer(other, linger_ms=0) as producer:
            await (await producer.send("t", b"new", partition=1)).wait()
        consumer = client.Consumer(cluster, auto_offset_reset="earliest", max_wait_ms=0)
        new = TopicPartition("t", 1)
        consumer.assign([new])
        with trio.fail_after(10):
            assert await poll_offsets(consumer, new) == [0]
        assert len(cluster.topics["t"].partitions) == 2
