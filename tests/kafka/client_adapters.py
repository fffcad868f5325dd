"""The three Python Kafka clients behind one small interface, so that every test runs with
each: kafka-python and confluent-kafka (blocking), aiokafka (asyncio, run in its own event
loop per call). Every call is bounded by CLIENT_TIMEOUT_S.

A client that is not installed makes its tests skip with a loud reason (the test extras
install all three).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import pytest

CLIENT_TIMEOUT_S = 20
# librdkafka's log lines (a refused connection while a broker restarts, ...) go to Python's
# logging, which pytest captures, instead of the terminal
RDKAFKA_LOGGER = logging.getLogger("rdkafka")
CLIENT_NAMES = ["kafka-python", "confluent-kafka", "aiokafka"]
COMPRESSIONS = ["none", "gzip", "snappy", "lz4", "zstd"]


@dataclass(frozen=True)
class Sent:
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int


@dataclass(frozen=True)
class Received:
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int

    @property
    def sent(self) -> Sent:
        return Sent(self.key, self.value, self.headers, self.timestamp_ms)


def records(count: int, *, prefix: str = "r", timestamp_ms: int = 1_700_000_000_000) -> list[Sent]:
    """`count` records with distinct keys, values, headers and timestamps (one record in
    seven has no key, one in five two headers, one in three none)."""
    out = []
    for index in range(count):
        key = None if index % 7 == 3 else f"{prefix}-key-{index}".encode()
        headers: tuple[tuple[str, bytes], ...] = ()
        if index % 3:
            headers = (("h", f"{index}".encode()),)
        if index % 5 == 1:
            headers = (("h", f"{index}".encode()), ("empty", b""))
        value = f"{prefix}-value-{index}-".encode() + b"x" * (index % 50)
        out.append(Sent(key, value, headers, timestamp_ms + index * 10))
    return out


def client_for(name: str) -> Any:
    """The adapter of client `name`; skips loudly when its package is not installed."""
    module = {"kafka-python": "kafka", "confluent-kafka": "confluent_kafka", "aiokafka": "aiokafka"}
    pytest.importorskip(
        module[name],
        reason=f"{name.upper()} IS NOT INSTALLED: its Kafka listener tests did not run "
        "(pip install -e '.[test]')",
    )
    return {"kafka-python": KafkaPython, "confluent-kafka": Confluent, "aiokafka": AioKafka}[name]()


def _deadline() -> float:
    return time.monotonic() + CLIENT_TIMEOUT_S


# -- kafka-python ------------------------------------------------------------------------


class KafkaPython:
    name = "kafka-python"

    def produce(
        self,
        bootstrap: str,
        topic: str,
        sent: list[Sent],
        *,
        compression: str = "none",
        acks: Any = 1,
        idempotent: bool = False,
        partition: int = 0,
    ) -> list[int]:
        from kafka import KafkaProducer

        producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            compression_type=None if compression == "none" else compression,
            acks="all" if idempotent else acks,  # the idempotent producer insists on it
            enable_idempotence=idempotent,
            linger_ms=5,
            request_timeout_ms=CLIENT_TIMEOUT_S * 1000,
        )
        try:
            futures = [
                producer.send(
                    topic,
                    key=record.key,
                    value=record.value,
                    headers=list(record.headers),
                    timestamp_ms=record.timestamp_ms,
                    partition=partition,
                )
                for record in sent
            ]
            producer.flush(timeout=CLIENT_TIMEOUT_S)
            return [future.get(timeout=CLIENT_TIMEOUT_S).offset for future in futures]
        finally:
            producer.close(timeout=5)

    def _consumer(self, bootstrap: str) -> Any:
        from kafka import KafkaConsumer

        return KafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
            request_timeout_ms=CLIENT_TIMEOUT_S * 1000,
        )

    def consume(
        self, bootstrap: str, topic: str, offset: int, count: int, partition: int = 0
    ) -> list[Received]:
        from kafka import TopicPartition

        consumer = self._consumer(bootstrap)
        try:
            where = TopicPartition(topic, partition)
            consumer.assign([where])
            consumer.seek(where, offset)
            out: list[Received] = []
            deadline = _deadline()
            while len(out) < count and time.monotonic() < deadline:
                for batch in consumer.poll(timeout_ms=500).values():
                    out.extend(
                        Received(
                            m.offset,
                            m.key,
                            m.value,
                            tuple((k, bytes(v)) for k, v in m.headers),
                            m.timestamp,
                        )
                        for m in batch
                    )
            return out
        finally:
            consumer.close()

    def offset_for_time(
        self, bootstrap: str, topic: str, timestamp_ms: int, partition: int = 0
    ) -> int | None:
        from kafka import TopicPartition

        consumer = self._consumer(bootstrap)
        try:
            where = TopicPartition(topic, partition)
            found = consumer.offsets_for_times({where: timestamp_ms})[where]
            return None if found is None else found.offset
        finally:
            consumer.close()


# -- confluent-kafka ---------------------------------------------------------------------


class Confluent:
    name = "confluent-kafka"

    def produce(
        self,
        bootstrap: str,
        topic: str,
        sent: list[Sent],
        *,
        compression: str = "none",
        acks: Any = 1,
        idempotent: bool = False,
        partition: int = 0,
    ) -> list[int]:
        from confluent_kafka import Producer

        config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "logger": RDKAFKA_LOGGER,
            "compression.type": compression,
            "enable.idempotence": idempotent,
            "linger.ms": 5,
            "message.timeout.ms": CLIENT_TIMEOUT_S * 1000,
        }
        if not idempotent:  # the idempotent producer insists on acks=all
            config["acks"] = acks
        producer = Producer(config)
        results: list[Any] = [None] * len(sent)

        def delivered(index: int):
            def callback(error, message):
                # acks=0: no offset is known (None)
                offset = message.offset()
                results[index] = error if error is not None else -1 if offset is None else offset

            return callback

        for index, record in enumerate(sent):
            producer.produce(
                topic,
                key=record.key,
                value=record.value,
                headers=list(record.headers),
                timestamp=record.timestamp_ms,
                partition=partition,
                on_delivery=delivered(index),
            )
            producer.poll(0)
        left = producer.flush(CLIENT_TIMEOUT_S)
        assert left == 0, f"{left} records not delivered in {CLIENT_TIMEOUT_S} s"
        errors = [r for r in results if not isinstance(r, int)]
        assert not errors, errors[:3]
        return results

    def _consumer(self, bootstrap: str) -> Any:
        from confluent_kafka import Consumer

        return Consumer(
            {
                "bootstrap.servers": bootstrap,
                "logger": RDKAFKA_LOGGER,
                "group.id": "tests-kafka-unused",  # required; nothing is committed
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 100,
            }
        )

    def consume(
        self, bootstrap: str, topic: str, offset: int, count: int, partition: int = 0
    ) -> list[Received]:
        from confluent_kafka import TopicPartition

        consumer = self._consumer(bootstrap)
        try:
            consumer.assign([TopicPartition(topic, partition, offset)])
            out: list[Received] = []
            deadline = _deadline()
            while len(out) < count and time.monotonic() < deadline:
                message = consumer.poll(0.5)
                if message is None:
                    continue
                assert message.error() is None, message.error()
                out.append(
                    Received(
                        message.offset(),
                        message.key(),
                        message.value(),
                        tuple(message.headers() or ()),
                        message.timestamp()[1],
                    )
                )
            return out
        finally:
            consumer.close()

    def offset_for_time(
        self, bootstrap: str, topic: str, timestamp_ms: int, partition: int = 0
    ) -> int | None:
        from confluent_kafka import TopicPartition

        consumer = self._consumer(bootstrap)
        try:
            (found,) = consumer.offsets_for_times(
                [TopicPartition(topic, partition, timestamp_ms)], timeout=CLIENT_TIMEOUT_S
            )
            assert found.error is None, found.error
            return None if found.offset < 0 else found.offset
        finally:
            consumer.close()


# -- aiokafka ----------------------------------------------------------------------------


def _run(coroutine: Any) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, CLIENT_TIMEOUT_S * 2)

    return asyncio.run(bounded())


class AioKafka:
    name = "aiokafka"

    def produce(
        self,
        bootstrap: str,
        topic: str,
        sent: list[Sent],
        *,
        compression: str = "none",
        acks: Any = 1,
        idempotent: bool = False,
        partition: int = 0,
    ) -> list[int]:
        from aiokafka import AIOKafkaProducer

        async def produce() -> list[int]:
            options: dict[str, Any] = {}
            if not idempotent:  # the idempotent producer insists on acks=all
                options["acks"] = acks
            producer = AIOKafkaProducer(
                bootstrap_servers=bootstrap,
                compression_type=None if compression == "none" else compression,
                enable_idempotence=idempotent,
                linger_ms=5,
                request_timeout_ms=CLIENT_TIMEOUT_S * 1000,
                **options,
            )
            await producer.start()
            try:
                futures = [
                    await producer.send(
                        topic,
                        key=record.key,
                        value=record.value,
                        headers=list(record.headers),
                        timestamp_ms=record.timestamp_ms,
                        partition=partition,
                    )
                    for record in sent
                ]
                # acks=0: no metadata at all
                return [getattr(await future, "offset", -1) for future in futures]
            finally:
                await producer.stop()

        return _run(produce())

    async def _consumer(self, bootstrap: str) -> Any:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
            request_timeout_ms=CLIENT_TIMEOUT_S * 1000,
        )
        await consumer.start()
        return consumer

    def consume(
        self, bootstrap: str, topic: str, offset: int, count: int, partition: int = 0
    ) -> list[Received]:
        from aiokafka import TopicPartition

        async def consume() -> list[Received]:
            consumer = await self._consumer(bootstrap)
            try:
                where = TopicPartition(topic, partition)
                consumer.assign([where])
                consumer.seek(where, offset)
                out: list[Received] = []
                deadline = _deadline()
                while len(out) < count and time.monotonic() < deadline:
                    for batch in (await consumer.getmany(timeout_ms=500)).values():
                        out.extend(
                            Received(
                                m.offset,
                                m.key,
                                m.value,
                                tuple((k, bytes(v)) for k, v in m.headers),
                                m.timestamp,
                            )
                            for m in batch
                        )
                return out
            finally:
                await consumer.stop()

        return _run(consume())

    def offset_for_time(
        self, bootstrap: str, topic: str, timestamp_ms: int, partition: int = 0
    ) -> int | None:
        from aiokafka import TopicPartition

        async def lookup() -> int | None:
            consumer = await self._consumer(bootstrap)
            try:
                where = TopicPartition(topic, partition)
                found = (await consumer.offsets_for_times({where: timestamp_ms}))[where]
                return None if found is None else found.offset
            finally:
                await consumer.stop()

        return _run(lookup())
