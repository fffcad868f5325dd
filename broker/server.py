"""The native protocol listener: connections, pipelining, dispatch, sendfile.

Theory of operation. Each connection runs two tasks in its own nursery. The reader decodes
frames and, for each request, puts a `PendingReply` into a bounded channel (in request
order), does the request's order-sensitive work (everything but a Produce's wait for fsync
and a Fetch's long poll), and starts a task that finishes the reply. The writer takes
pending replies from the channel in order, waits for each to be filled, and writes it: the
header with `send_all`, record data from segment files with `os.sendfile`. Requests thus
take effect in arrival order, wait concurrently, and are answered in order; at most
`inflight_requests_max` requests per connection are in flight: when the channel is full the
reader stops reading, and TCP pushes back on the client.
A fetch reply holds file slices, not bytes, so a slow consumer costs file descriptors that
are bounded by the same limit, never unbounded memory.

A frame that cannot be decoded ends the connection (the byte stream cannot be resynchronised);
a frame that decodes but carries a bad request gets an error reply and the connection goes on.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
from dataclasses import dataclass, field

import trio

from broker.event_log import log_event
from broker.request_handlers import Reply, RequestContext, RequestHandlers
from broker.storage import FetchSlice
from protocol import (
    API_VERSIONS,
    ApiKey,
    DwalError,
    ErrorCode,
    FrameDecoder,
    ProtocolError,
    check_request,
    parse_request,
    response_prefix,
)

logger = logging.getLogger("dwal.server")

_connection_ids = itertools.count(1)


@dataclass
class PendingReply:
    correlation_id: int
    done: trio.Event = field(default_factory=trio.Event)
    reply: Reply | None = None
    abandoned: bool = False  # the connection ended first: release the reply, never write it


@dataclass(frozen=True)
class ServerStatistics:
    connections: int
    requests_handled: int
    protocol_errors: int
    replies_pending: int  # read but not yet written back, over all connections


class NativeServer:
    def __init__(self, handlers: RequestHandlers) -> None:
        self.handlers = handlers
        self.limits = handlers.config.limits
        self.connections = 0
        self.requests_handled = 0
        self.protocol_errors = 0
        self.replies_pending = 0

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            self.connections, self.requests_handled, self.protocol_errors, self.replies_pending
        )

    async def serve(
        self, listeners: list[trio.SocketListener], *, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        await trio.serve_listeners(self.handle_connection, listeners, task_status=task_status)

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        connection_id = next(_connection_ids)
        if self.connections >= self.limits.connections_max:
            log_event(logger, logging.WARNING, "connection_refused", reason="connections_max")
            await stream.aclose()
            return
        self.connections += 1
        log_event(
            logger,
            logging.DEBUG,
            "connection_opened",
            connection=connection_id,
            peer=_peer_of(stream),
        )
        try:
            await self._run_connection(stream, connection_id)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer went away (reset, broken pipe): only this connection ends
        except* Exception as group:  # a bug must end this connection, never the broker
            log_event(
                logger,
                logging.ERROR,
                "connection_failed",
                connection=connection_id,
                error=repr(group.exceptions[0]),
            )
        finally:
            self.connections -= 1
            log_event(logger, logging.DEBUG, "connection_closed", connection=connection_id)
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _run_connection(self, stream: trio.SocketStream, connection_id: int) -> None:
        send, receive = trio.open_memory_channel[PendingReply](self.limits.inflight_requests_max)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_replies, stream, receive, nursery.cancel_scope)
            async with send:
                await self._read_requests(stream, send, nursery, connection_id)

    async def _read_requests(self, stream, send, nursery, connection_id: int) -> None:
        peer_host = _peer_of(stream).rpartition(":")[0]
        decoder = FrameDecoder(
            frame_bytes_max=self.limits.frame_bytes_max,
            header_bytes_max=self.limits.frame_header_bytes_max,
        )
        while True:
            try:
                while (frame := decoder.next_frame()) is not None:
                    await self._dispatch(frame, send, nursery, peer_host)
            except ProtocolError as error:
                self.protocol_errors += 1
                log_event(
                    logger,
                    logging.WARNING,
                    "connection_protocol_error",
                    connection=connection_id,
                    error=str(error),
                )
                return
            wanted = min(max(decoder.bytes_wanted(), 65536), self.limits.socket_receive_bytes)
            data = await stream.receive_some(wanted)
            if not data:
                return
            decoder.feed(data)

    async def _dispatch(self, frame, send, nursery, peer: str) -> None:
        header, tail = frame
        try:
            request = parse_request(header, tail)
        except ProtocolError:
            correlation_id = header[2] if isinstance(header, list) and len(header) > 2 else None
            if type(correlation_id) is not int:
                raise
            pending = PendingReply(correlation_id)
            await send.send(pending)
            self.replies_pending += 1
            _finish(pending, _error_reply(ErrorCode.INVALID_REQUEST, "malformed request header"))
            return
        pending = PendingReply(request.correlation_id)
        await send.send(pending)
        self.replies_pending += 1
        try:
            work = await self._start(request, RequestContext(request.client_id or "", peer))
        except Exception as error:
            self._finish_with_error(pending, request, error)
            return
        nursery.start_soon(self._complete, work, request, pending)

    async def _start(self, request, context: RequestContext):
        """Check the request and do its order-sensitive part now, in arrival order; returns
        the coroutine function that produces the reply (run concurrently)."""
        try:
            api_key = ApiKey(request.api_key)
        except ValueError:
            raise DwalError(
                ErrorCode.UNKNOWN_API_KEY, f"unknown api key {request.api_key}"
            ) from None
        low, high = API_VERSIONS[api_key]
        if not low <= request.api_version <= high:
            raise DwalError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"{api_key.name} supports versions {low}..{high}, not {request.api_version}",
            )
        body = check_request(api_key, request.body)
        if api_key == ApiKey.PRODUCE:
            return await self.handlers.start_produce(body, request.tail)
        handler = self.handlers.table[api_key]
        if api_key in _RUN_CONCURRENTLY:
            return functools.partial(handler, body, request.tail, context)
        reply = await handler(body, request.tail, context)  # done before the next request is read
        return functools.partial(_already, reply)

    async def _complete(self, work, request, pending: PendingReply) -> None:
        try:
            reply = await work()
        except Exception as error:
            self._finish_with_error(pending, request, error)
            return
        self.requests_handled += 1
        _finish(pending, reply)

    def _finish_with_error(self, pending: PendingReply, request, error: Exception) -> None:
        if isinstance(error, DwalError):
            reply = _error_reply(error.code, error.message)
        elif isinstance(error, ProtocolError):
            reply = _error_reply(ErrorCode.INVALID_REQUEST, str(error))
        else:  # a bug must not take the broker down: report it and go on
            log_event(
                logger, logging.ERROR, "request_failed", api_key=request.api_key, error=repr(error)
            )
            logger.debug("request failure", exc_info=error)
            reply = _error_reply(ErrorCode.UNKNOWN_SERVER_ERROR, f"internal error: {error!r}")
        self.requests_handled += 1
        _finish(pending, reply)

    async def _write_replies(self, stream: trio.SocketStream, receive, connection_scope) -> None:
        """Write replies in request order until the reader is done or the peer is gone; then
        end the connection and release every reply that will never be written."""
        current: PendingReply | None = None
        try:
            async for pending in receive:
                current = pending
                await pending.done.wait()
                reply = pending.reply
                assert reply is not None
                current = None
                try:
                    if reply.send:
                        await _send_reply(stream, pending.correlation_id, reply)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return
                finally:
                    reply.close()
                    self.replies_pending -= 1
        finally:
            connection_scope.cancel()
            if current is not None:
                self._abandon(current)
            while True:
                try:
                    self._abandon(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            receive.close()

    def _abandon(self, pending: PendingReply) -> None:
        pending.abandoned = True
        self.replies_pending -= 1
        if pending.reply is not None:
            pending.reply.close()


# Requests run in arrival order: the reader finishes each one (for Produce, its appends)
# before it reads the next, so a request sees the effects of every earlier one on its
# connection (a Produce right after its CreateTopics finds the topic). Only the waiting parts
# run concurrently: a Produce's wait for fsync, and a Fetch (which may long-poll).
_RUN_CONCURRENTLY = frozenset({ApiKey.FETCH})


async def _already(reply: Reply) -> Reply:
    return reply


def _peer_of(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"{host}:{port}"


def _finish(pending: PendingReply, reply: Reply) -> None:
    pending.reply = reply
    pending.done.set()
    if pending.abandoned:  # nobody will write it: release its file slices now
        reply.close()


def _error_reply(code: ErrorCode, message: str) -> Reply:
    return Reply({}, error_code=code, error_message=message)


async def _send_reply(stream: trio.SocketStream, correlation_id: int, reply: Reply) -> None:
    prefix = response_prefix(
        correlation_id, reply.error_code, reply.error_message, reply.body, reply.tail_bytes
    )
    if not reply.parts:
        await stream.send_all(prefix)
        return
    await stream.send_all(prefix)
    for part in reply.parts:
        if isinstance(part, FetchSlice):
            await _send_file_slice(stream, part)
        else:
            await stream.send_all(part)


async def _send_file_slice(stream: trio.SocketStream, piece: FetchSlice) -> None:
    """Send `piece` straight from the segment file with sendfile, falling back to reads."""
    socket_fd = stream.socket.fileno()
    position = piece.position
    remaining = piece.length
    while remaining > 0:
        try:
            sent = os.sendfile(socket_fd, piece.fd, position, remaining)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(stream.socket)
            continue
        except OSError as error:
            if error.errno in (errno.EINVAL, errno.ENOSYS):
                await stream.send_all(os.pread(piece.fd, remaining, position))
                return
            raise
        if sent == 0:
            raise trio.BrokenResourceError("segment file ended before the slice did")
        position += sent
        remaining -= sent
        await trio.lowlevel.checkpoint()
