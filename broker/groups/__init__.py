"""Consumer groups: the sans-I/O coordinator state machine (KIP-848 style) and its assignor."""

from .assignor import assign
from .consumer_group import ConsumerGroup
from .group_types import (
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

__all__ = [
    "ConsumerGroup",
    "GroupConfig",
    "GroupDescription",
    "GroupError",
    "HeartbeatRequest",
    "HeartbeatResponse",
    "JOIN_EPOCH",
    "LEAVE_EPOCH",
    "MemberDescription",
    "STATIC_LEAVE_EPOCH",
    "TopicPartition",
    "assign",
]
