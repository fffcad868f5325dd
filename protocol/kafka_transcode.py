"""Kafka clients' batches in and out of DWAL's logs, sans-I/O: what the Kafka listener runs
on a produce (`check_kafka_batches`) and on a fetch (`to_kafka_batches`).

Produce. A Kafka producer's batches are appended as they come (the broker patches only
base_offset and partition_leader_epoch, outside the CRC), so they are checked whole first:
header, CRC, attributes a producer may set, and a body that decodes to exactly its records.

Fetch. A partition log holds two kinds of batch behind the same 61-byte header: DWAL's
(attribute bit 7 set, a msgpack body) and Kafka producers' (bit 7 clear, Kafka's varint
records, stored verbatim). `to_kafka_batches` walks a fetched buffer by the
batches' length fields; Kafka batches go out as they are (runs of them are sliced, not
parsed: the only copy is the final join), and each DWAL batch is re-encoded as a Kafka v2
batch with the same header fields - base offset, partition leader epoch, last offset delta,
base and max timestamps, producer id, epoch and base sequence, record count, and the
attribute bits (codec, log-append time, transactional, control) but bit 7 - so only
batch_length and the CRC change. A DWAL batch's records sit at base_offset + index (its body
has no per-record offset; compaction keeps that true by splitting a batch into runs of
consecutive survivors, see broker/storage/log_cleaner.py), so each re-encoded record's offset
delta is its index and every offset a Kafka client sees is the stored one.

A DWAL batch that cannot be re-encoded - its CRC fails (damage on disk), its body does not
decode, or a value does not fit Kafka's varints - is passed on as it is stored: the Kafka
client then reports a corrupt batch at those offsets, as DWAL's own consumer does
(`CorruptRecordError`), instead of the whole fetch failing or the damage being sealed
under a fresh CRC.

Bounds. Decoding a DWAL body is bounded by DECOMPRESSED_BYTES_MAX (as `decode_records`);
one batch is re-encoded at a time; a Kafka body takes at most KAFKA_RECORD_EXTRA_BYTES_MAX
bytes per record more than the msgpack body it comes from, before compression with the
same codec. `bytes_max` caps the output as Kafka's fetch does: whole batches while they fit,
and always the first one.
"""

from __future__ import annotations

import struct

import crc32c

from .errors import ProtocolError, ProtocolUsageError
from .kafka_records import (
    _compress_body,
    _decompress_body,
    check_body,
    encode_kafka_records,
)
from .record_batch import (
    ATTRIBUTE_COMPRESSION_MASK,
    ATTRIBUTE_CONTROL,
    ATTRIBUTE_LOG_APPEND_TIME,
    ATTRIBUTE_MSGPACK_BODY,
    ATTRIBUTE_TRANSACTIONAL,
    CRC_START,
    DECOMPRESSED_BYTES_MAX,
    HEADER_BYTES,
    BatchHeader,
    Compression,
    _batch_header,
    _seal_batch,
    check_header,
    complete_prefix_bytes,
    decode_body,
    parse_header,
    scan_batches,
)

ATTRIBUTES = struct.Struct(">h")
ATTRIBUTES_POSITION = 21
# What a Kafka record may take beyond its msgpack form: varints for its length (5),
# timestamp delta (10, against msgpack's 1 at least), offset delta (5), key and value
# lengths and header count (5 each), its attributes byte (1); minus msgpack's own 5 bytes.
KAFKA_RECORD_EXTRA_BYTES_MAX = 5 + 1 + 10 + 5 + 5 + 5 + 5 - 5
# and per header: key and value length varints (5 each) against msgpack's array, str, bin
KAFKA_HEADER_EXTRA_BYTES_MAX = 5 + 5 - 3


# The attribute bits a Kafka producer may set: the codec. Transactions, control batches and
# log-append time are the broker's (DWAL has no transactions); bit 7 marks DWAL msgpack.
PRODUCER_ATTRIBUTES = ATTRIBUTE_COMPRESSION_MASK
KNOWN_CODECS = frozenset(map(int, Compression))


def check_kafka_batches(data: bytes | bytearray | memoryview) -> int:
    """Check a Kafka producer's back-to-back v2 batches before they are appended: each
    header (length, magic 2, record count, last_offset_delta), its CRC, its attributes (a
    known codec and nothing else), and its body, which must expand within
    DECOMPRESSED_BYTES_MAX into exactly record_count well-formed records whose offset deltas
    are 0, 1, ... and whose largest timestamp is the header's max_timestamp (Kafka's broker
    would patch a wrong one, and the CRC; DWAL stores batches as they come, so it refuses).

    Returns the number of records. Raises ProtocolError naming the first problem.
    """
    view = memoryview(data)
    if not len(view):
        raise ProtocolError("a produce needs at least one record batch")
    total = 0
    for scanned in scan_batches(view):
        header = scanned.header
        _check_producer_attributes(header.attributes)
        body = view[scanned.position + HEADER_BYTES : scanned.position + header.size_bytes]
        codec = header.attributes & ATTRIBUTE_COMPRESSION_MASK
        records = _decompress_body(codec, body, DECOMPRESSED_BYTES_MAX) if codec else body
        delta_max = check_body(records, header.record_count)
        if header.base_timestamp + delta_max != header.max_timestamp:
            raise ProtocolError(
                f"batch max_timestamp {header.max_timestamp} is not its largest record "
                f"timestamp {header.base_timestamp + delta_max}"
            )
        total += header.record_count
    return total


def _check_producer_attributes(attributes: int) -> None:
    if attributes & ~PRODUCER_ATTRIBUTES:
        if attributes & ATTRIBUTE_MSGPACK_BODY:
            reason = "attribute bit 7 marks a DWAL msgpack body"
        elif attributes & ATTRIBUTE_CONTROL:
            reason = "control batches are written by brokers only"
        elif attributes & ATTRIBUTE_TRANSACTIONAL:
            reason = "transactions are not supported"
        elif attributes & ATTRIBUTE_LOG_APPEND_TIME:
            reason = "log-append time is set by brokers only"
        else:
            reason = "it sets unknown attribute bits"
        raise ProtocolError(f"a producer's batch has attributes {attributes:#06x}: {reason}")
    if attributes & ATTRIBUTE_COMPRESSION_MASK not in KNOWN_CODECS:
        raise ProtocolError(f"unknown compression codec {attributes & ATTRIBUTE_COMPRESSION_MASK}")


def to_kafka_batches(
    data: bytes | bytearray | memoryview, *, bytes_max: int | None = None
) -> bytes:
    """What a Kafka client can read of a buffer of back-to-back stored batches, as a fetch
    returns them: Kafka batches as they are, DWAL batches re-encoded (see the module's
    theory of operation). A batch cut short at the end of the buffer is dropped. With
    `bytes_max`, batches stop before the first one that would take the output past it,
    except the first batch, which is always whole (Kafka's fetch rule since KIP-74).

    Returns the bytes. Raises ProtocolError when a batch length field is below the minimum
    (the buffer is not batches); never for a batch's body.
    """
    assert bytes_max is None or bytes_max >= 0
    view = memoryview(data)
    end = complete_prefix_bytes(view)
    parts: list[bytes | memoryview] = []
    output_bytes = 0
    run_start = 0  # the first byte of the run of batches passed on as they are
    position = 0
    while position < end:
        header = parse_header(view, position)
        batch_end = position + header.size_bytes
        transcoded = None
        if header.attributes & ATTRIBUTE_MSGPACK_BODY:
            transcoded = _transcode(header, view[position:batch_end])
        size = header.size_bytes if transcoded is None else len(transcoded)
        if bytes_max is not None and position and output_bytes + size > bytes_max:
            break
        output_bytes += size
        if transcoded is not None:
            if run_start < position:
                parts.append(view[run_start:position])
            parts.append(transcoded)
            run_start = batch_end
        position = batch_end
    if run_start < position:
        parts.append(view[run_start:position])
    return b"".join(parts)


def _transcode(header: BatchHeader, batch: memoryview) -> bytes | None:
    """One DWAL batch as a Kafka v2 batch; None when it must go out as it is stored."""
    try:
        check_header(header)
        if crc32c.crc32c(batch[CRC_START:]) != header.crc:
            return None
        # a control batch's body is records too: decode it as such
        records = decode_body(
            header._replace(attributes=header.attributes & ~ATTRIBUTE_CONTROL),
            batch[HEADER_BYTES:],
        )
        body = encode_kafka_records(records)  # type: ignore[arg-type]
    except (ProtocolError, ProtocolUsageError):
        return None
    if len(body) > DECOMPRESSED_BYTES_MAX:
        return None  # a Kafka client (and kafka_records) would refuse to expand it
    codec = Compression(header.compression)  # decode_body knew the codec
    compressed = _compress_body(codec, bytes(body))
    kafka_header = _batch_header(
        len(compressed),
        header.record_count,
        header.base_timestamp,
        header.max_timestamp,
        codec,
        header.base_offset,
        header.partition_leader_epoch,
        (header.producer_id, header.producer_epoch, header.base_sequence),
        msgpack_body=False,
    )
    attributes = header.attributes & ~ATTRIBUTE_MSGPACK_BODY
    ATTRIBUTES.pack_into(kafka_header, ATTRIBUTES_POSITION, attributes)
    return _seal_batch(kafka_header, compressed)
