"""Record batches: the unit that producers send, brokers store and consumers read.

Theory of operation. A batch is a fixed 61-byte header, field for field Kafka's v2 record
batch header, followed by a body. DWAL bodies (attribute bit 7 set) are one msgpack array of
records ``[timestamp_delta, key, value, headers]``, optionally compressed as a whole. The CRC
(CRC-32C) covers everything from ``attributes`` to the end of the batch, so a broker may
patch ``base_offset`` and ``partition_leader_epoch`` without recomputing it. Brokers only
ever look at headers (`scan_batches`); only clients decode bodies (`decode_records`, which
also reads batches with Kafka's own body, attribute bit 7 clear: see kafka_records.py).
"""

from __future__ import annotations

import enum
import gc
import struct
import zlib
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import crc32c as _crc32c
import lz4.frame
import msgpack
import zstandard

from .errors import ProtocolError, ProtocolUsageError

HEADER = struct.Struct(">qiibIhiqqqhii")
HEADER_BYTES = HEADER.size  # 61
assert HEADER_BYTES == 61
LOG_OVERHEAD_BYTES = 12  # base_offset (8) + batch_length (4): what batch_length does not count
LENGTH_PREFIX = struct.Struct(">qi")
BATCH_LENGTH_MIN = HEADER_BYTES - LOG_OVERHEAD_BYTES
CRC_START = 21  # attributes start here: the CRC covers [21, end)
MAGIC = 2
BASE_OFFSET_AND_LENGTH = struct.Struct(">qi")
BASE_OFFSET_AND_EPOCH = struct.Struct(">q")
PARTITION_LEADER_EPOCH = struct.Struct(">i")
PARTITION_LEADER_EPOCH_POSITION = 12

ATTRIBUTE_COMPRESSION_MASK = 0x07
ATTRIBUTE_LOG_APPEND_TIME = 0x08
ATTRIBUTE_TRANSACTIONAL = 0x10
ATTRIBUTE_CONTROL = 0x20
ATTRIBUTE_MSGPACK_BODY = 0x80

# Limits on what a batch body may expand to; a compressed batch may not bomb a client.
RECORDS_PER_BATCH_MAX = 1_000_000
DECOMPRESSED_BYTES_MAX = 256 * 1024 * 1024


class Compression(enum.IntEnum):
    NONE = 0
    GZIP = 1
    SNAPPY = 2
    LZ4 = 3
    ZSTD = 4

    @classmethod
    def from_name(cls, name: str) -> "Compression":
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown compression {name!r}") from None


SUPPORTED_COMPRESSION = frozenset(
    {Compression.NONE, Compression.GZIP, Compression.LZ4, Compression.ZSTD}
)


class BatchHeader(NamedTuple):
    base_offset: int
    batch_length: int
    partition_leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    record_count: int

    @property
    def size_bytes(self) -> int:
        return self.batch_length + LOG_OVERHEAD_BYTES

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.last_offset_delta + 1

    @property
    def compression(self) -> int:
        return self.attributes & ATTRIBUTE_COMPRESSION_MASK


class Record(NamedTuple):
    """One record as a consumer sees it. `topic` and `partition` say where it was read
    (`decode_records` fills them in when told; "" and -1 when not known)."""

    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()
    topic: str = ""
    partition: int = -1


def crc_of(batch: bytes | bytearray | memoryview) -> int:
    return _crc32c.crc32c(memoryview(batch)[CRC_START:])


GZIP_WINDOW_BITS = 16 + zlib.MAX_WBITS  # the gzip container, as Kafka's gzip codec writes
DECOMPRESS_CHUNK_BYTES = 1024 * 1024


def _compress(codec: Compression, body: bytes) -> bytes:
    if codec == Compression.NONE:
        return body
    if codec == Compression.ZSTD:
        return zstandard.ZstdCompressor(level=1, write_content_size=True).compress(body)
    if codec == Compression.LZ4:
        return lz4.frame.compress(body, store_size=True)
    if codec == Compression.GZIP:
        compressor = zlib.compressobj(1, zlib.DEFLATED, GZIP_WINDOW_BITS)
        return compressor.compress(body) + compressor.flush()
    raise ProtocolUsageError(f"compression {codec!r} is not supported")


def _read_bounded(read, limit: int) -> bytes:
    """Call `read(n)` in chunks until it returns nothing or more than `limit` bytes came."""
    parts = []
    total = 0
    while total <= limit:
        chunk = read(min(DECOMPRESS_CHUNK_BYTES, limit + 1 - total))
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)


def _decompress_zstd(body: bytes, limit: int) -> bytes:
    size = zstandard.frame_content_size(body)
    if 0 <= size <= limit:  # the usual case: allocate exactly what the frame declares
        out = zstandard.ZstdDecompressor().decompress(body, max_output_size=size)
        if len(out) != size:
            raise ProtocolError("zstd frame content size does not match its data")
        return out
    if size > limit:
        raise ProtocolError(f"decompressed batch body exceeds {limit} bytes")
    return _read_bounded(zstandard.ZstdDecompressor().stream_reader(body).read, limit)


def _decompress_lz4(body: bytes, limit: int) -> bytes:
    size = lz4.frame.get_frame_info(body).get("content_size") or 0
    if size > limit:
        raise ProtocolError(f"decompressed batch body exceeds {limit} bytes")
    # A frame that declares its size (ours always do) needs a buffer of exactly that size.
    return lz4.frame.LZ4FrameDecompressor().decompress(
        body, max_length=size + 1 if size else limit + 1
    )


def _decompress(codec: int, body: memoryview, limit: int) -> bytes:
    """Decompress at most `limit` bytes; a larger result is a protocol error."""
    data = bytes(body)
    try:
        if codec == Compression.ZSTD:
            out = _decompress_zstd(data, limit)
        elif codec == Compression.LZ4:
            out = _decompress_lz4(data, limit)
        elif codec == Compression.GZIP:
            decompressor = zlib.decompressobj(GZIP_WINDOW_BITS)
            out = decompressor.decompress(data, limit + 1)
            if len(out) <= limit and not decompressor.eof:
                raise ProtocolError("gzip batch body is truncated")
        else:
            raise ProtocolError(f"unsupported compression codec {codec}")
    except ProtocolError:
        raise
    except Exception as error:  # each codec library has its own error types
        raise ProtocolError(f"cannot decompress batch body: {error}") from None
    if len(out) > limit:
        raise ProtocolError(f"decompressed batch body exceeds {limit} bytes")
    return out


def encode_batch(
    records: Sequence[Sequence[Any]],
    *,
    base_timestamp: int,
    max_timestamp: int | None = None,
    compression: Compression = Compression.NONE,
    base_offset: int = 0,
    partition_leader_epoch: int = -1,
    producer_id: int = -1,
    producer_epoch: int = -1,
    base_sequence: int = -1,
) -> bytes:
    """Encode records already shaped as ``[timestamp_delta, key, value, headers]``.

    Returns the batch bytes. Raises ProtocolUsageError for an empty or oversize batch.
    """
    count = len(records)
    if count == 0 or count > RECORDS_PER_BATCH_MAX:
        raise ProtocolUsageError(f"a batch holds 1..{RECORDS_PER_BATCH_MAX} records, not {count}")
    if max_timestamp is None:
        max_timestamp = base_timestamp + max(r[0] for r in records)
    try:
        packed = msgpack.packb(records, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise ProtocolUsageError(f"cannot encode records: {error}") from None
    return _frame_body(
        packed,
        count,
        base_timestamp,
        max_timestamp,
        compression,
        base_offset,
        partition_leader_epoch,
        (producer_id, producer_epoch, base_sequence),
    )


def encode_packed_batch(
    packed_records: bytes | memoryview,
    record_count: int,
    *,
    base_timestamp: int,
    max_timestamp: int,
    compression: Compression = Compression.NONE,
    producer_id: int = -1,
    producer_epoch: int = -1,
    base_sequence: int = -1,
) -> bytes:
    """Encode a batch from records already msgpack-packed back to back (each one a
    ``[timestamp_delta, key, value, headers]`` array), as a producer accumulates them with
    ``msgpack.Packer(autoreset=False)``. Avoids keeping a Python object per record. An
    idempotent producer stamps its producer id, epoch and the batch's first sequence."""
    if record_count <= 0 or record_count > RECORDS_PER_BATCH_MAX:
        raise ProtocolUsageError(
            f"a batch holds 1..{RECORDS_PER_BATCH_MAX} records, not {record_count}"
        )
    producer = (producer_id, producer_epoch, base_sequence)
    if compression != Compression.NONE:
        packed = _array_header(record_count) + bytes(packed_records)
        return _frame_body(
            packed, record_count, base_timestamp, max_timestamp, compression, 0, -1, producer
        )
    # Uncompressed, the batch is header + array header + packed records: one copy, by join.
    array_header = _array_header(record_count)
    header = _batch_header(
        len(array_header) + len(packed_records),
        record_count,
        base_timestamp,
        max_timestamp,
        Compression.NONE,
        0,
        -1,
        producer,
    )
    crc = _crc32c.crc32c(memoryview(header)[CRC_START:])
    crc = _crc32c.crc32c(packed_records, _crc32c.crc32c(array_header, crc))
    struct.pack_into(">I", header, 17, crc)
    return b"".join((header, array_header, packed_records))


PRODUCER_STATE = struct.Struct(">qhi")  # producer_id, producer_epoch, base_sequence
PRODUCER_STATE_POSITION = 43


def with_producer_state(
    batch: bytes | bytearray | memoryview,
    *,
    producer_id: int,
    producer_epoch: int,
    base_sequence: int,
) -> bytes:
    """A copy of one encoded batch carrying another producer id, epoch and first sequence,
    its CRC (which covers them) computed again; the body is not touched. Raises
    ProtocolUsageError for a buffer shorter than a batch header."""
    if len(batch) < HEADER_BYTES:
        raise ProtocolUsageError(f"a batch is at least {HEADER_BYTES} bytes, not {len(batch)}")
    stamped = bytearray(batch)
    PRODUCER_STATE.pack_into(
        stamped, PRODUCER_STATE_POSITION, producer_id, producer_epoch, base_sequence
    )
    struct.pack_into(">I", stamped, 17, _crc32c.crc32c(memoryview(stamped)[CRC_START:]))
    return bytes(stamped)


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes([0x90 | count])
    if count < 65536:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def _frame_body(
    packed: bytes,
    count: int,
    base_timestamp: int,
    max_timestamp: int,
    compression: Compression,
    base_offset: int,
    partition_leader_epoch: int,
    producer: tuple[int, int, int] = (-1, -1, -1),
) -> bytes:
    body = _compress(compression, packed)
    header = _batch_header(
        len(body),
        count,
        base_timestamp,
        max_timestamp,
        compression,
        base_offset,
        partition_leader_epoch,
        producer,
    )
    return _seal_batch(header, body)


def _seal_batch(header: bytearray, body: bytes) -> bytes:
    """Header and body as one batch, the CRC-32C (attributes to the end) patched in."""
    crc = _crc32c.crc32c(body, _crc32c.crc32c(memoryview(header)[CRC_START:]))
    struct.pack_into(">I", header, 17, crc)
    return bytes(header) + body


def _batch_header(
    body_bytes: int,
    count: int,
    base_timestamp: int,
    max_timestamp: int,
    compression: Compression,
    base_offset: int,
    partition_leader_epoch: int,
    producer: tuple[int, int, int],
    *,
    msgpack_body: bool = True,
) -> bytearray:
    """The 61-byte header with a zero CRC (`seal_batch` computes and patches it). Without
    `msgpack_body` the body is Kafka's varint records (attribute bit 7 clear)."""
    return bytearray(
        HEADER.pack(
            base_offset,
            HEADER_BYTES - LOG_OVERHEAD_BYTES + body_bytes,
            partition_leader_epoch,
            MAGIC,
            0,
            (ATTRIBUTE_MSGPACK_BODY if msgpack_body else 0) | int(compression),
            count - 1,
            base_timestamp,
            max_timestamp,
            *producer,  # producer_id, producer_epoch, base_sequence
            count,
        )
    )


def build_batch(
    records: Sequence[tuple[int, bytes | None, bytes | None]]
    | Sequence[tuple[int, bytes | None, bytes | None, Sequence[tuple[str, bytes]]]],
    *,
    compression: Compression = Compression.NONE,
) -> bytes:
    """Convenience encoder from ``(timestamp_ms, key, value[, headers])`` tuples."""
    if not records:
        raise ProtocolUsageError("a batch needs at least one record")
    base = min(r[0] for r in records)
    shaped = [[r[0] - base, r[1], r[2], list(r[3]) if len(r) > 3 else []] for r in records]
    return encode_batch(
        shaped,
        base_timestamp=base,
        max_timestamp=max(r[0] for r in records),
        compression=compression,
    )


def parse_header(data: bytes | bytearray | memoryview, position: int = 0) -> BatchHeader:
    """Parse the 61-byte header at `position`; raises ProtocolError if it is cut short."""
    if len(data) - position < HEADER_BYTES:
        raise ProtocolError("record batch header is truncated")
    return BatchHeader._make(HEADER.unpack_from(data, position))


@dataclass(frozen=True, slots=True)
class ScannedBatch:
    position: int
    header: BatchHeader


def check_header(header: BatchHeader) -> None:
    """Check header fields that do not need the body; raises ProtocolError."""
    if header.batch_length < BATCH_LENGTH_MIN:
        raise ProtocolError(f"batch length {header.batch_length} is below {BATCH_LENGTH_MIN}")
    if header.magic != MAGIC:
        raise ProtocolError(f"batch magic {header.magic} is not {MAGIC}")
    if header.record_count < 1 or header.record_count > RECORDS_PER_BATCH_MAX:
        raise ProtocolError(f"batch record count {header.record_count} is out of range")
    if header.last_offset_delta != header.record_count - 1:
        raise ProtocolError("batch last_offset_delta does not match its record count")


def scan_batches(
    data: bytes | bytearray | memoryview, *, verify_crc: bool = True
) -> Iterator[ScannedBatch]:
    """Yield each batch of a buffer of back-to-back batches, checking length and CRC.

    Raises ProtocolError at the first batch that is cut short or damaged. Used by the
    broker on produce (every batch is checked before it is written) and by recovery.
    """
    view = memoryview(data)
    position = 0
    end = len(view)
    while position < end:
        header = parse_header(view, position)
        check_header(header)
        batch_end = position + header.size_bytes
        if batch_end > end:
            raise ProtocolError("record batch is truncated")
        if verify_crc and _crc32c.crc32c(view[position + CRC_START : batch_end]) != header.crc:
            raise ProtocolError(f"record batch at byte {position} fails its CRC check")
        yield ScannedBatch(position, header)
        position = batch_end


_unpack_limits = dict(
    raw=False,
    use_list=True,
    strict_map_key=True,
    max_str_len=DECOMPRESSED_BYTES_MAX,
    max_bin_len=DECOMPRESSED_BYTES_MAX,
    max_array_len=RECORDS_PER_BATCH_MAX,
    max_map_len=1024,
    max_ext_len=0,
)


_NONE_TYPE = type(None)
_KEY_TYPES = frozenset({bytes, _NONE_TYPE})
_INT_ONLY = frozenset({int})
_LIST_ONLY = frozenset({list})
_LENGTH_FOUR = frozenset({4})


def decode_body(header: BatchHeader, body: memoryview | bytes) -> list[list[Any]]:
    """Decode a batch body into its raw ``[timestamp_delta, key, value, headers]`` lists.

    Raises ProtocolError unless the body is exactly `record_count` well-formed records.
    """
    return _records_of(header, _unpack_body(header, body))


def _unpack_body(header: BatchHeader, body: memoryview | bytes) -> Any:
    if not header.attributes & ATTRIBUTE_MSGPACK_BODY:
        raise ProtocolError("batch does not carry a DWAL msgpack body")
    if header.attributes & ATTRIBUTE_CONTROL:
        return []
    codec = header.attributes & ATTRIBUTE_COMPRESSION_MASK
    if codec:
        body = _decompress(codec, memoryview(body), DECOMPRESSED_BYTES_MAX)
    try:
        return msgpack.unpackb(body, **_unpack_limits)
    except Exception as error:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"batch body is not valid msgpack: {error}") from None


def _records_of(header: BatchHeader, records: Any) -> list[list[Any]]:
    if header.attributes & ATTRIBUTE_CONTROL:
        return []
    if type(records) is not list or len(records) != header.record_count:
        raise ProtocolError("batch body does not hold record_count records")
    _check_columns(records)
    return records


def _check_columns(records: list[Any]) -> tuple[tuple, tuple, tuple, tuple]:
    """Check every record's shape with C-level loops (map/zip/set) rather than a Python
    loop per record: this is the consumer's hot path. Returns the four columns."""
    if not set(map(type, records)) <= _LIST_ONLY or not set(map(len, records)) <= _LENGTH_FOUR:
        raise ProtocolError("batch body holds a malformed record")
    deltas, keys, values, headers = zip(*records)
    if (
        not set(map(type, deltas)) <= _INT_ONLY
        or not set(map(type, keys)) <= _KEY_TYPES
        or not set(map(type, values)) <= _KEY_TYPES
        or not set(map(type, headers)) <= _LIST_ONLY
        or (any(headers) and not all(map(_headers_are_well_formed, headers)))
    ):
        raise ProtocolError("batch body holds a malformed record")
    return deltas, keys, values, headers


def _headers_are_well_formed(headers: list[Any]) -> bool:
    """True when every record header is a ``[str, bytes]`` pair."""
    return all(
        type(header) is list
        and len(header) == 2
        and type(header[0]) is str
        and type(header[1]) is bytes
        for header in headers
    )


def decode_records(
    data: bytes | bytearray | memoryview,
    *,
    verify_crc: bool = True,
    allow_partial_tail: bool = False,
    topic: str = "",
    partition: int = -1,
) -> list[Record]:
    """Decode every record of a buffer of back-to-back batches: DWAL msgpack batches
    (attribute bit 7 set) and Kafka v2 batches (bit 7 clear, as a Kafka producer writes
    them), in any mix, each by its own bit 7. Control batches give no records. With the
    log-append-time bit (3), every record of a batch has its max_timestamp, as in Kafka.
    DWAL record headers are ``(str, bytes)``: a Kafka header whose value is null reads as
    ``(key, b"")`` (`kafka_records.decode_kafka_records` keeps the None).

    With `allow_partial_tail`, a batch cut short at the end of the buffer (as a fetch may
    return when it stops at max_bytes) is ignored instead of raising ProtocolError.
    Every record carries `topic` and `partition` (the partition the buffer was read from).
    DWAL records are built column-wise with C-level iteration; no Python code runs per
    record (Kafka records are parsed field by field, in Python).
    The cyclic garbage collector is paused meanwhile (as msgpack's documentation advises
    for large unpacks): the records form no cycles, and without the pause collections
    triggered by the many new lists and tuples cost more than the decoding itself.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        return _decode_records(memoryview(data), verify_crc, allow_partial_tail, topic, partition)
    finally:
        if paused:
            gc.enable()


def _decode_records(
    view: memoryview, verify_crc: bool, allow_partial_tail: bool, topic: str, partition: int
) -> list[Record]:
    out: list[Record] = []
    topic_column, partition_column = repeat(topic), repeat(partition)
    for batch in _scan_allowing_tail(view, verify_crc, allow_partial_tail):
        header = batch.header
        body = view[batch.position + HEADER_BYTES : batch.position + header.size_bytes]
        attributes = header.attributes
        if not attributes & ATTRIBUTE_MSGPACK_BODY:
            out.extend(_decode_kafka_body(header, body, topic, partition))
            continue
        records = _unpack_body(header, body)
        if attributes & ATTRIBUTE_CONTROL:
            continue
        if type(records) is not list or len(records) != header.record_count:
            raise ProtocolError("batch body does not hold record_count records")
        deltas, keys, values, headers = _check_columns(records)
        base = header.base_offset
        offsets = range(base, base + len(records))
        timestamps: Iterable[int] = (
            repeat(header.max_timestamp)  # as Kafka: the broker's time, for every record
            if attributes & ATTRIBUTE_LOG_APPEND_TIME
            else map(header.base_timestamp.__add__, deltas)
        )
        # without headers, share one empty tuple: one object less per record for the GC
        header_column: Iterable[Any] = headers if any(headers) else repeat(())
        columns = zip(
            offsets, timestamps, keys, values, header_column, topic_column, partition_column
        )
        out.extend(map(_new_record, repeat(Record), columns))
    return out


_new_record = tuple.__new__


def _decode_kafka_body(
    header: BatchHeader, body: memoryview, topic: str, partition: int
) -> list[Record]:
    """The records of a Kafka-encoded batch (attribute bit 7 clear), a null header value
    read as b"" (DWAL's headers are ``(str, bytes)``). Raises ProtocolError."""
    from .kafka_records import decode_kafka_body  # imported here: it builds on this module

    return decode_kafka_body(header, body, topic=topic, partition=partition, null_header_value=b"")


def _scan_allowing_tail(
    view: memoryview, verify_crc: bool, allow_partial_tail: bool
) -> Iterator[ScannedBatch]:
    if not allow_partial_tail:
        yield from scan_batches(view, verify_crc=verify_crc)
        return
    yield from scan_batches(view[: complete_prefix_bytes(view)], verify_crc=verify_crc)


def last_batch_header(data: bytes | bytearray | memoryview) -> BatchHeader:
    """The header of the last batch in a buffer of whole back-to-back batches (walking the
    length fields only); raises ProtocolError if the buffer is empty or cut."""
    position = 0
    last = -1
    end = len(data)
    while end - position >= LOG_OVERHEAD_BYTES:
        _, length = BASE_OFFSET_AND_LENGTH.unpack_from(data, position)
        if length < BATCH_LENGTH_MIN or position + LOG_OVERHEAD_BYTES + length > end:
            raise ProtocolError("batch length runs past the buffer")
        last = position
        position += LOG_OVERHEAD_BYTES + length
    if last < 0 or position != end:
        raise ProtocolError("buffer does not end on a batch boundary")
    return parse_header(data, last)


def complete_prefix_bytes(data: bytes | bytearray | memoryview) -> int:
    """Length of the prefix of `data` made of whole batches (by their length fields)."""
    position = 0
    end = len(data)
    while end - position >= LOG_OVERHEAD_BYTES:
        _, length = BASE_OFFSET_AND_LENGTH.unpack_from(data, position)
        if length < BATCH_LENGTH_MIN:
            raise ProtocolError(f"batch length {length} is below {BATCH_LENGTH_MIN}")
        if position + LOG_OVERHEAD_BYTES + length > end:
            break
        position += LOG_OVERHEAD_BYTES + length
    return position
