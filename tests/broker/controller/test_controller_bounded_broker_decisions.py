"""Broker decisions that change every partition of one broker are made in steps of at most
`changes_max` partition changes per entry; `converge_leadership` finishes them, and the image
ends as one unbounded decision would have left it (decisions' module doc)."""

from __future__ import annotations

import dataclasses
import random

import trio
from controller_test_support import ImageLog, incarnation, topic_id
from quorum_cluster import CONFIG, raft_config
from test_controller_apis import add_brokers, heartbeat, register

from broker.controller import (
    BrokerRegistration,
    ClusterIdRecord,
    Listener,
    MetadataImage,
    PartitionChangeRecord,
    PartitionRecord,
    RegisterBrokerRecord,
    TopicRecord,
    apply,
    encode_entry,
    fence_broker,
    register_broker,
    shutdown_broker,
    unfence_broker,
)
from broker.controller.controller_apis import ControllerApis
from broker.controller.decisions import PARTITION_CHANGES_PER_ENTRY_MAX, converge_leadership
from broker.controller.metadata_records import DEFAULT_LIMITS, INT32_MAX, NO_LEADER
from broker.controller.quorum_controller import QuorumController
from broker.limits import Limits
from broker.raft.log_storage import MemoryStorage
from broker.raft.memory_transport import MemoryNetwork
from broker.raft.messages import Configuration
from broker.storage import LogConfig
from protocol.api import ApiKey

PARTITIONS = 3000
CHANGES_MAX = 70
UNBOUNDED = 10**9


def cluster_led_by(leader: int, *, replicas: tuple[int, ...] = (1, 2, 3)) -> ImageLog:
    """Brokers 1-3 unfenced; two topics of PARTITIONS in all, every partition led by
    `leader` with ISR = `replicas` (the leader first)."""
    log = ImageLog()
    log.commit([ClusterIdRecord(cluster_id="cluster")])
    log.add_brokers(1, 2, 3)
    order = (leader, *(broker for broker in replicas if broker != leader))
    for number, (name, count) in enumerate([("a", PARTITIONS // 3), ("b", PARTITIONS * 2 // 3)]):
        log.commit(
            [
                TopicRecord(name=name, topic_id=topic_id(number + 1)),
                *(
                    PartitionRecord(
                        topic_id=topic_id(number + 1),
                        partition=partition,
                        replicas=order,
                        isr=order,
                        leader=leader,
                        leader_epoch=0,
                        partition_epoch=0,
                    )
                    for partition in range(count)
                ),
            ]
        )
    return log


def partitions(image: MetadataImage) -> dict:
    return {
        (name, partition.partition): partition
        for name, topic in image.topics.items()
        for partition in topic.partitions
    }


def check_entry(image: MetadataImage, records: list, changes_max: int) -> None:
    """Bounded, encodable, and the invariants hold for every change in it."""
    changes = [record for record in records if isinstance(record, PartitionChangeRecord)]
    assert len(changes) <= changes_max
    assert len(records) <= changes_max + 1
    encode_entry(records, limits=DEFAULT_LIMITS)
    # The entry's broker record (an unfence) applies before its changes.
    brokers = [record for record in records if not isinstance(record, PartitionChangeRecord)]
    image = apply(image, brokers, entry_index=image.last_applied_index + 1)
    for change in changes:
        topic = image.topics_by_id[change.topic_id]
        partition = topic.partitions[change.partition]
        assert change.expected_partition_epoch == partition.partition_epoch
        isr = partition.isr if change.isr is None else change.isr
        assert isr and set(isr) <= set(partition.replicas)
        if change.leader is not None and change.leader != NO_LEADER:
            assert change.leader in isr
            broker = image.brokers[change.leader]
            assert not broker.fenced and not broker.shut_down, "a fenced broker chosen leader"


def converge(log: ImageLog, changes_max: int) -> int:
    """Commit converge_leadership steps until none is left; return how many."""
    steps = 0
    while records := converge_leadership(log.image, changes_max=changes_max):
        check_entry(log.image, records, changes_max)
        log.commit(records)
        steps += 1
        assert steps <= PARTITIONS, "converge_leadership does not converge"
    return steps


def new_incarnation(image: MetadataImage, broker_id: int) -> BrokerRegistration:
    return BrokerRegistration(
        broker_id=broker_id,
        incarnation_id=incarnation(broker_id, generation=1),
        listeners=(Listener("native", "127.0.0.1", 9000 + broker_id),),
    )


DECISIONS = {
    "fence": lambda image, changes_max: fence_broker(
        image, 1, image.brokers[1].epoch, changes_max=changes_max
    ),
    "shutdown": lambda image, changes_max: shutdown_broker(
        image, 1, image.brokers[1].epoch, changes_max=changes_max
    ),
    "new incarnation": lambda image, changes_max: register_broker(
        image, new_incarnation(image, 1), changes_max=changes_max
    ),
}


def test_moving_leadership_away_in_steps_ends_as_one_unbounded_decision():
    for name, decide in DECISIONS.items():
        for replicas in [(1, 2, 3), (1,)]:  # leadership moves / the last member stays
            stepped = cluster_led_by(1, replicas=replicas)
            unbounded = ImageLog(stepped.image)
            first = decide(stepped.image, CHANGES_MAX)
            check_entry(stepped.image, first, CHANGES_MAX)
            stepped.commit(first)
            steps = converge(stepped, CHANGES_MAX)
            assert steps == -(-PARTITIONS // CHANGES_MAX) - 1, name
            unbounded.commit(decide(unbounded.image, UNBOUNDED))
            assert converge_leadership(unbounded.image) == [], name
            assert partitions(stepped.image) == partitions(unbounded.image), (name, replicas)
            assert stepped.image.brokers == unbounded.image.brokers
            led = {partition.leader for partition in partitions(stepped.image).values()}
            assert led == ({2} if replicas == (1, 2, 3) else {NO_LEADER}), name


def test_unfencing_in_steps_elects_the_broker_as_one_unbounded_decision():
    log = cluster_led_by(1, replicas=(1,))
    log.commit(fence_broker(log.image, 1, log.epoch(1), changes_max=UNBOUNDED))
    assert {p.leader for p in partitions(log.image).values()} == {NO_LEADER}
    stepped, unbounded = ImageLog(log.image), ImageLog(log.image)
    first = unfence_broker(stepped.image, 1, stepped.epoch(1), changes_max=CHANGES_MAX)
    assert not isinstance(first, Exception)
    check_entry(stepped.image, first, CHANGES_MAX)
    stepped.commit(first)
    assert not stepped.image.brokers[1].fenced
    converge(stepped, CHANGES_MAX)
    unbounded.commit(unfence_broker(unbounded.image, 1, unbounded.epoch(1), changes_max=UNBOUNDED))
    assert partitions(stepped.image) == partitions(unbounded.image)
    assert {p.leader for p in partitions(stepped.image).values()} == {1}


def test_a_broker_is_unfenced_only_once_nothing_is_left_to_move_away_from_it():
    """A new incarnation (it may have lost its unsynced tail) keeps no leadership of the old
    one: unfencing it first finishes the moves its registration left."""
    log = cluster_led_by(1)
    log.commit(register_broker(log.image, new_incarnation(log.image, 1), changes_max=CHANGES_MAX))
    epoch = log.epoch(1)
    rounds = 0
    while log.image.brokers[1].fenced:
        decision = unfence_broker(log.image, 1, epoch, changes_max=CHANGES_MAX)
        assert not isinstance(decision, Exception)
        check_entry(log.image, decision, CHANGES_MAX)
        log.commit(decision)
        rounds += 1
    assert rounds == -(-PARTITIONS // CHANGES_MAX)  # the moves left, then the unfence
    for partition in partitions(log.image).values():
        assert partition.leader == 2 and partition.isr == (2, 3) and partition.leader_epoch == 1


def test_interleaved_steps_of_several_brokers_keep_the_invariants_and_converge():
    rng = random.Random(7)
    log = cluster_led_by(1)
    log.commit(fence_broker(log.image, 1, log.epoch(1), changes_max=CHANGES_MAX))
    log.commit(shutdown_broker(log.image, 2, log.epoch(2), changes_max=CHANGES_MAX))
    for _ in range(5):
        check_entry(log.image, step := converge_leadership(log.image, changes_max=7), 7)
        log.commit(step)
    decision = unfence_broker(log.image, 1, log.epoch(1), changes_max=CHANGES_MAX)
    log.commit(decision)
    converge(log, rng.choice([1, 13, CHANGES_MAX]))
    while log.image.brokers[1].fenced:
        log.commit(unfence_broker(log.image, 1, log.epoch(1), changes_max=CHANGES_MAX))
        converge(log, CHANGES_MAX)
    for partition in partitions(log.image).values():
        # Broker 2 shut down, 1 back: ISR without 2, led by an unfenced member.
        assert 2 not in partition.isr and partition.leader in partition.isr, partition
        assert partition.leader in (1, 3)


def test_the_largest_step_fits_one_entry_under_the_default_limits():
    """PARTITION_CHANGES_PER_ENTRY_MAX changes of the largest ISR (replicas_max members of
    the largest ids) and the largest broker record encode in one entry."""
    isr = tuple(range(INT32_MAX - DEFAULT_LIMITS.replicas_max + 1, INT32_MAX + 1))
    changes = [
        PartitionChangeRecord(
            topic_id=topic_id(1),
            partition=INT32_MAX - number,
            expected_partition_epoch=INT32_MAX - 1,
            isr=isr,
            leader=isr[0],
        )
        for number in range(PARTITION_CHANGES_PER_ENTRY_MAX)
    ]
    register = RegisterBrokerRecord(
        broker_id=INT32_MAX,
        incarnation_id=incarnation(1),
        listeners=tuple(
            Listener(f"{number:0{DEFAULT_LIMITS.listener_name_chars_max}d}", "h" * 255, 65535)
            for number in range(DEFAULT_LIMITS.listeners_max)
        ),
        rack="r" * DEFAULT_LIMITS.rack_chars_max,
        fenced=True,
    )
    data = encode_entry([*changes, register], limits=DEFAULT_LIMITS)
    assert len(data) < DEFAULT_LIMITS.entry_bytes_max * 0.9


# The active controller finishes on its own.


async def test_the_active_controller_finishes_a_fence_made_in_steps(nursery, autojump_clock):
    network = MemoryNetwork(random.Random(1))
    await nursery.start(network.run)
    config = dataclasses.replace(
        CONFIG, partition_changes_per_entry_max=7, auto_leader_rebalance_enable=False
    )
    controller = QuorumController(
        raft_config(1),
        MemoryStorage(Configuration(voters=frozenset({1}))),
        network.endpoint(1),
        config=config,
    )
    await nursery.start(controller.run)
    controller.driver.campaign()
    with trio.fail_after(10):
        await controller.wait_active()
    apis = ControllerApis(controller, log_defaults=LogConfig(), limits=Limits())
    epochs = await add_brokers(apis, 1, 2)
    topics = [
        {"topic": "t", "partitions": 100, "replication_factor": 2, "configs": {}},
        {"topic": "u", "partitions": 100, "replication_factor": 1, "configs": {}},
    ]
    await apis.handle(ApiKey.CREATE_TOPICS, {"topics": topics, "validate_only": False})

    def held_by_1() -> list:
        image = controller.image
        return [p for name in "tu" for p in image.topics[name].partitions if 1 in p.isr]

    assert len(held_by_1()) == 150

    # A controlled shutdown of broker 1: the request moves 7 partitions, the controller's
    # steps the rest, on their own.
    await heartbeat(apis, 1, epochs[1], controller.image.last_applied_index, shut_down=True)
    with trio.fail_after(5):
        while any(p.leader == 1 or p.isr != (1,) for p in held_by_1()):
            await controller.wait_image_at_least(controller.image.last_applied_index + 1)
    await trio.sleep(1)  # the last step's count is added once its submit returns
    assert controller.statistics().partitions_converged == 150 - 7
    assert all(p.leader == 2 for p in controller.image.topics["t"].partitions)
    orphans = [p for p in controller.image.topics["u"].partitions if p.isr == (1,)]
    assert len(orphans) == 50 and all(p.leader == NO_LEADER for p in orphans)

    # It comes back (a new incarnation): unfenced, it leads its 50 partitions again, 7 by
    # the unfence and the rest by the controller's steps.
    epoch = await register(apis, 1)
    reply = await heartbeat(apis, 1, epoch, controller.image.last_applied_index)
    assert not reply["is_fenced"]
    with trio.fail_after(5):
        while any(p.leader != 1 for p in held_by_1()):
            await controller.wait_image_at_least(controller.image.last_applied_index + 1)
    assert len(held_by_1()) == 50
    await trio.sleep(1)
    assert controller.statistics().partitions_converged == 150 - 7 + 50 - 7
