"""Topics created, described and deleted through the Kafka listener with confluent-kafka's
and aiokafka's admin clients (kafka-python's and confluent-kafka's are also checked field by
field in tests/broker/test_kafka_admin_apis.py); DWAL's own client sees the same topics."""

from __future__ import annotations

import asyncio

import pytest
import trio
from client_adapters import CLIENT_TIMEOUT_S

import client
from client import Admin

pytestmark = pytest.mark.timeout(60)


def dwal_topics(bootstrap: str) -> dict[str, int]:
    """Topic -> partitions, as DWAL's own client lists them (native protocol)."""

    async def listed() -> dict[str, int]:
        async with client.connect(bootstrap) as cluster:
            names = await Admin(cluster).list_topics()
            return {
                name: len((await Admin(cluster).describe_topic(name)).partitions)
                for name in names
                if not name.startswith("__")
            }

    return trio.run(listed)


def test_confluent_admin_creates_describes_and_deletes(kafka_broker):
    admin_module = pytest.importorskip(
        "confluent_kafka.admin", reason="CONFLUENT-KAFKA IS NOT INSTALLED"
    )
    admin = admin_module.AdminClient({"bootstrap.servers": kafka_broker.kafka_bootstrap})
    futures = admin.create_topics(
        [
            admin_module.NewTopic("ck-admin-a", num_partitions=3, replication_factor=1),
            admin_module.NewTopic(
                "ck-admin-b", num_partitions=1, config={"cleanup.policy": "compact"}
            ),
        ],
        operation_timeout=10,
    )
    for future in futures.values():
        assert future.result(CLIENT_TIMEOUT_S) is None
    metadata = admin.list_topics(timeout=CLIENT_TIMEOUT_S)
    assert len(metadata.topics["ck-admin-a"].partitions) == 3
    resource = admin_module.ConfigResource(admin_module.ResourceType.TOPIC, "ck-admin-b")
    configs = admin.describe_configs([resource])[resource].result(CLIENT_TIMEOUT_S)
    assert configs["cleanup.policy"].value == "compact"
    listed = dwal_topics(kafka_broker.bootstrap)
    assert (listed["ck-admin-a"], listed["ck-admin-b"]) == (3, 1)

    for future in admin.delete_topics(["ck-admin-a"], operation_timeout=10).values():
        assert future.result(CLIENT_TIMEOUT_S) is None
    assert "ck-admin-a" not in dwal_topics(kafka_broker.bootstrap)
    assert "ck-admin-a" not in admin.list_topics(timeout=CLIENT_TIMEOUT_S).topics


def test_aiokafka_admin_creates_describes_and_deletes(kafka_broker):
    aiokafka_admin = pytest.importorskip("aiokafka.admin", reason="AIOKAFKA IS NOT INSTALLED")

    async def scenario() -> None:
        admin = aiokafka_admin.AIOKafkaAdminClient(
            bootstrap_servers=kafka_broker.kafka_bootstrap,
            request_timeout_ms=CLIENT_TIMEOUT_S * 1000,
        )
        await admin.start()
        try:
            await admin.create_topics(
                [aiokafka_admin.NewTopic("aio-admin", num_partitions=2, replication_factor=1)]
            )
            (described,) = await admin.describe_topics(["aio-admin"])
            assert described["error_code"] == 0
            assert sorted(p["partition"] for p in described["partitions"]) == [0, 1]
            assert "aio-admin" in await admin.list_topics()
            await admin.delete_topics(["aio-admin"])
            assert "aio-admin" not in await admin.list_topics()
        finally:
            await admin.close()

    asyncio.run(asyncio.wait_for(scenario(), CLIENT_TIMEOUT_S * 2))
    assert "aio-admin" not in dwal_topics(kafka_broker.bootstrap)
