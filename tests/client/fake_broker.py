"""A scripted broker for client unit tests: a real loopback listener, no broker code.

Every request it receives is put on `requests` as a `ReceivedRequest`; the test decides
whether, when and what to answer (`answer()`), or breaks the connection (`close()`).
Metadata requests can be answered automatically (`topics`), so producers find their topics;
so are InitProducerId requests (a new producer id each, at epoch `producer_epoch_given`;
listed in `producer_ids`), unless `answer_init_producer_id` is false: then they are put on
`requests` like the others.
`pause_reading()` stops reading from every connection, which fills the socket buffers and
blocks a client mid-frame; `resume_reading()` lets it go on.

Several fake brokers can play one cluster: give them one `ClusterView` (their node ids and
each partition's leader and leader epoch), which every one of them reports in its Metadata
answers; a test moves a leader by changing the view (`FakeCluster.start` builds one).
`FakeControlPlane` answers the admin requests of such a cluster (topics, DescribeCluster,
ElectLeaders), with NOT_CONTROLLER as often as a test asks.
"""

from __future__ import annotations

import collections
import socket
import weakref
from dataclasses import dataclass, field
from typing import Any

import trio

from protocol import (
    EARLIEST_TIMESTAMP,
    ApiKey,
    ErrorCode,
    FrameDecoder,
    Request,
    decode_records,
    encode_batch,
    parse_request,
    response_prefix,
    scan_batches,
)
from protocol.record_batch import BatchHeader

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
        self,
        body: dict[str, Any],
        error_code: ErrorCode = ErrorCode.NONE,
        message=None,
        tail: bytes = b"",
    ) -> None:
        prefix = response_prefix(self.request.correlation_id, error_code, message, body, len(tail))
        await self.connection.send(prefix + tail)


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
    # per partition its replicas and ISR; not listed: the leader alone
    replicas: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    isr: dict[tuple[str, int], list[int]] = field(default_factory=dict)

    def replicas_of(self, topic: str, partition: int, leader: int) -> tuple[list[int], list[int]]:
        key = (topic, partition)
        return self.replicas.get(key, [leader]), self.isr.get(key, [leader])

    # set (then replaced) at each Metadata answer of any broker of the view
    metadata_answered: trio.Event = field(default_factory=trio.Event)
    # the producer ids its brokers hand out, in order
    producer_ids: list[int] = field(default_factory=list)

    def move(self, topic: str, partition: int, leader: int, leader_epoch: int) -> None:
        self.leaders[(topic, partition)] = (leader, leader_epoch)

    def note_metadata_answered(self) -> None:
        self.metadata_answered.set()
        self.metadata_answered = trio.Event()


class FakeBroker:
    """Start with `await nursery.start(FakeBroker(...).serve)`; `bootstrap` is its address."""

    def __init__(
        self,
        topics: dict[str, FakeTopic] | None = None,
        *,
        node_id: int = 0,
        view: ClusterView | None = None,
        answer_init_producer_id: bool = True,
    ) -> None:
        self.topics = topics or {}
        self.node_id = node_id
        self.view = view
        self.answer_init_producer_id = answer_init_producer_id
        self.producer_epoch_given = 0
        # the producer ids handed out, in order (shared by the brokers of a view)
        self.producer_ids: list[int] = view.producer_ids if view is not None else []
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
                        if self.view is not None:
                            self.view.note_metadata_answered()
                    if received.api_key == ApiKey.INIT_PRODUCER_ID and self.answer_init_producer_id:
                        self.producer_ids.append(1000 + len(self.producer_ids))
                        body = {
                            "producer_id": self.producer_ids[-1],
                            "producer_epoch": self.producer_epoch_given,
                        }
                        await received.answer(body)
                        continue
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
                replicas, isr = (
                    self.view.replicas_of(name, p, leader)
                    if self.view is not None
                    else ([leader], [leader])
                )
                partitions.append(
                    {
                        "partition": p,
                        "leader": leader,
                        "leader_epoch": epoch,
                        "replicas": replicas,
                        "isr": isr,
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
        self._unreachable: list[socket.socket] = []

    def add_unreachable(self, node_id: int) -> None:
        """Add broker `node_id` to the metadata at an address that refuses connections, as a
        killed broker's does: a socket bound there but not listening (kept open, so that
        nothing else takes the port) answers a connection attempt with a reset."""
        bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        bound.bind(("127.0.0.1", 0))
        self._unreachable.append(bound)
        weakref.finalize(self, bound.close)
        dead = FakeBroker(node_id=node_id, view=self.view)
        dead.port = bound.getsockname()[1]
        self.view.brokers[node_id] = dead

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


class FakeControlPlane:
    """Admin answers behind a FakeCluster, from any of its brokers (as a real broker forwards
    to the controller): CreateTopics (adds to the shared topic table), DescribeTopics (leader,
    epoch, replicas and ISR from the view; offsets only from brokers holding a copy),
    DescribeCluster (from the attributes below) and ElectLeaders (`elections` gives a
    partition's error code; not listed: elected). The next `not_controller` requests are
    answered NOT_CONTROLLER instead; `received` lists (node id, api key) of every request in
    order (Metadata included, which the brokers answer), `refused` how many got
    NOT_CONTROLLER, `created` the topic entries of every CreateTopics request (replication
    factor -1 places min(3, brokers) replicas, as a real broker's default does). Start with
    `start()`; give the cluster at least one topic, so that its brokers answer Metadata."""

    def __init__(self, cluster: FakeCluster, topics: dict[str, FakeTopic]) -> None:
        self.cluster = cluster
        self.topics = topics  # the table the brokers' Metadata answers read
        self.cluster_id = "fake-cluster-id"
        self.controller_id = 0
        self.metadata_offset = 42
        self.epochs: dict[int, int] = {}  # broker epoch by node id; not listed: 10 + node id
        self.fenced: set[int] = set()
        self.shut_down: set[int] = set()
        self.voters: dict[int, tuple[int, int]] = {0: (42, 0)}  # node id: (match index, lag)
        self.learners: dict[int, tuple[int, int]] = {}
        self.elections: dict[tuple[str, int], ErrorCode] = {}
        self.not_controller = 0
        self.refused = 0
        self.received: list[tuple[int, ApiKey]] = []
        self.created: list[dict[str, Any]] = []

    async def start(self, nursery: trio.Nursery) -> "FakeControlPlane":
        for node_id, broker in self.cluster.brokers.items():
            nursery.start_soon(self._serve, node_id, broker)
        return self

    async def _serve(self, node_id: int, broker: FakeBroker) -> None:
        answers = {
            ApiKey.CREATE_TOPICS: self._create_topics,
            ApiKey.DESCRIBE_TOPICS: self._describe_topics,
            ApiKey.DESCRIBE_CLUSTER: self._describe_cluster,
            ApiKey.ELECT_LEADERS: self._elect_leaders,
        }
        while True:
            received = await broker.requests.receive()
            self.received.append((node_id, received.api_key))
            if received.api_key == ApiKey.METADATA:
                continue  # the broker answered it
            if received.api_key not in answers:
                raise AssertionError(f"FakeControlPlane cannot answer {received.api_key.name}")
            if self.not_controller > 0:
                self.not_controller -= 1
                self.refused += 1
                message = f"node {node_id} is not the active controller"
                await received.answer({}, ErrorCode.NOT_CONTROLLER, message)
                continue
            await received.answer(answers[received.api_key](node_id, received.request.body))

    def _create_topics(self, node_id: int, body: dict[str, Any]) -> dict[str, Any]:
        results = []
        for entry in body["topics"]:
            self.created.append(dict(entry))
            name = entry["topic"]
            code = ErrorCode.TOPIC_ALREADY_EXISTS if name in self.topics else ErrorCode.NONE
            if not code and not body["validate_only"]:
                self.topics[name] = FakeTopic(partitions=entry["partitions"])
                brokers = sorted(self.cluster.brokers)
                factor = entry["replication_factor"]
                if factor == -1:
                    factor = min(3, len(brokers))
                for p in range(entry["partitions"]):
                    chosen = [brokers[(p + i) % len(brokers)] for i in range(factor)]
                    self.cluster.view.move(name, p, chosen[0], 0)
                    self.cluster.view.replicas[(name, p)] = chosen
                    self.cluster.view.isr[(name, p)] = list(chosen)
            results.append({"topic": name, "error_code": int(code)})
        return {"topics": results}

    def _describe_topics(self, node_id: int, body: dict[str, Any]) -> dict[str, Any]:
        view = self.cluster.view
        entries = []
        for name in body["topics"] or sorted(self.topics):
            topic = self.topics.get(name)
            if topic is None:
                code = int(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION)
                entries.append({"topic": name, "error_code": code})
                continue
            partitions = []
            for p in range(topic.partitions):
                leader, epoch = view.leaders.get((name, p), (0, 0))
                replicas, isr = view.replicas_of(name, p, leader)
                local = node_id in replicas
                offset = 100 + p if local else -1
                partitions.append(
                    {
                        "partition": p,
                        "leader": leader,
                        "leader_epoch": epoch,
                        "log_start_offset": 0 if local else -1,
                        "high_watermark": offset,
                        "log_end_offset": offset,
                        "size_bytes": 1000 * (p + 1) if local else -1,
                        "segments": 1 if local else -1,
                        "replicas": replicas,
                        "isr": isr,
                        "local": local,
                    }
                )
            entries.append(
                {
                    "topic": name,
                    "topic_id": f"id-of-{name}",
                    "configs": {"retention.ms": "86400000"},
                    "partitions": partitions,
                }
            )
        return {"topics": entries}

    def _describe_cluster(self, node_id: int, body: dict[str, Any]) -> dict[str, Any]:
        brokers = [
            {
                "node_id": other,
                "epoch": self.epochs.get(other, 10 + other),
                "fenced": other in self.fenced,
                "shut_down": other in self.shut_down,
                "rack": None,
                "listeners": [{"name": "CLIENT", "host": "127.0.0.1", "port": broker.port}],
            }
            for other, broker in self.cluster.brokers.items()
        ]

        def members(table: dict[int, tuple[int, int]]) -> list[dict[str, int]]:
            return [
                {"node_id": member, "match_index": match_index, "lag": lag}
                for member, (match_index, lag) in table.items()
            ]

        return {
            "cluster_id": self.cluster_id,
            "controller_id": self.controller_id,
            "metadata_offset": self.metadata_offset,
            "brokers": brokers,
            "voters": members(self.voters),
            "learners": members(self.learners),
        }

    def _elect_leaders(self, node_id: int, body: dict[str, Any]) -> dict[str, Any]:
        wanted = body["topics"]
        if wanted is None:  # the partitions whose preferred replica does not lead
            wanted = []
            for name, topic in self.topics.items():
                moved = [p for p in range(topic.partitions) if not self._preferred_leads(name, p)]
                if moved:
                    wanted.append({"topic": name, "partitions": moved})
        results = []
        for entry in wanted:
            partitions = []
            for p in entry["partitions"]:
                code = self.elections.get((entry["topic"], p), ErrorCode.NONE)
                partitions.append({"partition": p, "error_code": int(code)})
            results.append({"topic": entry["topic"], "partitions": partitions})
        return {"topics": results}

    def _preferred_leads(self, topic: str, partition: int) -> bool:
        leader = self.cluster.view.leaders.get((topic, partition), (0, 0))[0]
        return self.cluster.view.replicas_of(topic, partition, leader)[0][0] == leader


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


SEQUENCE_WRAP = 2**31


@dataclass
class FakeProducerState:
    """What a toy partition remembers of one idempotent producer, as a broker does: its
    epoch, and (first sequence, last sequence, base offset) of its last 5 batches."""

    epoch: int
    batches: collections.deque = field(default_factory=lambda: collections.deque(maxlen=5))


class PartitionLogs:
    """Toy storage behind a FakeCluster: each broker answers Produce, Fetch and ListOffsets
    for the partitions it leads (by `leaders`, the truth, which the metadata view may lag
    behind; by default the view's leader) and NOT_LEADER_OR_FOLLOWER for the others.
    `records` holds each partition's stored values; `produced` and `fetched` say which
    broker got which partition's data or fetch, in order; `refused` which it refused
    (`refusal` is set at each) with NOT_LEADER_OR_FOLLOWER, or the partition's code in
    `refusal_codes`. A closed gate (`gates[node_id] = trio.Event()`) holds that
    broker's next Produce answer until the gate is set (`held` is set when one waits);
    `fetch_gates` does the same for Fetch answers. A Fetch with nothing to give waits a
    little (a long poll), unless it refuses a partition: errors are answered at once.

    Idempotent batches (a producer id) are checked as a broker does: one per partition in a
    request (else INVALID_RECORD); a resend of one of the producer's last 5 batches is
    answered with its first offset and not stored again (listed in `duplicates`); a
    sequence that does not follow the last one gets OUT_OF_ORDER_SEQUENCE_NUMBER, an older
    epoch INVALID_PRODUCER_EPOCH, a newer epoch (or an unknown producer) is taken only from
    sequence 0. Faults: `produce_errors[(topic, partition)]` lists codes that the
    partition's next Produce requests get, nothing stored (None: that one is handled as
    usual); the next `lost_answers` Produce requests are stored, then their connection is
    closed instead of answered. `produce_requests` lists every Produce request received.
    Start with `start()`."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.records: dict[tuple[str, int], list[bytes | None]] = collections.defaultdict(list)
        self.leaders: dict[tuple[str, int], int] = {}
        self.produced: list[tuple[int, str, int, list[bytes | None]]] = []
        self.fetched: list[tuple[int, str, int, int]] = []  # node, topic, partition, offset
        # (partition, the current_leader_epoch the fetch carried), per fetched partition
        self.fetch_epochs: list[tuple[int, int]] = []
        self.refused: list[tuple[int, ApiKey, str, int]] = []
        self.refusal = trio.Event()
        self.refusal_codes: dict[tuple[str, int], ErrorCode] = {}
        self.gates: dict[int, trio.Event] = {}
        self.fetch_gates: dict[int, trio.Event] = {}
        self.held = trio.Event()
        self.producers: dict[tuple[str, int], dict[int, FakeProducerState]] = (
            collections.defaultdict(dict)
        )
        self.duplicates: list[tuple[str, int, int]] = []  # topic, partition, base sequence
        self.produce_errors: dict[tuple[str, int], list[ErrorCode | None]] = {}
        self.produce_requests: list[Request] = []
        self.lost_answers = 0

    async def start(self, nursery: trio.Nursery) -> "PartitionLogs":
        for node_id, broker in self.cluster.brokers.items():
            nursery.start_soon(self._serve, node_id, broker)
        return self

    def leader(self, topic: str, partition: int) -> int:
        key = (topic, partition)
        if key in self.leaders:
            return self.leaders[key]
        return self.cluster.view.leaders.get(key, (0, 0))[0]

    def move(self, topic: str, partition: int, leader: int, leader_epoch: int) -> None:
        """Move leadership, and let the metadata view say so."""
        self.leaders[(topic, partition)] = leader
        self.cluster.view.move(topic, partition, leader, leader_epoch)

    async def _serve(self, node_id: int, broker: FakeBroker) -> None:
        while True:
            received = await broker.next_request(ApiKey.METADATA)
            if received.api_key == ApiKey.PRODUCE:
                gate = self.gates.get(node_id)
                if gate is not None:
                    self.held.set()
                    await gate.wait()
                answer = self._produce(node_id, received.request)
                if self.lost_answers:
                    self.lost_answers -= 1
                    await received.connection.close()
                    continue
                await received.answer(answer)
            elif received.api_key == ApiKey.FETCH:
                fetch_gate = self.fetch_gates.get(node_id)
                if fetch_gate is not None:
                    await fetch_gate.wait()
                refusals = len(self.refused)
                body, tail = self._fetch(node_id, received.request)
                if not tail and len(self.refused) == refusals:
                    # a long poll with nothing to give: wait a little
                    await trio.sleep(min(received.request.body["max_wait_ms"], 20) / 1000)
                await received.answer(body, tail=tail)
            elif received.api_key == ApiKey.LIST_OFFSETS:
                await received.answer(self._list_offsets(node_id, received.request))
            else:
                raise AssertionError(f"PartitionLogs cannot answer {received.api_key.name}")

    def _refusal(self, node_id: int, api_key: ApiKey, topic: str, partition: int) -> dict:
        self.refused.append((node_id, api_key, topic, partition))
        self.refusal.set()
        code = self.refusal_codes.get((topic, partition), ErrorCode.NOT_LEADER_OR_FOLLOWER)
        return {"partition": partition, "error_code": int(code)}

    def _produce(self, node_id: int, request: Request) -> dict[str, Any]:
        self.produce_requests.append(request)
        view = memoryview(request.tail)
        start = 0
        topics = []
        for entry in request.body["topics"]:
            partitions = []
            for part in entry["partitions"]:
                topic, partition = entry["topic"], part["partition"]
                chunk = view[start : start + part["size"]]
                start += part["size"]
                if self.leader(topic, partition) != node_id:
                    partitions.append(self._refusal(node_id, ApiKey.PRODUCE, topic, partition))
                    continue
                errors = self.produce_errors.get((topic, partition))
                code = errors.pop(0) if errors else None
                if code is not None:
                    partitions.append({"partition": partition, "error_code": int(code)})
                    continue
                partitions.append(self._append(node_id, topic, partition, chunk))
            topics.append({"topic": entry["topic"], "partitions": partitions})
        return {"topics": topics}

    def _append(self, node_id: int, topic: str, partition: int, chunk: memoryview) -> dict:
        headers = [batch.header for batch in scan_batches(chunk)]
        idempotent = [header for header in headers if header.producer_id >= 0]
        if idempotent and len(headers) > 1:
            return {"partition": partition, "error_code": int(ErrorCode.INVALID_RECORD)}
        if idempotent:
            code, duplicate_offset = self._check_sequence(topic, partition, idempotent[0])
            if code or duplicate_offset >= 0:
                result = {"partition": partition, "error_code": int(code)}
                return result | ({"base_offset": duplicate_offset} if not code else {})
        values = [record.value for record in decode_records(chunk)]
        log = self.records[(topic, partition)]
        base_offset = len(log)
        log.extend(values)
        self.produced.append((node_id, topic, partition, values))
        if idempotent:
            self._remember(topic, partition, idempotent[0], base_offset)
        return {"partition": partition, "error_code": 0, "base_offset": base_offset}

    def _check_sequence(
        self, topic: str, partition: int, header: BatchHeader
    ) -> tuple[ErrorCode, int]:
        """The error for an idempotent batch (NONE: append it), and the first offset of the
        stored batch it repeats (-1: none)."""
        state = self.producers[(topic, partition)].get(header.producer_id)
        first = header.base_sequence
        last = (first + header.record_count - 1) % SEQUENCE_WRAP
        if state is None or header.producer_epoch > state.epoch:
            code = ErrorCode.NONE if first == 0 else ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER
            return code, -1
        if header.producer_epoch < state.epoch:
            return ErrorCode.INVALID_PRODUCER_EPOCH, -1
        for stored_first, stored_last, base_offset in state.batches:
            if (stored_first, stored_last) == (first, last):
                self.duplicates.append((topic, partition, first))
                return ErrorCode.NONE, base_offset
        if first != (state.batches[-1][1] + 1) % SEQUENCE_WRAP:
            return ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER, -1
        return ErrorCode.NONE, -1

    def _remember(self, topic: str, partition: int, header: BatchHeader, base_offset: int) -> None:
        states = self.producers[(topic, partition)]
        state = states.get(header.producer_id)
        if state is None or header.producer_epoch > state.epoch:
            state = states[header.producer_id] = FakeProducerState(header.producer_epoch)
        last = (header.base_sequence + header.record_count - 1) % SEQUENCE_WRAP
        state.batches.append((header.base_sequence, last, base_offset))

    def _fetch(self, node_id: int, request: Request) -> tuple[dict[str, Any], bytes]:
        topics = []
        tail = []
        for entry in request.body["topics"]:
            partitions = []
            for part in entry["partitions"]:
                topic, partition, offset = entry["topic"], part["partition"], part["fetch_offset"]
                if self.leader(topic, partition) != node_id:
                    partitions.append(self._refusal(node_id, ApiKey.FETCH, topic, partition))
                    continue
                self.fetched.append((node_id, topic, partition, offset))
                self.fetch_epochs.append((partition, part["current_leader_epoch"]))
                log = self.records[(topic, partition)]
                data = b""
                if offset < len(log):
                    shaped = [[0, None, value, []] for value in log[offset:]]
                    data = encode_batch(shaped, base_timestamp=0, base_offset=offset)
                    tail.append(data)
                partitions.append(
                    {
                        "partition": partition,
                        "error_code": 0,
                        "high_watermark": len(log),
                        "size": len(data),
                    }
                )
            topics.append({"topic": entry["topic"], "partitions": partitions})
        return {"topics": topics}, b"".join(tail)

    def _list_offsets(self, node_id: int, request: Request) -> dict[str, Any]:
        topics = []
        for entry in request.body["topics"]:
            partitions = []
            for part in entry["partitions"]:
                topic, partition = entry["topic"], part["partition"]
                if self.leader(topic, partition) != node_id:
                    partitions.append(self._refusal(node_id, ApiKey.LIST_OFFSETS, topic, partition))
                    continue
                end = len(self.records[(topic, partition)])
                offset = 0 if part["timestamp"] == EARLIEST_TIMESTAMP else end
                partitions.append({"partition": partition, "error_code": 0, "offset": offset})
            topics.append({"topic": entry["topic"], "partitions": partitions})
        return {"topics": topics}
