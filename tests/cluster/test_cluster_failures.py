"""Nodes of a real-process cluster die (SIGKILL) and come back.

Killing the active controller: another voter takes over and topics can be created through a
surviving broker within a bound. Killing a broker: the controller fences it within its
session timeout, its RF=1 partitions have no leader, the others keep taking records; once
restarted it is unfenced, leads its partitions again in a new leader epoch, and every record
acknowledged before the kill is still there. Times are printed (pytest -s shows them), never
asserted beyond the bounds.
"""

from __future__ import annotations

from cluster_client import (
    consume,
    create_topic,
    describe_cluster,
    describe_partitions,
    leaders_known,
    partitions_led_by,
    produce,
)
from cluster_launcher import BROKER_SESSION_TIMEOUT_MS, wait_for

FAILOVER_BOUND_S = 15
FENCING_MARGIN_S = 3  # the controller's fencing check, the metadata reaching the answering node
PARTITIONS = 6


async def test_a_topic_can_be_created_soon_after_the_active_controller_is_killed(three_nodes):
    controller = (await describe_cluster(three_nodes.nodes[1].bootstrap)).controller_id
    assert controller in three_nodes.nodes
    survivor = next(node for node in three_nodes.nodes.values() if node.node_id != controller)

    await three_nodes.kill(controller)

    async def create() -> bool:
        await create_topic(survivor.bootstrap, "after", 3)
        return True

    _, waited_s = await wait_for(
        create, timeout_s=FAILOVER_BOUND_S, what="create a topic after the controller died"
    )
    print(f"topic created {waited_s:.2f} s after SIGKILL of controller {controller}")
    description = await describe_cluster(survivor.bootstrap)
    assert description.controller_id not in (-1, controller), description
    partitions = await describe_partitions(survivor.bootstrap, "after")
    assert [p.partition for p in partitions] == [0, 1, 2], partitions


async def test_a_killed_broker_is_fenced_and_leads_its_partitions_again_after_restart(
    three_nodes,
):
    nodes = three_nodes.nodes
    controller = (await describe_cluster(nodes[1].bootstrap)).controller_id
    victim = next(node_id for node_id in nodes if node_id != controller)
    bystander = next(n for n in nodes.values() if n.node_id not in (controller, victim))
    await create_topic(bystander.bootstrap, "events", PARTITIONS)
    placed, _ = await wait_for(
        lambda: leaders_known(bystander.bootstrap, "events"), timeout_s=10, what="leaders"
    )
    victim_partitions = sorted(p for p, leader in placed.items() if leader == victim)
    other_partitions = sorted(p for p, leader in placed.items() if leader != victim)
    assert victim_partitions and other_partitions, placed
    before = await describe_partitions(bystander.bootstrap, "events")
    written = {p: [b"before-%d-%02d" % (p, n) for n in range(10)] for p in range(PARTITIONS)}
    await produce(bystander.bootstrap, "events", written)

    await three_nodes.kill(victim)

    async def victim_fenced() -> bool:
        description = await describe_cluster(bystander.bootstrap)
        return any(b.node_id == victim and b.fenced for b in description.brokers)

    _, fenced_after_s = await wait_for(
        victim_fenced,
        timeout_s=BROKER_SESSION_TIMEOUT_MS / 1000 + FENCING_MARGIN_S,
        what=f"broker {victim} fenced",
    )
    print(f"broker {victim} fenced {fenced_after_s:.2f} s after SIGKILL")
    await wait_for(
        lambda: partitions_led_by(bystander.bootstrap, "events", victim_partitions, -1),
        timeout_s=5,
        what=f"partitions {victim_partitions} of the dead broker without a leader",
    )
    during = {p: [b"during-%d-%02d" % (p, n) for n in range(10)] for p in other_partitions}
    await produce(bystander.bootstrap, "events", during)

    await three_nodes.start(victim)
    description = await describe_cluster(nodes[victim].bootstrap)
    assert [(b.node_id, b.fenced) for b in description.brokers] == [
        (1, False),
        (2, False),
        (3, False),
    ], description
    after, _ = await wait_for(
        lambda: partitions_led_by(bystander.bootstrap, "events", victim_partitions, victim),
        timeout_s=10,
        what=f"broker {victim} leading {victim_partitions} again",
    )
    epochs_before = {p.partition: p.leader_epoch for p in before}
    for partition in after:
        if partition.partition in victim_partitions:
            assert partition.leader_epoch > epochs_before[partition.partition], (before, after)
    expected = {p: written[p] + during.get(p, []) for p in range(PARTITIONS)}
    total = sum(map(len, expected.values()))
    assert await consume(nodes[controller].bootstrap, "events", total) == expected
