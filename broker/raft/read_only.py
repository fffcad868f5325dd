"""Read-index bookkeeping of a leader (Raft thesis 6.4; etcd's readOnly, ReadOnlySafe).

Theory of operation. A read request received while the commit index is C may be served,
linearizably, once the application has applied C, provided the leader is still the leader
at the time the request arrived: confirmed by a quorum of voters answering a heartbeat sent
after that moment. Instead of one heartbeat per request (etcd keys rounds by the client's
context), requests are batched into numbered *rounds*: requests wait in `unsent` until the
node starts the next round (once per Ready), every heartbeat carries the latest round
number, and a voter's response acknowledges that round and all earlier ones. The highest
round acknowledged by a quorum (counting the leader itself) confirms every request of that
round or before. Round numbers only grow for the node's lifetime, so a late response from
an earlier leadership never confirms a later request (it is also dropped for its old term).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

_ROUND_BYTES = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadRequest:
    index: int
    requester: int
    context: bytes
    round: int


def encode_round(round_number: int) -> bytes:
    return round_number.to_bytes(_ROUND_BYTES, "big")


def decode_round(context: bytes) -> int:
    """The round a heartbeat response acknowledges, 0 if the context is not a round."""
    if len(context) != _ROUND_BYTES:
        return 0
    return int.from_bytes(context, "big")


class ReadOnly:
    def __init__(self) -> None:
        self.round = 0  # the latest round started; heartbeats carry it
        self._unsent: list[tuple[int, int, bytes]] = []  # (index, requester, context)
        self._pending: collections.deque[ReadRequest] = collections.deque()
        self._acknowledged: dict[int, int] = {}  # voter -> highest round it acknowledged

    def __len__(self) -> int:
        return len(self._unsent) + len(self._pending)

    def add(self, index: int, requester: int, context: bytes) -> None:
        self._unsent.append((index, requester, context))

    def has_unsent(self) -> bool:
        return bool(self._unsent)

    def start_round(self) -> int:
        """Move the unsent requests into a new round; returns its number."""
        self.round += 1
        for index, requester, context in self._unsent:
            self._pending.append(
                ReadRequest(index=index, requester=requester, context=context, round=self.round)
            )
        self._unsent = []
        return self.round

    def acknowledge(self, node: int, round_number: int) -> None:
        if 0 < round_number <= self.round:
            self._acknowledged[node] = max(self._acknowledged.get(node, 0), round_number)

    def confirmed(self, voters: frozenset[int], self_id: int) -> list[ReadRequest]:
        """Remove and return the requests whose round a quorum of voters acknowledged."""
        if not self._pending or not voters:
            return []
        rounds = sorted(
            (self.round if node == self_id else self._acknowledged.get(node, 0) for node in voters),
            reverse=True,
        )
        confirmed_round = rounds[len(voters) // 2]
        released = []
        while self._pending and self._pending[0].round <= confirmed_round:
            released.append(self._pending.popleft())
        return released

    def reset(self) -> None:
        """Forget every request and acknowledgement (leadership changed); rounds go on."""
        self._unsent = []
        self._pending.clear()
        self._acknowledged = {}
