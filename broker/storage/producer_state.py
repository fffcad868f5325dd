"""The state of idempotent producers in one partition (Kafka's ProducerStateManager, without
transactions).

Theory of operation. An idempotent producer stamps each batch with its producer id, its epoch
and the sequence number of its first record (`base_sequence`); the records of a batch take
consecutive sequences, so its last sequence is `base_sequence + last_offset_delta`, wrapping
from 2**31 - 1 to 0 as Kafka's. For each producer id found in the log the table keeps its
epoch and the metadata of its last `BATCHES_PER_PRODUCER` (5) batches - first and last
sequence, first and last offset, max timestamp - as many as a producer may have in flight to
one partition, so that the retry of any of them is recognised.

A leader checks each append with `check_leader_append` before writing anything:

- an append holding a batch with a producer id (>= 0) must hold only that batch, and the
  batch needs an epoch and a sequence (>= 0): otherwise InvalidRecordError (Kafka's rule for
  Produce v3 and later);
- an unknown producer id (new, or expired, evicted, or whose batches retention deleted) is
  accepted at any sequence (as Kafka since KIP-360: the producer cannot tell);
- an epoch below the known one is fenced: InvalidProducerEpochError;
- an epoch above the known one starts the producer again: its first sequence must be 0,
  else OutOfOrderSequenceError;
- in the known epoch, a batch whose first and last sequences are those of one of the cached
  batches is a duplicate: the append writes nothing and answers that batch's original
  offsets; any other batch must start right after the last sequence, else
  OutOfOrderSequenceError.

Once a batch is written, with its offsets, `record` updates the producer: a new epoch
replaces its batches, the same epoch appends to them (the oldest of six is dropped). A
follower copying its leader's batches, and a log loading or truncating, call `record` for
every batch without any check, so a follower that becomes leader judges retries exactly as
the leader before it would have.

Memory is bounded: per producer an epoch and at most 5 batch records (about 1.4 KB with 5
of them, 171 bytes in a snapshot); producers are removed by `expire` when their last batch's
max timestamp is `expiration_ms` old (Kafka's producer.id.expiration.ms, a day by default),
and at most `producers_max` are kept - a new one beyond that evicts the least recently
written producer, which then counts as unknown (a retry of its in-flight batches could be
written twice: exactness traded for memory when a partition sees that many producers within
the expiration time).

The table is a pure object: no I/O, no clock. `snapshot_bytes` and `parse_snapshot` turn it
into bytes and back (the log writes them to `{offset:020d}.snapshot` files), with a CRC-32C
so that a damaged snapshot is detected and rebuilt from the log instead.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import crc32c

from protocol.record_batch import BatchHeader

from .errors import InvalidProducerEpochError, InvalidRecordError, OutOfOrderSequenceError

BATCHES_PER_PRODUCER = 5  # a producer's requests in flight to one partition (Kafka's limit)
SEQUENCE_MODULUS = 2**31  # sequences wrap to 0 after the i32 maximum
NO_SEQUENCE = -1
PRODUCERS_MAX_LIMIT = 1_000_000  # the largest producers_max a config may set
SNAPSHOT_VERSION = 1

# Snapshot layout (big-endian): version u16, crc u32 (CRC-32C of everything after it), end
# offset i64 (the snapshot holds the batches below it), producer count u32; then per producer,
# least recently written first: producer id i64, epoch i16, batch count u8, and per batch
# (oldest first): first sequence i32, last sequence i32, first offset i64, last offset i64,
# max timestamp i64.
_SNAPSHOT_HEADER = struct.Struct(">HIqI")
_CRC_START = 6  # after version and crc
_PRODUCER = struct.Struct(">qhB")
_BATCH = struct.Struct(">iiqqq")
SNAPSHOT_BYTES_MAX = _SNAPSHOT_HEADER.size + PRODUCERS_MAX_LIMIT * (
    _PRODUCER.size + BATCHES_PER_PRODUCER * _BATCH.size
)


class BatchMetadata(NamedTuple):
    """What the table remembers of one batch of a producer."""

    first_sequence: int
    last_sequence: int
    first_offset: int
    last_offset: int
    max_timestamp: int


@dataclass(frozen=True, slots=True)
class ProducerState:
    """One producer: its epoch and its last batches, oldest first (never empty)."""

    producer_id: int
    epoch: int
    batches: tuple[BatchMetadata, ...]

    @property
    def last_batch(self) -> BatchMetadata:
        return self.batches[-1]

    @property
    def last_sequence(self) -> int:
        return self.batches[-1].last_sequence

    @property
    def last_offset(self) -> int:
        """The last offset this producer wrote."""
        return self.batches[-1].last_offset

    @property
    def last_timestamp(self) -> int:
        """The max timestamp of its last batch: what expiration goes by."""
        return self.batches[-1].max_timestamp


def last_sequence_of(header: BatchHeader) -> int:
    """The sequence of the batch's last record (NO_SEQUENCE when it has none)."""
    if header.base_sequence < 0:
        return NO_SEQUENCE
    return (header.base_sequence + header.last_offset_delta) % SEQUENCE_MODULUS


def next_sequence(sequence: int) -> int:
    """The sequence that follows `sequence` (2**31 - 1 is followed by 0)."""
    return (sequence + 1) % SEQUENCE_MODULUS


def metadata_of(header: BatchHeader) -> BatchMetadata:
    """The metadata of a batch whose offsets are assigned."""
    return BatchMetadata(
        first_sequence=header.base_sequence if header.base_sequence >= 0 else NO_SEQUENCE,
        last_sequence=last_sequence_of(header),
        first_offset=header.base_offset,
        last_offset=header.last_offset,
        max_timestamp=header.max_timestamp,
    )


class ProducerStateTable:
    """The producers of one partition; see the module's theory of operation."""

    def __init__(self, *, producers_max: int, producers: Iterable[ProducerState] = ()) -> None:
        """`producers` in the order they last wrote, least recent first."""
        assert 1 <= producers_max <= PRODUCERS_MAX_LIMIT
        self._producers_max = producers_max
        # least recently written first: the first one is evicted when the table is full
        self._producers: collections.OrderedDict[int, ProducerState] = collections.OrderedDict()
        for producer in producers:
            self._put(producer)
        self._version = 0

    # Reading.

    def __len__(self) -> int:
        return len(self._producers)

    @property
    def producers_max(self) -> int:
        return self._producers_max

    @property
    def version(self) -> int:
        """A number that changes whenever the table does (to tell whether a snapshot of it
        is still current)."""
        return self._version

    def get(self, producer_id: int) -> ProducerState | None:
        return self._producers.get(producer_id)

    def producers(self) -> tuple[ProducerState, ...]:
        """Every producer, least recently written first."""
        return tuple(self._producers.values())

    def last_batch_offsets(self) -> frozenset[int]:
        """The first offset of each producer's last batch: the batches compaction must keep
        whole (see `log_cleaner`)."""
        return frozenset(producer.last_batch.first_offset for producer in self._producers.values())

    def copy(self) -> ProducerStateTable:
        return ProducerStateTable(
            producers_max=self._producers_max, producers=self._producers.values()
        )

    # Deciding.

    def check_leader_append(self, headers: Sequence[BatchHeader]) -> BatchMetadata | None:
        """Judge a leader's append of `headers` (offsets not yet assigned) before anything is
        written. Returns the original batch's metadata when the append is the retry of a
        cached batch (nothing must be written then), or None when it may be appended (always
        when it holds no batch with a producer id). Raises InvalidRecordError (an
        idempotent batch not alone in its append, or without epoch or sequence),
        InvalidProducerEpochError (fenced), OutOfOrderSequenceError."""
        idempotent = [header for header in headers if header.producer_id >= 0]
        if not idempotent:
            return None
        header = idempotent[0]
        if len(headers) != 1:
            raise InvalidRecordError(
                f"an append holding an idempotent batch (producer id {header.producer_id}) "
                f"must hold that one batch only, not {len(headers)} batches"
            )
        if header.producer_epoch < 0 or header.base_sequence < 0:
            raise InvalidRecordError(
                f"the batch of producer id {header.producer_id} has epoch "
                f"{header.producer_epoch} and base sequence {header.base_sequence}: an "
                "idempotent batch needs both >= 0"
            )
        return self._check(header)

    def _check(self, header: BatchHeader) -> BatchMetadata | None:
        producer = self._producers.get(header.producer_id)
        if producer is None:
            return None  # unknown: any sequence starts it
        epoch, first = header.producer_epoch, header.base_sequence
        if epoch < producer.epoch:
            raise InvalidProducerEpochError(
                f"producer id {header.producer_id} has epoch {producer.epoch}: a batch of "
                f"its epoch {epoch} is fenced"
            )
        if epoch > producer.epoch:
            if first != 0:
                raise OutOfOrderSequenceError(
                    f"producer id {header.producer_id} starts its epoch {epoch} at sequence "
                    f"{first}, not 0"
                )
            return None
        last = last_sequence_of(header)
        for batch in producer.batches:
            if batch.first_sequence == first and batch.last_sequence == last:
                return batch
        expected = next_sequence(producer.last_sequence)
        if first != expected:
            raise OutOfOrderSequenceError(
                f"producer id {header.producer_id} (epoch {epoch}) sent sequence {first}; "
                f"expected {expected}"
            )
        return None

    # Changing.

    def record(self, header: BatchHeader) -> None:
        """Take a written batch (offsets assigned) into the table, without any check; a
        batch without a producer id changes nothing."""
        if header.producer_id < 0:
            return
        batch = metadata_of(header)
        producer = self._producers.pop(header.producer_id, None)
        if producer is None or producer.epoch != header.producer_epoch:
            batches: tuple[BatchMetadata, ...] = (batch,)
        else:
            batches = (*producer.batches, batch)[-BATCHES_PER_PRODUCER:]
        self._put(ProducerState(header.producer_id, header.producer_epoch, batches))
        self._version += 1

    def _put(self, producer: ProducerState) -> None:
        """Add `producer` as the most recently written, evicting the least recent beyond
        producers_max."""
        assert producer.batches and len(producer.batches) <= BATCHES_PER_PRODUCER
        self._producers.pop(producer.producer_id, None)
        self._producers[producer.producer_id] = producer
        while len(self._producers) > self._producers_max:
            self._producers.popitem(last=False)

    def expire(self, now_ms: int, expiration_ms: int) -> int:
        """Remove the producers whose last batch's max timestamp is `expiration_ms` or more
        before `now_ms` (Kafka's test). Returns how many were removed."""
        expired = [
            producer_id
            for producer_id, producer in self._producers.items()
            if now_ms - producer.last_timestamp >= expiration_ms
        ]
        for producer_id in expired:
            del self._producers[producer_id]
        if expired:
            self._version += 1
        return len(expired)

    def truncate_head(self, log_start_offset: int) -> bool:
        """Forget the batches that end below `log_start_offset` (retention deleted them), and
        the producers left without any. Returns True if anything changed."""
        changed = False
        for producer_id, producer in list(self._producers.items()):
            if producer.batches[0].last_offset >= log_start_offset:
                continue
            kept = tuple(b for b in producer.batches if b.last_offset >= log_start_offset)
            if kept:
                # keeps its place in the recency order
                self._producers[producer_id] = ProducerState(producer_id, producer.epoch, kept)
            else:
                del self._producers[producer_id]
            changed = True
        if changed:
            self._version += 1
        return changed

    # Snapshots.

    def snapshot_bytes(self, end_offset: int) -> bytes:
        """The table as snapshot bytes, recording that it holds the batches below
        `end_offset`."""
        parts = []
        for producer in self._producers.values():
            parts.append(
                _PRODUCER.pack(producer.producer_id, producer.epoch, len(producer.batches))
            )
            parts.extend(_BATCH.pack(*batch) for batch in producer.batches)
        body = b"".join(parts)
        counted = struct.pack(">qI", end_offset, len(self._producers)) + body
        return struct.pack(">HI", SNAPSHOT_VERSION, crc32c.crc32c(counted)) + counted


def parse_snapshot(data: bytes, *, producers_max: int) -> tuple[int, ProducerStateTable] | None:
    """Return (end offset, table) from snapshot bytes, or None when they are damaged (wrong
    size, version or CRC, or values no table holds). A snapshot with more producers than
    `producers_max` keeps the most recently written ones."""
    if not _SNAPSHOT_HEADER.size <= len(data) <= SNAPSHOT_BYTES_MAX:
        return None
    version, crc, end_offset, count = _SNAPSHOT_HEADER.unpack_from(data)
    if version != SNAPSHOT_VERSION or crc32c.crc32c(data[_CRC_START:]) != crc or end_offset < 0:
        return None
    producers: list[ProducerState] = []
    position = _SNAPSHOT_HEADER.size
    try:
        for _ in range(count):
            producer_id, epoch, batch_count = _PRODUCER.unpack_from(data, position)
            position += _PRODUCER.size
            if producer_id < 0 or not 1 <= batch_count <= BATCHES_PER_PRODUCER:
                return None
            batches = []
            for _ in range(batch_count):
                batch = BatchMetadata(*_BATCH.unpack_from(data, position))
                position += _BATCH.size
                if not 0 <= batch.first_offset <= batch.last_offset < end_offset:
                    return None
                batches.append(batch)
            producers.append(ProducerState(producer_id, epoch, tuple(batches)))
    except struct.error:
        return None  # cut short
    if position != len(data) or len({producer.producer_id for producer in producers}) != count:
        return None
    return end_offset, ProducerStateTable(producers_max=producers_max, producers=producers)
