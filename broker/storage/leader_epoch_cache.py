"""The leader-epoch history of one partition log: which epoch wrote from which offset on.

Theory of operation. Every batch carries the epoch of the leader that appended it
(`partition_leader_epoch`), and epochs never decrease along a log. The cache keeps, in
order, one entry (epoch, start offset) per epoch present: the offset of its first batch.
An epoch's end offset is the start of the next one (the log end for the latest). This is
what a leader answers to OffsetsForLeaderEpoch and what a follower compares with it to find
where the two logs diverge (KIP-101/KIP-279): both logs agree below the end offset of the
largest epoch they share.

The entries change only when a new, larger epoch appears (`assign`), when the log is
truncated at its end (`truncate_from_end`) or its start moves (`truncate_from_start`).
This class is pure (no I/O): the partition log writes `checkpoint_bytes()` atomically to
the `leader-epoch-checkpoint` file after each change, before the batches the change
describes go to the log, and reads it back with `parse_checkpoint` (a text file as Kafka's:
version, count, then one "epoch start_offset" line per entry).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable

from .errors import StorageError

UNDEFINED_EPOCH = -1
UNDEFINED_OFFSET = -1
CHECKPOINT_VERSION = 0
CHECKPOINT_BYTES_MAX = 1 << 20  # a larger file is not trusted (the cache is rebuilt)


class LeaderEpochError(StorageError):
    """An epoch would go back: a batch (or an append) carries an epoch below the latest one
    already in the log, or a new epoch would start below the latest epoch's start."""


@dataclass(frozen=True, slots=True)
class EpochEntry:
    epoch: int
    start_offset: int


class LeaderEpochCache:
    """Ordered (epoch -> start offset) entries; epochs and start offsets strictly increase."""

    def __init__(self, entries: Iterable[EpochEntry] = ()) -> None:
        self._epochs: list[int] = []
        self._starts: list[int] = []
        for entry in entries:
            self.assign(entry.epoch, entry.start_offset)

    def entries(self) -> tuple[EpochEntry, ...]:
        return tuple(map(EpochEntry, self._epochs, self._starts))

    def __len__(self) -> int:
        return len(self._epochs)

    @property
    def latest_epoch(self) -> int:
        """The largest epoch in the log, or UNDEFINED_EPOCH when there is none."""
        return self._epochs[-1] if self._epochs else UNDEFINED_EPOCH

    def check_assignable(self, epoch: int, start_offset: int) -> None:
        """Raise LeaderEpochError if `assign(epoch, start_offset)` would go back."""
        if not self._epochs or epoch < 0 or epoch == self._epochs[-1]:
            return
        if epoch < self._epochs[-1]:
            raise LeaderEpochError(
                f"leader epoch {epoch} is below the latest epoch {self._epochs[-1]} of the log"
            )
        if start_offset < self._starts[-1]:
            raise LeaderEpochError(
                f"leader epoch {epoch} would start at offset {start_offset}, below the start "
                f"{self._starts[-1]} of epoch {self._epochs[-1]}"
            )

    def assign(self, epoch: int, start_offset: int) -> bool:
        """Record that `epoch` starts at `start_offset`. A negative epoch (a batch written
        without one) and the latest epoch again are ignored; a new epoch starting at the same
        offset as the latest replaces it (that epoch wrote nothing). Returns True if the
        entries changed. Raises LeaderEpochError when the epoch or the start would go back."""
        assert start_offset >= 0
        self.check_assignable(epoch, start_offset)
        if epoch < 0 or (self._epochs and epoch == self._epochs[-1]):
            return False
        if self._starts and start_offset == self._starts[-1]:
            self._epochs.pop()
            self._starts.pop()
        self._epochs.append(epoch)
        self._starts.append(start_offset)
        return True

    def end_offset_for(self, epoch: int, log_end_offset: int) -> tuple[int, int]:
        """Answer OffsetsForLeaderEpoch for `epoch`: (the largest known epoch <= `epoch`, its
        end offset), the end offset being the next epoch's start, or `log_end_offset` for
        the latest epoch (also when `epoch` is above every known one). When `epoch` is below
        every known epoch, Kafka's answer: (`epoch`, the first known epoch's start offset),
        so that a follower truncates to where this log's history begins.
        (UNDEFINED_EPOCH, UNDEFINED_OFFSET) when `epoch` is undefined or nothing is known."""
        if epoch < 0 or not self._epochs:
            return UNDEFINED_EPOCH, UNDEFINED_OFFSET
        index = bisect.bisect_right(self._epochs, epoch) - 1
        if index < 0:
            return epoch, self._starts[0]
        if index + 1 == len(self._epochs):
            return self._epochs[index], log_end_offset
        return self._epochs[index], self._starts[index + 1]

    def epoch_for_offset(self, offset: int) -> int:
        """The epoch of the entry covering `offset`, or UNDEFINED_EPOCH before the first."""
        index = bisect.bisect_right(self._starts, offset) - 1
        return self._epochs[index] if index >= 0 else UNDEFINED_EPOCH

    def truncate_from_end(self, end_offset: int) -> bool:
        """Drop the entries starting at or after `end_offset` (the log was truncated there).
        Returns True if the entries changed."""
        keep = bisect.bisect_left(self._starts, end_offset)
        if keep == len(self._starts):
            return False
        del self._epochs[keep:]
        del self._starts[keep:]
        return True

    def truncate_from_start(self, start_offset: int) -> bool:
        """The log now starts at `start_offset`: drop the entries wholly below it and move
        the start of the one covering it up to it. Returns True if the entries changed."""
        covering = bisect.bisect_right(self._starts, start_offset) - 1
        if covering < 0:
            return False
        changed = covering > 0 or self._starts[0] != start_offset
        del self._epochs[:covering]
        del self._starts[:covering]
        self._starts[0] = start_offset
        return changed

    def checkpoint_bytes(self) -> bytes:
        lines = [str(CHECKPOINT_VERSION), str(len(self._epochs))]
        lines += [f"{epoch} {start}" for epoch, start in zip(self._epochs, self._starts)]
        return ("\n".join(lines) + "\n").encode("ascii")


def parse_checkpoint(data: bytes) -> LeaderEpochCache | None:
    """Return the cache a `checkpoint_bytes()` output describes, or None when `data` is not
    one (wrong version, count, order or syntax): the caller then rebuilds the cache."""
    if len(data) > CHECKPOINT_BYTES_MAX or not data.endswith(b"\n"):
        return None
    lines = data[:-1].split(b"\n")
    if len(lines) < 2 or lines[0] != str(CHECKPOINT_VERSION).encode():
        return None
    if not lines[1].isdigit() or int(lines[1]) != len(lines) - 2:
        return None
    cache = LeaderEpochCache()
    for line in lines[2:]:
        fields = line.split(b" ")
        if len(fields) != 2 or not all(field.isdigit() for field in fields):
            return None
        epoch, start = int(fields[0]), int(fields[1])
        if cache._epochs and (epoch <= cache._epochs[-1] or start <= cache._starts[-1]):
            return None
        cache.assign(epoch, start)
    return cache
