"""Reading the one batch that holds an offset (issue 3): the segment by bisection, the scan
start from the offset index, then batch headers only, then that batch, CRC-checked, in a
worker thread."""

import dataclasses
import errno
import os
import threading
from pathlib import Path

import pytest
from storage_test_support import (
    append_batches,
    flip_byte,
    make_batch,
    read_batches,
    small_config,
)

from broker.storage import CorruptRecordError, OffsetOutOfRangeError, PartitionLog
from broker.storage import batch_scanner
from protocol.record_batch import HEADER_BYTES, build_batch, decode_records

CONFIG = small_config(segment_bytes=4096, index_interval_bytes=512)


def open_log(directory: Path, config=CONFIG) -> PartitionLog:
    return PartitionLog.open(directory / "t-0", config, now_ms=0)


def build_log(directory: Path, config=CONFIG) -> tuple[PartitionLog, list]:
    """A log of several segments with batches of 1 to 4 records (some large)."""
    log = open_log(directory, config)
    for number in range(150):
        size = 300 if number % 17 == 0 else 10
        log.append(make_batch(number, records=1 + number % 4, value_bytes=size), now_ms=0)
    assert log.segment_count >= 4
    return log, read_batches(log)


class DiskReads:
    """Records each read of the batch reader as (length, on the event loop, blocking), and
    checks that a blocking read (`os.pread`) never runs on the event loop and a read there
    never waits for the disk (RWF_NOWAIT). `cache` simulates the page cache: "real" leaves it
    be (what a test just wrote is cached), "miss" holds nothing, "headers" only headers,
    "half" headers and the first half of each batch; "unsupported" refuses RWF_NOWAIT."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cache: str = "real") -> None:
        self.reads: list[tuple[int, bool, bool]] = []
        event_loop_thread = threading.get_ident()
        pread, preadv = os.pread, os.preadv

        def blocking_read(fd: int, length: int, position: int) -> bytes:
            on_loop = threading.get_ident() == event_loop_thread
            assert not on_loop, "a blocking disk read on the event loop"
            self.reads.append((length, on_loop, True))
            return pread(fd, length, position)

        def cached_read(fd: int, buffers: list[bytearray], position: int, flags: int) -> int:
            assert flags & os.RWF_NOWAIT
            length = sum(map(len, buffers))
            if cache == "unsupported":  # a file system without RWF_NOWAIT
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
            if cache == "miss" or (cache == "headers" and length != HEADER_BYTES):
                raise BlockingIOError(errno.EAGAIN, "not in the page cache (simulated)")
            if cache == "half" and length != HEADER_BYTES:  # only the first half is cached
                buffers = [memoryview(buffers[0])[: length // 2]]
            count = preadv(fd, buffers, position, flags)
            self.reads.append((count, threading.get_ident() == event_loop_thread, False))
            return count

        monkeypatch.setattr(batch_scanner.os, "pread", blocking_read)
        monkeypatch.setattr(batch_scanner.os, "preadv", cached_read)

    def clear(self) -> None:
        self.reads.clear()

    @property
    def lengths(self) -> list[int]:
        return [length for length, _, _ in self.reads]


@pytest.mark.parametrize("index_interval_bytes", [1, 512, 1 << 20])
async def test_every_offset_gets_exactly_the_batch_holding_it(tmp_path, index_interval_bytes):
    config = dataclasses.replace(CONFIG, index_interval_bytes=index_interval_bytes)
    log, batches = build_log(tmp_path, config)
    for header, data in batches:
        for offset in range(header.base_offset, header.next_offset):
            assert await log.read_batch_containing(offset) == data, offset
    log.close()


@pytest.mark.parametrize("cache", ["real", "miss", "headers", "half", "unsupported"])
async def test_only_headers_are_read_before_the_batch(tmp_path, monkeypatch, cache):
    log, batches = build_log(tmp_path)
    reads = DiskReads(monkeypatch, cache)
    scanned_max = 0
    for header, data in batches:
        reads.clear()
        assert await log.read_batch_containing(header.last_offset) == data
        *headers, batch = reads.lengths
        assert batch == len(data)  # the batch itself, read once
        if cache == "half":  # the half batch read on the event loop, then again in full
            headers.remove(len(data) // 2)
        assert set(headers) <= {HEADER_BYTES}
        scanned_max = max(scanned_max, len(headers))
        places = {(on_loop, blocking) for _, on_loop, blocking in reads.reads}
        if cache == "real":  # served from the page cache, without a thread
            assert places == {(True, False)}
        elif cache in ("miss", "unsupported"):
            assert places == {(False, True)}
        else:  # headers (and half a batch) from the cache, then everything in a thread
            assert reads.reads[-1][1:] == (False, True)
    # The offset index bounds the scan: at most an index interval of (small) batches.
    smallest = min(len(data) for _, data in batches)
    bound = CONFIG.index_interval_bytes // smallest + 2
    assert scanned_max <= (2 * bound + 1 if cache in ("headers", "half") else bound)
    log.close()


async def test_a_large_batch_is_read_in_a_worker_thread_even_when_cached(tmp_path, monkeypatch):
    log = open_log(tmp_path, small_config(segment_bytes=1 << 20, max_message_bytes=1 << 20))
    log.append(make_batch(0), now_ms=0)
    large = make_batch(1, records=1, value_bytes=batch_scanner.CACHED_READ_BYTES_MAX)
    log.append(large, now_ms=0)
    reads = DiskReads(monkeypatch)
    assert await log.read_batch_containing(2) == large
    assert reads.reads[-1] == (len(large), False, True)
    reads.clear()
    assert await log.read_batch_containing(0) is not None
    assert {(on_loop, blocking) for _, on_loop, blocking in reads.reads} == {(True, False)}
    log.close()


async def test_offsets_outside_the_readable_range_are_refused_clearly(tmp_path):
    log = open_log(tmp_path, small_config(segment_bytes=1024, fsync="always"))
    append_batches(log, 30)
    await log.wait_durable(log.log_end_offset)
    end = log.high_watermark
    log.append(make_batch(99), now_ms=0)  # appended, not yet durable: not readable
    assert log.high_watermark == end < log.log_end_offset
    with pytest.raises(OffsetOutOfRangeError, match=f"offset {end} has not been written yet"):
        await log.read_batch_containing(end)
    with pytest.raises(OffsetOutOfRangeError, match="negative"):
        await log.read_batch_containing(-1)
    assert log.apply_retention(now_ms=10**12) > 0  # records from 1970 are past retention.ms
    start = log.log_start_offset
    with pytest.raises(OffsetOutOfRangeError, match=f"log now starts at offset {start}"):
        await log.read_batch_containing(start - 1)
    assert decode_records(await log.read_batch_containing(start))[0].offset == start
    log.close()


def locate(log: PartitionLog, batches, number: int) -> tuple[Path, int]:
    """The segment file and byte position of batch `number`."""
    header = batches[number][0]
    segment = max(p for p in log.directory.glob("*.log") if int(p.stem) <= header.base_offset)
    position = 0
    for other, data in batches:
        if other.base_offset >= header.base_offset:
            break
        if other.base_offset >= int(segment.stem):
            position += len(data)
    return segment, position


async def test_a_damaged_batch_is_a_clear_error_and_stays_on_disk(tmp_path):
    log, batches = build_log(tmp_path)
    victim = 40
    segment, position = locate(log, batches, victim)
    header, data = batches[victim]
    size_before = segment.stat().st_size
    flip_byte(segment, position + len(data) - 3, mask=0x40)  # inside the records
    with pytest.raises(CorruptRecordError) as damaged:
        await log.read_batch_containing(header.base_offset)
    message = str(damaged.value)
    assert "CRC" in message and segment.name in message and f"byte {position}" in message
    # Nothing is truncated or dropped; the batches around it read as before.
    assert segment.stat().st_size == size_before
    assert log.log_end_offset == batches[-1][0].next_offset
    for neighbour in (victim - 1, victim + 1):
        assert (
            await log.read_batch_containing(batches[neighbour][0].base_offset)
            == (batches[neighbour][1])
        )
    log.close()


async def test_a_damaged_header_before_the_batch_is_a_clear_error(tmp_path):
    config = dataclasses.replace(CONFIG, index_interval_bytes=1 << 20)  # scan from the start
    log, batches = build_log(tmp_path, config)
    segment, position = locate(log, batches, 1)
    flip_byte(segment, position + 16, mask=0x40)  # the magic byte of the second batch of a segment
    later = batches[3][0]
    assert later.base_offset < int(sorted(log.directory.glob("*.log"))[1].stem)
    with pytest.raises(CorruptRecordError, match=f"byte {position} of .*: batch magic"):
        await log.read_batch_containing(later.base_offset)
    assert await log.read_batch_containing(0) == batches[0][1]
    log.close()


async def test_an_offset_removed_by_compaction_gives_none(tmp_path):
    config = small_config(segment_bytes=1 << 20, segment_ms=1, cleanup_policy="compact")
    log = open_log(tmp_path, config)
    log.append(bytearray(build_batch([(100, b"k", b"old"), (101, b"j", b"kept")])), now_ms=0)
    log.append(bytearray(build_batch([(102, b"k", b"new")])), now_ms=0)
    assert log.roll_if_due(now_ms=10**12)
    log.append(bytearray(build_batch([(103, b"k", b"newest")])), now_ms=0)
    await log.compact(10**9)
    assert await log.read_batch_containing(0) is None  # "old" is gone
    kept = decode_records(await log.read_batch_containing(1))
    assert [(record.offset, record.value) for record in kept] == [(1, b"kept")]
    log.close()
