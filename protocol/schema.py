"""A small declarative checker for msgpack bodies.

Decoded msgpack is plain data (dicts, lists, ints, strings); a schema checks its shape and
fills defaults so that handlers can index fields without guarding every access. Checking
raises ProtocolError with the path of the offending field. Unknown fields are ignored, which
lets newer peers add optional fields without breaking older ones.
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import ProtocolError

_REQUIRED = object()


class Schema:
    name = "value"

    def check(self, value: Any, path: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class _Scalar(Schema):
    def __init__(self, kind: type, name: str) -> None:
        self.kind = kind
        self.name = name

    def check(self, value: Any, path: str) -> Any:
        if type(value) is not self.kind:
            raise ProtocolError(f"{path}: expected {self.name}, got {type(value).__name__}")
        return value


INT = _Scalar(int, "integer")
STR = _Scalar(str, "string")
BOOL = _Scalar(bool, "boolean")
BYTES = _Scalar(bytes, "bytes")


class Optional(Schema):
    def __init__(self, inner: Schema) -> None:
        self.inner = inner
        self.name = f"{inner.name} or nil"

    def check(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.check(value, path)


class ListOf(Schema):
    def __init__(self, inner: Schema, length_max: int = 100_000) -> None:
        self.inner = inner
        self.length_max = length_max
        self.name = f"list of {inner.name}"

    def check(self, value: Any, path: str) -> Any:
        if type(value) is not list:
            raise ProtocolError(f"{path}: expected {self.name}, got {type(value).__name__}")
        if len(value) > self.length_max:
            raise ProtocolError(f"{path}: more than {self.length_max} elements")
        return [self.inner.check(item, f"{path}[{index}]") for index, item in enumerate(value)]


class MapOf(Schema):
    """A map with string keys and values of one schema."""

    def __init__(self, inner: Schema, length_max: int = 10_000) -> None:
        self.inner = inner
        self.length_max = length_max
        self.name = f"map of {inner.name}"

    def check(self, value: Any, path: str) -> Any:
        if type(value) is not dict:
            raise ProtocolError(f"{path}: expected {self.name}, got {type(value).__name__}")
        if len(value) > self.length_max:
            raise ProtocolError(f"{path}: more than {self.length_max} entries")
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise ProtocolError(f"{path}: keys must be strings")
            out[key] = self.inner.check(item, f"{path}.{key}")
        return out


class Struct(Schema):
    """A map with named fields; a field is `schema` (required) or `(schema, default)`."""

    def __init__(self, **fields: Schema | tuple[Schema, Any]) -> None:
        self.fields: dict[str, tuple[Schema, Any]] = {
            name: spec if isinstance(spec, tuple) else (spec, _REQUIRED)
            for name, spec in fields.items()
        }
        self.name = "map"

    def check(self, value: Any, path: str) -> dict[str, Any]:
        if type(value) is not dict:
            raise ProtocolError(f"{path}: expected a map, got {type(value).__name__}")
        out = {}
        for name, (schema, default) in self.fields.items():
            if name in value:
                out[name] = schema.check(value[name], f"{path}.{name}")
            elif default is _REQUIRED:
                raise ProtocolError(f"{path}: missing field {name!r}")
            else:
                # A fresh copy: a handler that mutates its body must not change the default.
                out[name] = copy.deepcopy(default) if isinstance(default, (list, dict)) else default
        return out
