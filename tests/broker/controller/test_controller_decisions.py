"""The controller's decisions, one rule at a time: what each returns and what it refuses."""

from __future__ import annotations

import pytest
from controller_test_support import ImageLog, incarnation, topic_id
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.controller import (
    AlterPartitionRequest,
    BrokerRegistration,
    ClusterIdRecord,
    ConfigRecord,
    ConfigResourceType,
    FenceBrokerRecord,
    Listener,
    NewTopic,
    PartitionChangeRecord,
    ProducerIdsRecord,
    RegisterBrokerRecord,
    RemoveTopicRecord,
    UnfenceBrokerRecord,
    allocate_producer_ids,
    alter_configs,
    alter_partition,
    create_partitions,
    create_topic,
    create_topics,
    delete_topic,
    elect_leaders,
    elect_preferred_leader,
    MetadataLimits,
    decode_entry,
    encode_entry,
    fence_broker,
    register_broker,
    shutdown_broker,
    unfence_broker,
)
from protocol.errors import DwalError, ErrorCode

LISTENERS = (Listener("native", "127.0.0.1", 9092),)


def refused(decision, code: ErrorCode, text: str = "") -> None:
    assert isinstance(decision, DwalError), decision
    assert decision.code == code, decision
    assert text in decision.message, decision


def cluster(*broker_ids: int) -> ImageLog:
    log = ImageLog()
    log.commit([ClusterIdRecord(cluster_id="cluster-1")])
    log.add_brokers(*broker_ids)
    return log


def new_topic(name="orders", partitions=3, replication_factor=3, number=1, **configs):
    return NewTopic(
        name=name,
        partitions=partitions,
        replication_factor=replication_factor,
        topic_id=topic_id(number),
        configs=configs,
    )


# ----------------------------------------------------------------- brokers


def test_a_new_broker_is_registered_fenced_with_the_entry_index_as_epoch():
    log = cluster()
    registration = BrokerRegistration(
        broker_id=1, incarnation_id=incarnation(1), listeners=LISTENERS, rack="r1"
    )
    records = log.commit(register_broker(log.image, registration))
    assert records == [
        RegisterBrokerRecord(
            broker_id=1, incarnation_id=incarnation(1), listeners=LISTENERS, rack="r1"
        )
    ]
    broker = log.image.brokers[1]
    assert (broker.epoch, broker.fenced, broker.rack) == (log.image.last_applied_index, True, "r1")


def test_the_same_incarnation_registering_again_is_a_retry():
    log = cluster(1)
    registration = BrokerRegistration(
        broker_id=1,
        incarnation_id=incarnation(1),
        listeners=(Listener("native", "127.0.0.1", 9001),),
    )
    assert register_broker(log.image, registration) == []
    moved = BrokerRegistration(
        broker_id=1, incarnation_id=incarnation(1), listeners=LISTENERS, rack=None
    )
    refused(register_broker(log.image, moved), ErrorCode.DUPLICATE_BROKER_REGISTRATION)


def test_a_new_incarnation_replaces_the_old_one_and_takes_its_leadership_away():
    log = cluster(1, 2)
    log.add_topic("orders", partitions=2, replication_factor=2)
    led_by_1 = [p for p in log.image.topics["orders"].partitions if p.leader == 1]
    assert led_by_1
    registration = BrokerRegistration(
        broker_id=1, incarnation_id=incarnation(1, generation=1), listeners=LISTENERS
    )
    records = log.commit(register_broker(log.image, registration))
    assert isinstance(records[-1], RegisterBrokerRecord)
    assert all(isinstance(record, PartitionChangeRecord) for record in records[:-1])
    broker = log.image.brokers[1]
    assert broker.fenced and broker.epoch == log.image.last_applied_index
    for partition in log.image.topics["orders"].partitions:
        assert (partition.leader, partition.isr) == (2, (2,))


@pytest.mark.parametrize(
    ("registration", "text"),
    [
        (BrokerRegistration(broker_id=1, incarnation_id=incarnation(1), listeners=()), "listen"),
        (
            BrokerRegistration(broker_id=1, incarnation_id=incarnation(1), listeners=(("a", "h"),)),
            "listeners",
        ),
        (BrokerRegistration(broker_id=-1, incarnation_id=incarnation(1), listeners=LISTENERS), ""),
        (BrokerRegistration(broker_id=1, incarnation_id=b"short", listeners=LISTENERS), "uuid"),
        (BrokerRegistration(broker_id=1, incarnation_id=bytes(16), listeners=LISTENERS), "uuid"),
        (
            BrokerRegistration(
                broker_id=1, incarnation_id=incarnation(1), listeners=(("a", "h", 0),)
            ),
            "port",
        ),
        (
            BrokerRegistration(
                broker_id=1, incarnation_id=incarnation(1), listeners=LISTENERS, rack=""
            ),
            "rack",
        ),
    ],
)
def test_a_malformed_registration_is_refused(registration, text):
    refused(register_broker(cluster().image, registration), ErrorCode.INVALID_REQUEST, text)


def test_a_broker_of_another_cluster_is_refused():
    registration = BrokerRegistration(
        broker_id=1, incarnation_id=incarnation(1), listeners=LISTENERS, cluster_id="other"
    )
    refused(register_broker(cluster().image, registration), ErrorCode.INCONSISTENT_CLUSTER_ID)


def test_fencing_moves_leadership_to_the_first_unfenced_isr_replica_with_a_new_epoch():
    log = cluster(1, 2, 3)
    log.add_topic("orders", partitions=3, replication_factor=3)
    before = {p.partition: p for p in log.image.topics["orders"].partitions}
    records = log.commit(fence_broker(log.image, 1, log.epoch(1)))
    assert records[0] == FenceBrokerRecord(broker_id=1, broker_epoch=log.epoch(1))
    assert log.image.brokers[1].fenced
    for partition in log.image.topics["orders"].partitions:
        old = before[partition.partition]
        assert 1 not in partition.isr
        assert partition.isr == tuple(member for member in old.isr if member != 1)
        if old.leader == 1:
            expected = next(r for r in old.replicas if r != 1)
            assert (partition.leader, partition.leader_epoch) == (expected, old.leader_epoch + 1)
        else:
            assert (partition.leader, partition.leader_epoch) == (old.leader, old.leader_epoch)
        assert partition.partition_epoch == old.partition_epoch + 1


def test_fencing_skips_fenced_isr_members_and_leaves_no_leader_when_none_is_left():
    log = cluster(1, 2, 3)
    log.add_topic("orders", partitions=1, replication_factor=3)
    leader = log.image.partition("orders", 0).leader
    others = [b for b in log.image.partition("orders", 0).replicas if b != leader]
    # Fence the followers first: each leaves the ISR.
    for broker_id in others:
        log.commit(fence_broker(log.image, broker_id, log.epoch(broker_id)))
    assert log.image.partition("orders", 0).isr == (leader,)
    log.commit(fence_broker(log.image, leader, log.epoch(leader)))
    partition = log.image.partition("orders", 0)
    # The last member stays in the ISR; with no eligible member there is no leader.
    assert (partition.leader, partition.isr, partition.leader_epoch) == (-1, (leader,), 1)
    # When it comes back, it leads again (it is the only member with all the data).
    records = log.commit(unfence_broker(log.image, leader, log.epoch(leader)))
    assert records[0] == UnfenceBrokerRecord(broker_id=leader, broker_epoch=log.epoch(leader))
    partition = log.image.partition("orders", 0)
    assert (partition.leader, partition.leader_epoch) == (leader, 2)


def test_a_fenced_isr_member_is_never_chosen_as_leader():
    log = cluster(1, 2, 3)
    log.add_topic("orders", partitions=1, replication_factor=3)
    replicas = log.image.partition("orders", 0).replicas
    # The broker after the leader is fenced without leaving the ISR (a FenceBrokerRecord
    # alone, not what fence_broker decides): fencing the leader must skip it.
    second = replicas[1]
    log.commit([FenceBrokerRecord(broker_id=second, broker_epoch=log.epoch(second))])
    assert second in log.image.partition("orders", 0).isr
    log.commit(fence_broker(log.image, replicas[0], log.epoch(replicas[0])))
    assert log.image.partition("orders", 0).leader == replicas[2]


def test_fencing_twice_or_with_a_stale_epoch():
    log = cluster(1, 2)
    epoch = log.epoch(1)
    log.commit(fence_broker(log.image, 1, epoch))
    assert fence_broker(log.image, 1, epoch) == []
    refused(fence_broker(log.image, 1, epoch - 1), ErrorCode.STALE_BROKER_EPOCH, "epoch")
    refused(fence_broker(log.image, 9, 1), ErrorCode.BROKER_NOT_AVAILABLE, "not registered")
    refused(unfence_broker(log.image, 1, epoch + 5), ErrorCode.STALE_BROKER_EPOCH)
    assert unfence_broker(log.image, 2, log.epoch(2)) == []  # not fenced


def test_a_shut_down_broker_is_fenced_and_must_register_again():
    log = cluster(1, 2)
    log.add_topic("orders", partitions=2, replication_factor=2)
    log.commit(shutdown_broker(log.image, 1, log.epoch(1)))
    broker = log.image.brokers[1]
    assert broker.shut_down and broker.fenced
    assert all(p.leader == 2 for p in log.image.topics["orders"].partitions)
    assert shutdown_broker(log.image, 1, log.epoch(1)) == []
    refused(unfence_broker(log.image, 1, log.epoch(1)), ErrorCode.BROKER_NOT_AVAILABLE, "shut")
    refused(
        create_topic(log.image, new_topic("two", replication_factor=2, number=2)),
        ErrorCode.INVALID_REPLICATION_FACTOR,
        "1 are available",
    )
    registration = BrokerRegistration(
        broker_id=1, incarnation_id=incarnation(1), listeners=LISTENERS
    )
    log.commit(register_broker(log.image, registration))  # same incarnation, after shutdown
    assert not log.image.brokers[1].shut_down


# ----------------------------------------------------------------- topics


def test_a_topic_is_created_in_one_entry_with_isr_replicas_and_the_first_replica_leading():
    log = cluster(1, 2, 3)
    records = create_topic(log.image, new_topic(partitions=3, **{"retention.ms": "60000"}))
    assert [type(record).__name__ for record in records] == [
        "TopicRecord",
        "PartitionRecord",
        "PartitionRecord",
        "PartitionRecord",
        "ConfigRecord",
    ]
    log.commit(records)
    topic = log.image.topics["orders"]
    assert topic.topic_id == topic_id(1) and log.image.topics_by_id[topic_id(1)] is topic
    for partition in topic.partitions:
        assert len(set(partition.replicas)) == 3
        assert partition.isr == partition.replicas
        assert partition.leader == partition.replicas[0]
        assert (partition.leader_epoch, partition.partition_epoch) == (0, 0)
    assert sorted(p.leader for p in topic.partitions) == [1, 2, 3]
    assert log.image.configs[(ConfigResourceType.TOPIC, "orders")] == {"retention.ms": "60000"}


@pytest.mark.parametrize(
    ("topic", "code", "text"),
    [
        (new_topic(name="bad name"), ErrorCode.INVALID_TOPIC, "may contain only"),
        (new_topic(name="x" * 250), ErrorCode.INVALID_TOPIC, "longer"),
        (new_topic(name="taken"), ErrorCode.TOPIC_ALREADY_EXISTS, ""),
        (new_topic(partitions=0), ErrorCode.INVALID_PARTITIONS, "1 to 10000"),
        (new_topic(partitions=10_001), ErrorCode.INVALID_PARTITIONS, ""),
        (new_topic(replication_factor=0), ErrorCode.INVALID_REPLICATION_FACTOR, ""),
        (new_topic(replication_factor=4), ErrorCode.INVALID_REPLICATION_FACTOR, "3 are available"),
        (new_topic(number=9), ErrorCode.INVALID_REQUEST, "in use"),
        (
            NewTopic(name="x", partitions=1, replication_factor=1, topic_id=bytes(16)),
            ErrorCode.INVALID_REQUEST,
            "uuid",
        ),
        (new_topic(**{"": "1"}), ErrorCode.INVALID_CONFIG, "config name"),
    ],
)
def test_an_invalid_topic_is_refused(topic, code, text):
    log = cluster(1, 2, 3)
    log.add_topic("taken", partitions=1, replication_factor=1, number=9)
    refused(create_topic(log.image, topic), code, text)


def test_fenced_brokers_get_no_new_replicas():
    log = cluster(1, 2, 3)
    log.commit(fence_broker(log.image, 2, log.epoch(2)))
    log.add_topic("orders", partitions=6, replication_factor=2)
    assert all(2 not in p.replicas for p in log.image.topics["orders"].partitions)


def test_topics_created_together_are_placed_as_if_one_after_the_other():
    log = cluster(1, 2, 3)
    results = create_topics(
        log.image,
        [
            new_topic("a", partitions=1, replication_factor=1, number=1),
            new_topic("b", partitions=1, replication_factor=1, number=2),
            new_topic("c", partitions=0, number=4),
            new_topic("d", partitions=1, replication_factor=1, number=5),
        ],
    )
    refused(results["c"], ErrorCode.INVALID_PARTITIONS)
    for name in ("a", "b", "d"):
        log.commit(results[name])
    leaders = sorted(log.image.partition(name, 0).leader for name in ("a", "b", "d"))
    assert leaders == [1, 2, 3]


def test_a_name_given_twice_is_refused():
    log = cluster(1)
    results = create_topics(
        log.image, [new_topic("a", 1, 1, 1), new_topic("b", 1, 1, 2), new_topic("a", 1, 1, 3)]
    )
    assert list(results) == ["a", "b"]
    refused(results["a"], ErrorCode.INVALID_REQUEST, "more than once")
    assert not isinstance(results["b"], DwalError)


@given(
    partitions=st.integers(1, 400),
    replication_factor=st.integers(1, 12),
    config_value_chars=st.integers(0, 3000),
)
@settings(max_examples=60, deadline=None)
def test_what_create_topic_accepts_always_fits_one_entry(
    partitions, replication_factor, config_value_chars
):
    limits = MetadataLimits(entry_bytes_max=16 * 1024, records_per_entry_max=300)
    log = cluster(*range(1, 13))
    topic = new_topic(
        partitions=partitions, replication_factor=replication_factor, x="v" * config_value_chars
    )
    decision = create_topic(log.image, topic, limits=limits)
    if isinstance(decision, DwalError):
        assert decision.code in (ErrorCode.INVALID_PARTITIONS, ErrorCode.INVALID_CONFIG)
    else:
        assert decode_entry(encode_entry(decision, limits=limits), limits=limits) == decision


def test_a_topic_too_large_for_one_entry_is_refused():
    log = cluster(1, 2, 3)
    limits = MetadataLimits(entry_bytes_max=64 * 1024)
    topic = new_topic(partitions=1000, replication_factor=3)
    refused(create_topic(log.image, topic, limits=limits), ErrorCode.INVALID_PARTITIONS, "fit")
    assert not isinstance(create_topic(log.image, topic), DwalError)


def test_deleting_a_topic():
    log = cluster(1)
    log.add_topic("orders", partitions=1, replication_factor=1)
    assert delete_topic(log.image, "orders") == [RemoveTopicRecord(topic_id=topic_id(1))]
    refused(delete_topic(log.image, "nope"), ErrorCode.UNKNOWN_TOPIC_OR_PARTITION)


def test_partitions_only_grow_and_keep_the_replication_factor():
    log = cluster(1, 2, 3)
    log.add_topic("orders", partitions=2, replication_factor=2)
    refused(create_partitions(log.image, "orders", 2), ErrorCode.INVALID_PARTITIONS, "not to 2")
    refused(create_partitions(log.image, "orders", 1), ErrorCode.INVALID_PARTITIONS)
    refused(create_partitions(log.image, "nope", 3), ErrorCode.UNKNOWN_TOPIC_OR_PARTITION)
    refused(
        create_partitions(log.image, "orders", 10, partitions_max=9), ErrorCode.INVALID_PARTITIONS
    )
    log.commit(create_partitions(log.image, "orders", 5))
    partitions = log.image.topics["orders"].partitions
    assert [p.partition for p in partitions] == [0, 1, 2, 3, 4]
    assert all(len(p.replicas) == 2 and p.isr == p.replicas for p in partitions)
    log.commit(fence_broker(log.image, 1, log.epoch(1)))
    log.commit(fence_broker(log.image, 2, log.epoch(2)))
    refused(create_partitions(log.image, "orders", 6), ErrorCode.INVALID_REPLICATION_FACTOR)


def test_configs_are_altered_only_where_they_change():
    log = cluster(1)
    log.add_topic("orders", partitions=1, replication_factor=1)
    topic = ConfigResourceType.TOPIC
    records = log.commit(alter_configs(log.image, topic, "orders", {"b": "2", "a": "1"}))
    assert [record.name for record in records] == ["a", "b"]
    assert alter_configs(log.image, topic, "orders", {"a": "1"}) == []
    assert alter_configs(log.image, topic, "orders", {"a": None}) == [
        ConfigRecord(resource_type=topic, resource_name="orders", name="a", value=None)
    ]
    refused(
        alter_configs(log.image, topic, "nope", {"a": "1"}), ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    )
    broker = ConfigResourceType.BROKER
    assert len(alter_configs(log.image, broker, "", {"x": "1"})) == 1
    assert len(alter_configs(log.image, broker, "1", {"x": "1"})) == 1
    refused(alter_configs(log.image, broker, "one", {"x": "1"}), ErrorCode.INVALID_REQUEST)
    refused(alter_configs(log.image, broker, "1", {"x": "v" * 40_000}), ErrorCode.INVALID_CONFIG)


# ----------------------------------------------------------------- partitions


def isr_request(log: ImageLog, isr, **overrides) -> AlterPartitionRequest:
    partition = log.image.partition("orders", 0)
    fields = dict(
        broker_id=partition.leader,
        broker_epoch=log.epoch(partition.leader),
        topic_id=topic_id(1),
        partition=0,
        leader_epoch=partition.leader_epoch,
        partition_epoch=partition.partition_epoch,
        isr=tuple(isr),
    )
    fields.update(overrides)
    return AlterPartitionRequest(**fields)


def test_a_leader_shrinks_and_expands_its_isr():
    log = cluster(1, 2, 3)
    log.add_topic("orders", partitions=1, replication_factor=3)
    replicas = log.image.partition("orders", 0).replicas
    leader = replicas[0]
    records = log.commit(alter_partition(log.image, isr_request(log, replicas[:2])))
    assert records == [
        PartitionChangeRecord(
            topic_id=topic_id(1), partition=0, expected_partition_epoch=0, isr=replicas[:2]
        )
    ]
    partition = log.image.partition("orders", 0)
    assert (partition.isr, partition.leader, partition.partition_epoch) == (replicas[:2], leader, 1)
    assert partition.leader_epoch == 0
    log.commit(alter_partition(log.image, isr_request(log, replicas)))
    assert log.image.partition("orders", 0).isr == replicas
    assert alter_partition(log.image, isr_request(log, replicas)) == []


def test_a_stale_or_wrong_alter_partition_is_refused():
    log = cluster(1, 2, 3, 4)
    log.add_topic("orders", partitions=1, replication_factor=3)
    replicas = log.image.partition("orders", 0).replicas
    leader, follower = replicas[0], replicas[1]
    outsider = ({1, 2, 3, 4} - set(replicas)).pop()
    image = log.image
    refused(
        alter_partition(image, isr_request(log, replicas, broker_epoch=1)),
        ErrorCode.STALE_BROKER_EPOCH,
    )
    refused(
        alter_partition(image, isr_request(log, replicas, partition=5)),
        ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
    )
    refused(
        alter_partition(
            image, isr_request(log, replicas, broker_id=follower, broker_epoch=log.epoch(follower))
        ),
        ErrorCode.NOT_LEADER_OR_FOLLOWER,
        "does not lead",
    )
    refused(
        alter_partition(image, isr_request(log, replicas, leader_epoch=1)),
        ErrorCode.FENCED_LEADER_EPOCH,
        "leader epoch",
    )
    refused(
        alter_partition(image, isr_request(log, replicas, partition_epoch=3)),
        ErrorCode.INVALID_UPDATE_VERSION,
        "partition epoch",
    )
    for bad_isr in ([follower], [leader, leader], [leader, outsider], []):
        refused(alter_partition(image, isr_request(log, bad_isr)), ErrorCode.INVALID_REQUEST)
    log.commit(fence_broker(log.image, follower, log.epoch(follower)))
    refused(
        alter_partition(log.image, isr_request(log, replicas)),
        ErrorCode.INELIGIBLE_REPLICA,
        "fenced",
    )


def test_two_isr_changes_decided_on_the_same_state_only_the_first_applies():
    log = cluster(1, 2, 3)
    log.add_topic("orders", partitions=1, replication_factor=3)
    replicas = log.image.partition("orders", 0).replicas
    first = alter_partition(log.image, isr_request(log, replicas[:2]))
    second = alter_partition(log.image, isr_request(log, replicas[::2]))
    log.commit(first)
    log.commit(second)  # its partition epoch is stale by now: a no-op
    partition = log.image.partition("orders", 0)
    assert (partition.isr, partition.partition_epoch) == (replicas[:2], 1)


def test_preferred_leader_election():
    log = cluster(1, 2, 3)
    log.add_topic("orders", partitions=3, replication_factor=3)
    assert elect_leaders(log.image) == {}
    log.commit(fence_broker(log.image, 1, log.epoch(1)))
    moved = [p for p in log.image.topics["orders"].partitions if p.preferred_leader == 1]
    assert moved and all(p.leader != 1 for p in moved)
    results = elect_leaders(log.image)
    assert set(results) == {("orders", p.partition) for p in moved}
    for result in results.values():
        refused(result, ErrorCode.PREFERRED_LEADER_NOT_AVAILABLE, "not an unfenced member")
    # Back, unfenced, and in the ISR again: now the election moves leadership back.
    log.commit(unfence_broker(log.image, 1, log.epoch(1)))
    for partition in moved:
        current = log.image.partition("orders", partition.partition)
        refused(
            elect_preferred_leader(log.image, "orders", partition.partition),
            ErrorCode.PREFERRED_LEADER_NOT_AVAILABLE,
        )
        leader = current.leader
        request = AlterPartitionRequest(
            broker_id=leader,
            broker_epoch=log.epoch(leader),
            topic_id=topic_id(1),
            partition=partition.partition,
            leader_epoch=current.leader_epoch,
            partition_epoch=current.partition_epoch,
            isr=(*current.isr, 1),
        )
        log.commit(alter_partition(log.image, request))
    for result in elect_leaders(log.image).values():
        log.commit(result)
    for partition in log.image.topics["orders"].partitions:
        assert partition.leader == partition.preferred_leader
    assert elect_leaders(log.image) == {}
    assert elect_preferred_leader(log.image, "orders", 0) == []
    refused(elect_preferred_leader(log.image, "orders", 3), ErrorCode.UNKNOWN_TOPIC_OR_PARTITION)


# ----------------------------------------------------------------- producer ids


def test_producer_id_blocks_follow_each_other_and_survive_a_replay():
    log = cluster(1, 2)
    epochs = {b: log.image.brokers[b].epoch for b in (1, 2)}
    starts = []
    for broker_id in (1, 2, 1):
        starts.append(log.image.next_producer_id)
        decision = allocate_producer_ids(log.image, broker_id, epochs[broker_id], block_size=10)
        assert decision == [ProducerIdsRecord(next_producer_id=starts[-1] + 10)]
        log.commit(decision)
    assert starts == [0, 10, 20]
    assert log.replay().next_producer_id == 30


def test_producer_ids_go_only_to_a_registered_broker_of_the_current_epoch():
    log = cluster(1)
    refused(allocate_producer_ids(log.image, 2, 1), ErrorCode.BROKER_NOT_AVAILABLE)
    epoch = log.image.brokers[1].epoch
    refused(allocate_producer_ids(log.image, 1, epoch + 1), ErrorCode.STALE_BROKER_EPOCH)


def test_the_last_producer_ids_are_not_handed_out_past_the_largest():
    log = cluster(1)
    log.commit([ProducerIdsRecord(next_producer_id=2**63 - 5)])
    epoch = log.image.brokers[1].epoch
    assert allocate_producer_ids(log.image, 1, epoch, block_size=4)
    refused(
        allocate_producer_ids(log.image, 1, epoch, block_size=5), ErrorCode.UNKNOWN_SERVER_ERROR
    )
