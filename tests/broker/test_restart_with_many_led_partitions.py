"""A broker leading more partitions than one metadata entry may change restarts: its new
incarnation's registration and its unfence change them in steps, and the active controller
finishes the rest (a single-node broker is a cluster of one voter: the same path)."""

from __future__ import annotations

import functools

import trio
from broker_test_support import create_topic, running_node

from broker import cluster_member
from broker.controller.metadata_records import NO_LEADER
from broker.controller.quorum_controller import QuorumControllerConfig

PARTITIONS = 400
CHANGES_MAX = 16  # per entry: 400 partitions take 25 entries each way


async def test_a_restarted_broker_leads_all_its_partitions_again(tmp_path, monkeypatch):
    monkeypatch.setattr(
        cluster_member,
        "QuorumControllerConfig",
        functools.partial(QuorumControllerConfig, partition_changes_per_entry_max=CHANGES_MAX),
    )
    async with running_node(tmp_path) as node:
        await create_topic(node, "many", PARTITIONS)
        assert {p.leader for p in node.member.image.topics["many"].partitions} == {1}
    async with running_node(tmp_path) as node:
        controller = node.member.controller
        assert controller is not None
        with trio.fail_after(20):
            while any(p.leader != 1 for p in controller.image.topics["many"].partitions):
                await controller.wait_image_at_least(controller.image.last_applied_index + 1)
        partitions = controller.image.topics["many"].partitions
        # The new incarnation's registration took each leadership away (epoch 1), and it
        # got each back (epoch 2), in steps of at most CHANGES_MAX.
        assert all(p.leader_epoch == 2 and p.isr == (1,) for p in partitions)
        assert NO_LEADER not in {p.leader for p in partitions}
        assert controller.statistics().partitions_converged >= PARTITIONS - 2 * CHANGES_MAX
        # The broker's own image (what it serves from) gets there too.
        with trio.fail_after(20):
            await node.member.wait_published(controller.image.last_applied_index)
        assert {p.leader for p in node.member.image.topics["many"].partitions} == {1}
