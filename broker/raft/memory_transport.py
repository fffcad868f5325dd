"""An in-memory network of Raft transports with a seeded fault model, for tests and the
deterministic simulation.

Theory of operation. `MemoryNetwork` hands out one `MemoryTransport` endpoint per node id.
`send` decides a message's fate at once, with the network's injected `random.Random`: lost
(probability `loss_probability`), duplicated (`duplicate_probability`), and delayed by a
uniform delay in [`delay_seconds_min`, `delay_seconds_max`] of trio time, which reorders
messages whose delays overlap. Messages without delay go straight to the target's inbox;
delayed ones wait in a heap that `MemoryNetwork.run` drains as trio's clock passes their
delivery time (under `trio.testing.MockClock` that takes no real time). Partitions are a set
of cut directed links: `partition` cuts every link between groups both ways, `cut` one way,
`isolate` one node, `heal` restores everything. A cut is checked when a message is sent and
again when it is delivered, so a partition also swallows messages already in flight.
In flight messages per directed link are bounded (`peer_queue_messages_max`); beyond it they
are dropped, as a full send queue would.

Every decision draws from the one seeded random in a fixed order, so a run is replayed
exactly by replaying its inputs with the same seed.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import trio

from .messages import Message
from .transport import Inbox, TransportLimits, TransportStatistics


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultModel:
    loss_probability: float = 0.0
    duplicate_probability: float = 0.0
    delay_seconds_min: float = 0.0
    delay_seconds_max: float = 0.0

    def validate(self) -> None:
        """Raise ValueError for probabilities outside [0, 1] or a bad delay range."""
        for probability in (self.loss_probability, self.duplicate_probability):
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"probability {probability} is outside [0, 1]")
        if not 0.0 <= self.delay_seconds_min <= self.delay_seconds_max:
            raise ValueError("need 0 <= delay_seconds_min <= delay_seconds_max")


NO_FAULTS = FaultModel()


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkStatistics:
    messages_sent: int
    messages_delivered: int
    messages_lost: int  # by the fault model
    messages_cut: int  # by a partition
    messages_duplicated: int
    messages_in_flight: int


class MemoryNetwork:
    """Connects `MemoryTransport` endpoints; see the module's theory of operation."""

    def __init__(
        self,
        random_source: random.Random,
        faults: FaultModel = NO_FAULTS,
        limits: TransportLimits = TransportLimits(),
    ) -> None:
        faults.validate()
        limits.validate()
        self._random = random_source
        self.faults = faults
        self.limits = limits
        self._endpoints: dict[int, MemoryTransport] = {}
        self._cut_links: set[tuple[int, int]] = set()
        self._in_flight: list[tuple[float, int, Message]] = []  # heap by delivery time
        self._in_flight_per_link: Counter[tuple[int, int]] = Counter()
        self._sequence = 0
        self._wakeup = trio.Event()
        self._sent = self._delivered = self._lost = self._cut = self._duplicated = 0

    # Endpoints.

    def endpoint(self, node_id: int) -> MemoryTransport:
        """Return a new endpoint for `node_id`, replacing (and closing) any earlier one, as
        a restarted process replaces the old one: messages in flight reach the new one."""
        assert node_id > 0
        old = self._endpoints.get(node_id)
        if old is not None:
            old.close()
        endpoint = MemoryTransport(self, node_id)
        self._endpoints[node_id] = endpoint
        return endpoint

    def detach(self, node_id: int) -> None:
        """Take `node_id` off the network (a crash): messages to it are dropped."""
        endpoint = self._endpoints.pop(node_id, None)
        if endpoint is not None:
            endpoint.close()

    # Faults.

    def set_faults(self, faults: FaultModel) -> None:
        faults.validate()
        self.faults = faults

    def cut(self, source: int, target: int) -> None:
        """Drop every message from `source` to `target` (one way) until healed."""
        self._cut_links.add((source, target))

    def partition(self, *groups: Iterable[int]) -> None:
        """Cut every link between nodes of different groups, both ways."""
        sets = [frozenset(group) for group in groups]
        for number, group in enumerate(sets):
            for other in sets[number + 1 :]:
                for a in sorted(group):
                    for b in sorted(other):
                        self._cut_links.add((a, b))
                        self._cut_links.add((b, a))

    def isolate(self, node_id: int, all_nodes: Iterable[int]) -> None:
        """Cut `node_id` off from every other node of `all_nodes`, both ways."""
        self.partition([node_id], [n for n in all_nodes if n != node_id])

    def heal(self) -> None:
        """Restore every link (the fault model stays as it is)."""
        self._cut_links.clear()

    def is_cut(self, source: int, target: int) -> bool:
        return (source, target) in self._cut_links

    # Sending and delivery.

    def submit(self, message: Message) -> bool:
        """Decide `message`'s fate (see the theory); False if it was refused at once (its
        link is full). Used by the endpoints."""
        self._sent += 1
        link = (message.source, message.target)
        if link in self._cut_links:
            self._cut += 1
            return True  # accepted, as a real network would, then lost
        faults = self.faults
        if faults.loss_probability and self._random.random() < faults.loss_probability:
            self._lost += 1
            return True
        copies = 1
        if faults.duplicate_probability and self._random.random() < faults.duplicate_probability:
            copies = 2
            self._duplicated += 1
        for _ in range(copies):
            if not self._schedule(message, link):
                return False
        return True

    def _schedule(self, message: Message, link: tuple[int, int]) -> bool:
        faults = self.faults
        delay = 0.0
        if faults.delay_seconds_max > 0:
            delay = self._random.uniform(faults.delay_seconds_min, faults.delay_seconds_max)
        if delay == 0.0:
            self._deliver(message)
            return True
        if self._in_flight_per_link[link] >= self.limits.peer_queue_messages_max:
            return False
        self._in_flight_per_link[link] += 1
        self._sequence += 1
        heapq.heappush(self._in_flight, (trio.current_time() + delay, self._sequence, message))
        self._wakeup.set()
        return True

    def _deliver(self, message: Message) -> None:
        if (message.source, message.target) in self._cut_links:
            self._cut += 1
            return
        endpoint = self._endpoints.get(message.target)
        if endpoint is not None and endpoint.inbox.deliver(message):
            self._delivered += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver delayed messages when their time comes, until cancelled."""
        task_status.started()
        while True:
            now = trio.current_time()
            while self._in_flight and self._in_flight[0][0] <= now:
                _, _, message = heapq.heappop(self._in_flight)
                self._in_flight_per_link[(message.source, message.target)] -= 1
                self._deliver(message)
            self._wakeup = trio.Event()
            deadline = self._in_flight[0][0] if self._in_flight else math.inf
            with trio.move_on_at(deadline):
                await self._wakeup.wait()

    def drop_in_flight(self) -> None:
        """Forget every message still in flight (tests)."""
        self._in_flight.clear()
        self._in_flight_per_link.clear()

    def statistics(self) -> NetworkStatistics:
        return NetworkStatistics(
            messages_sent=self._sent,
            messages_delivered=self._delivered,
            messages_lost=self._lost,
            messages_cut=self._cut,
            messages_duplicated=self._duplicated,
            messages_in_flight=len(self._in_flight),
        )


class MemoryTransport:
    """One node's endpoint on a `MemoryNetwork` (see `Transport`)."""

    def __init__(self, network: MemoryNetwork, node_id: int) -> None:
        self._network = network
        self._node_id = node_id
        self.inbox = Inbox(network.limits.receive_queue_messages_max)
        self._closed = False
        self._sent = 0
        self._dropped = 0

    @property
    def node_id(self) -> int:
        return self._node_id

    @property
    def receive_channel(self) -> trio.MemoryReceiveChannel[Message]:
        return self.inbox.receive_channel

    def send(self, message: Message) -> bool:
        """Hand `message` to the network; False if dropped at once (closed endpoint, full
        link). A message the fault model loses later still counts as sent. Never blocks."""
        assert message.source == self._node_id, message
        if self._closed or message.target == self._node_id:
            self._dropped += 1
            return False
        if not self._network.submit(message):
            self._dropped += 1
            return False
        self._sent += 1
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing to do in the background (the network delivers); closes on cancellation."""
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self.close()

    def close(self) -> None:
        self._closed = True
        self.inbox.close()

    def statistics(self) -> TransportStatistics:
        return TransportStatistics(
            messages_sent=self._sent,
            messages_dropped_on_send=self._dropped,
            messages_received=self.inbox.received,
            messages_dropped_on_receive=self.inbox.dropped,
            queued_messages=0,
            connections=0,
        )
