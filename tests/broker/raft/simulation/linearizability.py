"""A linearizability checker for key-value histories (Wing & Gong search with Lowe's
memoization, as in Knossos and Porcupine).

Theory of operation. A history is a list of operations, each with the time it was invoked
and the time it completed (`None` when the client gave up: a timed-out operation may or may
not have taken effect, so it is treated as completing at infinity with any output allowed;
linearizing it last is then the same as it never having happened). Operations on different
keys commute, so the history is split per key (P-compositionality) and each key is checked
as one register: `put(v)`, `get() -> v` (None when absent), `cas(expected, new) -> bool`.

The search walks the events in time order. At a call event it tries to linearize that
operation now: if the register model accepts it (with its observed output), the operation is
lifted out of the event list and the search continues; at a return event whose operation has
not been linearized yet, the current order is impossible and the search backtracks. States
already explored, (set of linearized operations, register value), are remembered and never
explored twice. The first complete walk proves the key linearizable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

UNKNOWN = object()  # the output of an operation whose completion was never seen


@dataclass(slots=True, kw_only=True)
class Operation:
    client: int
    kind: str  # "put", "get" or "cas"
    key: bytes
    value: bytes | None = None  # put's value, cas's new value
    expected: bytes | None = None  # cas's expected value
    invoked_at: float
    completed_at: float | None = None  # None: timed out, outcome unknown
    output: Any = UNKNOWN  # get: the value read; cas: whether it swapped; put: None

    def completes(self, completed_at: float, output: Any) -> None:
        self.completed_at = completed_at
        self.output = output


@dataclass(frozen=True, slots=True)
class CheckResult:
    linearizable: bool
    key: bytes | None = None  # the first key found not linearizable
    operations: tuple[Operation, ...] = ()  # that key's history
    explored_states: int = 0


def step(state: bytes | None, operation: Operation) -> tuple[bool, bytes | None]:
    """The register model: return (the output is possible, state after)."""
    output = operation.output
    if operation.kind == "put":
        return True, operation.value
    if operation.kind == "get":
        return output is UNKNOWN or output == state, state
    assert operation.kind == "cas", operation.kind
    swapped = state == operation.expected
    if output is not UNKNOWN and output != swapped:
        return False, state
    return True, operation.value if swapped else state


@dataclass(slots=True)
class _Event:
    time: float
    is_call: bool
    operation_id: int
    match: _Event | None = None  # a call's return event
    previous: _Event | None = None
    next: _Event | None = None


@dataclass(slots=True)
class _EventList:
    head: _Event = field(default_factory=lambda: _Event(-math.inf, True, -1))

    def lift(self, call: _Event) -> None:
        """Remove a call and its return from the list."""
        for event in (call, call.match):
            assert event is not None and event.previous is not None
            event.previous.next = event.next
            if event.next is not None:
                event.next.previous = event.previous

    def unlift(self, call: _Event) -> None:
        """Put back what `lift(call)` removed (in reverse order)."""
        for event in (call.match, call):
            assert event is not None and event.previous is not None
            event.previous.next = event
            if event.next is not None:
                event.next.previous = event


def _build_events(operations: list[Operation]) -> _EventList:
    events: list[_Event] = []
    for number, operation in enumerate(operations):
        call = _Event(operation.invoked_at, True, number)
        done = operation.completed_at
        ret = _Event(math.inf if done is None else done, False, number)
        assert done is None or done >= operation.invoked_at, operation
        call.match = ret
        events += [call, ret]
    # At equal times calls come first: operations touching in time overlap.
    events.sort(key=lambda event: (event.time, not event.is_call, event.operation_id))
    event_list = _EventList()
    previous = event_list.head
    for event in events:
        previous.next = event
        event.previous = previous
        previous = event
    return event_list


def check_register(
    operations: list[Operation], initial: bytes | None = None, states_max: int = 2_000_000
) -> tuple[bool, int]:
    """Return (linearizable, states explored) for one key's operations. Raises RuntimeError
    when the search would explore more than `states_max` states."""
    event_list = _build_events(operations)
    state = initial
    linearized = 0  # bitmask of operation ids
    seen: set[tuple[int, bytes | None]] = set()
    stack: list[tuple[_Event, bytes | None]] = []
    entry = event_list.head.next
    while event_list.head.next is not None:
        assert entry is not None
        if entry.is_call:
            operation = operations[entry.operation_id]
            possible, after = step(state, operation)
            bit = 1 << entry.operation_id
            if possible and (linearized | bit, after) not in seen:
                seen.add((linearized | bit, after))
                if len(seen) > states_max:
                    raise RuntimeError("linearizability search exceeded its state budget")
                stack.append((entry, state))
                linearized |= bit
                state = after
                event_list.lift(entry)
                entry = event_list.head.next
                continue
            entry = entry.next
            continue
        if not stack:
            return False, len(seen)
        call, state = stack.pop()
        linearized &= ~(1 << call.operation_id)
        event_list.unlift(call)
        entry = call.next
    return True, len(seen)


def check_history(operations: list[Operation]) -> CheckResult:
    """Check a whole key-value history, key by key (all keys start absent)."""
    per_key: dict[bytes, list[Operation]] = {}
    for operation in operations:
        per_key.setdefault(operation.key, []).append(operation)
    explored = 0
    for key in sorted(per_key):
        history = per_key[key]
        ok, states = check_register(history)
        explored += states
        if not ok:
            return CheckResult(False, key, tuple(history), explored)
    return CheckResult(True, explored_states=explored)


def describe(result: CheckResult) -> str:
    """A readable account of a failed check."""
    if result.linearizable:
        return "linearizable"
    lines = [f"key {result.key!r} is not linearizable; its history:"]
    for operation in sorted(result.operations, key=lambda o: o.invoked_at):
        done = "?" if operation.completed_at is None else f"{operation.completed_at:.4f}"
        output = "unknown" if operation.output is UNKNOWN else repr(operation.output)
        argument = (
            f"{operation.value!r}"
            if operation.kind == "put"
            else f"{operation.expected!r}->{operation.value!r}"
            if operation.kind == "cas"
            else ""
        )
        lines.append(
            f"  client {operation.client} [{operation.invoked_at:.4f}, {done}] "
            f"{operation.kind}({argument}) -> {output}"
        )
    return "\n".join(lines)
