"""The Consumer's API for users of Kafka clients: iteration, capped polls, records that say
where they come from, pause and resume, offsets lookups, commit metadata, the lost and revoke
callbacks, Kafka's option spellings, deserializers, and typed errors for bad broker data.

Real in-process brokers (`broker`; `group_broker` has short group timeouts) except for the
bad-data tests, which use the scripted fake broker. Waits are bounded (`trio.fail_after`);
nothing sleeps to wait for a condition.
"""

from __future__ import annotations

import json
import struct

import pytest
import trio
from client_test_support import wait_for_assignment
from fake_broker import FakeBroker, FakeTopic

import client
from client import (
    Admin,
    Consumer,
    CorruptRecordError,
    DwalError,
    ErrorCode,
    MalformedResponseError,
    OffsetAndMetadata,
    Producer,
    RecordDeserializationError,
    TopicPartition,
    UnknownOptionError,
)
from client.cluster import PartitionInfo, TopicInfo
from protocol import ApiKey, ProtocolError, build_batch
from protocol.record_batch import crc_of

T0 = TopicPartition("t", 0)
T1 = TopicPartition("t", 1)


async def produce(cluster, topic: str, values, *, partition: int = 0, key=None) -> None:
    """Send `values` to one partition and wait until all are stored."""
    async with Producer(cluster, linger_ms=1) as producer:
        for value in values:
            await producer.send(topic, value, key=key, partition=partition)


async def make_topic(cluster, name: str = "t", partitions: int = 1) -> None:
    await Admin(cluster).create_topic(name, partitions=partitions)


async def poll_until(consumer: Consumer, count: int, **poll_options) -> list:
    """Poll until `count` records came; returns them in the order returned."""
    seen: list = []
    with trio.fail_after(20):
        while len(seen) < count:
            for records in (await consumer.poll(timeout_ms=100, **poll_options)).values():
                seen.extend(records)
    return seen


def values_of(records) -> list:
    return [record.value for record in records]


# -- records say where they come from --------------------------------------------------


async def test_records_carry_their_topic_and_partition(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await make_topic(cluster, "where", partitions=3)
        for partition in range(3):
            await produce(
                cluster,
                "where",
                [b"p%d-%d" % (partition, n) for n in range(4)],
                partition=partition,
            )
        consumer = Consumer(cluster, auto_offset_reset="earliest")
        await consumer.assign_topic("where")
        seen = 0
        with trio.fail_after(20):
            while seen < 12:
                for tp, records in (await consumer.poll(timeout_ms=100)).items():
                    for record in records:
                        assert (record.topic, record.partition) == tp
                        assert record.value.startswith(b"p%d-" % tp.partition)
                    seen += len(records)
        flat = []
        consumer.assign([("where", p) for p in range(3)])
        for tp in consumer.assignment():
            consumer.seek(tp, 0)
        async for batch in consumer.batches():
            flat.extend(batch)
            if len(flat) == 12:
                break
        assert sorted((r.partition, r.offset) for r in flat) == [
            (p, n) for p in range(3) for n in range(4)
        ]
        assert all(r.topic == "where" for r in flat)


# -- capped polls -------------------------------------------------------------------------


async def test_max_poll_records_caps_a_poll_and_keeps_the_rest_without_refetching(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await make_topic(cluster)
        await produce(cluster, "t", [b"%d" % n for n in range(10)])
        consumer = Consumer(cluster, auto_offset_reset="earliest", max_poll_records=3)
        consumer.assign([T0])
        consumer.seek(T0, 0)
        sizes, positions, buffered = [], [], []
        with trio.fail_after(20):
            while consumer.position(T0) != 10:
                records = (await consumer.poll(timeout_ms=100)).get(T0, [])
                if records:
                    sizes.append(len(records))
                    positions.append(consumer.position(T0))
                    buffered.append(consumer.statistics().buffered_records)
        assert sizes == [3, 3, 3, 1]
        assert positions == [3, 6, 9, 10]
        assert buffered == [7, 4, 1, 0]
        # the records came in one fetch: the capped polls did not fetch again
        assert consumer.statistics().fetches == 1
        assert consumer.statistics().records_returned == 10


async def test_poll_max_records_overrides_the_option_and_positions_follow(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await make_topic(cluster)
        await produce(cluster, "t", [b"%d" % n for n in range(5)])
        consumer = Consumer(cluster, max_poll_records=100)
        consumer.assign([T0])
        consumer.seek(T0, 0)
        first = await poll_until(consumer, 2, max_records=2)
        assert [r.offset for r in first] == [0, 1] and consumer.position(T0) == 2
        rest = await poll_until(consumer, 3)
        assert [r.offset for r in rest] == [2, 3, 4]
        with pytest.raises(ValueError):
            await consumer.poll(max_records=0)
        with pytest.raises(ValueError):
            Consumer(cluster, max_poll_records=0)


async def test_a_capped_poll_commits_only_what_it_returned(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        await make_topic(cluster)
        await produce(cluster, "t", [b"%d" % n for n in range(10)])
        consumer = Consumer(
            cluster,
            group_id="capped",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=4,
        )
        consumer.assign([T0])
        records = await poll_until(consumer, 4)
        assert len(records) == 4
        await consumer.commit()
        assert await consumer.committed([T0]) == {T0: 4}


# -- iteration ------------------------------------------------------------------------------


async def test_iteration_returns_every_record_in_order_and_follows_new_ones(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await make_topic(cluster)
        await produce(cluster, "t", [b"a%d" % n for n in range(5)])
        consumer = Consumer(cluster, auto_offset_reset="earliest", max_wait_ms=100)
        consumer.assign([T0])
        seen = []
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                async for record in consumer:
                    seen.append(record)
                    if len(seen) == 5:  # caught up: more arrive while it waits
                        nursery.start_soon(produce, cluster, "t", [b"b0", b"b1"])
                    if len(seen) == 7:
                        break
        assert [r.offset for r in seen] == list(range(7))
        assert values_of(seen) == [b"a0", b"a1", b"a2", b"a3", b"a4", b"b0", b"b1"]
        assert all(r.topic == "t" and r.partition == 0 for r in seen)
        assert consumer.position(T0) == 7


async def test_cancelled_iteration_loses_and_repeats_nothing(broker):
    total = 1000
    async with client.connect(broker.bootstrap) as cluster:
        await make_topic(cluster)
        await produce(cluster, "t", [b"%d" % n for n in range(total)])
        consumer = Consumer(cluster, auto_offset_reset="earliest", max_wait_ms=50)
        consumer.assign([T0])
        offsets: list[int] = []
        rounds = 0

        async def cancel(scope: trio.CancelScope) -> None:
            scope.cancel()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                while len(offsets) < total:
                    rounds += 1
                    # cancelled after a varying number of records: from inside the loop body
                    # on odd rounds, from another task (running whenever the iteration
                    # lets other tasks run) on even ones
                    with trio.CancelScope() as scope:
                        async for record in consumer:
                            assert not scope.cancel_called, "a record after the cancel"
                            offsets.append(record.offset)
                            if len(offsets) % (rounds % 7 + 1) == 0:
                                if rounds % 2:
                                    scope.cancel()
                                else:
                                    nursery.start_soon(cancel, scope)
                    # the position is past every record returned, and only those
                    assert consumer.position(T0) == offsets[-1] + 1
                    # every third round, a poll takes over where the iteration stopped
                    if rounds % 3 == 0:
                        polled = await consumer.poll(timeout_ms=50, max_records=3)
                        for records in polled.values():
                            offsets.extend(r.offset for r in records)
        assert offsets == list(range(total))
        assert consumer.position(T0) == total
        # cancelled while waiting for records that never come: nothing taken
        with trio.move_on_after(0.2) as waiting:
            async for record in consumer:
                raise AssertionError(f"unexpected {record}")
        assert waiting.cancelled_caught and consumer.position(T0) == total


async def test_iteration_commits_automatically_what_it_returned_before(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        await make_topic(cluster)
        await produce(cluster, "t", [b"%d" % n for n in range(20)])
        consumer = Consumer(
            cluster, group_id="iterating", auto_offset_reset="earliest", auto_commit_interval_ms=0
        )  # due at every step
        consumer.assign([T0])
        with trio.fail_after(20):
            async for record in consumer:
                if record.offset == 9:
                    break
        # the step that returned offset 9 committed what came before it: being asked for
        # the next record means the application is done with the previous one
        assert await consumer.committed([T0]) == {T0: 9}


async def test_iteration_applies_group_changes_between_records(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        await make_topic(cluster, partitions=2)
        first = Consumer(cluster, group_id="moving", auto_offset_reset="earliest")
        first.subscribe(["t"])
        await wait_for_assignment(first, 2)
        await produce(cluster, "t", [b"zero-%d" % n for n in range(10)], partition=0)
        await produce(cluster, "t", [b"one-%d" % n for n in range(10)], partition=1)
        with trio.fail_after(20):
            while first.statistics().buffered_records < 10:  # records of both wait
                await first.poll(timeout_ms=100, max_records=1)
        membership = first._membership
        assert membership is not None
        changed = membership.changed
        second = Consumer(cluster, group_id="moving", auto_offset_reset="earliest")
        second.subscribe(["t"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_assignment, second, 1)
            with trio.fail_after(20):
                await changed.wait()  # the group wants a partition of `first` back
            record = await first.__anext__()  # one step: it gives the partition up first
            assert len(first.assignment()) == 1
            assert (record.topic, record.partition) in first.assignment()
        await first.close()
        await second.close()


async def test_batches_are_lists_of_at_most_max_records_and_report_idle_time(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await make_topic(cluster)
        await produce(cluster, "t", [b"%d" % n for n in range(10)])
        consumer = Consumer(cluster, auto_offset_reset="earliest")
        consumer.assign([T0])
        sizes = []
        with trio.fail_after(20):
            async for batch in consumer.batches(max_records=4):
                assert batch, "without timeout_ms no empty batch is yielded"
                sizes.append(len(batch))
                if sum(sizes) == 10:
                    break
            assert sizes == [4, 4, 2]
            idle = []
            async for batch in consumer.batches(timeout_ms=50):
                idle.append(batch)
                if len(idle) == 2:
                    break
        assert idle == [[], []]
        assert consumer.position(T0) == 10


# -- pause and resume -----------------------------------------------------------------------


async def test_paused_partitions_are_neither_fetched_nor_returned_until_resumed(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await make_topic(cluster, partitions=2)
        await produce(cluster, "t", [b"zero-%d" % n for n in range(5)], partition=0)
        await produce(cluster, "t", [b"one-%d" % n for n in range(5)], partition=1)
        consumer = Consumer(cluster, auto_offset_reset="earliest")
        consumer.assign([T0, T1])
        with trio.fail_after(20):
            while consumer.statistics().buffered_records == 0:  # one fetch, both partitions
                first = await consumer.poll(timeout_ms=100, max_records=1)
        (taken,) = first  # one record, of either partition
        other = T1 if taken == T0 else T0
        assert consumer.statistics().buffered_records == 9
        # paused with records buffered: they wait
        consumer.pause([other])
        assert consumer.paused() == {other}
        rest = await poll_until(consumer, 4)
        assert {(r.topic, r.partition) for r in rest} == {taken}
        assert await consumer.poll(timeout_ms=100) == {}
        assert consumer.statistics().buffered_records == 5
        assert consumer.statistics().paused_partitions == 1
        # paused with nothing buffered: not fetched (its high watermark is not even learnt)
        consumer.pause([taken])
        high_watermark = consumer.high_watermark(taken)
        await produce(cluster, "t", [b"late"], partition=taken.partition)
        assert await consumer.poll(timeout_ms=200) == {}
        assert consumer.high_watermark(taken) == high_watermark
        fetches = consumer.statistics().fetches
        consumer.resume([other])
        assert consumer.paused() == {taken}
        resumed = await consumer.poll(timeout_ms=100)
        assert list(resumed) == [other] and len(resumed[other]) == 5
        assert consumer.statistics().fetches == fetches  # they came from the buffer
        consumer.resume([taken])
        late = await poll_until(consumer, 1)
        assert values_of(late) == [b"late"] and consumer.high_watermark(taken) == 6


async def test_pause_and_resume_refuse_unassigned_partitions_and_assign_drops_pauses(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await make_topic(cluster, partitions=2)
        consumer = Consumer(cluster)
        consumer.assign([T0, T1])
        with pytest.raises(ValueError):
            consumer.pause([TopicPartition("t", 5)])
        with pytest.raises(ValueError):
            consumer.resume([("other", 0)])
        consumer.pause([("t", 0), T1])
        assert consumer.paused() == {T0, T1}
        consumer.assign([T1])
        assert consumer.paused() == {T1}


async def test_a_paused_group_member_keeps_its_assignment(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        await make_topic(cluster, partitions=2)
        async with Consumer(cluster, group_id="pausing", auto_offset_reset="earliest") as member:
            member.subscribe(["t"])
            await wait_for_assignment(member, 2)
            member_id = member.member_id
            member.pause(member.assignment())
            await produce(cluster, "t", [b"while paused"], partition=0)
            # longer than the session timeout (1.5 s): heartbeats keep the member in
            with trio.move_on_after(2.5):
                while True:
                    assert await member.poll(timeout_ms=100) == {}
            assert set(member.assignment()) == {T0, T1}
            assert member.member_id == member_id
            member.resume(member.assignment())
            records = await poll_until(member, 1)
            assert values_of(records) == [b"while paused"]


# -- positions and offsets ------------------------------------------------------------------


async def test_seek_to_committed_goes_back_to_the_committed_offsets(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        await make_topic(cluster, partitions=2)
        await produce(cluster, "t", [b"%d" % n for n in range(8)], partition=0)
        await produce(cluster, "t", [b"%d" % n for n in range(3)], partition=1)
        consumer = Consumer(
            cluster, group_id="rewind", enable_auto_commit=False, auto_offset_reset="earliest"
        )
        consumer.assign([T0, T1])
        await poll_until(consumer, 11)
        await consumer.commit({T0: 4})  # T1: nothing committed
        assert consumer.position(T0) == 8
        await consumer.seek_to_committed()
        assert consumer.position(T0) == 4
        assert consumer.position(T1) is None  # auto_offset_reset decides at the next poll
        again = await poll_until(consumer, 7)
        assert sorted((r.partition, r.offset) for r in again) == (
            [(0, n) for n in range(4, 8)] + [(1, n) for n in range(3)]
        )
        with pytest.raises(ValueError):
            await consumer.seek_to_committed([TopicPartition("t", 9)])
        with pytest.raises(RuntimeError):
            await Consumer(cluster).seek_to_committed()


async def test_beginning_end_offsets_and_offsets_for_times(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await make_topic(cluster)
        async with Producer(cluster, linger_ms=0) as producer:
            for n in range(10):  # one batch per record: offsets for times are exact
                await producer.send("t", b"%d" % n, timestamp_ms=1_000 * (n + 1))
                await producer.flush()
        consumer = Consumer(cluster)  # nothing assigned: the lookups take any partition
        assert await consumer.beginning_offsets([T0]) == {T0: 0}
        assert await consumer.end_offsets([("t", 0)]) == {T0: 10}
        assert await consumer.offsets_for_times({T0: 3_500}) == {T0: 3}
        assert await consumer.offsets_for_times({T0: 0}) == {T0: 0}
        assert await consumer.offsets_for_times({T0: 99_999}) == {T0: None}
        with pytest.raises(DwalError) as info:
            await consumer.end_offsets([TopicPartition("missing", 0)])
        assert info.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
        with pytest.raises(ValueError):
            await consumer.offsets_for_times({T0: -5})


async def test_commit_stores_metadata_with_each_offset(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        await make_topic(cluster, partitions=2)
        consumer = Consumer(cluster, group_id="notes", enable_auto_commit=False)
        consumer.assign([T0, T1])
        await consumer.commit({T0: OffsetAndMetadata(5, "checkpoint 5"), T1: (7, "seven")})
        assert await consumer.committed([T0, T1], with_metadata=True) == {
            T0: OffsetAndMetadata(5, "checkpoint 5"),
            T1: OffsetAndMetadata(7, "seven"),
        }
        assert await consumer.committed([T0, T1]) == {T0: 5, T1: 7}
        # a commit replaces both: without metadata, none is stored
        await consumer.commit({T0: 6})
        committed = await consumer.committed([T0, TopicPartition("t", 1)], with_metadata=True)
        assert committed[T0] == OffsetAndMetadata(6, None)
        assert committed[T1].metadata == "seven"
        # another client sees the same
        other = Consumer(cluster, group_id="notes")
        assert (await other.committed([T1], with_metadata=True))[T1] == (7, "seven")
        never = Consumer(cluster, group_id="nothing-yet")
        assert await never.committed([T0], with_metadata=True) == {T0: OffsetAndMetadata(-1)}
        with pytest.raises(TypeError):
            await consumer.commit({T0: (8, b"bytes")})


async def test_commit_metadata_survives_a_broker_restart(broker_launcher, tmp_path):
    data = tmp_path / "data"
    first = await broker_launcher.start(data)
    async with client.connect(first.bootstrap) as cluster:
        await make_topic(cluster)
        consumer = Consumer(cluster, group_id="durable-notes")
        await consumer.commit({T0: OffsetAndMetadata(3, "after restart too")})
    assert await broker_launcher.stop(first) == 0
    second = await broker_launcher.start(data)  # the coordinator reloads __consumer_offsets
    async with client.connect(second.bootstrap) as cluster:
        consumer = Consumer(cluster, group_id="durable-notes")
        with trio.fail_after(20):
            while True:  # the coordinator answers once it has loaded its partitions
                try:
                    committed = await consumer.committed([T0], with_metadata=True)
                    break
                except DwalError as error:
                    if not error.retriable:
                        raise
                    await trio.lowlevel.checkpoint()
        assert committed == {T0: OffsetAndMetadata(3, "after restart too")}


# -- the revoke and lost callbacks ----------------------------------------------------------


def fence(member: Consumer) -> None:
    """Stop the member's heartbeats, as a paused process's would stop."""
    membership = member._membership
    assert membership is not None and membership._scope is not None
    membership._scope.cancel()


async def lose_partitions(cluster, member: Consumer, group: str) -> None:
    """Let the group remove `member` (a survivor takes its partitions), then let it
    heartbeat again, so that it hears it was removed."""
    fence(member)
    async with Consumer(cluster, group_id=group, auto_offset_reset="earliest") as survivor:
        survivor.subscribe(["t"])
        await wait_for_assignment(survivor, 2)  # only after the member's session expired
        member._membership.start()  # type: ignore[union-attr]


@pytest.mark.parametrize("with_on_lost", [True, False], ids=["on_lost", "fallback"])
async def test_partitions_lost_go_to_on_lost_not_on_revoked(group_broker, with_on_lost):
    calls: list[tuple[str, set]] = []
    async with client.connect(group_broker.bootstrap) as cluster:
        await make_topic(cluster, partitions=2)
        member = Consumer(
            cluster,
            group_id="lost",
            auto_offset_reset="earliest",
            on_revoked=lambda partitions: calls.append(("revoked", partitions)),
            on_lost=(lambda partitions: calls.append(("lost", partitions)))
            if with_on_lost
            else None,
        )
        member.subscribe(["t"])
        await wait_for_assignment(member, 2)
        await lose_partitions(cluster, member, "lost")
        with trio.fail_after(20):
            while not calls:
                await member.poll(timeout_ms=50)
        expected = "lost" if with_on_lost else "revoked"  # Kafka's Java client falls back
        assert calls[0] == (expected, {T0, T1})
        await member.close()


async def test_revoked_partitions_are_committed_before_on_revoked_runs(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        await make_topic(cluster, partitions=2)
        seen_in_callback: list = []

        async def revoked(partitions: set[TopicPartition]) -> None:
            # still owned while the callback runs, and already committed (auto-commit)
            assert partitions <= set(first.assignment())
            committed = await first.committed(partitions)
            seen_in_callback.append((partitions, committed))

        first = Consumer(
            cluster, group_id="handover", auto_offset_reset="earliest", on_revoked=revoked
        )
        first.subscribe(["t"])
        await wait_for_assignment(first, 2)  # polls: records come after it
        await produce(cluster, "t", [b"a", b"b"], partition=0)
        await produce(cluster, "t", [b"c", b"d"], partition=1)
        await poll_until(first, 4)
        second = Consumer(cluster, group_id="handover", auto_offset_reset="earliest")
        second.subscribe(["t"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_assignment, first, 1)
            nursery.start_soon(wait_for_assignment, second, 1)
        ((partitions, committed),) = seen_in_callback
        (moved,) = partitions
        assert committed == {moved: 2}
        assert first.assignment() == [next(iter({T0, T1} - partitions))]
        await first.close()
        await second.close()


async def test_close_commits_then_calls_on_revoked_with_every_partition(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        await make_topic(cluster, partitions=2)
        calls: list = []

        async def revoked(partitions: set[TopicPartition]) -> None:
            calls.append((partitions, await member.committed(partitions)))

        async with Consumer(
            cluster, group_id="closing", auto_offset_reset="earliest", on_revoked=revoked
        ) as member:
            member.subscribe(["t"])
            await wait_for_assignment(member, 2)
            await produce(cluster, "t", [b"a", b"b", b"c"], partition=0)
            await poll_until(member, 3)
            assert not calls
        assert calls == [({T0, T1}, {T0: 3, T1: 0})]  # every position, committed first
        assert member.assignment() == [] and member.member_id is None


# -- Kafka's option names -------------------------------------------------------------------


async def test_kafka_option_names_as_keyword_arguments(broker):
    async with client.connect(broker.bootstrap) as cluster:
        consumer = Consumer(
            cluster,
            fetch_min_bytes=10,
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=4096,
            fetch_max_bytes=8192,
            max_poll_interval_ms=30_000,
            group_id="kafka-names",
            group_instance_id="host-1",
            auto_offset_reset="smallest",
            enable_auto_commit=False,
            auto_commit_interval_ms=1_000,
            retry_backoff_ms=50,
            retry_backoff_max_ms=500,
            max_poll_records=7,
        )
        assert (consumer.min_bytes, consumer.max_wait_ms) == (10, 100)
        assert (consumer.partition_max_bytes, consumer.fetch_max_bytes) == (4096, 8192)
        assert consumer._membership.rebalance_timeout_ms == 30_000  # type: ignore[union-attr]
        assert consumer._membership.instance_id == "host-1"  # type: ignore[union-attr]
        assert consumer.auto_offset_reset == "earliest"
        assert not consumer.enable_auto_commit and consumer.auto_commit_interval_s == 1.0
        assert (consumer.retry_backoff_s, consumer.retry_backoff_max_s) == (0.05, 0.5)
        assert consumer.max_poll_records == 7
        assert Consumer(cluster, auto_offset_reset="largest").auto_offset_reset == "latest"
        assert Consumer(cluster, auto_offset_reset="none").auto_offset_reset == "error"


async def test_from_config_takes_kafka_dotted_names_and_string_values(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await make_topic(cluster)
        await produce(cluster, "t", [b'{"n": %d}' % n for n in range(5)], key=b"k")
        consumer = Consumer.from_config(
            cluster,
            {
                "group.id": "configured",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": "false",
                "max.poll.records": "2",
                "fetch.min.bytes": "1",
                "fetch.max.wait.ms": 200,
                "max.poll.interval.ms": "45000",
                "value.deserializer": json.loads,
                "key_deserializer": bytes.decode,  # underscored spellings too
            },
            skip_corrupt=True,  # DWAL's own keywords pass through
        )
        assert consumer.group_id == "configured" and not consumer.enable_auto_commit
        assert consumer.max_wait_ms == 200 and consumer.skip_corrupt
        assert consumer._membership.rebalance_timeout_ms == 45_000  # type: ignore[union-attr]
        consumer.assign([T0])
        first = (await consumer.poll(timeout_ms=1000))[T0]
        assert [(r.key, r.value) for r in first] == [("k", {"n": 0}), ("k", {"n": 1})]


def test_unknown_and_misplaced_options_say_what_to_use():
    cluster = object()  # never reached: options are checked first
    with pytest.raises(UnknownOptionError) as info:
        Consumer(cluster, fetch_min_byte=1)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError) and "fetch.min.bytes" in str(info.value)
    with pytest.raises(UnknownOptionError, match="group_session_timeout_ms"):
        Consumer.from_config(cluster, {"session.timeout.ms": 10_000})  # type: ignore[arg-type]
    with pytest.raises(UnknownOptionError, match="client_id"):
        Consumer.from_config(cluster, {"client.id": "me"})  # type: ignore[arg-type]
    with pytest.raises(UnknownOptionError, match="same option"):
        Consumer(cluster, min_bytes=5, fetch_min_bytes=6)  # type: ignore[arg-type]
    with pytest.raises(UnknownOptionError, match="same option"):
        Consumer.from_config(cluster, {"fetch.min.bytes": 1}, min_bytes=2)  # type: ignore[arg-type]
    with pytest.raises(UnknownOptionError, match="same option"):
        Consumer.from_config(cluster, {"fetch.min.bytes": 1}, fetch_min_bytes=2)  # type: ignore[arg-type]
    with pytest.raises(UnknownOptionError):
        Consumer.from_config(cluster, {"linger.ms": 5})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fetch.min.bytes"):
        Consumer.from_config(cluster, {"fetch.min.bytes": "lots"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="smallest"):
        Consumer.from_config(cluster, {"auto.offset.reset": "sideways"})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Consumer(cluster, value_deserializer="json")  # type: ignore[arg-type]


# -- deserializers --------------------------------------------------------------------------


async def test_deserializers_apply_to_returned_records_and_leave_none_alone(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await make_topic(cluster)
        async with Producer(cluster) as producer:
            await producer.send("t", b'{"a": 1}', key=b"user-1")
            await producer.send("t", None, key=b"user-1")  # a tombstone
            await producer.send("t", b"[2]")  # no key
        consumer = Consumer(
            cluster,
            auto_offset_reset="earliest",
            key_deserializer=bytes.decode,
            value_deserializer=json.loads,
        )
        consumer.assign([T0])
        polled = await poll_until(consumer, 3)
        assert [(r.key, r.value) for r in polled] == [
            ("user-1", {"a": 1}),
            ("user-1", None),
            (None, [2]),
        ]
        consumer.seek(T0, 0)
        iterated = []
        async for record in consumer:
            iterated.append((record.key, record.value))
            if len(iterated) == 3:
                break
        assert iterated == [(r.key, r.value) for r in polled]


async def test_a_failing_deserializer_stops_at_its_record_until_sought_past(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await make_topic(cluster)
        await produce(cluster, "t", [b"1", b"2", b"not json", b"4"])
        consumer = Consumer(cluster, auto_offset_reset="earliest", value_deserializer=json.loads)
        consumer.assign([T0])
        before = await poll_until(consumer, 2)
        assert values_of(before) == [1, 2]
        for _ in range(2):  # again and again, nothing skipped
            with pytest.raises(RecordDeserializationError) as info:
                await consumer.poll(timeout_ms=100)
            assert consumer.position(T0) == 2
        error = info.value
        assert isinstance(error, DwalError) and not error.retriable
        assert (error.topic, error.partition, error.offset) == ("t", 0, 2)
        assert error.record.value == b"not json"
        assert isinstance(error.__cause__, json.JSONDecodeError)
        with pytest.raises(RecordDeserializationError):
            async for _record in consumer:
                pass
        consumer.seek(T0, error.offset + 1)
        assert values_of(await poll_until(consumer, 1)) == [4]


# -- bad data from a broker is a DwalError --------------------------------------------------


def snappy_batch() -> bytes:
    """A batch whose attributes say snappy, which the client cannot decode (CRC valid)."""
    data = bytearray(build_batch([(1_000, None, b"x")]))
    (attributes,) = struct.unpack_from(">h", data, 21)
    struct.pack_into(">h", data, 21, attributes | 2)
    struct.pack_into(">I", data, 17, crc_of(data))
    return bytes(data)


GARBAGE = b"\x00" * 8 + b"\x00\x00\x00\x40" + b"\xff" * 64  # a length, then no batch
FETCH_ANSWERS = {
    # an error code this client does not know
    "unknown error code": ({"error_code": 9999, "size": 0}, b""),
    "snappy batch": ({"error_code": 0, "size": len(snappy_batch())}, snappy_batch()),
    "garbage bytes": (
        {"error_code": 0, "size": 76},
        b"\x00" * 8 + b"\x00\x00\x00\x40" + b"\xff" * 64,
    ),
    "malformed body": ({"error_code": "none", "size": 0}, b""),
}


@pytest.mark.parametrize("case", list(FETCH_ANSWERS))
async def test_bad_fetch_answers_raise_typed_dwal_errors(nursery, case):
    fake = FakeBroker({"t": FakeTopic()})
    await nursery.start(fake.serve)
    part, tail = FETCH_ANSWERS[case]

    async def answer_fetches() -> None:
        while True:
            received = await fake.next_request(ApiKey.METADATA)
            if received.api_key == ApiKey.FETCH:
                body = {"partition": 0, "high_watermark": 5, **part}
                await received.answer({"topics": [{"topic": "t", "partitions": [body]}]}, tail=tail)

    async with client.connect(fake.bootstrap) as cluster:
        nursery.start_soon(answer_fetches)
        consumer = Consumer(cluster)
        consumer.assign([T0])
        consumer.seek(T0, 0)
        with trio.fail_after(10), pytest.raises(DwalError) as info:
            await consumer.poll(timeout_ms=100)
        if case == "unknown error code":
            assert info.value.code == ErrorCode.UNKNOWN_SERVER_ERROR
            assert "9999" in info.value.message
        elif case == "malformed body":
            assert isinstance(info.value, MalformedResponseError)
        else:
            assert isinstance(info.value, CorruptRecordError)
            assert (info.value.topic, info.value.partition, info.value.offset) == ("t", 0, 0)
        assert consumer.position(T0) == 0


class BrokenFrameCluster:
    """Every fetch fails inside the connection with a bare ProtocolError."""

    request_timeout_ms = 30_000

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.topics = {"t": TopicInfo("t", (PartitionInfo(0, 0, 0, (0,), (0,)),))}

    async def leader_connection(self, topic: str, partition: int, *, purpose: str = "default"):
        return self

    async def request(self, api_key, body):
        raise ProtocolError("frame length is negative")

    def start_task(self, function, *args) -> None:
        self.nursery.start_soon(function, *args)


async def test_a_protocol_error_inside_a_fetch_reaches_the_user_as_a_dwal_error(nursery):
    consumer = Consumer(BrokenFrameCluster(nursery))  # type: ignore[arg-type]
    consumer.assign([T0])
    consumer.seek(T0, 0)
    with trio.fail_after(10), pytest.raises(MalformedResponseError) as info:
        await consumer.poll(timeout_ms=100)
    assert isinstance(info.value, DwalError)
    assert "frame length is negative" in info.value.message


async def test_a_failing_revoke_callback_in_close_still_leaves_the_group(group_broker):
    def revoked(partitions: set[TopicPartition]) -> None:
        raise RuntimeError("callback failed")

    async with client.connect(group_broker.bootstrap) as cluster:
        await make_topic(cluster, partitions=2)
        member = Consumer(cluster, group_id="failing", on_revoked=revoked)
        member.subscribe(["t"])
        await wait_for_assignment(member, 2)
        with pytest.raises(RuntimeError, match="callback failed"):
            await member.close()  # called directly: its error is raised, after leaving
        assert member.member_id is None and member.assignment() == []
        # in `async with`, the block's own exception wins (close's is logged)
        with pytest.raises(KeyError):
            async with Consumer(cluster, group_id="failing", on_revoked=revoked) as other:
                other.subscribe(["t"])
                await wait_for_assignment(other, 2)
                raise KeyError("the block's own")
        assert other.member_id is None
