"""fsync policies seen from outside: acks wait for fdatasync under `always`, group commit
shares fsyncs between concurrent producers, consumers see only durable records, and periodic
flushes happen under `interval` and `never`."""

from __future__ import annotations

import contextlib
import math

import pytest
import trio

import client
from broker_test_support import at_real_pace, create_topic, partition_fdatasyncs_only, running_node
from broker.config import BrokerConfig
from broker.limits import Limits
from broker.node import run_broker
from broker.storage import LogConfig
from client import Admin, Producer
from protocol import ACKS_LEADER, build_batch


async def start_broker(nursery, tmp_path, fsync: str) -> str:
    config = BrokerConfig(
        port=0,
        http_port=-1,
        grpc_port=-1,
        data_dir=tmp_path / "data",
        log_defaults=LogConfig(fsync=fsync),
    )
    addresses = await nursery.start(run_broker, config)
    return f"127.0.0.1:{addresses.port}"


async def test_ack_waits_for_fdatasync_and_consumers_see_only_durable_records(
    nursery, tmp_path, fdatasync_spy
):
    bootstrap = await start_broker(nursery, tmp_path, "always")
    # Responses on one connection come back in request order, so the admin (which must get
    # answers while the produce waits) has a connection of its own.
    async with client.connect(bootstrap) as cluster, client.connect(bootstrap) as admin_cluster:
        admin = Admin(admin_cluster)
        await admin.create_topic("durable")
        fdatasync = fdatasync_spy(hold=True)
        async with Producer(cluster, acks=1, linger_ms=0) as producer:
            delivery = await producer.send("durable", b"v")
            await trio.to_thread.run_sync(fdatasync.entered.wait, 30)
            partition = (await admin.describe_topic("durable")).partitions[0]
            assert (partition.log_end_offset, partition.high_watermark) == (1, 0)
            assert not delivery.done
            fdatasync.release.set()
            assert (await delivery.wait()).offset == 0
        partition = (await admin.describe_topic("durable")).partitions[0]
        assert partition.high_watermark == 1


@pytest.mark.parametrize("policy", ["never", "interval"])
async def test_acks_all_waits_for_fdatasync_under_every_policy(
    nursery, tmp_path, fdatasync_spy, policy, monkeypatch
):
    # guarantees.md: acks=all answers "after the batches are fsynced on this broker, whatever
    # the topic's policy"; under never/interval consumers may read the records before that.
    bootstrap = await start_broker(nursery, tmp_path, policy)
    async with client.connect(bootstrap) as cluster, client.connect(bootstrap) as admin_cluster:
        admin = Admin(admin_cluster)
        await admin.create_topic("all")
        # the idempotent producer's id block is a metadata-log commit: its fsync is not held
        partition_fdatasyncs_only(monkeypatch)
        fdatasync = fdatasync_spy(hold=True)
        async with Producer(cluster, acks="all", linger_ms=0) as producer:
            delivery = await producer.send("all", b"v")
            with trio.fail_after(10):  # acks=all must reach an fsync at all
                await trio.to_thread.run_sync(fdatasync.entered.wait, 10)
            partition = (await admin.describe_topic("all")).partitions[0]
            assert (partition.log_end_offset, partition.high_watermark) == (1, 1)
            assert not delivery.done
            fdatasync.release.set()
            assert (await delivery.wait()).offset == 0


async def test_group_commit_shares_fsyncs_between_producers(nursery, tmp_path, fdatasync_spy):
    bootstrap = await start_broker(nursery, tmp_path, "always")
    producers, records_each = 8, 200
    async with client.connect(bootstrap) as cluster:
        await Admin(cluster).create_topic("shared")
    fdatasync = fdatasync_spy()
    requests = []

    async def produce(index: int) -> None:
        # one connection per producer, one record per request: every request needs an fsync
        async with client.connect(bootstrap) as cluster:
            async with Producer(cluster, acks=1, linger_ms=0) as producer:
                for i in range(records_each):
                    delivery = await producer.send("shared", b"%d-%d" % (index, i))
                    await delivery.wait()
                    requests.append(1)

    async with trio.open_nursery() as group:
        for index in range(producers):
            group.start_soon(produce, index)
    assert len(requests) == producers * records_each
    assert 0 < fdatasync.calls < len(requests), (fdatasync.calls, len(requests))


@pytest.mark.parametrize("policy", ["interval", "never"])
async def test_periodic_flush_moves_the_durable_offset(tmp_path, policy, mock_clock):
    clock = mock_clock
    log_config = LogConfig(fsync=policy, flush_interval_ms=200)
    async with contextlib.AsyncExitStack() as stack:
        with at_real_pace():  # the node's start and a topic creation wait on real fsyncs
            node = await stack.enter_async_context(running_node(tmp_path, log_config))
            await create_topic(node, "p", 1)
        clock.autojump_threshold = math.inf  # from here, time moves only when the test says
        registry = node.registry
        batch = build_batch([(1, None, b"x")])
        assert await node.handlers.append_batch("p", 0, batch, acks=ACKS_LEADER) == 0
        log = registry.log("p", 0)
        interval_s = 0.2 if policy == "interval" else Limits().recovery_point_interval_ms / 1000
        await registry.flush_due_logs()  # starts the interval
        assert log.durable_offset == 0
        clock.jump(interval_s / 2)
        await registry.flush_due_logs()
        assert log.durable_offset == 0
        clock.jump(interval_s)
        await registry.flush_due_logs()
        assert log.durable_offset == 1
        clock.autojump_threshold = 0  # and so does its stop
