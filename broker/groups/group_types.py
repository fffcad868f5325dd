"""Value types of the consumer group core: configuration, requests, responses, descriptions.

All are frozen, slotted, keyword-only records so a caller can neither change a request after
handing it over nor mistake one field for another.
"""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        for name in ("session_timeout_ms", "heartbeat_interval_ms", "rebalance_timeout_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be less than session_timeout_ms")
        if self.members_max <= 0:
            raise ValueError(f"members_max must be positive, got {self.members_max}")


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
