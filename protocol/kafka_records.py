"""Kafka's own v2 records, sans-I/O: the body of a batch whose attribute bit 7 is clear.

Theory of operation. The 61-byte batch header is the same as DWAL's (see record_batch.py);
only the body differs. A Kafka body is ``record_count`` records back to back, optionally
compressed as a whole (attribute bits 0-2), each record being::

    length varint, attributes int8, timestampDelta varlong, offsetDelta varint,
    keyLength varint (-1 = null), key, valueLength varint (-1 = null), value,
    headersCount varint, headers [keyLength varint, key utf-8, valueLength varint, value]

Varints are zigzag-encoded as in Kafka's ByteUtils. Decoding is bounded: a compressed body
may not expand past DECOMPRESSED_BYTES_MAX, the record count is at most
RECORDS_PER_BATCH_MAX, and every length is checked against the bytes that remain before
anything is sliced. Malformed input raises ProtocolError, never another exception type.

Snappy comes in two shapes from Kafka clients: the xerial framing (Java client,
kafka-python) and raw snappy (some librdkafka versions); both decode, xerial is written.

Null header values. Kafka allows a record header whose value is null; DWAL's record headers
are ``(str, bytes)`` pairs and its msgpack body cannot hold a null one. `decode_kafka_records`
(and so log compaction, which rewrites batches from it) keeps it as ``(key, None)``, while
`record_batch.decode_records`, which every DWAL reader uses (native consumer, CLI, gateways,
group coordinator), gives ``(key, b"")``: DWAL's readers keep their types, and a Kafka
client reading the stored batch, which is served verbatim, still sees null.

Checking. `check_body` walks a body's records without building any object, for
`kafka_transcode.check_kafka_batches`, which a broker runs on every Kafka produce.
"""

from __future__ import annotations

import struct
from typing import Any, Iterable, Sequence

import cramjam
import lz4.frame

from .errors import ProtocolError, ProtocolUsageError
from .record_batch import (
    ATTRIBUTE_COMPRESSION_MASK,
    ATTRIBUTE_CONTROL,
    ATTRIBUTE_LOG_APPEND_TIME,
    ATTRIBUTE_MSGPACK_BODY,
    DECOMPRESS_CHUNK_BYTES,
    DECOMPRESSED_BYTES_MAX,
    HEADER_BYTES,
    RECORDS_PER_BATCH_MAX,
    BatchHeader,
    Compression,
    Record,
    _batch_header,
    _compress,
    _decompress,
    _seal_batch,
    scan_batches,
)

_new_record = tuple.__new__  # a Record without NamedTuple's Python-level __new__
XERIAL_MAGIC = b"\x82SNAPPY\x00"
XERIAL_HEADER = struct.Struct(">8sii")  # magic, version, compatible version
XERIAL_VERSION = 1
XERIAL_BLOCK_BYTES = 32 * 1024
XERIAL_BLOCK_LENGTH = struct.Struct(">I")

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Header = tuple[str, "bytes | None"]
KafkaRecordInput = (
    tuple[int, "bytes | None", "bytes | None"]
    | tuple[int, "bytes | None", "bytes | None", Sequence[Header]]
)


# -- varints ------------------------------------------------------------------------------


def _zigzag(value: int, bits: int) -> int:
    return (value << 1) ^ (value >> (bits - 1))


def _write_uvarint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _write_varint(out: bytearray, value: int) -> None:
    if not INT32_MIN <= value <= INT32_MAX:
        raise ProtocolUsageError(f"{value} does not fit a Kafka varint")
    _write_uvarint(out, _zigzag(value, 32) & 0xFFFFFFFF)


def _write_varlong(out: bytearray, value: int) -> None:
    if not INT64_MIN <= value <= INT64_MAX:
        raise ProtocolUsageError(f"{value} does not fit a Kafka varlong")
    _write_uvarint(out, _zigzag(value, 64) & 0xFFFFFFFFFFFFFFFF)


def _read_uvarint(
    data: bytes, position: int, end: int, max_bytes: int, what: str
) -> tuple[int, int]:
    """Read an unsigned LEB128 varint of at most `max_bytes` bytes ending before `end`;
    returns (value, next position)."""
    result = 0
    shift = 0
    for _ in range(max_bytes):
        if position >= end:
            raise ProtocolError(f"Kafka record {what} varint is truncated")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
    raise ProtocolError(f"Kafka record {what} varint is longer than {max_bytes} bytes")


def _read_varint(data: bytes, position: int, end: int, what: str) -> tuple[int, int]:
    if position + 1 < end:  # one or two bytes, the usual cases (lengths below 8192)
        raw = data[position]
        if raw < 0x80:
            return (raw >> 1) ^ -(raw & 1), position + 1
        second = data[position + 1]
        if second < 0x80:
            raw = (raw & 0x7F) | (second << 7)
            return (raw >> 1) ^ -(raw & 1), position + 2
    raw, position = _read_uvarint(data, position, end, 5, what)
    if raw > 0xFFFFFFFF:
        raise ProtocolError(f"Kafka record {what} varint overflows 32 bits")
    return (raw >> 1) ^ -(raw & 1), position


def _read_varlong(data: bytes, position: int, end: int, what: str) -> tuple[int, int]:
    if position < end and data[position] < 0x80:  # one byte, the usual case
        raw = data[position]
        return (raw >> 1) ^ -(raw & 1), position + 1
    raw, position = _read_uvarint(data, position, end, 10, what)
    if raw > 0xFFFFFFFFFFFFFFFF:
        raise ProtocolError(f"Kafka record {what} varlong overflows 64 bits")
    return (raw >> 1) ^ -(raw & 1), position


# -- snappy and lz4 -------------------------------------------------------------------------


def _snappy_raw_length(block: bytes) -> int:
    """The uncompressed length a raw snappy block declares in its preamble."""
    length, _ = _read_uvarint(block, 0, len(block), 5, "snappy length")
    return length


def _decompress_snappy(data: bytes, limit: int) -> bytes:
    if not data.startswith(XERIAL_MAGIC):
        if _snappy_raw_length(data) > limit:
            raise ProtocolError(f"decompressed batch body exceeds {limit} bytes")
        return bytes(cramjam.snappy.decompress_raw(data))
    if len(data) < XERIAL_HEADER.size:
        raise ProtocolError("xerial snappy header is truncated")
    parts = []
    total = 0
    position = XERIAL_HEADER.size
    end = len(data)
    while position < end:
        if end - position < XERIAL_BLOCK_LENGTH.size:
            raise ProtocolError("xerial snappy block length is truncated")
        (length,) = XERIAL_BLOCK_LENGTH.unpack_from(data, position)
        position += XERIAL_BLOCK_LENGTH.size
        if length > end - position:
            raise ProtocolError("xerial snappy block runs past the body")
        block = data[position : position + length]
        position += length
        total += _snappy_raw_length(block)
        if total > limit:
            raise ProtocolError(f"decompressed batch body exceeds {limit} bytes")
        parts.append(bytes(cramjam.snappy.decompress_raw(block)))
    return b"".join(parts)


def _decompress_lz4(data: bytes, limit: int) -> bytes:
    """Decompress an LZ4 frame in chunks: Kafka clients' frames do not declare their size."""
    decompressor = lz4.frame.LZ4FrameDecompressor()
    parts = [decompressor.decompress(data, max_length=DECOMPRESS_CHUNK_BYTES)]
    total = len(parts[0])
    while not decompressor.eof and not decompressor.needs_input and total <= limit:
        chunk = decompressor.decompress(b"", max_length=DECOMPRESS_CHUNK_BYTES)
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    if total > limit:
        raise ProtocolError(f"decompressed batch body exceeds {limit} bytes")
    if not decompressor.eof:
        raise ProtocolError("lz4 batch body is truncated")
    return b"".join(parts)


def _decompress_body(codec: int, body: memoryview, limit: int) -> bytes:
    if codec in (Compression.GZIP, Compression.ZSTD):
        return _decompress(codec, body, limit)
    try:
        if codec == Compression.SNAPPY:
            return _decompress_snappy(bytes(body), limit)
        if codec == Compression.LZ4:
            return _decompress_lz4(bytes(body), limit)
    except ProtocolError:
        raise
    except Exception as error:  # each codec library has its own error types
        raise ProtocolError(f"cannot decompress batch body: {error}") from None
    raise ProtocolError(f"unknown compression codec {codec}")


def _compress_body(codec: Compression, body: bytes) -> bytes:
    if codec == Compression.SNAPPY:
        parts = [XERIAL_HEADER.pack(XERIAL_MAGIC, XERIAL_VERSION, XERIAL_VERSION)]
        for start in range(0, len(body), XERIAL_BLOCK_BYTES):
            block = bytes(cramjam.snappy.compress_raw(body[start : start + XERIAL_BLOCK_BYTES]))
            parts.append(XERIAL_BLOCK_LENGTH.pack(len(block)))
            parts.append(block)
        return b"".join(parts)
    if codec == Compression.LZ4:
        # Kafka's Java client writes frames without a content size and with 64 KiB blocks
        return lz4.frame.compress(body)
    return _compress(codec, body)


# -- decoding -------------------------------------------------------------------------------


def _read_bytes(data: bytes, position: int, end: int, what: str) -> tuple[bytes | None, int]:
    length, position = _read_varint(data, position, end, what + " length")
    if length == -1:
        return None, position
    if length < 0:
        raise ProtocolError(f"Kafka record {what} length {length} is negative")
    if length > end - position:
        raise ProtocolError(f"Kafka record {what} runs past its record")
    return data[position : position + length], position + length


def _decode_body(
    data: bytes,
    count: int,
    base_offset: int,
    base_timestamp: int,
    log_append_time: int | None,
    topic: str,
    partition: int,
    null_header_value: bytes | None,
) -> list[Record]:
    out: list[Record] = []
    position = 0
    data_end = len(data)
    for _ in range(count):
        length, position = _read_varint(data, position, data_end, "length")
        if length < 0 or length > data_end - position:
            raise ProtocolError(f"Kafka record length {length} runs past the batch body")
        end = position + length
        if position >= end:
            raise ProtocolError("Kafka record is truncated")
        position += 1  # attributes: unused in v2
        timestamp_delta, position = _read_varlong(data, position, end, "timestamp delta")
        offset_delta, position = _read_varint(data, position, end, "offset delta")
        view = data
        key, position = _read_bytes(view, position, end, "key")
        value, position = _read_bytes(view, position, end, "value")
        header_count, position = _read_varint(view, position, end, "header count")
        if header_count < 0 or header_count > end - position:
            raise ProtocolError(f"Kafka record header count {header_count} is out of range")
        headers: list[Any] = []
        for _ in range(header_count):
            raw_key, position = _read_bytes(view, position, end, "header key")
            if raw_key is None:
                raise ProtocolError("Kafka record header key is null")
            try:
                header_key = raw_key.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("Kafka record header key is not UTF-8") from None
            header_value, position = _read_bytes(view, position, end, "header value")
            if header_value is None:
                header_value = null_header_value
            headers.append((header_key, header_value))
        if position != end:
            raise ProtocolError("Kafka record length does not match its fields")
        timestamp = base_timestamp + timestamp_delta if log_append_time is None else log_append_time
        out.append(
            _new_record(
                Record,
                (
                    base_offset + offset_delta,
                    timestamp,
                    key,
                    value,
                    tuple(headers) if headers else (),
                    topic,
                    partition,
                ),
            )
        )
    if position != data_end:
        raise ProtocolError("Kafka batch body holds more than record_count records")
    return out


def decode_kafka_records(
    batch: bytes | bytearray | memoryview,
    *,
    topic: str = "",
    partition: int = -1,
    verify_crc: bool = True,
) -> list[Record]:
    """Decode every record of a buffer of whole back-to-back Kafka v2 batches (attribute
    bit 7 clear). Control batches hold no records for a consumer and are skipped. A header
    whose value is null decodes to ``(key, None)``.

    Raises ProtocolError for anything malformed: a cut or damaged batch, a bad CRC, a DWAL
    msgpack batch, an unknown codec, a body that expands past DECOMPRESSED_BYTES_MAX, or
    records that do not match the header's record count.
    """
    view = memoryview(batch)
    out: list[Record] = []
    for scanned in scan_batches(view, verify_crc=verify_crc):
        header = scanned.header
        if header.attributes & ATTRIBUTE_MSGPACK_BODY:
            raise ProtocolError("batch carries a DWAL msgpack body, not Kafka records")
        body = view[scanned.position + HEADER_BYTES : scanned.position + header.size_bytes]
        out.extend(decode_kafka_body(header, body, topic=topic, partition=partition))
    return out


def decode_kafka_body(
    header: BatchHeader,
    body: bytes | memoryview,
    *,
    topic: str = "",
    partition: int = -1,
    null_header_value: bytes | None = None,
) -> list[Record]:
    """The records of one Kafka batch's body (what follows its 61-byte `header`, already
    checked); none for a control batch. A null header value becomes `null_header_value`.
    Raises ProtocolError as `decode_kafka_records` does."""
    if header.attributes & ATTRIBUTE_CONTROL:
        return []
    codec = header.attributes & ATTRIBUTE_COMPRESSION_MASK
    data = (
        _decompress_body(codec, memoryview(body), DECOMPRESSED_BYTES_MAX) if codec else bytes(body)
    )
    log_append_time = (
        header.max_timestamp if header.attributes & ATTRIBUTE_LOG_APPEND_TIME else None
    )
    return _decode_body(
        data,
        header.record_count,
        header.base_offset,
        header.base_timestamp,
        log_append_time,
        topic,
        partition,
        null_header_value,
    )


# -- checking a producer's batches ------------------------------------------------------------


def check_body(data: bytes | memoryview, count: int) -> int:
    """Walk the `count` records of an uncompressed Kafka body, which they must fill exactly,
    with offset deltas 0, 1, ..., building nothing but header keys (to check their UTF-8);
    one- and two-byte varints, by far the most common, are read inline. Returns the largest
    timestamp delta. Raises ProtocolError."""
    if type(data) is not bytes:
        data = bytes(data)  # indexing bytes gives ints fastest
    end = len(data)
    position = 0
    delta_max = INT64_MIN
    try:
        for index in range(count):
            byte = data[position]
            if byte < 0x80:
                length = (byte >> 1) ^ -(byte & 1)
                position += 1
            elif data[position + 1] < 0x80:  # two bytes: records up to 8191 bytes
                raw = (byte & 0x7F) | (data[position + 1] << 7)
                length = (raw >> 1) ^ -(raw & 1)
                position += 2
            else:
                length, position = _read_varint(data, position, end, "length")
            record_end = position + length
            if length < 1 or record_end > end:
                raise ProtocolError(f"Kafka record length {length} runs past the batch body")
            byte = data[position + 1]  # after the record's attributes, unused in v2
            if byte < 0x80:
                delta = (byte >> 1) ^ -(byte & 1)
                position += 2
            else:
                delta, position = _read_varlong(data, position + 1, record_end, "timestamp delta")
            if delta > delta_max:
                delta_max = delta
            if index < 64 and data[position] == index << 1:  # zigzag(index) in one byte
                position += 1
            else:
                offset_delta, position = _read_varint(data, position, record_end, "offset delta")
                if offset_delta != index:
                    raise ProtocolError(f"Kafka record {index} has offset delta {offset_delta}")
            position = _skip_bytes(data, _skip_bytes(data, position, record_end), record_end)
            byte = data[position]
            if byte:
                position = _check_headers(data, position, record_end)
            else:
                position += 1
            if position != record_end:
                raise ProtocolError("Kafka record length does not match its fields")
    except IndexError:
        raise ProtocolError("Kafka record is truncated") from None
    if position != end:
        raise ProtocolError("Kafka batch body holds more than record_count records")
    return delta_max


def _skip_bytes(data: bytes, position: int, end: int) -> int:
    """Skip a key or value (varint length, -1 for null); return the position after it."""
    byte = data[position]
    if byte < 0x80:
        length = (byte >> 1) ^ -(byte & 1)
        position += 1
    elif data[position + 1] < 0x80:  # two bytes: lengths up to 8191
        raw = (byte & 0x7F) | (data[position + 1] << 7)
        length = (raw >> 1) ^ -(raw & 1)
        position += 2
    else:
        length, position = _read_varint(data, position, end, "key or value length")
    if length < -1:
        raise ProtocolError(f"Kafka record key or value length {length} is negative")
    if length > end - position:
        raise ProtocolError("Kafka record key or value runs past its record")
    return position + length if length > 0 else position


def _check_headers(data: bytes, position: int, end: int) -> int:
    count, position = _read_varint(data, position, end, "header count")
    if count < 0 or count > end - position:
        raise ProtocolError(f"Kafka record header count {count} is out of range")
    for _ in range(count):
        key, position = _read_bytes(data, position, end, "header key")
        if key is None:
            raise ProtocolError("Kafka record header key is null")
        try:
            key.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("Kafka record header key is not UTF-8") from None
        position = _skip_bytes(data, position, end)
    return position


# -- encoding -------------------------------------------------------------------------------


def _write_bytes(out: bytearray, value: bytes | None) -> None:
    if value is None:
        _write_varint(out, -1)
        return
    _write_varint(out, len(value))
    out += value


def encode_kafka_records(
    records: Iterable[tuple[int, bytes | None, bytes | None, Sequence[Any]]],
) -> bytearray:
    """The uncompressed Kafka body of records given as ``(timestamp_delta, key, value,
    headers)``, headers being ``(str, bytes | None)`` pairs, each record's offset delta its
    index. Raises ProtocolUsageError for a number that does not fit Kafka's varints;
    TypeError, AttributeError or ValueError for values of the wrong types."""
    body = bytearray()
    record = bytearray()
    small = _SMALL_VARINTS
    for offset_delta, (timestamp_delta, key, value, headers) in enumerate(records):
        record.clear()
        record.append(0)  # attributes
        if _SMALL_MIN <= timestamp_delta < _SMALL_MAX:
            record += small[timestamp_delta - _SMALL_MIN]
        else:
            _write_varlong(record, timestamp_delta)
        if offset_delta < _SMALL_MAX:
            record += small[offset_delta - _SMALL_MIN]
        else:
            _write_varint(record, offset_delta)
        for data in (key, value):
            if data is None:
                record += small[-1 - _SMALL_MIN]
            else:
                data = bytes(data)
                if len(data) < _SMALL_MAX:
                    record += small[len(data) - _SMALL_MIN]
                else:
                    _write_varint(record, len(data))
                record += data
        if headers:
            _write_varint(record, len(headers))
            for header_key, header_value in headers:
                _write_bytes(record, header_key.encode("utf-8"))
                _write_bytes(record, None if header_value is None else bytes(header_value))
        else:
            record.append(0)  # no headers
        if len(record) < _SMALL_MAX:
            body += small[len(record) - _SMALL_MIN]
        else:
            _write_varint(body, len(record))
        body += record
    return body


def _small_varint(value: int) -> bytes:
    out = bytearray()
    _write_varint(out, value)
    return bytes(out)


# The zigzag varints of -1 .. 8191 (at most two bytes each), looked up instead of computed.
_SMALL_MIN, _SMALL_MAX = -1, 8192
_SMALL_VARINTS = tuple(map(_small_varint, range(_SMALL_MIN, _SMALL_MAX)))


def encode_kafka_batch(
    records: Sequence[KafkaRecordInput],
    *,
    compression: Compression = Compression.NONE,
    base_offset: int = 0,
    partition_leader_epoch: int = -1,
    producer_id: int = -1,
    producer_epoch: int = -1,
    base_sequence: int = -1,
) -> bytes:
    """Encode one Kafka v2 batch from ``(timestamp_ms, key, value[, headers])`` tuples,
    headers being ``(str, bytes | None)`` pairs. The base timestamp is the first record's,
    as Kafka's producer writes it. Raises ProtocolUsageError for an empty or oversize batch
    or a value that does not fit Kafka's encoding."""
    count = len(records)
    if count == 0 or count > RECORDS_PER_BATCH_MAX:
        raise ProtocolUsageError(f"a batch holds 1..{RECORDS_PER_BATCH_MAX} records, not {count}")
    try:
        base_timestamp = records[0][0]
        max_timestamp = max(record[0] for record in records)
        body = encode_kafka_records(
            (
                entry[0] - base_timestamp,
                entry[1],
                entry[2],
                entry[3] if len(entry) > 3 else (),  # type: ignore[misc]
            )
            for entry in records
        )
    except ProtocolUsageError:
        raise
    except (TypeError, ValueError, AttributeError, IndexError) as error:
        raise ProtocolUsageError(f"cannot encode Kafka records: {error}") from None
    if len(body) > DECOMPRESSED_BYTES_MAX:
        raise ProtocolUsageError(f"Kafka records take more than {DECOMPRESSED_BYTES_MAX} bytes")
    compressed = _compress_body(Compression(compression), bytes(body))
    header = _batch_header(
        len(compressed),
        count,
        base_timestamp,
        max_timestamp,
        Compression(compression),
        base_offset,
        partition_leader_epoch,
        (producer_id, producer_epoch, base_sequence),
        msgpack_body=False,
    )
    return _seal_batch(header, compressed)
