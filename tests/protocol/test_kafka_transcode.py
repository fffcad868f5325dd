"""Kafka clients' batches in and out of DWAL's logs (protocol/kafka_transcode.py):
`to_kafka_batches` turns stored buffers (DWAL and Kafka batches mixed) into what a Kafka
client reads, checked against our decoders and kafka-python's; `check_kafka_batches`
accepts every well-formed producer batch (ours, kafka-python's, every codec) and refuses
everything else with ProtocolError only."""

from __future__ import annotations

import struct
import types

import cramjam
import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
import protocol.kafka_transcode as kafka_transcode
from protocol import (
    Compression,
    ProtocolError,
    check_kafka_batches,
    decode_kafka_records,
    decode_records,
    encode_kafka_batch,
    to_kafka_batches,
)
from protocol.record_batch import (
    ATTRIBUTE_CONTROL,
    ATTRIBUTE_LOG_APPEND_TIME,
    ATTRIBUTE_MSGPACK_BODY,
    ATTRIBUTE_TRANSACTIONAL,
    HEADER,
    HEADER_BYTES,
    LOG_OVERHEAD_BYTES,
    encode_batch,
    parse_header,
    scan_batches,
)

kafka_default_records = pytest.importorskip("kafka.record.default_records")
kafka_codec = pytest.importorskip("kafka.codec")

FAST = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

small_bytes = st.none() | st.binary(max_size=40)
dwal_headers = st.lists(st.tuples(st.text(max_size=8), st.binary(max_size=10)), max_size=3)
kafka_headers = st.lists(st.tuples(st.text(max_size=8), small_bytes), max_size=3)
timestamps = st.integers(min_value=0, max_value=2**41)
dwal_records = st.lists(
    st.tuples(timestamps, small_bytes, small_bytes, dwal_headers), min_size=1, max_size=20
)
kafka_records = st.lists(
    st.tuples(timestamps, small_bytes, small_bytes, kafka_headers), min_size=1, max_size=20
)
DWAL_CODECS = [Compression.NONE, Compression.GZIP, Compression.LZ4, Compression.ZSTD]
ALL_CODECS = list(Compression)


@pytest.fixture(autouse=True)
def kafka_snappy(monkeypatch):
    """kafka-python's snappy wants python-snappy; give it cramjam's raw snappy (it still does
    its own xerial framing), as tests/protocol/test_kafka_records.py does."""
    if not kafka_codec.has_snappy():
        shim = types.SimpleNamespace(
            compress=lambda data: bytes(cramjam.snappy.compress_raw(bytes(data))),
            decompress=lambda data: bytes(cramjam.snappy.decompress_raw(bytes(data))),
        )
        monkeypatch.setattr(kafka_codec, "snappy", shim)


def with_base_offset(batch: bytes, base_offset: int, leader_epoch: int = -1) -> bytes:
    """The batch as the broker stores it: base offset and leader epoch patched (no CRC)."""
    patched = bytearray(batch)
    struct.pack_into(">q", patched, 0, base_offset)
    struct.pack_into(">i", patched, 12, leader_epoch)
    return bytes(patched)


def dwal_batch(records, codec=Compression.NONE, **fields) -> bytes:
    base = min(r[0] for r in records)
    shaped = [[r[0] - base, r[1], r[2], [list(h) for h in r[3]]] for r in records]
    return encode_batch(
        shaped,
        base_timestamp=base,
        max_timestamp=max(r[0] for r in records),
        compression=codec,
        **fields,
    )


def kafka_python_view(data: bytes):
    """Every record of every batch as kafka-python reads them (CRCs checked)."""
    out = []
    position = 0
    while position < len(data):
        length = struct.unpack_from(">i", data, position + 8)[0]
        batch = kafka_default_records.DefaultRecordBatch(
            data[position : position + LOG_OVERHEAD_BYTES + length]
        )
        assert batch.validate_crc()
        for record in batch:
            headers = [tuple(h) for h in record.headers]
            out.append((record.offset, record.timestamp, record.key, record.value, headers))
        position += LOG_OVERHEAD_BYTES + length
    return out


def plain(records):
    """Records as comparable tuples, headers as tuples, null header values as b""."""
    return [
        (
            r.offset,
            r.timestamp,
            r.key,
            r.value,
            [(k, b"" if v is None else bytes(v)) for k, v in r.headers],
        )
        for r in records
    ]


@st.composite
def stored_buffers(draw):
    """Back-to-back stored batches, DWAL and Kafka mixed, offsets increasing with gaps (as
    compaction leaves them), maybe cut short at the end. Returns (buffer, whole batches)."""
    batches = []
    offset = draw(st.integers(min_value=0, max_value=2**40))
    for _ in range(draw(st.integers(min_value=1, max_value=5))):
        if draw(st.booleans()):
            records = draw(dwal_records)
            batch = dwal_batch(records, draw(st.sampled_from(DWAL_CODECS)))
        else:
            records = draw(kafka_records)
            batch = encode_kafka_batch(records, compression=draw(st.sampled_from(ALL_CODECS)))
        batches.append(with_base_offset(batch, offset, draw(st.integers(-1, 5))))
        offset += len(records) + draw(st.integers(min_value=0, max_value=3))
    data = b"".join(batches)
    cut = draw(st.integers(min_value=0, max_value=len(batches[-1]) - 1))
    return data[: len(data) - cut], batches if cut == 0 else batches[:-1]


def header_fields(header):
    """Every header field that transcoding keeps."""
    return header._replace(
        batch_length=0, crc=0, attributes=header.attributes & ~ATTRIBUTE_MSGPACK_BODY
    )


# -- to_kafka_batches -------------------------------------------------------------------------


@FAST
@given(stored_buffers())
def test_transcoded_buffers_read_the_same_in_every_decoder(stored):
    data, whole = stored
    out = to_kafka_batches(data)
    expected = plain(decode_records(b"".join(whole)))
    assert plain(decode_kafka_records(out)) == expected
    assert plain(decode_records(out)) == expected
    assert [r[:4] for r in kafka_python_view(out)] == [r[:4] for r in expected]
    transcoded = list(scan_batches(out))
    assert len(transcoded) == len(whole)
    for original, batch in zip(whole, transcoded):
        header = parse_header(original)
        copy = out[batch.position : batch.position + batch.header.size_bytes]
        assert not batch.header.attributes & ATTRIBUTE_MSGPACK_BODY
        if header.attributes & ATTRIBUTE_MSGPACK_BODY:
            assert header_fields(batch.header) == header_fields(header)
        else:
            assert copy == original  # Kafka batches go out verbatim


@FAST
@given(dwal_records, st.sampled_from(DWAL_CODECS))
def test_headers_null_values_and_kafka_python_agree(records, codec):
    data = with_base_offset(dwal_batch(records, codec), 7)
    out = to_kafka_batches(data)
    assert parse_header(out).compression == int(codec)  # the codec is kept
    assert kafka_python_view(out) == [
        (7 + index, ts, key, value, [tuple(h) for h in headers])
        for index, (ts, key, value, headers) in enumerate(records)
    ]


def test_every_header_field_and_attribute_bit_is_kept():
    records = [(1000, b"k", b"v", []), (990, None, b"w", [("h", b"x")])]
    for extra in (0, ATTRIBUTE_LOG_APPEND_TIME, ATTRIBUTE_TRANSACTIONAL, ATTRIBUTE_CONTROL):
        batch = bytearray(
            dwal_batch(
                records,
                Compression.ZSTD,
                producer_id=77,
                producer_epoch=3,
                base_sequence=41,
            )
        )
        header = parse_header(batch)
        struct.pack_into(">h", batch, 21, header.attributes | extra)
        struct.pack_into(">q", batch, 35, 5000)  # max_timestamp: the broker's append time
        struct.pack_into(">I", batch, 17, crc32c.crc32c(bytes(batch[21:])))
        stored = with_base_offset(bytes(batch), 2**40, leader_epoch=9)
        out = to_kafka_batches(stored)
        kafka = parse_header(out)
        assert header_fields(kafka) == header_fields(parse_header(stored))
        assert kafka.attributes == int(Compression.ZSTD) | extra
        decoded = kafka_default_records.DefaultRecordBatch(out)
        assert decoded.validate_crc()
        assert (decoded.producer_id, decoded.producer_epoch, decoded.base_sequence) == (77, 3, 41)
        assert decoded.is_transactional == bool(extra & ATTRIBUTE_TRANSACTIONAL)
        assert decoded.is_control_batch == bool(extra & ATTRIBUTE_CONTROL)
        assert decoded.timestamp_type == (1 if extra & ATTRIBUTE_LOG_APPEND_TIME else 0)
        if not extra & ATTRIBUTE_CONTROL:
            stamps = [r.timestamp for r in decoded]
            assert stamps == ([5000, 5000] if extra & ATTRIBUTE_LOG_APPEND_TIME else [1000, 990])
            assert [r.timestamp for r in decode_records(stored)] == stamps


def test_offsets_keep_their_gaps_and_values():
    first = with_base_offset(dwal_batch([(1, b"a", b"1", []), (2, b"b", b"2", [])]), 10)
    second = with_base_offset(dwal_batch([(3, b"c", None, [])]), 15)
    out = to_kafka_batches(first + second)
    assert [(r.offset, r.key, r.value) for r in decode_kafka_records(out)] == [
        (10, b"a", b"1"),
        (11, b"b", b"2"),
        (15, b"c", None),
    ]


def test_damaged_dwal_batches_go_out_as_stored():
    good = with_base_offset(dwal_batch([(1, b"a", b"v" * 20, [])]), 0)
    flipped = bytearray(with_base_offset(dwal_batch([(1, b"b", b"v" * 20, [])]), 1))
    flipped[-3] ^= 0x40  # inside the value: the CRC fails
    garbage_body = b"\x93\x01"  # not a list of records
    header = bytearray(
        HEADER.pack(
            2,
            HEADER_BYTES - LOG_OVERHEAD_BYTES + len(garbage_body),
            -1,
            2,
            0,
            ATTRIBUTE_MSGPACK_BODY,
            0,
            1,
            1,
            -1,
            -1,
            -1,
            1,
        )
    )
    struct.pack_into(">I", header, 17, crc32c.crc32c(bytes(header[21:]) + garbage_body))
    undecodable = bytes(header) + garbage_body
    last = with_base_offset(good, 3)
    out = to_kafka_batches(good + bytes(flipped) + undecodable + last)
    assert out == (to_kafka_batches(good) + bytes(flipped) + undecodable + to_kafka_batches(last))
    assert not parse_header(out).attributes & ATTRIBUTE_MSGPACK_BODY  # the first: transcoded


def test_bytes_max_keeps_whole_batches_and_always_the_first():
    batches = [with_base_offset(dwal_batch([(1, b"k%d" % n, b"v" * 50, [])]), n) for n in range(4)]
    data = b"".join(batches)
    one = len(to_kafka_batches(batches[0]))
    assert len(scan_list(to_kafka_batches(data, bytes_max=0))) == 1
    assert len(scan_list(to_kafka_batches(data, bytes_max=one))) == 1
    assert len(scan_list(to_kafka_batches(data, bytes_max=2 * one + 1))) == 2
    assert len(scan_list(to_kafka_batches(data))) == 4
    assert to_kafka_batches(b"") == b""
    assert to_kafka_batches(data[:30]) == b""


def scan_list(data: bytes) -> list:
    return list(scan_batches(data))


def test_a_bad_length_field_is_a_protocol_error():
    data = bytearray(dwal_batch([(1, b"k", b"v", [])]))
    struct.pack_into(">i", data, 8, 3)
    with pytest.raises(ProtocolError):
        to_kafka_batches(bytes(data))


@FAST
@given(dwal_records, st.sampled_from([Compression.NONE]))
def test_growth_is_bounded(records, codec):
    batch = dwal_batch(records, codec)
    out = to_kafka_batches(batch)
    headers = sum(len(r[3]) for r in records)
    bound = (
        len(batch)
        + len(records) * kafka_transcode.KAFKA_RECORD_EXTRA_BYTES_MAX
        + headers * kafka_transcode.KAFKA_HEADER_EXTRA_BYTES_MAX
    )
    assert len(out) <= bound


def test_kafka_batches_are_not_copied_one_by_one(monkeypatch):
    """A run of Kafka batches is sliced once, never parsed record by record."""
    monkeypatch.setattr(kafka_transcode, "_transcode", None)  # would fail if called
    data = b"".join(
        with_base_offset(encode_kafka_batch([(1, b"k", b"v", [])]), n) for n in range(3)
    )
    assert to_kafka_batches(data) == data


# -- check_kafka_batches ----------------------------------------------------------------------


def kafka_python_batch(records, codec, producer=(-1, -1, -1)) -> bytes:
    builder = kafka_default_records.DefaultRecordBatchBuilder(
        magic=2,
        compression_type=int(codec),
        is_transactional=False,
        producer_id=producer[0],
        producer_epoch=producer[1],
        base_sequence=producer[2],
        batch_size=2**30,
    )
    for offset, (ts, key, value, headers) in enumerate(records):
        assert builder.append(offset, ts, key, value, list(headers)) is not None
    return bytes(builder.build())


@FAST
@given(kafka_records, st.sampled_from(ALL_CODECS), st.booleans())
def test_well_formed_producer_batches_pass(records, codec, ours):
    if ours:
        batch = encode_kafka_batch(records, compression=codec)
    else:
        batch = kafka_python_batch(records, codec)
    assert check_kafka_batches(batch + batch) == 2 * len(records)


def test_many_records_use_multi_byte_varints():
    records = [(i * 1000, b"k" * (i % 300), b"v" * (i % 9000), ()) for i in range(700)]
    for codec in ALL_CODECS:
        assert check_kafka_batches(encode_kafka_batch(records, compression=codec)) == 700


def reframe(body: bytes, count: int, *, attributes=0, base_ts=1000, max_ts=1000) -> bytes:
    header = bytearray(
        HEADER.pack(
            0,
            HEADER_BYTES - LOG_OVERHEAD_BYTES + len(body),
            -1,
            2,
            0,
            attributes,
            count - 1,
            base_ts,
            max_ts,
            -1,
            -1,
            -1,
            count,
        )
    )
    struct.pack_into(">I", header, 17, crc32c.crc32c(bytes(header[21:]) + body))
    return bytes(header) + body


def record(offset_delta: int, timestamp_delta: int = 0, value: bytes = b"v") -> bytes:
    from protocol.kafka_records import _write_varint, _write_varlong

    fields = bytearray(b"\x00")
    _write_varlong(fields, timestamp_delta)
    _write_varint(fields, offset_delta)
    fields += b"\x01"  # null key
    _write_varint(fields, len(value))
    fields += value + b"\x00"
    out = bytearray()
    _write_varint(out, len(fields))
    return bytes(out + fields)


def test_offset_deltas_must_count_from_zero():
    assert check_kafka_batches(reframe(record(0) + record(1), 2)) == 2
    with pytest.raises(ProtocolError, match="offset delta"):
        check_kafka_batches(reframe(record(1) + record(0), 2))
    with pytest.raises(ProtocolError, match="offset delta"):
        check_kafka_batches(reframe(record(0) + record(2), 2))
    many = b"".join(record(n) for n in range(70)) + record(71)
    with pytest.raises(ProtocolError, match="offset delta"):
        check_kafka_batches(reframe(many, 71))
    # delta 64..127 starts with a byte equal to 2 * index: never read as one byte
    tricky = b"".join(record(n) for n in range(64)) + record(128 // 2 * 2 + 0)
    with pytest.raises(ProtocolError):
        check_kafka_batches(reframe(tricky, 65))


def test_max_timestamp_must_be_the_largest():
    body = record(0, 5) + record(1, -3)
    assert check_kafka_batches(reframe(body, 2, base_ts=1000, max_ts=1005)) == 2
    with pytest.raises(ProtocolError, match="max_timestamp"):
        check_kafka_batches(reframe(body, 2, base_ts=1000, max_ts=1006))


@pytest.mark.parametrize(
    "attributes, message",
    [
        (ATTRIBUTE_MSGPACK_BODY, "bit 7"),
        (ATTRIBUTE_CONTROL, "control"),
        (ATTRIBUTE_TRANSACTIONAL, "transactions"),
        (ATTRIBUTE_LOG_APPEND_TIME, "log-append"),
        (0x40, "unknown attribute"),
        (5, "codec"),
        (7, "codec"),
    ],
)
def test_attributes_a_producer_may_not_set(attributes, message):
    with pytest.raises(ProtocolError, match=message):
        check_kafka_batches(reframe(record(0), 1, attributes=attributes))


def test_dwal_batches_and_empty_buffers_are_refused():
    with pytest.raises(ProtocolError, match="bit 7"):
        check_kafka_batches(protocol.build_batch([(1, b"k", b"v")]))
    with pytest.raises(ProtocolError, match="at least one"):
        check_kafka_batches(b"")


def test_bombs_are_bounded(monkeypatch):
    import protocol.kafka_records as codec_module

    batch = encode_kafka_batch([(1, None, b"\x00" * 5000, [])], compression=Compression.ZSTD)
    monkeypatch.setattr(kafka_transcode, "DECOMPRESSED_BYTES_MAX", 1000)
    monkeypatch.setattr(codec_module, "DECOMPRESSED_BYTES_MAX", 1000)
    with pytest.raises(ProtocolError, match="exceeds"):
        check_kafka_batches(batch)


@settings(max_examples=400, deadline=None)
@given(kafka_records, st.sampled_from(ALL_CODECS), st.data())
def test_damaged_bodies_are_refused_or_decode(records, codec, data):
    """Differential: whatever the check accepts decodes to exactly its records at base + i,
    and it raises nothing but ProtocolError."""
    batch = encode_kafka_batch(records, compression=codec)
    body = bytearray(batch[HEADER_BYTES:])
    if codec == Compression.NONE or data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
            action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            position = data.draw(st.integers(min_value=0, max_value=max(0, len(body) - 1)))
            if action == "flip" and body:
                body[position] ^= data.draw(st.integers(min_value=1, max_value=255))
            elif action == "cut":
                del body[position:]
            else:
                body[position:position] = data.draw(st.binary(min_size=1, max_size=4))
    header = parse_header(batch)
    count = data.draw(st.sampled_from([len(records), len(records) + 1, 1]))
    forged = reframe(
        bytes(body),
        count,
        attributes=int(codec),
        base_ts=header.base_timestamp,
        max_ts=header.max_timestamp,
    )
    try:
        accepted = check_kafka_batches(forged)
    except ProtocolError:
        return
    decoded = decode_kafka_records(forged)
    assert accepted == len(decoded) == count
    assert [r.offset for r in decoded] == list(range(count))
    assert max(r.timestamp for r in decoded) == header.max_timestamp


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(min_value=1, max_value=4))
def test_random_bodies_raise_only_protocol_error(body, count):
    try:
        check_kafka_batches(reframe(body, count))
    except ProtocolError:
        pass


def test_each_record_must_fill_its_length():
    good = record(0)
    assert check_kafka_batches(reframe(good, 1)) == 1
    for wrong_length in (good[0] - 2, good[0] + 2):  # one byte varints: zigzag steps of 2
        forged = bytes([wrong_length]) + good[1:]
        with pytest.raises(ProtocolError, match="length"):
            check_kafka_batches(reframe(forged, 1))
    two = record(0) + record(1)
    shorter = bytes([two[0] - 2]) + two[1:]  # the first record claims a byte less
    with pytest.raises(ProtocolError):
        check_kafka_batches(reframe(shorter, 2))
