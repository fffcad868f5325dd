"""Linearizable reads through read-index, on the leader and forwarded by followers."""

from __future__ import annotations

import pytest
from test_core_network import Network

from broker.raft import MessageType, ProposalDroppedError, ReadState


def test_read_on_the_leader_after_a_heartbeat_quorum():
    network = Network.create()
    network.elect(1)
    network.propose(1, b"a")
    leader = network.nodes[1]
    leader.read_index(b"r1")
    assert network.read_states[1] == []  # not before the heartbeat round
    network.stabilize()
    assert network.read_states[1] == [ReadState(index=leader.commit_index, request_context=b"r1")]
    heartbeats = network.sent_of(MessageType.HEARTBEAT, source=1)
    assert heartbeats and all(len(m.context) == 8 for m in heartbeats)


def test_reads_are_batched_into_one_heartbeat_round():
    network = Network.create()
    network.elect(1)
    before = len(network.sent_of(MessageType.HEARTBEAT))
    for index in range(5):
        network.nodes[1].read_index(b"%d" % index)
    network.stabilize()
    assert len(network.sent_of(MessageType.HEARTBEAT)) - before == 2  # one per follower
    assert [s.request_context for s in network.read_states[1]] == [b"%d" % i for i in range(5)]


def test_read_via_a_follower_is_forwarded_to_the_leader():
    network = Network.create()
    network.elect(1)
    network.propose(1, b"a", b"b")
    network.nodes[2].read_index(b"from-2")
    network.stabilize()
    [state] = network.read_states[2]
    assert state == ReadState(index=network.nodes[1].commit_index, request_context=b"from-2")
    assert network.nodes[2].applied_index >= state.index
    [forwarded] = network.sent_of(MessageType.READ_INDEX)
    assert (forwarded.source, forwarded.target, forwarded.term) == (2, 1, 0)


def test_read_via_a_learner():
    network = Network.create(voters=[1, 2, 3], learners=[4])
    network.elect(1)
    network.nodes[4].read_index(b"learner")
    network.stabilize()
    assert [s.request_context for s in network.read_states[4]] == [b"learner"]


def test_read_is_held_until_the_new_leader_commits_its_no_op():
    network = Network.create()
    network.drop_if(lambda m: m.type == MessageType.APPEND)
    leader = network.elect(1)
    leader.read_index(b"early")
    network.stabilize()
    assert network.read_states[1] == []  # the no-op is not committed yet
    network.recover()
    network.tick([1])
    assert [s.request_context for s in network.read_states[1]] == [b"early"]
    assert network.read_states[1][0].index == leader.commit_index


def test_a_partitioned_leader_serves_no_reads():
    network = Network.create(check_quorum=False)
    network.elect(1)
    network.isolate(1)
    network.nodes[1].read_index(b"stale?")
    network.tick([1], ticks=5)
    assert network.read_states[1] == []


def test_acknowledgements_from_a_minority_do_not_confirm():
    network = Network.create(voters=range(1, 6))
    network.elect(1)
    for node_id in (3, 4, 5):
        network.cut(1, node_id)
    network.nodes[1].read_index(b"r")
    network.tick([1], ticks=3)
    assert network.read_states[1] == []
    network.recover()
    network.tick([1])
    assert [s.request_context for s in network.read_states[1]] == [b"r"]


def test_single_node_reads_immediately():
    network = Network.create(voters=[1])
    network.elect(1)
    network.nodes[1].read_index(b"solo")
    network.stabilize()
    assert network.read_states[1] == [
        ReadState(index=network.nodes[1].commit_index, request_context=b"solo")
    ]


def test_read_without_a_known_leader_is_refused():
    network = Network.create()
    with pytest.raises(ProposalDroppedError):
        network.nodes[1].read_index(b"nobody")


def test_pending_reads_are_bounded():
    network = Network.create(max_pending_reads=2)
    network.elect(1)
    network.isolate(1)
    leader = network.nodes[1]
    leader.read_index(b"1")
    leader.read_index(b"2")
    with pytest.raises(ProposalDroppedError):
        leader.read_index(b"3")
