"""Helpers shared by the storage tests: batches to append, a reader of a whole log, and a
byte flipper to damage a file."""

from __future__ import annotations

from pathlib import Path

from broker.storage import LogConfig, PartitionLog, ReplicaLog
from broker.storage.leader_epoch_cache import EpochEntry, LeaderEpochCache
from protocol.record_batch import (
    BatchHeader,
    build_batch,
    complete_prefix_bytes,
    encode_batch,
    parse_header,
    scan_batches,
)


def make_batch(
    number: int, *, records: int = 2, timestamp_ms: int = 1_000, value_bytes: int = 10
) -> bytearray:
    """A batch of `records` records whose values identify `number`."""
    values = [(b"%d-%d:" % (number, index)).ljust(value_bytes, b".") for index in range(records)]
    return bytearray(build_batch([(timestamp_ms, b"key-%d" % number, value) for value in values]))


def make_idempotent_batch(
    producer_id: int,
    epoch: int,
    sequence: int,
    *,
    records: int = 1,
    timestamp_ms: int = 1_000,
    key: bytes | None = None,
) -> bytearray:
    """A batch of an idempotent producer: `records` records from sequence `sequence`."""
    return bytearray(
        encode_batch(
            [[0, key, b"%d-%d-%d" % (producer_id, sequence, n), []] for n in range(records)],
            base_timestamp=timestamp_ms,
            producer_id=producer_id,
            producer_epoch=epoch,
            base_sequence=sequence,
        )
    )


def small_config(**overrides: object) -> LogConfig:
    """A config with tiny segments and a dense index, fsync=never unless overridden."""
    settings: dict[str, object] = dict(
        segment_bytes=1024, index_interval_bytes=128, fsync="never", file_delete_delay_ms=0
    )
    settings.update(overrides)
    return LogConfig(**settings)  # type: ignore[arg-type]


def read_batches(log: PartitionLog, *, dense: bool = True) -> list[tuple[BatchHeader, bytes]]:
    """Every batch below the high watermark, read back through `PartitionLog.read`; unless
    `dense` is False (a compacted log), offsets must follow each other without gaps."""
    batches = []
    offset = log.log_start_offset
    while offset < log.high_watermark:
        with log.read(offset, 1 << 20) as fetched:
            data = fetched.read_bytes()
        data = data[: complete_prefix_bytes(data)]
        if not data and not dense:
            break  # compaction removed everything up to the high watermark
        assert data, f"no whole batch returned at offset {offset}"
        for batch in scan_batches(data):
            header = batch.header
            assert header.base_offset == offset if dense else header.base_offset >= offset
            batches.append((header, data[batch.position : batch.position + header.size_bytes]))
            offset = header.next_offset
    return batches


def append_batches(log: PartitionLog, count: int, *, now_ms: int = 0) -> list[bytes]:
    """Append `count` batches of 1 to 4 records; return their bytes as written."""
    written = []
    for number in range(count):
        batch = make_batch(number, records=1 + number % 4, timestamp_ms=1_000 + number)
        log.append(batch, now_ms=now_ms)
        written.append(bytes(batch))
    return written


def flip_byte(path: Path, position: int, mask: int = 0xFF) -> None:
    """XOR the byte at `position` of the file at `path` with `mask`, in place."""
    with open(path, "r+b") as file:
        file.seek(position)
        value = file.read(1)[0]
        file.seek(position)
        file.write(bytes([value ^ mask]))


def read_all(log: ReplicaLog, offset: int | None = None, *, up_to: str = "log_end") -> list[bytes]:
    """Every whole batch from `offset` (by default the log start) to the limit, read slice
    by slice."""
    batches: list[bytes] = []
    if offset is None:
        offset = log.log_start_offset
    while True:
        with log.read(offset, 1 << 20, up_to=up_to) as fetched:
            data = fetched.read_bytes()
        data = data[: complete_prefix_bytes(data)]
        if not data:
            return batches
        for batch in scan_batches(data):
            batches.append(data[batch.position : batch.position + batch.header.size_bytes])
            offset = batch.header.next_offset


def epochs_of(batches: list[bytes]) -> tuple[EpochEntry, ...]:
    cache = LeaderEpochCache()
    for batch in batches:
        header = parse_header(batch)
        cache.assign(header.partition_leader_epoch, header.base_offset)
    return cache.entries()
