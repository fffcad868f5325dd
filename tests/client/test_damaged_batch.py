"""A bit flipped inside a cleanly closed segment (which recovery never rescans): consumers
deliver every record before the damaged batch and stop with an error naming topic, partition
and offsets; --skip-corrupt goes past it and says so; `dwal verify` finds it; the records
after it are still served. Real broker processes, stopped cleanly before the damage."""

from __future__ import annotations

import struct

import pytest
import trio
from dwal_process import running_dwal

import client
from client import Admin, Consumer, CorruptRecordError, GroupAdmin, Producer, TopicPartition
from client.batch_damage import decode_until_damage
from protocol import encode_batch

RECORDS = 300
BATCH_RECORDS = 10


async def write_topic(bootstrap: str) -> None:
    async with client.connect(bootstrap) as cluster:
        await Admin(cluster).create_topic("dmg", configs={"segment.bytes": "4096"})
        async with Producer(cluster, linger_ms=1000) as producer:
            for i in range(RECORDS):
                await producer.send("dmg", b"value-%d" % i)
                if i % BATCH_RECORDS == BATCH_RECORDS - 1:
                    await producer.flush()  # one batch per BATCH_RECORDS records


def damage_a_closed_segment(partition_dir) -> tuple[int, int]:
    """Flip one bit in the body of the middle batch of the first segment (closed: a later
    one exists). Returns the damaged batch's first and last offsets."""
    segments = sorted(partition_dir.glob("*.log"))
    assert len(segments) >= 2, segments
    path = segments[0]
    data = bytearray(path.read_bytes())
    batches = []
    position = 0
    while position + 12 <= len(data):
        base_offset, length = struct.unpack_from(">qi", data, position)
        (record_count,) = struct.unpack_from(">i", data, position + 57)
        batches.append((position, base_offset, base_offset + record_count - 1))
        position += 12 + length
    position, first, last = batches[len(batches) // 2]
    data[position + 61 + 4] ^= 0x10  # inside the (msgpack) body, which the CRC covers
    path.write_bytes(bytes(data))
    return first, last


@pytest.fixture
async def damaged(broker_launcher, tmp_path):
    """A restarted broker whose topic `dmg` has one damaged batch; yields (broker, first,
    last)."""
    data = tmp_path / "data"
    broker = await broker_launcher.start(data)
    await write_topic(broker.bootstrap)
    assert await broker_launcher.stop(broker) == 0  # clean: the segments are closed as they are
    first, last = damage_a_closed_segment(data / "dmg-0")
    assert 0 < first <= last < RECORDS - 1
    restarted = await broker_launcher.start(data)
    return restarted, first, last


def values(offsets) -> list[bytes]:
    return [b"value-%d" % i for i in offsets]


async def test_cli_prints_records_before_the_damage_then_names_it(damaged):
    broker, first, last = damaged
    async with running_dwal("consume", "dmg", "-e", "--bootstrap", broker.bootstrap) as dwal:
        assert await dwal.wait_exit() == 1
    assert dwal.stdout_lines == values(range(first))
    stderr = dwal.stderr_text
    assert "Traceback" not in stderr
    assert f"dmg-0 at offsets {first}..{last}" in stderr and "(CORRUPT_MESSAGE)" in stderr
    assert "--skip-corrupt" in stderr


async def test_cli_skips_the_damage_when_asked_and_reports_it(damaged):
    broker, first, last = damaged
    async with running_dwal(
        "consume", "dmg", "-e", "--skip-corrupt", "--bootstrap", broker.bootstrap
    ) as dwal:
        assert await dwal.wait_exit() == 0
    kept = [i for i in range(RECORDS) if not first <= i <= last]
    assert dwal.stdout_lines == values(kept)  # nothing after the damage was dropped
    assert f"warning: skipped damaged record batch in dmg-0 at offsets {first}..{last}" in (
        dwal.stderr_text
    )


async def test_group_member_commits_what_it_printed_before_the_damage(damaged):
    broker, first, _ = damaged
    async with running_dwal(
        "consume", "dmg", "-e", "--group", "gd", "--bootstrap", broker.bootstrap
    ) as dwal:
        assert await dwal.wait_exit() == 1
    assert dwal.stdout_lines == values(range(first))
    async with client.connect(broker.bootstrap) as cluster:
        committed = await GroupAdmin(cluster).committed_offsets("gd")
    assert committed == {TopicPartition("dmg", 0): first}


async def test_verify_reports_the_damaged_batch(damaged):
    broker, first, last = damaged
    async with running_dwal("verify", "dmg", "--bootstrap", broker.bootstrap) as dwal:
        assert await dwal.wait_exit() == 1
    out = bytes(dwal.stdout).decode()
    assert f"damaged: dmg-0 offsets {first}..{last}: it fails its CRC check" in out
    assert "damaged (1)" in out and f"{RECORDS}" in out
    assert "(CORRUPT_MESSAGE)" in dwal.stderr_text and "Traceback" not in dwal.stderr_text


async def test_library_returns_records_before_then_raises_until_sought_past(damaged):
    broker, first, last = damaged
    tp = TopicPartition("dmg", 0)
    async with client.connect(broker.bootstrap) as cluster:
        consumer = Consumer(cluster, auto_offset_reset="earliest", partition_max_bytes=100_000)
        consumer.assign([tp])
        seen: list[bytes] = []
        with trio.fail_after(30):
            with pytest.raises(CorruptRecordError) as info:
                while True:
                    for records in (await consumer.poll(timeout_ms=100)).values():
                        seen.extend(r.value for r in records)
        assert seen == values(range(first))
        error = info.value
        assert (error.topic, error.partition, error.offset, error.last_offset) == (
            "dmg",
            0,
            first,
            last,
        )
        assert not error.retriable and consumer.position(tp) == first
        with pytest.raises(CorruptRecordError):  # again, until the application moves on
            await consumer.poll(timeout_ms=100)
        consumer.seek(tp, last + 1)
        with trio.fail_after(30):
            while consumer.position(tp) != RECORDS:
                for records in (await consumer.poll(timeout_ms=100)).values():
                    seen.extend(r.value for r in records)
        assert seen == values(i for i in range(RECORDS) if not first <= i <= last)
        skipping = Consumer(cluster, auto_offset_reset="earliest", skip_corrupt=True)
        skipping.assign([tp])
        kept: list[bytes] = []
        with trio.fail_after(30):
            while skipping.position(tp) != RECORDS:
                for records in (await skipping.poll(timeout_ms=100)).values():
                    kept.extend(r.value for r in records)
        assert kept == seen
        [skipped] = skipping.take_skipped()
        assert (skipped.offset, skipped.last_offset) == (first, last)
        assert skipping.take_skipped() == []


def test_decode_until_damage_keeps_whole_batches_before_the_damage():
    batches = [
        bytearray(encode_batch([[0, None, b"a-%d" % i, []]], base_timestamp=0, base_offset=i))
        for i in range(3)
    ]
    intact = b"".join(batches)
    batches[1][-1] ^= 0x01
    chunk = memoryview(b"".join(batches) + bytes(batches[2][:30]))  # and a cut tail
    records, error = decode_until_damage(TopicPartition("t", 3), chunk, 0)
    assert [r.value for r in records] == [b"a-0"]
    assert error is not None and (error.offset, error.last_offset) == (1, 1)
    assert "t-3" in error.message and "CRC" in error.message
    records, error = decode_until_damage(TopicPartition("t", 3), memoryview(intact), 0)
    assert error is None and [r.offset for r in records] == [0, 1, 2]
