"""ProducerIdBlocks: ids handed out from controller blocks, one block request at a time."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from broker_test_support import TEST_CONTEXT, running_node

from broker.producer_ids import ProducerIdBlocks
from protocol import DwalError, ErrorCode


class Controller:
    """Hands out blocks of 3 ids; a test opens `gate` to let a request finish."""

    def __init__(self) -> None:
        self.next = 100
        self.requests = 0
        self.gate = trio.Event()
        self.gate.set()

    async def allocate(self) -> tuple[int, int]:
        self.requests += 1
        await self.gate.wait()
        start, self.next = self.next, self.next + 3
        return start, 3


async def test_ids_come_from_the_block_and_a_new_block_when_it_is_spent():
    controller = Controller()
    blocks = ProducerIdBlocks(controller.allocate)
    ids = [await blocks.next_producer_id() for _ in range(7)]
    assert ids == [100, 101, 102, 103, 104, 105, 106]
    assert controller.requests == blocks.blocks_allocated == 3


async def test_callers_waiting_for_a_block_share_one_request_and_get_distinct_ids():
    controller = Controller()
    controller.gate = trio.Event()
    blocks = ProducerIdBlocks(controller.allocate)
    ids: list[int] = []

    async def take() -> None:
        ids.append(await blocks.next_producer_id())

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        assert controller.requests == 1
        controller.gate.set()
    assert sorted(ids) == [100, 101, 102]
    assert controller.requests == 1


async def test_a_failed_block_request_hands_out_nothing_and_the_next_call_asks_again():
    attempts = []

    async def failing() -> tuple[int, int]:
        attempts.append(1)
        if len(attempts) == 1:
            raise DwalError(ErrorCode.NOT_CONTROLLER, "no controller")
        return 5, 2

    blocks = ProducerIdBlocks(failing)
    with pytest.raises(DwalError):
        await blocks.next_producer_id()
    assert [await blocks.next_producer_id() for _ in range(2)] == [5, 6]


async def test_an_empty_block_is_an_error_not_a_reused_id():
    async def empty() -> tuple[int, int]:
        return 0, 0

    with pytest.raises(DwalError) as caught:
        await ProducerIdBlocks(empty).next_producer_id()
    assert caught.value.code == ErrorCode.UNKNOWN_SERVER_ERROR


async def test_a_restarted_broker_never_hands_out_an_id_again(tmp_path):
    """InitProducerId on a real node: ids are distinct, and a restart (which forgets the
    rest of its block) continues past every id of the block, from the metadata log."""
    ids = []
    for _ in range(2):
        async with running_node(tmp_path) as node:
            for _ in range(3):
                reply = await node.handlers.init_producer_id({}, b"", TEST_CONTEXT)
                assert reply.body["producer_epoch"] == 0
                ids.append(reply.body["producer_id"])
    assert ids[:3] == [0, 1, 2]
    assert ids[3:] == [1000, 1001, 1002]
