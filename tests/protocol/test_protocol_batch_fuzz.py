"""Damaged and hostile record batches: decoders raise ProtocolError and nothing else.

A flipped byte outside base_offset and partition_leader_epoch must always be caught (CRC-32C
detects every burst error of up to 32 bits); a flipped byte inside them must be accepted.
"""

from __future__ import annotations

import gzip

import lz4.frame
import msgpack
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st
from protocol_strategies import (
    assert_well_typed,
    comparable,
    compressions,
    expected_records,
    fast,
    forge_batch,
    msgpack_values,
    pack,
    record_lists,
)

import protocol
import protocol.record_batch as record_batch
from protocol.record_batch import ATTRIBUTE_MSGPACK_BODY

PATCHABLE_POSITIONS = frozenset(range(0, 8)) | frozenset(range(12, 16))


def run_decoders(data: bytes, **decode_options) -> list[protocol.Record] | None:
    """Feed `data` to every batch decoder; return the decoded records, or None on ProtocolError.

    Any other exception escapes and fails the test.
    """
    try:
        protocol.parse_header(data)
    except protocol.ProtocolError:
        pass
    try:
        protocol.complete_prefix_bytes(data)
    except protocol.ProtocolError:
        pass
    try:
        list(protocol.scan_batches(data, verify_crc=decode_options.get("verify_crc", True)))
    except protocol.ProtocolError:
        pass
    try:
        decoded = protocol.decode_records(data, **decode_options)
    except protocol.ProtocolError:
        return None
    assert_well_typed(decoded)
    return decoded


@given(
    built=record_lists,
    compression=compressions,
    data=st.data(),
)
@fast(300)
def test_any_flipped_byte_is_caught_unless_patchable(built, compression, data):
    batch = protocol.build_batch(built, compression=compression)
    position = data.draw(st.integers(0, len(batch) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    damaged = bytearray(batch)
    damaged[position] ^= mask

    decoded = run_decoders(bytes(damaged))

    if position in PATCHABLE_POSITIONS:
        assert decoded is not None
        (header,) = [s.header for s in protocol.scan_batches(damaged)]
        expected = expected_records(built, header.base_offset)
        assert comparable(decoded) == expected
    else:
        assert decoded is None, f"flip at byte {position} went unnoticed"
        with pytest.raises(protocol.ProtocolError):
            list(protocol.scan_batches(damaged))


@given(built=record_lists, compression=compressions, data=st.data())
@fast(200)
def test_flipped_byte_without_crc_check_raises_only_protocol_error(built, compression, data):
    batch = bytearray(protocol.build_batch(built, compression=compression))
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(batch) - 1), st.integers(1, 255)), max_size=4)
    )
    for position, mask in flips:
        batch[position] ^= mask
    run_decoders(bytes(batch), verify_crc=False)
    run_decoders(bytes(batch), verify_crc=False, allow_partial_tail=True)


@given(built=record_lists, compression=compressions, data=st.data())
@fast(150)
def test_truncated_batch_is_rejected(built, compression, data):
    batch = protocol.build_batch(built, compression=compression)
    cut = data.draw(st.integers(1, len(batch) - 1), label="cut")
    truncated = batch[:cut]

    assert run_decoders(truncated) is None
    with pytest.raises(protocol.ProtocolError):
        list(protocol.scan_batches(truncated))
    assert protocol.decode_records(truncated, allow_partial_tail=True) == []


@given(built=record_lists, compression=compressions, garbage=st.binary(min_size=1, max_size=200))
@fast(150)
def test_garbage_after_a_batch_is_rejected(built, compression, garbage):
    batch = protocol.build_batch(built, compression=compression)
    assert run_decoders(batch + garbage) is None
    with pytest.raises(protocol.ProtocolError):
        list(protocol.scan_batches(batch + garbage))
    try:
        tolerant = protocol.decode_records(batch + garbage, allow_partial_tail=True)
    except protocol.ProtocolError:
        pass  # the garbage's length field is impossible
    else:
        assert comparable(tolerant) == expected_records(built)


@given(data=st.binary(max_size=400))
@fast(300)
def test_random_bytes_into_batch_decoders(data):
    run_decoders(data)
    run_decoders(data, allow_partial_tail=True)
    run_decoders(data, verify_crc=False)


@given(
    body=st.binary(max_size=200),
    attributes=st.integers(-(2**15), 2**15 - 1),
    record_count=st.integers(1, 5),
)
@fast(300)
def test_random_body_behind_a_valid_crc(body, attributes, record_count):
    run_decoders(forge_batch(body, attributes=attributes, record_count=record_count))


def compress(codec: protocol.Compression, body: bytes) -> bytes:
    if codec == protocol.Compression.GZIP:
        return gzip.compress(body)
    if codec == protocol.Compression.LZ4:
        return lz4.frame.compress(body)
    if codec == protocol.Compression.ZSTD:
        return zstandard.ZstdCompressor().compress(body)
    return body


@given(
    value=msgpack_values,
    compression=compressions,
    record_count=st.integers(1, 4),
)
@fast(400)
def test_msgpack_body_of_any_shape_behind_a_valid_crc(value, compression, record_count):
    """Bodies that are valid msgpack but not valid records: the decoder's own checks."""
    body = compress(compression, pack(value))
    attributes = ATTRIBUTE_MSGPACK_BODY | int(compression)
    run_decoders(forge_batch(body, attributes=attributes, record_count=record_count))


record_field_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.binary(max_size=4),
    st.text(max_size=4),
    st.lists(
        st.none() | st.text(max_size=3) | st.binary(max_size=3) | st.integers(-5, 5), max_size=3
    ),
)


@given(
    records=st.lists(
        st.lists(record_field_values, min_size=0, max_size=5)
        | st.tuples(
            st.integers(0, 100),
            st.none() | st.binary(max_size=4),
            st.none() | st.binary(max_size=4),
            st.lists(st.lists(record_field_values, max_size=3) | record_field_values, max_size=3),
        ).map(list),
        min_size=1,
        max_size=4,
    ),
    compression=compressions,
)
@fast(400)
def test_nearly_valid_records_are_rejected_or_well_typed(records, compression):
    """Records with one field of the wrong type (including header entries) never leak out."""
    batch = protocol.encode_batch(
        records, base_timestamp=0, max_timestamp=0, compression=compression
    )
    decoded = run_decoders(batch)
    if decoded is not None:
        assert len(decoded) == len(records)


def test_malformed_header_entry_is_a_protocol_error():
    for headers in ([1], [["k"]], [["k", b"v", b"w"]], [[b"k", b"v"]], [["k", "v"]], [None]):
        batch = protocol.encode_batch([[0, None, b"v", headers]], base_timestamp=0)
        with pytest.raises(protocol.ProtocolError, match="malformed record"):
            protocol.decode_records(batch)


# --- decompression bombs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "compression",
    [protocol.Compression.GZIP, protocol.Compression.LZ4, protocol.Compression.ZSTD],
)
def test_decompression_limit_is_exact(monkeypatch, compression):
    shaped = [[0, None, bytes(4096), []]]
    body_bytes = len(msgpack.packb(shaped, use_bin_type=True))
    batch = protocol.encode_batch(shaped, base_timestamp=0, compression=compression)
    assert len(batch) < body_bytes  # zeros compress: this really is an expansion

    monkeypatch.setattr(record_batch, "DECOMPRESSED_BYTES_MAX", body_bytes)
    assert len(protocol.decode_records(batch)) == 1

    monkeypatch.setattr(record_batch, "DECOMPRESSED_BYTES_MAX", body_bytes - 1)
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.decode_records(batch)


@pytest.mark.parametrize(
    "compression",
    [protocol.Compression.GZIP, protocol.Compression.LZ4, protocol.Compression.ZSTD],
)
def test_decompression_bomb_is_rejected(monkeypatch, compression):
    """64 MiB of zeros squeezed into a few kilobytes, against a 1 MiB limit."""
    bomb = compress(compression, bytes(64 * 1024 * 1024))
    assert len(bomb) < 512 * 1024
    batch = forge_batch(bomb, attributes=ATTRIBUTE_MSGPACK_BODY | int(compression), record_count=1)
    monkeypatch.setattr(record_batch, "DECOMPRESSED_BYTES_MAX", 1024 * 1024)
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.decode_records(batch)
