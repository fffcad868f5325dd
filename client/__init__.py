"""DWAL's client library, for trio.

async with client.connect("127.0.0.1:9092") as cluster:
    await client.Admin(cluster).create_topic("events", partitions=3)
    async with client.Producer(cluster) as producer:
        delivery = await producer.send("events", b"hello", key=b"user-1")
    print(await delivery.wait())
    consumer = client.Consumer(cluster, auto_offset_reset="earliest")
    await consumer.assign_topic("events")
    records = await consumer.poll()

    # or as a member of a consumer group, resuming from committed offsets:
    async with client.Consumer(cluster, group_id="billing") as member:
        member.subscribe(["events"])
        records = await member.poll()
"""

from client.admin import (
    Admin,
    BrokerDecommission,
    BrokerDescription,
    BrokerListener,
    ClusterDescription,
    GroupAdmin,
    GroupDescription,
    GroupListing,
    GroupMemberDescription,
    PartitionDescription,
    PartitionOffsets,
    PartitionReassignment,
    QuorumMember,
    TopicDescription,
)
from client.batch_damage import CorruptRecordError
from client.cluster import Cluster, PartitionInfo, TopicInfo, connect
from client.connection import ConnectionFailed, MalformedResponseError
from client.consumer import (
    Consumer,
    ConsumerStatistics,
    OffsetAndMetadata,
    RecordDeserializationError,
    list_offsets,
)
from client.kafka_options import UnknownOptionError
from client.topic_partition import TopicPartition
from client.producer import (
    Delivery,
    DeliveryCallback,
    DeliveryFailure,
    DeliveryOutcomeUnknown,
    Producer,
    ProducerClosed,
    ProducerStatistics,
    RecordMetadata,
)
from protocol import Compression, DwalError, ErrorCode, Record

__all__ = [
    "Admin",
    "BrokerDecommission",
    "BrokerDescription",
    "BrokerListener",
    "Cluster",
    "ClusterDescription",
    "Compression",
    "ConnectionFailed",
    "Consumer",
    "ConsumerStatistics",
    "CorruptRecordError",
    "Delivery",
    "DeliveryCallback",
    "DeliveryFailure",
    "DeliveryOutcomeUnknown",
    "DwalError",
    "ErrorCode",
    "GroupAdmin",
    "GroupDescription",
    "GroupListing",
    "GroupMemberDescription",
    "MalformedResponseError",
    "OffsetAndMetadata",
    "PartitionDescription",
    "PartitionInfo",
    "PartitionOffsets",
    "PartitionReassignment",
    "Producer",
    "ProducerClosed",
    "ProducerStatistics",
    "QuorumMember",
    "Record",
    "RecordDeserializationError",
    "RecordMetadata",
    "TopicDescription",
    "TopicInfo",
    "TopicPartition",
    "UnknownOptionError",
    "connect",
    "list_offsets",
]
