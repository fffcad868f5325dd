"""Reading records by offset for the gateways (HTTP and gRPC), through `RequestHandlers`.

A gateway asks for records, not batches: `read_records` turns the handlers' batch reads into
up to `limit` records, and `check_readable` says in one clear error why an offset cannot be
read. Both raise `DwalError`, which each gateway maps to its own status.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol import DwalError, ErrorCode, Record, complete_prefix_bytes, decode_records
from protocol import parse_header

if TYPE_CHECKING:
    from broker.request_handlers import RequestHandlers

FETCH_READ_BYTES = 1024 * 1024  # one read_batches call


def check_readable(offset: int, start: int, high_watermark: int) -> None:
    """Raise DwalError OFFSET_OUT_OF_RANGE unless `offset` is in [start, high_watermark]."""
    if offset < start:
        raise DwalError(
            ErrorCode.OFFSET_OUT_OF_RANGE,
            f"offset {offset} was deleted by retention; the log now starts at offset {start}",
        )
    if offset > high_watermark:
        raise DwalError(
            ErrorCode.OFFSET_OUT_OF_RANGE,
            f"offset {offset} has not been written yet (high watermark {high_watermark})",
        )


async def read_records(
    handlers: RequestHandlers,
    topic: str,
    partition: int,
    offset: int,
    end: int,
    limit: int,
    bytes_max: int,
) -> tuple[list[Record], int]:
    """Up to `limit` records in [offset, end) and the offset to read next, reading at most
    about `bytes_max` of batches (plus one batch).

    The first read is the one batch holding `offset` (all a read of one record needs); the
    following ones read up to FETCH_READ_BYTES of batches each."""
    records: list[Record] = []
    position = offset
    bytes_read = 0
    first_read = True
    while position < end and len(records) < limit and bytes_read < bytes_max:
        data = None
        if first_read:
            first_read = False
            data = await handlers.read_batch_containing(topic, partition, position)
        if data is None:  # past the first read, or `offset` was removed by compaction
            data = await handlers.read_batches(topic, partition, position, FETCH_READ_BYTES)
        bytes_read += len(data)
        start = position
        for record in decode_records(data, allow_partial_tail=True):
            if record.offset < position:
                continue
            if record.offset >= end or len(records) >= limit:
                return records, position
            records.append(record)
            position = record.offset + 1
        # Skip offsets that hold no record (compacted away, control batches).
        position = max(position, min(batches_end_offset(data, position), end))
        if position == start:
            break
    return records, position


def batches_end_offset(data: bytes, default: int) -> int:
    """The offset after the last whole batch of `data` (`default` when there is none)."""
    end = default
    position = 0
    complete = complete_prefix_bytes(data)
    while position < complete:
        header = parse_header(data, position)
        end = header.next_offset
        position += header.size_bytes
    return end
