"""Kafka's clients against DWAL's Kafka listener, next to DWAL's own client, in one run.

Starts one `dwal broker` (fsync=never, Kafka listener on) in a temporary directory, then,
each on a topic of its own with one partition and 100-byte records (acks=1, no
compression):

    dwal_client    produce and consume with DWAL's client over the native protocol
                   (bench/produce_consume.py's produce and consume)
    confluent      produce and consume with confluent-kafka (librdkafka) over Kafka's
    dwal->kafka    confluent-kafka consuming what DWAL's client wrote: msgpack batches
                   transcoded to Kafka's record encoding on every fetch
    kafka->dwal    DWAL's client consuming what confluent-kafka wrote (Kafka batches, decoded
                   by DWAL's client)

and prints a table of records/s and MB/s (of values). The Kafka clients run in a worker
thread, so the broker's log is read meanwhile; their figures include librdkafka's own
threads, which run beside the Python interpreter.

Usage: python bench/kafka_clients.py [--records N] [--value-bytes B]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client  # noqa: E402
from bench.broker_process import run_broker  # noqa: E402
from bench.produce_consume import consume as dwal_consume  # noqa: E402
from bench.produce_consume import produce as dwal_produce  # noqa: E402
from client import Admin  # noqa: E402

CONSUME_TIMEOUT_S = 120  # a consumer that reads nothing for this long fails the run
DWAL_BUFFER_BYTES = 8 << 20  # as bench/produce_consume.py for 100-byte records


@dataclass(frozen=True)
class Figure:
    client: str
    direction: str
    records: int
    seconds: float
    value_bytes: int

    def row(self) -> str:
        rate = self.records / self.seconds
        return (
            f"{self.client:<14} {self.direction:<8} {self.records:>9} {rate:>12,.0f} "
            f"{rate * self.value_bytes / 1e6:>8.1f}"
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def confluent_produce(bootstrap: str, topic: str, count: int, value_bytes: int) -> float:
    """Seconds for confluent-kafka to produce `count` records and see them acknowledged."""
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": 1,
            "linger.ms": 5,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            "compression.type": "none",
            "enable.idempotence": False,
        }
    )
    value = os.urandom(value_bytes // 2).hex().encode()[:value_bytes]
    failed: list[object] = []

    def delivered(error, _message) -> None:
        if error is not None:
            failed.append(error)

    started = time.perf_counter()
    for _ in range(count):
        while True:
            try:
                producer.produce(topic, value, partition=0, on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: serve callbacks, try again
                producer.poll(0.01)
        producer.poll(0)
    left = producer.flush(CONSUME_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    if left or failed:
        raise RuntimeError(f"confluent-kafka: {left} undelivered, failures {failed[:3]}")
    return elapsed


def confluent_consume(bootstrap: str, topic: str, count: int) -> float:
    """Seconds for confluent-kafka to read `count` records of partition 0 from offset 0."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-unused",
            "enable.auto.commit": False,
            # librdkafka's fetch sizes (1 MiB a partition): with 16 MiB, one fetch overfills
            # its queue (queued.min.messages) and it backs off for fetch.queue.backoff.ms
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        read = 0
        started = time.perf_counter()
        last_progress = started
        while read < count:
            messages = consumer.consume(num_messages=10_000, timeout=1.0)
            for message in messages:
                if message.error() is not None:
                    raise RuntimeError(f"confluent-kafka consumer: {message.error()}")
            read += len(messages)
            now = time.perf_counter()
            if messages:
                last_progress = now
            elif now - last_progress > CONSUME_TIMEOUT_S:
                raise RuntimeError(f"confluent-kafka read {read} of {count}, then nothing")
        return time.perf_counter() - started
    finally:
        consumer.close()


async def run(records: int, value_bytes: int) -> list[Figure]:
    figures = []
    kafka_port = free_port()
    with tempfile.TemporaryDirectory(prefix="dwal-bench-kafka-") as data_dir:
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(
                run_broker, data_dir, "--fsync", "never", "--kafka-port", str(kafka_port)
            )
            kafka = f"127.0.0.1:{kafka_port}"
            async with client.connect(broker.bootstrap) as cluster:
                await Admin(cluster).create_topic("from-confluent", 1)
            count, elapsed, _ = await dwal_produce(
                broker.bootstrap, "from-dwal", value_bytes, 3600, records, DWAL_BUFFER_BYTES
            )
            figures.append(Figure("dwal_client", "produce", count, elapsed, value_bytes))
            got, elapsed, _ = await dwal_consume(broker.bootstrap, "from-dwal", count)
            figures.append(Figure("dwal_client", "consume", got, elapsed, value_bytes))

            elapsed = await trio.to_thread.run_sync(
                confluent_produce, kafka, "from-confluent", records, value_bytes
            )
            figures.append(Figure("confluent", "produce", records, elapsed, value_bytes))
            elapsed = await trio.to_thread.run_sync(
                confluent_consume, kafka, "from-confluent", records
            )
            figures.append(Figure("confluent", "consume", records, elapsed, value_bytes))

            elapsed = await trio.to_thread.run_sync(confluent_consume, kafka, "from-dwal", count)
            figures.append(Figure("dwal->kafka", "consume", count, elapsed, value_bytes))
            got, elapsed, _ = await dwal_consume(broker.bootstrap, "from-confluent", records)
            figures.append(Figure("kafka->dwal", "consume", got, elapsed, value_bytes))
            nursery.cancel_scope.cancel()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=500_000, help="records per scenario")
    parser.add_argument("--value-bytes", type=int, default=100)
    args = parser.parse_args()
    figures = trio.run(run, args.records, args.value_bytes)
    print(f"{'client':<14} {'what':<8} {'records':>9} {'records/s':>12} {'MB/s':>8}")
    for figure in figures:
        print(figure.row(), flush=True)


if __name__ == "__main__":
    main()
