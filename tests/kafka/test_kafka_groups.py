"""Kafka's classic consumer groups through the Kafka listener, with confluent-kafka and
aiokafka: two members split a topic's partitions, a member leaving gives its partitions back
to the other (a rebalance each time), and committed offsets survive a broker restart."""

from __future__ import annotations

import asyncio
import time

import pytest
from client_adapters import CLIENT_TIMEOUT_S, RDKAFKA_LOGGER, Sent, client_for
from kafka_processes import create_topics

pytestmark = pytest.mark.timeout(90)

PARTITIONS = 4
PER_PARTITION = 10


def fill(broker, topic: str) -> dict[int, list[bytes]]:
    """Create `topic` and write PER_PARTITION records to each of its partitions."""
    create_topics(broker.bootstrap, topic, partitions=PARTITIONS)
    confluent = client_for("confluent-kafka")
    values = {}
    for partition in range(PARTITIONS):
        values[partition] = [b"p%d-%d" % (partition, i) for i in range(PER_PARTITION)]
        sent = [Sent(None, value, (), 1000) for value in values[partition]]
        confluent.produce(broker.kafka_bootstrap, topic, sent, partition=partition)
    return values


def confluent_member(broker, group: str, topic: str, **overrides):
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": broker.kafka_bootstrap,
            "logger": RDKAFKA_LOGGER,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 200,
            "fetch.wait.max.ms": 100,
            **overrides,
        }
    )
    consumer.subscribe([topic])
    return consumer


def poll_until(members, condition, what: str, read: dict | None = None) -> None:
    """Poll every confluent-kafka consumer of `members` in turn (rebalances run in poll)
    until `condition()` holds; keeps what they read in `read` (partition -> values) and
    commits it. Raises AssertionError after CLIENT_TIMEOUT_S."""
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {CLIENT_TIMEOUT_S} s: {what}"
        for member in members:
            message = member.poll(0.05)
            if message is None:
                continue
            assert message.error() is None, message.error()
            if read is not None:
                read.setdefault(message.partition(), []).append(message.value())
                member.commit(message=message, asynchronous=False)


def assigned(member) -> set[int]:
    return {tp.partition for tp in member.assignment()}


def test_confluent_group_two_members_and_a_rebalance(kafka_broker):
    pytest.importorskip("confluent_kafka", reason="CONFLUENT-KAFKA IS NOT INSTALLED")
    from confluent_kafka import TopicPartition

    topic, group = "grouped-confluent", "ck-group"
    values = fill(kafka_broker, topic)
    first = confluent_member(kafka_broker, group, topic)
    second = None
    try:
        read: dict[int, list[bytes]] = {}
        poll_until([first], lambda: len(assigned(first)) == PARTITIONS, "first has all", read)
        second = confluent_member(kafka_broker, group, topic)
        members = [first, second]

        def split() -> bool:
            a, b = assigned(first), assigned(second)
            return len(a) == len(b) == PARTITIONS // 2 and a | b == set(range(PARTITIONS))

        poll_until(members, split, "two members share the partitions", read)

        def everything_read() -> bool:
            return all(values[p][-1] in read.get(p, []) for p in range(PARTITIONS))

        poll_until(members, everything_read, "every record read", read)
        for partition, got in read.items():  # all, in order (a rebalance may re-read from
            assert set(got) == set(values[partition])  # the last commit, never skip)
            assert got == sorted(got)
        second.close()
        second = None
        poll_until([first], lambda: len(assigned(first)) == PARTITIONS, "first has all again")
        committed = first.committed(
            [TopicPartition(topic, p) for p in range(PARTITIONS)],
            timeout=CLIENT_TIMEOUT_S,
        )
        assert [tp.offset for tp in committed] == [PER_PARTITION] * PARTITIONS
    finally:
        first.close()
        if second is not None:
            second.close()


def test_aiokafka_group_two_members_and_a_rebalance(kafka_broker):
    pytest.importorskip("aiokafka", reason="AIOKAFKA IS NOT INSTALLED")
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topic, group = "grouped-aiokafka", "aio-group"
    values = fill(kafka_broker, topic)

    def member() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_broker.kafka_bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=6000,
            heartbeat_interval_ms=200,
            fetch_max_wait_ms=100,
        )

    async def read_some(consumer, read) -> None:
        batches = await consumer.getmany(timeout_ms=100)
        for tp, messages in batches.items():
            read.setdefault(tp.partition, []).extend(m.value for m in messages)
        if batches:
            await consumer.commit()

    async def until(condition, consumers, read, what: str) -> None:
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while not condition():
            assert time.monotonic() < deadline, f"not within {CLIENT_TIMEOUT_S} s: {what}"
            await asyncio.gather(*(read_some(c, read) for c in consumers))

    def partitions(consumer) -> set[int]:
        return {tp.partition for tp in consumer.assignment()}

    async def scenario() -> None:
        read: dict[int, list[bytes]] = {}
        first = member()
        await first.start()
        second = member()
        try:
            await until(lambda: len(partitions(first)) == PARTITIONS, [first], read, "first")
            await second.start()

            def split() -> bool:
                a, b = partitions(first), partitions(second)
                return len(a) == len(b) == PARTITIONS // 2 and a | b == set(range(PARTITIONS))

            await until(split, [first, second], read, "two members share the partitions")
            await until(
                lambda: all(values[p][-1] in read.get(p, []) for p in range(PARTITIONS)),
                [first, second],
                read,
                "every record read",
            )
            await second.stop()
            await until(lambda: len(partitions(first)) == PARTITIONS, [first], read, "first again")
            for partition in range(PARTITIONS):
                assert await first.committed(TopicPartition(topic, partition)) == PER_PARTITION
            # every record was read, each partition in order (a rebalance may re-read
            # from the last commit, never skip)
            for partition, got in read.items():
                assert set(got) == set(values[partition])
                assert got == sorted(got)
        finally:
            await first.stop()
            await second.stop()

    asyncio.run(asyncio.wait_for(scenario(), CLIENT_TIMEOUT_S * 3))


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_committed_offsets_survive_a_broker_restart(restartable_broker, kill):
    pytest.importorskip("confluent_kafka", reason="CONFLUENT-KAFKA IS NOT INSTALLED")
    from confluent_kafka import TopicPartition

    broker = restartable_broker
    topic, group = "committed", "restart-group"
    values = fill(broker, topic)
    consumer = confluent_member(broker, group, topic)
    try:
        poll_until([consumer], lambda: len(assigned(consumer)) == PARTITIONS, "assigned")
        offsets = [TopicPartition(topic, p, 3 + p) for p in range(PARTITIONS)]
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()
    broker.restart(kill=kill)

    consumer = confluent_member(broker, group, topic)
    try:
        committed = consumer.committed(
            [TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=CLIENT_TIMEOUT_S
        )
        assert [tp.offset for tp in committed] == [3 + p for p in range(PARTITIONS)]
        read: dict[int, list[bytes]] = {}
        poll_until(
            [consumer],
            lambda: all(values[p][-1] in read.get(p, []) for p in range(PARTITIONS)),
            "every record after the commits",
            read,
        )
        # from the committed offsets on, not from the start (auto.offset.reset=earliest)
        assert read == {p: values[p][3 + p :] for p in range(PARTITIONS)}
    finally:
        consumer.close()
