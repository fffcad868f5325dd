"""The consumer: assigned partitions, positions, long-poll fetches, seeks.

Positions are "next offset to read", as in Kafka. A partition without a position gets one
from `auto_offset_reset` (earliest or latest, through ListOffsets) the first time it is
fetched, and again if its position falls out of the log's range (retention); with
``auto_offset_reset="error"`` that raises instead. Each poll sends one Fetch per leader for
every assigned partition, decodes the record batches, and drops records before the position
(a fetch starts at the batch holding the position, which may begin earlier).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple

import trio

from client.cluster import Cluster
from protocol import (
    EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
    ApiKey,
    DwalError,
    ErrorCode,
    ProtocolError,
    Record,
    Response,
    complete_prefix_bytes,
    decode_records,
    last_batch_header,
)


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@dataclass(frozen=True)
class ConsumerStatistics:
    assigned_partitions: int
    records_returned: int
    fetches: int


class Consumer:
    """Read records from assigned partitions. Call `assign()` or `seek()`, then `poll()`.

    Options: `auto_offset_reset` ("earliest", "latest" or "error"), `fetch_max_bytes` (one
    fetch, all partitions), `partition_max_bytes`, `max_wait_ms` (long-poll bound) and
    `min_bytes` (answer as soon as this much is ready).
    """

    def __init__(
        self,
        cluster: Cluster,
        *,
        auto_offset_reset: str = "latest",
        fetch_max_bytes: int = 32 * 1024 * 1024,
        partition_max_bytes: int = 4 * 1024 * 1024,
        max_wait_ms: int = 500,
        min_bytes: int = 1,
    ) -> None:
        if auto_offset_reset not in ("earliest", "latest", "error"):
            raise ValueError("auto_offset_reset must be earliest, latest or error")
        self.cluster = cluster
        self.auto_offset_reset = auto_offset_reset
        self.fetch_max_bytes = fetch_max_bytes
        self.partition_max_bytes = partition_max_bytes
        self.max_wait_ms = max_wait_ms
        self.min_bytes = min_bytes
        self._positions: dict[TopicPartition, int | None] = {}
        self._high_watermarks: dict[TopicPartition, int] = {}
        self._records_returned = 0
        self._fetches = 0
        self._prefetch: _Fetch | None = None

    # -- assignment and positions -------------------------------------------------------

    def assign(self, partitions: Iterable[TopicPartition | tuple[str, int]]) -> None:
        """Read exactly these partitions; keeps known positions of ones already assigned."""
        wanted = [TopicPartition(*tp) for tp in partitions]
        self._positions = {tp: self._positions.get(tp) for tp in wanted}

    async def assign_topic(self, topic: str) -> list[TopicPartition]:
        """Assign every partition of `topic`; raises DwalError if it does not exist."""
        info = await self.cluster.topic(topic)
        partitions = [TopicPartition(topic, p.partition) for p in info.partitions]
        self.assign(list(self._positions) + [tp for tp in partitions if tp not in self._positions])
        return partitions

    def assignment(self) -> list[TopicPartition]:
        return list(self._positions)

    def seek(self, partition: TopicPartition | tuple[str, int], offset: int) -> None:
        tp = TopicPartition(*partition)
        if tp not in self._positions:
            raise ValueError(f"{tp.topic}-{tp.partition} is not assigned")
        if offset < 0:
            raise ValueError("offset must not be negative")
        self._positions[tp] = offset

    async def seek_to_beginning(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        await self._reset(list(partitions or self._positions), EARLIEST_TIMESTAMP)

    async def seek_to_end(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        await self._reset(list(partitions or self._positions), LATEST_TIMESTAMP)

    async def seek_to_timestamp(
        self, timestamp_ms: int, partitions: Iterable[TopicPartition] | None = None
    ) -> None:
        """Position each partition at its first record with timestamp >= `timestamp_ms`
        (at the end when there is none)."""
        targets = list(partitions or self._positions)
        found = await list_offsets(self.cluster, targets, timestamp_ms)
        missing = [tp for tp, offset in found.items() if offset < 0]
        for tp, offset in found.items():
            if offset >= 0:
                self._positions[tp] = offset
        if missing:
            await self._reset(missing, LATEST_TIMESTAMP)

    def position(self, partition: TopicPartition | tuple[str, int]) -> int | None:
        return self._positions.get(TopicPartition(*partition))

    def high_watermark(self, partition: TopicPartition | tuple[str, int]) -> int | None:
        """The last high watermark a fetch reported for the partition, or None."""
        return self._high_watermarks.get(TopicPartition(*partition))

    def statistics(self) -> ConsumerStatistics:
        return ConsumerStatistics(len(self._positions), self._records_returned, self._fetches)

    async def _reset(self, partitions: list[TopicPartition], timestamp: int) -> None:
        for tp, offset in (await list_offsets(self.cluster, partitions, timestamp)).items():
            self._positions[tp] = offset

    async def _resolve_missing_positions(self) -> None:
        missing = [tp for tp, position in self._positions.items() if position is None]
        if not missing:
            return
        if self.auto_offset_reset == "error":
            raise DwalError(
                ErrorCode.OFFSET_OUT_OF_RANGE,
                f"no position for {missing[0].topic}-{missing[0].partition} "
                "and auto_offset_reset is 'error'",
            )
        await self._reset(
            missing,
            EARLIEST_TIMESTAMP if self.auto_offset_reset == "earliest" else LATEST_TIMESTAMP,
        )

    # -- fetching -------------------------------------------------------------------------

    async def poll(self, timeout_ms: int | None = None) -> dict[TopicPartition, list[Record]]:
        """Fetch what is available (waiting up to `timeout_ms`, default `max_wait_ms`);
        returns records by partition, each list in offset order, possibly empty.
        Raises DwalError for unknown topics or out-of-range positions under "error".

        While a poll's records are being decoded, the next fetch is already on its way
        (one prefetch at most, from the positions the answer leads to), so a consumer
        that keeps up overlaps its decoding with the broker's work and the network."""
        if not self._positions:
            raise RuntimeError("no partitions assigned")
        await self._resolve_missing_positions()
        wait_ms = self.max_wait_ms if timeout_ms is None else max(timeout_ms, 0)
        positions = dict(self._positions)
        fetch, self._prefetch = self._prefetch, None
        if fetch is None or fetch.positions != positions:
            fetch = self._start_fetch(positions, wait_ms)
        with trio.move_on_after(wait_ms / 1000 + self.cluster.request_timeout_ms / 1000) as scope:
            await fetch.done.wait()
        if scope.cancelled_caught:
            raise DwalError(ErrorCode.REQUEST_TIMED_OUT, "fetch timed out")
        if fetch.error is not None:
            raise fetch.error
        response = fetch.response
        assert response is not None
        self._fetches += 1
        following = _positions_after(response.body, response.tail, positions)
        if following != positions:
            self._prefetch = self._start_fetch(following, self.max_wait_ms)
        return await self._take_records(response.body, response.tail)

    def _start_fetch(self, positions: dict[TopicPartition, int | None], wait_ms: int) -> "_Fetch":
        fetch = _Fetch(positions)
        body = {
            "max_wait_ms": wait_ms,
            "min_bytes": self.min_bytes,
            "max_bytes": self.fetch_max_bytes,
            "topics": _group_by_topic(list(positions), positions, self.partition_max_bytes),
        }
        self.cluster.start_task(fetch.run, self.cluster, body)
        return fetch

    async def _take_records(
        self, body: dict, tail: bytes | memoryview
    ) -> dict[TopicPartition, list[Record]]:
        view = memoryview(tail)
        position = 0
        out: dict[TopicPartition, list[Record]] = {}
        resets: list[TopicPartition] = []
        for entry in body["topics"]:
            for part in entry["partitions"]:
                tp = TopicPartition(entry["topic"], part["partition"])
                chunk = view[position : position + part["size"]]
                position += part["size"]
                if part["error_code"]:
                    self._partition_error(tp, part, resets)
                    continue
                self._high_watermarks[tp] = part["high_watermark"]
                records = self._records_from(tp, chunk)
                if records:
                    out[tp] = records
        if resets:
            await self._resolve_missing_positions()
        return out

    def _records_from(self, tp: TopicPartition, chunk: memoryview) -> list[Record]:
        expected = self._positions.get(tp)
        if expected is None or not len(chunk):
            return []
        records = decode_records(chunk, allow_partial_tail=True)
        if records and records[0].offset < expected:
            skip = expected - records[0].offset
            records = records[skip:]
        if records:
            self._positions[tp] = records[-1].offset + 1
            self._records_returned += len(records)
        return records

    def _partition_error(
        self, tp: TopicPartition, part: dict, resets: list[TopicPartition]
    ) -> None:
        code = ErrorCode(part["error_code"])
        if code == ErrorCode.OFFSET_OUT_OF_RANGE and self.auto_offset_reset != "error":
            self._positions[tp] = None
            resets.append(tp)
            return
        if code.retriable:
            self.cluster.invalidate(tp.topic)
            return
        raise DwalError(
            code, f"{tp.topic}-{tp.partition}: {part.get('error_message') or code.name}"
        )


class _Fetch:
    """One Fetch request running in the cluster's nursery; its outcome waits in `done`."""

    def __init__(self, positions: dict[TopicPartition, int | None]) -> None:
        self.positions = positions
        self.done = trio.Event()
        self.response: Response | None = None
        self.error: Exception | None = None

    async def run(self, cluster: Cluster, body: dict) -> None:
        try:
            connection = await cluster.leader_connection(
                *next(iter(self.positions)), purpose="fetch"
            )
            self.response = await connection.request(ApiKey.FETCH, body)
        except (DwalError, ProtocolError) as error:
            self.error = error
        finally:
            self.done.set()


def _positions_after(
    body: dict, tail: bytes | memoryview, positions: dict[TopicPartition, int | None]
) -> dict:
    """The positions a fetch answer leads to, from batch headers alone (no decoding)."""
    following = dict(positions)
    view = memoryview(tail)
    start = 0
    for entry in body["topics"]:
        for part in entry["partitions"]:
            chunk = view[start : start + part["size"]]
            start += part["size"]
            if part["error_code"] or not part["size"]:
                continue
            try:
                end = complete_prefix_bytes(chunk)
                if end:
                    last = last_batch_header(chunk[:end])
                    tp = TopicPartition(entry["topic"], part["partition"])
                    following[tp] = max(following[tp] or 0, last.next_offset)
            except ProtocolError:
                continue  # decoding will report it
    return following


def _group_by_topic(
    partitions: list[TopicPartition], positions: dict, max_bytes: int
) -> list[dict]:
    topics: dict[str, list[dict]] = {}
    for tp in partitions:
        topics.setdefault(tp.topic, []).append(
            {"partition": tp.partition, "fetch_offset": positions[tp], "max_bytes": max_bytes}
        )
    return [{"topic": topic, "partitions": parts} for topic, parts in topics.items()]


async def list_offsets(
    cluster: Cluster, partitions: list[TopicPartition], timestamp: int
) -> dict[TopicPartition, int]:
    """Offsets for `timestamp` (or EARLIEST_TIMESTAMP / LATEST_TIMESTAMP) per partition;
    -1 where no record is that recent. Raises DwalError on unknown topics."""
    if not partitions:
        return {}
    topics: dict[str, list[dict]] = {}
    for tp in partitions:
        topics.setdefault(tp.topic, []).append({"partition": tp.partition, "timestamp": timestamp})
    connection = await cluster.leader_connection(*partitions[0])
    response = await cluster.call(
        ApiKey.LIST_OFFSETS,
        {"topics": [{"topic": t, "partitions": p} for t, p in topics.items()]},
        connection=connection,
    )
    out = {}
    for entry in response.body["topics"]:
        for part in entry["partitions"]:
            if part["error_code"]:
                raise DwalError(ErrorCode(part["error_code"]), part["error_message"])
            out[TopicPartition(entry["topic"], part["partition"])] = part["offset"]
    return out


__all__ = ["Consumer", "TopicPartition", "ConsumerStatistics", "list_offsets"]
