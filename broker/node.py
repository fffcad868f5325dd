"""One broker process: locks the data directory, joins the cluster (its member of the
metadata quorum: see `broker.cluster_member`), opens the logs the metadata image places
here, serves the native protocol and the HTTP and gRPC gateways, and runs background maintenance
(retention, interval flushes), all under one nursery.

`run_broker` is cancellation-safe: cancelling it stops the listeners, lets the root nursery
unwind, then closes every log (final fsync and recovery-point checkpoint) shielded from the
cancellation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from broker.gateway.kafka_entities import KAFKA_LISTENER
from broker.broker_lifecycle import (
    GRPC_LISTENER,
    HTTP_LISTENER,
    NATIVE_LISTENER,
    ListenerAddress,
)
from broker.cluster_member import ClusterMember
from broker.config import BrokerConfig
from broker.data_dir_lock import DataDirLock
from broker.gateway.grpc_gateway import GrpcGateway, open_grpc_gateway
from broker.event_log import log_event
from broker.group_coordinator import OFFSETS_TOPIC, OFFSETS_TOPIC_CONFIGS, GroupCoordinator
from broker.memory_pool import MemoryPool
from broker.replication import ReplicaManager
from broker.request_handlers import RequestHandlers
from broker.server import NativeServer
from broker.storage import StorageError
from broker.topic_registry import TopicRegistry
from protocol import DwalError, ErrorCode
from protocol.api import ApiKey

logger = logging.getLogger("dwal.broker")
# A stopping broker waits at most this long for the writes it appended to be replicated, and
# then as long for the answers to Produce requests it has read.
STOP_DRAIN_SECONDS_MAX = 1.0
# ... and stops serving only once no Produce request came for this long (clients that got
# NOT_LEADER_OR_FOLLOWER have moved on; one still on its way would be cut off unanswered).
STOP_QUIET_SECONDS = 0.2


@dataclass(frozen=True)
class BrokerAddresses:
    host: str
    port: int
    http_port: int | None
    grpc_port: int | None = None
    kafka_port: int | None = None


async def run_broker(
    config: BrokerConfig,
    *,
    stop: trio.Event | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a broker until cancelled, or until `stop` is set: then it leaves the cluster
    gracefully while still serving (`ClusterMember.stop_gracefully`: controller leadership
    handed over, controlled shutdown, leaders moved) and returns.
    `task_status.started(BrokerAddresses)` once listening.

    Start order: bind the listeners, lock the data directory, open the logs, serve. The checks
    that refuse a start (port in use, lock held) come before anything in the data directory is
    read or written, so a refused start changes nothing there (beyond creating a missing
    directory), and the logs are only ever opened, hence closed with a clean-shutdown marker,
    by the lock's holder. Raises OSError naming the address when a port cannot be bound,
    DataDirLockedError or DataDirError when the data directory cannot be locked, StorageError
    when a log cannot be opened.
    """
    assert not config.limits.problems(), config.limits.problems()
    listeners = await _bind_listeners(config)
    try:
        async with open_grpc_gateway(config) as grpc_gateway:
            lock = DataDirLock.acquire(config.data_dir)
            try:
                await _run_locked(config, listeners, grpc_gateway, stop, task_status)
            finally:
                lock.release()  # after every log is closed
    finally:
        for listener in listeners.all():
            listener.socket.close()  # idempotent: serving closes them too


async def _run_locked(
    config: BrokerConfig,
    listeners: BoundListeners,
    grpc_gateway: GrpcGateway | None,
    stop: trio.Event | None,
    task_status,
) -> None:
    native_port = listeners.native[0].socket.getsockname()[1]
    http_port = listeners.http[0].socket.getsockname()[1] if listeners.http else None
    grpc_port = grpc_gateway.port if grpc_gateway is not None else None
    kafka_port = listeners.kafka[0].socket.getsockname()[1] if listeners.kafka else None
    async with open_broker_node(
        config,
        native_port=native_port,
        http_port=http_port,
        grpc_port=grpc_port,
        kafka_port=kafka_port,
        controller_listeners=listeners.controller,
    ) as node:
        async with trio.open_nursery() as nursery:
            addresses, server = await _serve(config, node.handlers, listeners, nursery)
            if grpc_gateway is not None:
                await nursery.start(grpc_gateway.serve, node.handlers)
                addresses = dataclasses.replace(addresses, grpc_port=grpc_port)
            ports = {"port": addresses.port}
            if addresses.http_port is not None:
                ports["http_port"] = addresses.http_port
            if addresses.grpc_port is not None:
                ports["grpc_port"] = addresses.grpc_port
            if addresses.kafka_port is not None:
                ports["kafka_port"] = addresses.kafka_port
            if listeners.controller:
                ports["controller_port"] = listeners.controller[0].socket.getsockname()[1]
            log_event(
                logger,
                logging.INFO,
                "broker_started",
                node_id=config.node_id,
                host=addresses.host,
                **ports,
                data_dir=str(config.data_dir),
            )
            task_status.started(addresses)
            if stop is not None:
                await stop.wait()
                log_event(logger, logging.INFO, "broker_stopping", node_id=config.node_id)
                if not node.member.embedded:
                    # appends end, and those made are replicated before leaders move
                    with trio.move_on_after(STOP_DRAIN_SECONDS_MAX):
                        await node.replicas.drain()
                await node.member.stop_gracefully(
                    config.limits.controlled_shutdown_timeout_ms / 1000
                )
                # Produce requests get their answers (NOT_LEADER_OR_FOLLOWER now, which
                # clients retry at the new leaders) until they stop coming.
                with trio.move_on_after(STOP_DRAIN_SECONDS_MAX):
                    await server.wait_produces_answered(quiet_seconds=STOP_QUIET_SECONDS)
                nursery.cancel_scope.cancel()


@dataclass
class BrokerNode:
    """Everything of a running broker but its network listeners."""

    config: BrokerConfig
    registry: TopicRegistry
    member: ClusterMember
    replicas: ReplicaManager
    coordinator: GroupCoordinator
    handlers: RequestHandlers


@contextlib.asynccontextmanager
async def open_broker_node(
    config: BrokerConfig,
    *,
    native_port: int,
    http_port: int | None = None,
    grpc_port: int | None = None,
    kafka_port: int | None = None,
    controller_listeners: list[trio.SocketListener] | None = None,
) -> AsyncIterator[BrokerNode]:
    """Join the cluster, open the logs, start the background tasks; yield the node once it
    may serve (registered, unfenced, logs open); stop everything and close every log when
    the block exits. The caller holds the data directory's lock. `native_port` and
    `http_port`, `grpc_port` and `kafka_port` are what the broker registers as its
    listeners."""
    registry = await trio.to_thread.run_sync(
        TopicRegistry.open, config.data_dir, config.log_defaults, config.limits
    )
    started = False
    try:
        advertised = [ListenerAddress(NATIVE_LISTENER, config.client_host, native_port)]
        if http_port is not None:
            advertised.append(ListenerAddress(HTTP_LISTENER, config.client_host, http_port))
        if grpc_port is not None:
            advertised.append(ListenerAddress(GRPC_LISTENER, config.client_host, grpc_port))
        if kafka_port is not None:
            advertised.append(ListenerAddress(KAFKA_LISTENER, config.client_host, kafka_port))
        member = ClusterMember(config, registry, advertised=advertised)

        async def alter_partition(body: dict) -> dict:
            return await member.call_controller(ApiKey.ALTER_PARTITION, body)

        replicas = ReplicaManager(
            config.node_id,
            registry,
            lambda: member.image,
            broker_epoch=lambda: member.lifecycle.broker_epoch if member.lifecycle else -1,
            alter_partition=alter_partition,
            frame_bytes_max=config.limits.frame_bytes_max,
            peer_addresses=config.peer_native_addresses,
            replica_lag_time_max_ms=config.replica_lag_time_max_ms,
        )
        member.add_image_listener(replicas.apply_image)

        async def create_offsets_topic() -> None:
            body = {
                "topics": [
                    {
                        "topic": OFFSETS_TOPIC,
                        "partitions": config.offsets_topic_partitions,
                        "replication_factor": -1,
                        "configs": OFFSETS_TOPIC_CONFIGS,
                    }
                ],
                "validate_only": False,
            }
            reply = await member.call_controller(ApiKey.CREATE_TOPICS, body)
            result = reply["topics"][0]
            if result["error_code"] and result["error_code"] != ErrorCode.TOPIC_ALREADY_EXISTS:
                raise DwalError(ErrorCode(result["error_code"]), result.get("error_message"))

        coordinator = GroupCoordinator(config, registry, replicas, create_offsets_topic)
        member.add_image_listener(coordinator.apply_image)
        handlers = RequestHandlers(
            config,
            registry,
            member=member,
            replicas=replicas,
            coordinator=coordinator,
            advertised_port=native_port,
        )
        node = BrokerNode(config, registry, member, replicas, coordinator, handlers)
        async with trio.open_nursery() as nursery:
            await nursery.start(registry.fsync_runner.run)
            await nursery.start(replicas.run)  # before the first image is published
            await nursery.start(member.run, controller_listeners or [])
            await nursery.start(coordinator.run_expiry)
            nursery.start_soon(_retention_loop, registry, config.retention_check_interval_ms)
            nursery.start_soon(_periodic_flush_loop, registry)
            started = True
            yield node
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(registry.close)
        if started:  # a refused start says so in one error line, nothing else
            log_event(logger, logging.INFO, "broker_stopped", node_id=config.node_id)


@dataclass(frozen=True)
class BoundListeners:
    native: list[trio.SocketListener]
    http: list[trio.SocketListener]  # empty when the HTTP gateway is disabled
    controller: list[trio.SocketListener]  # empty for the embedded single voter
    kafka: list[trio.SocketListener] = dataclasses.field(default_factory=list)  # empty: off

    def all(self) -> list[trio.SocketListener]:
        return [*self.native, *self.http, *self.kafka, *self.controller]


async def _bind_listeners(config: BrokerConfig) -> BoundListeners:
    """Bind (and listen on) every port; raises OSError naming the address that failed."""
    bound: list[trio.SocketListener] = []
    try:
        native = await _listen(config.host, config.port)
        bound.extend(native)
        http = []
        if config.http_port >= 0:
            http = await _listen(config.http_bind_host, config.http_port)
            bound.extend(http)
        kafka = []
        if config.kafka_port >= 0:
            kafka = await _listen(config.kafka_bind_host, config.kafka_port)
            bound.extend(kafka)
        controller = []
        if config.controller_quorum is not None:
            controller = await _listen(config.controller_bind_host, config.controller_listen_port)
    except BaseException:
        for listener in bound:
            listener.socket.close()
        raise
    return BoundListeners(native, http, controller, kafka)


async def _serve(
    config: BrokerConfig,
    handlers: RequestHandlers,
    listeners: BoundListeners,
    nursery: trio.Nursery,
) -> tuple[BrokerAddresses, NativeServer]:
    port = listeners.native[0].socket.getsockname()[1]
    memory_pool = MemoryPool(config.limits.queued_request_bytes_max)  # shared by listeners
    server = NativeServer(handlers, memory_pool=memory_pool)
    await nursery.start(server.serve, listeners.native)
    http_port = None
    if listeners.http:
        from broker.gateway.http_gateway import serve_http

        http_port = listeners.http[0].socket.getsockname()[1]
        await nursery.start(
            functools.partial(serve_http, memory_pool=memory_pool), handlers, listeners.http
        )
    kafka_port = None
    if listeners.kafka:
        from broker.gateway.kafka_gateway import serve_kafka

        kafka_port = listeners.kafka[0].socket.getsockname()[1]
        await nursery.start(
            functools.partial(serve_kafka, memory_pool=memory_pool), handlers, listeners.kafka
        )
    return BrokerAddresses(config.host, port, http_port, kafka_port=kafka_port), server


async def _listen(host: str, port: int) -> list[trio.SocketListener]:
    """Open TCP listeners; raises OSError naming the address when that fails."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as error:
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from None


async def _retention_loop(registry: TopicRegistry, interval_ms: int) -> None:
    while True:
        await trio.sleep(interval_ms / 1000)
        try:
            await registry.apply_retention()
            await registry.compact_logs()
        except (OSError, StorageError) as error:
            log_event(logger, logging.ERROR, "retention_failed", error=str(error))


async def _periodic_flush_loop(registry: TopicRegistry) -> None:
    while True:
        await trio.sleep(registry.limits.flush_check_interval_ms / 1000)
        try:
            await registry.flush_due_logs()
        except (OSError, StorageError) as error:
            log_event(logger, logging.ERROR, "interval_flush_failed", error=str(error))
