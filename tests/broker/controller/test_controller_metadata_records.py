"""The metadata record codec: round trips, stable type codes, and distrust of every byte."""

from __future__ import annotations

import random
import re

import msgpack
import pytest
from controller_test_support import entries
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.controller import (
    ClusterIdRecord,
    ConfigRecord,
    ConfigResourceType,
    Listener,
    MetadataDecodeError,
    MetadataEncodeError,
    MetadataLimits,
    PartitionChangeRecord,
    PartitionRecord,
    RecordType,
    RegisterBrokerRecord,
    TopicRecord,
    decode_entry,
    encode_entry,
)

TOPIC_ID = b"\x01" * 16


def test_type_codes_never_change():
    # A log written today must decode forever: these numbers are part of the on-disk format.
    assert {member.name: member.value for member in RecordType} == {
        "CLUSTER_ID": 1,
        "REGISTER_BROKER": 2,
        "FENCE_BROKER": 3,
        "UNFENCE_BROKER": 4,
        "BROKER_SHUTDOWN": 5,
        "TOPIC": 6,
        "REMOVE_TOPIC": 7,
        "PARTITION": 8,
        "PARTITION_CHANGE": 9,
        "CONFIG": 10,
        "PRODUCER_IDS": 11,
        "BROKER_SNAPSHOT": 12,
        "BROKER_DECOMMISSION": 13,
    }


def test_a_record_is_a_compact_array_of_type_version_and_fields():
    data = encode_entry([TopicRecord(name="orders", topic_id=TOPIC_ID)])
    assert msgpack.unpackb(data) == [[6, 0, "orders", TOPIC_ID]]


@given(entries)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_every_record_round_trips(entry):
    data = encode_entry(entry)
    assert decode_entry(data) == entry
    assert encode_entry(decode_entry(data)) == data


def assert_decodes_or_refuses(data: bytes) -> None:
    """Decoding either refuses with MetadataDecodeError or gives records that re-encode into
    bytes that decode to the same records; any other exception fails the test."""
    try:
        decoded = decode_entry(data)
    except MetadataDecodeError:
        return
    again = encode_entry(decoded)
    assert decode_entry(again) == decoded
    assert encode_entry(decode_entry(again)) == again


@given(entries, st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_truncated_entries_are_refused(entry, data):
    encoded = encode_entry(entry)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(MetadataDecodeError):
        decode_entry(encoded[:cut])


@given(entries, st.data())
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_bit_flips_and_byte_changes_are_refused_or_decode_consistently(entry, data):
    encoded = bytearray(encode_entry(entry))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(encoded) - 1))
        if data.draw(st.booleans()):
            encoded[position] ^= 1 << data.draw(st.integers(0, 7))
        else:
            encoded[position] = data.draw(st.integers(0, 255))
    assert_decodes_or_refuses(bytes(encoded))


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_random_bytes_are_refused_or_decode_consistently(data):
    assert_decodes_or_refuses(data)


# Any msgpack value, so that well-formed msgpack of the wrong shape reaches the field checks.
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=30,
)


@given(msgpack_values)
@settings(max_examples=500)
def test_well_formed_msgpack_of_any_shape_is_refused_or_decodes_consistently(value):
    assert_decodes_or_refuses(msgpack.packb(value, use_bin_type=True))


@given(entries, st.data())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_changed_fields_are_refused_or_decode_consistently(entry, data):
    # Replace one field of one record with another msgpack value (type confusion, ranges).
    value = msgpack.unpackb(encode_entry(entry))
    record = data.draw(st.sampled_from(value))
    position = data.draw(st.integers(0, len(record) - 1))
    record[position] = data.draw(msgpack_values)
    assert_decodes_or_refuses(msgpack.packb(value, use_bin_type=True))


def test_seeded_mutation_fuzzing_of_a_realistic_entry():
    rng = random.Random(20261128)
    entry = [
        TopicRecord(name="orders", topic_id=TOPIC_ID),
        *(
            PartitionRecord(
                topic_id=TOPIC_ID,
                partition=number,
                replicas=(1, 2, 3),
                isr=(1, 2, 3),
                leader=1,
                leader_epoch=0,
                partition_epoch=0,
            )
            for number in range(8)
        ),
        ConfigRecord(
            resource_type=ConfigResourceType.TOPIC,
            resource_name="orders",
            name="retention.ms",
            value="3600000",
        ),
    ]
    encoded = encode_entry(entry)
    for _ in range(3000):
        mutated = bytearray(encoded)
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if rng.random() < 0.2:
            mutated = mutated[: rng.randrange(len(mutated))]
        assert_decodes_or_refuses(bytes(mutated))


def raw(*records) -> bytes:
    return msgpack.packb(list(records), use_bin_type=True)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed"),
        (raw(), "non-empty"),
        (msgpack.packb({"a": 1}), "malformed"),  # maps never appear in an entry
        (raw([99, 0, "x"]), "unknown metadata record type 99"),
        (raw([True, 0, "x"]), "unknown metadata record type"),
        (raw([1, 1, "x"]), "unknown version 1 of record CLUSTER_ID"),
        (raw([1, 0]), "has 0 fields, expected 1"),
        (raw([1, 0, "a", "b"]), "has 2 fields, expected 1"),
        (raw([1, 0, ""]), "cluster id must be a string"),
        (raw([6, 0, "bad name!", TOPIC_ID]), "topic name may contain only"),
        (raw([6, 0, "t", b"\x01" * 15]), "16-byte uuid"),
        (raw([6, 0, "t", bytes(16)]), "non-zero"),
        (raw([7, 0, "0123456789abcdef"]), "uuid"),  # a string is not bytes
        (raw([3, 0, -1, 5]), "broker id must be an integer in [0, 2147483647]"),
        (raw([3, 0, 2**31, 5]), "broker id"),
        (raw([3, 0, 1, -5]), "broker epoch"),
        (raw([3, 0, 1, 1.0]), "broker epoch"),
        (raw([3, 0, True, 1]), "broker id"),  # a boolean is not an integer here
        (raw([2, 0, 1, TOPIC_ID, [["a", "h", 1]], None, 1]), "fenced must be a boolean"),
        (raw([2, 0, 1, TOPIC_ID, [["a", "h", 0]], None, True]), "listener port"),
        (raw([2, 0, 1, TOPIC_ID, [["a", "h", 1], ["a", "g", 2]], None, True]), "unique"),
        (raw([2, 0, 1, TOPIC_ID, [["a", "h"]], None, True]), "[name, host, port]"),
        (raw([2, 0, 1, TOPIC_ID, [], "", True]), "rack"),
        (raw([8, 0, TOPIC_ID, 0, [1, 2], [3], 3, 0, 0]), "ISR must be within the replicas"),
        (raw([8, 0, TOPIC_ID, 0, [1, 2], [2], 1, 0, 0]), "leader must be in the ISR"),
        (raw([8, 0, TOPIC_ID, 0, [1, 1], [1], 1, 0, 0]), "duplicates"),
        (raw([8, 0, TOPIC_ID, 0, [], [], -1, 0, 0]), "replicas must be an array of 1"),
        (raw([8, 0, TOPIC_ID, 0, [1], [], -1, 0, 0]), "isr must be an array of 1"),
        (raw([8, 0, TOPIC_ID, 0, [1], [1], -2, 0, 0]), "leader"),
        (raw([8, 0, TOPIC_ID, 0, [1], [1], 1, -1, 0]), "leader epoch"),
        (raw([8, 0, TOPIC_ID, -1, [1], [1], 1, 0, 0]), "partition must be"),
        (raw([9, 0, TOPIC_ID, 0, 0, [2], 1, None]), "leader must be in the ISR"),
        (raw([9, 0, TOPIC_ID, 0, 0, [3], None, [1, 2]]), "ISR must be within"),
        (raw([8, 2, TOPIC_ID, 0, [1], [1], 1, 0, 0]), "unknown version 2 of record PARTITION"),
        (raw([8, 1, TOPIC_ID, 0, [1], [1], 1, 0, 0]), "has 7 fields, expected 9"),
        (raw([8, 0, TOPIC_ID, 0, [1], [1], 1, 0, 0, [], []]), "has 9 fields, expected 7"),
        (raw([8, 1, TOPIC_ID, 0, [1, 2], [1], 1, 0, 0, [3], []]), "adding replicas must be"),
        (raw([8, 1, TOPIC_ID, 0, [1, 2], [1], 1, 0, 0, [], [3]]), "removing replicas must be"),
        (raw([8, 1, TOPIC_ID, 0, [1, 2], [1], 1, 0, 0, [2], [2]]), "both adding and removing"),
        (raw([8, 1, TOPIC_ID, 0, [1, 2], [1], 1, 0, 0, [2, 2], []]), "duplicates"),
        (raw([9, 1, TOPIC_ID, 0, 0, None, None, None, None, None]), "changes a reassignment"),
        (raw([9, 1, TOPIC_ID, 0, 0, None, None, [1], [2], None]), "adding replicas must be"),
        (raw([9, 1, TOPIC_ID, 0, 0, None, None, None, [1], [1]]), "both adding and removing"),
        (raw([13, 0, 1, 1]), "decommissioned must be a boolean"),
        (raw([13, 0, -1, True]), "broker id"),
        (raw([10, 0, 3, "t", "a", "b"]), "unknown config resource type 3"),
        (raw([10, 0, 2, "..", "a", "b"]), "topic name cannot be"),
        (raw([10, 0, 4, "x1", "a", "b"]), "broker id or ''"),
        (raw([10, 0, 4, "01", "a", "b"]), "leading zeros"),
        (raw([10, 0, 4, "1", "", "b"]), "config name"),
        (raw([10, 0, 4, "1", "a", 5]), "config value"),
        (raw([11, 0, -1]), "next producer id"),
        (raw([1, 0, "c"]) + b"\x00", "malformed"),  # trailing bytes
        (raw([1, 0, "c"], 5), "a record must be an array"),
    ],
)
def test_defects_are_refused_with_a_reason(data, reason):
    with pytest.raises(MetadataDecodeError, match=re.escape(reason)):
        decode_entry(data)


def test_records_written_before_reassignments_still_decode():
    # Version 0 of PartitionRecord and PartitionChangeRecord, as every log and snapshot
    # written before reassignments holds them: read as "no reassignment" / "unchanged".
    old = raw(
        [8, 0, TOPIC_ID, 3, [1, 2], [2, 1], 2, 4, 7],
        [9, 0, TOPIC_ID, 3, 7, [2], None, None],
    )
    assert decode_entry(old) == [
        PartitionRecord(
            topic_id=TOPIC_ID,
            partition=3,
            replicas=(1, 2),
            isr=(2, 1),
            leader=2,
            leader_epoch=4,
            partition_epoch=7,
            adding_replicas=(),
            removing_replicas=(),
        ),
        PartitionChangeRecord(
            topic_id=TOPIC_ID,
            partition=3,
            expected_partition_epoch=7,
            isr=(2,),
            adding_replicas=None,
            removing_replicas=None,
        ),
    ]
    # ... and a partition without a reassignment is still written that way, byte for byte.
    assert encode_entry(decode_entry(old)) == old


def test_a_reassignment_is_written_at_version_1():
    moving = PartitionRecord(
        topic_id=TOPIC_ID,
        partition=0,
        replicas=(4, 1, 2),
        isr=(1, 2),
        leader=1,
        leader_epoch=0,
        partition_epoch=1,
        adding_replicas=(4,),
        removing_replicas=(2,),
    )
    change = PartitionChangeRecord(
        topic_id=TOPIC_ID, partition=0, expected_partition_epoch=1, adding_replicas=()
    )
    assert msgpack.unpackb(encode_entry([moving, change])) == [
        [8, 1, TOPIC_ID, 0, [4, 1, 2], [1, 2], 1, 0, 1, [4], [2]],
        [9, 1, TOPIC_ID, 0, 1, None, None, None, [], None],
    ]
    assert decode_entry(encode_entry([moving, change])) == [moving, change]


def test_sizes_are_checked_before_and_while_unpacking():
    limits = MetadataLimits(entry_bytes_max=100, records_per_entry_max=3, replicas_max=2)
    small = [ClusterIdRecord(cluster_id="c")]
    assert decode_entry(encode_entry(small, limits=limits), limits=limits) == small
    with pytest.raises(MetadataDecodeError, match="exceeds 100"):
        decode_entry(encode_entry([ClusterIdRecord(cluster_id="c" * 60)] * 2), limits=limits)
    with pytest.raises(MetadataDecodeError, match="more than 3"):
        decode_entry(encode_entry(small * 4), limits=limits)
    with pytest.raises(MetadataDecodeError, match="malformed"):  # msgpack's own array limit
        decode_entry(encode_entry(small * 17), limits=limits)
    three = PartitionRecord(
        topic_id=TOPIC_ID,
        partition=0,
        replicas=(1, 2, 3),
        isr=(1,),
        leader=1,
        leader_epoch=0,
        partition_epoch=0,
    )
    with pytest.raises(MetadataDecodeError, match="1 to 2 ids"):
        decode_entry(encode_entry([three]), limits=limits)
    short_strings = MetadataLimits(
        **{name: 10 for name in MetadataLimits.__dataclass_fields__ if name.endswith("chars_max")}
    )
    assert short_strings.string_bytes_max == 40
    long_string = msgpack.packb([[1, 0, "x" * 41]])
    with pytest.raises(MetadataDecodeError, match="malformed"):  # msgpack's own string limit
        decode_entry(long_string, limits=short_strings)


def test_a_huge_declared_length_is_refused_without_allocating_it():
    # An array header claiming 2**32-1 elements, and a bin header claiming 4 GiB.
    with pytest.raises(MetadataDecodeError):
        decode_entry(b"\xdd\xff\xff\xff\xff")
    with pytest.raises(MetadataDecodeError):
        decode_entry(b"\x91\x94\x07\x00\xc6\xff\xff\xff\xff")


def test_deep_nesting_is_refused():
    with pytest.raises(MetadataDecodeError):
        decode_entry(b"\x91" * 100_000)


@pytest.mark.parametrize(
    "record",
    [
        ClusterIdRecord(cluster_id=""),
        TopicRecord(name="no spaces", topic_id=TOPIC_ID),
        RegisterBrokerRecord(
            broker_id=-1, incarnation_id=TOPIC_ID, listeners=(Listener("a", "h", 1),), rack=None
        ),
        RegisterBrokerRecord(
            broker_id=1, incarnation_id=TOPIC_ID, listeners=(("a", "h", 1, 2),), rack=None
        ),
        PartitionChangeRecord(
            topic_id=TOPIC_ID, partition=0, expected_partition_epoch=0, isr=(1,), leader=2
        ),
        PartitionRecord(
            topic_id=TOPIC_ID,
            partition=0,
            replicas=(1,),
            isr=(1,),
            leader=1,
            leader_epoch=2**40,
            partition_epoch=0,
        ),
        ConfigRecord(
            resource_type=ConfigResourceType.TOPIC, resource_name="t", name="a", value=object()
        ),
    ],
)
def test_nothing_invalid_is_ever_encoded(record):
    with pytest.raises(MetadataEncodeError):
        encode_entry([record])


def test_an_empty_entry_is_not_encoded():
    with pytest.raises(MetadataEncodeError):
        encode_entry([])
