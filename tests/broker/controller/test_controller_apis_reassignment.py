"""AlterPartitionReassignments, ListPartitionReassignments, DecommissionBroker and automatic
leader balancing through ControllerApis and a real QuorumController (one voter on the
memory network, MockClock): request bodies in, committed decisions, reply bodies out."""

from __future__ import annotations

import dataclasses
import random
import uuid
from typing import Any

import pytest
import trio
from quorum_cluster import CONFIG, raft_config
from test_controller_apis import (
    active_apis,
    add_brokers,
    alter_partition,
    call,
    heartbeat,
    register,
)

from broker.controller import NewTopic, create_topic
from broker.controller.controller_apis import ControllerApis
from broker.controller.quorum_controller import QuorumController
from broker.limits import Limits
from broker.raft.log_storage import MemoryStorage
from broker.raft.memory_transport import MemoryNetwork
from broker.raft.messages import Configuration
from broker.storage import LogConfig
from protocol import DwalError, ErrorCode
from protocol.api import ApiKey


async def topic(apis: ControllerApis, name: str, partitions: int, factor: int) -> None:
    new_topic = NewTopic(
        name=name, partitions=partitions, replication_factor=factor, topic_id=uuid.uuid4().bytes
    )
    await apis.controller.submit(lambda image: create_topic(image, new_topic))


def reassignments(*moves: tuple[str, int, list[int] | None]) -> dict[str, Any]:
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for name, partition, replicas in moves:
        by_topic.setdefault(name, []).append({"partition": partition, "replicas": replicas})
    return {"topics": [{"topic": t, "partitions": parts} for t, parts in by_topic.items()]}


def results(reply: dict[str, Any]) -> dict[tuple[str, int], int]:
    return {
        (entry["topic"], part["partition"]): part["error_code"]
        for entry in reply["topics"]
        for part in entry["partitions"]
    }


async def test_a_move_is_listed_until_the_new_replica_joins_the_isr(nursery, autojump_clock):
    apis = await active_apis(nursery)
    epochs = await add_brokers(apis, 1, 2, 3)
    await topic(apis, "t", 2, 2)
    image = apis.controller.image
    before = image.partition("t", 0)
    assert before is not None
    target = [next(b for b in (1, 2, 3) if b not in before.replicas), before.replicas[0]]
    reply = await call(
        apis,
        ApiKey.ALTER_PARTITION_REASSIGNMENTS,
        reassignments(("t", 0, target), ("t", 7, [1]), ("nope", 0, [1]), ("t", 1, [1, 1])),
    )
    assert results(reply) == {
        ("t", 0): 0,
        ("t", 7): ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
        ("nope", 0): ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
        ("t", 1): ErrorCode.INVALID_REPLICA_ASSIGNMENT,
    }
    assert reply["metadata_offset"] == apis.controller.image.last_applied_index
    listed = await call(apis, ApiKey.LIST_PARTITION_REASSIGNMENTS, {"topics": None})
    leaving = before.replicas[1]
    assert listed["topics"] == [
        {
            "topic": "t",
            "partitions": [
                {
                    "partition": 0,
                    "replicas": [*target, leaving],
                    "adding_replicas": [target[0]],
                    "removing_replicas": [leaving],
                    "isr": list(before.isr),
                    "leader": before.leader,
                }
            ],
        }
    ]
    only_one = {"topics": [{"topic": "t", "partitions": [1]}]}
    assert (await call(apis, ApiKey.LIST_PARTITION_REASSIGNMENTS, only_one))["topics"] == []

    moving = apis.controller.image.partition("t", 0)
    assert moving is not None
    caught_up = await alter_partition(
        apis,
        moving.leader,
        epochs[moving.leader],
        "t",
        leader_epoch=moving.leader_epoch,
        partition_epoch=moving.partition_epoch,
        isr=[*moving.isr, target[0]],
    )
    assert caught_up["topics"][0]["partitions"][0]["error_code"] == 0
    done = apis.controller.image.partition("t", 0)
    assert done is not None and done.replicas == tuple(target) and not done.reassigning
    assert (await call(apis, ApiKey.LIST_PARTITION_REASSIGNMENTS, {"topics": None}))["topics"] == []


async def test_a_partition_named_twice_is_refused_and_a_cancel_reverts(nursery, autojump_clock):
    apis = await active_apis(nursery)
    await add_brokers(apis, 1, 2)
    await topic(apis, "t", 1, 1)
    only = apis.controller.image.partition("t", 0)
    assert only is not None
    other = 3 - only.replicas[0]
    twice = await call(
        apis,
        ApiKey.ALTER_PARTITION_REASSIGNMENTS,
        reassignments(("t", 0, [other]), ("t", 0, [other])),
    )
    assert results(twice) == {("t", 0): ErrorCode.INVALID_REQUEST}
    assert not apis.controller.image.partition("t", 0).reassigning  # type: ignore[union-attr]
    await call(apis, ApiKey.ALTER_PARTITION_REASSIGNMENTS, reassignments(("t", 0, [other])))
    assert apis.controller.image.partition("t", 0).reassigning  # type: ignore[union-attr]
    cancel = await call(apis, ApiKey.ALTER_PARTITION_REASSIGNMENTS, reassignments(("t", 0, None)))
    assert results(cancel) == {("t", 0): 0}
    assert apis.controller.image.partition("t", 0) == dataclasses.replace(
        only, partition_epoch=only.partition_epoch + 2
    )
    again = await call(apis, ApiKey.ALTER_PARTITION_REASSIGNMENTS, reassignments(("t", 0, None)))
    assert results(again) == {("t", 0): ErrorCode.NO_REASSIGNMENT_IN_PROGRESS}


async def test_decommission_moves_every_partition_and_describe_cluster_shows_it(
    nursery, autojump_clock
):
    apis = await active_apis(nursery)
    await add_brokers(apis, 1, 2, 3)
    await topic(apis, "t", 6, 2)
    image = apis.controller.image
    hosted = image.partitions_on(3)
    assert hosted == 4
    reply = await call(apis, ApiKey.DECOMMISSION_BROKER, {"broker_id": 3})
    assert reply == {
        "broker_id": 3,
        "decommissioned": True,
        "partitions": 4,  # they list 3 until their new replicas catch up
        "partitions_not_moving": 0,
        "metadata_offset": apis.controller.image.last_applied_index,
    }
    described = await call(apis, ApiKey.DESCRIBE_CLUSTER, {})
    flags = {b["node_id"]: (b["decommissioned"], b["partitions"]) for b in described["brokers"]}
    assert flags == {1: (False, 6), 2: (False, 6), 3: (True, 4)}
    # A new topic avoids the broker being decommissioned.
    await topic(apis, "u", 4, 2)
    assert all(3 not in p.replicas for p in apis.controller.image.topics["u"].partitions)
    # Recommissioned: it may receive new replicas again; the moves go on.
    back = await call(apis, ApiKey.DECOMMISSION_BROKER, {"broker_id": 3, "decommissioned": False})
    assert back["decommissioned"] is False and back["partitions"] == 4
    assert back["partitions_not_moving"] == 0


async def test_the_default_replication_factor_counts_out_decommissioned_brokers(
    nursery, autojump_clock
):
    apis = await active_apis(nursery)
    await add_brokers(apis, 1, 2, 3)
    await call(apis, ApiKey.DECOMMISSION_BROKER, {"broker_id": 3})
    body = {"topics": [{"topic": "d", "partitions": 2, "replication_factor": -1}]}
    reply = await call(apis, ApiKey.CREATE_TOPICS, body)
    assert reply["topics"][0]["error_code"] == 0
    partitions = apis.controller.image.topics["d"].partitions
    assert all(sorted(p.replicas) == [1, 2] for p in partitions)


async def test_decommission_is_refused_when_the_others_cannot_hold_the_replicas(
    nursery, autojump_clock
):
    apis = await active_apis(nursery)
    await add_brokers(apis, 1, 2)
    await topic(apis, "t", 1, 2)
    before = apis.controller.image
    with pytest.raises(DwalError) as caught:
        await call(apis, ApiKey.DECOMMISSION_BROKER, {"broker_id": 2})
    assert caught.value.code == ErrorCode.INVALID_REPLICATION_FACTOR
    assert "cannot move t-0 off broker 2" in caught.value.message
    assert (
        apis.controller.image.topics == before.topics and not apis.controller.image.decommissioned
    )
    with pytest.raises(DwalError) as caught:
        await call(apis, ApiKey.DECOMMISSION_BROKER, {"broker_id": 9})
    assert caught.value.code == ErrorCode.BROKER_NOT_AVAILABLE


# Automatic leader balancing.

INTERVAL_S = 60.0


async def balancing_apis(nursery, **settings: Any) -> ControllerApis:
    """One voter whose sessions never expire (the brokers do not heartbeat in these tests)."""
    network = MemoryNetwork(random.Random(1))
    await nursery.start(network.run)
    config = dataclasses.replace(
        CONFIG,
        session_timeout_seconds=10_000.0,
        leader_imbalance_check_interval_seconds=INTERVAL_S,
        **settings,
    )
    storage = MemoryStorage(Configuration(voters=frozenset({1})))
    controller = QuorumController(raft_config(1), storage, network.endpoint(1), config=config)
    await nursery.start(controller.run)
    controller.driver.campaign()
    with trio.fail_after(10):
        await controller.wait_active()
    return ControllerApis(controller, log_defaults=LogConfig(), limits=Limits())


async def imbalance(apis: ControllerApis) -> tuple[int, int]:
    """Two brokers, one partition on both; its preferred leader shuts down, comes back and
    rejoins the ISR: it is in sync but does not lead. Returns (preferred, other)."""
    epochs = await add_brokers(apis, 1, 2)
    await topic(apis, "t", 1, 2)
    state = apis.controller.image.partition("t", 0)
    assert state is not None
    preferred, other = state.replicas
    offset = apis.controller.image.last_applied_index
    await heartbeat(apis, preferred, epochs[preferred], offset, shut_down=True)
    epochs[preferred] = await register(apis, preferred)
    await heartbeat(apis, preferred, epochs[preferred], apis.controller.image.last_applied_index)
    state = apis.controller.image.partition("t", 0)
    assert state is not None and state.leader == other
    await alter_partition(
        apis,
        other,
        epochs[other],
        "t",
        leader_epoch=state.leader_epoch,
        partition_epoch=state.partition_epoch,
        isr=[other, preferred],
    )
    return preferred, other


def leader(apis: ControllerApis) -> int:
    state = apis.controller.image.partition("t", 0)
    assert state is not None
    return state.leader


async def test_the_active_controller_gives_leadership_back_at_each_check(nursery, autojump_clock):
    apis = await balancing_apis(nursery)
    started = trio.current_time()
    preferred, other = await imbalance(apis)
    assert trio.current_time() - started < INTERVAL_S / 2, "set up well before the first check"
    await trio.sleep_until(started + INTERVAL_S * 0.9)
    assert leader(apis) == other, "not before the check interval"
    await trio.sleep_until(started + INTERVAL_S * 1.1)
    assert leader(apis) == preferred
    assert apis.controller.statistics().leaders_balanced == 1


async def test_no_automatic_balancing_when_it_is_disabled(nursery, autojump_clock):
    apis = await balancing_apis(nursery, auto_leader_rebalance_enable=False)
    _, other = await imbalance(apis)
    await trio.sleep(INTERVAL_S * 3)
    assert leader(apis) == other
    assert apis.controller.statistics().leaders_balanced == 0


async def test_an_imbalance_at_the_percentage_is_left_alone(nursery, autojump_clock):
    apis = await balancing_apis(nursery, leader_imbalance_per_broker_percentage=100)
    _, other = await imbalance(apis)
    await trio.sleep(INTERVAL_S * 3)
    assert leader(apis) == other, "100 % of its partitions is not above 100 %"
