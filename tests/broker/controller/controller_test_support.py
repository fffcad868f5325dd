"""Hypothesis strategies for every metadata record, and helpers that build images."""

from __future__ import annotations

from hypothesis import strategies as st

from broker.controller import (
    EMPTY_IMAGE,
    BrokerDecommissionRecord,
    BrokerRegistration,
    BrokerShutdownRecord,
    BrokerSnapshotRecord,
    ClusterIdRecord,
    ConfigRecord,
    ConfigResourceType,
    Decision,
    FenceBrokerRecord,
    Listener,
    MetadataImage,
    MetadataRecord,
    NewTopic,
    PartitionChangeRecord,
    PartitionRecord,
    ProducerIdsRecord,
    RegisterBrokerRecord,
    RemoveTopicRecord,
    TopicRecord,
    UnfenceBrokerRecord,
    apply,
    create_topic,
    register_broker,
    unfence_broker,
)
from broker.controller.metadata_records import INT32_MAX, INT64_MAX, ZERO_UUID
from protocol.errors import DwalError

broker_ids = st.integers(0, INT32_MAX)
epochs = st.integers(0, INT32_MAX)
broker_epochs = st.integers(0, INT64_MAX)
uuids = st.binary(min_size=16, max_size=16).filter(lambda value: value != ZERO_UUID)
texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
topic_names = st.from_regex(r"[a-zA-Z0-9._-]{1,30}", fullmatch=True).filter(
    lambda name: name not in (".", "..")
)
listeners = st.lists(
    st.builds(Listener, name=texts, host=texts, port=st.integers(1, 65_535)),
    max_size=3,
    unique_by=lambda listener: listener.name,
).map(tuple)
racks = st.none() | texts


@st.composite
def partition_shapes(draw, optional: bool = False):
    """(replicas, isr, leader): ISR a non-empty part of replicas, leader in ISR or -1."""
    replicas = tuple(draw(st.lists(broker_ids, min_size=1, max_size=6, unique=True)))
    isr = tuple(draw(st.permutations(replicas))[: draw(st.integers(1, len(replicas)))])
    leader = draw(st.sampled_from((-1, *isr)))
    if not optional:
        return replicas, isr, leader
    return (
        draw(st.none() | st.just(replicas)),
        draw(st.none() | st.just(isr)),
        draw(st.none() | st.just(leader)),
    )


@st.composite
def reassignment_shapes(draw, replicas: tuple[int, ...] | None):
    """(adding, removing): disjoint parts of `replicas` (anything distinct when None)."""
    pool = list(replicas) if replicas is not None else draw(st.lists(broker_ids, unique=True))
    pool = list(draw(st.permutations(pool)))
    adding_count = draw(st.integers(0, len(pool)))
    removing_count = draw(st.integers(0, len(pool) - adding_count))
    adding = tuple(pool[:adding_count])
    return adding, tuple(pool[adding_count : adding_count + removing_count])


@st.composite
def partition_records(draw):
    replicas, isr, leader = draw(partition_shapes())
    adding, removing = draw(st.just(((), ())) | reassignment_shapes(replicas))
    return PartitionRecord(
        topic_id=draw(uuids),
        partition=draw(st.integers(0, INT32_MAX)),
        replicas=replicas,
        isr=isr,
        leader=leader,
        leader_epoch=draw(epochs),
        partition_epoch=draw(epochs),
        adding_replicas=adding,
        removing_replicas=removing,
    )


@st.composite
def partition_change_records(draw):
    replicas, isr, leader = draw(partition_shapes(optional=True))
    adding, removing = draw(reassignment_shapes(replicas))
    return PartitionChangeRecord(
        topic_id=draw(uuids),
        partition=draw(st.integers(0, INT32_MAX)),
        expected_partition_epoch=draw(epochs),
        isr=isr,
        leader=leader,
        replicas=replicas,
        adding_replicas=draw(st.none() | st.just(adding)),
        removing_replicas=draw(st.none() | st.just(removing)),
    )


config_records = st.one_of(
    st.builds(
        ConfigRecord,
        resource_type=st.just(ConfigResourceType.TOPIC),
        resource_name=topic_names,
        name=texts,
        value=st.none() | st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
    ),
    st.builds(
        ConfigRecord,
        resource_type=st.just(ConfigResourceType.BROKER),
        resource_name=st.just("") | broker_ids.map(str),
        name=texts,
        value=st.none() | texts,
    ),
)

records: st.SearchStrategy[MetadataRecord] = st.one_of(
    st.builds(ClusterIdRecord, cluster_id=texts),
    st.builds(
        RegisterBrokerRecord,
        broker_id=broker_ids,
        incarnation_id=uuids,
        listeners=listeners,
        rack=racks,
        fenced=st.booleans(),
    ),
    st.builds(FenceBrokerRecord, broker_id=broker_ids, broker_epoch=broker_epochs),
    st.builds(UnfenceBrokerRecord, broker_id=broker_ids, broker_epoch=broker_epochs),
    st.builds(BrokerShutdownRecord, broker_id=broker_ids, broker_epoch=broker_epochs),
    st.builds(
        BrokerSnapshotRecord,
        broker_id=broker_ids,
        incarnation_id=uuids,
        broker_epoch=broker_epochs,
        listeners=listeners,
        rack=racks,
        fenced=st.booleans(),
        shut_down=st.booleans(),
    ),
    st.builds(BrokerDecommissionRecord, broker_id=broker_ids, decommissioned=st.booleans()),
    st.builds(TopicRecord, name=topic_names, topic_id=uuids),
    st.builds(RemoveTopicRecord, topic_id=uuids),
    partition_records(),
    partition_change_records(),
    config_records,
    st.builds(ProducerIdsRecord, next_producer_id=st.integers(0, INT64_MAX)),
)
entries = st.lists(records, min_size=1, max_size=8)


def incarnation(broker_id: int, generation: int = 0) -> bytes:
    return bytes([generation + 1]) + broker_id.to_bytes(15, "big")


def topic_id(number: int) -> bytes:
    return b"\xff" + number.to_bytes(15, "big")


class ImageLog:
    """An image with the log that built it: `commit` applies a decision's records as the
    next entry (as the controller does once the entry commits)."""

    def __init__(self, image: MetadataImage = EMPTY_IMAGE) -> None:
        self.image = image
        self.entries: list[tuple[int, list[MetadataRecord]]] = []

    def commit(self, decision: Decision) -> Decision:
        assert not isinstance(decision, DwalError), decision
        index = self.image.last_applied_index + 1
        self.entries.append((index, list(decision)))
        self.image = apply(self.image, decision, entry_index=index)
        return decision

    def replay(self) -> MetadataImage:
        image = EMPTY_IMAGE
        for index, entry in self.entries:
            image = apply(image, entry, entry_index=index)
        return image

    def add_brokers(self, *broker_ids: int, racks: dict[int, str] | None = None) -> None:
        """Register and unfence each broker."""
        for broker_id in broker_ids:
            registration = BrokerRegistration(
                broker_id=broker_id,
                incarnation_id=incarnation(broker_id),
                listeners=(Listener("native", "127.0.0.1", 9000 + broker_id),),
                rack=(racks or {}).get(broker_id),
            )
            self.commit(register_broker(self.image, registration))
            epoch = self.image.brokers[broker_id].epoch
            self.commit(unfence_broker(self.image, broker_id, epoch))

    def add_topic(self, name: str, partitions: int, replication_factor: int, number: int = 0):
        new_topic = NewTopic(
            name=name,
            partitions=partitions,
            replication_factor=replication_factor,
            topic_id=topic_id(number or len(self.image.topics) + 1),
        )
        return self.commit(create_topic(self.image, new_topic))

    def epoch(self, broker_id: int) -> int:
        return self.image.brokers[broker_id].epoch
