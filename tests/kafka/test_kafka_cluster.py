"""The Kafka listener in a three-node cluster of real processes (tests/cluster's launcher,
a Kafka port on each node): Metadata through any node names every broker's Kafka listener
and each partition's leader, so Kafka clients bootstrapped on any one node produce to and
consume from partitions led by every node."""

from __future__ import annotations

import pytest
import trio

import client
from client_adapters import CLIENT_TIMEOUT_S, RDKAFKA_LOGGER, Sent, client_for
from cluster_client import create_topic, leaders_known
from cluster_launcher import wait_for

pytestmark = pytest.mark.timeout(90)

PARTITIONS = 6


def kafka_metadata(bootstrap: str, topic: str) -> tuple[dict[int, str], dict[int, int]]:
    """(broker id -> host:port, partition -> leader) of confluent-kafka's Metadata through
    `bootstrap`."""
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    brokers = {b.id: f"{b.host}:{b.port}" for b in metadata.brokers.values()}
    leaders = {p.id: p.leader for p in metadata.topics[topic].partitions.values()}
    return brokers, leaders


async def test_kafka_clients_bootstrapped_on_any_node_route_to_every_leader(kafka_cluster):
    confluent = client_for("confluent-kafka")
    nodes = kafka_cluster.nodes
    await create_topic(nodes[1].bootstrap, "spread", PARTITIONS)
    placed, _ = await wait_for(
        lambda: leaders_known(nodes[2].bootstrap, "spread"), timeout_s=10, what="leaders"
    )
    assert set(placed.values()) == {1, 2, 3}, placed

    kafka_ports = {n: kafka_cluster.kafka_bootstrap(n) for n in nodes}
    for node_id in nodes:  # every node names every broker's Kafka listener and every leader
        brokers, leaders = await trio.to_thread.run_sync(
            kafka_metadata, kafka_ports[node_id], "spread"
        )
        assert brokers == kafka_ports
        assert leaders == placed

    for node_id in nodes:  # produce through each node's bootstrap to every partition
        for partition in range(PARTITIONS):
            sent = [
                Sent(b"k", b"n%d-p%d-%d" % (node_id, partition, i), (), 1000 + i) for i in range(5)
            ]
            offsets = await trio.to_thread.run_sync(
                lambda: confluent.produce(
                    kafka_ports[node_id], "spread", sent, acks="all", partition=partition
                )
            )
            assert offsets == list(range(5 * (node_id - 1), 5 * node_id))

    for partition in range(PARTITIONS):  # and read back through another node's bootstrap
        reader = kafka_ports[partition % 3 + 1]
        read = await trio.to_thread.run_sync(
            lambda: confluent.consume(reader, "spread", 0, 15, partition=partition)
        )
        assert [r.value for r in read] == [
            b"n%d-p%d-%d" % (n, partition, i) for n in (1, 2, 3) for i in range(5)
        ]


async def test_kafka_producer_follows_a_leader_change(kafka_cluster):
    """A partition's leader is killed; a confluent-kafka producer bootstrapped on another
    node is told NOT_LEADER or loses its connection, refreshes Metadata and goes on with the
    new leader (elected from the in-sync replicas): every acknowledged record is there."""
    confluent = client_for("confluent-kafka")
    nodes = kafka_cluster.nodes
    async with client.connect(nodes[1].bootstrap) as cluster:
        await client.Admin(cluster).create_topic("failover", 3, replication_factor=3)
    placed, _ = await wait_for(
        lambda: leaders_known(nodes[1].bootstrap, "failover"), timeout_s=10, what="leaders"
    )
    victim_partition = next(p for p, leader in placed.items() if leader != 1)
    victim = placed[victim_partition]
    kafka = kafka_cluster.kafka_bootstrap(1)
    before = [Sent(None, b"before-%d" % i, (), 1000 + i) for i in range(10)]
    after = [Sent(None, b"after-%d" % i, (), 2000 + i) for i in range(10)]

    from confluent_kafka import Producer

    producer = Producer(  # one producer, before and after the leader change
        {
            "bootstrap.servers": kafka,
            "logger": RDKAFKA_LOGGER,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": 30_000,
            "reconnect.backoff.max.ms": 500,
        }
    )
    offsets: list[int] = []
    errors: list[object] = []

    def delivered(error, message) -> None:
        if error is not None:
            errors.append(error)
        else:
            offsets.append(message.offset())

    def produce(sent: list[Sent]) -> None:
        for record in sent:
            producer.produce(
                "failover", record.value, partition=victim_partition, on_delivery=delivered
            )
        assert producer.flush(CLIENT_TIMEOUT_S) == 0, "records left undelivered"

    await trio.to_thread.run_sync(produce, before)
    await kafka_cluster.kill(victim)

    async def new_leader() -> dict[int, int] | None:
        leaders = await leaders_known(nodes[1].bootstrap, "failover")
        return leaders if leaders and leaders[victim_partition] != victim else None

    moved, _ = await wait_for(new_leader, timeout_s=15, what="a new leader")
    await trio.to_thread.run_sync(produce, after)
    assert not errors, errors[:3]
    assert offsets == list(range(20))
    brokers, leaders = await trio.to_thread.run_sync(kafka_metadata, kafka, "failover")
    assert victim not in brokers  # fenced: no longer listed
    assert leaders[victim_partition] == moved[victim_partition]
    read = await trio.to_thread.run_sync(
        lambda: confluent.consume(kafka, "failover", 0, 20, partition=victim_partition)
    )
    assert [r.value for r in read] == [s.value for s in before + after]
