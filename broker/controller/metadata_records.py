"""Metadata records (the facts of the metadata log) and their bounded codec.

Theory of operation
-------------------
The metadata log is a Raft log whose NORMAL entries each hold one msgpack array of metadata
records, applied atomically (a topic creation is one entry: its TopicRecord and all its
PartitionRecords). A record is encoded as a compact array ``[type_code, version, field...]``
with its fields in declaration order. Type codes (`RecordType`) and the field layout of a
released version never change: a log written today must be readable by every later release.
A new field means a new version of that record type, decoded alongside the old one.

Records are facts, not requests: they say what the active controller decided (a broker
registered, a partition changed). They carry no derived data: a broker's epoch is the index
of the Raft entry that registered it, so it is not a field of `RegisterBrokerRecord` (only of
`BrokerSnapshotRecord`, which exists because a snapshot has no entry index per broker).

`decode_entry` trusts nothing: the entry's size is checked before unpacking, msgpack is told
every length limit, and every field is type- and range-checked, including the consistency of
one record with itself (an ISR within the replicas, a leader in the ISR). Whether a record
makes sense against the current image (a partition of a topic that exists, a partition epoch
that is still current) is `metadata_image.apply`'s business: such records are no-ops there.
Any defect raises `MetadataDecodeError` and nothing else. `encode_entry` runs the decoder on
what it produced, so a record that no node could decode is never proposed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from protocol.topic_name import validate_topic_name

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
NO_LEADER = -1
"""`PartitionRecord.leader` / `PartitionChangeRecord.leader` when the partition has none."""
UUID_BYTES = 16
ZERO_UUID = bytes(UUID_BYTES)  # reserved, as in Kafka: never a topic id or incarnation id
PORT_MAX = 65_535


class RecordType(enum.IntEnum):
    """Stable type codes of metadata records: a number is never reused or renumbered."""

    CLUSTER_ID = 1
    REGISTER_BROKER = 2
    FENCE_BROKER = 3
    UNFENCE_BROKER = 4
    BROKER_SHUTDOWN = 5
    TOPIC = 6
    REMOVE_TOPIC = 7
    PARTITION = 8
    PARTITION_CHANGE = 9
    CONFIG = 10
    PRODUCER_IDS = 11
    BROKER_SNAPSHOT = 12
    BROKER_DECOMMISSION = 13


class ConfigResourceType(enum.IntEnum):
    """What a ConfigRecord configures; Kafka's ConfigResource.Type numbers."""

    TOPIC = 2
    BROKER = 4  # resource name: a broker id in decimal, or "" for the cluster-wide default


class MetadataDecodeError(Exception):
    """The bytes of a metadata entry are not a valid entry (the peer or the disk misbehaved)."""


class MetadataEncodeError(ValueError):
    """Local misuse: these records cannot be encoded (a field out of range, entry too large)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MetadataLimits:
    """Bounds of one metadata entry, checked before and while unpacking it.

    Every node must accept every entry the controller ever wrote: raise these limits freely,
    never lower them on a cluster with a log.
    """

    # Larger: refused before unpacking (and never proposed). With the 24 bytes Raft counts per
    # entry, it fits RaftConfig's default max_append_bytes (1 MiB).
    entry_bytes_max: int = 1024 * 1024 - 1024
    records_per_entry_max: int = 20_001  # a topic with 20,000 partitions plus its TopicRecord
    replicas_max: int = 128  # brokers in one partition's replica list (so ISR too)
    listeners_max: int = 16  # listeners of one broker
    listener_name_chars_max: int = 64
    host_chars_max: int = 255
    rack_chars_max: int = 255
    cluster_id_chars_max: int = 64
    config_name_chars_max: int = 255
    config_value_chars_max: int = 32 * 1024

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def string_bytes_max(self) -> int:
        """The longest msgpack string any field may hold (UTF-8: up to 4 bytes a character)."""
        return 4 * max(
            self.listener_name_chars_max,
            self.host_chars_max,
            self.rack_chars_max,
            self.cluster_id_chars_max,
            self.config_name_chars_max,
            self.config_value_chars_max,
        )

    @property
    def array_length_max(self) -> int:
        return max(self.records_per_entry_max, self.replicas_max, self.listeners_max, 16)


DEFAULT_LIMITS = MetadataLimits()


class Listener(NamedTuple):
    """Where a broker accepts connections: a listener name (e.g. "native"), host and port."""

    name: str
    host: str
    port: int


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterIdRecord:
    """The cluster's id; the first record of a new metadata log. Later ones are no-ops."""

    cluster_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class RegisterBrokerRecord:
    """A broker (re-)registered; its broker epoch is the index of this record's entry.

    Replaces any earlier registration of the same broker id (a new incarnation).
    """

    broker_id: int
    incarnation_id: bytes  # 16-byte uuid, new each time the broker process starts
    listeners: tuple[Listener, ...]
    rack: str | None
    fenced: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class FenceBrokerRecord:
    """The broker may not lead or be in an ISR; a no-op unless broker_epoch is current."""

    broker_id: int
    broker_epoch: int


@dataclass(frozen=True, kw_only=True, slots=True)
class UnfenceBrokerRecord:
    """The broker caught up and may lead again; a no-op unless broker_epoch is current."""

    broker_id: int
    broker_epoch: int


@dataclass(frozen=True, kw_only=True, slots=True)
class BrokerShutdownRecord:
    """The broker shut down in a controlled way (fenced until it registers again)."""

    broker_id: int
    broker_epoch: int


@dataclass(frozen=True, kw_only=True, slots=True)
class BrokerSnapshotRecord:
    """A broker's whole state, written only in snapshots (where no entry index gives its
    epoch). Applied, it replaces the broker's state as it is."""

    broker_id: int
    incarnation_id: bytes
    broker_epoch: int
    listeners: tuple[Listener, ...]
    rack: str | None
    fenced: bool
    shut_down: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class TopicRecord:
    """A topic was created (with no partitions yet: PartitionRecords follow in its entry)."""

    name: str
    topic_id: bytes  # 16-byte uuid, never the zero uuid


@dataclass(frozen=True, kw_only=True, slots=True)
class RemoveTopicRecord:
    """A topic was deleted, with its partitions and its configs."""

    topic_id: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class BrokerDecommissionRecord:
    """The broker id is being decommissioned (no new replica is placed on it), or no longer
    (`decommissioned` false). Kept across the broker's registrations."""

    broker_id: int
    decommissioned: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class PartitionRecord:
    """A partition of a topic, numbered right after the topic's last partition (in a
    snapshot, with the reassignment it is in, if any). Version 1 adds the two reassignment
    fields; version 0 (no reassignment) reads them as empty."""

    topic_id: bytes
    partition: int
    replicas: tuple[int, ...]  # broker ids, the preferred leader first
    isr: tuple[int, ...]  # within replicas, never empty
    leader: int  # in isr, or NO_LEADER
    leader_epoch: int
    partition_epoch: int
    # A reassignment in progress (KIP-455): replicas being added (not yet in sync, as a
    # rule) and replicas leaving once they are; both within replicas, never overlapping.
    adding_replicas: tuple[int, ...] = ()
    removing_replicas: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class PartitionChangeRecord:
    """A compare-and-swap on one partition: applied only if the partition's epoch still is
    `expected_partition_epoch` (else a no-op). None fields are unchanged. Applied, it bumps
    the partition epoch, and the leader epoch when the leader changes. Version 1 adds the
    reassignment fields (`()` clears one); version 0 reads them as None."""

    topic_id: bytes
    partition: int
    expected_partition_epoch: int
    isr: tuple[int, ...] | None = None
    leader: int | None = None  # NO_LEADER: no leader from now on
    replicas: tuple[int, ...] | None = None
    adding_replicas: tuple[int, ...] | None = None
    removing_replicas: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ConfigRecord:
    """A configuration entry set (value) or deleted (value None)."""

    resource_type: ConfigResourceType
    resource_name: str  # a topic name, or a broker id in decimal ("" = every broker)
    name: str
    value: str | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ProducerIdsRecord:
    """Producer ids below `next_producer_id` are handed out; a lower value is a no-op."""

    next_producer_id: int


MetadataRecord = (
    ClusterIdRecord
    | RegisterBrokerRecord
    | FenceBrokerRecord
    | UnfenceBrokerRecord
    | BrokerShutdownRecord
    | BrokerSnapshotRecord
    | BrokerDecommissionRecord
    | TopicRecord
    | RemoveTopicRecord
    | PartitionRecord
    | PartitionChangeRecord
    | ConfigRecord
    | ProducerIdsRecord
)

# ----------------------------------------------------------------------------- encoding


def _listeners_out(listeners: tuple[Listener, ...]) -> list[list[Any]]:
    return [[name, host, port] for name, host, port in listeners]


def _ids_out(ids: tuple[int, ...] | None) -> list[int] | None:
    return None if ids is None else list(ids)


def _partition_fields(r: PartitionRecord) -> list[Any]:
    fields = [
        r.topic_id,
        r.partition,
        list(r.replicas),
        list(r.isr),
        r.leader,
        r.leader_epoch,
        r.partition_epoch,
    ]
    if r.adding_replicas or r.removing_replicas:
        fields += [list(r.adding_replicas), list(r.removing_replicas)]
    return fields


def _partition_change_fields(r: PartitionChangeRecord) -> list[Any]:
    fields = [
        r.topic_id,
        r.partition,
        r.expected_partition_epoch,
        _ids_out(r.isr),
        r.leader,
        _ids_out(r.replicas),
    ]
    if r.adding_replicas is not None or r.removing_replicas is not None:
        fields += [_ids_out(r.adding_replicas), _ids_out(r.removing_replicas)]
    return fields


_ENCODERS: dict[type, tuple[RecordType, Callable[[Any], list[Any]]]] = {
    ClusterIdRecord: (RecordType.CLUSTER_ID, lambda r: [r.cluster_id]),
    RegisterBrokerRecord: (
        RecordType.REGISTER_BROKER,
        lambda r: [r.broker_id, r.incarnation_id, _listeners_out(r.listeners), r.rack, r.fenced],
    ),
    FenceBrokerRecord: (RecordType.FENCE_BROKER, lambda r: [r.broker_id, r.broker_epoch]),
    UnfenceBrokerRecord: (RecordType.UNFENCE_BROKER, lambda r: [r.broker_id, r.broker_epoch]),
    BrokerShutdownRecord: (RecordType.BROKER_SHUTDOWN, lambda r: [r.broker_id, r.broker_epoch]),
    BrokerSnapshotRecord: (
        RecordType.BROKER_SNAPSHOT,
        lambda r: [
            r.broker_id,
            r.incarnation_id,
            r.broker_epoch,
            _listeners_out(r.listeners),
            r.rack,
            r.fenced,
            r.shut_down,
        ],
    ),
    BrokerDecommissionRecord: (
        RecordType.BROKER_DECOMMISSION,
        lambda r: [r.broker_id, r.decommissioned],
    ),
    TopicRecord: (RecordType.TOPIC, lambda r: [r.name, r.topic_id]),
    RemoveTopicRecord: (RecordType.REMOVE_TOPIC, lambda r: [r.topic_id]),
    PartitionRecord: (RecordType.PARTITION, _partition_fields),
    PartitionChangeRecord: (RecordType.PARTITION_CHANGE, _partition_change_fields),
    ConfigRecord: (
        RecordType.CONFIG,
        lambda r: [int(r.resource_type), r.resource_name, r.name, r.value],
    ),
    ProducerIdsRecord: (RecordType.PRODUCER_IDS, lambda r: [r.next_producer_id]),
}
# Each version of a record type has its own number of fields: the version written is the one
# whose field count the encoder produced (the lowest that holds the record).
_VERSION_BY_FIELD_COUNT: dict[tuple[RecordType, int], int] = {}


def encode_entry(
    records: Sequence[MetadataRecord], *, limits: MetadataLimits = DEFAULT_LIMITS
) -> bytes:
    """Return the bytes of one Raft entry holding `records` (at least one), in order.

    Raises MetadataEncodeError when the entry would not decode under `limits` (a field out
    of range, an inconsistent record, too many records or bytes): nothing invalid is ever
    proposed. The result decodes to records equal to `records`.
    """
    if not records:
        raise MetadataEncodeError("an entry holds at least one record")
    encoded = []
    for record in records:
        record_type, fields_of = _ENCODERS[type(record)]
        try:
            fields = fields_of(record)
            version = _VERSION_BY_FIELD_COUNT[record_type, len(fields)]
            encoded.append([int(record_type), version, *fields])
        except (TypeError, ValueError, IndexError) as error:
            raise MetadataEncodeError(f"malformed {type(record).__name__}: {error}") from None
    try:
        data: bytes = msgpack.packb(encoded, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise MetadataEncodeError(f"cannot encode these records: {error}") from None
    try:
        decoded = decode_entry(data, limits=limits)
    except MetadataDecodeError as error:
        raise MetadataEncodeError(str(error)) from None
    assert decoded == list(records), "a record changed in a round trip"
    return data


# ----------------------------------------------------------------------------- decoding


def decode_entry(data: bytes, *, limits: MetadataLimits = DEFAULT_LIMITS) -> list[MetadataRecord]:
    """Return the records of one metadata entry's bytes, in order.

    Raises MetadataDecodeError (and nothing else) when the bytes are not exactly one valid
    entry under `limits`: too long, malformed msgpack, trailing bytes, an unknown record type
    or version, a field of the wrong type or out of range, or a record inconsistent in itself.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MetadataDecodeError("a metadata entry must be bytes")
    if len(data) > limits.entry_bytes_max:
        raise MetadataDecodeError(
            f"metadata entry of {len(data)} bytes exceeds {limits.entry_bytes_max}"
        )
    value = _unpack(bytes(data), limits)
    if type(value) is not list or not value:
        raise MetadataDecodeError("a metadata entry must be a non-empty array of records")
    if len(value) > limits.records_per_entry_max:
        raise MetadataDecodeError(
            f"metadata entry holds {len(value)} records, more than {limits.records_per_entry_max}"
        )
    return [_decode_record(item, limits) for item in value]


def _unpack(data: bytes, limits: MetadataLimits) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=limits.string_bytes_max,
            max_bin_len=UUID_BYTES,
            max_array_len=limits.array_length_max,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as error:  # msgpack raises many types for malformed input
        raise MetadataDecodeError(f"malformed metadata entry: {type(error).__name__}") from None


def _decode_record(item: Any, limits: MetadataLimits) -> MetadataRecord:
    if type(item) is not list or len(item) < 2:
        raise MetadataDecodeError("a record must be an array [type, version, field...]")
    type_code, version, fields = item[0], item[1], item[2:]
    if type(type_code) is not int or type_code not in _RECORD_TYPES:
        raise MetadataDecodeError(f"unknown metadata record type {type_code!r}")
    if type(version) is not int or (type_code, version) not in _DECODERS:
        raise MetadataDecodeError(
            f"unknown version {version!r} of record {RecordType(type_code).name}"
        )
    field_count, decode = _DECODERS[type_code, version]
    if len(fields) != field_count:
        raise MetadataDecodeError(
            f"record {RecordType(type_code).name} v{version} has {len(fields)} fields, "
            f"expected {field_count}"
        )
    return decode(fields, limits)


def _int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise MetadataDecodeError(f"{what} must be an integer in [{low}, {high}]")
    return value


def _broker_id(value: Any, what: str = "broker id") -> int:
    return _int(value, what, 0, INT32_MAX)


def _epoch(value: Any, what: str) -> int:
    return _int(value, what, 0, INT32_MAX)


def _broker_epoch(value: Any) -> int:
    return _int(value, "broker epoch", 0, INT64_MAX)


def _bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise MetadataDecodeError(f"{what} must be a boolean")
    return value


def _text(value: Any, what: str, chars_max: int) -> str:
    if type(value) is not str or not 0 < len(value) <= chars_max:
        raise MetadataDecodeError(f"{what} must be a string of 1 to {chars_max} characters")
    return value


def _optional_text(value: Any, what: str, chars_max: int) -> str | None:
    return None if value is None else _text(value, what, chars_max)


def _uuid(value: Any, what: str) -> bytes:
    if type(value) is not bytes or len(value) != UUID_BYTES or value == ZERO_UUID:
        raise MetadataDecodeError(f"{what} must be a non-zero {UUID_BYTES}-byte uuid")
    return value


def _topic_name(value: Any) -> str:
    problem = validate_topic_name(value)
    if problem is not None:
        raise MetadataDecodeError(problem)
    return str(value)


def _broker_ids(value: Any, what: str, limits: MetadataLimits) -> tuple[int, ...]:
    if type(value) is not list or not 0 < len(value) <= limits.replicas_max:
        raise MetadataDecodeError(f"{what} must be an array of 1 to {limits.replicas_max} ids")
    ids = tuple(_broker_id(item, what) for item in value)
    if len(set(ids)) != len(ids):
        raise MetadataDecodeError(f"{what} has duplicates")
    return ids


def _optional_broker_ids(value: Any, what: str, limits: MetadataLimits) -> tuple[int, ...] | None:
    return None if value is None else _broker_ids(value, what, limits)


def _broker_id_set(value: Any, what: str, limits: MetadataLimits) -> tuple[int, ...]:
    """Distinct broker ids, possibly none (a reassignment's adding or removing replicas)."""
    if type(value) is list and not value:
        return ()
    return _broker_ids(value, what, limits)


def _optional_broker_id_set(
    value: Any, what: str, limits: MetadataLimits
) -> tuple[int, ...] | None:
    return None if value is None else _broker_id_set(value, what, limits)


def _listeners(value: Any, limits: MetadataLimits) -> tuple[Listener, ...]:
    if type(value) is not list or len(value) > limits.listeners_max:
        raise MetadataDecodeError(f"listeners must be an array of at most {limits.listeners_max}")
    listeners = []
    for item in value:
        if type(item) is not list or len(item) != 3:
            raise MetadataDecodeError("a listener must be [name, host, port]")
        listeners.append(
            Listener(
                name=_text(item[0], "listener name", limits.listener_name_chars_max),
                host=_text(item[1], "listener host", limits.host_chars_max),
                port=_int(item[2], "listener port", 1, PORT_MAX),
            )
        )
    if len({listener.name for listener in listeners}) != len(listeners):
        raise MetadataDecodeError("listener names must be unique")
    return tuple(listeners)


def _leader(value: Any) -> int:
    return _int(value, "leader", NO_LEADER, INT32_MAX)


def _check_partition_shape(
    replicas: tuple[int, ...] | None,
    isr: tuple[int, ...] | None,
    leader: int | None,
    adding: tuple[int, ...] | None = None,
    removing: tuple[int, ...] | None = None,
) -> None:
    if replicas is not None and isr is not None and not set(isr) <= set(replicas):
        raise MetadataDecodeError("the ISR must be within the replicas")
    if isr is not None and leader is not None and leader != NO_LEADER and leader not in isr:
        raise MetadataDecodeError("the leader must be in the ISR")
    for moving, what in ((adding, "adding"), (removing, "removing")):
        if replicas is not None and moving is not None and not set(moving) <= set(replicas):
            raise MetadataDecodeError(f"the {what} replicas must be within the replicas")
    if adding is not None and removing is not None and set(adding) & set(removing):
        raise MetadataDecodeError("a replica cannot be both adding and removing")


def _decode_cluster_id(fields: list[Any], limits: MetadataLimits) -> ClusterIdRecord:
    return ClusterIdRecord(cluster_id=_text(fields[0], "cluster id", limits.cluster_id_chars_max))


def _decode_register_broker(fields: list[Any], limits: MetadataLimits) -> RegisterBrokerRecord:
    return RegisterBrokerRecord(
        broker_id=_broker_id(fields[0]),
        incarnation_id=_uuid(fields[1], "incarnation id"),
        listeners=_listeners(fields[2], limits),
        rack=_optional_text(fields[3], "rack", limits.rack_chars_max),
        fenced=_bool(fields[4], "fenced"),
    )


def _decode_broker_snapshot(fields: list[Any], limits: MetadataLimits) -> BrokerSnapshotRecord:
    return BrokerSnapshotRecord(
        broker_id=_broker_id(fields[0]),
        incarnation_id=_uuid(fields[1], "incarnation id"),
        broker_epoch=_broker_epoch(fields[2]),
        listeners=_listeners(fields[3], limits),
        rack=_optional_text(fields[4], "rack", limits.rack_chars_max),
        fenced=_bool(fields[5], "fenced"),
        shut_down=_bool(fields[6], "shut_down"),
    )


def _decode_broker_epoch_record(
    record_class: type[FenceBrokerRecord | UnfenceBrokerRecord | BrokerShutdownRecord],
) -> Callable[[list[Any], MetadataLimits], MetadataRecord]:
    def decode(fields: list[Any], limits: MetadataLimits) -> MetadataRecord:
        return record_class(broker_id=_broker_id(fields[0]), broker_epoch=_broker_epoch(fields[1]))

    return decode


def _decode_topic(fields: list[Any], limits: MetadataLimits) -> TopicRecord:
    return TopicRecord(name=_topic_name(fields[0]), topic_id=_uuid(fields[1], "topic id"))


def _decode_remove_topic(fields: list[Any], limits: MetadataLimits) -> RemoveTopicRecord:
    return RemoveTopicRecord(topic_id=_uuid(fields[0], "topic id"))


def _decode_partition(fields: list[Any], limits: MetadataLimits) -> PartitionRecord:
    replicas = _broker_ids(fields[2], "replicas", limits)
    isr = _broker_ids(fields[3], "isr", limits)
    leader = _leader(fields[4])
    adding: tuple[int, ...] = ()
    removing: tuple[int, ...] = ()
    if len(fields) > 7:  # version 1
        adding = _broker_id_set(fields[7], "adding replicas", limits)
        removing = _broker_id_set(fields[8], "removing replicas", limits)
    _check_partition_shape(replicas, isr, leader, adding, removing)
    return PartitionRecord(
        topic_id=_uuid(fields[0], "topic id"),
        partition=_int(fields[1], "partition", 0, INT32_MAX),
        replicas=replicas,
        isr=isr,
        leader=leader,
        leader_epoch=_epoch(fields[5], "leader epoch"),
        partition_epoch=_epoch(fields[6], "partition epoch"),
        adding_replicas=adding,
        removing_replicas=removing,
    )


def _decode_partition_change(fields: list[Any], limits: MetadataLimits) -> PartitionChangeRecord:
    isr = _optional_broker_ids(fields[3], "isr", limits)
    leader = None if fields[4] is None else _leader(fields[4])
    replicas = _optional_broker_ids(fields[5], "replicas", limits)
    adding = removing = None
    if len(fields) > 6:  # version 1
        adding = _optional_broker_id_set(fields[6], "adding replicas", limits)
        removing = _optional_broker_id_set(fields[7], "removing replicas", limits)
        if adding is None and removing is None:
            raise MetadataDecodeError("a version 1 partition change changes a reassignment")
    _check_partition_shape(replicas, isr, leader, adding, removing)
    return PartitionChangeRecord(
        topic_id=_uuid(fields[0], "topic id"),
        partition=_int(fields[1], "partition", 0, INT32_MAX),
        expected_partition_epoch=_epoch(fields[2], "expected partition epoch"),
        isr=isr,
        leader=leader,
        replicas=replicas,
        adding_replicas=adding,
        removing_replicas=removing,
    )


def _decode_broker_decommission(
    fields: list[Any], limits: MetadataLimits
) -> BrokerDecommissionRecord:
    return BrokerDecommissionRecord(
        broker_id=_broker_id(fields[0]), decommissioned=_bool(fields[1], "decommissioned")
    )


_CONFIG_RESOURCE_TYPES = frozenset(int(kind) for kind in ConfigResourceType)


def _decode_config(fields: list[Any], limits: MetadataLimits) -> ConfigRecord:
    if type(fields[0]) is not int or fields[0] not in _CONFIG_RESOURCE_TYPES:
        raise MetadataDecodeError(f"unknown config resource type {fields[0]!r}")
    resource_type = ConfigResourceType(fields[0])
    if resource_type is ConfigResourceType.TOPIC:
        resource_name = _topic_name(fields[1])
    elif fields[1] == "":
        resource_name = ""
    else:
        resource_name = _text(fields[1], "broker resource name", 10)
        if not resource_name.isascii() or not resource_name.isdigit():
            raise MetadataDecodeError("a broker config resource name must be a broker id or ''")
        _broker_id(int(resource_name))
        if str(int(resource_name)) != resource_name:
            raise MetadataDecodeError("a broker id is written without leading zeros")
    return ConfigRecord(
        resource_type=resource_type,
        resource_name=resource_name,
        name=_text(fields[2], "config name", limits.config_name_chars_max),
        value=(
            None
            if fields[3] is None
            else _text_or_empty(fields[3], "config value", limits.config_value_chars_max)
        ),
    )


def _text_or_empty(value: Any, what: str, chars_max: int) -> str:
    if type(value) is not str or len(value) > chars_max:
        raise MetadataDecodeError(f"{what} must be a string of at most {chars_max} characters")
    return value


def _decode_producer_ids(fields: list[Any], limits: MetadataLimits) -> ProducerIdsRecord:
    return ProducerIdsRecord(next_producer_id=_int(fields[0], "next producer id", 0, INT64_MAX))


# (type, version) -> (field count, decoder). A released entry is never changed or removed.
_DECODERS: dict[
    tuple[int, int], tuple[int, Callable[[list[Any], MetadataLimits], MetadataRecord]]
] = {
    (RecordType.CLUSTER_ID, 0): (1, _decode_cluster_id),
    (RecordType.REGISTER_BROKER, 0): (5, _decode_register_broker),
    (RecordType.FENCE_BROKER, 0): (2, _decode_broker_epoch_record(FenceBrokerRecord)),
    (RecordType.UNFENCE_BROKER, 0): (2, _decode_broker_epoch_record(UnfenceBrokerRecord)),
    (RecordType.BROKER_SHUTDOWN, 0): (2, _decode_broker_epoch_record(BrokerShutdownRecord)),
    (RecordType.BROKER_SNAPSHOT, 0): (7, _decode_broker_snapshot),
    (RecordType.TOPIC, 0): (2, _decode_topic),
    (RecordType.REMOVE_TOPIC, 0): (1, _decode_remove_topic),
    (RecordType.PARTITION, 0): (7, _decode_partition),
    (RecordType.PARTITION, 1): (9, _decode_partition),  # + adding, removing replicas
    (RecordType.PARTITION_CHANGE, 0): (6, _decode_partition_change),
    (RecordType.PARTITION_CHANGE, 1): (8, _decode_partition_change),  # + adding, removing
    (RecordType.CONFIG, 0): (4, _decode_config),
    (RecordType.PRODUCER_IDS, 0): (1, _decode_producer_ids),
    (RecordType.BROKER_DECOMMISSION, 0): (2, _decode_broker_decommission),
}
_RECORD_TYPES = frozenset(record_type for record_type, _ in _DECODERS)
for (_type_code, _version), (_field_count, _) in _DECODERS.items():
    _VERSION_BY_FIELD_COUNT[RecordType(_type_code), _field_count] = _version
assert _RECORD_TYPES == set(RecordType), "every record type has a decoder"
assert {code for code, _ in _ENCODERS.values()} == set(RecordType), "and an encoder"
