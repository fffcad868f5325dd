"""Kafka clients across a broker restart: an idempotent producer whose broker is killed
mid-stream (SIGKILL, with requests in flight) retries what was not acknowledged, and the log
holds every record once, in order."""

from __future__ import annotations

import threading
import time

import pytest
from client_adapters import CLIENT_TIMEOUT_S, client_for
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
