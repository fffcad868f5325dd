"""How Raft messages travel between nodes: the interface every transport implements.

Theory of operation. Raft tolerates lost, duplicated and reordered messages, so a transport
never makes the node wait: `send` puts the message on a bounded queue for its target and
returns at once, dropping it (and counting the drop) when the queue is full, the target is
unknown or the transport is closed. Received messages come out of one bounded channel,
`receive_channel`; when the node falls behind, new arrivals are dropped there too. Background
work (connections, timers) runs in `run`, which a component starts with `nursery.start` and
which stops, closing every connection, when its scope is cancelled.

Implementations: `MemoryNetwork` endpoints (tests and the deterministic simulation, with a
seeded fault model) and `TcpTransport` (frames of the native protocol over TCP). Both pass
the same conformance suite (tests/broker/raft/test_io_transport.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from .messages import Message

PEER_QUEUE_MESSAGES_MAX = 1024
RECEIVE_QUEUE_MESSAGES_MAX = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportLimits:
    """Every queue a transport keeps, bounded."""

    peer_queue_messages_max: int = PEER_QUEUE_MESSAGES_MAX  # per target, waiting to be sent
    receive_queue_messages_max: int = RECEIVE_QUEUE_MESSAGES_MAX  # arrived, not yet taken

    def validate(self) -> None:
        """Raise ValueError unless every limit is positive."""
        if self.peer_queue_messages_max < 1 or self.receive_queue_messages_max < 1:
            raise ValueError("transport queue limits must be at least 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportStatistics:
    messages_sent: int  # accepted by `send`
    messages_dropped_on_send: int  # queue full, unknown target, closed
    messages_received: int  # handed to the receive channel
    messages_dropped_on_receive: int  # receive channel full, bad or misrouted message
    queued_messages: int  # accepted, not yet written out
    connections: int  # open connections (0 for the memory network)


class Transport(Protocol):
    """What a `RaftDriver` needs to talk to its peers."""

    @property
    def node_id(self) -> int: ...

    @property
    def receive_channel(self) -> trio.MemoryReceiveChannel[Message]:
        """Messages addressed to this node, in arrival order."""
        ...

    def send(self, message: Message) -> bool:
        """Queue `message` for `message.target`; return False if it was dropped. Never
        blocks (so it is not async): Raft retries whatever is lost."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Do the background work until cancelled; `started()` once messages can flow."""
        ...

    def statistics(self) -> TransportStatistics: ...


class Inbox:
    """The bounded receiving side shared by transports: arrivals beyond the limit are dropped."""

    def __init__(self, messages_max: int) -> None:
        self._send, self.receive_channel = trio.open_memory_channel[Message](messages_max)
        self.received = 0
        self.dropped = 0

    def deliver(self, message: Message) -> bool:
        """Hand `message` to the receiver; return False (counting a drop) if it is full or
        gone."""
        try:
            self._send.send_nowait(message)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.dropped += 1
            return False
        self.received += 1
        return True

    def count_drop(self) -> None:
        self.dropped += 1

    def queued(self) -> int:
        return self._send.statistics().current_buffer_used

    def close(self) -> None:
        self._send.close()
