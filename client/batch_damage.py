"""Damaged record batches: telling consumers where they are, and finding them all.

A batch whose CRC does not match its bytes (a bit flipped on disk inside a closed segment,
which crash recovery never rescans) is served by the broker as it is stored. The consumer
checks every batch it decodes; `decode_until_damage` returns the records of the intact
batches before the first damaged one and describes that one, so the consumer can deliver
everything before it and then stop with a `CorruptRecordError` naming topic, partition and
offsets. `verify_partition` fetches a whole partition and checks every batch's CRC, going
on past damage (each batch carries its own length, which the CRC does not cover).
"""

from __future__ import annotations

from dataclasses import dataclass

from client.cluster import Cluster
from client.limits import LIMITS
from client.topic_partition import TopicPartition
from protocol import (
    EARLIEST_TIMESTAMP,
    HEADER_BYTES,
    LATEST_TIMESTAMP,
    ApiKey,
    BatchHeader,
    DwalError,
    ErrorCode,
    ProtocolError,
    Record,
    decode_records,
    parse_header,
)
from protocol.record_batch import LOG_OVERHEAD_BYTES, check_header


class CorruptRecordError(DwalError):
    """A record batch of `topic`-`partition` is damaged (it fails its CRC check or cannot be
    decoded). Records before `offset` were delivered; `last_offset` is the batch's last
    offset, or None when its header is unreadable too (then it cannot be skipped).

    Not retriable: fetching the same bytes again gives the same damage. Seek past it
    (`Consumer.seek(tp, last_offset + 1)`) or create the consumer with ``skip_corrupt=True``.
    """

    def __init__(
        self, topic: str, partition: int, offset: int, last_offset: int | None, reason: str
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.last_offset = last_offset
        self.reason = reason
        offsets = f"offset {offset}" if last_offset is None else f"offsets {offset}..{last_offset}"
        super().__init__(
            ErrorCode.CORRUPT_MESSAGE,
            f"damaged record batch in {topic}-{partition} at {offsets}: {reason}",
        )

    @property
    def retriable(self) -> bool:
        return False

    @property
    def skippable(self) -> bool:
        return self.last_offset is not None


def decode_until_damage(
    tp: TopicPartition, chunk: memoryview, first_expected: int
) -> tuple[list[Record], CorruptRecordError | None]:
    """Decode a fetched chunk batch by batch. Returns the records of the whole batches before
    the first damaged one, and a CorruptRecordError for that one (None if all are intact).
    A batch cut short at the end of the chunk (fetch size limit) is not damage: it is left
    for the next fetch. `first_expected` is the offset the fetch asked for."""
    records: list[Record] = []
    position = 0
    next_offset = first_expected
    end = len(chunk)
    while end - position >= LOG_OVERHEAD_BYTES:
        try:
            header = parse_header(chunk, position) if end - position >= HEADER_BYTES else None
            if header is None:
                break
            check_header(header)
        except ProtocolError as error:
            return records, CorruptRecordError(
                tp.topic, tp.partition, next_offset, None, str(error)
            )
        batch_end = position + header.size_bytes
        if batch_end > end:
            break
        try:
            records.extend(decode_records(chunk[position:batch_end]))
        except ProtocolError as error:
            offset = max(header.base_offset, first_expected)
            return records, CorruptRecordError(
                tp.topic, tp.partition, offset, header.last_offset, _reason(error)
            )
        next_offset = header.next_offset
        position = batch_end
    return records, None


def _reason(error: ProtocolError) -> str:
    text = str(error)
    return "it fails its CRC check" if "CRC" in text else text


@dataclass(frozen=True)
class DamagedRange:
    first_offset: int
    last_offset: int | None  # None: the batch header is unreadable; nothing after it was read
    reason: str


@dataclass(frozen=True)
class PartitionVerification:
    """What `verify_partition` found between `start_offset` and `end_offset` (exclusive)."""

    partition: TopicPartition
    start_offset: int
    end_offset: int
    batches: int
    records: int
    damaged: tuple[DamagedRange, ...]


async def verify_partition(cluster: Cluster, tp: TopicPartition) -> PartitionVerification:
    """Fetch every batch of `tp` from its log start to its high watermark and check each
    batch's header and CRC (without decoding records). Goes on past a damaged batch whose
    length is readable; stops at one whose header is not. Raises DwalError if the
    partition cannot be read. Safe to cancel."""
    start = await _offsets(cluster, tp, EARLIEST_TIMESTAMP)
    end = await _offsets(cluster, tp, LATEST_TIMESTAMP)
    position, batches, records = start, 0, 0
    damaged: list[DamagedRange] = []
    while position < end:
        chunk = await _fetch_raw(cluster, tp, position)
        headers, problem = _check_chunk(chunk)
        for header, reason in headers:
            batches += 1
            records += header.record_count
            if reason is not None:
                damaged.append(DamagedRange(header.base_offset, header.last_offset, reason))
            position = max(position, header.next_offset)
        if problem is not None:
            damaged.append(DamagedRange(position, None, problem))
            break
        if not headers:  # nothing whole came back below the high watermark
            damaged.append(DamagedRange(position, None, "no whole batch at this offset"))
            break
    return PartitionVerification(tp, start, end, batches, records, tuple(damaged))


def _check_chunk(chunk: memoryview) -> tuple[list[tuple[BatchHeader, str | None]], str | None]:
    """Every whole batch's header with the reason it is damaged (None: intact), and a
    problem that stops the walk (an unreadable header), if any."""
    out: list[tuple[BatchHeader, str | None]] = []
    position = 0
    end = len(chunk)
    while end - position >= HEADER_BYTES:
        try:
            header = parse_header(chunk, position)
            check_header(header)
        except ProtocolError as error:
            return out, f"unreadable batch header: {error}"
        batch_end = position + header.size_bytes
        if batch_end > end:
            break
        try:
            decode_records(chunk[position:batch_end])
            out.append((header, None))
        except ProtocolError as error:
            out.append((header, _reason(error)))
        position = batch_end
    return out, None


async def _offsets(cluster: Cluster, tp: TopicPartition, timestamp: int) -> int:
    connection = await cluster.leader_connection(*tp)
    response = await cluster.call(
        ApiKey.LIST_OFFSETS,
        {
            "topics": [
                {
                    "topic": tp.topic,
                    "partitions": [{"partition": tp.partition, "timestamp": timestamp}],
                }
            ]
        },
        connection=connection,
    )
    part = response.body["topics"][0]["partitions"][0]
    if part["error_code"]:
        raise DwalError(ErrorCode(part["error_code"]), part["error_message"])
    return part["offset"]


async def _fetch_raw(cluster: Cluster, tp: TopicPartition, offset: int) -> memoryview:
    connection = await cluster.leader_connection(*tp, purpose="fetch")
    response = await cluster.call(
        ApiKey.FETCH,
        {
            "max_wait_ms": 0,
            "min_bytes": 0,
            "max_bytes": LIMITS.verify_fetch_bytes,
            "topics": [
                {
                    "topic": tp.topic,
                    "partitions": [
                        {
                            "partition": tp.partition,
                            "fetch_offset": offset,
                            "max_bytes": LIMITS.verify_fetch_bytes,
                        }
                    ],
                }
            ],
        },
        connection=connection,
    )
    part = response.body["topics"][0]["partitions"][0]
    if part["error_code"]:
        raise DwalError(ErrorCode(part["error_code"]), part.get("error_message"))
    return memoryview(response.tail)[: part["size"]]
