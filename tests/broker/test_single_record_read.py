"""Reading one record by offset through the gateway and the request handlers, on real storage
(issue 3), and produce requests larger than a segment (issue 13, broker side).

A single read must read only the batch that holds the offset (plus the 61-byte headers the
scan passes), never wait for the disk on the event loop, and report a damaged batch clearly
without touching it.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest
from broker_test_support import call, create_topic_on, real_request_handlers

from broker.gateway.json_api import JsonApi
from broker.storage import FetchSlice, LogConfig
from broker.storage import batch_scanner
from protocol import ACKS_LEADER, DwalError, ErrorCode, build_batch, decode_records
from protocol.record_batch import HEADER_BYTES, scan_batches

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def handlers(tmp_path):
    log_config = LogConfig(fsync="never", segment_bytes=64 * 1024)
    async with real_request_handlers(tmp_path, log_config) as handlers:
        yield handlers


class DiskReads:
    """Records the length of each read of the batch reader, checks that a blocking read
    (`os.pread`) never runs on the event loop and that a read there never waits for the disk
    (RWF_NOWAIT), and forbids the multi-batch read path (`FetchSlice.read_bytes`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lengths: list[int] = []
        event_loop_thread = threading.get_ident()
        pread, preadv = os.pread, os.preadv

        def blocking_read(fd: int, length: int, position: int) -> bytes:
            assert threading.get_ident() != event_loop_thread, "a blocking read on the event loop"
            self.lengths.append(length)
            return pread(fd, length, position)

        def cached_read(fd: int, buffers: list[bytearray], position: int, flags: int) -> int:
            assert flags & os.RWF_NOWAIT, "a read that may wait for the disk"
            self.lengths.append(sum(map(len, buffers)))
            return preadv(fd, buffers, position, flags)

        def read_bytes(piece: FetchSlice) -> bytes:
            raise AssertionError(f"a read of {piece.length} bytes from the offset on")

        monkeypatch.setattr(batch_scanner.os, "pread", blocking_read)
        monkeypatch.setattr(batch_scanner.os, "preadv", cached_read)
        monkeypatch.setattr(FetchSlice, "read_bytes", read_bytes)


async def post_wal_records(api: JsonApi, count: int) -> list[str]:
    values = [f"record-{number}-" + "x" * (number % 50) for number in range(count)]
    for offset, value in enumerate(values):
        response = await call(api, "POST", "/", {"record": {"value": value}})
        assert response.body == {"offset": offset}
    return values


async def test_wal_get_reads_only_the_batch_holding_the_offset(handlers, monkeypatch):
    api = JsonApi(handlers)
    values = await post_wal_records(api, 2000)  # one record per batch, several segments
    assert handlers.registry.log("wal", 0).segment_count > 1
    reads = DiskReads(monkeypatch)
    for offset in random.Random(7).sample(range(len(values)), 200) + [0, len(values) - 1]:
        reads.lengths.clear()
        response = await call(api, "GET", "/", {"offset": offset})
        assert response.body == {"record": {"value": values[offset], "offset": offset}}
        *headers, batch = reads.lengths
        assert set(headers) <= {HEADER_BYTES} and batch < 200
        assert len(headers) <= 4096 // 80 + 2  # index.interval.bytes of one-record batches


async def test_wal_get_in_a_large_batch_reads_that_batch_only(handlers, monkeypatch):
    api = JsonApi(handlers)
    await create_topic_on(handlers, "wal", 1)
    batch_records = [{"value": f"v{number}-" + "y" * 100} for number in range(500)]
    for _ in range(3):  # three batches of about 55 KB, one per segment
        assert (await call(api, "POST", "/topics/wal/records", batch_records)).status == 200
    reads = DiskReads(monkeypatch)
    response = await call(api, "GET", "/?offset=1234")
    assert response.body == {"record": {"value": batch_records[234]["value"], "offset": 1234}}
    *headers, batch = reads.lengths
    assert set(headers) <= {HEADER_BYTES} and 50_000 < batch < 64 * 1024


async def test_rest_read_of_one_record_reads_one_batch(handlers, monkeypatch):
    api = JsonApi(handlers)
    await create_topic_on(handlers, "events", 1)
    for number in range(300):
        body = [{"value": f"e{number}", "partition": 0}]
        assert (await call(api, "POST", "/topics/events/records", body)).status == 200
    reads = DiskReads(monkeypatch)
    response = await call(api, "GET", "/topics/events/partitions/0/records?offset=123&max=1")
    assert [(r["offset"], r["value"]) for r in response.body["records"]] == [(123, "e123")]
    assert response.body["next_offset"] == 124
    assert reads.lengths[-1] < 200


async def test_rest_reads_of_many_records_read_off_the_event_loop(handlers, monkeypatch):
    api = JsonApi(handlers)
    await create_topic_on(handlers, "events", 1)
    for number in range(50):
        body = [{"value": f"e{number}", "partition": 0}]
        assert (await call(api, "POST", "/topics/events/records", body)).status == 200
    threads = []
    original = FetchSlice.read_bytes

    def read_bytes(piece: FetchSlice) -> bytes:
        threads.append(threading.get_ident())
        return original(piece)

    monkeypatch.setattr(FetchSlice, "read_bytes", read_bytes)
    response = await call(api, "GET", "/topics/events/partitions/0/records?offset=3")
    assert [r["value"] for r in response.body["records"]] == [f"e{n}" for n in range(3, 50)]
    assert threads and threading.get_ident() not in threads


async def test_wal_get_out_of_range_says_why(handlers):
    api = JsonApi(handlers)
    response = await call(api, "GET", "/", {"offset": 0})
    assert response.status == 404 and "the log is empty" in response.body["error"]
    await post_wal_records(api, 3)
    response = await call(api, "GET", "/", {"offset": 3})
    assert response.status == 404
    assert response.body == {
        "error": "offset 3 has not been written yet (high watermark 3)",
        "error_code": "OFFSET_OUT_OF_RANGE",
    }


def flip_byte(path: Path, position: int) -> None:
    with open(path, "r+b") as file:
        file.seek(position)
        byte = file.read(1)[0]
        file.seek(position)
        file.write(bytes([byte ^ 0x10]))


async def test_a_damaged_batch_is_a_clear_500_and_nothing_is_dropped(handlers):
    api = JsonApi(handlers)
    values = await post_wal_records(api, 20)
    log = handlers.registry.log("wal", 0)
    (segment,) = log.directory.glob("*.log")
    with open(segment, "rb") as file:
        batches = list(scan_batches(file.read()))
    victim = batches[7]
    size_before = segment.stat().st_size
    flip_byte(segment, victim.position + victim.header.size_bytes - 2)
    response = await call(api, "GET", "/", {"offset": 7})
    assert response.status == 500 and response.body["error_code"] == "CORRUPT_MESSAGE"
    assert "CRC" in response.body["error"] and segment.name in response.body["error"]
    for offset in (6, 8, 19):
        response = await call(api, "GET", "/", {"offset": offset})
        assert response.body == {"record": {"value": values[offset], "offset": offset}}
    assert segment.stat().st_size == size_before and log.high_watermark == 20
    with pytest.raises(DwalError) as damaged:
        await handlers.read_batch_containing("wal", 0, 7)
    assert damaged.value.code == ErrorCode.CORRUPT_MESSAGE


async def test_handler_read_batch_containing_errors(handlers):
    await create_topic_on(handlers, "t", 1)
    await handlers.append_batch("t", 0, build_batch([(1, None, b"a"), (2, None, b"b")]))
    with pytest.raises(DwalError) as unknown:
        await handlers.read_batch_containing("missing", 0, 0)
    assert unknown.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    data = await handlers.read_batch_containing("t", 0, 1)
    assert data is not None
    assert [record.value for record in decode_records(data)] == [b"a", b"b"]
    for offset in (-1, 2, 10):
        with pytest.raises(DwalError) as outside:
            await handlers.read_batch_containing("t", 0, offset)
        assert outside.value.code == ErrorCode.OFFSET_OUT_OF_RANGE


# -- issue 13: a produce request larger than a segment ------------------------------------


async def test_a_produce_request_larger_than_a_segment_is_stored_whole(handlers):
    await create_topic_on(handlers, "small", 1, configs={"segment.bytes": "4096"})
    batches = [
        build_batch([(1, None, b"%d-%d" % (n, i) + b"." * 1000) for i in range(3)])
        for n in range(40)
    ]  # about 120 KB: thirty segments' worth in one request
    tail = b"".join(batches)
    body = {
        "acks": ACKS_LEADER,
        "timeout_ms": 1000,
        "topics": [{"topic": "small", "partitions": [{"partition": 0, "size": len(tail)}]}],
    }
    finish = await handlers.start_produce(body, bytearray(tail))
    reply = await finish()
    (result,) = reply.body["topics"][0]["partitions"]
    assert result["error_code"] == 0 and result["base_offset"] == 0
    log = handlers.registry.log("small", 0)
    assert log.high_watermark == 120 and log.segment_count >= 30
    for offset in range(0, 120, 7):
        data = await handlers.read_batch_containing("small", 0, offset)
        assert data is not None
        (record,) = [r for r in decode_records(data) if r.offset == offset]
        assert record.value.startswith(b"%d-%d" % divmod(offset, 3))


async def test_a_single_batch_above_segment_bytes_is_message_too_large(handlers):
    await create_topic_on(handlers, "small", 1, configs={"segment.bytes": "4096"})
    batch = build_batch([(1, None, b"z" * 5000)])
    with pytest.raises(DwalError) as refused:
        await handlers.append_batch("small", 0, batch)
    assert refused.value.code == ErrorCode.MESSAGE_TOO_LARGE
    assert refused.value.message == (
        f"a record batch of {len(batch)} bytes exceeds segment.bytes (4096)"
    )
    assert handlers.registry.log("small", 0).log_end_offset == 0
