"""Random sequences of controller decisions, committed one entry at a time, against the
invariants of the metadata: a leader is an unfenced member of its ISR, the ISR lies within
the replicas, a reassignment's adding and removing replicas lie within the replicas and never
overlap, a move completes only once every target replica is in the ISR, no new replica lands
on a decommissioned broker, epochs only grow, one leader per (partition, leader epoch), and
every image equals a replay of the log and a rebuild from its own snapshot."""

from __future__ import annotations

import random
from collections import Counter

from controller_test_support import ImageLog, incarnation, topic_id
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker.controller import (
    AlterPartitionRequest,
    BrokerRegistration,
    ClusterIdRecord,
    Listener,
    MetadataImage,
    NewTopic,
    alter_partition,
    alter_partition_reassignment,
    create_partitions,
    create_topic,
    decode_entry,
    decommission_broker,
    delete_topic,
    elect_leaders,
    elect_preferred_leaders,
    encode_entry,
    fence_broker,
    image_from_records,
    image_to_records,
    leader_imbalance,
    recommission_broker,
    register_broker,
    shutdown_broker,
    unfence_broker,
)
from protocol.errors import DwalError

BROKERS = st.integers(1, 5)
TOPICS = st.sampled_from(["a", "b", "c", "d"])


def check_invariants(image: MetadataImage) -> None:
    """The rules every committed image obeys (see decisions' module doc)."""
    replicas: Counter[int] = Counter()
    preferred: Counter[int] = Counter()
    for topic in image.topics.values():
        for partition in topic.partitions:
            replicas.update(partition.replicas)
            preferred[partition.replicas[0]] += 1
    # The load counts placement uses are what the partitions say, whatever was applied.
    assert dict(image.replica_counts) == dict(replicas)
    assert dict(image.preferred_leader_counts) == dict(preferred)
    for topic in image.topics.values():
        assert image.topics_by_id[topic.topic_id] is topic
        for number, partition in enumerate(topic.partitions):
            assert partition.partition == number
            assert len(set(partition.replicas)) == len(partition.replicas) >= 1
            assert partition.isr and set(partition.isr) <= set(partition.replicas)
            adding, removing = set(partition.adding_replicas), set(partition.removing_replicas)
            assert adding | removing <= set(partition.replicas), partition
            assert not adding & removing, "a replica both adding and removing"
            # The target first, then the replicas leaving (the preferred leader is the target's).
            assert partition.replicas == partition.target_replicas + partition.removing_replicas
            if partition.leader != -1:
                assert partition.leader in partition.isr
                leader = image.brokers[partition.leader]
                assert not leader.fenced and not leader.shut_down, "a fenced broker leads"
            for member in partition.isr:
                broker = image.brokers.get(member)
                if broker is None or broker.fenced:
                    # Only as the last member of a leaderless partition (KRaft keeps it).
                    assert partition.isr == (member,) and partition.leader == -1, partition


class ControllerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.log = ImageLog()
        self.log.commit([ClusterIdRecord(cluster_id="cluster")])
        self.generations: dict[int, int] = {}
        self.topic_numbers = 0
        self.leader_by_epoch: dict[tuple[bytes, int, int], int] = {}
        self.epochs: dict[tuple[bytes, int], tuple[int, int]] = {}
        self.broker_epochs: dict[int, int] = {}
        self.stats: Counter[str] = Counter()  # what happened, so a test can see it was tested
        self.partitions_seen: dict[tuple[bytes, int], object] = {}

    @property
    def image(self) -> MetadataImage:
        return self.log.image

    def commit(self, decision) -> None:
        if isinstance(decision, DwalError) or not decision:
            return
        # Through the codec, as every node receives it.
        self.log.commit(decode_entry(encode_entry(decision)))

    def commit_and_return(self, decision) -> list:
        self.commit(decision)
        return [] if isinstance(decision, DwalError) else decision

    # ------------------------------------------------------------- brokers

    @rule(broker_id=BROKERS, new_incarnation=st.booleans(), rack=st.sampled_from([None, "x", "y"]))
    def register(self, broker_id, new_incarnation, rack):
        generation = self.generations.get(broker_id, 0) + (1 if new_incarnation else 0)
        self.generations[broker_id] = generation
        current = self.image.brokers.get(broker_id)
        registration = BrokerRegistration(
            broker_id=broker_id,
            incarnation_id=incarnation(broker_id, generation),
            listeners=(Listener("native", "h", 9000 + broker_id),),
            rack=current.rack if current and not new_incarnation else rack,
        )
        self.commit(register_broker(self.image, registration))

    @rule(broker_id=BROKERS, stale=st.booleans())
    def fence(self, broker_id, stale):
        self.commit(fence_broker(self.image, broker_id, self.epoch(broker_id, stale)))

    @rule(broker_id=BROKERS, stale=st.booleans())
    def unfence(self, broker_id, stale):
        self.commit(unfence_broker(self.image, broker_id, self.epoch(broker_id, stale)))

    @rule(broker_id=BROKERS)
    def shutdown(self, broker_id):
        self.commit(shutdown_broker(self.image, broker_id, self.epoch(broker_id, False)))

    def epoch(self, broker_id: int, stale: bool) -> int:
        broker = self.image.brokers.get(broker_id)
        return 1 if broker is None else broker.epoch - (1 if stale else 0)

    # ------------------------------------------------------------- topics

    @rule(name=TOPICS, partitions=st.integers(1, 4), replication_factor=st.integers(1, 4))
    def create(self, name, partitions, replication_factor):
        self.topic_numbers += 1
        new_topic = NewTopic(
            name=name,
            partitions=partitions,
            replication_factor=replication_factor,
            topic_id=topic_id(self.topic_numbers),
        )
        decision = self.commit_and_return(create_topic(self.image, new_topic))
        for record in decision:
            replicas = getattr(record, "replicas", None) or ()
            assert not set(replicas) & self.image.decommissioned, (
                "placed on a decommissioned broker"
            )

    @rule(name=TOPICS)
    def delete(self, name):
        self.commit(delete_topic(self.image, name))

    @rule(name=TOPICS, more=st.integers(1, 3))
    def grow(self, name, more):
        topic = self.image.topics.get(name)
        if topic is not None:
            self.commit(create_partitions(self.image, name, len(topic.partitions) + more))

    @precondition(lambda self: self.image.topics)
    @rule(
        which=st.integers(0, 2**16),
        isr_mask=st.integers(0, 15),
        stale_leader_epoch=st.sampled_from([False, False, False, True]),
    )
    def alter_isr(self, which, isr_mask, stale_leader_epoch):
        partitions = [
            (topic, partition)
            for topic in self.image.topics.values()
            for partition in topic.partitions
            if partition.leader != -1
        ]
        if not partitions:
            return
        topic, partition = partitions[which % len(partitions)]
        # Mostly a plausible ISR (the leader and some replicas), sometimes one without it.
        chosen = [b for bit, b in enumerate(partition.replicas) if isr_mask >> bit & 1]
        if isr_mask < 13 and partition.leader not in chosen:
            chosen.insert(0, partition.leader)
        isr = tuple(chosen)
        request = AlterPartitionRequest(
            broker_id=partition.leader,
            broker_epoch=self.image.brokers[partition.leader].epoch,
            topic_id=topic.topic_id,
            partition=partition.partition,
            leader_epoch=partition.leader_epoch - (1 if stale_leader_epoch else 0),
            partition_epoch=partition.partition_epoch,
            isr=isr,
        )
        decision = alter_partition(self.image, request)
        if not isinstance(decision, DwalError) and decision:
            assert partition.leader in isr and not stale_leader_epoch
            self.stats["isr changed"] += 1
        self.commit(decision)
        after = self.image.topics[topic.name].partitions[partition.partition]
        if partition.reassigning and not after.reassigning:
            # Kafka's rule: every target replica, not only the added ones, is in sync
            assert set(partition.target_replicas) <= set(isr), "completed before in sync"
            assert after.replicas == partition.target_replicas
            self.stats["move completed by an ISR change"] += 1

    @precondition(lambda self: self.image.topics)
    @rule(
        which=st.integers(0, 2**16),
        replicas=st.lists(st.integers(1, 6), min_size=0, max_size=4),
        cancel=st.sampled_from([False, False, False, True]),
    )
    def reassign(self, which, replicas, cancel):
        target = replicas
        partitions = [(t, p) for t in self.image.topics.values() for p in t.partitions]
        topic, partition = partitions[which % len(partitions)]
        decision = alter_partition_reassignment(
            self.image, topic.name, partition.partition, None if cancel else target
        )
        self.commit(decision)
        after = self.image.topics[topic.name].partitions[partition.partition]
        if isinstance(decision, DwalError):
            self.stats[f"reassign refused {decision.code.name}"] += 1
            return
        # A move never adds an ISR member; only the leader's AlterPartition does.
        assert set(after.isr) <= set(partition.isr), (partition, after)
        if cancel:
            # Back to the original replicas; an in-sync replica that was being added leaves
            # like a replica leaving, once every original replica is in sync.
            assert after.target_replicas == partition.original_replicas, (partition, after)
            kept = set(partition.adding_replicas) & set(partition.isr)
            assert set(after.removing_replicas) == kept, (partition, after)
            assert after.reassigning == bool(kept), (partition, after)
            self.stats["reassignment cancelled"] += 1
        else:
            assert after.target_replicas == tuple(target), (target, after)
            self.stats["reassignment started"] += after.reassigning

    @rule(broker_id=BROKERS, moves_max=st.integers(1, 3))
    def decommission(self, broker_id, moves_max):
        for _ in range(100):  # each call moves at most moves_max partitions
            decision = decommission_broker(self.image, broker_id, moves_max=moves_max)
            if isinstance(decision, DwalError):
                self.stats[f"decommission refused {decision.code.name}"] += 1
                return
            if not decision:
                break
            self.commit(decision)
        assert broker_id in self.image.decommissioned
        for topic in self.image.topics.values():
            for partition in topic.partitions:
                assert broker_id not in partition.target_replicas, partition
        self.stats["decommissioned"] += 1

    @rule(broker_id=BROKERS)
    def recommission(self, broker_id):
        self.commit(recommission_broker(self.image, broker_id))
        if broker_id in self.image.brokers:
            assert broker_id not in self.image.decommissioned

    @rule(percentage=st.sampled_from([0, 10, 50]))
    def balance(self, percentage):
        self.commit(elect_preferred_leaders(self.image, leader_imbalance(self.image, percentage)))

    @rule()
    def elect(self):
        records = []
        for decision in elect_leaders(self.image).values():
            if not isinstance(decision, DwalError):
                records.extend(decision)
        self.commit(records)

    # ------------------------------------------------------------- invariants

    @invariant()
    def metadata_rules_hold(self):
        check_invariants(self.image)
        for topic in self.image.topics.values():
            for partition in topic.partitions:
                self.stats["partition steps"] += 1
                self.stats["leaderless partition steps"] += partition.leader == -1
                self.stats["moved leader steps"] += partition.leader not in (
                    -1,
                    partition.preferred_leader,
                )

    @invariant()
    def a_move_completes_only_once_its_new_replicas_are_in_sync(self):
        seen = {}
        for topic in self.image.topics.values():
            for partition in topic.partitions:
                key = (topic.topic_id, partition.partition)
                seen[key] = partition
                before = self.partitions_seen.get(key)
                if before is None or partition.reassigning:
                    continue
                if set(partition.replicas) != set(before.replicas):
                    # Every replica of a completed move was in sync when it completed.
                    new = set(partition.replicas) - set(before.original_replicas)
                    assert new <= set(partition.isr), (before, partition)
                    if before.reassigning and partition.replicas == before.target_replicas:
                        assert set(partition.replicas) <= set(before.isr) | set(partition.isr), (
                            before,
                            partition,
                        )
                    self.stats["move completed"] += bool(before.reassigning or new)
        self.partitions_seen = seen

    @invariant()
    def epochs_only_grow_and_one_leader_per_leader_epoch(self):
        for broker_id, broker in self.image.brokers.items():
            assert broker.epoch >= self.broker_epochs.get(broker_id, 0)
            self.broker_epochs[broker_id] = broker.epoch
        for topic in self.image.topics.values():
            for partition in topic.partitions:
                key = (topic.topic_id, partition.partition)
                epochs = (partition.leader_epoch, partition.partition_epoch)
                previous = self.epochs.get(key, (0, 0))
                assert epochs[0] >= previous[0] and epochs[1] >= previous[1]
                self.epochs[key] = epochs
                leader_key = (*key, partition.leader_epoch)
                assert self.leader_by_epoch.setdefault(leader_key, partition.leader) == (
                    partition.leader
                ), "two leaders in one leader epoch"

    @invariant()
    def the_image_is_a_replay_of_the_log_and_its_snapshot_rebuilds_it(self):
        image = self.image
        assert self.log.replay() == image
        assert image_from_records(image_to_records(image), index=image.last_applied_index) == (
            image
        )


ControllerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestControllerDecisions = ControllerMachine.TestCase


def run_random_sequence(seed: int, steps: int) -> Counter[str]:
    """Drive the machine with a seeded random sequence of `steps` decisions (long runs that
    hypothesis' shrinking-friendly examples rarely reach). Returns what happened."""
    rng = random.Random(seed)
    machine = ControllerMachine()
    for _ in range(steps):
        action = rng.choice(
            ["register", "register", "fence", "unfence", "unfence", "unfence", "shutdown", "create"]
            + ["delete", "grow"]
            + ["alter_isr"] * 4
            + ["elect", "reassign", "reassign", "decommission", "recommission"] * 2
            + ["balance"]
        )
        broker_id = rng.randint(1, 5)
        if action == "register":
            machine.register(broker_id, rng.random() < 0.3, rng.choice([None, "x", "y"]))
        elif action in ("fence", "unfence"):
            getattr(machine, action)(broker_id, rng.random() < 0.1)
        elif action == "shutdown":
            machine.shutdown(broker_id)
        elif action == "create":
            machine.create(rng.choice("abcd"), rng.randint(1, 4), rng.choice([1, 2, 3, 3, 4]))
        elif action == "delete" and rng.random() < 0.3:
            machine.delete(rng.choice("abcd"))
        elif action == "grow":
            machine.grow(rng.choice("abcd"), rng.randint(1, 3))
        elif action == "alter_isr" and machine.image.topics:
            machine.alter_isr(rng.randrange(2**16), rng.randrange(16), rng.random() < 0.2)
        elif action == "elect":
            machine.elect()
        elif action == "reassign" and machine.image.topics:
            # Mostly brokers that may take a replica; sometimes any id (refusals).
            unfenced = machine.image.unfenced_broker_ids()
            pool = unfenced if rng.random() < 0.8 and unfenced else list(range(1, 7))
            target = rng.sample(pool, rng.randint(min(1, len(pool)), min(4, len(pool))))
            machine.reassign(rng.randrange(2**16), target, rng.random() < 0.2)
        elif action == "decommission" and rng.random() < 0.1:
            machine.decommission(broker_id, rng.randint(1, 3))
        elif action == "recommission":
            machine.recommission(broker_id)
        elif action == "balance":
            machine.balance(rng.choice([0, 10, 50]))
        machine.metadata_rules_hold()
        machine.a_move_completes_only_once_its_new_replicas_are_in_sync()
        machine.epochs_only_grow_and_one_leader_per_leader_epoch()
    machine.the_image_is_a_replay_of_the_log_and_its_snapshot_rebuilds_it()
    return machine.stats


def test_long_seeded_random_sequences_keep_the_invariants():
    stats: Counter[str] = Counter()
    for seed in range(20):
        try:
            stats += run_random_sequence(seed, steps=300)
        except AssertionError as error:
            raise AssertionError(f"seed {seed}: {error}") from error
    # The sequences did reach the states the invariants are about.
    assert stats["isr changed"] > 50
    assert stats["leaderless partition steps"] > 1000
    assert stats["moved leader steps"] > 1000
    assert stats["reassignment started"] > 50 and stats["reassignment cancelled"] > 5
    assert stats["move completed"] > 20 and stats["decommissioned"] > 5
    assert stats["move completed by an ISR change"] > 5
