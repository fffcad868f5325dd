"""FaultProxy against a small echo server: each fault does what it says, and healing works.

"Nothing arrives" is checked with a short bounded wait (QUIET_S); everything else waits on
the bytes themselves."""

from __future__ import annotations

import time

import pytest
import trio

from fault_proxy import Direction, FaultProxy

QUIET_S = 0.3
TIMEOUT_S = 5


class EchoServer:
    """Echoes every byte back and keeps what it received (for one-way cuts)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.port = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._echo, listeners)

    async def _echo(self, stream: trio.SocketStream) -> None:
        try:
            async for chunk in stream:
                self.received += chunk
                await stream.send_all(chunk)
        except trio.BrokenResourceError:
            pass


@pytest.fixture
async def echo_and_proxy(nursery):
    echo = EchoServer()
    await nursery.start(echo.serve)
    proxy = FaultProxy(("127.0.0.1", echo.port))
    await nursery.start(proxy.serve)
    return echo, proxy


async def connect(proxy: FaultProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", proxy.listen_port)


async def round_trip(stream: trio.SocketStream, data: bytes) -> bytes:
    await stream.send_all(data)
    received = b""
    with trio.fail_after(TIMEOUT_S):
        while len(received) < len(data):
            chunk = await stream.receive_some()
            assert chunk, f"closed after {received!r}"
            received += chunk
    return received


async def nothing_arrives(stream: trio.SocketStream) -> bool:
    """True when nothing (no byte, no EOF, no error) arrives within QUIET_S."""
    with trio.move_on_after(QUIET_S):
        await stream.receive_some()
        return False
    return True


async def is_closed(stream: trio.SocketStream) -> bool:
    """True once the other side closed or reset the connection (within TIMEOUT_S)."""
    with trio.fail_after(TIMEOUT_S):
        try:
            while await stream.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
    return True


async def test_bytes_pass_both_ways(echo_and_proxy):
    _, proxy = echo_and_proxy
    stream = await connect(proxy)
    assert await round_trip(stream, b"hello") == b"hello"
    assert await round_trip(stream, b"x" * 200_000) == b"x" * 200_000
    assert proxy.statistics().bytes_forwarded >= 200_005  # the echo's last bytes may be counting


async def test_blackhole_keeps_connections_and_drops_bytes_until_healed(echo_and_proxy):
    echo, proxy = echo_and_proxy
    old = await connect(proxy)
    assert await round_trip(old, b"before") == b"before"
    proxy.blackhole()
    await old.send_all(b"lost")
    assert await nothing_arrives(old)
    new = await connect(proxy)  # accepted, and silent too
    await new.send_all(b"also lost")
    assert await nothing_arrives(new)
    assert bytes(echo.received) == b"before"
    assert proxy.statistics().connections_open == 2

    proxy.pass_through()
    assert await is_closed(old)  # it lost bytes: reset, never resumed with a hole
    assert await is_closed(new)
    healed = await connect(proxy)
    assert await round_trip(healed, b"after") == b"after"


async def test_reset_closes_existing_and_new_connections(echo_and_proxy):
    _, proxy = echo_and_proxy
    old = await connect(proxy)
    assert await round_trip(old, b"ping") == b"ping"
    proxy.reset()
    with pytest.raises(trio.BrokenResourceError):
        with trio.fail_after(TIMEOUT_S):
            await old.receive_some()
    new = await connect(proxy)
    assert await is_closed(new)
    proxy.pass_through()
    assert await round_trip(await connect(proxy), b"again") == b"again"
    assert proxy.statistics().connections_reset == 2


async def test_delay_adds_latency_each_way_in_order(echo_and_proxy):
    _, proxy = echo_and_proxy
    stream = await connect(proxy)
    proxy.delay(0.2)
    started = time.monotonic()
    for part in (b"a", b"b", b"c", b"d"):
        await stream.send_all(part)
    received = b""
    with trio.fail_after(TIMEOUT_S):
        while len(received) < 4:
            received += await stream.receive_some()
    assert received == b"abcd"
    assert time.monotonic() - started >= 0.4
    proxy.delay(0)
    assert await round_trip(stream, b"fast") == b"fast"


async def test_cut_forward_drops_only_what_goes_to_the_target(echo_and_proxy):
    echo, proxy = echo_and_proxy
    stream = await connect(proxy)
    proxy.cut(Direction.FORWARD)
    await stream.send_all(b"dropped")
    assert await nothing_arrives(stream)
    assert bytes(echo.received) == b""


async def test_cut_backward_delivers_to_the_target_but_drops_answers(echo_and_proxy):
    echo, proxy = echo_and_proxy
    stream = await connect(proxy)
    proxy.cut(Direction.BACKWARD)
    await stream.send_all(b"arrives")
    assert await nothing_arrives(stream)
    assert bytes(echo.received) == b"arrives"
    proxy.pass_through()
    assert await is_closed(stream)


async def test_a_dead_target_resets_the_connecting_side(nursery):
    proxy = FaultProxy(("127.0.0.1", 1))  # nothing listens on port 1
    await nursery.start(proxy.serve)
    assert await is_closed(await connect(proxy))
