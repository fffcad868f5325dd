"""The controller port: Raft between the quorum's nodes, and the requests brokers send the
active controller (registration, heartbeats, forwarded admin requests), on one listener,
as Kafka's CONTROLLER listener carries both.

Both kinds of connection speak frames of the native protocol; they differ in the frame
header: a Raft peer's is the one-element array `[FRAME_KIND_MESSAGE]` (msgpack 0x91), a
request's the five-element array of the native protocol (0x95). Each accepted connection is
routed by its first frame's first header byte, read with MSG_PEEK so that the protocol that
takes the connection reads the stream from its first byte: Raft peers go to
`TcpTransport.serve_inbound`, requests to a `NativeServer` over `ControllerRequestHandlers`,
which answers controller requests only.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from broker.config import BrokerConfig
from broker.controller.controller_apis import ControllerApis
from broker.event_log import log_event
from broker.raft.tcp_transport import TcpTransport
from broker.server import NativeServer
from protocol import DwalError, ErrorCode
from protocol.api import API_VERSIONS, ApiKey

logger = logging.getLogger("dwal.controller")

_PREFIX_BYTES = 8  # u32 frame length, u32 header length
_RAFT_HEADER_BYTE = 0x91  # msgpack fixarray of 1
_REQUEST_HEADER_BYTE = 0x95  # msgpack fixarray of 5
ROUTE_TIMEOUT_SECONDS = 10.0  # default first-frame timeout (Limits.controller_first_frame...)


class ControllerRequestHandlers:
    """What a NativeServer needs (`config`, `start`), answering controller requests only."""

    def __init__(self, config: BrokerConfig, apis: ControllerApis) -> None:
        self.config = config
        self.apis = apis

    async def start(
        self, api_key: ApiKey, body: dict, tail: Any, context: Any
    ) -> Callable[[], Awaitable[Any]]:
        from broker.request_handlers import Reply

        if api_key == ApiKey.API_VERSIONS:
            versions = [[int(key), low, high] for key, (low, high) in API_VERSIONS.items()]
            reply = Reply({"api_versions": versions})
        elif api_key in self.apis.table:
            reply = Reply(await self.apis.handle(api_key, body))
        else:
            raise DwalError(
                ErrorCode.INVALID_REQUEST,
                f"the controller port answers controller requests, not {api_key.name}: "
                "send it to a broker's native port",
            )
        return functools.partial(_already, reply)


async def _already(reply: Any) -> Any:
    return reply


class ControllerListener:
    def __init__(
        self,
        transport: TcpTransport,
        rpc_server: NativeServer,
        *,
        first_frame_timeout_seconds: float | None = None,
    ) -> None:
        """A connection that shows no first frame within `first_frame_timeout_seconds`
        (None: ROUTE_TIMEOUT_SECONDS) is closed."""
        self.transport = transport
        self.rpc_server = rpc_server
        self.first_frame_timeout_seconds = first_frame_timeout_seconds
        self.refused = 0

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await trio.serve_listeners(self._route, listeners, task_status=task_status)

    async def _route(self, stream: trio.SocketStream) -> None:
        kind = None
        timeout = self.first_frame_timeout_seconds
        with trio.move_on_after(ROUTE_TIMEOUT_SECONDS if timeout is None else timeout):
            kind = await _peek_header_byte(stream)
        if kind == _RAFT_HEADER_BYTE:
            await self.transport.serve_inbound(stream)
        elif kind == _REQUEST_HEADER_BYTE:
            await self.rpc_server.handle_connection(stream)
        else:
            self.refused += 1
            log_event(logger, logging.WARNING, "controller_connection_refused", first_byte=kind)
            with trio.CancelScope(shield=True):
                await stream.aclose()


async def _peek_header_byte(stream: trio.SocketStream) -> int | None:
    """The first header byte of the connection's first frame, left unread; None when the
    peer closes first."""
    while True:
        try:
            head = await stream.socket.recv(_PREFIX_BYTES + 1, socket.MSG_PEEK)
        except OSError:
            return None
        if not head:
            return None
        if len(head) > _PREFIX_BYTES:
            return head[_PREFIX_BYTES]
        # Fewer bytes than a prefix and a header byte arrived (rare: a frame's first bytes
        # come in one segment). A peek cannot see the peer's close behind buffered bytes;
        # the TCP state can (Linux). Else give the rest a moment rather than spin.
        if _peer_closed(stream):
            return None
        await trio.sleep(0.001)


_TCP_CLOSE_WAIT = 8  # Linux tcp_states.h: the peer has sent its FIN


def _peer_closed(stream: trio.SocketStream) -> bool:
    """True when the peer has closed its side (known on Linux only; else False)."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return False
    try:
        state = stream.socket.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)
    except OSError:
        return False
    return bool(state) and state[0] == _TCP_CLOSE_WAIT
