"""A simulated disk: MemoryStorage that forgets, on a crash, whatever was not fsynced.

Theory of operation. The node reads a live MemoryStorage (the page cache). `persist` writes
a Ready into it at once, then, when the Ready must be synced, waits for a simulated fsync
(a delay of trio time drawn from the disk's seeded random: usually short, long while the
disk is "slow") and only then copies the live state into the durable image. A crash
(cancelling the node's tasks) can strike during that wait: what was not copied is lost, as
the page cache is. A restart builds a new live MemoryStorage from the durable image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import trio

from broker.raft.log_storage import MemoryStorage
from broker.raft.messages import Configuration, Entry, HardState, Ready, Snapshot


@dataclass(frozen=True, slots=True)
class DiskImage:
    hard_state: HardState
    snapshot: Snapshot
    entries: tuple[Entry, ...]


@dataclass(slots=True)
class DiskStatistics:
    fsyncs: int = 0
    slow_fsyncs: int = 0
    entries_synced: int = 0
    images: list[int] = field(default_factory=list)


class SimulatedDisk:
    def __init__(
        self,
        initial: Configuration,
        random_source: random.Random,
        *,
        fsync_seconds: tuple[float, float] = (0.0002, 0.002),
        slow_fsync_seconds: tuple[float, float] = (0.05, 0.4),
    ) -> None:
        self.initial = initial
        self._random = random_source
        self.fsync_seconds = fsync_seconds
        self.slow_fsync_seconds = slow_fsync_seconds
        self.slow = False
        self.image = DiskImage(
            HardState(), Snapshot(index=0, term=0, configuration=initial, data=b""), ()
        )
        self.live = self.open()
        self.statistics = DiskStatistics()
        self._fsync_started = trio.Event()

    async def wait_fsync_started(self) -> None:
        """Return when the next fsync begins (the nemesis crashes nodes right then)."""
        await self._fsync_started.wait()

    def open(self) -> MemoryStorage:
        """A fresh page cache holding exactly the durable image (after a crash)."""
        storage = MemoryStorage(self.initial)
        if self.image.snapshot.index > 0:
            storage.apply_snapshot(self.image.snapshot)
        storage.append(self.image.entries)
        storage.set_hard_state(self.image.hard_state)
        self.live = storage
        return storage

    async def persist(self, ready: Ready) -> None:
        live = self.live
        if ready.snapshot is not None:
            live.apply_snapshot(ready.snapshot)
        live.append(ready.entries)
        if ready.hard_state is not None:
            live.set_hard_state(ready.hard_state)
        if ready.must_sync:
            await self._fsync(live)

    async def flush(self) -> None:
        await self._fsync(self.live)

    async def _fsync(self, live: MemoryStorage) -> None:
        low, high = self.slow_fsync_seconds if self.slow else self.fsync_seconds
        self._fsync_started.set()
        self._fsync_started = trio.Event()
        await trio.sleep(self._random.uniform(low, high))
        self.statistics.fsyncs += 1
        self.statistics.slow_fsyncs += self.slow
        first, last = live.first_index(), live.last_index()
        entries = tuple(live.entries(first, last + 1))
        self.statistics.entries_synced += len(entries)
        self.image = DiskImage(live.hard_state, live.snapshot(), entries)
