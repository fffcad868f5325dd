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
reply has been produced. The frame itself lives only as long as the request's work refers to
it: a Produce is done with it once appended, so an acks=all answer waiting for the in-sync
replicas holds its reservation (which bounds the writes awaiting replication) but not its
memory, which the next frames reuse (a third fewer page faults per MB replicated at RF 3,
1 KiB records). To read several small frames per receive, a reader may also hold
read-ahead granted by `try_reserve` only while a maximum frame would still fit (see
`broker.memory_pool` for why this cannot deadlock). The four bytes of a length prefix read
without read-ahead are the only bytes not counted (at most four per connection).

A large frame (64 KiB and up) is received straight into one buffer of its size (see
`FrameDecoder.frame_buffer`), so it is never held twice; small ones are read many per receive.

Time. Once a frame's first byte is in, the rest must arrive within `request_read_timeout_ms`
of time spent waiting on the socket (a total, not a per-read timer, so trickling a byte now
and then does not hold a frame's memory for ever; time spent waiting for memory or for room
in the reply queue does not count). Past it the connection is closed and its reservation
released. Between frames a connection holds no frame; one that has received nothing and had
nothing to answer for `connections_idle_ms_max` is closed.

A frame that cannot be decoded ends the connection (the byte stream cannot be resynchronised);
a frame that decodes but carries a bad request gets an error reply and the connection goes on.
"""

from __future__ import annotations

import errno
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
    produce: bool = False  # counted in NativeServer.produces_pending


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
        self.produces_pending = 0  # Produce requests read and not yet answered (or dropped)
        self._last_produce_s = -1e9  # trio time the last Produce request was read
        self._produces_answered = trio.Event()

    async def wait_produces_answered(self, *, quiet_seconds: float = 0.0) -> None:
        """Return once no Produce request is pending (every one read so far was answered)
        and none arrived for `quiet_seconds`: a stopping broker waits for this, so that no
        write's outcome is cut off with its connection - clients stop sending to it once an
        answer (NOT_LEADER_OR_FOLLOWER) made them refresh their metadata, and one already on
        its way would otherwise be cut. Safe to cancel (the caller bounds the wait)."""
        while True:
            while self.produces_pending:
                await self._produces_answered.wait()
            idle = trio.current_time() - self._last_produce_s
            if idle >= quiet_seconds:
                return
            await trio.sleep(quiet_seconds - idle)

    def _produce_done(self, pending: PendingReply) -> None:
        if pending.produce:
            pending.produce = False
            self.produces_pending -= 1
            if not self.produces_pending:
                self._produces_answered.set()
                self._produces_answered = trio.Event()

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
        activity = _WriterActivity(trio.current_time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_replies, stream, receive, nursery.cancel_scope, activity)
            async with send:
                await self._read_requests(stream, send, nursery, connection_id, activity)

    async def _read_requests(
        self, stream, send, nursery, connection_id: int, activity: _WriterActivity
    ) -> None:
        peer = _peer_of(stream)
        peer_host = peer.rpartition(":")[0]
        decoder = FrameDecoder(
            frame_bytes_max=self.limits.frame_bytes_max,
            header_bytes_max=self.limits.frame_header_bytes_max,
        )
        receive_buffer = _ReceiveBuffer(self.memory_pool, self.limits)
        read_timeout_s = self.limits.request_read_timeout_ms / 1000
        frame_time_left_s = read_timeout_s  # of the frame being received
        try:
            while True:
                try:
                    # No name here outlives the loop's turn: a frame handed over must not
                    # stay alive (its bytes no longer counted) while the reader waits.
                    while (frame := _next_frame(decoder)) is not None:
                        receive_buffer.hand_over(frame[2])
                        frame_time_left_s = read_timeout_s  # for the frame after it
                        await self._dispatch(*frame, send, nursery, peer_host)
                except ProtocolError as error:
                    self.protocol_errors += 1
                    log_event(
                        logger,
                        logging.WARNING,
                        "connection_protocol_error",
                        connection=connection_id,
                        peer=peer,
                        error=str(error),
                    )
                    return
                byte_count = await receive_buffer.room_for_next_read(decoder)
                if decoder.buffered_bytes == 0:  # between frames: idle, holding no request
                    if not await self._receive_between_frames(
                        stream, decoder, byte_count, send, activity, connection_id, peer
                    ):
                        return
                    frame_time_left_s = read_timeout_s
                    continue
                started_s = trio.current_time()
                with trio.move_on_after(max(0.0, frame_time_left_s)):
                    if not await _receive(stream, decoder, byte_count):
                        return
                    frame_time_left_s -= trio.current_time() - started_s
                    continue
                log_event(
                    logger,
                    logging.WARNING,
                    "connection_read_timeout",
                    connection=connection_id,
                    peer=peer,
                    frame_bytes_received=decoder.buffered_bytes,
                    frame_bytes_wanted=decoder.bytes_wanted(),
                    timeout_ms=self.limits.request_read_timeout_ms,
                )
                return
        finally:
            receive_buffer.close()

    async def _receive_between_frames(
        self, stream, decoder: FrameDecoder, byte_count: int, send, activity, connection_id, peer
    ) -> bool:
        """Receive the start of the next frame; returns False at the end of the stream, or
        when the connection has been idle (nothing received, nothing to answer or written)
        for `connections_idle_ms_max`."""
        idle_s = self.limits.connections_idle_ms_max / 1000
        idle_since_s = trio.current_time()
        while True:
            deadline_s = max(idle_since_s, activity.last_reply_written_s) + idle_s
            with trio.move_on_at(deadline_s):
                return await _receive(stream, decoder, byte_count) > 0
            if activity.writing or send.statistics().current_buffer_used:
                idle_since_s = trio.current_time()  # a reply is due: not idle
                continue
            if trio.current_time() >= max(idle_since_s, activity.last_reply_written_s) + idle_s:
                log_event(
                    logger,
                    logging.INFO,
                    "connection_idle_closed",
                    connection=connection_id,
                    peer=peer,
                    idle_ms=self.limits.connections_idle_ms_max,
                )
                return False

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
        pending = PendingReply(request.correlation_id, produce=request.api_key == ApiKey.PRODUCE)
        await send.send(pending)
        self.replies_pending += 1
        self.produces_pending += pending.produce
        if pending.produce:
            self._last_produce_s = trio.current_time()
        try:
            work = await self._start(request, RequestContext(request.client_id or "", peer))
        except Exception as error:
            self._finish_with_error(pending, request.api_key, error)
            return False
        # `work` holds what it still needs; the request (its frame) is not kept alive for it
        nursery.start_soon(self._complete, work, request.api_key, pending, frame_bytes)
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
        return await self.handlers.start(api_key, body, request.tail, context)

    async def _complete(self, work, api_key: int, pending: PendingReply, frame_bytes: int) -> None:
        try:
            reply = await work()
        except Exception as error:
            self._finish_with_error(pending, api_key, error)
            return
        finally:
            self.memory_pool.release(frame_bytes)
        self.requests_handled += 1
        _finish(pending, reply)

    def _finish_with_error(self, pending: PendingReply, api_key: int, error: Exception) -> None:
        if isinstance(error, DwalError):
            reply = _error_reply(error.code, error.message)
        elif isinstance(error, ProtocolError):
            reply = _error_reply(ErrorCode.INVALID_REQUEST, str(error))
        else:  # a bug must not take the broker down: report it and go on
            log_event(logger, logging.ERROR, "request_failed", api_key=api_key, error=repr(error))
            logger.debug("request failure", exc_info=error)
            reply = _error_reply(ErrorCode.UNKNOWN_SERVER_ERROR, f"internal error: {error!r}")
        self.requests_handled += 1
        _finish(pending, reply)

    async def _write_replies(
        self, stream: trio.SocketStream, receive, connection_scope, activity: _WriterActivity
    ) -> None:
        """Write replies in request order until the reader is done or the peer is gone; then
        end the connection and release every reply that will never be written."""
        current: PendingReply | None = None
        try:
            async for pending in receive:
                current = pending
                activity.writing = True
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
                    self._produce_done(pending)
                    activity.writing = False
                    activity.last_reply_written_s = trio.current_time()
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
        self._produce_done(pending)
        if pending.reply is not None:
            pending.reply.close()


@dataclass
class _WriterActivity:
    """What a connection's reader needs to know of its writer to tell an idle connection."""

    last_reply_written_s: float  # trio time
    writing: bool = False  # holds a reply: waiting for it to be produced, or writing it


async def _receive(stream: trio.SocketStream, decoder: FrameDecoder, byte_count: int) -> int:
    """Receive into `decoder`: a large frame's rest straight into its buffer (all of it is
    reserved), else at most `byte_count` bytes. Returns the count (0: end of stream).
    Cancel-safe: a cancelled receive has taken nothing from the socket."""
    frame_buffer = decoder.frame_buffer()
    if frame_buffer is not None:
        count = await stream.socket.recv_into(frame_buffer)
        decoder.frame_buffer_filled(count)
        return count
    data = await stream.receive_some(byte_count)
    decoder.feed(data)
    return len(data)


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


def _peer_of(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address) or "local"  # a Unix socket


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
