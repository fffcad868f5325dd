"""Kafka producers' batches stored verbatim in DWAL's partition logs: appended as a Kafka
client sends them (every codec, idempotent producer fields), read back byte for byte but for
the base offset and leader epoch the broker patches (outside the CRC), after a restart too,
copied by followers, served to Kafka clients (with DWAL batches transcoded), and compacted
like DWAL batches (protocol/kafka_records.py, protocol/kafka_transcode.py,
broker/storage/log_cleaner.py)."""

from __future__ import annotations

import dataclasses
import shutil
import struct
import tempfile
import types
from pathlib import Path

import cramjam
import crc32c
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storage_test_support import small_config

from broker.storage import (
    MemoryPartitionLog,
    OutOfOrderSequenceError,
    PartitionLog,
)
from protocol import (
    Compression,
    check_kafka_batches,
    decode_kafka_records,
    decode_records,
    encode_kafka_batch,
    to_kafka_batches,
)
from protocol.kafka_records import _write_varint
from protocol.record_batch import (
    ATTRIBUTE_MSGPACK_BODY,
    LOG_OVERHEAD_BYTES,
    build_batch,
    complete_prefix_bytes,
    parse_header,
    scan_batches,
)

kafka_default_records = pytest.importorskip("kafka.record.default_records")
kafka_codec = pytest.importorskip("kafka.codec")

CONFIG = small_config(segment_bytes=1024, index_interval_bytes=128)  # fsync=never
ALL_CODECS = list(Compression)
NOW_MS = 10**9
DELETE_RETENTION_MS = 1000
COMPACTED = dataclasses.replace(
    CONFIG,
    segment_bytes=1 << 20,
    segment_ms=1,  # segments roll only when a test calls `roll`
    cleanup_policy="compact",
    delete_retention_ms=DELETE_RETENTION_MS,
)


@pytest.fixture(autouse=True)
def kafka_snappy(monkeypatch):
    """kafka-python's snappy wants python-snappy; give it cramjam's raw snappy (it still does
    its own xerial framing), as tests/protocol/test_kafka_records.py does."""
    if not kafka_codec.has_snappy():
        shim = types.SimpleNamespace(
            compress=lambda data: bytes(cramjam.snappy.compress_raw(bytes(data))),
            decompress=lambda data: bytes(cramjam.snappy.decompress_raw(bytes(data))),
        )
        monkeypatch.setattr(kafka_codec, "snappy", shim)


def open_log(tmp_path: Path, config=CONFIG, name: str = "t-0") -> PartitionLog:
    return PartitionLog.open(tmp_path / name, config, now_ms=0)


def kafka_python_batch(records, codec, producer=(-1, -1, -1)) -> bytes:
    """A batch as kafka-python's producer builds it (offsets from 0, as every client)."""
    builder = kafka_default_records.DefaultRecordBatchBuilder(
        magic=2,
        compression_type=int(codec),
        is_transactional=False,
        producer_id=producer[0],
        producer_epoch=producer[1],
        base_sequence=producer[2],
        batch_size=2**30,
    )
    for offset, (ts, key, value, headers) in enumerate(records):
        assert builder.append(offset, ts, key, value, list(headers)) is not None
    return bytes(builder.build())


def records_of(number: int, count: int) -> list[tuple]:
    return [
        (
            1_000 + number * 10 + index,
            b"key-%d" % ((number + index) % 5),
            b"value-%d-%d" % (number, index) * 3,
            [("n", b"%d" % number), ("null", None)] if index % 2 else [],
        )
        for index in range(count)
    ]


def producer_batches() -> list[tuple[bytes, list[tuple]]]:
    """Kafka producers' batches: ours and kafka-python's, every codec, idempotent or not."""
    batches = []
    for number, codec in enumerate(ALL_CODECS * 2):
        records = records_of(number, 1 + number % 4)
        if number % 2:
            batch = encode_kafka_batch(records, compression=codec)
        else:
            batch = kafka_python_batch(records, codec)
        batches.append((batch, records))
    return batches


def read_stored(log) -> bytes:
    """Every whole batch from the log start to the high watermark, read slice by slice."""
    out = []
    offset = log.log_start_offset
    while offset < log.high_watermark:
        with log.read(offset, 1 << 20) as fetched:
            data = fetched.read_bytes()
        data = data[: complete_prefix_bytes(data)]
        if not data:
            break
        out.append(data)
        offset = list(scan_batches(data))[-1].header.next_offset
    return b"".join(out)


def without_patched_fields(batch: bytes) -> bytes:
    """The batch but its base offset (0..8) and partition leader epoch (12..16)."""
    return batch[8:12] + batch[16:]


def kafka_python_view(data: bytes) -> list[tuple]:
    out = []
    position = 0
    while position < len(data):
        (length,) = struct.unpack_from(">i", data, position + 8)
        batch = kafka_default_records.DefaultRecordBatch(
            data[position : position + LOG_OVERHEAD_BYTES + length]
        )
        assert batch.validate_crc()
        out += [
            (r.offset, r.timestamp, r.key, r.value, [tuple(h) for h in r.headers]) for r in batch
        ]
        position += LOG_OVERHEAD_BYTES + length
    return out


def expected_view(appended: list[tuple[int, list[tuple]]], *, null_as=None) -> list[tuple]:
    return [
        (
            base + index,
            ts,
            key,
            value,
            [(name, null_as if v is None else v) for name, v in headers],
        )
        for base, records in appended
        for index, (ts, key, value, headers) in enumerate(records)
    ]


def as_tuples(records) -> list[tuple]:
    return [(r.offset, r.timestamp, r.key, r.value, [tuple(h) for h in r.headers]) for r in records]


# -- appending and reading back ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["file", "memory"])
def test_kafka_batches_come_back_verbatim_but_offset_and_epoch(tmp_path, backend):
    log = open_log(tmp_path) if backend == "file" else MemoryPartitionLog("t-0", CONFIG)
    sent, appended = [], []
    for epoch, (batch, records) in enumerate(producer_batches()):
        assert check_kafka_batches(batch) == len(records)  # what the listener runs first
        info = log.append(bytearray(batch), now_ms=0, leader_epoch=epoch // 3)
        sent.append(batch)
        appended.append((info.base_offset, records))
        assert info.log_append_time == -1  # DWAL has no log-append-time topics (see report)
    stored = read_stored(log)
    batches = list(scan_batches(stored))  # lengths and CRCs hold after the patching
    assert len(batches) == len(sent)
    for index, (original, scanned) in enumerate(zip(sent, batches)):
        header = scanned.header
        copy = stored[scanned.position : scanned.position + header.size_bytes]
        assert without_patched_fields(copy) == without_patched_fields(original)
        assert header.base_offset == appended[index][0]
        assert header.partition_leader_epoch == index // 3
        assert header.crc == parse_header(original).crc
        assert header.max_timestamp == parse_header(original).max_timestamp
    assert kafka_python_view(stored) == expected_view(appended)
    assert as_tuples(decode_records(stored)) == expected_view(appended, null_as=b"")
    assert as_tuples(decode_kafka_records(stored)) == expected_view(appended)
    assert to_kafka_batches(stored) == stored  # Kafka batches go out as they are stored
    if backend == "file":
        log.close()


def test_kafka_batches_survive_a_restart_and_a_crash(tmp_path):
    log = open_log(tmp_path)
    for batch, _ in producer_batches():
        log.append(bytearray(batch), now_ms=0)
    stored = read_stored(log)
    assert log.segment_count > 1
    crashed = tmp_path / "crashed" / "t-0"
    shutil.copytree(log.directory, crashed)  # no clean-shutdown marker: recovery scans
    log.close()
    for directory in (tmp_path / "t-0", crashed):
        reopened = PartitionLog.open(directory, CONFIG, now_ms=0)
        assert read_stored(reopened) == stored
        reopened.close()


def test_followers_copy_kafka_batches_byte_for_byte(tmp_path):
    leader = open_log(tmp_path, name="leader-0")
    for batch, _ in producer_batches():
        leader.append(bytearray(batch), now_ms=0, leader_epoch=4)
    stored = read_stored(leader)
    follower = open_log(tmp_path, name="follower-0")
    follower.append_as_follower(stored, now_ms=0)
    assert read_stored(follower) == stored
    leader.close()
    follower.close()


@pytest.mark.parametrize("codec", ALL_CODECS, ids=lambda c: c.name)
def test_idempotent_kafka_producers_are_judged_by_their_headers(tmp_path, codec):
    log = open_log(tmp_path)
    first = kafka_python_batch(records_of(1, 3), codec, producer=(9, 0, 0))
    second = encode_kafka_batch(records_of(2, 2), compression=codec, producer_id=9,
                                producer_epoch=0, base_sequence=3)  # fmt: skip
    info = log.append(bytearray(first), now_ms=0)
    log.append(bytearray(second), now_ms=0)
    retry = log.append(bytearray(first), now_ms=0)  # the producer's retry of `first`
    assert (retry.base_offset, retry.last_offset) == (info.base_offset, info.last_offset)
    assert log.log_end_offset == 5
    gap = encode_kafka_batch(records_of(3, 1), compression=codec, producer_id=9,
                             producer_epoch=0, base_sequence=7)  # fmt: skip
    with pytest.raises(OutOfOrderSequenceError):
        log.append(bytearray(gap), now_ms=0)
    headers = [batch.header for batch in scan_batches(read_stored(log))]
    assert [(h.producer_id, h.producer_epoch, h.base_sequence) for h in headers] == [
        (9, 0, 0),
        (9, 0, 3),
    ]
    log.close()


def test_mixed_logs_serve_kafka_clients_and_dwal_readers(tmp_path):
    log = open_log(tmp_path)
    appended = []
    for number in range(12):
        records = records_of(number, 1 + number % 3)
        if number % 2:
            batch = kafka_python_batch(records, ALL_CODECS[number % 5])
        else:
            dwal = [
                (ts, key, value, [(k, v or b"") for k, v in hs]) for ts, key, value, hs in records
            ]
            records = dwal
            batch = build_batch(dwal, compression=Compression.ZSTD)
        appended.append((log.append(bytearray(batch), now_ms=0).base_offset, records))
    stored = read_stored(log)
    served = to_kafka_batches(stored)
    assert all(not b.header.attributes & ATTRIBUTE_MSGPACK_BODY for b in scan_batches(served))
    assert kafka_python_view(served) == expected_view(appended)
    assert as_tuples(decode_records(stored)) == expected_view(appended, null_as=b"")
    log.close()


# -- compaction ------------------------------------------------------------------------------


def roll(log: PartitionLog) -> None:
    assert log.roll_if_due(now_ms=10**12)


async def test_compaction_treats_kafka_and_dwal_records_alike(tmp_path):
    """Keys written by Kafka and DWAL producers supersede each other; the survivors keep
    their offsets, timestamps, headers (a null header value stays null) and batch format;
    tombstones expire after delete.retention.ms; Kafka clients read the compacted log."""
    log = open_log(tmp_path, COMPACTED)
    written = []  # (offset, timestamp, key, value, headers, batch max timestamp, kafka?)
    for number in range(40):
        codec = ALL_CODECS[number % 5]
        kafka = number % 3 != 0
        records = []
        for index in range(1 + number % 4):
            key = None if (number + index) % 9 == 4 else b"key-%d" % ((number * 3 + index) % 7)
            value = None if (number + index) % 6 == 5 else b"value-%d-%d" % (number, index)
            headers = [("n", b"%d" % number), ("null", None)] if kafka and index % 2 else []
            records.append((1_000 + number * 10 + index, key, value, headers))
        if number == 39:  # young tombstones: they stay
            records = [(NOW_MS, b"key-1", None, [])]
        if kafka:
            batch = kafka_python_batch(records, codec) if number % 2 else (
                encode_kafka_batch(records, compression=codec))  # fmt: skip
        else:
            batch = build_batch(records, compression=codec if codec != 2 else Compression.LZ4)
        info = log.append(bytearray(batch), now_ms=0)
        batch_max = max(r[0] for r in records)
        for index, (ts, key, value, headers) in enumerate(records):
            written.append((info.base_offset + index, ts, key, value, headers, batch_max, kafka))
        if number % 8 == 7:
            roll(log)
    cleaned_end = max(int(path.stem) for path in log.directory.glob("*.log"))
    before = read_stored(log)

    result = await log.compact(NOW_MS)

    latest = {w[2]: w[0] for w in written if w[2] is not None}
    survivors = [
        w
        for w in written
        if w[0] >= cleaned_end
        or w[2] is None
        or (latest[w[2]] == w[0] and (w[3] is not None or w[5] >= NOW_MS - DELETE_RETENTION_MS))
    ]
    assert result.records_removed == len(written) - len(survivors) > 0
    stored = read_stored(log)
    assert len(stored) < len(before)
    assert as_tuples(decode_kafka_records_or_dwal(stored)) == [
        (w[0], w[1], w[2], w[3], [tuple(h) for h in w[4]]) for w in survivors
    ]
    kafka_offsets = {w[0] for w in written if w[6]}
    for scanned in scan_batches(stored):  # every batch keeps its format; offsets are dense
        header = scanned.header
        is_kafka = not header.attributes & ATTRIBUTE_MSGPACK_BODY
        assert all((o in kafka_offsets) == is_kafka for o in range(header.base_offset,
                                                                   header.next_offset))  # fmt: skip
    served = to_kafka_batches(stored)
    assert [r[:4] for r in kafka_python_view(served)] == [w[:4] for w in survivors]
    log.close()
    reopened = open_log(tmp_path, COMPACTED)  # the compacted segments pass recovery's checks
    assert read_stored(reopened) == stored
    reopened.close()


def decode_kafka_records_or_dwal(data: bytes):
    """Every record, Kafka batches by decode_kafka_records (null header values kept)."""
    out = []
    for scanned in scan_batches(data):
        batch = data[scanned.position : scanned.position + scanned.header.size_bytes]
        if scanned.header.attributes & ATTRIBUTE_MSGPACK_BODY:
            out += decode_records(batch)
        else:
            out += decode_kafka_records(batch)
    return out


async def test_kafka_batches_split_into_runs_keep_producer_sequences(tmp_path):
    log = open_log(tmp_path, COMPACTED)
    # offset 0: a large record superseded later, so that the copy may grow past it
    log.append(bytearray(encode_kafka_batch([(900, b"big", b"x" * 500, [])])), now_ms=0)
    records = [(1_000 + i, b"k0" if i % 3 == 0 else b"u%d" % i, b"v%d" % i, []) for i in range(6)]
    batch = encode_kafka_batch(records, compression=Compression.SNAPPY, producer_id=5,
                               producer_epoch=1, base_sequence=10)  # fmt: skip
    log.append(bytearray(batch), now_ms=0)  # offsets 1..6, k0 at 1 and 4
    log.append(bytearray(encode_kafka_batch([(2_000, b"k0", b"new", [])])), now_ms=0)
    # a later batch of producer 5, so that the first one is not its last (never rewritten)
    log.append(
        bytearray(
            encode_kafka_batch(
                [(2_001, b"big", b"z", [])], producer_id=5, producer_epoch=1, base_sequence=16
            )
        ),  # fmt: skip
        now_ms=0,
    )
    roll(log)
    await log.compact(NOW_MS)
    headers = [b.header for b in scan_batches(read_stored(log))]
    assert [(h.base_offset, h.record_count, h.base_sequence) for h in headers[:2]] == [
        (2, 2, 11),
        (5, 2, 14),
    ]
    assert all(h.compression == Compression.SNAPPY and h.producer_id == 5 for h in headers[:2])
    assert [r.offset for r in decode_kafka_records(read_stored(log))] == [2, 3, 5, 6, 7, 8]
    log.close()


async def test_kafka_records_off_their_place_are_copied_as_they_are(tmp_path):
    """A Kafka batch whose offset deltas are not 0..n-1 (a producer's check refuses it, but a
    follower copies what its leader holds) cannot be split into runs: it stays whole."""

    def record(offset_delta: int, key: bytes) -> bytes:
        fields = bytearray(b"\x00\x00")  # attributes, timestamp delta 0
        _write_varint(fields, offset_delta)
        _write_varint(fields, len(key))
        fields += key + b"\x02v\x00"  # value b"v", no headers
        out = bytearray()
        _write_varint(out, len(fields))
        return bytes(out + fields)

    honest = encode_kafka_batch([(1_000, b"a", b"v", []), (1_000, b"b", b"v", [])])
    body = record(1, b"a") + record(0, b"b")
    forged = bytearray(honest[:61] + body)
    struct.pack_into(">i", forged, 8, len(forged) - LOG_OVERHEAD_BYTES)
    struct.pack_into(">I", forged, 17, crc32c.crc32c(bytes(forged[21:])))
    log = open_log(tmp_path, COMPACTED)
    log.append(bytearray(encode_kafka_batch([(900, b"a", b"x" * 500, [])])), now_ms=0)
    log.append(bytearray(forged), now_ms=0)  # offsets 1..2, its records say 2 then 1
    log.append(bytearray(encode_kafka_batch([(2_000, b"a", b"new", [])])), now_ms=0)
    roll(log)
    result = await log.compact(NOW_MS)
    assert result.records_removed == 1  # only offset 0
    stored = read_stored(log)
    assert without_patched_fields(stored[: len(forged)]) == without_patched_fields(bytes(forged))
    log.close()


# -- compaction, as a property ---------------------------------------------------------------

keys = st.none() | st.sampled_from([b"a", b"b", b"c", b"d"])
values = st.none() | st.binary(min_size=0, max_size=30)
kafka_header_lists = st.lists(
    st.tuples(st.sampled_from(["h", "trace"]), st.none() | st.binary(max_size=5)), max_size=2
)
batch_plans = st.lists(
    st.tuples(
        st.booleans(),  # Kafka-encoded?
        st.sampled_from(ALL_CODECS),
        st.lists(st.tuples(keys, values, kafka_header_lists), min_size=1, max_size=5),
        st.booleans(),  # roll after it?
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch_plans, st.integers(min_value=0, max_value=2_000))
def test_compacting_mixed_logs_keeps_the_last_value_of_every_key(plans, now_offset_ms):
    """Any mix of DWAL and Kafka batches, every codec: after compaction each key's last
    record (and every keyless one) is where it was, superseded records and old tombstones
    below the active segment are gone, and DWAL readers and kafka-python read the same."""
    now_ms = 1_000 + now_offset_ms
    with tempfile.TemporaryDirectory() as directory:
        log = PartitionLog.open(Path(directory) / "t-0", COMPACTED, now_ms=0)
        written = []  # (offset, timestamp, key, value, headers, batch max timestamp)
        for number, (kafka, codec, entries, rolls) in enumerate(plans):
            records = [
                (number * 10 + index, key, value, headers if kafka else [])
                for index, (key, value, headers) in enumerate(entries)
            ]
            if kafka:
                batch = encode_kafka_batch(records, compression=codec)
            else:
                dwal_codec = Compression.LZ4 if codec == Compression.SNAPPY else codec
                batch = build_batch(records, compression=dwal_codec)
            info = log.append(bytearray(batch), now_ms=0)
            for index, (ts, key, value, headers) in enumerate(records):
                written.append((info.base_offset + index, ts, key, value, headers, records[-1][0]))
            if rolls:
                roll(log)
        cleaned_end = max(int(path.stem) for path in log.directory.glob("*.log"))
        result = trio.run(log.compact, now_ms)
        latest = {w[2]: w[0] for w in written if w[2] is not None}
        required = [
            w[0]
            for w in written
            if w[0] >= cleaned_end
            or w[2] is None
            or (latest[w[2]] == w[0] and (w[3] is not None or w[5] >= now_ms - 1000))
        ]
        stored = read_stored(log)
        remaining = as_tuples(decode_kafka_records_or_dwal(stored))
        by_offset = {w[0]: (w[0], w[1], w[2], w[3], [tuple(h) for h in w[4]]) for w in written}
        # what remains is written records, unchanged, in order; a batch whose rewrite would
        # grow the copy stays whole, so superseded records may remain (never required ones)
        assert remaining == [by_offset[r[0]] for r in remaining]
        assert [r[0] for r in remaining] == sorted({r[0] for r in remaining})
        assert set(required) <= {r[0] for r in remaining}
        assert result.records_removed == len(written) - len(remaining)
        served = to_kafka_batches(stored)
        assert [r[:4] for r in kafka_python_view(served)] == [r[:4] for r in remaining]
        log.close()
