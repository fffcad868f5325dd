"""A scripted broker for client unit tests: a real loopback listener, no broker code.

Every request it receives is put on `requests` as a `ReceivedRequest`; the test decides
whether, when and what to answer (`answer()`), or breaks the connection (`close()`).
Metadata requests can be answered automatically (`topics`), so producers find their topics.
`pause_reading()` stops reading from every connection, which fills the socket buffers and
blocks a client mid-frame; `resume_reading()` lets it go on.

Several fake brokers can play one cluster: give them one `ClusterView` (their node ids and
each partition's leader and leader epoch), which every one of them reports in its Metadata
answers; a test moves a leader by changing the view (`FakeCluster.start` builds one).
"""

from __future__ import annotations

import socket

from dataclasses import dataclass, field
from typing import Any

import trio

from protocol import (
    ApiKey,
    ErrorCode,
    FrameDecoder,
    Request,
    parse_request,
    response_prefix,
)

FRAME_BYTES_MAX = 256 * 1024 * 1024


@dataclass
class FakeConnection:
    stream: trio.SocketStream
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    closed: bool = False

    async def send(self, data: bytes) -> None:
        async with self.send_lock:
            await self.stream.send_all(data)

    async def close(self) -> None:
        self.closed = True
        await self.stream.aclose()


@dataclass
class ReceivedRequest:
    connection: FakeConnection
    request: Request

    @property
    def api_key(self) -> ApiKey:
        return ApiKey(self.request.api_key)

    async def answer(
        self, body: dict[str, Any], error_code: ErrorCode = ErrorCode.NONE, message=None
    ) -> None:
        prefix = response_prefix(self.request.correlation_id, error_code, message, body)
        await self.connection.send(prefix)


@dataclass
class FakeTopic:
    partitions: int = 1
    max_message_bytes: int = 1024 * 1024 + 12
    segment_bytes: int = 1024 * 1024 * 1024


@dataclass
class ClusterView:
    """What the fake brokers of one cluster report: brokers by node id, and per partition
    its (leader, leader epoch); partitions not listed are led by node 0 at epoch 0."""

    brokers: dict[int, "FakeBroker"] = field(default_factory=dict)
    leaders: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)

    def move(self, topic: str, partition: int, leader: int, leader_epoch: int) -> None:
        self.leaders[(topic, partition)] = (leader, leader_epoch)


class FakeBroker:
    """Start with `await nursery.start(FakeBroker(...).serve)`; `bootstrap` is its address."""

    def __init__(
        self,
        topics: dict[str, FakeTopic] | None = None,
        *,
        node_id: int = 0,
        view: ClusterView | None = None,
    ) -> None:
        self.topics = topics or {}
        self.node_id = node_id
        self.view = view
        self.port = 0
        self.connections: list[FakeConnection] = []
        self.connected = trio.Event()  # set at each new connection (then replaced)
        self._requests_in, self.requests = trio.open_memory_channel[ReceivedRequest](10_000)
        self._reading = trio.Event()
        self._reading.set()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        # bounded receive buffers (inherited by accepted sockets): a paused broker blocks a
        # client's write after a known amount of data
        listeners[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listeners[0].accept()
                connection = FakeConnection(stream)
                self.connections.append(connection)
                self.connected.set()
                self.connected = trio.Event()
                nursery.start_soon(self._read, connection)

    def pause_reading(self) -> None:
        self._reading = trio.Event()

    def resume_reading(self) -> None:
        self._reading.set()

    async def next_request(self, *skip: ApiKey) -> ReceivedRequest:
        """The next request received whose api key is not in `skip`."""
        while True:
            received = await self.requests.receive()
            if received.api_key not in skip:
                return received

    async def _read(self, connection: FakeConnection) -> None:
        decoder = FrameDecoder(frame_bytes_max=FRAME_BYTES_MAX)
        try:
            while True:
                await self._reading.wait()
                data = await connection.stream.receive_some(1024 * 1024)
                if not data:
                    return
                decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    header, tail = frame
                    received = ReceivedRequest(connection, parse_request(header, bytes(tail)))
                    if received.api_key == ApiKey.METADATA and self.topics:
                        await received.answer(self.metadata(received.request.body))
                    self._requests_in.send_nowait(received)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def metadata(self, body: dict[str, Any]) -> dict[str, Any]:
        names = body.get("topics") or list(self.topics)
        topics = []
        for name in names:
            topic = self.topics.get(name)
            if topic is None:
                topics.append(
                    {"topic": name, "error_code": int(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION)}
                )
                continue
            partitions = []
            for p in range(topic.partitions):
                leader, epoch = (
                    self.view.leaders.get((name, p), (0, 0))
                    if self.view is not None
                    else (self.node_id, 0)
                )
                partitions.append(
                    {
                        "partition": p,
                        "leader": leader,
                        "leader_epoch": epoch,
                        "replicas": [leader],
                        "isr": [leader],
                    }
                )
            topics.append(
                {
                    "topic": name,
                    "partitions": partitions,
                    "max_message_bytes": topic.max_message_bytes,
                    "segment_bytes": topic.segment_bytes,
                }
            )
        members = self.view.brokers if self.view is not None else {self.node_id: self}
        brokers = [
            {"node_id": node_id, "host": "127.0.0.1", "port": broker.port}
            for node_id, broker in members.items()
        ]
        return {"brokers": brokers, "topics": topics}


class FakeCluster:
    """Several fake brokers (node ids 0, 1, ...) sharing one `ClusterView` and one topic
    table: `await FakeCluster.start(nursery, 3, {"t": FakeTopic(partitions=3)})`."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view

    @classmethod
    async def start(
        cls, nursery: trio.Nursery, count: int, topics: dict[str, FakeTopic]
    ) -> "FakeCluster":
        view = ClusterView()
        for node_id in range(count):
            broker = FakeBroker(topics, node_id=node_id, view=view)
            view.brokers[node_id] = broker
            await nursery.start(broker.serve)
        return cls(view)

    @property
    def brokers(self) -> dict[int, FakeBroker]:
        return self.view.brokers

    @property
    def bootstrap(self) -> str:
        return self.view.brokers[0].bootstrap


def produce_answer(request: Request, base_offset: int = 0, error_code: int = 0) -> dict:
    """A Produce answer giving every partition of `request` `error_code` (or success)."""
    topics = []
    for entry in request.body["topics"]:
        partitions = []
        for part in entry["partitions"]:
            result: dict[str, Any] = {"partition": part["partition"], "error_code": error_code}
            result["base_offset"] = base_offset if not error_code else -1
            partitions.append(result)
        topics.append({"topic": entry["topic"], "partitions": partitions})
    return {"topics": topics}
