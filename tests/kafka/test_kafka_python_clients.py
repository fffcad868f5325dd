"""kafka-python, confluent-kafka and aiokafka against a `dwal broker` process's Kafka
listener: produce with every compression and read back keys, values, headers, timestamps and
offsets; read from an offset and from a timestamp; acks 0, 1 and all; idempotent producers."""

from __future__ import annotations

import pytest
from client_adapters import CLIENT_NAMES, COMPRESSIONS, client_for, records
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
