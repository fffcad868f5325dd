"""The registry's resources. A partition log that cannot be created for lack of descriptors
or disk space leaves nothing behind: its directory is removed, the failure is recorded with a
reason naming what ran out, and the next image tries again. A log that existed is never
removed when it cannot be opened. Idle logs' descriptors are closed by the periodic flush
pass. Applying an image looks only at the topics that changed."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import resource
from types import MappingProxyType

import trio
from broker_test_support import TEST_CONTEXT, running_node
from test_topic_registry import (
    config_records,
    DEFAULTS,
    EMPTY_IMAGE,
    NODE,
    batch,
    next_image,
    open_registry,
    partition_dirs,
    topic_id,
    topic_records,
)

from broker.limits import Limits
from broker.topic_registry import TopicRegistry
from protocol import ApiKey, ErrorCode, check_request


@contextlib.contextmanager
def descriptors_exhausted():
    """Lower this process's soft open-file limit a little above what is open, and open
    /dev/null until the process is out of descriptors; undo both on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 32, hard))
    taken = []
    try:
        while True:
            try:
                taken.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as error:
                assert error.errno == errno.EMFILE
                break
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_running_out_of_descriptors_leaves_no_directory_and_is_retried(tmp_path):
    registry = open_registry(tmp_path)
    created = next_image(EMPTY_IMAGE, topic_records("many", topic_id(1), [(NODE,)] * 4))
    try:
        with descriptors_exhausted():
            await registry.apply_image(created, NODE)
        assert registry.logs == {}
        assert partition_dirs(tmp_path, "many") == set()  # nothing half-created
        assert set(registry.failed_partitions) == {("many", p) for p in range(4)}
        reason = registry.failed_partitions[("many", 0)]
        assert reason.startswith("the broker has too many open files (open-file limit ")
        assert "ulimit -n" in reason
        later = next_image(created, topic_records("other", topic_id(2), [(NODE,)]))
        await registry.apply_image(later, NODE)  # the failed partitions are tried again
        assert set(registry.logs) == {("many", p) for p in range(4)} | {("other", 0)}
        assert registry.failed_partitions == {}
        registry.log("many", 3).append(batch(b"x"), now_ms=1)
    finally:
        registry.close()


async def test_a_full_disk_leaves_no_directory(tmp_path, monkeypatch):
    registry = open_registry(tmp_path)
    real_write = os.write

    def write_on_a_full_disk(fd: int, data) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path / "full-")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write_on_a_full_disk)
    created = next_image(EMPTY_IMAGE, topic_records("full", topic_id(1), [(NODE,)] * 2))
    try:
        await registry.apply_image(created, NODE)
        assert partition_dirs(tmp_path, "full") == set()
        assert registry.failed_partitions[("full", 1)].startswith("no space left on the device: ")
    finally:
        registry.close()


async def test_an_existing_log_that_cannot_be_opened_is_kept(tmp_path):
    created = next_image(EMPTY_IMAGE, topic_records("kept", topic_id(1), [(NODE,)]))
    registry = open_registry(tmp_path)
    await registry.apply_image(created, NODE)
    registry.log("kept", 0).append(batch(b"kept"), now_ms=1)
    registry.close()
    reopened = open_registry(tmp_path)
    try:
        with descriptors_exhausted():
            await reopened.apply_image(created, NODE)
        assert ("kept", 0) in reopened.failed_partitions
        assert partition_dirs(tmp_path, "kept") == {"kept-0"}  # the data stays
        await reopened.apply_image(next_image(created, []), NODE)
        assert reopened.log("kept", 0).log_end_offset == 1
    finally:
        reopened.close()


class CountedPartitions(tuple):
    """A TopicInfo's partitions that count how often they are iterated."""

    iterations = 0

    def __iter__(self):
        CountedPartitions.iterations += 1
        return super().__iter__()


async def test_an_image_only_touches_the_topics_that_changed(tmp_path):
    registry = open_registry(tmp_path)
    image = next_image(EMPTY_IMAGE, topic_records("first", topic_id(1), [(NODE,)] * 3))
    first = image.topics["first"]
    counted = dataclasses.replace(first, partitions=CountedPartitions(first.partitions))
    image = dataclasses.replace(
        image,
        topics=MappingProxyType({"first": counted}),
        topics_by_id=MappingProxyType({counted.topic_id: counted}),
    )
    try:
        await registry.apply_image(image, NODE)
        CountedPartitions.iterations = 0
        image = next_image(image, topic_records("second", topic_id(2), [(NODE,)]))
        assert image.topics["first"] is counted  # images share unchanged topics
        await registry.apply_image(image, NODE)
        assert CountedPartitions.iterations == 0  # "first" was not looked at again
        assert set(registry.logs) == {("first", p) for p in range(3)} | {("second", 0)}
    finally:
        registry.close()


def descriptors_on(directory) -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(f"/proc/self/fd/{name}").startswith(str(directory))
    return count


async def test_the_flush_pass_closes_idle_descriptors(tmp_path, autojump_clock):
    registry = TopicRegistry.open(tmp_path, DEFAULTS, Limits(open_files_idle_ms=1000))
    image = next_image(EMPTY_IMAGE, topic_records("idle", topic_id(1), [(NODE,)] * 3))
    try:
        await registry.apply_image(image, NODE)
        assert descriptors_on(tmp_path) == 3
        for _ in range(3):  # the first pass sets the clock; then one to two intervals
            await registry.flush_due_logs()
            await trio.sleep(1)
        assert descriptors_on(tmp_path) == 0
        registry.log("idle", 1).append(batch(b"x"), now_ms=1)  # reopened on demand
        assert descriptors_on(tmp_path) == 1
    finally:
        registry.close()


async def test_flush_passes_keep_each_policys_timing(tmp_path, autojump_clock):
    # fsync=interval logs are looked at on every pass (from their creation on); the others
    # only on a full pass, at a tenth of recovery_point_interval_ms: their flush still comes
    # after that interval.
    limits = Limits(recovery_point_interval_ms=10_000, flush_check_interval_ms=50)
    registry = TopicRegistry.open(tmp_path, DEFAULTS, limits)
    image = next_image(
        EMPTY_IMAGE,
        topic_records("often", topic_id(1), [(NODE,)], {"flush.ms": "100"})
        + config_records("often", {"fsync.policy": "interval"})
        + topic_records("rarely", topic_id(2), [(NODE,)]),
    )
    try:
        await registry.flush_due_logs()  # a full pass, before the logs exist
        await registry.apply_image(image, NODE)
        await registry.flush_due_logs()  # notes where the interval log is
        often, rarely = registry.log("often", 0), registry.log("rarely", 0)
        often.append(batch(b"x"), now_ms=1)
        rarely.append(batch(b"y"), now_ms=1)
        started = trio.current_time()
        durable_at = {}
        while len(durable_at) < 2:
            await trio.sleep(0.05)
            await registry.flush_due_logs()
            for name, log in (("often", often), ("rarely", rarely)):
                if log.durable_offset == 1:
                    durable_at.setdefault(name, trio.current_time() - started)
        assert 0.1 <= durable_at["often"] <= 0.2
        assert 10.0 <= durable_at["rarely"] <= 12.1  # plus up to two full-pass periods
    finally:
        registry.close()


async def test_the_descriptors_of_loading_are_closed_once_loaded(tmp_path):
    image = next_image(EMPTY_IMAGE, topic_records("loaded", topic_id(1), [(NODE,)] * 3))
    registry = open_registry(tmp_path)
    try:
        await registry.apply_image(image, NODE)
        assert descriptors_on(tmp_path) == 3
        registry.report_loaded()
        assert descriptors_on(tmp_path) == 0
    finally:
        registry.close()


async def test_create_topics_says_which_partitions_this_broker_could_not_create(
    tmp_path, monkeypatch
):
    """The topic exists in the cluster (the controller committed it), but this broker's
    copy could not be made: the answer is KAFKA_STORAGE_ERROR with the reason, not success."""
    real_write = os.write

    def write_on_a_full_disk(fd: int, data) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path / "full-")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    async with running_node(tmp_path) as node:
        monkeypatch.setattr(os, "write", write_on_a_full_disk)
        body = check_request(
            ApiKey.CREATE_TOPICS, {"topics": [{"topic": "full", "partitions": 2}, {"topic": "ok"}]}
        )
        reply = await node.handlers.create_topics(body, b"", TEST_CONTEXT)
        full, ok = reply.body["topics"]
        assert full["error_code"] == ErrorCode.KAFKA_STORAGE_ERROR
        assert "2 of its partitions cannot be created on broker 1" in full["error_message"]
        assert "no space left on the device" in full["error_message"]
        assert ok["error_code"] == 0
        assert partition_dirs(tmp_path, "full") == set()
