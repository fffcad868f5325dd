"""Administration: topics, their configs and the cluster (`Admin`), consumer groups
(`GroupAdmin`).

Admin requests go to any broker, which forwards what needs the active controller. While the
controller moves (an election, a restart) the answer is NOT_CONTROLLER: the request was not
applied, so `Admin` sends it again, after a backoff that doubles from `retry_backoff_ms` up
to `retry_backoff_max_ms` and a metadata refresh (which also learns of brokers that joined),
until `timeout_ms` has passed since the first attempt; then it raises NOT_CONTROLLER saying
how many attempts it made. Other errors are raised at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

import trio

from client.cluster import Cluster
from client.consumer import list_offsets
from client.group_membership import STATIC_LEAVE_EPOCH
from client.topic_partition import TopicPartition
from protocol import EARLIEST_TIMESTAMP, LATEST_TIMESTAMP, ApiKey, DwalError, ErrorCode

_Result = TypeVar("_Result")

# Defaults of `Admin`'s retry of NOT_CONTROLLER answers (Kafka's admin client: 100 ms and
# 1 s backoff; the whole operation bounded by the cluster's request timeout unless given).
ADMIN_RETRY_BACKOFF_MS = 100
ADMIN_RETRY_BACKOFF_MS_MAX = 1_000


@dataclass(frozen=True)
class PartitionDescription:
    """One partition as the answering broker knows it. `replicas` are the brokers holding a
    copy (the first is the preferred leader), `isr` those in sync with the leader. When the
    answering broker holds no copy (`local` false) the offsets, size and segments are -1."""

    partition: int
    leader: int  # -1: no leader now
    leader_epoch: int
    log_start_offset: int
    high_watermark: int
    log_end_offset: int
    size_bytes: int
    segments: int
    replicas: tuple[int, ...] = ()
    isr: tuple[int, ...] = ()
    local: bool = True


@dataclass(frozen=True)
class TopicDescription:
    name: str
    partitions: tuple[PartitionDescription, ...]
    configs: dict[str, str]
    topic_id: str = ""  # "" when the broker does not say


@dataclass(frozen=True)
class BrokerListener:
    name: str
    host: str
    port: int


@dataclass(frozen=True)
class BrokerDescription:
    """A registered broker: `epoch` changes at each registration (each process start);
    a fenced broker leads no partition (it missed heartbeats, or has not caught up with the
    metadata log since it started); `shut_down`: it asked to shut down (controlled
    shutdown)."""

    node_id: int
    epoch: int
    fenced: bool
    shut_down: bool
    rack: str | None
    listeners: tuple[BrokerListener, ...]
    decommissioned: bool = False  # it receives no new replica (`decommission_broker`)
    partitions: int = -1  # partitions listing it among their replicas; -1: not said


@dataclass(frozen=True)
class QuorumMember:
    """A member of the controller quorum: the last metadata log entry it has (`match_index`)
    and how many entries it is behind the active controller's log end (`lag`); both -1 when
    unknown (only the active controller knows them)."""

    node_id: int
    match_index: int
    lag: int


@dataclass(frozen=True)
class ClusterDescription:
    """The cluster as the answering broker sees it. `controller_id` is -1 when it knows of no
    active controller; `metadata_offset` is the last metadata log entry its image applied."""

    cluster_id: str
    controller_id: int
    metadata_offset: int
    brokers: tuple[BrokerDescription, ...]
    voters: tuple[QuorumMember, ...]
    learners: tuple[QuorumMember, ...]


@dataclass(frozen=True)
class PartitionReassignment:
    """A partition being moved to other brokers: its `replicas` are the target followed by
    the replicas leaving (`removing_replicas`); the new ones (`adding_replicas`) catch up as
    followers and the move completes once all of them are in the ISR."""

    partition: TopicPartition
    replicas: tuple[int, ...]
    adding_replicas: tuple[int, ...]
    removing_replicas: tuple[int, ...]
    isr: tuple[int, ...]
    leader: int  # -1: no leader now

    @property
    def target_replicas(self) -> tuple[int, ...]:
        return tuple(r for r in self.replicas if r not in self.removing_replicas)


@dataclass(frozen=True)
class BrokerDecommission:
    """A broker's decommissioning as the controller answered it: `partitions` still list
    it among their replicas (0 once every move off it completed), `partitions_not_moving`
    of them are not moving off it (0 once decommissioning was accepted)."""

    broker_id: int
    decommissioned: bool
    partitions: int
    partitions_not_moving: int


class Admin:
    """Create, list, describe, alter and delete topics; describe the cluster; elect leaders;
    move partitions between brokers and decommission brokers.
    Every method raises DwalError with the broker's error code and message when the broker
    refuses, after retrying NOT_CONTROLLER answers (see the module docstring). Every method
    is safe to cancel, though a cancelled change may or may not have been applied."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        retry_backoff_ms: int = ADMIN_RETRY_BACKOFF_MS,
        retry_backoff_max_ms: int = ADMIN_RETRY_BACKOFF_MS_MAX,
        timeout_ms: int | None = None,
    ) -> None:
        if not 0 < retry_backoff_ms <= retry_backoff_max_ms:
            raise ValueError("need 0 < retry_backoff_ms <= retry_backoff_max_ms")
        if timeout_ms is not None and timeout_ms < 0:
            raise ValueError("timeout_ms must not be negative")
        self.cluster = cluster
        self.retry_backoff_s = retry_backoff_ms / 1000
        self.retry_backoff_max_s = retry_backoff_max_ms / 1000
        # the whole operation, retries included
        self.timeout_s = (cluster.request_timeout_ms if timeout_ms is None else timeout_ms) / 1000

    async def _retrying(self, what: str, operation: Callable[[], Awaitable[_Result]]) -> _Result:
        """Run `operation` (one request and the reading of its answer) until it does not fail
        with NOT_CONTROLLER, within `timeout_s`; returns its result. Raises the first other
        DwalError, or NOT_CONTROLLER naming the attempts once the time is up."""
        started = trio.current_time()
        attempts = 0
        while True:
            attempts += 1
            try:
                return await operation()
            except DwalError as error:
                if error.code != ErrorCode.NOT_CONTROLLER:
                    raise
                last_error = error
            backoff_s = min(
                self.retry_backoff_s * 2 ** min(attempts - 1, 30), self.retry_backoff_max_s
            )
            elapsed_s = trio.current_time() - started
            if elapsed_s + backoff_s > self.timeout_s:
                raise DwalError(
                    ErrorCode.NOT_CONTROLLER,
                    f"{what}: gave up after {attempts} attempts in {elapsed_s:.1f} s, no active "
                    f"controller answered: {last_error.message}",
                ) from last_error
            await trio.sleep(backoff_s)
            try:  # learn of brokers that joined; the next attempt reports a broker gone
                await self.cluster.refresh_metadata([])
            except DwalError:
                pass

    async def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        replication_factor: int = -1,
        configs: dict[str, str] | None = None,
        validate_only: bool = False,
    ) -> None:
        """Create topic `name` with `partitions` partitions, each with `replication_factor`
        copies on different brokers; -1 (the default) leaves it to the broker, whose default
        is min(3, number of brokers)."""
        body = {
            "topics": [
                {
                    "topic": name,
                    "partitions": partitions,
                    "replication_factor": replication_factor,
                    "configs": dict(configs or {}),
                }
            ],
            "validate_only": validate_only,
        }

        async def create() -> None:
            response = await self.cluster.call(ApiKey.CREATE_TOPICS, body)
            _raise_topic_errors(response.body["topics"])

        await self._retrying(f"create topic {name!r}", create)
        self.cluster.invalidate(name)

    async def add_partitions(self, name: str, total: int, *, validate_only: bool = False) -> None:
        """Grow topic `name` to `total` partitions (keys may then map to other partitions)."""
        body = {"topics": [{"topic": name, "count": total}], "validate_only": validate_only}

        async def add() -> None:
            response = await self.cluster.call(ApiKey.CREATE_PARTITIONS, body)
            self.cluster.invalidate(name)
            _raise_topic_errors(response.body["topics"])

        await self._retrying(f"add partitions to {name!r}", add)

    async def delete_topic(self, name: str) -> None:
        async def delete() -> None:
            response = await self.cluster.call(ApiKey.DELETE_TOPICS, {"topics": [name]})
            self.cluster.invalidate(name)
            _raise_topic_errors(response.body["topics"])

        await self._retrying(f"delete topic {name!r}", delete)

    async def list_topics(self) -> list[str]:
        response = await self.cluster.call(ApiKey.METADATA, {"topics": None})
        return sorted(t["topic"] for t in response.body["topics"])

    async def describe_topic(self, name: str) -> TopicDescription:
        return (await self.describe_topics([name]))[0]

    async def describe_topics(self, names: list[str] | None = None) -> list[TopicDescription]:
        """Every topic named (every topic when None), as the answering broker knows it."""

        async def describe() -> list[TopicDescription]:
            response = await self.cluster.call(ApiKey.DESCRIBE_TOPICS, {"topics": names})
            return [_topic_description(entry) for entry in response.body["topics"]]

        return await self._retrying("describe topics", describe)

    async def describe_cluster(self) -> ClusterDescription:
        """The cluster id, the active controller, the registered brokers and the controller
        quorum, as the answering broker sees them."""

        async def describe() -> ClusterDescription:
            response = await self.cluster.call(ApiKey.DESCRIBE_CLUSTER, {})
            return _cluster_description(response.body)

        return await self._retrying("describe cluster", describe)

    async def elect_leaders(
        self, topics: dict[str, list[int] | None] | None = None
    ) -> dict[TopicPartition, DwalError | None]:
        """Make each partition's preferred replica (its first) its leader again, where it is
        in sync. `topics` maps a topic to its partitions (None: all of them); None asks for
        every partition whose preferred replica does not lead. Returns per partition None
        (elected) or the error the controller gave (ELECTION_NOT_NEEDED: it already leads).
        Raises DwalError for an unknown topic or partition."""
        wanted = None if topics is None else await self._partitions_of(topics)

        async def elect() -> dict[TopicPartition, DwalError | None]:
            response = await self.cluster.call(ApiKey.ELECT_LEADERS, {"topics": wanted})
            return {
                TopicPartition(entry["topic"], result["partition"]): (
                    DwalError(ErrorCode(result["error_code"]), result["error_message"])
                    if result["error_code"]
                    else None
                )
                for entry in response.body["topics"]
                for result in entry["partitions"]
            }

        results = await self._retrying("elect leaders", elect)
        for topic in topics or {}:
            self.cluster.invalidate(topic)
        return results

    async def alter_partition_reassignments(
        self, reassignments: Mapping[TopicPartition, Sequence[int] | None]
    ) -> dict[TopicPartition, DwalError | None]:
        """Move each partition to the replicas given (broker ids, the preferred leader
        first), or cancel its move (None: back to the replicas it had before). The new
        replicas catch up as followers before the old ones leave. Returns per partition None
        (accepted) or the controller's error (INVALID_REPLICA_ASSIGNMENT,
        NO_REASSIGNMENT_IN_PROGRESS, UNKNOWN_TOPIC_OR_PARTITION). Sending the same move
        again changes nothing."""
        by_topic: dict[str, list[dict[str, Any]]] = {}
        for tp, replicas in reassignments.items():
            by_topic.setdefault(tp.topic, []).append(
                {
                    "partition": tp.partition,
                    "replicas": None if replicas is None else list(replicas),
                }
            )
        body = {"topics": [{"topic": t, "partitions": parts} for t, parts in by_topic.items()]}

        async def alter() -> dict[TopicPartition, DwalError | None]:
            response = await self.cluster.call(ApiKey.ALTER_PARTITION_REASSIGNMENTS, body)
            return _partition_errors(response.body["topics"])

        results = await self._retrying("reassign partitions", alter)
        for topic in by_topic:
            self.cluster.invalidate(topic)
        return results

    async def list_partition_reassignments(
        self, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, PartitionReassignment]:
        """The partitions being moved (of `partitions`; None: of every topic), as the active
        controller knows them; a partition not moving (or unknown) is left out."""
        wanted = None
        if partitions is not None:
            by_topic: dict[str, list[int]] = {}
            for tp in partitions:
                by_topic.setdefault(tp.topic, []).append(tp.partition)
            wanted = [{"topic": t, "partitions": sorted(set(p))} for t, p in by_topic.items()]

        async def list_moves() -> dict[TopicPartition, PartitionReassignment]:
            response = await self.cluster.call(
                ApiKey.LIST_PARTITION_REASSIGNMENTS, {"topics": wanted}
            )
            return {
                TopicPartition(entry["topic"], p["partition"]): PartitionReassignment(
                    partition=TopicPartition(entry["topic"], p["partition"]),
                    replicas=tuple(p["replicas"]),
                    adding_replicas=tuple(p["adding_replicas"]),
                    removing_replicas=tuple(p["removing_replicas"]),
                    isr=tuple(p["isr"]),
                    leader=p["leader"],
                )
                for entry in response.body["topics"]
                for p in entry["partitions"]
            }

        return await self._retrying("list partition reassignments", list_moves)

    async def decommission_broker(self, broker_id: int) -> BrokerDecommission:
        """Move every replica off broker `broker_id` (each to another broker, racks apart
        and load even) and place no new replica on it. Returns once every move has started;
        they complete as the new replicas catch up (watch `partitions` fall to 0 with
        `describe_cluster`). Raises DwalError INVALID_REPLICATION_FACTOR, changing nothing,
        when some partition has no other broker to go to, BROKER_NOT_AVAILABLE for an
        unknown broker."""
        return await self._decommission(broker_id, True)

    async def recommission_broker(self, broker_id: int) -> BrokerDecommission:
        """Let new replicas go to broker `broker_id` again. Moves already started go on
        (cancel them with `alter_partition_reassignments`)."""
        return await self._decommission(broker_id, False)

    async def _decommission(self, broker_id: int, decommissioned: bool) -> BrokerDecommission:
        body = {"broker_id": broker_id, "decommissioned": decommissioned}

        async def change() -> BrokerDecommission:
            response = await self.cluster.call(ApiKey.DECOMMISSION_BROKER, body)
            reply = response.body
            return BrokerDecommission(
                broker_id=reply["broker_id"],
                decommissioned=reply["decommissioned"],
                partitions=reply["partitions"],
                partitions_not_moving=reply["partitions_not_moving"],
            )

        what = "decommission" if decommissioned else "recommission"
        result = await self._retrying(f"{what} broker {broker_id}", change)
        self.cluster.invalidate_all()
        return result

    async def _partitions_of(self, topics: dict[str, list[int] | None]) -> list[dict[str, Any]]:
        out = []
        for topic, partitions in topics.items():
            self.cluster.invalidate(topic)
            count = len((await self.cluster.topic(topic)).partitions)
            missing = sorted(set(partitions or ()) - set(range(count)))
            if missing:
                raise DwalError(
                    ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                    f"topic {topic!r} has no partition {missing[0]}",
                )
            chosen = sorted(set(partitions)) if partitions is not None else list(range(count))
            out.append({"topic": topic, "partitions": chosen})
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
        body = {
            "topic": name,
            "set": dict(set or {}),
            "delete": list(delete or []),
            "validate_only": validate_only,
        }

        async def alter() -> dict[str, str]:
            response = await self.cluster.call(ApiKey.ALTER_CONFIGS, body)
            return response.body["configs"]

        return await self._retrying(f"alter configs of {name!r}", alter)


def _partition_errors(entries: list[dict[str, Any]]) -> dict[TopicPartition, DwalError | None]:
    return {
        TopicPartition(entry["topic"], result["partition"]): (
            DwalError(ErrorCode(result["error_code"]), result["error_message"])
            if result["error_code"]
            else None
        )
        for entry in entries
        for result in entry["partitions"]
    }


def _topic_description(entry: dict[str, Any]) -> TopicDescription:
    if entry["error_code"]:
        raise DwalError(ErrorCode(entry["error_code"]), entry["error_message"])
    partitions = tuple(
        PartitionDescription(
            partition=p["partition"],
            leader=p["leader"],
            leader_epoch=p["leader_epoch"],
            log_start_offset=p["log_start_offset"],
            high_watermark=p["high_watermark"],
            log_end_offset=p["log_end_offset"],
            size_bytes=p["size_bytes"],
            segments=p["segments"],
            replicas=tuple(p["replicas"]),
            isr=tuple(p["isr"]),
            local=p["local"],
        )
        for p in sorted(entry["partitions"], key=lambda p: p["partition"])
    )
    return TopicDescription(entry["topic"], partitions, entry["configs"], entry["topic_id"])


def _cluster_description(body: dict[str, Any]) -> ClusterDescription:
    brokers = tuple(
        BrokerDescription(
            node_id=b["node_id"],
            epoch=b["epoch"],
            fenced=b["fenced"],
            shut_down=b["shut_down"],
            rack=b["rack"],
            listeners=tuple(
                BrokerListener(li["name"], li["host"], li["port"]) for li in b["listeners"]
            ),
            decommissioned=b["decommissioned"],
            partitions=b["partitions"],
        )
        for b in sorted(body["brokers"], key=lambda b: b["node_id"])
    )

    def members(entries: list[dict[str, Any]]) -> tuple[QuorumMember, ...]:
        ordered = sorted(entries, key=lambda m: m["node_id"])
        return tuple(QuorumMember(m["node_id"], m["match_index"], m["lag"]) for m in ordered)

    return ClusterDescription(
        cluster_id=body["cluster_id"],
        controller_id=body["controller_id"],
        metadata_offset=body["metadata_offset"],
        brokers=brokers,
        voters=members(body["voters"]),
        learners=members(body["learners"]),
    )


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
        """Every group of the cluster: each broker lists the groups it coordinates, so every
        broker in the metadata is asked (as Kafka's admin client does). Raises DwalError
        when a broker cannot answer: a partial list would silently miss groups."""
        await self.cluster.refresh_metadata([])
        brokers = list(self.cluster.brokers.values())
        listings: dict[str, GroupListing] = {}
        if not brokers:  # an answer without brokers: the one bootstrap broker lists them all
            responses = [await self.cluster.call(ApiKey.LIST_GROUPS, {})]
        else:
            responses = []
            for broker in sorted(brokers, key=lambda b: b.node_id):
                connection = await self.cluster.broker_connection(broker)
                responses.append(
                    await self.cluster.call(ApiKey.LIST_GROUPS, {}, connection=connection)
                )
        for response in responses:
            for g in response.body["groups"]:
                listings[g["group_id"]] = GroupListing(g["group_id"], g["state"], g["members"])
        return [listings[name] for name in sorted(listings)]

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
