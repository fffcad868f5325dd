"""One pipelined connection to one broker.

Requests are written in the order `request()` is called and the broker answers in the same
order, so a FIFO of waiting callers is all the bookkeeping needed: the reader task pops the
oldest waiter for each response and checks the correlation id matches. At most
`inflight_requests_max` requests are outstanding; further callers wait for a slot.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import trio

from protocol import (
    ApiKey,
    DwalError,
    ErrorCode,
    FrameDecoder,
    ProtocolError,
    Response,
    check_response,
    frame_prefix,
    parse_response,
)

RESPONSE_FRAME_BYTES_MAX = 128 * 1024 * 1024
RECEIVE_BYTES = 256 * 1024


class ConnectionFailed(DwalError):
    """The connection to a broker failed or closed; the request may or may not have run."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.NETWORK_EXCEPTION, message)


@dataclass
class _Waiter:
    correlation_id: int
    api_key: ApiKey
    done: trio.Event = field(default_factory=trio.Event)
    response: Response | None = None
    error: Exception | None = None


class PendingRequest:
    """A request written to a broker, whose answer is still to come."""

    def __init__(self, connection: "BrokerConnection", waiter: _Waiter) -> None:
        self._connection = connection
        self._waiter = waiter

    async def wait(self) -> Response:
        """The response; raises ConnectionFailed, DwalError (a request-level error) or
        ProtocolError. Cancelling it before the answer closes the connection."""
        waiter = self._waiter
        try:
            await waiter.done.wait()
        except BaseException:
            if not waiter.done.is_set():
                self._connection._fail(
                    ConnectionError("request cancelled while awaiting its answer")
                )
            raise
        if waiter.error is not None:
            raise waiter.error
        response = waiter.response
        assert response is not None
        if response.error_code != ErrorCode.NONE:
            raise DwalError(response.error_code, response.error_message)
        return response


class BrokerConnection:
    """Create with `await BrokerConnection.open(host, port, nursery)`; close with `aclose()`."""

    def __init__(
        self, stream: trio.SocketStream, address: str, client_id: str, inflight_requests_max: int
    ) -> None:
        self.address = address
        self.client_id = client_id
        self._stream = stream
        self._correlation_ids = itertools.count()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._send_lock = trio.Lock()
        self._slots = trio.Semaphore(inflight_requests_max)
        self._closed_error: Exception | None = None
        self._reader_done = trio.Event()

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        nursery: trio.Nursery,
        *,
        client_id: str = "dwal",
        inflight_requests_max: int = 32,
        connect_timeout_s: float = 10,
    ) -> "BrokerConnection":
        """Connect and start the reader task in `nursery`; raises ConnectionFailed."""
        try:
            with trio.fail_after(connect_timeout_s):
                stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as error:
            raise ConnectionFailed(
                f"cannot connect to {host}:{port}: {error or 'timed out'}"
            ) from None
        connection = cls(stream, f"{host}:{port}", client_id, inflight_requests_max)
        nursery.start_soon(connection._read_responses)
        return connection

    @property
    def closed(self) -> bool:
        return self._closed_error is not None

    async def request(
        self,
        api_key: ApiKey,
        body: dict[str, Any],
        tail: bytes = b"",
        *,
        expect_response: bool = True,
    ) -> Response:
        """Send a request and return its response (body checked against the schema).

        Raises ConnectionFailed if the connection breaks, DwalError if the broker answers
        with a request-level error, ProtocolError if the answer is malformed. Cancelling a
        call whose request was already written closes the connection (its answer would
        otherwise be misattributed), so callers cancel only to give up on the broker.
        """
        pending = await self.send_request(api_key, body, tail, expect_response=expect_response)
        return await pending.wait()

    async def send_request(
        self,
        api_key: ApiKey,
        body: dict[str, Any],
        tail: bytes | Sequence[bytes] = b"",
        *,
        expect_response: bool = True,
    ) -> "PendingRequest":
        """Write a request and return at once; `await pending.wait()` gives its response.

        Requests are written in the order of the calls that return, so a caller that awaits
        each `send_request` before the next one knows the broker sees them in that order.
        Waits while `inflight_requests_max` requests are outstanding. Raises ConnectionFailed.
        """
        if self._closed_error is not None:
            raise ConnectionFailed(f"connection to {self.address} is closed: {self._closed_error}")
        await self._slots.acquire()
        waiter = _Waiter(next(self._correlation_ids), api_key)
        try:
            parts = [tail] if isinstance(tail, (bytes, bytearray, memoryview)) else list(tail)
            header = [int(api_key), 0, waiter.correlation_id, self.client_id, body]
            prefix = frame_prefix(header, sum(len(part) for part in parts))
            async with self._send_lock:
                if expect_response:
                    self._waiters.append(waiter)
                try:
                    # record batches go out as they are, without joining them into one buffer
                    await self._stream.send_all(prefix)
                    for part in parts:
                        if part:
                            await self._stream.send_all(part)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                    self._fail(error)
                    raise ConnectionFailed(f"cannot send to {self.address}: {error}") from None
                except BaseException:
                    self._fail(ConnectionError("request cancelled mid-send"))
                    raise
        except BaseException:
            if not expect_response or waiter not in self._waiters:
                self._release(waiter)
            raise
        if not expect_response:
            waiter.response = Response(
                correlation_id=waiter.correlation_id,
                error_code=ErrorCode.NONE,
                error_message=None,
                body={},
            )
            self._release(waiter)
        return PendingRequest(self, waiter)

    def _release(self, waiter: "_Waiter") -> None:
        """The waiter is answered (or failed): free its slot and wake whoever awaits it."""
        if not waiter.done.is_set():
            waiter.done.set()
            self._slots.release()

    async def _read_responses(self) -> None:
        decoder = FrameDecoder(frame_bytes_max=RESPONSE_FRAME_BYTES_MAX)
        try:
            while True:
                data = await self._stream.receive_some(RECEIVE_BYTES)
                if not data:
                    raise ConnectionError(f"broker {self.address} closed the connection")
                decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    self._deliver(parse_response(*frame))
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
            ProtocolError,
        ) as error:
            self._fail(error)
        finally:
            self._reader_done.set()

    def _deliver(self, response: Response) -> None:
        if not self._waiters:
            raise ProtocolError(f"unexpected response {response.correlation_id}")
        waiter = self._waiters.popleft()
        if waiter.correlation_id != response.correlation_id:
            raise ProtocolError(
                f"response {response.correlation_id} arrived where {waiter.correlation_id} was due"
            )
        if response.error_code == ErrorCode.NONE:
            try:
                body = check_response(waiter.api_key, response.body)
            except ProtocolError as error:
                waiter.error = error
            else:
                response = Response(
                    correlation_id=response.correlation_id,
                    error_code=ErrorCode.NONE,
                    error_message=None,
                    body=body,
                    tail=response.tail,
                )
        waiter.response = response
        self._release(waiter)

    def _fail(self, error: Exception) -> None:
        if self._closed_error is None:
            self._closed_error = error
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = ConnectionFailed(f"connection to {self.address} failed: {error}")
            self._release(waiter)
        self._stream.socket.close()  # wakes the reader task, which then ends

    async def aclose(self) -> None:
        self._fail(ConnectionError("connection closed by the client"))
        with trio.CancelScope(shield=True):
            await self._stream.aclose()
