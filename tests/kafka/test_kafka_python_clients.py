"""kafka-python, confluent-kafka and aiokafka against a `dwal broker` process's Kafka
listener: produce with every compression and read back keys, values, headers, timestamps and
offsets; read from an offset and from a timestamp; acks 0, 1 and all; idempotent producers;
out-of-range offsets and long polls."""

from __future__ import annotations

import time

import pytest
from client_adapters import (
    CLIENT_NAMES,
    CLIENT_TIMEOUT_S,
    COMPRESSIONS,
    RDKAFKA_LOGGER,
    client_for,
    records,
)
from kafka_processes import create_topics

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("name", CLIENT_NAMES)
def test_produce_and_consume_each_compression(kafka_broker, name, compression):
    kafka = client_for(name)
    topic = f"{name}-{compression}"
    create_topics(kafka_broker.bootstrap, topic)
    sent = records(40, prefix=compression)
    offsets = kafka.produce(kafka_broker.kafka_bootstrap, topic, sent, compression=compression)
    assert offsets == list(range(40))
    received = kafka.consume(kafka_broker.kafka_bootstrap, topic, 0, 40)
    assert [r.offset for r in received] == list(range(40))
    assert [r.sent for r in received] == sent


@pytest.mark.parametrize("name", CLIENT_NAMES)
def test_consume_from_an_offset_and_from_a_timestamp(kafka_broker, name):
    kafka = client_for(name)
    topic = f"{name}-positions"
    create_topics(kafka_broker.bootstrap, topic)
    sent = records(30)
    # three requests, so that the positions fall inside batches and between them
    for start in (0, 10, 20):
        kafka.produce(kafka_broker.kafka_bootstrap, topic, sent[start : start + 10])
    received = kafka.consume(kafka_broker.kafka_bootstrap, topic, 13, 17)
    assert [r.offset for r in received] == list(range(13, 30))
    assert [r.sent for r in received] == sent[13:]

    bootstrap = kafka_broker.kafka_bootstrap
    assert kafka.offset_for_time(bootstrap, topic, sent[17].timestamp_ms) == 17
    assert kafka.offset_for_time(bootstrap, topic, sent[17].timestamp_ms - 5) == 17
    assert kafka.offset_for_time(bootstrap, topic, sent[0].timestamp_ms - 1000) == 0
    assert kafka.offset_for_time(bootstrap, topic, sent[-1].timestamp_ms + 1) is None


@pytest.mark.parametrize("acks", [0, 1, "all"])
@pytest.mark.parametrize("name", CLIENT_NAMES)
def test_acks(kafka_broker, name, acks):
    kafka = client_for(name)
    topic = f"{name}-acks-{acks}"
    create_topics(kafka_broker.bootstrap, topic)
    sent = records(20)
    offsets = kafka.produce(kafka_broker.kafka_bootstrap, topic, sent, acks=acks)
    if acks != 0:  # with acks=0 the clients know no offsets
        assert offsets == list(range(20))
    # acks=0 gets no answers, so whether everything arrived shows only in the log
    received = kafka.consume(kafka_broker.kafka_bootstrap, topic, 0, 20)
    assert [r.sent for r in received] == sent


@pytest.mark.parametrize("name", CLIENT_NAMES)
def test_idempotent_producer(kafka_broker, name):
    kafka = client_for(name)
    topic = f"{name}-idempotent"
    create_topics(kafka_broker.bootstrap, topic, partitions=2)
    first, second = records(25, prefix="a"), records(25, prefix="b")
    bootstrap = kafka_broker.kafka_bootstrap
    # two partitions, two producers one after the other: each its producer id, sequences
    # from 0 on each partition
    assert kafka.produce(bootstrap, topic, first, idempotent=True, partition=0) == list(range(25))
    assert kafka.produce(bootstrap, topic, second, idempotent=True, partition=1) == list(range(25))
    assert kafka.produce(bootstrap, topic, second, idempotent=True, partition=0) == list(
        range(25, 50)
    )
    assert [r.sent for r in kafka.consume(bootstrap, topic, 0, 50, partition=0)] == first + second
    assert [r.sent for r in kafka.consume(bootstrap, topic, 0, 25, partition=1)] == second


@pytest.mark.parametrize("reset", ["earliest", "error"])
def test_an_offset_beyond_the_end_is_out_of_range(kafka_broker, reset):
    """A fetch past the high watermark answers OFFSET_OUT_OF_RANGE, on which the consumer
    applies auto.offset.reset (earliest: from the start; error: the error)."""
    confluent_kafka = pytest.importorskip(
        "confluent_kafka", reason="CONFLUENT-KAFKA IS NOT INSTALLED"
    )
    topic = f"out-of-range-{reset}"
    create_topics(kafka_broker.bootstrap, topic)
    client_for("confluent-kafka").produce(kafka_broker.kafka_bootstrap, topic, records(5))
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": kafka_broker.kafka_bootstrap,
            "logger": RDKAFKA_LOGGER,
            "group.id": "tests-kafka-unused",
            "enable.auto.commit": False,
            "auto.offset.reset": reset,
        }
    )
    try:
        consumer.assign([confluent_kafka.TopicPartition(topic, 0, 1000)])
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        message = None
        while message is None and time.monotonic() < deadline:
            message = consumer.poll(0.2)
        assert message is not None, "neither a record nor an error"
        if reset == "earliest":
            assert (message.error(), message.offset()) == (None, 0)
        else:
            assert message.error().code() == confluent_kafka.KafkaError._AUTO_OFFSET_RESET
            assert "Offset out of range" in message.error().str()
    finally:
        consumer.close()


def test_a_waiting_fetch_wakes_up_when_a_record_arrives(kafka_broker):
    """A consumer at the end waits in a long poll (fetch.wait.max.ms 60 s); a record written
    meanwhile answers it at once, far sooner than the wait."""
    confluent_kafka = pytest.importorskip(
        "confluent_kafka", reason="CONFLUENT-KAFKA IS NOT INSTALLED"
    )
    topic = "long-poll"
    create_topics(kafka_broker.bootstrap, topic)
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": kafka_broker.kafka_bootstrap,
            "logger": RDKAFKA_LOGGER,
            "group.id": "tests-kafka-unused",
            "fetch.wait.max.ms": 60_000,
            "socket.timeout.ms": 90_000,
        }
    )
    try:
        consumer.assign([confluent_kafka.TopicPartition(topic, 0, 0)])
        assert consumer.poll(1.0) is None  # its fetch now waits at the end
        client_for("confluent-kafka").produce(kafka_broker.kafka_bootstrap, topic, records(1))
        deadline = time.monotonic() + CLIENT_TIMEOUT_S  # a third of the fetch's wait
        message = None
        while message is None and time.monotonic() < deadline:
            message = consumer.poll(0.2)
        assert message is not None and message.error() is None and message.offset() == 0
    finally:
        consumer.close()
