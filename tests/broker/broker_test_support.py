"""Helpers shared by the tests in tests/broker: a whole broker node in process (its embedded
single-voter controller, publisher, registry, coordinator and handlers: the production code
path, without sockets), request handlers on real storage, and a call of the JSON API with a
JSON body."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from broker.config import BrokerConfig
from broker.gateway.json_api import ApiRequest, ApiResponse, JsonApi
from broker.node import BrokerNode, open_broker_node
from broker.raft import durable_storage
from broker.request_handlers import RequestContext, RequestHandlers
from broker.storage import LogConfig
from protocol import ApiKey, DwalError, ErrorCode, check_request

TEST_CONTEXT = RequestContext(client_id="test", client_host="127.0.0.1")


@contextlib.asynccontextmanager
async def running_node(
    data_dir: pathlib.Path, log_config: LogConfig | None = None, **config: Any
) -> AsyncIterator[BrokerNode]:
    """A broker node over `data_dir` (no listeners), stopped when the block exits. `config`:
    BrokerConfig fields (port=0, http_port=-1, grpc_port=-1 unless given)."""
    settings: dict[str, Any] = {"port": 0, "http_port": -1, "grpc_port": -1, **config}
    if log_config is not None:
        settings["log_defaults"] = log_config
    broker_config = BrokerConfig(data_dir=data_dir, **settings)
    async with open_broker_node(broker_config, native_port=9092) as node:
        yield node


@contextlib.asynccontextmanager
async def real_request_handlers(
    data_dir: pathlib.Path, log_config: LogConfig
) -> AsyncIterator[RequestHandlers]:
    """RequestHandlers of a running node in `data_dir`, stopped when the block exits."""
    async with running_node(data_dir, log_config) as node:
        yield node.handlers


async def create_topic(
    node: BrokerNode, name: str, partitions: int = 1, configs: dict[str, str] | None = None
) -> None:
    """Create a topic through the node's handlers (the controller); raise DwalError if refused."""
    body = check_request(
        ApiKey.CREATE_TOPICS,
        {"topics": [{"topic": name, "partitions": partitions, "configs": configs or {}}]},
    )
    reply = await node.handlers.create_topics(body, b"", TEST_CONTEXT)
    result = reply.body["topics"][0]
    if result["error_code"]:
        raise DwalError(ErrorCode(result["error_code"]), result.get("error_message"))


async def call(api: JsonApi, method: str, target: str, body: Any = b"") -> ApiResponse:
    """`body` as is if bytes, else encoded as JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await api.handle(ApiRequest(method=method, target=target, body=data))


async def create_topic_on(
    handlers: RequestHandlers,
    name: str,
    partitions: int = 1,
    configs: dict[str, str] | None = None,
) -> None:
    """`create_topic` for a test that holds only the node's handlers."""
    body = check_request(
        ApiKey.CREATE_TOPICS,
        {"topics": [{"topic": name, "partitions": partitions, "configs": configs or {}}]},
    )
    reply = await handlers.create_topics(body, b"", TEST_CONTEXT)
    result = reply.body["topics"][0]
    if result["error_code"]:
        raise DwalError(ErrorCode(result["error_code"]), result.get("error_message"))


_REAL_FDATASYNC = os.fdatasync  # captured before any test replaces os.fdatasync


class _OsWithRealFdatasync:
    """The `os` module, but for a real fdatasync whatever a test puts in `os.fdatasync`."""

    fdatasync = staticmethod(_REAL_FDATASYNC)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def partition_fdatasyncs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the metadata log's fdatasyncs real (and out of sight) while a test replaces
    `os.fdatasync` (the `fdatasync_spy` fixture): a spy then sees, counts and holds only
    the partition logs', and holding them never stalls the node's controller."""
    monkeypatch.setattr(durable_storage, "os", _OsWithRealFdatasync())


@contextlib.contextmanager
def at_real_pace() -> Iterator[None]:
    """Within the block, an autojumping MockClock runs at the real clock's pace and does not
    jump (a no-op under any other clock). A node's controller calls, registration and
    heartbeats time out in trio time, and the metadata log's fsyncs run in worker threads:
    while one runs the event loop looks idle to autojump, which would jump past those
    deadlines. Start nodes and change metadata inside; measure virtual time outside."""
    clock = trio.lowlevel.current_clock()
    if not isinstance(clock, trio.testing.MockClock):
        yield
        return
    rate, threshold = clock.rate, clock.autojump_threshold
    clock.autojump_threshold = math.inf
    clock.rate = 1.0
    try:
        yield
    finally:
        clock.rate = rate
        clock.autojump_threshold = threshold
