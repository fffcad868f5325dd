"""The HTTP/1.1 shell around `JsonApi`: h11 speaks HTTP, trio streams move the bytes.

Theory of operation. `trio.serve_listeners` owns one nursery in which every accepted
connection runs as one task, `HttpGateway.handle_connection`. That task reads one request at
a time with an h11 server `Connection` (keep-alive: the same connection serves request after
request; pipelined requests wait in h11's buffer and are answered in order), hands the whole
request to `JsonApi.handle`, and writes the response.

Everything a peer can make us hold is bounded (the limits are in `broker.limits.Limits`):
- request heads by ``limits.http_header_bytes_max`` (431): h11's
  ``max_incomplete_event_size`` stops a head that is still arriving, and the size of a parsed
  head is checked too, since one read of ``http_receive_bytes`` may complete a larger one;
- request bodies by ``limits.http_body_bytes_max`` (413, checked against Content-Length
  before any body byte is read, and while reading chunked bodies);
- request bodies over all connections, native ones included, by the shared `MemoryPool`: a
  body's bytes (Content-Length, or ``http_body_bytes_max`` for a chunked body until its end)
  are reserved before it is read, the read timeout pausing while the pool is spent, and go
  back once the response is produced;
- connections by ``limits.http_connections_max``: further ones get an immediate 503 (a small
  number of those are answered at once, beyond that they are simply closed);
- time: reading a request (including keep-alive idle time), writing a response and the
  lingering close after an error response each have a timeout (``limits.http_*_timeout_ms``).

A response that leaves unread request bytes (413, malformed request) closes the connection;
before closing we shut down our sending side and drain what the client still sends for a
moment, so that the client reads our answer rather than a TCP reset. A peer that goes away
at any moment only ends its own connection task.
"""

from __future__ import annotations

import http
import logging
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11
import trio

from broker.event_log import log_event
from broker.gateway.json_api import ApiRequest, ApiResponse, JsonApi
from broker.limits import Limits
from broker.memory_pool import MemoryPool
from protocol import ErrorCode

if TYPE_CHECKING:
    from broker.request_handlers import RequestHandlers

logger = logging.getLogger("dwal.http")

LOGGED_TARGET_CHARS_MAX = 200


@dataclass(frozen=True)
class HttpGatewayStatistics:
    connections: int  # open now
    connections_accepted: int
    connections_refused: int
    requests_handled: int


class _BodyTooLarge(Exception):
    pass


class _BodyReservation:
    """The memory-pool bytes held for one request's body; `release` gives back all of them
    (idempotent), `shrink_to` what is not needed."""

    def __init__(self, pool: MemoryPool) -> None:
        self._pool = pool
        self.byte_count = 0

    async def reserve(self, byte_count: int) -> None:
        assert self.byte_count == 0
        await self._pool.reserve(byte_count)
        self.byte_count = byte_count

    def shrink_to(self, byte_count: int) -> None:
        assert byte_count <= self.byte_count
        self._pool.release(self.byte_count - byte_count)
        self.byte_count = byte_count

    def release(self) -> None:
        self.shrink_to(0)


class HttpGateway:
    """Serves `api` over HTTP/1.1 within `limits`. Start with `serve` (or feed it streams
    through `handle_connection`). Request bodies reserve their bytes in `memory_pool` (pass
    the native server's; default: a pool of its own of `limits.queued_request_bytes_max`)."""

    def __init__(
        self,
        api: JsonApi,
        limits: Limits,
        *,
        memory_pool: MemoryPool | None = None,
    ) -> None:
        self._api = api
        self._limits = limits
        if memory_pool is None:
            memory_pool = MemoryPool(limits.queued_request_bytes_max)
        assert memory_pool.bytes_max >= limits.http_body_bytes_max, "a body must fit"
        self._memory_pool = memory_pool
        self._connections = 0
        self._connections_accepted = 0
        self._connections_refused = 0
        self._refusing = 0
        self._requests_handled = 0

    def statistics(self) -> HttpGatewayStatistics:
        return HttpGatewayStatistics(
            self._connections,
            self._connections_accepted,
            self._connections_refused,
            self._requests_handled,
        )

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve connections until cancelled; `task_status.started` once listening."""
        await trio.serve_listeners(self.handle_connection, listeners, task_status=task_status)

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until either side closes it; never raises for peer trouble."""
        try:
            if self._connections >= self._limits.http_connections_max:
                await self._refuse(stream)
                return
            self._connections += 1
            self._connections_accepted += 1
            try:
                connection = h11.Connection(
                    h11.SERVER, max_incomplete_event_size=self._limits.http_header_bytes_max
                )
                await self._serve_requests(stream, connection)
            finally:
                self._connections -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away
        except trio.TooSlowError:
            log_event(
                logger,
                logging.INFO,
                "http_response_write_timed_out",
                timeout_s=self._limits.http_response_write_timeout_ms / 1000,
            )
        except Exception as error:  # a bug must not take the other connections down
            log_event(logger, logging.ERROR, "http_connection_failed", error=repr(error))
            logger.debug("http connection failure", exc_info=True)
        finally:
            await trio.aclose_forcefully(stream)

    async def _refuse(self, stream: trio.abc.Stream) -> None:
        self._connections_refused += 1
        log_event(
            logger,
            logging.WARNING,
            "http_connection_refused",
            reason="http_connections_max",
            limit=self._limits.http_connections_max,
        )
        if self._refusing >= self._limits.http_refusals_max:
            return
        self._refusing += 1
        try:
            message = (
                f"the gateway already serves its maximum of "
                f"{self._limits.http_connections_max} connections; retry later"
            )
            response = ApiResponse(
                status=503, body={"error": message}, headers=(("retry-after", "1"),)
            )
            await self._send(stream, h11.Connection(h11.SERVER), response, close=True)
            await self._linger(stream)
        finally:
            self._refusing -= 1

    async def _serve_requests(self, stream: trio.abc.Stream, connection: h11.Connection) -> None:
        while True:
            body_reservation = _BodyReservation(self._memory_pool)
            try:
                outcome = await self._read_request(stream, connection, body_reservation)
                if outcome is None:
                    return
                request, response = outcome
                read_whole = response is None
                if response is None:
                    assert request is not None
                    response = await self._respond(request)
            finally:
                body_reservation.release()  # the request is handled (or never will be)
            if not read_whole:  # answer with the error response, then close
                self._log_error(request, response)
                await self._send(
                    stream,
                    connection,
                    response,
                    close=True,
                    head=request is not None and request.method == "HEAD",
                )
                await self._linger(stream)
                return
            assert request is not None
            await self._send(
                stream, connection, response, close=False, head=request.method == "HEAD"
            )
            if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                return  # h11 decided to close (Connection: close, HTTP/1.0)
            connection.start_next_cycle()

    async def _read_request(
        self,
        stream: trio.abc.Stream,
        connection: h11.Connection,
        body_reservation: _BodyReservation,
    ) -> tuple[ApiRequest | None, ApiResponse | None] | None:
        """Read a whole request, its body's bytes reserved in `body_reservation`. Returns None
        when the connection should just close, else the request (whole, or its head, or None
        when even that is unreadable) and, if it could not be read whole, the error response
        to send instead of handling it."""
        head: ApiRequest | None = None
        with trio.move_on_after(self._limits.http_request_read_timeout_ms / 1000) as read_scope:
            try:
                outcome = await self._read_head(stream, connection)
                if outcome is None:
                    return None
                head, declared_length = outcome
                if declared_length is not None:
                    self._check_body_length(declared_length)
                await self._reserve_body(read_scope, body_reservation, declared_length)
                return await self._read_body(stream, connection, head, body_reservation), None
            except _BodyTooLarge:
                message = (
                    f"the request body is larger than the limit of "
                    f"{self._limits.http_body_bytes_max} bytes"
                )
                return head, ApiResponse(
                    status=413,
                    body={"error": message, "error_code": ErrorCode.MESSAGE_TOO_LARGE.name},
                )
            except h11.RemoteProtocolError as error:
                return self._protocol_error(connection, head, error)
        # Timed out: a silent keep-alive connection just closes; a half-sent request gets 408.
        if connection.their_state is h11.IDLE and not connection.trailing_data[0]:
            return None
        if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return None
        return head, ApiResponse(
            status=408,
            body={
                "error": "the request was not received within "
                f"{self._limits.http_request_read_timeout_ms / 1000} s"
            },
        )

    async def _reserve_body(
        self, read_scope: trio.CancelScope, reservation: _BodyReservation, length: int | None
    ) -> None:
        """Reserve the body's bytes (all a chunked body may have) before reading any; waiting
        for memory does not count against the client's read timeout."""
        byte_count = self._limits.http_body_bytes_max if length is None else length
        if byte_count == 0:
            return
        time_left_s = read_scope.deadline - trio.current_time()
        read_scope.deadline = math.inf
        try:
            await reservation.reserve(byte_count)
        finally:
            read_scope.deadline = trio.current_time() + time_left_s

    def _check_body_length(self, length: int) -> None:
        if length > self._limits.http_body_bytes_max:
            raise _BodyTooLarge

    def _protocol_error(
        self, connection: h11.Connection, head: ApiRequest | None, error: h11.RemoteProtocolError
    ) -> tuple[ApiRequest | None, ApiResponse] | None:
        if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            log_event(logger, logging.INFO, "http_protocol_error", error=_plain_text(error))
            return None  # no response possible; one answered is logged by _log_error
        if error.error_status_hint == 431:
            message = (
                f"the request line and headers are larger than the limit of "
                f"{self._limits.http_header_bytes_max} bytes"
            )
        else:
            message = f"malformed HTTP request: {_plain_text(error)}"
        return head, ApiResponse(status=error.error_status_hint, body={"error": message})

    async def _read_head(
        self, stream: trio.abc.Stream, connection: h11.Connection
    ) -> tuple[ApiRequest, int | None] | None:
        """Read a request's head: an ApiRequest without body and its declared body length
        (None when chunked), or None when the peer closed the connection between requests."""
        event = await self._next_event(stream, connection)
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        if _head_bytes(event) > self._limits.http_header_bytes_max:
            # h11 bounds only heads still incomplete; one read may bring a larger whole head
            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        head = ApiRequest(
            method=event.method.decode("ascii", errors="replace"),
            target=event.target.decode("ascii", errors="replace"),
            body=b"",
        )
        return head, _content_length(event)

    async def _read_body(
        self,
        stream: trio.abc.Stream,
        connection: h11.Connection,
        head: ApiRequest,
        reservation: _BodyReservation,
    ) -> ApiRequest:
        """Read the body, whose bytes `reservation` holds; what a chunked body did not use
        goes back to the pool at its end."""
        if connection.they_are_waiting_for_100_continue:
            await self._send_bytes(
                stream, connection.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        body = bytearray()
        while True:
            event = await self._next_event(stream, connection)
            if isinstance(event, h11.EndOfMessage):
                reservation.shrink_to(len(body))
                return ApiRequest(method=head.method, target=head.target, body=bytes(body))
            assert isinstance(event, h11.Data), event
            self._check_body_length(len(body) + len(event.data))
            body += event.data

    async def _next_event(self, stream: trio.abc.Stream, connection: h11.Connection) -> h11.Event:
        while True:
            event = connection.next_event()
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event), event  # PAUSED cannot happen mid-request
                return event
            data = await stream.receive_some(self._limits.http_receive_bytes)
            connection.receive_data(bytes(data))

    async def _respond(self, request: ApiRequest) -> ApiResponse:
        try:
            response = await self._api.handle(request)
        except Exception as error:  # a bug must not take the gateway down: report, go on
            log_event(
                logger,
                logging.ERROR,
                "http_handler_failed",
                method=request.method,
                target=request.target[:LOGGED_TARGET_CHARS_MAX],
                error=repr(error),
            )
            logger.debug("http handler failure", exc_info=True)
            response = ApiResponse(
                status=500,
                body={"error": "internal error", "error_code": ErrorCode.UNKNOWN_SERVER_ERROR.name},
            )
        else:
            self._log_error(request, response)
        self._requests_handled += 1
        return response

    def _log_error(self, request: ApiRequest | None, response: ApiResponse) -> None:
        if response.status < 400:
            return
        level = logging.ERROR if response.status >= 500 else logging.INFO
        log_event(
            logger,
            level,
            "http_request_failed",
            method=request.method if request else "-",
            target=request.target[:LOGGED_TARGET_CHARS_MAX] if request else "-",
            status=response.status,
            error=response.body.get("error", ""),
        )

    async def _send(
        self,
        stream: trio.abc.Stream,
        connection: h11.Connection,
        response: ApiResponse,
        *,
        close: bool,
        head: bool = False,
    ) -> None:
        body = response.encode_body()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            *response.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        reason = http.HTTPStatus(response.status).phrase.encode("ascii")
        data = connection.send(
            h11.Response(status_code=response.status, headers=headers, reason=reason)
        )
        if not head:  # a response to HEAD has headers only
            data += connection.send(h11.Data(data=body))
        data += connection.send(h11.EndOfMessage())
        await self._send_bytes(stream, data)

    async def _send_bytes(self, stream: trio.abc.Stream, data: bytes) -> None:
        with trio.fail_after(self._limits.http_response_write_timeout_ms / 1000):
            await stream.send_all(data)

    async def _linger(self, stream: trio.abc.Stream) -> None:
        """Stop sending, then drain what the client still sends, briefly and up to a bound."""
        with trio.move_on_after(self._limits.http_linger_timeout_ms / 1000):
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            drained = 0
            while drained < self._limits.http_linger_bytes_max:
                data = await stream.receive_some(self._limits.http_receive_bytes)
                if not data:
                    return
                drained += len(data)


def _head_bytes(request: h11.Request) -> int:
    """The size of the request line and headers as sent, give or take optional whitespace."""
    line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


# h11 quotes the offending bytes as Python literals ("illegal request line: bytearray(b'X')")
_PYTHON_BYTES_LITERAL = re.compile(r":?\s*(bytearray\()?b['\"].*$", re.DOTALL)


def _plain_text(error: h11.RemoteProtocolError) -> str:
    """What was wrong with a request, in words, without Python literals."""
    text = _PYTHON_BYTES_LITERAL.sub("", str(error)).strip()
    if text == "illegal request line":
        return "illegal request line (expected a method, a target and HTTP/1.1)"
    return text or "unreadable request"


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked that it is a decimal number
    return None


async def serve_http(
    handlers: RequestHandlers,
    listeners: list[trio.SocketListener],
    *,
    memory_pool: MemoryPool | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the JSON API of `handlers` on `listeners` until cancelled, request bodies
    reserving their bytes in `memory_pool` (see `HttpGateway`).

    Calls `task_status.started(listeners)` once accepting connections. Every connection task
    lives in the nursery of `trio.serve_listeners`; cancelling this call ends them all.
    """
    gateway = HttpGateway(JsonApi(handlers), handlers.config.limits, memory_pool=memory_pool)
    await gateway.serve(listeners, task_status=task_status)


__all__ = ["HttpGateway", "HttpGatewayStatistics", "serve_http"]
