"""Kafka clients across a broker restart: an idempotent producer whose broker is killed
mid-stream (SIGKILL, with requests in flight) or stopped (SIGTERM) retries what was not
acknowledged, and the log holds every record once, in order: confluent-kafka, kafka-python
and aiokafka."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from client_adapters import CLIENT_TIMEOUT_S, RDKAFKA_LOGGER, client_for
from kafka_processes import create_topics

pytestmark = pytest.mark.timeout(90)

RECORDS = 3000
RESTART_AFTER = 1000  # acknowledged records


@pytest.mark.parametrize("kill", [True, False], ids=["sigkill", "sigterm"])
def test_idempotent_producer_across_a_broker_restart(restartable_broker, kill):
    confluent_kafka = pytest.importorskip(
        "confluent_kafka", reason="CONFLUENT-KAFKA IS NOT INSTALLED: pip install -e '.[test]'"
    )
    broker = restartable_broker
    topic = "restarted"
    create_topics(broker.bootstrap, topic)
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": broker.kafka_bootstrap,
            "logger": RDKAFKA_LOGGER,
            "enable.idempotence": True,
            "linger.ms": 2,
            "batch.num.messages": 50,  # many requests in flight when the broker goes
            "message.timeout.ms": 60_000,
            "reconnect.backoff.ms": 50,
            "reconnect.backoff.max.ms": 500,
            "retry.backoff.ms": 50,
        }
    )
    acknowledged: list[int] = []
    errors: list[object] = []
    enough = threading.Event()

    def delivered(error, message) -> None:
        if error is not None:
            errors.append(error)
            return
        acknowledged.append(message.offset())
        if len(acknowledged) >= RESTART_AFTER:
            enough.set()

    restarted = False
    for index in range(RECORDS):
        producer.produce(topic, value=b"%06d" % index, partition=0, on_delivery=delivered)
        producer.poll(0)
        if not restarted and index >= RESTART_AFTER + 500:
            deadline = time.monotonic() + CLIENT_TIMEOUT_S
            while not enough.is_set() and time.monotonic() < deadline:
                producer.poll(0.1)  # runs the delivery callbacks
            assert enough.is_set(), f"only {len(acknowledged)} acknowledged"
            broker.restart(kill=kill)
            restarted = True
    assert producer.flush(CLIENT_TIMEOUT_S * 2) == 0, "records left undelivered"
    assert not errors, errors[:3]
    assert sorted(acknowledged) == list(range(RECORDS))

    read = client_for("confluent-kafka").consume(broker.kafka_bootstrap, topic, 0, RECORDS)
    assert [r.value for r in read] == [b"%06d" % i for i in range(RECORDS)]
    assert [r.offset for r in read] == list(range(RECORDS))
    # and nothing after them: a retried batch appended twice would be there
    consumer = confluent_kafka.Consumer(
        {"bootstrap.servers": broker.kafka_bootstrap, "group.id": "tests-kafka-unused"}
    )
    try:
        watermarks = consumer.get_watermark_offsets(
            confluent_kafka.TopicPartition(topic, 0), timeout=CLIENT_TIMEOUT_S
        )
    finally:
        consumer.close()
    assert watermarks == (0, RECORDS)


def check_log(broker, topic: str) -> None:
    """Every record once, in order, and nothing after them."""
    read = client_for("confluent-kafka").consume(broker.kafka_bootstrap, topic, 0, RECORDS)
    assert [r.value for r in read] == [b"%06d" % i for i in range(RECORDS)]
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": broker.kafka_bootstrap, "group.id": "unused"})
    try:
        watermarks = consumer.get_watermark_offsets(
            TopicPartition(topic, 0), timeout=CLIENT_TIMEOUT_S
        )
    finally:
        consumer.close()
    assert watermarks == (0, RECORDS)


class Acknowledgements:
    """What the delivery callbacks saw; `enough` is set at RESTART_AFTER offsets."""

    def __init__(self) -> None:
        self.offsets: list[int] = []
        self.errors: list[object] = []
        self.enough = threading.Event()

    def ok(self, metadata) -> None:
        self.offsets.append(metadata.offset)
        if len(self.offsets) >= RESTART_AFTER:
            self.enough.set()

    def failed(self, error) -> None:
        self.errors.append(error)

    def check(self) -> None:
        assert not self.errors, self.errors[:3]
        assert sorted(self.offsets) == list(range(RECORDS))


@pytest.mark.parametrize("kill", [True, False], ids=["sigkill", "sigterm"])
def test_kafka_python_idempotent_producer_across_a_broker_restart(restartable_broker, kill):
    kafka = pytest.importorskip("kafka", reason="KAFKA-PYTHON IS NOT INSTALLED")
    broker = restartable_broker
    topic = "restarted-kafka-python"
    create_topics(broker.bootstrap, topic)
    producer = kafka.KafkaProducer(
        bootstrap_servers=broker.kafka_bootstrap,
        enable_idempotence=True,
        acks="all",
        linger_ms=2,
        batch_size=2000,  # many requests in flight when the broker goes
        retry_backoff_ms=50,
        reconnect_backoff_ms=50,
        reconnect_backoff_max_ms=500,
        request_timeout_ms=CLIENT_TIMEOUT_S * 1000,
        delivery_timeout_ms=60_000,
    )
    acknowledgements = Acknowledgements()
    try:
        for index in range(RECORDS):
            future = producer.send(topic, value=b"%06d" % index, partition=0)
            future.add_callback(acknowledgements.ok).add_errback(acknowledgements.failed)
            if index == RESTART_AFTER + 500:
                assert acknowledgements.enough.wait(CLIENT_TIMEOUT_S), "too few acknowledged"
                broker.restart(kill=kill)
        producer.flush(timeout=CLIENT_TIMEOUT_S * 2)
    finally:
        producer.close(timeout=5)
    acknowledgements.check()
    check_log(broker, topic)


@pytest.mark.parametrize("kill", [True, False], ids=["sigkill", "sigterm"])
def test_aiokafka_idempotent_producer_across_a_broker_restart(restartable_broker, kill):
    aiokafka = pytest.importorskip("aiokafka", reason="AIOKAFKA IS NOT INSTALLED")
    broker = restartable_broker
    topic = "restarted-aiokafka"
    create_topics(broker.bootstrap, topic)
    acknowledgements = Acknowledgements()

    def settled(future) -> None:
        if future.exception() is not None:
            acknowledgements.failed(future.exception())
        else:
            acknowledgements.ok(future.result())

    async def produce() -> None:
        producer = aiokafka.AIOKafkaProducer(
            bootstrap_servers=broker.kafka_bootstrap,
            enable_idempotence=True,
            linger_ms=2,
            max_batch_size=2000,  # many requests in flight when the broker goes
            retry_backoff_ms=50,
            request_timeout_ms=CLIENT_TIMEOUT_S * 1000,
        )
        await producer.start()
        try:
            for index in range(RECORDS):
                future = await producer.send(topic, value=b"%06d" % index, partition=0)
                future.add_done_callback(settled)
                if index == RESTART_AFTER + 500:
                    await asyncio.to_thread(acknowledgements.enough.wait, CLIENT_TIMEOUT_S)
                    assert acknowledgements.enough.is_set(), "too few acknowledged"
                    # the producer's tasks run on while the broker restarts
                    await asyncio.to_thread(broker.restart, kill=kill)
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(asyncio.wait_for(produce(), CLIENT_TIMEOUT_S * 3))
    acknowledgements.check()
    check_log(broker, topic)
