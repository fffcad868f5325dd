"""A client that pipelines requests but never reads answers costs the broker a bounded
number of pending replies (holding file slices, not record bytes); when it goes away every
reply is released."""

from __future__ import annotations

import trio
import trio.testing

from broker.config import BrokerConfig
from broker.limits import Limits
from broker.request_handlers import RequestHandlers
from broker.server import NativeServer
from broker.storage import LogConfig
from broker.topic_registry import TopicRegistry
from protocol import ApiKey, Request, build_batch, encode_request


async def test_unread_replies_are_bounded_and_released(nursery, tmp_path):
    limits = Limits(inflight_requests_max=8)
    config = BrokerConfig(
        port=0, data_dir=tmp_path, limits=limits, log_defaults=LogConfig(fsync="never")
    )
    registry = TopicRegistry.open(tmp_path, config.log_defaults, limits)
    try:
        await registry.create_topic("big", 1)
        value = b"v" * 60_000
        for _ in range(40):
            registry.log("big", 0).append(bytearray(build_batch([(1, None, value)] * 10)), now_ms=1)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        server = NativeServer(RequestHandlers(config, registry, advertised_port=0))
        await nursery.start(server.serve, listeners)
        port = listeners[0].socket.getsockname()[1]

        # padding (an unknown field, ignored by the broker) makes the requests outgrow the
        # socket buffers, so the sender must block once the broker stops reading
        fetch = {
            "padding": b"p" * 10_000,
            "max_wait_ms": 0,
            "topics": [
                {
                    "topic": "big",
                    "partitions": [
                        {"partition": 0, "fetch_offset": 0, "max_bytes": 16 * 1024 * 1024}
                    ],
                }
            ],
        }
        frames = b"".join(
            encode_request(
                Request(
                    api_key=ApiKey.FETCH,
                    api_version=0,
                    correlation_id=i,
                    client_id="slow",
                    body=fetch,
                )
            )
            for i in range(2000)
        )
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        sender_blocked = trio.Event()

        async def send_everything() -> None:
            await stream.send_all(frames)  # blocks: the broker stops reading
            sender_blocked.set()

        async with trio.open_nursery() as client_tasks:
            client_tasks.start_soon(send_everything)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            # Each fetch answers ~24 MB; 2000 of them unread would be ~48 GB if buffered.
            pending = server.statistics().replies_pending
            assert 1 <= pending <= limits.inflight_requests_max + 2, pending
            assert not sender_blocked.is_set()
            client_tasks.cancel_scope.cancel()
        await stream.aclose()
        await trio.testing.wait_all_tasks_blocked(cushion=0.1)
        assert server.statistics().connections == 0
        assert server.statistics().replies_pending == 0
    finally:
        registry.close()
