"""The gRPC gateway: serves `log.v1.Log` (plus gRPC health checking and server reflection)
with grpcio's asyncio server on a thread of its own, bridged into the trio broker.

Theory of operation. grpcio runs on asyncio, the broker on trio; each keeps its own event
loop and the gateway joins them:

- **The gateway thread.** `open_grpc_gateway` starts it as a trio worker thread
  (`trio.to_thread.run_sync`) owned by a task of the gateway's nursery, so the thread lives
  exactly as long as the gateway. It runs an asyncio loop that creates the grpcio server and
  binds the port (an error such as "address in use" is raised in trio by the `async with`);
  `GrpcGateway.serve` adds the services and starts serving; leaving the block stops the
  server (streams that follow a log end with UNAVAILABLE; other calls get a grace period),
  then the loop, then the thread.
- **Calls into trio.** The service (`broker.gateway.grpc_log_service`, asyncio side) decodes
  and encodes protobuf messages and record batches on the gateway thread; what touches the
  broker (appends, reads) runs as a trio task of the gateway's nursery through
  `TrioBridge.call`, so the trio loop does only what a native request would. Cancelling the
  asyncio caller (the client cancels, the deadline passes) cancels the trio task; a trio
  exception is raised in the caller.
- **Bounds.** grpcio refuses calls beyond `limits.grpc_concurrent_rpcs_max` and messages
  larger than `limits.grpc_message_bytes_max` (RESOURCE_EXHAUSTED); a ProduceStream reads at
  most `limits.grpc_stream_requests_queued_max` requests ahead of their answers, and a
  ConsumeStream reads the log only as fast as the client takes the responses (grpcio's flow
  control holds each `yield`).
- **Gateways are views.** The backend below calls the same `RequestHandlers` methods as the
  HTTP gateway (`append_batch`, `read_batch_containing`, `follow_batches`), so partitions led
  by another broker are reached through it, and it never touches storage itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from broker.config import BrokerConfig
from broker.gateway.record_reader import check_readable, read_records
from protocol import ACKS_ALL, DwalError, ErrorCode, Record, validate_topic_name
from protocol.partitioning import partition_for_key

if TYPE_CHECKING:
    from broker.request_handlers import RequestHandlers

T = TypeVar("T")

WAL_TOPIC = "wal"  # the original service's log: the default topic, one partition
# Calls still running when the broker stops get this long to end before grpcio cancels
# them (their work in trio is cancelled with the broker: the client sees UNAVAILABLE).
STOP_GRACE_SECONDS = 0.5


class GatewayStopping(Exception):
    """The gateway is stopping: the call was not (or not wholly) carried out."""


class TrioBridge:
    """Runs trio coroutines for code on the gateway's asyncio loop.

    `call` starts ``fn(*args)`` as a task of the gateway's trio nursery and awaits its
    result on the asyncio side. Cancelling the awaiting asyncio task cancels the trio task;
    an exception of the trio task is raised to the caller; a task cancelled because the
    gateway stops raises GatewayStopping.
    """

    def __init__(
        self,
        token: trio.lowlevel.TrioToken,
        nursery: trio.Nursery,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._token = token
        self._nursery = nursery
        self._loop = loop

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        future: asyncio.Future[T] = self._loop.create_future()
        scopes: list[trio.CancelScope] = []
        abandoned = False

        def settle(method: Callable[..., object], *value: Any) -> None:
            if not future.done():  # on the asyncio loop: it may have been cancelled
                method(*value)

        def post(method: Callable[..., object], *value: Any) -> None:
            try:
                self._loop.call_soon_threadsafe(settle, method, *value)
            except RuntimeError:  # the asyncio loop is closed: nobody waits any more
                pass

        async def run() -> None:
            settled = False
            try:
                with trio.CancelScope() as scope:
                    scopes.append(scope)
                    if abandoned:
                        scope.cancel()
                    try:
                        result = await fn(*args)
                    except Exception as error:
                        post(future.set_exception, error)
                    else:
                        post(future.set_result, result)
                    settled = True
            finally:
                if not settled:
                    post(future.set_exception, GatewayStopping("the broker is stopping"))

        def start() -> None:  # on the trio loop
            try:
                self._nursery.start_soon(run)
            except RuntimeError:  # the nursery is closed: the gateway is stopping
                post(future.set_exception, GatewayStopping("the broker is stopping"))

        def cancel() -> None:  # on the trio loop
            nonlocal abandoned
            abandoned = True
            for scope in scopes:
                scope.cancel()

        self._token.run_sync_soon(start)
        try:
            return await future
        except asyncio.CancelledError:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(cancel)
            raise


class LogBackend:
    """What the Log service asks of the broker; runs on the trio loop (through TrioBridge).

    Raises DwalError for everything a client can cause or the broker can refuse."""

    def __init__(self, handlers: RequestHandlers) -> None:
        self._handlers = handlers
        self._limits = handlers.config.limits
        self._keyless = itertools.count()  # round-robin for records with neither key nor partition

    async def append(
        self, topic: str, partition: int | None, key: bytes | None, batch: bytes, timeout_ms: int
    ) -> tuple[int, int]:
        """Append one batch with acks=all to `partition`, or (None) to the partition the key
        picks (see ProduceRequest.partition); creates `wal` on first use. Returns (partition,
        base offset)."""
        count = await self.partition_count(topic, create=True)
        if partition is None:
            partition = (
                partition_for_key(key, count) if key is not None else next(self._keyless) % count
            )
        elif partition >= count:
            raise DwalError(
                ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                f"topic {topic!r} has no partition {partition} (it has {count})",
            )
        timeout_ms = max(1, min(timeout_ms, self._limits.grpc_append_timeout_ms))
        offset = await self._handlers.append_batch(
            topic, partition, batch, acks=ACKS_ALL, timeout_ms=timeout_ms
        )
        return partition, offset

    async def partition_count(self, topic: str, *, create: bool) -> int:
        reason = validate_topic_name(topic)
        if reason is not None:
            raise DwalError(ErrorCode.INVALID_TOPIC, f"invalid topic name: {reason}")
        handlers = self._handlers
        if create and topic == WAL_TOPIC:
            await handlers.ensure_topic(WAL_TOPIC, 1)
        elif create and handlers.config.auto_create_topics:
            await handlers.ensure_topic(topic, handlers.config.default_partitions)
        return handlers.partition_count(topic)

    async def batch_containing(self, topic: str, partition: int, offset: int) -> bytes | None:
        """The whole batch holding `offset`, or None when compaction removed the record.
        Raises DwalError OFFSET_OUT_OF_RANGE outside [log start, high watermark)."""
        await self._check_partition(topic, partition)
        try:
            return await self._handlers.read_batch_containing(topic, partition, offset)
        except DwalError as error:
            if error.code == ErrorCode.OFFSET_OUT_OF_RANGE:
                start, high_watermark = await self._handlers.readable_range(topic, partition)
                if offset >= high_watermark:
                    raise DwalError(
                        ErrorCode.OFFSET_OUT_OF_RANGE,
                        f"offset {offset} has not been written yet "
                        f"(high watermark {high_watermark})",
                    ) from None
            raise

    async def records_from(
        self, topic: str, partition: int, offset: int, limit: int, bytes_max: int
    ) -> tuple[list[Record], int, int]:
        """Up to `limit` records from `offset`, the offset to read next and the high
        watermark (no records at the high watermark; an empty `wal` log has high watermark
        0). Raises DwalError OFFSET_OUT_OF_RANGE when `offset` is outside [log start, high
        watermark]."""
        try:
            await self._check_partition(topic, partition)
        except DwalError as error:
            if topic == WAL_TOPIC and error.code == ErrorCode.OFFSET_OUT_OF_RANGE:
                check_readable(offset, 0, 0)
                return [], 0, 0  # nothing written yet
            raise
        start, high_watermark = await self._handlers.readable_range(topic, partition)
        check_readable(offset, start, high_watermark)
        records, next_offset = await read_records(
            self._handlers, topic, partition, offset, high_watermark, limit, bytes_max
        )
        return records, next_offset, high_watermark

    async def prepare_follow(self, topic: str, partition: int) -> None:
        """Check that a stream can follow `topic`/`partition` (creating `wal` if needed)."""
        count = await self.partition_count(topic, create=topic == WAL_TOPIC)
        if partition >= count:
            raise DwalError(
                ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                f"topic {topic!r} has no partition {partition} (it has {count})",
            )

    async def follow(
        self, topic: str, partition: int, offset: int, max_bytes: int, wait_ms: int
    ) -> bytes:
        """Batches from `offset`, waiting up to `wait_ms` for them (b"" if none came)."""
        return await self._handlers.follow_batches(topic, partition, offset, max_bytes, wait_ms)

    async def _check_partition(self, topic: str, partition: int) -> None:
        try:
            count = await self.partition_count(topic, create=False)
        except DwalError as error:
            if topic == WAL_TOPIC and error.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION:
                raise DwalError(
                    ErrorCode.OFFSET_OUT_OF_RANGE, "nothing has been written yet: the log is empty"
                ) from None
            raise
        if partition >= count:
            raise DwalError(
                ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                f"topic {topic!r} has no partition {partition} (it has {count})",
            )


class GrpcGateway:
    """The running gateway (see the module docstring); made by `open_grpc_gateway`."""

    def __init__(self, config: BrokerConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self.port = 0  # bound port, once bound
        self._nursery = nursery
        self._token = trio.lowlevel.current_trio_token()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serve_requested: asyncio.Future[RequestHandlers] | None = None
        self._stop_requested: asyncio.Event | None = None
        self._served = trio.Event()
        self._server_stopped = trio.Event()  # the server stopped, or never started
        self._serve_error: BaseException | None = None
        self._stopping = False  # set by trio before it reads _loop; read by the thread after
        # it sets _loop: one of the two sees the other's write

    async def serve(self, handlers: RequestHandlers, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Add the services and serve with `handlers` until cancelled; started once the
        server accepts calls. Cancelled, it stops the server (calls still running get
        STOP_GRACE_SECONDS, streams following a log end at once) before it returns, so no
        call reaches `handlers` after it."""
        loop, requested = self._loop, self._serve_requested
        assert loop is not None and requested is not None
        loop.call_soon_threadsafe(
            lambda: None if requested.done() else requested.set_result(handlers)
        )
        try:
            await self._served.wait()
            if self._serve_error is not None:
                raise self._serve_error
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._request_stop()
            with trio.CancelScope(shield=True):
                await self._server_stopped.wait()

    def _request_stop(self) -> None:
        self._stopping = True
        loop, stop = self._loop, self._stop_requested
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(stop.set)

    # -- the gateway thread ---------------------------------------------------------------

    async def _run_thread(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the gateway thread: started once the port is bound; returns when the thread
        has ended (it cannot be cancelled: leaving `open_grpc_gateway` asks it to stop)."""

        def bound() -> None:
            with contextlib.suppress(RuntimeError):  # the start was cancelled meanwhile
                task_status.started()

        try:
            await trio.to_thread.run_sync(self._thread_main, bound)
        finally:
            self._served.set()
            self._server_stopped.set()

    def _thread_main(self, bound: Callable[[], None]) -> None:
        asyncio.run(self._serve_on_loop(bound))

    async def _serve_on_loop(self, bound: Callable[[], None]) -> None:
        # gRPC core's own log lines go to stderr in another format; the broker reports what
        # matters itself (set GRPC_VERBOSITY=ERROR or DEBUG to see them). Read when grpc is
        # first imported.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from grpc_health.v1._async import HealthServicer
        from grpc_reflection.v1alpha import reflection

        from broker.gateway.grpc_log_service import LogServicer
        from protocol.grpc_api import log_pb2, log_pb2_grpc

        loop = asyncio.get_running_loop()
        self._serve_requested = loop.create_future()
        self._stop_requested = asyncio.Event()
        self._loop = loop
        if self._stopping:
            return
        limits = self.config.limits
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limits.grpc_message_bytes_max),
                ("grpc.max_send_message_length", limits.grpc_message_bytes_max),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not shared
            ],
            maximum_concurrent_rpcs=limits.grpc_concurrent_rpcs_max,
        )
        host, port = self.config.grpc_bind_host, self.config.grpc_port
        try:
            self.port = server.add_insecure_port(f"{_host_for_grpc(host)}:{port}")
        except RuntimeError:
            raise _bind_error(host, port) from None
        self._token.run_sync_soon(bound)
        try:
            waiter = asyncio.ensure_future(self._stop_requested.wait())
            requested: asyncio.Future[Any] = self._serve_requested
            await asyncio.wait([waiter, requested], return_when=asyncio.FIRST_COMPLETED)
            if not self._serve_requested.done():
                return  # stopped before serving
            waiter.cancel()
            handlers = self._serve_requested.result()
            bridge = TrioBridge(self._token, self._nursery, loop)
            servicer = LogServicer(bridge, LogBackend(handlers), limits)
            health = HealthServicer()
            log_pb2_grpc.add_LogServicer_to_server(servicer, server)
            health_pb2_grpc.add_HealthServicer_to_server(health, server)
            service_names = (
                log_pb2.DESCRIPTOR.services_by_name["Log"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(service_names, server)
            await server.start()
            serving = health_pb2.HealthCheckResponse.SERVING
            await health.set("", serving)
            await health.set(service_names[0], serving)
        except BaseException as error:
            self._serve_error = error
            raise
        finally:
            self._token.run_sync_soon(self._served.set)
        try:
            await self._stop_requested.wait()
        finally:
            try:
                await health.enter_graceful_shutdown()
                servicer.stop_streams()  # followers end with UNAVAILABLE now
                await server.stop(STOP_GRACE_SECONDS)
            finally:
                self._token.run_sync_soon(self._server_stopped.set)


def _bind_error(host: str, port: int) -> OSError:
    """grpcio says only "Failed to bind": binding the address here gives the OS's reason,
    in the words the other listeners use ("cannot listen on HOST:PORT: REASON")."""
    reason: OSError | None = None
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            with socket.socket(family, kind, proto) as probe:
                probe.bind(address)
    except OSError as error:
        reason = error
    if reason is None or reason.errno is None:
        return OSError(f"cannot listen on {host}:{port} (gRPC): grpcio could not bind it")
    return OSError(reason.errno, f"cannot listen on {host}:{port}: {reason.strerror}")


def _host_for_grpc(host: str) -> str:
    """An address grpcio can bind: IPv6 literals in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@contextlib.asynccontextmanager
async def open_grpc_gateway(config: BrokerConfig) -> AsyncIterator[GrpcGateway | None]:
    """Bind the gRPC port (None when `config.grpc_port` is -1); `serve` starts it. Leaving
    the block stops the server and its thread. Raises OSError when the port cannot be bound.
    """
    if config.grpc_port < 0:
        yield None
        return
    async with trio.open_nursery() as nursery:
        gateway = GrpcGateway(config, nursery)
        try:
            await nursery.start(gateway._run_thread)
            yield gateway
        finally:
            gateway._request_stop()
            # The thread ends once the server has stopped (the nursery waits for it); calls
            # into trio still running meanwhile are cancelled with the nursery.
            nursery.cancel_scope.cancel()
