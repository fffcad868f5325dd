"""Kafka's v2 records codec (protocol/kafka_records.py): round trips over every codec,
cross-checks against kafka-python's own record batch codec, and hostile input that must
raise ProtocolError and nothing else."""

from __future__ import annotations

import struct
import types
import zlib

import cramjam
import crc32c
import lz4.frame
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
import protocol.kafka_records as kafka_records
from protocol import Compression, ProtocolError, decode_kafka_records, encode_kafka_batch
from protocol.record_batch import HEADER, HEADER_BYTES, LOG_OVERHEAD_BYTES

kafka_default_records = pytest.importorskip("kafka.record.default_records")
kafka_codec = pytest.importorskip("kafka.codec")

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

small_bytes = st.none() | st.binary(max_size=40)
headers = st.lists(st.tuples(st.text(max_size=8), small_bytes), max_size=3)
timestamps = st.integers(min_value=0, max_value=2**41)
records = st.lists(
    st.tuples(timestamps, small_bytes, small_bytes, headers), min_size=1, max_size=30
)
codecs = st.sampled_from(list(Compression))


def expected(batch_records, base_offset=0, topic="", partition=-1):
    return [
        protocol.Record(base_offset + i, ts, key, value, tuple(hs), topic, partition)
        for i, (ts, key, value, hs) in enumerate(batch_records)
    ]


def reframe(body: bytes, count: int, attributes: int = 0, last_offset_delta=None) -> bytes:
    """A Kafka v2 batch around `body` as given, with a correct CRC."""
    header = bytearray(
        HEADER.pack(
            0,
            HEADER_BYTES - LOG_OVERHEAD_BYTES + len(body),
            -1,
            2,
            0,
            attributes,
            count - 1 if last_offset_delta is None else last_offset_delta,
            1000,
            2000,
            -1,
            -1,
            -1,
            count,
        )
    )
    struct.pack_into(">I", header, 17, crc32c.crc32c(bytes(header[21:]) + body))
    return bytes(header) + body


def body_of(batch: bytes) -> bytes:
    return batch[HEADER_BYTES:]


# -- round trips --------------------------------------------------------------------------


@FAST
@given(records, codecs, st.integers(min_value=0, max_value=2**40))
def test_round_trip_every_codec(batch_records, codec, base_offset):
    batch = encode_kafka_batch(batch_records, compression=codec, base_offset=base_offset)
    header = protocol.parse_header(batch)
    assert header.attributes == int(codec)  # bit 7 clear
    assert header.record_count == header.last_offset_delta + 1 == len(batch_records)
    assert header.base_timestamp == batch_records[0][0]
    assert header.max_timestamp == max(r[0] for r in batch_records)
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (-1, -1, -1)
    list(protocol.scan_batches(batch))  # length and CRC are right
    decoded = decode_kafka_records(batch, topic="t", partition=3)
    assert decoded == expected(batch_records, base_offset, "t", 3)


def test_many_records_and_back_to_back_batches():
    many = [(i, str(i).encode(), b"v" * (i % 50), ()) for i in range(20_000)]
    for codec in Compression:
        batch = encode_kafka_batch(many, compression=codec)
        assert decode_kafka_records(batch) == expected(many)
    two = encode_kafka_batch(many[:2]) + encode_kafka_batch(many[2:5], base_offset=2)
    assert decode_kafka_records(two) == expected(many[:5])


def test_producer_state_is_written():
    batch = encode_kafka_batch(
        [(1, b"k", b"v", ())], producer_id=7, producer_epoch=2, base_sequence=40
    )
    header = protocol.parse_header(batch)
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (7, 2, 40)


def test_log_append_time_uses_max_timestamp():
    batch = encode_kafka_batch([(5, b"a", b"b", ()), (9, None, None, ())])
    body = body_of(batch)
    header = protocol.parse_header(batch)
    forged = bytearray(reframe(body, 2, attributes=0x08))
    struct.pack_into(">q", forged, 27, header.base_timestamp)
    struct.pack_into(">q", forged, 35, 123456)
    struct.pack_into(">I", forged, 17, crc32c.crc32c(bytes(forged[21:])))
    assert [r.timestamp for r in decode_kafka_records(bytes(forged))] == [123456, 123456]


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, b"\x00"),
        (-1, b"\x01"),
        (1, b"\x02"),
        (-64, b"\x7f"),
        (64, b"\x80\x01"),
        (2**31 - 1, b"\xfe\xff\xff\xff\x0f"),
        (-(2**31), b"\xff\xff\xff\xff\x0f"),
    ],
)
def test_zigzag_varints_match_kafka(value, encoded):
    out = bytearray()
    kafka_records._write_varint(out, value)
    assert bytes(out) == encoded
    assert kafka_records._read_varint(encoded, 0, len(encoded), "x") == (value, len(encoded))
    assert bytes(kafka_codec_varint(value)) == encoded


def kafka_codec_varint(value):
    from kafka.record.util import encode_varint

    out = bytearray()
    encode_varint(value, out.append)
    return out


def test_raw_snappy_body_decodes():
    batch = encode_kafka_batch([(1000, b"k", b"v" * 1000, [("h", b"x")])])
    raw = bytes(cramjam.snappy.compress_raw(body_of(batch)))
    assert not raw.startswith(kafka_records.XERIAL_MAGIC)
    forged = reframe(raw, 1, attributes=int(Compression.SNAPPY))
    assert decode_kafka_records(forged) == decode_kafka_records(batch)


def test_snappy_encodes_xerial():
    batch = encode_kafka_batch([(1, b"k", b"v" * 100_000, ())], compression=Compression.SNAPPY)
    assert body_of(batch).startswith(kafka_records.XERIAL_MAGIC)


# -- cross-checks against kafka-python -------------------------------------------------------


@pytest.fixture
def kafka_snappy(monkeypatch):
    """kafka-python's snappy codec wants python-snappy, which is not installed. Give it
    cramjam's raw snappy under python-snappy's names: kafka-python still does its own xerial
    framing, which is what is cross-checked."""
    if not kafka_codec.has_snappy():
        shim = types.SimpleNamespace(
            compress=lambda data: bytes(cramjam.snappy.compress_raw(bytes(data))),
            decompress=lambda data: bytes(cramjam.snappy.decompress_raw(bytes(data))),
        )
        monkeypatch.setattr(kafka_codec, "snappy", shim)
    assert kafka_codec.has_snappy()


KAFKA_CODECS = [
    Compression.NONE,
    Compression.GZIP,
    Compression.SNAPPY,
    Compression.LZ4,
    Compression.ZSTD,
]


def kafka_python_batch(batch_records, codec) -> bytes:
    builder = kafka_default_records.DefaultRecordBatchBuilder(
        magic=2,
        compression_type=int(codec),
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=2**30,
    )
    for offset, (ts, key, value, hs) in enumerate(batch_records):
        assert builder.append(offset, ts, key, value, list(hs)) is not None
    return bytes(builder.build())


def kafka_python_decode(batch: bytes):
    decoded = kafka_default_records.DefaultRecordBatch(batch)
    assert decoded.validate_crc()
    return [(r.offset, r.timestamp, r.key, r.value, [tuple(h) for h in r.headers]) for r in decoded]


def codec_available(codec):
    checks = {
        Compression.GZIP: kafka_codec.has_gzip,
        Compression.LZ4: kafka_codec.has_lz4,
        Compression.ZSTD: kafka_codec.has_zstd,
    }
    if codec in checks and not checks[codec]():
        pytest.skip(f"KAFKA-PYTHON CANNOT USE {codec.name}: its codec library is missing")


@pytest.mark.parametrize("codec", KAFKA_CODECS, ids=lambda c: c.name)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch_records=records)
def test_kafka_python_batches_decode(kafka_snappy, codec, batch_records):
    codec_available(codec)
    batch = kafka_python_batch(batch_records, codec)  # compressed only when that saves bytes
    assert decode_kafka_records(batch) == expected(batch_records)


@pytest.mark.parametrize("codec", KAFKA_CODECS, ids=lambda c: c.name)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch_records=records)
def test_our_batches_decode_in_kafka_python(kafka_snappy, codec, batch_records):
    codec_available(codec)
    batch = encode_kafka_batch(batch_records, compression=codec, base_offset=100)
    assert kafka_python_decode(batch) == [
        (100 + i, ts, key, value, [tuple(h) for h in hs])
        for i, (ts, key, value, hs) in enumerate(batch_records)
    ]


@pytest.mark.parametrize("codec", KAFKA_CODECS, ids=lambda c: c.name)
def test_large_kafka_python_batch(kafka_snappy, codec):
    codec_available(codec)
    many = [
        (1000 + i, b"key%d" % i, b"x" * 300 + b"%d" % i, [("h", b"%d" % i)]) for i in range(3000)
    ]
    batch = kafka_python_batch(many, codec)
    assert protocol.parse_header(batch).compression == int(codec)
    assert decode_kafka_records(batch) == expected(many)
    assert kafka_python_decode(encode_kafka_batch(many, compression=codec))[-1][3] == many[-1][2]


# -- hostile input ----------------------------------------------------------------------------


def only_protocol_error(data: bytes, **options) -> None:
    try:
        decode_kafka_records(data, **options)
    except ProtocolError:
        pass


@FAST
@given(records, codecs, st.data())
def test_truncated_batches_raise_protocol_error(batch_records, codec, data):
    batch = encode_kafka_batch(batch_records, compression=codec)
    cut = data.draw(st.integers(min_value=1, max_value=len(batch) - 1))
    with pytest.raises(ProtocolError):
        decode_kafka_records(batch[:cut])


@FAST
@given(records, codecs, st.data())
def test_flipped_bytes_fail_the_crc(batch_records, codec, data):
    batch = bytearray(encode_kafka_batch(batch_records, compression=codec))
    position = data.draw(st.integers(min_value=21, max_value=len(batch) - 1))
    batch[position] ^= data.draw(st.integers(min_value=1, max_value=255))
    with pytest.raises(ProtocolError):
        decode_kafka_records(bytes(batch))


@settings(max_examples=300, deadline=None)
@given(records, codecs, st.data())
def test_damaged_bodies_with_good_crc_raise_only_protocol_error(batch_records, codec, data):
    """The CRC is recomputed after the damage, so the record parser itself is attacked."""
    batch = encode_kafka_batch(batch_records, compression=codec)
    body = bytearray(body_of(batch))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        position = data.draw(st.integers(min_value=0, max_value=max(0, len(body) - 1)))
        if action == "flip" and body:
            body[position] ^= data.draw(st.integers(min_value=1, max_value=255))
        elif action == "cut":
            del body[position:]
        else:
            body[position:position] = data.draw(st.binary(min_size=1, max_size=8))
    count = data.draw(st.sampled_from([len(batch_records), len(batch_records) + 1, 1]))
    only_protocol_error(reframe(bytes(body), count, attributes=int(codec)))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=5), st.integers(0, 7))
def test_random_bodies_raise_only_protocol_error(body, count, codec):
    only_protocol_error(reframe(body, count, attributes=codec))
    only_protocol_error(body, verify_crc=False)


def single_record(fields: bytes) -> bytes:
    out = bytearray()
    kafka_records._write_varint(out, len(fields))
    return bytes(out + fields)


@pytest.mark.parametrize(
    "body, count, message",
    [
        (body_of(encode_kafka_batch([(1, b"k", b"v", ())])), 2, "truncated"),
        (body_of(encode_kafka_batch([(1, b"k", b"v", ()), (2, b"k", b"v", ())])), 1, "more than"),
        (single_record(b"\x00\x00\x00\x03k\x02v\x00"), 1, "negative"),  # key length -2
        (single_record(b"\x00\x00\x00\x02k\x03v\x00"), 1, "negative"),  # value length -2
        (single_record(b"\x00\x00\x00\x02k\x20v\x00"), 1, "runs past"),  # value length 16
        (single_record(b"\x00\x00\x00\x02k\x02v\x02\x01\x00"), 1, "null"),  # null header key
        (single_record(b"\x00\x00\x00\x02k\x02v\x02\x02\xff\x00"), 1, "UTF-8"),
        (single_record(b"\x00\x00\x00\x02k\x02v\x00\x00"), 1, "does not match"),
        (single_record(b"\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f"), 1, "longer than"),
        (b"\xff\xff\xff\xff\x7f", 1, "overflows"),  # a 5-byte varint past 32 bits
        (b"\x80", 1, "truncated"),
        (b"\x01", 1, "runs past"),  # record length -1
    ],
)
def test_malformed_records(body, count, message):
    with pytest.raises(ProtocolError, match=message):
        decode_kafka_records(reframe(body, count))


def test_bad_crc_and_bad_header():
    batch = encode_kafka_batch([(1, b"k", b"vvvv", ())])
    damaged = bytearray(batch)
    damaged[-3] ^= 1  # inside the value
    with pytest.raises(ProtocolError, match="CRC"):
        decode_kafka_records(bytes(damaged))
    assert decode_kafka_records(bytes(damaged), verify_crc=False) != []
    with pytest.raises(ProtocolError, match="last_offset_delta"):
        decode_kafka_records(reframe(body_of(batch), 1, last_offset_delta=3))


def test_unknown_codec_and_dwal_batches_are_refused():
    body = body_of(encode_kafka_batch([(1, b"k", b"v", ())]))
    for codec in (5, 6, 7):
        with pytest.raises(ProtocolError, match="codec"):
            decode_kafka_records(reframe(body, 1, attributes=codec))
    with pytest.raises(ProtocolError, match="msgpack"):
        decode_kafka_records(protocol.build_batch([(1, b"k", b"v")]))


def test_control_batches_hold_no_records():
    body = body_of(encode_kafka_batch([(1, b"k", b"v", ())]))
    assert decode_kafka_records(reframe(body, 1, attributes=0x20)) == []


# -- the decompression bound -----------------------------------------------------------------

LIMIT = 10_000


def bombs(size: int) -> dict[Compression, bytes]:
    payload = b"\x00" * size
    gzip = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunks = [payload[i : i + 1000] for i in range(0, size, 1000)]
    xerial = kafka_records.XERIAL_HEADER.pack(kafka_records.XERIAL_MAGIC, 1, 1) + b"".join(
        struct.pack(">I", len(block)) + block
        for block in (bytes(cramjam.snappy.compress_raw(c)) for c in chunks)
    )
    return {
        Compression.GZIP: gzip.compress(payload) + gzip.flush(),
        Compression.SNAPPY: xerial,
        Compression.LZ4: lz4.frame.compress(payload),  # no content size, as Kafka's
        Compression.ZSTD: zstandard.ZstdCompressor().compress(payload),
    }


@pytest.mark.parametrize("codec", list(Compression)[1:], ids=lambda c: c.name)
def test_decompression_is_bounded(monkeypatch, codec):
    monkeypatch.setattr(kafka_records, "DECOMPRESSED_BYTES_MAX", LIMIT)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_kafka_records(reframe(bombs(LIMIT + 1)[codec], 1, attributes=int(codec)))
    # at the limit it decompresses, then fails as records (zeros are not records)
    with pytest.raises(ProtocolError) as error:
        decode_kafka_records(reframe(bombs(LIMIT)[codec], 1, attributes=int(codec)))
    assert "exceeds" not in str(error.value)


def test_raw_snappy_bound_is_checked_before_decompressing(monkeypatch):
    monkeypatch.setattr(kafka_records, "DECOMPRESSED_BYTES_MAX", LIMIT)
    raw = bytes(cramjam.snappy.compress_raw(b"\x00" * (LIMIT + 1)))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_kafka_records(reframe(raw, 1, attributes=int(Compression.SNAPPY)))


def test_encode_refuses_bad_input():
    with pytest.raises(protocol.ProtocolUsageError):
        encode_kafka_batch([])
    with pytest.raises(protocol.ProtocolUsageError):
        encode_kafka_batch([(1, "not bytes", b"v", ())])  # type: ignore[list-item]
    with pytest.raises(protocol.ProtocolUsageError):
        encode_kafka_batch([(0, None, None, ()), (2**63, None, None, ())])


def test_offsets_come_from_each_records_offset_delta():
    def record(offset_delta: int, value: bytes) -> bytes:
        fields = bytearray(b"\x00\x00")  # attributes, timestamp delta 0
        kafka_records._write_varint(fields, offset_delta)
        fields += b"\x01"  # null key
        kafka_records._write_varint(fields, len(value))
        fields += value + b"\x00"  # no headers
        return single_record(bytes(fields))

    forged = reframe(record(1, b"b") + record(0, b"a"), 2)
    decoded = decode_kafka_records(forged)
    assert [(r.offset, r.value) for r in decoded] == [(1, b"b"), (0, b"a")]


# -- decode_records: DWAL and Kafka batches in one buffer -------------------------------------

DWAL_CODECS = [Compression.NONE, Compression.GZIP, Compression.LZ4, Compression.ZSTD]
dwal_headers = st.lists(st.tuples(st.text(max_size=8), st.binary(max_size=10)), max_size=3)
dwal_records = st.lists(
    st.tuples(timestamps, small_bytes, small_bytes, dwal_headers), min_size=1, max_size=20
)


def at_offset(batch: bytes, base_offset: int) -> bytes:
    patched = bytearray(batch)
    struct.pack_into(">q", patched, 0, base_offset)
    return bytes(patched)


@st.composite
def mixed_buffers(draw):
    """Back-to-back DWAL and Kafka batches; returns (buffer, the records a DWAL reader sees)."""
    parts, wanted = [], []
    offset = draw(st.integers(min_value=0, max_value=2**40))
    for _ in range(draw(st.integers(min_value=1, max_value=5))):
        if draw(st.booleans()):
            batch_records = draw(dwal_records)
            codec = draw(st.sampled_from(DWAL_CODECS))
            parts.append(at_offset(protocol.build_batch(batch_records, compression=codec), offset))
        else:
            batch_records = draw(records)
            codec = draw(codecs)
            parts.append(encode_kafka_batch(batch_records, compression=codec, base_offset=offset))
        for index, (ts, key, value, hs) in enumerate(batch_records):
            headers = [(name, b"" if v is None else v) for name, v in hs]  # null reads as b""
            wanted.append((offset + index, ts, key, value, headers))
        offset += len(batch_records) + draw(st.integers(min_value=0, max_value=3))
    return b"".join(parts), wanted


def readable(decoded):
    for record in decoded:
        for name, value in record.headers:
            assert type(name) is str and type(value) is bytes  # DWAL's header types
    return [(r.offset, r.timestamp, r.key, r.value, [tuple(h) for h in r.headers]) for r in decoded]


@FAST
@given(mixed_buffers(), st.integers(min_value=0, max_value=60))
def test_decode_records_reads_mixed_buffers(mixed, cut):
    data, wanted = mixed
    assert readable(protocol.decode_records(data, topic="t", partition=2)) == wanted
    assert {
        (r.topic, r.partition) for r in protocol.decode_records(data, topic="t", partition=2)
    } <= {("t", 2)}
    cut = min(cut, len(data) - 1)
    partial = protocol.decode_records(data[: len(data) - cut], allow_partial_tail=True)
    assert readable(partial) == wanted[: len(partial)]


def test_decode_records_null_header_values_read_as_empty_bytes():
    batch = encode_kafka_batch([(1, b"k", b"v", [("a", None), ("b", b"x")])])
    assert protocol.decode_records(batch)[0].headers == (("a", b""), ("b", b"x"))
    assert decode_kafka_records(batch)[0].headers == (("a", None), ("b", b"x"))


@pytest.mark.parametrize("codec", KAFKA_CODECS, ids=lambda c: c.name)
def test_decode_records_reads_kafka_python_batches(kafka_snappy, codec):
    codec_available(codec)
    many = [(1000 + i, b"key%d" % i, b"x" * 100, [("h", b"%d" % i)]) for i in range(300)]
    batch = kafka_python_batch(many, codec)
    assert readable(protocol.decode_records(batch)) == [
        (i, ts, key, value, list(hs)) for i, (ts, key, value, hs) in enumerate(many)
    ]


def test_decode_records_log_append_time_for_both_bodies():
    for batch in (
        protocol.build_batch([(5, b"a", b"b"), (9, None, None)]),
        encode_kafka_batch([(5, b"a", b"b", ()), (9, None, None, ())]),
    ):
        forged = bytearray(batch)
        struct.pack_into(">h", forged, 21, protocol.parse_header(batch).attributes | 0x08)
        struct.pack_into(">q", forged, 35, 123456)
        struct.pack_into(">I", forged, 17, crc32c.crc32c(bytes(forged[21:])))
        assert [r.timestamp for r in protocol.decode_records(bytes(forged))] == [123456] * 2


def test_decode_records_refuses_damaged_kafka_batches():
    batch = bytearray(encode_kafka_batch([(1, b"k", b"vvvv", ())]))
    batch[-3] ^= 1
    with pytest.raises(ProtocolError, match="CRC"):
        protocol.decode_records(bytes(batch))
    body = body_of(encode_kafka_batch([(1, b"k", b"v", ())]))
    with pytest.raises(ProtocolError, match="truncated"):
        protocol.decode_records(reframe(body, 2))


def test_consumer_damage_reports_work_for_kafka_batches():
    """The native consumer's fallback (client/batch_damage.py) on a Kafka batch that fails
    its CRC: the batches before it are delivered, the damaged one is named."""
    from client.batch_damage import decode_until_damage
    from client.topic_partition import TopicPartition

    first = encode_kafka_batch([(1, b"a", b"1", ()), (2, b"b", b"2", ())], base_offset=5)
    damaged = bytearray(encode_kafka_batch([(3, b"c", b"333", ())], base_offset=7))
    damaged[-2] ^= 1
    delivered, error = decode_until_damage(
        TopicPartition("t", 0), memoryview(first + bytes(damaged)), 5
    )
    assert [(r.offset, r.value) for r in delivered] == [(5, b"1"), (6, b"2")]
    assert error is not None and (error.offset, error.last_offset) == (7, 7)
