"""The uniform sticky assignor: examples, then properties over generated groups."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.groups import TopicPartition, assign

TOPICS = ("t0", "t1", "t2", "t3")
MEMBERS = tuple(f"m{index}" for index in range(7))


def owners(assignment) -> dict[TopicPartition, str]:
    result: dict[TopicPartition, str] = {}
    for member_id, partitions in assignment.items():
        for partition in partitions:
            assert partition not in result, partition
            result[partition] = member_id
    return result


def check_valid(assignment, subscriptions, partition_counts) -> None:
    """Every partition of every subscribed topic assigned once, to a member subscribed to it."""
    assert set(assignment) == set(subscriptions)
    owner = owners(assignment)
    expected = {
        (topic, index)
        for topics in subscriptions.values()
        for topic in topics
        if topic in partition_counts
        for index in range(partition_counts[topic])
    }
    assert set(owner) == expected
    for (topic, _), member_id in owner.items():
        assert topic in subscriptions[member_id]


def counts(assignment) -> list[int]:
    return [len(partitions) for partitions in assignment.values()]


def changed(before, after) -> list[TopicPartition]:
    """The partitions owned before that have a different owner after."""
    owner_after = owners(after)
    return [p for p, member in owners(before).items() if owner_after.get(p) != member]


def partitions(*topic_counts: tuple[str, int]) -> frozenset[TopicPartition]:
    return frozenset((topic, index) for topic, count in topic_counts for index in range(count))


# ----------------------------------------------------------------- examples


def test_one_member_gets_everything():
    result = assign({"a": frozenset({"x", "y"})}, {"x": 2, "y": 1}, {})
    assert result == {"a": frozenset({("x", 0), ("x", 1), ("y", 0)})}


def test_spreads_evenly_in_member_order():
    subscriptions = {member: frozenset({"x"}) for member in ("b", "a", "c")}
    result = assign(subscriptions, {"x": 4}, {})
    assert counts({m: result[m] for m in ("a", "b", "c")}) == [2, 1, 1]


def test_every_member_gets_an_entry_even_without_topics():
    result = assign({"a": frozenset({"missing"}), "b": frozenset()}, {"x": 1}, {})
    assert result == {"a": frozenset(), "b": frozenset()}


def test_previous_entries_that_are_no_longer_valid_are_dropped():
    previous = {
        "a": frozenset({("x", 0), ("x", 5), ("gone", 0), ("y", 0)}),  # 5 is beyond the count
        "departed": frozenset({("x", 1)}),
    }
    result = assign({"a": frozenset({"x"}), "b": frozenset({"x"})}, {"x": 2, "y": 1}, previous)
    assert result == {"a": frozenset({("x", 0)}), "b": frozenset({("x", 1)})}


def test_a_partition_listed_twice_in_previous_stays_with_the_first_member():
    previous = {"a": frozenset({("x", 0)}), "b": frozenset({("x", 0)})}
    result = assign({"a": frozenset({"x"}), "b": frozenset({"x"})}, {"x": 2}, previous)
    assert result == {"a": frozenset({("x", 0)}), "b": frozenset({("x", 1)})}


def test_different_subscriptions_balance_where_they_can():
    subscriptions = {"a": frozenset({"x", "y"}), "b": frozenset({"y"}), "c": frozenset({"x"})}
    result = assign(subscriptions, {"x": 3, "y": 3}, {"a": partitions(("x", 3), ("y", 3))})
    check_valid(result, subscriptions, {"x": 3, "y": 3})
    assert sorted(counts(result)) == [2, 2, 2]


# ----------------------------------------------------------------- properties

partition_counts_strategy = st.dictionaries(
    st.sampled_from(TOPICS), st.integers(min_value=1, max_value=9), min_size=1
)


@st.composite
def groups(draw, identical: bool = False):
    """Subscriptions (some naming unknown topics), partition counts and a previous target
    assignment full of garbage: departed members, unknown topics, partitions out of range."""
    partition_counts = draw(partition_counts_strategy)
    members = draw(st.lists(st.sampled_from(MEMBERS), min_size=1, unique=True))
    topics = st.frozensets(st.sampled_from(TOPICS + ("unknown",)))
    if identical:
        shared = draw(topics)
        subscriptions = {member: shared for member in members}
    else:
        subscriptions = {member: draw(topics) for member in members}
    garbage = st.frozensets(
        st.tuples(st.sampled_from(TOPICS + ("unknown",)), st.integers(0, 10)), max_size=12
    )
    previous = draw(st.dictionaries(st.sampled_from(MEMBERS + ("departed",)), garbage))
    return subscriptions, partition_counts, previous


@given(groups())
def test_every_partition_is_assigned_once_to_an_eligible_member(group):
    subscriptions, partition_counts, previous = group
    check_valid(assign(subscriptions, partition_counts, previous), subscriptions, partition_counts)


@given(groups(identical=True))
def test_identical_subscriptions_are_balanced_within_one(group):
    result = assign(*group)
    assert max(counts(result)) - min(counts(result)) <= 1


@given(groups())
def test_the_result_is_a_fixed_point(group):
    subscriptions, partition_counts, previous = group
    result = assign(subscriptions, partition_counts, previous)
    assert assign(subscriptions, partition_counts, result) == result


@given(groups())
def test_the_result_does_not_depend_on_mapping_order(group):
    subscriptions, partition_counts, previous = group
    result = assign(subscriptions, partition_counts, previous)
    reversed_subscriptions = dict(reversed(list(subscriptions.items())))
    reversed_previous = dict(reversed(list(previous.items())))
    assert assign(reversed_subscriptions, partition_counts, reversed_previous) == result


@given(groups(identical=True), st.sampled_from(MEMBERS + ("new",)))
def test_a_joining_member_moves_at_most_its_share(group, new_member):
    subscriptions, partition_counts, previous = group
    before = assign(subscriptions, partition_counts, previous)
    if new_member in subscriptions:
        return
    shared = next(iter(subscriptions.values()))
    after = assign({**subscriptions, new_member: shared}, partition_counts, before)
    total = sum(counts(after))
    assert len(changed(before, after)) <= math.ceil(total / len(after))
    assert all(owners(after)[partition] == new_member for partition in changed(before, after))


@given(groups(identical=True), st.data())
def test_a_leaving_member_moves_only_its_partitions(group, data):
    subscriptions, partition_counts, previous = group
    before = assign(subscriptions, partition_counts, previous)
    leaving = data.draw(st.sampled_from(sorted(subscriptions)))
    remaining = {member: topics for member, topics in subscriptions.items() if member != leaving}
    after = assign(remaining, partition_counts, before)
    owner_after = owners(after)
    for partition, member in owners(before).items():
        if member != leaving:
            assert owner_after[partition] == member
    if after:
        assert max(counts(after)) - min(counts(after)) <= 1


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=1, max_value=60), st.integers(min_value=1, max_value=400))
def test_large_groups_stay_balanced_and_sticky(member_count, partition_count):
    subscriptions = {f"member-{index:03d}": frozenset({"t"}) for index in range(member_count)}
    before = assign(subscriptions, {"t": partition_count}, {})
    assert max(counts(before)) - min(counts(before)) <= 1
    grown = assign(subscriptions, {"t": partition_count * 2}, before)
    assert max(counts(grown)) - min(counts(grown)) <= 1
    assert all(before[member] <= grown[member] for member in subscriptions)
