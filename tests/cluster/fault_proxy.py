"""A TCP proxy for one directed link (listen port -> target), whose faults a test controls.

Theory of operation. `FaultProxy.serve` listens on 127.0.0.1:`listen_port`; each accepted
connection gets a connection to the target and two pumps, one per direction ("forward":
towards the target, "backward": back to the connecting side). A pump reads a chunk, stamps
it with the time it may be delivered (now + the current delay) and hands it through a small
bounded channel to a writer that sleeps until then: the delay adds latency without
reordering, and a slow reader stops the pump reading (backpressure, never an unbounded
buffer).

Faults, each set from the test at any time:
- `pass_through()`: bytes flow (the heal).
- `blackhole()`: connections stay open, bytes in both directions are dropped; new
  connections are accepted and dropped the same way.
- `cut(direction)`: bytes of one direction only are dropped.
- `reset()`: every open connection is closed with an RST, and every new one as soon as it
  is accepted, until the next `pass_through()`.
- `delay(seconds)`: latency added to every chunk (0 removes it).

A stream that lost bytes has a hole in it and must never carry anything again (TCP never
delivers a stream with a hole): a connection that dropped any byte keeps dropping, and
`pass_through()` resets it, as a real connection whose retransmissions timed out would be.
"""

from __future__ import annotations

import enum
import socket
import struct
from dataclasses import dataclass

import trio

CHUNK_BYTES_MAX = 64 * 1024
CHUNKS_IN_FLIGHT_MAX = 16  # per direction of a connection; more stops reading the source
CONNECT_TIMEOUT_S = 5


class Direction(enum.Enum):
    FORWARD = "forward"  # from the connecting side to the target
    BACKWARD = "backward"  # from the target back to the connecting side


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyStatistics:
    connections_open: int
    connections_accepted: int
    connections_reset: int
    bytes_forwarded: int
    bytes_dropped: int


class _Connection:
    """One proxied connection: its two streams and the scope that ends its pumps."""

    def __init__(self, downstream: trio.SocketStream, upstream: trio.SocketStream) -> None:
        self.streams = {Direction.FORWARD: upstream, Direction.BACKWARD: downstream}
        self.sources = {Direction.FORWARD: downstream, Direction.BACKWARD: upstream}
        self.scope = trio.CancelScope()
        self.tainted = False  # dropped a byte: its streams have a hole, never pass again

    def reset(self) -> None:
        for stream in self.streams.values():
            _set_linger_zero(stream)
        self.scope.cancel()


def _set_linger_zero(stream: trio.SocketStream) -> None:
    """Make closing `stream` send an RST instead of a FIN."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class FaultProxy:
    """A proxy of one directed link; see the module docstring. Start it with
    ``await nursery.start(proxy.serve)``; it stops when that nursery is cancelled."""

    def __init__(self, target: tuple[str, int], *, listen_port: int = 0, name: str = "") -> None:
        self.target = target
        self.listen_port = listen_port
        self.name = name or f"proxy->{target[0]}:{target[1]}"
        self._dropping: set[Direction] = set()
        self._resetting = False
        self._delay_s = 0.0
        self._connections: set[_Connection] = set()
        self._accepted = 0
        self._reset_count = 0
        self._bytes_forwarded = 0
        self._bytes_dropped = 0

    # -- control, from the test ---------------------------------------------------------

    def pass_through(self) -> None:
        """Heal: bytes flow again on new connections; connections that lost bytes reset."""
        self._dropping.clear()
        self._resetting = False
        for connection in list(self._connections):
            if connection.tainted:
                self._reset(connection)

    def blackhole(self) -> None:
        self._dropping = {Direction.FORWARD, Direction.BACKWARD}

    def cut(self, direction: Direction) -> None:
        """Drop the bytes of `direction` only (the other direction is unchanged)."""
        self._dropping.add(direction)

    def reset(self) -> None:
        self._resetting = True
        for connection in list(self._connections):
            self._reset(connection)

    def delay(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self._delay_s = seconds

    @property
    def faulty(self) -> bool:
        return bool(self._dropping) or self._resetting or self._delay_s > 0

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(
            connections_open=len(self._connections),
            connections_accepted=self._accepted,
            connections_reset=self._reset_count,
            bytes_forwarded=self._bytes_forwarded,
            bytes_dropped=self._bytes_dropped,
        )

    # -- the proxy ----------------------------------------------------------------------

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen and proxy until cancelled; `task_status.started()` gives the port bound."""
        listeners = await trio.open_tcp_listeners(self.listen_port, host="127.0.0.1")
        self.listen_port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.listen_port)

    def _reset(self, connection: _Connection) -> None:
        self._reset_count += 1
        self._connections.discard(connection)
        connection.reset()

    async def _handle(self, downstream: trio.SocketStream) -> None:
        self._accepted += 1
        if self._resetting:
            _set_linger_zero(downstream)
            self._reset_count += 1
            await downstream.aclose()
            return
        upstream = None
        with trio.move_on_after(CONNECT_TIMEOUT_S):
            try:
                upstream = await trio.open_tcp_stream(*self.target)
            except OSError:
                pass
        if upstream is None:  # the target is down: the connecting side sees a reset
            _set_linger_zero(downstream)
            await downstream.aclose()
            return
        connection = _Connection(downstream, upstream)
        self._connections.add(connection)
        try:
            with connection.scope:
                async with trio.open_nursery() as nursery:
                    for direction in Direction:
                        nursery.start_soon(self._pump, connection, direction, nursery)
        finally:
            self._connections.discard(connection)
            with trio.CancelScope(shield=True):
                await upstream.aclose()
                await downstream.aclose()

    async def _pump(
        self, connection: _Connection, direction: Direction, nursery: trio.Nursery
    ) -> None:
        """Read one direction until its source closes."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](CHUNKS_IN_FLIGHT_MAX)
        nursery.start_soon(self._deliver, connection.streams[direction], receive, nursery)
        source = connection.sources[direction]
        async with send:
            while True:
                try:
                    chunk = await source.receive_some(CHUNK_BYTES_MAX)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    chunk = b""
                if not chunk:
                    break
                if connection.tainted or direction in self._dropping:
                    connection.tainted = True
                    self._bytes_dropped += len(chunk)
                    continue
                await send.send((trio.current_time() + self._delay_s, chunk))

    async def _deliver(
        self,
        stream: trio.SocketStream,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
        nursery: trio.Nursery,
    ) -> None:
        """Write the chunks of one direction when due; once its source ended (and what was
        queued is written) or the stream broke, end the whole connection (a half-close is not
        modelled)."""
        async with receive:
            async for deliver_at, chunk in receive:
                await trio.sleep_until(deliver_at)
                try:
                    await stream.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                self._bytes_forwarded += len(chunk)
        nursery.cancel_scope.cancel()
