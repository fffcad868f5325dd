"""The Kafka admin APIs (see `broker.gateway.kafka_entities` for the handler contract).

Theory of operation
-------------------
Each handler is a view: it checks what only the Kafka wire format can get wrong (a null
config value, a replica assignment, a topic named twice, a topic id), turns the rest into the
native request body and calls the same `RequestHandlers` method the native port calls. That
method forwards to the active controller, waits until this broker's metadata image has the
change, refuses the internal `__consumer_offsets` topic, and says what failed in each topic's
entry; the handler copies those entries into the Kafka response of the version asked for.
What a handler only reads (configs, the cluster, log dirs) comes from the published metadata
image and the broker's settings, never from storage.

Configs: a topic's configs are DWAL's topic configs (`broker.storage.log_config`); an
override in the metadata image is a TOPIC_CONFIG, anything else comes from the broker's
`[topic_defaults]` (STATIC_BROKER_CONFIG when set there, DEFAULT_CONFIG otherwise). Broker
settings are static (the config file): described, never altered. Kafka's legacy
AlterConfigs replaces a topic's overrides (a config not named reverts to its default);
IncrementalAlterConfigs changes only the configs it names.

Transactions are not supported: an InitProducerId with a transactional id is answered
UNSUPPORTED_VERSION (as Redpanda answers a transaction coordinator lookup when transactions
are off), which clients take as fatal for that producer instead of retrying forever.
"""

from __future__ import annotations

import enum
import logging
import shutil
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from kio.schema.errors import ErrorCode as KafkaErrorCode

from broker.controller.metadata_records import ConfigResourceType
from broker.event_log import log_event
from broker.gateway.kafka_entities import (
    KafkaApi,
    KafkaContext,
    element,
    has_field,
    kafka_error,
    make,
)
from broker.request_handlers import Reply, RequestContext
from broker.storage import LogConfig
from broker.storage.log_config import TOPIC_CONFIG_KEYS
from protocol import ApiKey, DwalError, ProtocolError, check_request

logger = logging.getLogger("dwal.kafka")

INT32_MIN = -(2**31)  # cluster_authorized_operations: not asked for


class ConfigSource(enum.IntEnum):
    """Kafka's DescribeConfigs config_source numbers."""

    TOPIC_CONFIG = 1
    STATIC_BROKER_CONFIG = 4
    DEFAULT_CONFIG = 5


class ConfigType(enum.IntEnum):
    """Kafka's DescribeConfigs config_type numbers (v3+)."""

    BOOLEAN = 1
    STRING = 2
    INT = 3
    LONG = 5
    LIST = 7


class AlterOperation(enum.IntEnum):
    """IncrementalAlterConfigs' config_operation."""

    SET = 0
    DELETE = 1
    APPEND = 2
    SUBTRACT = 3


@dataclass(frozen=True, slots=True)
class _TopicConfigKey:
    config_type: ConfigType
    broker_name: str  # Kafka's name of the broker default (DWAL: [topic_defaults] <key>)
    documentation: str


_TOPIC_CONFIGS: Mapping[str, _TopicConfigKey] = {
    "segment.bytes": _TopicConfigKey(
        ConfigType.INT, "log.segment.bytes", "The size at which a segment is rolled."
    ),
    "segment.ms": _TopicConfigKey(
        ConfigType.LONG,
        "log.roll.ms",
        "The age at which the active segment is rolled even when not full.",
    ),
    "retention.ms": _TopicConfigKey(
        ConfigType.LONG,
        "log.retention.ms",
        "How long whole segments are kept before deleted (-1: no time limit).",
    ),
    "retention.bytes": _TopicConfigKey(
        ConfigType.LONG,
        "log.retention.bytes",
        "The size a partition may reach before its oldest segments are deleted (-1: none).",
    ),
    "index.interval.bytes": _TopicConfigKey(
        ConfigType.INT,
        "log.index.interval.bytes",
        "Bytes of batches between two entries of the sparse offset index.",
    ),
    "max.message.bytes": _TopicConfigKey(
        ConfigType.INT, "message.max.bytes", "The largest record batch the topic accepts."
    ),
    "fsync.policy": _TopicConfigKey(
        ConfigType.STRING,
        "log.fsync.policy",
        "When appends reach the disk: always (acknowledged after fdatasync, one fsync per "
        "group of appends), interval (every flush.ms) or never (rely on replication).",
    ),
    "flush.ms": _TopicConfigKey(
        ConfigType.LONG,
        "log.flush.interval.ms",
        "With fsync.policy=interval: the longest time between two fsyncs.",
    ),
    "file.delete.delay.ms": _TopicConfigKey(
        ConfigType.LONG,
        "log.segment.delete.delay.ms",
        "How long a deleted segment's files stay on disk before they are removed.",
    ),
    "cleanup.policy": _TopicConfigKey(
        ConfigType.LIST,
        "log.cleanup.policy",
        "delete (retention removes old segments), compact (the last record per key is "
        "kept), or both.",
    ),
    "delete.retention.ms": _TopicConfigKey(
        ConfigType.LONG,
        "log.cleaner.delete.retention.ms",
        "How long a compacted topic keeps tombstones (records with a null value).",
    ),
    "min.insync.replicas": _TopicConfigKey(
        ConfigType.INT,
        "min.insync.replicas",
        "The fewest in-sync replicas with which an acks=all write is accepted.",
    ),
}
assert set(_TOPIC_CONFIGS) == set(TOPIC_CONFIG_KEYS)


@dataclass(frozen=True, slots=True)
class _ConfigEntry:
    """One described config, whatever the response version."""

    name: str
    value: str | None
    source: ConfigSource
    config_type: ConfigType
    documentation: str
    read_only: bool = False
    synonyms: tuple[tuple[str, str | None, ConfigSource], ...] = ()


def _error_of(error: DwalError | ProtocolError) -> tuple[KafkaErrorCode, str]:
    if isinstance(error, DwalError):
        return kafka_error(error.code), error.message
    return KafkaErrorCode.invalid_request, str(error)


async def _per_topic_natively(
    ctx: KafkaContext,
    api_key: ApiKey,
    handler: Callable[[dict, bytes, RequestContext], Awaitable[Reply]],
    native: list[tuple[int, Any]],
    outcomes: dict[int, tuple[KafkaErrorCode, str | None]],
    fields: dict[str, Any],
) -> None:
    """Send the (request index, native topic entry) pairs the Kafka request's checks let
    through to the broker's own handler as one request, and note each topic's outcome."""
    if not native:
        return
    try:
        body = check_request(api_key, {"topics": [entry for _, entry in native], **fields})
        reply = await handler(body, b"", ctx.request_context())
        for (index, _), result in zip(native, reply.body["topics"], strict=True):
            outcomes[index] = (kafka_error(result["error_code"]), result.get("error_message"))
    except (DwalError, ProtocolError) as error:
        for index, _ in native:
            outcomes[index] = _error_of(error)


def _topic_configs(ctx: KafkaContext, overrides: Mapping[str, str]) -> list[_ConfigEntry]:
    """Every topic config: the override where there is one, else the broker's default."""
    defaults: LogConfig = ctx.handlers.config.log_defaults
    builtin = LogConfig()
    entries = []
    for key, field_name in TOPIC_CONFIG_KEYS.items():
        spec = _TOPIC_CONFIGS[key]
        default_value = str(getattr(defaults, field_name))
        default_source = (
            ConfigSource.STATIC_BROKER_CONFIG
            if getattr(defaults, field_name) != getattr(builtin, field_name)
            else ConfigSource.DEFAULT_CONFIG
        )
        synonyms: tuple[tuple[str, str | None, ConfigSource], ...] = (
            (spec.broker_name, default_value, default_source),
        )
        if key in overrides:
            value, source = overrides[key], ConfigSource.TOPIC_CONFIG
            synonyms = ((key, value, source), *synonyms)
        else:
            value, source = default_value, default_source
        entries.append(
            _ConfigEntry(key, value, source, spec.config_type, spec.documentation, False, synonyms)
        )
    return entries


def _broker_configs(ctx: KafkaContext) -> list[_ConfigEntry]:
    """The broker's settings a Kafka operator looks for, all static (the config file)."""
    config = ctx.handlers.config
    static, default = ConfigSource.STATIC_BROKER_CONFIG, ConfigSource.DEFAULT_CONFIG
    replication = config.default_replication_factor
    entries = [
        _ConfigEntry("node.id", str(config.node_id), static, ConfigType.INT, "This broker's id."),
        _ConfigEntry("broker.id", str(config.node_id), static, ConfigType.INT, "node.id."),
        _ConfigEntry(
            "num.partitions",
            str(config.default_partitions),
            static,
            ConfigType.INT,
            "Partitions of a topic created without a partition count.",
        ),
        _ConfigEntry(
            "default.replication.factor",
            None if replication is None else str(replication),
            default if replication is None else static,
            ConfigType.INT,
            "Replicas of a topic created without a replication factor (null: min(3, "
            "available brokers)).",
        ),
        _ConfigEntry(
            "auto.create.topics.enable",
            str(config.auto_create_topics).lower(),
            static,
            ConfigType.BOOLEAN,
            "Whether a Metadata request for an unknown topic creates it.",
        ),
        _ConfigEntry(
            "offsets.topic.num.partitions",
            str(config.offsets_topic_partitions),
            static,
            ConfigType.INT,
            "Partitions of the internal __consumer_offsets topic.",
        ),
        _ConfigEntry(
            "replica.lag.time.max.ms",
            str(config.replica_lag_time_max_ms),
            static,
            ConfigType.LONG,
            "A follower not caught up for this long leaves the ISR.",
        ),
        _ConfigEntry(
            "log.dirs", str(config.data_dir), static, ConfigType.STRING, "The data directory."
        ),
    ]
    for topic_entry in _topic_configs(ctx, {}):
        spec = _TOPIC_CONFIGS[topic_entry.name]
        entries.append(
            _ConfigEntry(
                spec.broker_name,
                topic_entry.value,
                topic_entry.source,
                spec.config_type,
                f"The default of the topic config {topic_entry.name} ([topic_defaults] in the "
                f"broker's config file): {spec.documentation}",
            )
        )
    return [
        _ConfigEntry(e.name, e.value, e.source, e.config_type, e.documentation, True)
        for e in entries
    ]


# -- CreateTopics ------------------------------------------------------------------------


def _create_topic_refusal(topic: Any, names: Counter[str]) -> tuple[KafkaErrorCode, str] | None:
    """What the Kafka request alone gets wrong in one CreatableTopic, or None."""
    if names[topic.name] > 1:
        return KafkaErrorCode.invalid_request, f"topic {topic.name!r} given more than once"
    if topic.assignments:
        return (
            KafkaErrorCode.invalid_replica_assignment,
            "DWAL places replicas itself: give num_partitions and replication_factor (-1 for "
            "the broker's defaults) instead of a replica assignment",
        )
    for config in topic.configs:
        if config.value is None:
            return KafkaErrorCode.invalid_config, f"config {config.name} has a null value"
    if [c.name for c in topic.configs] != list(dict.fromkeys(c.name for c in topic.configs)):
        return KafkaErrorCode.invalid_config, "a config is given more than once"
    if topic.num_partitions == 0 or topic.num_partitions < -1:
        return KafkaErrorCode.invalid_partitions, "num_partitions must be positive (or -1)"
    if topic.replication_factor == 0 or topic.replication_factor < -1:
        return (
            KafkaErrorCode.invalid_replication_factor,
            "replication_factor must be positive (or -1)",
        )
    return None


async def create_topics(ctx: KafkaContext, request: Any) -> Any:
    names = Counter(topic.name for topic in request.topics)
    outcomes: dict[int, tuple[KafkaErrorCode, str | None]] = {}
    native = []
    for index, topic in enumerate(request.topics):
        refusal = _create_topic_refusal(topic, names)
        if refusal is not None:
            outcomes[index] = refusal
            continue
        native.append(
            (
                index,
                {
                    "topic": topic.name,
                    "partitions": (
                        ctx.handlers.config.default_partitions
                        if topic.num_partitions == -1
                        else topic.num_partitions
                    ),
                    "replication_factor": topic.replication_factor,
                    "configs": {c.name: c.value for c in topic.configs},
                },
            )
        )
    await _per_topic_natively(
        ctx,
        ApiKey.CREATE_TOPICS,
        ctx.handlers.create_topics,
        native,
        outcomes,
        {"validate_only": request.validate_only},
    )
    natives = dict(native)
    results = []
    for index, topic in enumerate(request.topics):
        code, message = outcomes[index]
        results.append(
            _created_topic(ctx, topic, natives.get(index), code, message, request.validate_only)
        )
    return make(ctx.response_type, topics=tuple(results))


def _created_topic(
    ctx: KafkaContext,
    topic: Any,
    native: dict[str, Any] | None,
    code: KafkaErrorCode,
    message: str | None,
    validate_only: bool,
) -> Any:
    """A CreatableTopicResult; from v5, what the topic got (or would get) when created."""
    result_type = element(ctx.response_type, "topics")
    if code != KafkaErrorCode.none or native is None:
        return make(
            result_type,
            name=topic.name,
            topic_id=None,
            error_code=code,
            error_message=message,
            num_partitions=-1,
            replication_factor=-1,
            configs=None,
        )
    info = ctx.handlers.member.image.topics.get(topic.name)
    if validate_only or info is None:
        partitions, factor = native["partitions"], native["replication_factor"]
        overrides, topic_id = native["configs"], None
    else:
        partitions, factor = len(info.partitions), len(info.partitions[0].target_replicas)
        overrides = _overrides(ctx, topic.name)
        topic_id = uuid.UUID(bytes=info.topic_id)
    configs = None
    if has_field(result_type, "configs"):
        config_type = element(result_type, "configs")
        configs = tuple(
            make(
                config_type,
                name=entry.name,
                value=entry.value,
                read_only=entry.read_only,
                config_source=int(entry.source),
                is_sensitive=False,
            )
            for entry in _topic_configs(ctx, overrides)
        )
    return make(
        result_type,
        name=topic.name,
        topic_id=topic_id,
        error_code=code,
        error_message=message,
        num_partitions=partitions,
        replication_factor=factor,
        configs=configs,
    )


def _overrides(ctx: KafkaContext, topic: str) -> Mapping[str, str]:
    return ctx.handlers.member.image.configs.get((ConfigResourceType.TOPIC, topic), {})


# -- DeleteTopics ------------------------------------------------------------------------


async def delete_topics(ctx: KafkaContext, request: Any) -> Any:
    """By name (v1-v5: topic_names; v6: topics) or by topic id (v6)."""
    image = ctx.handlers.member.image
    wanted: list[tuple[str | None, uuid.UUID | None]] = []
    if has_field(type(request), "topic_names"):
        wanted = [(name, None) for name in request.topic_names]
    else:
        for state in request.topics:
            topic_id = state.topic_id if state.topic_id and state.topic_id.int else None
            name = state.name
            if name is None and topic_id is not None:
                info = image.topics_by_id.get(topic_id.bytes)
                name = None if info is None else info.name
            if name is not None and topic_id is None and name in image.topics:
                topic_id = uuid.UUID(bytes=image.topics[name].topic_id)  # Kafka answers it
            wanted.append((name, topic_id))
    names = Counter(name for name, _ in wanted if name is not None)
    outcomes: dict[int, tuple[KafkaErrorCode, str | None]] = {}
    native = []
    for index, (name, topic_id) in enumerate(wanted):
        if name is None and topic_id is not None:
            outcomes[index] = (KafkaErrorCode.unknown_topic_id, f"no topic has id {topic_id}")
        elif name is None:
            outcomes[index] = (KafkaErrorCode.invalid_request, "neither a name nor a topic id")
        elif names[name] > 1:
            outcomes[index] = (KafkaErrorCode.invalid_request, f"topic {name!r} named twice")
        else:
            native.append((index, name))
    await _per_topic_natively(
        ctx, ApiKey.DELETE_TOPICS, ctx.handlers.delete_topics, native, outcomes, {}
    )
    result_type = element(ctx.response_type, "responses")
    results = []
    for index, (name, topic_id) in enumerate(wanted):
        code, message = outcomes[index]
        results.append(
            make(
                result_type,
                name=name,
                topic_id=topic_id,
                error_code=code,
                error_message=message,
            )
        )
    return make(ctx.response_type, responses=tuple(results))


# -- CreatePartitions --------------------------------------------------------------------


async def create_partitions(ctx: KafkaContext, request: Any) -> Any:
    names = Counter(topic.name for topic in request.topics)
    outcomes: dict[int, tuple[KafkaErrorCode, str | None]] = {}
    native = []
    for index, topic in enumerate(request.topics):
        if names[topic.name] > 1:
            outcomes[index] = (KafkaErrorCode.invalid_request, f"{topic.name!r} given twice")
        elif topic.assignments is not None:
            outcomes[index] = (
                KafkaErrorCode.invalid_replica_assignment,
                "DWAL places the new partitions' replicas itself: give only the count",
            )
        else:
            native.append((index, {"topic": topic.name, "count": topic.count}))
    await _per_topic_natively(
        ctx,
        ApiKey.CREATE_PARTITIONS,
        ctx.handlers.create_partitions,
        native,
        outcomes,
        {"validate_only": request.validate_only},
    )
    result_type = element(ctx.response_type, "results")
    return make(
        ctx.response_type,
        results=tuple(
            make(
                result_type,
                name=topic.name,
                error_code=outcomes[index][0],
                error_message=outcomes[index][1],
            )
            for index, topic in enumerate(request.topics)
        ),
    )


# -- DescribeConfigs ---------------------------------------------------------------------


def _resource_configs(ctx: KafkaContext, resource_type: int, name: str) -> list[_ConfigEntry]:
    """The resource's configs; raises _Refused for an unknown topic, another broker, an
    unsupported resource type."""
    if resource_type == ConfigResourceType.TOPIC:
        if name not in ctx.handlers.member.image.topics:
            raise _Refused(KafkaErrorCode.unknown_topic_or_partition, f"unknown topic {name!r}")
        return _topic_configs(ctx, _overrides(ctx, name))
    if resource_type == ConfigResourceType.BROKER:
        if name == "":  # the cluster-wide dynamic defaults: DWAL has none
            return []
        _check_own_broker(ctx, name)
        return _broker_configs(ctx)
    if resource_type == _BROKER_LOGGER:
        _check_own_broker(ctx, name)
        return []
    raise _Refused(KafkaErrorCode.invalid_request, f"unsupported resource type {resource_type}")


_BROKER_LOGGER = 8  # Kafka's ConfigResource.Type.BROKER_LOGGER


class _Refused(Exception):
    def __init__(self, code: KafkaErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _check_own_broker(ctx: KafkaContext, name: str) -> None:
    if name != str(ctx.handlers.config.node_id):
        raise _Refused(
            KafkaErrorCode.invalid_request,
            f"this is broker {ctx.handlers.config.node_id}: send requests about broker "
            f"{name!r} to that broker",
        )


async def describe_configs(ctx: KafkaContext, request: Any) -> Any:
    result_type = element(ctx.response_type, "results")
    config_type = element(result_type, "configs")
    synonym_type = element(config_type, "synonyms")
    documented = getattr(request, "include_documentation", False)
    results = []
    for resource in request.resources:
        try:
            entries = _resource_configs(ctx, resource.resource_type, resource.resource_name)
        except _Refused as refusal:
            results.append(
                make(
                    result_type,
                    error_code=refusal.code,
                    error_message=refusal.message,
                    resource_type=resource.resource_type,
                    resource_name=resource.resource_name,
                    configs=(),
                )
            )
            continue
        keys = resource.configuration_keys
        if keys is not None:
            entries = [entry for entry in entries if entry.name in keys]
        configs = tuple(
            make(
                config_type,
                name=entry.name,
                value=entry.value,
                read_only=entry.read_only,
                config_source=int(entry.source),
                is_sensitive=False,
                synonyms=tuple(
                    make(synonym_type, name=name, value=value, source=int(source))
                    for name, value, source in entry.synonyms
                )
                if request.include_synonyms
                else (),
                config_type=int(entry.config_type),
                documentation=entry.documentation if documented else None,
            )
            for entry in entries
        )
        results.append(
            make(
                result_type,
                error_code=KafkaErrorCode.none,
                error_message=None,
                resource_type=resource.resource_type,
                resource_name=resource.resource_name,
                configs=configs,
            )
        )
    return make(ctx.response_type, results=tuple(results))


# -- AlterConfigs and IncrementalAlterConfigs --------------------------------------------


async def alter_configs(ctx: KafkaContext, request: Any) -> Any:
    """Kafka's legacy AlterConfigs: the configs given replace the topic's overrides."""

    def change(resource: Any) -> tuple[dict[str, str], list[str]]:
        wanted: dict[str, str] = {}
        for config in resource.configs:
            if config.value is None:
                raise _Refused(
                    KafkaErrorCode.invalid_request, f"config {config.name} has a null value"
                )
            wanted[config.name] = config.value
        current = _overrides(ctx, resource.resource_name)
        return wanted, sorted(key for key in current if key not in wanted)

    return await _alter(ctx, request, change)


_OPERATIONS = frozenset(int(operation) for operation in AlterOperation)


async def incremental_alter_configs(ctx: KafkaContext, request: Any) -> Any:
    def change(resource: Any) -> tuple[dict[str, str], list[str]]:
        current = _overrides(ctx, resource.resource_name)
        set_: dict[str, str] = {}
        delete: list[str] = []
        for config in resource.configs:
            operation, name, value = config.config_operation, config.name, config.value
            if name not in _TOPIC_CONFIGS:
                raise _Refused(KafkaErrorCode.invalid_config, f"{name} is not a topic config")
            if operation == AlterOperation.DELETE:
                delete.append(name)
                continue
            if operation not in _OPERATIONS:
                raise _Refused(
                    KafkaErrorCode.invalid_request, f"unknown config operation {operation}"
                )
            if value is None:
                raise _Refused(KafkaErrorCode.invalid_request, f"config {name} has a null value")
            if operation == AlterOperation.SET:
                set_[name] = value
                continue
            if _TOPIC_CONFIGS[name].config_type != ConfigType.LIST:
                raise _Refused(
                    KafkaErrorCode.invalid_config,
                    f"{name} is not a list: only list configs can be appended to or "
                    "subtracted from",
                )
            set_[name] = _list_change(ctx, current, name, value, operation)
        return set_, delete

    return await _alter(ctx, request, change)


def _list_change(
    ctx: KafkaContext,
    current: Mapping[str, str],
    name: str,
    value: str,
    operation: int,
) -> str:
    """The list config `name` with the items of `value` appended or subtracted (from the
    override, or from the default when there is none)."""
    base = current.get(name)
    if base is None:
        base = str(getattr(ctx.handlers.config.log_defaults, TOPIC_CONFIG_KEYS[name]))
    items = [item.strip() for item in base.split(",") if item.strip()]
    given = [item.strip() for item in value.split(",") if item.strip()]
    if operation == AlterOperation.APPEND:
        items += [item for item in given if item not in items]
    else:
        items = [item for item in items if item not in given]
    return ",".join(items)


async def _alter(ctx: KafkaContext, request: Any, change: Any) -> Any:
    """Each resource's (set, delete), given by `change(resource)`, through the native
    ALTER_CONFIGS; only topics can be altered."""
    keys = Counter((r.resource_type, r.resource_name) for r in request.resources)
    result_type = element(ctx.response_type, "responses")
    results = []
    for resource in request.resources:
        code, message = KafkaErrorCode.none, None
        try:
            _check_alterable(ctx, resource, keys)
            set_, delete = change(resource)
            body = check_request(
                ApiKey.ALTER_CONFIGS,
                {
                    "topic": resource.resource_name,
                    "set": set_,
                    "delete": delete,
                    "validate_only": request.validate_only,
                },
            )
            await ctx.handlers.alter_configs(body, b"", ctx.request_context())
        except _Refused as refusal:
            code, message = refusal.code, refusal.message
        except (DwalError, ProtocolError) as error:
            code, message = _error_of(error)
        results.append(
            make(
                result_type,
                error_code=code,
                error_message=message,
                resource_type=resource.resource_type,
                resource_name=resource.resource_name,
            )
        )
    return make(ctx.response_type, responses=tuple(results))


def _check_alterable(ctx: KafkaContext, resource: Any, keys: Counter[tuple[int, str]]) -> None:
    if keys[resource.resource_type, resource.resource_name] > 1:
        raise _Refused(KafkaErrorCode.invalid_request, "resource given more than once")
    names = [config.name for config in resource.configs]
    if len(names) != len(set(names)):
        raise _Refused(KafkaErrorCode.invalid_request, "a config is given more than once")
    if resource.resource_type in (ConfigResourceType.BROKER, _BROKER_LOGGER):
        raise _Refused(
            KafkaErrorCode.invalid_request,
            "DWAL's broker settings are static: change them in the broker's config file "
            "([topic_defaults] for topic defaults) and restart it",
        )
    if resource.resource_type != ConfigResourceType.TOPIC:
        raise _Refused(
            KafkaErrorCode.invalid_request, f"unsupported resource type {resource.resource_type}"
        )
    if resource.resource_name not in ctx.handlers.member.image.topics:
        raise _Refused(
            KafkaErrorCode.unknown_topic_or_partition, f"unknown topic {resource.resource_name!r}"
        )


# -- DescribeCluster ---------------------------------------------------------------------

_ENDPOINT_BROKERS = 1


def kafka_controller_id(ctx: KafkaContext) -> int:
    """The node a Kafka client should send controller requests to: this broker, as in its
    Metadata answers (every broker forwards admin requests to the active controller, and
    KRaft brokers too name a broker, never a controller); -1 if it serves no Kafka listener."""
    own = ctx.handlers.config.node_id
    return own if ctx.kafka_address(own) is not None else -1


async def describe_cluster(ctx: KafkaContext, request: Any) -> Any:
    image = ctx.handlers.member.image
    endpoint_type = getattr(request, "endpoint_type", _ENDPOINT_BROKERS)
    if endpoint_type != _ENDPOINT_BROKERS:
        return make(
            ctx.response_type,
            error_code=KafkaErrorCode.unsupported_endpoint_type,
            error_message="DWAL's controllers serve no Kafka listener: ask for brokers",
            endpoint_type=endpoint_type,
            cluster_id=image.cluster_id or "",
            controller_id=-1,
            brokers=(),
            cluster_authorized_operations=INT32_MIN,
        )
    with_fenced = getattr(request, "include_fenced_brokers", False)
    broker_type = element(ctx.response_type, "brokers")
    brokers = []
    for broker in sorted(image.brokers.values(), key=lambda b: b.broker_id):
        address = ctx.kafka_address(broker.broker_id)
        if address is None or (broker.fenced and not with_fenced):
            continue
        brokers.append(
            make(
                broker_type,
                broker_id=broker.broker_id,
                host=address[0],
                port=address[1],
                rack=broker.rack,
                is_fenced=broker.fenced,
            )
        )
    return make(
        ctx.response_type,
        error_code=KafkaErrorCode.none,
        error_message=None,
        endpoint_type=_ENDPOINT_BROKERS,
        cluster_id=image.cluster_id or "",
        controller_id=kafka_controller_id(ctx),
        brokers=tuple(brokers),
        cluster_authorized_operations=INT32_MIN,
    )


# -- InitProducerId ----------------------------------------------------------------------


async def init_producer_id(ctx: KafkaContext, request: Any) -> Any:
    """An idempotent producer's id (epoch 0): a new one at every call, as Kafka's brokers
    give a producer without a transactional id (an epoch bump, KIP-360, gets a new id)."""
    if request.transactional_id is not None:
        log_event(
            logger,
            logging.INFO,
            "kafka_transactions_refused",
            client_id=ctx.client_id,
            transactional_id=request.transactional_id,
        )
        return make(
            ctx.response_type,
            error_code=KafkaErrorCode.unsupported_version,
            producer_id=-1,
            producer_epoch=-1,
        )
    try:
        reply = await ctx.handlers.init_producer_id({}, b"", ctx.request_context())
    except DwalError as error:
        return make(
            ctx.response_type,
            error_code=kafka_error(error.code),
            producer_id=-1,
            producer_epoch=-1,
        )
    return make(
        ctx.response_type,
        error_code=KafkaErrorCode.none,
        producer_id=reply.body["producer_id"],
        producer_epoch=reply.body["producer_epoch"],
    )


# -- DescribeLogDirs ---------------------------------------------------------------------


async def describe_log_dirs(ctx: KafkaContext, request: Any) -> Any:
    """This broker's one data directory and the partitions it holds a copy of."""
    registry = ctx.handlers.registry
    held = sorted(registry.logs)
    if request.topics is not None:
        asked = {(t.topic, p) for t in request.topics for p in t.partitions}
        held = [key for key in held if key in asked]
    data_dir = ctx.handlers.config.data_dir
    usage = await trio.to_thread.run_sync(shutil.disk_usage, data_dir)
    result_type = element(ctx.response_type, "results")
    topic_type = element(result_type, "topics")
    partition_type = element(topic_type, "partitions")
    by_topic: dict[str, list[Any]] = {}
    for topic, number in held:
        log = registry.logs[topic, number]
        by_topic.setdefault(topic, []).append(
            make(
                partition_type,
                partition_index=number,
                partition_size=log.size_bytes,
                offset_lag=0,
                is_future_key=False,
            )
        )
    result = make(
        result_type,
        error_code=KafkaErrorCode.none,
        log_dir=str(data_dir.resolve()),
        topics=tuple(
            make(topic_type, name=name, partitions=tuple(partitions))
            for name, partitions in by_topic.items()
        ),
        total_bytes=usage.total,
        usable_bytes=usage.free,
        is_cordoned=False,
    )
    return make(ctx.response_type, error_code=KafkaErrorCode.none, results=(result,))


APIS: list[KafkaApi] = [
    KafkaApi(api_key=19, min_version=2, max_version=7, handle=create_topics),
    KafkaApi(api_key=20, min_version=1, max_version=6, handle=delete_topics),
    KafkaApi(api_key=37, min_version=0, max_version=3, handle=create_partitions),
    KafkaApi(api_key=32, min_version=1, max_version=4, handle=describe_configs),
    KafkaApi(api_key=33, min_version=0, max_version=2, handle=alter_configs),
    KafkaApi(api_key=44, min_version=0, max_version=1, handle=incremental_alter_configs),
    KafkaApi(api_key=60, min_version=0, max_version=2, handle=describe_cluster),
    KafkaApi(api_key=22, min_version=0, max_version=6, handle=init_producer_id),
    KafkaApi(api_key=35, min_version=1, max_version=5, handle=describe_log_dirs),
]
