"""Partition storage: segmented logs with sparse indexes, group commit, crash recovery,
retention and compaction, idempotent producers' state; and an in-memory log with a model of
the disk for simulations."""

from .errors import (
    CorruptRecordError,
    InvalidProducerEpochError,
    InvalidRecordError,
    OffsetOutOfRangeError,
    OutOfOrderSequenceError,
    RecordTooLargeError,
    StorageError,
)
from .fetch_slice import FetchSlice
from .fsync_runner import FsyncRunner
from .leader_epoch_cache import (
    UNDEFINED_EPOCH,
    UNDEFINED_OFFSET,
    EpochEntry,
    LeaderEpochCache,
    LeaderEpochError,
)
from .log_cleaner import CompactionResult
from .log_config import TOPIC_CONFIG_KEYS, LogConfig
from .memory_log import DurableImage, MemoryPartitionLog
from .partition_log import AppendInfo, LogStatistics, PartitionLog
from .producer_state import BatchMetadata, ProducerState, ProducerStateTable
from .replica_log import ReplicaLog

__all__ = [
    "AppendInfo",
    "BatchMetadata",
    "CompactionResult",
    "CorruptRecordError",
    "DurableImage",
    "EpochEntry",
    "FetchSlice",
    "FsyncRunner",
    "InvalidProducerEpochError",
    "InvalidRecordError",
    "LeaderEpochCache",
    "LeaderEpochError",
    "LogConfig",
    "LogStatistics",
    "MemoryPartitionLog",
    "OffsetOutOfRangeError",
    "OutOfOrderSequenceError",
    "PartitionLog",
    "ProducerState",
    "ProducerStateTable",
    "RecordTooLargeError",
    "ReplicaLog",
    "StorageError",
    "TOPIC_CONFIG_KEYS",
    "UNDEFINED_EPOCH",
    "UNDEFINED_OFFSET",
]
