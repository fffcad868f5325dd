"""A process-wide, bounded cache of open file descriptors: segment log files are opened on
demand, so a broker's descriptors stay bounded whatever its number of partitions.

Theory of operation. A segment's log file is a `CachedFile`: its path (or the paths it may
be renamed to) and open flags, with a descriptor only while the cache holds one. The cache
keeps at most `capacity` descriptors open, in least-recently-used order; opening one more
first closes the least recently used one that nobody holds. `close_idle`, run periodically,
closes those unused since its previous run, so an idle partition holds no descriptor.

Holding a descriptor. `with file.pinned() as fd:` holds it for the block, however long it
lasts (a blocking scan in a worker thread): a pinned descriptor is never evicted. Callers
that use the int at once (one `os.dup`, one read, one `fdatasync`) take `file.descriptor()`:
the descriptor is leased to the calling thread and stays open until that thread leases
another file's descriptor, or the file is closed; each thread holds at most one lease (a
thread that ended loses its lease when room is needed, and `close_idle` ends leases unused
for a whole period, so a lease never keeps an idle partition's file open for long).
Eviction is the only thing that closes a descriptor behind its owner's back, so these two
holds are all the safety callers need; a descriptor that leaves the storage layer (a zero-copy
send) is an `os.dup` copy, which closing the cached one cannot close. Those copies still
count against the process's limit: `borrow` and `give_back` account for them (`FetchSlice`
does), the cache keeps fewer descriptors while many are out, and `may_borrow` says when a
fetch answer should stop collecting more.

Durability. Eviction closes a descriptor without fsyncing it, so that making room never
waits for the disk (opens happen on the event loop). Nothing is lost: on Linux an fsync
through any descriptor of a file writes back every dirty page of the file, whichever
descriptor wrote it, and reports a writeback error that no fsync has reported yet, also to a
descriptor opened after the error (errors are tracked per file since Linux 4.13). So the
next fsync through a reopened descriptor covers the writes of the evicted one: partition
logs fsync through `os.dup(segment.log_fd)`, which reopens an evicted file, and
`datasync` reopens a file written since its last `datasync` even when it was evicted.

Identity. A reopened file must be the very file first opened: the cache remembers its
(device, inode) and checks it on every reopen, trying the paths in order (a compacted
segment is written as `.log.cleaned`, renamed to `.log.swap`, then to `.log`).

Running out. An `open` failing with EMFILE or ENFILE closes an eighth of the cached
descriptors and tries once more; a second failure is raised (OSError) to the caller.

Thread-safe: the log loader, the cleaner and fsyncs run in worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import resource
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

logger = logging.getLogger("dwal.storage")

# Descriptors left outside the cache for sockets, pipes, the metadata log, checkpoints,
# transient opens and `os.dup` copies: a quarter of the limit, and at least this many.
RESERVED_DESCRIPTORS_MIN = 64
CAPACITY_MIN = 8  # fewer cannot hold what one append pins at once
_REOPEN_FLAGS_CLEARED = os.O_CREAT | os.O_EXCL | os.O_TRUNC
_EXHAUSTED = (errno.EMFILE, errno.ENFILE)


def open_files_limit() -> int:
    """The process's soft RLIMIT_NOFILE (a large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def capacity_for_limit(open_files_max: int) -> int:
    """The default capacity for a process allowed `open_files_max` descriptors: three
    quarters of them, leaving at least RESERVED_DESCRIPTORS_MIN for everything else."""
    reserved = max(RESERVED_DESCRIPTORS_MIN, open_files_max // 4)
    return max(open_files_max - reserved, CAPACITY_MIN)


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheStatistics:
    capacity: int
    open: int  # descriptors the cache holds now
    pinned: int  # files held by a `pinned` block or a thread's lease
    borrowed: int  # `os.dup` copies handed out (fetch slices) and not yet given back
    opens: int  # files opened, first opens and reopens
    reopens: int  # files opened again after an eviction
    evictions: int  # descriptors closed to make room or because they were idle
    dirty_evictions: int  # of those, files written since their last `datasync`


class CachedFile:
    """A file whose descriptor the cache opens on demand. Create with `FileDescriptorCache.open`."""

    __slots__ = (
        "_cache",
        "_closed",
        "_dirty",
        "_fd",
        "_flags",
        "_identity",
        "_leases",
        "_pins",
        "_sweep",
        "paths",
    )

    def __init__(self, cache: FileDescriptorCache, paths: tuple[str, ...], flags: int):
        self._cache = cache
        self.paths = paths  # str, not Path: one per segment, a Path costs several times more
        self._flags = flags & ~_REOPEN_FLAGS_CLEARED
        self._fd = -1
        self._pins = 0  # pinned blocks
        self._leases = 0  # threads leasing the descriptor
        self._dirty = False
        self._closed = False
        self._identity: tuple[int, int] = (-1, -1)
        self._sweep = 0  # the cache's sweep number when last used

    @property
    def is_open(self) -> bool:
        """True while the cache holds a descriptor of this file."""
        return self._fd >= 0

    @property
    def is_closed(self) -> bool:
        return self._closed

    @contextlib.contextmanager
    def pinned(self) -> Iterator[int]:
        """Hold the descriptor (opened if needed) for the block. Raises OSError (the open
        failed). Closing the file meanwhile closes the descriptor after the block."""
        fd = self._cache._pin(self)
        try:
            yield fd
        finally:
            self._cache._unpin(self)

    def descriptor(self) -> int:
        """The descriptor (opened if needed), leased to the calling thread until it leases
        another file's or the file is closed: use it at once. Raises OSError (the open
        failed)."""
        return self._cache._lease(self)

    @property
    def is_dirty(self) -> bool:
        """True when written (`mark_written`) since the last `datasync`."""
        return self._dirty

    def mark_written(self) -> None:
        """Record a write through the descriptor, for `datasync`."""
        self._dirty = True

    def datasync(self) -> None:
        """fdatasync the file if it was written since the last call, through a reopened
        descriptor if it was evicted meanwhile. Raises OSError. Blocking."""
        if not self._dirty:
            return
        self._dirty = False
        try:
            with self.pinned() as fd:
                os.fdatasync(fd)
        except BaseException:
            self._dirty = True
            raise

    def close(self) -> None:
        """Close the descriptor (without fsync) and forget the file: it cannot be used
        again. A pinned descriptor is closed when its last block ends. Idempotent."""
        self._cache._close(self)


class FileDescriptorCache:
    """At most `capacity` open descriptors of `CachedFile`s; see the module's theory."""

    def __init__(self, capacity: int) -> None:
        assert capacity >= CAPACITY_MIN
        self._capacity = capacity
        self._lock = threading.Lock()
        self._open_files: OrderedDict[CachedFile, None] = OrderedDict()  # oldest first
        self._lease_by_thread: dict[int, tuple[threading.Thread, CachedFile]] = {}
        self._opening = 0  # opens under way, outside the lock, room made for each
        self._borrowed = 0
        self._sweep = 1
        self._opens = self._reopens = self._evictions = self._dirty_evictions = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def set_capacity(self, capacity: int) -> None:
        """Change the capacity, closing descriptors now if it shrank."""
        assert capacity >= CAPACITY_MIN
        with self._lock:
            self._capacity = capacity
            victims = self._detach_victims(room=0)
        self._close_victims(victims)

    def statistics(self) -> CacheStatistics:
        with self._lock:
            return CacheStatistics(
                capacity=self._capacity,
                open=len(self._open_files),
                pinned=sum(1 for file in self._open_files if file._pins or file._leases),
                borrowed=self._borrowed,
                opens=self._opens,
                reopens=self._reopens,
                evictions=self._evictions,
                dirty_evictions=self._dirty_evictions,
            )

    def open(self, paths: Sequence[pathlib.Path], flags: int, mode: int = 0o644) -> CachedFile:
        """Open `paths[0]` with `flags` now (O_CREAT, O_EXCL and O_TRUNC apply to this first
        open only) and cache its descriptor; later reopens try each of `paths` in turn.
        Raises OSError (FileExistsError, FileNotFoundError, EMFILE...). Blocking."""
        file = CachedFile(self, tuple(os.fspath(path) for path in paths), flags)
        with self._lock:
            self._opening += 1
            victims = self._detach_victims(room=0)
        try:
            self._close_victims(victims)
            fd = self._open_with_retry(file.paths[0], flags, mode)
        finally:
            with self._lock:
                self._opening -= 1
        stat = os.fstat(fd)
        file._identity = (stat.st_dev, stat.st_ino)
        with self._lock:
            self._opens += 1
            file._fd = fd
            file._sweep = self._sweep
            self._open_files[file] = None
        return file

    def open_transient(self, path: str | pathlib.Path, flags: int, mode: int = 0o644) -> int:
        """`os.open`, making room in the cache first if the process is out of descriptors;
        the caller closes the descriptor (a short-lived one, outside the cache)."""
        return self._open_with_retry(path, flags, mode)

    def borrow(self) -> None:
        """Count one `os.dup` copy handed out of the storage layer; the cache keeps one
        descriptor fewer until `give_back`."""
        with self._lock:
            self._borrowed += 1
            victims = self._detach_victims(room=0)
        self._close_victims(victims)

    def may_borrow(self) -> bool:
        """True while fewer than half the capacity is borrowed: a fetch answer collecting
        slices of many partitions stops adding more when False (the next fetch reads on),
        so that one answer cannot take every descriptor the process has."""
        with self._lock:
            return self._borrowed < self._capacity // 2

    def give_back(self) -> None:
        with self._lock:
            assert self._borrowed > 0
            self._borrowed -= 1

    def close_idle(self) -> int:
        """Close every descriptor unused since the previous call, except those pinned by a
        block; return how many. A lease that old is over: it is released."""
        with self._lock:
            victims = []
            for file in list(self._open_files):
                if file._sweep == self._sweep:
                    break  # the rest were used later still (least recently used first)
                if file._pins == 0:
                    self._end_leases(file)
                    victims.append(self._detach(file))
            self._sweep += 1
        self._close_victims(victims)
        return len(victims)

    def close_unused(self) -> int:
        """Close every descriptor nothing holds now (pinned or leased); return how many.
        For a moment when every one is known idle: a start that just loaded every log."""
        with self._lock:
            victims = self._detach_unpinned(len(self._open_files))
        self._close_victims(victims)
        return len(victims)

    # Internals. `_lock` guards every field of the cache and of its files.

    def _pin(self, file: CachedFile) -> int:
        with self._lock:
            self._check_usable(file)
            file._pins += 1
            if file._fd >= 0:
                self._touch(file)
                return file._fd
            self._opening += 1
            victims = self._detach_victims(room=0)
        try:
            self._close_victims(victims)
            fd = self._reopen(file)
        except BaseException:
            with self._lock:
                self._opening -= 1
                self._release(file)
            raise
        with self._lock:
            self._opening -= 1
            self._reopens += 1
            self._opens += 1
            if file._closed or file._fd >= 0:  # closed, or reopened by another thread
                spare, fd = fd, file._fd
                if file._closed:
                    self._release(file)
                    os.close(spare)
                    raise OSError(errno.EBADF, "the file was closed", str(file.paths[0]))
                os.close(spare)
            else:
                file._fd = fd
                self._open_files[file] = None
            self._touch(file)
            return fd

    def _unpin(self, file: CachedFile) -> None:
        with self._lock:
            self._release(file)

    def _lease(self, file: CachedFile) -> int:
        ident = threading.get_ident()
        with self._lock:
            held = self._lease_by_thread.get(ident)
            if held is not None and held[1] is file and file._fd >= 0:
                self._check_usable(file)
                self._touch(file)
                return file._fd
        fd = self._pin(file)
        with self._lock:
            previous = self._lease_by_thread.pop(ident, None)
            if previous is not None:
                self._end_lease(previous[1])
            if file._closed:  # by another thread, since `_pin`
                self._release(file)
                raise OSError(errno.EBADF, "the file was closed", str(file.paths[0]))
            self._lease_by_thread[ident] = (threading.current_thread(), file)
            file._leases += 1
            self._release(file)  # the lease holds it now
            return fd

    def _release(self, file: CachedFile) -> None:
        file._pins -= 1
        assert file._pins >= 0
        self._close_if_released(file)

    def _end_lease(self, file: CachedFile) -> None:
        file._leases -= 1
        assert file._leases >= 0
        self._close_if_released(file)

    def _end_leases(self, file: CachedFile) -> None:
        for ident, (_, leased) in list(self._lease_by_thread.items()):
            if leased is file:
                del self._lease_by_thread[ident]
                file._leases -= 1

    def _close_if_released(self, file: CachedFile) -> None:
        """Close the descriptor of a closed file once nothing holds it."""
        if file._closed and file._pins == 0 and file._leases == 0 and file._fd >= 0:
            os.close(file._fd)
            file._fd = -1

    def _check_usable(self, file: CachedFile) -> None:
        if file._closed:  # by another thread: its owner closed it under this caller
            raise OSError(errno.EBADF, "the file was closed", str(file.paths[0]))

    def _touch(self, file: CachedFile) -> None:
        file._sweep = self._sweep
        self._open_files.move_to_end(file)

    def _close(self, file: CachedFile) -> None:
        with self._lock:
            if file._closed:
                return
            file._closed = True
            self._end_leases(file)  # as the descriptor would have been closed before
            if file._fd >= 0:
                del self._open_files[file]
                self._close_if_released(file)

    def _detach(self, file: CachedFile) -> int:
        """Take `file`'s descriptor out of the cache; return it for the caller to close."""
        assert file._pins == 0 and file._leases == 0
        del self._open_files[file]
        fd, file._fd = file._fd, -1
        self._evictions += 1
        self._dirty_evictions += file._dirty
        return fd

    def _detach_victims(self, room: int) -> list[int]:
        """Detach least recently used unpinned descriptors until the open ones, those being
        opened and the borrowed copies leave `room` free below the capacity."""
        excess = len(self._open_files) + self._opening + self._borrowed + room - self._capacity
        return self._detach_unpinned(excess) if excess > 0 else []

    def _detach_unpinned(self, count: int) -> list[int]:
        """Detach up to `count` unpinned descriptors, least recently used first."""
        chosen: list[CachedFile] = []
        pruned = False
        for file in self._open_files:  # not a copy: the oldest few are looked at, not all
            if len(chosen) >= count:
                break
            if file._leases and not pruned:
                self._prune_dead_leases()  # changes no entry of `_open_files`
                pruned = True
            if file._pins == 0 and file._leases == 0:
                chosen.append(file)
        return [self._detach(file) for file in chosen]

    def _prune_dead_leases(self) -> None:
        """Release the leases of threads that ended (a worker thread that left the pool)."""
        for ident, (thread, file) in list(self._lease_by_thread.items()):
            if not thread.is_alive():
                del self._lease_by_thread[ident]
                self._end_lease(file)

    def _close_victims(self, victims: list[int]) -> None:
        """Close detached descriptors, outside the lock."""
        for fd in victims:
            os.close(fd)

    def _reopen(self, file: CachedFile) -> int:
        """Open the first of the file's paths that is still the same file. Raises OSError."""
        for path in file.paths:
            try:
                fd = self._open_with_retry(path, file._flags, 0o644)
            except FileNotFoundError:
                continue
            stat = os.fstat(fd)
            if (stat.st_dev, stat.st_ino) == file._identity:
                return fd
            os.close(fd)
        raise FileNotFoundError(
            errno.ENOENT, "the file is gone (deleted or replaced)", str(file.paths[0])
        )

    def _open_with_retry(self, path: str | pathlib.Path, flags: int, mode: int) -> int:
        try:
            return os.open(path, flags, mode)
        except OSError as error:
            if error.errno not in _EXHAUSTED:
                raise
        with self._lock:
            victims = self._detach_unpinned(max(len(self._open_files) // 8, 1))
        self._close_victims(victims)
        logger.warning(
            "out of file descriptors opening %s: closed %d cached ones to retry",
            path,
            len(victims),
        )
        return os.open(path, flags, mode)


_process_cache = FileDescriptorCache(capacity_for_limit(open_files_limit()))


def process_cache() -> FileDescriptorCache:
    """The cache every segment of this process uses."""
    return _process_cache
