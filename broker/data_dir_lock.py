"""The data directory's lock: one broker per data directory.

Theory of operation. A broker takes an exclusive `flock` on ``<data_dir>/.lock`` before it
reads or writes anything else in the directory, and holds it until it has closed every log.
The kernel releases the lock when the holder exits for any reason (kill -9 included), so a
crash never leaves a stale lock behind. `flock` belongs to the open file description, not to
the process, so two brokers in one process (tests) exclude each other too.

After locking, the holder writes its pid into the file (new pid first, then truncate, so the
file is never empty while locked by a process that got this far); a broker that finds the
lock taken reads that pid back to name the holder in its refusal. The file itself is never
deleted: removing it would let a third process lock a fresh inode while the holder still
writes.
"""

from __future__ import annotations

import fcntl
import os
import pathlib

LOCK_FILE = ".lock"
PID_BYTES_MAX = 32  # a pid is at most 10 digits; anything longer is not a pid


class DataDirError(Exception):
    """The data directory cannot be used; the message names it and says why."""


class DataDirLockedError(DataDirError):
    """Another process holds the data directory's lock."""

    def __init__(self, data_dir: pathlib.Path, holder_pid: int | None) -> None:
        holder = f"pid {holder_pid}" if holder_pid is not None else "pid unknown"
        super().__init__(f"data directory {data_dir} is in use by another broker ({holder})")
        self.data_dir = data_dir
        self.holder_pid = holder_pid


class DataDirLock:
    """An exclusive lock on a data directory; create with `acquire`, end with `release`."""

    def __init__(self, data_dir: pathlib.Path, fd: int) -> None:
        self.data_dir = data_dir
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: pathlib.Path) -> DataDirLock:
        """Lock `data_dir` (creating it if missing) without waiting; return the lock.

        Raises DataDirLockedError if another process (or another lock in this process) holds
        it, DataDirError if the directory or its lock file cannot be created or opened.
        Changes nothing in an existing directory unless the lock is acquired. Blocking (briefly).
        """
        data_dir = data_dir.absolute()
        path = data_dir / LOCK_FILE
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise DataDirError(
                f"cannot use data directory {data_dir}: {error.strerror or error}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder_pid = _read_pid(fd)
            os.close(fd)
            raise DataDirLockedError(data_dir, holder_pid) from None
        except OSError as error:
            os.close(fd)
            raise DataDirError(f"cannot lock {path}: {error.strerror or error}") from None
        try:
            _write_pid(fd, os.getpid())
        except OSError as error:
            os.close(fd)  # also releases the lock
            raise DataDirError(f"cannot write {path}: {error.strerror or error}") from None
        return cls(data_dir, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (idempotent). Call only after every file in the directory is
        closed. Never raises."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _write_pid(fd: int, pid: int) -> None:
    text = f"{pid}\n".encode()
    os.pwrite(fd, text, 0)
    os.ftruncate(fd, len(text))


def _read_pid(fd: int) -> int | None:
    """Return the pid recorded in the lock file, None if it holds none."""
    try:
        first_line = os.pread(fd, PID_BYTES_MAX, 0).split(b"\n", 1)[0]
    except OSError:
        return None
    return int(first_line) if first_line.isdigit() else None
