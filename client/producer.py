"""The producer: per-partition batching, key partitioning, retries, delivery results.

Theory of operation. `send()` packs a record (``[timestamp_delta, key, value, headers]``)
into the open batch of its partition and returns a `Delivery`. A batch is sealed when it
reaches `batch_size` bytes or has lingered `linger_ms`; the sender task encodes sealed
batches and writes, per leader broker, one Produce request carrying the ready batches of each
partition it leads with fewer than `max_in_flight_per_partition` requests in flight. The
sender writes requests one after another and the broker appends a connection's requests in
the order they arrive, so a partition's records are stored in `send()` order. A partition's
requests in flight all go to one broker: when its leader moves, the partition waits until
its requests to the old leader are answered before it sends to the new one. A retry waits
`retry_backoff_ms`, during which its partition sends nothing. Without idempotence, a retried
batch keeps that order when `max_in_flight_per_partition` is 1; with more (the default, 5,
as Kafka's), a batch that fails with a partition-level retriable error while a later batch
of its partition succeeds is stored after it, as in Kafka without idempotence. With
idempotence the order holds across retries (below).
Buffered bytes are bounded by `buffer_bytes_max`: `send()` waits for space when full.

Leaders. Each partition's batches go to its leader as the cluster's metadata cache knows it.
A broker that does not lead the partition (NOT_LEADER_OR_FOLLOWER), or no leader at all
(LEADER_NOT_AVAILABLE, NOT_CONTROLLER), or a leader epoch mismatch (FENCED_LEADER_EPOCH,
UNKNOWN_LEADER_EPOCH), refuses before appending: metadata is refreshed and
the batch sent again after `retry_backoff_ms`, as often as needed within
`delivery_timeout_ms` (these do not count against `retries`). So is a leader that cannot be
reached (the connection is refused or times out: its broker died and metadata still names
it), since nothing was sent to it. UNKNOWN_TOPIC_OR_PARTITION,
which a broker answers while news of a topic spreads, refreshes and counts against `retries`,
so that a deleted topic fails soon.

Retries never store a record twice unless the caller asks for it. A failure is either
"not stored" (an error the broker answered before appending, or a connection that failed
before the request was written whole: the broker never saw it) or "outcome unknown" (the
request was written, then the connection broke, the answer timed out, or the broker
reported an error after appending). Without idempotence only the first kind is retried;
the second fails the records with `DeliveryOutcomeUnknown` unless `retry_unknown_outcome` is
set (at-least-once: a resent batch may be stored twice). With idempotence both are retried.

Idempotence (`enable_idempotence`, on by default with acks=all, as Kafka 3's) makes retries
exactly-once per partition: the broker recognises a resent batch and answers its original
offset instead of storing it again. Before the first batch is sent, InitProducerId (to any
broker, retried within the delivery timeout) gives a producer id at epoch 0. A batch is
stamped with the id, the epoch and its partition's next sequence (the count of the
partition's records stamped before it, wrapping at 2**31) when it is first put in a request;
a retry sends the same bytes. A request carries one batch per partition (the broker refuses
more), and up to 5 requests per partition may be in flight (the broker remembers a
producer's last 5 batches per partition). Order: retries go back in line in sequence order;
a retried batch is sent alone, once its partition has nothing in flight, and a later batch
that the broker refused with OUT_OF_ORDER_SEQUENCE_NUMBER because an earlier one is missing
is retried after it. DUPLICATE_SEQUENCE_NUMBER is a success.

Sequence gaps (KIP-360). A batch with a sequence that fails for good (delivery timeout,
retries spent, a non-retriable error) leaves a gap for which the broker would refuse every
later batch of its partition. The producer then bumps its epoch locally (epoch + 1; past
32767 it asks for a new producer id) once no request is in flight: every partition's
sequences start again at 0, which the broker accepts from a newer epoch. Batches waiting in
line get new stamps when sent, except those an earlier attempt may have stored: sent under
the new epoch the broker could not recognise them, so they fail with
`DeliveryOutcomeUnknown` rather than risk a second copy. UNKNOWN_PRODUCER_ID (the broker lost
the producer's state) bumps the epoch too, and the batch is retried under it (unless it may
be stored). INVALID_PRODUCER_EPOCH (the broker saw a newer epoch of this id, which this
producer never sent) fails the batch, and a new producer id is asked for. A broker that does
not know InitProducerId (UNKNOWN_API_KEY, UNSUPPORTED_VERSION) turns idempotence off unless
it was asked for explicitly (then the batches fail).

Sizes: no batch exceeds the topic's max.message.bytes (nor segment.bytes), as the broker
reports them in its metadata, nor the producer's `request_bytes_max`; a record that cannot
fit in a batch of its own is refused by `send()` with MESSAGE_TOO_LARGE, alone: it never
enters a batch, so the records sent around it are not affected.

Keys. A keyed record goes to partition `hash(key) % partition_count`, the hash being Kafka's
murmur2 (protocol/partitioning.py) unless `partitioner="crc32"` (DWAL's hash before). Pure
Python murmur2 costs about a microsecond per short key, so the hashes of recent keys are
remembered in a bounded dict (most workloads repeat keys).

Outcomes. Every record's outcome reaches its `Delivery`; `flush()` also returns the failures
since the previous flush, counted per partition and error. `on_delivery` callbacks are not
called where an outcome is decided (often deep in the state changes above, where a callback
calling back into the producer would see them half done): finished batches that have
callbacks go in line for the callback task, which calls them one after another. A callback
that raises stops the producer as a failing trio task does: the callback task raises once
it has called the other callbacks due, which cancels the producer's block and propagates out
of it; records still without an outcome then fail as at any close, and their callbacks are
called during the close.
"""

from __future__ import annotations

import collections
import inspect
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import trio

from client.cluster import Cluster
from client.connection import ConnectionFailed
from client.exception_groups import unwrapped_errors
from client.kafka_options import CONVERTERS, KafkaOption, UnknownOptionError, dotted, translate
from client.limits import LIMITS
from protocol import (
    ACKS_ALL,
    ACKS_LEADER,
    ACKS_NONE,
    HEADER_BYTES,
    ApiKey,
    Compression,
    DwalError,
    ErrorCode,
    ProtocolError,
    encode_packed_batch,
)
from protocol.partitioning import DEFAULT_PARTITIONER, key_hash
from protocol.record_batch import (
    RECORDS_PER_BATCH_MAX,
    SUPPORTED_COMPRESSION,
    with_producer_state,
)

RECORD_OVERHEAD_BYTES = 8
# msgpack's largest overhead on [timestamp_delta, key, value, []] beyond the key's and value's
# bytes: array 1, int 9, two bin headers of 5 (or nil 1), empty array 1.
PACKED_RECORD_OVERHEAD_BYTES_MAX = 1 + 9 + 5 + 5 + 1 - RECORD_OVERHEAD_BYTES
ARRAY_HEADER_BYTES_MAX = 5  # msgpack array header of a batch's records
_NO_HEADERS: tuple = ()

# Refusals by a broker that does not lead the partition, or while none does, or whose view
# of leader epochs differs from ours: nothing was appended; retried after a metadata refresh
# until the delivery timeout, not counted against `retries`.
_LEADER_ERRORS = frozenset(
    {
        ErrorCode.NOT_LEADER_OR_FOLLOWER,
        ErrorCode.LEADER_NOT_AVAILABLE,
        ErrorCode.NOT_CONTROLLER,
        ErrorCode.FENCED_LEADER_EPOCH,
        ErrorCode.UNKNOWN_LEADER_EPOCH,
    }
)
# Errors after which the topic's metadata is asked for again before the retry.
_REFRESH_ERRORS = _LEADER_ERRORS | {
    ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
    ErrorCode.NETWORK_EXCEPTION,
}

# An idempotent producer's epoch is an i16 in the batch header: past it, a new producer id.
PRODUCER_EPOCH_MAX = 2**15 - 1
SEQUENCE_WRAP = 2**31  # sequences are i32 and wrap from 2**31 - 1 to 0, as Kafka's

# InitProducerId answers of a broker that does not know the request (older than the
# idempotent producer): a producer whose idempotence was not asked for explicitly goes on
# without it.
_IDEMPOTENCE_UNSUPPORTED = frozenset({ErrorCode.UNKNOWN_API_KEY, ErrorCode.UNSUPPORTED_VERSION})

# Errors a broker may report after it appended the batch (an fsync or replication wait that
# timed out or failed, an internal error): resending could store the records twice.
_MAYBE_APPENDED = frozenset(
    {
        ErrorCode.REQUEST_TIMED_OUT,
        ErrorCode.KAFKA_STORAGE_ERROR,
        ErrorCode.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        ErrorCode.NETWORK_EXCEPTION,
        ErrorCode.UNKNOWN_SERVER_ERROR,
    }
)


class DeliveryOutcomeUnknown(DwalError):
    """The record's Produce request was written to the broker, but no definite answer came
    back (the connection broke, the answer timed out, or the broker reported an error that
    may follow the append): the record may or may not be stored. The code says what
    happened (NETWORK_EXCEPTION, REQUEST_TIMED_OUT, ...)."""


class ProducerClosed(DwalError):
    """The producer closed (its block raised or was cancelled) before the record was sent:
    it was not stored."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.NETWORK_EXCEPTION, message)


@dataclass(frozen=True, slots=True)
class _TopicLimits:
    record_packed_bytes_max: int  # one packed record, alone in a batch
    batch_packed_bytes_max: int  # the packed records of one batch
    partition_request_bytes_max: int  # one partition's batches in one Produce request
    limit_bytes: int  # the limit these derive from
    limit_text: str  # that limit, as errors name it: "max.message.bytes (1000) of topic 't'"


@dataclass(frozen=True, slots=True)
class RecordMetadata:
    """Where a record was written."""

    topic: str
    partition: int
    offset: int  # -1 with acks=0: the broker does not say
    timestamp: int


# Called once per record with its outcome: (metadata, None) or (None, error).
DeliveryCallback = Callable[[RecordMetadata | None, DwalError | None], object]


@dataclass(frozen=True, slots=True)
class DeliveryFailure:
    """Records of one partition that failed with one kind of error (same type and code),
    as `Producer.flush()` reports them."""

    topic: str
    partition: int
    record_count: int
    error: DwalError  # the first of these records' errors


class _Batch:
    """Records of one partition sent together; also the delivery state they share.

    Records are msgpack-packed into `packer` as they arrive, so an open batch holds one
    growing buffer rather than a Python object per record.
    """

    __slots__ = (
        "topic",
        "partition",
        "packer",
        "count",
        "size_bytes",
        "base_timestamp",
        "max_timestamp",
        "created",
        "encoded",
        "attempts",
        "base_offset",
        "error",
        "done",
        "sequence",
        "packed_bytes_bound",
        "in_flight",
        "maybe_stored",
        "producer_id",
        "producer_epoch",
        "base_sequence",
        "last_error",
        "callbacks",
    )

    def __init__(self, topic: str, partition: int, base_timestamp: int, created: float) -> None:
        self.topic = topic
        self.partition = partition
        self.packer = msgpack.Packer(use_bin_type=True, autoreset=False)
        self.count = 0
        self.size_bytes = 0
        self.base_timestamp = base_timestamp
        self.max_timestamp = base_timestamp
        self.created = created
        self.encoded: bytes | None = None
        self.attempts = 0
        self.base_offset = -1
        self.error: DwalError | None = None
        self.done = trio.Event()
        self.sequence = 0  # set when sealed: batches of a partition are sent in this order
        self.packed_bytes_bound = 0  # at least the size of the packed records
        self.in_flight = False  # written in a Produce request whose answer is awaited
        self.maybe_stored = False  # an attempt's outcome was unknown
        # An idempotent producer's stamp, given when the batch is first put in a request
        # (base_sequence -1: not stamped); the broker dedups a resend by it.
        self.producer_id = -1
        self.producer_epoch = -1
        self.base_sequence = -1
        self.last_error: DwalError | None = None  # of the last failed attempt
        # (index in the batch, timestamp, callback) of the records sent with a callback
        self.callbacks: list[tuple[int, int, DeliveryCallback]] | None = None

    def fits(self, record_bytes: int, packed_bytes_max: int) -> bool:
        """Whether a record of `record_bytes` packed still fits; makes the size bound exact."""
        view = self.packer.getbuffer()
        self.packed_bytes_bound = len(view)
        view.release()
        return self.packed_bytes_bound + record_bytes <= packed_bytes_max

    def encode(self, compression: Compression) -> bytes:
        if self.encoded is None:
            self.encoded = encode_packed_batch(
                self.packer.getbuffer(),
                self.count,
                base_timestamp=self.base_timestamp,
                max_timestamp=self.max_timestamp,
                compression=compression,
                producer_id=self.producer_id,
                producer_epoch=self.producer_epoch,
                base_sequence=self.base_sequence,
            )
            self.packer = None  # the packed records now live in `encoded` only
        return self.encoded

    def stamp(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        """Give the batch an idempotent producer's id, epoch and first sequence; bytes
        already encoded (to learn their size, or under an earlier epoch) get the new stamp
        and CRC, the body unchanged."""
        self.producer_id = producer_id
        self.producer_epoch = producer_epoch
        self.base_sequence = base_sequence
        if self.encoded is not None:
            self.encoded = with_producer_state(
                self.encoded,
                producer_id=producer_id,
                producer_epoch=producer_epoch,
                base_sequence=base_sequence,
            )


class Delivery:
    """The outcome of one `send()`: `await delivery.wait()` gives its RecordMetadata."""

    __slots__ = ("_batch", "_index", "_timestamp")

    def __init__(self, batch: _Batch, index: int, timestamp: int) -> None:
        self._batch = batch
        self._index = index
        self._timestamp = timestamp

    @property
    def done(self) -> bool:
        return self._batch.done.is_set()

    @property
    def error(self) -> DwalError | None:
        return self._batch.error

    def result(self) -> RecordMetadata:
        """The record's metadata once done; raises its DwalError, or RuntimeError if pending."""
        batch = self._batch
        if not batch.done.is_set():
            raise RuntimeError("the record is not delivered yet")
        if batch.error is not None:
            raise batch.error
        return _record_metadata(batch, self._index, self._timestamp)

    async def wait(self) -> RecordMetadata:
        """Wait for the broker's answer; returns RecordMetadata or raises DwalError."""
        await self._batch.done.wait()
        return self.result()


def _record_metadata(batch: _Batch, index: int, timestamp: int) -> RecordMetadata:
    """Where the record at `index` of a batch that succeeded was written."""
    offset = batch.base_offset + index if batch.base_offset >= 0 else -1
    return RecordMetadata(batch.topic, batch.partition, offset, timestamp)


@dataclass(frozen=True)
class ProducerStatistics:
    buffered_bytes: int
    open_batches: int
    ready_batches: int
    inflight_requests: int
    records_sent: int
    batches_failed: int
    idempotent: bool = False  # whether batches carry a producer id and sequences
    producer_id: int = -1  # the idempotent producer's id; -1: none (yet)
    producer_epoch: int = -1
    producer_ids_obtained: int = 0  # InitProducerId answers: 1, plus one per epoch overflow
    epoch_bumps: int = 0  # local epoch bumps after a batch with a sequence failed for good


_time = time.time
logger = logging.getLogger("dwal.client")


def _idempotence_conflicts(acks: int, retries: int, max_in_flight_per_partition: int) -> list[str]:
    """The options that rule idempotence out, each as what idempotence needs instead."""
    inflight_max = LIMITS.producer_idempotent_inflight_requests_per_partition_max
    return [
        need
        for wrong, need in (
            (
                acks != ACKS_ALL,
                f"acks='all' (not {acks}): with fewer, a new leader may lack batches that "
                "the producer's sequences count as stored",
            ),
            (retries == 0, "retries > 0 (it exists to retry safely)"),
            (
                max_in_flight_per_partition > inflight_max,
                f"max_in_flight_per_partition <= {inflight_max} (not "
                f"{max_in_flight_per_partition}): brokers recognise a resend among a producer's "
                f"last {inflight_max} batches of a partition",
            ),
        )
        if wrong
    ]


def _supported_compression(name: str) -> Compression:
    """The codec called `name`; ValueError for an unknown one or one DWAL cannot write
    (snappy, which Kafka has)."""
    compression = Compression.from_name(name)
    if compression not in SUPPORTED_COMPRESSION:
        raise ValueError(f"compression {name!r} is not supported: use none, gzip, lz4 or zstd")
    return compression


def _parse_acks(acks: int | str) -> int:
    if acks in ("all", -1, "-1"):
        return ACKS_ALL
    if acks in (1, "1"):
        return ACKS_LEADER
    if acks in (0, "0"):
        return ACKS_NONE
    raise ValueError(f"acks must be 0, 1 or 'all', not {acks!r}")


@dataclass
class _PartitionQueue:
    ready: collections.deque = field(default_factory=collections.deque)
    inflight: int = 0  # produce requests carrying this partition's batches
    leader: int = -1  # the broker its requests in flight went to (while inflight > 0)
    backing_off: int = 0  # retries waiting out `retry_backoff_ms`: nothing is sent meanwhile
    next_sequence: int = 0  # the idempotent producer's next sequence in this partition


class Producer:
    """Produce records to a cluster. Use as ``async with Producer(cluster) as producer:``.

    Leaving the block flushes every buffered record (unless the block raised) and stops the
    sender; records without an outcome then fail (`ProducerClosed` if never sent,
    `DeliveryOutcomeUnknown` if their request awaited its answer). Options: `acks` (0, 1 or
    "all"), `linger_ms`, `batch_size` (bytes), `compression` ("none", "gzip", "lz4",
    "zstd"), `retries` of retriable errors with `retry_backoff_ms`, `retry_unknown_outcome`
    (resend batches that may be stored already: at-least-once, may duplicate),
    `delivery_timeout_ms` (no retry starts later than this after a batch was opened),
    `buffer_bytes_max` (send waits when full), `request_bytes_max` (also the largest record),
    `enable_idempotence` (None: on with acks="all" unless retries=0 or
    max_in_flight_per_partition > 5; True with any of those raises ValueError),
    `on_delivery` (a callback per record, see `send`), `partitioner` ("murmur2", Kafka's, or
    "crc32"), `key_serializer` and `value_serializer` (object -> bytes, applied by `send`).

    Kafka's option names are accepted too, as further keyword arguments (`compression_type`,
    `buffer_memory`, `max_in_flight_requests_per_connection`, ...: PRODUCER_KAFKA_OPTIONS)
    or through `from_config`; an option the producer does not take raises
    UnknownOptionError naming where it belongs or the close matches.
    """

    def __init__(
        self,
        cluster: Cluster,
        *,
        acks: int | str = 1,
        linger_ms: float = LIMITS.producer_linger_ms,
        batch_size: int = LIMITS.producer_batch_bytes,
        compression: str = "none",
        retries: int = LIMITS.producer_retries,
        retry_backoff_ms: int = LIMITS.producer_retry_backoff_ms,
        buffer_bytes_max: int = LIMITS.producer_buffer_bytes_max,
        request_bytes_max: int = LIMITS.producer_request_bytes_max,
        request_timeout_ms: int = LIMITS.producer_request_timeout_ms,
        max_in_flight_per_partition: int = LIMITS.producer_inflight_requests_per_partition_max,
        allow_auto_topic_creation: bool = True,
        retry_unknown_outcome: bool = False,
        delivery_timeout_ms: int = LIMITS.producer_delivery_timeout_ms,
        enable_idempotence: bool | None = None,
        on_delivery: DeliveryCallback | None = None,
        partitioner: str = DEFAULT_PARTITIONER,
        key_serializer: Callable[[Any], bytes] | None = None,
        value_serializer: Callable[[Any], bytes] | None = None,
        **kafka_options: Any,
    ) -> None:
        if kafka_options:
            arguments = locals()
            given = {name: arguments[name] for name in _KEYWORDS}
            Producer.__init__(self, cluster, **_with_kafka_options(given, kafka_options))
            return
        parsed_acks = _parse_acks(acks)
        problems = [
            message
            for wrong, message in (
                (batch_size < 1, f"batch_size must be at least 1, not {batch_size}"),
                (
                    buffer_bytes_max < batch_size,
                    f"buffer_bytes_max ({buffer_bytes_max}) must be at least batch_size "
                    f"({batch_size})",
                ),
                (linger_ms < 0, f"linger_ms must not be negative, not {linger_ms}"),
                (retries < 0, f"retries must not be negative, not {retries}"),
                (
                    max_in_flight_per_partition < 1,
                    "max_in_flight_per_partition must be at least 1, not "
                    f"{max_in_flight_per_partition}",
                ),
                (
                    request_timeout_ms < 1,
                    f"request_timeout_ms must be at least 1, not {request_timeout_ms}",
                ),
                (
                    delivery_timeout_ms < 1,
                    f"delivery_timeout_ms must be at least 1, not {delivery_timeout_ms}",
                ),
                *(
                    (not callable(function), f"{name} must be callable, not {function!r}")
                    for name, function in (
                        ("on_delivery", on_delivery),
                        ("key_serializer", key_serializer),
                        ("value_serializer", value_serializer),
                    )
                    if function is not None
                ),
            )
            if wrong
        ]
        conflicts = _idempotence_conflicts(parsed_acks, retries, max_in_flight_per_partition)
        if enable_idempotence and conflicts:
            problems += [f"enable_idempotence=True needs {conflict}" for conflict in conflicts]
        if problems:
            raise ValueError("; ".join(problems))
        self._key_hash = key_hash(partitioner)  # ValueError naming the choices
        # On by default where it can be (acks=all), as in Kafka 3; off where the other
        # options exclude it, unless it was asked for (then they raised above).
        self.idempotent = enable_idempotence if enable_idempotence is not None else not conflicts
        self._idempotence_explicit = enable_idempotence is not None
        self.max_in_flight_per_partition = max_in_flight_per_partition
        self.cluster = cluster
        self.acks = parsed_acks
        self.linger_s = linger_ms / 1000
        self.batch_size = batch_size
        self.compression = _supported_compression(compression)
        self.retries = retries
        self.retry_backoff_s = retry_backoff_ms / 1000
        self.buffer_bytes_max = buffer_bytes_max
        self.request_bytes_max = request_bytes_max
        self.request_timeout_ms = request_timeout_ms
        self.allow_auto_topic_creation = allow_auto_topic_creation
        self.retry_unknown_outcome = retry_unknown_outcome
        self.delivery_timeout_s = delivery_timeout_ms / 1000
        self.on_delivery = on_delivery
        self.partitioner = partitioner
        self.key_serializer = key_serializer
        self.value_serializer = value_serializer
        # hashes of recent keys (bounded: cleared when full): see "Keys" above
        self._key_hashes: dict[bytes, int] = {}
        # finished batches whose callbacks the callback task has yet to call
        self._callbacks_due: collections.deque[_Batch] = collections.deque()
        self._callbacks_wakeup = trio.Event()
        # failures since the last flush: (topic, partition, error type, code) -> count, first
        self._failures: dict[tuple[str, int, type, ErrorCode], list[Any]] = {}
        self._partition_counts: dict[str, int] = {}
        self._topic_limits: dict[str, _TopicLimits] = {}
        self._sticky: dict[str, int] = {}
        self._open: dict[tuple[str, int], _Batch] = {}
        self._queues: dict[tuple[str, int], _PartitionQueue] = collections.defaultdict(
            _PartitionQueue
        )
        self._topics_to_load: set[str] = set()  # ready batches wait for their metadata
        self._unroutable: list[tuple[str, int, list[_Batch]]] = []  # taken; no leader known
        self._buffered_bytes = 0
        self._unfinished: set[_Batch] = set()  # batches without an outcome yet
        self._inflight_requests = 0
        self._sealed_batches = 0
        self._records_sent = 0
        self._batches_failed = 0
        # The idempotent producer's state: id and epoch (-1 until InitProducerId answers),
        # and what must happen before the next batch is stamped (see the module docstring).
        self._producer_id = -1
        self._producer_epoch = -1
        self._producer_id_wanted = False  # a task is asking a broker for a producer id
        self._producer_id_error: DwalError | None = None  # its last failure
        self._epoch_bump_due = False  # a batch with a sequence failed for good
        self._new_producer_id_due = False  # the broker refused our epoch
        self._producer_ids_obtained = 0
        self._epoch_bumps = 0
        self._wakeup = trio.Event()
        self._progress = trio.Event()  # set (and replaced) whenever a batch completes
        self._nursery: trio.Nursery | None = None
        self._closed = False

    @classmethod
    def from_config(
        cls, cluster: Cluster, config: Mapping[str, Any], **keywords: Any
    ) -> "Producer":
        """A producer configured by a dict of Kafka options (``{"linger.ms": 5}``, dotted or
        underscored names, values of the right type or their string forms, as
        confluent-kafka or kafka-python take them); DWAL's own option names
        (``"buffer_bytes_max"``) are accepted too. `keywords` are passed on as they are.

        Raises UnknownOptionError (a TypeError) for an option the producer does not take
        (naming where it belongs, or the close matches) or one given twice, ValueError for a
        value of the wrong type or out of range."""
        native = {name: value for name, value in config.items() if _is_native(name)}
        kafka = {name: value for name, value in config.items() if not _is_native(name)}
        twice = sorted(native.keys() & keywords.keys())
        if twice:
            raise UnknownOptionError(f"Producer: {twice[0]!r} is both in the config and a keyword")
        given = {**native, **keywords}
        return cls(cluster, **_with_kafka_options(given, kafka, explicit=set(given)))

    # -- life cycle -------------------------------------------------------------------

    async def __aenter__(self) -> "Producer":
        if self._nursery is not None or self._closed:
            raise RuntimeError("a Producer can be used in one `async with` block only")
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._sender)
        self._nursery.start_soon(self._callback_task)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool | None:
        assert self._nursery is not None
        if exc_type is None:
            try:
                await self.flush()
            except BaseException as error:  # flushing failed or was cancelled: close with it
                exc_type, exc, tb = type(error), error, error.__traceback__
        self._closed = True
        self._nursery.cancel_scope.cancel()
        try:
            with unwrapped_errors():
                suppressed = await self._nursery_manager.__aexit__(exc_type, exc, tb)
        except BaseException:
            self._close_deliveries(propagating=True)
            raise
        self._close_deliveries(propagating=exc is not None and not suppressed)
        if suppressed:
            return True
        if exc is not None:
            raise exc
        return None

    def _close_deliveries(self, *, propagating: bool) -> None:
        """Give every record without an outcome its failure and call the callbacks still
        due. A callback's exception is raised unless another exception is `propagating`
        (then it is logged, as are any further ones)."""
        self._fail_unfinished()
        errors = self._call_callbacks_due()
        if errors and not propagating:
            _log_callback_errors(errors[1:])
            raise errors[0]
        _log_callback_errors(errors)

    def _fail_unfinished(self) -> None:
        """The producer stopped: give every record still without an outcome its failure, so
        that no `Delivery.wait()` hangs."""
        self._open.clear()
        self._queues.clear()
        for batch in sorted(self._unfinished, key=_sequence_of):
            if batch.in_flight or batch.maybe_stored:
                error: DwalError = DeliveryOutcomeUnknown(
                    ErrorCode.NETWORK_EXCEPTION,
                    "the producer was closed while the record's request awaited its answer: "
                    "the record may or may not have been stored",
                )
            else:
                error = ProducerClosed("the producer was closed before the record was sent")
            self._fail(batch, error)

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("the producer is closed")
        if self._nursery is None:
            raise RuntimeError(
                "the producer is not started: use it as "
                "`async with Producer(cluster) as producer:` (it sends nothing outside)"
            )

    def statistics(self) -> ProducerStatistics:
        return ProducerStatistics(
            self._buffered_bytes,
            len(self._open),
            sum(len(q.ready) for q in self._queues.values()),
            self._inflight_requests,
            self._records_sent,
            self._batches_failed,
            self.idempotent,
            self._producer_id,
            self._producer_epoch,
            self._producer_ids_obtained,
            self._epoch_bumps,
        )

    # -- the per-record path ------------------------------------------------------------

    async def send(
        self,
        topic: str,
        value: Any,
        key: Any = None,
        *,
        partition: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> Delivery:
        """Buffer one record; returns its Delivery. Waits only when the buffer is full or the
        topic's metadata is not known yet. `on_delivery` (instead of the producer's) is
        called with the record's outcome (see the module docstring). Raises DwalError for an
        unknown topic or a record too large (MESSAGE_TOO_LARGE: for the topic, or above
        `request_bytes_max`), TypeError for a value or key that is not bytes, str or None
        once serialized, whatever a serializer raises, RuntimeError outside the producer's
        `async with` block. Cancelling it while it waits sends nothing."""
        self._check_usable()
        count = self._partition_counts.get(topic)
        if count is None:
            count = await self._load_topic(topic)
        while self._buffered_bytes >= self.buffer_bytes_max:
            await self._wait_progress()
        return self.send_nowait(
            topic,
            value,
            key,
            partition=partition,
            headers=headers,
            timestamp_ms=timestamp_ms,
            on_delivery=on_delivery,
            _count=count,
        )

    async def send_and_wait(
        self,
        topic: str,
        value: Any,
        key: Any = None,
        *,
        partition: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> RecordMetadata:
        """Send one record and wait for its outcome: returns its RecordMetadata, raises its
        DwalError (or what `send` raises). The record waits in its batch like any other
        (up to `linger_ms`). Cancelling it once the record is buffered does not withdraw
        the record: it may still be stored."""
        delivery = await self.send(
            topic, value, key, partition=partition, headers=headers, timestamp_ms=timestamp_ms
        )
        return await delivery.wait()

    def send_nowait(
        self,
        topic: str,
        value: Any,
        key: Any = None,
        *,
        partition: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
        on_delivery: DeliveryCallback | None = None,
        _count: int | None = None,
    ) -> Delivery:
        """Like `send` but never waits: raises trio.WouldBlock when the buffer is full or the
        topic's metadata is not loaded yet (`await send()` once to load it)."""
        if self._closed or self._nursery is None:
            self._check_usable()
        count = _count or self._partition_counts.get(topic)
        if count is None or self._buffered_bytes >= self.buffer_bytes_max:
            raise trio.WouldBlock
        if value is not None and self.value_serializer is not None:
            value = self.value_serializer(value)
        if key is not None and self.key_serializer is not None:
            key = self.key_serializer(key)
        if type(value) is not bytes and value is not None:
            value = _to_bytes(value, "value")
        if key is not None and type(key) is not bytes:
            key = _to_bytes(key, "key")
        if partition is None:
            if key is not None:
                key_hash = self._key_hashes.get(key)
                if key_hash is None:
                    key_hash = self._hash_key(key)
                partition = key_hash % count
            else:
                partition = self._sticky.get(topic)
                if partition is None or partition >= count:
                    partition = self._sticky_partition(topic, count)
        elif not 0 <= partition < count:
            raise DwalError(
                ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                f"topic {topic!r} has no partition {partition}",
            )
        timestamp = timestamp_ms if timestamp_ms is not None else int(_time() * 1000)
        record_headers = _checked_headers(headers) if headers else _NO_HEADERS
        limits = self._topic_limits[topic]
        size = (
            (len(value) if value is not None else 0)
            + (len(key) if key is not None else 0)
            + RECORD_OVERHEAD_BYTES
        )
        # The packed size is at most `bound`; exact sizes are computed only near a limit,
        # which keeps the per-record path cheap.
        if record_headers:
            bound = _packed_record_bytes(-(2**63), key, value, record_headers)
        else:
            bound = size + PACKED_RECORD_OVERHEAD_BYTES_MAX
        if bound > limits.record_packed_bytes_max:
            alone_bytes = _packed_record_bytes(0, key, value, record_headers)
            if alone_bytes > limits.record_packed_bytes_max:
                raise DwalError(
                    ErrorCode.MESSAGE_TOO_LARGE,
                    f"a record of {alone_bytes + HEADER_BYTES + 1} bytes (in a batch of its "
                    f"own) exceeds {limits.limit_text}",
                )
        batch = self._open.get((topic, partition))
        if batch is not None and (
            batch.count >= RECORDS_PER_BATCH_MAX
            or (
                batch.packed_bytes_bound + bound > limits.batch_packed_bytes_max
                and not batch.fits(
                    _packed_record_bytes(
                        timestamp - batch.base_timestamp, key, value, record_headers
                    ),
                    limits.batch_packed_bytes_max,
                )
            )
        ):
            self._seal(batch)
            batch = None
        if batch is None:
            batch = self._open_batch(topic, partition, timestamp)
        batch.packer.pack((timestamp - batch.base_timestamp, key, value, record_headers))
        batch.packed_bytes_bound += bound
        if timestamp > batch.max_timestamp:
            batch.max_timestamp = timestamp
        batch.size_bytes += size
        self._buffered_bytes += size
        delivery = Delivery(batch, batch.count, timestamp)
        callback = on_delivery if on_delivery is not None else self.on_delivery
        if callback is not None:
            if batch.callbacks is None:
                batch.callbacks = []
            batch.callbacks.append((batch.count, timestamp, callback))
        batch.count += 1
        if batch.size_bytes >= self.batch_size:
            self._seal(batch)
        return delivery

    def _hash_key(self, key: bytes) -> int:
        """The partitioner's hash of `key`, remembered if the key is short (the memory is
        bounded: it is forgotten whole when full)."""
        hashed = self._key_hash(key)
        if len(key) <= LIMITS.producer_key_hash_cache_key_bytes_max:
            if len(self._key_hashes) >= LIMITS.producer_key_hash_cache_keys_max:
                self._key_hashes.clear()
            self._key_hashes[key] = hashed
        return hashed

    def _sticky_partition(self, topic: str, count: int) -> int:
        partition = random.randrange(count)
        self._sticky[topic] = partition
        return partition

    def _open_batch(self, topic: str, partition: int, timestamp: int) -> _Batch:
        batch = _Batch(topic, partition, timestamp, trio.current_time())
        self._open[(topic, partition)] = batch
        self._unfinished.add(batch)
        if len(self._open) == 1:
            self._wakeup.set()  # the sender starts this batch's linger timer
        return batch

    def _seal(self, batch: _Batch) -> None:
        key = (batch.topic, batch.partition)
        del self._open[key]
        self._sealed_batches += 1
        batch.sequence = self._sealed_batches
        self._queues[key].ready.append(batch)
        if self._sticky.get(batch.topic) == batch.partition:
            count = self._partition_counts.get(batch.topic, 1)
            if count > 1:  # a sealed batch moves keyless records on to another partition
                self._sticky[batch.topic] = (
                    batch.partition + 1 + random.randrange(count - 1)
                ) % count
        self._wakeup.set()

    async def _load_topic(self, topic: str) -> int:
        info = await self.cluster.topic(
            topic, allow_auto_topic_creation=self.allow_auto_topic_creation
        )
        self._topic_limits[topic] = self._limits_of(
            topic, info.max_message_bytes, info.segment_bytes
        )
        self._partition_counts[topic] = len(info.partitions)
        return len(info.partitions)

    def _limits_of(self, topic: str, max_message_bytes: int, segment_bytes: int) -> _TopicLimits:
        """A batch may not exceed max.message.bytes, nor one partition's data in a request
        segment.bytes (the broker refuses either whole), nor the producer's request limit."""
        if max_message_bytes < 0:
            max_message_bytes = LIMITS.producer_message_bytes_max_unknown
        if 0 <= segment_bytes < max_message_bytes:
            limit_bytes, limit_name = segment_bytes, "segment.bytes"
        else:
            limit_bytes, limit_name = max_message_bytes, "max.message.bytes"
        limit_text = f"{limit_name} ({limit_bytes}) of topic {topic!r}"
        if self.request_bytes_max < limit_bytes:
            limit_bytes = self.request_bytes_max
            limit_text = f"the producer's request_bytes_max ({limit_bytes})"
        batch_bytes = limit_bytes - HEADER_BYTES - ARRAY_HEADER_BYTES_MAX
        if self.compression != Compression.NONE:
            # room for a codec's expansion of incompressible data (zstd, lz4, gzip bounds)
            batch_bytes -= batch_bytes // 128 + 64
        return _TopicLimits(
            record_packed_bytes_max=limit_bytes - HEADER_BYTES - 1,
            batch_packed_bytes_max=max(batch_bytes, 1),
            partition_request_bytes_max=segment_bytes if segment_bytes > 0 else 2**62,
            limit_bytes=limit_bytes,
            limit_text=limit_text,
        )

    async def _wait_progress(self) -> None:
        self._wakeup.set()
        await self._progress.wait()

    async def flush(self) -> list[DeliveryFailure]:
        """Send every buffered record and wait until each has its outcome (success or error)
        and its callback, if any, has been called; records sent meanwhile (by a callback,
        by another task) are waited for too. Returns the failures since the previous
        flush (counted per partition and kind of error, in the order they happened; empty
        when every record succeeded); raises nothing for them. Raises RuntimeError outside
        the producer's `async with` block. Safe to cancel: the records are still sent."""
        self._check_usable()
        while True:
            # records sent meanwhile (by a callback, by another task) are sent at once too
            for batch in list(self._open.values()):
                self._seal(batch)
            if not (self._unfinished or self._callbacks_due):
                break
            await self._wait_progress()
        # A callback that raised has cancelled the producer's block (even if nothing was left
        # to wait for when it did): that cancellation is delivered here, not the failures.
        await trio.lowlevel.checkpoint()
        failures = [
            DeliveryFailure(topic, partition, count, first)
            for (topic, partition, _, _), (count, first) in self._failures.items()
        ]
        self._failures = {}
        return failures

    # -- the sender task ----------------------------------------------------------------

    async def _sender(self) -> None:
        while True:
            deadline = min(
                (b.created + self.linger_s for b in self._open.values()), default=float("inf")
            )
            if self.idempotent and self._producer_id < 0:
                deadline = min(deadline, self._producer_id_wait_deadline())
            with trio.move_on_at(deadline):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            now = trio.current_time()
            for batch in [b for b in self._open.values() if b.created + self.linger_s <= now]:
                self._seal(batch)
            if self.idempotent:
                self._prepare_producer_state(now)
            while requests := self._take_ready():
                for leader, by_topic in requests.items():
                    await self._send(leader, by_topic)
            self._fail_unroutable()
            if self._topics_to_load:
                await self._load_topics()
            await trio.lowlevel.checkpoint()

    def _take_ready(self) -> dict[int, dict[str, list[tuple[int, list[_Batch]]]]]:
        """Ready batches for one Produce request per leader broker (each at most
        `request_bytes_max`), from partitions with fewer than `max_in_flight_per_partition`
        requests in flight. A partition with requests in flight to another broker waits
        for their answers; one whose leader is unknown goes to `_topics_to_load` (topic not
        in the cache) or `_unroutable` (no leader)."""
        requests: dict[int, dict[str, list[tuple[int, list[_Batch]]]]] = {}
        request_bytes: dict[int, int] = {}
        topics = self.cluster.topics
        brokers = self.cluster.brokers
        if self.idempotent and (self._producer_id < 0 or self._epoch_bump_due):
            return requests  # nothing can be stamped yet: see _prepare_producer_state
        for key, queue in self._queues.items():
            if (
                queue.inflight >= self.max_in_flight_per_partition
                or not queue.ready
                or queue.backing_off
            ):
                continue
            topic, partition = key
            info = topics.get(topic)
            if info is None:
                self._topics_to_load.add(topic)
                continue
            partitions = info.partitions
            leader = partitions[partition].leader if partition < len(partitions) else -1
            if leader not in brokers:
                if queue.inflight:
                    continue  # its answers first: they may put earlier batches back in line
                queue.inflight += 1
                queue.leader = -1
                batches, _ = self._take_batches(queue, topic, self.request_bytes_max)
                self._unroutable.append((topic, partition, batches))
                continue
            if queue.inflight and queue.leader != leader:
                continue  # one request stream per partition at a time: keeps its order
            used = request_bytes.get(leader, 0)
            if used >= self.request_bytes_max:
                continue
            if self.idempotent:
                if queue.inflight and queue.ready[0].base_sequence >= 0:
                    continue  # a retry goes alone, once its partition has nothing in flight
                batches, size = self._take_stamped(queue)
            else:
                batches, size = self._take_batches(queue, topic, self.request_bytes_max - used)
            request_bytes[leader] = used + size
            queue.inflight += 1
            queue.leader = leader
            requests.setdefault(leader, {}).setdefault(topic, []).append((partition, batches))
        return requests

    def _take_batches(
        self, queue: _PartitionQueue, topic: str, budget_bytes: int
    ) -> tuple[list[_Batch], int]:
        """The partition's first ready batches, at least one, while under `budget_bytes`
        and the topic's limit on one partition's data in a request; with their size."""
        partition_bytes_max = self._topic_limits[topic].partition_request_bytes_max
        batches: list[_Batch] = []
        partition_bytes = 0
        while queue.ready and partition_bytes < budget_bytes:
            size = len(queue.ready[0].encode(self.compression))
            if batches and partition_bytes + size > partition_bytes_max:
                break  # the broker refuses one partition's data above segment.bytes
            batches.append(queue.ready.popleft())
            partition_bytes += size
        return batches, partition_bytes

    def _take_stamped(self, queue: _PartitionQueue) -> tuple[list[_Batch], int]:
        """The partition's first ready batch, alone (a broker takes one batch per partition
        of an idempotent producer in a request), stamped with its sequence unless it has
        one (a retry: then its bytes are those sent before); with its size."""
        batch = queue.ready.popleft()
        if batch.base_sequence < 0:
            batch.stamp(self._producer_id, self._producer_epoch, queue.next_sequence)
            queue.next_sequence = (queue.next_sequence + batch.count) % SEQUENCE_WRAP
        assert (batch.producer_id, batch.producer_epoch) == (
            self._producer_id,
            self._producer_epoch,
        ), "a batch of an older epoch was left in line"
        return [batch], len(batch.encode(self.compression))

    def _fail_unroutable(self) -> None:
        """Batches of partitions without a leader fail this attempt (retried after a refresh)."""
        unroutable, self._unroutable = self._unroutable, []
        for topic, partition, batches in unroutable:
            error = DwalError(ErrorCode.LEADER_NOT_AVAILABLE, f"{topic}-{partition} has no leader")
            self._complete(topic, partition, batches, error)

    async def _load_topics(self) -> None:
        """Ask for the metadata of topics whose ready batches wait for it; if that fails,
        their batches fail this attempt with the error (retried if it allows)."""
        topics, self._topics_to_load = sorted(self._topics_to_load), set()
        errors: dict[str, DwalError] = {}
        try:
            found = await self.cluster.refresh_metadata(topics)
        except DwalError as failed:
            errors = dict.fromkeys(topics, failed)
        else:
            for topic in topics:
                info = found.get(topic)
                if info is None:
                    info = DwalError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"no topic {topic!r}")
                if isinstance(info, DwalError):
                    errors[topic] = info
        for (topic, partition), queue in list(self._queues.items()):
            error = errors.get(topic)
            if (
                error is None
                or not queue.ready
                or queue.inflight >= self.max_in_flight_per_partition
                or queue.backing_off
            ):
                continue
            batches = list(queue.ready)
            queue.ready.clear()
            queue.inflight += 1
            self._complete(topic, partition, batches, error)
        self._wakeup.set()

    # -- the idempotent producer's id, epoch and sequences -------------------------------

    def _prepare_producer_state(self, now: float) -> None:
        """Before batches are stamped: bump the epoch if due, once no request is in flight
        (answers still to come may settle batches of the old epoch); ask for a producer id
        when batches wait for one; fail those whose delivery timeout passed meanwhile."""
        if self._epoch_bump_due and self._inflight_requests == 0:
            self._reset_producer_state()
        if self._producer_id >= 0:
            return
        if not self._producer_id_wanted and any(q.ready for q in self._queues.values()):
            self._producer_id_wanted = True
            assert self._nursery is not None
            self._nursery.start_soon(self._obtain_producer_id)
        self._expire_waiting(now)

    def _reset_producer_state(self) -> None:
        """Bump the epoch (KIP-360), or drop the producer id to ask for a new one (past the
        largest epoch, or after INVALID_PRODUCER_EPOCH), and start every partition's
        sequences again at 0: the broker accepts a newer epoch from sequence 0 on. Batches
        waiting in line lose their stamp (they get one of the new epoch when sent), except
        those an earlier attempt may have stored: sent again under the new epoch, the broker
        could not recognise them, so they fail with DeliveryOutcomeUnknown."""
        assert self._inflight_requests == 0
        self._epoch_bump_due = False
        if self._new_producer_id_due or self._producer_epoch >= PRODUCER_EPOCH_MAX:
            self._new_producer_id_due = False
            self._producer_id = self._producer_epoch = -1
        else:
            self._producer_epoch += 1
            self._epoch_bumps += 1
        for queue in self._queues.values():
            queue.next_sequence = 0
            kept: collections.deque[_Batch] = collections.deque()
            for batch in queue.ready:
                if batch.maybe_stored:
                    self._fail(batch, _unresolved_after_reset(batch))
                else:
                    batch.base_sequence = -1  # stamped again when sent
                    kept.append(batch)
            queue.ready = kept

    def _producer_id_wait_deadline(self) -> float:
        """When the first batch waiting for a producer id reaches its delivery timeout."""
        return min(
            (
                q.ready[0].created + self.delivery_timeout_s
                for q in self._queues.values()
                if q.ready
            ),
            default=float("inf"),
        )

    def _expire_waiting(self, now: float) -> None:
        """Batches that waited for a producer id until their delivery timeout fail with the
        last InitProducerId error (a partition's line is in opening order, so the expired
        batches lead it)."""
        last = self._producer_id_error
        error = DwalError(
            last.code if last is not None else ErrorCode.REQUEST_TIMED_OUT,
            "no producer id could be obtained within delivery_timeout_ms"
            + (f": {last.message}" if last is not None else ""),
        )
        for queue in self._queues.values():
            while queue.ready and now >= queue.ready[0].created + self.delivery_timeout_s:
                self._fail(queue.ready.popleft(), error)

    async def _obtain_producer_id(self) -> None:
        """Ask brokers in turn for a producer id while batches wait for one, retrying
        retriable errors after `retry_backoff_ms` (the waiting batches fail at their delivery
        timeout meanwhile). A refusal that is not retriable fails the waiting batches, or,
        from a broker that does not know the request while idempotence was not asked for
        explicitly, turns idempotence off. Ends with the sender woken."""
        try:
            while any(queue.ready for queue in self._queues.values()):
                try:
                    self._producer_id, self._producer_epoch = await self._init_producer_id()
                except DwalError as error:
                    self._producer_id_error = error
                    if error.retriable:
                        await trio.sleep(self.retry_backoff_s)
                        continue
                    self._refused_producer_id(error)
                    return
                self._producer_ids_obtained += 1
                self._producer_id_error = None
                return
        finally:
            self._producer_id_wanted = False
            self._wakeup.set()

    async def _init_producer_id(self) -> tuple[int, int]:
        """One InitProducerId request to some broker: the new producer id and its epoch.
        Raises DwalError (ConnectionFailed, REQUEST_TIMED_OUT, the broker's refusal,
        UNKNOWN_SERVER_ERROR for a malformed answer)."""
        try:
            connection = await self.cluster.any_connection(rotate=True)
            response = await self.cluster.call(ApiKey.INIT_PRODUCER_ID, {}, connection=connection)
        except ProtocolError as malformed:
            raise DwalError(
                ErrorCode.UNKNOWN_SERVER_ERROR, f"malformed InitProducerId answer: {malformed}"
            ) from None
        producer_id = response.body["producer_id"]
        producer_epoch = response.body["producer_epoch"]
        if producer_id < 0 or not 0 <= producer_epoch <= PRODUCER_EPOCH_MAX:
            raise DwalError(
                ErrorCode.UNKNOWN_SERVER_ERROR,
                f"InitProducerId answered producer id {producer_id}, epoch {producer_epoch}",
            )
        return producer_id, producer_epoch

    def _refused_producer_id(self, error: DwalError) -> None:
        if (
            error.code in _IDEMPOTENCE_UNSUPPORTED
            and not self._idempotence_explicit
            and self._producer_ids_obtained == 0
        ):
            logger.warning(
                "the broker does not hand out producer ids (%s): producing without "
                "idempotence (pass enable_idempotence=True to fail instead)",
                error,
            )
            self.idempotent = False
            return
        failure = DwalError(error.code, f"no producer id: {error.message}")
        for queue in self._queues.values():
            while queue.ready:
                self._fail(queue.ready.popleft(), failure)

    async def _send(self, leader: int, by_topic: dict[str, list[tuple[int, list[_Batch]]]]) -> None:
        """Write one Produce request to broker `leader`, then await its answer in another
        task. Writes happen here, one after another, so a broker appends a partition's
        batches in order."""
        assert self._nursery is not None
        self._inflight_requests += 1
        try:
            broker = self.cluster.brokers.get(leader)
            if broker is None:
                raise DwalError(ErrorCode.LEADER_NOT_AVAILABLE, f"no address of broker {leader}")
            connection = await self.cluster.broker_connection(broker)
            body, tail = _produce_body(by_topic, self.acks, self.request_timeout_ms)
            pending = await connection.send_request(
                ApiKey.PRODUCE, body, tail, expect_response=self.acks != ACKS_NONE
            )
        except DwalError as error:
            # Nothing of this request reached the broker's request handling (ConnectionFailed
            # from send_request means the frame was not written whole): safe to resend.
            self._request_done(by_topic, None, error)
        else:
            for entries in by_topic.values():
                for _, batches in entries:
                    for batch in batches:
                        batch.in_flight = True
            self._nursery.start_soon(self._await_answer, by_topic, pending)

    async def _await_answer(self, by_topic, pending) -> None:
        # The broker bounds its own wait by the request's timeout_ms; past that plus a margin
        # it is stuck: the answer is abandoned (discarded if it comes) and the outcome unknown.
        limit_s = self.request_timeout_ms / 1000 + LIMITS.producer_answer_margin_s
        error: DwalError
        try:
            with trio.fail_after(limit_s):
                response = await pending.wait()
        except trio.TooSlowError:
            error = DwalError(
                ErrorCode.REQUEST_TIMED_OUT, f"no answer to a produce request in {limit_s:.0f} s"
            )
        except ProtocolError as malformed:
            error = DwalError(ErrorCode.UNKNOWN_SERVER_ERROR, f"malformed answer: {malformed}")
        except DwalError as failed:
            error = failed
        else:
            self._request_done(by_topic, response.body, None)
            return
        self._request_done(by_topic, None, _written_request_error(error))

    def _request_done(self, by_topic, body: dict | None, error: DwalError | None) -> None:
        self._inflight_requests -= 1
        if error is not None:
            for topic, entries in by_topic.items():
                for partition, batches in entries:
                    self._complete(topic, partition, batches, error)
        else:
            assert body is not None
            self._handle_response(by_topic, body)
        self._wakeup.set()

    def _handle_response(self, by_topic, body: dict) -> None:
        results = {
            (t["topic"], p["partition"]): p for t in body.get("topics", []) for p in t["partitions"]
        }
        for topic, entries in by_topic.items():
            for partition, batches in entries:
                result = results.get((topic, partition))
                if self.acks == ACKS_NONE:
                    self._complete(topic, partition, batches, None, -1)
                elif result is None:
                    self._complete(
                        topic,
                        partition,
                        batches,
                        DwalError(ErrorCode.UNKNOWN_SERVER_ERROR, "broker omitted the partition"),
                    )
                elif (
                    result["error_code"] == ErrorCode.DUPLICATE_SEQUENCE_NUMBER and self.idempotent
                ):
                    # an earlier attempt of this batch was stored: a success, at the offset
                    # the broker gives (-1 when it does not say)
                    self._complete(topic, partition, batches, None, result["base_offset"])
                elif result["error_code"]:
                    error = DwalError(ErrorCode(result["error_code"]), result["error_message"])
                    if result["maybe_appended"]:  # e.g. NOT_LEADER_OR_FOLLOWER after appending
                        error = DeliveryOutcomeUnknown(
                            error.code,
                            f"{error.message} (the broker had appended the records: they may "
                            "or may not be kept)",
                        )
                    self._complete(topic, partition, batches, _written_request_error(error))
                else:
                    self._complete(topic, partition, batches, None, result["base_offset"])

    def _complete(
        self,
        topic: str,
        partition: int,
        batches: list[_Batch],
        error: DwalError | None,
        base_offset: int = -1,
    ) -> None:
        """One attempt of `batches` (of one partition) ended: they succeeded, go back in line
        for a retry after the backoff, or fail for good."""
        queue = self._queues[(topic, partition)]
        queue.inflight -= 1
        for batch in batches:
            batch.in_flight = False
        if error is None:
            offset = base_offset
            for batch in batches:
                batch.base_offset = offset
                if offset >= 0:
                    offset += batch.count
                self._records_sent += batch.count
                self._finish(batch)
            return
        unknown = isinstance(error, DeliveryOutcomeUnknown)
        for batch in batches:
            batch.maybe_stored = batch.maybe_stored or unknown
            batch.last_error = error
        now = trio.current_time()
        retry = [b for b in batches if self._may_retry(b, error, now)]
        if retry:
            for batch in retry:
                batch.attempts += 1
            # Answers of several failed requests arrive in any order: keep the seal order.
            queue.ready = collections.deque(sorted([*retry, *queue.ready], key=_sequence_of))
            queue.backing_off += 1
            assert self._nursery is not None
            self._nursery.start_soon(self._retry_after_backoff, topic, partition, error)
        failed = [b for b in batches if b not in retry]
        if self.idempotent:
            self._note_sequence_trouble(error, failed)
        for batch in failed:
            self._fail(batch, _final_error(batch, error))

    def _may_retry(self, batch: _Batch, error: DwalError, now: float) -> bool:
        """Whether a batch that failed with `error` may be sent again: within its delivery
        timeout, if the error allows it, and, for errors that count, within `retries`."""
        if now >= batch.created + self.delivery_timeout_s:
            return False
        code = error.code
        stamped = batch.base_sequence >= 0  # idempotent: the broker recognises a resend
        if stamped and code == ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER:
            # Refused (not stored) because an earlier batch is missing: one that waits for
            # its own retry (this one goes after it), or one that failed for good (the epoch
            # bump gives this one a new sequence). Neither counts against `retries`.
            return self._epoch_bump_due or self._earlier_batch_pending(batch)
        if not (
            error.retriable
            or code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
            or (stamped and code == ErrorCode.UNKNOWN_PRODUCER_ID)  # after the epoch bump
        ):
            return False
        if isinstance(error, DeliveryOutcomeUnknown) and not (
            self.retry_unknown_outcome or stamped
        ):
            return False
        # A leader that moved, or that cannot be reached (its broker died: the request was
        # never written), is waited out within the delivery timeout, not `retries`.
        counted = code not in _LEADER_ERRORS and not _never_sent(error)
        return not counted or batch.attempts < self.retries

    def _earlier_batch_pending(self, batch: _Batch) -> bool:
        """Whether a batch of `batch`'s partition stamped before it has no outcome yet (in
        flight, or in line for a retry)."""
        return any(
            other.sequence < batch.sequence
            and other.base_sequence >= 0
            and other.partition == batch.partition
            and other.topic == batch.topic
            for other in self._unfinished
        )

    def _note_sequence_trouble(self, error: DwalError, failed: list[_Batch]) -> None:
        """A batch that had a sequence and fails for good leaves a gap that the broker would
        refuse every later batch of its partition for: the epoch is bumped (sequences start
        again at 0). So it is after UNKNOWN_PRODUCER_ID (the broker lost our state); after
        INVALID_PRODUCER_EPOCH (a newer epoch of our id was seen), a new id is asked for."""
        if error.code == ErrorCode.INVALID_PRODUCER_EPOCH:
            self._new_producer_id_due = True
            self._epoch_bump_due = True
        elif error.code == ErrorCode.UNKNOWN_PRODUCER_ID or any(
            batch.base_sequence >= 0 for batch in failed
        ):
            self._epoch_bump_due = True

    def _fail(self, batch: _Batch, error: DwalError) -> None:
        batch.error = error
        self._batches_failed += 1
        kind = (batch.topic, batch.partition, type(error), error.code)
        failure = self._failures.get(kind)
        if failure is None:  # bounded: one entry per partition and kind of error
            self._failures[kind] = [batch.count, error]
        else:
            failure[0] += batch.count
        self._finish(batch)

    def _finish(self, batch: _Batch) -> None:
        self._buffered_bytes -= batch.size_bytes
        self._unfinished.discard(batch)
        batch.done.set()
        if batch.callbacks is not None:
            self._callbacks_due.append(batch)
            self._callbacks_wakeup.set()
        self._progress.set()
        self._progress = trio.Event()

    # -- the callback task ---------------------------------------------------------------

    async def _callback_task(self) -> None:
        """Call the callbacks of finished batches, in the order the batches finished. Raises
        the first exception of a callback once the others due were called (see the module
        docstring), which stops the producer."""
        while True:
            await self._callbacks_wakeup.wait()
            self._callbacks_wakeup = trio.Event()
            errors = self._call_callbacks_due()
            if errors:  # raised before flush() is woken: the cancellation reaches it first
                _log_callback_errors(errors[1:])
                raise errors[0]
            self._progress.set()  # flush() waits for the callbacks too
            self._progress = trio.Event()

    def _call_callbacks_due(self) -> list[Exception]:
        """Call every callback due, each once; returns the exceptions they raised."""
        errors: list[Exception] = []
        while self._callbacks_due:
            batch = self._callbacks_due.popleft()
            assert batch.callbacks is not None and batch.done.is_set()
            callbacks, batch.callbacks = batch.callbacks, None
            for index, timestamp, callback in callbacks:
                try:
                    if batch.error is None:
                        callback(_record_metadata(batch, index, timestamp), None)
                    else:
                        callback(None, batch.error)
                except Exception as error:
                    errors.append(error)
        return errors

    async def _retry_after_backoff(self, topic: str, partition: int, error: DwalError) -> None:
        if error.code in _REFRESH_ERRORS or isinstance(error, ConnectionFailed):
            self.cluster.invalidate(topic)
        await trio.sleep(self.retry_backoff_s)
        self._queues[(topic, partition)].backing_off -= 1
        self._wakeup.set()


def _sequence_of(batch: _Batch) -> int:
    return batch.sequence


def _log_callback_errors(errors: list[Exception]) -> None:
    for error in errors:
        logger.error("an on_delivery callback raised %r", error, exc_info=error)


def _unresolved_after_reset(batch: _Batch) -> DeliveryOutcomeUnknown:
    code = batch.last_error.code if batch.last_error is not None else ErrorCode.NETWORK_EXCEPTION
    return DeliveryOutcomeUnknown(
        code,
        "an earlier attempt may have stored the records, and the producer's epoch changed "
        "since (a batch of its failed for good), so a resend could not be recognised: the "
        "records may or may not have been stored",
    )


def _never_sent(error: DwalError) -> bool:
    """Whether the error says the request never reached the broker: no connection to it
    could be made (refused, timed out), or the frame was not written whole. The broker
    cannot have run it, so it is as safe to resend as after NOT_LEADER_OR_FOLLOWER."""
    return isinstance(error, ConnectionFailed) and not error.request_written


def _written_request_error(error: DwalError) -> DwalError:
    """Classify an error about a request that was written whole: the broker may have
    appended its batches unless the error says it refused them before appending."""
    if isinstance(error, DeliveryOutcomeUnknown) or error.code not in _MAYBE_APPENDED:
        return error
    return DeliveryOutcomeUnknown(
        error.code,
        f"{error.message} (the request was sent: the records may or may not have been stored)",
    )


def _final_error(batch: _Batch, error: DwalError) -> DwalError:
    """The error a batch fails with: an outcome-unknown one if any attempt may have stored it."""
    if not batch.maybe_stored or isinstance(error, DeliveryOutcomeUnknown):
        return error
    return DeliveryOutcomeUnknown(
        error.code, f"{error.message} (an earlier attempt may have stored the records)"
    )


def _packed_record_bytes(
    timestamp_delta: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
) -> int:
    """The exact size of ``[timestamp_delta, key, value, headers]`` packed by msgpack
    (use_bin_type=True), computed without packing."""
    size = 1 + _packed_int_bytes(timestamp_delta) + _packed_bin_bytes(key)
    size += _packed_bin_bytes(value)
    count = len(headers)
    size += 1 if count < 16 else 3 if count < 65536 else 5
    for name, header_value in headers:
        size += 1 + _packed_str_bytes(name) + _packed_bin_bytes(header_value)
    return size


def _packed_int_bytes(number: int) -> int:
    if -32 <= number < 128:
        return 1
    if number >= 0:
        return 2 if number < 2**8 else 3 if number < 2**16 else 5 if number < 2**32 else 9
    return 2 if number >= -(2**7) else 3 if number >= -(2**15) else 5 if number >= -(2**31) else 9


def _packed_bin_bytes(data: bytes | None) -> int:
    if data is None:
        return 1
    length = len(data)
    return length + (2 if length < 2**8 else 3 if length < 2**16 else 5)


def _packed_str_bytes(text: str) -> int:
    length = len(text.encode())
    return length + (1 if length < 32 else 2 if length < 2**8 else 3 if length < 2**16 else 5)


def _checked_headers(headers: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    checked = []
    for name, value in headers:
        if type(name) is not str:
            raise TypeError("record header names must be str")
        checked.append(
            (name, _to_bytes(value, "header value") if type(value) is not bytes else value)
        )
    return checked


def _to_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"record {what} must be bytes, str or None, not {type(value).__name__}")


def _produce_body(by_topic, acks: int, timeout_ms: int) -> tuple[dict, list[bytes]]:
    """The Produce body and its tail, as the list of encoded batches in body order."""
    topics = []
    parts: list[bytes] = []
    for topic, entries in by_topic.items():
        partitions = []
        for partition, batches in entries:
            size = 0
            for batch in batches:
                parts.append(batch.encoded)
                size += len(batch.encoded)
            partitions.append({"partition": partition, "size": size})
        topics.append({"topic": topic, "partitions": partitions})
    return {"acks": acks, "timeout_ms": timeout_ms, "topics": topics}, parts


# -- Kafka's option names --------------------------------------------------------------


def _callable(value: Any) -> Any:
    if not callable(value):
        raise ValueError(f"expected a callable, got {value!r}")
    return value


def _kibibytes(value: Any) -> int:
    return CONVERTERS["int"](value) * 1024


# The Kafka producer options the Producer takes (Java client, librdkafka / confluent-kafka,
# kafka-python, aiokafka), by dotted name; `translate` accepts them underscored too.
PRODUCER_KAFKA_OPTIONS: dict[str, KafkaOption] = {
    "acks": KafkaOption("acks", "any"),  # "all", -1, 0, 1 (strings too): checked by Producer
    "request.required.acks": KafkaOption("acks", "any"),  # librdkafka
    "compression.type": KafkaOption("compression", "str"),
    "compression.codec": KafkaOption("compression", "str"),  # librdkafka
    "linger.ms": KafkaOption("linger_ms", "number"),
    "queue.buffering.max.ms": KafkaOption("linger_ms", "number"),  # librdkafka
    "batch.size": KafkaOption("batch_size"),
    "max.batch.size": KafkaOption("batch_size"),  # aiokafka
    "retries": KafkaOption("retries"),
    "message.send.max.retries": KafkaOption("retries"),  # librdkafka
    "retry.backoff.ms": KafkaOption("retry_backoff_ms"),
    "request.timeout.ms": KafkaOption("request_timeout_ms"),
    "delivery.timeout.ms": KafkaOption("delivery_timeout_ms"),
    "message.timeout.ms": KafkaOption("delivery_timeout_ms"),  # librdkafka
    "enable.idempotence": KafkaOption("enable_idempotence", "bool"),
    # Kafka counts the requests in flight per connection, DWAL per partition (see the docs)
    "max.in.flight.requests.per.connection": KafkaOption("max_in_flight_per_partition"),
    "max.in.flight": KafkaOption("max_in_flight_per_partition"),  # librdkafka
    "buffer.memory": KafkaOption("buffer_bytes_max"),
    "queue.buffering.max.kbytes": KafkaOption("buffer_bytes_max", convert=_kibibytes),
    "max.request.size": KafkaOption("request_bytes_max"),
    "message.max.bytes": KafkaOption("request_bytes_max"),  # librdkafka: a request's limit
    "allow.auto.create.topics": KafkaOption("allow_auto_topic_creation", "bool"),
    "partitioner": KafkaOption("partitioner", "str"),
    "key.serializer": KafkaOption("key_serializer", convert=_callable),
    "value.serializer": KafkaOption("value_serializer", convert=_callable),
    "on.delivery": KafkaOption("on_delivery", convert=_callable),  # confluent-kafka
}

# Kafka producer options that DWAL sets somewhere else: where they belong.
_PRODUCER_ELSEWHERE: dict[str, str] = {
    "bootstrap.servers": (
        "a Producer is made on a connected cluster handle: give the addresses to "
        "client.connect(bootstrap_servers=...)"
    ),
    "client.id": (
        "the client id belongs to the cluster handle, shared by everything made on it: "
        "client.connect(client_id=...)"
    ),
    "transactional.id": (
        "DWAL has no transactions; idempotence (on by default with acks='all') makes a "
        "producer's retries exactly-once per partition"
    ),
    "partitioner.class": "name the partitioner instead: partitioner='murmur2' or 'crc32'",
    "max.message.bytes": (
        "it is a topic config, which the producer reads from the broker: "
        "Admin.alter_configs(topic, set={'max.message.bytes': ...})"
    ),
    "min.insync.replicas": (
        "it is a topic config (the broker's min_insync_replicas is its default): "
        "Admin.alter_configs(topic, set={'min.insync.replicas': ...})"
    ),
    "queue.buffering.max.messages": "DWAL bounds the buffer in bytes: buffer_memory",
    "batch.num.messages": "DWAL bounds batches in bytes: batch_size",
}

# Kafka consumer options, which a producer may be handed by mistake (a shared config dict).
_CONSUMER_OPTIONS = frozenset(
    {
        "group.id",
        "group.instance.id",
        "auto.offset.reset",
        "enable.auto.commit",
        "auto.commit.interval.ms",
        "enable.auto.offset.store",
        "fetch.min.bytes",
        "fetch.max.bytes",
        "fetch.max.wait.ms",
        "fetch.wait.max.ms",
        "max.partition.fetch.bytes",
        "max.poll.records",
        "max.poll.interval.ms",
        "isolation.level",
        "check.crcs",
        "key.deserializer",
        "value.deserializer",
        "client.rack",
        "exclude.internal.topics",
    }
)

_SIGNATURE = inspect.signature(Producer.__init__).parameters
# The Producer's own keyword arguments, with their defaults.
_DEFAULTS = {
    name: parameter.default
    for name, parameter in _SIGNATURE.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
}
_KEYWORDS = frozenset(_DEFAULTS)


def _is_native(name: str) -> bool:
    """A DWAL keyword argument that is not also a Kafka option's name (`buffer_bytes_max`)."""
    return name in _KEYWORDS and dotted(name) not in PRODUCER_KAFKA_OPTIONS


def _with_kafka_options(
    given: dict[str, Any], kafka_options: Mapping[str, Any], explicit: set[str] | None = None
) -> dict[str, Any]:
    """The keyword arguments `given`, with the Kafka-spelled `kafka_options` translated into
    them. An argument counts as given twice if it is in `explicit`, or (without `explicit`)
    if its value is not its default. Raises UnknownOptionError for an option the producer
    does not take, or one given twice; ValueError for a value of the wrong type."""
    for name in kafka_options:
        key = dotted(name)
        if key in PRODUCER_KAFKA_OPTIONS:
            continue
        if key in _PRODUCER_ELSEWHERE:
            raise UnknownOptionError(f"Producer does not take {name!r}: {_PRODUCER_ELSEWHERE[key]}")
        if key in _CONSUMER_OPTIONS:
            raise UnknownOptionError(
                f"Producer does not take {name!r}: it is a consumer option (client.Consumer)"
            )
    settings = dict(given)
    translated = translate(kafka_options, PRODUCER_KAFKA_OPTIONS, "Producer")
    for name in kafka_options:
        keyword = PRODUCER_KAFKA_OPTIONS[dotted(name)].keyword
        twice = (
            keyword in explicit
            if explicit is not None
            else keyword in given and given[keyword] != _DEFAULTS[keyword]
        )
        if twice:
            raise UnknownOptionError(f"Producer: {name!r} and {keyword!r} are the same option")
        settings[keyword] = translated[keyword]
    return settings


__all__ = [
    "Producer",
    "Delivery",
    "DeliveryCallback",
    "DeliveryFailure",
    "DeliveryOutcomeUnknown",
    "PRODUCER_KAFKA_OPTIONS",
    "ProducerClosed",
    "RecordMetadata",
    "ProducerStatistics",
]
