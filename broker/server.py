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

The bytes of requests are bounded over all connections by one `MemoryPool`
(`queued_request_bytes_max`, shared with the HTTP gateway). A reader reads nothing it has
not reserved: once a frame's length prefix is in, it reserves the whole frame (waiting, and
so not reading, while the pool is spent), and the frame's bytes go back to the pool when its
reply has been produced. To read several small frames per receive, a reader may also hold
read-ahead granted by `try_reserve` only while a maximum frame would still fit (see
`broker.memory_pool` for why this cannot deadlock). The four bytes of a length prefix read
without read-ahead are the only bytes not counted (at most four per connection).

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
from broker.limits import Limits
from broker.memory_pool import MemoryPool
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
    """Serves the native protocol for `handlers`. `memory_pool` bounds the bytes of requests
    being read and queued; pass the one the HTTP gateway uses (default: a pool of its own
    of `limits.queued_request_bytes_max`)."""

    def __init__(self, handlers: RequestHandlers, *, memory_pool: MemoryPool | None = None) -> None:
        self.handlers = handlers
        self.limits = handlers.config.limits
        if memory_pool is None:
            memory_pool = MemoryPool(self.limits.queued_request_bytes_max)
        assert memory_pool.bytes_max >= self.limits.largest_request_bytes, "a frame must fit"
        self.memory_pool = memory_pool
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
        receive_buffer = _ReceiveBuffer(self.memory_pool, self.limits)
        try:
            while True:
                try:
                    while (frame := _next_frame(decoder)) is not None:
                        header, tail, frame_bytes = frame
                        receive_buffer.hand_over(frame_bytes)
                        await self._dispatch(header, tail, frame_bytes, send, nursery, peer_host)
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
                data = await stream.receive_some(await receive_buffer.room_for_next_read(decoder))
                if not data:
                    return
                decoder.feed(data)
        finally:
            receive_buffer.close()

    async def _dispatch(self, header, tail, frame_bytes: int, send, nursery, peer: str) -> None:
        """Queue the reply to one frame and start its work. The frame's `frame_bytes` are
        reserved in the memory pool; they go back once its reply is produced (or the frame is
        dropped), on every path."""
        handed_to_task = False
        try:
            handed_to_task = await self._queue_request(
                header, tail, frame_bytes, send, nursery, peer
            )
        finally:
            if not handed_to_task:
                self.memory_pool.release(frame_bytes)

    async def _queue_request(self, header, tail, frame_bytes: int, send, nursery, peer) -> bool:
        """Returns whether a task now completes the request (and releases its bytes)."""
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
            return False
        pending = PendingReply(request.correlation_id)
        await send.send(pending)
        self.replies_pending += 1
        try:
            work = await self._start(request, RequestContext(request.client_id or "", peer))
        except Exception as error:
            self._finish_with_error(pending, request, error)
            return False
        nursery.start_soon(self._complete, work, request, pending, frame_bytes)
        return True

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

    async def _complete(self, work, request, pending: PendingReply, frame_bytes: int) -> None:
        try:
            reply = await work()
        except Exception as error:
            self._finish_with_error(pending, request, error)
            return
        finally:
            self.memory_pool.release(frame_bytes)
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


class _ReceiveBuffer:
    """The memory-pool reservation behind one connection's receive buffer: what has been
    reserved for bytes read (or about to be read) and not yet handed over to a frame."""

    def __init__(self, pool: MemoryPool, limits: Limits) -> None:
        self._pool = pool
        self._receive_bytes = limits.socket_receive_bytes  # one read, and one read-ahead
        self._request_bytes_max = limits.largest_request_bytes
        self.reserved = 0

    async def room_for_next_read(self, decoder: FrameDecoder) -> int:
        """How many bytes the next receive may take, after reserving them (waits while the
        pool is spent; cancel-safe: a cancelled wait reserves nothing)."""
        buffered = decoder.buffered_bytes
        if buffered >= 4:  # the frame's length is known: reserve all of it at once
            frame_bytes = buffered + decoder.bytes_wanted()
            if self.reserved < frame_bytes:
                await self._pool.reserve(frame_bytes - self.reserved)
                self.reserved = frame_bytes
        elif self.reserved <= buffered and self._pool.try_reserve(
            self._receive_bytes, keep_free=self._request_bytes_max
        ):
            self.reserved += self._receive_bytes
        if self.reserved <= buffered:  # no read-ahead granted: just the length prefix
            return 4 - buffered
        return min(self.reserved - buffered, self._receive_bytes)

    def hand_over(self, frame_bytes: int) -> None:
        """A whole frame of `frame_bytes` was taken from the buffer: its reservation now
        belongs to the frame's request (released when that is handled)."""
        assert frame_bytes <= self.reserved, (frame_bytes, self.reserved)
        self.reserved -= frame_bytes

    def close(self) -> None:
        self._pool.release(self.reserved)
        self.reserved = 0


def _next_frame(decoder: FrameDecoder) -> tuple[object, memoryview, int] | None:
    """The next whole frame's header, tail and size on the wire, or None."""
    buffered = decoder.buffered_bytes
    frame = decoder.next_frame()
    if frame is None:
        return None
    header, tail = frame
    return header, tail, buffered - decoder.buffered_bytes


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
