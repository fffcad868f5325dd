"""The client library against an in-process broker over real TCP on 127.0.0.1."""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing

import client
from client import Admin, Consumer, DwalError, ErrorCode, Producer, TopicPartition
from protocol import ApiKey, FrameDecoder, Request, build_batch, encode_request, parse_response


async def consume_all(cluster, topic: str, expected: int, **options) -> dict[int, list]:
    consumer = Consumer(cluster, auto_offset_reset="earliest", **options)
    await consumer.assign_topic(topic)
    got: dict[int, list] = {}
    total = 0
    with trio.fail_after(20):
        while total < expected:
            for tp, records in (await consumer.poll(timeout_ms=200)).items():
                got.setdefault(tp.partition, []).extend(records)
                total += len(records)
    return got


async def test_produce_and_consume_across_partitions(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("events", partitions=3)
        async with Producer(cluster, linger_ms=1, batch_size=2048) as producer:
            deliveries = [
                await producer.send("events", f"value-{i}".encode(), key=f"key-{i % 7}".encode())
                for i in range(3000)
            ]
        results = [d.result() for d in deliveries]
        got = await consume_all(cluster, "events", 3000)
    assert sum(len(r) for r in got.values()) == 3000
    for partition, records in got.items():
        assert [r.offset for r in records] == list(range(len(records)))
    by_value = {r.value: (p, r.offset, r.key) for p, records in got.items() for r in records}
    for i, meta in enumerate(results):
        partition, offset, key = by_value[f"value-{i}".encode()]
        assert (meta.partition, meta.offset) == (partition, offset)
        assert key == f"key-{i % 7}".encode()
    partitions_of_key: dict[bytes, set[int]] = {}
    for partition, _, key in by_value.values():
        partitions_of_key.setdefault(key, set()).add(partition)
    assert all(len(p) == 1 for p in partitions_of_key.values())


@pytest.mark.parametrize("compression", ["gzip", "lz4", "zstd"])
async def test_compressed_batches_round_trip(broker, compression):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("c")
        async with Producer(cluster, compression=compression) as producer:
            for i in range(500):
                await producer.send("c", b"x" * (i % 50), headers=[("h", b"%d" % i)])
        got = (await consume_all(cluster, "c", 500))[0]
    assert [r.value for r in got] == [b"x" * (i % 50) for i in range(500)]
    assert [r.headers for r in got] == [[["h", b"%d" % i]] for i in range(500)]


async def test_unknown_topic_is_a_clear_error(broker):
    async with client.connect(broker.bootstrap) as cluster:
        async with Producer(cluster) as producer:
            with pytest.raises(DwalError) as info:
                await producer.send("missing", b"v")
        assert info.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
        consumer = Consumer(cluster)
        with pytest.raises(DwalError):
            await consumer.assign_topic("missing")


async def test_topic_admin_errors_and_lifecycle(broker):
    async with client.connect(broker.bootstrap) as cluster:
        admin = Admin(cluster)
        await admin.create_topic("t1", partitions=2, configs={"retention.ms": "1000"})
        with pytest.raises(DwalError) as info:
            await admin.create_topic("t1")
        assert info.value.code == ErrorCode.TOPIC_ALREADY_EXISTS
        for bad in ["", "a" * 250, "bad name", "..", "naïve"]:
            with pytest.raises(DwalError) as info:
                await admin.create_topic(bad)
            assert info.value.code == ErrorCode.INVALID_TOPIC
        with pytest.raises(DwalError) as info:
            await admin.create_topic("t2", configs={"segment.bytes": "lots"})
        assert info.value.code == ErrorCode.INVALID_CONFIG
        with pytest.raises(DwalError) as info:
            await admin.create_topic("t3", partitions=0)
        assert info.value.code == ErrorCode.INVALID_PARTITIONS
        assert await admin.list_topics() == ["t1"]
        description = await admin.describe_topic("t1")
        assert len(description.partitions) == 2
        assert description.configs["retention.ms"] == "1000"
        overrides = await admin.alter_configs(
            "t1", set={"retention.bytes": "100000"}, delete=["retention.ms"]
        )
        assert overrides == {"retention.bytes": "100000"}
        with pytest.raises(DwalError) as info:
            await admin.alter_configs("t1", set={"no.such.config": "1"})
        assert info.value.code == ErrorCode.INVALID_CONFIG
        await admin.delete_topic("t1")
        assert await admin.list_topics() == []
        with pytest.raises(DwalError) as info:
            await admin.delete_topic("t1")
        assert info.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION


async def test_long_poll_returns_when_data_arrives(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("lp")
        consumer = Consumer(cluster, auto_offset_reset="latest", max_wait_ms=10_000)
        consumer.assign([TopicPartition("lp", 0)])
        await consumer.seek_to_end()
        got = []

        async def poll_once():
            got.append(await consumer.poll())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll_once)
            await trio.testing.wait_all_tasks_blocked()
            async with Producer(cluster, linger_ms=0) as producer:
                await producer.send("lp", b"late")
        assert [r.value for r in got[0][TopicPartition("lp", 0)]] == [b"late"]


async def test_acks_variants_and_seek(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("acks")
        for acks in (0, 1, "all"):
            async with Producer(cluster, acks=acks) as producer:
                for i in range(10):
                    await producer.send("acks", b"%s-%d" % (str(acks).encode(), i))
        got = (await consume_all(cluster, "acks", 30))[0]
        assert [r.offset for r in got] == list(range(30))
        consumer = Consumer(cluster)
        consumer.assign([("acks", 0)])
        consumer.seek(("acks", 0), 25)
        records = (await consumer.poll())[TopicPartition("acks", 0)]
        assert [r.offset for r in records] == [25, 26, 27, 28, 29]
        consumer.seek(("acks", 0), 31)
        with pytest.raises(DwalError) as info:
            consumer.auto_offset_reset = "error"
            await consumer.poll()
        assert info.value.code == ErrorCode.OFFSET_OUT_OF_RANGE


async def test_seek_to_timestamp(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("ts")
        async with Producer(cluster, linger_ms=0) as producer:
            for i in range(10):
                await producer.send("ts", b"%d" % i, timestamp_ms=1_000_000 + i * 1000)
                await producer.flush()
        consumer = Consumer(cluster)
        consumer.assign([("ts", 0)])
        await consumer.seek_to_timestamp(1_004_500)
        assert consumer.position(("ts", 0)) == 5
        await consumer.seek_to_timestamp(2_000_000)
        assert consumer.position(("ts", 0)) == 10


async def raw_request(port: int, frames: bytes) -> list:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(frames)
        decoder = FrameDecoder()
        responses = []
        with trio.fail_after(10):
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return responses
                decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    responses.append(parse_response(*frame))


def frame(api_key: int, body: dict, tail: bytes = b"", correlation_id: int = 1) -> bytes:
    return encode_request(
        Request(
            api_key=api_key,
            api_version=0,
            correlation_id=correlation_id,
            client_id="test",
            body=body,
            tail=tail,
        )
    )


async def test_bad_requests_get_errors_and_the_broker_keeps_serving(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("small", configs={"max.message.bytes": "2000"})
    good = build_batch([(1, None, b"ok")])
    corrupt = bytearray(good)
    corrupt[-1] ^= 0xFF
    big = build_batch([(1, None, b"z" * 5000)])

    def produce(batch, cid):
        body = {
            "acks": 1,
            "topics": [{"topic": "small", "partitions": [{"partition": 0, "size": len(batch)}]}],
        }
        return frame(ApiKey.PRODUCE, body, bytes(batch), cid)

    stream = (
        frame(999, {}, correlation_id=1)
        + frame(ApiKey.METADATA, {"topics": "not-a-list"}, correlation_id=2)
        + produce(corrupt, 3)
        + produce(big, 4)
        + frame(
            ApiKey.PRODUCE,
            {
                "acks": 1,
                "topics": [{"topic": "small", "partitions": [{"partition": 0, "size": 999}]}],
            },
            good,
            5,
        )
        + frame(
            ApiKey.FETCH,
            {"topics": [{"topic": "small", "partitions": [{"partition": 0, "fetch_offset": 99}]}]},
            correlation_id=6,
        )
        + produce(good, 7)
        + struct.pack(">II", 10, 99)
        + b"garbage!!!"  # undecodable: ends the connection
    )
    responses = await raw_request(broker.port, stream)
    assert [r.correlation_id for r in responses] == [1, 2, 3, 4, 5, 6, 7]
    assert responses[0].error_code == ErrorCode.UNKNOWN_API_KEY
    assert responses[1].error_code == ErrorCode.INVALID_REQUEST
    assert "metadata.topics" in responses[1].error_message

    def partition_error(response):
        return response.body["topics"][0]["partitions"][0]["error_code"]

    assert partition_error(responses[2]) == ErrorCode.CORRUPT_MESSAGE
    assert partition_error(responses[3]) == ErrorCode.MESSAGE_TOO_LARGE
    assert responses[4].error_code == ErrorCode.INVALID_REQUEST
    assert partition_error(responses[5]) == ErrorCode.OFFSET_OUT_OF_RANGE
    assert partition_error(responses[6]) == 0
    # the broker still serves new connections, and nothing bad was written
    async with client.connect(broker.bootstrap) as cluster:
        records = (await consume_all(cluster, "small", 1))[0]
    assert [r.value for r in records] == [b"ok"]


async def test_oversize_frame_closes_only_that_connection(broker):
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
    async with stream:
        await stream.send_all(struct.pack(">II", 1 << 30, 10))
        with trio.fail_after(10):
            assert await stream.receive_some(100) == b""
    async with client.connect(broker.bootstrap) as cluster:
        assert await Admin(cluster).list_topics() == []


async def test_pipelined_requests_keep_send_order_within_a_partition(broker):
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("ordered")
        # tiny batches and no linger: many produce requests in flight on one connection
        async with Producer(
            cluster, linger_ms=0, batch_size=64, max_in_flight_per_partition=5
        ) as producer:
            for i in range(5000):
                await producer.send("ordered", b"%06d" % i)
                if i % 97 == 0:
                    await trio.sleep(0)  # let the sender interleave with sends
        got = (await consume_all(cluster, "ordered", 5000))[0]
    assert [r.value for r in got] == [b"%06d" % i for i in range(5000)]


async def test_a_reset_connection_ends_only_that_connection(broker_launcher):
    import socket
    import struct as struct_module

    broker = await broker_launcher.start()
    for data in (b"\x00\x00", frame(ApiKey.METADATA, {"topics": None})[:7], b""):
        raw = socket.create_connection(("127.0.0.1", broker.port))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct_module.pack("ii", 1, 0))
        if data:
            raw.sendall(data)
        raw.close()  # SO_LINGER 0: the close sends a reset
    for _ in range(3):
        async with client.connect(broker.bootstrap) as cluster:
            assert await Admin(cluster).list_topics() == []
    assert broker.process.returncode is None and not broker.exited.is_set()
    assert b"Traceback" not in broker.output
