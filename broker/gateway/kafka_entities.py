"""Kafka messages as kio entities: building responses for any version, and the contract
between the Kafka listener (`broker.gateway.kafka_gateway`) and the modules that answer its
APIs (`kafka_apis`, `kafka_admin_apis`, `kafka_group_apis`).

kio generates one frozen dataclass per message, version and nested struct from Kafka's own
JSON schemas. Versions differ by fields, so an answer built with `make` names the superset of
fields it knows and each version keeps the ones it has; a field the caller leaves out and
the version requires gets its type's zero (0, "", False, (), None for nullable, a zero
timedelta, ErrorCode.none). `element(cls, "topics")` is the entity type of a tuple field's
items, so nested answers are built the same way at every version.

An API module exports `APIS`, a list of `KafkaApi`: the key, the version range it answers,
and an async handler taking a `KafkaContext` and the decoded request entity and returning the
response entity of the same version (`ctx.response_type`). A handler reports every failure
that concerns one topic, partition or group in that entry's error code; an exception it
raises is answered by the listener with a response whose error codes all say
UNKNOWN_SERVER_ERROR (or the DwalError's code), which only APIs with such fields can carry.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import types
import typing
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kio.index import load_request_schema, load_response_schema
from kio.schema.errors import ErrorCode as KafkaErrorCode

from protocol import DwalError, ErrorCode

from broker.request_handlers import RequestContext

if TYPE_CHECKING:
    from broker.request_handlers import RequestHandlers

KAFKA_LISTENER = "KAFKA"  # the listener name a broker registers in the cluster metadata

_KAFKA_CODES = {int(code) for code in KafkaErrorCode}


def kafka_error(code: int) -> KafkaErrorCode:
    """Kafka's error code for a DWAL one: the same number where Kafka has it (DWAL reuses
    Kafka's numbers), UNKNOWN_SERVER_ERROR for DWAL's own (1000 and up)."""
    code = int(code)
    if code in _KAFKA_CODES:
        return KafkaErrorCode(code)
    return KafkaErrorCode.unknown_server_error


def error_of(error: BaseException) -> tuple[KafkaErrorCode, str]:
    """The Kafka error code and message for an exception raised while answering."""
    if isinstance(error, DwalError):
        return kafka_error(error.code), error.message
    return KafkaErrorCode.unknown_server_error, f"{type(error).__name__}: {error}"


@functools.cache
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _zero(kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if type(None) in typing.get_args(kind):
            return None
        return _zero(typing.get_args(kind)[0])
    if origin is tuple:
        return ()
    if isinstance(kind, type):
        if issubclass(kind, KafkaErrorCode):
            return KafkaErrorCode.none
        if issubclass(kind, bool):
            return False
        if issubclass(kind, int):
            return kind(0) if kind is not int else 0
        if issubclass(kind, str):
            return ""
        if issubclass(kind, bytes):
            return b""
        if issubclass(kind, datetime.timedelta):
            return datetime.timedelta(0)
        if issubclass(kind, uuid.UUID):
            return uuid.UUID(int=0)
        if issubclass(kind, datetime.datetime):
            return datetime.datetime.fromtimestamp(0, datetime.timezone.utc)
    raise TypeError(f"no zero value for {kind!r}")


def make(cls: type, **values: Any) -> Any:
    """An entity of type `cls` from the superset of fields `values`: those the version lacks
    are dropped, required ones not given take their type's zero."""
    known = _fields(cls)
    kwargs: dict[str, Any] = {}
    for name, spec in known.items():
        if name in values:
            kwargs[name] = values[name]
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            kwargs[name] = _zero(_hints(cls)[name])
    return cls(**kwargs)


def has_field(cls: type, name: str) -> bool:
    return name in _fields(cls)


@functools.cache
def element(cls: type, name: str) -> type:
    """The entity type of the items of `cls`'s tuple field `name` (nullable or not)."""
    kind = _hints(cls)[name]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    args = typing.get_args(kind)
    if typing.get_origin(kind) is not tuple or not args:
        raise TypeError(f"{cls.__name__}.{name} is not a tuple field")
    return args[0]


def ms(value: datetime.timedelta | int) -> int:
    """Milliseconds of a kio duration field (kio decodes timedelta_i32/i64 to timedelta)."""
    if isinstance(value, datetime.timedelta):
        return int(value / datetime.timedelta(milliseconds=1))
    return int(value)


def duration(milliseconds: int) -> datetime.timedelta:
    return datetime.timedelta(milliseconds=milliseconds)


@functools.cache
def request_type(api_key: int, version: int) -> type:
    return load_request_schema(api_key, version)


@functools.cache
def response_type(api_key: int, version: int) -> type:
    return load_response_schema(api_key, version)


@dataclass
class KafkaContext:
    """What a handler knows of the request it answers."""

    handlers: RequestHandlers
    api_key: int
    api_version: int
    client_id: str
    client_host: str

    @property
    def response_type(self) -> type:
        return response_type(self.api_key, self.api_version)

    def request_context(self) -> RequestContext:
        """Who sent the request, as the broker's own handlers take it."""
        return RequestContext(client_id=self.client_id, client_host=self.client_host)

    def kafka_address(self, node_id: int) -> tuple[str, int] | None:
        """Where a broker's Kafka listener is, from the metadata image (None: the broker is
        unknown or serves no Kafka listener)."""
        image = self.handlers.member.image
        broker = image.brokers.get(node_id)
        if broker is None:
            return None
        for listener in broker.listeners:
            if listener.name == KAFKA_LISTENER:
                return listener.host, listener.port
        return None

    def error_code(self, code: int | ErrorCode) -> KafkaErrorCode:
        return kafka_error(code)


KafkaHandler = Callable[[KafkaContext, Any], Awaitable[Any]]


@dataclass(frozen=True)
class KafkaApi:
    api_key: int
    min_version: int
    max_version: int
    handle: KafkaHandler
    # True: the whole handler runs in its own task (it waits: a Fetch's long poll, a
    # JoinGroup's barrier) while the connection reads on; its answer still leaves in order.
    # False: it runs in the connection's reader, so its effects are in request order.
    concurrent: bool = False


@dataclass(frozen=True)
class Later:
    """What a handler of an ordered API returns when its ordered part is done and the rest
    (a wait) may run concurrently: `finish()` returns the response entity. `send` False: no
    answer is written (a Produce with acks=0)."""

    finish: Callable[[], Awaitable[Any]]
    send: bool = True
