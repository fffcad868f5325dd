"""A partition moving between brokers, on the replica layer: the leader takes a replica
added in its leader epoch as a follower outside the ISR, counts its fetches and proposes it
for the ISR once it caught up; a broker that is no longer a replica stops following the
partition and its copy is deleted; a new replica copies the leader's log byte for byte.
Real PartitionLogs in tmp dirs, images built by the controller's pure decisions (see
test_replica_manager_unit.py for the Node and FakeLink helpers)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
from replication_images import commit, with_brokers, with_topic
from test_replica_manager_unit import (
    TOPIC,
    TP,
    FakeLink,
    Node,
    batch,
    fetch,
    stored_batches,
    with_isr,
)

from broker.answers import wait_any
from broker.controller import EMPTY_IMAGE, MetadataImage, alter_partition_reassignment
from broker.replication.replica_fetcher import ReplicaFetcher
from broker.storage import PartitionLog, StorageError
from protocol import DwalError, ErrorCode

pytestmark = pytest.mark.timeout(30)


def moved(image: MetadataImage, target: tuple[int, ...]) -> MetadataImage:
    return commit(image, alter_partition_reassignment(image, TOPIC, 0, target))


def two_of_four() -> tuple[MetadataImage, int, int, int]:
    """Brokers 1-4, partition t-0 on two of them; returns (image, leader, follower, new)
    where `new` is a broker without a replica."""
    image = with_topic(with_brokers(1, 2, 3, 4), factor=2)
    state = image.topics[TOPIC].partitions[0]
    leader, follower = state.replicas
    new = next(b for b in (1, 2, 3, 4) if b not in state.replicas)
    return image, leader, follower, new


async def wait_until(condition: Callable[[], bool], *logs: PartitionLog) -> None:
    """Return once `condition()` holds, re-checking whenever one of `logs` moves."""
    with trio.fail_after(10):
        while not condition():
            await wait_any(
                [log.progress_event for log in logs] + [log.new_data_event for log in logs]
            )


async def test_the_leader_counts_a_new_replica_and_proposes_it_for_the_isr(tmp_path):
    image, leader_id, follower_id, new_id = two_of_four()
    leader = await Node.open(tmp_path, leader_id, image)
    try:
        leader.manager.append(*TP, batch(3), now_ms=1)
        fetch(leader, follower_id, 3)
        assert leader.log.high_watermark == 3
        with pytest.raises(DwalError) as caught:  # not a replica yet
            fetch(leader, new_id, 0)
        assert caught.value.code == ErrorCode.NOT_LEADER_OR_FOLLOWER
        image = moved(image, (leader_id, new_id))  # the follower leaves, `new` comes
        await leader.publish(image)
        replicas = leader.manager._leading[TP].replicas
        assert replicas.replicas == (leader_id, new_id, follower_id)
        assert replicas.isr_change_wanted(10**12) is None, "the new replica has not fetched"
        fields, data = fetch(leader, new_id, 0)
        assert data and fields["high_watermark"] == 3
        assert leader.log.high_watermark == 3, "a replica outside the ISR holds nothing back"
        assert replicas.isr_change_wanted(10**12) is None, "not caught up yet"
        fetch(leader, new_id, 3)
        wanted = replicas.isr_change_wanted(10**12)
        assert wanted is not None and set(wanted) == {leader_id, follower_id, new_id}
        # The controller completes the move with that ISR: the follower is no replica now.
        image = with_isr(image, wanted)
        state = image.topics[TOPIC].partitions[0]
        assert state.replicas == (leader_id, new_id) and not state.reassigning
        await leader.publish(image)
        assert replicas.replicas == (leader_id, new_id) and replicas.isr == state.isr
        with pytest.raises(DwalError) as caught:
            fetch(leader, follower_id, 3)
        assert caught.value.code == ErrorCode.NOT_LEADER_OR_FOLLOWER
    finally:
        leader.close()


class SilentLink:
    """A link to a leader that never answers (the fetcher's request waits)."""

    async def request(self, *args: object, **kwargs: object) -> None:
        await trio.sleep_forever()

    async def aclose(self) -> None:
        pass


async def test_a_broker_that_is_no_longer_a_replica_deletes_its_copy(tmp_path):
    image, leader_id, follower_id, new_id = two_of_four()
    follower = await Node.open(tmp_path, follower_id, EMPTY_IMAGE)
    follower.manager.link_factory = lambda leader, address: SilentLink()  # type: ignore
    follower.manager.peer_addresses = {b: ("127.0.0.1", 9000 + b) for b in (1, 2, 3, 4)}
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(follower.manager.run)
            await follower.publish(image)
            directory = follower.log.directory
            assert directory.exists() and follower.manager._followed == {TP: leader_id}
            image = moved(image, (leader_id, new_id))
            await follower.publish(image)  # still a replica while the move goes on
            assert directory.exists() and follower.manager._followed == {TP: leader_id}
            image = with_isr(image, (leader_id, follower_id, new_id))  # completes the move
            await follower.publish(image)
            assert TP not in follower.registry.logs and not follower.manager._followed
            fetcher = follower.manager._fetchers[leader_id].fetcher
            assert TP not in fetcher.partitions, "it no longer fetches the partition"
            assert not directory.exists(), "the copy of a broker that is no replica is deleted"
            assert not list(directory.parent.glob(f"{directory.name}*")), "nor left renamed"
            nursery.cancel_scope.cancel()
    finally:
        follower.close()


async def test_a_new_replica_copies_the_leaders_log_byte_for_byte(tmp_path):
    image, leader_id, follower_id, new_id = two_of_four()
    leader = await Node.open(tmp_path, leader_id, image)
    try:
        for n in range(5):
            leader.manager.append(*TP, batch(3, b"r%d" % n), now_ms=1)
        fetch(leader, follower_id, leader.log.log_end_offset)
        image = moved(image, (new_id, leader_id))
        await leader.publish(image)
        newcomer = await Node.open(tmp_path, new_id, image)
        try:
            assert newcomer.log.log_end_offset == 0
            fetcher = ReplicaFetcher(
                new_id,
                leader_id,
                FakeLink(leader),  # type: ignore[arg-type]
                broker_epoch=lambda: image.brokers[new_id].epoch,
                fetch_bytes_max=1 << 20,
                partition_fetch_bytes_max=1 << 20,
            )
            fetcher.follow(TP, newcomer.log, image.topics[TOPIC].partitions[0].leader_epoch)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetcher.run)
                await wait_until(
                    lambda: newcomer.log.log_end_offset == leader.log.log_end_offset,
                    newcomer.log,
                )
                nursery.cancel_scope.cancel()
            assert stored_batches(newcomer.log) == stored_batches(leader.log)
            wanted = leader.manager._leading[TP].replicas.isr_change_wanted(10**12)
            assert wanted is not None and new_id in wanted
        finally:
            newcomer.close()
    finally:
        leader.close()


async def test_a_follower_log_closed_under_its_fetcher_rests_instead_of_crashing(tmp_path):
    # A partition moved away (or deleted) is closed by the registry before the replica
    # manager unfollows it: under fsync=always the fetcher may be waiting for its fsync then.
    image, leader_id, follower_id, _ = two_of_four()
    leader = await Node.open(tmp_path, leader_id, image)
    follower = await Node.open(tmp_path, follower_id, image, fsync="always")
    try:
        leader.manager.append(*TP, batch(3), now_ms=1)
        fetcher = ReplicaFetcher(
            follower_id,
            leader_id,
            FakeLink(leader),  # type: ignore[arg-type]
            broker_epoch=lambda: image.brokers[follower_id].epoch,
            fetch_bytes_max=1 << 20,
            partition_fetch_bytes_max=1 << 20,
        )
        failed = trio.Event()

        async def closed_meanwhile(offset: int) -> None:
            failed.set()
            raise StorageError(f"{follower.log.directory} is closed")

        follower.log.wait_durable = closed_meanwhile  # type: ignore[method-assign]
        fetcher.follow(TP, follower.log, 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.run)
            with trio.fail_after(10):
                await failed.wait()
            assert fetcher.partitions[TP].paused_until > trio.current_time()
            nursery.cancel_scope.cancel()
    finally:
        leader.close()
        follower.close()
