"""Snapshot bytes: chunks bounded like entries; an image survives the trip; defects refused."""

from __future__ import annotations

import random

import pytest
from controller_test_support import ImageLog

from broker.controller import MetadataDecodeError, MetadataLimits, fence_broker
from broker.controller.metadata_snapshot import decode_snapshot, encode_snapshot


def busy_image():
    log = ImageLog()
    log.add_brokers(1, 2, 3, 4, racks={1: "a", 2: "a", 3: "b", 4: "b"})
    for number in range(1, 30):
        log.add_topic(f"topic-{number}", partitions=number % 7 + 1, replication_factor=3)
    log.commit(fence_broker(log.image, 2, log.epoch(2)))
    return log.image


def test_a_snapshot_rebuilds_the_image():
    image = busy_image()
    data = encode_snapshot(image)
    assert decode_snapshot(data, index=image.last_applied_index) == image


def test_records_beyond_one_entry_are_cut_into_chunks_each_within_the_limits():
    image = busy_image()
    limits = MetadataLimits(entry_bytes_max=600, records_per_entry_max=10)
    data = encode_snapshot(image, limits=limits)
    assert decode_snapshot(data, index=image.last_applied_index, limits=limits) == image
    # Chunks cut for larger limits are refused under smaller ones: never lower the limits.
    with pytest.raises(MetadataDecodeError):
        decode_snapshot(encode_snapshot(image), index=1, limits=limits)


def test_an_empty_image_has_a_snapshot_too():
    image = ImageLog().image
    assert decode_snapshot(encode_snapshot(image), index=1).topics == {}


@pytest.mark.parametrize(
    "data",
    [b"", b"DWM", b"DWMS\x01", b"XXXX\x00", b"DWMS\x00\x00\x00", b"DWMS\x00\x00\x00\x00\x09ab"],
)
def test_malformed_snapshots_are_refused(data):
    with pytest.raises(MetadataDecodeError):
        decode_snapshot(data, index=1)


def test_mutated_snapshots_are_refused_or_decode():
    rng = random.Random(7)
    data = encode_snapshot(busy_image())
    for _ in range(500):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if rng.random() < 0.3:
            mutated = mutated[: rng.randrange(len(mutated))]
        try:
            decode_snapshot(bytes(mutated), index=1)
        except MetadataDecodeError:
            pass
