"""Helpers shared by the tests in tests/broker: request handlers on real storage and a call of
the JSON API with a JSON body."""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Iterator
from typing import Any

from broker.config import BrokerConfig
from broker.gateway.json_api import ApiRequest, ApiResponse, JsonApi
from broker.limits import Limits
from broker.request_handlers import RequestHandlers
from broker.storage import LogConfig
from broker.topic_registry import TopicRegistry


@contextlib.contextmanager
def real_request_handlers(
    data_dir: pathlib.Path, log_config: LogConfig
) -> Iterator[RequestHandlers]:
    """RequestHandlers over a TopicRegistry in `data_dir`, closed when the block exits."""
    registry = TopicRegistry.open(data_dir, log_config, Limits())
    config = BrokerConfig(data_dir=data_dir, log_defaults=log_config)
    try:
        yield RequestHandlers(config, registry, advertised_port=0)
    finally:
        registry.close()


async def call(api: JsonApi, method: str, target: str, body: Any = b"") -> ApiResponse:
    """`body` as is if bytes, else encoded as JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await api.handle(ApiRequest(method=method, target=target, body=data))
