"""MetadataPublisher over a fake quorum member (MockClock): listeners in order with
(previous, new), waiters woken, images not queued (it skips to the latest)."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from broker.controller import EMPTY_IMAGE, MetadataImage
from broker.metadata_publisher import MetadataPublisher
from broker.raft.driver import DriverStoppedError


def image_at(index: int) -> MetadataImage:
    return dataclasses.replace(EMPTY_IMAGE, last_applied_index=index)


class FakeController:
    """What the publisher reads of a QuorumController: the latest image, a wait for it."""

    def __init__(self) -> None:
        self.image = image_at(1)
        self.stopped = False
        self._changed = trio.Event()

    def publish(self, index: int) -> None:
        self.image = image_at(index)
        self._changed.set()
        self._changed = trio.Event()

    def stop(self) -> None:
        self.stopped = True
        self._changed.set()

    async def wait_image_at_least(self, index: int) -> MetadataImage:
        while self.image.last_applied_index < index:
            if self.stopped:
                raise DriverStoppedError("stopped")
            await self._changed.wait()
        return self.image


async def test_listeners_run_in_order_with_previous_and_new(nursery, autojump_clock):
    controller = FakeController()
    calls: list[tuple[str, int, int]] = []
    publisher: MetadataPublisher

    def listener(name: str):
        async def on_image(previous: MetadataImage, image: MetadataImage) -> None:
            await trio.sleep(0.1)  # a listener that takes time (opening logs)
            assert publisher.image is previous, "published only after every listener"
            calls.append((name, previous.last_applied_index, image.last_applied_index))

        return on_image

    publisher = MetadataPublisher(controller, [listener("registry"), listener("groups")])  # type: ignore[arg-type]
    await nursery.start(publisher.run)
    empty = EMPTY_IMAGE.last_applied_index
    assert calls == [("registry", empty, 1), ("groups", empty, 1)]
    assert publisher.image is controller.image and publisher.published_index == 1
    controller.publish(2)
    await trio.sleep(1)
    assert calls[2:] == [("registry", 1, 2), ("groups", 1, 2)]
    assert publisher.publications == 2


async def test_wait_published_wakes_once_the_index_is_published(nursery, autojump_clock):
    controller = FakeController()
    publisher = MetadataPublisher(controller, [])  # type: ignore[arg-type]
    await nursery.start(publisher.run)
    woken: list[MetadataImage] = []

    async def waiter() -> None:
        woken.append(await publisher.wait_published(5))

    nursery.start_soon(waiter)
    controller.publish(3)
    await trio.sleep(1)
    assert woken == [] and publisher.published_index == 3
    controller.publish(5)
    await trio.sleep(1)
    assert [image.last_applied_index for image in woken] == [5]
    assert (await publisher.wait_published(4)).last_applied_index == 5, "at once"


async def test_a_publisher_that_falls_behind_skips_to_the_latest_image(nursery, autojump_clock):
    controller = FakeController()
    seen: list[int] = []
    gate = trio.Event()

    async def slow(previous: MetadataImage, image: MetadataImage) -> None:
        seen.append(image.last_applied_index)
        if image.last_applied_index == 2:
            await gate.wait()

    publisher = MetadataPublisher(controller, [slow])  # type: ignore[arg-type]
    await nursery.start(publisher.run)
    controller.publish(2)
    await trio.sleep(1)
    for index in (3, 4, 5):
        controller.publish(index)
        await trio.sleep(1)
    assert seen == [1, 2]
    gate.set()
    await trio.sleep(1)
    assert seen == [1, 2, 5] and publisher.publications == 3


async def test_waiters_see_the_quorum_stop(nursery, autojump_clock):
    controller = FakeController()
    publisher = MetadataPublisher(controller, [])  # type: ignore[arg-type]
    await nursery.start(publisher.run)
    outcome: list[BaseException] = []

    async def waiter() -> None:
        try:
            await publisher.wait_published(9)
        except DriverStoppedError as error:
            outcome.append(error)

    nursery.start_soon(waiter)
    await trio.sleep(1)
    controller.stop()
    await trio.sleep(1)
    assert len(outcome) == 1
    with pytest.raises(DriverStoppedError):
        await publisher.wait_published(9)
