"""Scenario tests of the consumer group state machine, one rule of KIP-848 at a time.

Every request goes through `GroupDriver`, which checks the safety invariants after each step.
"""

from __future__ import annotations

import pytest
from groups_test_support import GroupDriver, SequentialIds, partitions_of

from broker.groups import (
    ConsumerGroup,
    GroupConfig,
    GroupError,
    HeartbeatRequest,
)
from protocol.errors import DwalError, ErrorCode


def refused(code: ErrorCode):
    return pytest.raises(GroupError, match=code.name)


def two_stable_members(driver: GroupDriver, *topics: str):
    """Join A then B to `topics` and run them to a stable group; return their last responses."""
    a = driver.join(*topics)
    b = driver.join(*topics)
    a = driver.acknowledge(a)  # A is told to revoke half
    a = driver.acknowledge(a)  # A released them
    b = driver.acknowledge(b)  # B takes them
    assert driver.group.state == "stable"
    return a, b


# ----------------------------------------------------------------- joining


def test_one_member_joins_and_gets_everything():
    driver = GroupDriver({"orders": 3})
    assert driver.group.state == "empty" and driver.group.is_empty
    response = driver.join("orders")
    assert response.member_id == "member-1"
    assert response.member_epoch == 1
    assert response.heartbeat_interval_ms == 1_000
    assert response.assignment == partitions_of(driver.partition_counts, "orders")
    description = driver.group.describe()
    assert (description.group_epoch, description.assignment_epoch) == (1, 1)
    assert description.state == "stable"
    # Heartbeats with nothing new change nothing, the epoch included.
    again = driver.acknowledge(response)
    assert again == response
    assert driver.group.describe().group_epoch == 1


def test_second_member_waits_until_the_first_has_revoked():
    driver = GroupDriver({"orders": 4})
    a = driver.join("orders")
    b = driver.join("orders")
    assert driver.group.describe().group_epoch == 2
    assert (b.member_epoch, b.assignment) == (0, frozenset())
    b_target = driver.member(b.member_id).target_assignment
    assert len(b_target) == 2
    assert driver.group.state == "reconciling"

    a_revoking = driver.beat(a, owned=a.assignment)
    assert a_revoking.member_epoch == 1  # not at the new target yet
    assert a_revoking.assignment == a.assignment - b_target
    assert driver.member(a.member_id).pending_revocation == b_target
    assert driver.beat(b).assignment == frozenset()  # still held by A
    driver.group.check_commit(a.member_id, 1)  # A commits before it revokes

    a_done = driver.acknowledge(a_revoking)
    assert a_done.member_epoch == 2
    assert driver.member(a.member_id).pending_revocation == frozenset()
    b_done = driver.beat(b)
    assert (b_done.member_epoch, b_done.assignment) == (2, b_target)
    assert driver.group.state == "stable"


def test_a_member_that_keeps_reporting_revoked_partitions_keeps_them_pending():
    driver = GroupDriver({"orders": 4})
    a = driver.join("orders")
    b = driver.join("orders")
    a_revoking = driver.beat(a, owned=a.assignment)
    for _ in range(3):
        driver.beat(a_revoking, owned=a.assignment)  # still owns all four
        driver.beat(a_revoking)  # owned None: unchanged
        assert driver.beat(b).assignment == frozenset()
    driver.acknowledge(a_revoking)
    assert len(driver.beat(b).assignment) == 2


def test_member_id_comes_from_the_factory_and_must_be_new():
    group = ConsumerGroup("group", GroupConfig(), lambda: "same")
    request = HeartbeatRequest(member_id=None, member_epoch=0)
    group.heartbeat(request, now_ms=0, partition_counts={})
    with pytest.raises(AssertionError):
        group.heartbeat(request, now_ms=0, partition_counts={})


def test_group_size_is_bounded():
    driver = GroupDriver({"orders": 1}, GroupConfig(members_max=2))
    driver.join("orders")
    driver.join("orders")
    with refused(ErrorCode.GROUP_MAX_SIZE_REACHED):
        driver.join("orders")


def test_client_details_and_subscription_are_described():
    driver = GroupDriver({"orders": 1})
    response = driver.join("orders", "audit", client_id="app", host="10.0.0.1")
    (member,) = driver.group.describe().members
    assert (member.client_id, member.host) == ("app", "10.0.0.1")
    assert member.subscribed_topic_names == ("audit", "orders")
    assert member.subscribed_topic_regex is None
    assert member.member_epoch == response.member_epoch
    assert member.instance_id is None


# ----------------------------------------------------------------- leaving and expiry


def test_a_member_that_leaves_frees_its_partitions_at_once():
    driver = GroupDriver({"orders": 4})
    a, b = two_stable_members(driver, "orders")
    epoch = driver.group.describe().group_epoch
    left = driver.send(member_id=b.member_id, member_epoch=-1)
    assert (left.member_epoch, left.assignment) == (-1, frozenset())
    assert driver.group.describe().group_epoch == epoch + 1
    a = driver.acknowledge(a)
    assert a.assignment == partitions_of(driver.partition_counts, "orders")
    assert a.member_epoch == epoch + 1
    with refused(ErrorCode.UNKNOWN_MEMBER_ID):
        driver.beat(b)


def test_last_member_leaving_empties_the_group():
    driver = GroupDriver({"orders": 2})
    a = driver.join("orders")
    driver.send(member_id=a.member_id, member_epoch=-1)
    assert driver.group.state == "empty" and driver.group.is_empty
    assert driver.group.owner_of(("orders", 0)) is None
    driver.group.check_commit(None, -1)  # an admin commit to an empty group


def test_a_member_whose_session_times_out_is_removed():
    driver = GroupDriver({"orders": 4})
    a, b = two_stable_members(driver, "orders")
    driver.now_ms = 9_000
    a = driver.acknowledge(a)
    driver.now_ms = 10_000  # B's deadline exactly: still alive
    assert driver.expire() == []
    driver.now_ms = 10_001
    assert driver.expire() == [b.member_id]
    a = driver.acknowledge(a)
    assert a.assignment == partitions_of(driver.partition_counts, "orders")
    assert driver.group.state == "stable"
    with refused(ErrorCode.UNKNOWN_MEMBER_ID):
        driver.beat(b)
    with refused(ErrorCode.UNKNOWN_MEMBER_ID):
        driver.group.check_commit(b.member_id, b.member_epoch)


def test_a_member_that_does_not_revoke_within_its_rebalance_timeout_is_fenced():
    driver = GroupDriver({"orders": 4})
    a = driver.join("orders", rebalance_timeout_ms=3_000)
    b = driver.join("orders")
    a_revoking = driver.beat(a, owned=a.assignment)  # revocation requested at t=0
    for now_ms in (1_000, 2_000, 3_000):
        driver.now_ms = now_ms
        driver.beat(a_revoking, owned=a.assignment)  # alive, but never releases
        driver.beat(b)
        assert driver.expire() == []
    driver.now_ms = 3_001
    driver.beat(b)
    assert driver.expire() == [a.member_id]
    b = driver.beat(b)
    assert b.assignment == partitions_of(driver.partition_counts, "orders")
    with refused(ErrorCode.UNKNOWN_MEMBER_ID):
        driver.beat(a_revoking)


def test_the_rebalance_timeout_defaults_to_the_config():
    driver = GroupDriver({"orders": 2})  # rebalance_timeout_ms=5_000
    a = driver.join("orders")
    driver.join("orders")
    driver.beat(a, owned=a.assignment)
    driver.now_ms = 5_000
    driver.beat(a, owned=a.assignment)
    assert driver.expire() == []
    driver.now_ms = 5_001
    driver.beat(a, owned=a.assignment)
    assert driver.expire() == [a.member_id]


# ----------------------------------------------------------------- subscriptions and metadata


def test_subscribing_to_another_topic_rebalances():
    driver = GroupDriver({"orders": 2, "payments": 2})
    a = driver.join("orders")
    a = driver.acknowledge(a)
    epoch = driver.group.describe().group_epoch
    a = driver.beat(a, owned=a.assignment, subscribed_topic_names=("orders", "payments"))
    assert driver.group.describe().group_epoch == epoch + 1
    assert a.member_epoch == epoch + 1
    assert a.assignment == partitions_of(driver.partition_counts, "orders", "payments")


def test_resending_the_same_subscription_does_not_rebalance():
    driver = GroupDriver({"orders": 2})
    a = driver.join("orders", subscribed_topic_regex="ord.*")
    epoch = driver.group.describe().group_epoch
    driver.beat(a, subscribed_topic_names=("orders", "orders"), subscribed_topic_regex="ord.*")
    assert driver.group.describe().group_epoch == epoch


def test_switching_to_a_regex_revokes_topics_it_no_longer_matches():
    driver = GroupDriver({"orders": 2, "payments-eu": 1, "payments-us": 1, "__internal": 1})
    a = driver.join("orders")
    a = driver.beat(
        a, owned=a.assignment, subscribed_topic_names=(), subscribed_topic_regex="payments-.*"
    )
    assert a.assignment == frozenset()  # orders revoked first; nothing new until released
    assert driver.member(a.member_id).pending_revocation == partitions_of(
        driver.partition_counts, "orders"
    )
    a = driver.acknowledge(a)
    assert a.assignment == {("payments-eu", 0), ("payments-us", 0)}
    assert driver.member(a.member_id).subscribed_topic_regex == "payments-.*"


def test_a_regex_matches_whole_names_and_never_internal_topics():
    driver = GroupDriver({"orders": 1, "orders-archive": 1, "__orders": 1})
    a = driver.join(subscribed_topic_regex="orders|__orders")
    assert a.assignment == {("orders", 0)}
    a = driver.beat(a, subscribed_topic_names=("__orders",))  # by name it may
    a = driver.acknowledge(a)
    assert a.assignment == {("orders", 0), ("__orders", 0)}


def test_an_empty_regex_clears_it():
    driver = GroupDriver({"orders": 1})
    a = driver.join(subscribed_topic_regex="ord.*")
    a = driver.beat(a, owned=a.assignment, subscribed_topic_regex="")
    a = driver.acknowledge(a)
    assert a.assignment == frozenset()
    assert driver.member(a.member_id).subscribed_topic_regex is None


def test_a_regex_picks_up_a_topic_created_later():
    driver = GroupDriver({"orders-1": 1})
    a = driver.join(subscribed_topic_regex="orders-.*")
    epoch = driver.group.describe().group_epoch
    driver.partition_counts["orders-2"] = 2
    driver.partition_counts["other"] = 3
    driver.metadata_changed()
    assert driver.group.describe().group_epoch == epoch + 1
    a = driver.acknowledge(a)
    assert a.assignment == partitions_of(driver.partition_counts, "orders-1", "orders-2")


def test_a_topic_subscribed_by_name_counts_once_it_exists():
    driver = GroupDriver({})
    a = driver.join("orders")
    assert a.assignment == frozenset()
    driver.partition_counts["orders"] = 2
    driver.metadata_changed()
    assert driver.acknowledge(a).assignment == partitions_of(driver.partition_counts, "orders")


def test_partition_growth_rebalances_but_unrelated_topics_do_not():
    driver = GroupDriver({"orders": 2, "other": 1})
    a = driver.join("orders")
    epoch = driver.group.describe().group_epoch
    driver.partition_counts["other"] = 5
    driver.metadata_changed()
    assert driver.group.describe().group_epoch == epoch
    driver.partition_counts["orders"] = 4
    driver.metadata_changed()
    assert driver.group.describe().group_epoch == epoch + 1
    a = driver.acknowledge(a)
    assert a.assignment == partitions_of(driver.partition_counts, "orders")
    assert a.member_epoch == epoch + 1


def test_metadata_arriving_with_a_heartbeat_is_noticed_too():
    driver = GroupDriver({"orders": 1})
    a = driver.join("orders")
    driver.partition_counts["orders"] = 3
    a = driver.acknowledge(a)
    assert a.assignment == partitions_of(driver.partition_counts, "orders")


def test_a_deleted_topic_is_revoked():
    driver = GroupDriver({"orders": 2, "payments": 1})
    a = driver.join("orders", "payments")
    del driver.partition_counts["payments"]
    driver.metadata_changed()
    a = driver.beat(a, owned=a.assignment)
    assert a.assignment == partitions_of(driver.partition_counts, "orders")
    assert driver.member(a.member_id).pending_revocation == {("payments", 0)}
    a = driver.acknowledge(a)
    assert driver.group.state == "stable"


def test_an_invalid_regex_is_refused_and_changes_nothing():
    driver = GroupDriver({"orders": 1})
    a = driver.join("orders")
    before = driver.group.describe()
    with refused(ErrorCode.INVALID_REGULAR_EXPRESSION):
        driver.beat(a, subscribed_topic_regex="orders[")
    with refused(ErrorCode.INVALID_REGULAR_EXPRESSION):
        driver.join(subscribed_topic_regex="(")
    assert driver.group.describe() == before


# ----------------------------------------------------------------- static membership


def test_a_static_member_rejoins_with_its_partitions_and_no_rebalance():
    driver = GroupDriver({"orders": 4})
    s = driver.join("orders", instance_id="consumer-1")
    d = driver.join("orders")
    s = driver.acknowledge(driver.acknowledge(s))
    d = driver.acknowledge(d)
    assert driver.group.state == "stable"
    before = driver.group.describe()

    left = driver.send(member_id=s.member_id, member_epoch=-2, instance_id="consumer-1")
    assert (left.member_epoch, left.assignment) == (-2, frozenset())
    away = driver.member(s.member_id)
    assert away.member_epoch == -2 and away.assignment == s.assignment
    assert driver.group.describe().group_epoch == before.group_epoch
    assert driver.acknowledge(d) == d  # the other member is not affected
    for partition in s.assignment:
        assert driver.group.owner_of(partition) == s.member_id  # reserved

    back = driver.join("orders", instance_id="consumer-1")
    assert back.member_id != s.member_id
    assert (back.member_epoch, back.assignment) == (s.member_epoch, s.assignment)
    after = driver.group.describe()
    assert (after.group_epoch, after.state) == (before.group_epoch, "stable")
    assert driver.member(back.member_id).target_assignment == s.assignment
    assert driver.acknowledge(d) == d
    with refused(ErrorCode.UNKNOWN_MEMBER_ID):
        driver.beat(s)


def test_a_static_member_that_left_cannot_heartbeat_or_commit_with_its_old_id():
    driver = GroupDriver({"orders": 1})
    s = driver.join("orders", instance_id="consumer-1")
    driver.send(member_id=s.member_id, member_epoch=-2)
    with refused(ErrorCode.FENCED_MEMBER_EPOCH):
        driver.beat(s)
    with refused(ErrorCode.FENCED_MEMBER_EPOCH):
        driver.group.check_commit(s.member_id, s.member_epoch)
    assert not driver.group.is_empty
    with refused(ErrorCode.UNKNOWN_MEMBER_ID):
        driver.group.check_commit(None, -1)


def test_a_static_member_that_stays_away_past_its_session_is_removed():
    driver = GroupDriver({"orders": 2})
    s = driver.join("orders", instance_id="consumer-1")
    d = driver.join("orders")
    s = driver.acknowledge(driver.acknowledge(s))
    d = driver.acknowledge(d)
    driver.now_ms = 5_000
    driver.send(member_id=s.member_id, member_epoch=-2)  # its session restarts now
    driver.now_ms = 9_000
    d = driver.acknowledge(d)
    assert driver.expire() == []
    driver.now_ms = 15_001
    d = driver.acknowledge(d)
    assert driver.expire() == [s.member_id]
    d = driver.acknowledge(d)
    assert d.assignment == partitions_of(driver.partition_counts, "orders")
    joined = driver.join("orders", instance_id="consumer-1")  # the instance id is free again
    assert joined.assignment == frozenset()


def test_a_live_instance_id_cannot_be_used_twice():
    driver = GroupDriver({"orders": 1})
    s = driver.join("orders", instance_id="consumer-1")
    before = driver.group.describe()
    with refused(ErrorCode.UNRELEASED_INSTANCE_ID):
        driver.join("orders", instance_id="consumer-1")
    assert driver.group.describe() == before
    with refused(ErrorCode.INVALID_REQUEST):
        driver.beat(s, instance_id="consumer-2")


def test_a_member_without_instance_id_leaving_with_minus_two_leaves_for_good():
    driver = GroupDriver({"orders": 1})
    a = driver.join("orders")
    left = driver.send(member_id=a.member_id, member_epoch=-2)
    assert left.member_epoch == -1
    assert driver.group.is_empty


def test_a_static_member_leaving_with_minus_one_releases_its_instance_id():
    driver = GroupDriver({"orders": 1})
    s = driver.join("orders", instance_id="consumer-1")
    driver.send(member_id=s.member_id, member_epoch=-1, instance_id="consumer-1")
    assert driver.group.is_empty
    assert driver.join("orders", instance_id="consumer-1").assignment == {("orders", 0)}


# ----------------------------------------------------------------- epochs


def test_unknown_members_and_bad_epochs_are_refused():
    driver = GroupDriver({"orders": 2})
    a = driver.join("orders")
    with refused(ErrorCode.UNKNOWN_MEMBER_ID):
        driver.send(member_id="member-99", member_epoch=1)
    with refused(ErrorCode.UNKNOWN_MEMBER_ID):
        driver.send(member_id="member-99", member_epoch=0)  # a join names no member id
    with refused(ErrorCode.UNKNOWN_MEMBER_ID):
        driver.send(member_id=None, member_epoch=1)
    with refused(ErrorCode.UNKNOWN_MEMBER_ID):
        driver.send(member_id="member-99", member_epoch=-1)
    with refused(ErrorCode.FENCED_MEMBER_EPOCH):
        driver.send(member_id=a.member_id, member_epoch=a.member_epoch + 1)
    with refused(ErrorCode.INVALID_REQUEST):
        driver.send(member_id=a.member_id, member_epoch=-3)


def test_the_previous_epoch_is_accepted_after_a_lost_response():
    driver = GroupDriver({"orders": 2, "payments": 1})
    a = driver.join("orders")  # epoch 1
    driver.join("payments")  # epoch 2: A's target does not change
    a2 = driver.acknowledge(a)
    assert a2.member_epoch == 2
    # The response with epoch 2 was lost: A heartbeats again at epoch 1.
    again = driver.beat(a, owned=a.assignment)
    assert again == a2
    with refused(ErrorCode.FENCED_MEMBER_EPOCH):
        driver.beat(a)  # without owned partitions the claim cannot be checked
    with refused(ErrorCode.FENCED_MEMBER_EPOCH):
        driver.beat(a, owned=a.assignment | {("payments", 0)})  # owns what it may not
    with refused(ErrorCode.FENCED_MEMBER_EPOCH):
        driver.send(member_id=a.member_id, member_epoch=0, owned_partitions=frozenset())


def test_a_new_member_waiting_for_partitions_heartbeats_at_epoch_zero():
    driver = GroupDriver({"orders": 2})
    a = driver.join("orders")
    b = driver.join("orders")
    assert b.member_epoch == 0
    b = driver.beat(b, owned=frozenset())
    assert b.member_epoch == 0
    driver.acknowledge(driver.beat(a, owned=a.assignment))
    b = driver.beat(b, owned=frozenset())
    assert (b.member_epoch, len(b.assignment)) == (2, 1)


def test_a_refused_request_changes_nothing():
    driver = GroupDriver({"orders": 2})
    a = driver.join("orders")
    b = driver.join("orders")
    before = driver.group.describe()
    for request in (
        dict(member_id=a.member_id, member_epoch=7, subscribed_topic_names=("x",)),
        dict(member_id=b.member_id, member_epoch=0, instance_id="other"),
        dict(member_id="nobody", member_epoch=3, owned_partitions=frozenset()),
    ):
        with pytest.raises(GroupError):
            driver.send(**request)
        assert driver.group.describe() == before


# ----------------------------------------------------------------- commits


def test_commit_checks():
    driver = GroupDriver({"orders": 4, "payments": 1})
    group = driver.group
    group.check_commit(None, -1)
    group.check_commit("", -1)
    a = driver.join("orders")  # epoch 1
    with refused(ErrorCode.UNKNOWN_MEMBER_ID):
        group.check_commit(None, -1)  # an admin commit to an active group
    with refused(ErrorCode.UNKNOWN_MEMBER_ID):
        group.check_commit("member-99", 1)
    driver.join("payments")  # group epoch 2, A's target unchanged
    a = driver.acknowledge(a)
    assert a.member_epoch == 2  # previous epoch 1
    group.check_commit(a.member_id, 2)
    with refused(ErrorCode.STALE_MEMBER_EPOCH):
        group.check_commit(a.member_id, 1)  # previous epoch, nothing to revoke
    with refused(ErrorCode.FENCED_MEMBER_EPOCH):
        group.check_commit(a.member_id, 3)
    with refused(ErrorCode.FENCED_MEMBER_EPOCH):
        group.check_commit(a.member_id, 0)

    driver.join("orders")  # group epoch 3: A must give up two partitions
    a = driver.beat(a, owned=a.assignment)
    assert a.member_epoch == 2 and driver.member(a.member_id).pending_revocation
    group.check_commit(a.member_id, 2)
    group.check_commit(a.member_id, 1)  # previous epoch while revoking
    with refused(ErrorCode.FENCED_MEMBER_EPOCH):
        group.check_commit(a.member_id, 0)
    a = driver.acknowledge(a)
    assert a.member_epoch == 3
    with refused(ErrorCode.STALE_MEMBER_EPOCH):
        group.check_commit(a.member_id, 2)


def test_group_error_is_a_dwal_error_with_a_code():
    error = GroupError(ErrorCode.STALE_MEMBER_EPOCH, "stale")
    assert isinstance(error, DwalError)
    assert (error.code, error.message) == (ErrorCode.STALE_MEMBER_EPOCH, "stale")


# ----------------------------------------------------------------- config


@pytest.mark.parametrize(
    "settings",
    [
        dict(session_timeout_ms=0),
        dict(heartbeat_interval_ms=-1),
        dict(rebalance_timeout_ms=0),
        dict(members_max=0),
        dict(session_timeout_ms=1_000, heartbeat_interval_ms=1_000),
    ],
)
def test_invalid_configs_are_refused(settings):
    with pytest.raises(ValueError):
        GroupConfig(**settings)


def test_sequential_ids():
    ids = SequentialIds()
    assert [ids(), ids()] == ["member-1", "member-2"]
