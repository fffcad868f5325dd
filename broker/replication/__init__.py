"""Partition replicas: the one write path (`ReplicaManager`); replication itself comes next."""

from .replica_manager import ReplicaManager

__all__ = ["ReplicaManager"]
