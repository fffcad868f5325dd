"""Administration: topics and their configs (`Admin`), consumer groups (`GroupAdmin`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from client.cluster import Cluster
from client.consumer import list_offsets
from client.group_membership import STATIC_LEAVE_EPOCH
from client.topic_partition import TopicPartition
from protocol import EARLIEST_TIMESTAMP, LATEST_TIMESTAMP, ApiKey, DwalError, ErrorCode


@dataclass(frozen=True)
class PartitionDescription:
    partition: int
    leader: int
    leader_epoch: int
    log_start_offset: int
    high_watermark: int
    log_end_offset: int
    size_bytes: int
    segments: int


@dataclass(frozen=True)
class TopicDescription:
    name: str
    partitions: tuple[PartitionDescription, ...]
    configs: dict[str, str]


class Admin:
    """Create, list, describe, alter and delete topics. Every method raises DwalError with
    the broker's error code and message when the broker refuses."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        replication_factor: int = 1,
        configs: dict[str, str] | None = None,
        validate_only: bool = False,
    ) -> None:
        response = await self.cluster.call(
            ApiKey.CREATE_TOPICS,
            {
                "topics": [
                    {
                        "topic": name,
                        "partitions": partitions,
                        "replication_factor": replication_factor,
                        "configs": dict(configs or {}),
                    }
                ],
                "validate_only": validate_only,
            },
        )
        _raise_topic_errors(response.body["topics"])
        self.cluster.invalidate(name)

    async def add_partitions(self, name: str, total: int, *, validate_only: bool = False) -> None:
        """Grow topic `name` to `total` partitions (keys may then map to other partitions)."""
        response = await self.cluster.call(
            ApiKey.CREATE_PARTITIONS,
            {
                "topics": [{"topic": name, "count": total}],
                "validate_only": validate_only,
            },
        )
        self.cluster.invalidate(name)
        _raise_topic_errors(response.body["topics"])

    async def delete_topic(self, name: str) -> None:
        response = await self.cluster.call(ApiKey.DELETE_TOPICS, {"topics": [name]})
        self.cluster.invalidate(name)
        _raise_topic_errors(response.body["topics"])

    async def list_topics(self) -> list[str]:
        response = await self.cluster.call(ApiKey.METADATA, {"topics": None})
        return sorted(t["topic"] for t in response.body["topics"])

    async def describe_topic(self, name: str) -> TopicDescription:
        return (await self.describe_topics([name]))[0]

    async def describe_topics(self, names: list[str] | None = None) -> list[TopicDescription]:
        response = await self.cluster.call(ApiKey.DESCRIBE_TOPICS, {"topics": names})
        out = []
        for entry in response.body["topics"]:
            if entry["error_code"]:
                raise DwalError(ErrorCode(entry["error_code"]), entry["error_message"])
            partitions = tuple(PartitionDescription(**p) for p in entry["partitions"])
            out.append(TopicDescription(entry["topic"], partitions, entry["configs"]))
        return out

    async def alter_configs(
        self,
        name: str,
        *,
        set: dict[str, str] | None = None,
        delete: list[str] | None = None,
        validate_only: bool = False,
    ) -> dict[str, str]:
        """Set and remove config overrides of a topic; returns the topic's overrides."""
        response = await self.cluster.call(
            ApiKey.ALTER_CONFIGS,
            {
                "topic": name,
                "set": dict(set or {}),
                "delete": list(delete or []),
                "validate_only": validate_only,
            },
        )
        return response.body["configs"]


def _raise_topic_errors(results: list[dict]) -> None:
    for result in results:
        if result["error_code"]:
            raise DwalError(ErrorCode(result["error_code"]), result["error_message"])


@dataclass(frozen=True)
class GroupListing:
    group_id: str
    state: str
    members: int


@dataclass(frozen=True)
class GroupMemberDescription:
    member_id: str
    instance_id: str | None
    client_id: str
    host: str
    member_epoch: int
    subscribed_topic_names: tuple[str, ...]
    subscribed_topic_regex: str | None
    assignment: tuple[TopicPartition, ...]
    # time left until the broker removes the member unless it heartbeats (an away static
    # member: rejoins); -1 if the broker does not say
    session_expires_in_ms: int = -1

    @property
    def away(self) -> bool:
        """A static member that left for a while: it keeps its partitions until it rejoins or
        its session expires."""
        return self.member_epoch == STATIC_LEAVE_EPOCH


@dataclass(frozen=True)
class PartitionOffsets:
    """A group's progress on one partition: lag = high watermark - committed offset."""

    partition: TopicPartition
    committed_offset: int  # -1: nothing committed
    high_watermark: int
    lag: int | None
    owner: str | None  # member id that owns it now, if any


@dataclass(frozen=True)
class GroupDescription:
    group_id: str
    state: str
    group_epoch: int
    members: tuple[GroupMemberDescription, ...]
    offsets: tuple[PartitionOffsets, ...]


def _held_message(group_id: str, members: tuple[GroupMemberDescription, ...]) -> str:
    """Why a group with `members` may not be changed from outside: its active members, and
    each away static member with the time until its session expires."""
    away = [m for m in members if m.away]
    active = len(members) - len(away)
    holders = [f"{active} active member{'s' if active > 1 else ''}"] if active else []
    for m in away:
        expires = (
            f"its session expires in {math.ceil(m.session_expires_in_ms / 1000)} s"
            if m.session_expires_in_ms >= 0
            else "until its session expires"  # an older broker does not say when
        )
        holders.append(f"static member {m.instance_id!r} (away; {expires} unless it rejoins)")
    advice = ": stop the group's consumers first" if active else ""
    return f"group {group_id!r} is held by {' and '.join(holders)}{advice}"


def _members_of(entry: dict) -> tuple[GroupMemberDescription, ...]:
    return tuple(
        GroupMemberDescription(
            m["member_id"],
            m["instance_id"],
            m["client_id"],
            m["host"],
            m["member_epoch"],
            tuple(m["subscribed_topic_names"]),
            m["subscribed_topic_regex"],
            _partitions_of(m["assignment"]),
            m["session_expires_in_ms"],
        )
        for m in entry["members"]
    )


def _partitions_of(entries: list[dict]) -> tuple[TopicPartition, ...]:
    return tuple(TopicPartition(e["topic"], p) for e in entries for p in e["partitions"])


class GroupAdmin:
    """Consumer group administration: list, describe, delete, reset offsets. Methods raise
    DwalError with the broker's code (e.g. NON_EMPTY_GROUP, GROUP_ID_NOT_FOUND)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def _coordinator_call(self, group_id: str, api_key: ApiKey, body: dict):
        found = (await self.cluster.call(ApiKey.FIND_COORDINATOR, {"key": group_id})).body
        connection = await self.cluster.connection(found["host"], found["port"], purpose="group")
        return await self.cluster.call(api_key, body, connection=connection)

    async def list_groups(self) -> list[GroupListing]:
        response = await self.cluster.call(ApiKey.LIST_GROUPS, {})
        return [
            GroupListing(g["group_id"], g["state"], g["members"]) for g in response.body["groups"]
        ]

    async def describe_group(self, group_id: str) -> GroupDescription:
        entry = await self._group_entry(group_id)
        members = _members_of(entry)
        offsets = await self._group_offsets(group_id, members)
        return GroupDescription(group_id, entry["state"], entry["group_epoch"], members, offsets)

    async def _group_entry(self, group_id: str) -> dict:
        response = await self._coordinator_call(
            group_id, ApiKey.CONSUMER_GROUP_DESCRIBE, {"group_ids": [group_id]}
        )
        entry = response.body["groups"][0]
        if entry["error_code"]:
            raise DwalError(ErrorCode(entry["error_code"]), entry["error_message"])
        return entry

    async def committed_offsets(self, group_id: str) -> dict[TopicPartition, int]:
        response = await self._coordinator_call(
            group_id, ApiKey.OFFSET_FETCH, {"group_id": group_id, "topics": None}
        )
        return {
            TopicPartition(t["topic"], p["partition"]): p["offset"]
            for t in response.body["topics"]
            for p in t["partitions"]
        }

    async def _group_offsets(self, group_id: str, members) -> tuple[PartitionOffsets, ...]:
        committed = await self.committed_offsets(group_id)
        owners = {tp: m.member_id for m in members for tp in m.assignment}
        partitions = sorted(set(committed) | set(owners))
        ends: dict[TopicPartition, int] = {}
        for topic in sorted({tp.topic for tp in partitions}):
            topic_partitions = [tp for tp in partitions if tp.topic == topic]
            try:
                ends.update(await list_offsets(self.cluster, topic_partitions, LATEST_TIMESTAMP))
            except DwalError:
                continue  # the topic was deleted: no high watermark to show
        out = []
        for tp in partitions:
            offset = committed.get(tp, -1)
            end = ends.get(tp, -1)
            lag = end - offset if offset >= 0 and end >= 0 else None
            out.append(PartitionOffsets(tp, offset, end, lag, owners.get(tp)))
        return tuple(out)

    async def delete_group(self, group_id: str) -> None:
        response = await self._coordinator_call(
            group_id, ApiKey.DELETE_GROUPS, {"group_ids": [group_id]}
        )
        for entry in response.body["groups"]:
            if entry["error_code"]:
                raise DwalError(ErrorCode(entry["error_code"]), entry["error_message"])

    async def reset_offsets(
        self,
        group_id: str,
        topic: str,
        *,
        to: str,
        value: int | None = None,
        partitions: list[int] | None = None,
        execute: bool = False,
    ) -> dict[TopicPartition, int]:
        """Compute (and with `execute`, commit) new offsets of an inactive group on `topic`:
        `to` is "earliest", "latest", "offset" (with `value`) or "timestamp" (with `value`
        in ms: the first offset at or after it, else the end). Returns the plan. Raises
        DwalError NON_EMPTY_GROUP when the group has members."""
        info = await self.cluster.topic(topic)
        missing = sorted(set(partitions or ()) - {p.partition for p in info.partitions})
        if missing:
            raise DwalError(
                ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                f"topic {topic!r} has no partition {missing[0]}",
            )
        targets = [
            TopicPartition(topic, p.partition)
            for p in info.partitions
            if partitions is None or p.partition in partitions
        ]
        plan = await self._reset_plan(targets, to, value)
        if execute:
            members = await self._members_or_none(group_id)
            if members:
                raise DwalError(ErrorCode.NON_EMPTY_GROUP, _held_message(group_id, members))
            by_topic: dict[str, list[dict]] = {}
            for tp, offset in plan.items():
                by_topic.setdefault(tp.topic, []).append(
                    {"partition": tp.partition, "offset": offset}
                )
            response = await self._coordinator_call(
                group_id,
                ApiKey.OFFSET_COMMIT,
                {
                    "group_id": group_id,
                    "member_id": None,
                    "member_epoch": -1,
                    "topics": [{"topic": t, "partitions": p} for t, p in by_topic.items()],
                },
            )
            for entry in response.body["topics"]:
                for part in entry["partitions"]:
                    if part["error_code"]:
                        raise DwalError(ErrorCode(part["error_code"]), part["error_message"])
        return plan

    async def _members_or_none(self, group_id: str) -> tuple[GroupMemberDescription, ...]:
        """The group's members (none when the group does not exist)."""
        try:
            return _members_of(await self._group_entry(group_id))
        except DwalError as error:
            if error.code == ErrorCode.GROUP_ID_NOT_FOUND:
                return ()
            raise

    async def _reset_plan(
        self, targets: list[TopicPartition], to: str, value: int | None
    ) -> dict[TopicPartition, int]:
        if to == "earliest":
            return await list_offsets(self.cluster, targets, EARLIEST_TIMESTAMP)
        if to == "latest":
            return await list_offsets(self.cluster, targets, LATEST_TIMESTAMP)
        if value is None or value < 0:
            raise ValueError(f"--to {to} needs a non-negative value")
        starts = await list_offsets(self.cluster, targets, EARLIEST_TIMESTAMP)
        ends = await list_offsets(self.cluster, targets, LATEST_TIMESTAMP)
        if to == "offset":
            return {tp: min(max(value, starts[tp]), ends[tp]) for tp in targets}
        if to == "timestamp":
            found = await list_offsets(self.cluster, targets, value)
            return {tp: (offset if offset >= 0 else ends[tp]) for tp, offset in found.items()}
        raise ValueError(f"cannot reset to {to!r}: use earliest, latest, offset or timestamp")
