"""Raft's hard state (term, vote, commit) and configuration in a small checksummed file.

Theory of operation. The state lives in two slot files, `raft-state.0` and `raft-state.1`.
Each write goes to the slot that does *not* hold the newest good copy, through
`checkpoint.write_atomically` (write a temporary file, fsync, rename, fsync the directory),
and carries a sequence number one above the newest. So the newest copy is never touched while
the next one is being written, and a reader sees, per slot, a whole file or none.

A file is `magic | version u16 | body length u32 | crc32c(body) u32 | body`, the body being
msgpack `[sequence, term, vote, commit, voters, learners]`. Reading checks every field, so
a damaged slot (bit rot, a file system that broke the rename promise) is detected and the
other slot, one write older, is used instead. When slot files exist but none is good, the
reader raises `HardStateCorruptError`: it never makes up a state.

Falling back to the previous copy can forget the latest vote or term, which Raft relies on;
it only happens when the newest file was damaged after it was made durable, and it is
logged loudly. (Forgetting the commit index is harmless: a restarted node relearns it.)
"""

from __future__ import annotations

import logging
import os
import pathlib
import struct
from dataclasses import dataclass
from typing import Any

import crc32c
import msgpack

from broker.storage.checkpoint import TEMPORARY_SUFFIX, write_atomically

from .messages import Configuration, HardState

SLOT_NAMES = ("raft-state.0", "raft-state.1")
MAGIC = b"DWRS"
VERSION = 1
PREFIX = struct.Struct(">4sHII")  # magic, version, body length, crc32c(body)
NODES_MAX = 1024  # voters plus learners a configuration may hold
FILE_BYTES_MAX = PREFIX.size + 64 + NODES_MAX * 10

logger = logging.getLogger("dwal.raft")


class HardStateCorruptError(Exception):
    """Hard state files exist but none of them can be trusted."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistentState:
    """What the hard state file holds."""

    hard_state: HardState
    configuration: Configuration


def encode_state(sequence: int, state: PersistentState) -> bytes:
    """Return the file content for `state` written as number `sequence`."""
    hard_state = state.hard_state
    configuration = state.configuration
    assert sequence >= 0 and hard_state.term >= 0 and hard_state.vote >= 0
    assert len(configuration.voters) + len(configuration.learners) <= NODES_MAX
    body = msgpack.packb(
        [
            sequence,
            hard_state.term,
            hard_state.vote,
            hard_state.commit,
            sorted(configuration.voters),
            sorted(configuration.learners),
        ]
    )
    return PREFIX.pack(MAGIC, VERSION, len(body), crc32c.crc32c(body)) + body


def decode_state(data: bytes) -> tuple[int, PersistentState]:
    """Return (sequence, state) from file content. Raises HardStateCorruptError."""
    if len(data) < PREFIX.size or len(data) > FILE_BYTES_MAX:
        raise HardStateCorruptError(f"hard state file has an impossible size {len(data)}")
    magic, version, length, checksum = PREFIX.unpack_from(data)
    body = data[PREFIX.size :]
    if magic != MAGIC or version != VERSION:
        raise HardStateCorruptError("hard state file has a bad magic or version")
    if length != len(body) or crc32c.crc32c(body) != checksum:
        raise HardStateCorruptError("hard state file fails its length or CRC check")
    try:
        fields = msgpack.unpackb(
            body,
            use_list=True,
            max_array_len=NODES_MAX,
            max_bin_len=0,
            max_str_len=0,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as error:  # msgpack raises several unrelated types on bad input
        raise HardStateCorruptError(f"hard state body is not valid msgpack: {error}") from None
    return _state_from_fields(fields)


def _state_from_fields(fields: Any) -> tuple[int, PersistentState]:
    if type(fields) is not list or len(fields) != 6:
        raise HardStateCorruptError("hard state body must be a 6-element array")
    sequence, term, vote, commit, voters, learners = fields
    if not all(type(value) is int and value >= 0 for value in (sequence, term, vote, commit)):
        raise HardStateCorruptError("hard state numbers must be non-negative integers")
    for nodes in (voters, learners):
        if type(nodes) is not list or not all(type(n) is int and n > 0 for n in nodes):
            raise HardStateCorruptError("configuration node ids must be positive integers")
    state = PersistentState(
        hard_state=HardState(term=term, vote=vote, commit=commit),
        configuration=Configuration(voters=frozenset(voters), learners=frozenset(learners)),
    )
    return sequence, state


class HardStateFile:
    """The two slot files in `directory`. Blocking methods: call them from a thread."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self._sequence = -1  # of the newest good copy
        self._newest_slot: int | None = None

    def load(self) -> PersistentState | None:
        """Return the newest good state, or None when no slot file exists (a new node).

        Raises HardStateCorruptError when slot files exist and none is good; OSError.
        """
        found: list[tuple[int, int, PersistentState]] = []
        present = 0
        for slot, name in enumerate(SLOT_NAMES):
            data = _read_bounded(self.directory / name)
            if data is None:
                continue
            present += 1
            try:
                sequence, state = decode_state(data)
            except HardStateCorruptError as error:
                logger.error("%s: ignoring damaged %s: %s", self.directory, name, error)
                continue
            found.append((sequence, slot, state))
        if not found:
            if present:
                raise HardStateCorruptError(f"{self.directory}: every hard state file is damaged")
            return None
        sequence, slot, state = max(found, key=lambda item: item[0])
        if len(found) < present:
            logger.error("%s: using the previous hard state copy %d", self.directory, sequence)
        self._sequence = sequence
        self._newest_slot = slot
        return state

    def store(self, state: PersistentState) -> None:
        """Make `state` the newest copy, durably. Raises OSError. Blocking."""
        slot = 0 if self._newest_slot is None else 1 - self._newest_slot
        data = encode_state(self._sequence + 1, state)
        write_atomically(self.directory / SLOT_NAMES[slot], data)
        self._sequence += 1
        self._newest_slot = slot

    def remove_temporary_files(self) -> None:
        """Remove writes a crash interrupted before their rename. Raises OSError."""
        for name in SLOT_NAMES:
            (self.directory / (name + TEMPORARY_SUFFIX)).unlink(missing_ok=True)


def _read_bounded(path: pathlib.Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, FILE_BYTES_MAX + 1)
    finally:
        os.close(fd)
