"""Fixtures that run a DWAL cluster as real processes (see cluster_launcher.py).

Every node gets short broker heartbeats and session timeouts through a ``--config`` TOML
file, so that fencing takes about 2 s instead of 6 s, and few ``__consumer_offsets``
partitions, so that a cluster forms quickly on a small machine.
"""

from __future__ import annotations

import pytest

from cluster_launcher import CLUSTER_CONFIG, ClusterLauncher


@pytest.fixture
async def cluster_launcher(nursery, tmp_path):
    """A launcher with no node declared yet; every process it starts is SIGKILLed by PID
    at teardown, whether the test passed or failed."""
    config_path = tmp_path / "cluster.toml"
    config_path.write_text(CLUSTER_CONFIG)
    launcher = ClusterLauncher(nursery, tmp_path, config_path)
    try:
        yield launcher
    finally:
        launcher.kill_all()


@pytest.fixture
async def three_nodes(cluster_launcher):
    """Nodes 1, 2 and 3, all voters, started and serving."""
    for node_id in (1, 2, 3):
        cluster_launcher.add_node(node_id)
    await cluster_launcher.start()
    return cluster_launcher
