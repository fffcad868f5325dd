"""`ReplicaLog`: what the replica layer and the request handlers use of a partition log.

`PartitionLog` (segment files) and `MemoryPartitionLog` (the whole-cluster simulation's
model of a disk) both provide it; the conformance suite (tests/broker/storage) checks that
they behave alike, and mypy that they fit this shape.
"""

from __future__ import annotations

from typing import Protocol

import trio

from .fetch_slice import FetchSlice
from .log_config import LogConfig
from .partition_log import AppendInfo, ReadLimit


class ReplicaLog(Protocol):
    restored_high_watermark: int | None

    @property
    def config(self) -> LogConfig: ...

    @property
    def log_start_offset(self) -> int: ...

    @property
    def log_end_offset(self) -> int: ...

    @property
    def high_watermark(self) -> int: ...

    @property
    def durable_offset(self) -> int: ...

    @property
    def new_data_event(self) -> trio.Event: ...

    @property
    def progress_event(self) -> trio.Event: ...

    @property
    def high_watermark_managed_externally(self) -> bool: ...

    @property
    def latest_leader_epoch(self) -> int: ...

    def end_offset_for_leader_epoch(self, epoch: int) -> tuple[int, int]: ...

    def append(
        self, batches: bytearray | memoryview, *, now_ms: int, leader_epoch: int = 0
    ) -> AppendInfo: ...

    def append_as_follower(
        self, batches: bytes | bytearray | memoryview, *, now_ms: int
    ) -> AppendInfo: ...

    def manage_high_watermark_externally(self, *, high_watermark: int | None = None) -> None: ...

    def set_high_watermark(self, offset: int) -> int: ...

    def truncate_to(self, offset: int) -> None: ...

    def truncate_fully_and_start_at(self, offset: int) -> None: ...

    def expire_producers(self, now_ms: int) -> int: ...

    async def wait_durable(self, offset: int) -> None: ...

    def read(
        self, fetch_offset: int, max_bytes: int, *, up_to: ReadLimit = "high_watermark"
    ) -> FetchSlice: ...

    async def read_batch_containing(self, offset: int) -> bytes | None: ...

    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None: ...
