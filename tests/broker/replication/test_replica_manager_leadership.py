"""ReplicaManager: leadership answers from the published image, and the leader epoch
stamped into every batch of an append (read back from the stored batch headers)."""

from __future__ import annotations

import pytest

from replication_images import fenced, with_brokers, with_topic

from broker.controller import (
    NO_LEADER,
    MetadataImage,
)
from broker.limits import Limits
from broker.replication.replica_manager import ReplicaManager
from broker.storage import LogConfig
from broker.topic_registry import TopicRegistry
from protocol import DwalError, ErrorCode
from protocol.record_batch import build_batch, scan_batches


async def manager_for(tmp_path, node_id: int, image: MetadataImage) -> ReplicaManager:
    registry = TopicRegistry.open(tmp_path / f"node-{node_id}", LogConfig(fsync="never"), Limits())
    await registry.apply_image(image, node_id)
    return ReplicaManager(node_id, registry, lambda: image)


def code_of(manager: ReplicaManager, topic: str, partition: int) -> ErrorCode:
    with pytest.raises(DwalError) as caught:
        manager.leader_log(topic, partition)
    return caught.value.code


async def test_unknown_topic_or_partition(tmp_path):
    image = with_topic(with_brokers(1), "t", 2, 1)
    manager = await manager_for(tmp_path, 1, image)
    assert code_of(manager, "missing", 0) == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    assert code_of(manager, "t", 2) == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    assert code_of(manager, "t", -1) == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    assert manager.leader_epoch("t", 1) == 0


async def test_a_partition_without_leader_is_not_available(tmp_path):
    image = fenced(with_topic(with_brokers(1), "t", 1, 1), 1)
    assert image.topics["t"].partitions[0].leader == NO_LEADER
    manager = await manager_for(tmp_path, 1, image)
    assert code_of(manager, "t", 0) == ErrorCode.LEADER_NOT_AVAILABLE
    assert ErrorCode.LEADER_NOT_AVAILABLE.retriable


async def test_a_follower_names_the_leader(tmp_path):
    image = with_topic(with_brokers(1, 2), "t", 1, 2)
    state = image.topics["t"].partitions[0]
    follower = next(b for b in state.replicas if b != state.leader)
    manager = await manager_for(tmp_path, follower, image)
    with pytest.raises(DwalError) as caught:
        manager.append("t", 0, bytearray(build_batch([(1, None, b"v")])), now_ms=1)
    assert caught.value.code == ErrorCode.NOT_LEADER_OR_FOLLOWER
    assert f"broker {state.leader} does" in caught.value.message
    assert manager.registry.logs[("t", 0)].log_end_offset == 0, "nothing written"


async def test_a_led_partition_whose_log_is_missing_is_a_storage_error(tmp_path):
    image = with_topic(with_brokers(1), "t", 1, 1)
    manager = await manager_for(tmp_path, 1, image)
    manager.registry.logs.pop(("t", 0)).close()  # as when the log could not be opened
    assert code_of(manager, "t", 0) == ErrorCode.KAFKA_STORAGE_ERROR


async def test_every_batch_of_an_append_carries_the_leader_epoch(tmp_path):
    image = with_topic(with_brokers(1, 2), "t", 1, 2)
    first = image.topics["t"].partitions[0].leader
    image = fenced(image, first)  # leadership moves: leader epoch 1
    state = image.topics["t"].partitions[0]
    assert state.leader != first and state.leader_epoch == 1
    manager = await manager_for(tmp_path, state.leader, image)
    batches = bytearray()
    for number in range(3):
        batches += build_batch([(1000 + number, b"k", b"value-%d" % number)] * 2)
    log, info = manager.append("t", 0, batches, now_ms=5000)
    assert (info.base_offset, info.last_offset) == (0, 5)

    with log.read(0, 1 << 20) as fetched:
        stored = fetched.read_bytes()
    headers = [batch.header for batch in scan_batches(stored)]
    assert [h.base_offset for h in headers] == [0, 2, 4]
    assert [h.partition_leader_epoch for h in headers] == [1, 1, 1]
