"""The one write path: every append (Produce, the group coordinator, the gateways) and every
read by a consumer goes through `ReplicaManager`, which checks in the published metadata
image that this broker leads the partition and stamps the leader epoch into each batch.

Leadership answers, as Kafka gives them: an unknown topic or partition number ->
UNKNOWN_TOPIC_OR_PARTITION; a partition with no leader (its replicas are fenced) ->
LEADER_NOT_AVAILABLE; another broker leads -> NOT_LEADER_OR_FOLLOWER. All but the first
are retriable: the client refreshes its metadata and goes to the leader.
"""

from __future__ import annotations

from collections.abc import Callable

from broker.controller.metadata_image import MetadataImage
from broker.controller.metadata_records import NO_LEADER
from broker.storage import AppendInfo, PartitionLog
from broker.topic_registry import TopicRegistry
from protocol import DwalError, ErrorCode


class ReplicaManager:
    def __init__(
        self, node_id: int, registry: TopicRegistry, image: Callable[[], MetadataImage]
    ) -> None:
        """`image` returns the published image (whose logs the registry has opened)."""
        self.node_id = node_id
        self.registry = registry
        self.image = image

    def leader_epoch(self, topic: str, partition: int) -> int:
        """The leader epoch this broker leads the partition in; raises DwalError
        UNKNOWN_TOPIC_OR_PARTITION, LEADER_NOT_AVAILABLE or NOT_LEADER_OR_FOLLOWER."""
        info = self.image().topics.get(topic)
        if info is None:
            raise DwalError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"unknown topic {topic!r}")
        if not 0 <= partition < len(info.partitions):
            raise DwalError(
                ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                f"topic {topic!r} has no partition {partition}",
            )
        state = info.partitions[partition]
        if state.leader == NO_LEADER:
            raise DwalError(
                ErrorCode.LEADER_NOT_AVAILABLE,
                f"{topic}-{partition} has no leader (its replicas {list(state.replicas)} are "
                "unavailable)",
            )
        if state.leader != self.node_id:
            raise DwalError(
                ErrorCode.NOT_LEADER_OR_FOLLOWER,
                f"broker {self.node_id} does not lead {topic}-{partition}; broker "
                f"{state.leader} does (leader epoch {state.leader_epoch})",
            )
        return state.leader_epoch

    def leader_log(self, topic: str, partition: int) -> tuple[PartitionLog, int]:
        """The log of a partition this broker leads, and the leader epoch; raises DwalError
        as `leader_epoch` does, or KAFKA_STORAGE_ERROR when its log could not be opened."""
        epoch = self.leader_epoch(topic, partition)
        log = self.registry.logs.get((topic, partition))
        if log is None:
            raise DwalError(
                ErrorCode.KAFKA_STORAGE_ERROR,
                f"the log of {topic}-{partition} is not available on broker {self.node_id}",
            )
        return log, epoch

    def append(
        self, topic: str, partition: int, batches: bytearray | memoryview, *, now_ms: int
    ) -> tuple[PartitionLog, AppendInfo]:
        """Append record batches to a partition this broker leads, stamped with its leader
        epoch. Raises DwalError (leadership) and what PartitionLog.append raises."""
        log, epoch = self.leader_log(topic, partition)
        return log, log.append(batches, now_ms=now_ms, leader_epoch=epoch)
