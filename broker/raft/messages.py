"""Value types of the Raft core and the wire codec of its messages.

Every value is a frozen, slotted, keyword-only dataclass (h11's event style), so a Ready or a
Message can be kept, compared and logged without fear that the node changes it later.

`encode_message` / `decode_message` turn a Message into msgpack bytes and back for the TCP
transport. Decoding trusts nothing: every field is type- and range-checked, entries must be
consecutive with non-decreasing terms, and any defect raises `protocol.ProtocolError` (and
only that), so a peer that misbehaves can never corrupt the node's state through the codec.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol import ProtocolError

NO_NODE = 0
"""Node ids are positive integers; 0 means "none" (no vote, no known leader)."""

UINT64_MAX = 2**64 - 1
ENTRY_OVERHEAD_BYTES = 24
"""Bytes counted for an entry on top of its data when sizing messages (term, index, kind)."""

CAMPAIGN_TRANSFER = b"transfer"
"""Context of a VOTE sent because of TIMEOUT_NOW: voters grant it even inside a leader lease."""


class EntryKind(enum.IntEnum):
    NORMAL = 0
    CONFIG_CHANGE = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One log entry. A leader's first entry of its term is an empty NORMAL entry (no-op)."""

    term: int
    index: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""


def entry_bytes(entry: Entry) -> int:
    """The size an entry is accounted for in message and Ready limits."""
    return len(entry.data) + ENTRY_OVERHEAD_BYTES


class ConfigChangeKind(enum.IntEnum):
    ADD_VOTER = 0  # also promotes a learner to voter
    REMOVE_VOTER = 1
    ADD_LEARNER = 2
    REMOVE_LEARNER = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigChange:
    kind: ConfigChangeKind
    node_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Configuration:
    """Who votes and who only receives the log. The two sets are disjoint."""

    voters: frozenset[int]
    learners: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        assert not (self.voters & self.learners), "a node is either a voter or a learner"
        assert all(node > 0 for node in self.voters | self.learners), "node ids are positive"

    @property
    def members(self) -> frozenset[int]:
        return self.voters | self.learners

    def apply(self, change: ConfigChange) -> Configuration:
        """Return the configuration after `change`; a change that changes nothing is a no-op."""
        voters, learners, node = set(self.voters), set(self.learners), change.node_id
        if change.kind == ConfigChangeKind.ADD_VOTER:
            learners.discard(node)
            voters.add(node)
        elif change.kind == ConfigChangeKind.REMOVE_VOTER:
            voters.discard(node)
        elif change.kind == ConfigChangeKind.ADD_LEARNER:
            if node not in voters:
                learners.add(node)
        else:
            learners.discard(node)
        return Configuration(voters=frozenset(voters), learners=frozenset(learners))


@dataclass(frozen=True, slots=True, kw_only=True)
class HardState:
    """What must be durable before any message that depends on it is sent."""

    term: int = 0
    vote: int = NO_NODE
    commit: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """The application's state at `index` (of `term`) and the configuration in force there.

    index 0 means "no snapshot" (an empty log starts after index 0, term 0).
    """

    index: int
    term: int
    configuration: Configuration
    data: bytes


class MessageType(enum.IntEnum):
    PRE_VOTE = 0
    PRE_VOTE_RESPONSE = 1
    VOTE = 2
    VOTE_RESPONSE = 3
    APPEND = 4
    APPEND_RESPONSE = 5
    HEARTBEAT = 6
    HEARTBEAT_RESPONSE = 7
    SNAPSHOT = 8
    TIMEOUT_NOW = 9
    READ_INDEX = 10
    READ_INDEX_RESPONSE = 11
    PROPOSE = 12


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One Raft message between two nodes.

    Field use by type (etcd's conventions):
    - (PRE_)VOTE: index/log_term = the candidate's last entry; context = CAMPAIGN_TRANSFER when
      caused by TIMEOUT_NOW. term of a PRE_VOTE is the term the candidate would campaign in.
    - APPEND: index/log_term = the entry preceding `entries`; commit = leader's commit.
    - APPEND_RESPONSE: index = last index now known to match, or (reject) the rejected index;
      on reject, reject_hint/log_term = the follower's guess of the last matching entry.
    - HEARTBEAT: commit (capped at the follower's match); context = read-index round.
      HEARTBEAT_RESPONSE: context echoed; commit = the follower's commit index.
    - READ_INDEX (term 0): context = the request's context; READ_INDEX_RESPONSE: index.
    - PROPOSE (term 0): entries carry data only (term and index 0); the leader assigns both.
    """

    type: MessageType
    source: int
    target: int
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    context: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadState:
    """A linearizable read with `request_context` may be served once applied >= index."""

    index: int
    request_context: bytes


class Role(enum.Enum):
    """A learner has role FOLLOWER and never campaigns (see RaftNode.is_learner)."""

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True, kw_only=True)
class SoftState:
    """Volatile state that need not be persisted; reported in Ready when it changes."""

    leader: int
    role: Role


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    """Everything the driver must do, in order: persist snapshot, entries and hard state
    (must_sync says whether that needs an fsync), then send messages, then apply
    committed_entries (and serve read_states once applied), then call advance(ready)."""

    soft_state: SoftState | None
    hard_state: HardState | None
    snapshot: Snapshot | None
    entries: tuple[Entry, ...]
    messages: tuple[Message, ...]
    committed_entries: tuple[Entry, ...]
    read_states: tuple[ReadState, ...]
    must_sync: bool = False


def encode_config_change(change: ConfigChange) -> bytes:
    return msgpack.packb([int(change.kind), change.node_id], use_bin_type=True)


def decode_config_change(data: bytes) -> ConfigChange:
    """Raises ProtocolError if `data` is not an encoded ConfigChange."""
    value = _unpack(data)
    if not isinstance(value, list) or len(value) != 2:
        raise ProtocolError("config change must be a 2-element array")
    kind = _enum(ConfigChangeKind, value[0], "config change kind")
    return ConfigChange(kind=kind, node_id=_node_id(value[1], "config change node"))


# -- wire codec -----------------------------------------------------------------------------

_FORMAT_VERSION = 1
_MESSAGE_FIELDS = 13


def encode_message(message: Message) -> bytes:
    """Return the msgpack encoding of `message` (a 13-element array)."""
    entries: list[Any] | None = None
    if message.entries:
        first = message.entries[0].index
        entries = [first, [[e.term, int(e.kind), e.data] for e in message.entries]]
    snapshot: list[Any] | None = None
    if message.snapshot is not None:
        s = message.snapshot
        snapshot = [
            s.index,
            s.term,
            sorted(s.configuration.voters),
            sorted(s.configuration.learners),
            s.data,
        ]
    value = [
        _FORMAT_VERSION,
        int(message.type),
        message.source,
        message.target,
        message.term,
        message.log_term,
        message.index,
        entries,
        message.commit,
        message.reject,
        message.reject_hint,
        snapshot,
        message.context,
    ]
    return msgpack.packb(value, use_bin_type=True)


def decode_message(data: bytes) -> Message:
    """Return the Message encoded in `data`.

    Raises ProtocolError (only) when the bytes are not a well-formed, self-consistent message.
    The caller (the transport's framing) bounds len(data); nested sizes are bounded by it.
    """
    value = _unpack(data)
    if not isinstance(value, list) or len(value) != _MESSAGE_FIELDS:
        raise ProtocolError(f"raft message must be a {_MESSAGE_FIELDS}-element array")
    if value[0] != _FORMAT_VERSION or type(value[0]) is not int:
        raise ProtocolError(f"unsupported raft message format {value[0]!r}")
    message_type = _enum(MessageType, value[1], "message type")
    term = _uint(value[4], "term")
    index = _uint(value[6], "index")
    entries = _decode_entries(value[7], message_type)
    message = Message(
        type=message_type,
        source=_node_id(value[2], "source"),
        target=_node_id(value[3], "target"),
        term=term,
        log_term=_uint(value[5], "log_term"),
        index=index,
        entries=entries,
        commit=_uint(value[8], "commit"),
        reject=_bool(value[9], "reject"),
        reject_hint=_uint(value[10], "reject_hint"),
        snapshot=_decode_snapshot(value[11]),
        context=_bytes(value[12], "context"),
    )
    _check_consistent(message)
    return message


def _unpack(data: bytes) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("raft message must be bytes")
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as error:  # msgpack raises many types for malformed input
        raise ProtocolError(f"malformed raft message: {type(error).__name__}") from None


def _decode_entries(value: Any, message_type: MessageType) -> tuple[Entry, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) != 2 or not isinstance(value[1], list):
        raise ProtocolError("entries must be [first_index, [entry, ...]]")
    first = _uint(value[0], "first entry index")
    if not value[1]:
        raise ProtocolError("an empty entry list must be encoded as nil")
    entries = []
    for offset, item in enumerate(value[1]):
        if not isinstance(item, list) or len(item) != 3:
            raise ProtocolError("entry must be [term, kind, data]")
        entries.append(
            Entry(
                term=_uint(item[0], "entry term"),
                index=_uint(first + offset if first else 0, "entry index"),
                kind=_enum(EntryKind, item[1], "entry kind"),
                data=_bytes(item[2], "entry data"),
            )
        )
    return tuple(entries)


def _decode_snapshot(value: Any) -> Snapshot | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 5:
        raise ProtocolError("snapshot must be [index, term, voters, learners, data]")
    voters = _node_set(value[2], "snapshot voters")
    learners = _node_set(value[3], "snapshot learners")
    if voters & learners:
        raise ProtocolError("snapshot configuration has a node that is voter and learner")
    return Snapshot(
        index=_uint(value[0], "snapshot index"),
        term=_uint(value[1], "snapshot term"),
        configuration=Configuration(voters=voters, learners=learners),
        data=_bytes(value[4], "snapshot data"),
    )


def _check_consistent(message: Message) -> None:
    """Reject messages no correct peer sends, so the node can trust what it steps."""
    entries = message.entries
    if message.source == message.target:
        raise ProtocolError("raft message addressed to its own source")
    if message.type == MessageType.APPEND:
        if entries:
            if entries[0].index != message.index + 1:
                raise ProtocolError("APPEND entries must follow the index they are anchored at")
            previous_term = message.log_term
            for entry in entries:
                if not previous_term <= entry.term <= message.term or entry.term == 0:
                    raise ProtocolError("APPEND entry terms must be non-decreasing, <= term")
                previous_term = entry.term
    elif message.type == MessageType.PROPOSE:
        if any(entry.term != 0 or entry.index != 0 for entry in entries):
            raise ProtocolError("PROPOSE entries carry data only (term and index 0)")
    elif entries:
        raise ProtocolError(f"{message.type.name} carries no entries")
    if (message.snapshot is not None) != (message.type == MessageType.SNAPSHOT):
        raise ProtocolError("exactly SNAPSHOT messages carry a snapshot")
    if message.snapshot is not None and message.snapshot.index == 0:
        raise ProtocolError("SNAPSHOT must carry a snapshot with index > 0")
    if message.term == 0 and message.type not in (MessageType.READ_INDEX, MessageType.PROPOSE):
        raise ProtocolError(f"{message.type.name} must carry a term")


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= UINT64_MAX:
        raise ProtocolError(f"{what} must be an unsigned 64-bit integer")
    return value


def _node_id(value: Any, what: str) -> int:
    if type(value) is not int or not 0 < value <= UINT64_MAX:
        raise ProtocolError(f"{what} must be a positive node id")
    return value


def _bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(f"{what} must be a boolean")
    return value


def _bytes(value: Any, what: str) -> bytes:
    if type(value) is not bytes:
        raise ProtocolError(f"{what} must be binary")
    return value


def _node_set(value: Any, what: str) -> frozenset[int]:
    if not isinstance(value, list):
        raise ProtocolError(f"{what} must be an array")
    nodes = frozenset(_node_id(item, what) for item in value)
    if len(nodes) != len(value):
        raise ProtocolError(f"{what} has duplicates")
    return nodes


def _enum(kind: Any, value: Any, what: str) -> Any:
    if type(value) is not int:
        raise ProtocolError(f"{what} must be an integer")
    try:
        return kind(value)
    except ValueError:
        raise ProtocolError(f"unknown {what} {value}") from None
