"""Raft messages over TCP, in frames of the native protocol.

Theory of operation. Each node dials every peer it sends to and only writes on that
connection; it accepts connections from peers and only reads on those (like etcd's rafthttp
streams, one per direction), so there is no request/response matching at all. A frame is
the native protocol's `u32 frame_length | u32 header_length | header | tail` (see
`protocol.frame`) with the msgpack header `[FRAME_KIND_MESSAGE]` and the tail
`messages.encode_message(message)`.

Per peer, `send` puts the message on a bounded channel (dropping it when full) and one
sender task drains it: it connects (with a timeout), writes whatever is queued in one
`send_all` of at most `write_batch_bytes_max`, and on any failure closes the connection,
drops what is queued (stale by the time a connection is back; Raft resends what matters)
and reconnects after an exponential backoff with jitter. The receiving side decodes frames
with a bounded `FrameDecoder`, checks each message and hands it to the bounded inbox; a peer
that sends a malformed frame is disconnected. The number of accepted connections is capped.

Everything runs in `run`'s nursery; cancelling it closes every socket.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import trio

from protocol.errors import ProtocolError
from protocol.frame import FrameDecoder, frame_prefix

from .messages import Message, decode_message, encode_message
from .transport import Inbox, TransportLimits, TransportStatistics

FRAME_KIND_MESSAGE = 1

logger = logging.getLogger("dwal.raft")


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpTransportConfig:
    node_id: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 0  # 0: any free port, see `TcpTransport.listen_port`
    peers: dict[int, tuple[str, int]] = field(default_factory=dict)  # node id -> address
    limits: TransportLimits = TransportLimits()
    # Largest frame received (a message with a snapshot may be large); a peer that announces
    # a larger one is disconnected.
    frame_bytes_max: int = 64 * 1024 * 1024
    frame_header_bytes_max: int = 64  # a larger frame header disconnects the peer
    receive_bytes: int = 256 * 1024  # one read from a peer's socket
    write_batch_bytes_max: int = 1024 * 1024
    connect_timeout_seconds: float = 5.0
    reconnect_backoff_seconds_min: float = 0.05
    reconnect_backoff_seconds_max: float = 2.0
    inbound_connections_max: int = 64
    # False: `run` binds no port; the owner accepts connections and hands the peers' ones
    # to `serve_inbound` (a listener shared with other protocols).
    listen: bool = True

    def validate(self) -> None:
        """Raise ValueError for an impossible setting."""
        self.limits.validate()
        if self.node_id <= 0:
            raise ValueError("node_id must be positive")
        if self.node_id in self.peers:
            raise ValueError("a node is not its own peer")
        if not self.frame_bytes_max > self.frame_header_bytes_max >= 16:
            raise ValueError("need frame_bytes_max > frame_header_bytes_max >= 16")
        if self.receive_bytes < 1024:
            raise ValueError("receive_bytes must be >= 1024")
        if self.write_batch_bytes_max < 1 or self.inbound_connections_max < 1:
            raise ValueError("write_batch_bytes_max and inbound_connections_max must be >= 1")
        if not 0 < self.reconnect_backoff_seconds_min <= self.reconnect_backoff_seconds_max:
            raise ValueError("need 0 < reconnect_backoff_seconds_min <= ..._max")


def encode_frame(message: Message) -> bytes:
    """Return the whole frame carrying `message`."""
    payload = encode_message(message)
    return frame_prefix([FRAME_KIND_MESSAGE], len(payload)) + payload


def decode_frame(header: object, tail: memoryview) -> Message:
    """Return the message of a received frame. Raises ProtocolError."""
    if header != [FRAME_KIND_MESSAGE]:
        raise ProtocolError(f"unexpected raft frame header {header!r}")
    return decode_message(bytes(tail))


class _Peer:
    """One target's queue and sender task."""

    def __init__(self, node_id: int, address: tuple[str, int], queue_max: int) -> None:
        self.node_id = node_id
        self.address = address
        self.send_channel, self.receive_channel = trio.open_memory_channel[bytes](queue_max)
        self.cancel_scope = trio.CancelScope()
        self.connected = False


class TcpTransport:
    """See the module's theory of operation and `Transport`."""

    def __init__(self, config: TcpTransportConfig, random_source: random.Random | None = None):
        config.validate()
        self.config = config
        self._random = random_source or random.Random()
        self.inbox = Inbox(config.limits.receive_queue_messages_max)
        self._peers: dict[int, _Peer] = {}
        for node_id, address in config.peers.items():
            self._peers[node_id] = self._new_peer(node_id, address)
        self._nursery: trio.Nursery | None = None
        self._listen_port: int | None = None
        self._inbound_connections = 0
        self._sent = 0
        self._dropped = 0
        self._closed = False

    def _new_peer(self, node_id: int, address: tuple[str, int]) -> _Peer:
        return _Peer(node_id, address, self.config.limits.peer_queue_messages_max)

    @property
    def node_id(self) -> int:
        return self.config.node_id

    @property
    def listen_port(self) -> int:
        """The port bound by `run` (known once it has started)."""
        assert self._listen_port is not None, "the transport is not running"
        return self._listen_port

    @property
    def receive_channel(self) -> trio.MemoryReceiveChannel[Message]:
        return self.inbox.receive_channel

    def set_peer(self, node_id: int, host: str, port: int) -> None:
        """Add a peer or change its address (its queued messages are dropped)."""
        assert node_id != self.node_id
        self.remove_peer(node_id)
        peer = self._new_peer(node_id, (host, port))
        self._peers[node_id] = peer
        if self._nursery is not None:
            self._nursery.start_soon(self._run_sender, peer)

    def remove_peer(self, node_id: int) -> None:
        peer = self._peers.pop(node_id, None)
        if peer is not None:
            peer.cancel_scope.cancel()
            peer.send_channel.close()

    def send(self, message: Message) -> bool:
        """Queue `message` for its target; False if dropped (unknown target, queue full,
        closed). Never blocks."""
        assert message.source == self.node_id, message
        peer = self._peers.get(message.target)
        if peer is None or self._closed:
            self._dropped += 1
            return False
        try:
            peer.send_channel.send_nowait(encode_frame(message))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._dropped += 1
            return False
        self._sent += 1
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and send until cancelled; `started()` once the listener is bound. Raises
        OSError if the address cannot be bound. Closes every connection when cancelled."""
        listeners = []
        if self.config.listen:
            listeners = await trio.open_tcp_listeners(
                self.config.listen_port, host=self.config.listen_host
            )
        try:
            if listeners:
                self._listen_port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                for peer in list(self._peers.values()):
                    nursery.start_soon(self._run_sender, peer)
                # Run until cancelled even with nothing to do yet: peers (learners) may be
                # added, and connections accepted elsewhere handed in, at any time.
                nursery.start_soon(trio.sleep_forever)
                task_status.started()
        finally:
            self._nursery = None
            self._closed = True
            self.inbox.close()
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    # Sending side.

    async def _run_sender(self, peer: _Peer) -> None:
        backoff = self.config.reconnect_backoff_seconds_min
        with peer.cancel_scope:
            async for first_frame in peer.receive_channel:
                stream = await self._connect(peer)
                if stream is None:
                    self._drop_queued(peer, 1)
                    await trio.sleep(backoff * (0.5 + self._random.random()))
                    backoff = min(backoff * 2, self.config.reconnect_backoff_seconds_max)
                    continue
                backoff = self.config.reconnect_backoff_seconds_min
                peer.connected = True
                try:
                    await self._write_until_broken(peer, stream, first_frame)
                finally:
                    peer.connected = False
                    with trio.CancelScope(shield=True):
                        await stream.aclose()

    async def _connect(self, peer: _Peer) -> trio.SocketStream | None:
        host, port = peer.address
        with trio.move_on_after(self.config.connect_timeout_seconds):
            try:
                return await trio.open_tcp_stream(host, port)
            except OSError as error:
                logger.debug("raft %d: cannot connect to %d: %s", self.node_id, peer.node_id, error)
                return None
        return None

    async def _write_until_broken(
        self, peer: _Peer, stream: trio.SocketStream, first_frame: bytes
    ) -> None:
        """Write queued frames in batches; return when the connection breaks (the batch being
        written is lost) or the queue is closed."""
        frames = [first_frame]
        while True:
            size = len(frames[0])
            while size < self.config.write_batch_bytes_max:
                try:
                    frame = peer.receive_channel.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                frames.append(frame)
                size += len(frame)
            try:
                await stream.send_all(b"".join(frames))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                logger.debug(
                    "raft %d: connection to %d broke: %s", self.node_id, peer.node_id, error
                )
                self._dropped += len(frames)
                return
            try:
                frames = [await peer.receive_channel.receive()]
            except trio.EndOfChannel:
                return

    def _drop_queued(self, peer: _Peer, already_taken: int) -> None:
        dropped = already_taken
        while True:
            try:
                peer.receive_channel.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            dropped += 1
        self._dropped += dropped

    # Receiving side.

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            stream = await listener.accept()
            if self._inbound_connections >= self.config.inbound_connections_max:
                logger.warning("raft %d: refusing a connection over the limit", self.node_id)
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                continue
            self._inbound_connections += 1
            nursery.start_soon(self._receive_from, stream)

    async def serve_inbound(self, stream: trio.SocketStream) -> None:
        """Receive a peer's messages from a connection accepted elsewhere, until it ends
        (closing it). Connections over `inbound_connections_max` are closed at once."""
        if self._closed or self._inbound_connections >= self.config.inbound_connections_max:
            logger.warning("raft %d: refusing a connection over the limit", self.node_id)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        self._inbound_connections += 1
        await self._receive_from(stream)

    async def _receive_from(self, stream: trio.SocketStream) -> None:
        decoder = FrameDecoder(
            frame_bytes_max=self.config.frame_bytes_max,
            header_bytes_max=self.config.frame_header_bytes_max,
        )
        try:
            while True:
                try:
                    data = await stream.receive_some(self.config.receive_bytes)
                except (trio.BrokenResourceError, OSError):
                    return
                if not data:
                    return
                decoder.feed(data)
                if not self._deliver_frames(decoder):
                    return
        finally:
            self._inbound_connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _deliver_frames(self, decoder: FrameDecoder) -> bool:
        """Deliver every complete frame; return False if the peer must be disconnected."""
        while True:
            try:
                frame = decoder.next_frame()
                if frame is None:
                    return True
                message = decode_frame(*frame)
            except ProtocolError as error:
                logger.warning("raft %d: bad frame from a peer: %s", self.node_id, error)
                self.inbox.count_drop()
                return False
            if message.target != self.node_id:
                self.inbox.count_drop()
                continue
            self.inbox.deliver(message)

    def statistics(self) -> TransportStatistics:
        queued = sum(
            peer.send_channel.statistics().current_buffer_used for peer in self._peers.values()
        )
        connected = sum(1 for peer in self._peers.values() if peer.connected)
        return TransportStatistics(
            messages_sent=self._sent,
            messages_dropped_on_send=self._dropped,
            messages_received=self.inbox.received,
            messages_dropped_on_receive=self.inbox.dropped,
            queued_messages=queued,
            connections=connected + self._inbound_connections,
        )
