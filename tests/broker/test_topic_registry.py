"""Topic metadata survives restarts; deletion removes data; retention runs through the
registry; bad creations are refused with the right error codes."""

from __future__ import annotations

import time

import pytest

from broker.limits import Limits
from broker.storage import LogConfig
from broker.topic_registry import TopicRegistry
from protocol import DwalError, ErrorCode, build_batch


def open_registry(path) -> TopicRegistry:
    return TopicRegistry.open(path, LogConfig(fsync="never"), Limits(partitions_per_topic_max=16))


def batch(value: bytes, timestamp: int = 1) -> bytearray:
    return bytearray(build_batch([(timestamp, None, value)]))


async def test_topics_and_records_survive_a_restart(tmp_path):
    registry = open_registry(tmp_path)
    await registry.create_topic("kept", 3, configs={"retention.ms": "3600000"})
    registry.log("kept", 2).append(batch(b"x"), now_ms=1)
    registry.close()
    reopened = open_registry(tmp_path)
    try:
        assert reopened.topic("kept").partitions == 3
        assert reopened.log_config(reopened.topic("kept")).retention_ms == 3_600_000
        assert reopened.log("kept", 2).log_end_offset == 1
    finally:
        reopened.close()


async def test_delete_removes_the_data_and_the_name(tmp_path):
    registry = open_registry(tmp_path)
    try:
        await registry.create_topic("gone", 2)
        registry.log("gone", 0).append(batch(b"x"), now_ms=1)
        await registry.delete_topic("gone")
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("gone")]
        with pytest.raises(DwalError) as info:
            registry.log("gone", 0)
        assert info.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
        await registry.create_topic("gone", 1)  # the name is free again, and empty
        assert registry.log("gone", 0).log_end_offset == 0
    finally:
        registry.close()


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
    registry = open_registry(tmp_path)
    try:
        with pytest.raises(DwalError) as info:
            await registry.create_topic(name, partitions, replication, configs)
        assert info.value.code == code
        assert registry.topics == {}
    finally:
        registry.close()


@pytest.mark.parametrize("delete_delay_ms", [0, 3_600_000])
async def test_retention_by_size_deletes_whole_old_segments(tmp_path, delete_delay_ms):
    registry = open_registry(tmp_path)
    try:
        await registry.create_topic(
            "ret",
            1,
            configs={
                "segment.bytes": "1024",
                "retention.bytes": "2048",
                "file.delete.delay.ms": str(delete_delay_ms),
            },
        )
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


async def test_alter_configs_applies_to_open_logs(tmp_path):
    registry = open_registry(tmp_path)
    try:
        await registry.create_topic("alt", 1)
        overrides = await registry.alter_configs("alt", {"max.message.bytes": "100"}, [])
        assert overrides == {"max.message.bytes": "100"}
        assert registry.log("alt", 0).config.max_message_bytes == 100
        with pytest.raises(DwalError) as info:
            await registry.alter_configs("alt", {"max.message.bytes": "-5"}, [])
        assert info.value.code == ErrorCode.INVALID_CONFIG
        assert registry.log("alt", 0).config.max_message_bytes == 100
    finally:
        registry.close()
