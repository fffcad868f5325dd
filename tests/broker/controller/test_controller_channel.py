"""ControllerChannel: in process when this node is the active controller, else over TCP to
another node's controller port (a real ControllerListener and NativeServer on 127.0.0.1),
retrying NOT_CONTROLLER and unreachable controllers until the deadline, and nothing else.

The tests over TCP use trio's real clock (with a MockClock, virtual time would jump while
a socket waits); those in process use MockClock."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest
import trio
from quorum_cluster import CONFIG, raft_config

from broker.config import BrokerConfig
from broker.controller.controller_apis import ControllerApis
from broker.controller.controller_channel import ControllerChannel
from broker.controller.controller_listener import ControllerListener, ControllerRequestHandlers
from broker.controller.quorum_controller import NotControllerError, QuorumController
from broker.limits import Limits
from broker.raft.driver import Leadership
from broker.raft.log_storage import MemoryStorage
from broker.raft.memory_transport import MemoryNetwork
from broker.raft.messages import NO_NODE, Configuration
from broker.raft.tcp_transport import TcpTransport, TcpTransportConfig
from broker.server import NativeServer
from broker.storage import LogConfig
from protocol import DwalError, ErrorCode
from protocol.api import ApiKey


async def start_controller(
    nursery, voters: frozenset[int] = frozenset({1}), *, campaign: bool = True
) -> QuorumController:
    """Node 1 of a quorum of `voters` (only node 1 runs). With one voter and `campaign`,
    it becomes the active controller."""
    network = MemoryNetwork(random.Random(1))
    await nursery.start(network.run)
    storage = MemoryStorage(Configuration(voters=voters))
    controller = QuorumController(raft_config(1), storage, network.endpoint(1), config=CONFIG)
    await nursery.start(controller.run)
    if campaign and voters == {1}:
        controller.driver.campaign()
        with trio.fail_after(10):
            await controller.wait_active()
    return controller


def apis_of(controller: QuorumController) -> ControllerApis:
    return ControllerApis(controller, log_defaults=LogConfig(), limits=Limits())


async def serve_controller_port(nursery, tmp_path, apis: ControllerApis) -> tuple[str, int]:
    """A controller port (Raft and controller requests) answering with `apis`."""
    transport = TcpTransport(TcpTransportConfig(node_id=9, listen=False))
    await nursery.start(transport.run)
    config = BrokerConfig(data_dir=tmp_path, port=0, http_port=-1, grpc_port=-1)
    listener = ControllerListener(transport, NativeServer(ControllerRequestHandlers(config, apis)))
    sockets = await trio.open_tcp_listeners(0, host="127.0.0.1")
    bound = await nursery.start(listener.serve, sockets)
    return bound[0].socket.getsockname()[:2]


async def closed_port() -> tuple[str, int]:
    """An address nobody listens on."""
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    address = listener.socket.getsockname()[:2]
    await listener.aclose()
    return address


class FakeDriver:
    def __init__(self, leader: int) -> None:
        self._leadership = Leadership(term=1, leader=leader)
        self._changed = trio.Event()

    def leadership(self) -> Leadership:
        return self._leadership

    def set_leader(self, leader: int) -> None:
        self._leadership = Leadership(term=self._leadership.term + 1, leader=leader)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_leadership_change(self, previous: Leadership) -> Leadership:
        while self._leadership == previous:
            await self._changed.wait()
        return self._leadership


class FakeController:
    """What the channel reads of the local QuorumController: who leads, and whether this
    node's quorum member stopped."""

    def __init__(self, leader: int, *, stopped: bool = False) -> None:
        self.driver = FakeDriver(leader)
        self.stopped = stopped


class ScriptedApis:
    """Stands in for ControllerApis: raises `errors` in turn, then answers `reply`."""

    def __init__(self, errors: list[DwalError], reply: dict[str, Any] | None = None) -> None:
        self.errors = errors
        self.reply = reply or {}
        self.calls: list[float] = []

    async def handle(self, api_key: ApiKey, body: dict[str, Any]) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        self.calls.append(trio.current_time())
        if self.errors:
            raise self.errors.pop(0)
        return self.reply


def registration_body(broker_id: int, incarnation: str | None = None) -> dict[str, Any]:
    return {
        "broker_id": broker_id,
        "cluster_id": "",
        "incarnation_id": incarnation or str(uuid.uuid4()),
        "listeners": [{"name": "NATIVE", "host": "127.0.0.1", "port": 9000 + broker_id}],
        "rack": None,
    }


def create_body(name: str) -> dict[str, Any]:
    entry = {"topic": name, "partitions": 1, "replication_factor": 1, "configs": {}}
    return {"topics": [entry], "validate_only": False}


async def add_broker(channel: ControllerChannel, broker_id: int) -> None:
    """Register and unfence a broker through the channel (the remote image is current)."""
    reply = await channel.call(
        ApiKey.BROKER_REGISTRATION, registration_body(broker_id), timeout_seconds=5
    )
    epoch = reply["broker_epoch"]
    body = {"broker_id": broker_id, "broker_epoch": epoch, "metadata_offset": epoch}
    body["want_shut_down"] = False
    reply = await channel.call(ApiKey.BROKER_HEARTBEAT, body, timeout_seconds=5)
    assert not reply["is_fenced"]


# In process.


async def test_in_process_when_this_node_is_the_active_controller(nursery, autojump_clock):
    controller = await start_controller(nursery)
    apis = apis_of(controller)
    unreachable = {2: ("127.0.0.1", 1)}
    channel = ControllerChannel(1, controller, apis, voters=unreachable)
    await add_broker(channel, 1)
    reply = await channel.call(ApiKey.CREATE_TOPICS, create_body("t"), timeout_seconds=5)
    assert reply["topics"] == [{"topic": "t", "error_code": 0}]
    assert "t" in controller.image.topics
    assert channel.forwarded == 0, "nothing went over the network"


async def test_a_call_made_during_the_election_is_answered_once_this_node_is_active(
    nursery, autojump_clock
):
    controller = await start_controller(nursery, campaign=False)
    channel = ControllerChannel(1, controller, apis_of(controller), voters={})
    assert channel.controller_hint() is None
    reply = await channel.call(ApiKey.DESCRIBE_CLUSTER, {}, timeout_seconds=5)
    assert reply["controller_id"] == 1 and controller.active_term is not None
    assert trio.current_time() > 0, "it waited for the election"


async def test_not_controller_is_retried_with_backoff_until_the_deadline(autojump_clock):
    apis = ScriptedApis([NotControllerError(1, "becoming active")] * 1000)
    channel = ControllerChannel(1, FakeController(1), apis, voters={})  # type: ignore[arg-type]
    with pytest.raises(DwalError) as caught:
        await channel.call(ApiKey.DESCRIBE_CLUSTER, {}, timeout_seconds=3)
    assert caught.value.code == ErrorCode.NOT_CONTROLLER
    assert "becoming active" in caught.value.message, "the last problem is reported"
    assert 3 <= trio.current_time() < 3.6
    gaps = [later - earlier for earlier, later in zip(apis.calls, apis.calls[1:])]
    assert gaps[0] < gaps[3] <= 0.5 + 1e-9, "the delay doubles, up to its maximum"
    assert 7 <= len(apis.calls) <= 12


async def test_not_controller_retry_succeeds_when_the_controller_answers(autojump_clock):
    apis = ScriptedApis([NotControllerError(1)] * 3, {"answer": 42})
    channel = ControllerChannel(1, FakeController(1), apis, voters={})  # type: ignore[arg-type]
    reply = await channel.call(ApiKey.DESCRIBE_CLUSTER, {}, timeout_seconds=3)
    assert reply == {"answer": 42} and len(apis.calls) == 4


@pytest.mark.parametrize(
    "code", [ErrorCode.INVALID_REQUEST, ErrorCode.REQUEST_TIMED_OUT, ErrorCode.STALE_BROKER_EPOCH]
)
async def test_other_errors_are_not_retried(code, autojump_clock):
    apis = ScriptedApis([DwalError(code, "refused")], {"answer": 42})
    channel = ControllerChannel(1, FakeController(1), apis, voters={})  # type: ignore[arg-type]
    with pytest.raises(DwalError) as caught:
        await channel.call(ApiKey.DESCRIBE_CLUSTER, {}, timeout_seconds=3)
    assert caught.value.code == code and len(apis.calls) == 1


async def test_a_leadership_change_ends_the_wait_between_tries(autojump_clock):
    apis = ScriptedApis([], {"answer": 42})
    controller = FakeController(NO_NODE)
    channel = ControllerChannel(1, controller, apis, voters={})  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: channel.call(ApiKey.DESCRIBE_CLUSTER, {}, timeout_seconds=30))
        await trio.sleep(10)
        assert apis.calls == [], "no leader known: nobody asked"
        controller.driver.set_leader(1)
    assert apis.calls and apis.calls[0] < 10.5


# Over TCP (real clock).


async def test_remote_call_reaches_the_active_controller_and_refusals_come_back_at_once(
    nursery, tmp_path
):
    remote = await start_controller(nursery)
    address = await serve_controller_port(nursery, tmp_path, apis_of(remote))
    channel = ControllerChannel(
        3,
        FakeController(2),  # type: ignore[arg-type]
        None,
        voters={2: address},
    )
    with trio.fail_after(10):
        await add_broker(channel, 3)
        assert channel.forwarded == 2
        reply = await channel.call(ApiKey.CREATE_TOPICS, create_body("t"), timeout_seconds=5)
        assert [(r["topic"], r["error_code"]) for r in reply["topics"]] == [("t", 0)]
        assert reply["metadata_offset"] == remote.image.last_applied_index
        assert "t" in remote.image.topics

        again = await channel.call(ApiKey.CREATE_TOPICS, create_body("t"), timeout_seconds=5)
        assert again["topics"][0]["error_code"] == ErrorCode.TOPIC_ALREADY_EXISTS
        assert channel.forwarded == 4, "a refusal inside the reply is no reason to retry"

        with pytest.raises(DwalError) as caught:
            await channel.call(
                ApiKey.BROKER_REGISTRATION, registration_body(3, "bad"), timeout_seconds=5
            )
        assert caught.value.code == ErrorCode.INVALID_REQUEST
        assert channel.forwarded == 5, "a refusal of the whole request: one try"


async def test_remote_not_controller_is_retried_until_the_deadline(nursery, tmp_path):
    follower = await start_controller(nursery, frozenset({1, 2}))
    address = await serve_controller_port(nursery, tmp_path, apis_of(follower))
    channel = ControllerChannel(3, FakeController(2), None, voters={2: address})  # type: ignore[arg-type]
    started = trio.current_time()
    with trio.fail_after(5):
        with pytest.raises(DwalError) as caught:
            await channel.call(ApiKey.DESCRIBE_CLUSTER, {}, timeout_seconds=0.6)
    elapsed = trio.current_time() - started
    assert caught.value.code == ErrorCode.NOT_CONTROLLER
    assert 0.6 <= elapsed < 2.0
    assert channel.forwarded >= 3, "it asked again"


async def test_with_no_leader_known_the_voters_are_tried_in_turn(nursery, tmp_path):
    follower = await start_controller(nursery, frozenset({1, 2}))
    active = await start_controller(nursery)
    voters = {
        1: await closed_port(),
        2: await serve_controller_port(nursery, tmp_path, apis_of(follower)),
        3: await serve_controller_port(nursery, tmp_path, apis_of(active)),
    }
    channel = ControllerChannel(4, FakeController(NO_NODE), None, voters=voters)  # type: ignore[arg-type]
    with trio.fail_after(5):
        reply = await channel.call(ApiKey.DESCRIBE_CLUSTER, {}, timeout_seconds=5)
    assert reply["cluster_id"] == CONFIG.cluster_id
    assert channel.forwarded == 3, "unreachable, then NOT_CONTROLLER, then the active one"


async def test_a_stopping_node_asks_the_other_voters_not_itself(nursery, tmp_path):
    active = await start_controller(nursery)
    address = await serve_controller_port(nursery, tmp_path, apis_of(active))
    local = ScriptedApis([], {"answer": "from the stopping node"})
    controller = FakeController(1, stopped=True)  # it led, and its member has stopped
    channel = ControllerChannel(1, controller, local, voters={1: await closed_port(), 2: address})  # type: ignore[arg-type]
    with trio.fail_after(5):
        reply = await channel.call(ApiKey.DESCRIBE_CLUSTER, {}, timeout_seconds=5)
    assert reply["cluster_id"] == CONFIG.cluster_id
    assert local.calls == [] and channel.forwarded == 1
    await channel.aclose()


async def test_connections_are_kept_for_the_next_call_and_closed_by_aclose(nursery, tmp_path):
    active = await start_controller(nursery)
    address = await serve_controller_port(nursery, tmp_path, apis_of(active))
    channel = ControllerChannel(3, FakeController(2), None, voters={2: address})  # type: ignore[arg-type]
    with trio.fail_after(5):
        for _ in range(3):
            await channel.call(ApiKey.DESCRIBE_CLUSTER, {}, timeout_seconds=5)
    [idle] = channel._idle.values()
    assert len(idle) == 1, "one connection served the three calls"
    await channel.aclose()
    assert idle == []


async def test_a_controller_that_does_not_answer_in_time_is_a_timeout(nursery):
    silent = await trio.open_tcp_listeners(0, host="127.0.0.1")
    accepted: list[trio.SocketStream] = []

    async def accept_and_say_nothing() -> None:
        while True:
            accepted.append(await silent[0].accept())

    nursery.start_soon(accept_and_say_nothing)
    address = silent[0].socket.getsockname()[:2]
    channel = ControllerChannel(3, FakeController(2), None, voters={2: address})  # type: ignore[arg-type]
    with trio.fail_after(5):
        with pytest.raises(DwalError) as caught:
            await channel.call(ApiKey.DESCRIBE_CLUSTER, {}, timeout_seconds=0.3)
    assert caught.value.code == ErrorCode.REQUEST_TIMED_OUT, "the outcome is unknown"
    assert channel.forwarded == 1
