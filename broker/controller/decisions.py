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

A broker decision that changes every partition of one broker (fence, controlled shutdown, a
new incarnation, unfence) carries at most PARTITION_CHANGES_PER_ENTRY_MAX partition changes
besides its broker record: a broker leading 50,000 partitions would otherwise need an entry
above `records_per_entry_max`, `entry_bytes_max` and Raft's append limit. The rest is done by
`converge_leadership`, which the active controller proposes entry after entry until it returns
[]: it applies the same rules to whatever is left (leaders fenced, shut down or missing while
an eligible ISR member exists; fenced or shut down brokers in ISRs they are not the last
member of), so the image ends as one unbounded decision would have left it. Every entry on the
way keeps the invariants (each change is a whole, valid step of one partition). A fenced broker
is unfenced only once nothing is left to move away from it (`unfence_broker`): a new
incarnation, which may have lost its unsynced tail, must not keep a leadership of the old one.

Reassignment follows Kafka's KIP-455 on KRaft. While a partition moves, its replicas are
the target followed by the replicas leaving (`removing_replicas`); the new ones
(`adding_replicas`) start outside the ISR, fetch from the leader like any follower, and join
the ISR through the leader's AlterPartition once they have caught up. The move completes,
in the same record as the decision that finds it so, once EVERY target replica is in the ISR
(Kafka's rule; not only the adding ones): replicas = target, ISR = the target, leadership
(leader epoch + 1) to the first target replica in the ISR if the leader was leaving. Waiting
for the whole target matters: a target replica still in the ISR may be a broker that just
lost its unsynced tail (a power loss before it is fenced); completing a shrink to it while
another target replica is out of the ISR would leave it the only in-sync copy, and what
only the leaving replicas held would be lost. A new target is always taken
relative to the replicas before the move (`original_replicas`), so reassigning to those,
or cancelling, reverts the move; a replica that stops being added leaves at once if it is
out of the ISR, and otherwise as a replica leaving does, once every target replica is in
the ISR (dropping an in-sync copy at once lost acknowledged records in the simulation).
Every record keeps the invariants leader in ISR, ISR within replicas, adding and removing
within replicas and disjoint; a move or cancel that would leave no in-sync replica is refused.

Decommissioning a broker marks it (`BrokerDecommissionRecord`: no new replica is placed on
it) and reassigns every partition whose target holds it, putting another broker in its
place (`choose_replacement`: racks apart, load even). Automatic leader balancing
(`leader_imbalance`) is Kafka's `auto.leader.rebalance.enable`: for each broker whose share
of partitions it should lead but does not exceeds `leader.imbalance.per.broker.percentage`,
its preferred leadership is given back where it is an unfenced ISR member.

Every record a decision returns encodes (see `encode_entry`) under the default limits: the
sizes of what a request asks for are checked here and refused as errors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
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
    BrokerDecommissionRecord,
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
from broker.controller.replica_placement import (
    PlacementBroker,
    choose_replacement,
    place_replicas,
)
from broker.limits import Limits
from protocol.errors import DwalError, ErrorCode
from protocol.topic_name import validate_topic_name

Decision = list[MetadataRecord] | DwalError
"""The records of one entry to propose (empty: nothing to do), or why the request is refused."""

TopicPartition = tuple[str, int]

# Partition changes in one broker decision or `converge_leadership` step. A change of ISR and
# leader holds at most `replicas_max` (128) ISR members of 5 bytes: under 700 bytes, so 1,000
# of them and the broker record stay well under `entry_bytes_max` (1 MiB) and far under
# `records_per_entry_max` (tests/broker/controller check the worst case encodes).
PARTITION_CHANGES_PER_ENTRY_MAX = 1000

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


def register_broker(
    image: MetadataImage,
    registration: BrokerRegistration,
    *,
    changes_max: int = PARTITION_CHANGES_PER_ENTRY_MAX,
) -> Decision:
    """Register a broker (fenced until `unfence_broker`); its epoch will be the entry's index.

    Returns [] when this incarnation is already registered (a retry), else the
    RegisterBrokerRecord, preceded by at most `changes_max` of the changes that move
    leadership and ISR membership away from the broker's previous incarnation (it is gone;
    `converge_leadership` makes the rest). Refuses INVALID_REQUEST for a
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
    moves = _move_away_from(image, registration.broker_id, changes_max)
    return [*moves, record]


def fence_broker(
    image: MetadataImage,
    broker_id: int,
    broker_epoch: int,
    *,
    changes_max: int = PARTITION_CHANGES_PER_ENTRY_MAX,
) -> Decision:
    """Fence a broker (it missed its session): it leads nothing and leaves the ISRs.

    Returns the FenceBrokerRecord (unless already fenced) followed by one change per
    partition the broker is in the ISR of, for the first `changes_max` of them
    (`converge_leadership` makes the rest): leadership moves to the first replica in the ISR
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
    records.extend(_move_away_from(image, broker_id, changes_max))
    return records


def shutdown_broker(
    image: MetadataImage,
    broker_id: int,
    broker_epoch: int,
    *,
    changes_max: int = PARTITION_CHANGES_PER_ENTRY_MAX,
) -> Decision:
    """A controlled shutdown: like `fence_broker`, with a BrokerShutdownRecord (the broker
    must register again to be unfenced). Refuses as `fence_broker` does."""
    broker = _registered(image, broker_id, broker_epoch)
    if isinstance(broker, DwalError):
        return broker
    records: list[MetadataRecord] = []
    if not broker.shut_down:
        records.append(BrokerShutdownRecord(broker_id=broker_id, broker_epoch=broker_epoch))
    records.extend(_move_away_from(image, broker_id, changes_max))
    return records


def unfence_broker(
    image: MetadataImage,
    broker_id: int,
    broker_epoch: int,
    *,
    changes_max: int = PARTITION_CHANGES_PER_ENTRY_MAX,
) -> Decision:
    """Unfence a broker that caught up with the metadata log.

    Returns [] when it is not fenced. While changes moving leadership or ISR membership away
    from it are left (its fence or registration was applied in steps), returns the next
    `changes_max` of those instead: it stays fenced, and the caller asks again. Else the
    UnfenceBrokerRecord followed by a change electing it leader of each leaderless partition
    whose ISR holds it (leader epoch +1), for the first `changes_max` of them
    (`converge_leadership` elects it for the rest). Refuses BROKER_NOT_AVAILABLE for an
    unknown or shut down broker (it must register again) and STALE_BROKER_EPOCH for another
    epoch.
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
    moves = _move_away_from(image, broker_id, changes_max)
    if moves:
        return moves
    elections = (
        _change(topic, partition, leader=broker_id)
        for topic, partition in _partitions(image)
        if partition.leader == NO_LEADER and broker_id in partition.isr
    )
    return [
        UnfenceBrokerRecord(broker_id=broker_id, broker_epoch=broker_epoch),
        *islice(elections, changes_max),
    ]


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


def _move_away_from(image: MetadataImage, broker_id: int, changes_max: int) -> list[MetadataRecord]:
    """The changes that take `broker_id` out of every ISR (but as a last member) and give
    the partitions it leads to another eligible ISR member, or to no leader: the first
    `changes_max` of them."""
    assert changes_max > 0
    records: list[MetadataRecord] = []
    for topic, partition in _partitions(image):
        if len(records) == changes_max:
            break
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


def converge_leadership(
    image: MetadataImage, *, changes_max: int = PARTITION_CHANGES_PER_ENTRY_MAX
) -> list[MetadataRecord]:
    """The next `changes_max` changes that broker decisions made in steps still owe, by
    topic name and number; [] once there are none. Pure; one entry's records.

    The rules of `_move_away_from` and `unfence_broker`, for every broker at once: a fenced
    or shut down broker leaves each ISR that keeps another member (an ISR of such brokers
    only is left as it is: each of them would stay as its last member); a partition whose
    leader is fenced, shut down or missing gets the first replica (in replica order) that is
    in its ISR and eligible, or no leader. Partitions being reassigned follow the same rules
    (their move completes through AlterPartition, as after a fence).
    """
    assert changes_max > 0
    ineligible = frozenset(
        broker.broker_id for broker in image.brokers.values() if broker.fenced or broker.shut_down
    )
    records: list[MetadataRecord] = []
    for topic, partition in _partitions(image):
        leader = partition.leader
        leader_lost = leader == NO_LEADER or leader in ineligible
        if not leader_lost and ineligible.isdisjoint(partition.isr):
            continue
        isr = tuple(member for member in partition.isr if member not in ineligible)
        isr = isr or partition.isr
        if leader_lost:
            leader = _first_eligible(image, partition.replicas, isr)
        if (isr, leader) != (partition.isr, partition.leader):
            records.append(_change(topic, partition, isr=isr, leader=leader))
            if len(records) == changes_max:
                break
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
    """The brokers new replicas may go to: eligible, and not being decommissioned."""
    return [
        PlacementBroker(broker_id=broker.broker_id, rack=broker.rack)
        for broker in sorted(image.brokers.values(), key=lambda broker: broker.broker_id)
        if _eligible(image, broker.broker_id) and broker.broker_id not in image.decommissioned
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
    or [] when the ISR asked for is the current one. When the new ISR holds every target
    replica of a reassignment in progress, the same record completes it (`_completed`).

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
    shape = _completed(
        image,
        _Shape(
            partition.replicas,
            isr,
            partition.leader,
            partition.adding_replicas,
            partition.removing_replicas,
        ),
    )
    return _reshape(topic, partition, shape)


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


# ----------------------------------------------------------------------------- balancing

LEADER_ELECTIONS_PER_ENTRY_MAX = 1000  # as Kafka's controller (maxElectionsPerImbalance)


def leader_imbalance(image: MetadataImage, imbalance_percentage: int) -> list[TopicPartition]:
    """The partitions automatic leader balancing would give back to their preferred leader,
    by topic name and number: Kafka's rule (`checkAndTriggerAutoLeaderRebalance`). For each
    broker, the share of the partitions it is the preferred leader of that it does not lead;
    when that share is above `imbalance_percentage` %, each such partition whose preferred
    leader is an unfenced ISR member, and that is not being reassigned, is listed. Pure."""
    assert 0 <= imbalance_percentage <= 100
    preferred_total: Counter[int] = Counter()
    not_led: dict[int, list[tuple[TopicInfo, PartitionInfo]]] = {}
    for topic, partition in _partitions(image):
        preferred = partition.preferred_leader
        preferred_total[preferred] += 1
        if partition.leader != preferred:
            not_led.setdefault(preferred, []).append((topic, partition))
    chosen: list[TopicPartition] = []
    for broker_id, partitions in not_led.items():
        if len(partitions) * 100 <= imbalance_percentage * preferred_total[broker_id]:
            continue
        if not _eligible(image, broker_id):
            continue
        chosen.extend(
            (topic.name, partition.partition)
            for topic, partition in partitions
            if broker_id in partition.isr and not partition.reassigning
        )
    return sorted(chosen)


def elect_preferred_leaders(
    image: MetadataImage, partitions: Iterable[TopicPartition]
) -> list[MetadataRecord]:
    """The changes electing the preferred leader of each of `partitions` that it may lead
    now (the others, refused or already led by it, are skipped), as one entry. The
    automatic balancer elects `leader_imbalance`'s partitions this way, at most
    LEADER_ELECTIONS_PER_ENTRY_MAX per entry."""
    records: list[MetadataRecord] = []
    for topic_name, number in partitions:
        decision = elect_preferred_leader(image, topic_name, number)
        if not isinstance(decision, DwalError):
            records.extend(decision)
    return records


# ----------------------------------------------------------------------------- reassignment

REASSIGNMENTS_PER_ENTRY_MAX = 1000  # partition changes per entry (decommission, requests)


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a reassignment changes of a partition."""

    replicas: tuple[int, ...]
    isr: tuple[int, ...]
    leader: int
    adding: tuple[int, ...]
    removing: tuple[int, ...]


def alter_partition_reassignment(
    image: MetadataImage,
    topic_name: str,
    partition_number: int,
    target: Sequence[int] | None,
    *,
    limits: MetadataLimits = DEFAULT_LIMITS,
) -> Decision:
    """Move a partition to the replicas `target` (the first is the preferred leader), or
    cancel its move (`target` None: back to the replicas it had before). See the module doc.

    Returns [] when nothing changes (the partition has that target already), else one
    change; a target whose replicas are all in the ISR already (a reorder, a shrink to
    in-sync replicas) completes at once. Refuses UNKNOWN_TOPIC_OR_PARTITION;
    NO_REASSIGNMENT_IN_PROGRESS (a cancel without a move); INVALID_REPLICA_ASSIGNMENT for
    an empty target, a broker listed twice, an unregistered broker, a new replica on a
    fenced, shut down or decommissioned broker, more brokers than a record holds, or a
    change that would leave the partition no in-sync replica. The replication factor may
    change.
    """
    topic = image.topics.get(topic_name)
    if topic is None or not 0 <= partition_number < len(topic.partitions):
        return DwalError(
            ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"no partition {topic_name}-{partition_number}"
        )
    partition = topic.partitions[partition_number]
    where = f"{topic_name}-{partition_number}"
    if target is None:
        if not partition.reassigning:
            return DwalError(
                ErrorCode.NO_REASSIGNMENT_IN_PROGRESS, f"{where} is not being reassigned"
            )
        target = partition.original_replicas
    else:
        target = tuple(target)
        refusal = _check_target(image, partition, target, where, limits)
        if refusal is not None:
            return refusal
    return _reassign(image, topic, partition, tuple(target), where)


def _check_target(
    image: MetadataImage,
    partition: PartitionInfo,
    target: tuple[int, ...],
    where: str,
    limits: MetadataLimits,
) -> DwalError | None:
    def refuse(message: str) -> DwalError:
        return DwalError(ErrorCode.INVALID_REPLICA_ASSIGNMENT, message)

    if not target:
        return refuse(f"the replicas of {where} cannot be empty")
    twice = sorted(broker for broker, count in Counter(target).items() if count > 1)
    if twice:
        return refuse(f"the replicas of {where} list broker {twice[0]} more than once")
    unknown = [broker for broker in target if broker not in image.brokers]
    if unknown:
        return refuse(f"broker {unknown[0]} is not registered")
    for broker in target:
        if broker in partition.replicas:
            continue  # it has a copy already, fenced or not
        if not _eligible(image, broker):
            return refuse(f"broker {broker} is fenced or shut down: it cannot receive a replica")
        if broker in image.decommissioned:
            return refuse(
                f"broker {broker} is being decommissioned: it receives no new replica "
                "(recommission it first)"
            )
    brokers = len(set(target) | set(partition.original_replicas))
    if brokers > limits.replicas_max:
        return refuse(
            f"moving {where} to these replicas involves {brokers} brokers, more than "
            f"{limits.replicas_max}"
        )
    return None


def _reassign(
    image: MetadataImage,
    topic: TopicInfo,
    partition: PartitionInfo,
    target: tuple[int, ...],
    where: str,
) -> Decision:
    """The change that moves the partition to `target` from its original replicas."""
    original = partition.original_replicas
    adding = tuple(broker for broker in target if broker not in original)
    # A replica that stops being added (a cancel, or a target without it) and is in the ISR
    # leaves like any replica leaving: only once every target replica is in the ISR. Dropping
    # it at once could leave as the only in-sync copy a member that has just lost its
    # unsynced tail to a power loss (not fenced yet), and lose what only it held.
    kept = tuple(
        broker
        for broker in partition.adding_replicas
        if broker not in target and broker in partition.isr
    )
    removing = tuple(broker for broker in original if broker not in target) + kept
    replicas = target + removing
    isr = tuple(member for member in partition.isr if member in replicas)
    if not isr:
        return DwalError(
            ErrorCode.INVALID_REPLICA_ASSIGNMENT,
            f"every in-sync replica of {where} ({_ids(partition.isr)}) would leave: "
            f"wait until one of {_ids(replicas)} is in sync",
        )
    leader = partition.leader
    if leader not in isr:
        leader = _first_eligible(image, replicas, isr)
    shape = _completed(image, _Shape(replicas, isr, leader, adding, removing))
    return _reshape(topic, partition, shape)


def _completed(image: MetadataImage, shape: _Shape) -> _Shape:
    """The shape after completing its reassignment, when every target replica is in the
    ISR (Kafka's rule: see the module doc); otherwise `shape` itself."""
    if not shape.adding and not shape.removing:
        return shape
    target = tuple(broker for broker in shape.replicas if broker not in shape.removing)
    if not set(target) <= set(shape.isr):
        return shape
    isr = tuple(member for member in shape.isr if member not in shape.removing)
    if not isr:
        return shape
    leader = shape.leader if shape.leader in isr else _first_eligible(image, target, isr)
    return _Shape(target, isr, leader, (), ())


def _first_eligible(image: MetadataImage, replicas: Sequence[int], isr: Sequence[int]) -> int:
    """The first of `replicas` that is in `isr` and may lead, or NO_LEADER."""
    return next(
        (broker for broker in replicas if broker in isr and _eligible(image, broker)),
        NO_LEADER,
    )


def _reshape(topic: TopicInfo, partition: PartitionInfo, shape: _Shape) -> list[MetadataRecord]:
    """[the change to `shape`], or [] when the partition has that shape."""
    current = _Shape(
        partition.replicas,
        partition.isr,
        partition.leader,
        partition.adding_replicas,
        partition.removing_replicas,
    )
    if shape == current:
        return []
    return [
        _change(
            topic,
            partition,
            isr=shape.isr,
            leader=shape.leader,
            replicas=shape.replicas,
            adding=shape.adding,
            removing=shape.removing,
        )
    ]


def _ids(brokers: Iterable[int]) -> str:
    return ",".join(map(str, brokers)) or "none"


# ----------------------------------------------------------------------------- decommission


def decommission_broker(
    image: MetadataImage, broker_id: int, *, moves_max: int = REASSIGNMENTS_PER_ENTRY_MAX
) -> Decision:
    """Decommission a broker: its BrokerDecommissionRecord (unless marked already), then
    the reassignments moving it out of the target of at most `moves_max` partitions (see
    `decommission_plan`). Call again until it returns []: every partition is then moving
    off it or moved (the moves complete as the new replicas catch up).

    Refuses BROKER_NOT_AVAILABLE for an unknown broker, and whatever `decommission_plan`
    or a move refuses, before anything changes.
    """
    assert moves_max > 0
    if broker_id not in image.brokers:
        return DwalError(ErrorCode.BROKER_NOT_AVAILABLE, f"broker {broker_id} is not registered")
    plan = decommission_plan(image, broker_id)
    if isinstance(plan, DwalError):
        return plan
    records: list[MetadataRecord] = []
    if broker_id not in image.decommissioned:
        records.append(BrokerDecommissionRecord(broker_id=broker_id, decommissioned=True))
    for topic, partition, target in plan[:moves_max]:
        moved = _reassign(image, topic, partition, target, f"{topic.name}-{partition.partition}")
        if isinstance(moved, DwalError):
            return moved
        records.extend(moved)
    return records


def decommission_plan(
    image: MetadataImage, broker_id: int
) -> list[tuple[TopicInfo, PartitionInfo, tuple[int, ...]]] | DwalError:
    """For each partition whose target replicas hold `broker_id` (by topic name and number),
    its new target: the same with another broker in its place, chosen by
    `choose_replacement` among the brokers new replicas may go to, counting the moves
    planned before it. Refuses INVALID_REPLICATION_FACTOR, naming the partition, when no
    broker can take a partition's copy (too few brokers for its replication factor)."""
    brokers = [broker for broker in _placement_brokers(image) if broker.broker_id != broker_id]
    replica_counts = dict(image.replica_counts)
    leader_counts = dict(image.preferred_leader_counts)
    plan = []
    for topic, partition in _partitions(image):
        target = partition.target_replicas
        if broker_id not in target:
            continue
        replacement = choose_replacement(
            brokers,
            target,
            broker_id,
            excluded=partition.replicas,
            replica_counts=replica_counts,
            leader_counts=leader_counts,
        )
        if replacement is None:
            return DwalError(
                ErrorCode.INVALID_REPLICATION_FACTOR,
                f"cannot move {topic.name}-{partition.partition} off broker {broker_id}: its "
                f"{len(target)} replicas need another broker, and the brokers that may take a "
                f"replica ({_ids(b.broker_id for b in brokers)}) hold one already; add a "
                "broker or lower the topic's replication factor first",
            )
        replica_counts[replacement] = replica_counts.get(replacement, 0) + 1
        if target[0] == broker_id:
            leader_counts[replacement] = leader_counts.get(replacement, 0) + 1
        new_target = tuple(replacement if broker == broker_id else broker for broker in target)
        plan.append((topic, partition, new_target))
    return plan


def recommission_broker(image: MetadataImage, broker_id: int) -> Decision:
    """Undo `decommission_broker`'s mark: new replicas may go to the broker again. Moves in
    progress go on (cancel them one by one). Returns [] when it is not marked; refuses
    BROKER_NOT_AVAILABLE for a broker neither registered nor marked."""
    if broker_id not in image.decommissioned:
        if broker_id not in image.brokers:
            return DwalError(
                ErrorCode.BROKER_NOT_AVAILABLE, f"broker {broker_id} is not registered"
            )
        return []
    return [BrokerDecommissionRecord(broker_id=broker_id, decommissioned=False)]


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
    replicas: tuple[int, ...] | None = None,
    adding: tuple[int, ...] | None = None,
    removing: tuple[int, ...] | None = None,
) -> PartitionChangeRecord:
    """A change of what differs (None: unchanged), based on the partition's current epoch."""
    assert partition.partition_epoch < INT32_MAX, "partition epoch overflow"
    return PartitionChangeRecord(
        topic_id=topic.topic_id,
        partition=partition.partition,
        expected_partition_epoch=partition.partition_epoch,
        isr=None if isr == partition.isr else isr,
        leader=None if leader == partition.leader else leader,
        replicas=None if replicas == partition.replicas else replicas,
        adding_replicas=None if adding == partition.adding_replicas else adding,
        removing_replicas=None if removing == partition.removing_replicas else removing,
    )


def _unencodable(records: list[MetadataRecord]) -> str | None:
    """Why these records would not encode, or None."""
    try:
        encode_entry(records)
    except MetadataEncodeError as error:
        return str(error)
    return None
