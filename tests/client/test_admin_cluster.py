"""`Admin` against a fake cluster (fake_broker.FakeCluster with a FakeControlPlane): topic
descriptions carry leader, leader epoch, replicas, ISR and topic id; `describe_cluster` reads
DescribeCluster into typed values; `elect_leaders` reports per partition; and a request
answered NOT_CONTROLLER is sent again, after a backoff and a metadata refresh, until it is
accepted or the admin's time is up."""

from __future__ import annotations

import pytest
import trio
from fake_broker import FakeBroker, FakeCluster, FakeControlPlane, FakeTopic

import client
from client import (
    Admin,
    BrokerDescription,
    BrokerListener,
    ClusterDescription,
    QuorumMember,
    TopicPartition,
)
from protocol import ApiKey, DwalError, ErrorCode


async def start_control_plane(
    nursery: trio.Nursery, brokers: int = 3, partitions: int = 2
) -> FakeControlPlane:
    topics = {"t": FakeTopic(partitions=partitions)}
    fake = await FakeCluster.start(nursery, brokers, topics)
    return await FakeControlPlane(fake, topics).start(nursery)


async def test_describe_topics_has_leaders_replicas_isr_and_topic_id(nursery):
    plane = await start_control_plane(nursery)
    view = plane.cluster.view
    view.move("t", 0, 1, 5)
    view.replicas[("t", 0)], view.isr[("t", 0)] = [1, 2, 0], [1, 2]
    view.move("t", 1, 2, 3)
    view.replicas[("t", 1)], view.isr[("t", 1)] = [2, 1], [2, 1]
    async with client.connect(plane.cluster.bootstrap) as cluster:  # asks broker 0
        [description] = await Admin(cluster).describe_topics(["t"])
    assert description.name == "t" and description.topic_id == "id-of-t"
    first, second = description.partitions
    assert (first.leader, first.leader_epoch, first.replicas, first.isr) == (
        1,
        5,
        (1, 2, 0),
        (1, 2),
    )
    assert first.local and first.high_watermark == 100
    assert (second.leader, second.leader_epoch, second.replicas, second.isr) == (
        2,
        3,
        (2, 1),
        (2, 1),
    )
    assert not second.local and second.high_watermark == -1  # broker 0 holds no copy


async def test_describe_cluster_is_typed(nursery):
    plane = await start_control_plane(nursery, brokers=2)
    plane.controller_id = 1
    plane.fenced = {1}
    plane.voters = {0: (40, 2), 1: (42, 0)}
    plane.learners = {5: (-1, -1)}
    async with client.connect(plane.cluster.bootstrap) as cluster:
        description = await Admin(cluster).describe_cluster()
    ports = {node_id: broker.port for node_id, broker in plane.cluster.brokers.items()}
    assert description == ClusterDescription(
        cluster_id="fake-cluster-id",
        controller_id=1,
        metadata_offset=42,
        brokers=tuple(
            BrokerDescription(
                node_id=n,
                epoch=10 + n,
                fenced=n == 1,
                shut_down=False,
                rack=None,
                listeners=(BrokerListener("CLIENT", "127.0.0.1", ports[n]),),
            )
            for n in (0, 1)
        ),
        voters=(QuorumMember(0, 40, 2), QuorumMember(1, 42, 0)),
        learners=(QuorumMember(5, -1, -1),),
    )


async def test_not_controller_is_retried_after_a_backoff_and_a_metadata_refresh(
    nursery, autojump_clock
):
    plane = await start_control_plane(nursery)
    plane.not_controller = 3
    async with client.connect(plane.cluster.bootstrap) as cluster:
        started = trio.current_time()
        await Admin(cluster).create_topic("new", 2, replication_factor=3)
        elapsed_s = trio.current_time() - started
    assert plane.refused == 3 and plane.not_controller == 0
    assert plane.topics["new"].partitions == 2
    assert plane.cluster.view.replicas[("new", 0)] == [0, 1, 2]  # the factor went through
    keys = [key for _, key in plane.received]
    assert keys == [ApiKey.CREATE_TOPICS, ApiKey.METADATA] * 3 + [ApiKey.CREATE_TOPICS]
    assert 0.7 <= elapsed_s < 1  # backoffs of 0.1, 0.2 and 0.4 s


async def test_create_topic_leaves_the_replication_factor_to_the_broker(nursery):
    plane = await start_control_plane(nursery)
    async with client.connect(plane.cluster.bootstrap) as cluster:
        await Admin(cluster).create_topic("dflt", 2)
    assert [entry["replication_factor"] for entry in plane.created] == [-1]


async def test_not_controller_gives_up_with_a_clear_error_after_the_timeout(
    nursery, autojump_clock
):
    plane = await start_control_plane(nursery)
    plane.not_controller = 1_000_000  # no controller, ever
    async with client.connect(plane.cluster.bootstrap) as cluster:
        admin = Admin(cluster, retry_backoff_ms=100, retry_backoff_max_ms=500, timeout_ms=3000)
        started = trio.current_time()
        with pytest.raises(DwalError) as raised:
            await admin.describe_cluster()
        elapsed_s = trio.current_time() - started
    assert raised.value.code == ErrorCode.NOT_CONTROLLER
    # 0.1 + 0.2 + 0.4 + 0.5 + 0.5 + 0.5 + 0.5 = 2.7 s of backoff; another 0.5 s: past 3 s
    assert elapsed_s <= 3 and plane.refused == 8
    assert raised.value.message.startswith(
        "describe cluster: gave up after 8 attempts in 2.7 s, no active controller answered: "
        "node 0 is not the active controller"
    ), raised.value.message


async def test_other_errors_are_not_retried(nursery, autojump_clock):
    plane = await start_control_plane(nursery)
    async with client.connect(plane.cluster.bootstrap) as cluster:
        with pytest.raises(DwalError) as raised:
            await Admin(cluster).create_topic("t")
    assert raised.value.code == ErrorCode.TOPIC_ALREADY_EXISTS
    assert [key for _, key in plane.received] == [ApiKey.CREATE_TOPICS]


async def test_a_topic_level_not_controller_is_retried_too(nursery, autojump_clock):
    fake = FakeBroker({"t": FakeTopic()})
    await nursery.start(fake.serve)
    async with client.connect(fake.bootstrap) as cluster:
        async with trio.open_nursery() as inner:
            inner.start_soon(Admin(cluster).delete_topic, "t")
            refused = {"topic": "t", "error_code": int(ErrorCode.NOT_CONTROLLER)}
            with trio.fail_after(5):
                received = await fake.next_request(ApiKey.METADATA)
            await received.answer({"topics": [refused]})
            with trio.fail_after(5):
                received = await fake.next_request(ApiKey.METADATA)
            assert received.api_key == ApiKey.DELETE_TOPICS
            await received.answer({"topics": [{"topic": "t", "error_code": 0}]})


async def test_elect_leaders_reports_each_partition(nursery):
    plane = await start_control_plane(nursery, partitions=3)
    view = plane.cluster.view
    for partition in range(3):
        view.replicas[("t", partition)] = [1, 0]
    view.move("t", 1, 1, 1)  # its preferred replica leads already
    plane.elections[("t", 1)] = ErrorCode.ELECTION_NOT_NEEDED
    plane.elections[("t", 2)] = ErrorCode.PREFERRED_LEADER_NOT_AVAILABLE
    async with client.connect(plane.cluster.bootstrap) as cluster:
        admin = Admin(cluster)
        every = await admin.elect_leaders()
        chosen = await admin.elect_leaders({"t": [1]})
        with pytest.raises(DwalError) as raised:
            await admin.elect_leaders({"t": [7]})
    assert sorted(every) == [TopicPartition("t", 0), TopicPartition("t", 2)]
    assert every[TopicPartition("t", 0)] is None
    assert every[TopicPartition("t", 2)].code == ErrorCode.PREFERRED_LEADER_NOT_AVAILABLE
    assert list(chosen) == [TopicPartition("t", 1)]
    assert chosen[TopicPartition("t", 1)].code == ErrorCode.ELECTION_NOT_NEEDED
    assert raised.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
