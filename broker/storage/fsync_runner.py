"""Where group-commit fsyncs run: tasks of a nursery the broker owns.

An fdatasync runs on a worker thread, and a trio thread call cannot be abandoned. If the
fsync ran in the task of the request that needed it, that request could not give up (its
`timeout_ms`, a client's cancellation) before the disk answered. Run here, the fsync belongs
to the broker and every waiter only waits on an event, so each can time out on its own while
the fsync completes and counts for whoever still waits.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import trio


class FsyncRunner:
    """Start with `await nursery.start(runner.run)`; until then (and after it stops),
    `start_soon` refuses and callers run their fsync themselves."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve fsync tasks until cancelled; a cancelled fsync already on its thread still
        completes before this returns."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def start_soon(self, sync: Callable[[], Awaitable[None]]) -> bool:
        """Run `sync` (which must not raise) as a task of the runner; False if not running."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(sync)
        return True
