"""Applying metadata records: deterministic, copy-on-write, misfits are no-ops, snapshots."""

from __future__ import annotations

from controller_test_support import ImageLog, entries, topic_id
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.controller import (
    EMPTY_IMAGE,
    BrokerShutdownRecord,
    ClusterIdRecord,
    ConfigRecord,
    ConfigResourceType,
    FenceBrokerRecord,
    Listener,
    PartitionChangeRecord,
    PartitionRecord,
    ProducerIdsRecord,
    RegisterBrokerRecord,
    RemoveTopicRecord,
    TopicRecord,
    UnfenceBrokerRecord,
    apply,
    decode_entry,
    encode_entry,
    image_from_records,
    image_to_records,
)

T1 = topic_id(1)
T2 = topic_id(2)


def partition(number: int, replicas=(1, 2, 3), leader: int = 1, topic: bytes = T1):
    return PartitionRecord(
        topic_id=topic,
        partition=number,
        replicas=replicas,
        isr=replicas,
        leader=leader,
        leader_epoch=0,
        partition_epoch=0,
    )


def two_topics():
    log = ImageLog()
    log.commit([ClusterIdRecord(cluster_id="cluster-a")])
    log.commit([TopicRecord(name="a", topic_id=T1), partition(0), partition(1)])
    log.commit([TopicRecord(name="b", topic_id=T2), partition(0, topic=T2)])
    return log


def change(expected: int, number: int = 0, **fields):
    return PartitionChangeRecord(
        topic_id=T1, partition=number, expected_partition_epoch=expected, **fields
    )


# Records over a few ids, epochs and names, so that records of a random log meet each other.
few_brokers = st.integers(1, 4)
few_epochs = st.integers(0, 6)
few_topic_ids = st.sampled_from([T1, T2, topic_id(3)])
few_names = st.sampled_from(["a", "b", "c"])


@st.composite
def shapes(draw):
    replicas = tuple(draw(st.lists(few_brokers, min_size=1, max_size=3, unique=True)))
    isr = replicas[: draw(st.integers(1, len(replicas)))]
    return replicas, isr, draw(st.sampled_from((-1, *isr)))


@st.composite
def meeting_records(draw):
    kind = draw(st.integers(0, 9))
    broker, epoch, topic = draw(few_brokers), draw(few_epochs), draw(few_topic_ids)
    replicas, isr, leader = draw(shapes())
    if kind == 0:
        return register(broker, draw(st.integers(1, 3)), draw(st.booleans()))
    if kind == 1:
        return FenceBrokerRecord(broker_id=broker, broker_epoch=epoch)
    if kind == 2:
        return UnfenceBrokerRecord(broker_id=broker, broker_epoch=epoch)
    if kind == 3:
        return BrokerShutdownRecord(broker_id=broker, broker_epoch=epoch)
    if kind == 4:
        return TopicRecord(name=draw(few_names), topic_id=topic)
    if kind == 5:
        return RemoveTopicRecord(topic_id=topic)
    if kind == 6:
        return PartitionRecord(
            topic_id=topic,
            partition=draw(st.integers(0, 3)),
            replicas=replicas,
            isr=isr,
            leader=leader,
            leader_epoch=epoch,
            partition_epoch=epoch,
        )
    if kind == 7:
        return PartitionChangeRecord(
            topic_id=topic,
            partition=draw(st.integers(0, 3)),
            expected_partition_epoch=draw(st.integers(0, 2)),
            isr=draw(st.none() | st.just(isr)),
            leader=draw(st.none() | st.just(leader)),
            replicas=draw(st.none() | st.just(replicas)),
        )
    if kind == 8:
        return ConfigRecord(
            resource_type=ConfigResourceType.TOPIC,
            resource_name=draw(few_names),
            name=draw(st.sampled_from(["x", "y"])),
            value=draw(st.none() | st.just("v")),
        )
    return ProducerIdsRecord(next_producer_id=epoch * 100)


def check_replay_and_snapshot(log: list[list]) -> None:
    first = second = EMPTY_IMAGE
    for index, entry in enumerate(log, start=1):
        first = apply(first, entry, entry_index=index)
        # Another node: it gets the entries through the codec.
        second = apply(second, decode_entry(encode_entry(entry)), entry_index=index)
        assert first == second
        snapshot = image_to_records(first)
        assert image_from_records(snapshot, index=index) == first
        if snapshot:  # a snapshot is made of records the decoder accepts
            assert decode_entry(encode_entry(snapshot)) == snapshot


@given(st.lists(st.lists(meeting_records(), min_size=1, max_size=6), max_size=25))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_random_logs_replay_to_equal_images_and_snapshots_rebuild_them(log):
    check_replay_and_snapshot(log)


@given(st.lists(entries, max_size=8))
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_logs_of_any_records_replay_to_equal_images(log):
    check_replay_and_snapshot(log)


def test_a_change_based_on_the_current_partition_epoch_applies_and_bumps_epochs():
    log = two_topics()
    log.commit([change(0, isr=(1, 2))])
    state = log.image.partition("a", 0)
    assert (state.isr, state.leader, state.leader_epoch, state.partition_epoch) == (
        (1, 2),
        1,
        0,  # the leader did not change
        1,
    )
    log.commit([change(1, leader=2)])
    state = log.image.partition("a", 0)
    assert (state.leader, state.leader_epoch, state.partition_epoch) == (2, 1, 2)


def test_a_stale_change_is_a_no_op():
    log = two_topics()
    log.commit([change(0, isr=(1, 2))])
    before = log.image
    log.commit([change(0, isr=(1, 3))])  # decided on epoch 0, but the partition is at 1
    assert log.image.partition("a", 0) == before.partition("a", 0)
    assert log.image.topics["a"] is before.topics["a"]
    log.commit([change(7, leader=-1)])  # from the future: also a no-op
    assert log.image.partition("a", 0) == before.partition("a", 0)


def test_two_changes_decided_on_the_same_epoch_in_one_entry_only_the_first_applies():
    log = two_topics()
    log.commit([change(0, leader=2), change(0, leader=3)])
    state = log.image.partition("a", 0)
    assert (state.leader, state.leader_epoch, state.partition_epoch) == (2, 1, 1)


def test_changes_that_do_not_fit_the_partition_are_no_ops():
    log = two_topics()
    before = log.image
    log.commit(
        [
            change(0, isr=(1, 4)),  # 4 is not a replica
            change(0, leader=4),  # not in the ISR
            change(0, replicas=(2, 3)),  # the ISR would leave the replicas
            change(0, number=2, leader=2),  # no partition 2
            PartitionChangeRecord(topic_id=topic_id(9), partition=0, expected_partition_epoch=0),
            change(0, adding_replicas=(4,)),  # not a replica
            change(0, removing_replicas=(5,)),
            change(0, adding_replicas=(3,), removing_replicas=(3,)),  # both
            change(0, replicas=(1, 2), isr=(1, 2), removing_replicas=(3,)),  # 3 is gone
        ]
    )
    assert log.image.topics == before.topics


def test_a_reassignment_is_set_kept_and_cleared_by_changes():
    log = two_topics()
    log.commit([change(0, replicas=(1, 2, 4, 3), adding_replicas=(4,), removing_replicas=(3,))])
    moving = log.image.partition("a", 0)
    assert (moving.replicas, moving.adding_replicas, moving.removing_replicas) == (
        (1, 2, 4, 3),
        (4,),
        (3,),
    )
    log.commit([change(1, isr=(1, 2, 3, 4))])  # None: the reassignment fields stay
    assert log.image.partition("a", 0).adding_replicas == (4,)
    log.commit(
        [change(2, replicas=(1, 2, 4), isr=(1, 2, 4), adding_replicas=(), removing_replicas=())]
    )
    done = log.image.partition("a", 0)
    assert (done.replicas, done.reassigning, done.partition_epoch) == ((1, 2, 4), False, 3)
    assert dict(log.image.replica_counts) == {1: 3, 2: 3, 3: 2, 4: 1}


def test_partitions_are_added_in_order_and_never_replaced():
    log = two_topics()
    before = log.image
    log.commit([partition(3), partition(1, replicas=(3,), leader=3)])
    assert log.image.topics == before.topics
    log.commit([partition(2), partition(3)])
    assert [p.partition for p in log.image.topics["a"].partitions] == [0, 1, 2, 3]


def test_unchanged_topics_and_brokers_are_shared_between_images():
    log = two_topics()
    before = log.image
    log.commit([change(0, number=1, leader=2)])
    assert log.image.topics["b"] is before.topics["b"]
    assert log.image.topics["a"] is not before.topics["a"]
    assert log.image.topics["a"].partitions[0] is before.topics["a"].partitions[0]
    assert log.image.topics_by_id[T1] is log.image.topics["a"]
    assert before.partition("a", 1).leader == 1  # the old image did not change
    middle = log.image
    log.commit([ProducerIdsRecord(next_producer_id=1000)])
    assert log.image.topics is middle.topics and log.image.brokers is middle.brokers


def test_a_topic_name_or_id_is_never_taken_twice():
    log = two_topics()
    before = log.image
    log.commit([TopicRecord(name="a", topic_id=topic_id(5)), TopicRecord(name="c", topic_id=T1)])
    assert log.image.topics == before.topics


def test_removing_a_topic_removes_its_partitions_and_configs():
    log = two_topics()
    config = ConfigRecord(
        resource_type=ConfigResourceType.TOPIC, resource_name="a", name="retention.ms", value="1"
    )
    log.commit([config])
    assert log.image.configs == {(ConfigResourceType.TOPIC, "a"): {"retention.ms": "1"}}
    log.commit([RemoveTopicRecord(topic_id=T1)])
    assert "a" not in log.image.topics and T1 not in log.image.topics_by_id
    assert log.image.configs == {}
    log.commit([config])  # a config of a topic that does not exist: no-op
    assert log.image.configs == {}
    log.commit([TopicRecord(name="a", topic_id=topic_id(7))])  # the name is free again
    assert log.image.topics["a"].partitions == ()


def test_configs_are_set_and_deleted():
    log = two_topics()

    def broker_config(name, value):
        return ConfigRecord(
            resource_type=ConfigResourceType.BROKER, resource_name="", name=name, value=value
        )

    log.commit([broker_config("x", "1"), broker_config("y", "2"), broker_config("x", "3")])
    assert log.image.configs[(ConfigResourceType.BROKER, "")] == {"x": "3", "y": "2"}
    log.commit([broker_config("x", None), broker_config("y", None), broker_config("z", None)])
    assert log.image.configs == {}


def register(broker_id: int, generation: int = 1, fenced: bool = True):
    return RegisterBrokerRecord(
        broker_id=broker_id,
        incarnation_id=bytes([generation]) * 16,
        listeners=(Listener("native", "h", 9092),),
        rack=None,
        fenced=fenced,
    )


def test_a_broker_epoch_is_its_registration_entry_index_and_older_epochs_are_ignored():
    log = ImageLog()
    log.commit([ClusterIdRecord(cluster_id="c")])
    log.commit([register(1)])
    assert log.image.brokers[1].epoch == 2 and log.image.brokers[1].fenced
    log.commit([UnfenceBrokerRecord(broker_id=1, broker_epoch=2)])
    assert not log.image.brokers[1].fenced
    log.commit([register(1, generation=2)])  # a new incarnation: a new epoch, fenced
    assert log.image.brokers[1].epoch == 4 and log.image.brokers[1].fenced
    before = log.image
    log.commit([UnfenceBrokerRecord(broker_id=1, broker_epoch=2)])  # the old incarnation's
    log.commit([FenceBrokerRecord(broker_id=7, broker_epoch=2)])  # an unknown broker
    assert log.image.brokers == before.brokers
    log.commit([UnfenceBrokerRecord(broker_id=1, broker_epoch=4)])
    log.commit([FenceBrokerRecord(broker_id=1, broker_epoch=2)])  # stale: still unfenced
    assert not log.image.brokers[1].fenced
    log.commit([BrokerShutdownRecord(broker_id=1, broker_epoch=4)])
    assert log.image.brokers[1].shut_down and log.image.brokers[1].fenced
    log.commit([UnfenceBrokerRecord(broker_id=1, broker_epoch=4)])  # must register again
    assert log.image.brokers[1].fenced
    log.commit([register(1, generation=3, fenced=False)])
    broker = log.image.brokers[1]
    assert (broker.epoch, broker.fenced, broker.shut_down) == (
        log.image.last_applied_index,
        False,
        False,
    )


def test_the_first_cluster_id_wins_and_producer_ids_only_grow():
    image = apply(
        EMPTY_IMAGE,
        [
            ClusterIdRecord(cluster_id="first"),
            ClusterIdRecord(cluster_id="second"),
            ProducerIdsRecord(next_producer_id=5000),
            ProducerIdsRecord(next_producer_id=1000),
        ],
        entry_index=1,
    )
    assert (image.cluster_id, image.next_producer_id) == ("first", 5000)


def test_a_snapshot_rebuilds_brokers_with_their_epochs_and_states():
    log = two_topics()
    log.commit([register(1)])
    log.commit([register(2), register(3, fenced=False)])
    log.commit([UnfenceBrokerRecord(broker_id=1, broker_epoch=4)])
    log.commit([BrokerShutdownRecord(broker_id=2, broker_epoch=5)])
    log.commit([change(0, leader=-1)])
    log.commit([ProducerIdsRecord(next_producer_id=42)])
    snapshot = image_to_records(log.image)
    rebuilt = image_from_records(snapshot, index=log.image.last_applied_index)
    assert rebuilt == log.image
    assert rebuilt == log.replay()
    assert image_to_records(rebuilt) == snapshot
