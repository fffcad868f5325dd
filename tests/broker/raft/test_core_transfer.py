"""Leadership transfer (TIMEOUT_NOW), its abort, and proposals dropped meanwhile."""

from __future__ import annotations

import pytest
from test_core_network import Network

from broker.raft import (
    CAMPAIGN_TRANSFER,
    MessageType,
    NotLeaderError,
    ProposalDroppedError,
    RaftError,
    Role,
)


def test_transfer_to_an_up_to_date_follower():
    network = Network.create()
    network.elect(1)
    network.propose(1, b"a")
    network.nodes[1].transfer_leadership(2)
    network.stabilize()
    assert network.leaders() == [2]
    assert network.nodes[2].term == 2 and network.nodes[1].leader == 2
    [timeout_now] = network.sent_of(MessageType.TIMEOUT_NOW)
    assert (timeout_now.source, timeout_now.target) == (1, 2)
    votes = network.sent_of(MessageType.VOTE, source=2)
    assert votes and all(m.context == CAMPAIGN_TRANSFER for m in votes)  # skips pre-vote
    network.propose(2, b"b")
    assert network.state[3] == [b"a", b"b"]


def test_transfer_to_a_lagging_follower_first_catches_it_up():
    network = Network.create()
    network.elect(1)
    network.isolate(3)
    network.propose(1, b"a", b"b")
    network.recover()
    network.nodes[1].transfer_leadership(3)
    with pytest.raises(ProposalDroppedError):
        network.nodes[1].propose(b"dropped")
    network.stabilize()
    assert network.leaders() == [3]
    assert network.state[3] == [b"a", b"b"]
    timeout_now = network.sent_of(MessageType.TIMEOUT_NOW)
    assert len(timeout_now) == 1


def test_transfer_aborts_after_an_election_timeout():
    network = Network.create(election_ticks=10)
    network.elect(1)
    network.isolate(3)
    leader = network.nodes[1]
    leader.transfer_leadership(3)
    assert leader.status().lead_transferee == 3
    with pytest.raises(ProposalDroppedError):
        leader.propose(b"x")
    network.tick([1], ticks=10)
    assert leader.status().lead_transferee == 0
    assert leader.role == Role.LEADER
    network.propose(1, b"x")
    assert network.state[2] == [b"x"]


def test_transfer_to_self_or_a_non_voter_or_from_a_follower():
    network = Network.create(voters=[1, 2, 3], learners=[4])
    network.elect(1)
    leader = network.nodes[1]
    leader.transfer_leadership(1)
    assert leader.status().lead_transferee == 0 and leader.role == Role.LEADER
    with pytest.raises(RaftError):
        leader.transfer_leadership(4)
    with pytest.raises(NotLeaderError):
        network.nodes[2].transfer_leadership(3)


def test_a_new_transfer_replaces_the_pending_one():
    network = Network.create()
    network.elect(1)
    network.isolate(3)
    leader = network.nodes[1]
    leader.transfer_leadership(3)
    leader.transfer_leadership(2)
    network.stabilize()
    assert network.leaders() == [2]


def test_transfer_works_under_the_leader_lease():
    network = Network.create(check_quorum=True, pre_vote=True)
    network.elect(1)
    network.tick(ticks=3)
    network.nodes[1].transfer_leadership(3)
    network.stabilize()
    assert network.leaders() == [3]
