"""The Kafka listener byte by byte, over a raw socket: answers to versions it does not serve
(UNSUPPORTED_VERSION, and the connection stays open), malformed frames (the connection
closes, the broker goes on serving), and an idempotent producer's retried batch (the same
producer id, epoch and sequence: stored once, answered with the original offset)."""

from __future__ import annotations

import datetime
import io
import socket
import struct
from typing import Any

import pytest
from client_adapters import CLIENT_TIMEOUT_S, client_for
from kafka_processes import create_topics
from kio.index import load_request_schema, load_response_schema
from kio.serial import entity_reader, entity_writer

from broker.gateway.kafka_entities import element, make

pytest.importorskip(
    "kafka",
    reason="KAFKA-PYTHON IS NOT INSTALLED: the Kafka listener's wire tests did not run "
    "(pip install -e '.[test]')",
)
from kafka import KafkaConsumer, TopicPartition  # noqa: E402
from kafka.record.default_records import DefaultRecordBatchBuilder  # noqa: E402

pytestmark = pytest.mark.timeout(60)

SOCKET_TIMEOUT_S = 10
UNSUPPORTED_VERSION = 35
API_VERSIONS, PRODUCE, FETCH, METADATA, INIT_PRODUCER_ID = 18, 0, 1, 3, 22


class RawConnection:
    """One TCP connection speaking Kafka's framing by hand; every read is bounded."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.socket = socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S)
        self.correlation_id = 0

    def close(self) -> None:
        self.socket.close()

    def send_frame(self, payload: bytes) -> None:
        self.socket.sendall(struct.pack(">i", len(payload)) + payload)

    def send_raw(self, api_key: int, version: int, body: bytes) -> int:
        """A request with a v1 header (key, version, correlation id, client id) and `body`."""
        self.correlation_id += 1
        client_id = b"raw-test"
        header = struct.pack(">hhih", api_key, version, self.correlation_id, len(client_id))
        self.send_frame(header + client_id + body)
        return self.correlation_id

    def send(self, api_key: int, version: int, **fields: Any) -> int:
        """A request built with kio at `version` from `fields`."""
        self.correlation_id += 1
        request_type = load_request_schema(api_key, version)
        header = make(
            request_type.__header_schema__,
            request_api_key=api_key,
            request_api_version=version,
            correlation_id=self.correlation_id,
            client_id="raw-test",
        )
        out = io.BytesIO()
        entity_writer(type(header))(out, header)
        request = make(request_type, **fields)
        entity_writer(request_type)(out, request)
        self.send_frame(out.getvalue())
        return self.correlation_id

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.socket.recv(count - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {count} bytes")
            data += chunk
        return data

    def receive(self) -> tuple[int, bytes]:
        """(correlation id, the rest of the response) of the next answer."""
        (size,) = struct.unpack(">i", self._exactly(4))
        frame = self._exactly(size)
        return struct.unpack_from(">i", frame)[0], frame[4:]

    def receive_entity(self, api_key: int, version: int, correlation_id: int) -> Any:
        got, rest = self.receive()
        assert got == correlation_id
        response_type = load_response_schema(api_key, version)
        flexible = response_type.__flexible__ and api_key != API_VERSIONS
        response, size = entity_reader(response_type)(rest, 1 if flexible else 0)
        assert size + (1 if flexible else 0) == len(rest)
        return response

    def closed_by_peer(self) -> bool:
        """True once the broker closed the connection (bounded by the socket timeout)."""
        try:
            return self.socket.recv(1) == b""
        except ConnectionResetError:
            return True


@pytest.fixture
def connect(kafka_broker):
    opened: list[RawConnection] = []

    def open_one() -> RawConnection:
        connection = RawConnection(kafka_broker.kafka_bootstrap)
        opened.append(connection)
        return connection

    try:
        yield open_one
    finally:
        for connection in opened:
            connection.close()


def api_versions_work(connection: RawConnection) -> None:
    """ApiVersions v3 is answered on `connection`, with Produce and Fetch in its list."""
    correlation_id = connection.send(
        API_VERSIONS, 3, client_software_name="raw", client_software_version="1"
    )
    answer = connection.receive_entity(API_VERSIONS, 3, correlation_id)
    assert answer.error_code == 0
    keys = {entry.api_key: (entry.min_version, entry.max_version) for entry in answer.api_keys}
    assert keys[PRODUCE][1] >= 9 and keys[FETCH][0] <= 4 <= keys[FETCH][1]


def test_api_versions_at_an_unknown_version_gets_the_v0_answer(connect):
    connection = connect()
    correlation_id = connection.send_raw(API_VERSIONS, 9, b"\x00\x01\x02 whatever v9 holds")
    got, rest = connection.receive()
    assert got == correlation_id
    # the v0 layout, by hand: error code, then [api key, min, max] entries
    error_code, count = struct.unpack_from(">hi", rest)
    assert error_code == UNSUPPORTED_VERSION
    entries = [struct.unpack_from(">hhh", rest, 6 + 6 * i) for i in range(count)]
    assert len(rest) == 6 + 6 * count
    keys = {key: (low, high) for key, low, high in entries}
    assert keys[API_VERSIONS] == (0, 4)
    assert {PRODUCE, FETCH, METADATA} <= set(keys)
    api_versions_work(connection)  # the client retries at a version both know


def test_produce_below_the_served_versions_gets_unsupported_version(connect):
    connection = connect()
    # Produce v1 by hand: acks, timeout, [topic, [partition, message set]]
    message_set = b"\x00" * 30
    body = struct.pack(">hii", 1, 1000, 1)
    body += struct.pack(">h", 4) + b"nope" + struct.pack(">i", 1)
    body += struct.pack(">ii", 3, len(message_set)) + message_set
    correlation_id = connection.send_raw(PRODUCE, 1, body)
    got, rest = connection.receive()
    assert got == correlation_id
    # the v1 layout: [topic, [partition, error code, base offset]], throttle time
    (topics,) = struct.unpack_from(">i", rest)
    assert topics == 1
    (name_length,) = struct.unpack_from(">h", rest, 4)
    assert rest[6 : 6 + name_length] == b"nope"
    position = 6 + name_length
    partitions, partition, error_code, base_offset = struct.unpack_from(">iihq", rest, position)
    assert (partitions, partition, error_code, base_offset) == (1, 3, UNSUPPORTED_VERSION, -1)
    assert len(rest) == position + 18 + 4
    api_versions_work(connection)


def test_fetch_below_the_served_versions_gets_unsupported_version(connect):
    connection = connect()
    # Fetch v3 by hand: replica, max wait, min bytes, max bytes, [topic, [partition,
    # offset, partition max bytes]]
    body = struct.pack(">iiiii", -1, 100, 1, 1 << 20, 1) + struct.pack(">h", 3) + b"old"
    body += struct.pack(">iiqi", 1, 0, 0, 1 << 20)
    correlation_id = connection.send_raw(FETCH, 3, body)
    got, rest = connection.receive()
    assert got == correlation_id
    # the v3 layout: throttle time, [topic, [partition, error code, high watermark,
    # records]]
    throttle, topics, name_length = struct.unpack_from(">iih", rest)
    assert (throttle, topics, rest[10 : 10 + name_length]) == (0, 1, b"old")
    position = 10 + name_length
    partitions, partition, error_code = struct.unpack_from(">iih", rest, position)
    assert (partitions, partition, error_code) == (1, 0, UNSUPPORTED_VERSION)
    high_watermark, records_length = struct.unpack_from(">qi", rest, position + 10)
    assert records_length in (-1, 0)
    assert len(rest) == position + 22 + max(records_length, 0)
    api_versions_work(connection)


@pytest.mark.parametrize("api_key", [FETCH, METADATA])
def test_a_version_above_the_served_ones_gets_unsupported_version(connect, api_key):
    connection = connect()
    version = 13  # kio knows it, DWAL serves up to 12: the answer has a top-level code
    correlation_id = connection.send(api_key, version)
    answer = connection.receive_entity(api_key, version, correlation_id)
    assert answer.error_code == UNSUPPORTED_VERSION
    api_versions_work(connection)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(struct.pack(">i", 0x7FFF_FFFF) + b"\x00" * 64, id="oversize-length"),
        pytest.param(struct.pack(">i", -5) + b"\x00" * 8, id="negative-length"),
        pytest.param(struct.pack(">i", 4) + b"\x00\x03", id="shorter-than-a-header"),
        pytest.param(struct.pack(">ihhi", 40, METADATA, 12, 1) + b"\xff" * 32, id="garbage-body"),
        pytest.param(struct.pack(">ihhih", 10, 999, 0, 1, -1), id="unknown-api-key"),
        pytest.param(struct.pack(">ihhi", 100, METADATA, 12, 1) + b"\x00" * 10, id="truncated"),
    ],
)
def test_a_malformed_frame_closes_its_connection_only(connect, frame):
    bystander = connect()
    api_versions_work(bystander)
    connection = connect()
    connection.socket.sendall(frame)
    connection.socket.shutdown(socket.SHUT_WR)  # a truncated frame ends here
    assert connection.closed_by_peer()
    api_versions_work(bystander)  # connections open meanwhile go on
    api_versions_work(connect())  # and new ones are served


def idempotent_batch(producer_id: int, epoch: int, sequence: int, count: int) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=False,
        producer_id=producer_id,
        producer_epoch=epoch,
        base_sequence=sequence,
        batch_size=1 << 20,
    )
    for offset in range(count):
        builder.append(offset, 1_700_000_000_000 + offset, b"k", b"v%d" % offset, [])
    return bytes(builder.build())


def produce_answer(connection: RawConnection, topic: str, batch: bytes) -> tuple[int, int]:
    """(error code, base offset) of a Produce v9 of `batch` to partition 0 of `topic`."""
    request_type = load_request_schema(PRODUCE, 9)
    topic_type = element(request_type, "topic_data")
    partition_type = element(topic_type, "partition_data")
    correlation_id = connection.send(
        PRODUCE,
        9,
        transactional_id=None,
        acks=-1,
        timeout=datetime.timedelta(seconds=10),
        topic_data=(
            make(
                topic_type,
                name=topic,
                partition_data=(make(partition_type, index=0, records=batch),),
            ),
        ),
    )
    answer = connection.receive_entity(PRODUCE, 9, correlation_id)
    (partition,) = answer.responses[0].partition_responses
    return int(partition.error_code), int(partition.base_offset)


def test_a_retried_idempotent_batch_is_stored_once(kafka_broker, connect):
    topic = "raw-idempotent"
    create_topics(kafka_broker.bootstrap, topic)
    connection = connect()
    correlation_id = connection.send(
        INIT_PRODUCER_ID,
        4,
        transactional_id=None,
        transaction_timeout=datetime.timedelta(seconds=60),
        producer_id=-1,
        producer_epoch=-1,
    )
    init = connection.receive_entity(INIT_PRODUCER_ID, 4, correlation_id)
    assert init.error_code == 0 and init.producer_id >= 0
    pid, epoch = int(init.producer_id), int(init.producer_epoch)

    first, second = idempotent_batch(pid, epoch, 0, 3), idempotent_batch(pid, epoch, 3, 2)
    assert produce_answer(connection, topic, first) == (0, 0)
    assert produce_answer(connection, topic, second) == (0, 3)
    # the retry of a batch whose answer was lost, on another connection: the original
    # offset, nothing stored
    retry = connect()
    assert produce_answer(retry, topic, first) == (0, 0)
    assert produce_answer(retry, topic, second) == (0, 3)
    # a gap in the sequence is refused (OUT_OF_ORDER_SEQUENCE_NUMBER)
    error_code, _ = produce_answer(retry, topic, idempotent_batch(pid, epoch, 7, 1))
    assert error_code == 45
    assert produce_answer(retry, topic, idempotent_batch(pid, epoch, 5, 1)) == (0, 5)

    read = client_for("kafka-python").consume(kafka_broker.kafka_bootstrap, topic, 0, 6)
    assert [(r.offset, r.value) for r in read] == [
        (0, b"v0"), (1, b"v1"), (2, b"v2"), (3, b"v0"), (4, b"v1"), (5, b"v0")
    ]  # fmt: skip
    # nothing after offset 5: the duplicates were not appended
    consumer = KafkaConsumer(
        bootstrap_servers=kafka_broker.kafka_bootstrap, request_timeout_ms=CLIENT_TIMEOUT_S * 1000
    )
    try:
        assert consumer.end_offsets([TopicPartition(topic, 0)]) == {TopicPartition(topic, 0): 6}
    finally:
        consumer.close()


def plain_batch(count: int = 2) -> bytes:
    return idempotent_batch(-1, -1, -1, count)


def corrupted(batch: bytes) -> bytes:
    damaged = bytearray(batch)
    damaged[-1] ^= 0xFF  # in the last record: the CRC no longer matches
    return bytes(damaged)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown-topic", 3),  # UNKNOWN_TOPIC_OR_PARTITION
        ("unknown-partition", 3),
        ("bad-crc", 2),  # CORRUPT_MESSAGE
        ("empty", 2),
    ],
)
def test_a_refused_produce_is_answered_and_stores_nothing(kafka_broker, connect, case, expected):
    topic = f"refused-{case}"
    create_topics(kafka_broker.bootstrap, topic)
    connection = connect()
    records = {"bad-crc": corrupted(plain_batch()), "empty": b""}.get(case, plain_batch())
    request_type = load_request_schema(PRODUCE, 9)
    topic_type = element(request_type, "topic_data")
    partition_type = element(topic_type, "partition_data")
    name = "no-such-topic" if case == "unknown-topic" else topic
    index = 7 if case == "unknown-partition" else 0
    correlation_id = connection.send(
        PRODUCE,
        9,
        acks=1,
        timeout=datetime.timedelta(seconds=10),
        topic_data=(
            make(
                topic_type,
                name=name,
                partition_data=(make(partition_type, index=index, records=records),),
            ),
        ),
    )
    answer = connection.receive_entity(PRODUCE, 9, correlation_id)
    (partition,) = answer.responses[0].partition_responses
    assert (int(partition.error_code), int(partition.base_offset)) == (expected, -1)
    # the connection goes on, and a good batch lands at offset 0: nothing was stored
    assert produce_answer(connection, topic, plain_batch()) == (0, 0)
