"""One broker process: locks the data directory, opens the logs, serves the native protocol
and the HTTP gateway, and runs background maintenance (retention, interval flushes), all
under one nursery.

`run_broker` is cancellation-safe: cancelling it stops the listeners, lets the root nursery
unwind, then closes every log (final fsync and recovery-point checkpoint) shielded from the
cancellation.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import trio

from broker.config import BrokerConfig
from broker.data_dir_lock import DataDirLock
from broker.event_log import log_event
from broker.group_coordinator import GroupCoordinator
from broker.memory_pool import MemoryPool
from broker.request_handlers import RequestHandlers
from broker.server import NativeServer
from broker.storage import StorageError
from broker.topic_registry import TopicRegistry

logger = logging.getLogger("dwal.broker")


@dataclass(frozen=True)
class BrokerAddresses:
    host: str
    port: int
    http_port: int | None


async def run_broker(config: BrokerConfig, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run a broker until cancelled; `task_status.started(BrokerAddresses)` once listening.

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
        lock = DataDirLock.acquire(config.data_dir)
        try:
            await _run_locked(config, listeners, task_status)
        finally:
            lock.release()  # after every log is closed
    finally:
        for listener in (*listeners.native, *listeners.http):
            listener.socket.close()  # idempotent: serving closes them too


async def _run_locked(config: BrokerConfig, listeners: BoundListeners, task_status) -> None:
    registry = await trio.to_thread.run_sync(
        TopicRegistry.open, config.data_dir, config.log_defaults, config.limits
    )
    try:
        coordinator = GroupCoordinator(config, registry)
        await trio.to_thread.run_sync(coordinator.load)
        async with trio.open_nursery() as nursery:
            await nursery.start(registry.fsync_runner.run)
            await nursery.start(coordinator.run_expiry)
            addresses = await _serve(config, registry, coordinator, listeners, nursery)
            nursery.start_soon(_retention_loop, registry, config.retention_check_interval_ms)
            nursery.start_soon(_periodic_flush_loop, registry)
            ports = {"port": addresses.port}
            if addresses.http_port is not None:
                ports["http_port"] = addresses.http_port
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
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(registry.close)
        log_event(logger, logging.INFO, "broker_stopped", node_id=config.node_id)


@dataclass(frozen=True)
class BoundListeners:
    native: list[trio.SocketListener]
    http: list[trio.SocketListener]  # empty when the HTTP gateway is disabled


async def _bind_listeners(config: BrokerConfig) -> BoundListeners:
    """Bind (and listen on) every port; raises OSError naming the address that failed."""
    native = await _listen(config.host, config.port)
    if config.http_port < 0:
        return BoundListeners(native, [])
    try:
        http = await _listen(config.http_bind_host, config.http_port)
    except BaseException:
        for listener in native:
            listener.socket.close()
        raise
    return BoundListeners(native, http)


async def _serve(
    config: BrokerConfig,
    registry: TopicRegistry,
    coordinator: GroupCoordinator,
    listeners: BoundListeners,
    nursery: trio.Nursery,
) -> BrokerAddresses:
    port = listeners.native[0].socket.getsockname()[1]
    handlers = RequestHandlers(config, registry, advertised_port=port, coordinator=coordinator)
    memory_pool = MemoryPool(config.limits.queued_request_bytes_max)  # shared by listeners
    await nursery.start(NativeServer(handlers, memory_pool=memory_pool).serve, listeners.native)
    http_port = None
    if listeners.http:
        from broker.gateway.http_gateway import serve_http

        http_port = listeners.http[0].socket.getsockname()[1]
        await nursery.start(
            functools.partial(serve_http, memory_pool=memory_pool), handlers, listeners.http
        )
    return BrokerAddresses(config.host, port, http_port)


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
