"""The registry follows the metadata image: it opens the logs of the partitions this node is
a replica of (and only those), removes the data of removed topics and of a topic recreated
under a new id, gives config changes to the open logs, runs retention, and reports the
directories no image claims. Images are built by hand with the controller's pure `apply`.
A running node adopts the topics of a pre-quorum data directory (topics.json) once, and the
controller refuses bad creations with the right error codes."""

from __future__ import annotations

import json
import logging
import time

import pytest
from broker_test_support import TEST_CONTEXT, create_topic, running_node

from broker.controller.metadata_image import EMPTY_IMAGE, MetadataImage, apply
from broker.controller.metadata_records import (
    ConfigRecord,
    ConfigResourceType,
    MetadataRecord,
    PartitionRecord,
    RemoveTopicRecord,
    TopicRecord,
)
from broker.limits import Limits
from broker.storage import LogConfig, PartitionLog
from broker.topic_registry import TopicRegistry
from protocol import ApiKey, DwalError, ErrorCode, build_batch, check_request, decode_records

NODE = 1
OTHER = 2
THIRD = 3
DEFAULTS = LogConfig(fsync="never")


def open_registry(path) -> TopicRegistry:
    return TopicRegistry.open(path, DEFAULTS, Limits(partitions_per_topic_max=16))


def batch(value: bytes, timestamp: int = 1) -> bytearray:
    return bytearray(build_batch([(timestamp, None, value)]))


def topic_id(number: int) -> bytes:
    return bytes([number]) * 16


def next_image(image: MetadataImage, records: list[MetadataRecord]) -> MetadataImage:
    return apply(image, records, entry_index=image.last_applied_index + 1)


def topic_records(
    name: str, tid: bytes, replicas: list[tuple[int, ...]], configs: dict[str, str] | None = None
) -> list[MetadataRecord]:
    """A topic creation as the controller writes it: one partition per replica list."""
    records: list[MetadataRecord] = [TopicRecord(name=name, topic_id=tid)]
    for partition, holders in enumerate(replicas):
        records.append(
            PartitionRecord(
                topic_id=tid,
                partition=partition,
                replicas=holders,
                isr=holders,
                leader=holders[0],
                leader_epoch=0,
                partition_epoch=0,
            )
        )
    records.extend(config_records(name, configs or {}))
    return records


def config_records(name: str, configs: dict[str, str | None]) -> list[MetadataRecord]:
    return [
        ConfigRecord(
            resource_type=ConfigResourceType.TOPIC, resource_name=name, name=key, value=value
        )
        for key, value in configs.items()
    ]


def partition_dirs(path, topic: str) -> set[str]:
    return {entry.name for entry in path.iterdir() if entry.name.startswith(f"{topic}-")}


async def test_only_the_partitions_this_node_replicates_are_opened(tmp_path):
    image = next_image(
        EMPTY_IMAGE,
        topic_records("mixed", topic_id(1), [(NODE, OTHER), (OTHER, THIRD), (THIRD, NODE)])
        + topic_records("elsewhere", topic_id(2), [(OTHER,)]),
    )
    registry = open_registry(tmp_path)
    try:
        await registry.apply_image(image, NODE)
        assert set(registry.logs) == {("mixed", 0), ("mixed", 2)}
        assert partition_dirs(tmp_path, "mixed") == {"mixed-0", "mixed-2"}
        assert partition_dirs(tmp_path, "elsewhere") == set()
        # every topic of the image is known, local or not
        assert registry.topic("mixed").partitions == 3
        assert registry.topic("mixed").local_partitions == {0, 2}
        assert registry.topic("mixed").topic_id == topic_id(1)
        assert registry.topic("elsewhere").local_partitions == frozenset()
        for name, partition in (("mixed", 1), ("elsewhere", 0), ("absent", 0)):
            with pytest.raises(DwalError) as info:
                registry.log(name, partition)
            assert info.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    finally:
        registry.close()


async def test_records_and_configs_survive_reopening_the_logs(tmp_path):
    image = next_image(
        EMPTY_IMAGE,
        topic_records("kept", topic_id(1), [(NODE,)] * 3, {"retention.ms": "3600000"}),
    )
    registry = open_registry(tmp_path)
    await registry.apply_image(image, NODE)
    registry.log("kept", 2).append(batch(b"x"), now_ms=1)
    registry.close()
    reopened = open_registry(tmp_path)
    try:
        await reopened.apply_image(image, NODE)
        assert reopened.topic("kept").partitions == 3
        assert reopened.log_config(reopened.topic("kept")).retention_ms == 3_600_000
        assert reopened.log("kept", 2).config.retention_ms == 3_600_000
        assert reopened.log("kept", 2).log_end_offset == 1
    finally:
        reopened.close()


async def test_a_removed_topic_loses_its_data_and_its_name(tmp_path):
    created = next_image(EMPTY_IMAGE, topic_records("gone", topic_id(1), [(NODE,), (NODE,)]))
    registry = open_registry(tmp_path)
    try:
        await registry.apply_image(created, NODE)
        registry.log("gone", 0).append(batch(b"x"), now_ms=1)
        await registry.apply_image(
            next_image(created, [RemoveTopicRecord(topic_id=topic_id(1))]), NODE
        )
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("gone")]
        assert "gone" not in registry.topics and not registry.logs
        with pytest.raises(DwalError) as info:
            registry.log("gone", 0)
        assert info.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    finally:
        registry.close()


async def test_a_topic_recreated_under_a_new_id_starts_empty(tmp_path):
    first = next_image(EMPTY_IMAGE, topic_records("again", topic_id(1), [(NODE,), (NODE,)]))
    registry = open_registry(tmp_path)
    try:
        await registry.apply_image(first, NODE)
        for partition in (0, 1):
            registry.log("again", partition).append(batch(b"old"), now_ms=1)
        old_log = registry.log("again", 0)
        # removal and re-creation reach this node in one image: only the id tells them apart
        second = next_image(first, [RemoveTopicRecord(topic_id=topic_id(1))])
        second = next_image(second, topic_records("again", topic_id(2), [(NODE,)]))
        await registry.apply_image(second, NODE)
        assert registry.topic("again").topic_id == topic_id(2)
        assert registry.topic("again").partitions == 1
        assert registry.log("again", 0) is not old_log
        assert registry.log("again", 0).log_end_offset == 0
        assert set(registry.logs) == {("again", 0)}
        assert partition_dirs(tmp_path, "again") == {"again-0"}
    finally:
        registry.close()


async def test_config_changes_reach_the_open_logs(tmp_path):
    created = next_image(EMPTY_IMAGE, topic_records("alt", topic_id(1), [(NODE,)]))
    registry = open_registry(tmp_path)
    try:
        await registry.apply_image(created, NODE)
        log = registry.log("alt", 0)
        assert log.config.max_message_bytes == DEFAULTS.max_message_bytes != 100
        altered = next_image(created, config_records("alt", {"max.message.bytes": "100"}))
        await registry.apply_image(altered, NODE)
        assert registry.topic("alt").configs == {"max.message.bytes": "100"}
        assert registry.log("alt", 0) is log and log.config.max_message_bytes == 100
        reset = next_image(altered, config_records("alt", {"max.message.bytes": None}))
        await registry.apply_image(reset, NODE)
        assert registry.topic("alt").configs == {}
        assert log.config.max_message_bytes == DEFAULTS.max_message_bytes
    finally:
        registry.close()


async def test_directories_no_image_claims_are_reported_and_left_alone(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dwal.topics")
    stray = PartitionLog.open(tmp_path / "ghost-0", DEFAULTS, now_ms=1)
    stray.append(batch(b"boo"), now_ms=1)
    stray.close()
    image = next_image(EMPTY_IMAGE, topic_records("real", topic_id(1), [(NODE,)]))
    registry = open_registry(tmp_path)
    try:
        await registry.apply_image(image, NODE)
        registry.report_loaded()
        reported = [
            r.fields["path"]  # type: ignore[attr-defined]
            for r in caplog.records
            if r.getMessage() == "stray_partition_directory"
        ]
        assert reported == [str(tmp_path / "ghost-0")]
        assert (tmp_path / "ghost-0").is_dir()
        with pytest.raises(DwalError):
            registry.log("ghost", 0)
    finally:
        registry.close()


@pytest.mark.parametrize("delete_delay_ms", [0, 3_600_000])
async def test_retention_by_size_deletes_whole_old_segments(tmp_path, delete_delay_ms):
    configs = {
        "segment.bytes": "1024",
        "retention.bytes": "2048",
        "file.delete.delay.ms": str(delete_delay_ms),
    }
    image = next_image(EMPTY_IMAGE, topic_records("ret", topic_id(1), [(NODE,)], configs))
    registry = open_registry(tmp_path)
    try:
        await registry.apply_image(image, NODE)
        log = registry.log("ret", 0)
        now = int(time.time() * 1000)  # recent records: only the size limit applies
        for _ in range(40):
            log.append(batch(b"v" * 200, timestamp=now), now_ms=now)
        segments_before = log.segment_count
        removed = await registry.apply_retention()
        assert removed > 0 and log.segment_count == segments_before - removed
        assert log.log_start_offset > 0 and log.log_end_offset == 40
        assert log.size_bytes <= 2048 + 1024
        # files of deleted segments stay (renamed) until file.delete.delay.ms has passed
        assert bool(list(log.directory.glob("*.deleted"))) == (delete_delay_ms > 0)
    finally:
        registry.close()


# -- through a running node ----------------------------------------------------------------


def write_pre_quorum_data_dir(data_dir) -> None:
    """What a single node from before the metadata quorum left: topics.json and the
    partition directories of its topics."""
    data_dir.mkdir(parents=True, exist_ok=True)
    topics = {"topics": {"legacy": {"partitions": 2, "configs": {"retention.ms": "7200000"}}}}
    (data_dir / "topics.json").write_text(json.dumps(topics))
    for partition in (0, 1):
        log = PartitionLog.open(data_dir / f"legacy-{partition}", DEFAULTS, now_ms=1)
        for number in range(3):
            log.append(batch(b"p%d-r%d" % (partition, number)), now_ms=1)
        log.close()


async def read_values(node, topic: str, partition: int) -> list[bytes]:
    data = await node.handlers.read_batches(topic, partition, 0, 1 << 20)
    return [record.value for record in decode_records(data)]


async def test_a_pre_quorum_data_dir_is_adopted_once(tmp_path):
    data_dir = tmp_path / "data"
    write_pre_quorum_data_dir(data_dir)
    async with running_node(data_dir, DEFAULTS) as node:
        topic = node.member.image.topics["legacy"]
        assert [p.replicas for p in topic.partitions] == [(node.config.node_id,)] * 2
        configs = node.member.image.configs[(ConfigResourceType.TOPIC, "legacy")]
        assert configs == {"retention.ms": "7200000"}
        assert node.registry.log("legacy", 1).config.retention_ms == 7_200_000
        for partition in (0, 1):
            assert await read_values(node, "legacy", partition) == [
                b"p%d-r%d" % (partition, number) for number in range(3)
            ]
        assert not (data_dir / "topics.json").exists()
        assert (data_dir / "topics.json.adopted").exists()
        # deleted after adoption: a restart must not bring it back from the old file
        body = check_request(ApiKey.DELETE_TOPICS, {"topics": ["legacy"]})
        reply = await node.handlers.delete_topics(body, b"", TEST_CONTEXT)
        assert reply.body["topics"][0]["error_code"] == 0
        await create_topic(node, "after", 1)
    async with running_node(data_dir, DEFAULTS) as node:
        assert "legacy" not in node.member.image.topics
        assert "after" in node.member.image.topics
        assert not partition_dirs(data_dir, "legacy")
        assert not (data_dir / "topics.json").exists()


@pytest.mark.parametrize(
    "name,partitions,replication,configs,code",
    [
        ("bad/name", 1, 1, {}, ErrorCode.INVALID_TOPIC),
        ("ok", 0, 1, {}, ErrorCode.INVALID_PARTITIONS),
        ("ok", 17, 1, {}, ErrorCode.INVALID_PARTITIONS),
        ("ok", 1, 3, {}, ErrorCode.INVALID_REPLICATION_FACTOR),
        ("ok", 1, 1, {"retention.ms": "soon"}, ErrorCode.INVALID_CONFIG),
        ("ok", 1, 1, {"no.such": "1"}, ErrorCode.INVALID_CONFIG),
    ],
)
async def test_bad_creations_are_refused(tmp_path, name, partitions, replication, configs, code):
    limits = Limits(partitions_per_topic_max=16)
    async with running_node(tmp_path, DEFAULTS, limits=limits) as node:
        body = check_request(
            ApiKey.CREATE_TOPICS,
            {
                "topics": [
                    {
                        "topic": name,
                        "partitions": partitions,
                        "replication_factor": replication,
                        "configs": configs,
                    }
                ]
            },
        )
        reply = await node.handlers.create_topics(body, b"", TEST_CONTEXT)
        assert reply.body["topics"][0]["error_code"] == code
        assert set(node.member.image.topics) <= {"__consumer_offsets"}
        assert not node.registry.logs or all(
            t == "__consumer_offsets" for t, _ in node.registry.logs
        )
