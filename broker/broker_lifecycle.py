"""A broker's membership of the cluster: register, catch up, heartbeat (Kafka's
BrokerLifecycleManager).

At start the broker registers with the active controller (a new incarnation id per
process, so the controller knows the previous one is gone) and gets its broker epoch, the
index of the registering entry. It is fenced until it has caught up: once its own image has
applied that entry, its heartbeats say so (`metadata_offset`) and the controller unfences
it. `run` reports `started(epoch)` then, and goes on heartbeating every interval. A
heartbeat refused with STALE_BROKER_EPOCH or BROKER_NOT_AVAILABLE (another incarnation
registered, or the broker was shut down) makes it register again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from broker.controller.controller_channel import ControllerChannel
from broker.event_log import log_event
from protocol import DwalError, ErrorCode
from protocol.api import ApiKey

logger = logging.getLogger("dwal.broker")

NATIVE_LISTENER = "NATIVE"  # the names of the listeners a broker registers
HTTP_LISTENER = "HTTP"
GRPC_LISTENER = "GRPC"
CONTROLLER_LISTENER = "CONTROLLER"  # a learner's controller port

REGISTRATION_RETRY_DELAY_SECONDS = 0.1

_REREGISTER = frozenset({ErrorCode.STALE_BROKER_EPOCH, ErrorCode.BROKER_NOT_AVAILABLE})


@dataclass(frozen=True, slots=True)
class ListenerAddress:
    name: str
    host: str
    port: int


class BrokerLifecycle:
    def __init__(
        self,
        node_id: int,
        channel: ControllerChannel,
        *,
        cluster_id: Callable[[], str],  # "" while unknown
        listeners: list[ListenerAddress],
        rack: str | None,
        metadata_offset: Callable[[], int],
        wait_metadata_offset: Callable[[int], Awaitable[object]],
        heartbeat_interval_seconds: float,
        request_timeout_seconds: float,
    ) -> None:
        self.node_id = node_id
        self.channel = channel
        self.cluster_id = cluster_id
        self.listeners = listeners
        self.rack = rack
        self.metadata_offset = metadata_offset
        self.wait_metadata_offset = wait_metadata_offset
        self.heartbeat_interval_seconds = heartbeat_interval_seconds
        self.request_timeout_seconds = request_timeout_seconds
        self.incarnation_id = str(uuid.uuid4())
        self.broker_epoch = -1
        self.fenced = True
        self.registrations = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Register (unless `register` was called), catch up, get unfenced:
        `started(broker_epoch)`; then heartbeat until cancelled."""
        if self.broker_epoch < 0:
            await self.register()
        await self._catch_up()
        while self.fenced:
            await self._heartbeat()
            if self.fenced:
                await trio.sleep(min(self.heartbeat_interval_seconds, 0.05))
        task_status.started(self.broker_epoch)
        while True:
            await trio.sleep(self.heartbeat_interval_seconds)
            await self._heartbeat()

    async def shut_down(self, timeout_seconds: float) -> bool:
        """Controlled shutdown: tell the active controller this broker is leaving, so it
        moves leadership away now instead of after the session timeout. Best effort within
        `timeout_seconds`; returns whether the controller took it. Shielded from the
        cancellation that stops the broker."""
        if self.broker_epoch < 0:
            return False
        body = {
            "broker_id": self.node_id,
            "broker_epoch": self.broker_epoch,
            "metadata_offset": self.metadata_offset(),
            "want_shut_down": True,
        }
        with trio.CancelScope(shield=True), trio.move_on_after(timeout_seconds):
            try:
                await self.channel.call(
                    ApiKey.BROKER_HEARTBEAT, body, timeout_seconds=timeout_seconds
                )
            except DwalError as error:
                log_event(logger, logging.WARNING, "broker_shutdown_failed", error=error.message)
                return False
            log_event(logger, logging.INFO, "broker_shut_down", node_id=self.node_id)
            return True
        log_event(
            logger,
            logging.WARNING,
            "broker_shutdown_failed",
            error=f"no controller answered within {timeout_seconds:g} s",
        )
        return False

    async def register(self) -> int:
        """Register this incarnation with the active controller (retrying what is
        retriable); returns the broker epoch. A learner registers before its image has
        anything: the controller then adds it as a learner, and the log reaches it."""
        body = {
            "broker_id": self.node_id,
            "cluster_id": self.cluster_id(),
            "incarnation_id": self.incarnation_id,
            "listeners": [
                {"name": item.name, "host": item.host, "port": item.port} for item in self.listeners
            ],
            "rack": self.rack,
        }
        while True:
            try:
                reply = await self.channel.call(
                    ApiKey.BROKER_REGISTRATION, body, timeout_seconds=self.request_timeout_seconds
                )
                break
            except DwalError as error:
                if not error.code.retriable:
                    raise
                log_event(logger, logging.WARNING, "broker_registration_retry", error=error.message)
                await trio.sleep(REGISTRATION_RETRY_DELAY_SECONDS)
        self.broker_epoch = reply["broker_epoch"]
        self.fenced = True
        self.registrations += 1
        return self.broker_epoch

    def _heartbeat_timeout(self) -> float:
        """A heartbeat is given two intervals, not the request timeout: one lost in a cut
        link (a blackholed connection) would otherwise hold back the next for seconds
        after the link heals, and the broker would stay fenced that long (measured in the
        cluster simulation); the next one goes out an interval after a timed-out one."""
        return min(self.request_timeout_seconds, max(2 * self.heartbeat_interval_seconds, 0.5))

    async def _catch_up(self) -> None:
        """Wait until this node's image holds its own registration."""
        await self.wait_metadata_offset(self.broker_epoch)
        log_event(
            logger,
            logging.INFO,
            "broker_registered",
            node_id=self.node_id,
            broker_epoch=self.broker_epoch,
        )

    async def _heartbeat(self) -> None:
        body = {
            "broker_id": self.node_id,
            "broker_epoch": self.broker_epoch,
            "metadata_offset": self.metadata_offset(),
            "want_shut_down": False,
        }
        try:
            reply = await self.channel.call(
                ApiKey.BROKER_HEARTBEAT, body, timeout_seconds=self._heartbeat_timeout()
            )
        except DwalError as error:
            if error.code in _REREGISTER:
                log_event(logger, logging.WARNING, "broker_reregistering", reason=error.message)
                await self.register()
                await self._catch_up()
                return
            if not error.code.retriable:
                raise
            log_event(logger, logging.WARNING, "broker_heartbeat_failed", error=error.message)
            return
        if reply["should_shut_down"]:
            await self.register()
            await self._catch_up()
            return
        was_fenced, self.fenced = self.fenced, reply["is_fenced"]
        if was_fenced != self.fenced:
            log_event(
                logger,
                logging.INFO,
                "broker_fenced" if self.fenced else "broker_unfenced",
                node_id=self.node_id,
                broker_epoch=self.broker_epoch,
            )
