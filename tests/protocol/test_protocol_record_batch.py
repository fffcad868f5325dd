"""Record batches: encode, scan and decode round trips, offset patching, partial tails."""

from __future__ import annotations

import struct

import crc32c
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_strategies import (
    INT32_MAX,
    INT32_MIN,
    comparable,
    compressions,
    expected_records,
    fast,
    forge_batch,
    record_lists,
    timestamps,
)

import protocol
from protocol.record_batch import SUPPORTED_COMPRESSION
from protocol.record_batch import ATTRIBUTE_MSGPACK_BODY, CRC_START


def scan(batch: bytes) -> list[protocol.BatchHeader]:
    return [scanned.header for scanned in protocol.scan_batches(batch)]


def test_known_batch_decodes_to_known_records():
    batch = protocol.build_batch([(1000, b"k", b"v"), (1005, None, b"w", [("h", b"x")])])
    assert comparable(protocol.decode_records(batch)) == [
        (0, 1000, b"k", b"v", []),
        (1, 1005, None, b"w", [("h", b"x")]),
    ]


def test_header_layout_is_kafka_v2():
    batch = protocol.build_batch([(7, None, b"a"), (9, None, b"b")])
    assert protocol.HEADER_BYTES == 61
    (header,) = scan(batch)
    assert header.magic == 2
    assert header.size_bytes == len(batch)
    assert header.batch_length == len(batch) - 12
    assert header.crc == crc32c.crc32c(batch[CRC_START:])
    assert header.attributes & ATTRIBUTE_MSGPACK_BODY
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (-1, -1, -1)
    assert header.partition_leader_epoch == -1


@given(built=record_lists, compression=compressions)
@fast(150)
def test_build_batch_round_trip(built, compression):
    batch = protocol.build_batch(built, compression=compression)

    assert comparable(protocol.decode_records(batch)) == expected_records(built)
    (header,) = scan(batch)
    assert header.record_count == len(built)
    assert header.last_offset_delta == len(built) - 1
    assert header.base_timestamp == min(r[0] for r in built)
    assert header.max_timestamp == max(r[0] for r in built)
    assert header.compression == compression
    assert header.size_bytes == len(batch)
    assert header.crc == crc32c.crc32c(batch[CRC_START:])
    assert header.base_offset == 0
    assert header.next_offset == len(built)


@given(
    deltas=st.lists(st.integers(0, 10**9), min_size=1, max_size=10),
    base_timestamp=timestamps,
    compression=compressions,
    producer=st.tuples(st.integers(-1, 2**40), st.integers(-1, 2**15 - 1), st.integers(-1, 10**6)),
)
@fast(100)
def test_encode_batch_round_trip(deltas, base_timestamp, compression, producer):
    shaped = [[delta, str(i).encode(), None, [["i", bytes([i])]]] for i, delta in enumerate(deltas)]
    producer_id, producer_epoch, base_sequence = producer
    batch = protocol.encode_batch(
        shaped,
        base_timestamp=base_timestamp,
        compression=compression,
        producer_id=producer_id,
        producer_epoch=producer_epoch,
        base_sequence=base_sequence,
    )

    decoded = protocol.decode_records(batch)
    assert [r.timestamp for r in decoded] == [base_timestamp + d for d in deltas]
    assert [r.key for r in decoded] == [str(i).encode() for i in range(len(deltas))]
    assert [r.value for r in decoded] == [None] * len(deltas)
    assert [[tuple(h) for h in r.headers] for r in decoded] == [
        [("i", bytes([i]))] for i in range(len(deltas))
    ]
    (header,) = scan(batch)
    assert header.max_timestamp == base_timestamp + max(deltas)
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == producer


@given(
    built=record_lists,
    compression=compressions,
    base_offset=st.integers(0, 2**62),
    epoch=st.integers(INT32_MIN, INT32_MAX),
)
@fast(100)
def test_patching_base_offset_and_epoch_keeps_crc(built, compression, base_offset, epoch):
    batch = bytearray(protocol.build_batch(built, compression=compression))
    struct.pack_into(">q", batch, 0, base_offset)
    struct.pack_into(">i", batch, 12, epoch)

    (header,) = scan(batch)  # would raise if the CRC covered the patched bytes
    assert header.base_offset == base_offset
    assert header.partition_leader_epoch == epoch
    assert header.last_offset == base_offset + len(built) - 1
    assert comparable(protocol.decode_records(batch)) == expected_records(built, base_offset)


@given(
    batches=st.lists(st.tuples(record_lists, compressions), min_size=1, max_size=5),
    first_offset=st.integers(0, 2**40),
)
@fast(80)
def test_back_to_back_batches_decode_in_order(batches, first_offset):
    stream = bytearray()
    expected = []
    offset = first_offset
    for built, compression in batches:
        batch = bytearray(protocol.build_batch(built, compression=compression))
        struct.pack_into(">q", batch, 0, offset)
        stream += batch
        expected += expected_records(built, offset)
        offset += len(built)

    scanned = list(protocol.scan_batches(stream))
    assert len(scanned) == len(batches)
    assert [s.header.record_count for s in scanned] == [len(b) for b, _ in batches]
    positions = [s.position for s in scanned]
    assert positions[0] == 0
    assert [p + s.header.size_bytes for p, s in zip(positions, scanned)] == positions[1:] + [
        len(stream)
    ]
    assert comparable(protocol.decode_records(stream)) == expected
    assert protocol.complete_prefix_bytes(stream) == len(stream)


@given(first=record_lists, second=record_lists, compressions=st.tuples(compressions, compressions))
@fast(25)
def test_every_truncation_of_two_batches(first, second, compressions):
    batch_one = protocol.build_batch(first, compression=compressions[0])
    batch_two = bytearray(protocol.build_batch(second, compression=compressions[1]))
    struct.pack_into(">q", batch_two, 0, len(first))
    stream = batch_one + bytes(batch_two)
    first_records = expected_records(first)
    all_records = first_records + expected_records(second, len(first))

    for cut in range(len(stream) + 1):
        data = stream[:cut]
        if cut < len(batch_one):
            prefix, wanted = 0, []
        elif cut < len(stream):
            prefix, wanted = len(batch_one), first_records
        else:
            prefix, wanted = len(stream), all_records
        assert protocol.complete_prefix_bytes(data) == prefix, cut
        decoded = protocol.decode_records(data, allow_partial_tail=True)
        assert comparable(decoded) == wanted, cut
        if cut not in (0, len(batch_one), len(stream)):
            with pytest.raises(protocol.ProtocolError):
                protocol.decode_records(data)
            with pytest.raises(protocol.ProtocolError):
                list(protocol.scan_batches(data))


def test_complete_prefix_bytes_rejects_impossible_length():
    batch = bytearray(protocol.build_batch([(0, None, b"x")]))
    struct.pack_into(">i", batch, 8, 3)
    with pytest.raises(protocol.ProtocolError):
        protocol.complete_prefix_bytes(batch)
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_records(batch, allow_partial_tail=True)


def test_scan_without_crc_check_accepts_a_damaged_body():
    batch = bytearray(protocol.build_batch([(0, None, b"x")]))
    batch[17] ^= 0x01  # damage the stored CRC only
    with pytest.raises(protocol.ProtocolError, match="CRC"):
        list(protocol.scan_batches(batch))
    (scanned,) = protocol.scan_batches(batch, verify_crc=False)
    assert scanned.header.record_count == 1
    assert comparable(protocol.decode_records(batch, verify_crc=False)) == [(0, 0, None, b"x", [])]


def test_control_batch_yields_no_records():
    body = msgpack.packb([[0, None, b"x", []]], use_bin_type=True)
    batch = forge_batch(body, attributes=ATTRIBUTE_MSGPACK_BODY | 0x20, record_count=1)
    assert protocol.decode_records(batch) == []


def test_encoders_reject_misuse():
    with pytest.raises(protocol.ProtocolUsageError):
        protocol.build_batch([])
    with pytest.raises(protocol.ProtocolUsageError):
        protocol.encode_batch([], base_timestamp=0)
    with pytest.raises(protocol.ProtocolUsageError):
        protocol.build_batch([(0, None, b"x")], compression=protocol.Compression.SNAPPY)


def test_compression_from_name():
    assert protocol.Compression.from_name("zstd") is protocol.Compression.ZSTD
    assert protocol.Compression.from_name("LZ4") is protocol.Compression.LZ4
    with pytest.raises(ValueError):
        protocol.Compression.from_name("brotli")


@pytest.mark.parametrize("compression", sorted(SUPPORTED_COMPRESSION))
@settings(max_examples=30, deadline=None)
@given(
    records=st.lists(
        st.tuples(
            st.integers(0, 10_000),
            st.none() | st.binary(max_size=20),
            st.none() | st.binary(max_size=200),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_packed_records_encode_like_a_record_list(compression, records):
    """The producer's incremental path (records packed one by one) writes the same bytes as
    encoding the list of records at once."""
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    for delta, key, value in records:
        packer.pack((delta, key, value, ()))
    max_timestamp = 1000 + max(r[0] for r in records)
    incremental = protocol.encode_packed_batch(
        packer.getbuffer(),
        len(records),
        base_timestamp=1000,
        max_timestamp=max_timestamp,
        compression=compression,
    )
    at_once = protocol.encode_batch(
        [[d, k, v, []] for d, k, v in records], base_timestamp=1000, compression=compression
    )
    assert incremental == at_once
    decoded = protocol.decode_records(incremental)
    assert [(r.timestamp, r.key, r.value) for r in decoded] == [
        (1000 + d, k, v) for d, k, v in records
    ]
