"""Backpressure of the native server. A client that pipelines requests but never reads
answers costs the broker a bounded number of pending replies (holding file slices, not
record bytes); when it goes away every reply is released. Clients that send large frames
all at once cost the broker at most `queued_request_bytes_max` over all connections: the
broker stops reading until memory comes back, and serves everyone as it does."""

from __future__ import annotations

import contextlib
import tracemalloc
import types
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from broker_test_support import create_topic, running_node

from broker.limits import Limits
from broker.node import BrokerNode
from broker.request_handlers import Reply
from broker.server import NativeServer
from broker.storage import LogConfig
from protocol import (
    ApiKey,
    ErrorCode,
    FrameDecoder,
    Request,
    Response,
    build_batch,
    encode_request,
    parse_response,
)

pytestmark = pytest.mark.timeout(60)

# How long nothing must run for the broker to count as settled: short, because the node's
# background tasks (Raft and controller ticks every 0.1 s, flush checks) wake up often.
QUIET_S = 0.01


async def test_unread_replies_are_bounded_and_released(tmp_path):
    limits = Limits(inflight_requests_max=8)
    async with _serving(tmp_path, limits) as (server, port, node):
        await create_topic(node, "big", 1)
        value = b"v" * 60_000
        for _ in range(40):
            await node.handlers.append_batch("big", 0, build_batch([(1, None, value)] * 10))

        # padding (an unknown field, ignored by the broker) makes the requests outgrow the
        # socket buffers, so the sender must block once the broker stops reading
        fetch = {
            "padding": b"p" * 10_000,
            "max_wait_ms": 0,
            "topics": [
                {
                    "topic": "big",
                    "partitions": [
                        {"partition": 0, "fetch_offset": 0, "max_bytes": 16 * 1024 * 1024}
                    ],
                }
            ],
        }
        frames = b"".join(
            encode_request(
                Request(
                    api_key=ApiKey.FETCH,
                    api_version=0,
                    correlation_id=i,
                    client_id="slow",
                    body=fetch,
                )
            )
            for i in range(2000)
        )
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        sender_blocked = trio.Event()

        async def send_everything() -> None:
            await stream.send_all(frames)  # blocks: the broker stops reading
            sender_blocked.set()

        async with trio.open_nursery() as client_tasks:
            client_tasks.start_soon(send_everything)
            await trio.testing.wait_all_tasks_blocked(cushion=QUIET_S)
            # Each fetch answers ~24 MB; 2000 of them unread would be ~48 GB if buffered.
            pending = server.statistics().replies_pending
            assert 1 <= pending <= limits.inflight_requests_max + 2, pending
            assert not sender_blocked.is_set()
            client_tasks.cancel_scope.cancel()
        await stream.aclose()
        await trio.testing.wait_all_tasks_blocked(cushion=QUIET_S)
        assert server.statistics().connections == 0
        assert server.statistics().replies_pending == 0


# -- one memory budget over all connections ------------------------------------------------

SENDERS = 12
FRAME_TAIL_BYTES = 900_000  # most of a 1 MiB frame
UNSENT_BYTES = 1000  # what each sender holds back at first
MEMORY_LIMITS = Limits(
    frame_bytes_max=1024 * 1024,
    frame_header_bytes_max=64 * 1024,
    socket_receive_bytes=64 * 1024,
    http_body_bytes_max=64 * 1024,
    queued_request_bytes_max=2 * 1024 * 1024 + 64 * 1024,  # two large frames fit, not three
)


def _large_frame(correlation_id: int) -> bytes:
    """An ApiVersions request whose tail (ignored by the broker) makes it ~900 KB."""
    return encode_request(
        Request(
            api_key=ApiKey.API_VERSIONS,
            api_version=0,
            correlation_id=correlation_id,
            client_id="large",
            body={},
            tail=b"t" * FRAME_TAIL_BYTES,
        )
    )


async def _read_response(stream: trio.SocketStream, decoder: FrameDecoder) -> Response:
    while (frame := decoder.next_frame()) is None:
        data = await stream.receive_some(65536)
        assert data, "the broker closed the connection"
        decoder.feed(data)
    return parse_response(*frame)


async def _send_in_two_parts(stream: trio.SocketStream, frame: bytes, go_on: trio.Event):
    view = memoryview(frame)  # no copies on the client side: the test traces allocations
    await stream.send_all(view[:-UNSENT_BYTES])  # blocks while the broker stops reading
    await go_on.wait()
    await stream.send_all(view[-UNSENT_BYTES:])


@contextlib.asynccontextmanager
async def _serving(tmp_path, limits: Limits) -> AsyncIterator[tuple[NativeServer, int, BrokerNode]]:
    """A NativeServer on 127.0.0.1 serving the handlers of a running node, and its port."""
    assert not limits.problems(), limits.problems()
    async with running_node(tmp_path, LogConfig(fsync="never"), limits=limits) as node:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            server = NativeServer(node.handlers)
            await nursery.start(server.serve, listeners)
            yield server, listeners[0].socket.getsockname()[1], node
            nursery.cancel_scope.cancel()


async def test_request_bytes_stay_within_one_budget_over_all_connections(tmp_path):
    async with _serving(tmp_path, MEMORY_LIMITS) as (server, port, _):
        pool = server.memory_pool
        budget = MEMORY_LIMITS.queued_request_bytes_max
        senders = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(SENDERS)]
        frames = [_large_frame(i) for i in range(SENDERS)]
        send_the_rest = trio.Event()
        async with trio.open_nursery() as client_tasks:
            tracemalloc.start()
            try:
                for stream, frame in zip(senders, frames, strict=True):
                    client_tasks.start_soon(_send_in_two_parts, stream, frame, send_the_rest)
                await trio.testing.wait_all_tasks_blocked()
                _, allocated_peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            # ~11 MB arrived at once; the broker holds at most its budget and reads no more,
            # and allocates no frame it has not reserved (not even an empty buffer for it)
            assert allocated_peak < budget + 1024 * 1024, allocated_peak
            statistics = pool.statistics()
            assert statistics.bytes_reserved_peak <= budget, statistics
            assert statistics.waiters >= SENDERS - 2, statistics
            assert server.statistics().requests_handled == 0

            # a small request queues behind the large ones instead of being read at once
            small_client = await trio.open_tcp_stream("127.0.0.1", port)
            await small_client.send_all(
                encode_request(
                    Request(
                        api_key=ApiKey.API_VERSIONS,
                        api_version=0,
                        correlation_id=99,
                        client_id="small",
                        body={},
                    )
                )
            )
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().requests_handled == 0

            # as the large requests complete and are answered, memory comes back and
            # everyone is served, the small client included
            send_the_rest.set()
            for correlation_id, stream in enumerate(senders):
                response = await _read_response(stream, FrameDecoder())
                assert response.correlation_id == correlation_id
                assert response.error_code == ErrorCode.NONE
            response = await _read_response(small_client, FrameDecoder())
            assert (response.correlation_id, response.error_code) == (99, ErrorCode.NONE)
        assert server.statistics().requests_handled == SENDERS + 1
        assert pool.statistics().bytes_reserved_peak <= budget
        # at least two frames were held at once, so the budget was really in use
        assert pool.statistics().bytes_reserved_peak >= 2 * len(frames[0])

        for stream in [*senders, small_client]:
            await stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().connections == 0
        assert pool.statistics().bytes_reserved == 0


async def test_senders_that_disconnect_mid_frame_return_all_their_memory(tmp_path):
    async with _serving(tmp_path, MEMORY_LIMITS) as (server, port, _):
        pool = server.memory_pool
        senders = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(SENDERS)]
        async with trio.open_nursery() as client_tasks:
            for correlation_id, stream in enumerate(senders):
                frame = _large_frame(correlation_id)
                client_tasks.start_soon(stream.send_all, frame[:-UNSENT_BYTES])
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().bytes_reserved > 0
            assert pool.statistics().waiters >= SENDERS - 2
            client_tasks.cancel_scope.cancel()  # senders still blocked in send_all give up
        for stream in senders:
            await stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().connections == 0
        statistics = pool.statistics()
        assert (statistics.bytes_reserved, statistics.waiters) == (0, 0), statistics
        assert statistics.bytes_reserved_peak <= MEMORY_LIMITS.queued_request_bytes_max
        assert server.statistics().requests_handled == 0


async def test_a_handled_frame_is_freed_while_its_connection_stays_open(tmp_path):
    """The pool's count is only true if the broker lets go of a frame when it gives its bytes
    back: a connection waiting for its next request must not keep the last one alive."""
    async with _serving(tmp_path, MEMORY_LIMITS) as (server, port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        frame = memoryview(_large_frame(5))
        small = encode_request(
            Request(
                api_key=ApiKey.API_VERSIONS, api_version=0, correlation_id=4, client_id="c", body={}
            )
        )
        await stream.send_all(small)  # the connection's own structures exist before tracing
        assert (await _read_response(stream, FrameDecoder())).correlation_id == 4
        tracemalloc.start()
        try:
            await stream.send_all(frame)
            assert (await _read_response(stream, FrameDecoder())).correlation_id == 5
            await trio.testing.wait_all_tasks_blocked()
            allocated, allocated_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert allocated_peak >= len(frame)  # received into one buffer of its size
        assert allocated < len(frame) // 4, allocated
        await stream.aclose()


class _AnswerHeld:
    """Handlers whose Produce takes what it needs of its tail at once (as the append does)
    and is answered only once `answer` is set, as an acks=all write waiting for its in-sync
    replicas; every other request is answered at once."""

    def __init__(self, limits: Limits) -> None:
        self.config = types.SimpleNamespace(limits=limits)
        self.appended = trio.Event()
        self.answer = trio.Event()

    async def start(self, api_key, body, tail, context):
        if api_key != ApiKey.PRODUCE:
            return _answered
        tail_bytes = len(tail)  # the last look at the tail
        self.appended.set()

        async def finish() -> Reply:
            await self.answer.wait()
            return Reply({"topics": [], "tail_bytes": tail_bytes})

        return finish


async def _answered() -> Reply:
    return Reply({})


async def test_a_produce_answer_that_waits_keeps_the_reservation_not_the_frame():
    """An acks=all answer waits for the in-sync replicas long after its append: its bytes
    stay reserved (the pool bounds the writes awaiting replication) while the frame's memory
    is already free for the next frames."""
    handlers = _AnswerHeld(MEMORY_LIMITS)
    server = NativeServer(handlers)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(server.serve, listeners)
        stream = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        body = {
            "acks": -1,
            "topics": [{"topic": "t", "partitions": [{"partition": 0, "size": FRAME_TAIL_BYTES}]}],
        }
        frame = memoryview(
            encode_request(
                Request(
                    api_key=ApiKey.PRODUCE,
                    api_version=0,
                    correlation_id=2,
                    client_id="c",
                    body=body,
                    tail=b"r" * FRAME_TAIL_BYTES,
                )
            )
        )
        small = encode_request(
            Request(
                api_key=ApiKey.API_VERSIONS, api_version=0, correlation_id=1, client_id="c", body={}
            )
        )
        await stream.send_all(small)  # the connection's own structures exist before tracing
        assert (await _read_response(stream, FrameDecoder())).correlation_id == 1
        tracemalloc.start()
        try:
            await stream.send_all(frame)
            await handlers.appended.wait()
            await trio.testing.wait_all_tasks_blocked()
            allocated, allocated_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert allocated_peak >= len(frame)  # received into one buffer of its size
        assert allocated < len(frame) // 4, allocated
        assert server.memory_pool.statistics().bytes_reserved >= len(frame)
        handlers.answer.set()
        response = await _read_response(stream, FrameDecoder())
        assert (response.correlation_id, response.body["tail_bytes"]) == (2, FRAME_TAIL_BYTES)
        await trio.testing.wait_all_tasks_blocked()
        # answered: only the connection's read-ahead stays reserved
        assert server.memory_pool.statistics().bytes_reserved <= MEMORY_LIMITS.socket_receive_bytes
        await stream.aclose()
        nursery.cancel_scope.cancel()
