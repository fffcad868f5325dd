"""RaftDriver: proposals, reads, leader changes, crashes, snapshots, durability ordering,
shutdown; over the memory network with simulated disks (MockClock), and over DurableStorage
with real threads."""

from __future__ import annotations

import dataclasses
import threading
import random

import pytest
import trio
import trio.testing
from simulation.cluster import SimulatedCluster

from broker.raft.config import RaftConfig
from broker.raft.driver import (
    DriverConfig,
    coalesce_appends,
    DriverStoppedError,
    Leadership,
    ProposalTimeoutError,
    RaftDriver,
    ReadTimeoutError,
)
from broker.raft.durable_storage import DurableStorage
from broker.raft.kv_demo import KeyValueClient, KeyValueStore, encode_put
from broker.raft.memory_transport import MemoryNetwork
from broker.raft.messages import (
    ConfigChange,
    ConfigChangeKind,
    Configuration,
    Entry,
    Message,
    MessageType,
    Ready,
    Role,
)
from broker.raft.node import NotLeaderError, ProposalDroppedError, RaftError

OPTIONS = DriverConfig(
    tick_interval_seconds=0.01, proposal_timeout_seconds=2, read_timeout_seconds=2
)


def raft_config(node_id: int) -> RaftConfig:
    return RaftConfig(node_id=node_id, election_ticks=10, heartbeat_ticks=2)


async def make_cluster(nursery, size=3, options=OPTIONS, seed=1) -> SimulatedCluster:
    network = MemoryNetwork(random.Random(seed))
    await nursery.start(network.run)
    cluster = SimulatedCluster(
        nursery,
        network,
        list(range(1, size + 1)),
        random.Random(seed),
        raft_config=raft_config,
        driver_options=options,
    )
    await cluster.start_all()
    return cluster


async def wait_applied(cluster, index: int) -> None:
    with trio.fail_after(10):
        while any(node.driver.node.applied_index < index for node in cluster.alive()):
            await trio.sleep(0.01)


async def test_put_get_cas_through_the_leader(nursery, autojump_clock):
    cluster = await make_cluster(nursery)
    leader = await cluster.wait_leader()
    client = leader.client()
    await client.put(b"k", b"v1")
    assert await client.get(b"k") == b"v1"
    assert await client.cas(b"k", b"v1", b"v2") is True
    assert await client.cas(b"k", b"v1", b"v3") is False
    assert await client.cas(b"new", None, b"x") is True
    await wait_applied(cluster, leader.driver.node.commit_index)
    for node in cluster.alive():
        assert node.store.data == {b"k": b"v2", b"new": b"x"}


async def test_a_follower_refuses_proposals_but_serves_linearizable_reads(nursery, autojump_clock):
    cluster = await make_cluster(nursery)
    leader = await cluster.wait_leader()
    follower = next(node for node in cluster.alive() if node is not leader)
    await leader.client().put(b"k", b"v")
    with pytest.raises(NotLeaderError) as caught:
        await follower.client().put(b"k", b"w")
    assert caught.value.leader == leader.node_id
    assert await follower.client().get(b"k") == b"v"  # forwarded read index


async def test_a_new_leader_takes_over_and_a_restarted_node_catches_up(nursery, autojump_clock):
    cluster = await make_cluster(nursery)
    leader = await cluster.wait_leader()
    for i in range(5):
        await leader.client().put(b"k%d" % i, b"v%d" % i)
    await cluster.crash(leader.node_id)
    new_leader = await cluster.wait_leader()
    assert new_leader.node_id != leader.node_id
    await new_leader.client().put(b"after", b"crash")
    await cluster.start(leader.node_id)
    await wait_applied(cluster, new_leader.driver.node.commit_index)
    restarted = cluster.nodes[leader.node_id]
    assert restarted.store.data == new_leader.store.data
    assert restarted.store.data[b"after"] == b"crash" and len(restarted.store.data) == 6


async def test_an_isolated_leader_times_out_proposals_and_reads(nursery, autojump_clock):
    cluster = await make_cluster(nursery)
    leader = await cluster.wait_leader()
    cluster.network.isolate(leader.node_id, cluster.node_ids)
    with pytest.raises(ProposalTimeoutError):
        await leader.client().put(b"lost?", b"maybe", timeout_seconds=0.5)
    with pytest.raises((ReadTimeoutError, NotLeaderError)):
        await leader.client().get(b"lost?", timeout_seconds=0.5)
    assert leader.driver.statistics().pending_proposals == 0
    cluster.network.heal()
    new_leader = await cluster.wait_leader()
    await new_leader.client().put(b"k", b"v")
    # The isolated leader's entry was never committed: the new leader overwrote it.
    assert await new_leader.client().get(b"lost?") is None


async def test_messages_leave_only_after_their_ready_is_persisted(nursery, autojump_clock):
    cluster = await make_cluster(nursery)
    leader = await cluster.wait_leader()
    await leader.client().put(b"warm", b"up")
    gate = trio.Event()
    disk = leader.disk
    real_persist = disk.persist
    held: list[Ready] = []

    async def gated_persist(ready: Ready) -> None:
        if ready.entries:
            held.append(ready)
            await gate.wait()
        await real_persist(ready)

    disk.persist = gated_persist  # type: ignore[method-assign]
    sent_before = leader.transport.statistics().messages_sent
    async with trio.open_nursery() as inner:
        inner.start_soon(leader.client().put, b"k", b"v")
        await trio.sleep(0.05)  # the Ready holding the entry (and its APPENDs) waits
        assert held and leader.transport.statistics().messages_sent == sent_before
        gate.set()
    assert await leader.client().get(b"k") == b"v"


async def test_a_lagging_node_catches_up_through_a_snapshot(nursery, autojump_clock):
    options = DriverConfig(tick_interval_seconds=0.01, snapshot_interval_entries=5)
    cluster = await make_cluster(nursery, options=options)
    leader = await cluster.wait_leader()
    lagging = next(node for node in cluster.alive() if node is not leader)
    await cluster.crash(lagging.node_id)
    for i in range(20):
        await leader.client().put(b"k%d" % i, b"v%d" % i)
    assert leader.driver.storage.snapshot().index >= 15
    await cluster.start(lagging.node_id)
    await wait_applied(cluster, leader.driver.node.commit_index)
    assert lagging.store.data == leader.store.data
    assert lagging.disk.image.snapshot.index > 0


async def test_stopping_fails_pending_requests(nursery, autojump_clock):
    cluster = await make_cluster(nursery)
    leader = await cluster.wait_leader()
    cluster.network.isolate(leader.node_id, cluster.node_ids)
    outcome = []

    async def propose():
        try:
            await leader.client().put(b"k", b"v")
        except DriverStoppedError as error:
            outcome.append(error)

    async with trio.open_nursery() as inner:
        inner.start_soon(propose)
        await trio.sleep(0.1)
        await cluster.crash(leader.node_id)
    assert len(outcome) == 1
    with pytest.raises(DriverStoppedError):
        await leader.client().put(b"k", b"v")


async def test_a_failing_disk_stops_the_driver_without_advancing(nursery, autojump_clock):
    cluster = await make_cluster(nursery, size=1)
    node = await cluster.wait_leader()
    await node.client().put(b"k", b"v")
    applied = node.driver.node.applied_index

    async def broken(ready):
        raise OSError("disk on fire")

    node.disk.persist = broken  # type: ignore[method-assign]
    with pytest.raises(BaseExceptionGroup) as caught:
        async with trio.open_nursery() as inner:
            driver = RaftDriver(
                raft_config(1),
                node.disk.open(),
                cluster.network.endpoint(1),
                KeyValueStore(),
                persister=node.disk,
                options=OPTIONS,
            )
            await cluster.crash(1)
            await inner.start(driver.run)
            driver.campaign()
    assert caught.group_contains(OSError)
    assert driver.node.applied_index <= applied


async def watch_leadership(driver: RaftDriver, seen: list[Leadership]) -> None:
    """A consumer that records every leadership it is told about."""
    current = driver.leadership()
    while True:
        current = await driver.wait_leadership_change(current)
        seen.append(current)


async def wait_for(condition, timeout_seconds: float = 10.0) -> None:
    with trio.fail_after(timeout_seconds):
        while not condition():
            await trio.sleep(0.01)


async def test_leader_and_follower_are_told_of_a_new_leader(nursery, autojump_clock):
    cluster = await make_cluster(nursery)
    old = await cluster.wait_leader()
    follower = next(node for node in cluster.alive() if node is not old)
    await follower.client().get(b"warm-up")  # the follower has heard of the leader
    before = old.driver.leadership()
    assert before.leader == old.node_id
    assert follower.driver.leadership() == before
    seen_by_old: list[Leadership] = []
    seen_by_follower: list[Leadership] = []
    nursery.start_soon(watch_leadership, old.driver, seen_by_old)
    nursery.start_soon(watch_leadership, follower.driver, seen_by_follower)

    cluster.network.isolate(old.node_id, cluster.node_ids)
    # The follower is told of the new leader, in a later term.
    await wait_for(lambda: any(s.leader not in (0, old.node_id) for s in seen_by_follower))
    new = next(s for s in seen_by_follower if s.leader not in (0, old.node_id))
    assert new.term > before.term
    # The old leader, alone, steps down (check-quorum) and is told there is no leader.
    await wait_for(lambda: Leadership(term=before.term, leader=0) in seen_by_old)
    cluster.network.heal()
    await wait_for(lambda: old.driver.leadership().leader not in (0, old.node_id))
    latest = old.driver.leadership()
    assert latest.term >= new.term and seen_by_old[-1] == latest
    assert old.driver.statistics().leadership_changes >= 2


async def test_a_slow_leadership_consumer_neither_blocks_the_driver_nor_queues(
    nursery, autojump_clock
):
    cluster = await make_cluster(nursery)
    leader = await cluster.wait_leader()
    watched = next(node for node in cluster.alive() if node is not leader)
    await watched.client().get(b"warm-up")
    stale = watched.driver.leadership()
    woken = trio.Event()

    async def slow_consumer() -> None:
        await watched.driver.wait_leadership_change(stale)
        woken.set()
        await trio.sleep_forever()  # never asks again while leadership keeps changing

    nursery.start_soon(slow_consumer)
    changes_before = watched.driver.statistics().leadership_changes
    for round_number in range(6):
        current = await cluster.wait_leader()
        target = cluster.node_ids[(cluster.node_ids.index(current.node_id) + 1) % 3]
        current.driver.transfer_leadership(target)
        await wait_for(lambda: (cluster.leader() or current).node_id == target)
        await cluster.nodes[target].client().put(b"round", b"%d" % round_number)
    assert woken.is_set()
    # Leadership moved at least six times under the parked consumer, and the driver kept
    # applying (every put above returned): it never waited for the consumer.
    assert watched.driver.statistics().leadership_changes - changes_before >= 6
    await wait_for(lambda: watched.driver.leadership().leader == cluster.nodes[target].node_id)
    # Coming back late, a consumer is told the latest leadership at once, not the backlog.
    with trio.fail_after(0.001):
        latest = await watched.driver.wait_leadership_change(stale)
    assert latest == watched.driver.leadership() and latest.leader == target


async def test_waiting_for_a_leadership_change_ends_when_the_driver_stops(nursery, autojump_clock):
    cluster = await make_cluster(nursery, size=1)
    node = await cluster.wait_leader()
    await node.client().put(b"k", b"v")
    outcome: list[BaseException] = []

    async def waiter() -> None:
        try:
            await node.driver.wait_leadership_change(node.driver.leadership())
        except DriverStoppedError as error:
            outcome.append(error)

    async with trio.open_nursery() as inner:
        inner.start_soon(waiter)
        await trio.sleep(0.1)
        await cluster.crash(node.node_id)
    assert len(outcome) == 1
    with pytest.raises(DriverStoppedError):
        await node.driver.wait_leadership_change(Leadership(term=0, leader=0))


# A single node on DurableStorage, with real worker threads for fsync.


async def test_durable_single_node_survives_a_restart(tmp_path):
    initial = Configuration(voters=frozenset({1}))
    network = MemoryNetwork(random.Random(1))
    for incarnation in range(2):
        storage = DurableStorage.open(tmp_path, initial)
        store = KeyValueStore()
        driver = RaftDriver(raft_config(1), storage, network.endpoint(1), store, options=OPTIONS)
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            with trio.fail_after(10):
                while driver.node.role != Role.LEADER:
                    await trio.sleep(0.01)
            client = KeyValueClient(driver, store)
            if incarnation == 0:
                for i in range(50):
                    await client.put(b"k%d" % i, b"v%d" % i)
                await driver.snapshot_now()
                for i in range(50, 60):
                    await client.put(b"k%d" % i, b"v%d" % i)
            else:
                assert await client.get(b"k59") == b"v59"
                assert len(store.data) == 60
            nursery.cancel_scope.cancel()
        storage.close()


async def test_durable_node_batches_concurrent_proposals(tmp_path):
    storage = DurableStorage.open(tmp_path, Configuration(voters=frozenset({1})))
    store = KeyValueStore()
    driver = RaftDriver(
        raft_config(1),
        storage,
        MemoryNetwork(random.Random(1)).endpoint(1),
        store,
        options=OPTIONS,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        driver.campaign()
        with trio.fail_after(10):
            while driver.node.role != Role.LEADER:
                await trio.sleep(0.01)
        async with trio.open_nursery() as proposers:
            for i in range(200):
                proposers.start_soon(driver.propose, encode_put(b"k%d" % i, b"v"))
        nursery.cancel_scope.cancel()
    statistics = driver.statistics()
    assert len(store.data) == 200
    assert statistics.readies < 150  # many proposals share one fsync
    storage.close()


# Merging the core's per-proposal APPENDs.


def append(target, index, log_term, entries, commit=0, term=3):
    return Message(
        type=MessageType.APPEND,
        source=1,
        target=target,
        term=term,
        index=index,
        log_term=log_term,
        entries=tuple(Entry(term=t, index=i) for i, t in entries),
        commit=commit,
    )


def test_consecutive_appends_to_one_follower_are_merged():
    messages = (
        append(2, 4, 2, [(5, 3)], commit=4),
        append(3, 4, 2, [(5, 3)], commit=4),
        append(2, 5, 3, [(6, 3)], commit=5),
        append(2, 6, 3, [(7, 3), (8, 3)], commit=5),
        append(3, 5, 3, [(6, 3)], commit=5),
    )
    merged = coalesce_appends(messages, 64, 1 << 20)
    assert merged == [
        append(2, 4, 2, [(5, 3), (6, 3), (7, 3), (8, 3)], commit=5),
        append(3, 4, 2, [(5, 3), (6, 3)], commit=5),
    ]


def test_appends_that_do_not_continue_each_other_stay_apart():
    heartbeat = Message(type=MessageType.HEARTBEAT, source=1, target=2, term=3)
    cases = [
        (append(2, 4, 2, [(5, 3)]), append(2, 6, 3, [(7, 3)])),  # a gap
        (append(2, 4, 2, [(5, 3)]), append(2, 5, 2, [(6, 3)])),  # anchor term differs
        (append(2, 4, 2, [(5, 3)]), append(2, 5, 3, [(6, 4)], term=4)),  # another term
        (append(2, 4, 2, [(5, 3)]), heartbeat, append(2, 5, 3, [(6, 3)])),  # not adjacent
    ]
    for messages in cases:
        assert coalesce_appends(messages, 64, 1 << 20) == list(messages)


def test_merging_respects_the_limits_and_empty_appends_fold_in():
    messages = tuple(append(2, i, 3, [(i + 1, 3)]) for i in range(4, 10))
    merged = coalesce_appends(messages, 4, 1 << 20)
    assert [len(m.entries) for m in merged] == [4, 2]
    probe = append(2, 4, 2, [], commit=3)
    assert coalesce_appends((probe, append(2, 4, 2, [(5, 3)], commit=4)), 64, 1 << 20) == [
        append(2, 4, 2, [(5, 3)], commit=4)
    ]


async def test_membership_changes_through_the_driver(nursery, autojump_clock):
    network = MemoryNetwork(random.Random(3))
    await nursery.start(network.run)
    cluster = SimulatedCluster(
        nursery,
        network,
        [1, 2, 3, 4],
        random.Random(3),
        raft_config=raft_config,
        driver_options=OPTIONS,
        initial_voters=[1, 2, 3],
    )
    await cluster.start_all()
    leader = await cluster.wait_leader()
    await leader.client().put(b"before", b"join")
    await leader.driver.propose_config_change(
        ConfigChange(kind=ConfigChangeKind.ADD_LEARNER, node_id=4)
    )
    await leader.driver.propose_config_change(
        ConfigChange(kind=ConfigChangeKind.ADD_VOTER, node_id=4)
    )
    await wait_applied(cluster, leader.driver.node.commit_index)
    newcomer = cluster.nodes[4]
    assert newcomer.driver.node.configuration.voters == {1, 2, 3, 4}
    assert newcomer.store.data == {b"before": b"join"}
    await leader.driver.propose_config_change(
        ConfigChange(kind=ConfigChangeKind.REMOVE_VOTER, node_id=leader.node_id)
    )
    with trio.fail_after(10):
        while True:
            new_leader = cluster.leader()
            if new_leader is not None and new_leader.node_id != leader.node_id:
                break
            await trio.sleep(0.01)
    await new_leader.client().put(b"after", b"removal")
    assert new_leader.driver.node.configuration.voters == {1, 2, 3, 4} - {leader.node_id}


async def make_joining_cluster(nursery, learners: list[int], options=OPTIONS):
    """Voters 1-3 and nodes `learners` started outside the configuration (to join)."""
    network = MemoryNetwork(random.Random(5))
    await nursery.start(network.run)
    cluster = SimulatedCluster(
        nursery,
        network,
        [1, 2, 3, *learners],
        random.Random(5),
        raft_config=raft_config,
        driver_options=options,
        initial_voters=[1, 2, 3],
    )
    await cluster.start_all()
    return cluster


async def change_all_at_once(driver: RaftDriver, changes: list[ConfigChange]) -> dict:
    """Propose every change from its own task at the same moment; {node: error or None}."""
    outcome: dict[int, BaseException | None] = {}

    async def one(change: ConfigChange) -> None:
        try:
            await driver.propose_config_change(change)
            outcome[change.node_id] = None
        except RaftError as error:
            outcome[change.node_id] = error

    async with trio.open_nursery() as inner:
        for change in changes:
            inner.start_soon(one, change)
    return outcome


async def test_learners_registering_at_once_all_join_and_can_all_be_promoted(
    nursery, autojump_clock
):
    newcomers = [4, 5, 6, 7, 8]
    cluster = await make_joining_cluster(nursery, newcomers)
    leader = await cluster.wait_leader()
    await leader.client().put(b"before", b"join")
    adds = [ConfigChange(kind=ConfigChangeKind.ADD_LEARNER, node_id=n) for n in newcomers]
    outcome = await change_all_at_once(leader.driver, adds)
    assert outcome == {node: None for node in newcomers}
    assert leader.driver.node.configuration.learners == set(newcomers)
    assert leader.driver.statistics().pending_config_changes == 0
    await wait_applied(cluster, leader.driver.node.commit_index)
    for node in newcomers:
        assert cluster.nodes[node].driver.node.configuration.learners == set(newcomers)
        assert cluster.nodes[node].store.data == {b"before": b"join"}
    promotions = [ConfigChange(kind=ConfigChangeKind.ADD_VOTER, node_id=n) for n in newcomers]
    outcome = await change_all_at_once(leader.driver, promotions)
    assert outcome == {node: None for node in newcomers}
    assert leader.driver.node.configuration.voters == {1, 2, 3, *newcomers}
    await leader.client().put(b"after", b"promotion")


async def test_a_change_proposed_as_soon_as_leading_waits_for_the_no_op(nursery, autojump_clock):
    # The node refuses changes until its no-op of the term is applied; the driver retries.
    cluster = await make_joining_cluster(nursery, [4])
    joined: list[int] = []

    async def join_when_leading(driver: RaftDriver, done: trio.CancelScope) -> None:
        leadership = driver.leadership()
        while leadership.leader != driver.node_id:
            leadership = await driver.wait_leadership_change(leadership)
        assert driver.node.applied_index < driver.node.last_index  # the no-op is not applied
        await driver.propose_config_change(
            ConfigChange(kind=ConfigChangeKind.ADD_LEARNER, node_id=4)
        )
        joined.append(driver.node_id)
        done.cancel()

    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            for node_id in (1, 2, 3):
                driver = cluster.nodes[node_id].driver
                assert driver is not None
                inner.start_soon(join_when_leading, driver, inner.cancel_scope)
    assert len(joined) == 1
    assert cluster.nodes[joined[0]].driver.node.configuration.learners == {4}


async def test_configuration_changes_in_line_are_bounded(nursery, autojump_clock):
    options = dataclasses.replace(OPTIONS, pending_config_changes_max=2)
    cluster = await make_joining_cluster(nursery, [4, 5, 6, 7], options=options)
    leader = await cluster.wait_leader()
    await leader.client().put(b"warm", b"up")
    adds = [ConfigChange(kind=ConfigChangeKind.ADD_LEARNER, node_id=n) for n in [4, 5, 6, 7]]
    outcome = await change_all_at_once(leader.driver, adds)
    joined = {node for node, error in outcome.items() if error is None}
    refused = {node: error for node, error in outcome.items() if error is not None}
    assert len(joined) == 2 and len(refused) == 2
    assert all(type(error) is ProposalDroppedError for error in refused.values())
    assert leader.driver.node.configuration.learners == joined


async def test_three_durable_nodes_over_tcp_survive_a_leader_restart(tmp_path):
    """Real sockets, real fsyncs in worker threads, the real clock."""
    from broker.raft.tcp_transport import TcpTransport, TcpTransportConfig

    voters = Configuration(voters=frozenset({1, 2, 3}))
    options = DriverConfig(tick_interval_seconds=0.02, proposal_timeout_seconds=5)
    ports: dict[int, int] = {}
    running: dict[int, tuple[RaftDriver, TcpTransport, KeyValueStore, trio.CancelScope]] = {}

    async def start(node_id: int, nursery) -> None:
        transport = TcpTransport(
            TcpTransportConfig(
                node_id=node_id,
                listen_port=ports.get(node_id, 0),
                peers={n: ("127.0.0.1", p) for n, p in ports.items() if n != node_id},
                reconnect_backoff_seconds_min=0.01,
                reconnect_backoff_seconds_max=0.1,
            )
        )
        storage = DurableStorage.open(tmp_path / f"node{node_id}", voters)
        store = KeyValueStore()
        driver = RaftDriver(raft_config(node_id), storage, transport, store, options=options)

        async def run_node(*, task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as scope:
                try:
                    async with trio.open_nursery() as inner:
                        await inner.start(transport.run)
                        await inner.start(driver.run)
                        task_status.started(scope)
                finally:
                    storage.close()

        scope = await nursery.start(run_node)
        ports[node_id] = transport.listen_port
        for other_id, (_, other, _, _) in running.items():
            other.set_peer(node_id, "127.0.0.1", transport.listen_port)
        running[node_id] = (driver, transport, store, scope)

    async def wait_leader() -> RaftDriver:
        with trio.fail_after(10):
            while True:
                for driver, _, _, _ in running.values():
                    if driver.node.role == Role.LEADER:
                        return driver
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        for node_id in (1, 2, 3):
            await start(node_id, nursery)
        for node_id, (_, transport, _, _) in running.items():
            for peer_id, port in ports.items():
                if peer_id != node_id:
                    transport.set_peer(peer_id, "127.0.0.1", port)
        leader = await wait_leader()
        for i in range(20):
            await leader.propose(encode_put(b"k%d" % i, b"v%d" % i))
        running.pop(leader.node_id)[3].cancel()
        new_leader = await wait_leader()
        await new_leader.propose(encode_put(b"after", b"restart"))
        await start(leader.node_id, nursery)
        restarted_store = running[leader.node_id][2]
        with trio.fail_after(10):
            while restarted_store.get(b"after") != b"restart":
                await trio.sleep(0.01)
        assert len(restarted_store.data) == 21
        nursery.cancel_scope.cancel()


class _ThreadRecordingStore(KeyValueStore):
    """A KeyValueStore whose snapshots say which thread encoded them."""

    def __init__(self, *, off_loop: bool) -> None:
        super().__init__()
        self.snapshot_off_loop = off_loop
        self.snapshot_threads: list[bool] = []  # True: the trio (main) thread

    def snapshot(self) -> bytes:
        self.snapshot_threads.append(threading.current_thread() is threading.main_thread())
        return super().snapshot()


@pytest.mark.parametrize("off_loop", [True, False])
async def test_a_snapshot_is_encoded_off_the_loop_when_the_state_machine_says_so(
    tmp_path, off_loop
):
    storage = DurableStorage.open(tmp_path, Configuration(voters=frozenset({1})))
    store = _ThreadRecordingStore(off_loop=off_loop)
    driver = RaftDriver(
        raft_config(1), storage, MemoryNetwork(random.Random(1)).endpoint(1), store, options=OPTIONS
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            driver.campaign()
            with trio.fail_after(10):
                while driver.node.role != Role.LEADER:
                    await trio.sleep(0.01)
                client = KeyValueClient(driver, store)
                for i in range(5):
                    await client.put(b"k%d" % i, b"v%d" % i)
                await driver.snapshot_now()
            nursery.cancel_scope.cancel()
        assert store.snapshot_threads == [not off_loop]
        assert storage.snapshot().index == driver.node.applied_index
    finally:
        storage.close()
