"""The Kafka admin API handlers (broker/gateway/kafka_admin_apis.py) called directly, on the
request handlers of a whole node in process (`running_node`: embedded controller, publisher,
registry), with kio request entities of every version they advertise. Every response is
encoded and decoded with kio, so a field of the wrong type fails here, not in a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import confluent_kafka
import confluent_kafka.admin as confluent_admin
import kafka.errors
import pytest
import trio
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin import NewPartitions as AioNewPartitions
from aiokafka.admin import NewTopic as AioNewTopic
from aiokafka.admin.config_resource import ConfigResource as AioConfigResource
from aiokafka.admin.config_resource import ConfigResourceType as AioResourceType
from kafka_api_support import nested, request, round_trip, versions_of
from broker_test_support import at_real_pace, create_topic, running_node
from kio.index import load_request_schema, load_response_schema
from kio.schema.errors import ErrorCode as KafkaErrorCode
from kafka.admin import AlterConfigOp, ConfigResource, KafkaAdminClient
from kafka.admin import ConfigResourceType as KafkaResourceType

from broker.controller.metadata_records import ConfigResourceType
from broker.gateway import kafka_admin_apis
from broker.gateway.kafka_admin_apis import APIS, ConfigSource
from broker.gateway.kafka_entities import KafkaContext
from broker.node import BrokerNode
from broker.storage import LogConfig

CREATE_TOPICS, DELETE_TOPICS, CREATE_PARTITIONS = 19, 20, 37
DESCRIBE_CONFIGS, ALTER_CONFIGS, INCREMENTAL_ALTER_CONFIGS = 32, 33, 44
DESCRIBE_CLUSTER, INIT_PRODUCER_ID, DESCRIBE_LOG_DIRS = 60, 22, 35
TOPIC, BROKER = int(ConfigResourceType.TOPIC), int(ConfigResourceType.BROKER)
KAFKA_PORT = 19092


class Context(KafkaContext):
    """A KafkaContext whose brokers all serve a Kafka listener on KAFKA_PORT (the node in
    process has no listener)."""

    def kafka_address(self, node_id: int) -> tuple[str, int] | None:
        if node_id in self.handlers.member.image.brokers:
            return "127.0.0.1", KAFKA_PORT
        return None


def versions(api_key: int) -> list[int]:
    return versions_of(APIS, api_key)


async def call(node: BrokerNode, api_key: int, version: int, entity: Any) -> Any:
    """Handle `entity`; return the response after a kio encode/decode round trip."""
    (api,) = [api for api in APIS if api.api_key == api_key]
    context = Context(node.handlers, api_key, version, "test", "127.0.0.1")
    return round_trip(await api.handle(context, entity), api_key, version)


@contextlib.asynccontextmanager
async def open_node(tmp_path, **config: Any) -> AsyncIterator[BrokerNode]:
    async with contextlib.AsyncExitStack() as stack:
        with at_real_pace():
            node = await stack.enter_async_context(running_node(tmp_path / "data", **config))
        yield node


@pytest.fixture
async def node(tmp_path) -> AsyncIterator[BrokerNode]:
    # defaults that differ from the built-in ones, so that using them is seen
    settings = {"log_config": LogConfig(retention_ms=3_600_000), "default_partitions": 2}
    async with open_node(tmp_path, **settings) as node:
        yield node


def overrides(node: BrokerNode, topic: str) -> dict[str, str]:
    return dict(node.handlers.member.image.configs.get((ConfigResourceType.TOPIC, topic), {}))


def creatable(version: int, name: str, partitions=-1, factor=-1, configs=None, **more):
    return nested(
        CREATE_TOPICS,
        version,
        "topics",
        name=name,
        num_partitions=partitions,
        replication_factor=factor,
        configs=tuple(
            nested(CREATE_TOPICS, version, "topics", "configs", name=k, value=v)
            for k, v in (configs or {}).items()
        ),
        **more,
    )


# -- CreateTopics ------------------------------------------------------------------------


@pytest.mark.parametrize("version", versions(CREATE_TOPICS))
async def test_create_topics_every_version(node, version):
    topics = (
        creatable(version, "defaults"),
        creatable(version, "three", partitions=3, factor=1, configs={"retention.ms": "1000"}),
    )
    response = await call(
        node, CREATE_TOPICS, version, request(CREATE_TOPICS, version, topics=topics)
    )
    assert [(t.name, t.error_code) for t in response.topics] == [
        ("defaults", KafkaErrorCode.none),
        ("three", KafkaErrorCode.none),
    ]
    image = node.handlers.member.image
    assert len(image.topics["defaults"].partitions) == 2  # the broker's default_partitions
    assert len(image.topics["three"].partitions) == 3
    assert overrides(node, "three") == {"retention.ms": "1000"}
    if version >= 5:
        assert response.topics[0].num_partitions == 2
        three = response.topics[1]
        assert (three.num_partitions, three.replication_factor) == (3, 1)
        configs = {c.name: c for c in three.configs}
        assert configs["retention.ms"].value == "1000"
        assert configs["retention.ms"].config_source == ConfigSource.TOPIC_CONFIG
        assert configs["segment.bytes"].config_source == ConfigSource.DEFAULT_CONFIG
    if version >= 7:
        assert response.topics[1].topic_id == uuid.UUID(bytes=image.topics["three"].topic_id)


async def test_create_topics_validate_only_creates_nothing(node):
    topics = (creatable(7, "maybe", partitions=2, configs={"cleanup.policy": "compact"}),)
    response = await call(
        node, CREATE_TOPICS, 7, request(CREATE_TOPICS, 7, topics=topics, validate_only=True)
    )
    (result,) = response.topics
    assert result.error_code == KafkaErrorCode.none
    assert result.num_partitions == 2
    assert {c.name: c.value for c in result.configs}["cleanup.policy"] == "compact"
    assert "maybe" not in node.handlers.member.image.topics


async def test_create_topics_refusals_each_in_its_entry(node):
    await create_topic(node, "taken")
    version = 7
    topics = (
        creatable(version, "taken"),
        creatable(version, "twice"),
        creatable(version, "twice"),
        creatable(version, "bad-config", configs={"retention.ms": "soon"}),
        creatable(version, "unknown-config", configs={"no.such.config": "1"}),
        creatable(version, "null-config", configs={"retention.ms": None}),
        creatable(
            version,
            "assigned",
            assignments=(
                nested(
                    CREATE_TOPICS,
                    version,
                    "topics",
                    "assignments",
                    partition_index=0,
                    broker_ids=(1,),
                ),
            ),
        ),
        creatable(version, "__consumer_offsets"),
        creatable(version, "fine"),
    )
    response = await call(
        node, CREATE_TOPICS, version, request(CREATE_TOPICS, version, topics=topics)
    )
    codes = {(t.name, t.error_code) for t in response.topics}
    assert codes == {
        ("taken", KafkaErrorCode.topic_already_exists),
        ("twice", KafkaErrorCode.invalid_request),
        ("bad-config", KafkaErrorCode.invalid_config),
        ("unknown-config", KafkaErrorCode.invalid_config),
        ("null-config", KafkaErrorCode.invalid_config),
        ("assigned", KafkaErrorCode.invalid_replica_assignment),
        ("__consumer_offsets", KafkaErrorCode.policy_violation),
        ("fine", KafkaErrorCode.none),
    }
    for result in response.topics:
        if result.error_code != KafkaErrorCode.none:
            assert result.error_message
            assert (result.num_partitions, result.replication_factor) == (-1, -1)
    assert "bad-config" not in node.handlers.member.image.topics
    assert "fine" in node.handlers.member.image.topics


# -- DeleteTopics ------------------------------------------------------------------------


@pytest.mark.parametrize("version", versions(DELETE_TOPICS))
async def test_delete_topics_by_name(node, version):
    await create_topic(node, "doomed")
    doomed_id = uuid.UUID(bytes=node.handlers.member.image.topics["doomed"].topic_id)
    if version < 6:
        entity = request(DELETE_TOPICS, version, topic_names=("doomed", "never-was"))
    else:
        entity = request(
            DELETE_TOPICS,
            version,
            topics=tuple(
                nested(DELETE_TOPICS, version, "topics", name=name, topic_id=None)
                for name in ("doomed", "never-was")
            ),
        )
    response = await call(node, DELETE_TOPICS, version, entity)
    if version >= 6:
        assert response.responses[0].topic_id == doomed_id
    assert [(r.name, r.error_code) for r in response.responses] == [
        ("doomed", KafkaErrorCode.none),
        ("never-was", KafkaErrorCode.unknown_topic_or_partition),
    ]
    assert "doomed" not in node.handlers.member.image.topics


async def test_delete_topics_by_id(node):
    await create_topic(node, "by-id")
    topic_id = uuid.UUID(bytes=node.handlers.member.image.topics["by-id"].topic_id)
    unknown = uuid.uuid4()
    offsets = node.handlers.member.image.topics.get("__consumer_offsets")
    offsets_id = None if offsets is None else uuid.UUID(bytes=offsets.topic_id)
    entity = request(
        DELETE_TOPICS,
        6,
        topics=(
            nested(DELETE_TOPICS, 6, "topics", name=None, topic_id=topic_id),
            nested(DELETE_TOPICS, 6, "topics", name=None, topic_id=unknown),
            nested(DELETE_TOPICS, 6, "topics", name="__consumer_offsets", topic_id=None),
        ),
    )
    response = await call(node, DELETE_TOPICS, 6, entity)
    assert [(r.name, r.topic_id, r.error_code) for r in response.responses] == [
        ("by-id", topic_id, KafkaErrorCode.none),
        (None, unknown, KafkaErrorCode.unknown_topic_id),
        ("__consumer_offsets", offsets_id, KafkaErrorCode.policy_violation),
    ]
    assert "by-id" not in node.handlers.member.image.topics


# -- CreatePartitions --------------------------------------------------------------------


@pytest.mark.parametrize("version", versions(CREATE_PARTITIONS))
async def test_create_partitions(node, version):
    await create_topic(node, "grows")
    await create_topic(node, "shrinks", partitions=3)

    def topic(name, count, assignments=None):
        return nested(
            CREATE_PARTITIONS, version, "topics", name=name, count=count, assignments=assignments
        )

    assigned = (nested(CREATE_PARTITIONS, version, "topics", "assignments", broker_ids=(1,)),)
    entity = request(
        CREATE_PARTITIONS,
        version,
        topics=(
            topic("grows", 4),
            topic("shrinks", 2),
            topic("nope", 2),
            topic("shrinks-assigned", 5, assigned),
        ),
    )
    response = await call(node, CREATE_PARTITIONS, version, entity)
    assert [(r.name, r.error_code) for r in response.results] == [
        ("grows", KafkaErrorCode.none),
        ("shrinks", KafkaErrorCode.invalid_partitions),
        ("nope", KafkaErrorCode.unknown_topic_or_partition),
        ("shrinks-assigned", KafkaErrorCode.invalid_replica_assignment),
    ]
    assert len(node.handlers.member.image.topics["grows"].partitions) == 4


async def test_create_partitions_validate_only(node):
    await create_topic(node, "stays")
    entity = request(
        CREATE_PARTITIONS,
        3,
        validate_only=True,
        topics=(nested(CREATE_PARTITIONS, 3, "topics", name="stays", count=5, assignments=None),),
    )
    response = await call(node, CREATE_PARTITIONS, 3, entity)
    assert response.results[0].error_code == KafkaErrorCode.none
    assert len(node.handlers.member.image.topics["stays"].partitions) == 1


# -- DescribeConfigs ---------------------------------------------------------------------


def describe_request(version: int, *resources: tuple[int, str, Any], **more: Any) -> Any:
    return request(
        DESCRIBE_CONFIGS,
        version,
        resources=tuple(
            nested(
                DESCRIBE_CONFIGS,
                version,
                "resources",
                resource_type=kind,
                resource_name=name,
                configuration_keys=keys,
            )
            for kind, name, keys in resources
        ),
        **more,
    )


@pytest.mark.parametrize("version", versions(DESCRIBE_CONFIGS))
async def test_describe_configs_of_a_topic(node, version):
    await create_topic(node, "described", configs={"segment.bytes": "1048576"})
    entity = describe_request(
        version,
        (TOPIC, "described", None),
        include_synonyms=True,
        include_documentation=True,
    )
    (result,) = (await call(node, DESCRIBE_CONFIGS, version, entity)).results
    assert result.error_code == KafkaErrorCode.none
    configs = {c.name: c for c in result.configs}
    assert set(configs) == set(LogConfig().to_topic_configs())
    # an override, a broker default set in [topic_defaults], a built-in default
    assert configs["segment.bytes"].value == "1048576"
    assert configs["segment.bytes"].config_source == ConfigSource.TOPIC_CONFIG
    assert configs["retention.ms"].value == "3600000"
    assert configs["retention.ms"].config_source == ConfigSource.STATIC_BROKER_CONFIG
    assert configs["cleanup.policy"].value == "delete"
    assert configs["cleanup.policy"].config_source == ConfigSource.DEFAULT_CONFIG
    assert not any(c.read_only or c.is_sensitive for c in result.configs)
    assert [(s.name, s.source) for s in configs["segment.bytes"].synonyms] == [
        ("segment.bytes", ConfigSource.TOPIC_CONFIG),
        ("log.segment.bytes", ConfigSource.DEFAULT_CONFIG),
    ]
    if version >= 3:
        assert configs["segment.bytes"].config_type == 3  # INT
        assert configs["cleanup.policy"].config_type == 7  # LIST
        assert all(c.documentation for c in result.configs)


async def test_describe_configs_keys_unknown_topic_and_brokers(node):
    await create_topic(node, "some")
    node_id = str(node.handlers.config.node_id)
    entity = describe_request(
        4,
        (TOPIC, "some", ("retention.ms", "no.such.key")),
        (TOPIC, "some", ()),
        (TOPIC, "missing", None),
        (BROKER, node_id, None),
        (BROKER, "", None),
        (BROKER, "77", None),
        (8, node_id, None),  # BROKER_LOGGER
        (16, "metrics", None),  # CLIENT_METRICS
    )
    results = (await call(node, DESCRIBE_CONFIGS, 4, entity)).results
    assert [(r.resource_name, r.error_code) for r in results] == [
        ("some", KafkaErrorCode.none),
        ("some", KafkaErrorCode.none),
        ("missing", KafkaErrorCode.unknown_topic_or_partition),
        (node_id, KafkaErrorCode.none),
        ("", KafkaErrorCode.none),
        ("77", KafkaErrorCode.invalid_request),
        (node_id, KafkaErrorCode.none),
        ("metrics", KafkaErrorCode.invalid_request),
    ]
    assert [c.name for c in results[0].configs] == ["retention.ms"]
    assert results[1].configs == ()
    broker = {c.name: c for c in results[3].configs}
    assert broker["log.retention.ms"].value == "3600000"
    assert broker["log.retention.ms"].config_source == ConfigSource.STATIC_BROKER_CONFIG
    assert broker["num.partitions"].value == str(node.handlers.config.default_partitions)
    assert all(c.read_only for c in results[3].configs)
    assert results[4].configs == results[6].configs == ()


# -- AlterConfigs ------------------------------------------------------------------------


def alter_request(api_key: int, version: int, name: str, configs, **more) -> Any:
    def config(key, value):
        if api_key == INCREMENTAL_ALTER_CONFIGS:
            operation, value = value
            return nested(
                api_key,
                version,
                "resources",
                "configs",
                name=key,
                config_operation=operation,
                value=value,
            )
        return nested(api_key, version, "resources", "configs", name=key, value=value)

    resource = nested(
        api_key,
        version,
        "resources",
        resource_type=TOPIC,
        resource_name=name,
        configs=tuple(config(k, v) for k, v in configs),
    )
    return request(api_key, version, resources=(resource,), **more)


async def alter(node, api_key, version, name, configs, **more) -> Any:
    entity = alter_request(api_key, version, name, configs, **more)
    (result,) = (await call(node, api_key, version, entity)).responses
    assert (result.resource_type, result.resource_name) == (TOPIC, name)
    return result


@pytest.mark.parametrize("version", versions(ALTER_CONFIGS))
async def test_alter_configs_replaces_the_overrides(node, version):
    await create_topic(node, "legacy", configs={"retention.ms": "1000", "segment.bytes": "2048"})
    result = await alter(
        node, ALTER_CONFIGS, version, "legacy", [("segment.bytes", "4096"), ("flush.ms", "5")]
    )
    assert result.error_code == KafkaErrorCode.none
    # retention.ms was not named: it reverts to the default (Kafka's AlterConfigs)
    assert overrides(node, "legacy") == {"segment.bytes": "4096", "flush.ms": "5"}


async def test_alter_configs_validate_only_and_refusals(node):
    await create_topic(node, "kept", configs={"retention.ms": "1000"})
    result = await alter(
        node, ALTER_CONFIGS, 2, "kept", [("segment.bytes", "4096")], validate_only=True
    )
    assert result.error_code == KafkaErrorCode.none
    bad = await alter(node, ALTER_CONFIGS, 2, "kept", [("segment.bytes", "tiny")])
    assert bad.error_code == KafkaErrorCode.invalid_config and "segment.bytes" in bad.error_message
    null = await alter(node, ALTER_CONFIGS, 2, "kept", [("segment.bytes", None)])
    assert null.error_code == KafkaErrorCode.invalid_request
    missing = await alter(node, ALTER_CONFIGS, 2, "missing", [("segment.bytes", "4096")])
    assert missing.error_code == KafkaErrorCode.unknown_topic_or_partition
    assert overrides(node, "kept") == {"retention.ms": "1000"}
    broker = request(
        ALTER_CONFIGS,
        2,
        resources=(
            nested(
                ALTER_CONFIGS, 2, "resources", resource_type=BROKER, resource_name="1", configs=()
            ),
        ),
    )
    (refused,) = (await call(node, ALTER_CONFIGS, 2, broker)).responses
    assert refused.error_code == KafkaErrorCode.invalid_request
    assert "static" in refused.error_message


@pytest.mark.parametrize("version", versions(INCREMENTAL_ALTER_CONFIGS))
async def test_incremental_alter_configs(node, version):
    await create_topic(node, "inc", configs={"retention.ms": "1000", "segment.bytes": "2048"})
    set_, delete, append, subtract = 0, 1, 2, 3
    result = await alter(
        node,
        INCREMENTAL_ALTER_CONFIGS,
        version,
        "inc",
        [("flush.ms", (set_, "7")), ("segment.bytes", (delete, None))],
    )
    assert result.error_code == KafkaErrorCode.none
    # retention.ms was not named: it stays
    assert overrides(node, "inc") == {"retention.ms": "1000", "flush.ms": "7"}
    appended = await alter(
        node, INCREMENTAL_ALTER_CONFIGS, version, "inc", [("cleanup.policy", (append, "compact"))]
    )
    assert appended.error_code == KafkaErrorCode.none
    assert overrides(node, "inc")["cleanup.policy"] == "delete,compact"
    subtracted = await alter(
        node, INCREMENTAL_ALTER_CONFIGS, version, "inc", [("cleanup.policy", (subtract, "delete"))]
    )
    assert subtracted.error_code == KafkaErrorCode.none
    assert overrides(node, "inc")["cleanup.policy"] == "compact"


async def test_incremental_alter_configs_refusals(node):
    await create_topic(node, "strict", configs={"retention.ms": "1000"})
    cases = [
        ([("retention.ms", (2, "5"))], KafkaErrorCode.invalid_config),  # append to a LONG
        ([("no.such.config", (0, "5"))], KafkaErrorCode.invalid_config),
        ([("no.such.config", (1, None))], KafkaErrorCode.invalid_config),
        ([("retention.ms", (9, "5"))], KafkaErrorCode.invalid_request),
        ([("retention.ms", (0, None))], KafkaErrorCode.invalid_request),
        ([("retention.ms", (0, "5")), ("retention.ms", (1, None))], KafkaErrorCode.invalid_request),
        ([("cleanup.policy", (3, "delete"))], KafkaErrorCode.invalid_config),  # leaves it empty
        ([("retention.ms", (0, "-7"))], KafkaErrorCode.invalid_config),
    ]
    for configs, code in cases:
        result = await alter(node, INCREMENTAL_ALTER_CONFIGS, 1, "strict", configs)
        assert (configs, result.error_code) == (configs, code)
        assert result.error_message
    validated = await alter(
        node,
        INCREMENTAL_ALTER_CONFIGS,
        1,
        "strict",
        [("retention.ms", (1, None))],
        validate_only=True,
    )
    assert validated.error_code == KafkaErrorCode.none
    assert overrides(node, "strict") == {"retention.ms": "1000"}


# -- DescribeCluster, InitProducerId, DescribeLogDirs ------------------------------------


@pytest.mark.parametrize("version", versions(DESCRIBE_CLUSTER))
async def test_describe_cluster(node, version):
    response = await call(node, DESCRIBE_CLUSTER, version, request(DESCRIBE_CLUSTER, version))
    image = node.handlers.member.image
    node_id = node.handlers.config.node_id
    assert response.error_code == KafkaErrorCode.none
    assert response.cluster_id == image.cluster_id and response.cluster_id
    assert response.controller_id == node_id
    assert [(b.broker_id, b.host, b.port) for b in response.brokers] == [
        (node_id, "127.0.0.1", KAFKA_PORT)
    ]


async def test_describe_cluster_refuses_controller_endpoints(node):
    response = await call(node, DESCRIBE_CLUSTER, 1, request(DESCRIBE_CLUSTER, 1, endpoint_type=2))
    assert response.error_code == KafkaErrorCode.unsupported_endpoint_type
    assert response.brokers == ()


async def test_describe_cluster_leaves_out_brokers_without_a_kafka_listener(node):
    api = [api for api in APIS if api.api_key == DESCRIBE_CLUSTER][0]
    context = KafkaContext(node.handlers, DESCRIBE_CLUSTER, 2, "test", "127.0.0.1")
    response = await api.handle(context, request(DESCRIBE_CLUSTER, 2))
    assert (response.brokers, response.controller_id) == ((), -1)


@pytest.mark.parametrize("version", versions(INIT_PRODUCER_ID))
async def test_init_producer_id(node, version):
    entity = request(INIT_PRODUCER_ID, version, transactional_id=None)
    first = await call(node, INIT_PRODUCER_ID, version, entity)
    second = await call(node, INIT_PRODUCER_ID, version, entity)
    assert first.error_code == second.error_code == KafkaErrorCode.none
    assert first.producer_id >= 0 and second.producer_id > first.producer_id
    assert first.producer_epoch == second.producer_epoch == 0
    transactional = request(INIT_PRODUCER_ID, version, transactional_id="txn")
    refused = await call(node, INIT_PRODUCER_ID, version, transactional)
    assert refused.error_code == KafkaErrorCode.unsupported_version
    assert (refused.producer_id, refused.producer_epoch) == (-1, -1)


@pytest.mark.parametrize("version", versions(DESCRIBE_LOG_DIRS))
async def test_describe_log_dirs(node, version):
    await create_topic(node, "logged", partitions=2)
    await create_topic(node, "other")
    everything = await call(
        node, DESCRIBE_LOG_DIRS, version, request(DESCRIBE_LOG_DIRS, version, topics=None)
    )
    (log_dir,) = everything.results
    assert log_dir.log_dir == str(node.handlers.config.data_dir.resolve())
    names = {t.name: [p.partition_index for p in t.partitions] for t in log_dir.topics}
    assert names["logged"] == [0, 1] and names["other"] == [0]
    asked = request(
        DESCRIBE_LOG_DIRS,
        version,
        topics=(nested(DESCRIBE_LOG_DIRS, version, "topics", topic="logged", partitions=(1,)),),
    )
    (only,) = (await call(node, DESCRIBE_LOG_DIRS, version, asked)).results
    assert [(t.name, [p.partition_index for p in t.partitions]) for t in only.topics] == [
        ("logged", [1])
    ]
    if version >= 4:
        assert only.total_bytes > 0 and only.usable_bytes >= 0


def test_every_api_is_registered_once():
    keys = [api.api_key for api in kafka_admin_apis.APIS]
    assert len(keys) == len(set(keys))
    for api in kafka_admin_apis.APIS:
        for version in range(api.min_version, api.max_version + 1):
            load_request_schema(api.api_key, version)
            load_response_schema(api.api_key, version)


# -- end to end: kafka-python's and confluent-kafka's admin clients against `dwal broker` ----

BROKER_TOML = """\
default_partitions = 2

[topic_defaults]
"retention.ms" = "3600000"
"""
KAFKA_PORT_STARTED = re.compile(rb"event=broker_started [^\n]*? kafka_port=(\d+)")


async def start_kafka_broker(broker_launcher, tmp_path) -> str:
    """A `dwal broker` process serving Kafka on a free port; returns its bootstrap address.
    (The launcher kills it by PID when the test ends, passed or not.)"""
    config = tmp_path / "broker.toml"
    config.write_text(BROKER_TOML)
    broker = await broker_launcher.start(
        None, "--fsync", "never", "--config", str(config), "--kafka-port", "0"
    )
    match = KAFKA_PORT_STARTED.search(broker.output)
    assert match, broker.output.decode(errors="replace")
    return f"127.0.0.1:{int(match.group(1))}"


@contextlib.contextmanager
def kafka_admin(bootstrap: str) -> Iterator[Any]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        yield admin
    finally:
        admin.close()


def in_thread(function: Any) -> Any:
    """Run the blocking client `function` in a worker thread (the test's trio run keeps
    reading the broker's output meanwhile)."""
    return trio.to_thread.run_sync(function)


async def test_kafka_python_admin_topics(broker_launcher, tmp_path):
    bootstrap = await start_kafka_broker(broker_launcher, tmp_path)

    def scenario() -> None:
        with kafka_admin(bootstrap) as admin:
            created = admin.create_topics(
                {"orders": {"num_partitions": 3, "configs": {"cleanup.policy": "compact"}}}
            )
            (result,) = created["topics"]
            assert (result["name"], result["error_code"], result["num_partitions"]) == (
                "orders",
                0,
                3,
            )
            assert result["configs"]["cleanup.policy"]["value"] == "compact"
            # -1: the broker's defaults (default_partitions = 2)
            defaults = admin.create_topics(["plain"])["topics"][0]
            assert (defaults["num_partitions"], defaults["replication_factor"]) == (2, 1)
            checked = admin.create_topics({"dry": {"num_partitions": 5}}, validate_only=True)
            assert checked["topics"][0]["error_code"] == 0
            with pytest.raises(kafka.errors.TopicAlreadyExistsError):
                admin.create_topics(["orders"])
            with pytest.raises(kafka.errors.InvalidConfigurationError):
                admin.create_topics({"bad": {"configs": {"retention.ms": "soon"}}})
            assert sorted(admin.list_topics()) == ["orders", "plain"]

            admin.create_partitions({"orders": 5})
            (described,) = admin.describe_topics(["orders"])
            assert len(described["partitions"]) == 5
            with pytest.raises(kafka.errors.InvalidPartitionsError):
                admin.create_partitions({"orders": 2})

            admin.delete_topics(["orders"])
            assert admin.list_topics() == ["plain"]
            with pytest.raises(kafka.errors.UnknownTopicOrPartitionError):
                admin.delete_topics(["orders"])

    await in_thread(scenario)


async def test_kafka_python_admin_configs(broker_launcher, tmp_path):
    bootstrap = await start_kafka_broker(broker_launcher, tmp_path)
    topic = KafkaResourceType.TOPIC

    def scenario() -> None:
        with kafka_admin(bootstrap) as admin:
            admin.create_topics({"conf": {"configs": {"segment.bytes": "1048576"}}})
            everything = admin.describe_configs(
                [ConfigResource(topic, "conf")], config_filter="all", include_synonyms=True
            )["topic"]["conf"]
            assert set(everything) == set(LogConfig().to_topic_configs())
            assert everything["segment.bytes"]["config_source"] == "DYNAMIC_TOPIC_CONFIG"
            assert everything["retention.ms"]["value"] == "3600000"
            assert everything["retention.ms"]["config_source"] == "STATIC_BROKER_CONFIG"
            assert everything["flush.ms"]["config_source"] == "DEFAULT_CONFIG"

            def modified() -> dict[str, str]:
                found = admin.describe_configs([ConfigResource(topic, "conf")])
                return {k: v["value"] for k, v in found["topic"]["conf"].items()}

            assert modified() == {"segment.bytes": "1048576"}
            # incremental (kafka-python's choice when the broker has it): SET and DELETE
            answer = admin.alter_configs(
                [
                    ConfigResource(
                        topic,
                        "conf",
                        {"flush.ms": "5", "segment.bytes": (AlterConfigOp.DELETE, None)},
                    )
                ]
            )
            assert answer == {"topic": {"conf": "OK"}}
            assert modified() == {"flush.ms": "5"}
            # legacy AlterConfigs (kafka-python sends the other modified configs along)
            legacy = [ConfigResource(topic, "conf", {"retention.ms": "1000"})]
            assert admin.alter_configs(legacy, incremental=False) == {"topic": {"conf": "OK"}}
            assert modified() == {"flush.ms": "5", "retention.ms": "1000"}
            bad = admin.alter_configs([ConfigResource(topic, "conf", {"retention.ms": "x"})])
            assert "InvalidConfigurationError" in bad["topic"]["conf"]
            admin.reset_configs([ConfigResource(topic, "conf", {})])  # None: a kafka-python bug
            assert modified() == {}

            broker = admin.describe_configs(
                [ConfigResource(KafkaResourceType.BROKER, "1")], config_filter="all"
            )["broker"]["1"]
            assert broker["log.retention.ms"]["value"] == "3600000"
            assert broker["num.partitions"]["value"] == "2"
            assert all(entry["read_only"] for entry in broker.values())

    await in_thread(scenario)


async def test_kafka_python_describe_cluster(broker_launcher, tmp_path):
    bootstrap = await start_kafka_broker(broker_launcher, tmp_path)
    port = int(bootstrap.rsplit(":", 1)[1])

    def scenario() -> None:
        with kafka_admin(bootstrap) as admin:
            cluster = admin.describe_cluster()
            assert cluster["controller_id"] == 1
            assert cluster["cluster_id"]
            assert [(b["broker_id"], b["host"], b["port"]) for b in cluster["brokers"]] == [
                (1, "127.0.0.1", port)
            ]
            admin.create_topics({"sized": {"num_partitions": 1}})
            (dirs,) = admin.describe_log_dirs(brokers=[1])[0]["log_dirs"]
            assert [t["name"] for t in dirs["topics"]] == ["sized"]

    await in_thread(scenario)


async def test_confluent_kafka_admin(broker_launcher, tmp_path):
    """librdkafka's admin: its legacy alter_configs replaces the overrides (nothing is sent
    along), its incremental one appends to a list config."""
    bootstrap = await start_kafka_broker(broker_launcher, tmp_path)

    def scenario() -> None:
        admin = confluent_admin.AdminClient({"bootstrap.servers": bootstrap})
        created = admin.create_topics(
            [confluent_admin.NewTopic("c", num_partitions=2, config={"retention.ms": "1000"})]
        )
        created["c"].result(timeout=30)

        def overrides_of() -> dict[str, str]:
            resource = confluent_admin.ConfigResource(confluent_admin.ResourceType.TOPIC, "c")
            (future,) = admin.describe_configs([resource]).values()
            return {k: v.value for k, v in future.result(timeout=30).items() if v.source == 1}

        assert overrides_of() == {"retention.ms": "1000"}
        incremental = confluent_admin.ConfigResource(
            confluent_admin.ResourceType.TOPIC,
            "c",
            incremental_configs=[
                confluent_admin.ConfigEntry(
                    "cleanup.policy",
                    "compact",
                    incremental_operation=confluent_admin.AlterConfigOpType.APPEND,
                )
            ],
        )
        (future,) = admin.incremental_alter_configs([incremental]).values()
        future.result(timeout=30)
        assert overrides_of() == {"retention.ms": "1000", "cleanup.policy": "delete,compact"}
        legacy = confluent_admin.ConfigResource(
            confluent_admin.ResourceType.TOPIC, "c", set_config={"flush.ms": "9"}
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            (future,) = admin.alter_configs([legacy]).values()
        future.result(timeout=30)
        assert overrides_of() == {"flush.ms": "9"}  # the others reverted to their defaults
        description = admin.describe_cluster().result(timeout=30)
        assert [node.id for node in description.nodes] == [1]
        admin.delete_topics(["c"])["c"].result(timeout=30)

    await in_thread(scenario)


async def test_aiokafka_admin(broker_launcher, tmp_path):
    """aiokafka's admin client asks for older versions (CreateTopics v3, DescribeConfigs v2,
    AlterConfigs v1); its alter_configs is the legacy one and sends only what it is given."""
    bootstrap = await start_kafka_broker(broker_launcher, tmp_path)
    topic = AioResourceType.TOPIC

    async def scenario() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            new = AioNewTopic("a", 2, 1, topic_configs={"retention.ms": "1000"})
            created = await admin.create_topics([new])
            assert [(t[0], t[1]) for t in created.topic_errors] == [("a", 0)]

            async def overrides_of() -> dict[str, str]:
                (response,) = await admin.describe_configs([AioConfigResource(topic, "a")])
                ((code, _, _, _, entries),) = response.resources
                assert code == 0
                return {entry[0]: entry[1] for entry in entries if entry[3] == 1}  # source

            assert await overrides_of() == {"retention.ms": "1000"}
            await admin.alter_configs([AioConfigResource(topic, "a", {"flush.ms": "5"})])
            assert await overrides_of() == {"flush.ms": "5"}
            grown = await admin.create_partitions({"a": AioNewPartitions(3)})
            assert [(t[0], t[1]) for t in grown.topic_errors] == [("a", 0)]
            deleted = await admin.delete_topics(["a"])
            assert [(t[0], t[1]) for t in deleted.topic_error_codes] == [("a", 0)]
        finally:
            await admin.close()

    await trio.to_thread.run_sync(asyncio.run, scenario())


async def test_idempotent_producer_gets_a_producer_id(broker_launcher, tmp_path):
    """librdkafka's idempotent producer starts with InitProducerId (no transactional id)."""
    bootstrap = await start_kafka_broker(broker_launcher, tmp_path)

    def scenario() -> None:
        admin = confluent_admin.AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([confluent_admin.NewTopic("idem", 1)])["idem"].result(timeout=30)
        producer = confluent_kafka.Producer(
            {"bootstrap.servers": bootstrap, "enable.idempotence": True}
        )
        failures: list[Any] = []
        for number in range(10):
            producer.produce(
                "idem", value=b"%d" % number, on_delivery=lambda e, _: failures.append(e)
            )
        assert producer.flush(30) == 0
        assert failures == [None] * 10

    await in_thread(scenario)
