"""The request layer driven directly, without sockets: checked request bodies in, `Reply`
out. Each test pins one promise of docs/guarantees.md or docs/protocol.md that a small
change to `broker/request_handlers.py` (or the log under it) could break silently.

The handlers are those of a whole running node (`running_node`: its embedded single-voter
controller, metadata publisher, registry, replica manager and coordinator), so topics are
created, deleted and altered through the controller and the published image, as in
production. The spy on os.fdatasync observes only the partition logs: the metadata log's
fdatasyncs stay real (`partition_fdatasyncs_only`), so holding a partition's fsync never
holds the controller.

Time: the long-poll tests run on trio's MockClock (autojump), with fail_after bounds far
below the fetch's max_wait, so a fetch that is not woken fails at once instead of merely
taking longer; the node starts and topics are created at the real clock's pace
(`at_real_pace`), only what is measured runs on virtual time. Tests that fsync (worker
threads) use the real clock and no deadline races.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from broker_test_support import at_real_pace, partition_fdatasyncs_only, running_node

from broker.node import BrokerNode
from broker.request_handlers import Reply, RequestContext
from broker.storage import LogConfig
from protocol import (
    ACKS_ALL,
    ACKS_LEADER,
    ACKS_NONE,
    EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
    ApiKey,
    DwalError,
    ErrorCode,
    build_batch,
    check_request,
    decode_records,
)

CONTEXT = RequestContext(client_id="unit-test", client_host="127.0.0.1")
LONG_POLL_MS = 60_000  # the fetch's max_wait: far beyond every bound the tests set


class Broker:
    """The request handlers of a running node, with helpers to call them."""

    def __init__(self, node: BrokerNode) -> None:
        self.node = node
        self.config = node.config
        self.registry = node.registry
        self.handlers = node.handlers

    async def call(self, api_key: ApiKey, body: dict) -> Reply:
        return await self.handlers.table[api_key](check_request(api_key, body), b"", CONTEXT)

    async def create(self, name: str, partitions: int = 1, **configs: str) -> None:
        with at_real_pace():  # a controller call: see at_real_pace
            reply = await self.call(
                ApiKey.CREATE_TOPICS,
                {"topics": [{"topic": name, "partitions": partitions, "configs": configs}]},
            )
        assert reply.body["topics"][0]["error_code"] == 0, reply.body

    async def start_produce(
        self, topic: str, batches: list[bytes], *, acks: int = ACKS_LEADER, timeout_ms=30_000
    ):
        """Append now (as the server's reader does); returns the coroutine function that
        waits for durability and builds the reply."""
        body = {
            "acks": acks,
            "timeout_ms": timeout_ms,
            "topics": [
                {
                    "topic": topic,
                    "partitions": [
                        {"partition": partition, "size": len(batch)}
                        for partition, batch in enumerate(batches)
                    ],
                }
            ],
        }
        tail = bytearray(b"".join(batches))
        return await self.handlers.start_produce(check_request(ApiKey.PRODUCE, body), tail)

    async def produce(self, topic: str, *batches: bytes, acks: int = ACKS_LEADER) -> list[dict]:
        """Produce one batch per partition (0, 1, ...); returns the partition results."""
        finish = await self.start_produce(topic, list(batches), acks=acks)
        reply = await finish()
        return reply.body["topics"][0]["partitions"]

    async def fetch(
        self,
        topic: str,
        offset: int = 0,
        *,
        partition: int = 0,
        max_wait_ms: int = 0,
        min_bytes: int = 1,
        max_bytes: int = 1 << 20,
        partition_max_bytes: int = 1 << 20,
    ) -> tuple[dict, bytes]:
        """One partition's fetch result and its bytes."""
        body = {
            "max_wait_ms": max_wait_ms,
            "min_bytes": min_bytes,
            "max_bytes": max_bytes,
            "topics": [
                {
                    "topic": topic,
                    "partitions": [
                        {
                            "partition": partition,
                            "fetch_offset": offset,
                            "max_bytes": partition_max_bytes,
                        }
                    ],
                }
            ],
        }
        reply = await self.call(ApiKey.FETCH, body)
        try:
            data = b"".join(
                part if isinstance(part, bytes) else part.read_bytes() for part in reply.parts
            )
        finally:
            reply.close()
        return reply.body["topics"][0]["partitions"][0], data

    async def list_offset(self, topic: str, timestamp: int, partition: int = 0) -> dict:
        body = {
            "topics": [
                {"topic": topic, "partitions": [{"partition": partition, "timestamp": timestamp}]}
            ]
        }
        reply = await self.call(ApiKey.LIST_OFFSETS, body)
        return reply.body["topics"][0]["partitions"][0]


@contextlib.asynccontextmanager
async def open_broker(
    tmp_path: pathlib.Path, *, fsync: str = "never", auto_create: bool = False
) -> AsyncIterator[Broker]:
    """A running node in `tmp_path`/data (started at the real clock's pace: see
    `at_real_pace`), stopped, its logs closed, when the block exits."""
    async with contextlib.AsyncExitStack() as stack:
        with at_real_pace():
            node = await stack.enter_async_context(
                running_node(
                    tmp_path / "data", LogConfig(fsync=fsync), auto_create_topics=auto_create
                )
            )
        yield Broker(node)


@pytest.fixture
async def broker(tmp_path) -> AsyncIterator[Broker]:
    async with open_broker(tmp_path) as broker:
        yield broker


@pytest.fixture
def fdatasync_spy(fdatasync_spy, monkeypatch):
    """The conftest's spy, seeing only the partition logs' fdatasyncs."""
    partition_fdatasyncs_only(monkeypatch)
    return fdatasync_spy


def batch(*values: bytes, timestamp_ms: int = 1_000) -> bytes:
    return build_batch([(timestamp_ms, None, value) for value in values])


# -- produce: acks ----------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["never", "interval"])
async def test_acks_all_answers_only_after_an_fsync_whatever_the_policy(
    tmp_path, fdatasync_spy, policy
):
    async with open_broker(tmp_path, fsync=policy) as broker:
        await broker.create("t")
        log = broker.registry.log("t", 0)
        spy = fdatasync_spy()
        [result] = await broker.produce("t", batch(b"a", b"b"), acks=ACKS_ALL)
        assert result["error_code"] == 0 and result["base_offset"] == 0
        assert spy.calls >= 1
        assert log.durable_offset == 2  # the answer came after the fsync covering it


async def test_acks_all_is_not_answered_while_its_fsync_runs(tmp_path, fdatasync_spy):
    async with open_broker(tmp_path, fsync="never") as broker:
        await broker.create("t")
        spy = fdatasync_spy(hold=True)
        finish = await broker.start_produce("t", [batch(b"a")], acks=ACKS_ALL)
        replies: list[Reply] = []

        async def answer() -> None:
            replies.append(await finish())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            with trio.fail_after(10):
                await trio.to_thread.run_sync(spy.entered.wait, 10)
            # under `never` the record is readable before its fsync (guarantees.md)...
            assert broker.registry.log("t", 0).high_watermark == 1
            assert replies == []  # ...but acks=all is not answered yet
            spy.release.set()
        assert replies[0].body["topics"][0]["partitions"][0]["error_code"] == 0


async def test_acks_1_under_never_is_answered_without_an_fsync(broker, fdatasync_spy):
    await broker.create("t")
    spy = fdatasync_spy()
    [result] = await broker.produce("t", batch(b"a"), acks=ACKS_LEADER)
    assert result["error_code"] == 0 and result["base_offset"] == 0
    assert spy.calls == 0
    log = broker.registry.log("t", 0)
    assert (log.high_watermark, log.durable_offset) == (1, 0)


async def test_acks_1_under_always_waits_for_the_fsync(tmp_path, fdatasync_spy):
    async with open_broker(tmp_path, fsync="always") as broker:
        await broker.create("t")
        spy = fdatasync_spy()
        [result] = await broker.produce("t", batch(b"a"), acks=ACKS_LEADER)
        assert result["error_code"] == 0 and spy.calls >= 1
        assert broker.registry.log("t", 0).durable_offset == 1


async def test_acks_0_sends_no_response_but_appends(broker):
    await broker.create("t")
    finish = await broker.start_produce("t", [batch(b"a")], acks=ACKS_NONE)
    reply = await finish()
    assert reply.send is False
    assert broker.registry.log("t", 0).high_watermark == 1


async def test_acks_0_under_always_still_waits_for_the_fsync_before_visibility(
    tmp_path, fdatasync_spy
):
    async with open_broker(tmp_path, fsync="always") as broker:
        await broker.create("t")
        spy = fdatasync_spy()
        finish = await broker.start_produce("t", [batch(b"a")], acks=ACKS_NONE)
        assert broker.registry.log("t", 0).high_watermark == 0  # appended, not durable
        reply = await finish()
        assert reply.send is False and spy.calls >= 1
        assert broker.registry.log("t", 0).high_watermark == 1


@pytest.mark.parametrize("acks", [2, -2, 5])
async def test_other_acks_values_fail_the_request(broker, acks):
    await broker.create("t")
    with pytest.raises(DwalError) as caught:
        await broker.start_produce("t", [batch(b"a")], acks=acks)
    assert caught.value.code == ErrorCode.INVALID_REQUIRED_ACKS
    assert broker.registry.log("t", 0).log_end_offset == 0


async def test_acks_all_times_out_while_waiting_behind_a_stuck_fsync(
    tmp_path, fdatasync_spy, autojump_clock
):
    async with open_broker(tmp_path, fsync="never") as broker:
        await broker.create("t")
        spy = fdatasync_spy(hold=True)
        first = await broker.start_produce("t", [batch(b"a")], acks=ACKS_ALL, timeout_ms=3_600_000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)  # runs the fsync, which is held
            await trio.to_thread.run_sync(spy.entered.wait, 10)
            second = await broker.start_produce("t", [batch(b"b")], acks=ACKS_ALL, timeout_ms=100)
            started = trio.current_time()
            reply = await second()  # only the clock moves (autojump): the fsync is still held
            assert trio.current_time() - started == pytest.approx(0.1)
            spy.release.set()
        [result] = reply.body["topics"][0]["partitions"]
        assert result["error_code"] == ErrorCode.REQUEST_TIMED_OUT
        assert result["base_offset"] == -1
        assert result["maybe_appended"] is True  # the client must not resend it
        assert broker.registry.log("t", 0).log_end_offset == 2  # appended all the same


async def test_acks_all_times_out_even_when_its_own_fsync_is_stuck(
    tmp_path, fdatasync_spy, autojump_clock
):
    """The fsync runs in the broker's FsyncRunner, not in the request's task, so the request
    that started it still gives up after timeout_ms while the disk hangs; the fsync then
    completes and counts."""
    spy = fdatasync_spy()
    try:
        async with open_broker(tmp_path, fsync="never") as broker:  # its FsyncRunner runs
            await broker.create("t")
            spy.hold()
            finish = await broker.start_produce("t", [batch(b"a")], acks=ACKS_ALL, timeout_ms=100)
            start = trio.current_time()
            with trio.fail_after(3600):  # a stuck disk would hold the request this long
                reply = await finish()
            assert trio.current_time() - start == pytest.approx(0.1, abs=0.01)
            [result] = reply.body["topics"][0]["partitions"]
            assert result["error_code"] == ErrorCode.REQUEST_TIMED_OUT
            log = broker.registry.log("t", 0)
            assert log.durable_offset == 0
            spy.release.set()  # the disk answers: the fsync completes and counts
            await log.wait_durable(1)
            assert log.durable_offset == 1
    finally:
        spy.release.set()


# -- produce: what is checked before writing ---------------------------------------------


async def test_a_bad_partition_fails_alone_and_writes_nothing(broker):
    await broker.create("t", partitions=3)
    corrupt = bytearray(batch(b"x"))
    corrupt[-1] ^= 0xFF  # the CRC no longer matches
    results = await broker.produce("t", batch(b"ok"), bytes(corrupt), b"")
    assert [r["error_code"] for r in results] == [
        ErrorCode.NONE,
        ErrorCode.CORRUPT_MESSAGE,
        ErrorCode.INVALID_RECORD,
    ]
    assert [broker.registry.log("t", p).log_end_offset for p in range(3)] == [1, 0, 0]
    assert not any(r.get("maybe_appended") for r in results)  # refused before appending


async def test_produce_to_an_unknown_topic_or_partition_is_refused(broker):
    await broker.create("t")
    [result] = await broker.produce("nope", batch(b"a"))
    assert result["error_code"] == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    results = await broker.produce("t", batch(b"a"), batch(b"b"))  # partition 1 is unknown
    assert [r["error_code"] for r in results] == [0, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION]
    assert "nope" not in broker.registry.topics


async def test_produce_auto_creates_a_topic_only_when_enabled(tmp_path):
    async with open_broker(tmp_path, auto_create=True) as broker:
        [result] = await broker.produce("fresh", batch(b"a"))
        assert result["error_code"] == 0
        assert broker.registry.topics["fresh"].partitions == broker.config.default_partitions


async def test_a_batch_above_max_message_bytes_is_refused(broker):
    await broker.create("t", **{"max.message.bytes": "100"})
    [result] = await broker.produce("t", batch(b"x" * 200))
    assert result["error_code"] == ErrorCode.MESSAGE_TOO_LARGE
    assert broker.registry.log("t", 0).log_end_offset == 0


async def test_offsets_are_assigned_consecutively_across_requests(broker):
    await broker.create("t")
    first = await broker.produce("t", batch(b"a", b"b", b"c"))
    second = await broker.produce("t", batch(b"d"))
    assert (first[0]["base_offset"], second[0]["base_offset"]) == (0, 3)
    _, data = await broker.fetch("t", 0)
    records = decode_records(data)
    assert [(r.offset, r.value) for r in records] == [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d")]


# -- fetch ------------------------------------------------------------------------------


async def test_a_long_poll_fetch_is_woken_by_new_data(broker, autojump_clock):
    await broker.create("t")
    results = []

    async def long_poll() -> None:
        results.append(await broker.fetch("t", 0, max_wait_ms=LONG_POLL_MS))

    # If the produce does not wake the fetch, the clock jumps to this bound and the test fails.
    with trio.fail_after(LONG_POLL_MS / 1000 / 30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll)
            await trio.testing.wait_all_tasks_blocked()
            assert results == []  # parked: there is nothing to read
            started = trio.current_time()
            await broker.produce("t", batch(b"new"))
    assert trio.current_time() == started  # woken at once, not by a timeout
    result, data = results[0]
    assert result["error_code"] == 0 and result["high_watermark"] == 1
    assert [r.value for r in decode_records(data)] == [b"new"]


async def test_a_long_poll_on_several_partitions_is_woken_by_any(broker, autojump_clock):
    await broker.create("t", partitions=2)
    body = {
        "max_wait_ms": LONG_POLL_MS,
        "topics": [
            {
                "topic": "t",
                "partitions": [
                    {"partition": 0, "fetch_offset": 0},
                    {"partition": 1, "fetch_offset": 0},
                ],
            }
        ],
    }
    replies = []

    async def long_poll() -> None:
        replies.append(await broker.call(ApiKey.FETCH, body))

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll)
            await trio.testing.wait_all_tasks_blocked()
            assert replies == []
            await broker.produce("t", b"", batch(b"p1"))  # partition 0 fails (empty)
    partitions = replies[0].body["topics"][0]["partitions"]
    assert [p["size"] > 0 for p in partitions] == [False, True]
    replies[0].close()


async def test_a_fetch_under_always_is_woken_by_the_fsync(tmp_path, fdatasync_spy):
    async with open_broker(tmp_path, fsync="always") as broker:
        await broker.create("t")
        spy = fdatasync_spy(hold=True)
        results = []

        async def long_poll() -> None:
            results.append(await broker.fetch("t", 0, max_wait_ms=LONG_POLL_MS))

        with trio.fail_after(10):  # the real clock: far below the 60 s long poll
            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_poll)
                finish = await broker.start_produce("t", [batch(b"a")])
                nursery.start_soon(finish)
                await trio.to_thread.run_sync(spy.entered.wait, 10)
                await trio.testing.wait_all_tasks_blocked()
                assert results == []  # appended, not durable: not visible
                spy.release.set()
        assert results[0][0]["high_watermark"] == 1
        assert [r.value for r in decode_records(results[0][1])] == [b"a"]


async def test_min_bytes_holds_the_fetch_until_enough_data(broker, autojump_clock):
    await broker.create("t")
    one = batch(b"x" * 50)
    results = []

    async def long_poll() -> None:
        results.append(await broker.fetch("t", 0, max_wait_ms=LONG_POLL_MS, min_bytes=2 * len(one)))

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll)
            await trio.testing.wait_all_tasks_blocked()
            await broker.produce("t", one)
            await trio.testing.wait_all_tasks_blocked()
            assert results == []  # one batch is below min_bytes: still waiting
            await broker.produce("t", batch(b"y" * 50))
    result, data = results[0]
    assert result["size"] == len(data) >= 2 * len(one)
    assert len(decode_records(data)) == 2


async def test_max_wait_bounds_a_fetch_that_gets_nothing(broker, autojump_clock):
    await broker.create("t")
    started = trio.current_time()
    with trio.fail_after(2):
        result, data = await broker.fetch("t", 0, max_wait_ms=500)
    assert trio.current_time() - started == pytest.approx(0.5)  # virtual time
    assert (result["error_code"], result["size"], data) == (0, 0, b"")


async def test_a_fetch_that_fails_returns_at_once_despite_max_wait(broker, autojump_clock):
    await broker.create("t")
    with trio.fail_after(1):
        unknown, _ = await broker.fetch("nope", 0, max_wait_ms=LONG_POLL_MS)
        beyond, _ = await broker.fetch("t", 5, max_wait_ms=LONG_POLL_MS)
        negative, _ = await broker.fetch("t", -1, max_wait_ms=LONG_POLL_MS)
        bad_size, _ = await broker.fetch("t", 0, max_wait_ms=LONG_POLL_MS, partition_max_bytes=0)
    assert unknown["error_code"] == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    assert beyond["error_code"] == ErrorCode.OFFSET_OUT_OF_RANGE
    assert beyond["high_watermark"] == 0
    assert negative["error_code"] == ErrorCode.OFFSET_OUT_OF_RANGE
    assert bad_size["error_code"] == ErrorCode.INVALID_FETCH_SIZE


async def test_fetch_sizes_limit_the_reply_but_the_first_batch_is_whole(broker):
    await broker.create("t")
    for number in range(3):
        await broker.produce("t", batch(b"%d" % number * 40))
    size = len(batch(b"0" * 40))  # every batch has this size

    def values(data: bytes) -> list[bytes]:
        return [r.value[:1] for r in decode_records(data, allow_partial_tail=True)]

    _, everything = await broker.fetch("t", 0)
    assert len(everything) == 3 * size and values(everything) == [b"0", b"1", b"2"]
    _, data = await broker.fetch("t", 0, partition_max_bytes=1)
    assert data == everything[:size]  # one byte asked: still one whole batch
    result, data = await broker.fetch("t", 0, max_bytes=size + 10)
    assert result["size"] == len(data) == size + 10  # whole first batch, the rest cut short
    assert data == everything[: size + 10]
    _, data = await broker.fetch("t", 0, partition_max_bytes=2 * size)
    assert data == everything[: 2 * size]
    _, data = await broker.fetch("t", 1)  # the second batch's offset
    assert data == everything[size:]


async def test_fetch_max_bytes_is_shared_by_the_partitions(broker):
    await broker.create("t", partitions=2)
    one = batch(b"z" * 100)
    await broker.produce("t", one, one)
    body = {
        "max_bytes": len(one),
        "topics": [
            {
                "topic": "t",
                "partitions": [
                    {"partition": 0, "fetch_offset": 0},
                    {"partition": 1, "fetch_offset": 0},
                ],
            }
        ],
    }
    reply = await broker.call(ApiKey.FETCH, body)
    reply.close()
    sizes = [p["size"] for p in reply.body["topics"][0]["partitions"]]
    assert sizes == [len(one), 0]
    assert reply.tail_bytes == len(one)


async def test_a_fetch_reads_nothing_above_the_high_watermark(tmp_path, fdatasync_spy):
    async with open_broker(tmp_path, fsync="always") as broker:
        await broker.create("t")
        await broker.produce("t", batch(b"durable"))
        spy = fdatasync_spy(hold=True)
        finish = await broker.start_produce("t", [batch(b"pending")])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(finish)
            await trio.to_thread.run_sync(spy.entered.wait, 10)
            result, data = await broker.fetch("t", 0)
            assert result["high_watermark"] == 1
            assert [r.value for r in decode_records(data)] == [b"durable"]
            latest = await broker.list_offset("t", LATEST_TIMESTAMP)
            assert latest["offset"] == 1  # the high watermark, not the log end offset
            spy.release.set()
        assert (await broker.list_offset("t", LATEST_TIMESTAMP))["offset"] == 2


# -- list offsets -----------------------------------------------------------------------


async def test_list_offsets_earliest_latest_and_by_timestamp(broker):
    await broker.create("t")
    await broker.produce("t", batch(b"a", b"b", timestamp_ms=1_000))
    await broker.produce("t", batch(b"c", timestamp_ms=2_000))
    assert (await broker.list_offset("t", EARLIEST_TIMESTAMP))["offset"] == 0
    assert (await broker.list_offset("t", LATEST_TIMESTAMP))["offset"] == 3
    found = await broker.list_offset("t", 1_500)
    assert (found["offset"], found["timestamp"]) == (2, 2_000)
    assert (await broker.list_offset("t", 500))["offset"] == 0
    missing = await broker.list_offset("t", 3_000)
    assert (missing["error_code"], missing["offset"]) == (0, -1)


async def test_list_offsets_refuses_unknown_partitions_and_bad_timestamps(broker):
    await broker.create("t")
    assert (await broker.list_offset("nope", LATEST_TIMESTAMP))[
        "error_code"
    ] == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    assert (await broker.list_offset("t", LATEST_TIMESTAMP, partition=3))[
        "error_code"
    ] == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    assert (await broker.list_offset("t", -3))["error_code"] == ErrorCode.INVALID_REQUEST


# -- topics -----------------------------------------------------------------------------


async def create_result(broker: Broker, validate_only: bool = False, **entry) -> dict:
    reply = await broker.call(
        ApiKey.CREATE_TOPICS, {"topics": [entry], "validate_only": validate_only}
    )
    return reply.body["topics"][0]


@pytest.mark.parametrize(
    ("entry", "code"),
    [
        ({"topic": "", "partitions": 1}, ErrorCode.INVALID_TOPIC),
        ({"topic": "a/b", "partitions": 1}, ErrorCode.INVALID_TOPIC),
        ({"topic": "..", "partitions": 1}, ErrorCode.INVALID_TOPIC),
        ({"topic": "t", "partitions": 0}, ErrorCode.INVALID_PARTITIONS),
        (
            {"topic": "t", "partitions": 1, "replication_factor": 3},
            ErrorCode.INVALID_REPLICATION_FACTOR,
        ),
        ({"topic": "t", "configs": {"fsync.policy": "sometimes"}}, ErrorCode.INVALID_CONFIG),
        ({"topic": "t", "configs": {"no.such.config": "1"}}, ErrorCode.INVALID_CONFIG),
        ({"topic": "__consumer_offsets"}, ErrorCode.POLICY_VIOLATION),
    ],
)
async def test_invalid_topics_are_refused_and_not_created(broker, entry, code):
    for validate_only in (True, False):
        result = await create_result(broker, validate_only, **entry)
        assert result["error_code"] == code, result
    assert broker.registry.topics == {}


async def test_validate_only_creates_nothing_and_existing_topics_are_refused(broker):
    assert (await create_result(broker, True, topic="t", partitions=2))["error_code"] == 0
    assert "t" not in broker.registry.topics
    assert (await create_result(broker, topic="t", partitions=2))["error_code"] == 0
    assert broker.registry.topics["t"].partitions == 2
    again = await create_result(broker, topic="t", partitions=2)
    assert again["error_code"] == ErrorCode.TOPIC_ALREADY_EXISTS


async def test_delete_topics_reports_each_topic(broker):
    await broker.create("t")
    await broker.produce("t", batch(b"a"))
    reply = await broker.call(ApiKey.DELETE_TOPICS, {"topics": ["t", "nope", "__consumer_offsets"]})
    assert [r["error_code"] for r in reply.body["topics"]] == [
        0,
        ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
        ErrorCode.POLICY_VIOLATION,
    ]
    assert "t" not in broker.registry.topics
    await broker.create("t")  # a new topic of the same name starts again at offset 0
    assert (await broker.produce("t", batch(b"b")))[0]["base_offset"] == 0


async def test_the_internal_topic_cannot_be_deleted_or_grown(broker):
    await broker.handlers.coordinator.ensure_offsets_topic()
    reply = await broker.call(ApiKey.DELETE_TOPICS, {"topics": ["__consumer_offsets"]})
    assert reply.body["topics"][0]["error_code"] == ErrorCode.POLICY_VIOLATION
    reply = await broker.call(
        ApiKey.CREATE_PARTITIONS, {"topics": [{"topic": "__consumer_offsets", "count": 99}]}
    )
    assert reply.body["topics"][0]["error_code"] == ErrorCode.POLICY_VIOLATION
    assert "__consumer_offsets" in broker.registry.topics


async def test_create_partitions_only_grows(broker):
    await broker.create("t", partitions=2)
    for count, validate_only, code in [
        (2, False, ErrorCode.INVALID_PARTITIONS),
        (1, True, ErrorCode.INVALID_PARTITIONS),
        (4, True, ErrorCode.NONE),
    ]:
        reply = await broker.call(
            ApiKey.CREATE_PARTITIONS,
            {"topics": [{"topic": "t", "count": count}], "validate_only": validate_only},
        )
        assert reply.body["topics"][0]["error_code"] == code
    assert broker.registry.topics["t"].partitions == 2
    reply = await broker.call(ApiKey.CREATE_PARTITIONS, {"topics": [{"topic": "t", "count": 3}]})
    assert reply.body["topics"][0]["error_code"] == 0
    assert [r["error_code"] for r in await broker.produce("t", b"", b"", batch(b"c"))][2] == 0


async def test_metadata_reports_unknown_topics_and_auto_creates_only_when_asked(tmp_path):
    async with open_broker(tmp_path, auto_create=True) as broker:
        reply = await broker.call(ApiKey.METADATA, {"topics": ["a"]})
        assert reply.body["topics"][0]["error_code"] == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
        assert "a" not in broker.registry.topics
        reply = await broker.call(
            ApiKey.METADATA, {"topics": ["a"], "allow_auto_topic_creation": True}
        )
        [topic] = reply.body["topics"]
        assert topic["error_code"] == 0 and len(topic["partitions"]) == 1
        assert topic["partitions"][0]["leader"] == broker.config.node_id
        reply = await broker.call(ApiKey.METADATA, {})
        assert [t["topic"] for t in reply.body["topics"]] == ["a"]


# -- configs ----------------------------------------------------------------------------


async def alter(broker: Broker, validate_only: bool = False, **changes) -> dict:
    reply = await broker.call(
        ApiKey.ALTER_CONFIGS,
        {"topic": "t", "set": changes, "validate_only": validate_only},
    )
    return reply.body["configs"]


async def described_configs(broker: Broker) -> dict:
    reply = await broker.call(ApiKey.DESCRIBE_TOPICS, {"topics": ["t"]})
    return reply.body["topics"][0]["configs"]


async def test_alter_configs_checks_values_and_validate_only_changes_nothing(broker):
    await broker.create("t")
    before = await described_configs(broker)
    assert (await alter(broker, True, **{"retention.ms": "1000"}))["retention.ms"] == "1000"
    assert await described_configs(broker) == before
    with pytest.raises(DwalError) as caught:
        await alter(broker, **{"fsync.policy": "sometimes"})
    assert caught.value.code == ErrorCode.INVALID_CONFIG
    assert await described_configs(broker) == before
    await alter(broker, **{"retention.ms": "1000"})
    assert (await described_configs(broker))["retention.ms"] == "1000"
    assert broker.registry.log("t", 0).config.retention_ms == 1000


async def test_relaxing_fsync_always_makes_appended_records_visible(tmp_path, fdatasync_spy):
    async with open_broker(tmp_path, fsync="always") as broker:
        await broker.create("t")
        spy = fdatasync_spy(hold=True)
        finish = await broker.start_produce("t", [batch(b"a")])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(finish)
            await trio.to_thread.run_sync(spy.entered.wait, 10)
            assert (await broker.fetch("t", 0))[0]["high_watermark"] == 0
            # the record's fdatasync is still held (the metadata log's are not spied on)
            await alter(broker, **{"fsync.policy": "never"})
            result, data = await broker.fetch("t", 0)
            assert result["high_watermark"] == 1
            assert [r.value for r in decode_records(data)] == [b"a"]
            spy.release.set()
