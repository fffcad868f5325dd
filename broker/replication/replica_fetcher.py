"""A follower's fetcher: one task per leader broker, copying the leader's batches of every
partition this broker follows from it.

Theory of operation. The replica manager tells the fetcher of a leader which partitions to
follow and in which leader epoch (`follow` / `unfollow`, as the metadata image changes).
The task sends one Fetch at a time over its link (a `BrokerLink`), so the bytes in flight
are bounded by the request's `max_bytes`; it fetches as a replica: `replica_id`,
`broker_epoch`, and per partition the fetch offset (this log's end: everything below is
here), the leader epoch it follows in and the epoch of its last batch. For each partition
of the answer:

- records: appended as they are (the leader's offsets and epochs kept); under
  fsync=always the next fetch waits until they are durable, so that the offset this
  follower reports (which the leader counts toward the high watermark) is on its disk;
- a diverging epoch (E, O): this log has batches the leader does not have. It is truncated
  to where the largest epoch both share ends (min of O and this log's own end of E), never
  below its high watermark (committed records are on every ISR member), and the next fetch
  goes on from there (KIP-101/279/320 semantics, the KIP-595 way: in the same round trip);
- the leader's high watermark: this log's becomes min(leader's, own log end);
- OFFSET_OUT_OF_RANGE with the leader's log start above this log's end: retention deleted
  the leader's records below it, so this log (a replacement broker's empty one, or one away
  longer than the retention) can never continue where it ends. Every record it holds lies
  below the leader's log start, so the leader has none of them: the log is replaced with an
  empty one starting there (`truncate_fully_and_start_at`, Kafka's
  truncateFullyAndStartAt) and the next fetch goes on from there at once;
- FENCED_LEADER_EPOCH, UNKNOWN_LEADER_EPOCH, NOT_LEADER_OR_FOLLOWER, UNKNOWN_TOPIC: one of
  the two images is behind; the partition rests for `PAUSE_SECONDS` (or until the replica
  manager follows it anew from a newer image), then fetches again.

A failed request (the leader is down, unreachable, slow) is retried after a short backoff
that grows to `RETRY_DELAY_SECONDS_MAX`, which bounds how often a dead leader is dialled.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from broker.event_log import log_event
from broker.replication.broker_link import BrokerLinkError, FetchLink
from broker.storage import ReplicaLog, StorageError
from broker.wall_clock import now_ms
from protocol import DwalError, ErrorCode
from protocol.api import ApiKey
from protocol.record_batch import HEADER_BYTES, parse_header

logger = logging.getLogger("dwal.replication")

PAUSE_SECONDS = 0.5  # a partition the leader refused rests this long
RETRY_DELAY_SECONDS_MIN = 0.05
RETRY_DELAY_SECONDS_MAX = 1.0
_WAIT_FOR_IMAGE = frozenset(
    {
        ErrorCode.FENCED_LEADER_EPOCH,
        ErrorCode.UNKNOWN_LEADER_EPOCH,
        ErrorCode.NOT_LEADER_OR_FOLLOWER,
        ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
    }
)

TopicPartition = tuple[str, int]


@dataclass(slots=True)
class _Followed:
    log: ReplicaLog
    leader_epoch: int
    paused_until: float = 0.0  # trio time; the leader refused: rest until then
    truncations: int = 0
    resets: int = 0  # truncated fully to start at the leader's log start


class ReplicaFetcher:
    def __init__(
        self,
        node_id: int,
        leader_id: int,
        link: FetchLink,
        *,
        broker_epoch: Callable[[], int],
        fetch_bytes_max: int,
        partition_fetch_bytes_max: int,
        max_wait_ms: int = 500,
    ) -> None:
        self.node_id = node_id
        self.leader_id = leader_id
        self.link = link
        self.broker_epoch = broker_epoch
        self.fetch_bytes_max = fetch_bytes_max
        self.partition_fetch_bytes_max = partition_fetch_bytes_max
        self.max_wait_ms = max_wait_ms
        self.partitions: dict[TopicPartition, _Followed] = {}
        self._changed = trio.Event()
        self.fetches = 0
        self.failures = 0

    # -- what to follow (called by the replica manager, in the trio thread) -------------------

    def follow(self, tp: TopicPartition, log: ReplicaLog, leader_epoch: int) -> None:
        """Follow the partition in `leader_epoch` (again: a refusal's pause ends)."""
        self.partitions[tp] = _Followed(log, leader_epoch)
        self._wake()

    def unfollow(self, tp: TopicPartition) -> None:
        self.partitions.pop(tp, None)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- the task ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Fetch until cancelled."""
        delay = RETRY_DELAY_SECONDS_MIN
        try:
            while True:
                now = trio.current_time()
                active = {tp: f for tp, f in self.partitions.items() if f.paused_until <= now}
                if not active:
                    resting = [f.paused_until for f in self.partitions.values()]
                    with trio.move_on_at(min(resting, default=math.inf)):
                        await self._changed.wait()
                    continue
                try:
                    await self._fetch_once(active)
                    delay = RETRY_DELAY_SECONDS_MIN
                except (BrokerLinkError, DwalError) as error:
                    self.failures += 1
                    log_event(
                        logger,
                        logging.DEBUG,
                        "replica_fetch_failed",
                        leader=self.leader_id,
                        error=str(error),
                    )
                    with trio.move_on_after(delay):
                        await self._changed.wait()  # a leadership change: try at once
                    delay = min(delay * 2, RETRY_DELAY_SECONDS_MAX)
        finally:
            await self.link.aclose()

    async def _fetch_once(self, active: dict[TopicPartition, _Followed]) -> None:
        by_topic: dict[str, list[dict[str, Any]]] = {}
        for (topic, partition), followed in active.items():
            by_topic.setdefault(topic, []).append(
                {
                    "partition": partition,
                    "fetch_offset": followed.log.log_end_offset,
                    "max_bytes": self.partition_fetch_bytes_max,
                    "current_leader_epoch": followed.leader_epoch,
                    "last_fetched_epoch": followed.log.latest_leader_epoch,
                }
            )
        body = {
            "max_wait_ms": self.max_wait_ms,
            "min_bytes": 1,
            "max_bytes": self.fetch_bytes_max,
            "replica_id": self.node_id,
            "broker_epoch": self.broker_epoch(),
            "topics": [{"topic": t, "partitions": parts} for t, parts in by_topic.items()],
        }
        response = await self.link.request(
            ApiKey.FETCH, body, timeout_seconds=self.max_wait_ms / 1000 + 10
        )
        self.fetches += 1
        tail = memoryview(response.tail)
        position = 0
        durable_waits: list[tuple[TopicPartition, _Followed, int]] = []
        for entry in response.body["topics"]:
            for part in entry["partitions"]:
                chunk = tail[position : position + part["size"]]
                position += part["size"]
                tp = (entry["topic"], part["partition"])
                current = self.partitions.get(tp)
                if current is None or current is not active.get(tp):
                    continue  # unfollowed (or followed anew) while the fetch was out
                wait = self._apply(tp, current, part, chunk)
                if wait is not None:
                    durable_waits.append((tp, current, wait))
        for tp, followed, offset in durable_waits:
            try:
                await followed.log.wait_durable(offset)
            except StorageError as error:
                # The log failed, or was closed meanwhile (its partition deleted or moved
                # away from this broker, and unfollowed next): rest, as after a failed append.
                self._rest(tp, followed, logging.WARNING, "replica_flush_failed", error=str(error))

    def _apply(
        self, tp: TopicPartition, followed: _Followed, part: dict[str, Any], chunk: memoryview
    ) -> int | None:
        """Apply one partition's answer; returns the offset its log must have made durable
        before the next fetch under fsync=always."""
        log = followed.log
        code = ErrorCode(part["error_code"])
        if code in _WAIT_FOR_IMAGE:
            self._rest(tp, followed, logging.INFO, "replica_fetch_paused", error=code.name)
            return None
        if code == ErrorCode.OFFSET_OUT_OF_RANGE:
            self._out_of_range(tp, followed, part)
            return None
        if code != ErrorCode.NONE:
            # transient on the leader (a storage error): rest rather than ask again at once
            error = f"{code.name}: {part.get('error_message')}"
            self._rest(tp, followed, logging.WARNING, "replica_fetch_refused", error=error)
            return None
        try:
            diverging = part["diverging_epoch"]
            if diverging is not None:
                self._truncate(tp, followed, diverging["epoch"], diverging["end_offset"])
                return None
            chunk = _whole_batches(chunk)
            if chunk.nbytes:
                log.append_as_follower(chunk, now_ms=now_ms())
            if part["high_watermark"] >= 0:
                log.set_high_watermark(min(part["high_watermark"], log.log_end_offset))
        except (StorageError, ValueError, OSError) as error:
            self._rest(tp, followed, logging.ERROR, "replica_append_failed", error=str(error))
            return None
        if chunk.nbytes and log.config.fsync == "always":
            return log.log_end_offset
        return None

    def _rest(
        self, tp: TopicPartition, followed: _Followed, level: int, event: str, **fields: Any
    ) -> None:
        """Leave the partition out of fetches for PAUSE_SECONDS, and say why."""
        followed.paused_until = trio.current_time() + PAUSE_SECONDS
        log_event(
            logger, level, event, partition=f"{tp[0]}-{tp[1]}", leader=self.leader_id, **fields
        )

    def _out_of_range(self, tp: TopicPartition, followed: _Followed, part: dict[str, Any]) -> None:
        """The leader refused the fetch offset (this log's end). If this log ends below the
        leader's log start, replace it with an empty log starting there: that discards
        only records the leader no longer has. Otherwise rest, as after any refusal."""
        log = followed.log
        leader_log_start = part["log_start_offset"]
        if leader_log_start <= log.log_end_offset:
            # Not behind the leader's log start (or the leader did not say it: -1): the
            # leader may still have records of this log, maybe at or above its high
            # watermark, so none is discarded.
            error = f"OFFSET_OUT_OF_RANGE: {part.get('error_message')}"
            self._rest(tp, followed, logging.WARNING, "replica_fetch_refused", error=error)
            return
        log_event(
            logger,
            logging.WARNING,
            "replica_reset_to_leader_log_start",
            partition=f"{tp[0]}-{tp[1]}",
            leader=self.leader_id,
            from_offset=log.log_end_offset,
            to_offset=leader_log_start,
            high_watermark=log.high_watermark,
        )
        try:
            log.truncate_fully_and_start_at(leader_log_start)
        except StorageError as error:
            self._rest(tp, followed, logging.ERROR, "replica_reset_failed", error=str(error))
            return
        followed.resets += 1

    def _truncate(self, tp: TopicPartition, followed: _Followed, epoch: int, end: int) -> None:
        log = followed.log
        own_epoch, own_end = log.end_offset_for_leader_epoch(epoch)
        target = end if own_epoch < 0 else min(end, own_end)
        # Never below the high watermark: those records are on every ISR member.
        target = min(max(target, log.high_watermark), log.log_end_offset)
        if target >= log.log_end_offset:
            # The leader lacks records below this log's high watermark (an unclean history:
            # a leader that lost acknowledged data). Truncating committed records is not
            # this follower's call: it stays out of the ISR and says so.
            self._rest(
                tp,
                followed,
                logging.ERROR,
                "replica_diverged_below_high_watermark",
                high_watermark=log.high_watermark,
                leader_epoch=epoch,
                leader_end_offset=end,
            )
            return
        log_event(
            logger,
            logging.WARNING,
            "replica_truncated",
            partition=f"{tp[0]}-{tp[1]}",
            leader=self.leader_id,
            from_offset=log.log_end_offset,
            to_offset=target,
            leader_epoch=epoch,
        )
        log.truncate_to(target)
        followed.truncations += 1


def _whole_batches(chunk: memoryview) -> memoryview:
    """The chunk up to the end of its last whole batch: a leader's read may end inside a batch
    (its byte budget ran out there); that batch comes whole with the next fetch."""
    position = 0
    while chunk.nbytes - position >= HEADER_BYTES:
        size = parse_header(chunk, position).size_bytes
        if size <= 0 or position + size > chunk.nbytes:
            break
        position += size
    return chunk[:position]
