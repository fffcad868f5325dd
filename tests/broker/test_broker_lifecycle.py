"""BrokerLifecycle with a fake channel to the controller and a fake metadata image
(MockClock): register, catch up, heartbeat until unfenced, heartbeat on, register again."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import trio

from broker.broker_lifecycle import BrokerLifecycle, ListenerAddress
from protocol import DwalError, ErrorCode
from protocol.api import ApiKey

Answer = Callable[[dict[str, Any]], dict[str, Any]]


class FakeChannel:
    """Answers each api with its function (raising DwalError if it returns one), and
    records every call as (time, api key, body)."""

    def __init__(self, register: Answer, heartbeat: Answer) -> None:
        self.answers = {ApiKey.BROKER_REGISTRATION: register, ApiKey.BROKER_HEARTBEAT: heartbeat}
        self.calls: list[tuple[float, ApiKey, dict[str, Any]]] = []

    async def call(
        self, api_key: ApiKey, body: dict[str, Any], *, timeout_seconds: float
    ) -> dict[str, Any]:
        await trio.sleep(0.001)  # a round trip
        self.calls.append((trio.current_time(), api_key, dict(body)))
        answer = self.answers[api_key](body)
        if isinstance(answer, DwalError):
            raise answer
        return answer

    def bodies(self, api_key: ApiKey) -> list[dict[str, Any]]:
        return [body for _, key, body in self.calls if key == api_key]

    def times(self, api_key: ApiKey) -> list[float]:
        return [when for when, key, _ in self.calls if key == api_key]


class FakeImage:
    """The broker's published metadata offset."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self._changed = trio.Event()

    def advance(self, offset: int) -> None:
        self.offset = offset
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, index: int) -> None:
        while self.offset < index:
            await self._changed.wait()


def lifecycle(channel: FakeChannel, image: FakeImage, interval: float = 1.0) -> BrokerLifecycle:
    return BrokerLifecycle(
        4,
        channel,  # type: ignore[arg-type]
        cluster_id=lambda: "cluster-a",
        listeners=[ListenerAddress("NATIVE", "127.0.0.1", 9094)],
        rack="rack-1",
        metadata_offset=lambda: image.offset,
        wait_metadata_offset=image.wait,
        heartbeat_interval_seconds=interval,
        request_timeout_seconds=5.0,
    )


class Controller:
    """A controller's answers: epochs from a counter, unfenced once the broker reports a
    metadata offset at its epoch."""

    def __init__(self) -> None:
        self.next_epoch = 10
        self.epoch = -1
        self.heartbeat_errors: list[DwalError] = []
        self.register_errors: list[DwalError] = []
        self.shut_down = False

    def register(self, body: dict[str, Any]) -> Any:
        if self.register_errors:
            return self.register_errors.pop(0)
        self.epoch = self.next_epoch
        self.next_epoch += 10
        self.shut_down = False
        return {"broker_epoch": self.epoch}

    def heartbeat(self, body: dict[str, Any]) -> Any:
        if self.heartbeat_errors:
            return self.heartbeat_errors.pop(0)
        if body["broker_epoch"] != self.epoch:
            return DwalError(ErrorCode.STALE_BROKER_EPOCH, "stale")
        fenced = self.shut_down or body["metadata_offset"] < self.epoch
        return {"is_fenced": fenced, "should_shut_down": self.shut_down}

    def channel(self) -> FakeChannel:
        return FakeChannel(self.register, self.heartbeat)


async def test_registers_catches_up_then_heartbeats_until_unfenced(nursery, autojump_clock):
    controller = Controller()
    channel = controller.channel()
    image = FakeImage(3)
    member = lifecycle(channel, image)
    done = trio.Event()
    started: list[int] = []

    async def run() -> None:
        started.append(await nursery.start(member.run))
        done.set()

    nursery.start_soon(run)
    await trio.sleep(5)
    [registration] = channel.bodies(ApiKey.BROKER_REGISTRATION)
    assert registration == {
        "broker_id": 4,
        "cluster_id": "cluster-a",
        "incarnation_id": member.incarnation_id,
        "listeners": [{"name": "NATIVE", "host": "127.0.0.1", "port": 9094}],
        "rack": "rack-1",
    }
    assert uuid.UUID(member.incarnation_id)
    assert member.broker_epoch == 10 and member.fenced
    assert channel.bodies(ApiKey.BROKER_HEARTBEAT) == [], "no heartbeat before catching up"
    assert not done.is_set()

    image.advance(10)
    with trio.fail_after(1):
        await done.wait()
    assert started == [10] and not member.fenced and member.registrations == 1
    [heartbeat] = channel.bodies(ApiKey.BROKER_HEARTBEAT)
    assert heartbeat == {
        "broker_id": 4,
        "broker_epoch": 10,
        "metadata_offset": 10,
        "want_shut_down": False,
    }


async def test_fenced_heartbeats_come_quickly_then_every_interval(nursery, autojump_clock):
    controller = Controller()
    channel = controller.channel()
    image = FakeImage(100)
    unfence_after = 3

    def heartbeat(body: dict[str, Any]) -> Any:
        reply = controller.heartbeat(body)
        beats = len(channel.bodies(ApiKey.BROKER_HEARTBEAT))
        return {**reply, "is_fenced": beats < unfence_after}

    channel.answers[ApiKey.BROKER_HEARTBEAT] = heartbeat
    member = lifecycle(channel, image, interval=2.0)
    assert await nursery.start(member.run) == 10
    times = channel.times(ApiKey.BROKER_HEARTBEAT)
    assert len(times) == unfence_after
    assert all(later - earlier < 0.1 for earlier, later in zip(times, times[1:]))
    await trio.sleep(7)
    times = channel.times(ApiKey.BROKER_HEARTBEAT)[unfence_after - 1 :]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert len(gaps) == 3 and all(2.0 <= gap < 2.01 for gap in gaps), gaps


@pytest.mark.parametrize("code", [ErrorCode.STALE_BROKER_EPOCH, ErrorCode.BROKER_NOT_AVAILABLE])
async def test_a_refused_epoch_makes_it_register_again(code, nursery, autojump_clock):
    controller = Controller()
    channel = controller.channel()
    image = FakeImage(10)
    member = lifecycle(channel, image)
    await nursery.start(member.run)
    controller.heartbeat_errors.append(DwalError(code, "registered again elsewhere"))
    await trio.sleep(1.5)
    assert member.registrations == 2 and member.broker_epoch == 20
    assert member.fenced, "a new epoch is fenced until caught up"
    bodies = channel.bodies(ApiKey.BROKER_REGISTRATION)
    assert bodies[0]["incarnation_id"] == bodies[1]["incarnation_id"], "the same process"
    beats = len(channel.bodies(ApiKey.BROKER_HEARTBEAT))
    await trio.sleep(3)
    assert len(channel.bodies(ApiKey.BROKER_HEARTBEAT)) == beats, "waiting to catch up"
    image.advance(20)
    await trio.sleep(1.5)
    last = channel.bodies(ApiKey.BROKER_HEARTBEAT)[-1]
    assert last["broker_epoch"] == 20 and last["metadata_offset"] == 20
    assert not member.fenced


async def test_should_shut_down_makes_it_register_again(nursery, autojump_clock):
    controller = Controller()
    channel = controller.channel()
    image = FakeImage(10)
    member = lifecycle(channel, image)
    await nursery.start(member.run)
    controller.shut_down = True
    image.advance(25)
    await trio.sleep(1.5)
    assert member.registrations == 2 and member.broker_epoch == 20
    await trio.sleep(1)
    assert not member.fenced


async def test_retriable_errors_are_retried_and_others_raised(nursery, autojump_clock):
    controller = Controller()
    channel = controller.channel()
    image = FakeImage(10)
    member = lifecycle(channel, image)
    controller.register_errors = [
        DwalError(ErrorCode.NOT_CONTROLLER, "no controller yet"),
        DwalError(ErrorCode.REQUEST_TIMED_OUT, "unknown outcome"),
    ]
    await nursery.start(member.run)
    assert len(channel.bodies(ApiKey.BROKER_REGISTRATION)) == 3 and member.registrations == 1
    beats = len(channel.bodies(ApiKey.BROKER_HEARTBEAT))
    controller.heartbeat_errors = [DwalError(ErrorCode.NOT_CONTROLLER, "failover")] * 2
    await trio.sleep(3.5)
    assert len(channel.bodies(ApiKey.BROKER_HEARTBEAT)) == beats + 3
    assert member.registrations == 1 and member.broker_epoch == 10

    other = lifecycle(controller.channel(), image)
    controller.register_errors = [DwalError(ErrorCode.INCONSISTENT_CLUSTER_ID, "another")]
    with pytest.raises(DwalError) as caught:
        await other.register()
    assert caught.value.code == ErrorCode.INCONSISTENT_CLUSTER_ID


async def test_a_refused_heartbeat_that_is_not_retriable_ends_run(autojump_clock):
    controller = Controller()
    member = lifecycle(controller.channel(), FakeImage(10))
    controller.heartbeat_errors = [DwalError(ErrorCode.INVALID_REQUEST, "bad")]
    with pytest.raises(DwalError) as caught:
        await member.run()
    assert caught.value.code == ErrorCode.INVALID_REQUEST


async def test_shut_down_asks_the_controller_and_reports_the_outcome(autojump_clock):
    controller = Controller()
    channel = controller.channel()
    member = lifecycle(channel, FakeImage(10))
    assert await member.shut_down(1.0) is False, "never registered: nothing to say"
    assert channel.calls == []
    await member.register()
    assert await member.shut_down(1.0) is True
    assert channel.bodies(ApiKey.BROKER_HEARTBEAT)[-1] == {
        "broker_id": 4,
        "broker_epoch": 10,
        "metadata_offset": 10,
        "want_shut_down": True,
    }
    controller.heartbeat_errors = [DwalError(ErrorCode.NOT_CONTROLLER, "none")]
    assert await member.shut_down(1.0) is False

    async def slow_call(api_key, body, *, timeout_seconds):
        await trio.sleep(60)

    channel.call = slow_call  # type: ignore[method-assign]
    with trio.CancelScope() as scope:
        scope.cancel()  # the broker is stopping: shut_down is shielded, bounded by its timeout
        started = trio.current_time()
        assert await member.shut_down(1.0) is False
    assert trio.current_time() - started == pytest.approx(1.0)


async def test_a_blackholed_heartbeat_is_given_up_after_two_intervals(nursery, autojump_clock):
    """A heartbeat lost in a cut link is abandoned after two intervals (not the 5 s request
    timeout), so once the link heals the next one soon unfences the broker."""
    controller = Controller()
    channel = controller.channel()
    image = FakeImage(100)
    member = lifecycle(channel, image, interval=1.0)
    assert await nursery.start(member.run) == 10
    blackholed_at: list[float] = []
    plain_call = channel.call

    async def call(api_key: ApiKey, body: dict[str, Any], *, timeout_seconds: float):
        if api_key == ApiKey.BROKER_HEARTBEAT and not blackholed_at:
            blackholed_at.append(trio.current_time())
            with trio.move_on_after(timeout_seconds):
                await trio.sleep_forever()  # the link is cut: no answer
            raise DwalError(ErrorCode.REQUEST_TIMED_OUT, "no answer in time")
        return await plain_call(api_key, body, timeout_seconds=timeout_seconds)

    channel.call = call  # type: ignore[method-assign]
    await trio.sleep(6)
    later = [t for t in channel.times(ApiKey.BROKER_HEARTBEAT) if t > blackholed_at[0]]
    assert later, "no heartbeat after the blackholed one"
    assert later[0] - blackholed_at[0] <= 2 * 1.0 + 1.0 + 0.01, later[0] - blackholed_at[0]
