"""Partition replication with real processes: acks=all against stopped (SIGSTOP) followers,
a leader SIGKILLed under acks=all load, __consumer_offsets replicated and surviving the
coordinator's SIGKILL, and the JSON API's `wal` topic.

The cluster's short broker session (2 s, see cluster_launcher.py) is what shrinks the ISR
here: a stopped broker misses its heartbeats, the controller fences it and takes it out of
every ISR. The leader's own lag-based shrink (replica_lag_time_max_ms, 10 s by default) is
not waited for. Waits poll a condition in a bounded loop (`wait_for`);
times are printed (pytest -s), never asserted beyond the bounds.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request

import pytest
import trio

import client
from protocol import ApiKey, DwalError
from cluster_client import ADMIN_TIMEOUT_MS, describe_partitions
from cluster_launcher import ClusterLauncher, wait_for

pytestmark = pytest.mark.timeout(150)

SETTLE_S = 30  # ISR changes, elections, a restarted broker catching up


async def create_replicated(bootstrap: str, topic: str, partitions: int) -> None:
    """Create `topic` with the broker's default replication factor (min(3, brokers))."""
    async with client.connect(bootstrap) as cluster:
        admin = client.Admin(cluster, timeout_ms=ADMIN_TIMEOUT_MS)
        try:
            await admin.create_topic(topic, partitions)
        except client.DwalError as error:
            if error.code != client.ErrorCode.TOPIC_ALREADY_EXISTS:
                raise


async def fully_replicated(bootstrap: str, topic: str, factor: int = 3):
    """The partitions of `topic` once each has a leader and an ISR of `factor`."""
    found = await describe_partitions(bootstrap, topic)
    ok = found and all(
        p.leader >= 0 and len(p.replicas) == factor and len(p.isr) == factor for p in found
    )
    return found if ok else None


async def send(bootstrap: str, topic: str, partition: int, value: bytes, **options) -> int:
    """Write one record; returns its offset or raises the DwalError it failed with. The
    topic is first awaited in `bootstrap`'s metadata (news of a new topic spreads to each
    broker's image on its own schedule)."""
    async with client.connect(bootstrap) as cluster:
        with trio.fail_after(10):
            while True:
                known = (await cluster.refresh_metadata([topic])).get(topic)
                if not isinstance(known, DwalError):
                    break
                await trio.sleep(0.05)
        async with client.Producer(cluster, **options) as producer:
            delivery = await producer.send(topic, value, partition=partition)
            await producer.flush()
            return (await delivery.wait()).offset


async def read_all(bootstrap: str, topic: str, *, timeout_s: float = 20) -> dict:
    """Every record of `topic` up to each partition's high watermark, read through
    `bootstrap`: {(partition, offset): value}."""
    found: dict[tuple[int, int], bytes | None] = {}
    async with client.connect(bootstrap) as cluster:
        consumer = client.Consumer(cluster, auto_offset_reset="earliest")
        partitions = await consumer.assign_topic(topic)
        with trio.fail_after(timeout_s):
            while True:
                for tp, records in (await consumer.poll(timeout_ms=300)).items():
                    for record in records:
                        found[(tp.partition, record.offset)] = record.value
                positions = {tp: consumer.position(tp) for tp in partitions}
                hws = {tp: consumer.high_watermark(tp) for tp in partitions}
                if all(
                    hws[tp] is not None and positions[tp] is not None and positions[tp] >= hws[tp]  # type: ignore[operator]
                    for tp in partitions
                ):
                    return found


def stop(launcher: ClusterLauncher, node_id: int) -> None:
    os.kill(launcher.nodes[node_id].current.pid, signal.SIGSTOP)


def cont(launcher: ClusterLauncher, node_id: int) -> None:
    if launcher.nodes[node_id].running:
        os.kill(launcher.nodes[node_id].current.pid, signal.SIGCONT)


# ----------------------------------------------------------------------------- acks=all


@pytest.fixture
async def five_nodes(cluster_launcher):
    """Voters 1-3 and broker-only nodes 4-5: two stopped brokers need not cost the
    controller quorum."""
    for node_id in (1, 2, 3):
        cluster_launcher.add_node(node_id)
    for node_id in (4, 5):
        cluster_launcher.add_node(node_id, roles="broker")
    await cluster_launcher.start()
    return cluster_launcher


async def test_acks_all_waits_for_the_isr_and_refuses_below_min_isr(five_nodes):
    nodes = five_nodes.nodes
    await create_replicated(nodes[1].bootstrap, "acks", 12)
    placed, _ = await wait_for(
        lambda: fully_replicated(nodes[1].bootstrap, "acks"), timeout_s=SETTLE_S, what="ISR"
    )
    voters = {1, 2, 3}
    # a partition whose two followers include at most one voter (2 of 3 voters stay up)
    chosen = next(
        p for p in placed if len([r for r in p.replicas if r != p.leader and r in voters]) <= 1
    )
    leader = chosen.leader
    first, second = [r for r in chosen.replicas if r != leader]
    partition = chosen.partition
    boot = nodes[leader].bootstrap
    print(f"partition {partition}: leader {leader}, followers {first} {second}")
    await send(boot, "acks", partition, b"all-3", acks="all")

    try:
        stop(five_nodes, first)
        assert await send(boot, "acks", partition, b"one-while-stopped", acks=1) >= 0

        async def isr_is(members: set[int]):
            found = await describe_partitions(boot, "acks")
            state = found[partition]
            return state if set(state.isr) == members else None

        _, waited = await wait_for(
            lambda: isr_is({leader, second}), timeout_s=SETTLE_S, what="ISR without the stopped"
        )
        print(f"ISR shrank to 2 in {waited:.2f} s")
        offset = await send(boot, "acks", partition, b"all-2", acks="all")

        stop(five_nodes, second)
        # the ISR still names `second`, which lacks the write: never acknowledged; once the
        # ISR is down to the leader: NOT_ENOUGH_REPLICAS (min.insync.replicas=2)
        with pytest.raises(client.DwalError) as caught:
            await send(
                boot,
                "acks",
                partition,
                b"all-1",
                acks="all",
                request_timeout_ms=3000,
                delivery_timeout_ms=4000,
                retries=0,
            )
        print(f"acks=all with both followers stopped: {caught.value.code.name}")
        assert caught.value.code in (
            client.ErrorCode.NOT_ENOUGH_REPLICAS,
            client.ErrorCode.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
            client.ErrorCode.REQUEST_TIMED_OUT,
        ) or isinstance(caught.value, client.DeliveryOutcomeUnknown), caught.value
        await wait_for(lambda: isr_is({leader}), timeout_s=SETTLE_S, what="ISR of the leader")
        with pytest.raises(client.DwalError) as caught:
            await send(boot, "acks", partition, b"all-0", acks="all", retries=0)
        assert caught.value.code == client.ErrorCode.NOT_ENOUGH_REPLICAS, caught.value
        assert await send(boot, "acks", partition, b"one-alone", acks=1) > offset
    finally:
        cont(five_nodes, first)
        cont(five_nodes, second)

    # both come back, catch up and rejoin the ISR; acks=all works again
    _, waited = await wait_for(
        lambda: isr_is({leader, first, second}), timeout_s=SETTLE_S, what="ISR of 3 again"
    )
    print(f"ISR back to 3 in {waited:.2f} s after SIGCONT")
    await send(boot, "acks", partition, b"all-3-again", acks="all")
    values = [v for (p, _), v in sorted((await read_all(boot, "acks")).items()) if p == partition]
    assert b"all-2" in values and b"all-3-again" in values, values
    assert b"all-0" not in values, "refused before append, yet stored"


# ----------------------------------------------------------------------------- failover


async def test_leader_sigkill_under_acks_all_load_loses_no_acknowledged_record(three_nodes):
    nodes = three_nodes.nodes
    topic = "failover"
    await create_replicated(nodes[1].bootstrap, topic, 1)
    (before,), _ = await wait_for(
        lambda: fully_replicated(nodes[1].bootstrap, topic), timeout_s=SETTLE_S, what="ISR"
    )
    old_leader = before.leader
    survivor = next(n for n in nodes if n != old_leader)
    acked: dict[tuple[int, int], bytes] = {}
    failed: list[str] = []
    killed = trio.Event()
    after_kill = 0

    async def load() -> None:
        nonlocal after_kill
        async with client.connect(nodes[survivor].bootstrap) as cluster:
            async with client.Producer(
                cluster, acks="all", linger_ms=1, delivery_timeout_ms=20_000
            ) as producer:
                number = 0
                while after_kill < 200:
                    values = [b"v-%06d" % (number + i) for i in range(20)]
                    number += 20
                    deliveries = [await producer.send(topic, v, partition=0) for v in values]
                    for value, delivery in zip(values, deliveries):
                        try:
                            metadata = await delivery.wait()
                        except client.DwalError as error:
                            failed.append(f"{value!r}: {error}")
                            continue
                        assert (0, metadata.offset) not in acked, "offset acknowledged twice"
                        acked[(0, metadata.offset)] = value
                        if killed.is_set():
                            after_kill += 1

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            await wait_for(_true_when(lambda: len(acked) >= 300), timeout_s=30, what="300 acks")
            await three_nodes.kill(old_leader)
            killed.set()
    print(f"acked {len(acked)} ({after_kill} after the kill), failed {len(failed)}")
    kinds = sorted({line.split(": ", 1)[1][:100] for line in failed})
    print("failures (outcome not acknowledged):", kinds[:5])

    async def new_leader():
        found = (await describe_partitions(nodes[survivor].bootstrap, topic))[0]
        return found if found.leader not in (-1, old_leader) else None

    after, _ = await wait_for(new_leader, timeout_s=SETTLE_S, what="a new leader")
    assert after.leader in before.isr, (before, after)
    assert after.leader_epoch > before.leader_epoch, (before, after)

    await three_nodes.start(old_leader)

    async def rejoined():
        found = (await describe_partitions(nodes[survivor].bootstrap, topic))[0]
        return found if old_leader in found.isr else None

    _, waited = await wait_for(rejoined, timeout_s=SETTLE_S, what="old leader back in the ISR")
    print(f"broker {old_leader} back in the ISR {waited:.2f} s after its restart")
    truncations = [line for line in nodes[old_leader].current.lines if "replica_truncated" in line]
    print(f"broker {old_leader} truncations: {truncations}")

    for node_id in nodes:
        stored = await read_all(nodes[node_id].bootstrap, topic)
        lost = {k: v for k, v in acked.items() if stored.get(k) != v}
        assert not lost, f"through broker {node_id}: {len(lost)} acked records lost/moved"
    # the returned broker holds them too: make it the only possible leader but one
    await three_nodes.kill(after.leader)
    third = next(n for n in nodes if n not in (old_leader, after.leader))

    async def led_by_one_of_the_rest():
        found = (await describe_partitions(nodes[third].bootstrap, topic))[0]
        return found if found.leader in (old_leader, third) else None

    await wait_for(led_by_one_of_the_rest, timeout_s=SETTLE_S, what="a third leader")
    stored = await read_all(nodes[third].bootstrap, topic)
    lost = {k: v for k, v in acked.items() if stored.get(k) != v}
    assert not lost, f"after the second failover: {len(lost)} acked records lost/moved"


async def test_a_rolling_restart_under_acks_all_load_loses_nothing_and_leaves_no_doubt(
    three_nodes,
):
    """Each node in turn is stopped with SIGTERM and started again while acks=all producers
    write. A stopping node refuses new appends (clients resend them to the next leader),
    waits until what it appended is replicated, hands the controller's leadership over if
    it has it, and moves its partitions' leadership away before it stops serving: so every
    record is acknowledged (none fails, none has an unknown outcome) and stored exactly
    once. Stalls are measured in bench/rolling_restart.py, not asserted here."""
    nodes = three_nodes.nodes
    topic = "rolling"
    await create_replicated(nodes[1].bootstrap, topic, 3)
    await wait_for(
        lambda: fully_replicated(nodes[1].bootstrap, topic), timeout_s=SETTLE_S, what="ISR"
    )
    bootstrap = ",".join(nodes[n].bootstrap for n in nodes)
    acked: dict[tuple[int, int], bytes] = {}
    failed: list[str] = []
    sent = 0
    done = trio.Event()

    async def load() -> None:
        nonlocal sent
        async with client.connect(bootstrap) as cluster:
            async with client.Producer(
                cluster, acks="all", linger_ms=1, delivery_timeout_ms=30_000
            ) as producer:
                while not done.is_set():
                    values = [b"r-%06d" % (sent + i) for i in range(10)]
                    sent += len(values)
                    deliveries = [await producer.send(topic, v) for v in values]
                    for value, delivery in zip(values, deliveries):
                        try:
                            metadata = await delivery.wait()
                        except client.DwalError as error:
                            failed.append(f"{value!r}: {type(error).__name__}: {error}")
                            continue
                        acked[(metadata.partition, metadata.offset)] = value

    async def back_in_every_isr(node_id: int):
        found = await fully_replicated(nodes[1 if node_id != 1 else 2].bootstrap, topic)
        return found if found and all(node_id in p.isr for p in found) else None

    stopped_runs = []
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            await wait_for(_true_when(lambda: len(acked) >= 200), timeout_s=30, what="acks")
            for node_id in sorted(nodes):
                stopped_runs.append(nodes[node_id].current)
                await three_nodes.restart(node_id)
                await wait_for(
                    lambda: back_in_every_isr(node_id), timeout_s=SETTLE_S, what="ISR again"
                )
                before = len(acked)
                await wait_for(
                    _true_when(lambda: len(acked) >= before + 100), timeout_s=30, what="acks"
                )
            done.set()
    print(f"sent {sent}, acked {len(acked)}, failed {len(failed)}")
    assert failed == [], failed[:5]
    assert len(acked) == sent
    for run in stopped_runs:
        assert run.returncode == 0, run.text[-2000:]
        assert any("event=broker_leadership_moved" in line for line in run.lines), run.text
    # the active controller was one of the three: its stop handed the leadership over first
    assert any("event=controller_handed_over" in line for run in stopped_runs for line in run.lines)
    stored = await read_all(nodes[1].bootstrap, topic)
    assert {k: v for k, v in acked.items() if stored.get(k) != v} == {}, "acked records lost"
    values = [v for v in stored.values()]
    assert len(values) == len(set(values)), "a record stored twice"


def _true_when(predicate):
    async def check():
        await trio.lowlevel.checkpoint()
        return predicate()

    return check


# ----------------------------------------------------------------------------- groups


async def test_offsets_topic_is_replicated_and_commits_survive_the_coordinators_death(
    three_nodes,
):
    nodes = three_nodes.nodes
    await create_replicated(nodes[1].bootstrap, "grouped", 2)
    group = "survivors"
    committed = {client.TopicPartition("grouped", 0): 7, client.TopicPartition("grouped", 1): 11}

    async def commit():
        async with client.connect(nodes[1].bootstrap) as cluster:
            consumer = client.Consumer(cluster, group_id=group, enable_auto_commit=False)
            await consumer.commit(committed)
            return True

    await wait_for(commit, timeout_s=SETTLE_S, what="commit")
    offsets_partitions, _ = await wait_for(
        lambda: fully_replicated(nodes[1].bootstrap, "__consumer_offsets"),
        timeout_s=SETTLE_S,
        what="__consumer_offsets with 3 in-sync replicas",
    )
    assert all(len(p.replicas) == 3 for p in offsets_partitions), offsets_partitions

    async with client.connect(nodes[1].bootstrap) as cluster:
        found = (await cluster.call(ApiKey.FIND_COORDINATOR, {"key": group})).body
    coordinator = found["node_id"]
    assert coordinator in nodes, found
    print(f"coordinator of {group}: broker {coordinator}")
    await three_nodes.kill(coordinator)
    survivor = next(n for n in nodes if n != coordinator)

    async def fetched():
        async with client.connect(nodes[survivor].bootstrap) as cluster:
            consumer = client.Consumer(cluster, group_id=group, enable_auto_commit=False)
            offsets = await consumer.committed(list(committed))
        return offsets if offsets == committed else None

    _, waited = await wait_for(fetched, timeout_s=SETTLE_S, what="committed offsets")
    print(f"committed offsets read {waited:.2f} s after the coordinator's SIGKILL")


# ----------------------------------------------------------------------------- JSON API


def http(method: str, port: int, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


async def test_wal_topic_is_replicated_and_served_by_its_leader(three_nodes):
    nodes = three_nodes.nodes
    status, answer = await trio.to_thread.run_sync(
        http, "POST", nodes[1].http_port, "/", {"record": {"value": "first"}}
    )
    print(f"POST / to node 1: {status} {answer}")
    (wal,), _ = await wait_for(
        lambda: fully_replicated(nodes[1].bootstrap, "wal"), timeout_s=SETTLE_S, what="wal ISR"
    )
    assert len(wal.replicas) == 3, wal
    leader = wal.leader
    status, answer = await trio.to_thread.run_sync(
        http, "POST", nodes[leader].http_port, "/", {"record": {"value": "to-the-leader"}}
    )
    assert status == 200, (status, answer)
    offset = answer["offset"]
    status, answer = await trio.to_thread.run_sync(
        http, "GET", nodes[leader].http_port, f"/?offset={offset}"
    )
    assert (status, answer["record"]["value"]) == (200, "to-the-leader"), (status, answer)
    for node_id in nodes:
        if node_id == leader:
            continue
        status, answer = await trio.to_thread.run_sync(
            http, "POST", nodes[node_id].http_port, "/", {"record": {"value": "elsewhere"}}
        )
        print(f"POST / to non-leader {node_id}: {status} {answer}")
        get_status, get_answer = await trio.to_thread.run_sync(
            http, "GET", nodes[node_id].http_port, f"/?offset={offset}"
        )
        print(f"GET / from non-leader {node_id}: {get_status} {get_answer}")
        assert status == 200 or status == 503, (status, answer)
