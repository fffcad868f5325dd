"""The producer's API for users of Kafka clients, against an in-process broker: delivery
callbacks, `send_and_wait`, `flush()` reporting failures, records too large refused alone,
Kafka's option names, serializers, `connect(bootstrap_servers=...)`, and Kafka's key
partitioning (murmur2), which every DWAL producer path (client, CLI, JSON API) shares."""

from __future__ import annotations

import json
import logging
import zlib

import h11
import pytest
import trio
from dwal_process import dwal

import client
from client import (
    Admin,
    DeliveryFailure,
    DwalError,
    ErrorCode,
    Producer,
    ProducerClosed,
    RecordMetadata,
    TopicPartition,
)
from client.kafka_options import UnknownOptionError
from protocol import Compression

# Kafka's UtilsTest.testMurmur2 (the Java client's signed ints) and the partition that
# `Utils.toPositive(murmur2(key)) % 6` gives, worked out from them by hand.
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}
JAVA_PARTITION_OF_6 = {key: (value & 0x7FFFFFFF) % 6 for key, value in JAVA_MURMUR2.items()}


async def read_partition(cluster, topic: str, partition: int) -> list:
    """Every record of one partition, read to its end."""
    consumer = client.Consumer(cluster, auto_offset_reset="earliest", max_wait_ms=0)
    consumer.assign([(topic, partition)])
    records: list = []
    while True:
        got = (await consumer.poll()).get(TopicPartition(topic, partition), [])
        if not got:
            return records
        records.extend(got)


# -- delivery callbacks --------------------------------------------------------------------


async def test_the_producer_callback_gets_each_record_once_with_its_metadata(broker):
    calls: list[tuple[RecordMetadata | None, DwalError | None]] = []
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("called", partitions=2)
        async with Producer(cluster, on_delivery=lambda m, e: calls.append((m, e))) as producer:
            deliveries = []
            # Rounds, because trio may run the callback task before or after flush() wakes:
            # each round, flush() returns only once every callback due has run.
            for round_number in range(20):
                for n in range(4):
                    key = b"k%d" % (n % 3)
                    deliveries.append(await producer.send("called", b"v%d" % n, key=key))
                assert await producer.flush() == []
                assert len(calls) == 4 * (round_number + 1)
    assert all(error is None for _, error in calls)
    assert sorted((m.partition, m.offset) for m, _ in calls if m is not None) == sorted(
        (d.result().partition, d.result().offset) for d in deliveries
    )
    assert {m for m, _ in calls} == {d.result() for d in deliveries}
    assert len(deliveries) == 80


async def test_a_callback_given_to_send_replaces_the_producer_callback(broker):
    producer_calls: list = []
    send_calls: list = []
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("replaced")
        async with Producer(cluster, on_delivery=lambda m, e: producer_calls.append(m)) as producer:
            await producer.send("replaced", b"a")
            await producer.send("replaced", b"b", on_delivery=lambda m, e: send_calls.append(m))
            await producer.send("replaced", b"c")
    assert [m.offset for m in producer_calls] == [0, 2]
    assert [m.offset for m in send_calls] == [1]


async def test_a_failed_record_reaches_its_callback_and_the_next_flush(broker):
    calls: list = []
    async with client.connect(broker.bootstrap) as cluster:
        admin = Admin(cluster)
        await admin.create_topic("doomed", partitions=1)
        await admin.create_topic("kept", partitions=1)
        async with Producer(
            cluster, retries=0, linger_ms=60_000, on_delivery=lambda m, e: calls.append((m, e))
        ) as producer:
            ok = await producer.send("kept", b"fine")
            lost = [await producer.send("doomed", b"lost-%d" % n) for n in range(3)]
            await admin.delete_topic("doomed")
            failures = await producer.flush()
            assert failures == [
                DeliveryFailure("doomed", 0, 3, failures[0].error),
            ], failures
            assert failures[0].error.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
            assert await producer.flush() == []  # reported once
            assert (await ok.wait()).offset == 0
        for delivery in lost:
            assert delivery.error is failures[0].error
    assert sorted((m is None, e is None) for m, e in calls) == [
        (False, True),  # "kept": metadata, no error
        (True, False),
        (True, False),
        (True, False),
    ]
    assert [e for m, e in calls if e is not None] == [failures[0].error] * 3


async def test_records_failing_at_close_reach_their_callbacks(broker):
    calls: list = []

    class Stop(Exception):
        pass

    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("closing")
        with pytest.raises(Stop):
            async with Producer(
                cluster, linger_ms=60_000, on_delivery=lambda m, e: calls.append(e)
            ) as producer:
                for n in range(3):
                    await producer.send("closing", b"%d" % n)
                raise Stop
    assert len(calls) == 3
    assert all(isinstance(error, ProducerClosed) for error in calls)


async def test_an_exception_in_a_callback_propagates_out_of_the_producer_block(broker, caplog):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("buggy")
        # Rounds, because trio may run the callback task before or after flush() wakes.
        for _ in range(10):
            called: list[int] = []

            def callback(metadata, error) -> None:
                called.append(metadata.offset % 5)
                if metadata.offset % 5 in (1, 3):
                    raise KeyError(f"bug at {metadata.offset % 5}")

            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="dwal.client"):
                with pytest.raises(KeyError, match="bug at 1"):
                    async with Producer(
                        cluster, linger_ms=60_000, on_delivery=callback
                    ) as producer:
                        for n in range(5):  # one batch: its five callbacks are due together
                            await producer.send("buggy", b"%d" % n)
                        with trio.fail_after(10):
                            await producer.flush()  # cancelled when the callback task raises
                        pytest.fail("the block went on after a callback raised")
            # the other callbacks due were called all the same; the second error was logged
            assert sorted(called) == [0, 1, 2, 3, 4]
            assert "bug at 3" in caplog.text


async def test_a_callback_may_send_further_records(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("chained")
        async with Producer(cluster, linger_ms=60_000) as producer:
            follow_ups: list = []

            def send_follow_up(metadata, error) -> None:
                assert error is None
                follow_ups.append(producer.send_nowait("chained", b"after-%d" % metadata.offset))

            # Rounds, because trio may run the callback task before or after flush() wakes.
            for round_number in range(10):
                await producer.send("chained", b"first", on_delivery=send_follow_up)
                with trio.fail_after(10):  # not the 60 s linger
                    await producer.flush()  # waits for the record the callback sent, too
                assert len(follow_ups) == round_number + 1 and follow_ups[-1].done
        assert [(await follow_up.wait()).offset for follow_up in follow_ups] == list(
            range(1, 20, 2)
        )
        values = [r.value for r in await read_partition(cluster, "chained", 0)]
        assert values == [b"first", b"after-0", b"first", b"after-2"] + values[4:]
        assert len(values) == 20


# -- send_and_wait, flush ------------------------------------------------------------------


async def test_send_and_wait_returns_the_metadata_or_raises_the_error(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("waited", configs={"max.message.bytes": "1000"})
        async with Producer(cluster, allow_auto_topic_creation=False) as producer:
            first = await producer.send_and_wait("waited", b"one", key=b"k")
            second = await producer.send_and_wait("waited", b"two", key=b"k")
            assert (first.topic, first.partition, first.offset) == ("waited", 0, 0)
            assert second.offset == 1
            with pytest.raises(DwalError) as too_large:
                await producer.send_and_wait("waited", b"x" * 2000)
            assert too_large.value.code == ErrorCode.MESSAGE_TOO_LARGE
            with pytest.raises(DwalError) as unknown:
                await producer.send_and_wait("no-such-topic", b"v")
            assert unknown.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION


# -- records too large are refused alone ---------------------------------------------------


async def test_a_record_over_the_topic_limit_fails_alone_and_its_neighbours_are_stored(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("limited", configs={"max.message.bytes": "1000"})
        async with Producer(cluster, linger_ms=60_000) as producer:
            before = await producer.send("limited", b"before")
            with pytest.raises(DwalError) as caught:
                await producer.send("limited", b"x" * 1000)
            after = await producer.send("limited", b"after")
            assert producer.statistics().open_batches == 1  # one batch held all three sends
            assert await producer.flush() == []
        assert caught.value.code == ErrorCode.MESSAGE_TOO_LARGE
        assert "max.message.bytes (1000) of topic 'limited'" in caught.value.message
        assert [(await before.wait()).offset, (await after.wait()).offset] == [0, 1]
        values = [r.value for r in await read_partition(cluster, "limited", 0)]
        assert values == [b"before", b"after"]


async def test_a_record_over_request_bytes_max_fails_alone_naming_that_limit(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("requests")
        async with Producer(cluster, linger_ms=60_000, max_request_size=1000) as producer:
            assert producer.request_bytes_max == 1000
            neighbours = [await producer.send("requests", b"n%d" % n) for n in range(3)]
            with pytest.raises(DwalError) as caught:
                await producer.send("requests", b"y" * 2000)  # fits the topic's 1 MiB
            assert caught.value.code == ErrorCode.MESSAGE_TOO_LARGE
            assert "request_bytes_max (1000)" in caught.value.message
            largest = await producer.send("requests", b"z" * 900)
            assert await producer.flush() == []
        assert [(await d.wait()).offset for d in [*neighbours, largest]] == [0, 1, 2, 3]


# -- Kafka's option names ------------------------------------------------------------------


async def test_kafka_option_names_are_keyword_arguments_of_the_producer(broker):
    async with client.connect(broker.bootstrap) as cluster:
        producer = Producer(
            cluster,
            acks="all",
            compression_type="gzip",
            buffer_memory=1 << 20,
            max_request_size=500_000,
            max_in_flight_requests_per_connection=1,
            retry_backoff_ms=20,
            request_timeout_ms=7000,
            delivery_timeout_ms=9000,
            enable_idempotence=False,
            partitioner="crc32",
        )
    assert producer.acks == -1
    assert producer.compression == Compression.GZIP
    assert producer.buffer_bytes_max == 1 << 20
    assert producer.request_bytes_max == 500_000
    assert producer.max_in_flight_per_partition == 1
    assert producer.retry_backoff_s == 0.02
    assert producer.request_timeout_ms == 7000
    assert producer.delivery_timeout_s == 9
    assert producer.idempotent is False
    assert producer.partitioner == "crc32"


async def test_from_config_takes_a_kafka_config_dict(broker):
    delivered: list = []
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("configured", partitions=3)
        config = {
            "linger.ms": "2",  # as read from a properties file
            "acks": "all",
            "batch.size": "1000",
            "compression.type": "lz4",
            "queue.buffering.max.kbytes": 2048,
            "message.send.max.retries": 3,
            "enable.idempotence": "true",
            "max.in.flight": 5,
            "on_delivery": lambda m, e: delivered.append(m),
            "retry_unknown_outcome": False,  # DWAL's own names too
        }
        producer = Producer.from_config(cluster, config, partitioner="crc32")
        assert producer.partitioner == "crc32"
        producer = Producer.from_config(cluster, config)
        assert (producer.linger_s, producer.batch_size, producer.retries) == (0.002, 1000, 3)
        assert producer.compression == Compression.LZ4
        assert producer.buffer_bytes_max == 2048 * 1024
        assert producer.idempotent and producer.acks == -1
        async with producer:
            for key in JAVA_MURMUR2:
                await producer.send("configured", b"v", key=key)
    assert len(delivered) == len(JAVA_MURMUR2)


async def test_options_the_producer_does_not_take_say_where_they_belong(broker):
    async with client.connect(broker.bootstrap) as cluster:
        cases = {
            "linger.msx": "did you mean 'linger.ms'",
            "group.id": "consumer option",
            "auto_offset_reset": "consumer option",
            "bootstrap.servers": "client.connect(bootstrap_servers=...)",
            "client.id": "client.connect(client_id=...)",
            "transactional.id": "no transactions",
            "max.message.bytes": "topic config",
            "session.timeout.ms": "group_session_timeout_ms",
        }
        for name, hint in cases.items():
            with pytest.raises(UnknownOptionError) as caught:
                Producer.from_config(cluster, {name: 1})
            assert hint in str(caught.value), (name, str(caught.value))
            assert isinstance(caught.value, TypeError)
        with pytest.raises(UnknownOptionError, match="bootstrap.servers"):
            Producer(cluster, bootstrap_servers="127.0.0.1:9092")
        with pytest.raises(UnknownOptionError, match="same option"):
            Producer(cluster, compression="gzip", compression_type="lz4")
        with pytest.raises(UnknownOptionError, match="same option"):
            Producer.from_config(cluster, {"linger.ms": 1, "queue.buffering.max.ms": 2})
        with pytest.raises(UnknownOptionError, match="same option"):
            Producer.from_config(cluster, {"compression.type": "lz4"}, compression="gzip")
        with pytest.raises(UnknownOptionError, match="both in the config and a keyword"):
            Producer.from_config(cluster, {"buffer_bytes_max": 1 << 20}, buffer_bytes_max=1)
        with pytest.raises(ValueError, match="'linger.ms'"):
            Producer.from_config(cluster, {"linger.ms": "soon"})
        with pytest.raises(ValueError, match="acks"):
            Producer.from_config(cluster, {"acks": "most"})
        with pytest.raises(ValueError, match="partitioner"):
            Producer(cluster, partitioner="fnv1a")
        with pytest.raises(ValueError, match="'snappy' is not supported"):
            Producer.from_config(cluster, {"compression.type": "snappy"})
        with pytest.raises(ValueError, match="callable"):
            Producer.from_config(cluster, {"value.serializer": "StringSerializer"})


async def test_serializers_turn_keys_and_values_into_bytes_and_leave_none_alone(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("serialized")
        async with Producer(
            cluster,
            key_serializer=lambda key: str(key).encode(),
            value_serializer=lambda value: json.dumps(value).encode(),
        ) as producer:
            stored = await producer.send_and_wait("serialized", {"amount": 3}, key=42)
            await producer.send_and_wait("serialized", None, key=42)  # a tombstone
            await producer.send_and_wait("serialized", [1, 2])  # no key
            with pytest.raises(TypeError):
                await producer.send("serialized", object())  # json.dumps refuses it
        records = await read_partition(cluster, "serialized", 0)
        assert [(r.key, r.value) for r in records] == [
            (b"42", b'{"amount": 3}'),
            (b"42", None),
            (None, b"[1, 2]"),
        ]
        assert stored.partition == 0


async def test_connect_takes_bootstrap_servers_as_kafka_clients_spell_it(broker):
    async with client.connect(bootstrap_servers=broker.bootstrap) as cluster:
        assert cluster.bootstrap == [("127.0.0.1", broker.port)]
    async with client.connect(bootstrap_servers=["127.0.0.1:1", broker.bootstrap]) as cluster:
        assert cluster.bootstrap[-1] == ("127.0.0.1", broker.port)
    async with client.connect(bootstrap_servers=f"127.0.0.1:1,{broker.bootstrap}") as cluster:
        assert len(cluster.bootstrap) == 2
    with pytest.raises(TypeError, match="same argument"):
        async with client.connect(broker.bootstrap, bootstrap_servers=broker.bootstrap):
            pass


# -- Kafka's key partitioning --------------------------------------------------------------


async def test_keyed_records_land_where_the_java_client_puts_them(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("java-placed", partitions=6)
        await Admin(cluster).create_topic("java-placed-4", partitions=4)
        async with Producer(cluster) as producer:
            deliveries = {}
            for _ in range(2):  # the second time, the producer remembers the keys' hashes
                for key in JAVA_MURMUR2:
                    deliveries[key] = await producer.send("java-placed", b"v", key=key)
                    deliveries[key, 4] = await producer.send("java-placed-4", b"v", key=key)
        placed = {key: (await d.wait()).partition for key, d in deliveries.items()}
    assert {key: placed[key] for key in JAVA_MURMUR2} == JAVA_PARTITION_OF_6
    assert {key: placed[key, 4] for key in JAVA_MURMUR2} == {
        key: (value & 0x7FFFFFFF) % 4 for key, value in JAVA_MURMUR2.items()
    }
    assert len(set(JAVA_PARTITION_OF_6.values())) > 2


async def test_the_crc32_partitioner_keeps_the_old_placement(broker):
    keys = [b"user-%d" % n for n in range(30)]
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("old-placement", partitions=4)
        async with Producer(cluster, partitioner="crc32") as producer:
            deliveries = [await producer.send("old-placement", b"v", key=key) for key in keys]
        placed = [(await d.wait()).partition for d in deliveries]
    assert placed == [zlib.crc32(key) % 4 for key in keys]


async def http_post_json(port: int, target: str, body: object) -> dict:
    """POST a JSON body to the broker's HTTP gateway; returns the JSON answer."""
    data = json.dumps(body).encode()
    connection = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        headers = [
            ("host", "127.0.0.1"),
            ("content-type", "application/json"),
            ("content-length", str(len(data))),
            ("connection", "close"),
        ]
        request = h11.Request(method="POST", target=target, headers=headers)
        await stream.send_all(connection.send(request) + connection.send(h11.Data(data=data)))
        await stream.send_all(connection.send(h11.EndOfMessage()))
        answer = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                answer += event.data
            elif isinstance(event, h11.EndOfMessage):
                return json.loads(answer)
            elif isinstance(event, h11.Response):
                assert event.status_code == 200, event


async def test_the_client_the_cli_and_the_json_api_put_a_key_in_one_partition(broker):
    keys = [b"customer-%d" % n for n in range(12)] + list(JAVA_MURMUR2)
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("agreed", partitions=6)
        async with Producer(cluster) as producer:
            deliveries = [await producer.send("agreed", b"client", key=key) for key in keys]
        by_client = [(await d.wait()).partition for d in deliveries]
        records = [{"key": key.decode(), "value": "http"} for key in keys]
        answer = await http_post_json(broker.http_port, "/topics/agreed/records", records)
        by_http = [entry["partition"] for entry in answer["offsets"]]
        stdin = b"".join(key + b"\tcli\n" for key in keys)
        await dwal(
            "produce",
            "agreed",
            "--bootstrap",
            broker.bootstrap,
            "--key-separator",
            "\t",
            stdin=stdin,
        )
        by_cli = {}
        for partition in range(6):
            for record in await read_partition(cluster, "agreed", partition):
                if record.value == b"cli":
                    by_cli[record.key] = partition
    assert by_http == by_client
    assert [by_cli[key] for key in keys] == by_client
    assert [by_client[keys.index(key)] for key in JAVA_MURMUR2] == list(
        JAVA_PARTITION_OF_6.values()
    )


async def test_dwal_produce_takes_the_crc32_partitioner(broker):
    keys = [b"user-%d" % n for n in range(10)]
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("cli-crc32", partitions=4)
        stdin = b"".join(key + b":v\n" for key in keys)
        b = ["--bootstrap", broker.bootstrap]
        await dwal(
            "produce",
            "cli-crc32",
            *b,
            "--key-separator",
            ":",
            "--partitioner",
            "crc32",
            stdin=stdin,
        )
        placed = {}
        for partition in range(4):
            for record in await read_partition(cluster, "cli-crc32", partition):
                placed[record.key] = partition
    assert placed == {key: zlib.crc32(key) % 4 for key in keys}
