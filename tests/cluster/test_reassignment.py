"""Moving partitions between real broker processes while acks=all producers write:
`dwal topic reassign` (replication factor 1 to another node; 2 to another pair, its leader
leaving) and `dwal broker decommission` (every replica of a node moves to the two others).
Nothing acknowledged is lost or moved, no offset is acknowledged twice, the producers go on
writing, a removed broker deletes its copy, and a decommissioned broker gets no new
partition. Waits poll real processes in bounded loops (`wait_for`); times are printed."""

from __future__ import annotations

import pathlib

import pytest
import trio
from cluster_client import describe_cluster, describe_partitions
from cluster_launcher import ClusterLauncher, dwal, wait_for
from test_replication import SETTLE_S, _true_when, read_all

import client

pytestmark = pytest.mark.timeout(120)

MOVE_TIMEOUT_S = 30


class Load:
    """acks=all producers writing to every partition of `topics` through every node, until
    `stop`; records what was acknowledged ((topic, partition, offset) -> value)."""

    def __init__(self, bootstrap: str, topics: dict[str, int]) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.acked: dict[tuple[str, int, int], bytes] = {}
        self.failed: list[str] = []
        self.done = trio.Event()

    async def run(self) -> None:
        async with client.connect(self.bootstrap) as cluster:
            async with client.Producer(
                cluster, acks="all", linger_ms=1, delivery_timeout_ms=30_000
            ) as producer:
                number = 0
                while not self.done.is_set():
                    sent = []
                    for topic, partitions in self.topics.items():
                        for partition in range(partitions):
                            value = b"%s-%d-%06d" % (topic.encode(), partition, number)
                            delivery = await producer.send(topic, value, partition=partition)
                            sent.append((topic, value, delivery))
                    number += 1
                    for topic, value, delivery in sent:
                        try:
                            metadata = await delivery.wait()
                        except client.DwalError as error:
                            self.failed.append(f"{value!r}: {type(error).__name__}: {error}")
                            continue
                        key = (topic, metadata.partition, metadata.offset)
                        assert key not in self.acked, f"offset acknowledged twice: {key}"
                        self.acked[key] = value

    async def wait_acked(self, count: int) -> None:
        await wait_for(
            _true_when(lambda: len(self.acked) >= count), timeout_s=30, what=f"{count} acks"
        )

    async def check_stored(self, bootstrap: str) -> None:
        """Every acknowledged record is where it was acknowledged, read through `bootstrap`."""
        for topic in self.topics:
            stored = await read_all(bootstrap, topic)
            acked = {(p, o): v for (t, p, o), v in self.acked.items() if t == topic}
            lost = {k: v for k, v in acked.items() if stored.get(k) != v}
            assert not lost, f"{topic} through {bootstrap}: {len(lost)} acked records lost"


def copy_of(launcher: ClusterLauncher, node_id: int, topic: str, partition: int) -> pathlib.Path:
    return launcher.nodes[node_id].data_dir / f"{topic}-{partition}"


async def known_everywhere(launcher: ClusterLauncher, *topics: str) -> None:
    """Wait until every node's image has `topics` (a creation answered by one node is known
    to the others a moment later; a producer asking them meanwhile gets UNKNOWN_TOPIC)."""

    async def known() -> bool:
        for node in launcher.nodes.values():
            async with client.connect(node.bootstrap) as cluster:
                found = await cluster.refresh_metadata(list(topics))
            if any(isinstance(found.get(topic), client.DwalError) for topic in topics):
                return False
        return True

    await wait_for(known, timeout_s=SETTLE_S, what=f"{topics} known to every node")


async def replicas_of(bootstrap: str, topic: str) -> dict[int, tuple[int, ...]]:
    return {p.partition: p.replicas for p in await describe_partitions(bootstrap, topic)}


async def test_reassign_under_acks_all_load_loses_nothing_and_deletes_the_old_copies(
    three_nodes,
):
    nodes = three_nodes.nodes
    boot = nodes[1].bootstrap
    async with client.connect(boot) as cluster:
        admin = client.Admin(cluster)
        await admin.create_topic("one", 1, replication_factor=1)
        await admin.create_topic("two", 1, replication_factor=2)
    await known_everywhere(three_nodes, "one", "two")
    (one,) = await describe_partitions(boot, "one")
    (two,) = await describe_partitions(boot, "two")
    # RF 1 to another node; RF 2 to another pair, without its leader (leadership moves).
    one_target = [next(n for n in nodes if n not in one.replicas)]
    two_stays = next(r for r in two.replicas if r != two.leader)
    two_target = [next(n for n in nodes if n not in two.replicas), two_stays]
    print(f"one-0 {one.replicas} -> {one_target}; two-0 {two.replicas} -> {two_target}")
    assert copy_of(three_nodes, one.replicas[0], "one", 0).exists()

    load = Load(",".join(n.bootstrap for n in nodes.values()), {"one": 1, "two": 1})
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            await load.wait_acked(200)
            started = trio.current_time()
            moved = await dwal(
                "topic", "reassign", "one", "-p", "0", "--replicas", ",".join(map(str, one_target)),
                "--wait", "--bootstrap", boot, timeout_s=MOVE_TIMEOUT_S,
            )  # fmt: skip
            print(moved.stdout.decode(), end="")
            assert moved.stdout.decode().splitlines()[-1] == "one-0: move completed"
            await dwal(
                "topic", "reassign", "two", "-p", "0", "--replicas", ",".join(map(str, two_target)),
                "--wait", "--bootstrap", boot, timeout_s=MOVE_TIMEOUT_S,
            )  # fmt: skip
            print(f"both moves completed in {trio.current_time() - started:.2f} s")
            before = len(load.acked)
            await load.wait_acked(before + 200)  # the producers go on, on the new replicas
            load.done.set()
    print(f"acked {len(load.acked)}, failed {len(load.failed)}: {load.failed[:3]}")

    assert await replicas_of(boot, "one") == {0: tuple(one_target)}
    (after,) = await describe_partitions(boot, "two")
    assert after.replicas == tuple(two_target) and set(after.isr) == set(two_target)
    assert after.leader == two_target[0] and after.leader_epoch > two.leader_epoch
    listed = await dwal("topic", "reassignments", "--bootstrap", boot)
    assert listed.stdout == b"no partition is being reassigned\n"

    removed = [(one.replicas[0], "one"), (two.leader, "two")]

    async def copies_deleted():
        await trio.lowlevel.checkpoint()
        return all(not copy_of(three_nodes, n, topic, 0).exists() for n, topic in removed)

    await wait_for(copies_deleted, timeout_s=SETTLE_S, what="the removed copies deleted")
    for node_id, topic in removed:
        assert any("event=partition_logs_removed" in line for line in nodes[node_id].current.lines)
    for node_id in nodes:
        await load.check_stored(nodes[node_id].bootstrap)


async def test_decommission_moves_every_replica_to_the_other_nodes(three_nodes):
    nodes = three_nodes.nodes
    boot = nodes[1].bootstrap
    async with client.connect(boot) as cluster:
        await client.Admin(cluster).create_topic("d", 6, replication_factor=2)
    await known_everywhere(three_nodes, "d")
    placed = await replicas_of(boot, "d")
    assert sum(3 in replicas for replicas in placed.values()) == 4, placed

    load = Load(",".join(n.bootstrap for n in nodes.values()), {"d": 6})
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            await load.wait_acked(300)
            started = trio.current_time()
            result = await dwal(
                "broker", "decommission", "3", "--wait", "--bootstrap", boot,
                timeout_s=MOVE_TIMEOUT_S,
            )  # fmt: skip
            print(result.stdout.decode(), end="")
            print(f"decommissioned in {trio.current_time() - started:.2f} s")
            lines = result.stdout.decode().splitlines()
            assert lines[0].startswith("broker 3 decommissioned: 4 partition(s) moving off it")
            assert lines[-1] == "broker 3 holds no replica any more: it may be stopped"
            before = len(load.acked)
            await load.wait_acked(before + 300)
            load.done.set()
    print(f"acked {len(load.acked)}, failed {len(load.failed)}: {load.failed[:3]}")

    after = await replicas_of(boot, "d")
    assert all(set(replicas) <= {1, 2} and len(replicas) == 2 for replicas in after.values())
    for partition, replicas in placed.items():
        if 3 not in replicas:
            assert after[partition] == replicas, "a partition without 3 did not move"
    [three] = [b for b in (await describe_cluster(boot)).brokers if b.node_id == 3]
    assert three.decommissioned and three.partitions == 0
    status = (await dwal("cluster", "status", "--bootstrap", boot)).stdout.decode()
    row = next(
        line.split() for line in status.splitlines() if line.split()[:2] == ["3", str(three.epoch)]
    )
    assert row[4:6] == ["yes", "0"], status

    async def copies_deleted():
        await trio.lowlevel.checkpoint()
        return not any(copy_of(three_nodes, 3, "d", p).exists() for p in placed)

    await wait_for(copies_deleted, timeout_s=SETTLE_S, what="broker 3's copies deleted")
    # No new partition goes to the decommissioned broker; recommissioned, it may again.
    async with client.connect(boot) as cluster:
        admin = client.Admin(cluster)
        await admin.create_topic("later", 4, replication_factor=2)
        assert all(3 not in r for r in (await replicas_of(boot, "later")).values())
        with pytest.raises(client.DwalError) as caught:
            await admin.create_topic("three", 1, replication_factor=3)
        assert caught.value.code == client.ErrorCode.INVALID_REPLICATION_FACTOR
        await admin.recommission_broker(3)
        await admin.create_topic("three", 1, replication_factor=3)
    for node_id in nodes:
        await load.check_stored(nodes[node_id].bootstrap)
