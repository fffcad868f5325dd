"""The `log.v1.Log` gRPC service (api/v1/log.proto), on the gRPC gateway's asyncio loop.

Theory of operation. Each RPC checks its request (`parse_produce_request`,
`parse_consume_request`: pure, raising `BadRequest`), encodes or decodes record batches on
the gateway thread, and asks the broker through `TrioBridge.call(LogBackend method)` (see
`broker.gateway.grpc_gateway`). Errors end the call with the gRPC status a gRPC user expects
(`grpc_status_of`: OFFSET_OUT_OF_RANGE -> OUT_OF_RANGE, bad input -> INVALID_ARGUMENT, not
enough replicas -> UNAVAILABLE, ...) and a message saying what happened.

- **ProduceStream** keeps order and group-commits: a reader task queues requests (at most
  `limits.grpc_stream_requests_queued_max`); the writer takes every queued request bound for
  the same place and appends their records as one batch, then answers each in order. While
  one append waits for its replicas, the next requests gather. The first request that fails
  ends the stream with its status; every request before it was answered, none after it was
  appended.
- **ConsumeStream** follows the log: it reads batches from its position with a long poll
  (`follow_batches`), sends their records (one per response, or up to `max_records`), and
  reads on. It ends when the client cancels or, with UNAVAILABLE, when the broker stops.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import grpc

from broker.gateway.grpc_gateway import WAL_TOPIC, GatewayStopping
from broker.gateway.record_reader import batches_end_offset
from protocol import DwalError, ErrorCode, ProtocolError, Record, build_batch, decode_records
from protocol.grpc_api import log_pb2, log_pb2_grpc

if TYPE_CHECKING:
    from broker.gateway.grpc_gateway import LogBackend, TrioBridge
    from broker.limits import Limits

# A ConsumeStream reads this much of the log at a time, and waits this long for new records
# before it looks again (it is woken at once when records come).
FOLLOW_READ_BYTES = 1024 * 1024
FOLLOW_WAIT_MS = 1_000
# A response with several records holds at most about this many bytes: well below a gRPC
# client's default receive limit (4 MiB).
RESPONSE_BYTES = 1024 * 1024
RECORD_OVERHEAD_BYTES = 32  # what a Record message adds to its key, value and headers
# ProduceStream requests are grouped into one batch up to this many bytes of keys and values
# (below the default max.message.bytes, 1 MiB; a group refused as too large for a topic that
# sets less is appended request by request).
BATCH_BYTES = 512 * 1024

_INVALID_ARGUMENT = frozenset(
    {
        ErrorCode.INVALID_TOPIC,
        ErrorCode.INVALID_REQUEST,
        ErrorCode.INVALID_RECORD,
        ErrorCode.INVALID_TIMESTAMP,
        ErrorCode.MESSAGE_TOO_LARGE,
        ErrorCode.RECORD_LIST_TOO_LARGE,
        ErrorCode.POLICY_VIOLATION,
        ErrorCode.UNSUPPORTED_COMPRESSION_TYPE,
        ErrorCode.CORRUPT_MESSAGE,  # in a request; a damaged stored batch is DATA_LOSS
    }
)
_TOO_LARGE = frozenset({ErrorCode.MESSAGE_TOO_LARGE, ErrorCode.RECORD_LIST_TOO_LARGE})


def grpc_status_of(code: ErrorCode, *, stored: bool = False) -> grpc.StatusCode:
    """The gRPC status for a broker error `code`. `stored`: the error is about data read
    from the log (a CORRUPT_MESSAGE there is DATA_LOSS, not the client's fault)."""
    if code == ErrorCode.OFFSET_OUT_OF_RANGE:
        return grpc.StatusCode.OUT_OF_RANGE
    if code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION:
        return grpc.StatusCode.NOT_FOUND
    if code == ErrorCode.CORRUPT_MESSAGE and stored:
        return grpc.StatusCode.DATA_LOSS
    if code in _INVALID_ARGUMENT or code.name.startswith("INVALID_"):
        return grpc.StatusCode.INVALID_ARGUMENT
    if code == ErrorCode.REQUEST_TIMED_OUT:
        # Not "unavailable": the append may have been stored (retrying may store it twice).
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if code == ErrorCode.TOPIC_ALREADY_EXISTS:
        return grpc.StatusCode.ALREADY_EXISTS
    if code.retriable:
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


class BadRequest(Exception):
    """A request the service refuses with INVALID_ARGUMENT (the message says why)."""


@dataclass(frozen=True, slots=True)
class ProduceCall:
    topic: str
    partition: int | None
    records: list[tuple[int, bytes | None, bytes, list[tuple[str, bytes]]]]
    size_bytes: int  # of keys and values

    @property
    def first_key(self) -> bytes | None:
        return self.records[0][1]

    @property
    def place(self) -> tuple[str, int | None, bytes | None]:
        """Requests with the same place may share one batch: same topic and partition, or
        (no partition) the same first key, which picks the partition."""
        return (self.topic, self.partition, None if self.partition is not None else self.first_key)


@dataclass(frozen=True, slots=True)
class ConsumeCall:
    topic: str
    partition: int
    offset: int
    max_records: int  # 0: one record per response, in `record`


def parse_produce_request(
    request: log_pb2.ProduceRequest, records_max: int, clock_ms: int
) -> ProduceCall:
    """Check a ProduceRequest; `clock_ms` stamps records without a timestamp."""
    has_record = request.HasField("record")
    if has_record and request.records:
        raise BadRequest("give either record or records, not both")
    source = [request.record] if has_record else list(request.records)
    if not source:
        raise BadRequest("a ProduceRequest needs a record (or records)")
    if len(source) > records_max:
        raise BadRequest(f"{len(source)} records in one request; at most {records_max}")
    records = []
    for index, record in enumerate(source):
        if record.timestamp < 0:
            raise BadRequest(
                f"records[{index}].timestamp must not be negative, got {record.timestamp}"
            )
        key = record.key if record.HasField("key") else None
        headers = [(header.key, header.value) for header in record.headers]
        records.append((record.timestamp or clock_ms, key, record.value, headers))
    topic = request.topic or WAL_TOPIC
    partition = request.partition if request.HasField("partition") else None
    if topic == WAL_TOPIC and partition is None:
        partition = 0
    size = sum(len(value) + len(key or b"") for _, key, value, _ in records)
    return ProduceCall(topic, partition, records, size)


def parse_consume_request(request: log_pb2.ConsumeRequest, records_max: int) -> ConsumeCall:
    return ConsumeCall(
        request.topic or WAL_TOPIC,
        request.partition,
        request.offset,
        min(request.max_records, records_max),
    )


def record_message(record: Record) -> log_pb2.Record:
    message = log_pb2.Record(
        value=record.value or b"", offset=record.offset, timestamp=record.timestamp
    )
    if record.key is not None:
        message.key = record.key
    for key, value in record.headers:
        message.headers.add(key=key, value=value)
    return message


def record_size(record: Record) -> int:
    size = RECORD_OVERHEAD_BYTES + len(record.value or b"") + len(record.key or b"")
    for key, value in record.headers:
        size += len(key) + len(value) + 8
    return size


class LogServicer(log_pb2_grpc.LogServicer):
    """The Log service; every method runs on the gateway's asyncio loop."""

    def __init__(self, bridge: TrioBridge, backend: LogBackend, limits: Limits) -> None:
        self._bridge = bridge
        self._backend = backend
        self._limits = limits
        self._stopping = asyncio.Event()
        # Records in one response with several: up to RESPONSE_BYTES, within the limit.
        self._response_bytes_max = min(RESPONSE_BYTES, limits.grpc_message_bytes_max // 2)

    def stop_streams(self) -> None:
        """End every ConsumeStream, and every ProduceStream waiting for a request, with
        UNAVAILABLE: the broker is stopping."""
        self._stopping.set()

    # -- unary --------------------------------------------------------------------------

    async def Produce(
        self, request: log_pb2.ProduceRequest, context: grpc.aio.ServicerContext
    ) -> log_pb2.ProduceResponse:
        call = await self._parse_produce(request, context)
        placed = await self._append(context, [call])
        assert placed is not None  # one request is never split
        partition, offset = placed
        return log_pb2.ProduceResponse(offset=offset, partition=partition)

    async def Consume(
        self, request: log_pb2.ConsumeRequest, context: grpc.aio.ServicerContext
    ) -> log_pb2.ConsumeResponse:
        call = parse_consume_request(request, self._limits.grpc_records_per_response_max)
        backend = self._backend
        if call.max_records:
            records, next_offset, high_watermark = await self._ask(
                context,
                backend.records_from,
                call.topic,
                call.partition,
                call.offset,
                call.max_records,
                self._response_bytes_max,
            )
            return log_pb2.ConsumeResponse(
                records=[record_message(r) for r in records],
                next_offset=next_offset,
                high_watermark=high_watermark,
            )
        batch = await self._ask(
            context, backend.batch_containing, call.topic, call.partition, call.offset
        )
        if batch is not None:
            for record in await self._decode(context, batch):
                if record.offset == call.offset:
                    return log_pb2.ConsumeResponse(record=record_message(record))
        await context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"offset {call.offset} holds no record any more (removed by compaction)",
        )
        raise AssertionError("abort raises")

    # -- streams ------------------------------------------------------------------------

    async def ProduceStream(
        self,
        request_iterator: AsyncIterator[log_pb2.ProduceRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[log_pb2.ProduceResponse]:
        queue = _RequestQueue(
            self._limits.grpc_stream_requests_queued_max, self._limits.grpc_message_bytes_max
        )
        reader = asyncio.ensure_future(self._read_requests(request_iterator, queue))
        stopping = asyncio.ensure_future(self._stopping.wait())
        answered = 0
        try:
            while True:
                if queue.empty():  # wait for a request, or for the broker to stop
                    waiting = asyncio.ensure_future(queue.wait_not_empty())
                    await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
                    if not waiting.done():
                        waiting.cancel()
                        await self._abort(
                            context,
                            grpc.StatusCode.UNAVAILABLE,
                            "the broker is stopping; the stream was idle",
                            answered,
                        )
                first = await queue.get()
                if first is None:
                    break
                if isinstance(first, BadRequest):
                    await self._abort(
                        context,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"request {answered} of the stream: {first}",
                        answered,
                    )
                group = [first, *queue.take_same_place(first, self._records_per_batch(first))]
                placed = await self._append(context, group, answered=answered)
                if placed is None:
                    # Too large together for the topic: each request alone, answered once
                    # it is stored (another writer's records may come between them).
                    for call in group:
                        placed = await self._append(context, [call], answered=answered)
                        assert placed is not None
                        yield log_pb2.ProduceResponse(offset=placed[1], partition=placed[0])
                        answered += 1
                    continue
                partition, offset = placed
                for call in group:
                    yield log_pb2.ProduceResponse(offset=offset, partition=partition)
                    offset += len(call.records)
                answered += len(group)
            await reader  # raises what reading the requests raised
        finally:
            reader.cancel()
            stopping.cancel()

    async def ConsumeStream(
        self, request: log_pb2.ConsumeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[log_pb2.ConsumeResponse]:
        call = parse_consume_request(request, self._limits.grpc_records_per_response_max)
        await self._ask(context, self._backend.prepare_follow, call.topic, call.partition)
        stopping = asyncio.ensure_future(self._stopping.wait())
        read: asyncio.Future[bytes] | None = None
        position = call.offset
        try:
            while True:
                read = asyncio.ensure_future(
                    self._bridge.call(
                        self._backend.follow,
                        call.topic,
                        call.partition,
                        position,
                        FOLLOW_READ_BYTES,
                        FOLLOW_WAIT_MS,
                    )
                )
                await asyncio.wait([read, stopping], return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the broker is stopping; resume from offset {position}",
                    )
                data = await self._settle(context, read)
                records = [r for r in await self._decode(context, data) if r.offset >= position]
                if records:
                    for response in self._consume_responses(records, call.max_records):
                        yield response
                    position = records[-1].offset + 1
                else:  # nothing, or only offsets that hold no record (compacted, control)
                    position = batches_end_offset(data, position)
        finally:
            stopping.cancel()
            if read is not None:  # the client went away during a read: end it in trio now
                read.cancel()

    def _consume_responses(
        self, records: list[Record], max_records: int
    ) -> Iterator[log_pb2.ConsumeResponse]:
        if not max_records:
            for record in records:
                yield log_pb2.ConsumeResponse(record=record_message(record))
            return
        bytes_max = self._response_bytes_max
        chunk: list[log_pb2.Record] = []
        size = 0
        for record in records:
            record_bytes = record_size(record)
            if chunk and (len(chunk) >= max_records or size + record_bytes > bytes_max):
                yield log_pb2.ConsumeResponse(records=chunk)
                chunk, size = [], 0
            chunk.append(record_message(record))
            size += record_bytes
        if chunk:
            yield log_pb2.ConsumeResponse(records=chunk)

    # -- helpers ------------------------------------------------------------------------

    async def _read_requests(
        self, request_iterator: AsyncIterator[log_pb2.ProduceRequest], queue: _RequestQueue
    ) -> None:
        try:
            async for request in request_iterator:
                try:
                    call = self._parse(request)
                except BadRequest as error:
                    await queue.put(error)
                    return
                await queue.put(call)
        finally:
            queue.close()

    def _parse(self, request: log_pb2.ProduceRequest) -> ProduceCall:
        return parse_produce_request(
            request, self._limits.grpc_records_per_response_max, int(time.time() * 1000)
        )

    async def _parse_produce(
        self, request: log_pb2.ProduceRequest, context: grpc.aio.ServicerContext
    ) -> ProduceCall:
        try:
            return self._parse(request)
        except BadRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise AssertionError("abort raises") from None

    def _records_per_batch(self, first: ProduceCall) -> int:
        return max(self._limits.grpc_records_per_response_max, len(first.records))

    async def _append(
        self, context: grpc.aio.ServicerContext, calls: list[ProduceCall], *, answered: int = -1
    ) -> tuple[int, int] | None:
        """Append the records of `calls` (same place) as one batch: (partition, offset).
        None when a group of several is too large for the topic (nothing of a refused batch
        was stored): the caller appends them one by one. Aborts the call on an error."""
        first = calls[0]
        records = [record for call in calls for record in call.records]
        timeout_ms = _timeout_ms(context, self._limits.grpc_append_timeout_ms)
        try:
            return await self._bridge.call(
                self._backend.append,
                first.topic,
                first.partition,
                first.first_key,
                build_batch(records),
                timeout_ms,
            )
        except DwalError as error:
            if error.code in _TOO_LARGE and len(calls) > 1:
                return None
            status = grpc_status_of(error.code)
            message = error.message or error.code.name
            if answered >= 0:
                message = f"request {answered} of the stream: {message}"
            await self._abort(context, status, f"{message} ({error.code.name})", answered)
        except GatewayStopping as error:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, str(error), answered)
        raise AssertionError("abort raises")

    async def _ask(self, context: grpc.aio.ServicerContext, fn, *args):  # type: ignore[no-untyped-def]
        """`fn(*args)` on the trio loop; its errors abort the call with their status."""
        return await self._settle(context, asyncio.ensure_future(self._bridge.call(fn, *args)))

    async def _settle(self, context: grpc.aio.ServicerContext, future: asyncio.Future):  # type: ignore[no-untyped-def]
        try:
            return await future
        except DwalError as error:
            status = grpc_status_of(error.code, stored=True)
            await context.abort(status, f"{error.message or error.code.name} ({error.code.name})")
        except GatewayStopping as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        raise AssertionError("abort raises")

    async def _decode(self, context: grpc.aio.ServicerContext, data: bytes) -> list[Record]:
        try:
            return list(decode_records(data, allow_partial_tail=True))
        except ProtocolError as error:
            await context.abort(
                grpc.StatusCode.DATA_LOSS, f"stored records could not be decoded: {error}"
            )
            raise AssertionError("abort raises") from None

    async def _abort(
        self,
        context: grpc.aio.ServicerContext,
        status: grpc.StatusCode,
        message: str,
        answered: int,
    ) -> NoReturn:
        if answered >= 0:
            message += f" ({answered} requests before it were appended; none after it)"
        await context.abort(status, message)
        raise AssertionError("abort raises")


def _timeout_ms(context: grpc.aio.ServicerContext, limit_ms: int) -> int:
    remaining = context.time_remaining()
    if remaining is None:
        return limit_ms
    return max(1, min(limit_ms, int(remaining * 1000)))


class _RequestQueue:
    """A ProduceStream's requests read ahead of their answers: at most `size` of them, and
    at most `bytes_max` bytes of keys and values (but always one request)."""

    def __init__(self, size: int, bytes_max: int = 4 * 1024 * 1024) -> None:
        self._items: collections.deque[ProduceCall | BadRequest | None] = collections.deque()
        self._size = size
        self._bytes_max = bytes_max
        self._bytes = 0  # of the queued requests
        self._changed = asyncio.Event()

    async def put(self, item: ProduceCall | BadRequest) -> None:
        size = item.size_bytes if isinstance(item, ProduceCall) else 0
        while len(self._items) >= self._size or (
            self._items and self._bytes + size > self._bytes_max
        ):
            await self._wait()
        self._items.append(item)
        self._bytes += size
        self._changed.set()

    def _popleft(self) -> ProduceCall | BadRequest | None:
        item = self._items.popleft()
        if isinstance(item, ProduceCall):
            self._bytes -= item.size_bytes
        return item

    def close(self) -> None:
        self._items.append(None)
        self._changed.set()

    def empty(self) -> bool:
        return not self._items

    async def wait_not_empty(self) -> None:
        while not self._items:
            await self._wait()

    async def get(self) -> ProduceCall | BadRequest | None:
        while not self._items:
            await self._wait()
        item = self._popleft()
        self._changed.set()
        return item

    def take_same_place(self, first: ProduceCall, records_max: int) -> list[ProduceCall]:
        """Queued requests right after `first` bound for its place, up to `records_max`
        records in all."""
        taken: list[ProduceCall] = []
        count = len(first.records)
        size = first.size_bytes
        while self._items:
            item = self._items[0]
            if not isinstance(item, ProduceCall) or item.place != first.place:
                break
            if count + len(item.records) > records_max or size + item.size_bytes > BATCH_BYTES:
                break
            self._popleft()
            taken.append(item)
            count += len(item.records)
            size += item.size_bytes
        if taken:
            self._changed.set()
        return taken

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()
