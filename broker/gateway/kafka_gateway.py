"""The Kafka listener: Kafka's wire protocol, so Kafka's own clients (the Java client,
librdkafka and confluent-kafka, kafka-python, aiokafka, kcat) work against DWAL unchanged.

Theory of operation. Each connection runs a reader and a writer task in its own nursery, as
the native listener does (`broker.server`). The reader takes a frame (a 4-byte length, then
the request: header and body), reserves its bytes in the memory pool shared with the other
listeners, decodes it with kio (messages generated from Kafka's own schemas), puts a
`_Pending` answer slot into a bounded channel in request order, and runs the API's handler:

- in the reader itself for requests whose effects are ordered (admin, commits, the appends
  of a Produce), so a request sees the effects of every earlier one on its connection and
  the pipelined batches of an idempotent producer append in the order they were sent;
- in a task for the waiting parts: a Produce's wait for fsync and the in-sync replicas (its
  handler returns `Later`), and the APIs marked `concurrent` (Fetch's long poll, a JoinGroup
  or SyncGroup waiting for the other members).

The writer takes the slots in order, waits for each to be filled, encodes the response and
sends it, so answers leave in request order as Kafka's clients require. At most
`inflight_requests_max` requests per connection are in flight: when the channel is full the
reader stops reading and TCP pushes back on the client.

Versions. ApiVersions advertises, per API, the range its module answers (the versions kio
has schemas for, as far as DWAL implements their fields). A request at another version of a
known API gets an answer whose error codes say UNSUPPORTED_VERSION, written in that version's
schema when kio has it and otherwise in the nearest one's (Produce v0-2 and Fetch v0-3,
which kio lacks and whose answers have no top-level error code, are answered in their own
layout, written by hand, with the code on every partition they name); an ApiVersions
request at an unknown version gets the v0 answer with UNSUPPORTED_VERSION and the full list,
as Kafka's brokers answer it, so the client retries at a version both know. ApiVersions
answers always carry the v0 response header, whatever their version (KIP-511: the client
cannot know the header version before it knows the versions). An unknown API key or a
frame that does not decode ends the connection after a log line: no answer could be parsed
by the client.
"""

from __future__ import annotations

import io
import itertools
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from kio.index import load_request_schema, load_response_schema
from kio.schema.errors import ErrorCode as KafkaErrorCode
from kio.serial import entity_reader, entity_writer

from broker.event_log import log_event
from broker.gateway import kafka_admin_apis, kafka_apis, kafka_group_apis
from broker.gateway.kafka_entities import (
    KafkaApi,
    KafkaContext,
    Later,
    element,
    error_of,
    has_field,
    make,
)
from broker.memory_pool import MemoryPool
from broker.request_handlers import RequestHandlers

logger = logging.getLogger("dwal.kafka")

API_VERSIONS_KEY = 18
_connection_ids = itertools.count(1)
_SIZE = struct.Struct(">i")
_KEY_AND_VERSION = struct.Struct(">hhi")  # api key, api version, correlation id


def _api_versions_apis() -> list[KafkaApi]:
    return [KafkaApi(API_VERSIONS_KEY, 0, 4, _api_versions)]


def _gather_apis() -> dict[int, KafkaApi]:
    table: dict[int, KafkaApi] = {}
    for api in (
        *_api_versions_apis(),
        *kafka_apis.APIS,
        *kafka_admin_apis.APIS,
        *kafka_group_apis.APIS,
    ):
        if api.api_key in table:
            raise RuntimeError(f"Kafka API {api.api_key} is answered twice")
        table[api.api_key] = api
    return table


class KafkaProtocolError(Exception):
    """A frame that cannot be decoded: the connection ends."""


def _read_request_header(frame: memoryview) -> tuple[int, int, int]:
    if len(frame) < _KEY_AND_VERSION.size:
        raise KafkaProtocolError(f"a request of {len(frame)} bytes has no header")
    return _KEY_AND_VERSION.unpack_from(frame, 0)


def _header_types(request: Any) -> tuple[type, bool]:
    """The request header schema of a request type, and whether its answer's header is the
    flexible one (v1, with tagged fields)."""
    return request.__header_schema__, bool(request.__flexible__)


@dataclass
class _Pending:
    api_key: int
    version: int
    correlation_id: int
    frame_bytes: int
    done: trio.Event = field(default_factory=trio.Event)
    response: Any = None
    send: bool = True  # False: acks=0 Produce, no answer is expected
    header_flexible: bool = False


class KafkaServer:
    def __init__(self, handlers: RequestHandlers, *, memory_pool: MemoryPool | None = None):
        self.handlers = handlers
        self.limits = handlers.config.limits
        self.memory_pool = memory_pool or MemoryPool(self.limits.queued_request_bytes_max)
        self.apis = _gather_apis()
        self.connections = 0

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await trio.serve_listeners(self.handle_connection, listeners, task_status=task_status)

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        connection_id = next(_connection_ids)
        peer = _peer_of(stream)
        if self.connections >= self.limits.connections_max:
            log_event(logger, logging.WARNING, "kafka_connection_refused", peer=peer)
            await stream.aclose()
            return
        self.connections += 1
        try:
            send, receive = trio.open_memory_channel[_Pending](self.limits.inflight_requests_max)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_responses, stream, receive, nursery.cancel_scope)
                try:
                    async with send:
                        await self._read_requests(stream, send, nursery, peer)
                except KafkaProtocolError as error:
                    log_event(
                        logger, logging.WARNING, "kafka_bad_frame", peer=peer, error=str(error)
                    )
                    nursery.cancel_scope.cancel()
                except trio.TooSlowError:
                    log_event(logger, logging.WARNING, "kafka_request_read_timeout", peer=peer)
                    nursery.cancel_scope.cancel()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    nursery.cancel_scope.cancel()
        finally:
            self.connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()
            log_event(logger, logging.DEBUG, "kafka_connection_closed", id=connection_id)

    async def _read_requests(
        self,
        stream: trio.SocketStream,
        send: trio.MemorySendChannel[_Pending],
        nursery: trio.Nursery,
        peer: str,
    ) -> None:
        buffer = bytearray()
        client_host = peer.rsplit(":", 1)[0]
        idle_s = self.limits.connections_idle_ms_max / 1000
        read_s = self.limits.request_read_timeout_ms / 1000
        while True:
            with trio.move_on_after(idle_s) as idle:
                head = await _receive_exactly(stream, buffer, 4, None)
            if idle.cancelled_caught:
                log_event(logger, logging.DEBUG, "kafka_connection_idle", peer=peer)
                return
            if head is None:
                return  # the client closed the connection
            (size,) = _SIZE.unpack(head)
            if size < _KEY_AND_VERSION.size or size > self.limits.frame_bytes_max:
                log_event(
                    logger,
                    logging.WARNING,
                    "kafka_bad_frame",
                    peer=peer,
                    error=f"frame of {size} bytes (at most {self.limits.frame_bytes_max})",
                )
                return
            await self.memory_pool.reserve(size)
            try:
                with trio.fail_after(read_s):
                    frame = await _receive_exactly(stream, buffer, size, None)
                if frame is None:
                    return
                await self._dispatch(memoryview(frame), size, send, nursery, client_host, peer)
            finally:
                self.memory_pool.release(size)

    async def _dispatch(
        self,
        frame: memoryview,
        size: int,
        send: trio.MemorySendChannel[_Pending],
        nursery: trio.Nursery,
        client_host: str,
        peer: str,
    ) -> None:
        api_key, version, correlation_id = _read_request_header(frame)
        api = self.apis.get(api_key)
        if api is None:
            raise KafkaProtocolError(f"unknown Kafka API key {api_key} (version {version})")
        pending = _Pending(api_key, version, correlation_id, size)
        request_type: Any = None
        if api.min_version <= version <= api.max_version:
            try:
                request_type = load_request_schema(api_key, version)
            except Exception:  # advertised for old clients' sake, not served (Produce v0-2)
                request_type = None
        if request_type is None:
            pending.header_flexible = _response_flexible(api_key, version)
            pending.response = _legacy_unsupported_answer(api_key, version, frame)
            if pending.response is None:
                pending.response = _unsupported_version_response(self.apis, api_key, version, api)
            pending.done.set()
            await send.send(pending)
            log_event(
                logger,
                logging.INFO,
                "kafka_unsupported_version",
                peer=peer,
                api_key=api_key,
                version=version,
            )
            return
        header_type, flexible = _header_types(request_type)
        pending.header_flexible = flexible and api_key != API_VERSIONS_KEY
        try:
            header: Any
            # kio's readers return the entity and the number of bytes it took
            header, header_bytes = entity_reader(header_type)(frame, 0)
            request, body_bytes = entity_reader(request_type)(frame, header_bytes)
            end = header_bytes + body_bytes
        except Exception as error:  # kio raises several types on malformed input
            raise KafkaProtocolError(
                f"API {api_key} v{version} request does not decode: {error}"
            ) from None
        if end != len(frame):
            # Kafka's brokers ignore bytes after a request's fields, and clients rely on it:
            # librdkafka's Metadata v12 carries 3 more (a stray tagged-field section).
            log_event(
                logger,
                logging.DEBUG,
                "kafka_request_trailing_bytes",
                peer=peer,
                api_key=api_key,
                version=version,
                bytes=len(frame) - end,
            )
        context = KafkaContext(
            self.handlers,
            api_key=api_key,
            api_version=version,
            client_id=header.client_id or "",
            client_host=client_host,
        )
        await send.send(pending)  # its place in the answer order, before any effect
        if api.concurrent:
            nursery.start_soon(self._complete, api, context, request, pending)
            return
        try:
            result = await api.handle(context, request)
        except Exception as error:
            _fail(pending, context, error)
            return
        if isinstance(result, Later):
            pending.send = result.send
            nursery.start_soon(self._finish_later, result.finish, context, pending)
            return
        pending.response = result
        pending.done.set()

    async def _complete(
        self, api: KafkaApi, context: KafkaContext, request: Any, pending: _Pending
    ) -> None:
        try:
            pending.response = await api.handle(context, request)
        except Exception as error:
            _fail(pending, context, error)
            return
        pending.done.set()

    async def _finish_later(
        self, finish: Callable[[], Awaitable[Any]], context: KafkaContext, pending: _Pending
    ) -> None:
        try:
            pending.response = await finish()
        except Exception as error:
            _fail(pending, context, error)
            return
        pending.done.set()

    async def _write_responses(
        self,
        stream: trio.SocketStream,
        receive: trio.MemoryReceiveChannel[_Pending],
        cancel_scope: trio.CancelScope,
    ) -> None:
        try:
            async with receive:
                async for pending in receive:
                    await pending.done.wait()
                    if not pending.send:
                        continue
                    await stream.send_all(_encode_response(pending))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            cancel_scope.cancel()


def _fail(pending: _Pending, context: KafkaContext, error: Exception) -> None:
    code, message = error_of(error)
    if code == KafkaErrorCode.unknown_server_error:
        logger.exception(
            "Kafka API %s v%s failed", context.api_key, context.api_version, exc_info=error
        )
    pending.response = error_response(context.response_type, code, message)
    pending.done.set()


def error_response(response_type: type, code: KafkaErrorCode, message: str | None) -> Any:
    """An answer whose every top-level error code says `code` (the entries it would list
    are left out): what an API can say when its handler failed as a whole."""
    values: dict[str, Any] = {"error_code": code, "error_message": message}
    return make(response_type, **values)


def _response_flexible(api_key: int, version: int) -> bool:
    if api_key == API_VERSIONS_KEY:
        return False
    try:
        return bool(load_request_schema(api_key, version).__flexible__)
    except Exception:  # a version kio has no schema for: Kafka's rule, flexible from v9+...
        return False


def _nearest_response_type(api_key: int, version: int, api: KafkaApi) -> type:
    """The response schema of `version`, else of the closest version kio has (older
    versions' layouts are mostly prefixes of newer ones: Produce v2's is v3's)."""
    for distance in range(0, 64):
        for candidate in (version + distance, version - distance):
            if candidate < 0:
                continue
            try:
                return load_response_schema(api_key, candidate)
            except Exception:
                continue
    return load_response_schema(api_key, api.max_version)


def _unsupported_version_response(
    apis: dict[int, KafkaApi], api_key: int, version: int, api: KafkaApi
) -> Any:
    message = f"API {api_key} supports versions {api.min_version}-{api.max_version}, not {version}"
    if api_key == API_VERSIONS_KEY:
        return api_versions_response(
            load_response_schema(API_VERSIONS_KEY, 0), apis, KafkaErrorCode.unsupported_version
        )
    return error_response(
        _nearest_response_type(api_key, version, api), KafkaErrorCode.unsupported_version, message
    )


# Produce v0-2 and Fetch v0-3 predate kio's schemas (Kafka 4 dropped them). Their answers
# carry error codes only per partition, so an UNSUPPORTED_VERSION answer must name the
# request's partitions, in the layout of the request's version: read and written by hand.
_PRODUCE_KEY, _FETCH_KEY = 0, 1
_LEGACY_VERSION_MAX = {_PRODUCE_KEY: 2, _FETCH_KEY: 3}


class _LegacyReader:
    """Reads a legacy request's fields; struct.error or ValueError past the end or on a
    null name. Every entry takes bytes, so no count can make it loop past the frame."""

    def __init__(self, frame: memoryview, position: int) -> None:
        self.frame = frame
        self.position = position

    def take(self, layout: str) -> tuple[int, ...]:
        values = struct.unpack_from(layout, self.frame, self.position)
        self.position += struct.calcsize(layout)
        return values

    def name(self) -> bytes:
        (length,) = self.take(">h")
        if length < 0 or self.position + length > len(self.frame):
            raise ValueError("a null or cut name")
        self.position += length
        return bytes(self.frame[self.position - length : self.position])


def _legacy_partitions(
    api_key: int, version: int, frame: memoryview
) -> list[tuple[bytes, list[int]]]:
    """(topic, partitions) of a Produce v0-2 or Fetch v0-3 request (header v1). Raises
    struct.error or ValueError when they do not parse."""
    reader = _LegacyReader(frame, _KEY_AND_VERSION.size)
    (client_id_length,) = reader.take(">h")
    reader.position += max(client_id_length, 0)
    if api_key == _PRODUCE_KEY:
        reader.take(">hi")  # acks, timeout
    else:
        reader.take(">iiii" if version == 3 else ">iii")  # replica, wait, min (max) bytes
    topics = []
    (topic_count,) = reader.take(">i")
    for _ in range(topic_count):
        name = reader.name()
        partitions = []
        (partition_count,) = reader.take(">i")
        for _ in range(partition_count):
            if api_key == _PRODUCE_KEY:
                partition, records_bytes = reader.take(">ii")
                reader.position += max(records_bytes, 0)
            else:
                partition, _offset, _max_bytes = reader.take(">iqi")
            partitions.append(partition)
        topics.append((name, partitions))
    if reader.position > len(frame):
        raise ValueError("the request ends within a field")
    return topics


def _legacy_unsupported_answer(api_key: int, version: int, frame: memoryview) -> bytes | None:
    """The body of the UNSUPPORTED_VERSION answer to a Produce v0-2 or Fetch v0-3 request,
    in that version's layout, every partition it names with the code; None for any other
    request or one whose partitions do not parse (it gets the nearest schema's answer)."""
    if version > _LEGACY_VERSION_MAX.get(api_key, -1):
        return None
    try:
        topics = _legacy_partitions(api_key, version, frame)
    except (struct.error, ValueError):
        return None
    code = int(KafkaErrorCode.unsupported_version)
    out = bytearray()
    if api_key == _FETCH_KEY and version >= 1:
        out += struct.pack(">i", 0)  # throttle time first
    out += struct.pack(">i", len(topics))
    for name, partitions in topics:
        out += struct.pack(">h", len(name)) + name + struct.pack(">i", len(partitions))
        for partition in partitions:
            if api_key == _FETCH_KEY:  # high watermark -1, no records
                out += struct.pack(">ihqi", partition, code, -1, 0)
            else:  # base offset -1 (v2: log append time -1)
                out += struct.pack(">ihq", partition, code, -1)
                out += struct.pack(">q", -1) if version == 2 else b""
    if api_key == _PRODUCE_KEY and version >= 1:
        out += struct.pack(">i", 0)  # throttle time last
    return bytes(out)


def api_versions_response(
    response_type: type, apis: dict[int, KafkaApi], code: KafkaErrorCode = KafkaErrorCode.none
) -> Any:
    version_type = element(response_type, "api_keys")
    keys = tuple(
        make(
            version_type,
            api_key=api.api_key,
            min_version=api.min_version,
            max_version=api.max_version,
        )
        for api in sorted(apis.values(), key=lambda api: api.api_key)
    )
    return make(response_type, error_code=code, api_keys=keys)


async def _api_versions(context: KafkaContext, request: Any) -> Any:
    return api_versions_response(context.response_type, _gather_apis())


def _encode_response(pending: _Pending) -> bytes:
    out = io.BytesIO()
    out.write(b"\0\0\0\0")
    out.write(struct.pack(">i", pending.correlation_id))
    if pending.header_flexible:
        out.write(b"\0")  # no tagged fields in the response header
    response = pending.response
    if isinstance(response, bytes):  # written by hand (_legacy_unsupported_answer)
        out.write(response)
    else:
        entity_writer(type(response))(out, response)
    data = out.getbuffer()
    _SIZE.pack_into(data, 0, len(data) - 4)
    return bytes(data)


async def _receive_exactly(
    stream: trio.SocketStream, buffer: bytearray, count: int, _unused: Any
) -> bytes | None:
    """`count` bytes from the stream (bytes already received beyond them stay in `buffer`);
    None when the peer closed the connection between frames. Raises KafkaProtocolError when
    it closed within one."""
    while len(buffer) < count:
        data = await stream.receive_some(max(65536, count - len(buffer)))
        if not data:
            if buffer:
                raise KafkaProtocolError("the connection closed within a frame")
            return None
        buffer += data
    taken = bytes(buffer[:count])
    del buffer[:count]
    return taken


def _peer_of(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"{host}:{port}"


async def serve_kafka(
    handlers: RequestHandlers,
    listeners: list[trio.SocketListener],
    *,
    memory_pool: MemoryPool | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve Kafka's wire protocol for `handlers` on `listeners` until cancelled."""
    server = KafkaServer(handlers, memory_pool=memory_pool)
    await server.serve(listeners, task_status=task_status)


__all__ = ["KafkaServer", "error_response", "has_field", "serve_kafka"]
