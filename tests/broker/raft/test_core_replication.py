"""Log replication: repair of divergent logs (Raft paper figure 7), commit by counting only
current-term entries (figure 8), flow control and the size limits."""

from __future__ import annotations

import pytest
from test_core_network import Network, log_storage

from broker.raft import (
    Configuration,
    EntryKind,
    MessageType,
    NotLeaderError,
    ProgressState,
    ProposalDroppedError,
    ProposalTooLargeError,
    decode_config_change,
    entry_bytes,
)

VOTERS = Configuration(voters=frozenset({1, 2, 3}))

# Figure 7 of the Raft paper: the leader's log at the start of term 8 and followers a-f.
FIGURE_7_LEADER = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
FIGURE_7_FOLLOWERS = {
    "a": [1, 1, 1, 4, 4, 5, 5, 6, 6],  # missing entries
    "b": [1, 1, 1, 4],  # missing many entries
    "c": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],  # an extra uncommitted entry
    "d": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],  # extra entries of a later term
    "e": [1, 1, 1, 4, 4, 4, 4],  # missing entries and extra entries of term 4
    "f": [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],  # a long divergent tail of terms 2 and 3
}


@pytest.mark.parametrize("name", sorted(FIGURE_7_FOLLOWERS))
def test_leader_repairs_follower_logs_of_figure_7(name):
    network = Network(pre_vote=False)
    network.add_node(1, log_storage(VOTERS, FIGURE_7_LEADER, term=7))
    network.add_node(2, log_storage(VOTERS, FIGURE_7_FOLLOWERS[name], term=7))
    network.add_node(3, log_storage(VOTERS, FIGURE_7_LEADER, term=7))  # votes for node 1
    network.cut(3, 2)
    network.campaign(1)
    assert network.leaders() == [1] and network.nodes[1].term == 8
    expected = FIGURE_7_LEADER + [8]  # plus the leader's no-op of term 8
    assert network.log_terms(2) == expected
    assert network.nodes[2].commit_index == len(expected)
    # Conflict hints repair any of these logs in at most three APPEND round trips.
    appends = network.sent_of(MessageType.APPEND, source=1, target=2)
    assert len(appends) <= 3, [(m.index, m.log_term, len(m.entries)) for m in appends]


def test_follower_hint_skips_a_long_divergent_tail_in_one_round_trip():
    # The leader's log at index 9 has term 3; the follower's tail is all terms 4..6.
    leader = [1, 3, 3, 3, 3, 3, 3, 3, 3]
    follower = [1, 3, 3, 4, 4, 5, 5, 5, 6]
    network = Network(pre_vote=False)
    network.add_node(1, log_storage(VOTERS, leader, term=6))
    network.add_node(2, log_storage(VOTERS, follower, term=6))
    network.add_node(3, log_storage(VOTERS, leader, term=6))
    network.cut(3, 2)
    network.elect(1)
    assert network.log_terms(2) == network.log_terms(1)
    rejections = [m for m in network.sent_of(MessageType.APPEND_RESPONSE, source=2) if m.reject]
    assert len(rejections) == 1
    assert (rejections[0].reject_hint, rejections[0].log_term) == (3, 3)


def test_figure_8_an_old_term_entry_on_a_majority_is_not_committed_by_counting():
    network = Network.create(
        voters=range(1, 6), pre_vote=False, check_quorum=False, max_append_entries=1
    )
    network.elect(1)  # term 1: the no-op and the bootstrap configuration
    base = network.nodes[1].last_index
    prefix = [1] * base
    k = base + 1  # the index the figure is about
    # (a) S1 replicates index k (term 1) to S2 only.
    for node_id in (3, 4, 5):
        network.cut(1, node_id)
    network.propose(1, b"figure-8")
    assert network.log_terms(2) == prefix + [1]
    # (b) S1 crashes; S5 is elected in term 2 by S3, S4, S5 and appends at index k alone.
    network.recover()
    network.crash(1)
    network.drop_if(lambda m: m.source == 5 and m.type == MessageType.APPEND)
    network.elect(5)
    assert network.nodes[5].term == 2 and network.log_terms(5) == prefix + [2]
    # (c) S5 crashes; S1 is elected in term 3 and replicates index k to S3, but its term-3
    # no-op reaches only S2: index k is now stored on a majority (S1, S2, S3).
    network.recover()
    network.crash(5)
    network.restart(1)

    def holds_back_the_noop(message):
        return (
            message.source == 1
            and message.type == MessageType.APPEND
            and message.target != 2
            and any(entry.term == 3 for entry in message.entries)
            and network.nodes[message.target].last_index >= k
        )

    network.drop_if(holds_back_the_noop)
    network.elect(1)
    assert network.nodes[1].term == 3
    assert [network.log_terms(i)[:k] for i in (1, 2, 3)] == [prefix + [1]] * 3
    assert network.nodes[1].commit_index == base  # counting replicas commits only term 3
    # (d) S1 crashes; S5 is elected in term 4 and overwrites index k: which is safe only
    # because nobody ever applied the term-1 entry there.
    network.recover()
    network.crash(1)
    network.restart(5)
    network.elect(5)
    for node_id in (2, 3, 4, 5):
        assert network.log_terms(node_id)[:k] == prefix + [2]
        assert network.state[node_id] == []
    assert network.nodes[5].commit_index == k + 1
    network.restart(1)
    network.tick([5])
    assert network.log_terms(1) == prefix + [2, 4]


def test_leader_commits_an_earlier_term_entry_through_its_no_op():
    network = Network.create(voters=range(1, 6), pre_vote=False, check_quorum=False)
    network.elect(1)
    for node_id in (3, 4, 5):
        network.cut(1, node_id)
    network.propose(1, b"old")
    network.recover()
    network.crash(5)
    network.restart(1)
    network.elect(1)
    assert network.nodes[1].term == 2
    assert network.state[1] == [b"old"]  # committed together with the term-2 no-op


def test_proposals_on_a_follower_raise_not_leader_with_the_leader():
    network = Network.create()
    network.elect(1)
    with pytest.raises(NotLeaderError) as error:
        network.nodes[2].propose(b"x")
    assert error.value.leader == 1


def test_replicate_state_streams_at_most_max_inflight_appends():
    network = Network.create(max_inflight_appends=2)
    network.elect(1)
    network.drop_if(lambda m: m.type == MessageType.APPEND_RESPONSE and m.source == 2)
    before = len(network.sent_of(MessageType.APPEND, source=1, target=2))
    for index in range(10):
        network.nodes[1].propose(b"%d" % index)
    network.stabilize()
    sent = network.sent_of(MessageType.APPEND, source=1, target=2)[before:]
    assert len(sent) == 2
    assert network.nodes[1].status().progress[2].paused
    assert network.state[1] == [b"%d" % i for i in range(10)]  # node 3 made the quorum


def test_probe_state_sends_one_append_until_a_response():
    network = Network.create()
    network.elect(1)
    network.isolate(2)
    network.nodes[1].report_unreachable(2)
    assert network.nodes[1].status().progress[2].state == ProgressState.PROBE
    before = len(network.sent_of(MessageType.APPEND, source=1, target=2))
    network.propose(1, b"a", b"b", b"c")
    sent = network.sent_of(MessageType.APPEND, source=1, target=2)[before:]
    assert len(sent) == 1
    network.recover()
    network.tick([1])
    assert network.state[2] == [b"a", b"b", b"c"]
    assert network.nodes[1].status().progress[2].state == ProgressState.REPLICATE


def test_a_lost_append_is_resent_after_a_heartbeat_response():
    network = Network.create()
    network.elect(1)
    dropped = []

    def drop_first_append_to_2(message):
        if message.type == MessageType.APPEND and message.target == 2 and not dropped:
            dropped.append(message)
            return True
        return False

    network.drop_if(drop_first_append_to_2)
    network.isolate(3)
    last = network.storages[2].last_index()
    network.propose(1, b"a")
    assert dropped and network.storages[2].last_index() == last
    network.tick([1])  # heartbeat -> response shows match < last -> resend
    assert network.state[2] == [b"a"]


def test_appends_respect_max_append_bytes_and_entries():
    data = b"x" * 100
    per_entry = entry_bytes_of(data)
    network = Network.create(max_append_bytes=2 * per_entry, max_append_entries=64)
    network.elect(1)
    network.isolate(3)
    network.propose(1, *[data] * 6)
    network.recover()
    before = len(network.sent)
    network.tick([1])
    catch_up = [m for m in network.sent[before:] if m.type == MessageType.APPEND and m.target == 3]
    assert catch_up and all(len(m.entries) <= 2 for m in catch_up)
    assert network.state[3] == [data] * 6

    network = Network.create(max_append_entries=3)
    network.elect(1)
    network.isolate(3)
    network.propose(1, *[b"y"] * 7)
    network.recover()
    network.tick([1])
    assert all(len(m.entries) <= 3 for m in network.sent_of(MessageType.APPEND))
    assert network.state[3] == [b"y"] * 7


def entry_bytes_of(data: bytes) -> int:
    from broker.raft import Entry

    return entry_bytes(Entry(term=1, index=1, data=data))


def test_proposals_beyond_max_uncommitted_bytes_are_dropped():
    network = Network.create(max_uncommitted_bytes=1000, max_append_bytes=1000)
    network.elect(1)
    network.isolate(1)
    leader = network.nodes[1]
    for _ in range(3):
        leader.propose(b"z" * 300)
    with pytest.raises(ProposalDroppedError):
        leader.propose(b"z" * 300)
    network.recover()
    network.tick([1])
    assert len(network.state[1]) == 3
    leader.propose(b"z" * 300)  # committed entries no longer count


def test_a_proposal_larger_than_max_append_bytes_is_refused():
    network = Network.create(max_append_bytes=1000)
    network.elect(1)
    with pytest.raises(ProposalTooLargeError):
        network.nodes[1].propose(b"z" * 1000)


def test_committed_entries_per_ready_are_bounded():
    network = Network.create(voters=[1], max_committed_bytes_per_ready=200)
    network.elect(1)
    node = network.nodes[1]
    for _ in range(5):
        node.propose(b"q" * 100)
    sizes = []
    while node.has_ready():
        ready = node.ready()
        network.storages[1].append(ready.entries)
        sizes.append(len(ready.committed_entries))
        node.advance(ready)
    assert max(sizes) <= 2 and sum(sizes) == 5


def test_no_op_is_the_first_entry_of_every_leader_term():
    network = Network.create(check_quorum=False)
    network.elect(1)
    network.elect(2)
    entries = network.applied[3]
    first_of_term = {}
    for entry in entries:
        first_of_term.setdefault(entry.term, entry)
    assert sorted(first_of_term) == [1, 2]
    assert all(e.kind == EntryKind.NORMAL and e.data == b"" for e in first_of_term.values())
    # A fresh cluster's first leader also writes the bootstrap configuration to the log.
    bootstrap = [e for e in entries if e.kind == EntryKind.CONFIG_CHANGE]
    assert [decode_config_change(e.data).node_id for e in bootstrap] == [1, 2, 3]
    assert all(e.term == 1 for e in bootstrap)


@pytest.mark.parametrize("keep", [0, 3, 6])
def test_a_follower_that_lost_acknowledged_entries_catches_up_in_a_few_messages(keep):
    # The leader believes match=8 for node 3; node 3 comes back with `keep` entries. Before
    # the fix the leader resent the probe at match forever (the network never fell quiet).
    network = Network.create()
    network.elect(1)
    network.propose(1, b"a", b"b", b"c", b"d")
    assert network.nodes[1].status().progress[3].match == 8
    network.lose_entries(3, keep)
    sent_before = len(network.sent_of(MessageType.APPEND, source=1, target=3))
    network.propose(1, b"e")
    network.propose(1, b"f")
    appends = network.sent_of(MessageType.APPEND, source=1, target=3)[sent_before:]
    assert len(appends) <= 10, f"{len(appends)} appends to a follower that lost entries"
    assert network.storages[3].last_index() == network.storages[1].last_index() == 10
    assert network.state[3] == [b"a", b"b", b"c", b"d", b"e", b"f"]
    progress = network.nodes[1].status().progress[3]
    assert (progress.match, progress.state) == (10, ProgressState.REPLICATE)
