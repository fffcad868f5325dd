"""The publisher: turns each new metadata image into local work, off the Raft path.

Applying a committed entry only replaces the quorum's image. This task follows those images
and, one at a time, makes this broker match each: it opens or creates the logs of the
partitions it holds a replica of, removes those of deleted topics, applies config changes
(`TopicRegistry.apply_image`), and loads or unloads the group coordinator's partitions
(`GroupCoordinator.apply_image`). Only then does the image become `image`, the one every
request handler reads, so a handler that sees a partition led here finds its log open.
Images are not queued: a publisher that falls behind skips to the latest.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from broker.controller.metadata_image import EMPTY_IMAGE, MetadataImage
from broker.controller.quorum_controller import QuorumController
from broker.event_log import log_event
from broker.raft.driver import DriverStoppedError

logger = logging.getLogger("dwal.broker")

ImageListener = Callable[[MetadataImage, MetadataImage], Awaitable[None]]


class MetadataPublisher:
    def __init__(self, controller: QuorumController, listeners: list[ImageListener]) -> None:
        """`listeners` are called in order with (previous image, new image)."""
        self.controller = controller
        self.listeners = listeners
        self.image: MetadataImage = EMPTY_IMAGE  # the last image published
        self._published = trio.Event()
        self.publications = 0

    @property
    def published_index(self) -> int:
        return self.image.last_applied_index

    async def wait_published(self, index: int) -> MetadataImage:
        """Return the published image once it includes entry `index`. Raises
        DriverStoppedError once the quorum stopped. Safe to cancel."""
        while self.image.last_applied_index < index:
            event = self._published
            if self.controller.stopped:
                raise DriverStoppedError("the metadata quorum stopped")
            await event.wait()
        return self.image

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish the current image, `started()`, then follow every change until
        cancelled."""
        await self._publish(self.controller.image)
        task_status.started()
        while True:
            try:
                image = await self.controller.wait_image_at_least(self.published_index + 1)
            except DriverStoppedError:
                self._published.set()  # waiters see the stop
                await trio.sleep_forever()  # the quorum's error reaches the node's nursery
            await self._publish(image)

    async def _publish(self, image: MetadataImage) -> None:
        previous = self.image
        for listener in self.listeners:
            await listener(previous, image)
        self.image = image
        self.publications += 1
        self._published.set()
        self._published = trio.Event()
        log_event(
            logger, logging.DEBUG, "metadata_published", metadata_offset=image.last_applied_index
        )
