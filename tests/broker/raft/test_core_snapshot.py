"""Snapshots: compaction by the application, installing a snapshot on a lagging follower
(with its configuration), and restarting from a snapshot."""

from __future__ import annotations

import pytest
from test_core_network import Network, encode_state

from broker.raft import (
    CompactedError,
    ConfigChange,
    ConfigChangeKind,
    MessageType,
    ProgressState,
    Role,
)


def compact_leader(network: Network, node_id: int) -> int:
    node = network.nodes[node_id]
    index = node.applied_index
    node.compact(index, encode_state(network.state[node_id]))
    return index


def test_compact_creates_a_snapshot_and_discards_the_log_before_it():
    network = Network.create()
    network.elect(1)
    network.propose(1, b"a", b"b", b"c")
    index = compact_leader(network, 1)
    storage = network.storages[1]
    assert storage.snapshot().index == index == network.nodes[1].commit_index
    assert storage.snapshot().term == 1
    assert storage.snapshot().configuration == network.nodes[1].configuration
    assert storage.first_index() == index + 1
    with pytest.raises(CompactedError):
        storage.entries(index, index + 1)
    network.propose(1, b"d")  # replication goes on from the log after the snapshot
    assert network.state[2] == [b"a", b"b", b"c", b"d"]


def test_compact_beyond_applied_is_refused_and_older_index_is_a_no_op():
    network = Network.create()
    network.elect(1)
    network.propose(1, b"a")
    node = network.nodes[1]
    with pytest.raises(ValueError):
        node.compact(node.applied_index + 1, b"")
    node.compact(node.applied_index, b"s")
    node.compact(node.applied_index - 1, b"older")
    assert network.storages[1].snapshot().data == b"s"


def test_lagging_follower_receives_and_installs_a_snapshot():
    network = Network.create()
    network.elect(1)
    network.isolate(3)
    network.propose(1, *[b"%d" % i for i in range(10)])
    index = compact_leader(network, 1)
    network.propose(1, b"after")
    network.recover()
    network.tick([1])
    snapshots = network.sent_of(MessageType.SNAPSHOT, source=1, target=3)
    assert len(snapshots) == 1 and snapshots[0].snapshot.index == index
    assert network.storages[3].snapshot().index == index
    assert network.state[3] == network.state[1] == [b"%d" % i for i in range(10)] + [b"after"]
    assert network.nodes[3].applied_index == network.nodes[1].applied_index
    progress = network.nodes[1].status().progress[3]
    assert (
        progress.state == ProgressState.REPLICATE and progress.match == network.nodes[1].last_index
    )


def test_snapshot_carries_the_configuration_to_the_follower():
    network = Network.create()
    network.elect(1)
    network.isolate(3)
    network.add_node(4)
    network.nodes[1].propose_config_change(
        ConfigChange(kind=ConfigChangeKind.ADD_LEARNER, node_id=4)
    )
    network.stabilize()
    network.propose(1, b"x")
    compact_leader(network, 1)
    network.recover()
    network.tick([1])
    assert network.nodes[3].configuration.learners == {4}
    assert network.state[3] == [b"x"] and network.state[4] == [b"x"]


def test_report_snapshot_failure_makes_the_leader_retry():
    network = Network.create()
    network.elect(1)
    network.isolate(3)
    network.propose(1, b"a", b"b")
    compact_leader(network, 1)
    network.recover()
    network.report_snapshots = False  # the test plays the driver
    network.drop_if(lambda m: m.type == MessageType.SNAPSHOT)
    network.tick([1])
    leader = network.nodes[1]
    assert leader.status().progress[3].state == ProgressState.SNAPSHOT
    leader.report_snapshot(3, success=False)
    assert leader.status().progress[3].state == ProgressState.PROBE
    network.recover()
    network.tick([1], ticks=2)
    assert network.state[3] == [b"a", b"b"]


def test_restart_from_a_snapshot_restores_state_and_configuration():
    network = Network.create()
    network.elect(1)
    network.propose(1, b"a", b"b")
    network.nodes[1].propose_config_change(
        ConfigChange(kind=ConfigChangeKind.ADD_LEARNER, node_id=4)
    )
    network.stabilize()
    network.propose(1, b"c")
    compact_leader(network, 2)
    network.propose(1, b"d")
    network.crash(2)
    restarted = network.restart(2)
    assert restarted.configuration.learners == {4}
    assert restarted.applied_index == network.storages[2].snapshot().index
    network.stabilize()
    assert network.state[2] == [b"a", b"b", b"c", b"d"]


def test_a_lost_snapshot_answer_is_recovered_through_heartbeats():
    network = Network.create()
    network.report_snapshots = False  # a driver that never reports
    network.elect(1)
    network.isolate(3)
    network.propose(1, b"a", b"b")
    compact_leader(network, 1)
    network.recover()
    network.drop_if(
        lambda m: m.type == MessageType.APPEND_RESPONSE and m.source == 3 and not m.reject
    )
    network.tick([1])
    assert network.storages[3].snapshot().index > 0  # installed; its answer was lost
    assert network.nodes[1].status().progress[3].state == ProgressState.SNAPSHOT
    network.recover()
    network.propose(1, b"c")
    network.tick([1], ticks=2)
    assert network.nodes[1].status().progress[3].state == ProgressState.REPLICATE
    assert network.state[3] == [b"a", b"b", b"c"]


def test_a_node_with_a_pending_snapshot_does_not_campaign():
    network = Network.create()
    network.elect(1)
    network.isolate(3)
    network.propose(1, b"a")
    compact_leader(network, 1)
    network.recover()
    snapshot = []
    network.drop_if(lambda m: m.type == MessageType.SNAPSHOT and not snapshot.append(m))
    network.tick([1])
    network.recover()
    node = network.nodes[3]
    node.step(snapshot[0])  # stepped but not yet persisted (no ready processed)
    for _ in range(40):
        node.tick()
    assert node.role == Role.FOLLOWER
