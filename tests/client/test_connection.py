"""BrokerConnection against a scripted broker: cancellation never closes the shared
connection, never tears a frame, and failures say whether the request was written."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from fake_broker import FakeBroker

from client.connection import (
    BrokerConnection,
    ConnectionFailed,
    ConnectionStatistics,
    MalformedResponseError,
)
from protocol import ApiKey, DwalError, ErrorCode, ProtocolError, Response

BIG_TAIL = b"x" * (16 * 1024 * 1024)  # far more than a paused peer's socket buffers hold


async def start_fake(nursery: trio.Nursery) -> FakeBroker:
    fake = FakeBroker()
    await nursery.start(fake.serve)
    return fake


class Call:
    """One `connection.request()` running in its own task, cancellable from the test."""

    def __init__(self, nursery: trio.Nursery, connection: BrokerConnection, tail=b"") -> None:
        self.scope = trio.CancelScope()
        self.finished = trio.Event()
        self.response: Response | None = None
        self.error: Exception | None = None
        self.raised: Exception | None = None  # another exception the request raised
        nursery.start_soon(self._run, connection, tail)

    async def _run(self, connection: BrokerConnection, tail: bytes) -> None:
        with self.scope:
            try:
                self.response = await connection.request(ApiKey.API_VERSIONS, {}, tail)
            except ConnectionFailed as error:
                self.error = error
            except Exception as error:
                self.raised = error
        self.finished.set()


def versions(number: int) -> dict:
    return {"api_versions": [[number, 0, 0]]}


async def test_a_cancelled_wait_abandons_its_answer_and_keeps_the_connection(nursery):
    fake = await start_fake(nursery)
    connection = await BrokerConnection.open("127.0.0.1", fake.port, nursery)
    first = Call(nursery, connection)
    received = await fake.next_request()
    first.scope.cancel()
    await first.finished.wait()
    assert first.scope.cancelled_caught
    assert connection.statistics() == ConnectionStatistics(1, 1, 0)

    await received.answer(versions(1))  # the abandoned request's answer: discarded
    second = Call(nursery, connection)
    await (await fake.next_request()).answer(versions(2))
    await second.finished.wait()
    assert second.response is not None and second.response.body == versions(2)
    assert not connection.closed
    assert connection.statistics() == ConnectionStatistics(0, 0, 1)


async def test_a_request_cancelled_before_it_is_written_is_not_sent(nursery):
    fake = await start_fake(nursery)
    connection = await BrokerConnection.open(
        "127.0.0.1", fake.port, nursery, inflight_requests_max=1
    )
    first = Call(nursery, connection)
    received = await fake.next_request()
    waiting = Call(nursery, connection, b"waiting")  # waits for the only slot
    await trio.testing.wait_all_tasks_blocked()
    waiting.scope.cancel()
    await waiting.finished.wait()
    await received.answer(versions(1))
    await first.finished.wait()

    third = Call(nursery, connection, b"third")
    after = await fake.next_request()
    assert after.request.tail == b"third"  # the cancelled request never reached the broker
    await after.answer(versions(3))
    await third.finished.wait()
    assert third.response is not None and third.response.body == versions(3)
    assert first.response is not None and first.response.body == versions(1)
    assert fake.requests.statistics().current_buffer_used == 0  # nothing else arrived


async def test_a_cancel_mid_frame_finishes_the_frame_first(nursery):
    fake = await start_fake(nursery)
    connection = await BrokerConnection.open("127.0.0.1", fake.port, nursery)
    fake.pause_reading()
    call = Call(nursery, connection, BIG_TAIL)
    await trio.testing.wait_all_tasks_blocked()  # blocked with part of the frame written
    call.scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert not call.finished.is_set()  # a torn frame would corrupt the stream: not torn

    fake.resume_reading()
    received = await fake.next_request()
    assert len(received.request.tail) == len(BIG_TAIL)
    await call.finished.wait()
    assert call.scope.cancelled_caught and call.error is None
    await received.answer(versions(1))
    after = Call(nursery, connection)
    await (await fake.next_request()).answer(versions(2))
    await after.finished.wait()
    assert after.response is not None and after.response.body == versions(2)


async def test_writing_a_frame_is_bounded_then_the_connection_closes(nursery, autojump_clock):
    fake = await start_fake(nursery)
    connection = await BrokerConnection.open("127.0.0.1", fake.port, nursery, send_timeout_s=5)
    fake.pause_reading()
    call = Call(nursery, connection, BIG_TAIL)
    await trio.testing.wait_all_tasks_blocked()  # blocked with part of the frame written
    call.scope.cancel()  # the shield holds the caller, but only until the bound
    await call.finished.wait()
    assert isinstance(call.error, ConnectionFailed)
    assert not call.error.request_written
    assert "within 5 s" in call.error.message
    assert connection.closed


async def test_failures_say_whether_the_request_was_written(nursery):
    fake = await start_fake(nursery)
    connection = await BrokerConnection.open("127.0.0.1", fake.port, nursery)
    call = Call(nursery, connection)
    received = await fake.next_request()
    await received.connection.close()
    await call.finished.wait()
    assert isinstance(call.error, ConnectionFailed) and call.error.request_written
    assert "may or may not" in call.error.message
    with pytest.raises(ConnectionFailed) as raised:
        await connection.request(ApiKey.API_VERSIONS, {})
    assert not raised.value.request_written


async def test_an_http_port_is_named_as_such(nursery):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def http_server() -> None:
        stream = await listeners[0].accept()
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    nursery.start_soon(http_server)
    connection = await BrokerConnection.open("127.0.0.1", port, nursery)
    with pytest.raises(ConnectionFailed) as raised:
        await connection.request(ApiKey.API_VERSIONS, {})
    assert raised.value.message == f"127.0.0.1:{port} speaks HTTP, not the DWAL protocol"


async def test_close_fails_the_requests_awaiting_answers(nursery):
    fake = await start_fake(nursery)
    connection = await BrokerConnection.open("127.0.0.1", fake.port, nursery)
    call = Call(nursery, connection)
    await fake.next_request()
    connection.close()
    await call.finished.wait()
    assert isinstance(call.error, ConnectionFailed) and call.error.request_written
    assert connection.closed


async def test_a_malformed_answer_is_a_typed_dwal_error_and_the_connection_goes_on(nursery):
    fake = await start_fake(nursery)
    connection = await BrokerConnection.open("127.0.0.1", fake.port, nursery)
    wrong = Call(nursery, connection)
    await (await fake.next_request()).answer({"api_versions": "not a list"})
    await wrong.finished.wait()
    # not caught by Call (it catches ConnectionFailed only): the request raised it
    assert isinstance(wrong.raised, MalformedResponseError), wrong.raised
    assert isinstance(wrong.raised, DwalError) and isinstance(wrong.raised, ProtocolError)
    assert wrong.raised.code == ErrorCode.UNKNOWN_SERVER_ERROR
    assert "API_VERSIONS" in wrong.raised.message and "malformed" in wrong.raised.message
    right = Call(nursery, connection)
    await (await fake.next_request()).answer(versions(3))
    await right.finished.wait()
    assert right.response is not None and right.response.body == versions(3)
