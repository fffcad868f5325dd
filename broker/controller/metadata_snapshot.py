"""The bytes of a metadata snapshot: an image as chunks of records, bounded like entries.

A snapshot (Raft `Snapshot.data`) holds the records of `image_to_records(image)`, which may be
far more than one entry may hold, so they are cut into chunks that each encode as one entry
(`encode_entry`, so each is checked and bounded by the same `MetadataLimits`):

    b"DWMS" | u8 format version (0) | (u32 big-endian length | entry bytes)*

Decoding checks the magic, the version, every length before slicing, and every chunk with
`decode_entry`; any defect raises `MetadataDecodeError`. The caller bounds the snapshot's total
size (it arrives as one Raft message or file).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from broker.controller.metadata_image import MetadataImage, image_from_records, image_to_records
from broker.controller.metadata_records import (
    DEFAULT_LIMITS,
    MetadataDecodeError,
    MetadataEncodeError,
    MetadataLimits,
    MetadataRecord,
    decode_entry,
    encode_entry,
)

SNAPSHOT_MAGIC = b"DWMS"
SNAPSHOT_FORMAT_VERSION = 0
_HEADER = SNAPSHOT_MAGIC + bytes([SNAPSHOT_FORMAT_VERSION])
_LENGTH = struct.Struct(">I")
_RECORDS_PER_CHUNK = 1000  # a first guess; a chunk too large for one entry is halved


def encode_snapshot(image: MetadataImage, *, limits: MetadataLimits = DEFAULT_LIMITS) -> bytes:
    """Return the snapshot bytes of `image`; `decode_snapshot` of them rebuilds an equal image
    (given the image's `last_applied_index`). Raises MetadataEncodeError only if one record
    alone exceeds `limits`."""
    records = image_to_records(image)
    parts = [_HEADER]
    for start in range(0, len(records), _RECORDS_PER_CHUNK):
        for chunk in _encode_chunks(records[start : start + _RECORDS_PER_CHUNK], limits):
            parts.append(_LENGTH.pack(len(chunk)))
            parts.append(chunk)
    return b"".join(parts)


def _encode_chunks(records: Sequence[MetadataRecord], limits: MetadataLimits) -> list[bytes]:
    try:
        return [encode_entry(records, limits=limits)]
    except MetadataEncodeError:
        if len(records) == 1:
            raise
    middle = len(records) // 2
    return _encode_chunks(records[:middle], limits) + _encode_chunks(records[middle:], limits)


def decode_snapshot(
    data: bytes, *, index: int, limits: MetadataLimits = DEFAULT_LIMITS
) -> MetadataImage:
    """Return the image that snapshot bytes describe, as of Raft index `index` (> 0).

    Raises MetadataDecodeError (only) for bytes that are not a valid snapshot.
    """
    view = memoryview(data)
    if bytes(view[: len(_HEADER)]) != _HEADER:
        raise MetadataDecodeError("not a metadata snapshot of a known format version")
    records: list[MetadataRecord] = []
    position = len(_HEADER)
    while position < len(view):
        if len(view) - position < _LENGTH.size:
            raise MetadataDecodeError("metadata snapshot ends inside a chunk length")
        (length,) = _LENGTH.unpack_from(view, position)
        position += _LENGTH.size
        if length > limits.entry_bytes_max or length > len(view) - position:
            raise MetadataDecodeError(
                f"metadata snapshot chunk of {length} bytes is cut or too long"
            )
        records.extend(decode_entry(bytes(view[position : position + length]), limits=limits))
        position += length
    return image_from_records(records, index=index)
