"""Where keyed records go: Kafka's murmur2, so that a key lands in the same partition as
with Kafka's clients (Java, librdkafka/confluent-kafka, kafka-python, aiokafka); and
partitioner="crc32", DWAL's earlier placement, for topics whose keys must stay put.

Run with a broker going (`make run`): python docs/examples/partitioning.py
"""

import os
import zlib

import trio

import client
from protocol import partition_for_key

BOOTSTRAP = os.environ.get("DWAL_BOOTSTRAP", "127.0.0.1:9092")
TOPIC = "example-partitioning"
PARTITIONS = 6
# Kafka's own test vector (UtilsTest): murmur2(b"foobar") is -790332482 as a Java int; the
# Java client's partition is toPositive(hash) % partitions, toPositive clearing the sign bit.
JAVA_PARTITION_OF_FOOBAR = (-790332482 & 0x7FFFFFFF) % PARTITIONS


async def main() -> None:
    keys = [b"foobar", b"customer-1", b"customer-2", b"customer-3"]
    async with client.connect(BOOTSTRAP) as cluster:
        await client.Admin(cluster).create_topic(TOPIC, partitions=PARTITIONS)
        async with client.Producer(cluster) as producer:  # partitioner="murmur2"
            placed = {key: await producer.send_and_wait(TOPIC, b"v", key=key) for key in keys}
        async with client.Producer(cluster, partitioner="crc32") as producer:
            old_way = {key: await producer.send_and_wait(TOPIC, b"v", key=key) for key in keys}

    assert placed[b"foobar"].partition == JAVA_PARTITION_OF_FOOBAR
    for key in keys:
        assert placed[key].partition == partition_for_key(key, PARTITIONS)  # what gateways use
        assert old_way[key].partition == zlib.crc32(key) % PARTITIONS
        print(
            f"{key.decode():12} murmur2: {placed[key].partition}  crc32: {old_way[key].partition}"
        )


trio.run(main)
