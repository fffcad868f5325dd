"""A replicated key-value store on RaftDriver: the demo state machine of tests and the
deterministic simulation (not used by the broker).

Commands are msgpack arrays in NORMAL entries: `["put", key, value]`, `["cas", key,
expected, new]` (expected None: the key must be absent) and `["get", key]` (a read through
the log). Applying is deterministic, and a malformed command is applied as a no-op that
returns `MALFORMED`, identically on every node, so a bad entry can never make replicas
diverge. Reads outside the log go through `RaftDriver.read` (read-index) and then `get`.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .driver import RaftDriver
from .messages import Entry, EntryKind, Snapshot

COMMAND_BYTES_MAX = 1024 * 1024
MALFORMED = "malformed"


def encode_put(key: bytes, value: bytes) -> bytes:
    return msgpack.packb(["put", key, value], use_bin_type=True)


def encode_cas(key: bytes, expected: bytes | None, new: bytes) -> bytes:
    return msgpack.packb(["cas", key, expected, new], use_bin_type=True)


def encode_get(key: bytes) -> bytes:
    return msgpack.packb(["get", key], use_bin_type=True)


def decode_command(data: bytes) -> list[Any] | None:
    """The command in an entry's data, or None if it is not a well-formed command."""
    if len(data) > COMMAND_BYTES_MAX:
        return None
    try:
        command = msgpack.unpackb(data, raw=False, max_array_len=4, max_map_len=0, max_ext_len=0)
    except Exception:  # msgpack raises several unrelated types on bad input
        return None
    if type(command) is not list or not command or command[0] not in ("put", "cas", "get"):
        return None
    arity = {"put": 3, "cas": 4, "get": 2}[command[0]]
    if len(command) != arity or not all(
        type(field) is bytes or (field is None and position == 2 and command[0] == "cas")
        for position, field in enumerate(command[1:], start=1)
    ):
        return None
    return command


class KeyValueStore:
    """The state machine: a dict of bytes, plus the index of the last applied entry."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.applied_index = 0

    def apply(self, entry: Entry) -> object:
        """Apply a committed entry; return None for put, the value for get, a bool for cas
        (whether it swapped), MALFORMED for a bad command; None for other entries."""
        assert entry.index > self.applied_index, "entries are applied once, in order"
        self.applied_index = entry.index
        if entry.kind != EntryKind.NORMAL or not entry.data:
            return None
        command = decode_command(entry.data)
        if command is None:
            return MALFORMED
        if command[0] == "put":
            self.data[command[1]] = command[2]
            return None
        if command[0] == "get":
            return self.data.get(command[1])
        _, key, expected, new = command
        if self.data.get(key) != expected:
            return False
        self.data[key] = new
        return True

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def snapshot(self) -> bytes:
        return msgpack.packb([self.applied_index, sorted(self.data.items())], use_bin_type=True)

    def restore(self, snapshot: Snapshot) -> None:
        applied_index, items = msgpack.unpackb(snapshot.data, raw=False)
        assert applied_index == snapshot.index, "a snapshot of the state at its index"
        self.data = {key: value for key, value in items}
        self.applied_index = applied_index


class KeyValueClient:
    """Operations on one node's store through its driver (the caller picks the leader)."""

    def __init__(self, driver: RaftDriver, store: KeyValueStore) -> None:
        self.driver = driver
        self.store = store

    async def put(self, key: bytes, value: bytes, *, timeout_seconds: float | None = None) -> None:
        """Raises what RaftDriver.propose raises."""
        await self.driver.propose(encode_put(key, value), timeout_seconds=timeout_seconds)

    async def cas(
        self,
        key: bytes,
        expected: bytes | None,
        new: bytes,
        *,
        timeout_seconds: float | None = None,
    ) -> bool:
        """Set `key` to `new` if it holds `expected`; return whether it did."""
        result = await self.driver.propose(
            encode_cas(key, expected, new), timeout_seconds=timeout_seconds
        )
        assert type(result) is bool
        return result

    async def get(self, key: bytes, *, timeout_seconds: float | None = None) -> bytes | None:
        """A linearizable read (read-index). Raises what RaftDriver.read raises."""
        return await self.driver.read(lambda: self.store.get(key), timeout_seconds=timeout_seconds)
