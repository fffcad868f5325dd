"""One consumer group's state machine, after Kafka's KIP-848 rebalance protocol (simplified).

Theory of operation
-------------------
Members send heartbeats; the group answers each with the set of partitions the member may
own now. Nothing here does I/O or reads a clock: time arrives as `now_ms`, the topics'
partition counts arrive with every call, and member ids come from an injected factory.

Three epochs order the changes:

- The *group epoch* goes up whenever an input of the assignment changes: a member joins,
  leaves or times out, a subscription changes, or a subscribed topic appears, disappears or
  grows. Several changes in one call bump it once.
- The *assignment epoch* is the group epoch the current *target assignment* was computed
  at. Every public call that bumps the group epoch recomputes the target (with `assign`,
  sticky to the previous target) before returning, so at rest the two epochs are equal.
- A *member epoch* is the assignment epoch the member has fully reached. It moves only when
  the member owns exactly its target and has nothing left to give back.

Each member has `assigned` (what it was last told it may own) and `pending_revocation` (what
it was told to give up and has not yet reported as released). Reconciliation happens on the
member's own heartbeat, revoke before assign:

1. Partitions in `pending_revocation` that the member no longer reports in
   `owned_partitions` are released: they are free for others from now on.
2. Partitions in `assigned` but not in the target move to `pending_revocation`; the member
   is answered with what is left, and is given nothing new until it has released them all.
3. Otherwise it is given the partitions of its target that no member holds.

Safety rests on one invariant: a partition is in at most one member's `assigned |
pending_revocation`. `_owners` indexes that union, so "no member holds it" is one lookup. A
member that does not release within its rebalance timeout, or stops heartbeating for a
session timeout, is removed by `expire` and its partitions become free.

A static member (one with an instance id) may leave for a while (epoch -2): it keeps its
partitions and its place in the target until a process with the same instance id rejoins
and takes them over under a new member id, without a rebalance, or until its session times
out. Every call validates fully before changing anything, so a refused request leaves the
group as it was.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from broker.groups.assignor import assign
from broker.groups.group_types import (
    JOIN_EPOCH,
    LEAVE_EPOCH,
    STATIC_LEAVE_EPOCH,
    GroupConfig,
    GroupDescription,
    GroupError,
    HeartbeatRequest,
    HeartbeatResponse,
    MemberDescription,
    TopicPartition,
)
from protocol.errors import ErrorCode

__all__ = [
    "ConsumerGroup",
    "GroupConfig",
    "GroupDescription",
    "GroupError",
    "HeartbeatRequest",
    "HeartbeatResponse",
    "MemberDescription",
    "TopicPartition",
]

_NO_PARTITIONS: frozenset[TopicPartition] = frozenset()


@dataclass(kw_only=True, slots=True)
class _Member:
    """The group's mutable record of one member; never handed out (see MemberDescription)."""

    member_id: str
    instance_id: str | None
    client_id: str = ""
    host: str = ""
    rebalance_timeout_ms: int
    subscribed_topic_names: tuple[str, ...] = ()
    subscribed_topic_regex: str | None = None
    subscribed_topic_pattern: re.Pattern[str] | None = None
    subscribed_topics: frozenset[str] = frozenset()  # the subscription resolved to topics
    member_epoch: int = JOIN_EPOCH
    previous_member_epoch: int = JOIN_EPOCH
    assigned: frozenset[TopicPartition] = _NO_PARTITIONS
    pending_revocation: frozenset[TopicPartition] = _NO_PARTITIONS
    session_deadline_ms: int = 0
    revocation_deadline_ms: int | None = None  # set while pending_revocation is not empty
    away: bool = False  # a static member that left with STATIC_LEAVE_EPOCH

    @property
    def held(self) -> frozenset[TopicPartition]:
        """Partitions no other member may be given while this member exists."""
        return self.assigned | self.pending_revocation


class ConsumerGroup:
    """The coordinator's state for one consumer group. Not thread-safe; never blocks."""

    def __init__(
        self, group_id: str, config: GroupConfig, new_member_id: Callable[[], str]
    ) -> None:
        self.group_id = group_id
        self._config = config
        self._new_member_id = new_member_id
        self._members: dict[str, _Member] = {}
        self._member_id_by_instance_id: dict[str, str] = {}
        self._owners: dict[TopicPartition, str] = {}
        self._group_epoch = 0
        self._assignment_epoch = 0
        self._target: dict[str, frozenset[TopicPartition]] = {}
        self._target_stale = False
        self._partition_counts: dict[str, int] = {}
        self._subscribed_partition_counts: dict[str, int] = {}

    # ----------------------------------------------------------------- public API

    def heartbeat(
        self, request: HeartbeatRequest, *, now_ms: int, partition_counts: Mapping[str, int]
    ) -> HeartbeatResponse:
        """Join, heartbeat or leave; return the member's epoch and the partitions it may own.

        Raises GroupError (and changes nothing) when the request is refused.
        """
        if request.member_epoch in (LEAVE_EPOCH, STATIC_LEAVE_EPOCH):
            return self._leave(request, now_ms=now_ms, partition_counts=partition_counts)
        if request.member_epoch < JOIN_EPOCH:
            raise GroupError(ErrorCode.INVALID_REQUEST, f"invalid epoch {request.member_epoch}")
        pattern = _compile_regex(request.subscribed_topic_regex)
        if request.member_epoch == JOIN_EPOCH and not request.member_id:
            member = self._join(request)
        else:
            member = self._validated_member(request)
        self._observe_metadata(partition_counts)
        self._update_member(member, request, pattern, now_ms=now_ms)
        self._update_target()
        self._reconcile(member, request.owned_partitions, now_ms=now_ms)
        return HeartbeatResponse(
            member_id=member.member_id,
            member_epoch=member.member_epoch,
            heartbeat_interval_ms=self._config.heartbeat_interval_ms,
            assignment=member.assigned,
        )

    def expire(self, *, now_ms: int, partition_counts: Mapping[str, int]) -> list[str]:
        """Remove members whose session timed out or who did not release revoked partitions
        within their rebalance timeout; return their ids, sorted."""
        self._observe_metadata(partition_counts)
        expired = [
            member for _, member in sorted(self._members.items()) if _is_expired(member, now_ms)
        ]
        for member in expired:
            self._remove_member(member)
        self._update_target()
        return [member.member_id for member in expired]

    def metadata_changed(self, *, partition_counts: Mapping[str, int]) -> None:
        """Topics were created, deleted or grew: rebalance if it matters to this group."""
        self._observe_metadata(partition_counts)
        self._update_target()

    def check_commit(self, member_id: str | None, member_epoch: int) -> None:
        """Return if an offset commit with this member id and epoch may proceed.

        Raises GroupError UNKNOWN_MEMBER_ID, STALE_MEMBER_EPOCH or FENCED_MEMBER_EPOCH.
        """
        if not member_id:
            if member_epoch == LEAVE_EPOCH and not self._members:
                return  # a commit from outside the group (admin tool, manual assignment)
            raise GroupError(
                ErrorCode.UNKNOWN_MEMBER_ID,
                f"group {self.group_id!r} has members: commits must come from a member",
            )
        member = self._known_member(member_id)
        if member.away:
            raise GroupError(ErrorCode.FENCED_MEMBER_EPOCH, f"member {member_id!r} left")
        if member_epoch == member.member_epoch:
            return
        if member_epoch == member.previous_member_epoch and member.pending_revocation:
            return  # it commits what it is about to give back
        if member_epoch > member.member_epoch or member_epoch < member.previous_member_epoch:
            raise GroupError(
                ErrorCode.FENCED_MEMBER_EPOCH,
                f"epoch {member_epoch} is not member {member_id!r}'s ({member.member_epoch})",
            )
        raise GroupError(
            ErrorCode.STALE_MEMBER_EPOCH,
            f"epoch {member_epoch} is stale: member {member_id!r} is at {member.member_epoch}",
        )

    def describe(self) -> GroupDescription:
        """Return a snapshot of the group and its members."""
        return GroupDescription(
            group_id=self.group_id,
            state=self.state,
            group_epoch=self._group_epoch,
            assignment_epoch=self._assignment_epoch,
            members=tuple(
                self._describe_member(member) for _, member in sorted(self._members.items())
            ),
        )

    @property
    def state(self) -> str:
        if not self._members:
            return "empty"
        if self._group_epoch > self._assignment_epoch:
            return "assigning"
        if any(member.member_epoch != self._assignment_epoch for member in self._members.values()):
            return "reconciling"
        return "stable"

    @property
    def is_empty(self) -> bool:
        return not self._members

    def owner_of(self, partition: TopicPartition) -> str | None:
        """Return the member holding the partition (assigned or pending revocation), if any."""
        return self._owners.get(partition)

    # ----------------------------------------------------------------- membership

    def _join(self, request: HeartbeatRequest) -> _Member:
        instance_id = request.instance_id or None
        if instance_id is not None and instance_id in self._member_id_by_instance_id:
            holder = self._members[self._member_id_by_instance_id[instance_id]]
            if not holder.away:
                raise GroupError(
                    ErrorCode.UNRELEASED_INSTANCE_ID,
                    f"instance id {instance_id!r} is held by member {holder.member_id!r}",
                )
            return self._replace_static_member(holder)
        if len(self._members) >= self._config.members_max:
            raise GroupError(
                ErrorCode.GROUP_MAX_SIZE_REACHED,
                f"group {self.group_id!r} has {self._config.members_max} members, the most allowed",
            )
        member = _Member(
            member_id=self._fresh_member_id(),
            instance_id=instance_id,
            rebalance_timeout_ms=self._config.rebalance_timeout_ms,
        )
        self._members[member.member_id] = member
        if instance_id is not None:
            self._member_id_by_instance_id[instance_id] = member.member_id
        self._target_stale = True
        return member

    def _replace_static_member(self, previous: _Member) -> _Member:
        """A static member is back: a new member id takes over everything the old one had,
        its target included, so the group does not rebalance."""
        member = dataclasses.replace(previous, member_id=self._fresh_member_id(), away=False)
        del self._members[previous.member_id]
        self._members[member.member_id] = member
        assert member.instance_id is not None
        self._member_id_by_instance_id[member.instance_id] = member.member_id
        self._target[member.member_id] = self._target.pop(previous.member_id, _NO_PARTITIONS)
        for partition in member.held:
            self._owners[partition] = member.member_id
        return member

    def _fresh_member_id(self) -> str:
        member_id = self._new_member_id()
        assert member_id and member_id not in self._members, f"reused member id {member_id!r}"
        return member_id

    def _leave(
        self, request: HeartbeatRequest, *, now_ms: int, partition_counts: Mapping[str, int]
    ) -> HeartbeatResponse:
        member = self._known_member(request.member_id)
        _check_instance_id(member, request)
        if request.member_epoch == STATIC_LEAVE_EPOCH and member.instance_id is not None:
            member.away = True
            member.session_deadline_ms = now_ms + self._config.session_timeout_ms
            epoch = STATIC_LEAVE_EPOCH
        else:
            self._observe_metadata(partition_counts)
            self._remove_member(member)
            self._update_target()
            epoch = LEAVE_EPOCH
        return HeartbeatResponse(
            member_id=member.member_id,
            member_epoch=epoch,
            heartbeat_interval_ms=self._config.heartbeat_interval_ms,
            assignment=_NO_PARTITIONS,
        )

    def _remove_member(self, member: _Member) -> None:
        for partition in member.held:
            del self._owners[partition]
        del self._members[member.member_id]
        if member.instance_id is not None:
            del self._member_id_by_instance_id[member.instance_id]
        self._target_stale = True

    def _known_member(self, member_id: str | None) -> _Member:
        member = self._members.get(member_id or "")
        if member is None:
            raise GroupError(
                ErrorCode.UNKNOWN_MEMBER_ID,
                f"member {member_id!r} is not in group {self.group_id!r}",
            )
        return member

    def _validated_member(self, request: HeartbeatRequest) -> _Member:
        """Return the member sending this heartbeat, or raise if it may not send it."""
        member = self._known_member(request.member_id)
        _check_instance_id(member, request)
        if member.away:
            raise GroupError(
                ErrorCode.FENCED_MEMBER_EPOCH,
                f"static member {member.member_id!r} left: rejoin with epoch 0 and no member id",
            )
        if request.member_epoch == member.member_epoch:
            return member
        # The response that raised its epoch may have been lost: accept the previous epoch
        # from a member that owns nothing it may not own.
        owned = request.owned_partitions
        if (
            request.member_epoch == member.previous_member_epoch
            and owned is not None
            and owned <= member.held
        ):
            return member
        raise GroupError(
            ErrorCode.FENCED_MEMBER_EPOCH,
            f"epoch {request.member_epoch} is not member {member.member_id!r}'s "
            f"({member.member_epoch}): give up all partitions and rejoin",
        )

    def _update_member(
        self,
        member: _Member,
        request: HeartbeatRequest,
        pattern: re.Pattern[str] | None,
        *,
        now_ms: int,
    ) -> None:
        member.session_deadline_ms = now_ms + self._config.session_timeout_ms
        if request.client_id:
            member.client_id = request.client_id
        if request.host:
            member.host = request.host
        if request.rebalance_timeout_ms > 0:
            member.rebalance_timeout_ms = request.rebalance_timeout_ms
        names = member.subscribed_topic_names
        if request.subscribed_topic_names is not None:
            names = tuple(sorted(set(request.subscribed_topic_names)))
        regex = member.subscribed_topic_regex
        if request.subscribed_topic_regex is not None:
            regex = request.subscribed_topic_regex or None
            member.subscribed_topic_pattern = pattern
        if (names, regex) != (member.subscribed_topic_names, member.subscribed_topic_regex):
            member.subscribed_topic_names = names
            member.subscribed_topic_regex = regex
            member.subscribed_topics = _resolve(member, self._partition_counts)
            self._target_stale = True

    # ----------------------------------------------------------------- assignment

    def _observe_metadata(self, partition_counts: Mapping[str, int]) -> None:
        """Note the topics' partition counts; mark the target stale if that changes what any
        member subscribes to or the size of a subscribed topic."""
        counts = dict(partition_counts)
        if counts == self._partition_counts:
            return
        self._partition_counts = counts
        for member in self._members.values():
            topics = _resolve(member, counts)
            if topics != member.subscribed_topics:
                member.subscribed_topics = topics
                self._target_stale = True
        for topic, count in self._subscribed_partition_counts.items():
            if counts.get(topic) != count:
                self._target_stale = True

    def _update_target(self) -> None:
        if not self._target_stale:
            return
        self._target_stale = False
        self._group_epoch += 1
        subscriptions = {
            member_id: member.subscribed_topics for member_id, member in self._members.items()
        }
        self._target = assign(subscriptions, self._partition_counts, self._target)
        self._assignment_epoch = self._group_epoch
        subscribed = frozenset().union(*subscriptions.values())
        self._subscribed_partition_counts = {
            topic: self._partition_counts[topic] for topic in subscribed
        }

    def _reconcile(
        self, member: _Member, owned: frozenset[TopicPartition] | None, *, now_ms: int
    ) -> None:
        """Move the member one step towards its target, revoke before assign."""
        target = self._target.get(member.member_id, _NO_PARTITIONS)
        if owned is not None and member.pending_revocation - owned:
            for partition in member.pending_revocation - owned:
                del self._owners[partition]
            member.pending_revocation &= owned
        revoked = member.assigned - target
        if revoked:
            if not member.pending_revocation:
                member.revocation_deadline_ms = now_ms + member.rebalance_timeout_ms
            member.pending_revocation |= revoked
            member.assigned &= target
        if member.pending_revocation:
            return
        member.revocation_deadline_ms = None
        free = frozenset(
            partition for partition in target - member.assigned if partition not in self._owners
        )
        for partition in free:
            self._owners[partition] = member.member_id
        member.assigned |= free
        if member.assigned == target and member.member_epoch != self._assignment_epoch:
            member.previous_member_epoch = member.member_epoch
            member.member_epoch = self._assignment_epoch

    def _describe_member(self, member: _Member) -> MemberDescription:
        return MemberDescription(
            member_id=member.member_id,
            instance_id=member.instance_id,
            client_id=member.client_id,
            host=member.host,
            member_epoch=STATIC_LEAVE_EPOCH if member.away else member.member_epoch,
            session_deadline_ms=member.session_deadline_ms,
            subscribed_topic_names=member.subscribed_topic_names,
            subscribed_topic_regex=member.subscribed_topic_regex,
            assignment=member.assigned,
            pending_revocation=member.pending_revocation,
            target_assignment=self._target.get(member.member_id, _NO_PARTITIONS),
        )


def _compile_regex(regex: str | None) -> re.Pattern[str] | None:
    if not regex:
        return None
    try:
        return re.compile(regex)
    except re.error as error:
        raise GroupError(
            ErrorCode.INVALID_REGULAR_EXPRESSION, f"invalid regular expression {regex!r}: {error}"
        ) from None


def _resolve(member: _Member, partition_counts: Mapping[str, int]) -> frozenset[str]:
    """Return the existing topics the member subscribes to, by name or by regex.

    Internal topics (names starting with "__") match a regex never, a name only explicitly.
    """
    topics = {name for name in member.subscribed_topic_names if name in partition_counts}
    pattern = member.subscribed_topic_pattern
    if pattern is not None:
        topics.update(
            topic
            for topic in partition_counts
            if not topic.startswith("__") and pattern.fullmatch(topic)
        )
    return frozenset(topics)


def _check_instance_id(member: _Member, request: HeartbeatRequest) -> None:
    if request.instance_id and request.instance_id != member.instance_id:
        raise GroupError(
            ErrorCode.INVALID_REQUEST,
            f"instance id {request.instance_id!r} is not member {member.member_id!r}'s",
        )


def _is_expired(member: _Member, now_ms: int) -> bool:
    if now_ms > member.session_deadline_ms:
        return True
    deadline = member.revocation_deadline_ms
    return bool(member.pending_revocation) and deadline is not None and now_ms > deadline
