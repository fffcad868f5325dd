"""One budget for the bytes of requests being read and queued, over every connection of every
listener (Kafka's `queued.max.request.bytes` memory pool).

Theory of operation. A connection reserves bytes from the pool before it reads them from its
socket and gives them back once the request they hold has been handled (its reply produced,
or the request dropped, or the connection closed). When the pool cannot grant a reservation
the connection waits instead of reading: the broker stops reading from sockets, TCP pushes
back on the clients, and the bytes held stay within the budget however many clients send.

Waiters are served strictly first come, first served: a large reservation at the head of the
queue is not overtaken by smaller ones, so it cannot starve. A reader must never wait for
memory while it holds memory that only its own progress would return, or two readers could
wait for each other forever: readers reserve a whole frame (or body) at once, as soon as its
length is known, and may hold extra read-ahead only through `try_reserve` with
``keep_free=`` the largest single reservation. Read-ahead thus never takes the room that the
head of the queue needs, and once the requests in flight are handled the head always fits.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import trio


@dataclass(frozen=True, kw_only=True)
class MemoryPoolStatistics:
    bytes_max: int  # the budget
    bytes_reserved: int  # held now
    bytes_reserved_peak: int  # the most ever held at once (never above bytes_max)
    waiters: int  # reservations waiting for memory
    bytes_wanted: int  # what those waiters ask for, together


@dataclass(eq=False)
class _Waiter:
    byte_count: int
    granted: trio.Event = field(default_factory=trio.Event)


class MemoryPool:
    """A budget of `bytes_max` bytes shared by every reader. Not thread-safe (one trio run)."""

    def __init__(self, bytes_max: int) -> None:
        assert bytes_max > 0, bytes_max
        self._bytes_max = bytes_max
        self._reserved = 0
        self._reserved_peak = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()

    @property
    def bytes_max(self) -> int:
        return self._bytes_max

    @property
    def bytes_available(self) -> int:
        return self._bytes_max - self._reserved

    def statistics(self) -> MemoryPoolStatistics:
        return MemoryPoolStatistics(
            bytes_max=self._bytes_max,
            bytes_reserved=self._reserved,
            bytes_reserved_peak=self._reserved_peak,
            waiters=len(self._waiters),
            bytes_wanted=sum(waiter.byte_count for waiter in self._waiters),
        )

    async def reserve(self, byte_count: int) -> None:
        """Reserve `byte_count` bytes (at most `bytes_max`), waiting behind earlier waiters
        until they fit. The caller owns the bytes once this returns and must `release` them.

        Cancel-safe: a cancelled wait reserves nothing (bytes granted at the moment of the
        cancellation are given back) and lets the waiters behind it move up."""
        assert 0 < byte_count <= self._bytes_max, (byte_count, self._bytes_max)
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._waiters and self._fits(byte_count):
            self._take(byte_count)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter(byte_count)
        self._waiters.append(waiter)
        try:
            await waiter.granted.wait()
        except BaseException:
            if waiter.granted.is_set():
                self.release(byte_count)  # granted as we were cancelled: give it back
            else:
                self._waiters.remove(waiter)
                self._grant_waiters()  # those behind a large waiter may fit now
            raise

    def try_reserve(self, byte_count: int, *, keep_free: int = 0) -> bool:
        """Reserve `byte_count` bytes now if that leaves at least `keep_free` bytes of the
        budget unreserved and nobody is waiting; returns whether it did."""
        assert byte_count > 0, byte_count
        if self._waiters or not self._fits(byte_count + keep_free):
            return False
        self._take(byte_count)
        return True

    def release(self, byte_count: int) -> None:
        """Give back `byte_count` reserved bytes and wake the waiters that now fit."""
        assert 0 <= byte_count <= self._reserved, (byte_count, self._reserved)
        self._reserved -= byte_count
        self._grant_waiters()

    def _fits(self, byte_count: int) -> bool:
        return self._reserved + byte_count <= self._bytes_max

    def _take(self, byte_count: int) -> None:
        self._reserved += byte_count
        self._reserved_peak = max(self._reserved_peak, self._reserved)

    def _grant_waiters(self) -> None:
        while self._waiters and self._fits(self._waiters[0].byte_count):
            waiter = self._waiters.popleft()
            self._take(waiter.byte_count)
            waiter.granted.set()


__all__ = ["MemoryPool", "MemoryPoolStatistics"]
