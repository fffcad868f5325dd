"""Wire error codes and the protocol's exception types.

Error code numbers never change once released: clients of any version must read them the
same way. Where Kafka has the same condition we reuse Kafka's number, so operators who know
Kafka's codes can read ours.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    UNKNOWN_SERVER_ERROR = -1
    NONE = 0
    OFFSET_OUT_OF_RANGE = 1
    CORRUPT_MESSAGE = 2
    UNKNOWN_TOPIC_OR_PARTITION = 3
    INVALID_FETCH_SIZE = 4
    LEADER_NOT_AVAILABLE = 5
    NOT_LEADER_OR_FOLLOWER = 6
    REQUEST_TIMED_OUT = 7
    MESSAGE_TOO_LARGE = 10
    NETWORK_EXCEPTION = 13
    COORDINATOR_LOAD_IN_PROGRESS = 14
    COORDINATOR_NOT_AVAILABLE = 15
    NOT_COORDINATOR = 16
    INVALID_TOPIC = 17
    RECORD_LIST_TOO_LARGE = 18
    NOT_ENOUGH_REPLICAS = 19
    NOT_ENOUGH_REPLICAS_AFTER_APPEND = 20
    INVALID_REQUIRED_ACKS = 21
    ILLEGAL_GENERATION = 22  # a classic group member's generation is not the group's
    INCONSISTENT_GROUP_PROTOCOL = 23  # no protocol in common, or the group uses another kind
    INVALID_GROUP_ID = 24
    UNKNOWN_MEMBER_ID = 25
    INVALID_SESSION_TIMEOUT = 26
    REBALANCE_IN_PROGRESS = 27  # a classic group is rebalancing: rejoin
    INVALID_TIMESTAMP = 32
    UNSUPPORTED_VERSION = 35
    TOPIC_ALREADY_EXISTS = 36
    INVALID_PARTITIONS = 37
    INVALID_REPLICATION_FACTOR = 38
    INVALID_CONFIG = 40
    INVALID_REQUEST = 42
    OUT_OF_ORDER_SEQUENCE_NUMBER = 45  # an idempotent batch's sequence skips one ahead
    DUPLICATE_SEQUENCE_NUMBER = 46
    INVALID_PRODUCER_EPOCH = 47  # an idempotent batch from an older epoch of its producer id
    UNKNOWN_PRODUCER_ID = 59
    KAFKA_STORAGE_ERROR = 56
    UNSUPPORTED_COMPRESSION_TYPE = 76
    INVALID_RECORD = 87
    NON_EMPTY_GROUP = 68
    GROUP_ID_NOT_FOUND = 69
    MEMBER_ID_REQUIRED = 79  # KIP-394: join again with the member id in this answer
    GROUP_MAX_SIZE_REACHED = 81
    FENCED_INSTANCE_ID = 82  # another process took over this static member's instance id
    FENCED_MEMBER_EPOCH = 110
    UNRELEASED_INSTANCE_ID = 111
    UNSUPPORTED_ASSIGNOR = 112
    STALE_MEMBER_EPOCH = 113
    INVALID_REGULAR_EXPRESSION = 130
    UNKNOWN_API_KEY = 1001
    PARTITION_NOT_OWNED = 1002  # a group member committed a partition it is not assigned
    POLICY_VIOLATION = 44
    # the cluster's control plane and replication (Kafka's numbers)
    BROKER_NOT_AVAILABLE = 8
    NOT_CONTROLLER = 41
    FENCED_LEADER_EPOCH = 74
    UNKNOWN_LEADER_EPOCH = 75
    STALE_BROKER_EPOCH = 77
    INVALID_REPLICA_ASSIGNMENT = 39  # a reassignment's target replicas are not acceptable
    PREFERRED_LEADER_NOT_AVAILABLE = 80
    ELECTION_NOT_NEEDED = 84
    NO_REASSIGNMENT_IN_PROGRESS = 85  # a cancel of a partition that is not being moved
    INVALID_UPDATE_VERSION = 95
    UNKNOWN_TOPIC_ID = 100
    DUPLICATE_BROKER_REGISTRATION = 101
    INCONSISTENT_CLUSTER_ID = 104
    INELIGIBLE_REPLICA = 107

    @property
    def retriable(self) -> bool:
        """True when the same request may succeed if sent again later."""
        return self in _RETRIABLE


_RETRIABLE = frozenset(
    {
        ErrorCode.CORRUPT_MESSAGE,  # the batch was damaged in transit: send it again
        ErrorCode.LEADER_NOT_AVAILABLE,
        ErrorCode.NOT_LEADER_OR_FOLLOWER,
        ErrorCode.REQUEST_TIMED_OUT,
        ErrorCode.NETWORK_EXCEPTION,
        ErrorCode.COORDINATOR_LOAD_IN_PROGRESS,
        ErrorCode.COORDINATOR_NOT_AVAILABLE,
        ErrorCode.NOT_COORDINATOR,
        ErrorCode.NOT_ENOUGH_REPLICAS,
        ErrorCode.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        ErrorCode.KAFKA_STORAGE_ERROR,
        ErrorCode.NOT_CONTROLLER,  # look the controller up again
        ErrorCode.FENCED_LEADER_EPOCH,  # the sender's metadata is behind: refresh it
        ErrorCode.UNKNOWN_LEADER_EPOCH,  # the receiver's metadata is behind: wait
        ErrorCode.PREFERRED_LEADER_NOT_AVAILABLE,
        ErrorCode.UNKNOWN_TOPIC_ID,
    }
)


def error_code_from_wire(value: object) -> ErrorCode:
    """Map a wire integer to an ErrorCode; unknown numbers become UNKNOWN_SERVER_ERROR."""
    if type(value) is not int:
        raise ProtocolError(f"error code must be an integer, got {type(value).__name__}")
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.UNKNOWN_SERVER_ERROR


class ProtocolError(Exception):
    """The peer sent bytes that break the protocol (bad frame, bad batch, wrong types).

    Every decoder in `protocol` raises only this type on bad input.
    """


class ProtocolUsageError(Exception):
    """Local misuse of the protocol API (for example encoding a value out of range)."""


class DwalError(Exception):
    """An error answered by a broker: carries the wire error code and its message."""

    def __init__(self, code: ErrorCode, message: str | None = None) -> None:
        self.code = ErrorCode(code)
        self.message = message or self.code.name.lower().replace("_", " ")
        super().__init__(f"{self.code.name}: {self.message}")

    @property
    def retriable(self) -> bool:
        return self.code.retriable
