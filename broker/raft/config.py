"""Every knob and limit of one Raft node, in one place (etcd's raft.Config)."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class RaftConfig:
    node_id: int
    election_ticks: int = 10
    """A follower that hears no leader for a randomized [election_ticks, 2*election_ticks)
    ticks campaigns; a leader that has not heard from a quorum for election_ticks steps
    down (check_quorum); a leadership transfer aborts after election_ticks."""
    heartbeat_ticks: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_append_entries: int = 64
    """Most entries in one APPEND message."""
    max_append_bytes: int = 1 * MIB
    """Most entry bytes in one APPEND (one larger entry still travels alone). A proposal
    larger than this is refused, so every entry fits in a message."""
    max_inflight_appends: int = 256
    """Most unacknowledged APPENDs to one follower in the replicate state."""
    max_uncommitted_bytes: int = 64 * MIB
    """Most bytes of proposals a leader holds uncommitted; further proposals are dropped."""
    max_committed_bytes_per_ready: int = 16 * MIB
    """Most entry bytes handed out in one Ready's committed_entries (at least one entry)."""
    max_pending_reads: int = 4096
    """Most read-index requests a leader keeps waiting for confirmation."""

    def validate(self) -> None:
        """Raises ValueError naming the first setting that is out of range."""
        if self.node_id <= 0:
            raise ValueError("node_id must be a positive integer (0 means none)")
        if self.heartbeat_ticks < 1:
            raise ValueError("heartbeat_ticks must be >= 1")
        if self.election_ticks <= self.heartbeat_ticks:
            raise ValueError("election_ticks must be greater than heartbeat_ticks")
        for name in (
            "max_append_entries",
            "max_append_bytes",
            "max_inflight_appends",
            "max_uncommitted_bytes",
            "max_committed_bytes_per_ready",
            "max_pending_reads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_uncommitted_bytes < self.max_append_bytes:
            raise ValueError("max_uncommitted_bytes must be >= max_append_bytes")
