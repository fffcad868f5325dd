"""Which partition a keyed record goes to: shared by every client and gateway so that the
same key always lands in the same partition, whoever produced it."""

from __future__ import annotations

import zlib


def partition_for_key(key: bytes, partition_count: int) -> int:
    """CRC-32 (zlib) of the key bytes modulo the partition count."""
    assert partition_count > 0
    return zlib.crc32(key) % partition_count
