"""The consumer alone: retry backoff and giving up (a stub cluster and trio's mock clock),
stale metadata after a topic grew, and the record formats of `dwal consume`."""

from __future__ import annotations

import pytest
import trio

import client
from client import (
    Admin,
    ConnectionFailed,
    Consumer,
    ConsumerStatistics,
    DwalError,
    ErrorCode,
    Producer,
)
from client.cluster import PartitionInfo, TopicInfo
from client.consume_command import _FailureReport
from client.record_format import FormatError, compile_format, render
from client.topic_partition import TopicPartition
from protocol import Record


class UnreachableCluster:
    """Every broker is down: each request fails at once, as a refused connection does."""

    request_timeout_ms = 30_000

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.topics = {"t": TopicInfo("t", (PartitionInfo(0, 0, 0, (0,), (0,)),))}

    async def refresh_metadata(self, topics=None, **_) -> dict:
        raise ConnectionFailed("cannot connect to 127.0.0.1:9: refused")

    async def leader_connection(self, topic: str, partition: int, *, purpose: str = "default"):
        raise ConnectionFailed("cannot connect to 127.0.0.1:9: refused")

    def start_task(self, function, *args) -> None:
        self.nursery.start_soon(function, *args)

    def invalidate_all(self) -> None:
        self.topics.clear()

    def invalidate(self, topic: str) -> None:
        self.topics.pop(topic, None)


async def test_failed_polls_back_off_doubling_then_give_up(nursery, autojump_clock):
    consumer = Consumer(
        UnreachableCluster(nursery),  # type: ignore[arg-type]
        retry_backoff_ms=100,
        retry_backoff_max_ms=400,
        give_up_after_ms=2_000,
    )
    consumer.assign([("t", 0)])
    consumer.seek(("t", 0), 0)
    started = trio.current_time()
    poll_times = []
    with pytest.raises(DwalError) as info:
        while True:
            assert await consumer.poll(timeout_ms=100) == {}
            statistics = consumer.statistics()
            poll_times.append(round(trio.current_time() - started, 3))
            assert statistics.failed_polls == len(poll_times)
            assert statistics.last_error is not None
            assert statistics.last_error.code == ErrorCode.NETWORK_EXCEPTION
    # the mock clock makes the schedule exact: 0.1, 0.2, then 0.4 s (the cap) between polls
    assert poll_times[:5] == [0, 0.1, 0.3, 0.7, 1.1]
    assert info.value.code == ErrorCode.NETWORK_EXCEPTION
    assert info.value.message.startswith("gave up after")
    assert trio.current_time() - started >= 2.0


async def test_without_give_up_polls_keep_failing_quietly(nursery, autojump_clock):
    consumer = Consumer(UnreachableCluster(nursery), retry_backoff_max_ms=1_000)  # type: ignore[arg-type]
    consumer.assign([("t", 0)])
    consumer.seek(("t", 0), 0)
    for _ in range(50):
        assert await consumer.poll() == {}
    assert consumer.statistics().failed_polls == 50


async def test_a_partition_added_after_metadata_was_cached_is_read(broker):
    async with (
        client.connect(broker.bootstrap) as reader,
        client.connect(broker.bootstrap) as writer,
    ):
        await Admin(writer).create_topic("grown", partitions=1)
        consumer = Consumer(reader, auto_offset_reset="earliest")
        await consumer.assign_topic("grown")  # caches metadata: one partition
        await Admin(writer).add_partitions("grown", 3)
        async with Producer(writer) as producer:
            await producer.send("grown", b"in-2", partition=2)
        consumer.assign([("grown", 2), ("grown", 0)])  # the first one picks the leader
        seen = []
        with trio.fail_after(20):
            while not seen:
                for records in (await consumer.poll(timeout_ms=100)).values():
                    seen.extend(r.value for r in records)
        assert seen == [b"in-2"]
        consumer.assign([("grown", 7)])
        with pytest.raises(DwalError) as info:  # not assigned by a group: really unknown
            await consumer.poll(timeout_ms=100)
        assert info.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION


def test_format_escapes_and_codes():
    record = Record(5, 1700, b"k", b"v", ())
    tp = TopicPartition("t", 2)
    assert render(compile_format("%k=%v@%p/%o %T %t"), tp, record) == b"k=v@2/5 1700 t\n"
    assert render(compile_format("A\\\\nB"), tp, record) == b"A\\nB\n"
    assert render(compile_format("A\\nB\\t%%"), tp, record) == b"A\nB\t%\n"
    assert render(compile_format("\\x"), tp, record) == b"\\x\n"
    assert compile_format("%v").value_only and not compile_format("%v%v").value_only
    for bad in ("%", "abc%", "%q"):
        with pytest.raises(FormatError):
            compile_format(bad)


def test_json_format_encodes_bytes_as_text_or_base64():
    fmt = compile_format("json")
    line = render(fmt, TopicPartition("t", 0), Record(1, 2, None, b"\xff", (("h", b"x"),)))
    assert line == (
        b'{"topic": "t", "partition": 0, "offset": 1, "timestamp": 2, "key": null, '
        b'"value": {"base64": "/w=="}, "headers": [{"key": "h", "value": "x"}]}\n'
    )


class StatisticsOnly:
    def __init__(self) -> None:
        self.current = ConsumerStatistics(1, 0, 0)

    def statistics(self) -> ConsumerStatistics:
        return self.current


async def test_consume_warns_after_three_failures_or_two_seconds_then_notes_recovery(
    capsys, autojump_clock
):
    consumer = StatisticsOnly()
    report = _FailureReport()
    refused = ConnectionFailed("cannot connect to 127.0.0.1:9: refused")
    now = trio.current_time()

    def failing(polls: int, since_s_ago: float) -> ConsumerStatistics:
        return ConsumerStatistics(1, 0, 0, polls, refused, now - since_s_ago)

    for polls in (1, 2):  # a blip: quiet
        consumer.current = failing(polls, 0.5)
        report.after_poll(consumer)  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""
    consumer.current = failing(3, 0.7)
    report.after_poll(consumer)  # type: ignore[arg-type]
    assert capsys.readouterr().err == (
        "warning: broker unreachable: cannot connect to 127.0.0.1:9: refused "
        "(NETWORK_EXCEPTION); retrying (attempt 3)\n"
    )
    consumer.current = ConsumerStatistics(1, 0, 0)
    report.after_poll(consumer)  # type: ignore[arg-type]
    assert capsys.readouterr().err == "note: reading again after 3 failed attempts\n"
    timed_out = DwalError(ErrorCode.REQUEST_TIMED_OUT, "fetch got no answer in time")
    consumer.current = ConsumerStatistics(1, 0, 0, 1, timed_out, now - 30.5)  # one slow failure
    report.after_poll(consumer)  # type: ignore[arg-type]
    assert "fetch got no answer in time (REQUEST_TIMED_OUT); retrying (attempt 1)" in (
        capsys.readouterr().err
    )
