"""ReplicaManager (the leader side) and ReplicaFetcher (the follower side) in process, on
real PartitionLogs in tmp dirs, with metadata images built by the controller's pure
decisions and a fake BrokerLink that serves a follower's fetches from a leader's
ReplicaManager through its own follower-fetch serving (`serve_replica_fetch`).

What is proven here:
- the high watermark waits for every member of the (maximal) ISR and never exceeds what
  each of them acknowledged; an acks=all write waits for it (`wait_replicated`);
- acks=all is refused with NOT_ENOUGH_REPLICAS while the ISR is below min.insync.replicas,
  and answered NOT_ENOUGH_REPLICAS_AFTER_APPEND when it shrank meanwhile;
- the leader's answers to followers with a wrong epoch (FENCED_LEADER_EPOCH,
  UNKNOWN_LEADER_EPOCH, NOT_LEADER_OR_FOLLOWER);
- a diverged follower is told the diverging epoch and truncates to where the epochs agree,
  never below its high watermark, then copies the leader's batches (byte for byte);
- a follower whose log ends below the leader's log start (retention deleted the leader's
  first segments) is answered OFFSET_OUT_OF_RANGE with that log start, starts its log again
  there at once and copies the rest; its fetches then count toward the high watermark;
- a consumer fetching between the HW and the log end gets an empty answer.
"""

from __future__ import annotations

import logging
import random
import types
from typing import Any

import pytest
import trio

from replication_images import commit, fenced, unfenced, with_brokers, with_topic

from broker.controller import (
    EMPTY_IMAGE,
    AlterPartitionRequest,
    MetadataImage,
    alter_partition,
)
from broker.limits import Limits
from broker.replication.replica_fetcher import ReplicaFetcher, _whole_batches
from broker.replication.replica_manager import _manage_high_watermark
from broker.storage.log_loader import HIGH_WATERMARK_FILE
from broker.replication.replica_manager import ReplicaManager
from broker.request_handlers import RequestHandlers
from broker.storage import LogConfig, PartitionLog
from broker.topic_registry import TopicRegistry
from protocol import ACKS_ALL, ACKS_LEADER, ApiKey, DwalError, ErrorCode, check_request
from protocol.api import check_response
from protocol.frame import Response
from protocol.record_batch import build_batch, scan_batches

pytestmark = pytest.mark.timeout(30)

TOPIC = "t"
TP = (TOPIC, 0)


# ----------------------------------------------------------------------------- images


def with_isr(image: MetadataImage, isr: tuple[int, ...]) -> MetadataImage:
    state = image.topics[TOPIC].partitions[0]
    request = AlterPartitionRequest(
        broker_id=state.leader,
        broker_epoch=image.brokers[state.leader].epoch,
        topic_id=image.topics[TOPIC].topic_id,
        partition=0,
        leader_epoch=state.leader_epoch,
        partition_epoch=state.partition_epoch,
        isr=isr,
    )
    return commit(image, alter_partition(image, request))


def three_brokers() -> MetadataImage:
    image = with_topic(with_brokers(1, 2, 3))
    state = image.topics[TOPIC].partitions[0]
    assert sorted(state.isr) == [1, 2, 3] and state.leader_epoch == 0, state
    return image


class Node:
    """One broker's registry and ReplicaManager over its own data dir, following an image
    the test sets (`publish`)."""

    def __init__(self, registry: TopicRegistry, node_id: int, image: MetadataImage) -> None:
        self.node_id = node_id
        self.registry = registry
        self.image = image
        self.manager = ReplicaManager(node_id, registry, lambda: self.image)

    @classmethod
    async def open(cls, tmp_path, node_id: int, image: MetadataImage, **log_config) -> "Node":
        config = LogConfig(**{"fsync": "never", **log_config})
        registry = TopicRegistry.open(tmp_path / f"node-{node_id}", config, Limits())
        node = cls(registry, node_id, EMPTY_IMAGE)
        await node.publish(image)
        return node

    async def publish(self, image: MetadataImage) -> None:
        previous, self.image = self.image, image
        await self.registry.apply_image(image, self.node_id)
        await self.manager.apply_image(previous, image)

    @property
    def log(self) -> PartitionLog:
        return self.registry.logs[TP]

    def close(self) -> None:
        self.registry.close()


def leader_of(image: MetadataImage) -> int:
    return image.topics[TOPIC].partitions[0].leader


def followers_of(image: MetadataImage) -> list[int]:
    state = image.topics[TOPIC].partitions[0]
    return [r for r in state.replicas if r != state.leader]


def batch(count: int = 2, tag: bytes = b"v") -> bytearray:
    return bytearray(build_batch([(1000, None, b"%s-%d" % (tag, n)) for n in range(count)]))


def fetch(node: Node, replica_id: int, fetch_offset: int, **overrides: Any):
    broker = node.manager.image().brokers.get(replica_id)
    args = dict(
        replica_id=replica_id,
        broker_epoch=broker.epoch if broker is not None else -1,
        fetch_offset=fetch_offset,
        current_leader_epoch=node.manager.leader_epoch(*TP),
        last_fetched_epoch=-1,
        max_bytes=1 << 20,
    )
    args.update(overrides)
    fields, piece = node.manager.follower_fetch(*TP, **args)  # type: ignore[arg-type]
    data = b""
    if piece is not None:
        with piece:
            data = piece.read_bytes()
    return fields, data


def code_of_fetch(node: Node, replica_id: int, fetch_offset: int, **overrides: Any) -> ErrorCode:
    with pytest.raises(DwalError) as caught:
        fetch(node, replica_id, fetch_offset, **overrides)
    return caught.value.code


def stored_batches(log: PartitionLog) -> list[tuple[int, int, int, bytes]]:
    """(base offset, last offset, leader epoch, raw bytes) of every batch of `log` (read
    segment by segment: a read stops at the end of a segment)."""
    found: list[tuple[int, int, int, bytes]] = []
    offset = log.log_start_offset
    while offset < log.log_end_offset:
        with log.read(offset, 1 << 30, up_to="log_end") as piece:
            data = piece.read_bytes()
        assert data, (offset, log.log_end_offset)
        for scanned in scan_batches(data):
            h = scanned.header
            raw = data[scanned.position : scanned.position + h.size_bytes]
            found.append((h.base_offset, h.last_offset, h.partition_leader_epoch, bytes(raw)))
            offset = h.last_offset + 1
    return found


@pytest.fixture
async def cluster3(tmp_path):
    """The leader of an RF 3 partition (epoch 0, ISR of 3) as a Node, and its image."""
    image = three_brokers()
    node = await Node.open(tmp_path, leader_of(image), image)
    try:
        yield node
    finally:
        node.close()


# ----------------------------------------------------------------------------- HW / acks


async def test_hw_waits_for_every_isr_member(cluster3):
    node = cluster3
    a, b = followers_of(node.image)
    node.manager.append(*TP, batch(2), now_ms=1)
    node.manager.append(*TP, batch(2), now_ms=1)
    node.manager.append(*TP, batch(2), now_ms=1)
    assert node.log.log_end_offset == 6
    assert node.log.high_watermark == 0, "no follower has fetched yet"

    fields, data = fetch(node, a, 6)
    assert data == b"" and fields["high_watermark"] == 0, "b is still unknown"
    fields, data = fetch(node, b, 2)
    assert [h.header.base_offset for h in scan_batches(data)] == [2, 4]
    assert fields["high_watermark"] == 2 == node.log.high_watermark
    fetch(node, b, 4)
    assert node.log.high_watermark == 4
    fetch(node, b, 6)
    assert node.log.high_watermark == 6


async def test_hw_never_exceeds_what_every_isr_member_acknowledged(cluster3):
    """Random appends and follower fetches (each follower's offset only grows and stays at
    a batch boundary within the leader's log): after every step the HW is at most the
    minimum over the ISR and never goes back."""
    node = cluster3
    followers = followers_of(node.image)
    rng = random.Random(9)
    boundaries = [0]
    offsets = {f: -1 for f in followers}
    previous_hw = 0
    for _ in range(300):
        if rng.random() < 0.4:
            node.manager.append(*TP, batch(rng.randint(1, 3)), now_ms=1)
            boundaries.append(node.log.log_end_offset)
        else:
            f = rng.choice(followers)
            choices = [o for o in boundaries if o >= max(offsets[f], 0)]
            offsets[f] = rng.choice(choices)
            fetch(node, f, offsets[f])
        hw = node.log.high_watermark
        floor = min(node.log.log_end_offset, *offsets.values())
        assert hw <= max(floor, 0), (hw, offsets, node.log.log_end_offset)
        assert hw >= previous_hw
        previous_hw = hw
    for f in followers:
        fetch(node, f, node.log.log_end_offset)
    assert node.log.high_watermark == node.log.log_end_offset


async def test_acks_all_waits_for_the_isr(cluster3):
    node = cluster3
    a, b = followers_of(node.image)
    node.manager.check_acks(*TP, ACKS_ALL)
    _, info = node.manager.append(*TP, batch(3), now_ms=1)
    end = info.last_offset + 1
    done = trio.Event()

    async def waiter() -> None:
        await node.manager.wait_replicated(*TP, end)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        fetch(node, a, end)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set(), "acknowledged before every ISR member had it"
        fetch(node, b, end - 1 if end > 1 else 0)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        fetch(node, b, end)
        with trio.fail_after(5):
            await done.wait()


async def test_acks_all_refused_below_min_isr_and_acks_1_accepted(tmp_path):
    image = three_brokers()
    leader = leader_of(image)
    a, b = followers_of(image)
    node = await Node.open(tmp_path, leader, image, min_insync_replicas=2)
    try:
        # ISR {leader, a}: 2 >= min.insync.replicas, acks=all still works with a only
        await node.publish(with_isr(node.image, (leader, a)))
        node.manager.check_acks(*TP, ACKS_ALL)
        _, info = node.manager.append(*TP, batch(), now_ms=1)
        fetch(node, a, info.last_offset + 1)
        with trio.fail_after(5):
            await node.manager.wait_replicated(*TP, info.last_offset + 1)

        # ISR {leader}: refused before anything is written; acks=1 is not
        await node.publish(with_isr(node.image, (leader,)))
        with pytest.raises(DwalError) as caught:
            node.manager.check_acks(*TP, ACKS_ALL)
        assert caught.value.code == ErrorCode.NOT_ENOUGH_REPLICAS
        node.manager.check_acks(*TP, ACKS_LEADER)
        before = node.log.log_end_offset
        node.manager.append(*TP, batch(), now_ms=1)
        assert node.log.log_end_offset > before
    finally:
        node.close()


async def test_acks_all_answered_not_enough_replicas_after_append_when_the_isr_shrank(
    tmp_path,
):
    image = three_brokers()
    leader = leader_of(image)
    a, b = followers_of(image)
    node = await Node.open(tmp_path, leader, image, min_insync_replicas=2)
    try:
        fetch(node, a, 0)
        fetch(node, b, 0)
        node.manager.check_acks(*TP, ACKS_ALL)
        _, info = node.manager.append(*TP, batch(), now_ms=1)
        end = info.last_offset + 1
        outcome: list[Any] = []

        async def waiter() -> None:
            try:
                await node.manager.wait_replicated(*TP, end)
                outcome.append(ErrorCode.NONE)
            except DwalError as error:
                outcome.append(error.code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await node.publish(with_isr(node.image, (leader, a)))
            await node.publish(with_isr(node.image, (leader,)))
            await trio.testing.wait_all_tasks_blocked()
            assert outcome in ([], [ErrorCode.NOT_ENOUGH_REPLICAS_AFTER_APPEND]), outcome
        assert outcome == [ErrorCode.NOT_ENOUGH_REPLICAS_AFTER_APPEND], outcome
    finally:
        node.close()


async def test_leadership_lost_while_waiting_answers_not_leader(tmp_path):
    image = three_brokers()
    leader = leader_of(image)
    node = await Node.open(tmp_path, leader, image)
    try:
        _, info = node.manager.append(*TP, batch(), now_ms=1)
        outcome: list[Any] = []

        async def waiter() -> None:
            try:
                await node.manager.wait_replicated(*TP, info.last_offset + 1)
                outcome.append(ErrorCode.NONE)
            except DwalError as error:
                outcome.append(error.code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await node.publish(fenced(node.image, leader))
        assert outcome == [ErrorCode.NOT_LEADER_OR_FOLLOWER]
    finally:
        node.close()


# ----------------------------------------------------------------------------- epochs


async def test_followers_with_a_wrong_epoch_are_refused(tmp_path):
    image = three_brokers()
    first = leader_of(image)
    image = fenced(image, first)  # a new leader in epoch 1
    leader = leader_of(image)
    state = image.topics[TOPIC].partitions[0]
    assert state.leader_epoch == 1 and leader != first
    other = next(r for r in state.replicas if r not in (first, leader))
    node = await Node.open(tmp_path, leader, image)
    follower_node = await Node.open(tmp_path, other, image)
    try:
        node.manager.append(*TP, batch(), now_ms=1)
        assert code_of_fetch(node, other, 0, current_leader_epoch=0) == (
            ErrorCode.FENCED_LEADER_EPOCH
        )
        assert code_of_fetch(node, other, 0, current_leader_epoch=2) == (
            ErrorCode.UNKNOWN_LEADER_EPOCH
        )
        fields, _ = fetch(node, other, 0, current_leader_epoch=1)
        assert fields["leader_epoch"] == 1
        # no registered broker: it cannot count toward the HW
        assert code_of_fetch(node, 99, 0) == ErrorCode.STALE_BROKER_EPOCH
        # a replica's previous incarnation (another broker epoch)
        assert code_of_fetch(node, other, 0, broker_epoch=-5) == ErrorCode.STALE_BROKER_EPOCH
        # a follower asked as if it led
        assert code_of_fetch(follower_node, first, 0, current_leader_epoch=1) == (
            ErrorCode.NOT_LEADER_OR_FOLLOWER
        )
    finally:
        node.close()
        follower_node.close()


async def test_the_fetcher_pauses_a_partition_the_leader_refused(tmp_path):
    log = PartitionLog.open(
        tmp_path / "f", LogConfig(fsync="never"), now_ms=0, high_watermark_managed_externally=True
    )
    try:
        fetcher = ReplicaFetcher(
            2,
            1,
            None,
            broker_epoch=lambda: 1,
            fetch_bytes_max=1 << 20,  # type: ignore[arg-type]
            partition_fetch_bytes_max=1 << 20,
        )
        for code in (
            ErrorCode.FENCED_LEADER_EPOCH,
            ErrorCode.UNKNOWN_LEADER_EPOCH,
            ErrorCode.NOT_LEADER_OR_FOLLOWER,
        ):
            fetcher.follow(TP, log, 3)
            followed = fetcher.partitions[TP]
            part = {"error_code": int(code), "diverging_epoch": None, "high_watermark": -1}
            assert fetcher._apply(TP, followed, part, memoryview(b"")) is None
            assert followed.paused_until > trio.current_time(), code
            assert log.log_end_offset == 0
    finally:
        log.close()


# ----------------------------------------------------------------------------- divergence


def open_log(path, *epochs_and_counts: tuple[int, int]) -> PartitionLog:
    """A standalone log (replica-managed HW) with one batch per (epoch, record count)."""
    log = PartitionLog.open(
        path, LogConfig(fsync="never"), now_ms=0, high_watermark_managed_externally=True
    )
    for n, (epoch, count) in enumerate(epochs_and_counts):
        log.append(batch(count, b"%d-%d" % (epoch, n)), now_ms=1, leader_epoch=epoch)
    return log


async def diverged_pair(tmp_path):
    """Broker `leader` leads epoch 2 (ISR: itself and the first leader) with
    [epoch 0: 0-1, 2-3][epoch 2: 4-5, 6-8]; broker `follower` has the same epoch-0 prefix,
    then its own epoch 1 batches [4-6][7-7] that the leader never had (it led epoch 1, and
    those writes never reached the rest of its ISR). Both HWs are at 4."""
    image = three_brokers()
    first = leader_of(image)
    image = fenced(image, first)  # epoch 1
    second = leader_of(image)
    image = unfenced(image, first)
    image = fenced(image, second)  # epoch 2
    leader = leader_of(image)
    image = with_isr(image, (leader, first))  # the diverged follower is out of the ISR
    assert image.topics[TOPIC].partitions[0].leader_epoch == 2, image.topics[TOPIC]
    assert leader != second
    node = await Node.open(tmp_path, leader, EMPTY_IMAGE)
    follower = await Node.open(tmp_path, second, EMPTY_IMAGE)
    # the registry opens logs only for the image's topics: create them in place first
    await node.registry.apply_image(image, leader)
    await follower.registry.apply_image(image, second)
    for n, (epoch, count) in enumerate([(0, 2), (0, 2), (2, 2), (2, 3)]):
        node.log.append(batch(count, b"L%d" % n), now_ms=1, leader_epoch=epoch)
    for n, (epoch, count) in enumerate([(0, 2), (0, 2), (1, 3), (1, 1)]):
        data = batch(count, b"L%d" % n) if epoch == 0 else batch(count, b"F%d" % n)
        follower.log.append(data, now_ms=1, leader_epoch=epoch)
    # both had acknowledged the common prefix only (the follower led epoch 1 but its writes
    # never reached the rest of its ISR)
    node.log.manage_high_watermark_externally(high_watermark=4)
    follower.log.manage_high_watermark_externally(high_watermark=4)
    await node.publish(image)
    return node, follower, image


async def test_leader_reports_the_diverging_epoch(tmp_path):
    node, follower, image = await diverged_pair(tmp_path)
    try:
        assert follower.log.log_end_offset == 8 and follower.log.latest_leader_epoch == 1
        fields, data = fetch(
            node, follower.node_id, 8, current_leader_epoch=2, last_fetched_epoch=1
        )
        assert data == b""
        assert fields["diverging_epoch"] == {"epoch": 0, "end_offset": 4}, fields
        # a follower whose last epoch the leader has, but which is ahead of its end of it
        fields, _ = fetch(node, follower.node_id, 8, current_leader_epoch=2, last_fetched_epoch=0)
        assert fields["diverging_epoch"] == {"epoch": 0, "end_offset": 4}, fields
        # in agreement: records, no divergence
        fields, data = fetch(
            node, follower.node_id, 4, current_leader_epoch=2, last_fetched_epoch=0
        )
        assert "diverging_epoch" not in fields
        assert [s.header.base_offset for s in scan_batches(data)] == [4, 6]
        # ahead of the leader's log end without epochs: back to the log end
        fields, _ = fetch(node, follower.node_id, 50, current_leader_epoch=2)
        assert fields["diverging_epoch"] == {"epoch": 2, "end_offset": 9}, fields
    finally:
        node.close()
        follower.close()


async def test_follower_truncates_to_the_common_prefix(tmp_path):
    log = open_log(tmp_path / "f", (0, 2), (0, 2), (1, 3), (1, 1))
    try:
        log.set_high_watermark(2)
        fetcher = ReplicaFetcher(
            2,
            1,
            None,
            broker_epoch=lambda: 1,
            fetch_bytes_max=1 << 20,  # type: ignore[arg-type]
            partition_fetch_bytes_max=1 << 20,
        )
        fetcher.follow(TP, log, 2)
        followed = fetcher.partitions[TP]
        part = {
            "error_code": 0,
            "diverging_epoch": {"epoch": 0, "end_offset": 4},
            "high_watermark": 6,
        }
        assert fetcher._apply(TP, followed, part, memoryview(b"")) is None
        assert log.log_end_offset == 4
        assert log.latest_leader_epoch == 0
        assert log.high_watermark == 2, "the HW does not move on a divergence answer"
        assert followed.truncations == 1
    finally:
        log.close()


async def test_follower_truncation_uses_its_own_end_of_the_epoch(tmp_path):
    """The leader's epoch 0 ends at 6, the follower's at 4: truncate to min = 4."""
    log = open_log(tmp_path / "f", (0, 2), (0, 2), (1, 3))
    try:
        fetcher = ReplicaFetcher(
            2,
            1,
            None,
            broker_epoch=lambda: 1,
            fetch_bytes_max=1 << 20,  # type: ignore[arg-type]
            partition_fetch_bytes_max=1 << 20,
        )
        fetcher.follow(TP, log, 2)
        fetcher._truncate(TP, fetcher.partitions[TP], 0, 6)
        assert log.log_end_offset == 4
    finally:
        log.close()


async def test_follower_never_truncates_below_its_high_watermark(tmp_path):
    log = open_log(tmp_path / "f", (0, 2), (0, 2), (1, 3), (1, 1))
    try:
        log.set_high_watermark(7)  # a batch boundary inside the diverging epoch
        fetcher = ReplicaFetcher(
            2,
            1,
            None,
            broker_epoch=lambda: 1,
            fetch_bytes_max=1 << 20,  # type: ignore[arg-type]
            partition_fetch_bytes_max=1 << 20,
        )
        fetcher.follow(TP, log, 2)
        fetcher._truncate(TP, fetcher.partitions[TP], 0, 4)
        assert log.log_end_offset == 7
        assert log.high_watermark == 7
    finally:
        log.close()


class FakeLink:
    """A BrokerLink to an in-process leader: each fetch is served by the leader's
    ReplicaManager (`serve_replica_fetch`, what the request handlers call), the answer
    checked against the schema as the real link does. An answer with nothing new waits
    (briefly) for the leader's log."""

    def __init__(self, leader: Node) -> None:
        self.leader = leader
        self.requests = 0

    async def request(self, api_key: ApiKey, body: dict[str, Any], *, timeout_seconds: float):
        assert api_key == ApiKey.FETCH
        self.requests += 1
        body = check_request(ApiKey.FETCH, body)
        answer, parts = await self.leader.manager.serve_replica_fetch(
            body, max_bytes=body["max_bytes"], max_wait_ms=50
        )
        await trio.lowlevel.checkpoint()
        tail = b"".join(p.read_bytes() for p in parts)
        for piece in parts:
            piece.close()
        return Response(
            correlation_id=self.requests,
            error_code=ErrorCode.NONE,
            error_message=None,
            body=check_response(ApiKey.FETCH, answer),
            tail=tail,
        )

    async def aclose(self) -> None:
        pass


async def test_a_diverged_follower_converges_to_the_leader_through_fetches(tmp_path):
    node, follower, image = await diverged_pair(tmp_path)
    try:
        fetcher = ReplicaFetcher(
            follower.node_id,
            node.node_id,
            FakeLink(node),  # type: ignore[arg-type]
            broker_epoch=lambda: image.brokers[follower.node_id].epoch,
            fetch_bytes_max=1 << 20,
            partition_fetch_bytes_max=1 << 20,
        )
        fetcher.follow(TP, follower.log, 2)
        truncated_to: list[int] = []
        original = follower.log.truncate_to

        def spy(offset: int) -> None:
            truncated_to.append(offset)
            original(offset)

        follower.log.truncate_to = spy  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.run)
            with trio.fail_after(10):
                while follower.log.log_end_offset != node.log.log_end_offset or (
                    stored_batches(follower.log) != stored_batches(node.log)
                ):
                    await trio.sleep(0.01)
            # the leader counted it: with the third replica too, the HW reaches the end
            third = next(
                r
                for r in image.topics[TOPIC].partitions[0].replicas
                if r not in (node.node_id, follower.node_id)
            )
            fetch(node, third, node.log.log_end_offset)
            with trio.fail_after(10):
                while node.log.high_watermark != node.log.log_end_offset:
                    await trio.sleep(0.01)
            # and the follower learns the HW from its next fetch
            node.manager.append(*TP, batch(1), now_ms=1)
            fetch(node, third, node.log.log_end_offset)
            with trio.fail_after(10):
                while follower.log.high_watermark < 9:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert truncated_to == [4], truncated_to
        assert fetcher.partitions[TP].truncations == 1
        assert stored_batches(follower.log) == stored_batches(node.log)
    finally:
        node.close()
        follower.close()


# ----------------------------------------------------------------------------- log start


async def leader_past_retention(tmp_path, *, stale: bool):
    """Broker `leader` leads epoch 0 (ISR of all 3) with 40 batches of 3 records, the oldest
    of which retention deleted: its log starts above 0. Broker `follower` (a Node whose
    manager follows nothing: the test drives its fetcher) is an empty replacement or, if
    `stale`, holds a short log of its own wholly below the leader's log start, all of it
    below its high watermark."""
    image = three_brokers()
    leader_id = leader_of(image)
    follower_id = followers_of(image)[0]
    config = dict(segment_bytes=1024, retention_bytes=2048, file_delete_delay_ms=0)
    node = await Node.open(tmp_path, leader_id, EMPTY_IMAGE, **config)
    follower = await Node.open(tmp_path, follower_id, EMPTY_IMAGE, **config)
    # the registry opens logs only for the image's topics: create them in place first
    await node.registry.apply_image(image, leader_id)
    await follower.registry.apply_image(image, follower_id)
    for n in range(40):
        node.log.append(batch(3, b"L%d" % n), now_ms=1, leader_epoch=0)
    assert node.log.apply_retention(now_ms=1) > 0
    if stale:
        for n in range(3):
            follower.log.append(batch(2, b"F%d" % n), now_ms=1, leader_epoch=0)
    follower.log.manage_high_watermark_externally(high_watermark=follower.log.log_end_offset)
    assert 0 < node.log.log_start_offset and follower.log.log_end_offset < (
        node.log.log_start_offset
    )
    await node.publish(image)
    return node, follower, image


def third_replica(image: MetadataImage, *nodes: Node) -> int:
    ids = {node.node_id for node in nodes}
    return next(r for r in image.topics[TOPIC].partitions[0].replicas if r not in ids)


async def test_a_fetch_below_the_log_start_is_answered_out_of_range_with_it(tmp_path):
    node, follower, image = await leader_past_retention(tmp_path, stale=True)
    try:
        start = node.log.log_start_offset
        third = third_replica(image, node, follower)
        fetch(node, third, node.log.log_end_offset)
        for last_fetched_epoch in (-1, 0, 1):  # out of range whatever the epochs say
            fields, data = fetch(node, follower.node_id, 6, last_fetched_epoch=last_fetched_epoch)
            assert data == b"" and "diverging_epoch" not in fields
            assert fields["error_code"] == ErrorCode.OFFSET_OUT_OF_RANGE, fields
            assert fields["log_start_offset"] == start
            assert fields["high_watermark"] == node.log.high_watermark == start
        # not recorded: it neither counts toward the HW nor as caught up
        replicas = node.manager._leading[TP].replicas.snapshot()
        state = next(f for f in replicas.followers if f.replica_id == follower.node_id)
        assert state.last_fetch_ms is None and state.log_end_offset < 0
        # over the wire: the answer passes the schema and comes at once (no long poll)
        body = check_request(
            ApiKey.FETCH,
            {
                "max_wait_ms": 60_000,
                "replica_id": follower.node_id,
                "broker_epoch": image.brokers[follower.node_id].epoch,
                "topics": [
                    {
                        "topic": TOPIC,
                        "partitions": [
                            {"partition": 0, "fetch_offset": 6, "current_leader_epoch": 0}
                        ],
                    }
                ],
            },
        )
        with trio.fail_after(5):
            answer, parts = await node.manager.serve_replica_fetch(
                body, max_bytes=1 << 20, max_wait_ms=60_000
            )
        assert parts == []
        part = check_response(ApiKey.FETCH, answer)["topics"][0]["partitions"][0]
        assert (part["error_code"], part["log_start_offset"]) == (
            ErrorCode.OFFSET_OUT_OF_RANGE,
            start,
        )
        # at the log start: records
        fields, data = fetch(node, follower.node_id, start)
        assert "error_code" not in fields and data
        assert next(scan_batches(data)).header.base_offset == start
    finally:
        node.close()
        follower.close()


async def test_the_fetcher_starts_at_the_leader_log_start_only_when_its_log_ends_below(
    tmp_path,
):
    log = open_log(tmp_path / "f", (0, 2), (0, 2), (1, 3))  # offsets 0-6
    try:
        log.set_high_watermark(4)
        fetcher = ReplicaFetcher(
            2,
            1,
            None,
            broker_epoch=lambda: 1,
            fetch_bytes_max=1 << 20,  # type: ignore[arg-type]
            partition_fetch_bytes_max=1 << 20,
        )

        def out_of_range(log_start_offset: int) -> dict[str, Any]:
            return {
                "error_code": int(ErrorCode.OFFSET_OUT_OF_RANGE),
                "error_message": "below the log start",
                "log_start_offset": log_start_offset,
                "high_watermark": log_start_offset,
                "diverging_epoch": None,
            }

        # The leader's log start at or below this log's end (or not said): the leader may
        # still have these records: nothing is discarded, the partition rests.
        for leader_log_start in (-1, 0, 4, 7):
            fetcher.follow(TP, log, 2)
            followed = fetcher.partitions[TP]
            part = out_of_range(leader_log_start)
            assert fetcher._apply(TP, followed, part, memoryview(b"")) is None
            assert followed.paused_until > trio.current_time(), leader_log_start
            assert (log.log_start_offset, log.log_end_offset, followed.resets) == (0, 7, 0)
        # Above it: every record here is below the leader's log start: start there at once.
        fetcher.follow(TP, log, 2)
        followed = fetcher.partitions[TP]
        assert fetcher._apply(TP, followed, out_of_range(8), memoryview(b"")) is None
        assert followed.paused_until == 0.0, "fetches on at once"
        assert followed.resets == 1
        assert log.log_start_offset == log.log_end_offset == log.high_watermark == 8
        assert log.leader_epochs.entries() == ()
    finally:
        log.close()


@pytest.mark.parametrize("stale", [False, True], ids=["empty", "stale"])
async def test_a_follower_behind_the_leader_log_start_converges_through_fetches(
    tmp_path, caplog, stale
):
    node, follower, image = await leader_past_retention(tmp_path, stale=stale)
    caplog.set_level(logging.WARNING, logger="dwal.replication")
    try:
        start, from_offset = node.log.log_start_offset, follower.log.log_end_offset
        third = third_replica(image, node, follower)
        fetch(node, third, node.log.log_end_offset)  # in sync: the HW waits for the follower
        assert node.log.high_watermark == start
        fetcher = ReplicaFetcher(
            follower.node_id,
            node.node_id,
            FakeLink(node),  # type: ignore[arg-type]
            broker_epoch=lambda: image.brokers[follower.node_id].epoch,
            fetch_bytes_max=1 << 20,
            partition_fetch_bytes_max=1 << 20,
        )
        fetcher.follow(TP, follower.log, 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.run)
            with trio.fail_after(10):
                while stored_batches(follower.log) != stored_batches(node.log):
                    await trio.sleep(0.01)
            # its fetch offset counted: the HW reached the leader's end
            with trio.fail_after(10):
                while node.log.high_watermark != node.log.log_end_offset:
                    await trio.sleep(0.01)
            # and goes on counting; the follower learns the HW from its next fetch
            node.manager.append(*TP, batch(1), now_ms=1)
            fetch(node, third, node.log.log_end_offset)
            with trio.fail_after(10):
                while follower.log.high_watermark != node.log.log_end_offset:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert node.log.high_watermark == node.log.log_end_offset
        assert follower.log.log_start_offset == start
        assert stored_batches(follower.log) == stored_batches(node.log)
        followed = fetcher.partitions[TP]
        assert (followed.resets, followed.truncations, followed.paused_until) == (1, 0, 0.0)
        [reset] = [
            r for r in caplog.records if r.getMessage() == "replica_reset_to_leader_log_start"
        ]
        assert reset.fields["from_offset"] == from_offset  # type: ignore[attr-defined]
        assert reset.fields["to_offset"] == start  # type: ignore[attr-defined]
    finally:
        node.close()
        follower.close()


# ----------------------------------------------------------------------------- consumers


async def test_a_consumer_fetch_between_hw_and_log_end_is_empty(cluster3):
    node = cluster3
    a, b = followers_of(node.image)
    node.manager.append(*TP, batch(2), now_ms=1)
    fetch(node, a, 2)
    fetch(node, b, 2)
    node.manager.append(*TP, batch(3), now_ms=1)  # 2-4: not replicated
    assert (node.log.high_watermark, node.log.log_end_offset) == (2, 5)
    shell = types.SimpleNamespace(replicas=node.manager)
    for offset in (2, 3, 4, 5):
        body = check_request(
            ApiKey.FETCH,
            {
                "max_wait_ms": 0,
                "min_bytes": 1,
                "max_bytes": 1 << 20,
                "topics": [
                    {
                        "topic": TOPIC,
                        "partitions": [
                            {"partition": 0, "fetch_offset": offset, "max_bytes": 1 << 20}
                        ],
                    }
                ],
            },
        )
        reply, total, failed = RequestHandlers._read_partitions(  # type: ignore[arg-type]
            shell, body, 1 << 20
        )
        reply.close()
        part = reply.body["topics"][0]["partitions"][0]
        assert part["error_code"] == 0, (offset, part)
        assert total == 0 and part["high_watermark"] == 2, (offset, part)
    # offset 1 reads only the replicated batch
    with node.log.read(1, 1 << 20) as piece:
        assert [s.header.base_offset for s in scan_batches(piece.read_bytes())] == [0]


def test_a_fetched_chunk_is_cut_to_its_whole_batches():
    """A leader's read may end inside a batch (its byte budget ran out there): the follower
    appends the whole batches and fetches the rest again, rather than refusing the chunk
    for ever (seen stalling every follower of 1 KiB-record partitions)."""
    first, second = batch(3, b"a"), batch(4, b"b")
    data = memoryview(bytes(first + second))
    assert _whole_batches(data).tobytes() == bytes(first + second)
    for cut in range(1, len(second)):
        assert _whole_batches(data[: len(first) + cut]).tobytes() == bytes(first)
    assert _whole_batches(data[: len(first) - 1]).nbytes == 0
    assert _whole_batches(memoryview(b"")).nbytes == 0


async def test_a_follower_fetching_with_a_small_budget_still_converges(tmp_path):
    image = three_brokers()
    leader_id = leader_of(image)
    follower_id = followers_of(image)[0]
    node = await Node.open(tmp_path, leader_id, image)
    follower = await Node.open(tmp_path, follower_id, image)
    try:
        for tag in (b"x", b"y", b"z"):
            node.manager.append(*TP, batch(50, tag), now_ms=1)
        one_batch = len(batch(50, b"x"))
        fetcher = ReplicaFetcher(
            follower_id,
            leader_id,
            FakeLink(node),  # type: ignore[arg-type]
            broker_epoch=lambda: image.brokers[follower_id].epoch,
            fetch_bytes_max=1 << 20,
            partition_fetch_bytes_max=one_batch + one_batch // 2,  # every read ends mid-batch
        )
        fetcher.follow(TP, follower.log, image.topics[TOPIC].partitions[0].leader_epoch)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.run)
            with trio.fail_after(10):
                while follower.log.log_end_offset != node.log.log_end_offset:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert stored_batches(follower.log) == stored_batches(node.log)
    finally:
        node.close()
        follower.close()


@pytest.mark.parametrize("checkpointed", [True, False])
def test_a_reopened_log_hands_over_its_checkpointed_high_watermark_never_its_end(
    tmp_path, checkpointed
):
    """A broker killed before its first HW checkpoint must not come back believing its whole
    log committed: as a follower it could then never truncate a tail the new leader lacks
    (found by the nemesis: the ISR never became full again)."""
    directory = tmp_path / "t-0"
    log = PartitionLog.open(
        directory, LogConfig(fsync="never"), now_ms=1, high_watermark_managed_externally=True
    )
    for tag in (b"a", b"b", b"c"):
        log.append(batch(2, tag), now_ms=1)
    log.set_high_watermark(4)
    log.close()  # writes the HW checkpoint (4)
    if not checkpointed:
        (directory / HIGH_WATERMARK_FILE).unlink()  # as if killed before any checkpoint
    reopened = PartitionLog.open(directory, LogConfig(fsync="never"), now_ms=1)
    try:
        assert reopened.log_end_offset == 6
        _manage_high_watermark(reopened)
        assert reopened.high_watermark == (4 if checkpointed else 0)
    finally:
        reopened.close()


async def test_isr_size_tells_whether_acks_all_must_fsync_the_leader(tmp_path):
    """acks=all fsyncs the leader only when it is the partition's only in-sync replica
    (request_handlers: a single copy's only protection); with followers in sync the high
    watermark (their page caches) answers, as in Kafka."""
    image = three_brokers()
    node = await Node.open(tmp_path, leader_of(image), image)
    try:
        assert node.manager.isr_size(*TP) == 3
        assert node.manager.isr_size("other", 0) == 1  # not led here: the safe answer
    finally:
        node.close()


def consumer_fetch_code(node: Node, current_leader_epoch: int) -> ErrorCode:
    """The error of a consumer's fetch at offset 0 carrying `current_leader_epoch`."""
    body = check_request(
        ApiKey.FETCH,
        {
            "max_wait_ms": 0,
            "min_bytes": 1,
            "max_bytes": 1 << 20,
            "topics": [
                {
                    "topic": TOPIC,
                    "partitions": [
                        {
                            "partition": 0,
                            "fetch_offset": 0,
                            "max_bytes": 1 << 20,
                            "current_leader_epoch": current_leader_epoch,
                        }
                    ],
                }
            ],
        },
    )
    shell = types.SimpleNamespace(replicas=node.manager)
    reply, _, _ = RequestHandlers._read_partitions(  # type: ignore[arg-type]
        shell, body, 1 << 20
    )
    reply.close()
    return ErrorCode(reply.body["topics"][0]["partitions"][0]["error_code"])


async def test_a_consumer_fetch_in_another_leader_epoch_is_refused(tmp_path):
    """KIP-320: a consumer sends the leader epoch its metadata knows. A broker that still
    thinks it leads in an older epoch answers UNKNOWN_LEADER_EPOCH rather than serving its
    stale log (whose end may lie below the consumer's position: OFFSET_OUT_OF_RANGE would
    make the consumer reset); a consumer behind gets FENCED_LEADER_EPOCH."""
    image = three_brokers()
    old_leader = leader_of(image)
    image = fenced(image, old_leader)  # leadership moves: leader epoch 1
    leader = leader_of(image)
    assert leader != old_leader and image.topics[TOPIC].partitions[0].leader_epoch == 1
    node = await Node.open(tmp_path, leader, image)
    try:
        node.manager.append(*TP, batch(2), now_ms=1)
        assert consumer_fetch_code(node, 1) == ErrorCode.NONE
        assert consumer_fetch_code(node, -1) == ErrorCode.NONE  # not checked
        assert consumer_fetch_code(node, 2) == ErrorCode.UNKNOWN_LEADER_EPOCH
        assert consumer_fetch_code(node, 0) == ErrorCode.FENCED_LEADER_EPOCH
    finally:
        node.close()


async def test_a_leader_left_alone_in_its_isr_fsyncs_its_log(tmp_path):
    """Under fsync=never the followers' page caches counted toward the HW; once the ISR is
    the leader alone, its page cache holds the only in-sync copy of every committed record,
    so it fsyncs at once (a power loss would otherwise lose them)."""
    image = three_brokers()
    leader = leader_of(image)
    a, b = followers_of(image)
    node = await Node.open(tmp_path, leader, image, fsync="never")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.manager.run)
            node.manager.append(*TP, batch(2), now_ms=1)
            fetch(node, a, 2)
            fetch(node, b, 2)
            node.manager.append(*TP, batch(2), now_ms=1)
            fetch(node, a, 4)
            fetch(node, b, 4)
            assert node.log.high_watermark == 4
            await trio.testing.wait_all_tasks_blocked()
            assert node.log.durable_offset < 4, "nothing made it durable yet"
            await node.publish(with_isr(node.image, (leader, a)))
            await trio.testing.wait_all_tasks_blocked()
            assert node.log.durable_offset < 4, "another in-sync replica holds the records"
            await node.publish(with_isr(node.image, (leader,)))
            with trio.fail_after(5):
                while node.log.durable_offset < 4:
                    await node.log.progress_event.wait()
            nursery.cancel_scope.cancel()
    finally:
        node.close()


async def test_drain_refuses_appends_and_returns_once_everything_is_replicated(cluster3):
    """A stopping leader: new appends are refused before anything is written (the client
    resends them to the next leader), and drain returns only when the HW reaches the log
    end, so no write appended before loses its leader halfway."""
    node = cluster3
    a, b = followers_of(node.image)
    node.manager.append(*TP, batch(2), now_ms=1)
    drained = trio.Event()

    async def drain() -> None:
        await node.manager.drain()
        drained.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(DwalError) as refused:
            node.manager.append(*TP, batch(2), now_ms=1)
        assert refused.value.code == ErrorCode.NOT_LEADER_OR_FOLLOWER
        assert node.log.log_end_offset == 2, "the refused batch was not written"
        fetch(node, a, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert not drained.is_set(), "b has not fetched: the HW is below the log end"
        fetch(node, b, 2)
        with trio.fail_after(5):
            await drained.wait()
    assert node.log.high_watermark == 2
