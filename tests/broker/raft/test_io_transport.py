"""Transport conformance suite (STYLE rule 15): the same tests run against the in-memory
network and TCP; then tests of what only one of them has (fault model, framing defences)."""

from __future__ import annotations

import random
import struct

import pytest
import trio
import trio.testing

from broker.raft.memory_transport import FaultModel, MemoryNetwork
from broker.raft.messages import (
    Configuration,
    Entry,
    EntryKind,
    Message,
    MessageType,
    Snapshot,
)
from broker.raft.tcp_transport import TcpTransport, TcpTransportConfig, encode_frame
from broker.raft.transport import TransportLimits

LIMITS = TransportLimits(peer_queue_messages_max=16, receive_queue_messages_max=32)


def heartbeat(source: int, target: int, term: int = 1, commit: int = 0) -> Message:
    return Message(
        type=MessageType.HEARTBEAT, source=source, target=target, term=term, commit=commit
    )


def rich_messages(source: int, target: int) -> list[Message]:
    entries = tuple(
        Entry(term=3, index=5 + i, kind=EntryKind(i % 2), data=bytes([i]) * i) for i in range(4)
    )
    snapshot = Snapshot(
        index=9,
        term=2,
        configuration=Configuration(voters=frozenset({1, 2, 3}), learners=frozenset({4})),
        data=b"state" * 100,
    )
    return [
        Message(
            type=MessageType.APPEND,
            source=source,
            target=target,
            term=3,
            log_term=2,
            index=4,
            entries=entries,
            commit=4,
        ),
        Message(
            type=MessageType.APPEND_RESPONSE,
            source=source,
            target=target,
            term=3,
            index=8,
            reject=True,
            reject_hint=3,
            log_term=1,
        ),
        Message(type=MessageType.SNAPSHOT, source=source, target=target, term=3, snapshot=snapshot),
        Message(
            type=MessageType.VOTE,
            source=source,
            target=target,
            term=4,
            log_term=3,
            index=8,
            context=b"transfer",
        ),
        heartbeat(source, target, 3, 7),
    ]


class MemoryHarness:
    """Starts and stops endpoints of one MemoryNetwork."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.network = MemoryNetwork(random.Random(1), limits=LIMITS)
        self.runs: dict[int, _Running] = {}

    async def setup(self) -> None:
        await self.nursery.start(self.network.run)

    async def start(self, node_id: int):
        transport = self.network.endpoint(node_id)
        self.runs[node_id] = await self.nursery.start(_run_in_scope, transport.run)
        return transport

    async def stop(self, node_id: int) -> None:
        self.network.detach(node_id)
        await self.runs.pop(node_id).stop()


class TcpHarness:
    """Starts and stops TcpTransports on 127.0.0.1, each keeping its port across restarts."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.ports: dict[int, int] = {}
        self.running: dict[int, TcpTransport] = {}
        self.runs: dict[int, _Running] = {}

    async def setup(self) -> None:
        pass

    async def start(self, node_id: int):
        peers = {n: ("127.0.0.1", port) for n, port in self.ports.items() if n != node_id}
        config = TcpTransportConfig(
            node_id=node_id,
            listen_port=self.ports.get(node_id, 0),
            peers=peers,
            limits=LIMITS,
            reconnect_backoff_seconds_min=0.01,
            reconnect_backoff_seconds_max=0.05,
        )
        transport = TcpTransport(config, random.Random(node_id))
        self.runs[node_id] = await self.nursery.start(_run_in_scope, transport.run)
        self.ports[node_id] = transport.listen_port
        self.running[node_id] = transport
        for other_id, other in self.running.items():
            if other_id != node_id:
                other.set_peer(node_id, "127.0.0.1", transport.listen_port)
        return transport

    async def stop(self, node_id: int) -> None:
        self.running.pop(node_id)
        # Returns once `run` has closed the listener, so a restart can bind the same port.
        await self.runs.pop(node_id).stop()


class _Running:
    """A transport's `run` task: cancel it and wait until it has finished."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.finished = trio.Event()

    async def stop(self) -> None:
        self.scope.cancel()
        await self.finished.wait()


async def _run_in_scope(run, *, task_status=trio.TASK_STATUS_IGNORED):
    running = _Running()
    try:
        with running.scope:
            await run(task_status=_Forward(task_status, running))
    finally:
        running.finished.set()


class _Forward:
    """Reports the `_Running` handle instead of the transport's started() value."""

    def __init__(self, task_status, running: _Running) -> None:
        self.task_status = task_status
        self.running = running

    def started(self, value=None) -> None:
        self.task_status.started(self.running)


@pytest.fixture(params=["memory", "tcp"])
async def harness(request, nursery):
    harness = MemoryHarness(nursery) if request.param == "memory" else TcpHarness(nursery)
    await harness.setup()
    return harness


async def receive(transport, timeout_s: float = 5.0) -> Message:
    with trio.fail_after(timeout_s):
        return await transport.receive_channel.receive()


async def wait_until(condition, timeout_s: float = 5.0) -> None:
    """Let every task run until `condition()` holds. No real-time wait: trio declares the
    tasks idle only after an I/O poll found nothing to read, so bytes already sent over
    loopback are delivered first. The timeout only bounds a broken transport."""
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.testing.wait_all_tasks_blocked()


async def test_messages_arrive_intact_and_in_order(harness):
    one = await harness.start(1)
    two = await harness.start(2)
    sent = rich_messages(1, 2)
    for message in sent:
        assert one.send(message)
    assert [await receive(two) for _ in sent] == sent
    back = heartbeat(2, 1, 5)
    assert two.send(back)
    assert await receive(one) == back
    statistics = one.statistics()
    assert statistics.messages_sent == len(sent) and statistics.messages_received == 1


async def test_send_to_an_unknown_node_goes_nowhere(harness):
    one = await harness.start(1)
    two = await harness.start(2)
    one.send(heartbeat(1, 9))  # TCP refuses it at once; the memory network loses it
    one.send(heartbeat(1, 2))
    assert await receive(two) == heartbeat(1, 2)
    two.send(heartbeat(2, 1, 4))  # a marker: nothing but it comes back to node 1
    assert await receive(one) == heartbeat(2, 1, 4)
    assert one.statistics().messages_received == 1
    assert two.statistics().messages_received == 1


async def test_send_never_blocks_while_the_peer_is_down(harness):
    one = await harness.start(1)
    await harness.start(2)
    await harness.stop(2)
    with trio.fail_after(1):
        results = [
            one.send(heartbeat(1, 2, commit=i)) for i in range(10 * LIMITS.peer_queue_messages_max)
        ]
    assert isinstance(results[0], bool)
    await trio.testing.wait_all_tasks_blocked()  # let the sender try (and fail) to connect
    statistics = one.statistics()
    assert statistics.queued_messages <= LIMITS.peer_queue_messages_max


async def test_receive_queue_is_bounded(harness):
    one = await harness.start(1)
    two = await harness.start(2)

    def arrived() -> int:
        statistics = two.statistics()
        return statistics.messages_received + statistics.messages_dropped_on_receive

    sent = 0
    for round_number in range(8):
        # one round fills the sending queue at most, so nothing is dropped on the way
        for i in range(LIMITS.peer_queue_messages_max):
            assert one.send(heartbeat(1, 2, commit=round_number * 100 + i))
            sent += 1
        await wait_until(lambda: arrived() == sent)
    statistics = two.statistics()
    assert statistics.messages_received == LIMITS.receive_queue_messages_max
    assert statistics.messages_dropped_on_receive == sent - LIMITS.receive_queue_messages_max
    received = []
    while True:
        try:
            received.append(two.receive_channel.receive_nowait())
        except trio.WouldBlock:
            break
    assert 0 < len(received) <= LIMITS.receive_queue_messages_max


async def test_messages_flow_again_after_the_peer_restarts(harness):
    one = await harness.start(1)
    await harness.start(2)
    await harness.stop(2)
    two = await harness.start(2)
    # The first messages may go to the old connection and be lost (Raft allows that): send
    # again whenever everything is idle, until one arrives.
    with trio.fail_after(5):
        while True:
            one.send(heartbeat(1, 2, 7))
            await trio.testing.wait_all_tasks_blocked()
            try:
                message = two.receive_channel.receive_nowait()
                break
            except trio.WouldBlock:
                pass
    assert message == heartbeat(1, 2, 7)


async def test_a_stopped_transport_drops_what_it_is_given(harness):
    one = await harness.start(1)
    await harness.start(2)
    await harness.stop(1)
    assert not one.send(heartbeat(1, 2))
    assert one.statistics().messages_dropped_on_send >= 1


# The memory network's fault model.


def endpoints(network: MemoryNetwork, count: int):
    return [network.endpoint(node_id) for node_id in range(1, count + 1)]


def drain(transport) -> list[Message]:
    out = []
    while True:
        try:
            out.append(transport.receive_channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


async def test_loss_and_duplication_follow_the_probabilities(nursery):
    limits = TransportLimits(peer_queue_messages_max=10_000, receive_queue_messages_max=10_000)
    network = MemoryNetwork(
        random.Random(3), FaultModel(loss_probability=0.2, duplicate_probability=0.1), limits
    )
    one, two = endpoints(network, 2)
    for i in range(2000):
        one.send(heartbeat(1, 2, commit=i))
    commits = [m.commit for m in drain(two)]
    statistics = network.statistics()
    assert 300 < statistics.messages_lost < 500
    assert 120 < statistics.messages_duplicated < 250
    assert len(commits) == 2000 - statistics.messages_lost + statistics.messages_duplicated
    assert commits == sorted(commits)  # no delay: no reordering


async def test_delays_reorder_in_trio_time(nursery, autojump_clock):
    network = MemoryNetwork(
        random.Random(5), FaultModel(delay_seconds_min=0.01, delay_seconds_max=0.5)
    )
    await nursery.start(network.run)
    one, two = endpoints(network, 2)
    start = trio.current_time()
    for i in range(10):
        one.send(heartbeat(1, 2, commit=i))
    assert drain(two) == []
    received = [await receive(two) for _ in range(10)]
    assert 0.01 <= trio.current_time() - start <= 0.5
    commits = [m.commit for m in received]
    assert sorted(commits) == list(range(10)) and commits != list(range(10))


async def test_same_seed_same_fate(nursery, autojump_clock):
    async def run_once(seed: int) -> list[tuple[float, int]]:
        network = MemoryNetwork(
            random.Random(seed),
            FaultModel(loss_probability=0.3, duplicate_probability=0.3, delay_seconds_max=0.2),
        )
        async with trio.open_nursery() as inner:
            await inner.start(network.run)
            one, two = endpoints(network, 2)
            start = trio.current_time()
            for i in range(50):
                one.send(heartbeat(1, 2, commit=i))
            arrivals = []
            with trio.move_on_after(1):
                async for message in two.receive_channel:
                    arrivals.append((round(trio.current_time() - start, 9), message.commit))
            inner.cancel_scope.cancel()
        return arrivals

    first = await run_once(11)
    assert first == await run_once(11)
    assert first != await run_once(12)


async def test_partitions_cut_both_ways_or_one_way_and_heal(nursery):
    network = MemoryNetwork(random.Random(1))
    one, two, three = endpoints(network, 3)
    network.partition([1], [2, 3])
    one.send(heartbeat(1, 2))
    two.send(heartbeat(2, 1))
    two.send(heartbeat(2, 3))
    assert drain(one) == [] and drain(two) == [] and len(drain(three)) == 1
    network.heal()
    network.cut(1, 2)
    one.send(heartbeat(1, 2))
    two.send(heartbeat(2, 1))
    assert drain(two) == [] and len(drain(one)) == 1
    network.heal()
    network.isolate(3, [1, 2, 3])
    one.send(heartbeat(1, 3))
    one.send(heartbeat(1, 2))
    assert drain(three) == [] and len(drain(two)) == 1
    assert network.statistics().messages_cut == 4


async def test_a_partition_swallows_messages_in_flight(nursery, autojump_clock):
    network = MemoryNetwork(
        random.Random(1), FaultModel(delay_seconds_min=0.1, delay_seconds_max=0.1)
    )
    await nursery.start(network.run)
    one, two = endpoints(network, 2)
    one.send(heartbeat(1, 2))
    network.cut(1, 2)
    await trio.sleep(1)
    assert drain(two) == []
    assert network.statistics().messages_in_flight == 0


async def test_in_flight_messages_per_link_are_bounded(nursery, autojump_clock):
    network = MemoryNetwork(
        random.Random(1), FaultModel(delay_seconds_min=1, delay_seconds_max=1), LIMITS
    )
    one, two = endpoints(network, 2)
    accepted = [
        one.send(heartbeat(1, 2, commit=i)) for i in range(LIMITS.peer_queue_messages_max + 5)
    ]
    assert accepted.count(False) == 5
    assert network.statistics().messages_in_flight == LIMITS.peer_queue_messages_max


async def test_messages_reach_a_restarted_endpoint_not_a_crashed_one(nursery):
    network = MemoryNetwork(random.Random(1))
    one, two = endpoints(network, 2)
    network.detach(2)
    one.send(heartbeat(1, 2))
    assert drain(two) == []
    new_two = network.endpoint(2)
    one.send(heartbeat(1, 2))
    assert len(drain(new_two)) == 1


def test_fault_model_is_validated():
    with pytest.raises(ValueError):
        FaultModel(loss_probability=1.5).validate()
    with pytest.raises(ValueError):
        FaultModel(delay_seconds_min=2, delay_seconds_max=1).validate()


# TCP framing defences.


async def start_tcp(nursery, node_id: int, **settings) -> TcpTransport:
    transport = TcpTransport(TcpTransportConfig(node_id=node_id, limits=LIMITS, **settings))
    await nursery.start(transport.run)
    return transport


async def test_malformed_frame_disconnects_only_that_peer(nursery):
    two = await start_tcp(nursery, 2)
    bad = await trio.open_tcp_stream("127.0.0.1", two.listen_port)
    await bad.send_all(struct.pack(">II", 9, 5) + b"\xc1\xc1\xc1\xc1\xc1")
    with trio.fail_after(5):
        assert await bad.receive_some(10) == b""  # the transport hung up
    good = await trio.open_tcp_stream("127.0.0.1", two.listen_port)
    await good.send_all(encode_frame(heartbeat(1, 2, 3)))
    assert await receive(two) == heartbeat(1, 2, 3)
    assert two.statistics().messages_dropped_on_receive == 1


async def test_oversize_frame_is_refused_before_it_is_read(nursery):
    two = await start_tcp(nursery, 2, frame_bytes_max=1024)
    stream = await trio.open_tcp_stream("127.0.0.1", two.listen_port)
    await stream.send_all(struct.pack(">II", 10**9, 4))
    with trio.fail_after(5):
        assert await stream.receive_some(10) == b""


async def test_misaddressed_message_is_dropped(nursery):
    two = await start_tcp(nursery, 2)
    stream = await trio.open_tcp_stream("127.0.0.1", two.listen_port)
    await stream.send_all(encode_frame(heartbeat(1, 3)) + encode_frame(heartbeat(1, 2)))
    assert await receive(two) == heartbeat(1, 2)
    assert two.statistics().messages_dropped_on_receive == 1


async def test_inbound_connections_are_capped(nursery):
    two = await start_tcp(nursery, 2, inbound_connections_max=2)
    streams = [await trio.open_tcp_stream("127.0.0.1", two.listen_port) for _ in range(3)]
    with trio.fail_after(5):
        assert await streams[2].receive_some(10) == b""
    assert two.statistics().connections == 2


def test_tcp_config_is_validated():
    with pytest.raises(ValueError):
        TcpTransportConfig(node_id=1, peers={1: ("127.0.0.1", 1)}).validate()
    with pytest.raises(ValueError):
        TcpTransportConfig(node_id=0).validate()
    with pytest.raises(ValueError, match="frame_header_bytes_max"):
        TcpTransportConfig(node_id=1, frame_bytes_max=64, frame_header_bytes_max=64).validate()
    with pytest.raises(ValueError, match="receive_bytes"):
        TcpTransportConfig(node_id=1, receive_bytes=100).validate()
    TcpTransportConfig(node_id=1).validate()
