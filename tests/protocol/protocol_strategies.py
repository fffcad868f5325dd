"""Hypothesis strategies and helpers shared by the protocol tests.

The module has a distinctive name because test directories have no ``__init__.py``: pytest
puts each on ``sys.path``, and two helpers called ``strategies.py`` would collide.
"""

from __future__ import annotations

import struct
from typing import Any

import crc32c
import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import protocol
from protocol.record_batch import CRC_START, HEADER

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

SUPPORTED_COMPRESSIONS = [
    protocol.Compression.NONE,
    protocol.Compression.GZIP,
    protocol.Compression.LZ4,
    protocol.Compression.ZSTD,
]


def fast(max_examples: int) -> settings:
    """Settings for one property: a bounded number of examples and no per-example deadline."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- records ---------------------------------------------------------------------------------

timestamps = st.integers(min_value=0, max_value=2**62)
optional_bytes = st.none() | st.binary(max_size=64)
record_headers = st.lists(st.tuples(st.text(max_size=12), st.binary(max_size=16)), max_size=3)
records = st.tuples(timestamps, optional_bytes, optional_bytes, record_headers)
record_lists = st.lists(records, min_size=1, max_size=12)
compressions = st.sampled_from(SUPPORTED_COMPRESSIONS)


def expected_records(
    built: list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes]]]],
    base_offset: int = 0,
) -> list[tuple[int, int, bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    """The records a consumer should see for `built`, as plain comparable tuples."""
    return [
        (base_offset + index, timestamp, key, value, [tuple(h) for h in headers])
        for index, (timestamp, key, value, headers) in enumerate(built)
    ]


def comparable(decoded: list[protocol.Record]) -> list[tuple[Any, ...]]:
    """Decoded records as plain tuples; headers normalised to tuples (msgpack gives lists)."""
    return [(r.offset, r.timestamp, r.key, r.value, [tuple(h) for h in r.headers]) for r in decoded]


def assert_well_typed(decoded: list[protocol.Record]) -> None:
    """A decoder that accepts a batch must hand out records of the documented types."""
    for record in decoded:
        assert isinstance(record, protocol.Record)
        assert type(record.offset) is int
        assert type(record.timestamp) is int
        assert record.key is None or type(record.key) is bytes
        assert record.value is None or type(record.value) is bytes
        for header in record.headers:
            name, value = header
            assert type(name) is str, header
            assert type(value) is bytes, header


def forge_batch(
    body: bytes,
    *,
    attributes: int,
    record_count: int,
    base_offset: int = 0,
    base_timestamp: int = 0,
) -> bytes:
    """A batch with a correct header and CRC around an arbitrary body.

    Lets a test get past the CRC check and reach the body decoder with any bytes.
    """
    header = bytearray(
        HEADER.pack(
            base_offset,
            HEADER.size - 12 + len(body),
            -1,
            2,
            0,
            attributes,
            record_count - 1,
            base_timestamp,
            base_timestamp,
            -1,
            -1,
            -1,
            record_count,
        )
    )
    struct.pack_into(">I", header, 17, crc32c.crc32c(bytes(header[CRC_START:]) + body))
    return bytes(header) + body


# --- msgpack-like values ---------------------------------------------------------------------

msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)

msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

# Values as msgpack decodes them into frame headers: maps may also have bytes keys.
msgpack_decoded_values = st.recursive(
    msgpack_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

# Frame bodies: string-keyed maps of simple values and small lists of them.
simple_values = msgpack_scalars | st.lists(msgpack_scalars, max_size=4)
bodies = st.dictionaries(st.text(max_size=10), simple_values, max_size=6)


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)
