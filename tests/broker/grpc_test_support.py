"""A blocking grpcio client of a broker's `log.v1.Log`, for trio tests.

grpcio's sync client blocks, so every call runs in a worker thread (`trio.to_thread`), bounded
by a gRPC deadline and by `trio.fail_after`; a thread still blocked when the test gives up is
abandoned, and closing the channel (leaving `LogClient`'s block) ends its call. No call ever
blocks the trio loop and nothing waits by sleeping: a test waits for an answer or for the
next item of a stream.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc
import trio

from protocol.grpc_api import log_pb2, log_pb2_grpc

T = TypeVar("T")

WAIT_S = 15  # the longest a test waits for one answer or one stream item


def record(
    value: bytes,
    *,
    key: bytes | None = None,
    timestamp: int = 0,
    headers: Sequence[tuple[str, bytes]] = (),
) -> log_pb2.Record:
    """A Record message; `key` None leaves the key absent (not empty)."""
    message = log_pb2.Record(value=value, timestamp=timestamp)
    if key is not None:
        message.key = key
    for name, header_value in headers:
        message.headers.add(key=name, value=header_value)
    return message


def produce_request(value: bytes, **fields: Any) -> log_pb2.ProduceRequest:
    """A ProduceRequest of one record with `value` (`key`, `timestamp`, `headers` for it;
    the other fields for the request)."""
    record_fields = {
        name: fields.pop(name) for name in ("key", "timestamp", "headers") if name in fields
    }
    return log_pb2.ProduceRequest(record=record(value, **record_fields), **fields)


async def in_thread(fn: Callable[[], T], timeout_s: float = WAIT_S) -> T:
    """`fn()` in a worker thread; fails (abandoning the thread) after `timeout_s` plus a
    margin (`fn` is expected to bound itself with a gRPC deadline of `timeout_s`)."""
    with trio.fail_after(timeout_s + 5):
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


def messages_records(responses: Iterable[log_pb2.ConsumeResponse]) -> list[log_pb2.Record]:
    """The records of ConsumeResponses, in order (`record`, or `records`)."""
    found: list[log_pb2.Record] = []
    for response in responses:
        if response.HasField("record"):
            assert not response.records, response
            found.append(response.record)
        else:
            found.extend(response.records)
    return found


class LogClient:
    """A channel to one broker's gRPC port and its Log stub. Use as a context manager:
    leaving it cancels the open streams and closes the channel."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = log_pb2_grpc.LogStub(self.channel)
        self._streams: list[ConsumeStream] = []

    def __enter__(self) -> LogClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for stream in self._streams:
            stream.cancel()
        self.channel.close()

    async def produce(
        self, request: log_pb2.ProduceRequest, *, timeout_s: float = WAIT_S
    ) -> log_pb2.ProduceResponse:
        return await in_thread(
            functools.partial(self.stub.Produce, request, timeout=timeout_s), timeout_s
        )

    async def produce_value(self, value: bytes, **fields: Any) -> log_pb2.ProduceResponse:
        return await self.produce(produce_request(value, **fields))

    async def consume(self, *, timeout_s: float = WAIT_S, **fields: Any) -> log_pb2.ConsumeResponse:
        request = log_pb2.ConsumeRequest(**fields)
        return await in_thread(
            functools.partial(self.stub.Consume, request, timeout=timeout_s), timeout_s
        )

    async def consume_records(self, offset: int, count: int, **fields: Any) -> list[log_pb2.Record]:
        """The `count` records from `offset` on, through Consume with `max_records`."""
        found: list[log_pb2.Record] = []
        while len(found) < count:
            response = await self.consume(
                offset=offset + len(found), max_records=count - len(found), **fields
            )
            assert response.records, response
            found.extend(response.records)
        assert [r.offset for r in found] == list(range(offset, offset + count)), found
        return found

    async def error_of(
        self, method: str, request: Any, *, timeout_s: float = WAIT_S
    ) -> grpc.RpcError:
        """The error a unary call (`method`: "Produce" or "Consume") ends with; fails when
        it succeeds."""
        call = getattr(self.stub, method)

        def run() -> grpc.RpcError:
            try:
                response = call(request, timeout=timeout_s)
            except grpc.RpcError as error:
                return error
            raise AssertionError(f"{method} succeeded: {response}")

        return await in_thread(run, timeout_s)

    async def produce_stream(
        self, requests: Iterable[log_pb2.ProduceRequest], *, timeout_s: float = WAIT_S
    ) -> tuple[list[log_pb2.ProduceResponse], grpc.RpcError | None]:
        """Send `requests` on one ProduceStream; the answers, and the error it ended with
        (None when it ended OK)."""

        def run() -> tuple[list[log_pb2.ProduceResponse], grpc.RpcError | None]:
            answers: list[log_pb2.ProduceResponse] = []
            try:
                for answer in self.stub.ProduceStream(iter(requests), timeout=timeout_s):
                    answers.append(answer)
            except grpc.RpcError as error:
                return answers, error
            return answers, None

        return await in_thread(run, timeout_s)

    def consume_stream(self, *, timeout_s: float | None = None, **fields: Any) -> ConsumeStream:
        """Open a ConsumeStream (`timeout_s`: its deadline, none by default)."""
        call = self.stub.ConsumeStream(log_pb2.ConsumeRequest(**fields), timeout=timeout_s)
        stream = ConsumeStream(call)
        self._streams.append(stream)
        return stream


_END = object()


class ConsumeStream:
    """An open ConsumeStream; `next` and `records` wait for what it sends."""

    def __init__(self, call: Any) -> None:
        self.call = call  # a grpc.Call and an iterator of ConsumeResponse
        self._pending: list[log_pb2.Record] = []  # received, not yet returned by `records`

    async def next(self, timeout_s: float = WAIT_S) -> log_pb2.ConsumeResponse | None:
        """The next response; None when the stream ended OK; raises grpc.RpcError when it
        ended with an error."""
        with trio.fail_after(timeout_s):
            item = await trio.to_thread.run_sync(next, self.call, _END, abandon_on_cancel=True)
        return None if item is _END else item

    async def records(self, count: int, timeout_s: float = WAIT_S) -> list[log_pb2.Record]:
        """The next `count` records (reading responses until they came)."""
        with trio.fail_after(timeout_s):
            while len(self._pending) < count:
                response = await self.next(timeout_s)
                assert response is not None, "the stream ended"
                self._pending.extend(messages_records([response]))
        found, self._pending = self._pending[:count], self._pending[count:]
        return found

    async def error(self, timeout_s: float = WAIT_S) -> grpc.RpcError:
        """The error the stream ends with; fails if it sends anything more first."""
        assert not self._pending, self._pending
        try:
            response = await self.next(timeout_s)
        except grpc.RpcError as error:
            return error
        raise AssertionError(f"the stream did not end with an error: it sent {response}")

    def cancel(self) -> None:
        self.call.cancel()
