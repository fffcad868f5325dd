"""Fixtures of the Kafka listener's tests with real clients (kafka-python, confluent-kafka,
aiokafka, kcat): `dwal broker` processes serving Kafka, started on free ports, killed by PID
at teardown whether the test passed or failed (see kafka_processes.py), and a three-node
cluster from tests/cluster's launcher with a Kafka listener on every node.

A client that is not installed skips its tests with a loud reason (the test extras install
the Python clients, .ci/run installs kcat).
"""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "cluster"))

from cluster_launcher import CLUSTER_CONFIG, ClusterLauncher, ClusterNode, free_ports  # noqa: E402
from kafka_processes import KafkaBroker  # noqa: E402


@pytest.fixture(scope="module")
def kafka_broker(tmp_path_factory):
    """One broker serving Kafka for a whole test module (each test uses topics of its own)."""
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka-broker") / "data")
    try:
        yield broker.start()
    finally:
        broker.stop_all()


@pytest.fixture
def restartable_broker(tmp_path):
    """A broker of the test's own on ports picked up front (below the ephemeral range), so
    that a restart gets them back."""
    port, kafka_port = free_ports(2)
    broker = KafkaBroker(tmp_path / "data", port=port, kafka_port=kafka_port)
    try:
        yield broker.start()
    finally:
        broker.stop_all()


class KafkaClusterLauncher(ClusterLauncher):
    """tests/cluster's launcher with a Kafka listener on every node, on a port picked up front
    like the others (`kafka_ports`)."""

    kafka_ports: dict[int, int]

    def add_node(self, node_id: int, **options) -> ClusterNode:  # type: ignore[override]
        node = super().add_node(node_id, **options)
        if not hasattr(self, "kafka_ports"):
            self.kafka_ports = {}
        (self.kafka_ports[node_id],) = free_ports(1)
        return node

    def command(self, node: ClusterNode, data_dir: pathlib.Path) -> list[str]:
        return [
            *super().command(node, data_dir),
            "--kafka-port",
            str(self.kafka_ports[node.node_id]),
        ]

    def kafka_bootstrap(self, node_id: int) -> str:
        return f"127.0.0.1:{self.kafka_ports[node_id]}"


@pytest.fixture
async def kafka_cluster(nursery, tmp_path):
    """Nodes 1, 2 and 3 (each a broker and a controller voter, Kafka listener on), started
    and serving; every process is SIGKILLed by PID at teardown."""
    config_path = tmp_path / "cluster.toml"
    config_path.write_text(CLUSTER_CONFIG)
    launcher = KafkaClusterLauncher(nursery, tmp_path, config_path)
    try:
        for node_id in (1, 2, 3):
            launcher.add_node(node_id)
        await launcher.start()
        yield launcher
    finally:
        launcher.kill_all()
