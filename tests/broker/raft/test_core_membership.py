"""Membership changes, one voter (or learner) at a time."""

from __future__ import annotations

import pytest
from test_core_network import Network

from broker.raft import (
    ConfigChange,
    ConfigChangeError,
    ConfigChangeInProgressError,
    ConfigChangeKind,
    Configuration,
    EntryKind,
    MessageType,
    NotLeaderError,
    ProposalDroppedError,
    Role,
    decode_config_change,
)

ADD_VOTER = ConfigChangeKind.ADD_VOTER
REMOVE_VOTER = ConfigChangeKind.REMOVE_VOTER
ADD_LEARNER = ConfigChangeKind.ADD_LEARNER
REMOVE_LEARNER = ConfigChangeKind.REMOVE_LEARNER


def change(network: Network, leader: int, kind: ConfigChangeKind, node_id: int) -> int:
    index = network.nodes[leader].propose_config_change(ConfigChange(kind=kind, node_id=node_id))
    network.stabilize()
    return index


def test_add_a_voter_which_catches_up_and_counts_in_the_quorum():
    network = Network.create()
    network.elect(1)
    network.propose(1, b"a")
    network.add_node(4)
    index = change(network, 1, ADD_VOTER, 4)
    assert network.nodes[1].commit_index >= index
    for node_id in (1, 2, 3, 4):
        assert network.nodes[node_id].configuration.voters == {1, 2, 3, 4}
    assert network.state[4] == [b"a"]
    # Quorum is now 3 of 4: the leader and node 4 alone cannot commit.
    network.cut(1, 2)
    network.cut(1, 3)
    commit = network.nodes[1].commit_index
    network.propose(1, b"b")
    assert network.nodes[1].commit_index == commit
    network.recover()
    network.tick([1])
    assert network.state[4] == [b"a", b"b"]


def test_config_change_entries_are_handed_out_and_decodable():
    network = Network.create()
    network.elect(1)
    network.add_node(4)
    index = change(network, 1, ADD_LEARNER, 4)
    [entry] = [e for e in network.applied[2] if e.index == index]
    assert entry.kind == EntryKind.CONFIG_CHANGE
    assert decode_config_change(entry.data) == ConfigChange(kind=ADD_LEARNER, node_id=4)


def test_only_one_config_change_at_a_time():
    network = Network.create()
    network.elect(1)
    network.isolate(1)
    leader = network.nodes[1]
    leader.propose_config_change(ConfigChange(kind=ADD_LEARNER, node_id=4))
    with pytest.raises(ConfigChangeInProgressError) as caught:
        leader.propose_config_change(ConfigChange(kind=ADD_LEARNER, node_id=5))
    assert isinstance(caught.value, ProposalDroppedError)  # what callers caught before
    network.recover()
    network.tick([1])
    leader.propose_config_change(ConfigChange(kind=ADD_LEARNER, node_id=5))  # now allowed


def test_no_config_change_before_the_leaders_no_op_is_applied():
    network = Network.create()
    network.drop_if(lambda m: m.type == MessageType.APPEND)
    leader = network.elect(1)
    with pytest.raises(ConfigChangeInProgressError):
        leader.propose_config_change(ConfigChange(kind=ADD_LEARNER, node_id=9))
    network.recover()
    network.tick([1])
    leader.propose_config_change(ConfigChange(kind=ADD_LEARNER, node_id=9))


def test_remove_a_voter_shrinks_the_quorum():
    network = Network.create(voters=[1, 2, 3, 4])
    network.elect(1)
    change(network, 1, REMOVE_VOTER, 4)
    assert network.nodes[1].configuration.voters == {1, 2, 3}
    network.crash(4)
    network.cut(1, 3)
    network.propose(1, b"x")  # 1 and 2 are a quorum of {1, 2, 3}
    assert network.state[1] == [b"x"]


def test_a_removed_node_never_campaigns():
    network = Network.create()
    network.elect(1)
    change(network, 1, REMOVE_VOTER, 3)
    network.tick([1])
    assert network.nodes[3].configuration.voters == {1, 2}
    network.isolate(3)
    network.tick([3], ticks=50)
    assert network.nodes[3].role == Role.FOLLOWER


def test_removed_leader_steps_down_and_the_rest_elect_a_new_one():
    network = Network.create()
    network.elect(1)
    network.propose(1, b"a")
    change(network, 1, REMOVE_VOTER, 1)
    old = network.nodes[1]
    assert old.role == Role.FOLLOWER and old.configuration.voters == {2, 3}
    new_leader = network.tick_until_leader([1, 2, 3])
    assert new_leader in (2, 3)
    network.propose(new_leader, b"b")
    assert network.state[2] == network.state[3] == [b"a", b"b"]
    network.tick(ticks=50)
    assert network.nodes[1].role == Role.FOLLOWER and network.leaders() == [new_leader]


def test_add_learner_then_promote_to_voter():
    network = Network.create()
    network.elect(1)
    network.add_node(4)
    change(network, 1, ADD_LEARNER, 4)
    assert network.nodes[4].is_learner
    assert network.nodes[1].configuration == Configuration(
        voters=frozenset({1, 2, 3}), learners=frozenset({4})
    )
    # A learner does not count: with 2 and 3 cut off, nothing commits.
    network.cut(1, 2)
    network.cut(1, 3)
    commit = network.nodes[1].commit_index
    network.propose(1, b"a")
    assert network.nodes[1].commit_index == commit
    network.recover()
    network.tick([1])
    change(network, 1, ADD_VOTER, 4)
    assert not network.nodes[4].is_learner
    assert network.nodes[4].configuration.voters == {1, 2, 3, 4}
    change(network, 1, REMOVE_LEARNER, 4)  # a no-op: 4 is a voter now
    assert network.nodes[1].configuration.voters == {1, 2, 3, 4}


def test_invalid_config_changes_are_refused():
    network = Network.create(voters=[1])
    network.elect(1)
    leader = network.nodes[1]
    with pytest.raises(ConfigChangeError):
        leader.propose_config_change(ConfigChange(kind=REMOVE_VOTER, node_id=1))
    with pytest.raises(ConfigChangeError):
        leader.propose_config_change(ConfigChange(kind=ADD_LEARNER, node_id=1))
    with pytest.raises(NotLeaderError):
        Network.create().nodes[1].propose_config_change(ConfigChange(kind=ADD_VOTER, node_id=4))


def test_restart_reapplies_committed_config_changes_from_the_log():
    network = Network.create()
    network.elect(1)
    network.add_node(4)
    change(network, 1, ADD_VOTER, 4)
    change(network, 1, REMOVE_VOTER, 3)
    network.crash(2)
    restarted = network.restart(2)
    assert restarted.configuration.voters == {1, 2, 4}  # before any Ready
    assert restarted.configuration_at(1) == Configuration(voters=frozenset({1, 2, 3}))


def test_single_node_grows_to_three():
    network = Network.create(voters=[1])
    network.elect(1)
    for node_id in (2, 3):
        network.add_node(node_id)
        change(network, 1, ADD_VOTER, node_id)
    network.propose(1, b"z")
    assert all(network.state[i] == [b"z"] for i in (1, 2, 3))
    network.crash(1)
    leader = network.tick_until_leader([2, 3])
    assert leader in (2, 3)
