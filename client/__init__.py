"""DWAL's client library, for trio.

async with client.connect("127.0.0.1:9092") as cluster:
    await client.Admin(cluster).create_topic("events", partitions=3)
    async with client.Producer(cluster) as producer:
        delivery = await producer.send("events", b"hello", key=b"user-1")
    print(await delivery.wait())
    consumer = client.Consumer(cluster, auto_offset_reset="earliest")
    await consumer.assign_topic("events")
    records = await consumer.poll()
"""

from client.admin import Admin, PartitionDescription, TopicDescription
from client.cluster import Cluster, PartitionInfo, TopicInfo, connect
from client.connection import ConnectionFailed
from client.consumer import Consumer, ConsumerStatistics, TopicPartition, list_offsets
from client.producer import Delivery, Producer, ProducerStatistics, RecordMetadata
from protocol import Compression, DwalError, ErrorCode, Record

__all__ = [
    "Admin",
    "Cluster",
    "Compression",
    "ConnectionFailed",
    "Consumer",
    "ConsumerStatistics",
    "Delivery",
    "DwalError",
    "ErrorCode",
    "PartitionDescription",
    "PartitionInfo",
    "Producer",
    "ProducerStatistics",
    "Record",
    "RecordMetadata",
    "TopicDescription",
    "TopicInfo",
    "TopicPartition",
    "connect",
    "list_offsets",
]
