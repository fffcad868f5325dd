"""The consumer: assigned partitions, positions, long-poll fetches, seeks.

Positions are "next offset to read", as in Kafka. A partition without a position gets one
from `auto_offset_reset` (earliest or latest, through ListOffsets) the first time it is
fetched, and again if its position falls out of the log's range (retention); with
``auto_offset_reset="error"`` that raises instead. Each poll sends one Fetch per leader for
every assigned partition, decodes the record batches, and drops records before the position
(a fetch starts at the batch holding the position, which may begin earlier).

Leaders. Partitions are grouped by their leader as the cluster's metadata cache knows it,
and each leader broker has at most one fetch of ours in flight (on its own connection), so
a slow or idle leader holds up no other: a poll waits until one of the fetches answers and
returns what every answered fetch brought. Positions move per partition. A partition whose
leader moved (NOT_LEADER_OR_FOLLOWER) keeps its position; its topic's metadata is refreshed
and the next poll fetches it from the new leader, from that position.

With a `group_id`, `subscribe()` makes the consumer a member of a consumer group: the group's
coordinator assigns partitions (see group_membership.py), and `poll()` applies assignment
changes before it fetches — committing and releasing revoked partitions (on_revoked), then
taking new ones from their committed offsets (on_assigned). Committed offsets are "next
offset to read". With `enable_auto_commit`, positions are committed every
`auto_commit_interval_ms` (inside poll), before partitions are revoked, and on close.

Failures are per partition. A retriable error about one partition (its leader moved:
NOT_LEADER_OR_FOLLOWER, FENCED_LEADER_EPOCH, UNKNOWN_LEADER_EPOCH; it has no leader for now:
LEADER_NOT_AVAILABLE, leader -1 in metadata; its leader is unreachable; a partition the group
assigned that this client's metadata does not know yet) sets that partition aside: it keeps
its position (or its pending offset reset, resolved through ListOffsets once it has a
leader), and after a backoff that doubles from `retry_backoff_ms` up to
`retry_backoff_max_ms` its topic's metadata is refreshed and it is tried again, while the
other partitions are fetched as usual. `statistics().failing_partitions` says which
partitions are set aside, since when, how many attempts and the last error. Only when a poll
reads nothing at all because every partition it tried failed (the cluster is unreachable,
say) does the poll fail: it returns nothing, cached metadata is dropped, and the next poll
waits out the same backoff first; `statistics()` counts the consecutive failed polls and
keeps the last error, so an application can say so; with `give_up_after_ms` a poll raises
the last error once polls have failed for that long (a single leaderless partition among
readable ones never makes a poll fail). A damaged record batch (CRC mismatch) is not retried:
the records before it are returned, then poll raises CorruptRecordError until the
application seeks past it, or, with `skip_corrupt`, the consumer skips it and reports it in
`take_skipped()`.

Fetched records wait in a buffer per partition until they are returned. A position is the
next offset to *return*, so it moves only over records handed to the application (a poll
capped by `max_poll_records`, an `async for` that takes one record at a time); the records
behind it stay buffered for the next poll, also when a poll or an iteration is cancelled. A
partition with buffered records is not fetched again until they are all returned, so the
buffer holds at most one fetch's answer per partition. Paused partitions are neither
fetched nor returned from; their buffered records wait for `resume()`.
"""

from __future__ import annotations

import bisect
import collections
import inspect
import logging
from dataclasses import dataclass, field
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Iterable,
    Literal,
    Mapping,
    NamedTuple,
    overload,
)

import trio

from client.batch_damage import CorruptRecordError, decode_until_damage
from client.cluster import Cluster
from client.connection import MalformedResponseError
from client.group_membership import GroupMembership
from client.kafka_options import KafkaOption, UnknownOptionError, dotted, translate
from client.limits import LIMITS
from client.topic_partition import TopicPartition
from protocol import (
    EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
    ApiKey,
    DwalError,
    ErrorCode,
    ProtocolError,
    Record,
    Response,
    decode_records,
)
from protocol.errors import error_code_from_wire


@dataclass(frozen=True)
class PartitionFailure:
    """A partition set aside after retriable errors (no leader, leader moved, unreachable)."""

    attempts: int  # consecutive failed attempts to read it
    last_error: DwalError
    failing_since_s: float  # trio clock time of the first of those attempts


@dataclass(frozen=True)
class ConsumerStatistics:
    assigned_partitions: int
    records_returned: int
    fetches: int
    failed_polls: int = 0  # consecutive polls that failed with a retriable error
    last_error: DwalError | None = None  # the error of the last failed poll, if any
    failing_since_s: float | None = None  # trio clock time the first of those polls started
    # assigned partitions set aside after retriable errors, while others are read
    failing_partitions: Mapping[TopicPartition, PartitionFailure] = field(default_factory=dict)
    buffered_records: int = 0  # fetched, not yet returned (max_poll_records, iteration, pause)
    paused_partitions: int = 0


class OffsetAndMetadata(NamedTuple):
    """A committed offset (next offset to read) and the metadata string stored with it."""

    offset: int
    metadata: str | None = None


class RecordDeserializationError(DwalError):
    """The consumer's key or value deserializer raised for the record at `offset` of
    `topic`-`partition` (the original exception is `__cause__`; `record` is the record as
    fetched). Code INVALID_RECORD, not retriable: the position stays at that record and every
    poll raises again until the application seeks past it."""

    def __init__(self, record: Record, part: str, cause: Exception) -> None:
        self.topic = record.topic
        self.partition = record.partition
        self.offset = record.offset
        self.record = record
        super().__init__(
            ErrorCode.INVALID_RECORD,
            f"the {part} deserializer failed on {record.topic}-{record.partition} at offset "
            f"{record.offset}: {type(cause).__name__}: {cause}",
        )

    @property
    def retriable(self) -> bool:
        return False


class _Buffered:
    """Records of one partition fetched and not yet returned: `records[index:]`, in offset
    order. `resume_at`: where the position goes once they are all returned, past a damaged
    batch that `skip_corrupt` skips (None: after the last record)."""

    __slots__ = ("records", "index", "resume_at")

    def __init__(self, records: list[Record]) -> None:
        self.records = records
        self.index = 0
        self.resume_at: int | None = None

    def fetch_position(self) -> int:
        """Where the partition's next fetch starts once these records are returned."""
        after = self.records[-1].offset + 1
        return after if self.resume_at is None else max(after, self.resume_at)


def _offset_reset(value: Any) -> str:
    """Kafka's and librdkafka's spellings of auto.offset.reset, as DWAL's."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    name = _OFFSET_RESET_ALIASES.get(value.lower(), value.lower())
    if name not in ("earliest", "latest", "error"):
        raise ValueError(
            f"auto_offset_reset must be earliest, latest or error (or Kafka's smallest, "
            f"largest, none), got {value!r}"
        )
    return name


_OFFSET_RESET_ALIASES = {
    "smallest": "earliest",
    "beginning": "earliest",
    "largest": "latest",
    "end": "latest",
    "none": "error",  # Kafka's "none": fail when there is no committed offset
}


def _deserializer(value: Any) -> Any:
    if value is not None and not callable(value):
        raise ValueError(f"expected a function of bytes, got {value!r}")
    return value


# Kafka's consumer options (Java client, librdkafka, kafka-python, aiokafka spellings) that
# the Consumer takes, by dotted name; see client/kafka_options.py.
CONSUMER_OPTIONS: dict[str, KafkaOption] = {
    "fetch.max.wait.ms": KafkaOption("max_wait_ms"),
    "fetch.min.bytes": KafkaOption("min_bytes"),
    "fetch.max.bytes": KafkaOption("fetch_max_bytes"),
    "max.partition.fetch.bytes": KafkaOption("partition_max_bytes"),
    "max.poll.records": KafkaOption("max_poll_records"),
    "group.id": KafkaOption("group_id", "str"),
    "group.instance.id": KafkaOption("group_instance_id", "str"),
    "auto.offset.reset": KafkaOption("auto_offset_reset", convert=_offset_reset),
    "enable.auto.commit": KafkaOption("enable_auto_commit", "bool"),
    "auto.commit.interval.ms": KafkaOption("auto_commit_interval_ms"),
    # KIP-848: the member's rebalance timeout is its max.poll.interval.ms
    "max.poll.interval.ms": KafkaOption("rebalance_timeout_ms"),
    "retry.backoff.ms": KafkaOption("retry_backoff_ms"),
    "retry.backoff.max.ms": KafkaOption("retry_backoff_max_ms"),
    "key.deserializer": KafkaOption("key_deserializer", convert=_deserializer),
    "value.deserializer": KafkaOption("value_deserializer", convert=_deserializer),
}

# Kafka consumer options that DWAL sets somewhere else than on the Consumer.
_CONSUMER_ELSEWHERE = {
    "client.id": (
        "the client id is sent on every connection of a cluster: "
        "client.connect(bootstrap, client_id=...)"
    ),
}


@dataclass
class _Trouble:
    attempts: int
    last_error: DwalError
    failing_since_s: float
    retry_at_s: float  # not tried again (nor its metadata refreshed) before this time


class Consumer:
    """Read records from partitions: `assign()` them (and `seek()`), or, with a `group_id`,
    `subscribe()` to topics and let the group assign them; then `poll()`, or iterate
    (``async for record in consumer``, ``async for batch in consumer.batches()``).

    Options: `auto_offset_reset` ("earliest", "latest" or "error"), `fetch_max_bytes` (one
    fetch, all partitions), `partition_max_bytes`, `max_wait_ms` (long-poll bound),
    `min_bytes` (answer as soon as this much is ready), `max_poll_records` (cap of one
    poll; None: all that was fetched); for groups `group_id`, `group_instance_id` (static
    membership), `enable_auto_commit`, `auto_commit_interval_ms`, `rebalance_timeout_ms`, and
    the callbacks `on_assigned`, `on_revoked` and `on_lost` (each called with a set of
    TopicPartition; may be async); for failures `retry_backoff_ms`, `retry_backoff_max_ms`,
    `give_up_after_ms` (None: retry forever) and `skip_corrupt` (skip damaged batches instead
    of raising CorruptRecordError); `key_deserializer` and `value_deserializer` (functions of
    bytes applied to the records returned). Kafka's option names are accepted as further
    keyword arguments (``fetch_min_bytes=1``, ``max_poll_interval_ms=...``) and by
    `from_config`; an unknown one raises UnknownOptionError naming close matches.
    Use ``async with Consumer(...) as consumer:`` so that `close()` runs at the end.
    """

    def __init__(
        self,
        cluster: Cluster,
        *,
        auto_offset_reset: str = "latest",
        fetch_max_bytes: int = LIMITS.consumer_fetch_bytes_max,
        partition_max_bytes: int = LIMITS.consumer_partition_bytes_max,
        max_wait_ms: int = LIMITS.consumer_fetch_wait_ms_max,
        min_bytes: int = LIMITS.consumer_fetch_bytes_min,
        max_poll_records: int | None = None,
        group_id: str | None = None,
        group_instance_id: str | None = None,
        enable_auto_commit: bool = True,
        auto_commit_interval_ms: int = LIMITS.consumer_auto_commit_interval_ms,
        rebalance_timeout_ms: int = LIMITS.consumer_rebalance_timeout_ms,
        on_assigned: Callable[[set[TopicPartition]], Any] | None = None,
        on_revoked: Callable[[set[TopicPartition]], Any] | None = None,
        on_lost: Callable[[set[TopicPartition]], Any] | None = None,
        retry_backoff_ms: int = LIMITS.consumer_retry_backoff_ms,
        retry_backoff_max_ms: int = LIMITS.consumer_retry_backoff_ms_max,
        give_up_after_ms: int | None = None,
        skip_corrupt: bool = False,
        key_deserializer: Callable[[bytes], Any] | None = None,
        value_deserializer: Callable[[bytes], Any] | None = None,
        **kafka_options: Any,
    ) -> None:
        settings = {name: value for name, value in locals().items() if name in _KEYWORD_DEFAULTS}
        if kafka_options:
            explicit = {k: v for k, v in settings.items() if v != _KEYWORD_DEFAULTS[k]}
            settings.update(_translate(kafka_options, explicit))
        self._configure(cluster, **settings)

    @classmethod
    def from_config(
        cls, cluster: Cluster, config: Mapping[str, Any], **keywords: Any
    ) -> "Consumer":
        """A Consumer from a Kafka-style configuration, e.g. ``{"group.id": "billing",
        "auto.offset.reset": "earliest", "enable.auto.commit": "false"}``: dotted or
        underscored names, values of the right type or their string forms. `keywords` are
        passed on as they are (DWAL's own options, such as ``on_revoked=``).

        Raises UnknownOptionError (a TypeError) for an option the Consumer does not take,
        naming close matches or where the option belongs; ValueError for a bad value."""
        own = {name: value for name, value in keywords.items() if name in _KEYWORD_DEFAULTS}
        options = dict(config)
        for name, value in keywords.items():  # Kafka spellings among the keywords
            if name not in own:
                if name in options:
                    raise UnknownOptionError(f"Consumer: {name!r} is given twice")
                options[name] = value
        return cls(cluster, **_translate(options, own), **own)

    def _configure(
        self,
        cluster: Cluster,
        *,
        auto_offset_reset: str,
        fetch_max_bytes: int,
        partition_max_bytes: int,
        max_wait_ms: int,
        min_bytes: int,
        max_poll_records: int | None,
        group_id: str | None,
        group_instance_id: str | None,
        enable_auto_commit: bool,
        auto_commit_interval_ms: int,
        rebalance_timeout_ms: int,
        on_assigned: Callable[[set[TopicPartition]], Any] | None,
        on_revoked: Callable[[set[TopicPartition]], Any] | None,
        on_lost: Callable[[set[TopicPartition]], Any] | None,
        retry_backoff_ms: int,
        retry_backoff_max_ms: int,
        give_up_after_ms: int | None,
        skip_corrupt: bool,
        key_deserializer: Callable[[bytes], Any] | None,
        value_deserializer: Callable[[bytes], Any] | None,
    ) -> None:
        auto_offset_reset = _offset_reset(auto_offset_reset)
        if max_poll_records is not None and max_poll_records <= 0:
            raise ValueError("max_poll_records must be positive (or None: no cap)")
        for name, deserializer in (
            ("key_deserializer", key_deserializer),
            ("value_deserializer", value_deserializer),
        ):
            if deserializer is not None and not callable(deserializer):
                raise TypeError(f"{name} must be a function of bytes, got {deserializer!r}")
        if not 0 < retry_backoff_ms <= retry_backoff_max_ms:
            raise ValueError("need 0 < retry_backoff_ms <= retry_backoff_max_ms")
        if give_up_after_ms is not None and give_up_after_ms < 0:
            raise ValueError("give_up_after_ms must not be negative")
        self.max_poll_records = max_poll_records
        self.key_deserializer = key_deserializer
        self.value_deserializer = value_deserializer
        self.on_lost = on_lost
        self._buffer: dict[TopicPartition, _Buffered] = {}
        self._paused: set[TopicPartition] = set()
        self._iterated = 0  # records returned by iteration, to pace its checkpoints
        self.retry_backoff_s = retry_backoff_ms / 1000
        self.retry_backoff_max_s = retry_backoff_max_ms / 1000
        self.give_up_after_s = give_up_after_ms / 1000 if give_up_after_ms is not None else None
        self.skip_corrupt = skip_corrupt
        self._failed_polls = 0
        self._failing_since: float | None = None
        self._last_error: DwalError | None = None
        self._damaged: dict[TopicPartition, tuple[int, CorruptRecordError]] = {}
        self._skipped: collections.deque[CorruptRecordError] = collections.deque(
            maxlen=LIMITS.consumer_skipped_batches_max
        )
        self.group_id = group_id
        self.enable_auto_commit = enable_auto_commit and group_id is not None
        self.auto_commit_interval_s = auto_commit_interval_ms / 1000
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self._membership = (
            GroupMembership(
                cluster,
                group_id,
                instance_id=group_instance_id,
                rebalance_timeout_ms=rebalance_timeout_ms,
            )
            if group_id is not None
            else None
        )
        self._subscribed = False
        self._last_commit = trio.current_time()
        self._committed_positions: dict[TopicPartition, int] = {}
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
        # per leader broker (node id; -1: not known yet), the fetch in flight or answered
        self._fetches_by_leader: dict[int, _Fetch] = {}
        self._fetch_answered = trio.Event()  # set (then replaced) when any fetch finishes
        # per partition: retriable failures in a row, and when to try it again
        self._troubles: dict[TopicPartition, _Trouble] = {}
        # positions to resolve through ListOffsets (with this timestamp) once possible
        self._pending_resets: dict[TopicPartition, int] = {}
        self._failed_now: set[TopicPartition] = set()  # partitions that failed in this poll
        self._all_failing = False  # every assigned partition was failing when the poll began
        self._poll_error: DwalError | None = None  # the last partition failure of this poll

    # -- assignment and positions -------------------------------------------------------

    def assign(self, partitions: Iterable[TopicPartition | tuple[str, int]]) -> None:
        """Read exactly these partitions; keeps known positions (and records already
        fetched, and pauses) of ones already assigned."""
        wanted = [TopicPartition(*tp) for tp in partitions]
        self._forget([tp for tp in self._positions if tp not in wanted])
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
        self._pending_resets.pop(tp, None)
        self._buffer.pop(tp, None)  # fetched from the old position

    def _forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop everything known about partitions no longer assigned."""
        for tp in partitions:
            self._positions.pop(tp, None)
            self._committed_positions.pop(tp, None)
            self._troubles.pop(tp, None)
            self._pending_resets.pop(tp, None)
            self._buffer.pop(tp, None)
            self._paused.discard(tp)
            self._damaged.pop(tp, None)

    def _assigned(
        self, partitions: Iterable[TopicPartition | tuple[str, int]] | None
    ) -> list[TopicPartition]:
        """`partitions` (all assigned ones when None); ValueError for one not assigned."""
        if partitions is None:
            return list(self._positions)
        wanted = [TopicPartition(*tp) for tp in partitions]
        for tp in wanted:
            if tp not in self._positions:
                raise ValueError(f"{tp.topic}-{tp.partition} is not assigned")
        return wanted

    # -- flow control -------------------------------------------------------------------

    def pause(self, partitions: Iterable[TopicPartition | tuple[str, int]]) -> None:
        """Stop fetching `partitions` and returning their records (those already fetched
        wait for `resume()`); their positions stay, and so does a group member's
        assignment. ValueError for a partition that is not assigned."""
        self._paused.update(self._assigned(partitions))

    def resume(self, partitions: Iterable[TopicPartition | tuple[str, int]]) -> None:
        """Fetch and return `partitions` again. ValueError for one not assigned."""
        self._paused.difference_update(self._assigned(partitions))

    def paused(self) -> set[TopicPartition]:
        """The assigned partitions that are paused."""
        return set(self._paused)

    async def seek_to_beginning(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Position at each partition's first offset; a partition without a leader now is
        positioned by a later poll, once it has one (so are the other seeks below)."""
        self._failed_now = set()
        await self._reset(list(partitions or self._positions), EARLIEST_TIMESTAMP)

    async def seek_to_end(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        self._failed_now = set()
        await self._reset(list(partitions or self._positions), LATEST_TIMESTAMP)

    async def seek_to_timestamp(
        self, timestamp_ms: int, partitions: Iterable[TopicPartition] | None = None
    ) -> None:
        """Position each partition at its first record with timestamp >= `timestamp_ms`
        (at the end when there is none)."""
        self._failed_now = set()
        await self._reset(list(partitions or self._positions), timestamp_ms)

    async def seek_to_committed(
        self, partitions: Iterable[TopicPartition | tuple[str, int]] | None = None
    ) -> None:
        """Position each of `partitions` (all assigned ones when None) at the group's
        committed offset; one without a committed offset gets its position from
        `auto_offset_reset` at the next poll. Records already fetched are dropped.
        Raises DwalError, RuntimeError without group_id, ValueError for a partition that is
        not assigned."""
        wanted = self._assigned(partitions)
        committed = await self.committed(wanted)
        for tp in wanted:
            if tp not in self._positions:  # revoked meanwhile
                continue
            offset = committed.get(tp, -1)
            if offset >= 0:
                self.seek(tp, offset)
            else:
                self._positions[tp] = None
                self._pending_resets.pop(tp, None)
                self._buffer.pop(tp, None)

    async def beginning_offsets(
        self, partitions: Iterable[TopicPartition | tuple[str, int]]
    ) -> dict[TopicPartition, int]:
        """Each partition's log start offset (assigned or not). Raises DwalError."""
        wanted = [TopicPartition(*tp) for tp in partitions]
        return await list_offsets(self.cluster, wanted, EARLIEST_TIMESTAMP)

    async def end_offsets(
        self, partitions: Iterable[TopicPartition | tuple[str, int]]
    ) -> dict[TopicPartition, int]:
        """Each partition's high watermark: the offset the next record will get (assigned
        or not). Raises DwalError."""
        wanted = [TopicPartition(*tp) for tp in partitions]
        return await list_offsets(self.cluster, wanted, LATEST_TIMESTAMP)

    async def offsets_for_times(
        self, timestamps: Mapping[TopicPartition | tuple[str, int], int]
    ) -> dict[TopicPartition, int | None]:
        """For each partition, the offset of the first batch holding a record with a
        timestamp at or after the given one (milliseconds; the batch's first records may be
        older), or None when there is no such record. Raises DwalError, ValueError for a
        negative timestamp."""
        by_timestamp: dict[int, list[TopicPartition]] = {}
        for partition, timestamp_ms in timestamps.items():
            if timestamp_ms < 0:
                raise ValueError("timestamps must not be negative")
            by_timestamp.setdefault(timestamp_ms, []).append(TopicPartition(*partition))
        found: dict[TopicPartition, int | None] = {}
        for timestamp_ms, partitions in by_timestamp.items():
            for tp, offset in (await list_offsets(self.cluster, partitions, timestamp_ms)).items():
                found[tp] = offset if offset >= 0 else None
        return found

    def position(self, partition: TopicPartition | tuple[str, int]) -> int | None:
        """The next offset to return: past every record returned so far (records fetched
        but not yet returned do not count); None before the partition has a position."""
        return self._positions.get(TopicPartition(*partition))

    def high_watermark(self, partition: TopicPartition | tuple[str, int]) -> int | None:
        """The last high watermark a fetch reported for the partition, or None."""
        return self._high_watermarks.get(TopicPartition(*partition))

    def statistics(self) -> ConsumerStatistics:
        return ConsumerStatistics(
            len(self._positions),
            self._records_returned,
            self._fetches,
            self._failed_polls,
            self._last_error,
            self._failing_since,
            {
                tp: PartitionFailure(t.attempts, t.last_error, t.failing_since_s)
                for tp, t in self._troubles.items()
                if tp in self._positions
            },
            sum(len(entry.records) - entry.index for entry in self._buffer.values()),
            len(self._paused),
        )

    def take_skipped(self) -> list[CorruptRecordError]:
        """The damaged batches skipped (with ``skip_corrupt``) since the last call, oldest
        first; at most `consumer_skipped_batches_max` (client/limits.py) are kept."""
        skipped = list(self._skipped)
        self._skipped.clear()
        return skipped

    async def _reset(self, partitions: list[TopicPartition], timestamp: int) -> None:
        """Position `partitions` by ListOffsets for `timestamp` (at the end where no record is
        that recent). A partition whose leader cannot answer now (a retriable error) keeps no
        position: the reset is resolved by a later poll, once it has a leader. Raises
        DwalError for errors that are not retriable."""
        found, failed = await list_offsets_where_possible(self.cluster, partitions, timestamp)
        too_recent = []
        for tp, offset in found.items():
            if offset < 0 and timestamp not in (EARLIEST_TIMESTAMP, LATEST_TIMESTAMP):
                too_recent.append(tp)
                continue
            self._positions[tp] = offset
            self._pending_resets.pop(tp, None)
            self._buffer.pop(tp, None)
        for tp, error in failed.items():
            if not self._is_transient(error):
                raise error
        for tp, error in failed.items():
            if tp in self._positions:
                self._positions[tp] = None
                self._pending_resets[tp] = timestamp
                self._buffer.pop(tp, None)
                self._note_partition_failure(tp, error)
        if too_recent:
            await self._reset(too_recent, LATEST_TIMESTAMP)

    async def _resolve_missing_positions(self) -> None:
        missing = [
            tp for tp, position in self._positions.items() if position is None and self._may_try(tp)
        ]
        if not missing:
            return
        default = [tp for tp in missing if tp not in self._pending_resets]
        if default and self.auto_offset_reset == "error":
            raise DwalError(
                ErrorCode.OFFSET_OUT_OF_RANGE,
                f"no position for {default[0].topic}-{default[0].partition} "
                "and auto_offset_reset is 'error'",
            )
        reset = EARLIEST_TIMESTAMP if self.auto_offset_reset == "earliest" else LATEST_TIMESTAMP
        by_timestamp: dict[int, list[TopicPartition]] = {}
        for tp in missing:
            by_timestamp.setdefault(self._pending_resets.get(tp, reset), []).append(tp)
        for timestamp, partitions in by_timestamp.items():
            await self._reset(partitions, timestamp)

    # -- partitions set aside -------------------------------------------------------------

    def _may_try(self, tp: TopicPartition) -> bool:
        """Whether this poll may try the partition: not failed in this poll already, and
        past its backoff (when every partition is failing, the poll's own backoff paces
        them all)."""
        if tp in self._failed_now:
            return False
        trouble = self._troubles.get(tp)
        return trouble is None or self._all_failing or trouble.retry_at_s <= trio.current_time()

    def _note_partition_failure(self, tp: TopicPartition, error: DwalError) -> None:
        """Set a partition aside after a retriable error, until its backoff has passed."""
        if tp not in self._positions:
            return
        self._poll_error = error
        trouble = self._troubles.get(tp)
        if tp in self._failed_now and trouble is not None:
            trouble.last_error = error  # one attempt per poll
            return
        self._failed_now.add(tp)
        now = trio.current_time()
        attempts = trouble.attempts + 1 if trouble is not None else 1
        backoff = min(self.retry_backoff_s * 2 ** min(attempts - 1, 30), self.retry_backoff_max_s)
        since = trouble.failing_since_s if trouble is not None else now
        self._troubles[tp] = _Trouble(attempts, error, since, now + backoff)

    async def _refresh_failing(self) -> None:
        """Ask for the metadata of the topics of partitions set aside whose backoff has
        passed (a leader may have been elected meanwhile). When every partition is failing,
        the failed polls drop all cached metadata anyway."""
        if self._all_failing:
            return
        now = trio.current_time()
        due = [
            tp
            for tp, trouble in self._troubles.items()
            if trouble.retry_at_s <= now and tp in self._positions
        ]
        if not due:
            return
        try:
            await self.cluster.refresh_metadata(sorted({tp.topic for tp in due}))
        except DwalError as error:
            if not self._is_transient(error):
                raise
            for tp in due:
                self._note_partition_failure(tp, error)

    def _fetchable(self) -> dict[TopicPartition, int | None]:
        """The positions to fetch in this poll: partitions with a position and a leader that
        are not set aside, not paused and without records waiting to be returned; a
        partition without a leader is set aside here."""
        positions: dict[TopicPartition, int | None] = {}
        for tp, position in self._positions.items():
            if position is None or tp in self._paused or tp in self._buffer:
                continue
            if not self._may_try(tp):
                continue
            if _leader_id(self.cluster, tp) < 0:
                message = f"{tp.topic}-{tp.partition} has no leader"
                self._note_partition_failure(tp, DwalError(ErrorCode.LEADER_NOT_AVAILABLE, message))
                continue
            positions[tp] = position
        return positions

    # -- consumer groups ----------------------------------------------------------------

    async def __aenter__(self) -> "Consumer":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """`close()`. When the block raised, an error of close (a revoke callback's, say) is
        logged rather than raised, so that it does not replace the block's own."""
        if exc_type is None:
            await self.close()
            return
        try:
            await self.close()
        except Exception as error:
            logger.warning("closing the consumer (after %s) failed: %r", exc_type.__name__, error)

    def subscribe(self, topics: Iterable[str] | None = None, *, pattern: str | None = None) -> None:
        """Join the group (heartbeats start at once; partitions are taken at the next poll)
        subscribed to `topics` or to every topic whose name matches the regular expression
        `pattern`; replaces any earlier subscription."""
        if self._membership is None:
            raise RuntimeError("subscribe() needs a consumer created with a group_id")
        if (topics is None) == (pattern is None):
            raise ValueError("subscribe to a list of topics or to a pattern")
        self._membership.subscribe(tuple(topics) if topics is not None else None, pattern)
        if not self._subscribed:
            self._subscribed = True
            self._membership.start()

    async def close(self) -> None:
        """Commit positions (with auto-commit), call `on_revoked` with the partitions owned
        (`on_lost` if the group had already removed this member), then leave the group and
        stop background work. The consumer owns no partitions afterwards. Does nothing when
        not subscribed. The group is left even if the callback raises or the call is
        cancelled."""
        membership = self._membership
        if membership is None or not self._subscribed:
            return
        try:
            owned = set(self._positions)
            if self.enable_auto_commit and owned and not membership.lost:
                await self._commit_quietly(dict(self._positions))  # still a member: commits
            if owned:
                try:
                    await _call(self._revoke_callback(membership.lost), owned)
                finally:
                    self._forget(owned)
        finally:
            self._subscribed = False
            with trio.CancelScope(shield=True):
                await membership.leave()

    def _revoke_callback(self, lost: bool) -> Callable[[set[TopicPartition]], Any] | None:
        """`on_lost` for partitions lost (the member was removed from the group), falling back
        to `on_revoked` when there is none, as Kafka's Java client does."""
        if lost and self.on_lost is not None:
            return self.on_lost
        return self.on_revoked

    async def _reconcile_within(self, wait_ms: int) -> bool:
        """Apply the group's latest assignment; when there is none yet, wait up to `wait_ms`
        for one. Only the waiting is bounded: a reconciliation, once begun, completes.
        Returns whether partitions are assigned."""
        membership = self._membership
        assert membership is not None
        deadline = trio.current_time() + wait_ms / 1000
        while True:
            if membership.error is not None:
                raise membership.error
            if membership.target is not None:
                await self._reconcile(membership)
            if self._positions:
                return True
            with trio.move_on_at(deadline) as waiting:
                if membership.joined.is_set():
                    await membership.changed.wait()
                else:
                    await membership.joined.wait()
            if waiting.cancelled_caught:
                return False

    async def _reconcile(self, membership: GroupMembership) -> None:
        """Give up the partitions the group took away and take the new ones. Partitions
        revoked are committed (auto-commit) and passed to `on_revoked` while still owned, so
        the callback may commit too; partitions lost (this member was removed from the group:
        all it owned) are passed to `on_lost`, uncommitted. New partitions start at their
        committed offsets and are passed to `on_assigned`. The coordinator is told what the
        consumer owns afterwards, also when a callback raises."""
        target = membership.target
        assert target is not None
        owned = set(self._positions)
        lost = membership.lost
        gone = owned if lost else owned - target
        try:
            if gone:
                if self.enable_auto_commit and not lost:
                    await self._commit_quietly({tp: self._positions[tp] for tp in gone})
                try:
                    await _call(self._revoke_callback(lost), gone)
                finally:
                    self._forget(gone)
            added = set(target) - set(self._positions)
            if added:
                committed = await self.committed(added)
                for tp in added:
                    offset = committed.get(tp)
                    self._positions[tp] = offset if offset is not None and offset >= 0 else None
                    if offset is not None and offset >= 0:
                        self._committed_positions[tp] = offset
                await _call(self.on_assigned, added)
        finally:
            membership.acknowledge(frozenset(self._positions))

    async def commit(
        self,
        offsets: Mapping[TopicPartition, int | OffsetAndMetadata | tuple[int, str | None]]
        | None = None,
    ) -> None:
        """Commit `offsets` (next offset to read, per partition; a value may be an
        `OffsetAndMetadata(offset, metadata)`, or a tuple of the two, to store a metadata
        string with the offset), or the current positions of every assigned partition.
        Each commit replaces a partition's offset and metadata (None when not given).
        Returns once the commit is durable. Raises DwalError (e.g. UNKNOWN_MEMBER_ID or
        FENCED_MEMBER_EPOCH when this member was removed from the group), TypeError for a
        metadata that is not a string."""
        if self.group_id is None or self._membership is None:
            raise RuntimeError("commit() needs a consumer created with a group_id")
        if offsets is None:
            offsets = {tp: p for tp, p in self._positions.items() if p is not None}
        wanted = {TopicPartition(*tp): _offset_and_metadata(value) for tp, value in offsets.items()}
        membership = self._membership
        if membership.lost:  # fenced: those partitions may have a new owner already
            wanted = {tp: o for tp, o in wanted.items() if tp in (membership.target or ())}
        if not wanted:
            return
        in_group = self._subscribed and membership.member_id is not None
        by_topic: dict[str, list[dict]] = {}
        for tp, (offset, metadata) in wanted.items():
            by_topic.setdefault(tp.topic, []).append(
                {"partition": tp.partition, "offset": offset, "metadata": metadata}
            )
        response = await membership.call(
            ApiKey.OFFSET_COMMIT,
            {
                "group_id": self.group_id,
                "member_id": membership.member_id if in_group else None,
                "member_epoch": membership.member_epoch if in_group else -1,
                "topics": [{"topic": t, "partitions": p} for t, p in by_topic.items()],
            },
        )
        for entry in response.body["topics"]:
            for part in entry["partitions"]:
                if part["error_code"]:
                    code = error_code_from_wire(part["error_code"])
                    raise DwalError(code, part["error_message"])
        self._committed_positions.update((tp, o.offset) for tp, o in wanted.items())
        self._last_commit = trio.current_time()

    async def _commit_quietly(self, positions: dict[TopicPartition, int | None]) -> None:
        offsets = {
            tp: p
            for tp, p in positions.items()
            if p is not None and self._committed_positions.get(tp) != p
        }
        try:
            await self.commit(offsets)
        except DwalError as error:  # fenced or unreachable: the next owner re-reads; log it
            logger.warning("commit of %d partitions failed: %s", len(offsets), error)

    async def _auto_commit(self, positions: dict[TopicPartition, int | None]) -> None:
        self._last_commit = trio.current_time()
        await self._commit_quietly(positions)

    @overload
    async def committed(
        self,
        partitions: Iterable[TopicPartition | tuple[str, int]],
        *,
        with_metadata: Literal[False] = False,
    ) -> dict[TopicPartition, int]: ...

    @overload
    async def committed(
        self,
        partitions: Iterable[TopicPartition | tuple[str, int]],
        *,
        with_metadata: Literal[True],
    ) -> dict[TopicPartition, OffsetAndMetadata]: ...

    async def committed(
        self, partitions: Iterable[TopicPartition | tuple[str, int]], *, with_metadata: bool = False
    ) -> dict[TopicPartition, int] | dict[TopicPartition, OffsetAndMetadata]:
        """The group's committed offsets of `partitions` (-1 where none); with
        `with_metadata`, `OffsetAndMetadata(offset, metadata)` per partition (-1 and None
        where nothing is committed). Raises DwalError."""
        if self.group_id is None or self._membership is None:
            raise RuntimeError("committed() needs a consumer created with a group_id")
        by_topic: dict[str, list[int]] = {}
        for topic, partition in partitions:
            by_topic.setdefault(topic, []).append(partition)
        response = await self._membership.call(
            ApiKey.OFFSET_FETCH,
            {
                "group_id": self.group_id,
                "topics": [{"topic": t, "partitions": p} for t, p in by_topic.items()],
            },
        )
        found: dict[TopicPartition, OffsetAndMetadata] = {}
        for entry in response.body["topics"]:
            for part in entry["partitions"]:
                tp = TopicPartition(entry["topic"], part["partition"])
                if part["error_code"]:
                    code = error_code_from_wire(part["error_code"])
                    raise DwalError(code, f"{tp.topic}-{tp.partition}: {code.name}")
                found[tp] = OffsetAndMetadata(part["offset"], part["metadata"])
        if with_metadata:
            return found
        return {tp: committed.offset for tp, committed in found.items()}

    def lag(self, partition: TopicPartition | tuple[str, int]) -> int | None:
        """High watermark (as last fetched) minus position: records not yet returned."""
        tp = TopicPartition(*partition)
        position, high_watermark = self._positions.get(tp), self._high_watermarks.get(tp)
        if position is None or high_watermark is None:
            return None
        return max(high_watermark - position, 0)

    @property
    def member_id(self) -> str | None:
        return self._membership.member_id if self._membership is not None else None

    # -- fetching -------------------------------------------------------------------------

    async def poll(
        self, timeout_ms: int | None = None, *, max_records: int | None = None
    ) -> dict[TopicPartition, list[Record]]:
        """Fetch what is available (waiting up to `timeout_ms`, default `max_wait_ms`);
        returns records by partition, each list in offset order, possibly empty. At most
        `max_records` records (default `max_poll_records`; None: all that was fetched) are
        returned: the rest stay buffered and come first at the next poll, without a fetch.

        A retriable failure (see the module docstring) returns nothing and counts in
        `statistics()`; the next poll first waits out the retry backoff. Raises DwalError for
        unknown topics or out-of-range positions under "error", the last retriable error once
        `give_up_after_ms` has passed, CorruptRecordError at a damaged batch (only after
        the records before it were returned, and again at each poll until a seek past it),
        RecordDeserializationError when a deserializer fails (likewise), and
        MalformedResponseError (a DwalError) for an answer that breaks the protocol.

        While a poll's records are being processed, the next fetch is already on its way
        (one prefetch per leader at most, from where the records fetched end), so a consumer
        that keeps up overlaps its work with the broker's and the network's.

        Safe to cancel: positions move only in the synchronous step that builds the result,
        so a cancelled poll has returned nothing and skipped nothing."""
        wait_ms = self.max_wait_ms if timeout_ms is None else max(timeout_ms, 0)
        if max_records is None:
            max_records = self.max_poll_records
        elif max_records <= 0:
            raise ValueError("max_records must be positive")
        if self._failed_polls:
            await trio.sleep(self._backoff_s())
        self._raise_damage()
        started = trio.current_time()
        try:
            records = await self._poll_once(wait_ms, max_records)
        except DwalError as error:
            if isinstance(error, CorruptRecordError) or not self._is_transient(error):
                raise
            self._note_failure(error, started)
            return {}
        except ProtocolError as error:  # bad bytes from a broker are a DwalError to users
            raise MalformedResponseError(
                f"a broker's answer broke the protocol: {error}"
            ) from error
        self._failed_polls, self._failing_since, self._last_error = 0, None, None
        return records

    # -- iteration ------------------------------------------------------------------------

    def __aiter__(self) -> "Consumer":
        return self

    async def __anext__(self) -> Record:
        """The next record of any assigned partition (``async for record in consumer``),
        following forever: it polls whenever nothing fetched is waiting. Each record's
        position is passed when it is returned, so an iteration cancelled (by a cancel scope
        around the loop) loses and repeats nothing: the records not yet returned stay for
        the next iteration or poll. Raises as `poll()` does."""
        while True:
            # Cancellation is checked before a record is taken, never after: a record taken
            # is always returned. Other tasks get to run every so many records.
            if self._iterated % _ITERATION_CHECKPOINT_EVERY:
                await trio.lowlevel.checkpoint_if_cancelled()
            else:
                await trio.lowlevel.checkpoint()
            if not self._poll_work_due():
                record = self._take_one()
                if record is not None:
                    self._iterated += 1
                    return record
            for records in (await self.poll(max_records=1)).values():
                self._iterated += 1
                return records[0]

    async def batches(
        self, *, max_records: int | None = None, timeout_ms: int | None = None
    ) -> AsyncIterator[list[Record]]:
        """``async for batch in consumer.batches(max_records=500)``: lists of records, each
        what one poll returns (at most `max_records`, default `max_poll_records`), flattened
        in partition order, each partition's records in offset order; every record says its
        topic and partition. Without `timeout_ms` it follows forever and never yields an
        empty list; with it, it yields an empty list after `timeout_ms` without records (time
        for periodic work). Cancelling loses nothing, as for `poll()`."""
        while True:
            polled = await self.poll(timeout_ms, max_records=max_records)
            if len(polled) == 1:
                batch = next(iter(polled.values()))
            else:
                batch = [record for records in polled.values() for record in records]
            if batch or timeout_ms is not None:
                yield batch

    def _poll_work_due(self) -> bool:
        """Whether the next record must come through `poll()`: a group change to apply, an
        automatic commit due, damage or a failure to report."""
        if self._failed_polls or self._damaged:
            return True
        membership = self._membership
        if membership is None:
            return False
        if self._subscribed and (membership.target is not None or membership.error is not None):
            return True
        return self.enable_auto_commit and (
            trio.current_time() - self._last_commit >= self.auto_commit_interval_s
        )

    def _take_one(self) -> Record | None:
        """The next buffered record of a partition that is not paused, its position moved
        past it; None if there is none. Raises RecordDeserializationError (leaving it)."""
        for tp, entry in self._buffer.items():
            if tp in self._paused:
                continue
            index = entry.index
            record = entry.records[index]
            if self.key_deserializer is not None or self.value_deserializer is not None:
                converted, failure = self._deserialized([record])
                if failure is not None:
                    raise failure
                record = converted[0]
            if index + 1 < len(entry.records):  # the usual case, inline: this runs per record
                entry.index = index + 1
                self._positions[tp] = record.offset + 1
                self._records_returned += 1
            else:
                self._advance(tp, entry, index + 1)
            return record  # _advance may have changed the dict: iterate no further
        return None

    def _drain(self, max_records: int | None) -> dict[TopicPartition, list[Record]]:
        """Take up to `max_records` (None: all) buffered records of partitions that are not
        paused, moving their positions. A deserializer failure ends the drain at the record
        concerned; it is raised when nothing comes before it."""
        out: dict[TopicPartition, list[Record]] = {}
        budget = -1 if max_records is None else max_records
        deserializing = self.key_deserializer is not None or self.value_deserializer is not None
        for tp in list(self._buffer):
            if tp in self._paused:
                continue
            if budget == 0:
                break
            entry = self._buffer[tp]
            records, start = entry.records, entry.index
            end = len(records) if budget < 0 else min(len(records), start + budget)
            taken = records if start == 0 and end == len(records) else records[start:end]
            failure = None
            if deserializing:
                taken, failure = self._deserialized(taken)
            if taken:
                out[tp] = taken
                self._advance(tp, entry, start + len(taken))
                if budget > 0:
                    budget -= len(taken)
            if failure is not None:
                if not out:
                    raise failure
                break
        return out

    def _advance(self, tp: TopicPartition, entry: _Buffered, end: int) -> None:
        """Return `entry.records` up to `end`: the position moves past them."""
        self._records_returned += end - entry.index
        self._positions[tp] = entry.records[end - 1].offset + 1
        if end < len(entry.records):
            entry.index = end
            return
        del self._buffer[tp]
        if entry.resume_at is not None:
            self._positions[tp] = max(entry.resume_at, entry.records[-1].offset + 1)

    def _deserialized(
        self, records: list[Record]
    ) -> tuple[list[Record], RecordDeserializationError | None]:
        """The records with key and value deserialized (None stays None), up to the first
        the deserializers fail on, and that failure."""
        key_of, value_of = self.key_deserializer, self.value_deserializer
        out: list[Record] = []
        for record in records:
            key, value = record.key, record.value
            part = "key"
            try:
                if key_of is not None and key is not None:
                    key = key_of(key)
                part = "value"
                if value_of is not None and value is not None:
                    value = value_of(value)
            except Exception as error:
                failure = RecordDeserializationError(record, part, error)
                failure.__cause__ = error
                return out, failure
            out.append(record._replace(key=key, value=value))
        return out, None

    def _is_transient(self, error: DwalError) -> bool:
        if error.retriable:
            return True
        # The group assigned it, so it exists: this client's metadata is behind.
        return self._subscribed and error.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION

    def _backoff_s(self) -> float:
        exponent = min(self._failed_polls - 1, 30)
        return min(self.retry_backoff_s * 2**exponent, self.retry_backoff_max_s)

    def _note_failure(self, error: DwalError, poll_started: float) -> None:
        """Count a failed poll; raises the error once polls have failed for too long (counted
        from the start of the first failed poll: a timed-out fetch already took a while)."""
        now = trio.current_time()
        self._failed_polls += 1
        self._last_error = error
        if self._failing_since is None:
            self._failing_since = poll_started
        self.cluster.invalidate_all()  # the next poll asks where partitions are now
        self._fetches_by_leader.clear()  # those in flight finish on their own
        failing_s = now - self._failing_since
        if self.give_up_after_s is not None and failing_s >= self.give_up_after_s:
            raise DwalError(
                error.code,
                f"gave up after {self._failed_polls} failed attempts in {failing_s:.1f} s: "
                f"{error.message}",
            )

    def _raise_damage(self) -> None:
        """Raise the damage found at a partition's position, unless it was sought past
        (records before it that are still buffered are returned first)."""
        for tp, (position, error) in list(self._damaged.items()):
            if tp in self._buffer:
                continue
            if self._positions.get(tp, -1) == position:
                raise error
            del self._damaged[tp]

    async def _poll_once(
        self, wait_ms: int, max_records: int | None
    ) -> dict[TopicPartition, list[Record]]:
        if self._subscribed:
            if not await self._reconcile_within(wait_ms):
                return {}
        elif not self._positions:
            raise RuntimeError("no partitions assigned")
        self._failed_now = set()
        self._poll_error = None
        self._troubles = {tp: t for tp, t in self._troubles.items() if tp in self._positions}
        self._all_failing = all(tp in self._troubles for tp in self._positions)
        await self._refresh_failing()
        await self._check_metadata(list(self._positions))
        await self._resolve_missing_positions()
        if self.enable_auto_commit and (
            trio.current_time() - self._last_commit >= self.auto_commit_interval_s
        ):
            # The application called poll again: it has processed what earlier polls
            # returned, so the positions as they stand now are safe to commit.
            await self._auto_commit(dict(self._positions))
        if any(tp not in self._paused for tp in self._buffer):
            return self._drain(max_records)  # records fetched earlier come first
        await self._check_metadata(list(self._positions))  # again: a commit may take a while
        wanted = self._fetchable()
        if not wanted:
            if self._poll_error is not None:
                raise self._poll_error  # nothing could be tried: the poll failed
            # every partition is set aside, paused or without a position yet: wait, but
            # not past the first backoff to end
            retry_at = min((t.retry_at_s for t in self._troubles.values()), default=float("inf"))
            await trio.sleep_until(min(retry_at, trio.current_time() + wait_ms / 1000))
            return {}
        return await self._fetch(wanted, wait_ms, max_records)

    async def _fetch(
        self, wanted: dict[TopicPartition, int | None], wait_ms: int, max_records: int | None
    ) -> dict[TopicPartition, list[Record]]:
        """Fetch `wanted` from their leaders, buffer what they answer and return up to
        `max_records` of it; then start the next fetch of each leader that answered."""
        fetches = self._start_fetches(wanted, wait_ms)
        deadline = trio.current_time() + wait_ms / 1000 + self.cluster.request_timeout_ms / 1000
        # Raise what must be raised before any position moves, so that raising loses nothing.
        responses = []
        answered_cleanly = []  # leaders whose answer had no partition error: prefetch
        read_some = False  # some partition's fetch was answered without error
        while True:
            answered = await self._wait_fetches(fetches, deadline)
            for leader, fetch in answered:
                self._fetches_by_leader.pop(leader, None)
                if fetch.error is not None:
                    if not self._is_transient_error(fetch.error):
                        raise fetch.error
                    assert isinstance(fetch.error, DwalError)
                    for tp in fetch.positions:
                        self._note_partition_failure(tp, fetch.error)
                    continue
                response = fetch.response
                assert response is not None
                self._fetches += 1
                failed = self._check_partition_errors(response.body)
                read = [tp for tp in _partitions_answered(response.body) if tp not in failed]
                for tp in read:
                    self._troubles.pop(tp, None)
                read_some = read_some or bool(read)
                if not failed:
                    answered_cleanly.append((leader, fetch))
                responses.append(response)
            # A fetch that failed at once (no leader, its leader unreachable), or whose
            # answer carries only partition errors, must not cut short the wait for the
            # other leaders' answers: ending the poll there, before a healthy partition's
            # long poll answers, would count it as failed though that partition is fine.
            fetches = [(leader, fetch) for leader, fetch in fetches if not fetch.done.is_set()]
            if read_some or not fetches:
                break
        damage: list[CorruptRecordError] = []
        for response in responses:
            self._take_records(response.body, response.tail, damage)
        records = self._drain(max_records)
        self._prefetch(answered_cleanly)
        if damage and not records:
            raise damage[0]  # nothing before it to deliver first
        if self._poll_error is not None and not records and not read_some:
            raise self._poll_error  # count it, and back off, rather than ask again at once
        return records

    def _prefetch(self, answered: list[tuple[int, "_Fetch"]]) -> None:
        """Start each leader's next fetch, from where its answer's records end (past the
        records still buffered too: a partition is fetched again only once they are all
        returned, and then the next poll finds this fetch asking for its very position)."""
        for leader, fetch in answered:
            following: dict[TopicPartition, int | None] = {}
            for tp in fetch.positions:
                if self._positions.get(tp) is None or tp in self._paused or tp in self._damaged:
                    continue
                entry = self._buffer.get(tp)
                following[tp] = entry.fetch_position() if entry else self._positions[tp]
            if following and following != fetch.positions and leader not in self._fetches_by_leader:
                self._fetches_by_leader[leader] = self._start_fetch(following, self.max_wait_ms)

    def _is_transient_error(self, error: Exception) -> bool:
        return isinstance(error, DwalError) and self._is_transient(error)

    def _start_fetches(
        self, positions: dict[TopicPartition, int | None], wait_ms: int
    ) -> list[tuple[int, "_Fetch"]]:
        """One fetch per leader broker of the partitions: the one in flight if it asks for
        these very positions, else a new one (a stale one finishes on its own: cancelling
        it would close the connection). Returns them by leader."""
        by_leader: dict[int, dict[TopicPartition, int | None]] = {}
        for tp, position in positions.items():
            by_leader.setdefault(_leader_id(self.cluster, tp), {})[tp] = position
        fetches = self._fetches_by_leader
        for leader in [leader for leader in fetches if leader not in by_leader]:
            del fetches[leader]
        for leader, wanted in by_leader.items():
            fetch = fetches.get(leader)
            if fetch is None or fetch.positions != wanted:
                fetches[leader] = self._start_fetch(wanted, wait_ms)
        return list(fetches.items())

    async def _wait_fetches(
        self, fetches: list[tuple[int, "_Fetch"]], deadline: float
    ) -> list[tuple[int, "_Fetch"]]:
        """Wait until at least one of `fetches` is answered (or failed); returns those that
        are. Raises REQUEST_TIMED_OUT (and abandons them all) if none is by `deadline`."""
        with trio.move_on_at(deadline):
            while not any(fetch.done.is_set() for _, fetch in fetches):
                self._fetch_answered = trio.Event()
                await self._fetch_answered.wait()
        answered = [(leader, fetch) for leader, fetch in fetches if fetch.done.is_set()]
        if not answered:
            for leader, fetch in fetches:
                fetch.cancel()  # closes the connection: a new one is opened next time
                self._fetches_by_leader.pop(leader, None)
            raise DwalError(ErrorCode.REQUEST_TIMED_OUT, "fetch got no answer in time")
        return answered

    async def _check_metadata(self, partitions: list[TopicPartition]) -> None:
        """Refresh metadata of topics whose cached partition count is too small for an
        assigned partition (the topic grew); raises UNKNOWN_TOPIC_OR_PARTITION if the broker
        does not know the partition either."""
        known = self.cluster.topics
        stale = sorted(
            {
                tp.topic
                for tp in partitions
                if tp.topic not in known or tp.partition >= len(known[tp.topic].partitions)
            }
        )
        if not stale:
            return
        found = await self.cluster.refresh_metadata(stale)
        for tp in partitions:
            if tp.topic not in stale:
                continue
            info = found.get(tp.topic)
            if isinstance(info, DwalError):
                raise info
            if info is None or tp.partition >= len(info.partitions):
                raise DwalError(
                    ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                    f"topic {tp.topic!r} has no partition {tp.partition}",
                )

    def _start_fetch(self, positions: dict[TopicPartition, int | None], wait_ms: int) -> "_Fetch":
        fetch = _Fetch(positions, self._note_fetch_answered)
        body = {
            "max_wait_ms": wait_ms,
            "min_bytes": self.min_bytes,
            "max_bytes": self.fetch_max_bytes,
            "topics": _group_by_topic(
                self.cluster, list(positions), positions, self.partition_max_bytes
            ),
        }
        self.cluster.start_task(fetch.run, self.cluster, body)
        return fetch

    def _note_fetch_answered(self) -> None:
        self._fetch_answered.set()

    def _check_partition_errors(self, body: dict) -> set[TopicPartition]:
        """Act on partition errors before any record is taken, so that raising loses none:
        out of range resets the position (with auto_offset_reset), retriable ones set their
        partition aside (returned), others raise."""
        transient: set[TopicPartition] = set()
        for entry in body["topics"]:
            for part in entry["partitions"]:
                if not part["error_code"]:
                    continue
                tp = TopicPartition(entry["topic"], part["partition"])
                code = error_code_from_wire(part["error_code"])
                said = part.get("error_message") or f"{code.name} (error code {part['error_code']})"
                message = f"{tp.topic}-{tp.partition}: {said}"
                if code == ErrorCode.OFFSET_OUT_OF_RANGE and self.auto_offset_reset != "error":
                    self._positions[tp] = None  # the next poll resets it
                elif code == ErrorCode.CORRUPT_MESSAGE:  # the broker found the damage itself
                    position = self._positions.get(tp) or 0
                    raise CorruptRecordError(tp.topic, tp.partition, position, None, message)
                elif self._is_transient(DwalError(code)):
                    self._note_partition_failure(tp, DwalError(code, message))
                    transient.add(tp)
                else:
                    raise DwalError(code, message)
        return transient

    def _take_records(
        self, body: dict, tail: bytes | memoryview, damage: list[CorruptRecordError]
    ) -> None:
        """Buffer the records of one fetch answer by partition; damage found is noted and
        appended to `damage`. Positions do not move: records move them when returned."""
        view = memoryview(tail)
        position = 0
        for entry in body["topics"]:
            for part in entry["partitions"]:
                tp = TopicPartition(entry["topic"], part["partition"])
                chunk = view[position : position + part["size"]]
                position += part["size"]
                if part["error_code"]:
                    continue
                self._high_watermarks[tp] = part["high_watermark"]
                self._buffer_records_of(tp, chunk, damage)

    def _buffer_records_of(
        self, tp: TopicPartition, chunk: memoryview, damage: list[CorruptRecordError]
    ) -> None:
        expected = self._positions.get(tp)
        if expected is None or not len(chunk) or tp in self._buffer:
            return  # not asked for (an answer naming partitions it was not asked for)
        error = None
        try:
            records = decode_records(
                chunk, allow_partial_tail=True, topic=tp.topic, partition=tp.partition
            )
        except ProtocolError:
            records, error = decode_until_damage(tp, chunk, expected)
            records = [r._replace(topic=tp.topic, partition=tp.partition) for r in records]
        if records and records[0].offset < expected:
            # offsets increase but may have gaps (compacted topics): search, do not count
            records = records[bisect.bisect_left(records, expected, key=_offset_of) :]
        if records:
            self._buffer[tp] = _Buffered(records)
        if error is not None:
            after = records[-1].offset + 1 if records else expected
            self._note_damage(tp, error, after, damage)

    def _note_damage(
        self,
        tp: TopicPartition,
        error: CorruptRecordError,
        after: int,
        damage: list[CorruptRecordError],
    ) -> None:
        """Damage in `tp` after the records buffered (`after`: where they end): skip it
        (`skip_corrupt`), or raise it once those records are returned."""
        if self.skip_corrupt and error.skippable:
            assert error.last_offset is not None
            logger.warning("skipping %s", error.message)
            self._skipped.append(error)
            resume_at = max(error.last_offset + 1, after)
            entry = self._buffer.get(tp)
            if entry is not None:
                entry.resume_at = resume_at
            else:
                self._positions[tp] = resume_at
            return
        self._damaged[tp] = (after, error)
        damage.append(error)


_ITERATION_CHECKPOINT_EVERY = 256  # records returned by `async for` between two yields

_KEYWORD_DEFAULTS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in inspect.signature(Consumer.__init__).parameters.items()
    if parameter.kind == inspect.Parameter.KEYWORD_ONLY
}


def _translate(options: Mapping[str, Any], explicit: Mapping[str, Any]) -> dict[str, Any]:
    """The Consumer's keyword arguments for Kafka-spelled `options`. Raises
    UnknownOptionError for an option the Consumer does not take (saying where it belongs,
    or naming close matches) and for one also given as the DWAL keyword in `explicit`."""
    for name in options:
        where = _CONSUMER_ELSEWHERE.get(dotted(name))
        if where is not None:
            raise UnknownOptionError(f"Consumer does not take {name!r}: {where}")
    translated = translate(options, CONSUMER_OPTIONS, "Consumer")
    for keyword in translated:
        if keyword in explicit:
            spelt = next(
                name for name in options if CONSUMER_OPTIONS[dotted(name)].keyword == keyword
            )
            raise UnknownOptionError(f"Consumer: {spelt!r} and {keyword!r} are the same option")
    return translated


async def _call(
    callback: Callable[[set[TopicPartition]], Any] | None, partitions: set[TopicPartition]
) -> None:
    if callback is not None:
        result = callback(set(partitions))
        if inspect.isawaitable(result):
            await result


def _leader_id(cluster: Cluster, tp: TopicPartition) -> int:
    """The partition's leader as the metadata cache says; -1 if the cache does not know."""
    info = cluster.topics.get(tp.topic)
    if info is None or tp.partition >= len(info.partitions):
        return -1
    return info.partitions[tp.partition].leader


def _leader_epoch(cluster: Cluster, tp: TopicPartition) -> int:
    """The leader epoch the metadata cache knows for the partition; -1 if it knows none. The
    cache never goes back to an older epoch, so a fetch carrying it is refused by a broker
    that still thinks it leads in an older one (UNKNOWN_LEADER_EPOCH) instead of being
    answered from its stale log, whose end may lie below this consumer's position."""
    info = cluster.topics.get(tp.topic)
    if info is None or tp.partition >= len(info.partitions):
        return -1
    return info.partitions[tp.partition].leader_epoch


def _offset_and_metadata(value: int | OffsetAndMetadata | tuple[int, str | None]):
    if isinstance(value, int):
        return OffsetAndMetadata(value)
    offset, metadata = value
    if metadata is not None and not isinstance(metadata, str):
        raise TypeError(f"commit metadata must be a string or None, got {metadata!r}")
    return OffsetAndMetadata(offset, metadata)


def _offset_of(record: Record) -> int:
    return record.offset


def _partitions_answered(body: dict) -> list[TopicPartition]:
    return [
        TopicPartition(entry["topic"], part["partition"])
        for entry in body["topics"]
        for part in entry["partitions"]
    ]


logger = logging.getLogger("dwal.client")


class _Fetch:
    """One Fetch request running in the cluster's nursery; its outcome waits in `done`."""

    def __init__(
        self, positions: dict[TopicPartition, int | None], on_done: Callable[[], None]
    ) -> None:
        self.positions = positions  # partitions of one leader broker
        self.done = trio.Event()
        self._on_done = on_done
        self.response: Response | None = None
        self.error: Exception | None = None
        self._scope = trio.CancelScope()

    def cancel(self) -> None:
        """Abandon the fetch; cancelling a request awaiting its answer closes its connection."""
        self._scope.cancel()

    async def run(self, cluster: Cluster, body: dict) -> None:
        try:
            with self._scope:
                connection = await cluster.leader_connection(
                    *next(iter(self.positions)), purpose="fetch"
                )
                self.response = await connection.request(ApiKey.FETCH, body)
        except DwalError as error:
            self.error = error
        except ProtocolError as error:  # bad bytes from the broker: a DwalError to users
            self.error = MalformedResponseError(f"a fetch answer broke the protocol: {error}")
        finally:
            self.done.set()
            self._on_done()


def _group_by_topic(
    cluster: Cluster, partitions: list[TopicPartition], positions: dict, max_bytes: int
) -> list[dict]:
    topics: dict[str, list[dict]] = {}
    for tp in partitions:
        topics.setdefault(tp.topic, []).append(
            {
                "partition": tp.partition,
                "fetch_offset": positions[tp],
                "max_bytes": max_bytes,
                "current_leader_epoch": _leader_epoch(cluster, tp),
            }
        )
    return [{"topic": topic, "partitions": parts} for topic, parts in topics.items()]


async def list_offsets(
    cluster: Cluster, partitions: list[TopicPartition], timestamp: int
) -> dict[TopicPartition, int]:
    """Offsets for `timestamp` (or EARLIEST_TIMESTAMP / LATEST_TIMESTAMP) per partition;
    -1 where no record is that recent. Raises DwalError on unknown topics, and the error of
    the first partition that could not be answered (LEADER_NOT_AVAILABLE while it has no
    leader, for example)."""
    found, failed = await list_offsets_where_possible(cluster, partitions, timestamp)
    for error in failed.values():
        raise error
    return found


async def list_offsets_where_possible(
    cluster: Cluster, partitions: list[TopicPartition], timestamp: int
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, DwalError]]:
    """Like `list_offsets`, but per partition: returns the offsets found and, for every
    other partition, the error that kept it from an answer (no leader, leader moved, leader
    unreachable, unknown topic ...); each leader broker is asked for its partitions."""
    found: dict[TopicPartition, int] = {}
    failed: dict[TopicPartition, DwalError] = {}
    if not partitions:
        return found, failed
    for topic in sorted({tp.topic for tp in partitions}):
        try:
            await cluster.topic(topic)
        except DwalError as error:
            failed.update((tp, error) for tp in partitions if tp.topic == topic)
    by_leader: dict[int, list[TopicPartition]] = {}
    for tp in partitions:
        if tp not in failed:
            by_leader.setdefault(_leader_id(cluster, tp), []).append(tp)
    for group in by_leader.values():
        try:
            answered = await _list_offsets_of_one_leader(cluster, group, timestamp)
        except DwalError as error:
            failed.update((tp, error) for tp in group)
            continue
        for tp, outcome in answered.items():
            if isinstance(outcome, DwalError):
                failed[tp] = outcome
            else:
                found[tp] = outcome
    return found, failed


async def _list_offsets_of_one_leader(
    cluster: Cluster, partitions: list[TopicPartition], timestamp: int
) -> dict[TopicPartition, int | DwalError]:
    topics: dict[str, list[dict]] = {}
    for tp in partitions:
        topics.setdefault(tp.topic, []).append({"partition": tp.partition, "timestamp": timestamp})
    connection = await cluster.leader_connection(*partitions[0])
    response = await cluster.call(
        ApiKey.LIST_OFFSETS,
        {"topics": [{"topic": t, "partitions": p} for t, p in topics.items()]},
        connection=connection,
    )
    out: dict[TopicPartition, int | DwalError] = {}
    for entry in response.body["topics"]:
        for part in entry["partitions"]:
            tp = TopicPartition(entry["topic"], part["partition"])
            if part["error_code"]:
                code = error_code_from_wire(part["error_code"])
                message = part.get("error_message") or f"{tp.topic}-{tp.partition}: {code.name}"
                out[tp] = DwalError(code, message)
            else:
                out[tp] = part["offset"]
    return out


__all__ = [
    "Consumer",
    "TopicPartition",
    "ConsumerStatistics",
    "PartitionFailure",
    "list_offsets",
    "list_offsets_where_possible",
]
