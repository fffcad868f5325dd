"""The memory pool: a byte budget shared by every reader, granted first come, first served;
a cancelled wait reserves nothing and lets those behind it move up."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from broker.config import ConfigError, build_config
from broker.limits import Limits
from broker.memory_pool import MemoryPool

pytestmark = pytest.mark.timeout(30)


async def _reserve_then_record(pool: MemoryPool, byte_count: int, granted: list[int]) -> None:
    await pool.reserve(byte_count)
    granted.append(byte_count)


async def test_reserve_within_the_budget_returns_at_once_and_release_gives_back():
    pool = MemoryPool(100)
    await pool.reserve(60)
    await pool.reserve(40)
    assert pool.statistics().bytes_reserved == 100
    assert pool.bytes_available == 0
    pool.release(100)
    statistics = pool.statistics()
    assert statistics.bytes_reserved == 0
    assert statistics.bytes_reserved_peak == 100
    assert statistics.waiters == 0


async def test_a_reservation_beyond_the_budget_waits_until_memory_is_released():
    pool = MemoryPool(100)
    await pool.reserve(80)
    granted: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_reserve_then_record, pool, 30, granted)
        await trio.testing.wait_all_tasks_blocked()
        assert granted == []
        assert pool.statistics().waiters == 1
        assert pool.statistics().bytes_wanted == 30
        pool.release(10)  # 70 reserved: 30 fit now
    assert granted == [30]
    assert pool.statistics().bytes_reserved == 100
    assert pool.statistics().bytes_reserved_peak == 100


async def test_waiters_are_served_in_arrival_order_and_a_large_one_is_not_overtaken():
    pool = MemoryPool(100)
    await pool.reserve(100)
    granted: list[int] = []
    async with trio.open_nursery() as nursery:
        for byte_count in (90, 10, 5):
            nursery.start_soon(_reserve_then_record, pool, byte_count, granted)
            await trio.testing.wait_all_tasks_blocked()  # queue them in this order
        pool.release(20)  # 10 and 5 would fit, but 90 came first
        await trio.testing.wait_all_tasks_blocked()
        assert granted == []
        assert pool.try_reserve(1) is False  # nor may anyone jump the queue
        pool.release(80)  # 90 fits, then 10 (5 must wait for more)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(granted) == [10, 90]  # woken together: trio may run them in any order
        pool.release(90)
    assert sorted(granted) == [5, 10, 90]
    assert pool.statistics().bytes_reserved == 15


async def test_a_cancelled_waiter_reserves_nothing_and_lets_the_next_one_through():
    pool = MemoryPool(100)
    await pool.reserve(50)
    granted: list[int] = []
    async with trio.open_nursery() as nursery:
        large_waiter_scope = trio.CancelScope()
        nursery.start_soon(_cancellable_reserve, pool, 90, large_waiter_scope)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_reserve_then_record, pool, 40, granted)
        await trio.testing.wait_all_tasks_blocked()
        assert granted == []  # behind the 90
        large_waiter_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()  # a failure below must not leave the 40 waiting
    assert granted == [40]
    statistics = pool.statistics()
    assert statistics.bytes_reserved == 90  # 50 + 40: nothing leaked to the cancelled one
    assert statistics.waiters == 0
    assert statistics.bytes_wanted == 0


async def _cancellable_reserve(pool: MemoryPool, byte_count: int, scope: trio.CancelScope):
    with scope:
        await pool.reserve(byte_count)
        raise AssertionError("a cancelled reservation must not be granted")


async def test_reserve_is_a_cancellation_point_even_when_memory_is_free():
    pool = MemoryPool(100)
    with trio.CancelScope() as scope:
        scope.cancel()
        await pool.reserve(10)
    assert scope.cancelled_caught
    assert pool.statistics().bytes_reserved == 0


def test_try_reserve_keeps_the_requested_room_free_and_never_jumps_the_queue():
    pool = MemoryPool(100)
    assert pool.try_reserve(30, keep_free=70)
    assert not pool.try_reserve(1, keep_free=70)
    assert pool.try_reserve(70)
    assert not pool.try_reserve(1)
    assert pool.statistics().bytes_reserved == 100


def test_limits_refuse_a_budget_smaller_than_one_request():
    assert Limits().problems() == []
    too_small = Limits(frame_bytes_max=2 << 20, queued_request_bytes_max=2 << 20)
    assert any("queued_request_bytes_max" in problem for problem in too_small.problems())
    just_enough = Limits(
        frame_bytes_max=2 << 20,
        http_body_bytes_max=1024,
        queued_request_bytes_max=(2 << 20) + 4,
    )
    assert just_enough.problems() == []
    body_too_large = Limits(http_body_bytes_max=512 * 1024 * 1024)
    assert any("http_body_bytes_max" in problem for problem in body_too_large.problems())


def test_the_budget_is_a_limits_setting_of_the_config_file():
    config = build_config({"limits": {"queued_request_bytes_max": 512 * 1024 * 1024}}, {})
    assert config.limits.queued_request_bytes_max == 512 * 1024 * 1024
    with pytest.raises(ConfigError, match="queued_request_bytes_max"):
        build_config({"limits": {"queued_request_bytes_max": 1024 * 1024}}, {})


@pytest.mark.parametrize("byte_count", [0, 101])
async def test_reserving_nothing_or_more_than_the_budget_is_a_programming_error(byte_count):
    with pytest.raises(AssertionError):
        await MemoryPool(100).reserve(byte_count)
