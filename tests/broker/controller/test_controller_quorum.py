"""QuorumController, the trio shell of the metadata quorum: a single voter on disk (start,
cluster id, registration, topic creation, restart, snapshots), a corrupt committed entry, and
a three-voter quorum on the memory network (NOT_CONTROLLER, failover, partitions, fencing)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import trio
from quorum_cluster import (
    committed_records,
    CONFIG,
    ControllerCluster,
    raft_config,
    registration,
    replay,
)

from broker.controller import (
    allocate_producer_ids,
    ClusterIdRecord,
    NO_LEADER,
    MetadataImage,
    NewTopic,
    create_topic,
    encode_entry,
    register_broker,
)
from broker.controller.quorum_controller import (
    MetadataLogCorruptError,
    NotControllerError,
    QuorumController,
    QuorumControllerConfig,
    open_metadata_storage,
)
from broker.raft.log_storage import MemoryStorage
from broker.raft.memory_transport import MemoryNetwork
from broker.raft.messages import Configuration, Entry, HardState
from broker.raft.node import RaftError
from protocol.errors import DwalError, ErrorCode


def new_topic(
    name: str, partitions: int, replication_factor: int = 1, generation: int = 1
) -> NewTopic:
    return NewTopic(
        name=name,
        partitions=partitions,
        replication_factor=replication_factor,
        topic_id=b"\xff" + sum(name.encode()).to_bytes(3, "big") + bytes(11) + bytes([generation]),
    )


def same_state(image: MetadataImage, other: MetadataImage) -> bool:
    """Equal but for the index (a restarted leader applies its own no-op)."""
    return dataclasses.replace(image, last_applied_index=0) == dataclasses.replace(
        other, last_applied_index=0
    )


# A single voter on DurableStorage: real worker threads for fsync, so the real clock
# (under MockClock, virtual time would race ahead while a thread fsyncs).

DISK_CONFIG = QuorumControllerConfig(
    tick_interval_seconds=0.01, cluster_id="disk-cluster", session_timeout_seconds=600
)


async def run_on_disk(tmp_path, config, body):
    storage = open_metadata_storage(tmp_path, [1])
    controller = QuorumController(
        raft_config(1), storage, MemoryNetwork(random.Random(1)).endpoint(1), config=config
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(controller.run)
            with trio.fail_after(10):
                await controller.wait_active()
                result = await body(controller)
            nursery.cancel_scope.cancel()
    finally:
        storage.close()
    return result


async def test_a_single_voter_writes_the_cluster_id_registers_and_creates_then_restarts(
    tmp_path,
):
    async def first(controller: QuorumController) -> MetadataImage:
        assert controller.image.cluster_id == "disk-cluster"
        epoch = await controller.submit(lambda image: register_broker(image, registration(7)))
        broker = controller.image.brokers[7]
        assert broker.epoch == epoch and broker.fenced
        behind = await controller.heartbeat(7, epoch, metadata_offset=epoch - 1)
        assert behind.fenced, "a broker that has not applied its registration stays fenced"
        caught_up = await controller.heartbeat(7, epoch, metadata_offset=epoch)
        assert not caught_up.fenced and not controller.image.brokers[7].fenced
        before = controller.image.last_applied_index
        index = await controller.submit(lambda image: create_topic(image, new_topic("t", 3)))
        assert index == before + 1, "a topic creation is one entry"
        topic = controller.image.topics["t"]
        assert [p.leader for p in topic.partitions] == [7, 7, 7]
        assert controller.image.last_applied_index == index
        return controller.image

    image = await run_on_disk(tmp_path, DISK_CONFIG, first)

    async def second(controller: QuorumController) -> None:
        await controller.wait_image_at_least(image.last_applied_index)
        assert same_state(controller.image, image)
        assert controller.image.cluster_id == "disk-cluster"
        records = committed_records(controller.driver.storage, controller.image.last_applied_index)
        assert [r for r in records if isinstance(r, ClusterIdRecord)] == [
            ClusterIdRecord(cluster_id="disk-cluster")
        ], "read through the log before deciding: the cluster id is written once"

    other_id = dataclasses.replace(DISK_CONFIG, cluster_id="another")
    await run_on_disk(tmp_path, other_id, second)


async def test_a_single_voter_snapshots_and_restarts_from_the_snapshot(tmp_path):
    config = dataclasses.replace(DISK_CONFIG, snapshot_interval_entries=5)

    async def first(controller: QuorumController) -> MetadataImage:
        epoch = await controller.submit(lambda image: register_broker(image, registration(1)))
        await controller.heartbeat(1, epoch, metadata_offset=epoch)
        for number in range(12):
            name = f"topic-{number}"
            await controller.submit(
                lambda image, name=name: create_topic(image, new_topic(name, 2))
            )
        storage = controller.driver.storage
        assert controller.driver.statistics().snapshots_taken >= 2
        assert storage.snapshot().index > 10 and storage.first_index() > 10
        return controller.image

    image = await run_on_disk(tmp_path, config, first)

    async def second(controller: QuorumController) -> None:
        await controller.wait_image_at_least(image.last_applied_index)
        assert same_state(controller.image, image)
        assert len(controller.image.topics) == 12

    await run_on_disk(tmp_path, config, second)


# A corrupt committed entry.


def leaves(group: BaseExceptionGroup, kind: type) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found.extend(leaves(error, kind))
        elif isinstance(error, kind):
            found.append(error)
    return found


async def test_a_committed_entry_that_does_not_decode_stops_the_node(autojump_clock):
    storage = MemoryStorage(Configuration(voters=frozenset({1})))
    network = MemoryNetwork(random.Random(1))
    bad_index = 0
    for attempt in range(2):
        controller = QuorumController(raft_config(1), storage, network.endpoint(1), config=CONFIG)
        with pytest.raises(BaseExceptionGroup) as caught:
            async with trio.open_nursery() as nursery:
                await nursery.start(controller.run)
                if attempt == 0:
                    await controller.wait_active()
                    bad_index = controller.driver.node.last_index + 1
                    with pytest.raises(RaftError):
                        await controller.driver.propose(b"\xc1 not msgpack")
                await trio.sleep(10)
                pytest.fail("the node kept running")
        corrupt = leaves(caught.value, MetadataLogCorruptError)
        assert len(corrupt) == 1, caught.value
        assert f"entry {bad_index} " in str(corrupt[0])
        # Never skipped: the image stops right before it, again after a restart.
        assert controller.image.last_applied_index == bad_index - 1


# Three voters on the memory network (MockClock).


async def make_cluster(nursery, seed=1, config=CONFIG) -> ControllerCluster:
    network = MemoryNetwork(random.Random(seed))
    await nursery.start(network.run)
    cluster = ControllerCluster(nursery, network, [1, 2, 3], seed, config)
    await cluster.start_all()
    return cluster


async def test_a_follower_answers_not_controller_with_the_leader(nursery, autojump_clock):
    cluster = await make_cluster(nursery)
    active = await cluster.wait_active()
    assert active.image.cluster_id == "test-cluster"
    follower = next(c for c in cluster.controllers() if c is not active)
    with trio.fail_after(5):
        while follower.driver.leadership().leader != active.node_id:
            await trio.sleep(0.01)
    with pytest.raises(NotControllerError) as caught:
        await follower.submit(lambda image: [])
    assert caught.value.code == ErrorCode.NOT_CONTROLLER and caught.value.retriable
    assert caught.value.controller_id == active.node_id
    with pytest.raises(NotControllerError):
        await follower.heartbeat(1, 1, metadata_offset=0)


async def test_a_new_leader_continues_after_a_crash_and_a_partition(nursery, autojump_clock):
    cluster = await make_cluster(nursery, seed=2)
    for broker_id in (1, 2, 3):
        await cluster.register(broker_id)
        nursery.start_soon(cluster.heartbeat_forever, broker_id)
    await trio.sleep(2)  # heartbeats unfence them
    first = await cluster.wait_active()
    assert first.image.unfenced_broker_ids() == [1, 2, 3]
    await first.submit(lambda image: create_topic(image, new_topic("a", 3, 2)))

    await cluster.crash(first.node_id)
    second = await cluster.wait_active(other_than=first.node_id)
    assert second.image.topics["a"] == first.image.topics["a"]
    index = await second.submit(lambda image: create_topic(image, new_topic("b", 2, 3)))
    await trio.sleep(CONFIG.session_timeout_seconds * 2)
    assert second.image.unfenced_broker_ids() == [1, 2, 3], "heartbeating brokers stay"
    assert second.statistics().brokers_fenced == 0, "one session of grace after failover"

    await cluster.start(first.node_id)
    cluster.network.isolate(second.node_id, cluster.node_ids)
    third = await cluster.wait_active(other_than=second.node_id)
    with pytest.raises(DwalError) as caught:
        await second.submit(lambda image: create_topic(image, new_topic("lost", 1)))
    assert caught.value.code in (ErrorCode.NOT_CONTROLLER, ErrorCode.REQUEST_TIMED_OUT)
    index = await third.submit(lambda image: create_topic(image, new_topic("c", 1, 3)))
    cluster.network.heal()
    await cluster.wait_all_applied(index)
    cluster.check_images_equal_replay()
    images = [c.image for c in cluster.controllers()]
    assert all(same_state(image, images[0]) for image in images)
    assert sorted(images[0].topics) == ["a", "b", "c"]
    records = committed_records(third.driver.storage, third.image.last_applied_index)
    assert sum(isinstance(record, ClusterIdRecord) for record in records) == 1


async def test_a_silent_broker_is_fenced_in_its_session_and_unfenced_after(nursery, autojump_clock):
    cluster = await make_cluster(nursery, seed=3)
    for broker_id in (1, 2, 3):
        await cluster.register(broker_id)
        nursery.start_soon(cluster.heartbeat_forever, broker_id)
    await trio.sleep(2)
    active = await cluster.wait_active()
    await active.submit(lambda image: create_topic(image, new_topic("pairs", 6, 2)))
    await active.submit(lambda image: create_topic(image, new_topic("single", 3, 1)))
    before = active.image
    led_by_2 = {
        (name, p.partition): p
        for name, topic in before.topics.items()
        for p in topic.partitions
        if p.leader == 2
    }
    assert {name for name, _ in led_by_2} == {"pairs", "single"}

    cluster.heartbeating.discard(2)
    silent_since = trio.current_time()
    session = CONFIG.session_timeout_seconds
    with trio.fail_after(session + 1):
        while not active.image.brokers[2].fenced:
            await trio.sleep(0.05)
    fenced_after = trio.current_time() - silent_since
    assert session - CONFIG.heartbeat_interval_seconds <= fenced_after <= session + 0.5
    fenced = active.image
    for (name, number), old in led_by_2.items():
        now = fenced.topics[name].partitions[number]
        assert now.leader_epoch == old.leader_epoch + 1
        if name == "single":
            assert now.leader == NO_LEADER
        else:
            assert now.leader not in (2, NO_LEADER) and 2 not in now.isr
    assert not any(b.fenced for i, b in fenced.brokers.items() if i != 2)

    epoch = cluster.broker_epochs[2]
    fence_index = active.state.fenced_since[2]
    behind = await active.heartbeat(2, epoch, metadata_offset=fence_index - 1)
    assert behind.fenced, "a broker that has not seen its fence stays fenced"
    caught_up = await active.heartbeat(2, epoch, metadata_offset=fence_index)
    assert not caught_up.fenced
    cluster.heartbeating.add(2)
    back = active.image
    for (name, number), old in led_by_2.items():
        if name == "single":  # leaderless with 2 in its ISR: 2 leads again
            now = back.topics[name].partitions[number]
            assert now.leader == 2 and now.leader_epoch == old.leader_epoch + 2
    await trio.sleep(session * 2)
    assert active.image.unfenced_broker_ids() == [1, 2, 3]
    await cluster.wait_all_applied(active.image.last_applied_index)
    cluster.check_images_equal_replay()
    assert replay(active.driver.storage, active.image.last_applied_index) == active.image


async def registered_cluster(nursery, seed: int) -> tuple[ControllerCluster, QuorumController]:
    cluster = await make_cluster(nursery, seed=seed)
    for broker_id in (1, 2, 3):
        await cluster.register(broker_id)
        nursery.start_soon(cluster.heartbeat_forever, broker_id)
    await trio.sleep(2)
    return cluster, await cluster.wait_active()


async def test_concurrent_decisions_never_share_an_image(nursery, autojump_clock):
    cluster, active = await registered_cluster(nursery, seed=4)
    outcomes: dict[int, object] = {}

    async def create(generation: int) -> None:
        topic = new_topic("y", 1, 1, generation)
        try:
            outcomes[generation] = await active.submit(lambda image: create_topic(image, topic))
        except DwalError as error:
            outcomes[generation] = error.code

    async with trio.open_nursery() as creators:

        def decide_and_start_others(image):
            # They submit while this entry is proposed but not yet committed.
            for generation in (2, 3):
                creators.start_soon(create, generation)
            return create_topic(image, new_topic("w", 1))

        await active.submit(decide_and_start_others)
    winners = [g for g, outcome in outcomes.items() if type(outcome) is int]
    assert len(winners) == 1, outcomes
    loser = ({2, 3} - set(winners)).pop()
    assert outcomes[loser] == ErrorCode.TOPIC_ALREADY_EXISTS
    assert active.image.topics["y"].topic_id == new_topic("y", 1, 1, winners[0]).topic_id


async def test_a_decision_after_an_unknown_outcome_waits_for_that_entry(nursery, autojump_clock):
    cluster, active = await registered_cluster(nursery, seed=5)
    followers = [n for n in cluster.node_ids if n != active.node_id]
    for follower in followers:  # the leader's appends arrive, their acknowledgements do not
        cluster.network.cut(follower, active.node_id)
    first = new_topic("z", 1, 1, 1)
    with pytest.raises(DwalError) as caught:
        await active.submit(lambda image: create_topic(image, first), timeout_seconds=0.03)
    assert caught.value.code == ErrorCode.REQUEST_TIMED_OUT
    assert "z" not in active.image.topics
    cluster.network.heal()
    second = new_topic("z", 1, 1, 2)
    try:
        index = await active.submit(lambda image: create_topic(image, second))
    except DwalError as error:
        # Decided once the first entry was in the image (or by a new leader after it).
        assert error.code in (ErrorCode.TOPIC_ALREADY_EXISTS, ErrorCode.NOT_CONTROLLER)
    else:  # only if the first entry was lost with a change of leader
        assert active.image.topics["z"].topic_id == second.topic_id, index
    await trio.sleep(1)
    leader = await cluster.wait_active()
    assert leader.image.topics["z"].topic_id == first.topic_id


async def test_a_new_leader_reads_through_the_log_before_deciding(nursery, autojump_clock):
    # Every voter holds an earlier term's entries, committed before a crash, but no voter
    # stored the commit index (it is persisted lazily): a new leader learns they are
    # committed only once its own no-op commits.
    network = MemoryNetwork(random.Random(6))
    await nursery.start(network.run)
    cluster = ControllerCluster(nursery, network, [1, 2, 3], 6)
    old_entries = [
        Entry(term=1, index=1),
        Entry(term=1, index=2, data=encode_entry([ClusterIdRecord(cluster_id="old")])),
    ]
    for node in cluster.nodes.values():
        node.storage.append(old_entries)
        node.storage.set_hard_state(HardState(term=1, vote=1, commit=0))
    await cluster.start_all()
    active = await cluster.wait_active()
    assert active.image.cluster_id == "old"
    await active.submit(lambda image: register_broker(image, registration(1)))
    records = committed_records(active.driver.storage, active.image.last_applied_index)
    assert [r for r in records if isinstance(r, ClusterIdRecord)] == [
        ClusterIdRecord(cluster_id="old")
    ], "the new leader decided on an image that had not read through the log"


async def test_a_new_active_controller_gives_one_session_of_grace(nursery, autojump_clock):
    cluster, first = await registered_cluster(nursery, seed=7)
    cluster.heartbeating.discard(3)  # silent from now on, but the new controller never heard it
    await cluster.crash(first.node_id)
    second = await cluster.wait_active(other_than=first.node_id)
    active_at = trio.current_time()
    session = CONFIG.session_timeout_seconds
    with trio.fail_after(session + 1):
        while not second.image.brokers[3].fenced:
            await trio.sleep(0.01)
    fenced_after = trio.current_time() - active_at
    assert session - 0.05 <= fenced_after <= session + 0.5
    assert second.image.unfenced_broker_ids() == [1, 2]
    assert second.statistics().brokers_fenced == 1


async def test_producer_ids_are_never_handed_out_twice_across_a_failover(nursery, autojump_clock):
    cluster = await make_cluster(nursery, seed=3)
    await cluster.register(1)
    first = await cluster.wait_active()
    epoch = first.image.brokers[1].epoch

    async def allocate(controller: QuorumController) -> int:
        starts = []

        def decide(image):
            starts.append(image.next_producer_id)
            return allocate_producer_ids(image, 1, epoch)

        await controller.submit(decide)
        return starts[-1]

    blocks = [await allocate(first), await allocate(first)]
    await cluster.crash(first.node_id)
    second = await cluster.wait_active(other_than=first.node_id)
    blocks.append(await allocate(second))
    assert blocks == [0, 1000, 2000]
