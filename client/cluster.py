"""A handle on a DWAL cluster: bootstrap, metadata cache, one connection per broker.

The metadata cache knows, per partition, its leader's node id and leader epoch, and the
address of every broker by node id. Brokers learn metadata at different times, so an answer
may be older than what the cache already holds: a partition's entry is never replaced by one
of a lower leader epoch (Kafka's rule), not even after `invalidate()`, which only marks a
topic for refreshing. Metadata requests go to the known brokers in turn, so that one broker
with a stale view cannot keep the client from learning of a leader move.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, AsyncIterator

import trio

from client.limits import LIMITS
from client.connection import BrokerConnection, ConnectionFailed
from client.exception_groups import unwrapped_errors
from protocol import ApiKey, DwalError, ErrorCode, Response


@dataclass(frozen=True)
class PartitionInfo:
    partition: int
    leader: int
    leader_epoch: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


@dataclass(frozen=True)
class TopicInfo:
    name: str
    partitions: tuple[PartitionInfo, ...]
    max_message_bytes: int = -1  # the topic's max.message.bytes; -1: the broker did not say
    segment_bytes: int = -1  # the topic's segment.bytes; -1: the broker did not say


@dataclass(frozen=True)
class BrokerInfo:
    node_id: int
    host: str
    port: int


def parse_address(address: str, default_port: int = 9092) -> tuple[str, int]:
    """Split ``host:port``; raises ValueError with a clear message."""
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid port in address {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class Cluster:
    """Use `connect()` to get one. Safe to share between tasks of the owning nursery."""

    def __init__(
        self,
        bootstrap: list[tuple[str, int]],
        nursery: trio.Nursery,
        client_id: str,
        request_timeout_ms: int,
    ) -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.request_timeout_ms = request_timeout_ms
        self._nursery = nursery
        self._connections: dict[tuple[str, int, str], BrokerConnection] = {}
        self._connect_locks: dict[tuple[str, int, str], trio.Lock] = {}
        self.brokers: dict[int, BrokerInfo] = {}
        self.topics: dict[str, TopicInfo] = {}
        # every partition's newest entry seen, kept across invalidate(): never go back in epoch
        self._partitions: dict[tuple[str, int], PartitionInfo] = {}
        self._metadata_turn = 0  # which known broker the next metadata request goes to

    async def connection(
        self, host: str, port: int, *, purpose: str = "default"
    ) -> BrokerConnection:
        """Return the open connection to host:port for `purpose`, connecting if needed.

        A broker answers each connection's requests in order, so a long-polling fetch would
        hold up every answer queued behind it: consumers fetch on a connection of their own
        (purpose "fetch") while produce and admin requests share the default one."""
        key = (host, port, purpose)
        connection = self._connections.get(key)
        if connection is not None and not connection.closed:
            return connection
        lock = self._connect_locks.setdefault(key, trio.Lock())
        async with lock:
            connection = self._connections.get(key)
            if connection is None or connection.closed:
                connection = await BrokerConnection.open(
                    host,
                    port,
                    self._nursery,
                    client_id=self.client_id,
                    send_timeout_s=self.request_timeout_ms / 1000,
                )
                self._connections[key] = connection
        return connection

    async def any_connection(self, *, rotate: bool = False) -> BrokerConnection:
        """A connection to some reachable broker (known brokers first, then bootstrap); with
        `rotate`, starting from the next known broker each time."""
        known = [(b.host, b.port) for b in self.brokers.values()]
        if rotate and known:
            self._metadata_turn = (self._metadata_turn + 1) % len(known)
            known = known[self._metadata_turn :] + known[: self._metadata_turn]
        candidates = known + self.bootstrap
        last_error: Exception | None = None
        for host, port in candidates:
            try:
                return await self.connection(host, port)
            except ConnectionFailed as error:
                last_error = error
        raise last_error or ConnectionFailed("no bootstrap address")

    async def call(
        self,
        api_key: ApiKey,
        body: dict[str, Any],
        tail: bytes = b"",
        *,
        connection: BrokerConnection | None = None,
    ) -> Response:
        """Send one request to `connection` (or any broker), bounded by the request timeout.

        Safe to cancel (a `trio.move_on_after` around it is fine): a request already written
        is abandoned, its answer discarded on arrival; the shared connection stays open."""
        if connection is None:
            connection = await self.any_connection()
        with trio.move_on_after(self.request_timeout_ms / 1000) as scope:
            return await connection.request(api_key, body, tail)
        assert scope.cancelled_caught
        raise DwalError(
            ErrorCode.REQUEST_TIMED_OUT, f"{api_key.name} to {connection.address} timed out"
        )

    async def refresh_metadata(
        self, topics: list[str] | None = None, *, allow_auto_topic_creation: bool = False
    ) -> dict[str, TopicInfo | DwalError]:
        """Fetch metadata; returns per requested topic its info or the error the broker gave.
        A partition whose leader epoch is older than the cached one keeps the cached entry."""
        response = await self.call(
            ApiKey.METADATA,
            {
                "topics": topics,
                "allow_auto_topic_creation": allow_auto_topic_creation,
            },
            connection=await self.any_connection(rotate=True),
        )
        return self.apply_metadata(response.body)

    def apply_metadata(self, body: dict[str, Any]) -> dict[str, TopicInfo | DwalError]:
        """Merge a Metadata answer into the cache (see the module docstring); returns per
        topic of the answer its info or the error the broker gave."""
        # a stale answer may lack a broker that a newer one named: keep known addresses
        self.brokers.update(
            (b["node_id"], BrokerInfo(b["node_id"], b["host"], b["port"])) for b in body["brokers"]
        )
        result: dict[str, TopicInfo | DwalError] = {}
        for entry in body["topics"]:
            name = entry["topic"]
            if entry["error_code"]:
                self._forget(name)
                result[name] = DwalError(ErrorCode(entry["error_code"]), entry["error_message"])
                continue
            info = TopicInfo(
                name,
                tuple(
                    self._newest(name, p)
                    for p in sorted(entry["partitions"], key=lambda p: p["partition"])
                ),
                entry["max_message_bytes"],
                entry["segment_bytes"],
            )
            self.topics[name] = info
            result[name] = info
        return result

    def _newest(self, topic: str, answered: dict[str, Any]) -> PartitionInfo:
        """The answered partition entry, or the cached one if that has a newer leader epoch."""
        key = (topic, answered["partition"])
        cached = self._partitions.get(key)
        if cached is not None and answered["leader_epoch"] < cached.leader_epoch:
            return cached
        info = PartitionInfo(
            answered["partition"],
            answered["leader"],
            answered["leader_epoch"],
            tuple(answered["replicas"]),
            tuple(answered["isr"]),
        )
        self._partitions[key] = info
        return info

    def _forget(self, topic: str) -> None:
        """The broker says the topic does not exist: a topic created again under its name
        starts its leader epochs afresh."""
        self.topics.pop(topic, None)
        for key in [key for key in self._partitions if key[0] == topic]:
            del self._partitions[key]

    async def topic(self, name: str, *, allow_auto_topic_creation: bool = False) -> TopicInfo:
        """Cached metadata of one topic; raises DwalError if the broker does not know it."""
        info = self.topics.get(name)
        if info is not None:
            return info
        found = (
            await self.refresh_metadata([name], allow_auto_topic_creation=allow_auto_topic_creation)
        )[name]
        if isinstance(found, DwalError):
            raise found
        return found

    def leader_of(self, topic: str, partition: int) -> BrokerInfo | None:
        """The cached leader of a partition, or None when the cache does not know the topic
        (call `topic()` first) or the partition has no leader (or one of unknown address)."""
        info = self.topics.get(topic)
        if info is None or not 0 <= partition < len(info.partitions):
            return None
        return self.brokers.get(info.partitions[partition].leader)

    async def leader_connection(
        self, topic: str, partition: int, *, purpose: str = "default"
    ) -> BrokerConnection:
        """The connection to a partition's leader, loading the topic's metadata if needed.
        Raises DwalError: UNKNOWN_TOPIC_OR_PARTITION, LEADER_NOT_AVAILABLE."""
        info = await self.topic(topic)
        if not 0 <= partition < len(info.partitions):
            raise DwalError(
                ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                f"topic {topic!r} has no partition {partition}",
            )
        leader = self.brokers.get(info.partitions[partition].leader)
        if leader is None:
            raise DwalError(ErrorCode.LEADER_NOT_AVAILABLE, f"{topic}-{partition} has no leader")
        return await self.broker_connection(leader, purpose=purpose)

    async def broker_connection(
        self, broker: BrokerInfo, *, purpose: str = "default"
    ) -> BrokerConnection:
        return await self.connection(broker.host, broker.port, purpose=purpose)

    def start_task(self, function, *args) -> None:
        """Run `function(*args)` in the cluster's nursery (it ends when the cluster closes).
        The function must catch its own errors."""
        self._nursery.start_soon(function, *args)

    def invalidate_all(self) -> None:
        """Mark all cached topic metadata for refreshing (after a connection failure, for
        example); leader epochs seen stay known, so an older answer cannot win."""
        self.topics.clear()

    def invalidate(self, topic: str) -> None:
        """Mark one topic's metadata for refreshing (the next `topic()` asks a broker)."""
        self.topics.pop(topic, None)

    async def aclose(self) -> None:
        for connection in list(self._connections.values()):
            await connection.aclose()
        self._connections.clear()


@contextlib.asynccontextmanager
async def connect(
    bootstrap: str | list[str] | None = None,
    *,
    client_id: str = "dwal",
    request_timeout_ms: int = LIMITS.request_timeout_ms,
    bootstrap_servers: str | list[str] | None = None,
) -> AsyncIterator[Cluster]:
    """Open a cluster handle: ``async with connect("127.0.0.1:9092") as cluster: ...``.

    `bootstrap` ("host:port", comma-separated, or a list; default "127.0.0.1:9092") may be
    spelled `bootstrap_servers`, as kafka-python and aiokafka name it; giving both raises
    TypeError. Connects to a bootstrap broker at once (raising ConnectionFailed if none
    answers) and closes every connection when the block exits.
    """
    if bootstrap is not None and bootstrap_servers is not None:
        raise TypeError("connect(): bootstrap and bootstrap_servers are the same argument")
    if bootstrap is None:
        bootstrap = bootstrap_servers if bootstrap_servers is not None else "127.0.0.1:9092"
    addresses = [bootstrap] if isinstance(bootstrap, str) else list(bootstrap)
    parsed = [parse_address(a.strip()) for item in addresses for a in item.split(",") if a.strip()]
    if not parsed:
        raise ValueError("bootstrap needs at least one host:port")
    with unwrapped_errors():
        async with trio.open_nursery() as nursery:
            cluster = Cluster(parsed, nursery, client_id, request_timeout_ms)
            try:
                await cluster.any_connection()
                yield cluster
            finally:
                await cluster.aclose()
                nursery.cancel_scope.cancel()
