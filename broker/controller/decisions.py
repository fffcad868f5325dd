"""The active controller's decisions: pure functions `image + request -> records | error`.

Theory of operation
-------------------
The active controller turns each request into the metadata records that say what happened,
proposes them as one Raft entry, and answers once the entry is committed and applied. Every
decision here reads only the image it is given and returns either the records of that one
entry (possibly none: nothing to do) or a `DwalError` saying why the request is refused
(returned, not raised, so a batch of requests gets one result each). Nothing is changed, no
I/O happens, no clock or random source is read: topic ids and incarnation ids arrive in the
request. So decisions are unit-tested alone, and a decision taken on an image that is stale
by the time its entry commits is harmless: its PartitionChangeRecords carry the partition
epoch they were based on and become no-ops (see metadata_image).

Leadership follows KRaft's rules: a partition's leader is in its ISR, the ISR is within its
replicas, and a fenced (or shut down) broker leads nothing and leaves every ISR in which it
is not the last member. When a leader is fenced, the next leader is the first replica (in
replica order) that is in the ISR and not fenced; with none, the partition has no leader
(unclean election stays off) until a member of its ISR is unfenced. Every leader change bumps
the leader epoch (done by apply).

Every record a decision returns encodes (see `encode_entry`) under the default limits: the
sizes of what a request asks for are checked here and refused as errors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from broker.controller.metadata_image import (
    BrokerInfo,
    MetadataImage,
    PartitionInfo,
    TopicInfo,
    apply,
)
from broker.controller.metadata_records import (
    DEFAULT_LIMITS,
    INT32_MAX,
    INT64_MAX,
    NO_LEADER,
    BrokerShutdownRecord,
    ConfigRecord,
    ConfigResourceType,
    FenceBrokerRecord,
    Listener,
    MetadataEncodeError,
    MetadataLimits,
    MetadataRecord,
    PartitionChangeRecord,
    PartitionRecord,
    ProducerIdsRecord,
    RegisterBrokerRecord,
    RemoveTopicRecord,
    TopicRecord,
    UnfenceBrokerRecord,
    encode_entry,
)
from broker.controller.replica_placement import PlacementBroker, place_replicas
from broker.limits import Limits
from protocol.errors import DwalError, ErrorCode
from protocol.topic_name import validate_topic_name

Decision = list[MetadataRecord] | DwalError
"""The records of one entry to propose (empty: nothing to do), or why the request is refused."""

TopicPartition = tuple[str, int]

# The broker's limit, until the controller is given the broker's Limits.
PARTITIONS_PER_TOPIC_MAX = Limits().partitions_per_topic_max


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True, kw_only=True, slots=True)
class BrokerRegistration:
    broker_id: int
    incarnation_id: bytes  # 16-byte uuid, new each time the broker process starts
    listeners: tuple[Listener, ...]
    rack: str | None = None
    cluster_id: str | None = None  # the cluster the broker's data dir belongs to, if any


@dataclass(frozen=True, kw_only=True, slots=True)
class NewTopic:
    name: str
    partitions: int
    replication_factor: int
    topic_id: bytes  # a fresh random 16-byte uuid, chosen by the caller
    configs: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, kw_only=True, slots=True)
class AlterPartitionRequest:
    """A partition leader asks to change its ISR, based on the state it knows."""

    broker_id: int  # the leader asking
    broker_epoch: int
    topic_id: bytes
    partition: int
    leader_epoch: int  # the leader epoch it leads in
    partition_epoch: int  # the partition epoch its view of the ISR comes from
    isr: tuple[int, ...]  # the ISR it wants


# ----------------------------------------------------------------------------- brokers


def register_broker(image: MetadataImage, registration: BrokerRegistration) -> Decision:
    """Register a broker (fenced until `unfence_broker`); its epoch will be the entry's index.

    Returns [] when this incarnation is already registered (a retry), else the
    RegisterBrokerRecord, preceded by the changes that move leadership and ISR membership
    away from the broker's previous incarnation (it is gone). Refuses INVALID_REQUEST for a
    malformed registration, INCONSISTENT_CLUSTER_ID for another cluster's broker,
    DUPLICATE_BROKER_REGISTRATION for the same incarnation with other details.
    Whether an older incarnation's session is still alive is the caller's to check.
    """
    if (
        registration.cluster_id is not None
        and image.cluster_id is not None
        and registration.cluster_id != image.cluster_id
    ):
        return DwalError(
            ErrorCode.INCONSISTENT_CLUSTER_ID,
            f"broker {registration.broker_id} belongs to cluster {registration.cluster_id!r}, "
            f"this is {image.cluster_id!r}",
        )
    if not registration.listeners or not all(
        isinstance(listener, tuple) and len(listener) == 3 for listener in registration.listeners
    ):
        return DwalError(
            ErrorCode.INVALID_REQUEST, "a broker registers listeners (name, host, port)"
        )
    listeners = tuple(Listener(*listener) for listener in registration.listeners)
    record = RegisterBrokerRecord(
        broker_id=registration.broker_id,
        incarnation_id=registration.incarnation_id,
        listeners=listeners,
        rack=registration.rack,
        fenced=True,
    )
    problem = _unencodable([record])
    if problem is not None:
        return DwalError(ErrorCode.INVALID_REQUEST, f"invalid broker registration: {problem}")
    existing = image.brokers.get(registration.broker_id)
    if (
        existing is not None
        and existing.incarnation_id == registration.incarnation_id
        and not existing.shut_down
    ):
        if (existing.listeners, existing.rack) != (listeners, registration.rack):
            return DwalError(
                ErrorCode.DUPLICATE_BROKER_REGISTRATION,
                f"broker {registration.broker_id} registered this incarnation with other "
                "listeners or rack",
            )
        return []
    moves = _move_away_from(image, registration.broker_id)
    return [*moves, record]


def fence_broker(image: MetadataImage, broker_id: int, broker_epoch: int) -> Decision:
    """Fence a broker (it missed its session): it leads nothing and leaves the ISRs.

    Returns the FenceBrokerRecord (unless already fenced) followed by one change per
    partition the broker is in the ISR of: leadership moves to the first replica in the ISR
    that is not fenced (or to no leader), and the broker leaves the ISR unless it is its last
    member. Refuses BROKER_NOT_AVAILABLE for an unknown broker and
    STALE_BROKER_EPOCH when `broker_epoch` is not the registered one.
    """
    broker = _registered(image, broker_id, broker_epoch)
    if isinstance(broker, DwalError):
        return broker
    records: list[MetadataRecord] = []
    if not broker.fenced:
        records.append(FenceBrokerRecord(broker_id=broker_id, broker_epoch=broker_epoch))
    records.extend(_move_away_from(image, broker_id))
    return records


def shutdown_broker(image: MetadataImage, broker_id: int, broker_epoch: int) -> Decision:
    """A controlled shutdown: like `fence_broker`, with a BrokerShutdownRecord (the broker
    must register again to be unfenced). Refuses as `fence_broker` does."""
    broker = _registered(image, broker_id, broker_epoch)
    if isinstance(broker, DwalError):
        return broker
    records: list[MetadataRecord] = []
    if not broker.shut_down:
        records.append(BrokerShutdownRecord(broker_id=broker_id, broker_epoch=broker_epoch))
    records.extend(_move_away_from(image, broker_id))
    return records


def unfence_broker(image: MetadataImage, broker_id: int, broker_epoch: int) -> Decision:
    """Unfence a broker that caught up with the metadata log.

    Returns [] when it is not fenced, else the UnfenceBrokerRecord followed by a change
    electing it leader of every leaderless partition whose ISR holds it (leader epoch +1).
    Refuses BROKER_NOT_AVAILABLE for an unknown or shut down broker (it must
    register again) and STALE_BROKER_EPOCH for another epoch.
    """
    broker = _registered(image, broker_id, broker_epoch)
    if isinstance(broker, DwalError):
        return broker
    if broker.shut_down:
        return DwalError(
            ErrorCode.BROKER_NOT_AVAILABLE, f"broker {broker_id} shut down: register again"
        )
    if not broker.fenced:
        return []
    records: list[MetadataRecord] = [
        UnfenceBrokerRecord(broker_id=broker_id, broker_epoch=broker_epoch)
    ]
    for topic, partition in _partitions(image):
        if partition.leader == NO_LEADER and broker_id in partition.isr:
            records.append(_change(topic, partition, leader=broker_id))
    return records


def _registered(image: MetadataImage, broker_id: int, broker_epoch: int) -> BrokerInfo | DwalError:
    broker = image.brokers.get(broker_id)
    if broker is None:
        return DwalError(ErrorCode.BROKER_NOT_AVAILABLE, f"broker {broker_id} is not registered")
    if broker.epoch != broker_epoch:
        return DwalError(
            ErrorCode.STALE_BROKER_EPOCH,
            f"broker {broker_id} has epoch {broker.epoch}, not {broker_epoch}",
        )
    return broker


def _move_away_from(image: MetadataImage, broker_id: int) -> list[MetadataRecord]:
    """The changes that take `broker_id` out of every ISR (but as a last member) and give
    the partitions it leads to another eligible ISR member, or to no leader."""
    records: list[MetadataRecord] = []
    for topic, partition in _partitions(image):
        if broker_id not in partition.isr:
            continue
        isr = tuple(member for member in partition.isr if member != broker_id) or partition.isr
        leader = partition.leader
        if leader == broker_id:
            leader = next(
                (
                    replica
                    for replica in partition.replicas
                    if replica != broker_id and replica in isr and _eligible(image, replica)
                ),
                NO_LEADER,
            )
        if (isr, leader) != (partition.isr, partition.leader):
            records.append(_change(topic, partition, isr=isr, leader=leader))
    return records


def _eligible(image: MetadataImage, broker_id: int) -> bool:
    """Whether the broker may lead or join an ISR: registered, not fenced, not shut down."""
    broker = image.brokers.get(broker_id)
    return broker is not None and not broker.fenced and not broker.shut_down


# ----------------------------------------------------------------------------- topics


def create_topic(
    image: MetadataImage,
    new_topic: NewTopic,
    *,
    partitions_max: int = PARTITIONS_PER_TOPIC_MAX,
    limits: MetadataLimits = DEFAULT_LIMITS,
) -> Decision:
    """Create a topic: one entry of its TopicRecord, its PartitionRecords (replicas placed
    by `place_replicas`, ISR = replicas, leader = first replica, epochs 0) and its
    ConfigRecords.

    Refuses INVALID_TOPIC (bad name), TOPIC_ALREADY_EXISTS, INVALID_PARTITIONS (not in
    1..partitions_max, or too large for one entry), INVALID_REPLICATION_FACTOR (below 1 or
    above the unfenced brokers), INVALID_CONFIG, INVALID_REQUEST (bad or taken topic id).
    """
    problem = validate_topic_name(new_topic.name)
    if problem is not None:
        return DwalError(ErrorCode.INVALID_TOPIC, problem)
    if new_topic.name in image.topics:
        return DwalError(ErrorCode.TOPIC_ALREADY_EXISTS, f"topic {new_topic.name!r} already exists")
    if not 1 <= new_topic.partitions <= partitions_max:
        return DwalError(
            ErrorCode.INVALID_PARTITIONS,
            f"a topic has 1 to {partitions_max} partitions, not {new_topic.partitions}",
        )
    refusal = _check_replication_factor(image, new_topic.replication_factor, limits)
    if refusal is not None:
        return refusal
    topic_record = TopicRecord(name=new_topic.name, topic_id=new_topic.topic_id)
    if _unencodable([topic_record]) is not None:
        return DwalError(ErrorCode.INVALID_REQUEST, "a topic id is a non-zero 16-byte uuid")
    if new_topic.topic_id in image.topics_by_id:
        return DwalError(ErrorCode.INVALID_REQUEST, "topic id already in use: choose another")
    config_records = _config_records(
        ConfigResourceType.TOPIC, new_topic.name, dict(new_topic.configs)
    )
    if isinstance(config_records, DwalError):
        return config_records
    refusal = _check_entry_size(
        new_topic.partitions, new_topic.replication_factor, [topic_record, *config_records], limits
    )
    if refusal is not None:
        return refusal
    partitions = _new_partitions(
        image, new_topic.topic_id, 0, new_topic.partitions, new_topic.replication_factor
    )
    return [topic_record, *partitions, *config_records]


def create_topics(
    image: MetadataImage,
    new_topics: Sequence[NewTopic],
    *,
    partitions_max: int = PARTITIONS_PER_TOPIC_MAX,
    limits: MetadataLimits = DEFAULT_LIMITS,
) -> dict[str, Decision]:
    """`create_topic` for each topic in order, each placed as if the ones before it (that
    were not refused) existed. Each result is one entry's records. A name given more than
    once is refused INVALID_REQUEST (every copy), as Kafka does."""
    counts = Counter(new_topic.name for new_topic in new_topics)
    results: dict[str, Decision] = {}
    scratch = image
    for new_topic in new_topics:
        if counts[new_topic.name] > 1:
            results[new_topic.name] = DwalError(
                ErrorCode.INVALID_REQUEST, f"topic {new_topic.name!r} given more than once"
            )
            continue
        decision = create_topic(scratch, new_topic, partitions_max=partitions_max, limits=limits)
        results[new_topic.name] = decision
        if not isinstance(decision, DwalError):
            scratch = apply(scratch, decision, entry_index=scratch.last_applied_index + 1)
    return results


def delete_topic(image: MetadataImage, name: str) -> Decision:
    """Delete a topic: [RemoveTopicRecord]. Refuses UNKNOWN_TOPIC_OR_PARTITION."""
    topic = image.topics.get(name)
    if topic is None:
        return DwalError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"no topic {name!r}")
    return [RemoveTopicRecord(topic_id=topic.topic_id)]


def create_partitions(
    image: MetadataImage,
    name: str,
    count: int,
    *,
    partitions_max: int = PARTITIONS_PER_TOPIC_MAX,
    limits: MetadataLimits = DEFAULT_LIMITS,
) -> Decision:
    """Grow a topic to `count` partitions: the new PartitionRecords, placed like a new
    topic's with the replication factor of its partition 0.

    Refuses UNKNOWN_TOPIC_OR_PARTITION, INVALID_PARTITIONS (count not above the current
    count, above partitions_max, or too large for one entry), INVALID_REPLICATION_FACTOR
    (fewer unfenced brokers than the topic's replication factor).
    """
    topic = image.topics.get(name)
    if topic is None:
        return DwalError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"no topic {name!r}")
    current = len(topic.partitions)
    if not current < count <= partitions_max:
        return DwalError(
            ErrorCode.INVALID_PARTITIONS,
            f"topic {name!r} has {current} partitions; it can grow to at most "
            f"{partitions_max}, not to {count}",
        )
    if not topic.partitions:
        return DwalError(ErrorCode.INVALID_PARTITIONS, f"topic {name!r} has no partition 0")
    replication_factor = len(topic.partitions[0].replicas)
    refusal = _check_replication_factor(image, replication_factor, limits)
    if refusal is None:
        refusal = _check_entry_size(count - current, replication_factor, [], limits)
    if refusal is not None:
        return refusal
    return _new_partitions(image, topic.topic_id, current, count - current, replication_factor)


def _check_replication_factor(
    image: MetadataImage, replication_factor: int, limits: MetadataLimits
) -> DwalError | None:
    available = len(_placement_brokers(image))
    if not 1 <= replication_factor <= min(available, limits.replicas_max):
        return DwalError(
            ErrorCode.INVALID_REPLICATION_FACTOR,
            f"replication factor {replication_factor} needs 1 to {limits.replicas_max} "
            f"unfenced brokers; {available} are available",
        )
    return None


def _check_entry_size(
    partitions: int,
    replication_factor: int,
    other_records: list[MetadataRecord],
    limits: MetadataLimits,
) -> DwalError | None:
    # A PartitionRecord encodes in at most 50 bytes plus 10 per replica (two lists of ints
    # of at most 5 bytes each); the other records are measured, plus 5 for the array header.
    try:
        other_bytes = len(encode_entry(other_records, limits=limits)) if other_records else 0
    except MetadataEncodeError:
        return DwalError(ErrorCode.INVALID_CONFIG, "the configs do not fit one metadata entry")
    bytes_max = partitions * (50 + 10 * replication_factor) + other_bytes + 5
    if (
        partitions + len(other_records) > limits.records_per_entry_max
        or bytes_max > limits.entry_bytes_max
    ):
        return DwalError(
            ErrorCode.INVALID_PARTITIONS,
            f"{partitions} partitions of {replication_factor} replicas do not fit one "
            "metadata entry",
        )
    return None


def _placement_brokers(image: MetadataImage) -> list[PlacementBroker]:
    return [
        PlacementBroker(broker_id=broker.broker_id, rack=broker.rack)
        for broker in sorted(image.brokers.values(), key=lambda broker: broker.broker_id)
        if _eligible(image, broker.broker_id)
    ]


def _new_partitions(
    image: MetadataImage, topic_id: bytes, first: int, count: int, replication_factor: int
) -> list[MetadataRecord]:
    placements = place_replicas(
        _placement_brokers(image),
        partition_count=count,
        replication_factor=replication_factor,
        replica_counts=image.replica_counts,
        leader_counts=image.preferred_leader_counts,
    )
    return [
        PartitionRecord(
            topic_id=topic_id,
            partition=first + offset,
            replicas=replicas,
            isr=replicas,
            leader=replicas[0],
            leader_epoch=0,
            partition_epoch=0,
        )
        for offset, replicas in enumerate(placements)
    ]


# ----------------------------------------------------------------------------- configs


def alter_configs(
    image: MetadataImage,
    resource_type: ConfigResourceType,
    resource_name: str,
    changes: Mapping[str, str | None],
) -> Decision:
    """Set (value) or delete (None) configuration entries of a topic or a broker ("" for
    every broker): one ConfigRecord per change that changes something, by name.

    Refuses UNKNOWN_TOPIC_OR_PARTITION for an unknown topic, INVALID_CONFIG for a bad name
    or value, INVALID_REQUEST for a bad broker resource name.
    """
    if resource_type is ConfigResourceType.TOPIC and resource_name not in image.topics:
        return DwalError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"no topic {resource_name!r}")
    current = image.configs.get((resource_type, resource_name), {})
    wanted = {name: value for name, value in changes.items() if current.get(name) != value}
    if resource_type is ConfigResourceType.BROKER:
        probe = ConfigRecord(
            resource_type=resource_type, resource_name=resource_name, name="probe", value=None
        )
        if _unencodable([probe]) is not None:
            return DwalError(
                ErrorCode.INVALID_REQUEST, f"{resource_name!r} is not a broker id or ''"
            )
    return _config_records(resource_type, resource_name, wanted)


def _config_records(
    resource_type: ConfigResourceType, resource_name: str, changes: Mapping[str, str | None]
) -> list[MetadataRecord] | DwalError:
    records: list[MetadataRecord] = [
        ConfigRecord(
            resource_type=resource_type, resource_name=resource_name, name=name, value=value
        )
        for name, value in sorted(changes.items())
    ]
    for record in records:
        problem = _unencodable([record])
        if problem is not None:
            return DwalError(ErrorCode.INVALID_CONFIG, f"invalid config: {problem}")
    return records


# ----------------------------------------------------------------------------- partitions


def alter_partition(image: MetadataImage, request: AlterPartitionRequest) -> Decision:
    """A leader's ISR change: [PartitionChangeRecord] based on the current partition epoch,
    or [] when the ISR asked for is the current one.

    Refuses, in this order: STALE_BROKER_EPOCH when the broker or its epoch is not
    the registered one; UNKNOWN_TOPIC_OR_PARTITION; NOT_LEADER_OR_FOLLOWER when the broker is
    not the partition's leader; FENCED_LEADER_EPOCH when the leader epoch is not
    the current one; INVALID_UPDATE_VERSION when the partition epoch is not the
    current one (the leader must learn the current ISR first); INVALID_REQUEST when the new
    ISR has duplicates, lacks the leader or is not within the replicas; INELIGIBLE_REPLICA
    when a new member is not an unfenced registered broker.
    """
    broker = _registered(image, request.broker_id, request.broker_epoch)
    if isinstance(broker, DwalError):
        return DwalError(ErrorCode.STALE_BROKER_EPOCH, broker.message)
    topic = image.topics_by_id.get(request.topic_id)
    if topic is None or not 0 <= request.partition < len(topic.partitions):
        return DwalError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, "no such topic id and partition")
    partition = topic.partitions[request.partition]
    where = f"{topic.name}-{request.partition}"
    if request.broker_id != partition.leader:
        return DwalError(
            ErrorCode.NOT_LEADER_OR_FOLLOWER,
            f"broker {request.broker_id} does not lead {where} (leader {partition.leader})",
        )
    if request.leader_epoch != partition.leader_epoch:
        return DwalError(
            ErrorCode.FENCED_LEADER_EPOCH,
            f"{where} is at leader epoch {partition.leader_epoch}, not {request.leader_epoch}",
        )
    if request.partition_epoch != partition.partition_epoch:
        return DwalError(
            ErrorCode.INVALID_UPDATE_VERSION,
            f"{where} is at partition epoch {partition.partition_epoch}, "
            f"not {request.partition_epoch}",
        )
    isr = tuple(request.isr)
    if (
        len(set(isr)) != len(isr)
        or partition.leader not in isr
        or not set(isr) <= set(partition.replicas)
    ):
        return DwalError(
            ErrorCode.INVALID_REQUEST,
            f"ISR {list(isr)} of {where} must be distinct replicas including the leader",
        )
    ineligible = [member for member in isr if not _eligible(image, member)]
    if ineligible:
        return DwalError(
            ErrorCode.INELIGIBLE_REPLICA, f"brokers {ineligible} are fenced or unknown"
        )
    if isr == partition.isr:
        return []
    return [_change(topic, partition, isr=isr)]


def elect_preferred_leader(
    image: MetadataImage, topic_name: str, partition_number: int
) -> Decision:
    """Make the partition's first replica its leader again (preferred-leader election).

    Returns [] when it already leads (Kafka's ELECTION_NOT_NEEDED), else the change.
    Refuses UNKNOWN_TOPIC_OR_PARTITION, and PREFERRED_LEADER_NOT_AVAILABLE when
    the preferred leader is not in the ISR or not an unfenced registered broker.
    """
    topic = image.topics.get(topic_name)
    if topic is None or not 0 <= partition_number < len(topic.partitions):
        return DwalError(
            ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"no partition {topic_name}-{partition_number}"
        )
    partition = topic.partitions[partition_number]
    preferred = partition.preferred_leader
    if partition.leader == preferred:
        return []
    if preferred not in partition.isr or not _eligible(image, preferred):
        return DwalError(
            ErrorCode.PREFERRED_LEADER_NOT_AVAILABLE,
            f"preferred leader {preferred} of {topic_name}-{partition_number} is not an "
            "unfenced member of the ISR",
        )
    return [_change(topic, partition, leader=preferred)]


def elect_leaders(
    image: MetadataImage, partitions: Iterable[TopicPartition] | None = None
) -> dict[TopicPartition, Decision]:
    """`elect_preferred_leader` for each partition given; with None, for every partition
    not led by its preferred leader (automatic leader rebalancing), by topic name and number.
    The records of all results may go in one entry: each concerns another partition."""
    if partitions is None:
        partitions = [
            (topic.name, partition.partition)
            for topic, partition in _partitions(image)
            if partition.leader != partition.preferred_leader
        ]
    return {
        (topic, number): elect_preferred_leader(image, topic, number)
        for topic, number in partitions
    }


# ----------------------------------------------------------------------------- producer ids

PRODUCER_ID_BLOCK_SIZE = 1000  # as Kafka's controller hands them out (KIP-730)


def allocate_producer_ids(
    image: MetadataImage,
    broker_id: int,
    broker_epoch: int,
    block_size: int = PRODUCER_ID_BLOCK_SIZE,
) -> Decision:
    """Hand a registered broker the block of producer ids [image.next_producer_id,
    + block_size): the record moves the image's next id past it, so once committed no other
    broker, and no controller after a failover, hands out those ids again. The caller reads
    the block's start from the image it decided on. Refuses as `fence_broker` does for an
    unknown broker or another epoch, and UNKNOWN_SERVER_ERROR when the id space is spent."""
    assert block_size > 0
    broker = _registered(image, broker_id, broker_epoch)
    if isinstance(broker, DwalError):
        return broker
    next_producer_id = image.next_producer_id + block_size
    if next_producer_id > INT64_MAX:
        return DwalError(ErrorCode.UNKNOWN_SERVER_ERROR, "every producer id has been handed out")
    return [ProducerIdsRecord(next_producer_id=next_producer_id)]


# ----------------------------------------------------------------------------- shared


def _partitions(image: MetadataImage) -> Iterable[tuple[TopicInfo, PartitionInfo]]:
    """Every partition, by topic name then number (the same order on every node)."""
    for name in sorted(image.topics):
        topic = image.topics[name]
        for partition in topic.partitions:
            yield topic, partition


def _change(
    topic: TopicInfo,
    partition: PartitionInfo,
    *,
    isr: tuple[int, ...] | None = None,
    leader: int | None = None,
) -> PartitionChangeRecord:
    """A change of what differs, based on the partition's current epoch."""
    assert partition.partition_epoch < INT32_MAX, "partition epoch overflow"
    return PartitionChangeRecord(
        topic_id=topic.topic_id,
        partition=partition.partition,
        expected_partition_epoch=partition.partition_epoch,
        isr=None if isr == partition.isr else isr,
        leader=None if leader == partition.leader else leader,
    )


def _unencodable(records: list[MetadataRecord]) -> str | None:
    """Why these records would not encode, or None."""
    try:
        encode_entry(records)
    except MetadataEncodeError as error:
        return str(error)
    return None
