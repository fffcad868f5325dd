"""Wire error codes never change their numbers; retriability is part of the contract."""

from __future__ import annotations

import pytest

import protocol
from protocol.errors import error_code_from_wire

# Released numbers. Adding a code is fine; changing or removing one breaks every client.
WIRE_NUMBERS = {
    "UNKNOWN_SERVER_ERROR": -1,
    "NONE": 0,
    "OFFSET_OUT_OF_RANGE": 1,
    "CORRUPT_MESSAGE": 2,
    "UNKNOWN_TOPIC_OR_PARTITION": 3,
    "INVALID_FETCH_SIZE": 4,
    "LEADER_NOT_AVAILABLE": 5,
    "NOT_LEADER_OR_FOLLOWER": 6,
    "REQUEST_TIMED_OUT": 7,
    "MESSAGE_TOO_LARGE": 10,
    "NETWORK_EXCEPTION": 13,
    "COORDINATOR_LOAD_IN_PROGRESS": 14,
    "COORDINATOR_NOT_AVAILABLE": 15,
    "NOT_COORDINATOR": 16,
    "INVALID_TOPIC": 17,
    "RECORD_LIST_TOO_LARGE": 18,
    "NOT_ENOUGH_REPLICAS": 19,
    "NOT_ENOUGH_REPLICAS_AFTER_APPEND": 20,
    "INVALID_REQUIRED_ACKS": 21,
    "UNKNOWN_MEMBER_ID": 25,
    "INVALID_TIMESTAMP": 32,
    "UNSUPPORTED_VERSION": 35,
    "TOPIC_ALREADY_EXISTS": 36,
    "INVALID_PARTITIONS": 37,
    "INVALID_REPLICATION_FACTOR": 38,
    "INVALID_CONFIG": 40,
    "INVALID_REQUEST": 42,
    "INVALID_REPLICA_ASSIGNMENT": 39,
    "OUT_OF_ORDER_SEQUENCE_NUMBER": 45,
    "DUPLICATE_SEQUENCE_NUMBER": 46,
    "INVALID_PRODUCER_EPOCH": 47,
    "UNKNOWN_PRODUCER_ID": 59,
    "NO_REASSIGNMENT_IN_PROGRESS": 85,
    "POLICY_VIOLATION": 44,
    "BROKER_NOT_AVAILABLE": 8,
    "NOT_CONTROLLER": 41,
    "FENCED_LEADER_EPOCH": 74,
    "UNKNOWN_LEADER_EPOCH": 75,
    "STALE_BROKER_EPOCH": 77,
    "PREFERRED_LEADER_NOT_AVAILABLE": 80,
    "ELECTION_NOT_NEEDED": 84,
    "INVALID_UPDATE_VERSION": 95,
    "UNKNOWN_TOPIC_ID": 100,
    "DUPLICATE_BROKER_REGISTRATION": 101,
    "INCONSISTENT_CLUSTER_ID": 104,
    "INELIGIBLE_REPLICA": 107,
    "KAFKA_STORAGE_ERROR": 56,
    "UNSUPPORTED_COMPRESSION_TYPE": 76,
    "INVALID_RECORD": 87,
    # Kafka's classic consumer groups (the Kafka listener's JoinGroup/SyncGroup)
    "ILLEGAL_GENERATION": 22,
    "INCONSISTENT_GROUP_PROTOCOL": 23,
    "REBALANCE_IN_PROGRESS": 27,
    "MEMBER_ID_REQUIRED": 79,
    "FENCED_INSTANCE_ID": 82,
    "UNKNOWN_API_KEY": 1001,
}

RETRIABLE = {
    "CORRUPT_MESSAGE",
    "LEADER_NOT_AVAILABLE",
    "NOT_LEADER_OR_FOLLOWER",
    "REQUEST_TIMED_OUT",
    "NETWORK_EXCEPTION",
    "COORDINATOR_LOAD_IN_PROGRESS",
    "COORDINATOR_NOT_AVAILABLE",
    "NOT_COORDINATOR",
    "NOT_ENOUGH_REPLICAS",
    "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
    "KAFKA_STORAGE_ERROR",
    "NOT_CONTROLLER",
    "FENCED_LEADER_EPOCH",
    "UNKNOWN_LEADER_EPOCH",
    "PREFERRED_LEADER_NOT_AVAILABLE",
    "UNKNOWN_TOPIC_ID",
}


def test_released_numbers_are_unchanged():
    for name, number in WIRE_NUMBERS.items():
        assert protocol.ErrorCode[name] == number, name


def test_numbers_are_unique():
    # IntEnum silently makes a duplicate number an alias; an alias would decode as another name.
    assert len(protocol.ErrorCode.__members__) == len(protocol.ErrorCode)


def test_retriable_flags():
    for code in protocol.ErrorCode:
        assert code.retriable == (code.name in RETRIABLE), code.name


def test_error_code_from_wire():
    assert error_code_from_wire(3) is protocol.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    assert error_code_from_wire(-999) is protocol.ErrorCode.UNKNOWN_SERVER_ERROR
    for bad in (True, "3", 3.0, None):
        with pytest.raises(protocol.ProtocolError):
            error_code_from_wire(bad)


def test_dwal_error_carries_code_and_message():
    error = protocol.DwalError(6)
    assert error.code is protocol.ErrorCode.NOT_LEADER_OR_FOLLOWER
    assert error.retriable
    assert error.message == "not leader or follower"
    assert str(error) == "NOT_LEADER_OR_FOLLOWER: not leader or follower"
    assert not protocol.DwalError(protocol.ErrorCode.INVALID_TOPIC, "bad name").retriable


def test_exception_types_are_distinct():
    assert not issubclass(protocol.ProtocolError, protocol.ProtocolUsageError)
    assert not issubclass(protocol.ProtocolUsageError, protocol.ProtocolError)
    assert not issubclass(protocol.DwalError, (protocol.ProtocolError, protocol.ProtocolUsageError))
