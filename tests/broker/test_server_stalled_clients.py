"""Time limits of the native server: a client that starts a frame must finish it within
`request_read_timeout_ms` (time the broker spends not reading does not count), else it is cut
off and its memory goes back; a connection idle between frames for `connections_idle_ms_max`
is closed, and one with a reply still due is not idle.

Connections are Unix socket pairs served by `handle_connection` directly, so that trio's
autojump MockClock (`autojump_clock`) runs the timeouts; nothing sleeps to wait for a
condition (`sleep_until` only moves the mock clock to the instant a test looks at).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import pytest
import trio
from broker_test_support import at_real_pace, create_topic_on, running_node

from broker.config import ConfigError, build_config
from broker.limits import Limits
from broker.memory_pool import MemoryPool
from broker.server import NativeServer
from broker.storage import LogConfig
from protocol import (
    ApiKey,
    ErrorCode,
    FrameDecoder,
    Request,
    Response,
    encode_request,
    parse_response,
)

pytestmark = pytest.mark.timeout(60)

READ_TIMEOUT_S = 30
IDLE_S = 600
# The running node's own timers (Raft ticks every 0.1 s, flush checks every 50 ms) move the
# autojump clock while bytes are in flight between the test and the server, so a moment the
# test reads off the clock may be that much after the server's: lower bounds allow for it.
SLACK_S = 0.15
LIMITS = Limits(
    frame_bytes_max=1024 * 1024,
    frame_header_bytes_max=64 * 1024,
    socket_receive_bytes=64 * 1024,
    http_body_bytes_max=64 * 1024,
    queued_request_bytes_max=2 * 1024 * 1024,
    request_read_timeout_ms=READ_TIMEOUT_S * 1000,
    connections_idle_ms_max=IDLE_S * 1000,
)


def _api_versions(correlation_id: int, tail_bytes: int = 0) -> bytes:
    """An ApiVersions request; its tail (ignored by the broker) sets the frame's size."""
    return encode_request(
        Request(
            api_key=ApiKey.API_VERSIONS,
            api_version=0,
            correlation_id=correlation_id,
            client_id="stalled",
            body={},
            tail=b"t" * tail_bytes,
        )
    )


class Harness:
    def __init__(self, server: NativeServer, nursery: trio.Nursery) -> None:
        self.server = server
        self.pool = server.memory_pool
        self._nursery = nursery

    def connect(self) -> tuple[trio.SocketStream, trio.Event]:
        """A client stream served by the broker, and an event set once the broker is done
        with the connection."""
        client_socket, server_socket = trio.socket.socketpair()
        served = trio.Event()

        async def serve() -> None:
            try:
                await self.server.handle_connection(trio.SocketStream(server_socket))
            finally:
                served.set()

        self._nursery.start_soon(serve)
        return trio.SocketStream(client_socket), served


@pytest.fixture
async def harness(tmp_path):
    async with _harness(tmp_path, LIMITS) as harness:
        yield harness


@contextlib.asynccontextmanager
async def _harness(
    tmp_path, limits: Limits, pool: MemoryPool | None = None
) -> AsyncIterator[Harness]:
    """A NativeServer on the handlers of a running node (its embedded controller, registry
    and replica layer), serving the connections of `Harness.connect` until the block ends."""
    assert not limits.problems(), limits.problems()
    async with contextlib.AsyncExitStack() as stack:
        with at_real_pace():  # the node's start waits on fsyncs in threads: no clock jumps
            node = await stack.enter_async_context(
                running_node(tmp_path, LogConfig(fsync="never"), limits=limits)
            )
        async with trio.open_nursery() as connections:
            yield Harness(NativeServer(node.handlers, memory_pool=pool), connections)
            connections.cancel_scope.cancel()


async def _read_responses(stream: trio.SocketStream, count: int) -> list[Response]:
    decoder = FrameDecoder()
    responses = []
    while len(responses) < count:
        while (frame := decoder.next_frame()) is not None:
            responses.append(parse_response(*frame))
        if len(responses) < count:
            data = await stream.receive_some(65536)
            assert data, "the broker closed the connection"
            decoder.feed(data)
    assert decoder.buffered_bytes == 0
    return responses


async def _read_response(stream: trio.SocketStream) -> Response:
    (response,) = await _read_responses(stream, 1)
    return response


async def _wait_closed_by_broker(stream: trio.SocketStream) -> None:
    assert await stream.receive_some(65536) == b""


async def test_a_stalled_sender_is_cut_off_and_its_memory_returned(harness, caplog, autojump_clock):
    caplog.set_level(logging.WARNING, logger="dwal.server")
    frame = _api_versions(1, tail_bytes=500_000)
    stream, served = harness.connect()
    started = trio.current_time()
    await stream.send_all(frame[:100_000])  # then nothing more

    await trio.sleep_until(started + READ_TIMEOUT_S - 1)
    assert harness.server.statistics().connections == 1
    assert harness.pool.statistics().bytes_reserved >= len(frame)

    await _wait_closed_by_broker(stream)
    assert READ_TIMEOUT_S - SLACK_S <= trio.current_time() - started < READ_TIMEOUT_S + 1
    await served.wait()
    assert harness.pool.statistics().bytes_reserved == 0
    assert harness.server.statistics().connections == 0
    (record,) = [r for r in caplog.records if r.getMessage() == "connection_read_timeout"]
    assert record.fields["peer"]  # type: ignore[attr-defined]


async def test_a_length_prefix_alone_is_cut_off_too(harness, autojump_clock):
    stream, served = harness.connect()
    started = trio.current_time()
    await stream.send_all(_api_versions(1, tail_bytes=500_000)[:4])
    await _wait_closed_by_broker(stream)
    assert READ_TIMEOUT_S - SLACK_S <= trio.current_time() - started < READ_TIMEOUT_S + 1
    await served.wait()
    assert harness.pool.statistics().bytes_reserved == 0


async def test_trickling_a_frame_does_not_extend_its_deadline(harness, autojump_clock):
    """The limit is a total per frame: a byte every few seconds (slow loris) is cut off."""
    frame = _api_versions(1, tail_bytes=500_000)
    stream, served = harness.connect()
    started = trio.current_time()
    with pytest.raises(trio.BrokenResourceError):  # the broker closed the connection
        for position in range(len(frame) - 1):
            await stream.send_all(frame[position : position + 1])
            await trio.sleep(5)
    await served.wait()
    assert READ_TIMEOUT_S - SLACK_S <= trio.current_time() - started < READ_TIMEOUT_S + 6
    assert harness.pool.statistics().bytes_reserved == 0


@pytest.mark.parametrize("tail_bytes", [30_000, 300_000])  # read ahead; into a frame buffer
async def test_a_slow_sender_within_the_limit_is_served(harness, tail_bytes, autojump_clock):
    """Frames sent in halves 20 s apart, each read carrying the end of one frame and the
    start of the next: every frame has its own deadline, so the connection lives far longer
    than one limit."""
    frames = [_api_versions(correlation_id, tail_bytes) for correlation_id in range(5)]
    half = len(frames[0]) // 2
    pieces = [frames[0][:half]]
    pieces += [before[half:] + after[:half] for before, after in zip(frames, frames[1:])]
    pieces.append(frames[-1][half:])
    stream, _ = harness.connect()
    started = trio.current_time()
    for piece in pieces:
        await stream.send_all(piece)
        await trio.sleep(READ_TIMEOUT_S * 2 / 3)
    responses = await _read_responses(stream, len(frames))
    assert [(response.correlation_id, response.error_code) for response in responses] == [
        (correlation_id, ErrorCode.NONE) for correlation_id in range(len(frames))
    ]
    assert trio.current_time() - started > 3 * READ_TIMEOUT_S
    assert harness.server.statistics().connections == 1


async def test_time_spent_waiting_for_memory_does_not_count(tmp_path, autojump_clock):
    pool = MemoryPool(LIMITS.queued_request_bytes_max)
    async with _harness(tmp_path, LIMITS, pool) as harness:
        held = pool.bytes_max - 100_000
        await pool.reserve(held)  # as if other connections held the budget
        frame = _api_versions(7, tail_bytes=500_000)
        stream, _ = harness.connect()
        await stream.send_all(frame[:1000])  # the broker waits for memory, reading nothing
        await trio.sleep(READ_TIMEOUT_S * 5)
        assert pool.statistics().waiters == 1
        pool.release(held)
        await trio.sleep(READ_TIMEOUT_S * 0.8)
        await stream.send_all(frame[1000:])
        response = await _read_response(stream)
        assert (response.correlation_id, response.error_code) == (7, ErrorCode.NONE)


async def test_a_connection_idle_between_frames_stays_until_the_idle_limit(
    harness, caplog, autojump_clock
):
    caplog.set_level(logging.INFO, logger="dwal.server")
    stream, served = harness.connect()
    await stream.send_all(_api_versions(1))
    assert (await _read_response(stream)).correlation_id == 1
    answered = trio.current_time()

    await trio.sleep(IDLE_S - 1)  # far beyond the read timeout: idle is not stalled
    await stream.send_all(_api_versions(2))
    assert (await _read_response(stream)).correlation_id == 2
    answered = trio.current_time()

    await _wait_closed_by_broker(stream)
    assert IDLE_S - SLACK_S <= trio.current_time() - answered < IDLE_S + 1
    await served.wait()
    assert any(r.getMessage() == "connection_idle_closed" for r in caplog.records)


async def test_a_connection_with_a_reply_due_is_not_idle(tmp_path, autojump_clock):
    """A long-poll Fetch keeps the connection busy though its client sends nothing."""
    limits = Limits(connections_idle_ms_max=1000, request_read_timeout_ms=1000)
    async with _harness(tmp_path, limits) as harness:
        with at_real_pace():  # a metadata change: fsyncs in threads, controller timeouts
            await create_topic_on(harness.server.handlers, "quiet", 1)
        stream, _ = harness.connect()
        fetch = {
            "max_wait_ms": 5000,
            "min_bytes": 1,
            "topics": [
                {
                    "topic": "quiet",
                    "partitions": [{"partition": 0, "fetch_offset": 0, "max_bytes": 1024}],
                }
            ],
        }
        started = trio.current_time()
        await stream.send_all(
            encode_request(
                Request(
                    api_key=ApiKey.FETCH, api_version=0, correlation_id=3, client_id="c", body=fetch
                )
            )
        )
        response = await _read_response(stream)
        assert (response.correlation_id, response.error_code) == (3, ErrorCode.NONE)
        assert trio.current_time() - started >= 5 - SLACK_S
        answered = trio.current_time()
        await _wait_closed_by_broker(stream)
        assert 1 - SLACK_S <= trio.current_time() - answered < 2


def test_the_time_limits_are_limits_settings_of_the_config_file():
    config = build_config(
        {"limits": {"request_read_timeout_ms": 5000, "connections_idle_ms_max": 60_000}}, {}
    )
    assert config.limits.request_read_timeout_ms == 5000
    assert config.limits.connections_idle_ms_max == 60_000
    assert Limits().request_read_timeout_ms == 30_000
    assert Limits().connections_idle_ms_max == 600_000
    with pytest.raises(ConfigError, match="request_read_timeout_ms"):
        build_config({"limits": {"request_read_timeout_ms": 10}}, {})
    with pytest.raises(ConfigError, match="connections_idle_ms_max"):
        build_config({"limits": {"connections_idle_ms_max": 10}}, {})
