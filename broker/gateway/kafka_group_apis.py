"""The Kafka group APIs (see `broker.gateway.kafka_entities` for the handler contract).

Theory of operation
-------------------
Each handler is a view over `GroupCoordinator` (broker/group_coordinator.py): it turns the
Kafka request of any version into the coordinator's call and the result into the response
of that version. Kafka clients use the classic group protocol (JoinGroup, SyncGroup,
Heartbeat, LeaveGroup) decided by `broker.groups.classic_group`; their committed offsets are
DWAL's (`__consumer_offsets`), so `dwal group describe` and Kafka's admin clients see the
same offsets, and DescribeGroups / ListGroups / DeleteGroups cover DWAL's own groups too.

A group's coordinator is the leader of its `__consumer_offsets` partition (created on the
first FindCoordinator); FindCoordinator answers that broker's Kafka listener, or
COORDINATOR_NOT_AVAILABLE while the partition has no leader (or that broker no Kafka
listener), which clients retry. A request for a group this broker does not coordinate is
answered NOT_COORDINATOR in the group's error code. Transactions are not supported: a
transaction coordinator lookup is answered COORDINATOR_NOT_AVAILABLE with a message saying
so (the InitProducerId that would follow is refused as fatal by the admin APIs).

JoinGroup and SyncGroup wait (for the join barrier, for the leader's assignment): they run
concurrently with the connection's later requests, their answers still leave in order.
"""

from __future__ import annotations

import uuid
from typing import Any

from kio.schema.errors import ErrorCode as KafkaErrorCode

from broker.controller.metadata_records import NO_LEADER
from broker.gateway.kafka_entities import (
    KafkaApi,
    KafkaContext,
    element,
    has_field,
    kafka_error,
    make,
    ms,
)
from broker.group_coordinator import OFFSETS_TOPIC
from broker.groups.group_types import ClassicJoinRequest, ClassicSyncRequest
from protocol import DwalError, ErrorCode

FIND_COORDINATOR, JOIN_GROUP, SYNC_GROUP, HEARTBEAT, LEAVE_GROUP = 10, 11, 14, 12, 13
OFFSET_COMMIT, OFFSET_FETCH, DESCRIBE_GROUPS, LIST_GROUPS, DELETE_GROUPS = 8, 9, 15, 16, 42
KEY_TYPE_GROUP, KEY_TYPE_TRANSACTION = 0, 1
INT32_MIN = -(2**31)  # authorized_operations: not asked for


def _kafka_code(code: int) -> KafkaErrorCode:
    return kafka_error(code)


# -- FindCoordinator -----------------------------------------------------------------------


async def _coordinator_of(
    ctx: KafkaContext, key: str, key_type: int
) -> tuple[KafkaErrorCode, str | None, int, str, int]:
    """(error, message, node id, host, port) of the coordinator for one key."""
    if key_type == KEY_TYPE_TRANSACTION:
        return (
            KafkaErrorCode.coordinator_not_available,
            "transactions are not supported by DWAL: there is no transaction coordinator",
            -1,
            "",
            -1,
        )
    if key_type != KEY_TYPE_GROUP:
        return KafkaErrorCode.invalid_request, f"unknown key type {key_type}", -1, "", -1
    if not key:
        return KafkaErrorCode.invalid_request, "a group id is not empty", -1, "", -1
    coordinator = ctx.handlers.coordinator
    try:
        await coordinator.ensure_offsets_topic()
    except DwalError as error:
        message = f"{OFFSETS_TOPIC} is not available yet: {error.message}"
        return KafkaErrorCode.coordinator_not_available, message, -1, "", -1
    partition = coordinator.partition_of(key)
    state = ctx.handlers.member.image.partition(OFFSETS_TOPIC, partition)
    if state is None or state.leader == NO_LEADER:
        message = f"partition {partition} of {OFFSETS_TOPIC} has no leader yet"
        return KafkaErrorCode.coordinator_not_available, message, -1, "", -1
    address = ctx.kafka_address(state.leader)
    if address is None:
        message = f"broker {state.leader} (the coordinator) has no Kafka listener"
        return KafkaErrorCode.coordinator_not_available, message, -1, "", -1
    return KafkaErrorCode.none, None, state.leader, address[0], address[1]


async def find_coordinator(ctx: KafkaContext, request: Any) -> Any:
    response_type = ctx.response_type
    key_type = int(getattr(request, "key_type", KEY_TYPE_GROUP))
    if ctx.api_version < 4:
        code, message, node_id, host, port = await _coordinator_of(ctx, request.key, key_type)
        return make(
            response_type,
            error_code=code,
            error_message=message,
            node_id=node_id,
            host=host,
            port=port,
        )
    coordinator_type = element(response_type, "coordinators")
    coordinators = []
    for key in request.coordinator_keys:
        code, message, node_id, host, port = await _coordinator_of(ctx, key, key_type)
        coordinators.append(
            make(
                coordinator_type,
                key=key,
                node_id=node_id,
                host=host,
                port=port,
                error_code=code,
                error_message=message,
            )
        )
    return make(response_type, coordinators=tuple(coordinators))


# -- JoinGroup, SyncGroup, Heartbeat, LeaveGroup ---------------------------------------------


async def join_group(ctx: KafkaContext, request: Any) -> Any:
    version = ctx.api_version
    rebalance_timeout = getattr(request, "rebalance_timeout", None)
    join = ClassicJoinRequest(
        member_id=request.member_id,
        instance_id=getattr(request, "group_instance_id", None),
        client_id=ctx.client_id,
        host=ctx.client_host,
        session_timeout_ms=ms(request.session_timeout),
        rebalance_timeout_ms=ms(rebalance_timeout) if rebalance_timeout is not None else -1,
        protocol_type=request.protocol_type,
        protocols=tuple((p.name, bytes(p.metadata)) for p in request.protocols),
        member_id_required=version >= 4,
        supports_skip_assignment=version >= 9,
        reason=getattr(request, "reason", None),
    )
    result = await ctx.handlers.coordinator.join_classic(request.group_id, join)
    response_type = ctx.response_type
    member_type = element(response_type, "members")
    nullable_name = version >= 7
    return make(
        response_type,
        error_code=_kafka_code(result.error_code),
        generation_id=result.generation_id,
        protocol_type=result.protocol_type,
        protocol_name=result.protocol_name if nullable_name else (result.protocol_name or ""),
        leader=result.leader_id,
        skip_assignment=result.skip_assignment,
        member_id=result.member_id,
        members=tuple(
            make(
                member_type,
                member_id=m.member_id,
                group_instance_id=m.instance_id,
                metadata=m.metadata,
            )
            for m in result.members
        ),
    )


async def sync_group(ctx: KafkaContext, request: Any) -> Any:
    sync = ClassicSyncRequest(
        member_id=request.member_id,
        generation_id=request.generation_id,
        instance_id=getattr(request, "group_instance_id", None),
        protocol_type=getattr(request, "protocol_type", None),
        protocol_name=getattr(request, "protocol_name", None),
        assignments=tuple((a.member_id, bytes(a.assignment)) for a in request.assignments),
    )
    result = await ctx.handlers.coordinator.sync_classic(request.group_id, sync)
    return make(
        ctx.response_type,
        error_code=_kafka_code(result.error_code),
        protocol_type=result.protocol_type,
        protocol_name=result.protocol_name,
        assignment=result.assignment,
    )


async def heartbeat(ctx: KafkaContext, request: Any) -> Any:
    code = ctx.handlers.coordinator.heartbeat_classic(
        request.group_id,
        request.member_id,
        request.generation_id,
        getattr(request, "group_instance_id", None),
    )
    return make(ctx.response_type, error_code=_kafka_code(code))


async def leave_group(ctx: KafkaContext, request: Any) -> Any:
    if ctx.api_version < 3:
        members: list[tuple[str, str | None]] = [(request.member_id, None)]
    else:
        members = [(m.member_id, m.group_instance_id) for m in request.members]
    code, results = ctx.handlers.coordinator.leave_classic(request.group_id, members)
    response_type = ctx.response_type
    if ctx.api_version < 3:
        return make(response_type, error_code=_kafka_code(code if code else results[0]))
    member_type = element(response_type, "members")
    return make(
        response_type,
        error_code=_kafka_code(code),
        members=tuple(
            make(
                member_type,
                member_id=member_id,
                group_instance_id=instance_id,
                error_code=_kafka_code(result),
            )
            for (member_id, instance_id), result in zip(members, results)
        ),
    )


# -- OffsetCommit, OffsetFetch ------------------------------------------------------------------


def _topic_names(ctx: KafkaContext) -> dict[uuid.UUID, str]:
    return {
        uuid.UUID(bytes=topic_id): info.name
        for topic_id, info in ctx.handlers.member.image.topics_by_id.items()
        if len(topic_id) == 16
    }


def _topic_ids(ctx: KafkaContext) -> dict[str, uuid.UUID]:
    return {name: topic_id for topic_id, name in _topic_names(ctx).items()}


async def offset_commit(ctx: KafkaContext, request: Any) -> Any:
    response_type = ctx.response_type
    topic_type = element(response_type, "topics")
    partition_type = element(topic_type, "partitions")
    by_id = has_field(topic_type, "topic_id")  # v10+: topics by id, in both directions
    names = _topic_names(ctx) if by_id else {}
    topics = []
    unknown_ids: list[Any] = []
    for topic in request.topics:
        name = names.get(topic.topic_id) if by_id else topic.name
        if name is None:
            unknown_ids.append(topic)
            continue
        partitions = [
            {
                "partition": p.partition_index,
                "offset": p.committed_offset,
                "metadata": p.committed_metadata,
                "leader_epoch": getattr(p, "committed_leader_epoch", -1),
            }
            for p in topic.partitions
        ]
        topics.append({"topic": name, "partitions": partitions, "entry": topic})
    codes: dict[tuple[int, int], KafkaErrorCode] = {}
    try:
        result = await ctx.handlers.coordinator.commit_classic(
            request.group_id,
            request.generation_id_or_member_epoch,
            request.member_id,
            getattr(request, "group_instance_id", None),
            [{"topic": t["topic"], "partitions": t["partitions"]} for t in topics],
        )
    except DwalError as error:
        everything = _kafka_code(error.code)
        for t in topics:
            for p in t["partitions"]:
                codes[(id(t["entry"]), p["partition"])] = everything
    else:
        for t, answered in zip(topics, result["topics"]):
            for p in answered["partitions"]:
                codes[(id(t["entry"]), p["partition"])] = _kafka_code(p["error_code"])
    answered_topics = []
    for topic in request.topics:
        missing = KafkaErrorCode.unknown_topic_id
        answered_topics.append(
            make(
                topic_type,
                name=getattr(topic, "name", ""),
                topic_id=getattr(topic, "topic_id", None),
                partitions=tuple(
                    make(
                        partition_type,
                        partition_index=p.partition_index,
                        error_code=codes.get((id(topic), p.partition_index), missing),
                    )
                    for p in topic.partitions
                ),
            )
        )
    return make(response_type, topics=tuple(answered_topics))


def _fetch_group(
    ctx: KafkaContext, group_id: str, wanted: list[tuple[str, list[int]]] | None
) -> tuple[ErrorCode, dict[str, list[dict]]]:
    """The committed offsets of `wanted` (None: every partition with one), by topic."""
    coordinator = ctx.handlers.coordinator
    body = {
        "group_id": group_id,
        "topics": None
        if wanted is None
        else [{"topic": name, "partitions": partitions} for name, partitions in wanted],
    }
    try:
        result = coordinator.fetch_offsets(body)
    except DwalError as error:
        return error.code, {}
    return ErrorCode.NONE, {t["topic"]: t["partitions"] for t in result["topics"]}


def _fetched_topics(
    ctx: KafkaContext,
    topic_type: type,
    code: ErrorCode,
    found: dict[str, list[dict]],
    wanted: list[tuple[str, list[int]]] | None,
    by_id: bool,
) -> tuple[Any, ...]:
    partition_type = element(topic_type, "partitions")
    ids = _topic_ids(ctx) if by_id else {}
    if wanted is None:
        wanted = [(name, [p["partition"] for p in parts]) for name, parts in found.items()]
    out = []
    for name, partitions in wanted:
        entries = {p["partition"]: p for p in found.get(name, [])}
        out.append(
            make(
                topic_type,
                name=name,
                topic_id=ids.get(name, uuid.UUID(int=0)),
                partitions=tuple(
                    make(
                        partition_type,
                        partition_index=index,
                        committed_offset=entries[index]["offset"] if index in entries else -1,
                        committed_leader_epoch=entries[index].get("leader_epoch", -1)
                        if index in entries
                        else -1,
                        metadata=entries[index]["metadata"] if index in entries else "",
                        error_code=_kafka_code(code),
                    )
                    for index in partitions
                ),
            )
        )
    return tuple(out)


def _wanted(ctx: KafkaContext, topics: Any, by_id: bool) -> list[tuple[str, list[int]]] | None:
    if topics is None:
        return None
    names = _topic_names(ctx) if by_id else {}
    wanted = []
    for topic in topics:
        name = names.get(topic.topic_id, str(topic.topic_id)) if by_id else topic.name
        wanted.append((name, list(topic.partition_indexes)))
    return wanted


async def offset_fetch(ctx: KafkaContext, request: Any) -> Any:
    response_type = ctx.response_type
    if ctx.api_version >= 8:
        group_type = element(response_type, "groups")
        topic_type = element(group_type, "topics")
        by_id = has_field(topic_type, "topic_id")
        groups = []
        for group in request.groups:
            wanted = _wanted(ctx, group.topics, by_id)
            code, found = _fetch_group(ctx, group.group_id, wanted)
            groups.append(
                make(
                    group_type,
                    group_id=group.group_id,
                    error_code=_kafka_code(code),
                    topics=_fetched_topics(ctx, topic_type, ErrorCode.NONE, found, wanted, by_id),
                )
            )
        return make(response_type, groups=tuple(groups))
    topic_type = element(response_type, "topics")
    wanted = _wanted(ctx, request.topics, False)
    code, found = _fetch_group(ctx, request.group_id, wanted)
    if has_field(response_type, "error_code"):  # v2+: the group's error, partitions clean
        topics = _fetched_topics(ctx, topic_type, ErrorCode.NONE, found, wanted, False)
        return make(response_type, error_code=_kafka_code(code), topics=topics)
    return make(response_type, topics=_fetched_topics(ctx, topic_type, code, found, wanted, False))


# -- DescribeGroups, ListGroups, DeleteGroups -----------------------------------------------


async def describe_groups(ctx: KafkaContext, request: Any) -> Any:
    response_type = ctx.response_type
    group_type = element(response_type, "groups")
    member_type = element(group_type, "members")
    coordinator = ctx.handlers.coordinator
    described = []
    for group_id in request.groups:
        try:
            view = coordinator.kafka_description(group_id)
        except DwalError as error:
            view = {
                "error_code": error.code,
                "error_message": error.message,
                "state": "Dead",
                "protocol_type": "",
                "protocol_data": "",
                "members": [],
            }
        code = view["error_code"]
        if code == ErrorCode.GROUP_ID_NOT_FOUND and ctx.api_version < 6:
            code = ErrorCode.NONE  # before v6 (KIP-1043) an unknown group is a Dead one
        described.append(
            make(
                group_type,
                error_code=_kafka_code(code),
                error_message=view.get("error_message"),
                group_id=group_id,
                group_state=view["state"],
                protocol_type=view["protocol_type"],
                protocol_data=view["protocol_data"],
                members=tuple(
                    make(
                        member_type,
                        member_id=m["member_id"],
                        group_instance_id=m["instance_id"],
                        client_id=m["client_id"],
                        client_host=m["host"],
                        member_metadata=m["metadata"],
                        member_assignment=m["assignment"],
                    )
                    for m in view["members"]
                ),
                authorized_operations=INT32_MIN,
            )
        )
    return make(response_type, groups=tuple(described))


async def list_groups(ctx: KafkaContext, request: Any) -> Any:
    response_type = ctx.response_type
    listed_type = element(response_type, "groups")
    states = {s.lower() for s in getattr(request, "states_filter", ())}
    types = {t.lower() for t in getattr(request, "types_filter", ())}
    groups = []
    for listed in ctx.handlers.coordinator.listed_groups():
        if states and listed["state"].lower() not in states:
            continue
        if types and listed["type"] not in types:
            continue
        groups.append(
            make(
                listed_type,
                group_id=listed["group_id"],
                protocol_type=listed["protocol_type"],
                group_state=listed["state"],
                group_type=listed["type"],
            )
        )
    return make(response_type, error_code=KafkaErrorCode.none, groups=tuple(groups))


async def delete_groups(ctx: KafkaContext, request: Any) -> Any:
    response_type = ctx.response_type
    result_type = element(response_type, "results")
    answered = await ctx.handlers.coordinator.delete_groups(
        {"group_ids": list(request.groups_names)}
    )
    return make(
        response_type,
        results=tuple(
            make(result_type, group_id=g["group_id"], error_code=_kafka_code(g["error_code"]))
            for g in answered["groups"]
        ),
    )


APIS: list[KafkaApi] = [
    KafkaApi(OFFSET_COMMIT, 2, 10, offset_commit),
    KafkaApi(OFFSET_FETCH, 1, 10, offset_fetch),
    KafkaApi(FIND_COORDINATOR, 0, 6, find_coordinator),
    KafkaApi(JOIN_GROUP, 0, 9, join_group, concurrent=True),
    KafkaApi(HEARTBEAT, 0, 4, heartbeat),
    KafkaApi(LEAVE_GROUP, 0, 5, leave_group),
    KafkaApi(SYNC_GROUP, 0, 5, sync_group, concurrent=True),
    KafkaApi(DESCRIBE_GROUPS, 0, 6, describe_groups),
    KafkaApi(LIST_GROUPS, 0, 5, list_groups),
    KafkaApi(DELETE_GROUPS, 0, 2, delete_groups),
]
