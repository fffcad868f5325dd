"""The metadata image: what the committed metadata log says, as one immutable value.

Theory of operation
-------------------
Every node applies the committed metadata entries, in log order, to a `MetadataImage` with
`apply(image, records, entry_index=...)`, and request handlers read the image. `apply` is a
pure function: the same image and records give an equal image on every node, so the image
of any node is a replay of the log. Nothing in it reads a clock, a random source or a dict's
order in a way that could differ between nodes.

The log is the truth, so applying never fails: a record that is well formed (the decoder
guarantees that) but does not fit the image — a partition change for an unknown topic or
with a stale partition epoch, a fence of an older broker epoch, a topic whose name is taken —
is a deterministic no-op. That is what makes `PartitionChangeRecord` a compare-and-swap: the
controller decides on the image it has, and if another change got in first, its record does
nothing everywhere.

Images are copy-on-write: `apply` copies the maps it changes (shallowly) and shares every
unchanged `BrokerInfo`, `TopicInfo` and `PartitionInfo` with the previous image, so handlers
may keep an old image as long as they like and a change to one partition does not copy the
others' state.

`image_to_records` is the snapshot of an image: applying its records to an empty image at the
image's `last_applied_index` rebuilds an equal image (brokers come back as
`BrokerSnapshotRecord`s because their epochs are entry indexes of the compacted log).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from broker.controller.metadata_records import (
    INT32_MAX,
    NO_LEADER,
    BrokerDecommissionRecord,
    BrokerShutdownRecord,
    BrokerSnapshotRecord,
    ClusterIdRecord,
    ConfigRecord,
    ConfigResourceType,
    FenceBrokerRecord,
    Listener,
    MetadataRecord,
    PartitionChangeRecord,
    PartitionRecord,
    ProducerIdsRecord,
    RegisterBrokerRecord,
    RemoveTopicRecord,
    TopicRecord,
    UnfenceBrokerRecord,
)

ConfigResource = tuple[ConfigResourceType, str]
"""(resource type, resource name): a topic name, or a broker id in decimal ("" = default)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BrokerInfo:
    broker_id: int
    incarnation_id: bytes
    epoch: int  # the index of the entry that registered this incarnation
    listeners: tuple[Listener, ...]
    rack: str | None
    fenced: bool  # a fenced broker leads nothing and joins no ISR
    shut_down: bool  # shut down in a controlled way; fenced until it registers again


@dataclass(frozen=True, kw_only=True, slots=True)
class PartitionInfo:
    partition: int
    replicas: tuple[int, ...]  # broker ids, the preferred leader first
    isr: tuple[int, ...]  # within replicas, never empty
    leader: int  # in isr, or NO_LEADER
    leader_epoch: int  # bumped whenever the leader changes
    partition_epoch: int  # bumped by every applied change
    # A reassignment in progress (see decisions): replicas = target + removing; the adding
    # replicas catch up as followers and, once all of them are in the ISR, the partition's
    # replicas become the target. Both empty: no reassignment.
    adding_replicas: tuple[int, ...] = ()
    removing_replicas: tuple[int, ...] = ()

    @property
    def preferred_leader(self) -> int:
        return self.replicas[0]

    @property
    def reassigning(self) -> bool:
        return bool(self.adding_replicas or self.removing_replicas)

    @property
    def target_replicas(self) -> tuple[int, ...]:
        """The replicas once the reassignment in progress completes (the replicas if none)."""
        return tuple(r for r in self.replicas if r not in self.removing_replicas)

    @property
    def original_replicas(self) -> tuple[int, ...]:
        """The replicas before the reassignment in progress (the replicas if none)."""
        return tuple(r for r in self.replicas if r not in self.adding_replicas)


@dataclass(frozen=True, kw_only=True, slots=True)
class TopicInfo:
    name: str
    topic_id: bytes
    partitions: tuple[PartitionInfo, ...]  # partitions[n].partition == n


def _empty_mapping() -> Mapping[Any, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, kw_only=True, slots=True)
class MetadataImage:
    """The metadata as of `last_applied_index`. Compare images with ==.

    The maps are read-only views; `topics` and `topics_by_id` share their TopicInfo values.
    """

    cluster_id: str | None = None
    brokers: Mapping[int, BrokerInfo] = field(default_factory=_empty_mapping)
    topics: Mapping[str, TopicInfo] = field(default_factory=_empty_mapping)
    topics_by_id: Mapping[bytes, TopicInfo] = field(default_factory=_empty_mapping)
    configs: Mapping[ConfigResource, Mapping[str, str]] = field(default_factory=_empty_mapping)
    next_producer_id: int = 0
    # Broker ids being decommissioned: no new replica goes there (whether registered or not).
    decommissioned: frozenset[int] = frozenset()
    last_applied_index: int = 0  # the Raft index of the last entry applied (0: none)
    # Derived from the partitions (kept by `apply`, so placement need not count them): per
    # broker id, the replicas it holds and the partitions it is the preferred leader of.
    # Brokers with none are absent.
    replica_counts: Mapping[int, int] = field(default_factory=_empty_mapping)
    preferred_leader_counts: Mapping[int, int] = field(default_factory=_empty_mapping)

    def partitions_on(self, broker_id: int) -> int:
        """How many partitions list the broker among their replicas (moving ones included)."""
        return self.replica_counts.get(broker_id, 0)

    def unfenced_broker_ids(self) -> list[int]:
        """Ids of the brokers that may lead and host new replicas, ascending."""
        return sorted(broker_id for broker_id, info in self.brokers.items() if not info.fenced)

    def partition(self, topic: str, partition: int) -> PartitionInfo | None:
        """The partition's state, or None when the topic or the partition does not exist."""
        info = self.topics.get(topic)
        if info is None or not 0 <= partition < len(info.partitions):
            return None
        return info.partitions[partition]


EMPTY_IMAGE = MetadataImage()


def apply(
    image: MetadataImage, records: Iterable[MetadataRecord], *, entry_index: int
) -> MetadataImage:
    """Return the image after applying the records of the entry at `entry_index`, in order.

    Pure and deterministic; never raises for a decoded record (records that do not fit the
    image are no-ops, see the module doc). `entry_index` must be above the image's
    `last_applied_index` (an entry with no metadata records, such as a Raft no-op, may be
    applied as an empty list to move it).
    """
    assert entry_index > image.last_applied_index, "entries are applied in log order, once"
    builder = _ImageBuilder(image)
    for record in records:
        _APPLIERS[type(record)](builder, record, entry_index)
    return builder.build(entry_index)


def image_to_records(image: MetadataImage) -> list[MetadataRecord]:
    """Return records that, applied to an empty image at `image.last_applied_index`, rebuild
    an image equal to `image` (a snapshot). Ordered: cluster id, brokers by id, topics by
    name each followed by its partitions, configs, producer ids, decommissioned brokers."""
    records: list[MetadataRecord] = []
    if image.cluster_id is not None:
        records.append(ClusterIdRecord(cluster_id=image.cluster_id))
    for broker_id in sorted(image.brokers):
        broker = image.brokers[broker_id]
        records.append(
            BrokerSnapshotRecord(
                broker_id=broker.broker_id,
                incarnation_id=broker.incarnation_id,
                broker_epoch=broker.epoch,
                listeners=broker.listeners,
                rack=broker.rack,
                fenced=broker.fenced,
                shut_down=broker.shut_down,
            )
        )
    for name in sorted(image.topics):
        topic = image.topics[name]
        records.append(TopicRecord(name=name, topic_id=topic.topic_id))
        records.extend(
            PartitionRecord(
                topic_id=topic.topic_id,
                partition=partition.partition,
                replicas=partition.replicas,
                isr=partition.isr,
                leader=partition.leader,
                leader_epoch=partition.leader_epoch,
                partition_epoch=partition.partition_epoch,
                adding_replicas=partition.adding_replicas,
                removing_replicas=partition.removing_replicas,
            )
            for partition in topic.partitions
        )
    for resource in sorted(image.configs):
        entries = image.configs[resource]
        records.extend(
            ConfigRecord(
                resource_type=resource[0], resource_name=resource[1], name=name, value=value
            )
            for name, value in sorted(entries.items())
        )
    if image.next_producer_id > 0:
        records.append(ProducerIdsRecord(next_producer_id=image.next_producer_id))
    records.extend(
        BrokerDecommissionRecord(broker_id=broker_id, decommissioned=True)
        for broker_id in sorted(image.decommissioned)
    )
    return records


def image_from_records(records: Iterable[MetadataRecord], *, index: int) -> MetadataImage:
    """Return the image a snapshot's records describe, as of entry `index` (> 0)."""
    return apply(EMPTY_IMAGE, records, entry_index=index)


class _ImageBuilder:
    """The image being built by one `apply`: copies a map of the base image on first write."""

    def __init__(self, base: MetadataImage) -> None:
        self.base = base
        self.cluster_id = base.cluster_id
        self.next_producer_id = base.next_producer_id
        self.decommissioned = base.decommissioned
        self.brokers: Mapping[int, BrokerInfo] = base.brokers
        self.topics: Mapping[str, TopicInfo] = base.topics
        self.topics_by_id: Mapping[bytes, TopicInfo] = base.topics_by_id
        self.configs: Mapping[ConfigResource, Mapping[str, str]] = base.configs
        self._brokers: dict[int, BrokerInfo] | None = None
        self._topics: dict[str, TopicInfo] | None = None
        self._topics_by_id: dict[bytes, TopicInfo] | None = None
        self._configs: dict[ConfigResource, Mapping[str, str]] | None = None
        self._replica_counts: dict[int, int] | None = None
        self._leader_counts: dict[int, int] | None = None
        # Partitions of the topics this entry changes, frozen into their TopicInfo by build():
        # a fence that moves a thousand partitions of one topic copies its tuple once.
        self._partitions: dict[bytes, list[PartitionInfo]] = {}

    def partitions(self, topic: TopicInfo) -> list[PartitionInfo] | tuple[PartitionInfo, ...]:
        """The topic's partitions as of the records applied so far."""
        return self._partitions.get(topic.topic_id, topic.partitions)

    def set_partition(self, topic: TopicInfo, partition: PartitionInfo) -> None:
        """Replace partition `partition.partition` of `topic`, or add it right after the last."""
        partitions = self._partitions.get(topic.topic_id)
        if partitions is None:
            partitions = self._partitions[topic.topic_id] = list(topic.partitions)
        if partition.partition == len(partitions):
            partitions.append(partition)
        else:
            self._count(partitions[partition.partition].replicas, -1)
            partitions[partition.partition] = partition
        self._count(partition.replicas, +1)

    def _count(self, replicas: tuple[int, ...], step: int) -> None:
        """Add `step` to the load counts of a partition's replicas (and preferred leader)."""
        if not replicas:
            return
        if self._replica_counts is None or self._leader_counts is None:
            self._replica_counts = dict(self.base.replica_counts)
            self._leader_counts = dict(self.base.preferred_leader_counts)
        for counts, brokers in (
            (self._replica_counts, replicas),
            (self._leader_counts, replicas[:1]),
        ):
            for broker_id in brokers:
                count = counts.get(broker_id, 0) + step
                if count:
                    counts[broker_id] = count
                else:
                    del counts[broker_id]

    def set_broker(self, broker: BrokerInfo) -> None:
        if self._brokers is None:
            self._brokers = dict(self.base.brokers)
            self.brokers = self._brokers
        self._brokers[broker.broker_id] = broker

    def set_topic(self, topic: TopicInfo) -> None:
        topics, topics_by_id = self._writable_topics()
        topics[topic.name] = topic
        topics_by_id[topic.topic_id] = topic

    def remove_topic(self, topic: TopicInfo) -> None:
        for partition in self.partitions(topic):
            self._count(partition.replicas, -1)
        topics, topics_by_id = self._writable_topics()
        del topics[topic.name]
        del topics_by_id[topic.topic_id]
        self._partitions.pop(topic.topic_id, None)
        self.set_configs((ConfigResourceType.TOPIC, topic.name), {})

    def set_configs(self, resource: ConfigResource, entries: Mapping[str, str]) -> None:
        if not entries and resource not in self.configs:
            return
        if self._configs is None:
            self._configs = dict(self.base.configs)
            self.configs = self._configs
        if entries:
            self._configs[resource] = MappingProxyType(dict(entries))
        else:
            del self._configs[resource]

    def _writable_topics(self) -> tuple[dict[str, TopicInfo], dict[bytes, TopicInfo]]:
        if self._topics is None or self._topics_by_id is None:
            self._topics = dict(self.base.topics)
            self._topics_by_id = dict(self.base.topics_by_id)
            self.topics, self.topics_by_id = self._topics, self._topics_by_id
        return self._topics, self._topics_by_id

    def build(self, entry_index: int) -> MetadataImage:
        for topic_id, partitions in self._partitions.items():
            topic = self.topics_by_id[topic_id]
            self.set_topic(replace(topic, partitions=tuple(partitions)))
        return MetadataImage(
            cluster_id=self.cluster_id,
            brokers=_read_only(self._brokers, self.base.brokers),
            topics=_read_only(self._topics, self.base.topics),
            topics_by_id=_read_only(self._topics_by_id, self.base.topics_by_id),
            configs=_read_only(self._configs, self.base.configs),
            next_producer_id=self.next_producer_id,
            decommissioned=self.decommissioned,
            last_applied_index=entry_index,
            replica_counts=_read_only(self._replica_counts, self.base.replica_counts),
            preferred_leader_counts=_read_only(
                self._leader_counts, self.base.preferred_leader_counts
            ),
        )


def _read_only(copy: dict[Any, Any] | None, unchanged: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return unchanged if copy is None else MappingProxyType(copy)


# ------------------------------------------------------------------- one function per record


def _apply_cluster_id(builder: _ImageBuilder, record: ClusterIdRecord, index: int) -> None:
    if builder.cluster_id is None:  # the first one wins; the cluster id never changes
        builder.cluster_id = record.cluster_id


def _apply_register_broker(
    builder: _ImageBuilder, record: RegisterBrokerRecord, index: int
) -> None:
    builder.set_broker(
        BrokerInfo(
            broker_id=record.broker_id,
            incarnation_id=record.incarnation_id,
            epoch=index,
            listeners=record.listeners,
            rack=record.rack,
            fenced=record.fenced,
            shut_down=False,
        )
    )


def _apply_broker_snapshot(
    builder: _ImageBuilder, record: BrokerSnapshotRecord, index: int
) -> None:
    builder.set_broker(
        BrokerInfo(
            broker_id=record.broker_id,
            incarnation_id=record.incarnation_id,
            epoch=record.broker_epoch,
            listeners=record.listeners,
            rack=record.rack,
            fenced=record.fenced,
            shut_down=record.shut_down,
        )
    )


def _current_broker(
    builder: _ImageBuilder, record: FenceBrokerRecord | UnfenceBrokerRecord | BrokerShutdownRecord
) -> BrokerInfo | None:
    broker = builder.brokers.get(record.broker_id)
    if broker is None or broker.epoch != record.broker_epoch:
        return None  # an older incarnation's record: no-op
    return broker


def _apply_fence_broker(builder: _ImageBuilder, record: FenceBrokerRecord, index: int) -> None:
    broker = _current_broker(builder, record)
    if broker is not None and not broker.fenced:
        builder.set_broker(replace(broker, fenced=True))


def _apply_unfence_broker(builder: _ImageBuilder, record: UnfenceBrokerRecord, index: int) -> None:
    broker = _current_broker(builder, record)
    if broker is not None and broker.fenced and not broker.shut_down:
        builder.set_broker(replace(broker, fenced=False))


def _apply_broker_shutdown(
    builder: _ImageBuilder, record: BrokerShutdownRecord, index: int
) -> None:
    broker = _current_broker(builder, record)
    if broker is not None and not broker.shut_down:
        builder.set_broker(replace(broker, fenced=True, shut_down=True))


def _apply_topic(builder: _ImageBuilder, record: TopicRecord, index: int) -> None:
    if record.name in builder.topics or record.topic_id in builder.topics_by_id:
        return
    builder.set_topic(TopicInfo(name=record.name, topic_id=record.topic_id, partitions=()))


def _apply_remove_topic(builder: _ImageBuilder, record: RemoveTopicRecord, index: int) -> None:
    topic = builder.topics_by_id.get(record.topic_id)
    if topic is not None:
        builder.remove_topic(topic)


def _apply_partition(builder: _ImageBuilder, record: PartitionRecord, index: int) -> None:
    topic = builder.topics_by_id.get(record.topic_id)
    if topic is None or record.partition != len(builder.partitions(topic)):
        return  # partitions are only ever added, in order; an existing one is never replaced
    partition = PartitionInfo(
        partition=record.partition,
        replicas=record.replicas,
        isr=record.isr,
        leader=record.leader,
        leader_epoch=record.leader_epoch,
        partition_epoch=record.partition_epoch,
        adding_replicas=record.adding_replicas,
        removing_replicas=record.removing_replicas,
    )
    builder.set_partition(topic, partition)


def _apply_partition_change(
    builder: _ImageBuilder, record: PartitionChangeRecord, index: int
) -> None:
    topic = builder.topics_by_id.get(record.topic_id)
    if topic is None or not record.partition < len(builder.partitions(topic)):
        return
    current = builder.partitions(topic)[record.partition]
    if record.expected_partition_epoch != current.partition_epoch:
        return  # decided on an older state of the partition: the compare-and-swap failed
    replicas = current.replicas if record.replicas is None else record.replicas
    isr = current.isr if record.isr is None else record.isr
    leader = current.leader if record.leader is None else record.leader
    adding = _unless_none(record.adding_replicas, current.adding_replicas)
    removing = _unless_none(record.removing_replicas, current.removing_replicas)
    if not set(isr) <= set(replicas) or (leader != NO_LEADER and leader not in isr):
        return
    if not set(adding) | set(removing) <= set(replicas) or set(adding) & set(removing):
        return
    leader_epoch = current.leader_epoch + (1 if leader != current.leader else 0)
    if current.partition_epoch == INT32_MAX or leader_epoch > INT32_MAX:
        return
    changed = PartitionInfo(
        partition=current.partition,
        replicas=replicas,
        isr=isr,
        leader=leader,
        leader_epoch=leader_epoch,
        partition_epoch=current.partition_epoch + 1,
        adding_replicas=adding,
        removing_replicas=removing,
    )
    builder.set_partition(topic, changed)


def _unless_none(value: tuple[int, ...] | None, current: tuple[int, ...]) -> tuple[int, ...]:
    return current if value is None else value


def _apply_config(builder: _ImageBuilder, record: ConfigRecord, index: int) -> None:
    resource = (record.resource_type, record.resource_name)
    if record.resource_type is ConfigResourceType.TOPIC and record.resource_name not in (
        builder.topics
    ):
        return
    entries = dict(builder.configs.get(resource, {}))
    if record.value is None:
        entries.pop(record.name, None)
    else:
        entries[record.name] = record.value
    builder.set_configs(resource, entries)


def _apply_producer_ids(builder: _ImageBuilder, record: ProducerIdsRecord, index: int) -> None:
    builder.next_producer_id = max(builder.next_producer_id, record.next_producer_id)


def _apply_broker_decommission(
    builder: _ImageBuilder, record: BrokerDecommissionRecord, index: int
) -> None:
    if record.decommissioned:
        builder.decommissioned = builder.decommissioned | {record.broker_id}
    else:
        builder.decommissioned = builder.decommissioned - {record.broker_id}


_APPLIERS: dict[type, Callable[[_ImageBuilder, Any, int], None]] = {
    ClusterIdRecord: _apply_cluster_id,
    RegisterBrokerRecord: _apply_register_broker,
    BrokerSnapshotRecord: _apply_broker_snapshot,
    FenceBrokerRecord: _apply_fence_broker,
    UnfenceBrokerRecord: _apply_unfence_broker,
    BrokerShutdownRecord: _apply_broker_shutdown,
    TopicRecord: _apply_topic,
    RemoveTopicRecord: _apply_remove_topic,
    PartitionRecord: _apply_partition,
    PartitionChangeRecord: _apply_partition_change,
    ConfigRecord: _apply_config,
    ProducerIdsRecord: _apply_producer_ids,
    BrokerDecommissionRecord: _apply_broker_decommission,
}
