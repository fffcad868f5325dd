"""The uniform, sticky server-side assignor.

Theory of operation: an assignment is computed in three passes over plain sets.

1. Keep: every member keeps the partitions it had in the previous target assignment that are
   still valid (the member still subscribes to the topic and the partition still exists). A
   partition listed for two members stays with the first in member id order.
2. Fill: every partition left without an owner goes to the eligible member (one subscribed
   to its topic) with the fewest partitions, ties to the smallest member id. Topics with the
   fewest eligible members go first: they have the least choice.
3. Balance: while some member has at least two partitions more than an eligible member,
   move one partition from a member with the most partitions to one with the fewest. Each move
   lowers the sum of squared partition counts, so the loop ends. With identical subscriptions
   it ends balanced to within one partition; with different subscriptions it is a greedy best.

Only pass 3 moves partitions a member kept, and only to even out counts, so a stable group
re-run with its own result as `previous` moves nothing. Everything is sorted, so the result
depends on the inputs alone.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from broker.groups.group_types import TopicPartition


def assign(
    subscriptions: Mapping[str, frozenset[str]],
    partition_counts: Mapping[str, int],
    previous: Mapping[str, frozenset[TopicPartition]],
) -> dict[str, frozenset[TopicPartition]]:
    """Return the new target assignment: an entry (maybe empty) for every subscribed member.

    `subscriptions` maps member id to topic names; topics missing from `partition_counts` are
    ignored. `previous` may name departed members, deleted topics or partitions that no
    longer exist: those entries are dropped.
    """
    eligible_topics = {
        member_id: frozenset(topic for topic in topics if partition_counts.get(topic, 0) > 0)
        for member_id, topics in subscriptions.items()
    }
    assignment = _keep_previous(eligible_topics, partition_counts, previous)
    _fill_free_partitions(assignment, eligible_topics, partition_counts)
    _balance(assignment, eligible_topics)
    return {member_id: frozenset(assignment[member_id]) for member_id in sorted(assignment)}


def _keep_previous(
    eligible_topics: Mapping[str, frozenset[str]],
    partition_counts: Mapping[str, int],
    previous: Mapping[str, frozenset[TopicPartition]],
) -> dict[str, set[TopicPartition]]:
    assignment: dict[str, set[TopicPartition]] = {}
    taken: set[TopicPartition] = set()
    for member_id in sorted(eligible_topics):
        topics = eligible_topics[member_id]
        kept = {
            (topic, partition)
            for topic, partition in previous.get(member_id, frozenset())
            if topic in topics and 0 <= partition < partition_counts[topic]
        }
        kept -= taken
        taken |= kept
        assignment[member_id] = kept
    return assignment


def _fill_free_partitions(
    assignment: dict[str, set[TopicPartition]],
    eligible_topics: Mapping[str, frozenset[str]],
    partition_counts: Mapping[str, int],
) -> None:
    members_by_topic: dict[str, list[str]] = {}
    for member_id in sorted(eligible_topics):
        for topic in eligible_topics[member_id]:
            members_by_topic.setdefault(topic, []).append(member_id)
    taken = {partition for partitions in assignment.values() for partition in partitions}
    for topic in sorted(members_by_topic, key=lambda name: (len(members_by_topic[name]), name)):
        free = [
            (topic, partition)
            for partition in range(partition_counts[topic])
            if (topic, partition) not in taken
        ]
        if not free:
            continue
        # A heap of (partition count, member id) over this topic's members: the least loaded
        # member is always on top, and only the member just given a partition changes.
        least_loaded = [(len(assignment[member]), member) for member in members_by_topic[topic]]
        heapq.heapify(least_loaded)
        for topic_partition in free:
            count, member_id = least_loaded[0]
            assignment[member_id].add(topic_partition)
            heapq.heapreplace(least_loaded, (count + 1, member_id))


def _balance(
    assignment: dict[str, set[TopicPartition]], eligible_topics: Mapping[str, frozenset[str]]
) -> None:
    while (move := _find_move(assignment, eligible_topics)) is not None:
        donor, receiver, topic_partition = move
        assignment[donor].remove(topic_partition)
        assignment[receiver].add(topic_partition)


def _find_move(
    assignment: Mapping[str, set[TopicPartition]], eligible_topics: Mapping[str, frozenset[str]]
) -> tuple[str, str, TopicPartition] | None:
    """Return (donor, receiver, partition) for the most useful move, or None when balanced."""
    donors = sorted(assignment, key=lambda member_id: (-len(assignment[member_id]), member_id))
    receivers = sorted(assignment, key=lambda member_id: (len(assignment[member_id]), member_id))
    for donor in donors:
        if len(assignment[donor]) - len(assignment[receivers[0]]) <= 1:
            return None
        for receiver in receivers:
            if len(assignment[donor]) - len(assignment[receiver]) <= 1:
                break
            topics = eligible_topics[receiver]
            movable = [item for item in assignment[donor] if item[0] in topics]
            if movable:
                return donor, receiver, max(movable)
    return None
