"""Reassignment (KIP-455 on KRaft), decommissioning and automatic leader balancing, one
rule at a time: what each decision returns, what it refuses, and the state it leaves."""

from __future__ import annotations

import pytest
from controller_test_support import ImageLog, topic_id

from broker.controller import (
    AlterPartitionRequest,
    BrokerDecommissionRecord,
    ClusterIdRecord,
    NewTopic,
    PartitionInfo,
    PartitionRecord,
    TopicRecord,
    alter_partition,
    alter_partition_reassignment,
    elect_preferred_leaders,
    create_topic,
    decommission_broker,
    decommission_plan,
    fence_broker,
    image_from_records,
    image_to_records,
    leader_imbalance,
    recommission_broker,
    unfence_broker,
)
from protocol.errors import DwalError, ErrorCode


def refused(decision, code: ErrorCode, text: str = "") -> None:
    assert isinstance(decision, DwalError), decision
    assert decision.code == code, decision
    assert text in decision.message, decision


def cluster(*broker_ids: int, racks: dict[int, str] | None = None) -> ImageLog:
    log = ImageLog()
    log.commit([ClusterIdRecord(cluster_id="cluster-1")])
    log.add_brokers(*broker_ids, racks=racks)
    return log


def add_partitions(
    log: ImageLog, name: str, *assignments: tuple[int, ...], isr: tuple[int, ...] | None = None
) -> None:
    """A topic whose partition n has replicas assignments[n] (ISR: all, or `isr` for each),
    led by its first replica (or the first of `isr`)."""
    number = topic_id(len(log.image.topics) + 1)
    records: list = [TopicRecord(name=name, topic_id=number)]
    for partition, replicas in enumerate(assignments):
        in_sync = isr or replicas
        records.append(
            PartitionRecord(
                topic_id=number,
                partition=partition,
                replicas=replicas,
                isr=in_sync,
                leader=in_sync[0],
                leader_epoch=0,
                partition_epoch=0,
            )
        )
    log.commit(records)


def state(log: ImageLog, name: str = "t", partition: int = 0) -> PartitionInfo:
    info = log.image.partition(name, partition)
    assert info is not None
    return info


def join_isr(log: ImageLog, broker_id: int, name: str = "t", partition: int = 0) -> None:
    """The partition's leader adds `broker_id` to its ISR (it caught up)."""
    set_isr(log, (*state(log, name, partition).isr, broker_id), name, partition)


def set_isr(log: ImageLog, isr: tuple[int, ...], name: str = "t", partition: int = 0) -> None:
    """The partition's leader asks for `isr` (an AlterPartition in its current epochs)."""
    current = state(log, name, partition)
    request = AlterPartitionRequest(
        broker_id=current.leader,
        broker_epoch=log.epoch(current.leader),
        topic_id=log.image.topics[name].topic_id,
        partition=partition,
        leader_epoch=current.leader_epoch,
        partition_epoch=current.partition_epoch,
        isr=isr,
    )
    log.commit(alter_partition(log.image, request))


def reassign(log: ImageLog, target, name: str = "t", partition: int = 0) -> None:
    log.commit(alter_partition_reassignment(log.image, name, partition, target))


# ----------------------------------------------------------------- a move, step by step


def test_new_replicas_start_outside_the_isr_and_the_move_completes_once_they_are_in_it():
    log = cluster(1, 2, 3, 4)
    add_partitions(log, "t", (1, 2, 3))
    reassign(log, (1, 2, 4))
    moving = state(log)
    assert moving.replicas == (1, 2, 4, 3)  # the target, then the replicas leaving
    assert (moving.adding_replicas, moving.removing_replicas) == ((4,), (3,))
    assert moving.isr == (1, 2, 3) and moving.leader == 1 and moving.leader_epoch == 0
    assert moving.target_replicas == (1, 2, 4) and moving.original_replicas == (1, 2, 3)
    join_isr(log, 4)  # broker 4 caught up: the same change completes the move
    done = state(log)
    assert done.replicas == (1, 2, 4) and done.isr == (1, 2, 4)
    assert not done.reassigning and done.leader == 1 and done.leader_epoch == 0


def test_a_leader_that_leaves_hands_over_to_the_first_target_replica_in_the_isr():
    log = cluster(1, 2, 3, 4)
    add_partitions(log, "t", (1, 2, 3))
    reassign(log, (4, 3, 2))
    assert state(log).leader == 1  # it leads on while 4 catches up
    join_isr(log, 4)
    done = state(log)
    assert done.replicas == (4, 3, 2) and set(done.isr) == {2, 3, 4}
    assert done.leader == 4 and done.leader_epoch == 1  # a new leader: a new leader epoch


def test_the_move_waits_for_every_new_replica():
    log = cluster(1, 2, 3, 4, 5)
    add_partitions(log, "t", (1, 2, 3))
    reassign(log, (1, 4, 5))
    join_isr(log, 4)
    half = state(log)
    assert half.reassigning and half.isr == (1, 2, 3, 4)
    assert half.adding_replicas == (4, 5) and half.removing_replicas == (2, 3)
    join_isr(log, 5)
    done = state(log)
    assert done.replicas == (1, 4, 5) and done.isr == (1, 4, 5) and not done.reassigning


def test_an_isr_change_that_leaves_an_adding_replica_out_does_not_complete():
    log = cluster(1, 2, 3, 4)
    add_partitions(log, "t", (1, 2, 3))
    reassign(log, (1, 2, 4))
    set_isr(log, (1, 2))  # 3 lags
    assert state(log).reassigning and state(log).isr == (1, 2)


def test_reordering_or_shrinking_completes_at_once():
    log = cluster(1, 2, 3)
    add_partitions(log, "t", (1, 2, 3), (1, 2, 3))
    reassign(log, (2, 1, 3))  # the preferred leader changes; leadership stays where it is
    reordered = state(log)
    assert reordered.replicas == (2, 1, 3) and not reordered.reassigning
    assert reordered.leader == 1 and reordered.preferred_leader == 2
    reassign(log, (3, 2), partition=1)  # replication factor 3 -> 2, leader 1 leaves
    shrunk = state(log, partition=1)
    assert shrunk.replicas == (3, 2) and shrunk.isr == (2, 3) and not shrunk.reassigning
    assert shrunk.leader == 3 and shrunk.leader_epoch == 1


def test_a_shrink_waits_until_every_target_replica_is_in_sync():
    """Simulation seed 3046: replicas [2, 3, 1], ISR {1, 2} (node 3 lagging; node 1 had just
    lost its unsynced tail to a power loss, not fenced yet), moved to [1, 3]. Completing at
    once (no replica is added) made node 1 the only in-sync replica and leader, and records
    only node 2 held were lost. As in Kafka, the move completes once every target replica
    is in the ISR."""
    log = cluster(1, 2, 3)
    add_partitions(log, "t", (2, 3, 1))
    set_isr(log, (2, 1))  # node 3 lags
    reassign(log, (1, 3))
    moving = state(log)
    assert moving.reassigning and moving.leader == 2, moving
    assert moving.removing_replicas == (2,) and moving.adding_replicas == ()
    join_isr(log, 3)  # node 3 caught up from node 2: now every target replica is in sync
    done = state(log)
    assert not done.reassigning and done.replicas == (1, 3) and set(done.isr) == {1, 3}
    assert done.leader == 1


def test_the_replication_factor_may_grow():
    log = cluster(1, 2, 3)
    add_partitions(log, "t", (2,))
    reassign(log, (2, 1, 3))
    assert state(log).adding_replicas == (1, 3) and state(log).removing_replicas == ()
    join_isr(log, 3)
    join_isr(log, 1)
    assert state(log).replicas == (2, 1, 3) and not state(log).reassigning


def test_the_offsets_topic_may_be_moved_like_any_other():
    log = cluster(1, 2)
    add_partitions(log, "__consumer_offsets", (1,))
    reassign(log, (2,), name="__consumer_offsets")
    assert state(log, "__consumer_offsets").adding_replicas == (2,)


# ----------------------------------------------------------------- changing and cancelling


def test_cancelling_reverts_to_the_original_replicas():
    log = cluster(1, 2, 3, 4, 5)
    add_partitions(log, "t", (1, 2, 3))
    reassign(log, (1, 4, 5))
    join_isr(log, 4)  # an adding replica already in sync leaves the ISR again
    log.commit(alter_partition_reassignment(log.image, "t", 0, None))
    back = state(log)
    assert back.replicas == (1, 2, 3) and back.isr == (1, 2, 3) and not back.reassigning
    assert back.leader == 1 and back.leader_epoch == 0


def test_a_cancel_keeps_an_in_sync_adding_replica_until_the_original_replicas_are_in_sync():
    """Simulation seed 6008: replicas [1, 3] moving to [2, 1, 3], ISR {1, 2} (node 3
    lagging), records acknowledged on 1 and 2's page caches; node 1 lost power (its unsynced
    tail gone, not fenced yet) and the move was cancelled. Dropping the adding replica 2 from
    the ISR at once left node 1 its only member: it came back shorter and led, and the
    records only node 2 held were lost. Node 2 now leaves like a replica leaving: once every
    replica of the reverted target is in sync."""
    log = cluster(1, 2, 3)
    add_partitions(log, "t", (1, 3))
    set_isr(log, (1,))  # node 3 lags
    reassign(log, (2, 1, 3))
    join_isr(log, 2)
    assert state(log).isr == (1, 2) and state(log).adding_replicas == (2,)
    log.commit(alter_partition_reassignment(log.image, "t", 0, None))
    cancelling = state(log)
    assert cancelling.isr == (1, 2) and cancelling.replicas == (1, 3, 2), cancelling
    assert cancelling.removing_replicas == (2,) and cancelling.target_replicas == (1, 3)
    log.commit(fence_broker(log.image, 1, log.epoch(1)))  # node 1's session ends
    assert state(log).leader == 2 and state(log).isr == (2,)  # the copy with the records
    log.commit(unfence_broker(log.image, 1, log.epoch(1)))  # back, shorter; it follows 2
    join_isr(log, 1)
    join_isr(log, 3)
    done = state(log)
    assert not done.reassigning and done.replicas == (1, 3) and set(done.isr) == {1, 3}


def test_reassigning_to_the_original_replicas_is_a_cancel():
    log = cluster(1, 2, 3, 4)
    add_partitions(log, "t", (1, 2, 3))
    reassign(log, (1, 2, 4))
    reassign(log, (1, 2, 3))
    assert state(log).replicas == (1, 2, 3) and not state(log).reassigning


def test_a_new_target_during_a_move_is_taken_from_the_original_replicas():
    log = cluster(1, 2, 3, 4, 5)
    add_partitions(log, "t", (1, 2, 3))
    reassign(log, (1, 4, 5))
    join_isr(log, 4)
    reassign(log, (1, 2, 5))
    moving = state(log)
    # 4 is no longer added; in sync, it leaves like 3, once every target replica is in sync
    assert moving.replicas == (1, 2, 5, 3, 4)
    assert (moving.adding_replicas, moving.removing_replicas) == ((5,), (3, 4))
    assert moving.isr == (1, 2, 3, 4)
    join_isr(log, 5)
    done = state(log)
    assert done.replicas == (1, 2, 5) and done.isr == (1, 2, 5) and not done.reassigning


def test_the_same_target_again_changes_nothing():
    log = cluster(1, 2, 3, 4)
    add_partitions(log, "t", (1, 2, 3))
    reassign(log, (1, 2, 4))
    assert alter_partition_reassignment(log.image, "t", 0, (1, 2, 4)) == []
    assert alter_partition_reassignment(log.image, "t", 0, [1, 2, 4]) == []


def test_a_cancel_never_drops_the_only_in_sync_replica():
    log = cluster(1, 2, 3)
    add_partitions(log, "t", (1,))
    reassign(log, (2, 3))
    join_isr(log, 2)
    log.commit(fence_broker(log.image, 1, log.epoch(1)))  # 2 leads; 1 leaves the ISR
    assert state(log).isr == (2,) and state(log).leader == 2
    # Back towards [1]: 2, the only in-sync copy, stays (leaving) until 1 is in sync again.
    log.commit(alter_partition_reassignment(log.image, "t", 0, None))
    cancelling = state(log)
    assert cancelling.replicas == (1, 2) and cancelling.removing_replicas == (2,)
    assert cancelling.isr == (2,) and cancelling.leader == 2


# ----------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("target", "text"),
    [
        ((), "cannot be empty"),
        ((1, 2, 1), "list broker 1 more than once"),
        ((1, 9), "broker 9 is not registered"),
        ((1, 4), "broker 4 is fenced or shut down"),
        ((1, 5), "broker 5 is being decommissioned"),
    ],
)
def test_bad_targets_are_refused_and_change_nothing(target, text):
    log = cluster(1, 2, 3, 4, 5)
    log.commit(fence_broker(log.image, 4, log.epoch(4)))
    log.commit([BrokerDecommissionRecord(broker_id=5, decommissioned=True)])
    add_partitions(log, "t", (1, 2, 3))
    decision = alter_partition_reassignment(log.image, "t", 0, target)
    refused(decision, ErrorCode.INVALID_REPLICA_ASSIGNMENT, text)


def test_a_fenced_broker_that_already_holds_a_replica_may_stay():
    log = cluster(1, 2, 3, 4)
    add_partitions(log, "t", (1, 2, 3))
    log.commit(fence_broker(log.image, 3, log.epoch(3)))
    reassign(log, (3, 4, 1))
    assert state(log).target_replicas == (3, 4, 1)


def test_unknown_partitions_and_cancels_without_a_move_are_refused():
    log = cluster(1, 2)
    add_partitions(log, "t", (1,))
    refused(
        alter_partition_reassignment(log.image, "u", 0, (2,)), ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    )
    refused(
        alter_partition_reassignment(log.image, "t", 1, (2,)), ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    )
    refused(
        alter_partition_reassignment(log.image, "t", 0, None),
        ErrorCode.NO_REASSIGNMENT_IN_PROGRESS,
        "t-0 is not being reassigned",
    )


def test_a_move_and_a_decommission_survive_a_snapshot_and_a_replay():
    log = cluster(1, 2, 3, 4)
    add_partitions(log, "t", (1, 2, 3))
    reassign(log, (1, 2, 4))
    log.commit([BrokerDecommissionRecord(broker_id=3, decommissioned=True)])
    image = log.image
    assert image_from_records(image_to_records(image), index=image.last_applied_index) == image
    assert log.replay() == image


# ----------------------------------------------------------------- decommission


def test_decommission_moves_every_replica_off_the_broker_and_keeps_new_ones_away():
    log = cluster(1, 2, 3, 4)
    add_partitions(log, "t", (1, 2), (2, 3), (3, 1), (1, 4))
    log.commit(decommission_broker(log.image, 1))
    image = log.image
    assert 1 in image.decommissioned
    targets = [p.target_replicas for p in image.topics["t"].partitions]
    assert all(1 not in target for target in targets), targets
    assert targets[1] == (2, 3)  # untouched
    # Each replica of 1 went to a broker the partition did not use, spread over 2, 3, 4.
    assert targets[0][1:] == (2,) and targets[2][0] == 3 and targets[3][1:] == (4,)
    assert len({targets[0][0], targets[2][1], targets[3][0]}) >= 2
    assert decommission_broker(image, 1) == []  # every move started: nothing left to do
    for number in range(4):
        partition = state(log, partition=number)
        for broker in partition.adding_replicas:
            join_isr(log, broker, partition=number)
    assert image.partitions_on(1) == 3 and log.image.partitions_on(1) == 0
    # No new partition goes to a broker being decommissioned.
    new = NewTopic(name="n", partitions=6, replication_factor=3, topic_id=topic_id(9))
    log.commit(create_topic(log.image, new))
    assert all(1 not in p.replicas for p in log.image.topics["n"].partitions)
    refused(
        create_topic(
            log.image, NewTopic(name="m", partitions=1, replication_factor=4, topic_id=topic_id(8))
        ),
        ErrorCode.INVALID_REPLICATION_FACTOR,
    )


def test_decommission_keeps_racks_apart():
    log = cluster(1, 2, 3, 4, racks={1: "a", 2: "b", 3: "a", 4: "b"})
    add_partitions(log, "t", (1, 2))
    [(_, _, target)] = decommission_plan(log.image, 1)
    assert target == (3, 2)  # rack a for rack a; 4 would put both on rack b


def test_decommission_is_refused_when_a_partition_has_nowhere_to_go():
    log = cluster(1, 2, 3)
    add_partitions(log, "t", (1, 2), (1, 2, 3))
    refused(
        decommission_broker(log.image, 1),
        ErrorCode.INVALID_REPLICATION_FACTOR,
        "cannot move t-1 off broker 1",
    )
    assert 1 not in log.image.decommissioned  # refused: nothing was decided
    refused(decommission_broker(log.image, 7), ErrorCode.BROKER_NOT_AVAILABLE)


def test_a_fenced_broker_may_be_decommissioned_and_no_broker_takes_two_copies():
    log = cluster(1, 2, 3)
    add_partitions(log, "t", (1, 2))
    log.commit(fence_broker(log.image, 1, log.epoch(1)))
    log.commit(decommission_broker(log.image, 1))
    assert state(log).target_replicas == (3, 2)
    log.commit(fence_broker(log.image, 3, log.epoch(3)))
    # 3 is fenced now: a second decommission (of 2) has no broker left for t-0
    refused(decommission_broker(log.image, 2), ErrorCode.INVALID_REPLICATION_FACTOR)


def test_decommission_moves_in_chunks_when_asked_to():
    log = cluster(1, 2, 3)
    add_partitions(log, "t", *[(1, 2)] * 5)
    calls = 0
    while decision := decommission_broker(log.image, 1, moves_max=2):
        log.commit(decision)
        calls += 1
    assert calls == 3
    assert all(1 not in p.target_replicas for p in log.image.topics["t"].partitions)


def test_recommission_lets_new_replicas_go_to_the_broker_again():
    log = cluster(1, 2)
    log.commit(decommission_broker(log.image, 2))
    assert recommission_broker(log.image, 1) == []
    log.commit(recommission_broker(log.image, 2))
    assert log.image.decommissioned == frozenset()
    refused(recommission_broker(log.image, 5), ErrorCode.BROKER_NOT_AVAILABLE)


# ----------------------------------------------------------------- automatic balancing


def add_led(log: ImageLog, name: str, replicas: tuple[int, ...], leaders: list[int]) -> None:
    """A topic of len(leaders) partitions on `replicas` (all in sync), partition n led by
    leaders[n]."""
    number = topic_id(len(log.image.topics) + 1)
    log.commit(
        [TopicRecord(name=name, topic_id=number)]
        + [
            PartitionRecord(
                topic_id=number,
                partition=n,
                replicas=replicas,
                isr=replicas,
                leader=leader,
                leader_epoch=0,
                partition_epoch=0,
            )
            for n, leader in enumerate(leaders)
        ]
    )


def test_leaders_go_back_once_a_brokers_imbalance_is_above_the_percentage():
    log = cluster(1, 2, 3)
    add_led(log, "t", (1, 2, 3), [2, 2, 3, 1, 1, 1, 1, 1, 1, 1])  # 3 of 10 elsewhere: 30 %
    add_led(log, "u", (2, 1, 3), [2] * 9 + [1])  # 1 of 10 elsewhere: 10 %, not above
    assert leader_imbalance(log.image, 30) == []
    assert leader_imbalance(log.image, 10) == [("t", 0), ("t", 1), ("t", 2)]
    assert leader_imbalance(log.image, 0) == [("t", 0), ("t", 1), ("t", 2), ("u", 9)]
    due = leader_imbalance(log.image, 10)
    log.commit(elect_preferred_leaders(log.image, due[:2]))
    # The rest of what was due when the check ran, though 1 of 10 is no longer above 10 %.
    log.commit(elect_preferred_leaders(log.image, due[2:]))
    assert [p.leader for p in log.image.topics["t"].partitions] == [1] * 10
    assert log.image.topics["t"].partitions[0].leader_epoch == 1
    assert leader_imbalance(log.image, 10) == []
    assert elect_preferred_leaders(log.image, due) == []


def test_balancing_skips_preferred_leaders_that_cannot_lead_and_partitions_that_move():
    log = cluster(1, 2, 3, 4)
    add_led(log, "t", (1, 2, 3), [2, 2])
    add_led(log, "u", (3, 1, 2), [1, 1])
    add_led(log, "v", (4, 1, 2), [1, 1])
    log.commit(fence_broker(log.image, 3, log.epoch(3)))  # out of every ISR: cannot lead
    reassign(log, (1, 2, 3, 4), name="t", partition=1)  # moving: left alone, as Kafka does
    assert state(log, "t", 1).reassigning
    v0 = state(log, "v", 0)
    request = AlterPartitionRequest(
        broker_id=1,
        broker_epoch=log.epoch(1),
        topic_id=log.image.topics["v"].topic_id,
        partition=0,
        leader_epoch=v0.leader_epoch,
        partition_epoch=v0.partition_epoch,
        isr=(1, 2),  # 4 is not in sync on v-0
    )
    log.commit(alter_partition(log.image, request))
    assert leader_imbalance(log.image, 10) == [("t", 0), ("v", 1)]
