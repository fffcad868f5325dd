"""One pipelined connection to one broker.

Theory of operation. Requests are written in the order `request()` is called and the broker
answers in the same order, so a FIFO of waiting callers is all the bookkeeping needed: the
reader task pops the oldest waiter for each response and checks the correlation id matches.
At most `inflight_requests_max` requests are outstanding; further callers wait for a slot.

Cancellation never closes the connection by itself, because the connection is shared
(producer, metadata and admin requests ride the same one) and closing it would fail every
other request in flight, outcome unknown. A caller cancelled before its frame is written
has sent nothing. Once the first byte is written, the rest of the frame is written under a
shield (bounded by `send_timeout_s`; past it the connection is closed) so that no cancel can
tear a frame and corrupt the stream. A caller cancelled while awaiting its answer marks its
waiter abandoned: the reader still pops it in order and discards the answer when it comes,
which frees the slot.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import trio

from client.limits import LIMITS
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


class _NotDwalPeer(ProtocolError):
    """The peer answered in another protocol (an HTTP port given as a DWAL address)."""


class ConnectionFailed(DwalError):
    """The connection to a broker failed or closed.

    `request_written` says whether the request's frame had been written whole before the
    failure: if so the broker may have run it (its outcome is unknown); if not, the broker
    never saw a complete request and cannot have run it."""

    def __init__(self, message: str, *, request_written: bool = False) -> None:
        super().__init__(ErrorCode.NETWORK_EXCEPTION, message)
        self.request_written = request_written


class MalformedResponseError(DwalError, ProtocolError):
    """A broker's answer does not follow the protocol's schema for its request (a broker of
    another version, or a bug). A DwalError with code UNKNOWN_SERVER_ERROR, so one
    `except DwalError` catches every error a broker causes; also a ProtocolError."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNKNOWN_SERVER_ERROR, message)


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    awaiting_answer: int  # requests written whose answer has not come yet (abandoned too)
    abandoned: int  # of those, requests whose caller gave up (cancelled); answer discarded
    answers_discarded: int  # answers that arrived for abandoned requests, since opening


@dataclass
class _Waiter:
    correlation_id: int
    api_key: ApiKey
    done: trio.Event = field(default_factory=trio.Event)
    response: Response | None = None
    error: Exception | None = None
    abandoned: bool = False  # the caller stopped waiting: the answer is discarded on arrival


class PendingRequest:
    """A request written to a broker, whose answer is still to come."""

    def __init__(self, connection: "BrokerConnection", waiter: _Waiter) -> None:
        self._connection = connection
        self._waiter = waiter

    async def wait(self) -> Response:
        """The response; raises ConnectionFailed (with `request_written` true: the broker
        may have run the request), DwalError (a request-level error) or ProtocolError.

        Safe to cancel: the request is abandoned and its answer discarded when it arrives;
        the connection stays open for the other requests. Call it at most once."""
        waiter = self._waiter
        try:
            await waiter.done.wait()
        except BaseException:
            if not waiter.done.is_set():
                waiter.abandoned = True
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
        self,
        stream: trio.SocketStream,
        address: str,
        client_id: str,
        inflight_requests_max: int,
        send_timeout_s: float = LIMITS.send_timeout_s,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.send_timeout_s = send_timeout_s
        self._stream = stream
        self._correlation_ids = itertools.count()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._send_lock = trio.Lock()
        self._slots = trio.Semaphore(inflight_requests_max)
        self._closed_error: Exception | None = None
        self._reader_done = trio.Event()
        self._answers_discarded = 0

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        nursery: trio.Nursery,
        *,
        client_id: str = "dwal",
        inflight_requests_max: int = LIMITS.inflight_requests_max,
        connect_timeout_s: float = LIMITS.connect_timeout_s,
        send_timeout_s: float = LIMITS.send_timeout_s,
    ) -> "BrokerConnection":
        """Connect and start the reader task in `nursery`; raises ConnectionFailed.

        `send_timeout_s` bounds the writing of one frame once its first byte is written (the
        broker is not reading if it takes longer): the connection is then closed."""
        try:
            with trio.fail_after(connect_timeout_s):
                stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as error:
            raise ConnectionFailed(
                f"cannot connect to {host}:{port}: {error or 'timed out'}"
            ) from None
        connection = cls(stream, f"{host}:{port}", client_id, inflight_requests_max, send_timeout_s)
        nursery.start_soon(connection._read_responses)
        return connection

    @property
    def closed(self) -> bool:
        return self._closed_error is not None

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            awaiting_answer=len(self._waiters),
            abandoned=sum(1 for waiter in self._waiters if waiter.abandoned),
            answers_discarded=self._answers_discarded,
        )

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
        with a request-level error, MalformedResponseError (a DwalError) if the answer is
        malformed. Safe to
        cancel: a request not yet written is not sent; one already written is abandoned
        (the broker still runs it; its answer is discarded) and the connection stays open.
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
        Waits while `inflight_requests_max` requests are outstanding. Raises ConnectionFailed
        (`request_written` false: the broker cannot have run the request).

        Cancelling it before the frame's first byte is written sends nothing; after that,
        the frame is finished first (see `send_timeout_s`) and the cancellation takes effect
        at the caller's next checkpoint, with the request sent.
        """
        self._check_open()
        await self._slots.acquire()
        waiter = _Waiter(next(self._correlation_ids), api_key)
        try:
            parts = [tail] if isinstance(tail, (bytes, bytearray, memoryview)) else list(tail)
            header = [int(api_key), 0, waiter.correlation_id, self.client_id, body]
            prefix = frame_prefix(header, sum(len(part) for part in parts))
            async with self._send_lock:
                try:
                    # cancellable: nothing of this frame is written while it waits
                    await self._stream.wait_send_all_might_not_block()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                    self._fail(error)
                self._check_open()
                if expect_response:
                    self._waiters.append(waiter)
                await self._write_frame([prefix, *parts])
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

    def _check_open(self) -> None:
        if self._closed_error is not None:
            raise ConnectionFailed(f"connection to {self.address} is closed: {self._closed_error}")

    async def _write_frame(self, parts: list[bytes | bytearray | memoryview]) -> None:
        """Write one frame whole, or close the connection and raise ConnectionFailed.

        Shielded from cancellation, since a torn frame would corrupt the stream for every
        later request; bounded by `send_timeout_s` instead. A frame that could not be written
        whole never reaches the broker's request handling."""
        deadline = trio.current_time() + self.send_timeout_s
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            try:
                # record batches go out as they are, without joining them into one buffer
                for part in parts:
                    if part:
                        await self._stream.send_all(part)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                self._fail(error)
                raise ConnectionFailed(f"cannot send to {self.address}: {error}") from None
        if scope.cancelled_caught:
            self._fail(
                ConnectionError(f"a request could not be written in {self.send_timeout_s} s")
            )
            raise ConnectionFailed(
                f"cannot send to {self.address}: a request could not be written within "
                f"{self.send_timeout_s} s (the broker is not reading)"
            )

    def _release(self, waiter: "_Waiter") -> None:
        """The waiter is answered (or failed): free its slot and wake whoever awaits it."""
        if not waiter.done.is_set():
            waiter.done.set()
            self._slots.release()

    async def _read_responses(self) -> None:
        decoder = FrameDecoder(frame_bytes_max=LIMITS.response_frame_bytes_max)
        first = True
        try:
            while True:
                data = await self._stream.receive_some(LIMITS.receive_bytes)
                if not data:
                    raise ConnectionError(f"broker {self.address} closed the connection")
                if first and data.startswith(b"HTTP/"):  # where a frame length should be
                    raise _NotDwalPeer(f"{self.address} speaks HTTP, not the DWAL protocol")
                first = False
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
        if waiter.abandoned:  # nobody waits for it any more: drop it, free the slot
            self._answers_discarded += 1
            self._release(waiter)
            return
        if response.error_code == ErrorCode.NONE:
            try:
                body = check_response(waiter.api_key, response.body)
            except ProtocolError as error:
                waiter.error = MalformedResponseError(
                    f"{self.address} answered {waiter.api_key.name} with a malformed body: {error}"
                )
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
            message = (
                str(error)
                if isinstance(error, _NotDwalPeer)
                else f"connection to {self.address} failed after the request was sent (the "
                f"broker may or may not have run it): {error}"
            )
            waiter.error = ConnectionFailed(message, request_written=True)
            self._release(waiter)
        self._stream.socket.close()  # wakes the reader task, which then ends

    def close(self) -> None:
        """Close now, without waiting: requests awaiting answers fail with ConnectionFailed
        (`request_written` true). For a caller that wants a stuck broker's connection gone,
        since cancelling a request no longer closes it."""
        self._fail(ConnectionError("connection closed by the client"))

    async def aclose(self) -> None:
        self.close()
        with trio.CancelScope(shield=True):
            await self._stream.aclose()
