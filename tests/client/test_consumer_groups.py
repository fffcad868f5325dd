"""Consumer groups through the client library against an in-process broker."""

from __future__ import annotations

import pytest
import trio
from client_test_support import wait_for_assignment

import client
from client import Admin, Consumer, DwalError, ErrorCode, GroupAdmin, Producer, TopicPartition


async def produce(cluster, topic: str, count: int, prefix: bytes = b"r") -> None:
    async with Producer(cluster, linger_ms=1) as producer:
        for i in range(count):
            await producer.send(topic, prefix + b"-%d" % i, key=b"%d" % i)


async def poll_until(consumer: Consumer, count: int, seen: list | None = None) -> list:
    seen = [] if seen is None else seen
    with trio.fail_after(20):
        while len(seen) < count:
            for records in (await consumer.poll(timeout_ms=100)).values():
                seen.extend(r.value for r in records)
    return seen


async def test_a_member_consumes_commits_and_a_successor_resumes(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("orders", partitions=3)
        await produce(cluster, "orders", 300)
        async with Consumer(cluster, group_id="g1", auto_offset_reset="earliest") as first:
            first.subscribe(["orders"])
            values = await poll_until(first, 300)
            assert sorted(values) == sorted(b"r-%d" % i for i in range(300))
            assert set(first.assignment()) == {TopicPartition("orders", p) for p in range(3)}
            await first.commit()
            committed = await first.committed(first.assignment())
            assert sum(committed.values()) == 300
            assert all(first.lag(tp) == 0 for tp in first.assignment())
        await produce(cluster, "orders", 10, prefix=b"new")
        async with Consumer(cluster, group_id="g1", auto_offset_reset="earliest") as second:
            second.subscribe(["orders"])
            values = await poll_until(second, 10)
            assert sorted(values) == sorted(b"new-%d" % i for i in range(10))


async def test_members_split_partitions_and_take_over_on_leave(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("split", partitions=6)
        a = Consumer(cluster, group_id="g2", auto_offset_reset="earliest")
        b = Consumer(cluster, group_id="g2", auto_offset_reset="earliest")
        a.subscribe(["split"])
        await wait_for_assignment(a, 6)
        b.subscribe(["split"])
        async with trio.open_nursery() as nursery:  # a must poll to hand partitions over
            nursery.start_soon(wait_for_assignment, a, 3)
            nursery.start_soon(wait_for_assignment, b, 3)
        assert not set(a.assignment()) & set(b.assignment())
        await a.close()
        await wait_for_assignment(b, 6)
        await b.close()


async def test_a_fenced_member_cannot_commit(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("fence", partitions=2)
        zombie = Consumer(cluster, group_id="g3", auto_offset_reset="earliest")
        zombie.subscribe(["fence"])
        await wait_for_assignment(zombie, 2)
        zombie._membership._scope.cancel()  # it stops heartbeating, as a paused process would
        survivor = Consumer(cluster, group_id="g3", auto_offset_reset="earliest")
        survivor.subscribe(["fence"])
        await wait_for_assignment(survivor, 2)  # only after the zombie's session expired
        with pytest.raises(DwalError) as info:
            await zombie.commit({TopicPartition("fence", 0): 1})
        assert info.value.code in (ErrorCode.UNKNOWN_MEMBER_ID, ErrorCode.FENCED_MEMBER_EPOCH)
        await survivor.close()


async def test_pattern_subscription_picks_up_new_topics(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        admin = Admin(cluster)
        await admin.create_topic("metrics.cpu")
        async with Consumer(cluster, group_id="g4", auto_offset_reset="earliest") as member:
            member.subscribe(pattern=r"metrics\..*")
            await wait_for_assignment(member, 1)
            await admin.create_topic("metrics.disk", partitions=2)
            await admin.create_topic("other")
            await wait_for_assignment(member, 3)
            assert {tp.topic for tp in member.assignment()} == {"metrics.cpu", "metrics.disk"}


async def test_static_member_gets_its_partitions_back(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("static", partitions=4)
        other = Consumer(cluster, group_id="g5")
        other.subscribe(["static"])
        await wait_for_assignment(other, 4)
        first = Consumer(cluster, group_id="g5", group_instance_id="host-1")
        first.subscribe(["static"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_assignment, other, 2)
            nursery.start_soon(wait_for_assignment, first, 2)
        mine = set(first.assignment())
        await first.close()  # a static member leaves temporarily: no rebalance
        again = Consumer(cluster, group_id="g5", group_instance_id="host-1")
        again.subscribe(["static"])
        await wait_for_assignment(again, 2)
        assert set(again.assignment()) == mine
        assert len(other.assignment()) == 2
        await again.close()
        await other.close()


async def test_group_admin_describe_reset_delete(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("adm", partitions=2)
        await produce(cluster, "adm", 40)
        groups = GroupAdmin(cluster)
        async with Consumer(cluster, group_id="g6", auto_offset_reset="earliest") as member:
            member.subscribe(["adm"])
            await poll_until(member, 40)
            await member.commit()
            description = await groups.describe_group("g6")
            assert description.state in ("stable", "reconciling")
            assert len(description.members) == 1
            assert {p.partition for p in description.offsets} == {
                TopicPartition("adm", 0),
                TopicPartition("adm", 1),
            }
            assert sum(p.committed_offset for p in description.offsets) == 40
            assert all(p.lag == 0 and p.owner == member.member_id for p in description.offsets)
            with pytest.raises(DwalError) as info:
                await groups.reset_offsets("g6", "adm", to="earliest", execute=True)
            assert info.value.code == ErrorCode.NON_EMPTY_GROUP
            with pytest.raises(DwalError) as info:
                await groups.delete_group("g6")
            assert info.value.code == ErrorCode.NON_EMPTY_GROUP
        assert [g.group_id for g in await groups.list_groups()] == ["g6"]
        plan = await groups.reset_offsets("g6", "adm", to="earliest")  # dry run
        assert set(plan.values()) == {0}
        assert sum((await groups.committed_offsets("g6")).values()) == 40
        await groups.reset_offsets("g6", "adm", to="offset", value=5, execute=True)
        assert set((await groups.committed_offsets("g6")).values()) == {5}
        async with Consumer(cluster, group_id="g6") as member:
            member.subscribe(["adm"])
            assert len(await poll_until(member, 30)) == 30  # 20 + 20 - 5 - 5
        await groups.delete_group("g6")
        assert await groups.list_groups() == []
        with pytest.raises(DwalError) as info:
            await groups.describe_group("g6")
        assert info.value.code == ErrorCode.GROUP_ID_NOT_FOUND


async def test_new_partitions_of_a_subscribed_topic_are_assigned(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        admin = Admin(cluster)
        await admin.create_topic("grow", partitions=2)
        async with Consumer(cluster, group_id="g7", auto_offset_reset="earliest") as member:
            member.subscribe(["grow"])
            await wait_for_assignment(member, 2)
            await admin.add_partitions("grow", 5)
            await wait_for_assignment(member, 5)
            async with Producer(cluster) as producer:
                await producer.send("grow", b"late", partition=4)
            assert await poll_until(member, 1) == [b"late"]
        with pytest.raises(DwalError) as info:
            await admin.add_partitions("grow", 3)
        assert info.value.code == ErrorCode.INVALID_PARTITIONS


async def test_the_offsets_topic_is_protected(group_broker):
    async with client.connect(group_broker.bootstrap) as cluster:
        admin = Admin(cluster)
        await admin.create_topic("p")
        async with Consumer(cluster, group_id="g8") as member:
            member.subscribe(["p"])
            await wait_for_assignment(member, 1)
        assert "__consumer_offsets" in await admin.list_topics()
        for action in (
            admin.delete_topic("__consumer_offsets"),
            admin.add_partitions("__consumer_offsets", 100),
        ):
            with pytest.raises(DwalError) as info:
                await action
            assert info.value.code == ErrorCode.POLICY_VIOLATION


async def test_a_member_with_stale_metadata_reads_partitions_added_elsewhere(group_broker):
    """The partitions are added through another client, so the member's metadata cache
    still says two partitions when the group assigns the new ones: no poll may raise."""
    async with (
        client.connect(group_broker.bootstrap) as cluster,
        client.connect(group_broker.bootstrap) as other,
    ):
        await Admin(other).create_topic("grown", partitions=2)
        async with Consumer(cluster, group_id="g9", auto_offset_reset="earliest") as member:
            member.subscribe(["grown"])
            await wait_for_assignment(member, 2)
            await Admin(other).add_partitions("grown", 6)
            async with Producer(other) as producer:
                for partition in range(6):
                    await producer.send("grown", b"p-%d" % partition, partition=partition)
            values = await poll_until(member, 6)
            assert sorted(values) == [b"p-%d" % p for p in range(6)]
            assert len(member.assignment()) == 6
