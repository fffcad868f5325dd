"""Elections: single node, 3 and 5 nodes, randomized timeouts, pre-vote, check-quorum, the
leader lease, the election restriction, and restart from storage."""

from __future__ import annotations

import random

import pytest
from test_core_network import Network, log_storage

from broker.raft import (
    CAMPAIGN_TRANSFER,
    Configuration,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    RaftConfig,
    RaftNode,
    Role,
)

VOTERS = Configuration(voters=frozenset({1, 2, 3}))


def test_single_node_elects_itself_and_commits():
    network = Network.create(voters=[1])
    leader = network.tick_until_leader()
    assert leader == 1
    node = network.nodes[1]
    assert node.term == 1 and node.leader == 1
    [index] = network.propose(1, b"hello")
    # After the leader's no-op at 1 and the bootstrap configuration (ADD_VOTER 1) at 2.
    assert node.commit_index == index == 3
    assert network.state[1] == [b"hello"]
    assert network.storages[1].hard_state == HardState(term=1, vote=1, commit=3)


def test_election_timeout_is_randomized_within_one_to_two_election_timeouts():
    for seed in range(20):
        storage = MemoryStorage(Configuration(voters=frozenset({1})))
        node = RaftNode(RaftConfig(node_id=1, election_ticks=10), storage, random.Random(seed))
        ticks = 0
        while node.role == Role.FOLLOWER:
            node.tick()
            ticks += 1
        assert 10 <= ticks < 20


def test_timeouts_differ_between_nodes_with_different_seeds():
    timeouts = set()
    for seed in range(10):
        node = RaftNode(RaftConfig(node_id=1), MemoryStorage(VOTERS), random.Random(seed))
        timeouts.add(node._randomized_election_timeout)
    assert len(timeouts) > 1


@pytest.mark.parametrize("size", [3, 5])
def test_cluster_elects_exactly_one_leader_by_ticking(size):
    network = Network.create(voters=range(1, size + 1), seed=size)
    leader = network.tick_until_leader()
    network.tick(ticks=3)
    assert network.leaders() == [leader]
    terms = {node.term for node in network.nodes.values()}
    assert len(terms) == 1
    assert all(node.leader == leader for node in network.nodes.values())
    network.propose(leader, b"x")
    assert all(state == [b"x"] for state in network.state.values())


def test_minority_cannot_elect_a_leader():
    network = Network.create(voters=range(1, 6))
    for node_id in (3, 4, 5):
        network.isolate(node_id)
    network.tick([1, 2], ticks=60)
    assert network.leaders() == []


def test_majority_elects_after_leader_fails():
    network = Network.create(voters=range(1, 6))
    network.elect(1)
    network.crash(1)
    leader = network.tick_until_leader([2, 3, 4, 5])
    assert leader != 1
    assert network.nodes[leader].term == 2


def test_candidate_with_stale_log_is_refused():
    # Node 1's log is behind nodes 2 and 3 (the election restriction, Raft paper 5.4.1).
    storages = {
        1: log_storage(VOTERS, [1], term=2),
        2: log_storage(VOTERS, [1, 2], term=2),
        3: log_storage(VOTERS, [1, 2], term=2),
    }
    network = Network(pre_vote=False)
    for node_id, storage in storages.items():
        network.add_node(node_id, storage)
    network.campaign(1)
    assert network.nodes[1].role != Role.LEADER
    responses = network.sent_of(MessageType.VOTE_RESPONSE, target=1)
    assert responses and all(m.reject for m in responses)
    network.campaign(2)
    assert network.leaders() == [2]


def test_pre_vote_keeps_a_partitioned_node_from_raising_its_term():
    network = Network.create(pre_vote=True)
    network.elect(1)
    term = network.nodes[1].term
    network.isolate(3)
    network.tick([3], ticks=100)
    assert network.nodes[3].term == term  # pre-votes found no quorum: no term change
    assert network.nodes[3].role == Role.PRE_CANDIDATE
    network.recover()
    network.tick(ticks=5)
    assert network.leaders() == [1]
    assert {node.term for node in network.nodes.values()} == {term}
    assert network.nodes[3].leader == 1


def test_without_pre_vote_a_partitioned_node_raises_its_term_and_disrupts():
    network = Network.create(pre_vote=False, check_quorum=False)
    network.elect(1)
    network.isolate(3)
    network.tick([3], ticks=100)
    assert network.nodes[3].term > 1
    network.recover()
    network.tick(ticks=40)
    assert network.nodes[1].term > 1  # the rejoining node forced a new election


def test_check_quorum_makes_an_isolated_leader_step_down():
    network = Network.create(check_quorum=True, election_ticks=10)
    network.elect(1)
    network.isolate(1)
    network.tick([1], ticks=20)
    assert network.nodes[1].role == Role.FOLLOWER
    assert network.nodes[1].leader == 0
    new_leader = network.tick_until_leader([2, 3])
    assert new_leader in (2, 3)
    network.recover()
    network.tick(ticks=2)
    assert network.nodes[1].leader == new_leader


def test_without_check_quorum_an_isolated_leader_stays_leader():
    network = Network.create(check_quorum=False)
    network.elect(1)
    network.isolate(1)
    network.tick([1], ticks=50)
    assert network.nodes[1].role == Role.LEADER


def test_leader_lease_follower_ignores_votes_while_it_hears_a_leader():
    network = Network.create(check_quorum=True, pre_vote=False)
    network.elect(1)
    follower = network.nodes[2]
    term = follower.term
    vote = Message(
        type=MessageType.VOTE, source=3, target=2, term=term + 5, index=100, log_term=term
    )
    follower.step(vote)
    assert follower.term == term and follower.leader == 1
    assert not [m for m in follower.ready().messages if m.type == MessageType.VOTE_RESPONSE]


def test_leader_lease_is_bypassed_by_a_transfer_vote():
    network = Network.create(check_quorum=True, pre_vote=False)
    network.elect(1)
    follower = network.nodes[2]
    term = follower.term
    last = follower.last_index
    vote = Message(
        type=MessageType.VOTE,
        source=3,
        target=2,
        term=term + 1,
        index=last,
        log_term=term,
        context=CAMPAIGN_TRANSFER,
    )
    follower.step(vote)
    assert follower.term == term + 1 and follower.vote == 3


def test_follower_grants_a_vote_once_per_term():
    network = Network.create(pre_vote=False, check_quorum=False)
    node = network.nodes[1]
    for candidate in (2, 3):
        node.step(Message(type=MessageType.VOTE, source=candidate, target=1, term=1))
    responses = [m for m in node.ready().messages if m.type == MessageType.VOTE_RESPONSE]
    assert [(m.target, m.reject) for m in responses] == [(2, False), (3, True)]
    assert node.vote == 2


def test_learner_never_campaigns_and_its_vote_does_not_count():
    network = Network.create(voters=[1, 2, 3], learners=[4])
    network.elect(1)
    network.propose(1, b"a")
    assert network.state[4] == [b"a"]  # learners receive the log
    network.isolate(1)
    network.cut(2, 3)
    network.tick([4], ticks=100)
    assert network.nodes[4].role == Role.FOLLOWER
    assert network.nodes[4].is_learner
    assert network.sent_of(MessageType.PRE_VOTE, source=4) == []
    # Node 2 reaches only the learner: the learner's grant is no quorum.
    network.tick([2, 4], ticks=60)
    assert network.nodes[2].role != Role.LEADER


def test_restart_keeps_term_vote_commit_and_log():
    network = Network.create()
    network.elect(1)
    network.propose(1, b"a", b"b")
    before = network.nodes[2]
    term, vote, commit, last = before.term, before.vote, before.commit_index, before.last_index
    network.crash(2)
    network.propose(1, b"c")
    restarted = network.restart(2)
    assert (restarted.term, restarted.vote, restarted.commit_index) == (term, vote, commit)
    assert restarted.last_index == last and restarted.role == Role.FOLLOWER
    network.stabilize()
    assert network.state[2] == [b"a", b"b"]  # committed entries are applied again
    network.tick([1])
    assert network.state[2] == [b"a", b"b", b"c"]


def test_restarted_single_node_leads_again_in_a_new_term():
    network = Network.create(voters=[1])
    network.tick_until_leader()
    network.propose(1, b"a")
    network.restart(1)
    node = network.nodes[1]
    assert node.role == Role.FOLLOWER and node.term == 1 and node.commit_index == 3
    network.tick_until_leader()
    assert node.term == 2
    network.propose(1, b"b")
    assert network.state[1] == [b"a", b"b"]


def test_restarted_node_does_not_vote_twice_in_a_term():
    storage = MemoryStorage(VOTERS, HardState(term=5, vote=2))
    node = RaftNode(RaftConfig(node_id=1, pre_vote=False), storage, random.Random(0))
    node.step(Message(type=MessageType.VOTE, source=3, target=1, term=5))
    [response] = node.ready().messages
    assert response.reject and node.vote == 2
