"""Seeded random fault schedules over the synchronous network, checking safety throughout.

Each seed mixes ticks, proposals, message loss, partitions, crash-restarts, compaction,
membership changes, leadership transfers and reads. The network itself asserts that no two
nodes apply different entries at one index and that a term has at most one leader; this
test adds that a read never returns an index below an entry already applied somewhere
before the read was requested, and that after healing every node converges.
A failure names its seed; rerun with that seed alone to replay it exactly.
"""

from __future__ import annotations

import random

import pytest
from test_core_network import Network, encode_state

from broker.raft import (
    ConfigChange,
    ConfigChangeKind,
    Message,
    RaftError,
    Role,
)

SEEDS = range(24)
STEPS = 300


class Chaos:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.network = Network.create(
            voters=[1, 2, 3, 4, 5],
            seed=seed,
            pre_vote=self.rng.random() < 0.8,
            check_quorum=self.rng.random() < 0.8,
            election_ticks=6,
            max_append_entries=self.rng.choice([1, 3, 64]),
            max_inflight_appends=self.rng.choice([1, 4, 256]),
        )
        self.loss = 0.0
        self.network.drop_if(self._lose)
        if self.rng.random() < 0.5:
            self.network.disorder = (random.Random(seed), 0.1)
        self.next_spare = 6
        self.reads: dict[bytes, int] = {}  # context -> highest applied index when requested
        self.read_count = 0

    def _lose(self, message: Message) -> bool:
        return self.rng.random() < self.loss

    def applied_anywhere(self) -> int:
        return max(
            (entries[-1].index for entries in self.network.applied.values() if entries), default=0
        )

    def leader(self) -> int | None:
        leaders = [i for i in self.network.leaders() if i not in self.network.crashed]
        return max(leaders, key=lambda i: self.network.nodes[i].term) if leaders else None

    def step(self) -> None:
        network, rng = self.network, self.rng
        action = rng.random()
        if action < 0.45:
            network.tick()
        elif action < 0.65:
            leader = self.leader()
            if leader is not None:
                try:
                    network.nodes[leader].propose(b"%d" % rng.randrange(10**6))
                except RaftError:
                    pass
                network.stabilize()
        elif action < 0.70:
            self.loss = rng.choice([0.0, 0.0, 0.1, 0.3])
        elif action < 0.75:
            a, b = rng.sample(sorted(network.nodes), 2)
            network.cut(a, b)
        elif action < 0.80:
            network._cut.clear()
        elif action < 0.84:
            self.crash_or_restart()
        elif action < 0.88:
            node_id = rng.choice(sorted(network.nodes))
            if node_id not in network.crashed:
                node = network.nodes[node_id]
                node.compact(node.applied_index, encode_state(network.state[node_id]))
        elif action < 0.92:
            self.change_membership()
        elif action < 0.95:
            leader = self.leader()
            if leader is not None:
                voters = sorted(network.nodes[leader].configuration.voters)
                try:
                    network.nodes[leader].transfer_leadership(rng.choice(voters))
                except RaftError:
                    pass
                network.stabilize()
        else:
            self.read()

    def crash_or_restart(self) -> None:
        network = self.network
        if network.crashed:
            network.restart(self.rng.choice(sorted(network.crashed)))
        elif len(network.crashed) < 2:
            network.crash(self.rng.choice(sorted(network.nodes)))

    def change_membership(self) -> None:
        network, rng = self.network, self.rng
        leader = self.leader()
        if leader is None:
            return
        configuration = network.nodes[leader].configuration
        members = sorted(configuration.members)
        if rng.random() < 0.5 and len(configuration.voters) > 3:
            change = ConfigChange(
                kind=ConfigChangeKind.REMOVE_VOTER, node_id=rng.choice(sorted(configuration.voters))
            )
        elif rng.random() < 0.5 and configuration.learners:
            change = ConfigChange(
                kind=ConfigChangeKind.ADD_VOTER, node_id=rng.choice(sorted(configuration.learners))
            )
        else:
            candidates = [n for n in network.nodes if n not in members]
            if not candidates and self.next_spare <= 8:
                candidates = [self.next_spare]
                network.add_node(self.next_spare)
                self.next_spare += 1
            if not candidates:
                return
            change = ConfigChange(kind=ConfigChangeKind.ADD_LEARNER, node_id=candidates[0])
        try:
            network.nodes[leader].propose_config_change(change)
        except RaftError:
            pass
        network.stabilize()

    def read(self) -> None:
        network = self.network
        node_id = self.rng.choice(sorted(network.nodes))
        if node_id in network.crashed:
            return
        context = b"read-%d" % self.read_count
        self.read_count += 1
        floor = self.applied_anywhere()
        try:
            network.nodes[node_id].read_index(context)
        except RaftError:
            return
        self.reads[context] = floor
        network.stabilize()

    def check_reads(self) -> None:
        for states in self.network.read_states.values():
            for state in states:
                floor = self.reads[state.request_context]
                assert state.index >= floor, f"stale read {state} (applied {floor} before)"

    def heal_and_converge(self) -> None:
        network = self.network
        self.loss = 0.0
        network.disorder = None
        network._cut.clear()
        for node_id in sorted(network.crashed):
            network.restart(node_id)
        for _ in range(200):
            network.tick()
            leader = self.leader()
            if leader is None:
                continue
            leader_node = network.nodes[leader]
            members = leader_node.configuration.members | {leader}
            if (
                all(
                    network.nodes[i].applied_index == leader_node.commit_index
                    and network.nodes[i].last_index == leader_node.last_index
                    for i in members
                )
                and leader_node.commit_index == leader_node.last_index
            ):
                states = {tuple(network.state[i]) for i in members}
                assert len(states) == 1, "members applied different states"
                return
        raise AssertionError("the cluster did not converge after healing")


@pytest.mark.parametrize("seed", SEEDS)
def test_random_faults_keep_the_log_safe(seed):
    chaos = Chaos(seed)
    for _ in range(STEPS):
        chaos.step()
        chaos.check_reads()
    chaos.heal_and_converge()
    chaos.check_reads()
    roles = [node.role for node in chaos.network.nodes.values()]
    assert roles.count(Role.LEADER) >= 1
