"""Value types of the consumer group core: configuration, requests, responses, descriptions.

All are frozen, slotted, keyword-only records so a caller can neither change a request after
handing it over nor mistake one field for another.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocol.errors import DwalError, ErrorCode

TopicPartition = tuple[str, int]

# Member epochs with a meaning of their own in a heartbeat request (as in KIP-848).
JOIN_EPOCH = 0
LEAVE_EPOCH = -1
STATIC_LEAVE_EPOCH = -2  # a static member leaves for a while and keeps its partitions reserved


class GroupError(DwalError):
    """A group request was refused; `code` is the wire error code to answer with."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupConfig:
    session_timeout_ms: int = 30_000
    heartbeat_interval_ms: int = 3_000
    rebalance_timeout_ms: int = 60_000  # default when the member gives none (-1)
    members_max: int = 1000
    # Classic (Kafka JoinGroup/SyncGroup) groups. A new group's first rebalance waits this
    # long for more members, extended while they keep coming, up to the rebalance timeout
    # (Kafka's group.initial.rebalance.delay.ms, 3000 there; small here so tests run fast).
    classic_initial_rebalance_delay_ms: int = 100
    # The session timeouts a classic member may ask for (group.min/max.session.timeout.ms);
    # outside them its JoinGroup is refused with INVALID_SESSION_TIMEOUT.
    classic_session_timeout_ms_min: int = 6_000
    classic_session_timeout_ms_max: int = 1_800_000

    def __post_init__(self) -> None:
        for name in ("session_timeout_ms", "heartbeat_interval_ms", "rebalance_timeout_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be less than session_timeout_ms")
        if self.members_max <= 0:
            raise ValueError(f"members_max must be positive, got {self.members_max}")
        if self.classic_initial_rebalance_delay_ms < 0:
            raise ValueError("classic_initial_rebalance_delay_ms must not be negative")
        if not 0 < self.classic_session_timeout_ms_min <= self.classic_session_timeout_ms_max:
            raise ValueError(
                "classic session timeouts need 0 < classic_session_timeout_ms_min <= "
                "classic_session_timeout_ms_max"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class HeartbeatRequest:
    member_id: str | None  # None or "" to join
    member_epoch: int  # JOIN_EPOCH, LEAVE_EPOCH, STATIC_LEAVE_EPOCH, else the member's epoch
    instance_id: str | None = None  # static membership
    client_id: str = ""
    host: str = ""
    rebalance_timeout_ms: int = -1  # -1: the configured default (on join) or unchanged
    subscribed_topic_names: tuple[str, ...] | None = None  # None: unchanged
    subscribed_topic_regex: str | None = None  # None: unchanged; "": no regex
    owned_partitions: frozenset[TopicPartition] | None = None  # None: unchanged


@dataclass(frozen=True, kw_only=True, slots=True)
class HeartbeatResponse:
    member_id: str
    member_epoch: int
    heartbeat_interval_ms: int
    assignment: frozenset[TopicPartition]  # the full set the member may own now


@dataclass(frozen=True, kw_only=True, slots=True)
class MemberDescription:
    member_id: str
    instance_id: str | None
    client_id: str
    host: str
    member_epoch: int  # STATIC_LEAVE_EPOCH while a static member is away
    session_deadline_ms: int  # removed after this unless it heartbeats (or, if away, rejoins)
    subscribed_topic_names: tuple[str, ...]
    subscribed_topic_regex: str | None
    assignment: frozenset[TopicPartition]  # what the member may own now
    pending_revocation: frozenset[TopicPartition]  # revoked, not yet released by the member
    target_assignment: frozenset[TopicPartition]


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupDescription:
    group_id: str
    state: str  # "empty", "assigning", "reconciling" or "stable"
    group_epoch: int
    assignment_epoch: int
    members: tuple[MemberDescription, ...]  # sorted by member id


# -- classic groups (Kafka's JoinGroup / SyncGroup protocol) ------------------------------


class ClassicGroupState(enum.Enum):
    """A classic group's state, named as Kafka names it on the wire."""

    EMPTY = "Empty"  # no members (it may still have committed offsets)
    PREPARING_REBALANCE = "PreparingRebalance"  # waiting for every member to rejoin
    COMPLETING_REBALANCE = "CompletingRebalance"  # joined; waiting for the leader's SyncGroup
    STABLE = "Stable"  # every member has its assignment
    DEAD = "Dead"  # unloaded or deleted: no request is answered from it any more


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassicJoinRequest:
    member_id: str  # "" for a member joining for the first time
    instance_id: str | None = None  # static membership (group.instance.id)
    client_id: str = ""
    host: str = ""
    session_timeout_ms: int
    rebalance_timeout_ms: int = -1  # -1: the session timeout (JoinGroup v0 has none)
    protocol_type: str  # "consumer" for consumers; the group keeps one
    protocols: tuple[tuple[str, bytes], ...]  # (name, metadata), the member's preference first
    member_id_required: bool = False  # v4+ (KIP-394): a new member first gets an id
    supports_skip_assignment: bool = False  # v9+: a static leader may rejoin without a rebalance
    reason: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassicJoinedMember:
    member_id: str
    instance_id: str | None
    metadata: bytes  # the member's metadata for the protocol the group selected


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassicJoinResponse:
    error_code: ErrorCode = ErrorCode.NONE
    member_id: str = ""
    generation_id: int = -1
    protocol_type: str | None = None
    protocol_name: str | None = None
    leader_id: str = ""
    members: tuple[ClassicJoinedMember, ...] = ()  # for the leader only
    skip_assignment: bool = False  # the leader keeps the current assignment (v9+)


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassicSyncRequest:
    member_id: str
    generation_id: int
    instance_id: str | None = None
    protocol_type: str | None = None  # v5+: checked against the group's when given
    protocol_name: str | None = None
    assignments: tuple[tuple[str, bytes], ...] = ()  # the leader's: (member id, assignment)


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassicSyncResponse:
    error_code: ErrorCode = ErrorCode.NONE
    protocol_type: str | None = None
    protocol_name: str | None = None
    assignment: bytes = b""


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassicMemberDescription:
    member_id: str
    instance_id: str | None
    client_id: str
    host: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    session_deadline_ms: int
    protocols: tuple[tuple[str, bytes], ...]
    metadata: bytes  # for the selected protocol (b"" while none is selected)
    assignment: bytes  # b"" until the leader's SyncGroup
    awaiting_join: bool
    awaiting_sync: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassicGroupDescription:
    group_id: str
    state: ClassicGroupState
    generation_id: int
    protocol_type: str | None
    protocol_name: str | None
    leader_id: str | None
    members: tuple[ClassicMemberDescription, ...]  # in joining order
