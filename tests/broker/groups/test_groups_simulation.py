"""A deterministic simulation of a consumer group under churn.

Simulated consumers join, heartbeat, leave, crash, lose responses, sometimes hold on to
revoked partitions, while time passes and topics grow or appear. After every step:

- the group's own invariants hold (`check_invariants`);
- a consumer the group still knows uses only partitions the group lets it hold, so no
  partition is used by two members the group knows;
- a consumer the group no longer knows (a zombie) cannot commit.

Then the faults stop, every consumer heartbeats and releases promptly, and the group must
become stable with every subscribed partition owned. Each run is one seed: a failure names
it, and `-k "seed-N"` replays it exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from groups_test_support import SequentialIds, check_invariants

from broker.groups import (
    ConsumerGroup,
    GroupConfig,
    GroupError,
    HeartbeatRequest,
    TopicPartition,
)
from protocol.errors import ErrorCode

CONFIG = GroupConfig(
    session_timeout_ms=10_000, heartbeat_interval_ms=1_000, rebalance_timeout_ms=4_000
)
TOPIC_NAMES = ("orders", "payments", "audit", "orders-eu")
SUBSCRIPTIONS = (
    dict(subscribed_topic_names=("orders",), subscribed_topic_regex=""),
    dict(subscribed_topic_names=("orders", "payments"), subscribed_topic_regex=""),
    dict(subscribed_topic_names=("audit", "missing"), subscribed_topic_regex=""),
    dict(subscribed_topic_names=(), subscribed_topic_regex="orders.*"),
)
STEPS = 300


@dataclass
class Consumer:
    """A client process as the group sees it through requests, and what it really uses."""

    name: str
    subscription: dict
    instance_id: str | None = None
    member_id: str | None = None
    epoch: int = 0
    owned: frozenset[TopicPartition] = frozenset()
    releases_promptly: bool = True
    running: bool = True

    def forget_membership(self) -> None:
        self.member_id, self.epoch, self.owned = None, 0, frozenset()


class Simulation:
    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.group = ConsumerGroup("group", CONFIG, SequentialIds())
        self.partition_counts = {"orders": 3, "payments": 2}
        self.now_ms = 0
        self.consumers: list[Consumer] = []
        self.zombies: list[Consumer] = []  # crashed, still believing they own partitions
        self.log: list[str] = []

    # ------------------------------------------------------------- consumer actions

    def heartbeat(self, consumer: Consumer, *, lose_response: bool = False) -> None:
        joining = consumer.member_id is None
        owned = consumer.owned
        if not joining and self.random.random() < 0.3 and not consumer.releases_promptly:
            owned_field = None  # "unchanged since the last heartbeat"
        else:
            owned_field = owned
        request = HeartbeatRequest(
            member_id=consumer.member_id,
            member_epoch=consumer.epoch,
            instance_id=consumer.instance_id,
            owned_partitions=owned_field,
            **(consumer.subscription if joining or self.random.random() < 0.2 else {}),
        )
        try:
            response = self.group.heartbeat(
                request, now_ms=self.now_ms, partition_counts=self.partition_counts
            )
        except GroupError as error:
            assert error.code in (
                ErrorCode.UNKNOWN_MEMBER_ID,
                ErrorCode.FENCED_MEMBER_EPOCH,
                ErrorCode.UNRELEASED_INSTANCE_ID,
            ), error
            self.log.append(f"{consumer.name} refused {error.code.name}")
            consumer.forget_membership()  # give up everything and rejoin later
            return
        if lose_response:
            self.log.append(f"{consumer.name} lost the response")
            return
        consumer.member_id, consumer.epoch = response.member_id, response.member_epoch
        if consumer.releases_promptly:
            consumer.owned = response.assignment
        else:
            consumer.owned = consumer.owned | response.assignment

    def leave(self, consumer: Consumer, epoch: int) -> None:
        if consumer.member_id is not None:
            request = HeartbeatRequest(
                member_id=consumer.member_id, member_epoch=epoch, instance_id=consumer.instance_id
            )
            try:
                self.group.heartbeat(
                    request, now_ms=self.now_ms, partition_counts=self.partition_counts
                )
            except GroupError as error:
                assert error.code == ErrorCode.UNKNOWN_MEMBER_ID, error
        consumer.forget_membership()

    def crash(self, consumer: Consumer) -> None:
        """The process dies without a word; a new process takes the consumer's place."""
        zombie = Consumer(consumer.name + "-zombie", consumer.subscription)
        zombie.member_id, zombie.epoch, zombie.owned = (
            consumer.member_id,
            consumer.epoch,
            consumer.owned,
        )
        self.zombies.append(zombie)
        consumer.forget_membership()

    # ------------------------------------------------------------- the world

    def add_consumer(self) -> None:
        index = len(self.consumers)
        static = self.random.random() < 0.4
        self.consumers.append(
            Consumer(
                name=f"consumer-{index}",
                subscription=self.random.choice(SUBSCRIPTIONS),
                instance_id=f"instance-{index}" if static else None,
            )
        )

    def change_topics(self) -> None:
        topic = self.random.choice(TOPIC_NAMES)
        if topic in self.partition_counts and self.random.random() < 0.2:
            del self.partition_counts[topic]
        else:
            grown = self.partition_counts.get(topic, 0) + self.random.randint(1, 3)
            self.partition_counts[topic] = grown
        self.log.append(f"topics {self.partition_counts}")
        self.group.metadata_changed(partition_counts=self.partition_counts)

    def expire(self) -> None:
        expired = self.group.expire(now_ms=self.now_ms, partition_counts=self.partition_counts)
        if expired:
            self.log.append(f"expired {expired}")

    def step(self) -> None:
        roll = self.random.random()
        if roll < 0.05 and len(self.consumers) < 6:
            self.add_consumer()
            self.log.append("added a consumer")
            return
        if roll < 0.1:
            self.change_topics()
            return
        if roll < 0.2:
            self.now_ms += self.random.randint(0, 6_000)
            self.expire()
            return
        if not self.consumers:
            return
        consumer = self.random.choice(self.consumers)
        if roll < 0.75:
            self.log.append(f"{consumer.name} heartbeats")
            self.heartbeat(consumer, lose_response=self.random.random() < 0.1)
        elif roll < 0.82:
            consumer.releases_promptly = not consumer.releases_promptly
        elif roll < 0.87:
            self.log.append(f"{consumer.name} leaves")
            self.leave(consumer, -2 if self.random.random() < 0.5 else -1)
        elif roll < 0.9:
            self.log.append(f"{consumer.name} crashes")
            self.crash(consumer)
        else:
            consumer.subscription = self.random.choice(SUBSCRIPTIONS)
            self.log.append(f"{consumer.name} subscribes to {consumer.subscription}")

    # ------------------------------------------------------------- checks

    def check(self) -> None:
        check_invariants(self.group, self.partition_counts)
        members = {member.member_id: member for member in self.group.describe().members}
        for consumer in self.consumers + self.zombies:
            if not consumer.owned:
                continue
            member = members.get(consumer.member_id or "")
            if member is not None and member.member_epoch != -2:
                # The group knows this member: it uses only what the group lets it hold.
                assert consumer.owned <= member.assignment | member.pending_revocation, (
                    consumer,
                    member,
                )
                if consumer.epoch == member.member_epoch:
                    self.group.check_commit(consumer.member_id, consumer.epoch)
            else:
                with pytest.raises(GroupError):
                    self.group.check_commit(consumer.member_id, consumer.epoch)

    def converge(self) -> None:
        """Faults stop: every consumer runs, heartbeats each interval and releases promptly."""
        for consumer in self.consumers:
            consumer.releases_promptly = True
        for _ in range(CONFIG.session_timeout_ms // CONFIG.heartbeat_interval_ms + 10):
            self.now_ms += CONFIG.heartbeat_interval_ms
            for consumer in self.consumers:
                self.heartbeat(consumer)
                self.check()
            self.expire()
            self.check()

    def check_converged(self) -> None:
        description = self.group.describe()
        assert description.state == ("stable" if self.consumers else "empty"), description
        subscribed = {
            topic
            for member in description.members
            for topic in member.subscribed_topic_names
            if topic in self.partition_counts
        } | {
            topic
            for member in description.members
            if member.subscribed_topic_regex
            for topic in self.partition_counts
            if topic.startswith("orders")
        }
        expected = {(t, i) for t in subscribed for i in range(self.partition_counts[t])}
        owned: set[TopicPartition] = set()
        for member in description.members:
            assert not member.pending_revocation
            assert member.assignment == member.target_assignment
            owned |= member.assignment
        assert owned == expected
        by_member_id = {consumer.member_id: consumer for consumer in self.consumers}
        for member in description.members:
            assert by_member_id[member.member_id].owned == member.assignment


@pytest.mark.parametrize("seed", range(40), ids=lambda seed: f"seed-{seed}")
def test_group_stays_safe_under_churn_and_converges(seed):
    simulation = Simulation(seed)
    for _ in range(3):
        simulation.add_consumer()
    try:
        for _ in range(STEPS):
            simulation.step()
            simulation.check()
        simulation.converge()
        simulation.check_converged()
    except BaseException:
        print(f"seed {seed}; last events:", *simulation.log[-30:], sep="\n  ")
        raise
