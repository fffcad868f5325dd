"""The sans-I/O Raft core (node, log, storage interface) of DWAL's metadata quorum.

See API.md for the contract between this core and its trio driver.
"""

from .config import RaftConfig
from .log_storage import CompactedError, LogStorage, MemoryStorage, UnavailableError
from .messages import (
    CAMPAIGN_TRANSFER,
    NO_NODE,
    ConfigChange,
    ConfigChangeKind,
    Configuration,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageType,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SoftState,
    decode_config_change,
    decode_message,
    encode_config_change,
    encode_message,
    entry_bytes,
)
from .node import (
    ConfigChangeError,
    ConfigChangeInProgressError,
    NotLeaderError,
    ProposalDroppedError,
    ProposalTooLargeError,
    RaftError,
    RaftNode,
    RaftStatus,
)
from .progress import ProgressState, ProgressStatus

__all__ = [
    "CAMPAIGN_TRANSFER",
    "NO_NODE",
    "CompactedError",
    "ConfigChange",
    "ConfigChangeError",
    "ConfigChangeInProgressError",
    "ConfigChangeKind",
    "Configuration",
    "Entry",
    "EntryKind",
    "HardState",
    "LogStorage",
    "MemoryStorage",
    "Message",
    "MessageType",
    "NotLeaderError",
    "ProgressState",
    "ProgressStatus",
    "ProposalDroppedError",
    "ProposalTooLargeError",
    "RaftConfig",
    "RaftError",
    "RaftNode",
    "RaftStatus",
    "ReadState",
    "Ready",
    "Role",
    "Snapshot",
    "SoftState",
    "UnavailableError",
    "decode_config_change",
    "decode_message",
    "encode_config_change",
    "encode_message",
    "entry_bytes",
]
