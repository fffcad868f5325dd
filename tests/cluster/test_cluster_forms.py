"""A cluster of real processes forms: three voters agree on one cluster, spread a topic's
leaders over every broker and serve records produced through one node and consumed through
another; a broker-only node joins as a learner of the metadata log and hosts partitions."""

from __future__ import annotations

import json

import client
from cluster_client import consume, create_topic, describe_cluster, leaders_known, produce
from cluster_launcher import dwal, wait_for

PARTITIONS = 12


async def test_three_nodes_form_one_cluster_and_serve_a_topic(three_nodes):
    nodes = three_nodes.nodes
    cluster_ids = set()
    for node in nodes.values():  # every node answers, with the same view
        status = await dwal("cluster", "status", "--bootstrap", node.bootstrap, "--format", "json")
        description = json.loads(status.stdout)
        cluster_ids.add(description["cluster_id"])
        assert [(b["node_id"], b["fenced"]) for b in description["brokers"]] == [
            (1, False),
            (2, False),
            (3, False),
        ], description
        assert description["controller_id"] in nodes, description
        assert [v["node_id"] for v in description["voters"]] == [1, 2, 3], description
    assert len(cluster_ids) == 1 and "" not in cluster_ids, cluster_ids
    (cluster_id,) = cluster_ids
    for node in nodes.values():  # and each logged that it joined that cluster
        assert f"event=cluster_joined node_id={node.node_id} cluster_id={cluster_id} " in (
            node.current.text
        ), node.current.text

    await create_topic(nodes[1].bootstrap, "events", PARTITIONS)
    placed, _ = await wait_for(
        lambda: leaders_known(nodes[2].bootstrap, "events"), timeout_s=10, what="leaders of events"
    )
    assert sorted(placed) == list(range(PARTITIONS))
    assert set(placed.values()) == {1, 2, 3}, placed

    values = {p: [b"p%02d-%03d" % (p, n) for n in range(20)] for p in range(PARTITIONS)}
    await produce(nodes[1].bootstrap, "events", values)
    assert await consume(nodes[3].bootstrap, "events", 20 * PARTITIONS) == values


async def test_a_broker_only_node_joins_as_a_learner_and_hosts_partitions(cluster_launcher):
    for node_id in (1, 2, 3):
        cluster_launcher.add_node(node_id)
    learner = cluster_launcher.add_node(4, roles="broker")
    await cluster_launcher.start()
    bootstrap = cluster_launcher.nodes[1].bootstrap

    async def learner_unfenced() -> client.ClusterDescription | None:
        description = await describe_cluster(bootstrap)
        brokers = {b.node_id: b.fenced for b in description.brokers}
        return description if brokers == {1: False, 2: False, 3: False, 4: False} else None

    description, _ = await wait_for(learner_unfenced, timeout_s=10, what="4 unfenced brokers")
    assert [m.node_id for m in description.voters] == [1, 2, 3], description
    assert [m.node_id for m in description.learners] == [4], description
    assert "voters=1,2,3" in learner.current.text, learner.current.text

    await create_topic(bootstrap, "events", 8)
    placed, _ = await wait_for(
        lambda: leaders_known(learner.bootstrap, "events"), timeout_s=10, what="leaders of events"
    )
    on_learner = sorted(p for p, leader in placed.items() if leader == 4)
    assert on_learner, placed
    values = {p: [b"learner-%d-%d" % (p, n) for n in range(10)] for p in on_learner}
    await produce(bootstrap, "events", values)
    assert await consume(learner.bootstrap, "events", 10 * len(on_learner)) == values
