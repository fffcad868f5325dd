"""TrioBridge: asyncio code on the gRPC gateway's thread runs coroutines on the trio loop.

Each test runs an asyncio loop on a worker thread (as the gateway does) and drives the bridge
from there; the trio side is this test's own nursery.
"""

from __future__ import annotations

import asyncio

import pytest
import trio

from broker.gateway.grpc_gateway import GatewayStopping, TrioBridge
from protocol import DwalError, ErrorCode


async def on_asyncio_thread(nursery: trio.Nursery, body):
    """Run `body(bridge)` on a fresh asyncio loop in a worker thread; return its result."""
    token = trio.lowlevel.current_trio_token()

    async def main():
        return await body(TrioBridge(token, nursery, asyncio.get_running_loop()))

    with trio.fail_after(10):
        return await trio.to_thread.run_sync(asyncio.run, main())


async def test_a_result_and_an_exception_cross_over(nursery):
    on_trio_thread = []

    async def double(value: int) -> int:
        await trio.sleep(0)  # a real trio checkpoint: this runs on the trio loop
        on_trio_thread.append(trio.lowlevel.current_task() is not None)
        return value * 2

    async def refuse() -> None:
        raise DwalError(ErrorCode.OFFSET_OUT_OF_RANGE, "not written yet")

    async def body(bridge: TrioBridge):
        result = await bridge.call(double, 21)
        with pytest.raises(DwalError) as raised:
            await bridge.call(refuse)
        return result, raised.value.code

    assert await on_asyncio_thread(nursery, body) == (42, ErrorCode.OFFSET_OUT_OF_RANGE)
    assert on_trio_thread == [True]


async def wait_started(started: trio.Event, token: trio.lowlevel.TrioToken) -> None:
    """On the asyncio side: wait, without polling, until a trio task set `started`."""
    await asyncio.get_running_loop().run_in_executor(
        None, lambda: trio.from_thread.run(started.wait, trio_token=token)
    )


async def test_cancelling_the_asyncio_caller_cancels_the_trio_task(nursery):
    started, ended = trio.Event(), trio.Event()
    token = trio.lowlevel.current_trio_token()

    async def wait_forever() -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            ended.set()

    async def body(bridge: TrioBridge):
        call = asyncio.ensure_future(bridge.call(wait_forever))
        await wait_started(started, token)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        return "caller cancelled"

    assert await on_asyncio_thread(nursery, body) == "caller cancelled"
    with trio.fail_after(5):
        await ended.wait()  # without the bridge's cancel it would wait forever


async def test_a_caller_cancelled_before_its_task_starts_leaves_no_task_running(nursery):
    ended = trio.Event()

    async def work() -> None:
        try:
            await trio.sleep_forever()
        finally:
            ended.set()

    async def body(bridge: TrioBridge):
        call = asyncio.ensure_future(bridge.call(work))
        await asyncio.sleep(0)  # the start is queued on the trio loop; cancel right away
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    await on_asyncio_thread(nursery, body)
    with trio.fail_after(5):
        await ended.wait()  # the task saw that its caller had gone and ended


async def test_a_stopping_gateway_answers_gateway_stopping():
    token = trio.lowlevel.current_trio_token()
    started = trio.Event()

    async def wait_forever() -> None:
        started.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as outer:
        gateway_nurseries: list[trio.Nursery] = []

        async def gateway(task_status=trio.TASK_STATUS_IGNORED):
            async with trio.open_nursery() as gateway_nursery:
                gateway_nurseries.append(gateway_nursery)
                task_status.started()
                await trio.sleep_forever()

        await outer.start(gateway)

        async def main():
            bridge = TrioBridge(token, gateway_nurseries[0], asyncio.get_running_loop())
            call = asyncio.ensure_future(bridge.call(wait_forever))
            await wait_started(started, token)
            # the broker stops: the gateway's nursery is cancelled under a running call
            trio.from_thread.run_sync(outer.cancel_scope.cancel, trio_token=token)
            with pytest.raises(GatewayStopping):
                await asyncio.wait_for(call, 5)
            # and a call made once that nursery has closed is refused the same way
            with pytest.raises(GatewayStopping):
                await asyncio.wait_for(bridge.call(wait_forever), 5)
            return "stopped"

        with trio.CancelScope(shield=True), trio.fail_after(10):
            assert await trio.to_thread.run_sync(asyncio.run, main()) == "stopped"
