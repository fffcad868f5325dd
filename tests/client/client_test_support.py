"""Waiting on consumer group members, shared by the client tests that run groups."""

from __future__ import annotations

import trio

from client import Consumer


async def wait_for_assignment(consumer: Consumer, size: int) -> None:
    """Poll (which reconciles) until the member owns `size` partitions; fails after 20 s."""
    with trio.fail_after(20):
        while len(consumer.assignment()) != size:
            await consumer.poll(timeout_ms=50)
