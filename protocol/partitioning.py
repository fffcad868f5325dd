"""Which partition a keyed record goes to: shared by every client and gateway so that the
same key always lands in the same partition, whoever produced it.

The default is Kafka's: ``toPositive(murmur2(key)) % partition_count``, as the Java client's
`BuiltInPartitioner.partitionForKey` and librdkafka's ``murmur2_random`` partitioner (the
default of confluent-kafka) compute it, and kafka-python's and aiokafka's default
partitioners too. A key therefore lands in the same partition whether a Kafka client or a
DWAL client produced it. Records without a key are not hashed: producers spread them.

Before murmur2, DWAL hashed keys with CRC-32 (zlib's). That hash stays available by the name
"crc32", for producers that must keep placing the keys of existing topics where they were.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

_MASK = 0xFFFFFFFF
_SEED = 0x9747B28C  # Kafka's Utils.murmur2
_MULTIPLIER = 0x5BD1E995
# Unpackers of 0 to 16 little-endian u32 words (keys up to 67 bytes: most keys); longer keys
# build theirs.
_WORDS = [struct.Struct(f"<{count}I") for count in range(17)]


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of `data` (`org.apache.kafka.common.utils.Utils.murmur2`) as an
    unsigned 32-bit number; the Java client's int is the same bits, signed."""
    length = len(data)
    whole = length & ~3
    words = whole >> 2
    unpacker = _WORDS[words] if words < len(_WORDS) else struct.Struct(f"<{words}I")
    multiplier = _MULTIPLIER
    mask = _MASK
    h = _SEED ^ length
    # Each step is Java's `k *= m; k ^= k >>> 24; k *= m; h *= m; h ^= k` on 32-bit ints:
    # masking once after the xor gives the same low 32 bits.
    for k in unpacker.unpack_from(data):
        k = (k * multiplier) & mask
        h = ((h * multiplier) ^ ((k ^ (k >> 24)) * multiplier)) & mask
    if length & 3:  # the last 1 to 3 bytes, little-endian, then one multiplication
        h = ((h ^ int.from_bytes(data[whole:], "little")) * multiplier) & mask
    h ^= h >> 13
    h = (h * multiplier) & mask
    return h ^ (h >> 15)


try:  # the same hash in C (MurmurHash2, which Kafka's is with this seed): 4x faster
    from murmurhash2 import murmurhash2 as _murmurhash2_c
except ImportError:  # a platform without its wheel: the Python version above
    _murmurhash2_c = None  # type: ignore[assignment]


def _positive_murmur2_python(key: bytes) -> int:
    return murmur2(key) & 0x7FFFFFFF


def _positive_murmur2_c(key: bytes) -> int:
    return _murmurhash2_c(key, _SEED) & 0x7FFFFFFF


# murmur2(key) with its sign bit cleared: Java's `Utils.toPositive(Utils.murmur2(key))`, the
# number Kafka's default partitioner takes modulo the partition count. `murmur2` above is the
# reference (tests check that both agree with it and with Kafka's vectors).
positive_murmur2: Callable[[bytes], int] = (
    _positive_murmur2_c if _murmurhash2_c is not None else _positive_murmur2_python
)


# Key hashes by name: a keyed record goes to partition `hash(key) % partition_count`.
# "murmur2_random" is librdkafka's name of Kafka's default (it too spreads keyless records).
KEY_HASHES: dict[str, Callable[[bytes], int]] = {
    "murmur2": positive_murmur2,
    "murmur2_random": positive_murmur2,
    "crc32": zlib.crc32,
}
DEFAULT_PARTITIONER = "murmur2"


def key_hash(partitioner: str) -> Callable[[bytes], int]:
    """The key hash of the partitioner called `partitioner` (a key of KEY_HASHES); raises
    ValueError naming the choices for any other name."""
    found = KEY_HASHES.get(partitioner)
    if found is None:
        choices = ", ".join(repr(known) for known in KEY_HASHES)
        raise ValueError(f"unknown partitioner {partitioner!r}: choose one of {choices}")
    return found


def partition_for_key(
    key: bytes, partition_count: int, partitioner: str = DEFAULT_PARTITIONER
) -> int:
    """The partition of a keyed record: by default Kafka's, murmur2 (see above); "crc32" gives
    DWAL's placement before murmur2. Raises ValueError for an unknown partitioner."""
    assert partition_count > 0
    return key_hash(partitioner)(key) % partition_count
