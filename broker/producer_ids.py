"""Producer ids for idempotent producers, handed out by this broker from controller blocks.

An idempotent producer asks any broker for an id (InitProducerId). Ids must never be handed
out twice in the cluster's life, across broker restarts and controller failovers, so no
broker invents them: each asks the active controller for a block of ids
(AllocateProducerIds, as in Kafka's KIP-730), which commits a ProducerIdsRecord moving the
cluster's next id past the block before answering. The broker then hands the block's ids
out one by one from memory; a restart forgets the rest of its block (those ids are skipped,
never reused). The next block is fetched when the current one is spent, by one task while
the others wait for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from protocol import DwalError, ErrorCode

BlockSource = Callable[[], Awaitable[tuple[int, int]]]
"""Asks the controller for a block; returns (first id, number of ids). Raises DwalError."""


class ProducerIdBlocks:
    def __init__(self, allocate_block: BlockSource) -> None:
        self._allocate_block = allocate_block
        self._next = 0
        self._end = 0  # the current block is [_next, _end)
        self._lock = trio.Lock()  # one block request at a time
        self.blocks_allocated = 0

    async def next_producer_id(self) -> int:
        """A producer id no one in the cluster has had. Raises DwalError (the controller's
        refusal, or it could not be reached: retriable)."""
        async with self._lock:
            if self._next >= self._end:
                start, length = await self._allocate_block()
                if start < 0 or length <= 0:
                    raise DwalError(
                        ErrorCode.UNKNOWN_SERVER_ERROR,
                        f"the controller answered an empty producer id block ({start}, {length})",
                    )
                self._next, self._end = start, start + length
                self.blocks_allocated += 1
            producer_id = self._next
            self._next += 1
            return producer_id
