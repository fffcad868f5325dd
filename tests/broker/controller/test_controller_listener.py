"""ControllerListener: one port for Raft peers and controller requests, routed by the first
frame header byte (peeked, not read). Real sockets on 127.0.0.1 and trio's real clock
(with a MockClock, virtual time would jump while a socket waits), so every wait is bounded
by a fail_after."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from quorum_cluster import CONFIG, raft_config

from broker.config import BrokerConfig
from broker.controller import controller_listener
from broker.controller.controller_apis import ControllerApis
from broker.controller.controller_listener import ControllerListener, ControllerRequestHandlers
from broker.controller.quorum_controller import QuorumController
from broker.limits import Limits
from broker.raft.log_storage import MemoryStorage
from broker.raft.memory_transport import MemoryNetwork
from broker.raft.messages import Configuration, Message, MessageType
from broker.raft.tcp_transport import TcpTransport, TcpTransportConfig, encode_frame
from broker.server import NativeServer
from broker.storage import LogConfig
from protocol import ErrorCode
from protocol.api import ApiKey
from protocol.frame import FrameDecoder, Request, Response, encode_request, parse_response


@dataclass
class ControllerPort:
    listener: ControllerListener
    transport: TcpTransport
    controller: QuorumController
    address: tuple[str, int]

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(*self.address)


async def start_controller_port(
    nursery, tmp_path, peers: dict[int, tuple[str, int]] | None = None
) -> ControllerPort:
    """The controller port of node 1, the active controller of a quorum of one; its TCP
    transport knows `peers` (default: one peer that is never sent to)."""
    network = MemoryNetwork(random.Random(1))
    await nursery.start(network.run)
    storage = MemoryStorage(Configuration(voters=frozenset({1})))
    controller = QuorumController(raft_config(1), storage, network.endpoint(1), config=CONFIG)
    await nursery.start(controller.run)
    controller.driver.campaign()
    with trio.fail_after(10):
        await controller.wait_active()
    apis = ControllerApis(controller, log_defaults=LogConfig(), limits=Limits())
    # The Raft side of node 1 on TCP (its quorum runs on the memory network: this one only
    # receives what peers send on the shared port).
    if peers is None:
        peers = {2: ("127.0.0.1", 1)}
    transport = TcpTransport(TcpTransportConfig(node_id=1, peers=peers, listen=False))
    await nursery.start(transport.run)
    config = BrokerConfig(data_dir=tmp_path, port=0, http_port=-1, grpc_port=-1)
    listener = ControllerListener(transport, NativeServer(ControllerRequestHandlers(config, apis)))
    sockets = await trio.open_tcp_listeners(0, host="127.0.0.1")
    bound = await nursery.start(listener.serve, sockets)
    return ControllerPort(listener, transport, controller, bound[0].socket.getsockname()[:2])


def request_bytes(api_key: int, body: dict[str, Any], correlation_id: int = 1) -> bytes:
    request = Request(
        api_key=api_key, api_version=0, correlation_id=correlation_id, client_id="t", body=body
    )
    return encode_request(request)


async def receive_response(stream: trio.SocketStream) -> Response:
    decoder = FrameDecoder(frame_bytes_max=1 << 20)
    while (frame := decoder.next_frame()) is None:
        data = await stream.receive_some(65536)
        assert data, "the connection closed before the answer"
        decoder.feed(data)
    return parse_response(*frame)


async def wait_closed(stream: trio.SocketStream) -> None:
    """Return once the other end closed the connection (reading whatever it sent); a
    reset (closed with our bytes unread) counts."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass


async def test_a_raft_peer_connection_reaches_the_transport(nursery, tmp_path):
    port = await start_controller_port(nursery, tmp_path)
    message = Message(type=MessageType.HEARTBEAT, source=2, target=1, term=7, commit=3)
    stream = await port.connect()
    await stream.send_all(encode_frame(message))
    with trio.fail_after(5):
        assert await port.transport.receive_channel.receive() == message
    assert port.listener.refused == 0


async def test_raft_peers_reach_a_transport_that_has_no_peers_of_its_own(nursery, tmp_path):
    """Regression (fixed), broker/raft/tcp_transport.py TcpTransport.run:
    with listen=False and no peers, run's nursery has no task, so run returns at once and
    marks the transport closed. A single-voter quorum given with --controller-quorum has
    exactly that transport: it refuses every inbound Raft connection ("over the limit"),
    and `set_peer` for a learner registered later starts no sender (no nursery) while
    `send` drops everything, so brokers never receive the metadata log."""
    port = await start_controller_port(nursery, tmp_path, peers={})
    message = Message(type=MessageType.HEARTBEAT, source=2, target=1, term=7, commit=3)
    stream = await port.connect()
    await stream.send_all(encode_frame(message))
    with trio.fail_after(5):
        assert await port.transport.receive_channel.receive() == message


async def test_a_native_request_gets_an_answer_on_the_same_port(nursery, tmp_path):
    port = await start_controller_port(nursery, tmp_path)
    stream = await port.connect()
    with trio.fail_after(5):
        await stream.send_all(request_bytes(int(ApiKey.DESCRIBE_CLUSTER), {}, 11))
        response = await receive_response(stream)
        assert response.correlation_id == 11 and response.error_code == ErrorCode.NONE
        assert response.body["cluster_id"] == CONFIG.cluster_id
        assert response.body["controller_id"] == 1

        await stream.send_all(request_bytes(int(ApiKey.API_VERSIONS), {}, 12))
        versions = await receive_response(stream)
        assert versions.error_code == ErrorCode.NONE
        assert [int(ApiKey.DESCRIBE_CLUSTER), 0, 0] in versions.body["api_versions"]

        await stream.send_all(request_bytes(int(ApiKey.METADATA), {}, 13))
        refused = await receive_response(stream)
        assert refused.correlation_id == 13 and refused.error_code == ErrorCode.INVALID_REQUEST
        assert "native port" in (refused.error_message or "")
    assert port.listener.refused == 0
    assert port.transport.statistics().messages_received == 0


async def test_a_frame_whose_first_bytes_come_alone_is_still_routed(nursery, tmp_path):
    port = await start_controller_port(nursery, tmp_path)
    data = request_bytes(int(ApiKey.DESCRIBE_CLUSTER), {}, 5)
    stream = await port.connect()
    with trio.fail_after(5):
        await stream.send_all(data[:3])
        await trio.sleep(0.05)  # the listener has peeked at fewer bytes than it needs
        await stream.send_all(data[3:])
        response = await receive_response(stream)
    assert response.correlation_id == 5 and response.error_code == ErrorCode.NONE


@pytest.mark.parametrize(
    "first_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        struct.pack(">II", 9, 5) + b"\x92\x01\x02\x03\x04",  # a frame, but a 2-array header
    ],
    ids=["http", "other-header"],
)
async def test_garbage_first_bytes_close_the_connection(first_bytes, nursery, tmp_path):
    port = await start_controller_port(nursery, tmp_path)
    stream = await port.connect()
    await stream.send_all(first_bytes)
    with trio.fail_after(5):
        await wait_closed(stream)
    assert port.listener.refused == 1
    assert port.transport.statistics().messages_received == 0
    good = await port.connect()
    with trio.fail_after(5):
        await good.send_all(request_bytes(int(ApiKey.DESCRIBE_CLUSTER), {}))
        assert (await receive_response(good)).error_code == ErrorCode.NONE, "others go on"


async def test_a_connection_closed_before_its_first_byte_is_refused(nursery, tmp_path):
    port = await start_controller_port(nursery, tmp_path)
    stream = await port.connect()
    await stream.aclose()
    with trio.fail_after(5):
        while port.listener.refused == 0:
            await trio.sleep(0.01)
    assert port.listener.refused == 1


async def test_a_connection_closed_after_a_partial_prefix_is_noticed_at_once(
    nursery, tmp_path, monkeypatch
):
    """Regression (fixed), controller_listener._peek_header_byte: with
    fewer than 9 bytes buffered, MSG_PEEK keeps returning them after the peer closed, so
    the close is not seen ("None when the peer closes first" does not hold) and the task
    polls every millisecond until ROUTE_TIMEOUT_SECONDS (10 s in production)."""
    monkeypatch.setattr(controller_listener, "ROUTE_TIMEOUT_SECONDS", 2.0)
    port = await start_controller_port(nursery, tmp_path)
    stream = await port.connect()
    await stream.send_all(b"\x00\x00")
    await stream.aclose()
    started = trio.current_time()
    with trio.fail_after(5):
        while port.listener.refused == 0:
            await trio.sleep(0.01)
    assert trio.current_time() - started < 1.0, "the close should be noticed at once"


async def test_a_silent_connection_is_closed_after_the_route_timeout(
    nursery, tmp_path, monkeypatch
):
    monkeypatch.setattr(controller_listener, "ROUTE_TIMEOUT_SECONDS", 0.3)
    port = await start_controller_port(nursery, tmp_path)
    stream = await port.connect()
    started = trio.current_time()
    with trio.fail_after(5):
        await wait_closed(stream)
    elapsed = trio.current_time() - started
    assert 0.3 <= elapsed < 1.5, elapsed
    assert port.listener.refused == 1
