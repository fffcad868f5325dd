"""Clients route per partition leader: two or three fake brokers play one cluster whose
metadata spreads leaders across them (fake_broker.FakeCluster), with toy storage behind
(fake_broker.PartitionLogs) that refuses, as a real broker does, what it does not lead.

The producer sends each partition's batches to its leader and nowhere else, follows a
leader move (NOT_LEADER_OR_FOLLOWER from the old leader, then metadata naming the new one
with a higher leader epoch) storing every record once and in order, and ignores metadata of
an older leader epoch; the consumer fetches each partition from its leader and follows a
move without losing or repeating a record."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from fake_broker import FakeBroker, FakeCluster, FakeTopic, PartitionLogs, produce_answer

import client
from client import Consumer, Producer
from client.cluster import Cluster
from protocol import ApiKey, DwalError, ErrorCode


async def start_cluster(
    nursery: trio.Nursery, brokers: int, partitions: int
) -> tuple[FakeCluster, PartitionLogs]:
    fake = await FakeCluster.start(nursery, brokers, {"t": FakeTopic(partitions=partitions)})
    logs = await PartitionLogs(fake).start(nursery)
    return fake, logs


def values(prefix: str, count: int) -> list[bytes | None]:
    return [f"{prefix}{number}".encode() for number in range(count)]


# -- the metadata cache -------------------------------------------------------------------


def metadata_answer(leader: int, leader_epoch: int, *, brokers=(0, 1)) -> dict:
    return {
        "brokers": [{"node_id": b, "host": "127.0.0.1", "port": 9000 + b} for b in brokers],
        "topics": [
            {
                "topic": "t",
                "error_code": 0,
                "error_message": None,
                "partitions": [
                    {
                        "partition": 0,
                        "leader": leader,
                        "leader_epoch": leader_epoch,
                        "replicas": [0, 1],
                        "isr": [0, 1],
                    }
                ],
                "max_message_bytes": -1,
                "segment_bytes": -1,
            }
        ],
    }


async def test_the_cache_never_goes_back_to_an_older_leader_epoch(nursery):
    cluster = Cluster([("127.0.0.1", 9)], nursery, "test", 1000)
    cluster.apply_metadata(metadata_answer(leader=1, leader_epoch=5))
    cluster.invalidate("t")  # only marks the topic for refreshing
    cluster.apply_metadata(metadata_answer(leader=0, leader_epoch=4, brokers=(0,)))
    leader = cluster.leader_of("t", 0)
    assert leader is not None and (leader.node_id, leader.port) == (1, 9001)
    assert cluster.topics["t"].partitions[0].leader_epoch == 5
    cluster.apply_metadata(metadata_answer(leader=0, leader_epoch=6))
    assert cluster.topics["t"].partitions[0].leader == 0
    assert cluster.topics["t"].partitions[0].leader_epoch == 6
    # the topic is gone: one created again under its name starts its epochs afresh
    cluster.apply_metadata(
        {"brokers": [], "topics": [{"topic": "t", "error_code": 3, "error_message": None}]}
    )
    assert "t" not in cluster.topics
    cluster.apply_metadata(metadata_answer(leader=1, leader_epoch=0))
    assert cluster.topics["t"].partitions[0].leader == 1


# -- the producer -------------------------------------------------------------------------


async def test_each_partition_goes_to_its_leader_and_nowhere_else(nursery):
    fake, logs = await start_cluster(nursery, brokers=3, partitions=3)
    leaders = {0: 2, 1: 0, 2: 1}
    for partition, leader in leaders.items():
        logs.move("t", partition, leader, 1)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, linger_ms=0) as producer:
            deliveries = [
                await producer.send("t", f"p{n % 3}-{n // 3}".encode(), partition=n % 3)
                for n in range(60)
            ]
        for delivery in deliveries:
            await delivery.wait()
    assert logs.refused == []
    assert {node for node, *_ in logs.produced} == {0, 1, 2}
    for node, _, partition, _ in logs.produced:
        assert node == leaders[partition]
    for partition in range(3):
        assert logs.records[("t", partition)] == values(f"p{partition}-", 20)


async def test_a_leader_move_is_followed_and_each_record_stored_once_in_order(nursery):
    fake, logs = await start_cluster(nursery, brokers=2, partitions=2)
    logs.move("t", 0, 0, 1)
    logs.move("t", 1, 1, 1)

    async def metadata_lags_behind_the_move():
        await logs.refusal.wait()  # the old leader refused: only now does metadata say so
        fake.view.move("t", 0, 1, 2)

    async with client.connect(fake.bootstrap) as cluster:
        # retries=0: leader errors do not count against retries; the delivery timeout bounds
        async with Producer(
            cluster, linger_ms=0, retries=0, retry_backoff_ms=5, delivery_timeout_ms=10_000
        ) as producer:
            deliveries = []
            for number in range(60):
                if number == 20:
                    logs.leaders[("t", 0)] = 1  # the truth moves first
                    nursery.start_soon(metadata_lags_behind_the_move)
                deliveries.append(await producer.send("t", b"v%d" % number, partition=0))
                deliveries.append(await producer.send("t", b"w%d" % number, partition=1))
                await trio.sleep(0)
        offsets = [(await delivery.wait()).offset for delivery in deliveries[0::2]]
    assert offsets == list(range(60))
    assert logs.records[("t", 0)] == values("v", 60)
    assert logs.records[("t", 1)] == values("w", 60)
    assert any(node == 0 and api == ApiKey.PRODUCE for node, api, *_ in logs.refused)
    nodes = [node for node, _, partition, _ in logs.produced if partition == 0]
    assert nodes[0] == 0 and nodes[-1] == 1
    assert nodes == sorted(nodes)  # never back to the old leader


async def test_a_partition_waits_for_its_requests_to_the_old_leader(nursery):
    """Sending to the new leader while a request to the old one is unanswered could store
    a later batch before an earlier one that the old leader then refuses."""
    fake, logs = await start_cluster(nursery, brokers=2, partitions=1)
    logs.move("t", 0, 0, 1)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, linger_ms=0, retry_backoff_ms=5) as producer:
            logs.gates[0] = trio.Event()
            first = await producer.send("t", b"first")
            await logs.held.wait()  # broker 0 has it and does not answer yet
            logs.move("t", 0, 1, 2)
            await cluster.refresh_metadata(["t"])
            second = await producer.send("t", b"second")
            await trio.sleep(0.05)
            assert logs.produced == []  # nothing went to broker 1 meanwhile
            logs.gates[0].set()  # broker 0 refuses "first": it is retried at broker 1
        assert [(await first.wait()).offset, (await second.wait()).offset] == [0, 1]
    assert logs.records[("t", 0)] == [b"first", b"second"]
    assert {node for node, *_ in logs.produced} == {1}


async def test_metadata_of_an_older_leader_epoch_is_ignored(nursery):
    fake, logs = await start_cluster(nursery, brokers=2, partitions=1)
    logs.move("t", 0, 1, 5)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, linger_ms=0) as producer:
            for number in range(5):
                await producer.send("t", b"v%d" % number)
            await producer.flush()
            fake.view.move("t", 0, 0, 3)  # a broker that has not heard of epoch 5 yet
            for _ in fake.brokers:  # metadata requests rotate: ask every broker
                cluster.invalidate("t")
                await cluster.refresh_metadata(["t"])
            info = cluster.topics["t"].partitions[0]
            assert (info.leader, info.leader_epoch) == (1, 5)
            for number in range(5, 10):
                await producer.send("t", b"v%d" % number)
            await producer.flush()
            logs.move("t", 0, 0, 6)  # a newer epoch wins
            await cluster.refresh_metadata(["t"])
            for number in range(10, 15):
                await producer.send("t", b"v%d" % number)
    assert logs.refused == []
    assert [node for node, *_ in logs.produced][-1] == 0
    assert {node for node, *_ in logs.produced[:-1]} == {1}
    assert logs.records[("t", 0)] == values("v", 15)


async def test_no_leader_within_the_delivery_timeout_fails_the_records(nursery):
    fake, logs = await start_cluster(nursery, brokers=2, partitions=1)
    logs.leaders[("t", 0)] = 1  # metadata keeps naming broker 0, which refuses
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(
            cluster, linger_ms=0, retry_backoff_ms=20, delivery_timeout_ms=300
        ) as producer:
            started = trio.current_time()
            delivery = await producer.send("t", b"v")
            with pytest.raises(DwalError) as raised:
                await delivery.wait()
    assert raised.value.code == ErrorCode.NOT_LEADER_OR_FOLLOWER
    assert trio.current_time() - started >= 0.3
    assert len(logs.refused) > 3  # retried meanwhile, not counted against retries (5)
    assert logs.records[("t", 0)] == []


async def test_a_leader_that_refuses_connections_is_waited_out_like_a_moved_one(nursery):
    """The leader of partition 0 died: its address refuses connections, and metadata keeps
    naming it until a new leader is elected. Nothing was sent to it, so, as after
    NOT_LEADER_OR_FOLLOWER, the producer refreshes metadata after a backoff and retries
    within the delivery timeout, not counting against `retries`: every record is stored
    once and in order at the new leader, none fails."""
    fake, logs = await start_cluster(nursery, brokers=2, partitions=2)
    fake.add_unreachable(2)
    logs.move("t", 0, 2, 1)
    logs.move("t", 1, 0, 1)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(
            cluster,
            acks="all",
            linger_ms=0,
            retries=0,
            retry_backoff_ms=5,
            delivery_timeout_ms=20_000,
        ) as producer:
            deliveries = {partition: [] for partition in range(2)}
            for number in range(30):
                for partition in range(2):
                    deliveries[partition].append(
                        await producer.send(
                            "t", b"p%d-%d" % (partition, number), partition=partition
                        )
                    )
            with trio.fail_after(10):
                assert [(await d.wait()).offset for d in deliveries[1]] == list(range(30))
            assert not any(d.done for d in deliveries[0])  # no attempt has failed them
            for _ in range(3):  # it keeps asking where partition 0 is; metadata says broker 2
                with trio.fail_after(10):
                    await fake.view.metadata_answered.wait()
                assert not any(d.done for d in deliveries[0])
            assert logs.records[("t", 0)] == []
            logs.move("t", 0, 1, 2)  # a new leader is elected
            with trio.fail_after(10):
                offsets = [(await d.wait()).offset for d in deliveries[0]]
        assert producer.statistics().batches_failed == 0
    assert offsets == list(range(30))
    for partition in range(2):
        assert logs.records[("t", partition)] == values(f"p{partition}-", 30)
    assert {node for node, _, partition, _ in logs.produced if partition == 0} == {1}
    assert logs.refused == []


@pytest.mark.parametrize(
    "code",
    [
        ErrorCode.NOT_LEADER_OR_FOLLOWER,
        ErrorCode.LEADER_NOT_AVAILABLE,
        ErrorCode.NOT_CONTROLLER,
        ErrorCode.FENCED_LEADER_EPOCH,
        ErrorCode.UNKNOWN_LEADER_EPOCH,
    ],
)
async def test_leader_errors_are_retried_without_counting(nursery, autojump_clock, code):
    fake = FakeBroker({"t": FakeTopic()})
    await nursery.start(fake.serve)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, linger_ms=0, retries=0) as producer:
            delivery = await producer.send("t", b"v")
            for _ in range(3):
                with trio.fail_after(5):
                    received = await fake.next_request(ApiKey.METADATA)
                await received.answer(produce_answer(received.request, 0, code))
            with trio.fail_after(5):
                received = await fake.next_request(ApiKey.METADATA)
            await received.answer(produce_answer(received.request, 7))
        assert (await delivery.wait()).offset == 7


async def test_an_unknown_topic_while_metadata_spreads_is_retried(nursery, autojump_clock):
    fake = FakeBroker({"t": FakeTopic()})
    await nursery.start(fake.serve)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(cluster, linger_ms=0) as producer:
            delivery = await producer.send("t", b"v")
            received = await fake.next_request(ApiKey.METADATA)
            unknown = produce_answer(received.request, 0, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION)
            await received.answer(unknown)
            with trio.fail_after(5):  # the retry
                received = await fake.next_request(ApiKey.METADATA)
            await received.answer(produce_answer(received.request, 7))
        assert (await delivery.wait()).offset == 7


# -- the consumer -------------------------------------------------------------------------


async def poll_until(consumer: Consumer, count: int) -> list[tuple[int, int, bytes | None]]:
    seen: list[tuple[int, int, bytes | None]] = []
    with trio.fail_after(10):
        while len(seen) < count:
            for tp, records in (await consumer.poll(timeout_ms=50)).items():
                seen.extend((tp.partition, r.offset, r.value) for r in records)
    return seen


async def test_the_consumer_fetches_each_partition_from_its_leader(nursery):
    fake, logs = await start_cluster(nursery, brokers=3, partitions=3)
    leaders = {0: 1, 1: 2, 2: 0}
    for partition, leader in leaders.items():
        logs.move("t", partition, leader, 1)
        logs.records[("t", partition)].extend(values(f"p{partition}-", 10))
    async with client.connect(fake.bootstrap) as cluster:
        consumer = Consumer(cluster, auto_offset_reset="earliest", max_wait_ms=50)
        await consumer.assign_topic("t")
        seen = await poll_until(consumer, 30)
        for partition in range(3):
            mine = [(offset, value) for p, offset, value in seen if p == partition]
            assert mine == list(enumerate(values(f"p{partition}-", 10)))
            assert consumer.position(("t", partition)) == 10
    assert logs.refused == []
    assert {node for node, *_ in logs.fetched} == {0, 1, 2}
    for node, _, partition, _ in logs.fetched:
        assert node == leaders[partition]


async def test_the_consumer_fetches_in_the_leader_epoch_its_metadata_knows(nursery):
    """KIP-320: each fetch carries the partition's leader epoch from the metadata cache, so
    a broker that missed its loss of leadership refuses it instead of serving a stale log."""
    fake, logs = await start_cluster(nursery, brokers=2, partitions=2)
    logs.move("t", 0, 1, 3)
    logs.move("t", 1, 0, 7)
    for partition in range(2):
        logs.records[("t", partition)].extend(values(f"p{partition}-", 5))
    async with client.connect(fake.bootstrap) as cluster:
        consumer = Consumer(cluster, auto_offset_reset="earliest", max_wait_ms=50)
        await consumer.assign_topic("t")
        await poll_until(consumer, 10)
    assert logs.fetch_epochs
    assert set(logs.fetch_epochs) == {(0, 3), (1, 7)}


async def test_the_consumer_follows_a_leader_move(nursery):
    fake, logs = await start_cluster(nursery, brokers=2, partitions=2)
    logs.move("t", 0, 0, 1)
    logs.move("t", 1, 1, 1)
    for partition in range(2):
        logs.records[("t", partition)].extend(values(f"p{partition}-", 10))
    async with client.connect(fake.bootstrap) as cluster:
        consumer = Consumer(cluster, auto_offset_reset="earliest", max_wait_ms=50)
        await consumer.assign_topic("t")
        seen = await poll_until(consumer, 20)
        logs.leaders[("t", 0)] = 1  # the truth moves; metadata says so only after a refusal
        for partition in range(2):
            logs.records[("t", partition)].extend(values(f"p{partition}-", 20)[10:])
        logs.refusal = trio.Event()
        await trio.sleep(0)

        async def metadata_lags_behind_the_move():
            await logs.refusal.wait()
            fake.view.move("t", 0, 1, 2)

        nursery.start_soon(metadata_lags_behind_the_move)
        seen += await poll_until(consumer, 20)
    for partition in range(2):
        mine = [(offset, value) for p, offset, value in seen if p == partition]
        assert mine == list(enumerate(values(f"p{partition}-", 20)))
    assert any(node == 0 and api == ApiKey.FETCH for node, api, *_ in logs.refused)
    assert (1, "t", 0, 10) in logs.fetched  # the new leader, from where the old one stopped


# -- a partition without a leader for a while (its leader died) -------------------------


def leaderless(fake: FakeCluster, logs: PartitionLogs, partition: int) -> None:
    """Partition `partition` of "t" loses its leader: metadata says leader -1, and every
    broker refuses it (NOT_LEADER_OR_FOLLOWER)."""
    logs.move("t", partition, -1, 1)
    fake.view.replicas[("t", partition)] = [0, 1, 2]
    fake.view.isr[("t", partition)] = [0, 1, 2]


async def test_the_producer_sends_other_partitions_while_one_has_no_leader(nursery):
    fake, logs = await start_cluster(nursery, brokers=3, partitions=3)
    leaderless(fake, logs, 1)
    async with client.connect(fake.bootstrap) as cluster:
        async with Producer(
            cluster, linger_ms=0, retry_backoff_ms=20, delivery_timeout_ms=20_000
        ) as producer:
            deliveries = {
                partition: [
                    await producer.send("t", b"p%d-%d" % (partition, n), partition=partition)
                    for n in range(10)
                ]
                for partition in range(3)
            }
            with trio.fail_after(10):
                for partition in (0, 2):
                    offsets = [(await d.wait()).offset for d in deliveries[partition]]
                    assert offsets == list(range(10))
            await trio.sleep(0.2)  # several retries of partition 1 meanwhile
            assert not any(d.done for d in deliveries[1])
            assert logs.records[("t", 1)] == []
            logs.move("t", 1, 2, 2)  # a leader is elected
            with trio.fail_after(10):
                offsets = [(await d.wait()).offset for d in deliveries[1]]
    assert offsets == list(range(10))
    for partition in range(3):
        assert logs.records[("t", partition)] == values(f"p{partition}-", 10)


async def test_the_consumer_reads_the_other_partitions_while_one_has_no_leader(nursery):
    fake, logs = await start_cluster(nursery, brokers=3, partitions=3)
    for partition in range(3):
        logs.records[("t", partition)].extend(values(f"p{partition}-", 10))
    leaderless(fake, logs, 1)
    async with client.connect(fake.bootstrap) as cluster:
        consumer = Consumer(
            cluster, auto_offset_reset="latest", max_wait_ms=50, retry_backoff_ms=20
        )
        await consumer.assign_topic("t")
        await consumer.seek_to_beginning()  # partition 1's waits until it has a leader
        assert consumer.position(("t", 1)) is None
        seen = await poll_until(consumer, 20)
        assert sorted(seen) == sorted(
            (p, offset, value) for p in (0, 2) for offset, value in enumerate(values(f"p{p}-", 10))
        )
        for _ in range(5):  # partition 1 keeps failing; the polls do not
            assert await consumer.poll(timeout_ms=50) == {}
        statistics = consumer.statistics()
        assert statistics.failed_polls == 0
        failure = statistics.failing_partitions[client.TopicPartition("t", 1)]
        assert failure.attempts >= 2
        assert failure.last_error.code == ErrorCode.LEADER_NOT_AVAILABLE
        assert set(statistics.failing_partitions) == {client.TopicPartition("t", 1)}
        logs.records[("t", 0)].append(b"p0-10")
        logs.move("t", 1, 0, 2)  # a leader is elected
        seen = await poll_until(consumer, 11)
        assert sorted(seen) == sorted(
            [(0, 10, b"p0-10")] + [(1, o, v) for o, v in enumerate(values("p1-", 10))]
        )
        assert consumer.statistics().failing_partitions == {}
        assert consumer.position(("t", 1)) == 10


@pytest.mark.parametrize(
    "code",
    [
        ErrorCode.NOT_LEADER_OR_FOLLOWER,
        ErrorCode.FENCED_LEADER_EPOCH,
        ErrorCode.UNKNOWN_LEADER_EPOCH,
        ErrorCode.LEADER_NOT_AVAILABLE,
    ],
)
async def test_a_leader_error_sets_only_its_partition_aside(nursery, code):
    fake, logs = await start_cluster(nursery, brokers=2, partitions=2)
    logs.move("t", 0, 0, 1)
    logs.move("t", 1, 1, 1)
    for partition in range(2):
        logs.records[("t", partition)].extend(values(f"p{partition}-", 5))
    logs.refusal_codes[("t", 1)] = code  # broker 1 refuses partition 1 with `code`
    logs.leaders[("t", 1)] = 0  # ... which no broker serves for now
    async with client.connect(fake.bootstrap) as cluster:
        consumer = Consumer(cluster, max_wait_ms=50, retry_backoff_ms=20)
        consumer.assign([("t", 0), ("t", 1)])
        consumer.seek(("t", 0), 0)
        consumer.seek(("t", 1), 0)
        seen = await poll_until(consumer, 5)
        assert [p for p, *_ in seen] == [0] * 5
        with trio.fail_after(10):
            while ("t", 1) not in [(t, p) for t, p in consumer.statistics().failing_partitions]:
                await consumer.poll(timeout_ms=50)
        statistics = consumer.statistics()
        assert statistics.failed_polls == 0
        assert statistics.last_error is None
        [failure] = statistics.failing_partitions.values()
        assert failure.last_error.code == code
        logs.move("t", 1, 0, 2)  # the new leader, named by metadata
        seen = await poll_until(consumer, 5)
    assert seen == [(1, o, v) for o, v in enumerate(values("p1-", 5))]


async def test_a_poll_that_read_a_healthy_partition_is_not_failed(nursery):
    """Partition 1's leader refuses at once while partition 0's leader is still long-polling
    (nothing new to read): the poll waits for partition 0's answer instead of ending on the
    refusal alone, and a poll in which a partition was fetched without error (even with no
    new data) does not count as failed."""
    fake, logs = await start_cluster(nursery, brokers=2, partitions=2)
    logs.move("t", 0, 0, 1)
    logs.move("t", 1, 1, 1)
    logs.leaders[("t", 1)] = 0  # broker 1 refuses partition 1, which no broker serves
    gate = logs.fetch_gates[0] = trio.Event()  # broker 0 holds its fetch answers
    async with client.connect(fake.bootstrap) as cluster:
        consumer = Consumer(cluster, max_wait_ms=50, retry_backoff_ms=20)
        consumer.assign([("t", 0), ("t", 1)])
        consumer.seek(("t", 0), 0)
        consumer.seek(("t", 1), 0)
        polled: list[dict] = []
        async with trio.open_nursery() as polls:

            async def poll_once():
                polled.append(await consumer.poll(timeout_ms=50))

            polls.start_soon(poll_once)
            with trio.fail_after(10):
                await logs.refusal.wait()
            # every answer sent has been read and acted on; broker 0 still holds its own
            await trio.testing.wait_all_tasks_blocked()
            statistics = consumer.statistics()
            assert set(statistics.failing_partitions) == {client.TopicPartition("t", 1)}
            assert statistics.failed_polls == 0
            assert polled == []  # still waiting for partition 0's leader
            gate.set()
        assert polled == [{}]
        statistics = consumer.statistics()
        assert statistics.failed_polls == 0
        assert statistics.last_error is None
        assert set(statistics.failing_partitions) == {client.TopicPartition("t", 1)}
