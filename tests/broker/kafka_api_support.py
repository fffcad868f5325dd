"""Helpers of the in-process tests of the Kafka listener's API modules: kio requests built
for any version, and answers checked by a kio encode/decode round trip."""

from __future__ import annotations

import io
from typing import Any

from kio.index import load_request_schema, load_response_schema
from kio.serial import entity_reader, entity_writer

from broker.gateway.kafka_entities import KafkaApi, element, make


def versions_of(apis: list[KafkaApi], api_key: int) -> list[int]:
    """Every version of `api_key` that `apis` advertise."""
    (api,) = [api for api in apis if api.api_key == api_key]
    return list(range(api.min_version, api.max_version + 1))


def request(api_key: int, version: int, **values: Any) -> Any:
    return make(load_request_schema(api_key, version), **values)


def nested(api_key: int, version: int, *path: str, **values: Any) -> Any:
    """An entity of the request's nested type at `path` (field names, outermost first)."""
    kind = load_request_schema(api_key, version)
    for name in path:
        kind = element(kind, name)
    return make(kind, **values)


def round_trip(response: Any, api_key: int, version: int) -> Any:
    """`response`, checked to be the version's response type and to survive kio's encoding
    and decoding unchanged (a field of the wrong type fails here, not in a client)."""
    response_type = load_response_schema(api_key, version)
    assert type(response) is response_type
    buffer = io.BytesIO()
    entity_writer(response_type)(buffer, response)
    decoded, end = entity_reader(response_type)(memoryview(buffer.getvalue()), 0)
    assert end == len(buffer.getvalue())
    assert decoded == response
    return decoded
