"""Membership of one consumer in a consumer group: the heartbeat loop of KIP-848.

Theory of operation. The coordinator decides assignments; the member reports, in every
heartbeat, its subscription and the partitions it owns, and receives the partitions it may
own now. A background task heartbeats every `heartbeat_interval_ms` (as the coordinator
says), or at once after the consumer reconciled a change. It never touches partitions itself:
it records the latest assignment as `target` and sets `changed`; the consumer applies it
inside `poll()` (commit and drop revoked partitions, then take new ones), where the
application is known not to be processing records, and calls `acknowledge()`.

When the coordinator no longer knows the member (its session expired, or the coordinator
restarted) the member has lost its partitions: `lost` is set, the target becomes empty, and
the member joins again as a new member.
"""

from __future__ import annotations

import trio

from client.cluster import Cluster
from client.limits import LIMITS
from client.connection import BrokerConnection, ConnectionFailed
from client.topic_partition import TopicPartition
from protocol import ApiKey, DwalError, ErrorCode

JOIN_EPOCH = 0
LEAVE_EPOCH = -1
STATIC_LEAVE_EPOCH = -2
_REJOIN_CODES = frozenset({ErrorCode.UNKNOWN_MEMBER_ID, ErrorCode.FENCED_MEMBER_EPOCH})


class GroupMembership:
    def __init__(
        self,
        cluster: Cluster,
        group_id: str,
        *,
        instance_id: str | None = None,
        rebalance_timeout_ms: int = LIMITS.consumer_rebalance_timeout_ms,
    ) -> None:
        self.cluster = cluster
        self.group_id = group_id
        self.instance_id = instance_id
        self.rebalance_timeout_ms = rebalance_timeout_ms
        self.topic_names: tuple[str, ...] | None = None
        self.topic_regex: str | None = None
        self.member_id: str | None = None
        self.member_epoch = JOIN_EPOCH
        self.owned: frozenset[TopicPartition] = frozenset()
        self.target: frozenset[TopicPartition] | None = None
        self.lost = False
        self.error: DwalError | None = None
        self.changed = trio.Event()  # set when target, lost or error changed
        self.joined = trio.Event()  # set after the first successful heartbeat
        self._wake = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._coordinator: BrokerConnection | None = None

    # -- what the consumer calls ----------------------------------------------------------

    def subscribe(self, topics: tuple[str, ...] | None, regex: str | None) -> None:
        self.topic_names, self.topic_regex = topics, regex
        self._wake.set()

    def acknowledge(self, owned: frozenset[TopicPartition]) -> None:
        """The consumer now owns exactly `owned`; tell the coordinator at once."""
        self.owned = owned
        if self.target is not None and owned == self.target:
            self.target = None
        self.lost = False
        self.changed = trio.Event()
        self._wake.set()

    def start(self) -> None:
        self.cluster.start_task(self._run)

    async def leave(self) -> None:
        """Stop heartbeating and leave the group (a static member leaves temporarily)."""
        if self._scope is not None:
            self._scope.cancel()
        if self.member_id is None:
            return
        epoch = STATIC_LEAVE_EPOCH if self.instance_id else LEAVE_EPOCH
        try:
            with trio.move_on_after(self.cluster.request_timeout_ms / 1000):
                await self._send(epoch)
        except DwalError:
            pass  # the coordinator expires us after the session timeout anyway
        self.member_id = None

    # -- coordinator requests -------------------------------------------------------------

    async def coordinator(self) -> BrokerConnection:
        """The connection to the group's coordinator (found with FindCoordinator)."""
        if self._coordinator is not None and not self._coordinator.closed:
            return self._coordinator
        response = await self.cluster.call(ApiKey.FIND_COORDINATOR, {"key": self.group_id})
        body = response.body
        self._coordinator = await self.cluster.connection(
            body["host"], body["port"], purpose="group"
        )
        return self._coordinator

    async def call(self, api_key: ApiKey, body: dict):
        """Send a request to the coordinator; rediscovers it on NOT_COORDINATOR."""
        try:
            return await self.cluster.call(api_key, body, connection=await self.coordinator())
        except DwalError as error:
            if error.code in (
                ErrorCode.NOT_COORDINATOR,
                ErrorCode.COORDINATOR_NOT_AVAILABLE,
            ) or isinstance(error, ConnectionFailed):
                self._coordinator = None
            raise

    async def _send(self, epoch: int) -> dict:
        owned: dict[str, list[int]] = {}
        for topic, partition in sorted(self.owned):
            owned.setdefault(topic, []).append(partition)
        response = await self.call(
            ApiKey.CONSUMER_GROUP_HEARTBEAT,
            {
                "group_id": self.group_id,
                "member_id": self.member_id,
                "member_epoch": epoch,
                "instance_id": self.instance_id,
                "rebalance_timeout_ms": self.rebalance_timeout_ms,
                "subscribed_topic_names": list(self.topic_names)
                if self.topic_names is not None
                else ([] if self.topic_regex is None else None),
                "subscribed_topic_regex": self.topic_regex if self.topic_regex is not None else "",
                "owned_partitions": [{"topic": t, "partitions": p} for t, p in owned.items()],
            },
        )
        return response.body

    # -- the heartbeat loop ---------------------------------------------------------------

    async def _run(self) -> None:
        with trio.CancelScope() as self._scope:
            while True:
                interval_s = await self._heartbeat_once()
                with trio.move_on_after(interval_s):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _heartbeat_once(self) -> float:
        """One heartbeat; returns how long to wait before the next one."""
        try:
            body = await self._send(self.member_epoch)
        except DwalError as error:
            if error.code == ErrorCode.FENCED_MEMBER_EPOCH and self.member_id is not None:
                # the coordinator still holds our old membership: release it before rejoining
                try:
                    await self._send(LEAVE_EPOCH)
                except DwalError:
                    pass
            return self._failed(error)
        self.member_id = body["member_id"]
        self.member_epoch = body["member_epoch"]
        if body["assignment"] is not None:
            assignment = frozenset(
                TopicPartition(t["topic"], p) for t in body["assignment"] for p in t["partitions"]
            )
            if assignment != self.owned and assignment != self.target:
                self.target = assignment
                self.changed.set()
        self.error = None
        self.joined.set()
        return body["heartbeat_interval_ms"] / 1000

    def _failed(self, error: DwalError) -> float:
        if error.code in _REJOIN_CODES:
            # Fenced or forgotten: our partitions are gone. Drop them and join again.
            self.member_id, self.member_epoch = None, JOIN_EPOCH
            self.lost = bool(self.owned)
            self.target = frozenset()
            self.changed.set()
            return 0
        if error.retriable:
            return LIMITS.group_retry_backoff_s
        self.error = error  # e.g. an invalid regex: poll() raises it
        self.changed.set()
        self.joined.set()
        return LIMITS.group_retry_backoff_s * 10
