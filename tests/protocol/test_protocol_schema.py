"""Body schemas: valid bodies pass with defaults filled; a wrong field is named by its path.

Strategies are derived from the schemas themselves, so an api added to `REQUESTS` or
`RESPONSES` is covered without touching this file.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocol_strategies import INT64_MAX, INT64_MIN, fast, msgpack_decoded_values

import protocol
from protocol.api import REQUESTS, RESPONSES
from protocol.schema import (
    _REQUIRED,
    BOOL,
    BYTES,
    INT,
    STR,
    ListOf,
    MapOf,
    Optional,
    Schema,
    Struct,
)

UNKNOWN_FIELD = "zz_field_from_a_newer_peer"

SIDES: list[tuple[str, dict[protocol.ApiKey, Struct], Callable[..., Any]]] = [
    ("request", REQUESTS, protocol.check_request),
    ("response", RESPONSES, protocol.check_response),
]
ALL_SCHEMAS = [(api_key, schemas, check) for side, schemas, check in SIDES for api_key in schemas]
# One property over every schema, rather than one per schema: the same coverage for less time.
schema_cases = st.sampled_from(ALL_SCHEMAS)


def test_every_api_has_both_schemas_and_a_version_range():
    assert set(REQUESTS) == set(protocol.ApiKey)
    assert set(RESPONSES) == set(protocol.ApiKey)
    assert set(protocol.API_VERSIONS) == set(protocol.ApiKey)
    for low, high in protocol.API_VERSIONS.values():
        assert 0 <= low <= high


def valid_values(schema: Schema) -> st.SearchStrategy[Any]:
    """Values that `schema` accepts, with optional fields sometimes left out."""
    if schema is INT:
        return st.integers(INT64_MIN, INT64_MAX)
    if schema is STR:
        return st.text(max_size=6)
    if schema is BOOL:
        return st.booleans()
    if schema is BYTES:
        return st.binary(max_size=6)
    if isinstance(schema, Optional):
        return st.none() | valid_values(schema.inner)
    if isinstance(schema, ListOf):
        return st.lists(valid_values(schema.inner), max_size=min(3, schema.length_max))
    if isinstance(schema, MapOf):
        return st.dictionaries(st.text(max_size=5), valid_values(schema.inner), max_size=3)
    if isinstance(schema, Struct):
        required = {}
        optional = {}
        for name, (field_schema, default) in schema.fields.items():
            target = optional if is_defaulted(schema, name) else required
            target[name] = valid_values(field_schema)
        unknown = st.dictionaries(st.just(UNKNOWN_FIELD), st.integers(), max_size=1)
        return st.tuples(st.fixed_dictionaries(required, optional=optional), unknown).map(
            lambda parts: {**parts[0], **parts[1]}
        )
    raise AssertionError(f"no strategy for schema {schema!r}")


def is_defaulted(struct: Struct, name: str) -> bool:
    return struct.fields[name][1] is not _REQUIRED


def expected_check(schema: Schema, value: Any) -> Any:
    """What checking a valid `value` must return: known fields only, defaults filled."""
    if isinstance(schema, Optional):
        return None if value is None else expected_check(schema.inner, value)
    if isinstance(schema, ListOf):
        return [expected_check(schema.inner, item) for item in value]
    if isinstance(schema, MapOf):
        return {key: expected_check(schema.inner, item) for key, item in value.items()}
    if isinstance(schema, Struct):
        return {
            name: expected_check(field_schema, value[name]) if name in value else default
            for name, (field_schema, default) in schema.fields.items()
        }
    return value


@given(case=schema_cases, data=st.data())
@fast(300)
def test_valid_bodies_pass_with_defaults_filled(case, data):
    api_key, schemas, check = case
    schema = schemas[api_key]
    body = data.draw(valid_values(schema), label="body")
    original = copy.deepcopy(body)

    checked = check(api_key, body)

    assert checked == expected_check(schema, body)
    assert set(checked) == set(schema.fields)
    assert UNKNOWN_FIELD not in checked
    assert body == original  # checking never mutates the peer's data


# --- one wrong field -----------------------------------------------------------------------


def wrong_values(schema: Schema) -> list[Any]:
    """Values of the wrong type for `schema` (never None for an Optional)."""
    if isinstance(schema, Optional):
        return [v for v in wrong_values(schema.inner) if v is not None]
    if schema is INT:
        return [True, False, "1", 1.0, b"1", None, [1]]
    if schema is STR:
        return [1, b"s", None, ["s"], True]
    if schema is BOOL:
        return [0, 1, "true", None]
    if schema is BYTES:
        return ["b", 1, None, bytearray(b"b")]
    if isinstance(schema, ListOf):
        return [{}, "x", None, 0]
    if isinstance(schema, MapOf):
        return [[], "x", None, {1: "v"}, {b"k": "v"}]
    if isinstance(schema, Struct):
        return [[], "x", None, 0]
    raise AssertionError(f"no wrong values for schema {schema!r}")


def locations(schema: Schema, value: Any, path: str, parent: Any, key: Any):
    """Yield (path, schema, parent container, key) for every checked place in `value`."""
    yield path, schema, parent, key
    yield from inner_locations(schema, value, path)


def inner_locations(schema: Schema, value: Any, path: str):
    if isinstance(schema, Optional):
        # The place itself was yielded as Optional (None is valid there); go straight inside.
        if value is not None:
            yield from inner_locations(schema.inner, value, path)
    elif isinstance(schema, ListOf):
        for index, item in enumerate(value):
            yield from locations(schema.inner, item, f"{path}[{index}]", value, index)
    elif isinstance(schema, MapOf):
        for name, item in value.items():
            yield from locations(schema.inner, item, f"{path}.{name}", value, name)
    elif isinstance(schema, Struct):
        for name, (field_schema, _) in schema.fields.items():
            if name in value:
                yield from locations(field_schema, value[name], f"{path}.{name}", value, name)


@given(case=schema_cases, data=st.data())
@fast(500)
def test_a_wrong_type_is_reported_with_its_path(case, data):
    api_key, schemas, check = case
    schema = schemas[api_key]
    body = data.draw(valid_values(schema), label="body")
    root = [body]
    places = list(locations(schema, body, api_key.name.lower(), root, 0))
    path, place_schema, parent, key = data.draw(st.sampled_from(places), label="place")
    wrong = data.draw(st.sampled_from(wrong_values(place_schema)), label="wrong")
    parent[key] = wrong

    with pytest.raises(protocol.ProtocolError) as raised:
        check(api_key, root[0])
    assert str(raised.value).startswith(f"{path}:"), (path, str(raised.value))


@given(case=schema_cases, data=st.data())
@fast(300)
def test_a_missing_required_field_is_reported_with_its_path(case, data):
    api_key, schemas, check = case
    schema = schemas[api_key]
    body = data.draw(valid_values(schema), label="body")
    structs = [
        (path, place_schema, parent[key])
        for path, place_schema, parent, key in locations(
            schema, body, api_key.name.lower(), [body], 0
        )
        if isinstance(place_schema, Struct)
        and any(not is_defaulted(place_schema, name) for name in place_schema.fields)
    ]
    if not structs:
        return  # every field of this schema has a default
    path, struct, value = data.draw(st.sampled_from(structs), label="struct")
    name = data.draw(
        st.sampled_from([n for n in struct.fields if not is_defaulted(struct, n)]), label="field"
    )
    del value[name]

    with pytest.raises(protocol.ProtocolError) as raised:
        check(api_key, body)
    assert str(raised.value) == f"{path}: missing field {name!r}"


@given(case=schema_cases, value=msgpack_decoded_values)
@fast(300)
def test_random_values_into_every_schema(case, value):
    api_key, schemas, check = case
    try:
        checked = check(api_key, value)
    except protocol.ProtocolError:
        return
    assert type(checked) is dict
    assert set(checked) == set(schemas[api_key].fields)


def test_bool_is_not_an_int_in_a_nested_field():
    body = {"topics": [{"topic": "t", "partitions": [{"partition": True, "fetch_offset": 0}]}]}
    with pytest.raises(protocol.ProtocolError) as raised:
        protocol.check_request(protocol.ApiKey.FETCH, body)
    assert str(raised.value) == (
        "fetch.topics[0].partitions[0].partition: expected integer, got bool"
    )
    body["topics"][0]["partitions"][0]["partition"] = 1
    checked = protocol.check_request(protocol.ApiKey.FETCH, body)
    assert checked["topics"][0]["partitions"][0] == {
        "partition": 1,
        "fetch_offset": 0,
        "max_bytes": 1024 * 1024,
        "current_leader_epoch": -1,
        "last_fetched_epoch": -1,
    }
    assert checked["max_wait_ms"] == 500


def test_list_length_limit():
    with pytest.raises(protocol.ProtocolError, match="more than 1000"):
        protocol.check_request(protocol.ApiKey.DELETE_TOPICS, {"topics": ["t"] * 1001})
    checked = protocol.check_request(protocol.ApiKey.DELETE_TOPICS, {"topics": ["t"] * 1000})
    assert len(checked["topics"]) == 1000


def test_defaults_are_not_shared_between_checked_bodies():
    first = protocol.check_request(protocol.ApiKey.ALTER_CONFIGS, {"topic": "a"})
    first["set"]["retention.ms"] = "1"
    first["delete"].append("cleanup.policy")
    second = protocol.check_request(protocol.ApiKey.ALTER_CONFIGS, {"topic": "b"})
    assert second["set"] == {}
    assert second["delete"] == []


def test_check_tail_sizes():
    protocol.check_tail_sizes([], 0)
    protocol.check_tail_sizes([3, 0, 4], 7)
    with pytest.raises(protocol.ProtocolError):
        protocol.check_tail_sizes([3, 4], 8)
    with pytest.raises(protocol.ProtocolError):
        protocol.check_tail_sizes([8, -1], 7)
