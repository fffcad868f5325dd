"""Helpers shared by the consumer group tests: a member id factory, a driver that keeps the
clock and the topics, and the safety invariants checked after every step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from broker.groups import (
    ConsumerGroup,
    GroupConfig,
    HeartbeatRequest,
    HeartbeatResponse,
    TopicPartition,
)


class SequentialIds:
    """A member id factory: "member-1", "member-2", ..."""

    def __init__(self) -> None:
        self.issued = 0

    def __call__(self) -> str:
        self.issued += 1
        return f"member-{self.issued}"


def partitions_of(partition_counts: Mapping[str, int], *topics: str) -> frozenset[TopicPartition]:
    return frozenset((topic, index) for topic in topics for index in range(partition_counts[topic]))


@dataclass
class GroupDriver:
    """A group, the topics it sees and the time, with short calls for each request kind."""

    partition_counts: dict[str, int]
    config: GroupConfig = field(
        default_factory=lambda: GroupConfig(
            session_timeout_ms=10_000, heartbeat_interval_ms=1_000, rebalance_timeout_ms=5_000
        )
    )
    now_ms: int = 0
    group: ConsumerGroup = field(init=False)

    def __post_init__(self) -> None:
        self.group = ConsumerGroup("group", self.config, SequentialIds())

    def send(self, **fields: object) -> HeartbeatResponse:
        request = HeartbeatRequest(**fields)  # type: ignore[arg-type]
        response = self.group.heartbeat(
            request, now_ms=self.now_ms, partition_counts=self.partition_counts
        )
        check_invariants(self.group, self.partition_counts)
        return response

    def join(self, *topics: str, **fields: object) -> HeartbeatResponse:
        fields.setdefault("subscribed_topic_names", topics)
        return self.send(member_id=None, member_epoch=0, **fields)

    def beat(
        self,
        response: HeartbeatResponse,
        owned: frozenset[TopicPartition] | None = None,
        **fields: object,
    ) -> HeartbeatResponse:
        """Heartbeat as the member `response` answered, at the epoch it was given."""
        return self.send(
            member_id=response.member_id,
            member_epoch=response.member_epoch,
            owned_partitions=owned,
            **fields,
        )

    def acknowledge(self, response: HeartbeatResponse) -> HeartbeatResponse:
        """Heartbeat owning exactly what `response` allowed (a member that revoked promptly)."""
        return self.beat(response, owned=response.assignment)

    def expire(self) -> list[str]:
        expired = self.group.expire(now_ms=self.now_ms, partition_counts=self.partition_counts)
        check_invariants(self.group, self.partition_counts)
        return expired

    def metadata_changed(self) -> None:
        self.group.metadata_changed(partition_counts=self.partition_counts)
        check_invariants(self.group, self.partition_counts)

    def member(self, member_id: str):
        (found,) = [m for m in self.group.describe().members if m.member_id == member_id]
        return found


def check_invariants(group: ConsumerGroup, partition_counts: Mapping[str, int]) -> None:
    """The safety invariants: no partition held (assigned or pending revocation) by two
    members; `owner_of` agrees; targets are disjoint; epochs never run ahead."""
    description = group.describe()
    holder: dict[TopicPartition, str] = {}
    target_holder: dict[TopicPartition, str] = {}
    for member in description.members:
        assert not member.assignment & member.pending_revocation, member
        for partition in member.assignment | member.pending_revocation:
            assert partition not in holder, (partition, holder[partition], member.member_id)
            holder[partition] = member.member_id
            assert group.owner_of(partition) == member.member_id
        for partition in member.target_assignment:
            assert partition not in target_holder, partition
            target_holder[partition] = member.member_id
        assert member.member_epoch <= description.assignment_epoch
    assert description.assignment_epoch <= description.group_epoch
    for topic, count in partition_counts.items():
        for index in range(count):
            assert group.owner_of((topic, index)) == holder.get((topic, index))
    assert group.is_empty == (not description.members)
