"""The Kafka group APIs (broker/gateway/kafka_group_apis.py) and the group coordinator's
classic groups (broker/group_coordinator.py).

In process: the handlers are called on the request handlers of a whole node (`running_node`:
embedded controller, publisher, registry, coordinator and its expiry loop) with kio request
entities of every version they advertise; every response goes through a kio encode/decode
round trip. The coordinator reads the time through `broker.group_coordinator.now_ms`, which
these tests point at trio's clock, so with `autojump_clock` rebalance and session timeouts
pass in virtual time (nodes start and topics are created at the real pace: `at_real_pace`).

End to end: a `dwal broker` process serving Kafka (`--kafka-port`), driven by kafka-python's
KafkaConsumer and KafkaAdminClient (and librdkafka through confluent-kafka) in worker
threads, with bounded polling loops and no sleeps.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import trio
from kafka_api_support import nested, request, round_trip, versions_of
from broker_test_support import TEST_CONTEXT, at_real_pace, create_topic, running_node
from kafka.protocol.consumer.metadata import (
    ConsumerProtocolAssignment,
    ConsumerProtocolSubscription,
)
from kio.index import load_request_schema, load_response_schema
from kio.schema.errors import ErrorCode as KafkaErrorCode

import broker.group_coordinator as group_coordinator_module
from broker.gateway import kafka_group_apis
from broker.gateway.kafka_entities import KafkaContext, duration
from broker.gateway.kafka_group_apis import APIS
from broker.group_coordinator import OFFSETS_TOPIC
from broker.node import BrokerNode
from broker.storage import LogConfig
from protocol import ApiKey, check_request

FIND_COORDINATOR, JOIN_GROUP, SYNC_GROUP, HEARTBEAT, LEAVE_GROUP = 10, 11, 14, 12, 13
OFFSET_COMMIT, OFFSET_FETCH, DESCRIBE_GROUPS, LIST_GROUPS, DELETE_GROUPS = 8, 9, 15, 16, 42
KAFKA_PORT = 19092
# short, so that the tests waiting them out take little real time (the node's background
# tasks still run in virtual time); the node allows sessions from 1 s
SESSION_MS = 2_000
REBALANCE_MS = 4_000
NONE = KafkaErrorCode.none


class Context(KafkaContext):
    """A KafkaContext whose brokers all serve a Kafka listener on KAFKA_PORT (the node in
    process has no listener), unless `no_listener`."""

    no_listener = False

    def kafka_address(self, node_id: int) -> tuple[str, int] | None:
        if node_id in self.handlers.member.image.brokers and not self.no_listener:
            return "127.0.0.1", KAFKA_PORT
        return None


def versions(api_key: int) -> list[int]:
    return versions_of(APIS, api_key)


async def call(node: BrokerNode, api_key: int, version: int, entity: Any, **context) -> Any:
    """Handle `entity`; return the response after a kio encode/decode round trip."""
    (api,) = [api for api in APIS if api.api_key == api_key]
    ctx = Context(node.handlers, api_key, version, context.get("client_id", "test"), "127.0.0.1")
    ctx.no_listener = context.get("no_listener", False)
    return round_trip(await api.handle(ctx, entity), api_key, version)


@contextlib.asynccontextmanager
async def open_node(tmp_path, **config: Any) -> AsyncIterator[BrokerNode]:
    """A node with topics "a" (2 partitions) and "b" (1) and __consumer_offsets created."""
    async with contextlib.AsyncExitStack() as stack:
        with at_real_pace():
            node = await stack.enter_async_context(
                running_node(
                    tmp_path / "data",
                    LogConfig(fsync="never"),
                    offsets_topic_partitions=2,
                    **{"group_classic_session_timeout_ms_min": 1_000, **config},
                )
            )
            for name, partitions in (("a", 2), ("b", 1)):
                await create_topic(node, name, partitions)
            await node.coordinator.ensure_offsets_topic()
        yield node


@pytest.fixture
async def node(tmp_path, autojump_clock, monkeypatch) -> AsyncIterator[BrokerNode]:
    monkeypatch.setattr(group_coordinator_module, "now_ms", lambda: int(trio.current_time() * 1000))
    async with open_node(tmp_path) as node:
        yield node


def subscription(*topics: str) -> bytes:
    return ConsumerProtocolSubscription(0, list(topics), b"").encode()


def assignment(partitions: dict[str, list[int]]) -> bytes:
    return ConsumerProtocolAssignment(0, sorted(partitions.items()), b"").encode()


class Member:
    """One Kafka client's calls of the group APIs, at chosen versions."""

    def __init__(self, node: BrokerNode, group_id: str = "g", *, join_version: int = 9):
        self.node = node
        self.group_id = group_id
        self.join_version = join_version
        self.member_id = ""
        self.generation = -1
        self.joined: Any = None

    async def join(
        self,
        metadata: bytes = b"",
        *,
        protocols: list[tuple[str, bytes]] | None = None,
        instance_id: str | None = None,
    ) -> Any:
        """JoinGroup (KIP-394's second join when asked for a member id); returns the answer."""
        version = self.join_version
        protocols = protocols or [("range", metadata or subscription("a"))]
        for _ in range(2):
            entity = request(
                JOIN_GROUP,
                version,
                group_id=self.group_id,
                session_timeout=duration(SESSION_MS),
                rebalance_timeout=duration(REBALANCE_MS),
                member_id=self.member_id,
                group_instance_id=instance_id,
                protocol_type="consumer",
                protocols=tuple(
                    nested(JOIN_GROUP, version, "protocols", name=name, metadata=data)
                    for name, data in protocols
                ),
            )
            response = await call(self.node, JOIN_GROUP, version, entity, client_id="client")
            self.member_id = response.member_id or self.member_id
            if response.error_code != KafkaErrorCode.member_id_required:
                break
        self.generation = response.generation_id
        self.joined = response
        return response

    async def sync(self, assignments: dict[str, bytes] | None = None, version: int = 5) -> Any:
        entity = request(
            SYNC_GROUP,
            version,
            group_id=self.group_id,
            generation_id=self.generation,
            member_id=self.member_id,
            protocol_type="consumer" if version >= 5 else None,
            protocol_name=self.joined.protocol_name if version >= 5 else None,
            assignments=tuple(
                nested(SYNC_GROUP, version, "assignments", member_id=m, assignment=a)
                for m, a in (assignments or {}).items()
            ),
        )
        return await call(self.node, SYNC_GROUP, version, entity)

    async def heartbeat(self, version: int = 4) -> KafkaErrorCode:
        entity = request(
            HEARTBEAT,
            version,
            group_id=self.group_id,
            generation_id=self.generation,
            member_id=self.member_id,
        )
        return (await call(self.node, HEARTBEAT, version, entity)).error_code

    async def leave(self, version: int = 5) -> Any:
        if version < 3:
            entity = request(LEAVE_GROUP, version, group_id=self.group_id, member_id=self.member_id)
        else:
            member = nested(LEAVE_GROUP, version, "members", member_id=self.member_id)
            entity = request(LEAVE_GROUP, version, group_id=self.group_id, members=(member,))
        return await call(self.node, LEAVE_GROUP, version, entity)


async def commit(
    node: BrokerNode,
    group_id: str,
    offsets: dict[tuple[str, int], int],
    *,
    version: int = 9,
    generation: int = -1,
    member_id: str = "",
) -> dict[tuple[str, int], KafkaErrorCode]:
    by_id = version >= 10
    ids = {
        name: uuid.UUID(bytes=info.topic_id)
        for name, info in node.handlers.member.image.topics.items()
    }
    topics: dict[str, list] = {}
    for (topic, partition), offset in offsets.items():
        topics.setdefault(topic, []).append(
            nested(
                OFFSET_COMMIT,
                version,
                "topics",
                "partitions",
                partition_index=partition,
                committed_offset=offset,
                committed_metadata="m",
            )
        )
    entity = request(
        OFFSET_COMMIT,
        version,
        group_id=group_id,
        generation_id_or_member_epoch=generation,
        member_id=member_id,
        topics=tuple(
            nested(
                OFFSET_COMMIT,
                version,
                "topics",
                name=topic,
                topic_id=ids.get(topic, uuid.uuid4()),
                partitions=tuple(parts),
            )
            for topic, parts in topics.items()
        ),
    )
    response = await call(node, OFFSET_COMMIT, version, entity)
    names = {v: k for k, v in ids.items()}
    return {
        ((names.get(t.topic_id, "?") if by_id else t.name), p.partition_index): p.error_code
        for t in response.topics
        for p in t.partitions
    }


async def fetch(
    node: BrokerNode, group_id: str, wanted: dict[str, list[int]] | None, version: int = 7
) -> tuple[KafkaErrorCode, dict[tuple[str, int], int]]:
    """(group error, committed offsets) through OffsetFetch of `version`."""
    ids = {
        name: uuid.UUID(bytes=info.topic_id)
        for name, info in node.handlers.member.image.topics.items()
    }
    names = {v: k for k, v in ids.items()}
    if version >= 8:
        topics = None
        if wanted is not None:
            topics = tuple(
                nested(
                    OFFSET_FETCH,
                    version,
                    "groups",
                    "topics",
                    name=t,
                    topic_id=ids.get(t),
                    partition_indexes=tuple(p),
                )
                for t, p in wanted.items()
            )
        group = nested(OFFSET_FETCH, version, "groups", group_id=group_id, topics=topics)
        response = await call(
            node, OFFSET_FETCH, version, request(OFFSET_FETCH, version, groups=(group,))
        )
        (answer,) = response.groups
        code, topics_answered = answer.error_code, answer.topics
    else:
        topics = tuple(
            nested(OFFSET_FETCH, version, "topics", name=t, partition_indexes=tuple(p))
            for t, p in (wanted or {}).items()
        )
        entity = request(
            OFFSET_FETCH,
            version,
            group_id=group_id,
            topics=None if wanted is None and version >= 2 else topics,
        )
        response = await call(node, OFFSET_FETCH, version, entity)
        code = getattr(response, "error_code", NONE)
        topics_answered = response.topics
    offsets = {}
    for t in topics_answered:
        name = names.get(t.topic_id) if version >= 10 else t.name
        for p in t.partitions:
            if version < 2 and p.error_code != NONE:
                code = p.error_code
            offsets[(name, p.partition_index)] = p.committed_offset
    return code, offsets


async def stable_pair(node: BrokerNode, group_id: str = "g") -> tuple[Member, Member]:
    """Two members joined and synced, concurrently: the leader assigns a-0 to itself and
    a-1 to the follower."""
    first, second = Member(node, group_id), Member(node, group_id)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.join)
        nursery.start_soon(second.join)
    leader, follower = (first, second) if first.joined.members else (second, first)
    assert leader.joined.leader == leader.member_id == follower.joined.leader
    assignments = {
        leader.member_id: assignment({"a": [0]}),
        follower.member_id: assignment({"a": [1]}),
    }
    synced: dict[str, Any] = {}

    async def sync(member: Member, given: dict[str, bytes] | None) -> None:
        synced[member.member_id] = await member.sync(given)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sync, follower, None)
        await trio.sleep(0.1)  # the follower waits for the leader (its answer would be at once)
        assert follower.member_id not in synced
        nursery.start_soon(sync, leader, assignments)
    assert synced[follower.member_id].assignment == assignments[follower.member_id]
    assert synced[leader.member_id].assignment == assignments[leader.member_id]
    return leader, follower


# -- the table ---------------------------------------------------------------------------


def test_every_api_is_registered_once_and_kio_has_each_version():
    keys = [api.api_key for api in kafka_group_apis.APIS]
    assert len(keys) == len(set(keys))
    for api in kafka_group_apis.APIS:
        for version in range(api.min_version, api.max_version + 1):
            load_request_schema(api.api_key, version)
            load_response_schema(api.api_key, version)
    waiting = {api.api_key for api in kafka_group_apis.APIS if api.concurrent}
    assert waiting == {JOIN_GROUP, SYNC_GROUP}


async def test_the_brokers_classic_group_settings_reach_the_coordinator(tmp_path):
    settings = {
        "group_classic_initial_rebalance_delay_ms": 0,
        "group_classic_session_timeout_ms_min": 2_000,
        "group_classic_session_timeout_ms_max": 60_000,
    }
    async with open_node(tmp_path, **settings) as node:
        config = node.coordinator.group_config
        assert config.classic_initial_rebalance_delay_ms == 0
        assert config.classic_session_timeout_ms_min == 2_000
        assert config.classic_session_timeout_ms_max == 60_000


# -- FindCoordinator -----------------------------------------------------------------------


@pytest.mark.parametrize("version", versions(FIND_COORDINATOR))
async def test_find_coordinator_every_version(node, version):
    node_id = node.config.node_id
    if version < 4:
        response = await call(
            node, FIND_COORDINATOR, version, request(FIND_COORDINATOR, version, key="g")
        )
        assert (response.error_code, response.node_id, response.port) == (NONE, node_id, KAFKA_PORT)
        if version >= 1:
            entity = request(FIND_COORDINATOR, version, key="t", key_type=1)
            response = await call(node, FIND_COORDINATOR, version, entity)
            assert response.error_code == KafkaErrorCode.coordinator_not_available
            assert "transactions are not supported" in response.error_message
        return
    entity = request(FIND_COORDINATOR, version, key_type=0, coordinator_keys=("g", "h", ""))
    response = await call(node, FIND_COORDINATOR, version, entity)
    answers = {c.key: (c.error_code, c.node_id, c.host, c.port) for c in response.coordinators}
    assert answers["g"] == answers["h"] == (NONE, node_id, "127.0.0.1", KAFKA_PORT)
    assert answers[""][0] == KafkaErrorCode.invalid_request
    entity = request(FIND_COORDINATOR, version, key_type=1, coordinator_keys=("tx",))
    (answer,) = (await call(node, FIND_COORDINATOR, version, entity)).coordinators
    assert answer.error_code == KafkaErrorCode.coordinator_not_available


async def test_find_coordinator_without_a_kafka_listener_says_not_available(node):
    response = await call(
        node, FIND_COORDINATOR, 3, request(FIND_COORDINATOR, 3, key="g"), no_listener=True
    )
    assert response.error_code == KafkaErrorCode.coordinator_not_available
    assert "no Kafka listener" in response.error_message


# -- JoinGroup, SyncGroup, Heartbeat, LeaveGroup ---------------------------------------------


@pytest.mark.parametrize("version", versions(JOIN_GROUP))
async def test_join_sync_heartbeat_leave_at_every_version(node, version):
    member = Member(node, f"g{version}", join_version=version)
    joined = await member.join()
    assert joined.error_code == NONE
    assert joined.generation_id == 1 and joined.leader == member.member_id
    assert member.member_id.startswith("client-")
    assert [(m.member_id, m.metadata) for m in joined.members] == [
        (member.member_id, subscription("a"))
    ]
    assert joined.protocol_name == "range"
    sync_version = min(version, 5)
    synced = await member.sync({member.member_id: assignment({"a": [0, 1]})}, sync_version)
    assert synced.error_code == NONE
    assert synced.assignment == assignment({"a": [0, 1]})
    assert await member.heartbeat(min(version, 4)) == NONE
    left = await member.leave(min(version, 5))
    assert left.error_code == NONE
    assert await member.heartbeat() == KafkaErrorCode.unknown_member_id


@pytest.mark.parametrize("version", versions(JOIN_GROUP))
async def test_a_refused_join_is_answered_at_every_version(node, version):
    entity = request(
        JOIN_GROUP,
        version,
        group_id="g",
        session_timeout=duration(1),  # below the allowed minimum
        rebalance_timeout=duration(REBALANCE_MS),
        member_id="",
        protocol_type="consumer",
        protocols=(nested(JOIN_GROUP, version, "protocols", name="range", metadata=b""),),
    )
    response = await call(node, JOIN_GROUP, version, entity)
    assert response.error_code == KafkaErrorCode.invalid_session_timeout
    assert response.generation_id == -1 and response.members == ()


async def test_kip_394_first_join_gets_a_member_id(node):
    entity = request(
        JOIN_GROUP,
        4,
        group_id="g",
        session_timeout=duration(SESSION_MS),
        rebalance_timeout=duration(REBALANCE_MS),
        member_id="",
        protocol_type="consumer",
        protocols=(nested(JOIN_GROUP, 4, "protocols", name="range", metadata=b""),),
    )
    response = await call(node, JOIN_GROUP, 4, entity)
    assert response.error_code == KafkaErrorCode.member_id_required
    assert response.member_id and response.generation_id == -1


async def test_two_members_rebalance_when_one_joins_and_when_one_leaves(node):
    leader, follower = await stable_pair(node)
    assert await leader.heartbeat() == NONE
    # a third member: the others learn it from their heartbeats and rejoin
    third = Member(node)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(third.join)
        await trio.sleep(0.5)
        assert await leader.heartbeat() == KafkaErrorCode.rebalance_in_progress
        assert await follower.heartbeat() == KafkaErrorCode.rebalance_in_progress
        nursery.start_soon(leader.join)
        nursery.start_soon(follower.join)
    assert leader.generation == follower.generation == third.generation == 2
    assert len(leader.joined.members) == 3 and not third.joined.members
    # the follower leaves: the others rejoin for generation 3
    assert (await follower.leave()).error_code == NONE
    assert await leader.heartbeat() == KafkaErrorCode.rebalance_in_progress
    async with trio.open_nursery() as nursery:
        nursery.start_soon(leader.join)
        nursery.start_soon(third.join)
    assert leader.generation == third.generation == 3
    assert {m.member_id for m in leader.joined.members} == {leader.member_id, third.member_id}


async def test_a_member_that_does_not_rejoin_is_removed_at_the_rebalance_timeout(
    node, autojump_clock
):
    leader, follower = await stable_pair(node)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follower.join, subscription("a", "b"))  # new metadata: rebalance
        for _ in range(REBALANCE_MS // 1_000 - 1):  # the leader heartbeats, never rejoins
            await trio.sleep(1)
            assert await leader.heartbeat() == KafkaErrorCode.rebalance_in_progress
    assert trio.current_time() - start == pytest.approx(REBALANCE_MS / 1000, abs=0.3)
    assert follower.joined.generation_id == 2 and follower.joined.leader == follower.member_id
    assert await leader.heartbeat() == KafkaErrorCode.unknown_member_id


async def test_a_member_that_stops_heartbeating_expires_through_the_expiry_loop(
    node, autojump_clock
):
    leader, follower = await stable_pair(node)
    for _ in range(SESSION_MS // 500 + 4):  # virtual time: the node's expiry loop runs
        await trio.sleep(0.5)
        code = await leader.heartbeat()
    assert code == KafkaErrorCode.rebalance_in_progress
    assert await follower.heartbeat() == KafkaErrorCode.unknown_member_id
    await leader.join()
    assert leader.generation == 2 and len(leader.joined.members) == 1


async def test_sync_and_heartbeat_errors(node):
    leader, follower = await stable_pair(node)
    follower.generation = 7
    assert await follower.heartbeat() == KafkaErrorCode.illegal_generation
    assert (await follower.sync()).error_code == KafkaErrorCode.illegal_generation
    stranger = Member(node)
    stranger.member_id, stranger.generation, stranger.joined = "nobody", 1, leader.joined
    assert await stranger.heartbeat() == KafkaErrorCode.unknown_member_id
    assert (await stranger.sync()).error_code == KafkaErrorCode.unknown_member_id
    other_group = Member(node, "no-such-group")
    assert await other_group.heartbeat() == KafkaErrorCode.unknown_member_id
    left = await other_group.leave()
    assert [m.error_code for m in left.members] == [KafkaErrorCode.unknown_member_id]


async def test_a_static_member_restarting_keeps_its_assignment_without_a_rebalance(node):
    member = Member(node)
    await member.join(instance_id="host-1")
    await member.sync({member.member_id: assignment({"a": [0, 1]})})
    restarted = Member(node)
    joined = await restarted.join(instance_id="host-1")
    assert joined.error_code == NONE and joined.skip_assignment  # v9: the leader keeps it
    assert joined.generation_id == 1 and restarted.member_id != member.member_id
    assert (await restarted.sync()).assignment == assignment({"a": [0, 1]})
    entity = request(
        HEARTBEAT,
        4,
        group_id="g",
        generation_id=1,
        member_id=member.member_id,
        group_instance_id="host-1",
    )
    fenced = await call(node, HEARTBEAT, 4, entity)
    assert fenced.error_code == KafkaErrorCode.fenced_instance_id


async def test_a_join_to_a_dwal_group_and_a_dwal_heartbeat_to_a_kafka_group_are_refused(node):
    body = check_request(
        ApiKey.CONSUMER_GROUP_HEARTBEAT,
        {
            "group_id": "dwal-group",
            "member_id": None,
            "member_epoch": 0,
            "subscribed_topic_names": ["a"],
            "rebalance_timeout_ms": 5_000,
        },
    )
    reply = await node.handlers.consumer_group_heartbeat(body, b"", TEST_CONTEXT)
    assert reply.body["member_epoch"] > 0
    joined = await Member(node, "dwal-group").join()
    assert joined.error_code == KafkaErrorCode.inconsistent_group_protocol
    await Member(node, "kafka-group").join()
    body = check_request(
        ApiKey.CONSUMER_GROUP_HEARTBEAT,
        {
            "group_id": "kafka-group",
            "member_id": None,
            "member_epoch": 0,
            "subscribed_topic_names": ["a"],
        },
    )
    with pytest.raises(Exception) as caught:
        await node.handlers.consumer_group_heartbeat(body, b"", TEST_CONTEXT)
    assert "GROUP_ID_NOT_FOUND" in str(caught.value)


async def test_not_coordinator_when_this_broker_does_not_lead_the_groups_partition(node):
    coordinator = node.coordinator
    partition = coordinator.partition_of("g")
    coordinator.loaded_partitions.discard(partition)
    try:
        joined = await Member(node).join()
        assert joined.error_code == KafkaErrorCode.not_coordinator
        code, _ = await fetch(node, "g", {"a": [0]})
        assert code == KafkaErrorCode.not_coordinator
        codes = await commit(node, "g", {("a", 0): 1})
        assert codes == {("a", 0): KafkaErrorCode.not_coordinator}
    finally:
        coordinator.loaded_partitions.add(partition)


async def test_losing_the_offsets_partition_answers_a_waiting_join_not_coordinator(node):
    leader, follower = await stable_pair(node)
    coordinator = node.coordinator
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follower.join, subscription("a", "b"))  # waits for the leader
        await trio.sleep(1)
        assert follower.joined.generation_id == 1  # still waiting
        # what the metadata publisher does when another broker leads the partition
        coordinator._unload_partition(coordinator.partition_of("g"))
    assert follower.joined.error_code == KafkaErrorCode.not_coordinator
    assert "g" not in coordinator.classic_groups
    assert await leader.heartbeat() == KafkaErrorCode.not_coordinator


# -- OffsetCommit, OffsetFetch ------------------------------------------------------------------


@pytest.mark.parametrize("version", versions(OFFSET_COMMIT))
async def test_simple_commits_of_every_version_are_read_by_every_fetch_version(node, version):
    group_id = f"simple-{version}"
    codes = await commit(node, group_id, {("a", 0): 5, ("b", 0): 7}, version=version)
    assert codes == {("a", 0): NONE, ("b", 0): NONE}
    for fetch_version in versions(OFFSET_FETCH):
        wanted = {"a": [0, 1], "b": [0]}
        code, offsets = await fetch(node, group_id, wanted, fetch_version)
        assert code == NONE
        assert offsets == {("a", 0): 5, ("a", 1): -1, ("b", 0): 7}
        if fetch_version >= 2:
            code, offsets = await fetch(node, group_id, None, fetch_version)
            assert offsets == {("a", 0): 5, ("b", 0): 7}
    # DWAL's native OffsetFetch sees the same commits
    native = node.coordinator.fetch_offsets({"group_id": group_id, "topics": None})
    assert {
        (t["topic"], p["partition"]): p["offset"] for t in native["topics"] for p in t["partitions"]
    } == {
        ("a", 0): 5,
        ("b", 0): 7,
    }


async def test_member_commits_follow_kafkas_generation_rules(node):
    leader, follower = await stable_pair(node)
    ok = await commit(node, "g", {("a", 0): 3}, generation=1, member_id=leader.member_id)
    assert ok == {("a", 0): NONE}
    stale = await commit(node, "g", {("a", 0): 4}, generation=0, member_id=leader.member_id)
    assert stale == {("a", 0): KafkaErrorCode.illegal_generation}
    outsider = await commit(node, "g", {("a", 0): 4})  # the group has members
    assert outsider == {("a", 0): KafkaErrorCode.unknown_member_id}
    unknown = await commit(node, "g", {("a", 0): 4}, generation=1, member_id="ghost")
    assert unknown == {("a", 0): KafkaErrorCode.unknown_member_id}
    missing = await commit(
        node, "g", {("nope", 0): 4, ("a", 9): 1}, generation=1, member_id=leader.member_id
    )
    assert missing == {
        ("nope", 0): KafkaErrorCode.unknown_topic_or_partition,
        ("a", 9): KafkaErrorCode.unknown_topic_or_partition,
    }
    nobody = await commit(node, "empty", {("a", 0): 1}, generation=3, member_id="x")
    assert nobody == {("a", 0): KafkaErrorCode.illegal_generation}
    _, offsets = await fetch(node, "g", {"a": [0]})
    assert offsets == {("a", 0): 3}


async def test_the_committed_leader_epoch_is_kept_and_replayed(node):
    version = 9
    partition = nested(
        OFFSET_COMMIT,
        version,
        "topics",
        "partitions",
        partition_index=0,
        committed_offset=12,
        committed_leader_epoch=4,
        committed_metadata=None,
    )
    entity = request(
        OFFSET_COMMIT,
        version,
        group_id="epochs",
        member_id="",
        topics=(nested(OFFSET_COMMIT, version, "topics", name="a", partitions=(partition,)),),
    )
    await call(node, OFFSET_COMMIT, version, entity)
    wanted = (nested(OFFSET_FETCH, 7, "topics", name="a", partition_indexes=(0, 1)),)
    entity = request(OFFSET_FETCH, 7, group_id="epochs", topics=wanted)
    (topic,) = (await call(node, OFFSET_FETCH, 7, entity)).topics
    found = {
        p.partition_index: (p.committed_offset, p.committed_leader_epoch) for p in topic.partitions
    }
    assert found == {0: (12, 4), 1: (-1, -1)}
    # a new coordinator reads it back from __consumer_offsets
    coordinator = node.coordinator
    log = node.registry.logs[(OFFSETS_TOPIC, coordinator.partition_of("epochs"))]
    replayed: dict = {}
    await coordinator._load_partition(log, replayed)
    assert replayed["epochs"][("a", 0)].leader_epoch == 4


async def test_offset_fetch_v8_answers_several_groups(node):
    await commit(node, "one", {("a", 0): 1})
    await commit(node, "two", {("a", 1): 2})
    groups = tuple(
        nested(OFFSET_FETCH, 8, "groups", group_id=g, topics=None) for g in ("one", "two", "three")
    )
    response = await call(node, OFFSET_FETCH, 8, request(OFFSET_FETCH, 8, groups=groups))
    found = {
        g.group_id: {
            (t.name, p.partition_index): p.committed_offset for t in g.topics for p in t.partitions
        }
        for g in response.groups
    }
    assert found == {"one": {("a", 0): 1}, "two": {("a", 1): 2}, "three": {}}


# -- DescribeGroups, ListGroups, DeleteGroups -----------------------------------------------


@pytest.mark.parametrize("version", versions(DESCRIBE_GROUPS))
async def test_describe_groups_every_version(node, version):
    leader, follower = await stable_pair(node)
    await commit(node, "offsets-only", {("a", 0): 1})
    entity = request(DESCRIBE_GROUPS, version, groups=("g", "offsets-only", "unknown"))
    response = await call(node, DESCRIBE_GROUPS, version, entity)
    g, offsets_only, unknown = response.groups
    assert (g.error_code, g.group_state, g.protocol_type, g.protocol_data) == (
        NONE,
        "Stable",
        "consumer",
        "range",
    )
    members = {m.member_id: m for m in g.members}
    assert set(members) == {leader.member_id, follower.member_id}
    assert members[follower.member_id].member_assignment == assignment({"a": [1]})
    assert members[follower.member_id].member_metadata == subscription("a")
    assert members[follower.member_id].client_id == "client"
    assert (offsets_only.error_code, offsets_only.group_state) == (NONE, "Empty")
    expected = KafkaErrorCode.group_id_not_found if version >= 6 else NONE
    assert (unknown.error_code, unknown.group_state) == (expected, "Dead")


async def test_describe_and_list_show_dwal_groups_as_kafka_names_them(node):
    body = check_request(
        ApiKey.CONSUMER_GROUP_HEARTBEAT,
        {
            "group_id": "dwal",
            "member_id": None,
            "member_epoch": 0,
            "subscribed_topic_names": ["a"],
            "rebalance_timeout_ms": 5_000,
        },
    )
    await node.handlers.consumer_group_heartbeat(body, b"", TEST_CONTEXT)
    response = await call(node, DESCRIBE_GROUPS, 5, request(DESCRIBE_GROUPS, 5, groups=("dwal",)))
    (group,) = response.groups
    assert (group.group_state, group.protocol_type) == ("Stable", "consumer")
    (member,) = group.members
    decoded = ConsumerProtocolAssignment.decode(member.member_assignment)
    assert [(t.topic, t.partitions) for t in decoded.assigned_partitions] == [("a", [0, 1])]
    assert ConsumerProtocolSubscription.decode(member.member_metadata).topics == ["a"]
    listed = await call(node, LIST_GROUPS, 5, request(LIST_GROUPS, 5))
    assert [(g.group_id, g.group_type, g.group_state) for g in listed.groups] == [
        ("dwal", "consumer", "Stable")
    ]


@pytest.mark.parametrize("version", versions(LIST_GROUPS))
async def test_list_groups_every_version_with_filters(node, version):
    await stable_pair(node, "busy")
    await commit(node, "idle", {("a", 0): 1})
    response = await call(node, LIST_GROUPS, version, request(LIST_GROUPS, version))
    assert response.error_code == NONE
    listed = {g.group_id: g for g in response.groups}
    assert set(listed) == {"busy", "idle"}
    assert listed["busy"].protocol_type == "consumer"
    if version >= 4:
        assert (listed["busy"].group_state, listed["idle"].group_state) == ("Stable", "Empty")
        entity = request(LIST_GROUPS, version, states_filter=("stable",))
        filtered = await call(node, LIST_GROUPS, version, entity)
        assert [g.group_id for g in filtered.groups] == ["busy"]
    if version >= 5:
        assert listed["busy"].group_type == "classic"
        entity = request(LIST_GROUPS, version, types_filter=("consumer",))
        assert (await call(node, LIST_GROUPS, version, entity)).groups == ()


@pytest.mark.parametrize("version", versions(DELETE_GROUPS))
async def test_delete_groups_every_version(node, version):
    await stable_pair(node, "busy")
    await commit(node, "idle", {("a", 0): 1})
    entity = request(DELETE_GROUPS, version, groups_names=("busy", "idle", "unknown"))
    response = await call(node, DELETE_GROUPS, version, entity)
    assert {r.group_id: r.error_code for r in response.results} == {
        "busy": KafkaErrorCode.non_empty_group,
        "idle": NONE,
        "unknown": KafkaErrorCode.group_id_not_found,
    }
    _, offsets = await fetch(node, "idle", None)
    assert offsets == {}


async def test_dwals_native_describe_and_list_show_a_kafka_group(node):
    leader, follower = await stable_pair(node)
    body = check_request(ApiKey.CONSUMER_GROUP_DESCRIBE, {"group_ids": ["g"]})
    (described,) = node.coordinator.describe_groups(body)["groups"]
    assert described["state"] == "Stable" and described["group_epoch"] == 1
    members = {m["member_id"]: m for m in described["members"]}
    assert members[follower.member_id]["assignment"] == [{"topic": "a", "partitions": [1]}]
    assert members[leader.member_id]["subscribed_topic_names"] == ["a"]
    listed = node.coordinator.list_groups()["groups"]
    assert listed == [{"group_id": "g", "state": "Stable", "members": 2}]


# -- end to end: kafka-python (and librdkafka) against `dwal broker --kafka-port` ----------------


TOPIC = "events"
PARTITIONS = 4
POLL_DEADLINE_S = 60


def wait_until(condition: Callable[[], bool], step: Callable[[], Any], what: str) -> None:
    """Call `step` until `condition()` holds; fail after POLL_DEADLINE_S."""
    deadline = time.monotonic() + POLL_DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        step()


@contextlib.contextmanager
def kafka_consumer(bootstrap: str, group_id: str, **options: Any) -> Iterator[Any]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        TOPIC,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=200,
        request_timeout_ms=30_000,
        **options,
    )
    try:
        yield consumer
    finally:
        consumer.close()


def produce(bootstrap: str, count: int) -> None:
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        if TOPIC not in admin.list_topics():
            admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for index in range(count):
            producer.send(TOPIC, key=b"%d" % index, value=b"value-%d" % index)
        producer.flush(30)
    finally:
        producer.close()


async def start_broker(broker_launcher, tmp_path, port: int = 0, kafka_port: int = 0):
    """A `dwal broker` process serving Kafka (killed by PID at teardown by the launcher)."""
    return await broker_launcher.start(
        tmp_path / "data",
        "--fsync",
        "never",
        port=port,
        kafka_port=kafka_port,
        http_port=-1,
    )


def in_thread(function: Callable[[], Any]) -> Any:
    return trio.to_thread.run_sync(function)


@pytest.mark.timeout(180)
async def test_kafka_python_members_share_partitions_and_rebalance(broker_launcher, tmp_path):
    broker = await start_broker(broker_launcher, tmp_path)
    bootstrap = f"127.0.0.1:{broker.kafka_port}"

    def scenario() -> None:
        produce(bootstrap, 40)
        with kafka_consumer(bootstrap, "pair") as first:
            wait_until(
                lambda: len(first.assignment()) == PARTITIONS,
                lambda: first.poll(100),
                "the first member to own every partition",
            )
            with kafka_consumer(bootstrap, "pair") as second:
                wait_until(
                    lambda: (
                        len(first.assignment()) + len(second.assignment()) == PARTITIONS
                        and bool(second.assignment())
                        and not first.assignment() & second.assignment()
                    ),
                    lambda: (first.poll(50), second.poll(50)),
                    "the partitions to be shared",
                )
                assert len(second.assignment()) == PARTITIONS // 2
            # the second member left: the first owns everything again
            wait_until(
                lambda: len(first.assignment()) == PARTITIONS,
                lambda: first.poll(100),
                "the first member to own every partition again",
            )

    await in_thread(scenario)


@pytest.mark.timeout(180)
async def test_kafka_python_commits_survive_a_broker_restart(broker_launcher, tmp_path):
    broker = await start_broker(broker_launcher, tmp_path)
    bootstrap = f"127.0.0.1:{broker.kafka_port}"

    def consume_and_commit() -> dict[int, int]:
        produce(bootstrap, 40)
        seen = 0
        with kafka_consumer(bootstrap, "durable") as consumer:

            def step() -> None:
                nonlocal seen
                seen += sum(len(r) for r in consumer.poll(200).values())

            wait_until(lambda: seen >= 40, step, "every record")
            consumer.commit()
            return {tp.partition: consumer.position(tp) for tp in consumer.assignment()}

    positions = await in_thread(consume_and_commit)
    assert sum(positions.values()) == 40
    await broker_launcher.signal(broker, signal.SIGTERM)
    broker = await start_broker(
        broker_launcher, tmp_path, port=broker.port, kafka_port=broker.kafka_port
    )

    def read_back() -> None:
        from kafka import KafkaAdminClient
        from kafka.structs import TopicPartition

        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            offsets = admin.list_group_offsets("durable")["durable"]
            assert {tp.partition: o.offset for tp, o in offsets.items()} == positions
            (group,) = admin.describe_groups(["durable"]).values()
            assert group["group_state"] == "Empty"
        finally:
            admin.close()
        with kafka_consumer(bootstrap, "durable") as consumer:
            wait_until(lambda: bool(consumer.assignment()), lambda: consumer.poll(100), "join")
            for partition, offset in positions.items():
                assert consumer.committed(TopicPartition(TOPIC, partition)) == offset
            assert consumer.poll(500) == {}  # nothing after the committed offsets

    await in_thread(read_back)
    # DWAL's own admin (`dwal group describe`) sees the same commits
    process = await trio.run_process(
        [
            sys.executable,
            "-m",
            "client.cli",
            "group",
            "describe",
            "durable",
            "--bootstrap",
            f"127.0.0.1:{broker.port}",
        ],
        capture_stdout=True,
        capture_stderr=True,
    )
    text = process.stdout.decode()
    for partition, offset in positions.items():
        assert f"{TOPIC:<24} {partition:>9} {offset:>12}" in text, text


@pytest.mark.timeout(180)
async def test_librdkafka_cooperative_sticky_rebalances(broker_launcher, tmp_path):
    confluent_kafka = pytest.importorskip("confluent_kafka")
    broker = await start_broker(broker_launcher, tmp_path)
    bootstrap = f"127.0.0.1:{broker.kafka_port}"

    def consumer(name: str) -> Any:
        made = confluent_kafka.Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "coop",
                "client.id": name,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "partition.assignment.strategy": "cooperative-sticky",
                "heartbeat.interval.ms": 200,
                "session.timeout.ms": 10_000,
            }
        )
        made.subscribe([TOPIC])
        return made

    def scenario() -> None:
        produce(bootstrap, 20)
        first = consumer("first")
        try:
            wait_until(
                lambda: len(first.assignment()) == PARTITIONS, lambda: first.poll(0.1), "first"
            )
            second = consumer("second")
            try:
                wait_until(
                    lambda: (
                        len(second.assignment()) == PARTITIONS // 2
                        and len(first.assignment()) == PARTITIONS // 2
                    ),
                    lambda: (first.poll(0.05), second.poll(0.05)),
                    "an incremental rebalance",
                )
                assert not set(first.assignment()) & set(second.assignment())
            finally:
                second.close()
            wait_until(
                lambda: len(first.assignment()) == PARTITIONS, lambda: first.poll(0.1), "all back"
            )
        finally:
            first.close()

    await in_thread(scenario)


@pytest.mark.timeout(180)
async def test_aiokafka_group_member_consumes_and_commits(broker_launcher, tmp_path):
    broker = await start_broker(broker_launcher, tmp_path)
    bootstrap = f"127.0.0.1:{broker.kafka_port}"
    await in_thread(lambda: produce(bootstrap, 20))

    def scenario() -> dict[int, int]:
        import asyncio

        from aiokafka import AIOKafkaConsumer

        async def main() -> dict[int, int]:
            consumer = AIOKafkaConsumer(
                TOPIC,
                bootstrap_servers=bootstrap,
                group_id="aio",
                auto_offset_reset="earliest",
                enable_auto_commit=False,
            )
            await consumer.start()
            try:
                seen = 0
                deadline = time.monotonic() + POLL_DEADLINE_S
                while seen < 20:
                    assert time.monotonic() < deadline, "timed out waiting for the records"
                    batches = await consumer.getmany(timeout_ms=200)
                    seen += sum(len(records) for records in batches.values())
                await consumer.commit()
                return {tp.partition: await consumer.committed(tp) for tp in consumer.assignment()}
            finally:
                await consumer.stop()

        return asyncio.run(main())

    committed = await in_thread(scenario)
    assert len(committed) == PARTITIONS and sum(committed.values()) == 20


@pytest.mark.timeout(180)
async def test_kcat_balanced_consumer_commits_what_it_read(broker_launcher, tmp_path):
    kcat = shutil.which("kcat") or shutil.which("kafkacat")
    if kcat is None:
        pytest.skip("KCAT IS NOT INSTALLED: the kcat consumer group test did not run")
    broker = await start_broker(broker_launcher, tmp_path)
    bootstrap = f"127.0.0.1:{broker.kafka_port}"
    await in_thread(lambda: produce(bootstrap, 20))
    with trio.fail_after(60):
        process = await trio.run_process(
            [
                kcat,
                "-b",
                bootstrap,
                "-G",
                "kcat-group",
                "-o",
                "beginning",
                "-c",
                "12",
                "-e",
                "-q",
                "-f",
                "%p %o\\n",
                TOPIC,
            ],
            capture_stdout=True,
            capture_stderr=True,
        )
    lines = process.stdout.decode().split()
    assert len(lines) == 24  # twelve "partition offset" pairs

    def committed() -> int:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            offsets = admin.list_group_offsets("kcat-group")["kcat-group"]
            return sum(o.offset for o in offsets.values())
        finally:
            admin.close()

    assert await in_thread(committed) == 12
