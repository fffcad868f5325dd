"""One classic group's state machine: Kafka's JoinGroup / SyncGroup / Heartbeat protocol.

Theory of operation
-------------------
Kafka's clients (the Java client's classic protocol, librdkafka, kafka-python, aiokafka)
rebalance in rounds. Every member sends JoinGroup; once all known members have (the join
barrier), the coordinator picks a protocol every member supports (by the members' votes),
bumps the generation and answers every waiting join; the leader (the first member) gets the
other members' metadata, computes the assignment itself (range, roundrobin, sticky,
cooperative-sticky: the members' choice) and sends it with its SyncGroup; the coordinator
hands each member its part as the answer to that member's SyncGroup. Heartbeats keep a
member's session alive and tell it REBALANCE_IN_PROGRESS when it must join again.
Cooperative rebalancing needs nothing more here: its members join again, with the partitions
they still own in their metadata, for as many rounds as their assignor wants.

States (Kafka's names)::

    Empty --join--> PreparingRebalance --barrier--> CompletingRebalance --leader sync--> Stable
      ^                ^      |                          |                             |
      |                |      +--no member left----------+--------> Empty              |
      |                +---- join with new metadata, leave, expiry (from any of these) -+

Nothing here does I/O or reads a clock: time arrives as `now_ms`, member ids come from an
injected factory, and a request that must wait (a JoinGroup until the barrier, a follower's
SyncGroup until the leader's) is answered later through the outbox: `take_answers()` returns
the `ClassicAnswer`s produced since the last call, each addressed to a member's pending join
or sync. The shell keeps the waiting requests and delivers them; it calls `tick(now_ms)` at
`next_deadline_ms()` so timeouts (the barrier's rebalance timeout, the initial rebalance
delay, the wait for SyncGroups, sessions, KIP-394 ids not used) take effect.

Deadlines. A rebalance completes when every member has rejoined and no KIP-394 id handed
out is still unused, or at the rebalance deadline (the largest rebalance timeout of the
members); then dynamic members that did not rejoin are removed (static members stay until
their session expires, as in Kafka). A new group's first rebalance waits the initial delay,
extended by another delay while new members keep arriving, within the rebalance timeout.
After a join completes, members that do not send SyncGroup within the rebalance timeout are
removed and the group rebalances. A member waiting for a join or sync answer cannot expire
by session; any other member expires when its session deadline passes.

Every request is validated fully before anything changes: a refused request (GroupError, or
an error answer) leaves the group as it was.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from dataclasses import dataclass

from broker.groups.group_types import (
    ClassicGroupDescription,
    ClassicGroupState,
    ClassicJoinedMember,
    ClassicJoinRequest,
    ClassicJoinResponse,
    ClassicMemberDescription,
    ClassicSyncRequest,
    ClassicSyncResponse,
    GroupConfig,
    GroupError,
    TopicPartition,
)
from protocol.errors import ErrorCode

__all__ = [
    "ClassicAnswer",
    "ClassicGroup",
    "JoinOutcome",
    "SyncOutcome",
    "decode_consumer_assignment",
    "decode_consumer_subscription",
    "encode_consumer_assignment",
    "encode_consumer_subscription",
]

EMPTY = ClassicGroupState.EMPTY
PREPARING = ClassicGroupState.PREPARING_REBALANCE
COMPLETING = ClassicGroupState.COMPLETING_REBALANCE
STABLE = ClassicGroupState.STABLE
DEAD = ClassicGroupState.DEAD


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassicAnswer:
    """The answer to a member's waiting JoinGroup (`join`) or SyncGroup (`sync`)."""

    member_id: str
    join: ClassicJoinResponse | None = None
    sync: ClassicSyncResponse | None = None

    @property
    def kind(self) -> str:
        return "join" if self.join is not None else "sync"


@dataclass(frozen=True, kw_only=True, slots=True)
class JoinOutcome:
    """`response` now, or None: the answer to `member_id`'s join comes through the outbox."""

    member_id: str
    response: ClassicJoinResponse | None


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncOutcome:
    """`response` now, or None: the answer to `member_id`'s sync comes through the outbox."""

    member_id: str
    response: ClassicSyncResponse | None


@dataclass(kw_only=True, slots=True)
class _Member:
    """The group's mutable record of one member; never handed out."""

    member_id: str
    instance_id: str | None
    client_id: str
    host: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    protocol_type: str
    protocols: tuple[tuple[str, bytes], ...]
    assignment: bytes = b""
    awaiting_join: bool = False
    awaiting_sync: bool = False
    session_deadline_ms: int = 0

    def metadata(self, protocol_name: str | None) -> bytes:
        for name, metadata in self.protocols:
            if name == protocol_name:
                return metadata
        return b""


class ClassicGroup:
    """The coordinator's state for one classic group. Not thread-safe; never blocks."""

    def __init__(
        self, group_id: str, config: GroupConfig, new_member_id: Callable[[str], str]
    ) -> None:
        """`new_member_id(client_id)` returns a member id never used before."""
        self.group_id = group_id
        self._config = config
        self._new_member_id = new_member_id
        self.state = EMPTY
        self.generation_id = 0
        self.protocol_type: str | None = None
        self.protocol_name: str | None = None
        self.leader_id: str | None = None
        self._members: dict[str, _Member] = {}  # in joining order: the first one leads
        self._pending_members: dict[str, int] = {}  # KIP-394 ids handed out -> deadline
        self._instances: dict[str, str] = {}  # static instance id -> member id
        self._rebalance_deadline_ms: int | None = None
        self._initial_delay = False  # the first rebalance of a new group: wait for more
        self._initial_delay_limit_ms = 0  # ... but not past this
        self._member_added_in_delay = False
        self._pending_sync: set[str] = set()  # members yet to send SyncGroup this generation
        self._sync_deadline_ms: int | None = None
        self._outbox: list[ClassicAnswer] = []

    # ----------------------------------------------------------------- queries

    @property
    def is_empty(self) -> bool:
        """No members and no KIP-394 id waiting to be used: nothing to keep but offsets."""
        return not self._members and not self._pending_members

    @property
    def member_count(self) -> int:
        return len(self._members)

    def has_member(self, member_id: str) -> bool:
        return member_id in self._members

    def take_answers(self) -> list[ClassicAnswer]:
        """The answers produced since the last call, for waiting joins and syncs."""
        answers, self._outbox = self._outbox, []
        return answers

    def next_deadline_ms(self) -> int | None:
        """When `tick` next has something to do (None: nothing is timed)."""
        deadlines = list(self._pending_members.values())
        if self.state == PREPARING and self._rebalance_deadline_ms is not None:
            deadlines.append(self._rebalance_deadline_ms)
        if self._sync_deadline_ms is not None:
            deadlines.append(self._sync_deadline_ms)
        deadlines.extend(
            m.session_deadline_ms
            for m in self._members.values()
            if not (m.awaiting_join or m.awaiting_sync)
        )
        return min(deadlines, default=None)

    def describe(self) -> ClassicGroupDescription:
        """A snapshot; members' metadata and assignments are shown only when Stable, as
        Kafka's DescribeGroups does (before, they belong to no settled generation)."""
        stable = self.state == STABLE
        return ClassicGroupDescription(
            group_id=self.group_id,
            state=self.state,
            generation_id=self.generation_id,
            protocol_type=self.protocol_type,
            protocol_name=self.protocol_name,
            leader_id=self.leader_id,
            members=tuple(
                ClassicMemberDescription(
                    member_id=m.member_id,
                    instance_id=m.instance_id,
                    client_id=m.client_id,
                    host=m.host,
                    session_timeout_ms=m.session_timeout_ms,
                    rebalance_timeout_ms=m.rebalance_timeout_ms,
                    session_deadline_ms=m.session_deadline_ms,
                    protocols=m.protocols,
                    metadata=m.metadata(self.protocol_name) if stable else b"",
                    assignment=m.assignment if stable else b"",
                    awaiting_join=m.awaiting_join,
                    awaiting_sync=m.awaiting_sync,
                )
                for m in self._members.values()
            ),
        )

    # ----------------------------------------------------------------- JoinGroup

    def join(self, request: ClassicJoinRequest, *, now_ms: int) -> JoinOutcome:
        """A JoinGroup: answered now (an error, MEMBER_ID_REQUIRED with the new id, or the
        current generation for a member that changes nothing) or later through the outbox
        when the rebalance completes. Raises GroupError (changing nothing) when refused."""
        self._check_join(request)
        if not request.member_id:
            if request.instance_id:
                return self._join_static(request, now_ms=now_ms)
            member_id = self._new_member_id(request.client_id)
            assert member_id and member_id not in self._members, f"reused id {member_id!r}"
            if request.member_id_required:
                self._check_room()
                self._pending_members[member_id] = now_ms + request.session_timeout_ms
                return JoinOutcome(
                    member_id=member_id,
                    response=ClassicJoinResponse(
                        error_code=ErrorCode.MEMBER_ID_REQUIRED, member_id=member_id
                    ),
                )
            return self._add_and_join(member_id, request, now_ms=now_ms)
        if request.member_id in self._pending_members and request.member_id not in self._members:
            if request.instance_id:
                raise GroupError(
                    ErrorCode.INVALID_REQUEST, "a static member joins with an empty member id"
                )
            self._check_room()
            del self._pending_members[request.member_id]
            return self._add_and_join(request.member_id, request, now_ms=now_ms)
        member = self._validated_member(request.member_id, request.instance_id)
        return self._join_member(member, request, now_ms=now_ms)

    def _check_join(self, request: ClassicJoinRequest) -> None:
        if self.state == DEAD:
            raise GroupError(
                ErrorCode.COORDINATOR_NOT_AVAILABLE, f"group {self.group_id!r} is unloaded"
            )
        low = self._config.classic_session_timeout_ms_min
        high = self._config.classic_session_timeout_ms_max
        if not low <= request.session_timeout_ms <= high:
            raise GroupError(
                ErrorCode.INVALID_SESSION_TIMEOUT,
                f"session timeout {request.session_timeout_ms} ms is outside {low}..{high} ms",
            )
        if not request.protocol_type or not request.protocols:
            raise GroupError(
                ErrorCode.INCONSISTENT_GROUP_PROTOCOL, "a join names a protocol type and protocols"
            )
        if not self._members:
            return
        if request.protocol_type != self.protocol_type:
            raise GroupError(
                ErrorCode.INCONSISTENT_GROUP_PROTOCOL,
                f"group {self.group_id!r} has protocol type {self.protocol_type!r}, "
                f"not {request.protocol_type!r}",
            )
        names = {name for name, _ in request.protocols}
        if not names & self._candidate_protocols():
            raise GroupError(
                ErrorCode.INCONSISTENT_GROUP_PROTOCOL,
                f"no protocol in common with group {self.group_id!r}'s members "
                f"({', '.join(sorted(self._candidate_protocols())) or 'none'})",
            )

    def _check_room(self) -> None:
        if len(self._members) >= self._config.members_max:
            raise GroupError(
                ErrorCode.GROUP_MAX_SIZE_REACHED,
                f"group {self.group_id!r} has {self._config.members_max} members, the most allowed",
            )

    def _join_static(self, request: ClassicJoinRequest, *, now_ms: int) -> JoinOutcome:
        """A static member joins with no member id: a new one, or a process that takes over
        its instance id (the previous holder is fenced) without a rebalance if possible."""
        assert request.instance_id
        previous_id = self._instances.get(request.instance_id)
        if previous_id is None:
            member_id = self._new_member_id(request.client_id)
            assert member_id and member_id not in self._members, f"reused id {member_id!r}"
            return self._add_and_join(member_id, request, now_ms=now_ms)
        member = self._replace_static_member(self._members[previous_id], request.client_id)
        self._update_member(member, request, now_ms=now_ms)
        if self.state == STABLE:
            selected = self._select_protocol()
            is_leader = member.member_id == self.leader_id
            if selected == self.protocol_name and (
                not is_leader or request.supports_skip_assignment
            ):
                self._pending_sync.discard(previous_id)
                return JoinOutcome(
                    member_id=member.member_id,
                    response=self._join_response(member, skip_assignment=is_leader),
                )
        member.awaiting_join = True
        if self.state == PREPARING:
            self._try_complete_join(now_ms)
        else:
            self._prepare_rebalance(now_ms)
        return JoinOutcome(member_id=member.member_id, response=None)

    def _replace_static_member(self, previous: _Member, client_id: str) -> _Member:
        member_id = self._new_member_id(client_id)
        assert member_id and member_id not in self._members, f"reused id {member_id!r}"
        if previous.awaiting_join:
            self._answer_join(previous.member_id, ErrorCode.FENCED_INSTANCE_ID)
        if previous.awaiting_sync:
            self._answer_sync(previous.member_id, ErrorCode.FENCED_INSTANCE_ID)
        member = dataclasses.replace(
            previous, member_id=member_id, awaiting_join=False, awaiting_sync=False
        )
        # keep the joining order (the leader is the first member)
        self._members = {
            (member_id if key == previous.member_id else key): (
                member if key == previous.member_id else value
            )
            for key, value in self._members.items()
        }
        assert member.instance_id is not None
        self._instances[member.instance_id] = member_id
        if self.leader_id == previous.member_id:
            self.leader_id = member_id
        if previous.member_id in self._pending_sync:
            self._pending_sync.discard(previous.member_id)
            self._pending_sync.add(member_id)
        return member

    def _add_and_join(
        self, member_id: str, request: ClassicJoinRequest, *, now_ms: int
    ) -> JoinOutcome:
        self._check_room()
        member = _Member(
            member_id=member_id,
            instance_id=request.instance_id or None,
            client_id=request.client_id,
            host=request.host,
            session_timeout_ms=request.session_timeout_ms,
            rebalance_timeout_ms=_rebalance_timeout(request),
            protocol_type=request.protocol_type,
            protocols=request.protocols,
        )
        if not self._members:
            self.protocol_type = request.protocol_type
        self._members[member_id] = member
        if member.instance_id is not None:
            self._instances[member.instance_id] = member_id
        if self.leader_id is None:
            self.leader_id = member_id
        self._update_member(member, request, now_ms=now_ms)
        member.awaiting_join = True
        if self.state == PREPARING:
            self._member_added_in_delay = True
            self._try_complete_join(now_ms)
        else:
            self._prepare_rebalance(now_ms)
        return JoinOutcome(member_id=member_id, response=None)

    def _join_member(
        self, member: _Member, request: ClassicJoinRequest, *, now_ms: int
    ) -> JoinOutcome:
        """A known member joins again: in a settled group it gets the current generation
        back unless it changes its protocols (or leads, in Stable); else a rebalance."""
        unchanged = member.protocols == request.protocols
        if self.state == COMPLETING and unchanged:
            return JoinOutcome(member_id=member.member_id, response=self._join_response(member))
        if self.state == STABLE and unchanged and member.member_id != self.leader_id:
            return JoinOutcome(member_id=member.member_id, response=self._join_response(member))
        self._update_member(member, request, now_ms=now_ms)
        member.awaiting_join = True
        if self.state == PREPARING:
            self._try_complete_join(now_ms)
        else:
            self._prepare_rebalance(now_ms)
        return JoinOutcome(member_id=member.member_id, response=None)

    def _update_member(self, member: _Member, request: ClassicJoinRequest, *, now_ms: int) -> None:
        member.protocols = request.protocols
        member.session_timeout_ms = request.session_timeout_ms
        member.rebalance_timeout_ms = _rebalance_timeout(request)
        if request.client_id:
            member.client_id = request.client_id
        if request.host:
            member.host = request.host
        member.session_deadline_ms = now_ms + member.session_timeout_ms

    # ----------------------------------------------------------------- rebalancing

    def _prepare_rebalance(self, now_ms: int) -> None:
        if self.state == COMPLETING:
            self._reset_assignments(ErrorCode.REBALANCE_IN_PROGRESS)
        delay = self._config.classic_initial_rebalance_delay_ms
        timeout = self._rebalance_timeout_ms()
        if self.state == EMPTY and delay > 0:
            self._initial_delay = True
            self._member_added_in_delay = False
            self._initial_delay_limit_ms = now_ms + max(timeout, delay)
            self._rebalance_deadline_ms = now_ms + delay
        else:
            self._initial_delay = False
            self._rebalance_deadline_ms = now_ms + timeout
        self.state = PREPARING
        self._sync_deadline_ms = None
        self._pending_sync.clear()
        self._try_complete_join(now_ms)

    def _reset_assignments(self, code: ErrorCode) -> None:
        for member in self._members.values():
            member.assignment = b""
            if member.awaiting_sync:
                self._answer_sync(member.member_id, code)
                member.awaiting_sync = False

    def _rebalance_timeout_ms(self) -> int:
        return max(
            (m.rebalance_timeout_ms for m in self._members.values()),
            default=self._config.rebalance_timeout_ms,
        )

    def _try_complete_join(self, now_ms: int) -> None:
        if self.state != PREPARING:
            return
        deadline = self._rebalance_deadline_ms
        assert deadline is not None
        if self._initial_delay:
            if now_ms < deadline:
                return
            limit = self._initial_delay_limit_ms
            if self._member_added_in_delay and now_ms < limit:
                self._member_added_in_delay = False  # more came: wait one more delay
                delay = self._config.classic_initial_rebalance_delay_ms
                self._rebalance_deadline_ms = min(now_ms + delay, limit)
                return
            self._complete_join(now_ms)
            return
        everyone = all(m.awaiting_join for m in self._members.values())
        if everyone and not self._pending_members:
            self._complete_join(now_ms)
        elif now_ms >= deadline:
            self._complete_join(now_ms)

    def _complete_join(self, now_ms: int) -> None:
        """Close the join barrier: drop dynamic members that did not rejoin, start the next
        generation and answer every waiting join (the leader with the members' metadata)."""
        for member in [
            m for m in self._members.values() if not m.awaiting_join and m.instance_id is None
        ]:
            self._remove_member(member)
        self._initial_delay = False
        self._rebalance_deadline_ms = None
        self.generation_id += 1
        if not self._members:
            self.state = EMPTY
            self.protocol_name = None
            self.leader_id = None
            return
        if self.leader_id not in self._members or not self._members[self.leader_id].awaiting_join:
            joined = [m.member_id for m in self._members.values() if m.awaiting_join]
            self.leader_id = joined[0] if joined else next(iter(self._members))
        self.protocol_name = self._select_protocol()
        self.state = COMPLETING
        self._pending_sync = set(self._members)
        self._sync_deadline_ms = now_ms + self._rebalance_timeout_ms()
        for member in self._members.values():
            if member.awaiting_join:
                member.awaiting_join = False
                member.session_deadline_ms = now_ms + member.session_timeout_ms
                self._outbox.append(
                    ClassicAnswer(member_id=member.member_id, join=self._join_response(member))
                )

    def _candidate_protocols(self) -> set[str]:
        """The protocols every member supports."""
        members = iter(self._members.values())
        first = next(members, None)
        if first is None:
            return set()
        names = {name for name, _ in first.protocols}
        for member in members:
            names &= {name for name, _ in member.protocols}
        return names

    def _select_protocol(self) -> str:
        """Kafka's choice: each member votes for the first protocol it lists that all members
        support; most votes wins (a tie goes to the leader's preference)."""
        candidates = self._candidate_protocols()
        assert candidates, "a member without a protocol in common was let in"
        votes: dict[str, int] = {}
        for member in self._members.values():
            choice = next(name for name, _ in member.protocols if name in candidates)
            votes[choice] = votes.get(choice, 0) + 1
        leader = self._members.get(self.leader_id or "") or next(iter(self._members.values()))
        order = [name for name, _ in leader.protocols if name in candidates]
        return max(order, key=lambda name: (votes.get(name, 0), -order.index(name)))

    def _join_response(
        self, member: _Member, *, skip_assignment: bool = False
    ) -> ClassicJoinResponse:
        is_leader = member.member_id == self.leader_id
        members: tuple[ClassicJoinedMember, ...] = ()
        if is_leader:
            members = tuple(
                ClassicJoinedMember(
                    member_id=m.member_id,
                    instance_id=m.instance_id,
                    metadata=m.metadata(self.protocol_name),
                )
                for m in self._members.values()
            )
        return ClassicJoinResponse(
            member_id=member.member_id,
            generation_id=self.generation_id,
            protocol_type=self.protocol_type,
            protocol_name=self.protocol_name,
            leader_id=self.leader_id or "",
            members=members,
            skip_assignment=skip_assignment,
        )

    # ----------------------------------------------------------------- SyncGroup

    def sync(self, request: ClassicSyncRequest, *, now_ms: int) -> SyncOutcome:
        """A SyncGroup: the member's assignment now (Stable), or later through the outbox
        once the leader has sent the assignments (the leader's own sync completes them all).
        Raises GroupError (changing nothing) when refused."""
        member = self._checked_generation(
            request.member_id, request.instance_id, request.generation_id
        )
        if request.protocol_type is not None and request.protocol_type != self.protocol_type:
            raise GroupError(
                ErrorCode.INCONSISTENT_GROUP_PROTOCOL,
                f"protocol type {request.protocol_type!r} is not the group's",
            )
        if request.protocol_name is not None and request.protocol_name != self.protocol_name:
            raise GroupError(
                ErrorCode.INCONSISTENT_GROUP_PROTOCOL,
                f"protocol {request.protocol_name!r} is not the group's ({self.protocol_name!r})",
            )
        if self.state == PREPARING:
            raise GroupError(ErrorCode.REBALANCE_IN_PROGRESS, "the group is rebalancing: rejoin")
        member.session_deadline_ms = now_ms + member.session_timeout_ms
        self._pending_sync.discard(member.member_id)
        if not self._pending_sync:
            self._sync_deadline_ms = None
        if self.state == STABLE:
            return SyncOutcome(member_id=member.member_id, response=self._sync_response(member))
        assert self.state == COMPLETING
        member.awaiting_sync = True  # sent again: one answer (the shell answers the earlier)
        if member.member_id == self.leader_id:
            given = dict(request.assignments)
            for other in self._members.values():
                other.assignment = given.get(other.member_id, b"")
            self.state = STABLE
            for other in self._members.values():
                if other.awaiting_sync:
                    other.awaiting_sync = False
                    self._outbox.append(
                        ClassicAnswer(member_id=other.member_id, sync=self._sync_response(other))
                    )
        return SyncOutcome(member_id=member.member_id, response=None)

    def _sync_response(self, member: _Member) -> ClassicSyncResponse:
        return ClassicSyncResponse(
            protocol_type=self.protocol_type,
            protocol_name=self.protocol_name,
            assignment=member.assignment,
        )

    # ----------------------------------------------------------------- Heartbeat, commits

    def heartbeat(
        self, member_id: str, generation_id: int, instance_id: str | None, *, now_ms: int
    ) -> ErrorCode:
        """A Heartbeat: NONE, or REBALANCE_IN_PROGRESS (the member must rejoin); its session
        is extended either way. Raises GroupError UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID or
        ILLEGAL_GENERATION."""
        member = self._checked_generation(member_id, instance_id, generation_id)
        member.session_deadline_ms = now_ms + member.session_timeout_ms
        if self.state == PREPARING:
            return ErrorCode.REBALANCE_IN_PROGRESS
        return ErrorCode.NONE

    def check_commit(
        self, member_id: str, generation_id: int, instance_id: str | None, *, now_ms: int
    ) -> None:
        """Return if an OffsetCommit may proceed (Kafka's rules): a member of the current
        generation, or generation < 0 without a member id while the group has no members
        (standalone consumers, admin tools). A member's commit extends its session.
        Raises GroupError UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID, ILLEGAL_GENERATION,
        REBALANCE_IN_PROGRESS or COORDINATOR_NOT_AVAILABLE."""
        if self.state == DEAD:
            raise GroupError(ErrorCode.COORDINATOR_NOT_AVAILABLE, "the group is unloaded")
        if generation_id < 0 and not self._members:
            return
        if generation_id >= 0 or member_id or instance_id:
            member = self._checked_generation(member_id, instance_id, generation_id)
            member.session_deadline_ms = now_ms + member.session_timeout_ms
        else:
            raise GroupError(
                ErrorCode.UNKNOWN_MEMBER_ID,
                f"group {self.group_id!r} has members: commits must come from a member",
            )
        if self.state == COMPLETING:
            raise GroupError(ErrorCode.REBALANCE_IN_PROGRESS, "the group is completing a rebalance")

    def _validated_member(self, member_id: str, instance_id: str | None) -> _Member:
        if self.state == DEAD:
            raise GroupError(ErrorCode.COORDINATOR_NOT_AVAILABLE, "the group is unloaded")
        if instance_id:
            holder = self._instances.get(instance_id)
            if holder is not None and holder != member_id:
                raise GroupError(
                    ErrorCode.FENCED_INSTANCE_ID,
                    f"instance id {instance_id!r} is now held by member {holder!r}",
                )
        member = self._members.get(member_id)
        if member is None:
            raise GroupError(
                ErrorCode.UNKNOWN_MEMBER_ID,
                f"member {member_id!r} is not in group {self.group_id!r}",
            )
        if instance_id and member.instance_id != instance_id:
            raise GroupError(
                ErrorCode.FENCED_INSTANCE_ID,
                f"member {member_id!r} is not instance {instance_id!r}",
            )
        return member

    def _checked_generation(
        self, member_id: str, instance_id: str | None, generation_id: int
    ) -> _Member:
        member = self._validated_member(member_id, instance_id)
        if generation_id != self.generation_id:
            raise GroupError(
                ErrorCode.ILLEGAL_GENERATION,
                f"generation {generation_id} is not group {self.group_id!r}'s "
                f"({self.generation_id})",
            )
        return member

    # ----------------------------------------------------------------- leaving, expiry

    def leave(self, members: list[tuple[str, str | None]], *, now_ms: int) -> list[ErrorCode]:
        """LeaveGroup for (member id, instance id) pairs (a static member may give only its
        instance id); returns each one's error code. The others rebalance without them."""
        results = []
        removed = False
        for member_id, instance_id in members:
            if not member_id and instance_id:
                member_id = self._instances.get(instance_id, "")
            if member_id in self._pending_members and member_id not in self._members:
                del self._pending_members[member_id]
                results.append(ErrorCode.NONE)
                removed = True
                continue
            try:
                member = self._validated_member(member_id, instance_id)
            except GroupError as error:
                results.append(error.code)
                continue
            self._remove_member(member)
            results.append(ErrorCode.NONE)
            removed = True
        if removed:
            self._after_removal(now_ms)
        return results

    def tick(self, *, now_ms: int) -> list[str]:
        """Apply every timeout due at `now_ms`; returns the ids of members removed because
        their session (or their KIP-394 id) expired, or they did not sync in time."""
        expired = [m for m, deadline in self._pending_members.items() if now_ms >= deadline]
        for member_id in expired:
            del self._pending_members[member_id]
        sync_due = self._sync_deadline_ms is not None and now_ms >= self._sync_deadline_ms
        if sync_due:
            self._sync_deadline_ms = None
        timed_out = [
            m
            for m in self._members.values()
            if (now_ms >= m.session_deadline_ms and not (m.awaiting_join or m.awaiting_sync))
            or (sync_due and m.member_id in self._pending_sync)
        ]
        for member in timed_out:
            self._remove_member(member)
        if timed_out or expired:
            self._after_removal(now_ms)
        self._try_complete_join(now_ms)
        return expired + [m.member_id for m in timed_out]

    def unload(self) -> None:
        """This broker no longer coordinates the group: every waiting request is answered
        NOT_COORDINATOR (the client finds the new coordinator) and the group is Dead."""
        for member in self._members.values():
            if member.awaiting_join:
                self._answer_join(member.member_id, ErrorCode.NOT_COORDINATOR)
            if member.awaiting_sync:
                self._answer_sync(member.member_id, ErrorCode.NOT_COORDINATOR)
            member.awaiting_join = member.awaiting_sync = False
        self.state = DEAD

    def _remove_member(self, member: _Member) -> None:
        if member.awaiting_join:
            self._answer_join(member.member_id, ErrorCode.UNKNOWN_MEMBER_ID)
        if member.awaiting_sync:
            self._answer_sync(member.member_id, ErrorCode.UNKNOWN_MEMBER_ID)
        del self._members[member.member_id]
        if member.instance_id is not None:
            del self._instances[member.instance_id]
        self._pending_sync.discard(member.member_id)
        if self.leader_id == member.member_id:
            self.leader_id = next(iter(self._members), None)

    def _after_removal(self, now_ms: int) -> None:
        if self.state in (STABLE, COMPLETING):
            self._prepare_rebalance(now_ms)
        else:
            self._try_complete_join(now_ms)

    def _answer_join(self, member_id: str, code: ErrorCode) -> None:
        response = ClassicJoinResponse(error_code=code, member_id=member_id)
        self._outbox.append(ClassicAnswer(member_id=member_id, join=response))

    def _answer_sync(self, member_id: str, code: ErrorCode) -> None:
        self._outbox.append(
            ClassicAnswer(member_id=member_id, sync=ClassicSyncResponse(error_code=code))
        )


def _rebalance_timeout(request: ClassicJoinRequest) -> int:
    if request.rebalance_timeout_ms > 0:
        return request.rebalance_timeout_ms
    return request.session_timeout_ms


# -- the consumer protocol embedded in "consumer" groups' metadata and assignments --------
#
# Kafka's ConsumerProtocolSubscription: version i16, topics [string], user_data bytes, and
# from v1 owned partitions [topic, [i32]]; ConsumerProtocolAssignment: version i16, partitions
# [topic, [i32]], user_data bytes. The broker only reads them to describe members (DWAL's own
# describe shows topics and partitions); anything it cannot read is shown as unknown.

_COUNT_MAX = 1 << 20  # more entries than a message could hold: malformed


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def take(self, size: int) -> bytes:
        if size < 0 or self._at + size > len(self._data):
            raise ValueError("truncated")
        piece = self._data[self._at : self._at + size]
        self._at += size
        return piece

    def int16(self) -> int:
        return int(struct.unpack(">h", self.take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack(">i", self.take(4))[0])

    def count(self) -> int:
        count = self.int32()
        if count > _COUNT_MAX:
            raise ValueError("count too large")
        return max(count, 0)

    def string(self) -> str:
        return self.take(self.int16()).decode()

    def topic_partitions(self) -> list[TopicPartition]:
        out: list[TopicPartition] = []
        for _ in range(self.count()):
            topic = self.string()
            out.extend((topic, self.int32()) for _ in range(self.count()))
        return out


def decode_consumer_subscription(metadata: bytes) -> tuple[str, ...] | None:
    """The topics of a "consumer" member's subscription metadata, or None if unreadable."""
    try:
        reader = _Reader(metadata)
        reader.int16()
        return tuple(reader.string() for _ in range(reader.count()))
    except (ValueError, UnicodeDecodeError, struct.error):
        return None


def decode_consumer_assignment(assignment: bytes) -> frozenset[TopicPartition] | None:
    """The partitions of a "consumer" member's assignment, or None if unreadable (empty
    bytes, which a member has before the leader's SyncGroup, are no partitions)."""
    if not assignment:
        return frozenset()
    try:
        reader = _Reader(assignment)
        reader.int16()
        return frozenset(reader.topic_partitions())
    except (ValueError, UnicodeDecodeError, struct.error):
        return None


def _string(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">h", len(data)) + data


def _topic_partitions(partitions: frozenset[TopicPartition]) -> bytes:
    by_topic: dict[str, list[int]] = {}
    for topic, partition in sorted(partitions):
        by_topic.setdefault(topic, []).append(partition)
    out = [struct.pack(">i", len(by_topic))]
    for topic, numbers in by_topic.items():
        out.append(_string(topic) + struct.pack(f">i{len(numbers)}i", len(numbers), *numbers))
    return b"".join(out)


def encode_consumer_subscription(topics: tuple[str, ...]) -> bytes:
    """Version 0 subscription metadata: what Kafka's admin clients read from a member."""
    body = b"".join(_string(topic) for topic in topics)
    return struct.pack(">hi", 0, len(topics)) + body + struct.pack(">i", -1)


def encode_consumer_assignment(partitions: frozenset[TopicPartition]) -> bytes:
    """Version 0 assignment, without user data."""
    return struct.pack(">h", 0) + _topic_partitions(partitions) + struct.pack(">i", -1)
