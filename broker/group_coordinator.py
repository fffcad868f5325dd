"""The group coordinator: consumer group membership, assignments and committed offsets.

Theory of operation. Group membership and assignment are decided by the sans-I/O
`ConsumerGroup` state machines (broker/groups); this shell feeds them requests and the time,
and keeps committed offsets durable in the internal, compacted topic ``__consumer_offsets``.
A group belongs to partition ``crc32(group_id) % offsets_topic_partitions`` of that topic,
whose leader is the group's coordinator (on a single node: this broker).

An offset commit is one keyed record per partition, key ``["offset", group, topic,
partition]``, value ``{"offset", "metadata", "timestamp"}`` (a deleted group leaves null
values, tombstones, which compaction removes in time). The commit is answered once the
records are fsynced. The in-memory view applies a commit only after that, and only if its
record lies later in the log than the one already applied for the key, so concurrent
commits resolve in log order and a committed offset never moves back to an older commit.

This broker coordinates the groups of the offsets partitions it leads (the metadata image
says which); a request for another group gets NOT_COORDINATOR and the client looks the
coordinator up again. When the publisher shows that this broker now leads an offsets
partition, the coordinator reads it from its start and replays its records (off the event
loop, into a fresh map merged afterwards); when it stops leading one, that partition's groups
and offsets are dropped from memory. Membership is soft state: after a restart or a move
members find their ids unknown and join again, resuming from the committed offsets.

Classic groups. Kafka's clients (through the Kafka listener) use the classic JoinGroup /
SyncGroup protocol, decided by the sans-I/O `ClassicGroup` (broker/groups/classic_group.py).
Both kinds share one group id space and ``__consumer_offsets``: a group id belongs to one
kind while it has members (a classic join to a DWAL group gets INCONSISTENT_GROUP_PROTOCOL,
a DWAL heartbeat to a classic group GROUP_ID_NOT_FOUND, as in Kafka 4); an empty group of
either kind is taken over by the other. A JoinGroup or a follower's SyncGroup waits for its
answer: the shell keeps one `_ClassicWaiter` per waiting request, hands the group's
outbox to them after every call, and ticks the group at its next deadline (the rebalance or
sync timeout, at most) so each wait is bounded. The expiry loop ticks the others.
"""

from __future__ import annotations

import logging
import math
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from collections.abc import Awaitable, Callable

from broker.config import BrokerConfig
from broker.controller.metadata_image import MetadataImage
from broker.event_log import log_event
from broker.wall_clock import now_ms
from broker.groups.classic_group import (
    ClassicAnswer,
    ClassicGroup,
    decode_consumer_assignment,
    decode_consumer_subscription,
    encode_consumer_assignment,
    encode_consumer_subscription,
)
from broker.groups.consumer_group import ConsumerGroup, GroupConfig, GroupError, HeartbeatRequest
from broker.groups.group_types import (
    STATIC_LEAVE_EPOCH,
    ClassicGroupDescription,
    ClassicGroupState,
    ClassicJoinRequest,
    ClassicJoinResponse,
    ClassicSyncRequest,
    ClassicSyncResponse,
    MemberDescription,
)
from broker.storage import PartitionLog, RecordTooLargeError, StorageError
from broker.replication import ReplicaManager
from broker.topic_registry import TopicRegistry
from protocol import DwalError, ErrorCode, ProtocolError, build_batch, decode_records

logger = logging.getLogger("dwal.groups")

OFFSETS_TOPIC = "__consumer_offsets"
OFFSETS_TOPIC_CONFIGS = {
    "cleanup.policy": "compact",
    "segment.bytes": str(64 * 1024 * 1024),
    "max.message.bytes": str(16 * 1024 * 1024),  # one commit of many partitions is one batch
    "delete.retention.ms": str(24 * 3600 * 1000),
}
GROUP_ID_CHARS_MAX = 255
LOAD_READ_BYTES = 4 * 1024 * 1024
LOAD_INLINE_BYTES_MAX = 1024 * 1024  # smaller offsets partitions load before serving


@dataclass(frozen=True, slots=True)
class CommittedOffset:
    offset: int
    metadata: str | None
    timestamp: int
    log_offset: int  # where the commit record sits in __consumer_offsets: later wins
    leader_epoch: int = -1  # of the record before `offset` (Kafka clients, KIP-320); -1: none


def offset_key(group_id: str, topic: str, partition: int) -> bytes:
    return msgpack.packb(["offset", group_id, topic, partition])


class _ClassicWaiter:
    """A JoinGroup or SyncGroup waiting for the group's answer."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.response: ClassicJoinResponse | ClassicSyncResponse | None = None

    def answer(self, response: ClassicJoinResponse | ClassicSyncResponse) -> None:
        if self.response is None:
            self.response = response
            self.event.set()


# DWAL's group states as Kafka's admin clients name a KIP-848 group's states.
NATIVE_STATE_NAMES = {
    "empty": "Empty",
    "assigning": "Assigning",
    "reconciling": "Reconciling",
    "stable": "Stable",
}
CLASSIC_WAIT_SLICE_MS_MAX = 5_000  # a waiting request looks at its group at least this often


class GroupCoordinator:
    """Create, `load()` (blocking, before serving), then run `run_expiry` in a nursery."""

    def __init__(
        self,
        config: BrokerConfig,
        registry: TopicRegistry,
        replicas: ReplicaManager,
        create_offsets_topic: Callable[[], Awaitable[None]],
    ) -> None:
        """`create_offsets_topic` has the controller create __consumer_offsets and returns
        once this broker's image has it (TOPIC_ALREADY_EXISTS is success)."""
        self.config = config
        self.registry = registry
        self.replicas = replicas
        self._create_offsets_topic = create_offsets_topic
        self.loaded_partitions: set[int] = set()  # offsets partitions led and loaded here
        self._loading: dict[int, object] = {}  # partition -> the load under way (a token)
        self._nursery: trio.Nursery | None = None  # background loads (set by run_expiry)
        self.group_config = GroupConfig(
            session_timeout_ms=config.group_session_timeout_ms,
            heartbeat_interval_ms=config.group_heartbeat_interval_ms,
            members_max=config.group_members_max,
            classic_initial_rebalance_delay_ms=config.group_classic_initial_rebalance_delay_ms,
            classic_session_timeout_ms_min=config.group_classic_session_timeout_ms_min,
            classic_session_timeout_ms_max=config.group_classic_session_timeout_ms_max,
        )
        self.groups: dict[str, ConsumerGroup] = {}
        self.classic_groups: dict[str, ClassicGroup] = {}
        self._classic_waiters: dict[tuple[str, str, str], _ClassicWaiter] = {}
        self.offsets: dict[str, dict[tuple[str, int], CommittedOffset]] = {}
        self._offsets_topic_lock = trio.Lock()
        self._partition_counts: dict[str, int] = {}

    # -- placement ------------------------------------------------------------------------

    def partition_of(self, group_id: str) -> int:
        """The offsets partition of a group. Once __consumer_offsets exists its partition
        count wins over the setting: changing it would move groups away from their offsets."""
        topic = self.registry.topics.get(OFFSETS_TOPIC)
        count = topic.partitions if topic is not None else self.config.offsets_topic_partitions
        return zlib.crc32(group_id.encode()) % count

    async def ensure_offsets_topic(self) -> None:
        """Create __consumer_offsets on first use."""
        if OFFSETS_TOPIC in self.registry.topics:
            return
        async with self._offsets_topic_lock:
            if OFFSETS_TOPIC in self.registry.topics:
                return
            await self._create_offsets_topic()

    def check_coordinator(self, group_id: str) -> None:
        """Raise DwalError NOT_COORDINATOR unless this broker coordinates the group (once
        __consumer_offsets exists; before, every broker answers for an empty group)."""
        if OFFSETS_TOPIC not in self.registry.topics:
            return
        partition = self.partition_of(group_id)
        if partition in self._loading:
            raise DwalError(
                ErrorCode.COORDINATOR_LOAD_IN_PROGRESS,
                f"broker {self.config.node_id} is loading the offsets of group {group_id!r} "
                f"(partition {partition} of {OFFSETS_TOPIC})",
            )
        if partition not in self.loaded_partitions:
            raise DwalError(
                ErrorCode.NOT_COORDINATOR,
                f"broker {self.config.node_id} is not the coordinator of group {group_id!r} "
                f"(partition {partition} of {OFFSETS_TOPIC})",
            )

    def _append_offsets(self, group_id: str, batch: bytes, now: int):
        """Append to the group's offsets partition (which this broker leads); returns (log,
        AppendInfo). Raises NOT_COORDINATOR when it no longer leads it."""
        try:
            return self.replicas.append(
                OFFSETS_TOPIC, self.partition_of(group_id), bytearray(batch), now_ms=now
            )
        except DwalError as error:
            if error.code in (ErrorCode.NOT_LEADER_OR_FOLLOWER, ErrorCode.LEADER_NOT_AVAILABLE):
                raise DwalError(ErrorCode.NOT_COORDINATOR, error.message) from None
            raise

    async def _wait_committed(self, group_id: str, log: PartitionLog, end_offset: int) -> None:
        """Wait until the records are durable here and in every in-sync replica (acks=all):
        a commit answered is a commit a new coordinator will find. Raises DwalError."""
        await log.wait_durable(end_offset)
        try:
            await self.replicas.wait_replicated(
                OFFSETS_TOPIC, self.partition_of(group_id), end_offset
            )
        except DwalError as error:
            if error.code == ErrorCode.NOT_LEADER_OR_FOLLOWER:
                raise DwalError(ErrorCode.NOT_COORDINATOR, error.message) from None
            raise

    # -- loading --------------------------------------------------------------------------

    async def apply_image(self, previous: MetadataImage, image: MetadataImage) -> None:
        """Load the offsets partitions this broker now leads, drop those it no longer does.
        A small partition (a new one, most of all) is loaded before this returns; a larger
        one in the background, its groups answered COORDINATOR_LOAD_IN_PROGRESS meanwhile."""
        topic = image.topics.get(OFFSETS_TOPIC)
        led = set()
        if topic is not None:
            led = {p.partition for p in topic.partitions if p.leader == self.config.node_id}
        for partition in sorted((self.loaded_partitions | set(self._loading)) - led):
            self._unload_partition(partition)
        for partition in sorted(led - self.loaded_partitions - set(self._loading)):
            log = self.registry.logs.get((OFFSETS_TOPIC, partition))
            if log is None:
                continue  # not opened (reported by the registry): not coordinated here
            token = object()
            self._loading[partition] = token
            if log.size_bytes <= LOAD_INLINE_BYTES_MAX or self._nursery is None:
                await self._load(partition, log, token)
            else:
                self._nursery.start_soon(self._load, partition, log, token)

    async def _load(self, partition: int, log: PartitionLog, token: object) -> None:
        loaded: dict[str, dict[tuple[str, int], CommittedOffset]] = {}
        try:
            count = await self._load_partition(log, loaded)
        except (StorageError, OSError) as error:
            log_event(
                logger,
                logging.ERROR,
                "group_offsets_load_failed",
                partition=partition,
                error=str(error),
            )
            if self._loading.get(partition) is token:
                del self._loading[partition]
            return
        if self._loading.get(partition) is not token:
            return  # unloaded (leadership lost) while loading
        del self._loading[partition]
        for group_id, offsets in loaded.items():
            self.offsets[group_id] = offsets
        self.loaded_partitions.add(partition)
        log_event(
            logger,
            logging.INFO,
            "group_offsets_loaded",
            partition=partition,
            records=count,
            groups=len(loaded),
        )

    def _unload_partition(self, partition: int) -> None:
        self.loaded_partitions.discard(partition)
        self._loading.pop(partition, None)
        for group_id in [g for g in self.groups if self.partition_of(g) == partition]:
            del self.groups[group_id]
        for group_id in [g for g in self.classic_groups if self.partition_of(g) == partition]:
            self._drop_classic_group(group_id)
        for group_id in [g for g in self.offsets if self.partition_of(g) == partition]:
            del self.offsets[group_id]
        log_event(logger, logging.INFO, "group_offsets_unloaded", partition=partition)

    async def _load_partition(
        self, log: PartitionLog, into: dict[str, dict[tuple[str, int], CommittedOffset]]
    ) -> int:
        """Replay a partition's commits into `into`, to the log end (this broker leads it:
        what lies past the high watermark will be committed by it), the file reads in a
        worker thread. Touches nothing but `into`."""
        position = log.log_start_offset
        count = 0
        while position < log.log_end_offset:
            piece = log.read(position, LOAD_READ_BYTES, up_to="log_end")
            try:
                data = await trio.to_thread.run_sync(piece.read_bytes)
            finally:
                piece.close()
            records = [
                r for r in decode_records(data, allow_partial_tail=True) if r.offset >= position
            ]
            if not records:
                break
            for record in records:
                _replay(into, record.key, record.value, record.offset)
            count += len(records)
            position = records[-1].offset + 1
        return count

    # -- membership -----------------------------------------------------------------------

    def partition_counts(self) -> dict[str, int]:
        return {name: topic.partitions for name, topic in self.registry.topics.items()}

    def heartbeat(self, body: dict, client_id: str, client_host: str) -> dict[str, Any]:
        """Answer a ConsumerGroupHeartbeat; raises DwalError."""
        group_id = _checked_group_id(body["group_id"])
        self.check_coordinator(group_id)
        self._claim_for_native(group_id)
        group = self.groups.get(group_id)
        new_group = group is None
        if group is None:
            if body["member_epoch"] != 0:
                raise DwalError(
                    ErrorCode.UNKNOWN_MEMBER_ID,
                    f"group {group_id!r} has no member {body['member_id']!r}",
                )
            group = ConsumerGroup(group_id, self.group_config, lambda: uuid.uuid4().hex)
        owned = body["owned_partitions"]
        request = HeartbeatRequest(
            member_id=body["member_id"] or None,
            member_epoch=body["member_epoch"],
            instance_id=body["instance_id"],
            client_id=client_id,
            host=client_host,
            rebalance_timeout_ms=body["rebalance_timeout_ms"],
            subscribed_topic_names=(
                tuple(body["subscribed_topic_names"])
                if body["subscribed_topic_names"] is not None
                else None
            ),
            subscribed_topic_regex=body["subscribed_topic_regex"],
            owned_partitions=(
                frozenset((t["topic"], p) for t in owned for p in t["partitions"])
                if owned is not None
                else None
            ),
        )
        try:
            response = group.heartbeat(
                request, now_ms=now_ms(), partition_counts=self.partition_counts()
            )
            if new_group:  # only a successful join creates the group
                self.groups[group_id] = group
        except GroupError as error:
            raise DwalError(error.code, str(error.message)) from None
        return {
            "member_id": response.member_id,
            "member_epoch": response.member_epoch,
            "heartbeat_interval_ms": response.heartbeat_interval_ms,
            "assignment": _topic_partitions(response.assignment),
        }

    async def run_expiry(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Expire members that stopped heartbeating, and tell groups about topic changes;
        background loads of offsets partitions run in this task's nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._expire_members)
            task_status.started()

    async def _expire_members(self) -> None:
        while True:
            await trio.sleep(self.config.limits.group_expiry_check_interval_ms / 1000)
            counts = self.partition_counts()
            changed = counts != self._partition_counts
            self._partition_counts = counts
            for group in list(self.groups.values()):
                if changed:
                    group.metadata_changed(partition_counts=counts)
                for member_id in group.expire(now_ms=now_ms(), partition_counts=counts):
                    log_event(
                        logger,
                        logging.INFO,
                        "group_member_expired",
                        group=group.group_id,
                        member=member_id,
                    )
            now = now_ms()
            for classic in list(self.classic_groups.values()):
                deadline = classic.next_deadline_ms()
                if (deadline is not None and deadline <= now) or classic.is_empty:
                    self._tick_classic(classic)

    # -- classic groups (Kafka's JoinGroup / SyncGroup, for the Kafka listener) ------------

    def _claim_for_native(self, group_id: str) -> None:
        """Let a DWAL member into `group_id` unless Kafka clients are its members."""
        classic = self.classic_groups.get(group_id)
        if classic is None:
            return
        if not classic.is_empty:
            raise DwalError(
                ErrorCode.GROUP_ID_NOT_FOUND,
                f"group {group_id!r} is a classic group of Kafka clients, not a DWAL group",
            )
        self._drop_classic_group(group_id)

    def _classic_group_for_join(self, group_id: str) -> ClassicGroup:
        """The classic group `group_id`, new if need be (kept once a join succeeds)."""
        group = self.classic_groups.get(group_id)
        if group is not None:
            return group
        native = self.groups.get(group_id)
        if native is not None and not native.is_empty:
            raise DwalError(
                ErrorCode.INCONSISTENT_GROUP_PROTOCOL,
                f"group {group_id!r} is a DWAL consumer group with members; a Kafka client "
                "cannot join it with the classic protocol",
            )
        return ClassicGroup(group_id, self.group_config, _classic_member_id)

    def _keep_classic_group(self, group: ClassicGroup) -> None:
        if group.group_id not in self.classic_groups and not group.is_empty:
            self.groups.pop(group.group_id, None)  # an empty DWAL group: taken over
            self.classic_groups[group.group_id] = group

    async def join_classic(self, group_id: str, request: ClassicJoinRequest) -> ClassicJoinResponse:
        """Answer a JoinGroup: at once, or when the rebalance completes (at most the group's
        rebalance timeout later). Every failure is the answer's error code. Cancel-safe: a
        cancelled join leaves the member joined, as a lost answer would in Kafka."""
        try:
            group_id = _checked_group_id(group_id)
            await self.ensure_offsets_topic()
            self.check_coordinator(group_id)
            group = self._classic_group_for_join(group_id)
            outcome = group.join(request, now_ms=now_ms())
        except DwalError as error:
            return ClassicJoinResponse(error_code=error.code, member_id=request.member_id)
        self._keep_classic_group(group)
        response = await self._classic_answer(group, outcome.member_id, "join", outcome.response)
        assert isinstance(response, ClassicJoinResponse)
        if response.error_code == ErrorCode.NONE:
            log_event(
                logger,
                logging.INFO,
                "classic_group_joined",
                group=group_id,
                member=response.member_id,
                generation=response.generation_id,
                leader=response.leader_id == response.member_id,
            )
        return response

    async def sync_classic(self, group_id: str, request: ClassicSyncRequest) -> ClassicSyncResponse:
        """Answer a SyncGroup: the member's assignment, once the leader has sent them (a
        follower waits at most the rebalance timeout). Failures are the answer's code."""
        try:
            group = self._classic_group_of(group_id)
            outcome = group.sync(request, now_ms=now_ms())
        except DwalError as error:
            return ClassicSyncResponse(error_code=error.code)
        response = await self._classic_answer(group, outcome.member_id, "sync", outcome.response)
        assert isinstance(response, ClassicSyncResponse)
        return response

    def heartbeat_classic(
        self, group_id: str, member_id: str, generation_id: int, instance_id: str | None
    ) -> ErrorCode:
        """Answer a Heartbeat with its error code (REBALANCE_IN_PROGRESS: rejoin)."""
        try:
            group = self._classic_group_of(group_id)
            return group.heartbeat(member_id, generation_id, instance_id, now_ms=now_ms())
        except DwalError as error:
            return error.code

    def leave_classic(
        self, group_id: str, members: list[tuple[str, str | None]]
    ) -> tuple[ErrorCode, list[ErrorCode]]:
        """Answer a LeaveGroup: the request's code and each (member id, instance id)'s."""
        try:
            group = self._classic_group_of(group_id)
        except DwalError as error:
            if error.code == ErrorCode.UNKNOWN_MEMBER_ID:
                return ErrorCode.NONE, [ErrorCode.UNKNOWN_MEMBER_ID] * len(members)
            return error.code, [error.code] * len(members)
        results = group.leave(members, now_ms=now_ms())
        self._deliver(group.group_id, group.take_answers())
        for (member_id, _), code in zip(members, results):
            if code == ErrorCode.NONE:
                log_event(
                    logger, logging.INFO, "classic_group_left", group=group_id, member=member_id
                )
        return ErrorCode.NONE, results

    def describe_classic_group(self, group_id: str) -> ClassicGroupDescription | None:
        """The classic group (None: there is none; raises DwalError NOT_COORDINATOR)."""
        self.check_coordinator(_checked_group_id(group_id))
        group = self.classic_groups.get(group_id)
        return group.describe() if group is not None else None

    def kafka_description(self, group_id: str) -> dict[str, Any]:
        """Kafka's DescribeGroups view of any group: `error_code`, `state`, `protocol_type`,
        `protocol_data`, `members` (member_id, instance_id, client_id, host, metadata and
        assignment in the consumer protocol). A DWAL group is shown as Kafka 4 names a
        KIP-848 group's states, its members' subscriptions and assignments encoded as the
        classic consumer protocol; a group with only committed offsets is Empty; an unknown
        one GROUP_ID_NOT_FOUND. Raises DwalError NOT_COORDINATOR (or loading)."""
        self.check_coordinator(_checked_group_id(group_id))
        classic = self.classic_groups.get(group_id)
        native = self.groups.get(group_id)
        if classic is not None and (classic.member_count or native is None):
            description = classic.describe()
            members = [
                {
                    "member_id": m.member_id,
                    "instance_id": m.instance_id,
                    "client_id": m.client_id,
                    "host": m.host,
                    "metadata": m.metadata,
                    "assignment": m.assignment,
                }
                for m in description.members
            ]
            stable = description.state == ClassicGroupState.STABLE
            return {
                "error_code": ErrorCode.NONE,
                "state": description.state.value,
                "protocol_type": description.protocol_type or "",
                "protocol_data": (description.protocol_name or "") if stable else "",
                "members": members,
            }
        if native is not None:
            native_description = native.describe()
            return {
                "error_code": ErrorCode.NONE,
                "state": NATIVE_STATE_NAMES.get(native_description.state, native_description.state),
                "protocol_type": "consumer",
                "protocol_data": "",
                "members": [
                    {
                        "member_id": m.member_id,
                        "instance_id": m.instance_id,
                        "client_id": m.client_id,
                        "host": m.host,
                        "metadata": encode_consumer_subscription(m.subscribed_topic_names),
                        "assignment": encode_consumer_assignment(m.assignment),
                    }
                    for m in native_description.members
                ],
            }
        if group_id in self.offsets:
            return {
                "error_code": ErrorCode.NONE,
                "state": ClassicGroupState.EMPTY.value,
                "protocol_type": "consumer",
                "protocol_data": "",
                "members": [],
            }
        return {
            "error_code": ErrorCode.GROUP_ID_NOT_FOUND,
            "state": ClassicGroupState.DEAD.value,
            "protocol_type": "",
            "protocol_data": "",
            "members": [],
        }

    def _classic_group_of(self, group_id: str) -> ClassicGroup:
        group_id = _checked_group_id(group_id)
        self.check_coordinator(group_id)
        group = self.classic_groups.get(group_id)
        if group is None:
            raise DwalError(
                ErrorCode.UNKNOWN_MEMBER_ID, f"group {group_id!r} has no classic members"
            )
        return group

    async def _classic_answer(
        self,
        group: ClassicGroup,
        member_id: str,
        kind: str,
        response: ClassicJoinResponse | ClassicSyncResponse | None,
    ) -> ClassicJoinResponse | ClassicSyncResponse:
        """Deliver the group's answers; return `response`, or the answer to this request
        (a JoinGroup or SyncGroup of `member_id`), waiting for it."""
        mine = self._deliver(group.group_id, group.take_answers(), (member_id, kind))
        if response is not None:
            return response
        if mine is not None:
            return mine
        key = (group.group_id, member_id, kind)
        previous = self._classic_waiters.get(key)
        if previous is not None:  # the member sent it again: the earlier request is over
            previous.answer(_classic_error(kind, ErrorCode.REBALANCE_IN_PROGRESS))
        waiter = self._classic_waiters[key] = _ClassicWaiter()
        try:
            while waiter.response is None:
                deadline = group.next_deadline_ms()
                wait_ms = CLASSIC_WAIT_SLICE_MS_MAX
                if deadline is not None:
                    wait_ms = min(max(0, deadline - now_ms()), wait_ms)
                with trio.move_on_after(wait_ms / 1000):
                    await waiter.event.wait()
                if waiter.response is None:
                    self._tick_classic(group)
        finally:
            if self._classic_waiters.get(key) is waiter:
                del self._classic_waiters[key]
        return waiter.response

    def _deliver(
        self, group_id: str, answers: list[ClassicAnswer], mine: tuple[str, str] | None = None
    ) -> ClassicJoinResponse | ClassicSyncResponse | None:
        """Hand answers to the waiting requests; return the one addressed to `mine` (the
        request being handled, not yet waiting). Answers nobody waits for are dropped: their
        request was cancelled (its connection closed)."""
        own = None
        for answer in answers:
            response = answer.join if answer.join is not None else answer.sync
            assert response is not None
            if (answer.member_id, answer.kind) == mine:
                own = response
                continue
            waiter = self._classic_waiters.get((group_id, answer.member_id, answer.kind))
            if waiter is not None:
                waiter.answer(response)
        return own

    def _tick_classic(self, group: ClassicGroup) -> None:
        for member_id in group.tick(now_ms=now_ms()):
            log_event(
                logger, logging.INFO, "group_member_expired", group=group.group_id, member=member_id
            )
        self._deliver(group.group_id, group.take_answers())
        if group.is_empty and self.classic_groups.get(group.group_id) is group:
            del self.classic_groups[group.group_id]  # its offsets (if any) stay

    def _drop_classic_group(self, group_id: str) -> None:
        group = self.classic_groups.pop(group_id)
        group.unload()
        self._deliver(group_id, group.take_answers())

    # -- offsets --------------------------------------------------------------------------

    async def commit(self, body: dict) -> dict[str, Any]:
        """Answer an OffsetCommit: check the member, append, fsync, apply; raises DwalError."""
        group_id = _checked_group_id(body["group_id"])
        self.check_coordinator(group_id)
        group = self.groups.get(group_id)
        member_id = body["member_id"] or None
        classic = self.classic_groups.get(group_id)
        if classic is not None:  # a DWAL client commits only while no Kafka client is a member
            classic.check_commit(member_id or "", body["member_epoch"], None, now_ms=now_ms())
        elif group is not None:
            try:
                group.check_commit(member_id, body["member_epoch"])
            except GroupError as error:
                raise DwalError(error.code, str(error.message)) from None
        elif member_id is not None:
            raise DwalError(ErrorCode.UNKNOWN_MEMBER_ID, f"group {group_id!r} has no members")
        owner_check = group if group is not None and member_id is not None else None
        return await self._commit_offsets(group_id, body["topics"], owner_check, member_id)

    async def commit_classic(
        self,
        group_id: str,
        generation_id: int,
        member_id: str,
        instance_id: str | None,
        topics: list[dict],
    ) -> dict[str, Any]:
        """An OffsetCommit from a Kafka client (Kafka's rules: a member of the current
        generation, or generation -1 without a member id while the group has no members);
        `topics` and the answer as in `commit`. Raises DwalError for the whole request."""
        group_id = _checked_group_id(group_id)
        self.check_coordinator(group_id)
        classic = self.classic_groups.get(group_id)
        native = self.groups.get(group_id)
        if classic is not None:
            classic.check_commit(member_id, generation_id, instance_id, now_ms=now_ms())
        elif native is not None and not native.is_empty:
            try:  # a KIP-848 client commits with its member epoch
                native.check_commit(member_id or None, generation_id)
            except GroupError as error:
                raise DwalError(error.code, str(error.message)) from None
        elif generation_id >= 0:
            raise DwalError(
                ErrorCode.ILLEGAL_GENERATION,
                f"group {group_id!r} has no generation {generation_id}: it has no members",
            )
        elif member_id or instance_id:
            raise DwalError(ErrorCode.UNKNOWN_MEMBER_ID, f"group {group_id!r} has no members")
        return await self._commit_offsets(group_id, topics, None, None)

    async def _commit_offsets(
        self,
        group_id: str,
        topics: list[dict],
        owner_check: ConsumerGroup | None,
        member_id: str | None,
    ) -> dict[str, Any]:
        await self.ensure_offsets_topic()
        self.check_coordinator(group_id)
        results, records = self._commit_records(group_id, topics, owner_check, member_id)
        if records:
            try:
                await self._append_and_apply(group_id, records)
            except StorageError as error:
                code = (
                    ErrorCode.MESSAGE_TOO_LARGE
                    if isinstance(error, RecordTooLargeError)
                    else ErrorCode.KAFKA_STORAGE_ERROR
                )
                raise DwalError(code, f"cannot store the commit: {error}") from None
        return {"topics": results}

    def _commit_records(
        self, group_id: str, topics: list[dict], group: ConsumerGroup | None, member_id: str | None
    ):
        """Per-partition results, and the records to write for the partitions that pass: an
        offset >= 0, an existing partition, and (for a member's commit) one the member owns."""
        results = []
        records: list[tuple[tuple[str, int], int, str | None, int]] = []
        for entry in topics:
            partitions: list[dict[str, Any]] = []
            results.append({"topic": entry["topic"], "partitions": partitions})
            topic = self.registry.topics.get(entry["topic"])
            for part in entry["partitions"]:
                code, message = ErrorCode.NONE, None
                tp = (entry["topic"], part["partition"])
                if part["offset"] < 0:
                    code, message = ErrorCode.INVALID_REQUEST, "a committed offset is >= 0"
                elif topic is None or not 0 <= part["partition"] < topic.partitions:
                    code, message = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, "unknown partition"
                elif group is not None and group.owner_of(tp) != member_id:
                    code = ErrorCode.PARTITION_NOT_OWNED
                    message = f"{tp[0]}-{tp[1]} is not assigned to member {member_id}"
                else:
                    records.append(
                        (
                            (entry["topic"], part["partition"]),
                            part["offset"],
                            part["metadata"],
                            part.get("leader_epoch", -1),
                        )
                    )
                partitions.append(
                    {
                        "partition": part["partition"],
                        "error_code": int(code),
                        "error_message": message,
                    }
                )
        return results, records

    async def _append_and_apply(self, group_id: str, records: list) -> None:
        now = now_ms()
        batch = build_batch(
            [
                (
                    now,
                    offset_key(group_id, topic, partition),
                    msgpack.packb(_commit_value(offset, metadata, now, leader_epoch)),
                )
                for (topic, partition), offset, metadata, leader_epoch in records
            ]
        )
        log, info = self._append_offsets(group_id, batch, now)
        await self._wait_committed(group_id, log, info.last_offset + 1)
        offsets = self.offsets.setdefault(group_id, {})
        for index, ((topic, partition), offset, metadata, leader_epoch) in enumerate(records):
            log_offset = info.base_offset + index
            current = offsets.get((topic, partition))
            if current is None or current.log_offset < log_offset:
                offsets[(topic, partition)] = CommittedOffset(
                    offset, metadata, now, log_offset, leader_epoch
                )

    def fetch_offsets(self, body: dict) -> dict[str, Any]:
        group_id = _checked_group_id(body["group_id"])
        self.check_coordinator(group_id)
        offsets = self.offsets.get(group_id, {})
        wanted = body["topics"]
        if wanted is None:
            pairs = sorted(offsets)
        else:
            pairs = [(t["topic"], p) for t in wanted for p in t["partitions"]]
        by_topic: dict[str, list[dict]] = {}
        for topic, partition in pairs:
            committed = offsets.get((topic, partition))
            by_topic.setdefault(topic, []).append(
                {
                    "partition": partition,
                    "offset": committed.offset if committed else -1,
                    "metadata": committed.metadata if committed else None,
                    "leader_epoch": committed.leader_epoch if committed else -1,
                    "error_code": 0,
                }
            )
        return {"topics": [{"topic": t, "partitions": p} for t, p in by_topic.items()]}

    # -- administration -------------------------------------------------------------------

    def list_groups(self) -> dict[str, Any]:
        """DWAL's ListGroups: a classic group's state is Kafka's name for it."""
        out = []
        for listed in self.listed_groups():
            state = listed["state"]
            if listed["type"] == "consumer" or state == "Empty":  # DWAL's names for these
                state = state.lower()
            out.append(
                {"group_id": listed["group_id"], "state": state, "members": listed["members"]}
            )
        return {"groups": out}

    def listed_groups(self) -> list[dict[str, Any]]:
        """Every group this broker coordinates, sorted by id: `group_id`, `type` ("consumer"
        for DWAL's KIP-848 groups, "classic" for Kafka clients' groups and groups that only
        have committed offsets), `state` (Kafka's names), `members`, `protocol_type`."""
        out = []
        for name in sorted(set(self.groups) | set(self.classic_groups) | set(self.offsets)):
            native = self.groups.get(name)
            classic = self.classic_groups.get(name)
            if native is not None and (classic is None or classic.is_empty):
                state = NATIVE_STATE_NAMES.get(native.state, native.state)
                members = len(native.describe().members)
                kind, protocol_type = "consumer", "consumer"
            elif classic is not None:
                state, members = classic.state.value, classic.member_count
                kind, protocol_type = "classic", classic.protocol_type or ""
            else:
                state, members, kind, protocol_type = "Empty", 0, "classic", ""
            out.append(
                {
                    "group_id": name,
                    "type": kind,
                    "state": state,
                    "members": members,
                    "protocol_type": protocol_type,
                }
            )
        return out

    def describe_groups(self, body: dict) -> dict[str, Any]:
        return {"groups": [self._describe(group_id) for group_id in body["group_ids"]]}

    def _describe(self, group_id: str) -> dict[str, Any]:
        try:
            self.check_coordinator(group_id)
        except DwalError as error:
            return {
                "group_id": group_id,
                "error_code": int(error.code),
                "error_message": error.message,
            }
        classic = self.classic_groups.get(group_id)
        if classic is not None and (classic.member_count or group_id not in self.groups):
            return _native_description_of_classic(classic.describe(), now_ms())
        group = self.groups.get(group_id)
        if group is None:
            if group_id in self.offsets:
                return {"group_id": group_id, "state": "empty", "members": []}
            return {
                "group_id": group_id,
                "error_code": int(ErrorCode.GROUP_ID_NOT_FOUND),
                "error_message": f"group {group_id!r} does not exist",
            }
        description = group.describe()
        now = now_ms()
        members = [
            {
                "member_id": m.member_id,
                "instance_id": m.instance_id,
                "client_id": m.client_id,
                "host": m.host,
                "member_epoch": m.member_epoch,
                "session_expires_in_ms": max(0, m.session_deadline_ms - now),
                "subscribed_topic_names": list(m.subscribed_topic_names or ()),
                "subscribed_topic_regex": m.subscribed_topic_regex,
                "assignment": _topic_partitions(m.assignment),
                "target_assignment": _topic_partitions(m.target_assignment),
            }
            for m in description.members
        ]
        return {
            "group_id": group_id,
            "state": description.state,
            "group_epoch": description.group_epoch,
            "assignment_epoch": description.assignment_epoch,
            "members": members,
        }

    async def delete_groups(self, body: dict) -> dict[str, Any]:
        results = []
        for group_id in body["group_ids"]:
            try:
                await self._delete_group(group_id)
                results.append({"group_id": group_id, "error_code": 0})
            except DwalError as error:
                results.append(
                    {
                        "group_id": group_id,
                        "error_code": int(error.code),
                        "error_message": error.message,
                    }
                )
        return {"groups": results}

    async def _delete_group(self, group_id: str) -> None:
        self.check_coordinator(group_id)
        group = self.groups.get(group_id)
        if group is not None and not group.is_empty:
            raise DwalError(
                ErrorCode.NON_EMPTY_GROUP,
                _held_message(group_id, group.describe().members, now_ms()),
            )
        classic = self.classic_groups.get(group_id)
        if classic is not None and not classic.is_empty:
            raise DwalError(
                ErrorCode.NON_EMPTY_GROUP,
                f"group {group_id!r} has {classic.member_count} Kafka client member(s): stop "
                "the group's consumers first",
            )
        if group is None and classic is None and group_id not in self.offsets:
            raise DwalError(ErrorCode.GROUP_ID_NOT_FOUND, f"group {group_id!r} does not exist")
        keys = list(self.offsets.get(group_id, {}))
        if keys:
            now = now_ms()
            batch = build_batch([(now, offset_key(group_id, t, p), None) for t, p in keys])
            log, info = self._append_offsets(group_id, batch, now)
            await self._wait_committed(group_id, log, info.last_offset + 1)
        self.offsets.pop(group_id, None)
        self.groups.pop(group_id, None)
        if group_id in self.classic_groups:
            self._drop_classic_group(group_id)
        log_event(logger, logging.INFO, "group_deleted", group=group_id)


def _parse_offset_key(key: bytes | None) -> tuple[str, str, int] | None:
    """(group, topic, partition) of an offset record's key, or None for any other key."""
    if key is None:
        return None
    try:
        kind, group_id, topic, partition = msgpack.unpackb(key)
    except Exception:  # msgpack raises several types on bad input; wrong shapes too
        return None
    if kind != "offset" or not (
        type(group_id) is str and type(topic) is str and type(partition) is int
    ):
        return None
    return group_id, topic, partition


def _checked_group_id(group_id: str) -> str:
    if not group_id or len(group_id) > GROUP_ID_CHARS_MAX:
        raise DwalError(
            ErrorCode.INVALID_GROUP_ID, f"a group id has 1 to {GROUP_ID_CHARS_MAX} characters"
        )
    return group_id


def _held_message(group_id: str, members: tuple[MemberDescription, ...], now: int) -> str:
    """Why a group with `members` cannot be deleted: its active members, and each away static
    member with the time until its session expires (then it no longer holds the group)."""
    away = [m for m in members if m.member_epoch == STATIC_LEAVE_EPOCH]
    active = len(members) - len(away)
    holders = [f"{active} active member{'s' if active > 1 else ''}"] if active else []
    for m in away:
        left_s = math.ceil(max(0, m.session_deadline_ms - now) / 1000)
        holders.append(
            f"static member {m.instance_id!r} (away; its session expires in {left_s} s "
            "unless it rejoins)"
        )
    advice = ": stop the group's consumers first" if active else ""
    return f"group {group_id!r} is held by {' and '.join(holders)}{advice}"


def _topic_partitions(assignment) -> list[dict[str, Any]]:
    by_topic: dict[str, list[int]] = {}
    for topic, partition in sorted(assignment):
        by_topic.setdefault(topic, []).append(partition)
    return [{"topic": t, "partitions": p} for t, p in by_topic.items()]


__all__ = ["GroupCoordinator", "OFFSETS_TOPIC", "ProtocolError"]


def _replay(
    into: dict[str, dict[tuple[str, int], CommittedOffset]],
    key: bytes | None,
    value: bytes | None,
    log_offset: int,
) -> None:
    parsed = _parse_offset_key(key)
    if parsed is None:
        return  # not a record this version writes: skip it
    group_id, topic, partition = parsed
    offsets = into.setdefault(group_id, {})
    if value is None:
        offsets.pop((topic, partition), None)
        if not offsets:
            del into[group_id]
        return
    try:
        entry = msgpack.unpackb(value)
        offset = entry["offset"]
    except Exception:  # msgpack raises several types on bad input
        return
    leader_epoch = entry.get("leader_epoch", -1)
    if type(leader_epoch) is not int:
        leader_epoch = -1
    offsets[(topic, partition)] = CommittedOffset(
        offset, entry.get("metadata"), entry.get("timestamp", -1), log_offset, leader_epoch
    )


def _commit_value(
    offset: int, metadata: str | None, timestamp: int, leader_epoch: int
) -> dict[str, Any]:
    value: dict[str, Any] = {"offset": offset, "metadata": metadata, "timestamp": timestamp}
    if leader_epoch >= 0:  # written only when known: older records read as -1
        value["leader_epoch"] = leader_epoch
    return value


def _classic_member_id(client_id: str) -> str:
    """Kafka's form: the client id, a dash, a UUID."""
    return f"{client_id[:GROUP_ID_CHARS_MAX]}-{uuid.uuid4()}"


def _classic_error(kind: str, code: ErrorCode) -> ClassicJoinResponse | ClassicSyncResponse:
    if kind == "join":
        return ClassicJoinResponse(error_code=code)
    return ClassicSyncResponse(error_code=code)


def _native_description_of_classic(
    description: ClassicGroupDescription, now: int
) -> dict[str, Any]:
    """DWAL's describe of a Kafka clients' group: Kafka's state name, the generation as
    epochs, each member's subscription and (once Stable) assignment when it uses the
    consumer protocol."""
    consumer = description.protocol_type == "consumer"
    members = []
    for m in description.members:
        metadata = m.metadata or (m.protocols[0][1] if m.protocols else b"")
        topics = decode_consumer_subscription(metadata) if consumer else None
        assignment = decode_consumer_assignment(m.assignment) if consumer else None
        members.append(
            {
                "member_id": m.member_id,
                "instance_id": m.instance_id,
                "client_id": m.client_id,
                "host": m.host,
                "member_epoch": description.generation_id,
                "session_expires_in_ms": max(0, m.session_deadline_ms - now),
                "subscribed_topic_names": list(topics or ()),
                "subscribed_topic_regex": None,
                "assignment": _topic_partitions(assignment or ()),
                "target_assignment": _topic_partitions(assignment or ()),
            }
        )
    return {
        "group_id": description.group_id,
        "state": description.state.value,
        "group_epoch": description.generation_id,
        "assignment_epoch": description.generation_id,
        "members": members,
    }
