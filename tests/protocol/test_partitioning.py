"""Key partitioning: Kafka's murmur2, bit for bit, so that a key lands in the same partition
whichever client produced it; CRC-32 kept for existing data."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import partitioning
from protocol.partitioning import (
    KEY_HASHES,
    key_hash,
    murmur2,
    partition_for_key,
    positive_murmur2,
)

# Kafka's own vectors (clients/.../common/utils/UtilsTest.java, testMurmur2), as the Java
# client's signed ints.
JAVA_UTILS_TEST = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}

# Computed with kafka-python 3.0.12's `kafka.partitioner.default.murmur2` (unsigned), with
# the partition its DefaultPartitioner gives among 1000 (the first four are also in
# kafka-python's own test of Java compatibility). Every key length modulo 4 is covered.
KAFKA_PYTHON = {
    b"": (275646681, 681),
    b"a": (2731586172, 524),
    b"ab": (316155434, 434),
    b"abc": (479470107, 107),
    b"abcd": (2971317748, 100),
    b"user-42": (1459644460, 460),
    b"customer-7": (3011136759, 111),
    b"\x00\xff\x80\x7f": (578742699, 699),
    b"\r\xcf{ \x11\xef\xd1\xc3\xa8\xffz\x95e": (1871896669, 669),
}


def java_murmur2(data: bytes) -> int:
    """Kafka's Utils.murmur2 transliterated line by line (32-bit ints, `>>>` as an unsigned
    shift), returning the signed int Java returns: the reference for the property below."""

    def int32(value: int) -> int:
        value &= 0xFFFFFFFF
        return value - (1 << 32) if value & 0x80000000 else value

    def unsigned_shift(value: int, bits: int) -> int:
        return (value & 0xFFFFFFFF) >> bits

    length = len(data)
    seed = int32(0x9747B28C)
    m = 0x5BD1E995
    r = 24
    h = int32(seed ^ length)
    for i in range(length // 4):
        i4 = i * 4
        k = data[i4] + (data[i4 + 1] << 8) + (data[i4 + 2] << 16) + (data[i4 + 3] << 24)
        k = int32(k)
        k = int32(k * m)
        k = int32(k ^ unsigned_shift(k, r))
        k = int32(k * m)
        h = int32(h * m)
        h = int32(h ^ k)
    rest = length % 4
    if rest == 3:
        h = int32(h ^ (data[(length & ~3) + 2] << 16))
    if rest >= 2:
        h = int32(h ^ (data[(length & ~3) + 1] << 8))
    if rest >= 1:
        h = int32(h ^ data[length & ~3])
        h = int32(h * m)
    h = int32(h ^ unsigned_shift(h, 13))
    h = int32(h * m)
    return int32(h ^ unsigned_shift(h, 15))


@pytest.mark.parametrize("key", list(JAVA_UTILS_TEST))
def test_murmur2_gives_the_java_clients_hash(key):
    assert murmur2(key) == JAVA_UTILS_TEST[key] & 0xFFFFFFFF
    assert java_murmur2(key) == JAVA_UTILS_TEST[key]


@pytest.mark.parametrize("key", list(KAFKA_PYTHON))
def test_murmur2_and_the_default_partition_agree_with_kafka_python(key):
    hashed, partition_of_1000 = KAFKA_PYTHON[key]
    assert murmur2(key) == hashed
    assert partition_for_key(key, 1000) == partition_of_1000


def test_the_partition_is_the_positive_hash_modulo_the_count():
    # toPositive(-790332482) is 1357151166 (the sign bit cleared, not the absolute value)
    assert positive_murmur2(b"foobar") == 1357151166
    assert partition_for_key(b"foobar", 10) == 6
    assert partition_for_key(b"21", 6) == (-973932308 & 0x7FFFFFFF) % 6 == 0


def test_crc32_stays_available_by_name():
    assert partition_for_key(b"alpha", 7, "crc32") == zlib.crc32(b"alpha") % 7
    assert key_hash("crc32") is zlib.crc32
    assert key_hash("murmur2_random") is key_hash("murmur2") is positive_murmur2
    with pytest.raises(ValueError, match="'murmur2', 'murmur2_random', 'crc32'"):
        key_hash("fnv1a")


@given(st.binary(max_size=300))
def test_murmur2_matches_the_java_transliteration(key):
    assert murmur2(key) == java_murmur2(key) & 0xFFFFFFFF


@given(st.binary(max_size=100), st.integers(min_value=1, max_value=10_000))
def test_every_key_has_one_partition_in_range(key, partition_count):
    for partitioner in KEY_HASHES:
        partition = partition_for_key(key, partition_count, partitioner)
        assert 0 <= partition < partition_count
        assert partition_for_key(bytes(key), partition_count, partitioner) == partition
    assert 0 <= positive_murmur2(key) < 2**31
    assert 0 <= murmur2(key) < 2**32


def test_keys_spread_over_the_partitions():
    counts = [0] * 8
    for number in range(8000):
        counts[partition_for_key(b"key-%d" % number, 8)] += 1
    assert min(counts) > 800, counts  # about 1000 each


@given(st.binary(max_size=300))
def test_the_c_and_python_hashes_agree(key):
    assert partitioning._murmurhash2_c is not None, "murmurhash2 (a dependency) is missing"
    expected = java_murmur2(key) & 0x7FFFFFFF
    assert partitioning._positive_murmur2_c(key) == expected
    assert partitioning._positive_murmur2_python(key) == expected


def test_the_default_hash_is_the_c_one_and_matches_kafkas_vectors():
    assert positive_murmur2 is partitioning._positive_murmur2_c
    for key, java in JAVA_UTILS_TEST.items():
        assert positive_murmur2(key) == java & 0x7FFFFFFF
