"""The broker's answer to each API: checked request body in, `Reply` out.

Handlers never decode records: produce hands whole batches to the replica layer (which
checks leadership and stamps the leader epoch), fetch hands back file slices that the
connection sends with sendfile. Who leads what, which topics and brokers exist: the
published metadata image (`ClusterMember.image`), nothing else. Admin requests go to the
active controller (`ClusterMember.call_controller`: in process on its node, forwarded from
the others) and are answered once this broker's image has the change. Every failure that
concerns one partition is reported in that partition's entry; only a malformed request
fails as a whole.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio

from broker.answers import error_of, wait_any
from broker.broker_lifecycle import NATIVE_LISTENER
from broker.config import BrokerConfig
from broker.controller.metadata_image import BrokerInfo
from broker.controller.metadata_records import NO_LEADER
from broker.event_log import log_event
from broker.wall_clock import now_ms
from broker.group_coordinator import OFFSETS_TOPIC, GroupCoordinator
from broker.producer_ids import ProducerIdBlocks
from broker.storage import FetchSlice, ReplicaLog, StorageError
from broker.storage.file_descriptor_cache import process_cache
from broker.replication import ReplicaManager
from broker.replication.broker_link import BrokerLink, BrokerLinkError
from broker.topic_registry import TopicRegistry
from protocol import (
    ACKS_ALL,
    ACKS_LEADER,
    ACKS_NONE,
    API_VERSIONS,
    EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
    ApiKey,
    DwalError,
    ErrorCode,
    ProtocolError,
    check_tail_sizes,
)
from protocol.frame import Response
from protocol.record_batch import scan_batches

if TYPE_CHECKING:
    from broker.cluster_member import ClusterMember

logger = logging.getLogger("dwal.requests")

FORWARD_LINKS_IDLE_MAX = 4  # per leader: connections kept for the gateways' forwarding


@dataclass(frozen=True)
class RequestContext:
    """Who sent a request: the client's id and the address it connected from."""

    client_id: str
    client_host: str


@dataclass
class Reply:
    """A response body plus the raw tail parts (bytes or file slices) that follow it."""

    body: dict[str, Any]
    parts: list[bytes | FetchSlice] = field(default_factory=list)
    error_code: ErrorCode = ErrorCode.NONE
    error_message: str | None = None
    send: bool = True  # False for acks=0 produce: the client expects no response

    @property
    def tail_bytes(self) -> int:
        return sum(len(p) if isinstance(p, bytes) else p.length for p in self.parts)

    def close(self) -> None:
        for part in self.parts:
            if isinstance(part, FetchSlice):
                part.close()


def _refuse_internal(name: str, action: str) -> None:
    if name == OFFSETS_TOPIC:
        raise DwalError(ErrorCode.POLICY_VIOLATION, f"the internal topic {name} cannot be {action}")


class RequestHandlers:
    def __init__(
        self,
        config: BrokerConfig,
        registry: TopicRegistry,
        *,
        member: ClusterMember,
        replicas: ReplicaManager,
        coordinator: GroupCoordinator,
        advertised_port: int,
    ) -> None:
        self.config = config
        self.registry = registry
        self.member = member
        self.replicas = replicas
        self.coordinator = coordinator
        self.advertised_port = advertised_port
        self._links: dict[tuple[str, int], list[BrokerLink]] = {}  # idle, for forwarding
        self.producer_ids = ProducerIdBlocks(self._allocate_producer_ids)
        self.table: dict[ApiKey, Callable[[dict, bytes, RequestContext], Awaitable[Reply]]] = {
            ApiKey.API_VERSIONS: self.api_versions,
            ApiKey.METADATA: self.metadata,
            ApiKey.CREATE_TOPICS: self.create_topics,
            ApiKey.DELETE_TOPICS: self.delete_topics,
            ApiKey.DESCRIBE_TOPICS: self.describe_topics,
            ApiKey.ALTER_CONFIGS: self.alter_configs,
            ApiKey.FETCH: self.fetch,
            ApiKey.LIST_OFFSETS: self.list_offsets,
            ApiKey.CREATE_PARTITIONS: self.create_partitions,
            ApiKey.FIND_COORDINATOR: self.find_coordinator,
            ApiKey.CONSUMER_GROUP_HEARTBEAT: self.consumer_group_heartbeat,
            ApiKey.OFFSET_COMMIT: self.offset_commit,
            ApiKey.OFFSET_FETCH: self.offset_fetch,
            ApiKey.LIST_GROUPS: self.list_groups,
            ApiKey.CONSUMER_GROUP_DESCRIBE: self.consumer_group_describe,
            ApiKey.DELETE_GROUPS: self.delete_groups,
            ApiKey.DESCRIBE_CLUSTER: self.forward_to_controller,
            ApiKey.ELECT_LEADERS: self.forward_to_controller_elect,
            ApiKey.ALTER_PARTITION_REASSIGNMENTS: functools.partial(
                self.forward_change_to_controller, ApiKey.ALTER_PARTITION_REASSIGNMENTS
            ),
            ApiKey.DECOMMISSION_BROKER: functools.partial(
                self.forward_change_to_controller, ApiKey.DECOMMISSION_BROKER
            ),
            ApiKey.LIST_PARTITION_REASSIGNMENTS: functools.partial(
                self.forward_read_to_controller, ApiKey.LIST_PARTITION_REASSIGNMENTS
            ),
            ApiKey.BROKER_REGISTRATION: self.refuse_broker_request,
            ApiKey.BROKER_HEARTBEAT: self.refuse_broker_request,
            ApiKey.ALTER_PARTITION: self.refuse_broker_request,
            ApiKey.ALLOCATE_PRODUCER_IDS: self.refuse_broker_request,
            ApiKey.INIT_PRODUCER_ID: self.init_producer_id,
        }

    async def start(
        self, api_key: ApiKey, body: dict, tail: bytes | memoryview, context: RequestContext
    ) -> Callable[[], Awaitable[Reply]]:
        """Do the request's order-sensitive part now and return the coroutine function that
        produces its reply, which may run concurrently with later requests.

        The server calls this in the order a connection's requests arrive and reads the next
        request only once it returns, so a request sees the effects of every earlier one on
        its connection (a Produce right after its CreateTopics finds the topic). Only the
        waiting parts run later: a Produce's wait for fsync (its appends are done here) and a
        Fetch, which may long-poll. Every other request is answered here."""
        if api_key == ApiKey.PRODUCE:
            return await self.start_produce(body, tail)
        handler = self.table[api_key]  # only Produce carries a raw tail; others ignore one
        if api_key in _RUN_CONCURRENTLY:
            return functools.partial(handler, body, b"", context)
        reply = await handler(body, b"", context)
        return functools.partial(_already, reply)

    # -- admin ------------------------------------------------------------------------

    async def api_versions(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        versions = [[int(key), low, high] for key, (low, high) in API_VERSIONS.items()]
        return Reply({"api_versions": versions})

    def _broker_address(self, broker: BrokerInfo) -> tuple[str, int] | None:
        for listener in broker.listeners:
            if listener.name == NATIVE_LISTENER:
                return listener.host, listener.port
        return None

    async def metadata(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        names = body["topics"]
        if names is not None and body["allow_auto_topic_creation"]:
            if self.config.auto_create_topics:
                for name in names:
                    await self._auto_create(name)
        image = self.member.image
        if names is None:
            names = sorted(image.topics)
        topics = []
        for name in names:
            info = image.topics.get(name)
            held = self.registry.topics.get(name)
            if info is None or held is None:
                topics.append(
                    {
                        "topic": name,
                        "error_code": int(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION),
                        "error_message": f"unknown topic {name!r}",
                        "partitions": [],
                    }
                )
                continue
            partitions = [
                {
                    "partition": p.partition,
                    "error_code": int(
                        ErrorCode.LEADER_NOT_AVAILABLE if p.leader == NO_LEADER else 0
                    ),
                    "leader": p.leader,
                    "leader_epoch": p.leader_epoch,
                    "replicas": list(p.replicas),
                    "isr": list(p.isr),
                }
                for p in info.partitions
            ]
            log_config = self.registry.log_config(held)
            topics.append(
                {
                    "topic": name,
                    "error_code": 0,
                    "partitions": partitions,
                    "max_message_bytes": log_config.max_message_bytes,
                    "segment_bytes": log_config.segment_bytes,
                }
            )
        brokers = []
        for broker in image.brokers.values():
            address = self._broker_address(broker)
            if address is not None and not broker.fenced:
                brokers.append(
                    {"node_id": broker.broker_id, "host": address[0], "port": address[1]}
                )
        controller = self.member.channel.controller_hint() if self.member.channel else None
        return Reply(
            {
                "brokers": brokers,
                "controller_id": -1 if controller is None else controller,
                "topics": topics,
            }
        )

    async def _auto_create(self, name: str) -> None:
        await self.ensure_topic(name, self.config.default_partitions)

    async def ensure_topic(self, name: str, partitions: int) -> None:
        """Create the topic (default replication factor) unless it exists; returns once
        this broker's image has it. Raises DwalError."""
        if name in self.member.image.topics:
            return
        body = {
            "topics": [
                {
                    "topic": name,
                    "partitions": partitions,
                    "replication_factor": -1,
                    "configs": {},
                }
            ],
            "validate_only": False,
        }
        reply = await self.member.call_controller(ApiKey.CREATE_TOPICS, body)
        result = reply["topics"][0]
        if result["error_code"] and result["error_code"] != ErrorCode.TOPIC_ALREADY_EXISTS:
            raise DwalError(ErrorCode(result["error_code"]), result.get("error_message"))

    async def _forward_topics(
        self, api_key: ApiKey, body: dict, entries: list, name_of, action: str
    ) -> Reply:
        """Forward the entries that pass the local check to the controller; results in the
        order of the request."""
        refused: dict[int, dict[str, Any]] = {}
        passing = []
        for index, entry in enumerate(entries):
            name = name_of(entry)
            try:
                _refuse_internal(name, action)
                passing.append(entry)
            except DwalError as error:
                refused[index] = {
                    "topic": name,
                    "error_code": int(error.code),
                    "error_message": error.message,
                }
        answered: list[dict[str, Any]] = []
        offset = -1
        if passing:
            reply = await self.member.call_controller(api_key, {**body, "topics": passing})
            answered = reply["topics"]
            offset = reply.get("metadata_offset", -1)
        results = []
        answers = iter(answered)
        for index in range(len(entries)):
            results.append(refused[index] if index in refused else next(answers))
        return Reply({"topics": results, "metadata_offset": offset})

    async def create_topics(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        reply = await self._forward_topics(
            ApiKey.CREATE_TOPICS, body, body["topics"], lambda e: e["topic"], "created by clients"
        )
        for result in reply.body["topics"]:
            if result["error_code"] or body.get("validate_only"):
                continue
            failed = sorted(
                (partition, reason)
                for (name, partition), reason in self.registry.failed_partitions.items()
                if name == result["topic"]
            )
            if failed:  # created in the cluster, but not here: say why (it is retried)
                partition, reason = failed[0]
                result["error_code"] = int(ErrorCode.KAFKA_STORAGE_ERROR)
                result["error_message"] = (
                    f"topic {result['topic']!r} was created, but {len(failed)} of its "
                    f"partitions cannot be created on broker {self.config.node_id} (partition "
                    f"{partition}: {reason}); they are tried again with the next metadata change"
                )
        return reply

    async def delete_topics(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        return await self._forward_topics(
            ApiKey.DELETE_TOPICS, body, body["topics"], lambda name: name, "deleted"
        )

    async def create_partitions(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        # the internal topic's partition count decides where each group's offsets live
        return await self._forward_topics(
            ApiKey.CREATE_PARTITIONS,
            body,
            body["topics"],
            lambda e: e["topic"],
            "given more partitions",
        )

    async def describe_topics(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        image = self.member.image
        names = body["topics"] if body["topics"] is not None else sorted(image.topics)
        return Reply({"topics": [self._describe_topic(name) for name in names]})

    def _describe_topic(self, name: str) -> dict[str, Any]:
        info = self.member.image.topics.get(name)
        held = self.registry.topics.get(name)
        if info is None or held is None:
            return {
                "topic": name,
                "error_code": int(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION),
                "error_message": f"unknown topic {name!r}",
            }
        partitions = []
        for state in info.partitions:
            entry: dict[str, Any] = {
                "partition": state.partition,
                "leader": state.leader,
                "leader_epoch": state.leader_epoch,
                "replicas": list(state.replicas),
                "isr": list(state.isr),
            }
            log = self.registry.logs.get((name, state.partition))
            if log is None:
                entry.update(
                    local=False,
                    log_start_offset=-1,
                    high_watermark=-1,
                    log_end_offset=-1,
                    size_bytes=-1,
                    segments=0,
                )
            else:
                entry.update(
                    local=True,
                    log_start_offset=log.log_start_offset,
                    high_watermark=log.high_watermark,
                    log_end_offset=log.log_end_offset,
                    size_bytes=log.size_bytes,
                    segments=log.segment_count,
                )
            partitions.append(entry)
        configs = self.registry.log_config(held).to_topic_configs()
        return {
            "topic": name,
            "error_code": 0,
            "topic_id": info.topic_id.hex(),
            "configs": configs,
            "partitions": partitions,
        }

    async def alter_configs(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        reply = await self.member.call_controller(ApiKey.ALTER_CONFIGS, body)
        return Reply(reply)

    async def forward_to_controller(
        self, body: dict, tail: bytes, context: RequestContext
    ) -> Reply:
        # A read: the controller's answer as is (no wait for this broker's image).
        return Reply(await self.member.ask_controller(ApiKey.DESCRIBE_CLUSTER, body))

    async def forward_to_controller_elect(
        self, body: dict, tail: bytes, context: RequestContext
    ) -> Reply:
        return Reply(await self.member.call_controller(ApiKey.ELECT_LEADERS, body))

    async def forward_change_to_controller(
        self, api_key: ApiKey, body: dict, tail: bytes, context: RequestContext
    ) -> Reply:
        # Answered once this broker's image has the change (metadata_offset).
        return Reply(await self.member.call_controller(api_key, body))

    async def forward_read_to_controller(
        self, api_key: ApiKey, body: dict, tail: bytes, context: RequestContext
    ) -> Reply:
        return Reply(await self.member.ask_controller(api_key, body))

    async def init_producer_id(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        producer_id = await self.producer_ids.next_producer_id()
        return Reply({"producer_id": producer_id, "producer_epoch": 0})

    async def _allocate_producer_ids(self) -> tuple[int, int]:
        lifecycle = self.member.lifecycle
        epoch = -1 if lifecycle is None else lifecycle.broker_epoch
        if epoch < 0:
            raise DwalError(
                ErrorCode.NOT_CONTROLLER, "this broker has not registered with the controller yet"
            )
        reply = await self.member.ask_controller(
            ApiKey.ALLOCATE_PRODUCER_IDS,
            {"broker_id": self.config.node_id, "broker_epoch": epoch},
        )
        return reply["producer_id_start"], reply["producer_id_len"]

    async def refuse_broker_request(
        self, body: dict, tail: bytes, context: RequestContext
    ) -> Reply:
        # Only brokers send these, to the controller port: a client cannot pose as one here.
        raise DwalError(
            ErrorCode.INVALID_REQUEST,
            "brokers send registrations, heartbeats and ISR changes to a controller's "
            "controller port, not to the native port",
        )

    # -- produce ----------------------------------------------------------------------

    async def start_produce(
        self, body: dict, tail: bytes | memoryview
    ) -> Callable[[], Awaitable[Reply]]:
        """Append every partition's batches now and return the rest of the work (waiting for
        durability) as a coroutine function.

        The server calls this from the connection's reader, in the order requests arrive, so
        pipelined produce requests append in the order they were sent; only the waits run
        concurrently. It awaits only to auto-create a topic."""
        acks = body["acks"]
        if acks not in (ACKS_NONE, ACKS_LEADER, ACKS_ALL):
            raise DwalError(
                ErrorCode.INVALID_REQUIRED_ACKS, f"acks must be 0, 1 or -1 (all), not {acks}"
            )
        check_tail_sizes([p["size"] for t in body["topics"] for p in t["partitions"]], len(tail))
        if self.config.auto_create_topics:
            for entry in body["topics"]:
                await self._auto_create(entry["topic"])
        view = memoryview(tail)
        position = 0
        topics: list[dict[str, Any]] = []
        waits: list[_Wait] = []
        for entry in body["topics"]:
            results: list[dict[str, Any]] = []
            topics.append({"topic": entry["topic"], "partitions": results})
            for part in entry["partitions"]:
                chunk = view[position : position + part["size"]]
                position += part["size"]
                result, wait = self._append(entry["topic"], part["partition"], chunk, acks)
                results.append(result)
                if wait is not None:
                    waits.append(wait)

        async def finish() -> Reply:
            if waits:
                await self._wait_durable(waits, body["timeout_ms"])
            return Reply({"topics": topics}, send=acks != ACKS_NONE)

        return finish

    def _append(self, topic: str, partition: int, chunk: memoryview, acks: int):
        try:
            if len(chunk) == 0:
                raise DwalError(ErrorCode.INVALID_RECORD, "a partition's record data is empty")
            if acks == ACKS_ALL:  # NOT_ENOUGH_REPLICAS refuses it before anything is written
                self.replicas.check_acks(topic, partition, acks)
            # Appending patches offsets in place: a large frame arrives in writable memory
            # (see FrameDecoder); a small one, a view of received bytes, is copied here.
            log, info = self.replicas.append(
                topic, partition, bytearray(chunk) if chunk.readonly else chunk, now_ms=now_ms()
            )
        except Exception as error:
            code, message = error_of(error)
            if code == ErrorCode.KAFKA_STORAGE_ERROR:
                log_event(
                    logger,
                    logging.ERROR,
                    "append_failed",
                    topic=topic,
                    partition=partition,
                    error=message,
                )
            return {"partition": partition, "error_code": int(code), "error_message": message}, None
        result = {
            "partition": partition,
            "error_code": 0,
            "base_offset": info.base_offset,
            "log_append_time": -1,
            "log_start_offset": info.log_start_offset,
        }
        # fsync=always: nothing is visible or acknowledged before it is durable, so even acks=0
        # waits (in this handler, off the connection's read path) for the group commit.
        # acks=all: in every in-sync replica (the high watermark passed it); when this broker
        # is the only one, on its disk too, whatever the policy: one copy's only protection.
        durable = log.config.fsync == "always" or (
            acks == ACKS_ALL and self.replicas.isr_size(topic, partition) <= 1
        )
        if not durable and acks != ACKS_ALL:
            return result, None
        wait = _Wait(topic, partition, log, info.last_offset + 1, result, acks == ACKS_ALL, durable)
        return result, wait

    async def _wait_durable(self, waits: list[_Wait], timeout_ms: int) -> None:
        pending = {id(wait.result): wait for wait in waits}

        async def wait_one(wait: _Wait) -> None:
            try:
                if wait.durable:
                    await wait.log.wait_durable(wait.end_offset)
                if wait.replicated:
                    await self.replicas.wait_replicated(wait.topic, wait.partition, wait.end_offset)
            except (StorageError, OSError, DwalError) as error:
                code, message = error_of(error)
                wait.result.update(
                    error_code=int(code),
                    error_message=message,
                    base_offset=-1,
                    maybe_appended=True,
                )
            pending.pop(id(wait.result), None)

        with trio.move_on_after(max(timeout_ms, 0) / 1000):
            async with trio.open_nursery() as nursery:
                for wait in waits:
                    nursery.start_soon(wait_one, wait)
        for wait in pending.values():
            wait.result.update(
                error_code=int(ErrorCode.REQUEST_TIMED_OUT),
                error_message=(
                    "timed out waiting for the in-sync replicas"
                    if wait.replicated
                    and (not wait.durable or wait.log.durable_offset >= wait.end_offset)
                    else "timed out waiting for fsync"
                ),
                base_offset=-1,
                maybe_appended=True,
            )

    # -- fetch ------------------------------------------------------------------------

    async def fetch(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        limits = self.config.limits
        max_wait_ms = min(max(body["max_wait_ms"], 0), limits.fetch_wait_ms_max)
        max_bytes = min(max(body["max_bytes"], 1), limits.fetch_bytes_max)
        if body["replica_id"] >= 0:  # a follower broker: reads to the log end
            answer, parts = await self.replicas.serve_replica_fetch(
                body, max_bytes=max_bytes, max_wait_ms=max_wait_ms
            )
            return Reply(answer, list(parts))
        deadline = trio.current_time() + max_wait_ms / 1000
        while True:
            events = self._events_of(body)
            reply, total, failed = self._read_partitions(body, max_bytes)
            if total >= body["min_bytes"] or failed or trio.current_time() >= deadline:
                return reply
            reply.close()
            with trio.move_on_at(deadline):
                await wait_any(events)

    def _events_of(self, body: dict) -> list[trio.Event]:
        """What a consumer's long poll waits on: the high watermark moving."""
        events = []
        for entry in body["topics"]:
            for part in entry["partitions"]:
                log = self.registry.logs.get((entry["topic"], part["partition"]))
                if log is not None:
                    events.append(log.new_data_event)
        return events

    def _read_partitions(self, body: dict, max_bytes: int) -> tuple[Reply, int, bool]:
        reply = Reply({"topics": []})
        total = 0
        failed = False
        for entry in body["topics"]:
            results: list[dict[str, Any]] = []
            reply.body["topics"].append({"topic": entry["topic"], "partitions": results})
            for part in entry["partitions"]:
                result = {"partition": part["partition"], "error_code": 0, "size": 0}
                results.append(result)
                try:
                    log = self.replicas.leader_log(
                        entry["topic"],
                        part["partition"],
                        current_leader_epoch=part["current_leader_epoch"],
                    )[0]
                    result["high_watermark"] = log.high_watermark
                    result["log_start_offset"] = log.log_start_offset
                    budget = min(part["max_bytes"], max_bytes - total)
                    if total > 0 and (budget <= 0 or not process_cache().may_borrow()):
                        continue  # full (bytes or descriptors): the next fetch reads on
                    if part["max_bytes"] <= 0:
                        raise DwalError(ErrorCode.INVALID_FETCH_SIZE, "max_bytes must be positive")
                    piece = log.read(part["fetch_offset"], max(budget, 1))
                except Exception as error:
                    code, message = error_of(error)
                    result.update(error_code=int(code), error_message=message)
                    failed = True
                    continue
                if piece.length:
                    reply.parts.append(piece)
                    result["size"] = piece.length
                    total += piece.length
                else:
                    piece.close()
        return reply, total, failed

    # -- consumer groups (see broker/group_coordinator.py) ------------------------------

    async def find_coordinator(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        # The leader of the group's partition of the internal topic (created on first use).
        await self.coordinator.ensure_offsets_topic()
        image = self.member.image
        partition = self.coordinator.partition_of(body["key"])
        state = image.partition(OFFSETS_TOPIC, partition)
        broker = None
        if state is not None and state.leader != NO_LEADER:
            broker = image.brokers.get(state.leader)
        address = None if broker is None else self._broker_address(broker)
        if broker is None or address is None:
            raise DwalError(
                ErrorCode.COORDINATOR_NOT_AVAILABLE,
                f"partition {partition} of {OFFSETS_TOPIC} has no leader",
            )
        return Reply({"node_id": broker.broker_id, "host": address[0], "port": address[1]})

    async def consumer_group_heartbeat(
        self, body: dict, tail: bytes, context: RequestContext
    ) -> Reply:
        await self.coordinator.ensure_offsets_topic()
        return Reply(self.coordinator.heartbeat(body, context.client_id, context.client_host))

    async def offset_commit(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        return Reply(await self.coordinator.commit(body))

    async def offset_fetch(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        return Reply(self.coordinator.fetch_offsets(body))

    async def list_groups(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        return Reply(self.coordinator.list_groups())

    async def consumer_group_describe(
        self, body: dict, tail: bytes, context: RequestContext
    ) -> Reply:
        return Reply(self.coordinator.describe_groups(body))

    async def delete_groups(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        return Reply(await self.coordinator.delete_groups(body))

    # -- in-process access, for gateways --------------------------------------------------

    async def append_batch(
        self,
        topic: str,
        partition: int,
        batch: bytes,
        *,
        acks: int = ACKS_LEADER,
        timeout_ms: int = 30_000,
    ) -> int:
        """Append one encoded batch, honouring acks and fsync policy; returns its base offset.

        Raises DwalError (unknown topic, too large, corrupt, timed out, storage error).
        """
        if self.config.auto_create_topics:
            await self._auto_create(topic)
        leader = self._leader_elsewhere(topic, partition)
        if leader is not None:
            return await self._forward_append(leader, topic, partition, batch, acks, timeout_ms)
        result, wait = self._append(topic, partition, memoryview(batch), acks)
        if wait is not None:
            await self._wait_durable([wait], timeout_ms)
        if result["error_code"]:
            raise DwalError(ErrorCode(result["error_code"]), result.get("error_message"))
        return result["base_offset"]

    async def _forward_append(
        self, leader: int, topic: str, partition: int, batch: bytes, acks: int, timeout_ms: int
    ) -> int:
        body = {
            "acks": acks if acks != ACKS_NONE else ACKS_LEADER,  # an answer is needed here
            "timeout_ms": timeout_ms,
            "topics": [
                {"topic": topic, "partitions": [{"partition": partition, "size": len(batch)}]}
            ],
        }
        response = await self._forward(leader, ApiKey.PRODUCE, body, batch, timeout_ms)
        result = response.body["topics"][0]["partitions"][0]
        if result["error_code"]:
            raise DwalError(ErrorCode(result["error_code"]), result.get("error_message"))
        return result["base_offset"]

    def partition_count(self, topic: str) -> int:
        """The topic's partition count; raises DwalError UNKNOWN_TOPIC_OR_PARTITION."""
        info = self.member.image.topics.get(topic)
        if info is None:
            raise DwalError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"unknown topic {topic!r}")
        return len(info.partitions)

    async def readable_range(self, topic: str, partition: int) -> tuple[int, int]:
        """(log start offset, high watermark) of a partition (asked of its leader when that
        is another broker); raises DwalError as the replica layer does."""
        leader = self._leader_elsewhere(topic, partition)
        if leader is None:
            log = self.replicas.leader_log(topic, partition)[0]
            return log.log_start_offset, log.high_watermark
        body = {
            "topics": [
                {
                    "topic": topic,
                    "partitions": [
                        {"partition": partition, "timestamp": EARLIEST_TIMESTAMP},
                        {"partition": partition, "timestamp": LATEST_TIMESTAMP},
                    ],
                }
            ]
        }
        response = await self._forward(leader, ApiKey.LIST_OFFSETS, body)
        earliest, latest = response.body["topics"][0]["partitions"]
        for result in (earliest, latest):
            if result["error_code"]:
                raise DwalError(ErrorCode(result["error_code"]), result.get("error_message"))
        return earliest["offset"], latest["offset"]

    # The gateways call these for any partition: when another broker leads it, the request
    # is forwarded there over the native protocol (the seed's curl commands work on every
    # node of a cluster).

    def _leader_elsewhere(self, topic: str, partition: int) -> int | None:
        """The broker leading a partition when it is not this one (else None)."""
        state = self.member.image.partition(topic, partition)
        if state is None or state.leader in (NO_LEADER, self.config.node_id):
            return None
        return state.leader

    async def _forward(
        self, leader: int, api_key: ApiKey, body: dict, tail: bytes = b"", timeout_ms: int = 30_000
    ) -> Response:
        broker = self.member.image.brokers.get(leader)
        address = None if broker is None else self._broker_address(broker)
        if address is None:
            raise DwalError(ErrorCode.LEADER_NOT_AVAILABLE, f"no address of broker {leader}")
        idle = self._links.setdefault(address, [])
        link = (
            idle.pop()
            if idle
            else BrokerLink(
                address,
                client_id=f"dwal-gateway-{self.config.node_id}",
                frame_bytes_max=self.config.limits.frame_bytes_max,
            )
        )
        try:
            response = await link.request(
                api_key, body, tail=tail, timeout_seconds=timeout_ms / 1000 + 5
            )
        except BrokerLinkError as error:
            raise DwalError(
                ErrorCode.NETWORK_EXCEPTION, f"forwarding to broker {leader}: {error}"
            ) from None
        except BaseException:
            await link.aclose()
            raise
        if len(idle) < FORWARD_LINKS_IDLE_MAX:
            idle.append(link)
        else:
            await link.aclose()
        return response

    async def _forward_fetch(
        self,
        leader: int,
        topic: str,
        partition: int,
        offset: int,
        max_bytes: int,
        *,
        wait_ms: int = 0,
    ) -> bytes:
        """The leader's batches from `offset`; with `wait_ms`, a long poll for the first."""
        body = {
            "max_wait_ms": wait_ms,
            "min_bytes": 1 if wait_ms else 0,
            "max_bytes": max_bytes,
            "topics": [
                {
                    "topic": topic,
                    "partitions": [
                        {"partition": partition, "fetch_offset": offset, "max_bytes": max_bytes}
                    ],
                }
            ],
        }
        response = await self._forward(leader, ApiKey.FETCH, body, timeout_ms=wait_ms + 30_000)
        result = response.body["topics"][0]["partitions"][0]
        if result["error_code"]:
            raise DwalError(ErrorCode(result["error_code"]), result.get("error_message"))
        return bytes(response.tail)

    async def read_batches(self, topic: str, partition: int, offset: int, max_bytes: int) -> bytes:
        """Return whole batches from `offset` (the first may start before it), at most about
        `max_bytes` (the first batch is always whole), read in a worker thread. Raises
        DwalError. Safe to cancel."""
        leader = self._leader_elsewhere(topic, partition)
        if leader is not None:
            return await self._forward_fetch(leader, topic, partition, offset, max_bytes)
        try:
            piece = self.replicas.leader_log(topic, partition)[0].read(offset, max_bytes)
        except Exception as error:
            code, message = error_of(error)
            raise DwalError(code, message) from None
        with piece:
            if not piece.length:
                await trio.lowlevel.checkpoint()
                return b""
            try:
                return await trio.to_thread.run_sync(piece.read_bytes)
            except OSError as error:
                code, message = error_of(error)
                raise DwalError(code, message) from None

    async def follow_batches(
        self, topic: str, partition: int, offset: int, max_bytes: int, wait_ms: int
    ) -> bytes:
        """`read_batches` for a reader following a partition: when nothing is readable at
        `offset` yet (it is at or above the high watermark, even beyond the log end), wait
        up to `wait_ms` for it, and return b"" if nothing came. Raises DwalError like
        `read_batches` (OFFSET_OUT_OF_RANGE only below the log start offset). Safe to
        cancel."""
        deadline = trio.current_time() + wait_ms / 1000
        while True:
            remaining_ms = max(0, int((deadline - trio.current_time()) * 1000))
            leader = self._leader_elsewhere(topic, partition)
            if leader is not None:
                try:
                    return await self._forward_fetch(
                        leader, topic, partition, offset, max_bytes, wait_ms=remaining_ms
                    )
                except DwalError as error:
                    if error.code != ErrorCode.OFFSET_OUT_OF_RANGE:
                        raise
                    out_of_range = error
                start, high_watermark = await self.readable_range(topic, partition)
                if offset < start:
                    raise out_of_range
                if not remaining_ms:
                    return b""
                # Beyond the leader's log end: its long poll at the high watermark wakes
                # this up when something is written; then look again.
                await self._forward_fetch(
                    leader, topic, partition, high_watermark, 1, wait_ms=remaining_ms
                )
                continue
            try:
                log = self.replicas.leader_log(topic, partition)[0]
            except Exception as error:
                code, message = error_of(error)
                raise DwalError(code, message) from None
            if offset < log.high_watermark or offset < log.log_start_offset:
                return await self.read_batches(topic, partition, offset, max_bytes)
            if not remaining_ms:
                return b""
            # Woken when the high watermark moves (or the log goes away); a lost leadership
            # is noticed at the deadline at the latest.
            with trio.move_on_at(deadline):
                await log.new_data_event.wait()

    async def read_batch_containing(self, topic: str, partition: int, offset: int) -> bytes | None:
        """Return the whole record batch of a partition that holds `offset`, its CRC checked,
        or None when no batch holds it any more (compaction removed the record). Reads only
        that batch (and the headers before it), off the event loop.

        Raises DwalError: UNKNOWN_TOPIC_OR_PARTITION, OFFSET_OUT_OF_RANGE (outside [log start
        offset, high watermark)), CORRUPT_MESSAGE (the stored batch is damaged; it stays on
        disk), KAFKA_STORAGE_ERROR. Safe to cancel.
        """
        leader = self._leader_elsewhere(topic, partition)
        if leader is not None:
            return await self._forwarded_batch_containing(leader, topic, partition, offset)
        try:
            log = self.replicas.leader_log(topic, partition)[0]
            return await log.read_batch_containing(offset)
        except Exception as error:
            code, message = error_of(error)
            raise DwalError(code, message) from None

    async def _forwarded_batch_containing(
        self, leader: int, topic: str, partition: int, offset: int
    ) -> bytes | None:
        """read_batch_containing on the leader: its fetch from `offset` starts with the batch
        holding it (or the next one, when compaction removed it)."""
        data = await self._forward_fetch(
            leader, topic, partition, offset, self.config.limits.frame_bytes_max // 2
        )
        if not data:
            raise DwalError(ErrorCode.OFFSET_OUT_OF_RANGE, f"offset {offset} is not written yet")
        try:
            first = next(scan_batches(data))
        except (ProtocolError, StopIteration) as error:
            raise DwalError(ErrorCode.CORRUPT_MESSAGE, f"forwarded batch: {error}") from None
        header = first.header
        if not header.base_offset <= offset <= header.last_offset:
            return None
        return data[: header.size_bytes]

    def readable_range_or_forward(self, topic: str, partition: int) -> int | None:
        """The leader to ask for a partition's readable range, when it is not this broker."""
        return self._leader_elsewhere(topic, partition)

    # -- offsets ----------------------------------------------------------------------

    async def list_offsets(self, body: dict, tail: bytes, context: RequestContext) -> Reply:
        topics = []
        for entry in body["topics"]:
            results: list[dict[str, Any]] = []
            topics.append({"topic": entry["topic"], "partitions": results})
            for part in entry["partitions"]:
                result = {"partition": part["partition"], "error_code": 0}
                try:
                    log = self.replicas.leader_log(entry["topic"], part["partition"])[0]
                    result.update(self._offset_for(log, part["timestamp"]))
                except DwalError as error:
                    result.update(error_code=int(error.code), error_message=error.message)
                results.append(result)
        return Reply({"topics": topics})

    def _offset_for(self, log: ReplicaLog, timestamp: int) -> dict[str, int]:
        if timestamp == LATEST_TIMESTAMP:
            return {"offset": log.high_watermark, "timestamp": -1}
        if timestamp == EARLIEST_TIMESTAMP:
            return {"offset": log.log_start_offset, "timestamp": -1}
        if timestamp < 0:
            raise DwalError(ErrorCode.INVALID_REQUEST, f"invalid timestamp {timestamp}")
        found = log.offset_for_timestamp(timestamp)
        if found is None or found[0] >= log.high_watermark:
            return {"offset": -1, "timestamp": -1}
        return {"offset": found[0], "timestamp": found[1]}


@dataclass
class _Wait:
    """A produce answer waiting: for its fsync, and with acks=all for the in-sync replicas."""

    topic: str
    partition: int
    log: ReplicaLog
    end_offset: int  # the last appended offset + 1
    result: dict[str, Any]
    replicated: bool
    durable: bool  # wait for this broker's fsync too


__all__ = ["RequestHandlers", "Reply", "ProtocolError"]


_RUN_CONCURRENTLY = frozenset({ApiKey.FETCH})  # long-polls: answered after later requests


async def _already(reply: Reply) -> Reply:
    return reply
