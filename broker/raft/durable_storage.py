"""The Raft log on disk: segment files of record batches, a hard state file, snapshot files.

Theory of operation.

Format. The log is a directory of segment files named by the index of their first entry,
`{index:020d}.log`, as partitions' segments are. Each entry is one record batch of one
record (the partition format, `protocol.record_batch`, so the same tools read both): the
batch's base offset is the entry's index and its partition leader epoch its term, as Kafka's
KRaft stores its metadata log. The CRC of a batch does not cover those two header fields, so
the record's key repeats them, CRC-covered, with the entry kind and the term of the entry
before (`ENTRY_KEY`: index, term, previous term, kind); the value is the entry's data. We keep
our own small segmented log here rather than `PartitionLog` because Raft must truncate a
conflicting suffix, which partitions never do, and because the log is indexed in memory: an
array of terms and file positions per entry, so `term(i)` never touches the disk, plus a
bounded cache of the newest entries (the ones followers ask for). Index files would only be
rebuilt derived data; we rebuild the arrays from the batches when opening instead.

Writing. `write_entries` runs on the caller's thread and only does page-cache work: it
skips entries already stored with the same term (rewriting them would open a window in which
a crash loses entries this node acknowledged), truncates the conflicting suffix in place
(`ftruncate`, deleting later segments), appends the new batches, and rolls to a new segment
past `segment_bytes_max`. `prepare_sync` then captures what must reach the disk (duplicated
descriptors of dirty segments, pending snapshot files, files to delete, a directory fsync)
as a `SyncJob`, whose blocking `run` a driver calls in a worker thread; the job never touches
the in-memory index, so the node keeps reading while it runs. The job stores the hard state
last, after the entries it may refer to; a driver may let a change of the commit index alone
wait (`lazy_commit`), since Raft never needs the commit index durable. The convenience methods
`append`, `set_hard_state` and `apply_snapshot` do both halves and are durable on return.

Why a torn truncation is safe without an extra fsync. After a crash the file may hold the new
entries followed by bytes of the old, longer suffix. Every batch names the term of the entry
before it, and by Raft's log matching property an old entry j can never follow a new entry
j - 1 with the same term at j - 1 (equal index and term would make the two logs equal up to
j - 1, which contradicts the conflict being truncated). Recovery checks that chain, so it
stops at exactly the right place.

Snapshots are files `{index:020d}-{term:020d}.snapshot` (`magic | version | length | crc32c
| msgpack [index, term, voters, learners, data]`) written with write-temp, fsync, rename,
fsync-directory. `create_snapshot` and `compact` (called by the node, synchronously) only
change the in-memory view; the snapshot file is written, and then the segments it covers are
deleted, by the next `SyncJob`, in that order, so a crash in between finds the old snapshot
and the entries still there. `apply_snapshot` (a snapshot from the leader) writes the file
durably first, then drops every segment, newest first, so a crash leaves a prefix of the old
log next to the new snapshot.

Recovery (`open`) loads the hard state, the newest snapshot, then scans every segment,
checking each batch (length, magic, CRC, one record, key consistent with the header) and the
chain: contiguous indexes, previous-term links, non-decreasing terms. At the first bad byte
it truncates that segment and deletes every later one (Kafka's rule: nothing after a bad byte
is trusted). The entries are then fitted to the snapshot: covered entries are dropped from
view; entries that contradict the snapshot, or end before it, are discarded. A log that
starts after the snapshot's next index, or that lost entries the hard state says were
committed, cannot be repaired: `open` raises `StorageCorruptError`.
"""

from __future__ import annotations

import bisect
import logging
import os
import pathlib
import re
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import crc32c
import msgpack

from broker.storage.batch_scanner import ValidatingScanner
from broker.storage.checkpoint import TEMPORARY_SUFFIX, fsync_directory, write_atomically
from broker.storage.errors import StorageError
from protocol.errors import ProtocolError
from protocol.record_batch import HEADER_BYTES, BatchHeader, decode_body, encode_batch, scan_batches

from .hard_state_file import HardStateFile, PersistentState
from .log_storage import CompactedError, UnavailableError
from .messages import Configuration, Entry, EntryKind, HardState, Snapshot, entry_bytes

LOG_SUFFIX = ".log"
SNAPSHOT_SUFFIX = ".snapshot"
ENTRY_KEY = struct.Struct(">QQQB")  # index, term, previous term, kind
# The record body of an entry: msgpack [[0, key, value, []]]; the key starts at this offset.
ENTRY_KEY_POSITION = HEADER_BYTES + 5
SNAPSHOT_MAGIC = b"DWSS"
SNAPSHOT_VERSION = 1
SNAPSHOT_PREFIX = struct.Struct(">4sHQI")  # magic, version, body length, crc32c(body)
EPOCH_MAX = 2**31 - 1
_SEGMENT_NAME = re.compile(r"([0-9]{20})\.log")
_SNAPSHOT_NAME = re.compile(r"([0-9]{20})-([0-9]{20})\.snapshot")

logger = logging.getLogger("dwal.raft")


class StorageCorruptError(StorageError):
    """The stored Raft state is damaged beyond what recovery may repair on its own."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DurableStorageConfig:
    segment_bytes_max: int = 16 * 1024 * 1024  # roll to a new segment past this size
    cache_bytes_max: int = 8 * 1024 * 1024  # newest entries kept in memory
    entry_bytes_max: int = 64 * 1024 * 1024  # a larger batch on disk is damage
    snapshot_bytes_max: int = 1024 * 1024 * 1024
    commit_lag_entries_max: int = 1024  # see prepare_sync(lazy_commit=True)

    def validate(self) -> None:
        """Raise ValueError for a limit that is not positive."""
        for name in (
            "segment_bytes_max",
            "cache_bytes_max",
            "entry_bytes_max",
            "snapshot_bytes_max",
            "commit_lag_entries_max",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class DurableStorageStatistics:
    first_index: int
    last_index: int
    snapshot_index: int
    segments: int
    log_bytes: int
    cached_entries: int
    cached_bytes: int
    pending_deletions: int


def encode_entry(entry: Entry, previous_term: int) -> bytes:
    """The record batch storing `entry` (whose predecessor has `previous_term`)."""
    key = ENTRY_KEY.pack(entry.index, entry.term, previous_term, int(entry.kind))
    return encode_batch(
        [[0, key, entry.data, []]],
        base_timestamp=0,
        base_offset=entry.index,
        partition_leader_epoch=entry.term if entry.term <= EPOCH_MAX else -1,
    )


def decode_entry(header: BatchHeader, batch: bytes | memoryview) -> tuple[Entry, int]:
    """Return (entry, previous term) from a whole batch whose CRC was checked. Raises
    StorageError if the batch is not an entry consistent with its header."""
    try:
        records = decode_body(header, memoryview(batch)[HEADER_BYTES:])
    except ProtocolError as error:
        raise StorageError(f"entry batch at index {header.base_offset}: {error}") from None
    if len(records) != 1 or type(records[0][1]) is not bytes or type(records[0][2]) is not bytes:
        raise StorageError(f"entry batch at index {header.base_offset} is malformed")
    key = records[0][1]
    if len(key) != ENTRY_KEY.size:
        raise StorageError(f"entry batch at index {header.base_offset} has a bad key")
    index, term, previous_term, kind = ENTRY_KEY.unpack(key)
    if index != header.base_offset or kind not in (EntryKind.NORMAL, EntryKind.CONFIG_CHANGE):
        raise StorageError(f"entry batch at index {header.base_offset} contradicts its key")
    entry = Entry(term=term, index=index, kind=EntryKind(kind), data=records[0][2])
    return entry, previous_term


def encode_snapshot(snapshot: Snapshot) -> bytes:
    body = msgpack.packb(
        [
            snapshot.index,
            snapshot.term,
            sorted(snapshot.configuration.voters),
            sorted(snapshot.configuration.learners),
            snapshot.data,
        ],
        use_bin_type=True,
    )
    return (
        SNAPSHOT_PREFIX.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, len(body), crc32c.crc32c(body))
        + body
    )


def decode_snapshot(data: bytes) -> Snapshot:
    """Raises StorageCorruptError unless `data` is a whole, undamaged snapshot file."""
    if len(data) < SNAPSHOT_PREFIX.size:
        raise StorageCorruptError("snapshot file is cut short")
    magic, version, length, checksum = SNAPSHOT_PREFIX.unpack_from(data)
    body = memoryview(data)[SNAPSHOT_PREFIX.size :]
    if magic != SNAPSHOT_MAGIC or version != SNAPSHOT_VERSION:
        raise StorageCorruptError("snapshot file has a bad magic or version")
    if length != len(body) or crc32c.crc32c(body) != checksum:
        raise StorageCorruptError("snapshot file fails its length or CRC check")
    try:
        index, term, voters, learners, state = msgpack.unpackb(body, raw=False)
        return Snapshot(
            index=index,
            term=term,
            configuration=Configuration(voters=frozenset(voters), learners=frozenset(learners)),
            data=state,
        )
    except Exception as error:  # the CRC matched, so this is a bug or a format change
        raise StorageCorruptError(f"snapshot file is malformed: {error}") from None


def snapshot_file_name(snapshot: Snapshot) -> str:
    return f"{snapshot.index:020d}-{snapshot.term:020d}{SNAPSHOT_SUFFIX}"


class _SegmentFile:
    """One segment: its first index, an O_APPEND descriptor and its size."""

    def __init__(self, directory: pathlib.Path, base_index: int, fd: int, size_bytes: int):
        self.path = directory / f"{base_index:020d}{LOG_SUFFIX}"
        self.base_index = base_index
        self.fd = fd
        self.size_bytes = size_bytes

    @classmethod
    def create(cls, directory: pathlib.Path, base_index: int) -> _SegmentFile:
        path = directory / f"{base_index:020d}{LOG_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
        return cls(directory, base_index, fd, 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(slots=True)
class SyncJob:
    """Blocking work that makes every earlier write durable. `run` may be called from a
    worker thread: it only uses what it holds (its own duplicated descriptors)."""

    directory: pathlib.Path
    descriptors: list[int] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    deletions: list[pathlib.Path] = field(default_factory=list)
    sync_directory: bool = False
    hard_state_file: HardStateFile | None = None
    persistent_state: PersistentState | None = None

    @property
    def is_empty(self) -> bool:
        return not (
            self.descriptors
            or self.snapshots
            or self.deletions
            or self.sync_directory
            or self.persistent_state
        )

    def run(self) -> None:
        """fsync segments, write snapshot files, delete what they made obsolete, fsync the
        directory, then store the hard state. Raises OSError (the data may not be durable:
        the caller must stop, as after any failed fsync). Blocking."""
        try:
            for fd in self.descriptors:
                os.fdatasync(fd)
            for snapshot in self.snapshots:
                write_atomically(
                    self.directory / snapshot_file_name(snapshot), encode_snapshot(snapshot)
                )
            for path in self.deletions:
                path.unlink(missing_ok=True)
            if self.sync_directory or self.deletions:
                fsync_directory(self.directory)
            if self.hard_state_file is not None and self.persistent_state is not None:
                self.hard_state_file.store(self.persistent_state)
        finally:
            for fd in self.descriptors:
                os.close(fd)
            self.descriptors = []


class DurableStorage:
    """LogStorage on disk; see the module's theory of operation.

    Reads and `write_entries` / `install_snapshot` / `create_snapshot` / `compact` /
    `prepare_sync` must all be called from one thread (the trio thread); only a SyncJob's
    `run`, `write_snapshot_file` and the opening itself block and belong in a worker thread.
    """

    def __init__(self, directory: pathlib.Path, config: DurableStorageConfig) -> None:
        self.directory = directory
        self.config = config
        self._state_file = HardStateFile(directory)
        self._persistent = PersistentState(
            hard_state=HardState(), configuration=Configuration(voters=frozenset())
        )
        self._stored_persistent = self._persistent
        self._snapshot = Snapshot(
            index=0, term=0, configuration=Configuration(voters=frozenset()), data=b""
        )
        self._segments: list[_SegmentFile] = []
        self._segment_bases: list[int] = []
        self._offset = 0  # the last compacted index (first_index() - 1)
        self._offset_term = 0
        self._terms = array("q")  # of entries offset+1 .. last
        self._positions = array("q")
        self._sizes = array("q")
        self._cache: list[Entry] = []  # entries last_index()+1-len(_cache) .. last_index()
        self._cache_bytes = 0
        self._dirty: set[int] = set()  # base indexes of segments written since the last sync
        self._pending_snapshots: list[Snapshot] = []
        self._pending_deletions: list[pathlib.Path] = []
        self._directory_dirty = False
        self._closed = False

    # Opening and recovery.

    @classmethod
    def open(
        cls,
        directory: pathlib.Path,
        initial: Configuration,
        config: DurableStorageConfig = DurableStorageConfig(),
    ) -> DurableStorage:
        """Open (creating or recovering) the storage in `directory`. `initial` is the
        bootstrap configuration, recorded on first use and ignored afterwards.

        Raises StorageCorruptError, HardStateCorruptError, OSError. Blocking.
        """
        config.validate()
        directory.mkdir(parents=True, exist_ok=True)
        storage = cls(directory, config)
        try:
            storage._load(initial)
        except BaseException:
            storage.close()
            raise
        return storage

    def _load(self, initial: Configuration) -> None:
        for path in self.directory.iterdir():
            if path.name.endswith(TEMPORARY_SUFFIX):
                path.unlink()
        loaded = self._state_file.load()
        if loaded is None:
            loaded = PersistentState(hard_state=HardState(), configuration=initial)
            self._state_file.store(loaded)
        self._persistent = self._stored_persistent = loaded
        self._snapshot = self._load_snapshot(loaded.configuration)
        entries_first, terms = self._load_segments()
        self._fit_to_snapshot(entries_first, terms)
        if loaded.hard_state.commit > self.last_index():
            raise StorageCorruptError(
                f"{self.directory}: the log ends at {self.last_index()} but entries up to "
                f"{loaded.hard_state.commit} were committed: committed entries were lost"
            )
        self._run_job(self.prepare_sync())

    def _load_snapshot(self, bootstrap: Configuration) -> Snapshot:
        found = []
        for path in self.directory.iterdir():
            match = _SNAPSHOT_NAME.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), path))
        found.sort()
        if not found:
            return Snapshot(index=0, term=0, configuration=bootstrap, data=b"")
        path = found[-1][1]
        if path.stat().st_size > self.config.snapshot_bytes_max + SNAPSHOT_PREFIX.size:
            raise StorageCorruptError(f"{path} exceeds snapshot_bytes_max")
        snapshot = decode_snapshot(path.read_bytes())
        if path.name != snapshot_file_name(snapshot):
            raise StorageCorruptError(f"{path} holds the snapshot at {snapshot.index}")
        for _, older in found[:-1]:  # only once the newest is known good
            self._pending_deletions.append(older)
        return snapshot

    def _load_segments(self) -> tuple[int, array]:
        """Open and check every segment; return (index of the first entry, terms). Sets the
        positions and sizes arrays; truncates and deletes what follows damage."""
        bases = sorted(
            int(match.group(1))
            for path in self.directory.iterdir()
            if (match := _SEGMENT_NAME.fullmatch(path.name))
        )
        terms = array("q")
        first = bases[0] if bases else self._snapshot.index + 1
        previous_term: int | None = None
        if first == self._snapshot.index + 1:
            previous_term = self._snapshot.term
        for number, base in enumerate(bases):
            path = self.directory / f"{base:020d}{LOG_SUFFIX}"
            if base != first + len(terms):
                logger.error(
                    "%s: segment %s does not follow index %d",
                    self.directory,
                    path.name,
                    first + len(terms) - 1,
                )
                self._delete_from(bases[number:])
                break
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
            segment = _SegmentFile(self.directory, base, fd, 0)
            self._add_segment(segment)
            intact, previous_term = self._scan_segment(segment, terms, previous_term)
            if not intact:
                self._delete_from(bases[number + 1 :])
                break
        return first, terms

    def _scan_segment(
        self, segment: _SegmentFile, terms: array, previous_term: int | None
    ) -> tuple[bool, int | None]:
        """Check a segment's batches, appending to terms/positions/sizes; truncate it at the
        first bad byte. Returns (it was intact, term of its last entry)."""
        file_size = os.fstat(segment.fd).st_size
        expected = segment.base_index
        scanner = ValidatingScanner(
            segment.fd, start=0, end=file_size, first_offset=expected, offset_max=2**63 - 2
        )
        valid_end = 0
        problem: str | None = None
        for batch in scanner.batches():
            header = batch.header
            key = self._read_key(segment, batch.position)
            problem = self._check_chain(header, key, expected, previous_term)
            if problem is None and terms and key[1] < terms[-1]:
                problem = f"term {key[1]} at index {expected} decreases"
            if problem is not None:
                break
            previous_term = key[1]
            terms.append(key[1])
            self._positions.append(batch.position)
            self._sizes.append(header.size_bytes)
            valid_end = batch.position + header.size_bytes
            expected += 1
        problem = problem or scanner.stop_reason
        if problem is None and valid_end == file_size:
            segment.size_bytes = file_size
            return True, previous_term
        logger.warning(
            "%s: truncating %s at byte %d (%d bytes removed): %s",
            self.directory,
            segment.path.name,
            valid_end,
            file_size - valid_end,
            problem or "unexpected end of file",
        )
        os.ftruncate(segment.fd, valid_end)
        os.fsync(segment.fd)
        segment.size_bytes = valid_end
        return False, previous_term

    def _check_chain(
        self,
        header: BatchHeader,
        key: tuple[int, int, int, int],
        expected: int,
        previous_term: int | None,
    ) -> str | None:
        """Why the checked batch with `key` cannot be entry `expected`, or None."""
        if header.base_offset != expected or header.record_count != 1:
            return f"batch at offset {header.base_offset} is not entry {expected}"
        if header.size_bytes > self.config.entry_bytes_max:
            return f"entry {expected} exceeds entry_bytes_max"
        index, term, key_previous_term, kind = key
        if index != expected or (term <= EPOCH_MAX and header.partition_leader_epoch != term):
            return f"entry {expected} contradicts its key"
        if kind not in (EntryKind.NORMAL, EntryKind.CONFIG_CHANGE):
            return f"entry {expected} has an unknown kind {kind}"
        if previous_term is not None and key_previous_term != previous_term:
            return f"entry {expected} does not follow an entry of term {previous_term}"
        return None

    def _read_key(self, segment: _SegmentFile, position: int) -> tuple[int, int, int, int]:
        data = os.pread(segment.fd, ENTRY_KEY.size, position + ENTRY_KEY_POSITION)
        if len(data) != ENTRY_KEY.size:
            return (-1, -1, -1, -1)
        return ENTRY_KEY.unpack(data)

    def _delete_from(self, bases: Sequence[int]) -> None:
        for base in reversed(bases):
            logger.warning("%s: deleting segment %020d after damage", self.directory, base)
            (self.directory / f"{base:020d}{LOG_SUFFIX}").unlink()
        if bases:
            self._directory_dirty = True

    def _fit_to_snapshot(self, first: int, terms: array) -> None:
        """Fit the scanned entries [first, first + len(terms)) to the snapshot."""
        snapshot = self._snapshot
        last = first + len(terms) - 1
        self._offset, self._offset_term = snapshot.index, snapshot.term
        if first > snapshot.index + 1:
            raise StorageCorruptError(
                f"{self.directory}: the log starts at {first}, after the snapshot at "
                f"{snapshot.index}: entries {snapshot.index + 1}..{first - 1} are missing"
            )
        matches = last >= snapshot.index and (
            snapshot.index < first or terms[snapshot.index - first] == snapshot.term
        )
        if not matches:
            if terms:
                logger.warning(
                    "%s: discarding entries %d..%d: the snapshot at %d replaces them",
                    self.directory,
                    first,
                    last,
                    snapshot.index,
                )
            self._replace_segments(snapshot.index + 1)
            return
        skip = snapshot.index + 1 - first
        self._terms = terms[skip:]
        del self._positions[:skip]
        del self._sizes[:skip]
        self._queue_covered_segments()
        if not self._segments:
            self._roll(snapshot.index + 1)

    # Reads (LogStorage).

    def initial_state(self) -> tuple[HardState, Configuration]:
        return self._persistent.hard_state, self._snapshot.configuration

    @property
    def hard_state(self) -> HardState:
        return self._persistent.hard_state

    def first_index(self) -> int:
        return self._offset + 1

    def last_index(self) -> int:
        return self._offset + len(self._terms)

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def term(self, index: int) -> int:
        if index < self._offset:
            raise CompactedError(f"index {index} is compacted (first index {self._offset + 1})")
        if index > self.last_index():
            raise UnavailableError(f"index {index} is beyond the last index")
        if index == self._offset:
            return self._offset_term
        return self._terms[index - self._offset - 1]

    def entries(self, low: int, high: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries [low, high), at most max_bytes but at least one. Raises CompactedError,
        UnavailableError, StorageError (damage found while reading)."""
        if low <= self._offset:
            raise CompactedError(f"index {low} is compacted (first index {self._offset + 1})")
        if high > self.last_index() + 1:
            raise UnavailableError(f"index {high - 1} is beyond the last index")
        assert low <= high, f"invalid range [{low}, {high})"
        result: list[Entry] = []
        total = 0
        cache_first = self.last_index() + 1 - len(self._cache)
        index = low
        while index < high:
            if index >= cache_first:
                entries = self._cache[index - cache_first : high - cache_first]
            else:
                entries = self._read_entries(index, min(high, cache_first), max_bytes, total)
            for entry in entries:
                total += entry_bytes(entry)
                if max_bytes is not None and total > max_bytes and result:
                    return result
                result.append(entry)
            index += len(entries)
        return result

    def _read_entries(self, low: int, high: int, max_bytes: int | None, total: int) -> list[Entry]:
        """Entries [low, high) from disk, from one segment, about max_bytes worth."""
        number = bisect.bisect_right(self._segment_bases, low) - 1
        segment = self._segments[number]
        if number + 1 < len(self._segments):
            high = min(high, self._segments[number + 1].base_index)
        first = low - self._offset - 1
        count = high - low
        budget = (max_bytes - total) if max_bytes is not None else None
        sizes = self._sizes
        length = 0
        for taken in range(count):
            length += sizes[first + taken]
            if budget is not None and length > budget:
                count = taken + 1
                break
        start = self._positions[first]
        data = os.pread(segment.fd, length, start)
        if len(data) != length:
            raise StorageError(f"{segment.path}: entries {low}.. are cut short")
        entries = []
        try:
            for batch in scan_batches(data):
                entry, _ = decode_entry(
                    batch.header,
                    memoryview(data)[batch.position : batch.position + batch.header.size_bytes],
                )
                entries.append(entry)
        except ProtocolError as error:
            raise StorageError(f"{segment.path}: entry damaged on disk: {error}") from None
        expected = list(range(low, low + count))
        if [entry.index for entry in entries] != expected:
            raise StorageError(f"{segment.path}: entries {low}.. do not match the index")
        return entries

    # Writes.

    def write_entries(self, entries: Sequence[Entry]) -> None:
        """Store `entries` (replacing any conflicting suffix) in the page cache; they are
        durable after the next SyncJob. Raises OSError. Cheap: no fsync."""
        if not entries:
            return
        assert entries[0].index <= self.last_index() + 1, "gap in the log"
        start = 0
        while start < len(entries) and (
            entries[start].index <= self._offset
            or (
                entries[start].index <= self.last_index()
                and self.term(entries[start].index) == entries[start].term
            )
        ):
            start += 1  # already stored (or compacted): never rewrite, see the theory
        if start == len(entries):
            if self._offset < entries[-1].index < self.last_index():
                self._truncate_from(entries[-1].index + 1)  # the contract: the suffix goes
            return
        first = entries[start].index
        if first <= self.last_index():
            self._truncate_from(first)
        previous_term = self.term(first - 1)
        pending: list[bytes] = []
        pending_bytes = 0
        for entry in entries[start:]:
            assert entry.term >= previous_term, "terms never decrease along the log"
            batch = encode_entry(entry, previous_term)
            active = self._segments[-1]
            if active.size_bytes + pending_bytes + len(batch) > self.config.segment_bytes_max and (
                active.size_bytes + pending_bytes > 0
            ):
                self._write(active, pending)
                pending, pending_bytes = [], 0
                self._roll(entry.index)
            self._positions.append(self._segments[-1].size_bytes + pending_bytes)
            self._sizes.append(len(batch))
            self._terms.append(entry.term)
            pending.append(batch)
            pending_bytes += len(batch)
            self._cache_entry(entry)
            previous_term = entry.term
        self._write(self._segments[-1], pending)

    def _write(self, segment: _SegmentFile, batches: list[bytes]) -> None:
        data = memoryview(b"".join(batches))
        while data:
            written = os.write(segment.fd, data)
            data = data[written:]
            segment.size_bytes += written
        self._dirty.add(segment.base_index)

    def _truncate_from(self, index: int) -> None:
        """Drop entries >= index (in memory, and from the files in the page cache)."""
        number = bisect.bisect_right(self._segment_bases, index) - 1
        for segment in reversed(self._segments[number + 1 :]):
            segment.close()
            self._pending_deletions.append(segment.path)
            self._dirty.discard(segment.base_index)
        del self._segments[number + 1 :]
        del self._segment_bases[number + 1 :]
        keep = index - self._offset - 1
        segment = self._segments[number]
        position = self._positions[keep]
        os.ftruncate(segment.fd, position)
        segment.size_bytes = position
        self._dirty.add(segment.base_index)
        del self._terms[keep:]
        del self._positions[keep:]
        del self._sizes[keep:]
        while self._cache and self._cache[-1].index >= index:
            self._cache_bytes -= entry_bytes(self._cache.pop())

    def _cache_entry(self, entry: Entry) -> None:
        self._cache.append(entry)
        self._cache_bytes += entry_bytes(entry)
        if self._cache_bytes > self.config.cache_bytes_max:
            # Drop a quarter of the budget at once: one list deletion, not one per entry.
            drop = 0
            target = self.config.cache_bytes_max * 3 // 4
            while self._cache_bytes > target and drop < len(self._cache) - 1:
                self._cache_bytes -= entry_bytes(self._cache[drop])
                drop += 1
            del self._cache[:drop]

    def _roll(self, base_index: int) -> None:
        segment = _SegmentFile.create(self.directory, base_index)
        # A dropped segment of the same name awaiting deletion was just reused (emptied):
        # it must not be deleted any more. Its old bytes, should a crash bring them back,
        # fail the previous-term chain (see the theory).
        while segment.path in self._pending_deletions:
            self._pending_deletions.remove(segment.path)
        self._add_segment(segment)
        self._directory_dirty = True

    def _add_segment(self, segment: _SegmentFile) -> None:
        self._segments.append(segment)
        self._segment_bases.append(segment.base_index)

    def _replace_segments(self, base_index: int) -> None:
        """Drop every segment (newest first) and start an empty one at base_index."""
        for segment in reversed(self._segments):
            segment.close()
            self._pending_deletions.append(segment.path)
        self._segments.clear()
        self._segment_bases.clear()
        self._dirty.clear()
        self._terms = array("q")
        self._positions = array("q")
        self._sizes = array("q")
        self._cache.clear()
        self._cache_bytes = 0
        self._roll(base_index)

    def set_persistent_hard_state(self, hard_state: HardState) -> None:
        """Record `hard_state` in memory; the next SyncJob stores it (after the entries)."""
        self._persistent = PersistentState(
            hard_state=hard_state, configuration=self._persistent.configuration
        )

    def write_snapshot_file(self, snapshot: Snapshot) -> None:
        """Write `snapshot`'s file durably. Blocking; safe in a worker thread (touches no
        in-memory state). Raises OSError."""
        write_atomically(self.directory / snapshot_file_name(snapshot), encode_snapshot(snapshot))

    def install_snapshot(self, snapshot: Snapshot) -> None:
        """Replace the whole log by `snapshot`, whose file `write_snapshot_file` wrote. The
        old segments are deleted by the next SyncJob."""
        assert snapshot.index > self._snapshot.index, "snapshot is older than the stored one"
        old = self._snapshot
        self._snapshot = snapshot
        self._offset, self._offset_term = snapshot.index, snapshot.term
        self._replace_segments(snapshot.index + 1)
        if old.index:
            self._pending_deletions.append(self.directory / snapshot_file_name(old))

    def create_snapshot(self, index: int, configuration: Configuration, data: bytes) -> Snapshot:
        """Record the application's snapshot at `index`; its file is written by the next
        SyncJob (before anything it makes obsolete is deleted)."""
        assert self._snapshot.index < index <= self.last_index(), f"bad snapshot index {index}"
        snapshot = Snapshot(
            index=index, term=self.term(index), configuration=configuration, data=data
        )
        old = self._snapshot
        self._snapshot = snapshot
        self._pending_snapshots.append(snapshot)
        if old.index:
            self._pending_deletions.append(self.directory / snapshot_file_name(old))
        return snapshot

    def compact(self, index: int) -> None:
        """Discard entries <= index (<= the snapshot's index) from view; whole segments they
        fill are deleted by the next SyncJob, after the snapshot file is durable."""
        assert index <= self._snapshot.index, "compact only what a snapshot covers"
        if index <= self._offset:
            return
        drop = index - self._offset
        self._offset_term = self.term(index)
        self._offset = index
        del self._terms[:drop]
        del self._positions[:drop]
        del self._sizes[:drop]
        covered = 0
        while covered < len(self._cache) and self._cache[covered].index <= index:
            self._cache_bytes -= entry_bytes(self._cache[covered])
            covered += 1
        del self._cache[:covered]
        self._queue_covered_segments()

    def _queue_covered_segments(self) -> None:
        """Queue for deletion the segments whose every entry is <= the offset (never the
        last one), oldest first."""
        while len(self._segments) > 1 and self._segments[1].base_index <= self._offset + 1:
            segment = self._segments.pop(0)
            self._segment_bases.pop(0)
            segment.close()
            self._dirty.discard(segment.base_index)
            self._pending_deletions.append(segment.path)

    def prepare_sync(self, *, lazy_commit: bool = False) -> SyncJob:
        """Capture everything written since the last sync into a SyncJob (see its `run`).

        With `lazy_commit`, a hard state that differs from the stored one only by its commit
        index is left for a later job unless the commit moved `commit_lag_entries_max`
        entries: rewriting the state file costs two fsyncs, and a restarted node relearns
        its commit index from the leader (Raft never needs it durable).
        """
        job = SyncJob(self.directory)
        for segment in self._segments:
            if segment.base_index in self._dirty:
                job.descriptors.append(os.dup(segment.fd))
        self._dirty.clear()
        job.snapshots, self._pending_snapshots = self._pending_snapshots, []
        job.deletions, self._pending_deletions = self._pending_deletions, []
        job.sync_directory, self._directory_dirty = self._directory_dirty, False
        if self._persistent != self._stored_persistent and not (
            lazy_commit and self._only_commit_moved_a_little()
        ):
            job.hard_state_file = self._state_file
            job.persistent_state = self._persistent
            self._stored_persistent = self._persistent
        return job

    def _only_commit_moved_a_little(self) -> bool:
        new, stored = self._persistent, self._stored_persistent
        return (
            new.configuration == stored.configuration
            and new.hard_state.term == stored.hard_state.term
            and new.hard_state.vote == stored.hard_state.vote
            and new.hard_state.commit - stored.hard_state.commit
            < self.config.commit_lag_entries_max
        )

    def _run_job(self, job: SyncJob) -> None:
        if not job.is_empty:
            job.run()

    # Blocking conveniences: durable on return.

    def sync(self) -> None:
        """Make every earlier change durable. Raises OSError. Blocking."""
        self._run_job(self.prepare_sync())

    def append(self, entries: Sequence[Entry]) -> None:
        """Store entries, replacing any conflicting suffix; durable on return. Blocking."""
        self.write_entries(entries)
        self.sync()

    def set_hard_state(self, hard_state: HardState) -> None:
        """Store `hard_state` durably (after every earlier write). Blocking."""
        self.set_persistent_hard_state(hard_state)
        self.sync()

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Replace the whole log by `snapshot` (from a leader); durable on return. Blocking."""
        self.write_snapshot_file(snapshot)
        self.install_snapshot(snapshot)
        self.sync()

    # Statistics and closing.

    def statistics(self) -> DurableStorageStatistics:
        return DurableStorageStatistics(
            first_index=self.first_index(),
            last_index=self.last_index(),
            snapshot_index=self._snapshot.index,
            segments=len(self._segments),
            log_bytes=sum(segment.size_bytes for segment in self._segments),
            cached_entries=len(self._cache),
            cached_bytes=self._cache_bytes,
            pending_deletions=len(self._pending_deletions),
        )

    def close(self) -> None:
        """Close every descriptor (without syncing: call `sync` first for a clean close)."""
        if not self._closed:
            self._closed = True
            for segment in self._segments:
                segment.close()
