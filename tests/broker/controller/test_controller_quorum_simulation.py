"""A seeded simulation of the metadata quorum: three QuorumControllers on a lossy, delaying
MemoryNetwork under MockClock, three brokers that register and heartbeat, a workload of
topic creations, deletions and leader elections, and a nemesis that crashes and restarts
controllers, isolates them, and silences brokers for longer than their session.

Checked every few milliseconds of trio time: one active controller per term; every node's
image equals the replay of its own committed log, and images at one index are equal on
every node; one leader per (partition, leader epoch); leader and partition epochs only grow;
a leader is an unfenced member of the ISR, which lies within the replicas. At the end, once
healed, every node converges to the same image.

`pytest tests/broker/controller/test_controller_quorum_simulation.py
--controller-sim-seed N` replays one seed; `--controller-sim-seeds COUNT` runs more.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from quorum_cluster import CONFIG, ControllerCluster, apply_entries, snapshot_image

from broker.controller import (
    NO_LEADER,
    MetadataImage,
    NewTopic,
    create_topic,
    delete_topic,
    elect_leaders,
)
from broker.controller.quorum_controller import QuorumController
from broker.raft.log_storage import MemoryStorage
from broker.raft.memory_transport import FaultModel, MemoryNetwork
from protocol.errors import DwalError

CI_SEEDS = 60  # ~0.4 s each (was 3 at ~0.8 s); `make sim` runs 300
SIM_CONFIG = CONFIG.__class__(
    tick_interval_seconds=0.02,
    cluster_id="sim",
    snapshot_interval_entries=25,
    session_timeout_seconds=3.0,
)
# Raft timing in seconds as with 10 ms ticks (elections after 100-200 ms of silence), but
# 20 ms ticks and heartbeats every 40 ms instead of 20: half the ticks and messages to
# simulate, the same faults and checks. Sessions last 3 s (not the default 6 s; brokers
# still heartbeat every second), so a silenced broker is fenced after half the idle wait.
ELECTION_TICKS, HEARTBEAT_TICKS = 5, 2
FAULTS = FaultModel(
    loss_probability=0.02,
    duplicate_probability=0.01,
    delay_seconds_min=0.0,
    delay_seconds_max=0.005,
)
TOPICS = ["a", "b", "c", "d"]
BROKERS = (1, 2, 3)


def pytest_generate_tests(metafunc):
    if "seed" not in metafunc.fixturenames:
        return
    option = metafunc.config.getoption
    single = option("controller_sim_seed", default=None)
    count = option("controller_sim_seeds", default=None) or CI_SEEDS
    seeds = [single] if single is not None else list(range(count))
    metafunc.parametrize("seed", seeds, ids=[f"seed={seed}" for seed in seeds])


@dataclass
class Checker:
    """Invariants over everything seen during one run."""

    active_by_term: dict[int, int] = field(default_factory=dict)
    image_by_index: dict[int, MetadataImage] = field(default_factory=dict)
    leader_by_epoch: dict[tuple[bytes, int, int], int] = field(default_factory=dict)
    last_epochs: dict[tuple[int, bytes, int], tuple[int, int]] = field(default_factory=dict)
    checked: set[tuple[int, int]] = field(default_factory=set)  # (incarnation, index)
    # id(controller) -> (controller, snapshot, entries, image): its last replay.
    replays: dict[int, tuple] = field(default_factory=dict)
    checks: int = 0
    fences: int = 0

    def check(self, cluster: ControllerCluster) -> None:
        self.checks += 1
        for node in cluster.alive():
            controller = node.controller
            assert controller is not None
            term = controller.active_term
            if term is not None:
                holder = self.active_by_term.setdefault(term, node.node_id)
                assert holder == node.node_id, f"two active controllers in term {term}"
            image = controller.image
            if (id(controller), image.last_applied_index) in self.checked:
                continue
            self.checked.add((id(controller), image.last_applied_index))
            if node.storage.snapshot().index <= image.last_applied_index:
                expected = self.replay(controller, node.storage, image.last_applied_index)
                assert image == expected, node.node_id
            seen = self.image_by_index.setdefault(image.last_applied_index, image)
            assert seen == image, f"node {node.node_id} diverged at {image.last_applied_index}"
            self.check_image(id(controller), image)

    def replay(
        self, controller: QuorumController, storage: MemoryStorage, index: int
    ) -> MetadataImage:
        """`replay(storage, index)`, computed from this incarnation's previous replay when
        its snapshot is the same and the entries it replayed are still the storage's: the
        same image (apply is a function of the snapshot and the entries), without decoding
        the snapshot and applying every entry again at each check."""
        snapshot = storage.snapshot()
        entries = storage.entries(snapshot.index + 1, index + 1) if index > snapshot.index else []
        previous = self.replays.get(id(controller))
        if (
            previous is not None
            and previous[0] is controller
            and previous[1] == snapshot
            and entries[: len(previous[2])] == previous[2]
        ):
            image = apply_entries(previous[3], entries[len(previous[2]) :])
        else:
            image = apply_entries(snapshot_image(snapshot), entries)
        self.replays[id(controller)] = (controller, snapshot, entries, image)
        return image

    def check_image(self, incarnation: int, image: MetadataImage) -> None:
        for topic in image.topics.values():
            for partition in topic.partitions:
                assert partition.isr and set(partition.isr) <= set(partition.replicas)
                if partition.leader != NO_LEADER:
                    assert partition.leader in partition.isr
                    broker = image.brokers[partition.leader]
                    assert not broker.fenced, "a fenced broker leads"
                key = (topic.topic_id, partition.partition, partition.leader_epoch)
                leader = self.leader_by_epoch.setdefault(key, partition.leader)
                assert leader == partition.leader, f"two leaders for {key}"
                epochs = (partition.leader_epoch, partition.partition_epoch)
                where = (incarnation, topic.topic_id, partition.partition)
                before = self.last_epochs.setdefault(where, epochs)
                assert before <= epochs and before[1] <= epochs[1], "an epoch went back"
                self.last_epochs[where] = epochs


async def workload(cluster: ControllerCluster, rng: random.Random) -> None:
    number = 0
    while True:
        await trio.sleep(rng.uniform(0.05, 0.5))
        controller = cluster.active()
        if controller is None:
            continue
        action = rng.random()
        name = rng.choice(TOPICS)
        if action < 0.5:
            number += 1
            topic = NewTopic(
                name=name,
                partitions=rng.randint(1, 3),
                replication_factor=rng.randint(1, 3),
                topic_id=b"\xee" + number.to_bytes(15, "big"),
            )

            def decide(image, topic=topic):
                return create_topic(image, topic)
        elif action < 0.8:

            def decide(image, name=name):
                return delete_topic(image, name)
        else:

            def decide(image):
                decisions = elect_leaders(image).values()
                return [r for d in decisions if not isinstance(d, DwalError) for r in d][:50]

        try:
            await controller.submit(decide, timeout_seconds=2)
        except DwalError:
            pass


async def nemesis(cluster: ControllerCluster, rng: random.Random, steps: int) -> None:
    for _ in range(steps):
        await trio.sleep(rng.uniform(0.5, 3))
        fault = rng.choice(["crash", "isolate", "silence"])
        active = cluster.active()
        node_id = rng.choice(cluster.node_ids)
        if active is not None and rng.random() < 0.7:
            node_id = active.node_id  # mostly the active controller: failovers
        if fault == "crash":
            await cluster.crash(node_id)
            await trio.sleep(rng.uniform(0.2, 2))
            await cluster.start(node_id)
        elif fault == "isolate":
            cluster.network.isolate(node_id, cluster.node_ids)
            await trio.sleep(rng.uniform(0.2, 2))
            cluster.network.heal()
        else:
            broker_id = rng.choice(BROKERS)
            cluster.heartbeating.discard(broker_id)
            await trio.sleep(SIM_CONFIG.session_timeout_seconds + rng.uniform(0, 2))
            cluster.heartbeating.add(broker_id)


async def simulate(seed: int, steps: int) -> Checker:
    rng = random.Random(seed)
    checker = Checker()
    async with trio.open_nursery() as nursery:
        network = MemoryNetwork(random.Random(rng.random()), FAULTS)
        await nursery.start(network.run)
        cluster = ControllerCluster(
            nursery,
            network,
            [1, 2, 3],
            rng.randrange(2**32),
            SIM_CONFIG,
            election_ticks=ELECTION_TICKS,
            heartbeat_ticks=HEARTBEAT_TICKS,
        )
        await cluster.start_all()

        async def check_forever() -> None:
            while True:
                checker.check(cluster)
                await trio.sleep(0.01)

        nursery.start_soon(check_forever)
        for broker_id in BROKERS:
            await cluster.register(broker_id)
            nursery.start_soon(cluster.heartbeat_forever, broker_id)
        nursery.start_soon(workload, cluster, random.Random(rng.random()))
        await nemesis(cluster, random.Random(rng.random()), steps)
        cluster.network.heal()
        network.set_faults(FaultModel())
        active = await cluster.wait_active()
        index = await active.submit(lambda image: create_topic(image, final_topic()))
        await cluster.wait_all_applied(index)
        checker.check(cluster)
        checker.fences = sum(c.statistics().brokers_fenced for c in cluster.controllers())
        images = [c.image for c in cluster.controllers()]
        assert all(image.topics == images[0].topics for image in images)
        nursery.cancel_scope.cancel()
    return checker


def final_topic() -> NewTopic:
    return NewTopic(name="final", partitions=1, replication_factor=1, topic_id=b"\xdd" * 16)


def test_controller_quorum_simulation(seed):
    try:
        checker = trio.run(simulate, seed, 6, clock=trio.testing.MockClock(autojump_threshold=0))
    except BaseException as error:
        raise AssertionError(
            f"controller simulation failed; replay with --controller-sim-seed {seed}"
        ) from error
    assert checker.checks > 100 and len(checker.active_by_term) >= 1


def test_the_checker_catches_a_fenced_leader():
    checker = Checker()
    from quorum_cluster import registration  # noqa: F401  (the support module loads)

    from broker.controller import EMPTY_IMAGE, apply
    from broker.controller.metadata_records import (
        PartitionRecord,
        RegisterBrokerRecord,
        TopicRecord,
    )

    topic_id = b"\x01" * 16
    records = [
        RegisterBrokerRecord(
            broker_id=1, incarnation_id=b"\x02" * 16, listeners=(), rack=None, fenced=True
        ),
        TopicRecord(name="t", topic_id=topic_id),
        PartitionRecord(
            topic_id=topic_id,
            partition=0,
            replicas=(1,),
            isr=(1,),
            leader=1,
            leader_epoch=0,
            partition_epoch=0,
        ),
    ]
    with pytest.raises(AssertionError, match="fenced broker leads"):
        checker.check_image(0, apply(EMPTY_IMAGE, records, entry_index=1))
