"""Client-side helpers of the cluster tests: write and read records, describe the cluster
and topics. Each opens its own connection through the bootstrap broker it is given, so a
test says which node it talks to."""

from __future__ import annotations

import trio

import client

ADMIN_TIMEOUT_MS = 3000


async def produce(bootstrap: str, topic: str, values: dict[int, list[bytes]]) -> None:
    """Write `values` (partition -> values) through `bootstrap`, acks=all; returns once
    every record is acknowledged."""
    async with client.connect(bootstrap) as cluster:
        async with client.Producer(cluster, acks="all") as producer:
            deliveries = [
                await producer.send(topic, value, partition=partition)
                for partition, partition_values in values.items()
                for value in partition_values
            ]
        for delivery in deliveries:
            await delivery.wait()


async def consume(
    bootstrap: str, topic: str, count: int, *, timeout_s: float = 20
) -> dict[int, list[bytes | None]]:
    """The first `count` records of `topic` read through `bootstrap`: partition -> values in
    offset order. Raises AssertionError with what it read after `timeout_s`."""
    found: dict[int, list[bytes | None]] = {}
    async with client.connect(bootstrap) as cluster:
        consumer = client.Consumer(cluster, auto_offset_reset="earliest")
        await consumer.assign_topic(topic)
        with trio.move_on_after(timeout_s):
            while sum(map(len, found.values())) < count:
                for partition, records in (await consumer.poll(timeout_ms=500)).items():
                    found.setdefault(partition.partition, []).extend(r.value for r in records)
    read = sum(map(len, found.values()))
    assert read >= count, f"read {read} of {count} records of {topic} in {timeout_s} s: {found}"
    return found


async def describe_cluster(bootstrap: str) -> client.ClusterDescription:
    async with client.connect(bootstrap) as cluster:
        return await client.Admin(cluster, timeout_ms=ADMIN_TIMEOUT_MS).describe_cluster()


async def describe_partitions(
    bootstrap: str, topic: str
) -> tuple[client.PartitionDescription, ...]:
    async with client.connect(bootstrap) as cluster:
        admin = client.Admin(cluster, timeout_ms=ADMIN_TIMEOUT_MS)
        return (await admin.describe_topic(topic)).partitions


async def leaders_known(bootstrap: str, topic: str) -> dict[int, int] | None:
    """Partition -> leader of `topic` as `bootstrap` knows it; None while any has none."""
    found = {p.partition: p.leader for p in await describe_partitions(bootstrap, topic)}
    return None if -1 in found.values() else found


async def partitions_led_by(
    bootstrap: str, topic: str, partitions: list[int], leader: int
) -> tuple[client.PartitionDescription, ...] | None:
    """All partitions of `topic` once each of `partitions` has `leader` (-1: none), else
    None."""
    found = await describe_partitions(bootstrap, topic)
    wanted = [p for p in found if p.partition in partitions]
    return found if all(p.leader == leader for p in wanted) else None


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """Create `topic` (RF=1) through `bootstrap`; an answer TOPIC_ALREADY_EXISTS counts as
    done, since an earlier attempt that timed out on this side may have been applied."""
    async with client.connect(bootstrap) as cluster:
        admin = client.Admin(cluster, timeout_ms=ADMIN_TIMEOUT_MS)
        try:
            await admin.create_topic(topic, partitions, replication_factor=1)
        except client.DwalError as error:
            if error.code != client.ErrorCode.TOPIC_ALREADY_EXISTS:
                raise
