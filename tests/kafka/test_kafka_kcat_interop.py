"""kcat (librdkafka's command line tool, run as a subprocess) against the Kafka listener, and
one log read through two protocols: what kcat or a Kafka client wrote, `dwal consume` reads
with the same offsets, keys, values, headers and timestamps; what `dwal produce` and DWAL's
client wrote (msgpack batches, transcoded for Kafka fetchers), kcat and confluent-kafka read
the same way."""

from __future__ import annotations

import json

import pytest
import trio

from broker.gateway.kafka_apis import FETCH_INLINE_BYTES_MAX
from client_adapters import Received, Sent, client_for
from kafka_processes import create_topics, dwal, kcat

import client
from client import Producer

pytestmark = pytest.mark.timeout(60)

FIELDS = "%o|%k|%s|%T|%h\\n"  # offset, key, value, timestamp, headers (a=1,b=2)
KCAT_COMPRESSIONS = {
    "none": ["-z", "none"],
    "gzip": ["-z", "gzip"],
    "snappy": ["-z", "snappy"],
    "lz4": ["-z", "lz4"],
    "zstd": ["-X", "compression.codec=zstd"],
}


def kcat_read(bootstrap: str, topic: str, *options: str) -> list[Received]:
    """Records of partition 0 read by kcat from `options`' start (-o 0 when none) to the end."""
    start = list(options) or ["-o", "0"]
    output = kcat("-b", bootstrap, "-C", "-t", topic, "-p", "0", *start, "-e", "-q", "-f", FIELDS)
    out = []
    for line in output.decode().splitlines():
        offset, key, value, timestamp, headers = line.split("|")
        pairs = tuple(
            (name, raw.encode())
            for name, raw in (item.split("=", 1) for item in headers.split(",") if item)
        )
        out.append(Received(int(offset), key.encode(), value.encode(), pairs, int(timestamp)))
    return out


def dwal_read(bootstrap: str, topic: str) -> list[Received]:
    """Records of partition 0 read by `dwal consume` (the native protocol), to the end."""
    output = dwal("consume", "--bootstrap", bootstrap, topic, "-p", "0", "-e", "-f", "json")
    out = []
    for line in output.decode().splitlines():
        record = json.loads(line)
        headers = tuple((h["key"], h["value"].encode()) for h in record["headers"])
        out.append(
            Received(
                record["offset"],
                record["key"].encode(),
                record["value"].encode(),
                headers,
                record["timestamp"],
            )
        )
    return out


@pytest.mark.parametrize("compression", list(KCAT_COMPRESSIONS))
def test_kcat_produces_and_dwal_consume_reads_the_same(kafka_broker, compression):
    topic = f"kcat-{compression}"
    create_topics(kafka_broker.bootstrap, topic)
    lines = b"".join(b"key-%d:value-%d\n" % (i, i) for i in range(30))
    kafka = kafka_broker.kafka_bootstrap
    kcat("-b", kafka, "-P", "-t", topic, "-p", "0", "-K", ":", "-H", "a=1", "-H", "b=two",
         *KCAT_COMPRESSIONS[compression], stdin=lines)  # fmt: skip

    by_kcat = kcat_read(kafka, topic)
    assert [(r.offset, r.key, r.value, r.headers) for r in by_kcat] == [
        (i, b"key-%d" % i, b"value-%d" % i, (("a", b"1"), ("b", b"two"))) for i in range(30)
    ]
    assert all(r.timestamp_ms > 0 for r in by_kcat)
    assert dwal_read(kafka_broker.bootstrap, topic) == by_kcat
    assert client_for("confluent-kafka").consume(kafka, topic, 0, 30) == by_kcat


def test_kcat_reads_from_an_offset_and_a_timestamp(kafka_broker):
    topic = "kcat-positions"
    create_topics(kafka_broker.bootstrap, topic)
    sent = [
        (b"k%d" % i, b"v%d" % i, 1_700_000_000_000 + 100 * i) for i in range(12)
    ]  # three batches of four: positions inside and between batches
    confluent = client_for("confluent-kafka")
    kafka = kafka_broker.kafka_bootstrap
    for start in (0, 4, 8):
        confluent.produce(
            kafka, topic, [Sent(k, v, (), ts) for k, v, ts in sent[start : start + 4]]
        )
    from_offset = kcat_read(kafka, topic, "-o", "6")
    assert [(r.offset, r.key, r.timestamp_ms) for r in from_offset] == [
        (i, sent[i][0], sent[i][2]) for i in range(6, 12)
    ]
    from_time = kcat_read(kafka, topic, "-o", f"s@{sent[5][2] - 50}")
    assert [r.offset for r in from_time] == list(range(5, 12))
    query = kcat("-b", kafka, "-Q", "-t", f"{topic}:0:{sent[9][2]}").decode()
    assert "offset 9" in query, query


def test_dwal_produce_is_read_alike_by_kcat_and_kafka_clients(kafka_broker):
    """`dwal produce` writes msgpack batches (compressed or not); Kafka fetchers get them
    transcoded with the same offsets, keys, values and timestamps as `dwal consume` shows."""
    topic = "from-dwal"
    create_topics(kafka_broker.bootstrap, topic)
    offset = 0
    for compression in ("none", "gzip", "lz4", "zstd"):
        lines = b"".join(
            b"%s-%d:%s-value-%d\n" % (compression.encode(), i, compression.encode(), i)
            for i in range(10)
        )
        dwal("produce", "--bootstrap", kafka_broker.bootstrap, topic, "-p", "0",
             "--key-separator", ":", "--compression", compression, stdin=lines)  # fmt: skip
        offset += 10
    by_dwal = dwal_read(kafka_broker.bootstrap, topic)
    assert [r.offset for r in by_dwal] == list(range(40))
    assert by_dwal[13].key == b"gzip-3" and by_dwal[13].value == b"gzip-value-3"
    kafka = kafka_broker.kafka_bootstrap
    assert kcat_read(kafka, topic) == by_dwal
    assert client_for("confluent-kafka").consume(kafka, topic, 0, 40) == by_dwal
    assert client_for("kafka-python").consume(kafka, topic, 17, 23) == by_dwal[17:]


def test_dwal_client_headers_and_timestamps_read_by_kcat(kafka_broker):
    topic = "from-dwal-client"
    create_topics(kafka_broker.bootstrap, topic)

    async def produce() -> None:
        async with client.connect(kafka_broker.bootstrap) as cluster:
            async with Producer(cluster, compression="zstd", linger_ms=5) as producer:
                for i in range(20):
                    await producer.send(
                        topic,
                        b"value-%d" % i,
                        b"key-%d" % i,
                        partition=0,
                        headers=[("trace", b"t%d" % i), ("n", b"%d" % (i * i))],
                        timestamp_ms=1_600_000_000_000 + i,
                    )

    trio.run(produce)
    expected = [
        Received(
            i,
            b"key-%d" % i,
            b"value-%d" % i,
            (("trace", b"t%d" % i), ("n", b"%d" % (i * i))),
            1_600_000_000_000 + i,
        )
        for i in range(20)
    ]
    kafka = kafka_broker.kafka_bootstrap
    assert dwal_read(kafka_broker.bootstrap, topic) == expected
    assert kcat_read(kafka, topic) == expected
    assert client_for("aiokafka").consume(kafka, topic, 0, 20) == expected
    assert client_for("confluent-kafka").consume(kafka, topic, 5, 15) == expected[5:]
    # a lookup by time looks inside the (msgpack) batch for the record
    assert client_for("kafka-python").offset_for_time(kafka, topic, 1_600_000_000_012) == 12


def test_large_fetches_of_dwal_batches_are_transcoded_whole(kafka_broker):
    """Fetch answers above kafka_apis.FETCH_INLINE_BYTES_MAX (read and transcoded in a
    worker thread): 4,000 records of 200 bytes in DWAL batches, read by two clients."""
    topic = "large-dwal-fetches"
    create_topics(kafka_broker.bootstrap, topic)
    values = [b"%06d" % i + bytes([65 + i % 26]) * 194 for i in range(4000)]

    async def produce() -> None:
        async with client.connect(kafka_broker.bootstrap) as cluster:
            async with Producer(cluster, linger_ms=20) as producer:
                for i, value in enumerate(values):
                    await producer.send(topic, value, b"k%d" % i, partition=0)

    trio.run(produce)
    assert sum(map(len, values)) > 10 * FETCH_INLINE_BYTES_MAX
    kafka = kafka_broker.kafka_bootstrap
    for name in ("confluent-kafka", "kafka-python"):
        received = client_for(name).consume(kafka, topic, 0, len(values))
        assert [r.offset for r in received] == list(range(len(values))), name
        assert [r.value for r in received] == values, name


def test_kcat_lists_metadata(kafka_broker):
    create_topics(kafka_broker.bootstrap, "listed", partitions=3)
    kafka = kafka_broker.kafka_bootstrap
    listing = kcat("-b", kafka, "-L", "-t", "listed").decode()
    assert f"broker 1 at {kafka}" in listing, listing
    assert 'topic "listed" with 3 partitions' in listing, listing
    for partition in range(3):
        assert f"partition {partition}, leader 1, replicas: 1, isrs: 1" in listing, listing
    everything = json.loads(kcat("-b", kafka, "-L", "-J"))
    assert [b["id"] for b in everything["brokers"]] == [1]
    assert "listed" in [t["topic"] for t in everything["topics"]]


def test_kcat_balanced_consumer_group_commits_what_it_read(kafka_broker):
    """`kcat -G` (librdkafka's group consumer: FindCoordinator, JoinGroup, SyncGroup,
    OffsetCommit) reads every partition to its end and commits; a second run of the same
    group reads only what was written since."""
    topic, group = "kcat-group", "kcat-readers"
    create_topics(kafka_broker.bootstrap, topic, partitions=2)
    kafka = kafka_broker.kafka_bootstrap
    for partition in (0, 1):
        lines = b"".join(b"p%d-%d\n" % (partition, i) for i in range(5))
        kcat("-b", kafka, "-P", "-t", topic, "-p", str(partition), stdin=lines)

    def read_group() -> list[str]:
        output = kcat("-b", kafka, "-G", group, "-X", "auto.offset.reset=earliest",
                      "-e", "-q", "-f", "%p %o %s\\n", topic)  # fmt: skip
        return sorted(output.decode().splitlines())

    assert read_group() == sorted(f"{p} {i} p{p}-{i}" for p in (0, 1) for i in range(5))
    kcat("-b", kafka, "-P", "-t", topic, "-p", "1", stdin=b"late\n")
    assert read_group() == ["1 5 late"]
