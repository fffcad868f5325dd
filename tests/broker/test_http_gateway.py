"""Tests of the HTTP gateway: the JSON API on an in-memory stand-in for the broker, the h11
shell over real 127.0.0.1 sockets and in-memory streams, and end to end on real storage.

Clients speak HTTP through h11's client side (raw bytes only where a test needs to
misbehave). Nothing sleeps: tests wait on responses, on end of stream, or on the channel that
reports a connection task's end; timeouts run on trio's autojump MockClock.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import socket
import struct
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import h11
import pytest
import trio
import trio.testing
from broker_test_support import call, create_topic_on, real_request_handlers

from broker.gateway.api_error import status_for_error_code
from broker.gateway.http_gateway import HttpGateway, serve_http
from broker.gateway.json_api import ApiRequest, ApiResponse, JsonApi
from broker.gateway.json_records import partition_for_key
from broker.limits import Limits
from broker.memory_pool import MemoryPool
from broker.storage import LogConfig
from protocol import ACKS_ALL, ACKS_LEADER, DwalError, ErrorCode, decode_records, parse_header

pytestmark = pytest.mark.timeout(60)

VALUE = "BLA1234567FOOBAR"
CLOCK_MS = 1_700_000_000_000

# -- an in-memory stand-in for RequestHandlers ---------------------------------------------


class FakeLog:
    """Batches with broker-assigned base offsets; reads return whole batches like storage."""

    def __init__(self) -> None:
        self.batches: list[bytes] = []
        self.high_watermark = 0
        self.log_start_offset = 0

    def append(self, batch: bytes) -> int:
        base_offset = self.high_watermark
        self.batches.append(struct.pack(">q", base_offset) + batch[8:])
        self.high_watermark += parse_header(batch).record_count
        return base_offset

    def read(self, offset: int, max_bytes: int) -> bytes:
        out = bytearray()
        for batch in self.batches:
            header = parse_header(batch)
            if header.next_offset <= max(offset, self.log_start_offset):
                continue
            if out and len(out) + len(batch) > max_bytes:
                break
            out += batch
        return bytes(out)

    def read_batch_containing(self, offset: int) -> bytes | None:
        """The batch holding `offset`, with the range errors of the real storage."""
        if offset < self.log_start_offset:
            raise DwalError(
                ErrorCode.OFFSET_OUT_OF_RANGE,
                f"offset {offset} was deleted by retention; the log now starts at offset "
                f"{self.log_start_offset}",
            )
        if offset >= self.high_watermark:
            raise DwalError(
                ErrorCode.OFFSET_OUT_OF_RANGE,
                f"offset {offset} has not been written yet (high watermark {self.high_watermark})",
            )
        for batch in self.batches:
            header = parse_header(batch)
            if header.base_offset <= offset <= header.last_offset:
                return batch
        return None


class FakeRegistry:
    def __init__(self) -> None:
        self.topics: dict[str, SimpleNamespace] = {}
        self.logs: dict[tuple[str, int], FakeLog] = {}

    async def create_topic(self, name: str, partitions: int) -> SimpleNamespace:
        await trio.lowlevel.checkpoint()
        if name in self.topics:
            raise DwalError(ErrorCode.TOPIC_ALREADY_EXISTS, f"topic {name!r} already exists")
        self.topics[name] = SimpleNamespace(name=name, partitions=partitions)
        for partition in range(partitions):
            self.logs[(name, partition)] = FakeLog()
        return self.topics[name]

    def topic(self, name: str) -> SimpleNamespace:
        if name not in self.topics:
            raise DwalError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"unknown topic {name!r}")
        return self.topics[name]

    def log(self, name: str, partition: int) -> FakeLog:
        self.topic(name)
        if (name, partition) not in self.logs:
            raise DwalError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"no partition {partition}")
        return self.logs[(name, partition)]


@dataclass
class FakeHandlers:
    limits: Limits = field(default_factory=Limits)
    auto_create_topics: bool = False
    registry: FakeRegistry = field(default_factory=FakeRegistry)
    appends: list[tuple[str, int, int]] = field(default_factory=list)  # topic, partition, acks
    failures: dict[tuple[str, int], Exception] = field(default_factory=dict)

    @property
    def config(self) -> SimpleNamespace:
        return SimpleNamespace(
            limits=self.limits, auto_create_topics=self.auto_create_topics, default_partitions=2
        )

    async def ensure_topic(self, name: str, partitions: int) -> None:
        if name in self.registry.topics:
            await trio.lowlevel.checkpoint()
            return
        await self.registry.create_topic(name, partitions)

    def partition_count(self, topic: str) -> int:
        return self.registry.topic(topic).partitions

    async def readable_range(self, topic: str, partition: int) -> tuple[int, int]:
        log = self.registry.log(topic, partition)
        return log.log_start_offset, log.high_watermark

    async def append_batch(
        self, topic: str, partition: int, batch: bytes, *, acks: int, timeout_ms: int
    ) -> int:
        await trio.lowlevel.checkpoint()
        if (topic, partition) in self.failures:
            raise self.failures[(topic, partition)]
        log = self.registry.log(topic, partition)
        self.appends.append((topic, partition, acks))
        return log.append(batch)

    async def read_batches(self, topic: str, partition: int, offset: int, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.registry.log(topic, partition).read(offset, max_bytes)

    async def read_batch_containing(self, topic: str, partition: int, offset: int) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self.registry.log(topic, partition).read_batch_containing(offset)


def make_api(handlers: FakeHandlers) -> JsonApi:
    return JsonApi(handlers, clock_ms=lambda: CLOCK_MS)  # type: ignore[arg-type]


def assert_error(response: ApiResponse, status: int, code: ErrorCode | None = None) -> str:
    assert response.status == status, response
    assert isinstance(response.body["error"], str) and response.body["error"]
    if code is not None:
        assert response.body["error_code"] == code.name
    return response.body["error"]


async def make_topic(handlers: FakeHandlers, name: str, partitions: int) -> None:
    await handlers.registry.create_topic(name, partitions)


# -- the original WAL service ------------------------------------------------------------


async def test_wal_post_then_get_round_trips_offsets_0_1_2():
    handlers = FakeHandlers()
    api = make_api(handlers)
    for expected in range(3):
        response = await call(api, "POST", "/", {"record": {"value": f"{VALUE}{expected}"}})
        assert (response.status, response.body) == (200, {"offset": expected})
    for offset in range(3):
        response = await call(api, "GET", "/", {"offset": offset})
        assert response.status == 200
        assert response.body == {"record": {"value": f"{VALUE}{offset}", "offset": offset}}
    assert handlers.registry.topics["wal"].partitions == 1
    assert handlers.appends == [("wal", 0, ACKS_ALL)] * 3  # the WAL is acks=all


async def test_wal_post_stores_utf8_value_key_and_timestamp():
    handlers = FakeHandlers()
    api = make_api(handlers)
    response = await call(api, "POST", "/", {"record": {"value": "héllo ✓", "key": "k"}})
    assert response.status == 200
    [record] = decode_records(handlers.registry.log("wal", 0).read(0, 1 << 20))
    assert (record.key, record.value, record.timestamp) == (b"k", "héllo ✓".encode(), CLOCK_MS)
    response = await call(api, "GET", "/", {"offset": 0})
    assert response.body == {"record": {"value": "héllo ✓", "offset": 0, "key": "k"}}


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"\xff\xfe{}",
        b'{"record": {"value": NaN}}',
        b"[" * 100_000 + b"]" * 100_000,
        b"[]",
        b'{"value": "x"}',
        b'{"record": "x"}',
        b'{"record": {}}',
        b'{"record": {"value": 5}}',
        b'{"record": {"value": null}}',
        b'{"record": {"value": {"a": 1}}}',
        b'{"record": {"value": "x", "key": 7}}',
        b'{"record": {"value": "x", "extra": 1}}',
        b'{"record": {"value": "x"}, "extra": 1}',
        b'{"record": {"value": "\\ud800"}}',
    ],
)
async def test_wal_post_rejects_bad_bodies_with_400(body):
    handlers = FakeHandlers()
    response = await call(make_api(handlers), "POST", "/", body)
    assert_error(response, 400, ErrorCode.INVALID_REQUEST)
    assert handlers.appends == []


async def test_wal_post_errors_name_the_missing_field():
    api = make_api(FakeHandlers())
    assert "record" in assert_error(await call(api, "POST", "/", {"value": "x"}), 400)
    assert "value" in assert_error(await call(api, "POST", "/", {"record": {}}), 400)
    assert "offset" in assert_error(await call(api, "GET", "/", {}), 400)


@pytest.mark.parametrize(
    "body",
    [
        b'{"offset": -1}',
        b'{"offset": 1.5}',
        b'{"offset": 1.0}',
        b'{"offset": "1"}',
        b'{"offset": true}',
        b'{"offset": null}',
        b"{}",
        b"",
        b"nope",
        b"[0]",
    ],
)
async def test_wal_get_rejects_bad_offsets_with_400(body):
    handlers = FakeHandlers()
    api = make_api(handlers)
    await call(api, "POST", "/", {"record": {"value": VALUE}})
    assert_error(await call(api, "GET", "/", body), 400, ErrorCode.INVALID_REQUEST)


async def test_wal_get_unwritten_offset_is_404():
    api = make_api(FakeHandlers())
    message = assert_error(
        await call(api, "GET", "/", {"offset": 0}), 404, ErrorCode.OFFSET_OUT_OF_RANGE
    )
    assert "empty" in message
    await call(api, "POST", "/", {"record": {"value": VALUE}})
    assert (await call(api, "GET", "/", {"offset": 0})).status == 200
    message = assert_error(
        await call(api, "GET", "/", {"offset": 1}), 404, ErrorCode.OFFSET_OUT_OF_RANGE
    )
    assert "not been written" in message


async def test_wal_get_offset_deleted_by_retention_is_404_saying_so():
    handlers = FakeHandlers()
    api = make_api(handlers)
    for _ in range(3):
        await call(api, "POST", "/", {"record": {"value": VALUE}})
    handlers.registry.log("wal", 0).log_start_offset = 2
    message = assert_error(await call(api, "GET", "/", {"offset": 1}), 404)
    assert "retention" in message and "starts at offset 2" in message
    assert (await call(api, "GET", "/", {"offset": 2})).status == 200


async def test_wal_get_finds_a_record_inside_a_batch_that_starts_before_it():
    handlers = FakeHandlers()
    api = make_api(handlers)
    await make_topic(handlers, "wal", 1)
    records = [{"value": f"v{i}"} for i in range(5)]
    assert (await call(api, "POST", "/topics/wal/records", records)).status == 200
    assert len(handlers.registry.log("wal", 0).batches) == 1
    response = await call(api, "GET", "/", {"offset": 3})
    assert response.body == {"record": {"value": "v3", "offset": 3}}


async def test_wal_get_accepts_the_offset_in_the_query_when_the_body_is_empty():
    api = make_api(FakeHandlers())
    await call(api, "POST", "/", {"record": {"value": VALUE}})
    response = await call(api, "GET", "/?offset=0")
    assert response.body == {"record": {"value": VALUE, "offset": 0}}
    assert_error(await call(api, "GET", "/?offset=0", {"offset": 0}), 400)
    assert_error(await call(api, "GET", "/?offset=-1"), 400)


# -- routing and error mapping ------------------------------------------------------------


@pytest.mark.parametrize(
    "target", ["/nope", "/topics", "/topics/t", "/topics/t/records/x", "/healthz/", "//"]
)
async def test_unknown_path_is_404(target):
    assert_error(await call(make_api(FakeHandlers()), "GET", target), 404)


@pytest.mark.parametrize(
    "method, target, allow",
    [
        ("DELETE", "/", "GET, POST"),
        ("PUT", "/", "GET, POST"),
        ("POST", "/healthz", "GET"),
        ("GET", "/topics/t/records", "POST"),
        ("POST", "/topics/t/partitions/0/records", "GET"),
    ],
)
async def test_unsupported_method_is_405_with_allow_header(method, target, allow):
    response = await call(make_api(FakeHandlers()), method, target)
    assert_error(response, 405)
    assert dict(response.headers)["allow"] == allow


async def test_healthz():
    response = await call(make_api(FakeHandlers()), "GET", "/healthz")
    assert (response.status, response.body) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    "code, status",
    [
        (ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, 404),
        (ErrorCode.MESSAGE_TOO_LARGE, 413),
        (ErrorCode.INVALID_RECORD, 400),
        (ErrorCode.INVALID_REQUIRED_ACKS, 400),
        (ErrorCode.REQUEST_TIMED_OUT, 503),
        (ErrorCode.KAFKA_STORAGE_ERROR, 503),
        (ErrorCode.CORRUPT_MESSAGE, 500),
        (ErrorCode.UNKNOWN_SERVER_ERROR, 500),
    ],
)
async def test_broker_errors_map_to_http_statuses(code, status):
    handlers = FakeHandlers()
    await make_topic(handlers, "wal", 1)
    handlers.failures[("wal", 0)] = DwalError(code, "it went wrong")
    response = await call(make_api(handlers), "POST", "/", {"record": {"value": VALUE}})
    assert response.status == status
    assert response.body == {"error": "it went wrong", "error_code": code.name}


def test_every_error_code_maps_to_an_error_status():
    for code in ErrorCode:
        if code == ErrorCode.NONE:
            continue
        status = status_for_error_code(code)
        assert 400 <= status <= 599, code
        if code.retriable and code != ErrorCode.CORRUPT_MESSAGE:
            assert status == 503, code


# -- REST: produce -----------------------------------------------------------------------


async def test_rest_produce_partitions_keyed_records_by_murmur2_of_the_key():
    handlers = FakeHandlers()
    api = make_api(handlers)
    await make_topic(handlers, "events", 4)
    keys = ["alpha", "epsilon", "gamma", "alpha", "delta"]  # partitions 0, 1, 2, 0, 2
    body = {"records": [{"key": key, "value": f"v{i}"} for i, key in enumerate(keys)]}
    response = await call(api, "POST", "/topics/events/records", body)
    assert response.status == 200
    offsets = response.body["offsets"]
    assert [entry["partition"] for entry in offsets] == [
        partition_for_key(k.encode(), 4) for k in keys
    ]
    assert offsets[3]["partition"] == offsets[0]["partition"]
    assert offsets[3]["offset"] == offsets[0]["offset"] + 1
    assert len(handlers.appends) == len({partition_for_key(k.encode(), 4) for k in keys})
    for index, entry in enumerate(offsets):  # every record is where the answer says
        data = await handlers.read_batches("events", entry["partition"], entry["offset"], 1 << 20)
        stored = {r.offset: r for r in decode_records(data)}[entry["offset"]]
        assert (stored.key, stored.value) == (keys[index].encode(), f"v{index}".encode())


def test_partition_for_key_is_kafkas_murmur2_modulo_partition_count():
    # Kafka's UtilsTest: murmur2(b"foobar") is -790332482 as a Java int; toPositive clears
    # the sign bit: 1357151166, which is 6 modulo 10. murmur2(b"") is 275646681.
    assert partition_for_key(b"foobar", 10) == 1357151166 % 10 == 6
    assert partition_for_key(b"", 4) == 275646681 % 4 == 1
    assert {partition_for_key(bytes([i]), 5) for i in range(64)} == set(range(5))


async def test_rest_produce_honours_explicit_partitions_and_round_robins_keyless_records():
    handlers = FakeHandlers()
    api = make_api(handlers)
    await make_topic(handlers, "events", 2)
    body = [
        {"value": "a", "partition": 1},
        {"value": "b"},
        {"value": "c"},
        {"value": "d"},
        {"value": "e", "partition": 1},
    ]
    response = await call(api, "POST", "/topics/events/records", body)  # a bare list
    assert response.status == 200
    assert response.body["offsets"] == [
        {"partition": 1, "offset": 0},
        {"partition": 0, "offset": 0},
        {"partition": 1, "offset": 1},
        {"partition": 0, "offset": 1},
        {"partition": 1, "offset": 2},
    ]
    assert sorted(handlers.appends) == [("events", 0, ACKS_LEADER), ("events", 1, ACKS_LEADER)]


async def test_rest_produce_to_a_missing_partition_is_404_and_writes_nothing():
    handlers = FakeHandlers()
    await make_topic(handlers, "events", 2)
    body = {"records": [{"value": "a"}, {"value": "b", "partition": 2}]}
    response = await call(make_api(handlers), "POST", "/topics/events/records", body)
    assert "records[1].partition" in assert_error(
        response, 404, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    )
    assert handlers.appends == []


async def test_rest_produce_to_an_unknown_topic_is_404_unless_auto_create_is_on():
    handlers = FakeHandlers()
    api = make_api(handlers)
    body = {"records": [{"value": "a"}]}
    response = await call(api, "POST", "/topics/nope/records", body)
    assert_error(response, 404, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION)
    assert "nope" not in handlers.registry.topics
    handlers.auto_create_topics = True
    response = await call(api, "POST", "/topics/nope/records", body)
    assert response.status == 200
    assert handlers.registry.topics["nope"].partitions == 2


async def test_rest_produce_rejects_an_invalid_topic_name():
    handlers = FakeHandlers()
    handlers.auto_create_topics = True
    response = await call(
        make_api(handlers), "POST", "/topics/bad%20name/records", [{"value": "a"}]
    )
    assert_error(response, 400, ErrorCode.INVALID_TOPIC)
    assert handlers.registry.topics == {}


@pytest.mark.parametrize(
    "body",
    [
        {"records": []},
        {"records": {}},
        {"record": [{"value": "a"}]},
        {},
        "text",
        [{"key": "a"}],
        [{"value": 1}],
        ["a"],
        [{"value": "x", "partition": -1}],
        [{"value": "x", "partition": True}],
        [{"value": "x", "partition": 1.0}],
        [{"value": "x", "headers": []}],
        [{"value": "x", "key": ["k"]}],
    ],
)
async def test_rest_produce_rejects_bad_bodies_with_400(body):
    handlers = FakeHandlers()
    await make_topic(handlers, "events", 2)
    response = await call(make_api(handlers), "POST", "/topics/events/records", body)
    assert_error(response, 400, ErrorCode.INVALID_REQUEST)
    assert handlers.appends == []


async def test_rest_produce_limits_records_per_request():
    handlers = FakeHandlers()
    api = make_api(handlers)
    await make_topic(handlers, "events", 1)
    response = await call(api, "POST", "/topics/events/records", [{"value": ""}] * 10_001)
    assert_error(response, 413, ErrorCode.RECORD_LIST_TOO_LARGE)
    assert handlers.appends == []
    response = await call(api, "POST", "/topics/events/records", [{"value": ""}] * 10_000)
    assert response.status == 200


async def test_rest_produce_reports_per_partition_failures():
    handlers = FakeHandlers()
    api = make_api(handlers)
    await make_topic(handlers, "events", 2)
    handlers.failures[("events", 1)] = DwalError(ErrorCode.KAFKA_STORAGE_ERROR, "disk full")
    body = [{"value": "a", "partition": 0}, {"value": "b", "partition": 1}]
    response = await call(api, "POST", "/topics/events/records", body)
    assert response.status == 200
    assert response.body["offsets"] == [
        {"partition": 0, "offset": 0},
        {"partition": 1, "offset": None, "error": "disk full", "error_code": "KAFKA_STORAGE_ERROR"},
    ]
    response = await call(api, "POST", "/topics/events/records", body[1:])
    assert response.status == 503
    assert response.body == {"error": "disk full", "error_code": "KAFKA_STORAGE_ERROR"}


async def test_rest_base64_and_tombstones_round_trip():
    handlers = FakeHandlers()
    api = make_api(handlers)
    await make_topic(handlers, "bin", 1)
    raw = bytes(range(256))
    body = [
        {"key": base64.b64encode(b"\x00k").decode(), "value": base64.b64encode(raw).decode()},
        {"key": "AA==", "value": None},
    ]
    response = await call(api, "POST", "/topics/bin/records?encoding=base64", body)
    assert response.status == 200
    response = await call(api, "GET", "/topics/bin/partitions/0/records?encoding=base64")
    records = response.body["records"]
    assert base64.b64decode(records[0]["value"]) == raw
    assert base64.b64decode(records[0]["key"]) == b"\x00k"
    assert records[1]["value"] is None
    response = await call(api, "GET", "/topics/bin/partitions/0/records")
    assert response.body["records"][0]["value"] == raw.decode("utf-8", errors="replace")
    response = await call(api, "POST", "/topics/bin/records?encoding=base64", [{"value": "@@"}])
    assert "records[0].value" in assert_error(response, 400)


# -- REST: fetch -------------------------------------------------------------------------


async def produce_values(api: JsonApi, topic: str, partition: int, values: list[str]) -> None:
    body = [{"value": value, "partition": partition} for value in values]
    assert (await call(api, "POST", f"/topics/{topic}/records", body)).status == 200


async def test_rest_fetch_reads_from_an_offset_up_to_max():
    handlers = FakeHandlers()
    api = make_api(handlers)
    await make_topic(handlers, "events", 2)
    await produce_values(api, "events", 1, ["a", "b"])
    await produce_values(api, "events", 1, ["c", "d", "e"])
    response = await call(api, "GET", "/topics/events/partitions/1/records?offset=1&max=3")
    assert response.status == 200
    assert response.body == {
        "records": [
            {"offset": o, "timestamp": CLOCK_MS, "key": None, "value": v}
            for o, v in [(1, "b"), (2, "c"), (3, "d")]
        ],
        "next_offset": 4,
        "high_watermark": 5,
        "log_start_offset": 0,
    }
    response = await call(api, "GET", "/topics/events/partitions/1/records")
    assert [r["value"] for r in response.body["records"]] == ["a", "b", "c", "d", "e"]
    assert response.body["next_offset"] == 5


async def test_rest_fetch_defaults_to_the_log_start_and_is_empty_at_the_high_watermark():
    handlers = FakeHandlers()
    api = make_api(handlers)
    await make_topic(handlers, "events", 1)
    await produce_values(api, "events", 0, ["a", "b", "c"])
    handlers.registry.log("events", 0).log_start_offset = 1
    response = await call(api, "GET", "/topics/events/partitions/0/records")
    assert [r["offset"] for r in response.body["records"]] == [1, 2]
    response = await call(api, "GET", "/topics/events/partitions/0/records?offset=3")
    assert response.status == 200
    assert response.body["records"] == [] and response.body["next_offset"] == 3


async def test_rest_fetch_caps_max_at_the_configured_limit():
    handlers = FakeHandlers(limits=Limits(http_fetch_records_max=2))
    api = make_api(handlers)
    await make_topic(handlers, "events", 1)
    await produce_values(api, "events", 0, ["a", "b", "c"])
    response = await call(api, "GET", "/topics/events/partitions/0/records?max=1000")
    assert [r["value"] for r in response.body["records"]] == ["a", "b"]
    assert response.body["next_offset"] == 2


async def test_rest_fetch_continues_over_several_reads():
    handlers = FakeHandlers()
    api = make_api(handlers)
    await make_topic(handlers, "big", 1)
    for letter in "xyz":  # three batches of 600 KB: one read of 1 MiB holds only one
        await produce_values(api, "big", 0, [letter * 600_000])
    response = await call(api, "GET", "/topics/big/partitions/0/records")
    assert [r["value"][0] for r in response.body["records"]] == ["x", "y", "z"]
    assert response.body["next_offset"] == 3


@pytest.mark.parametrize(
    "target, status",
    [
        ("/topics/events/partitions/0/records?offset=4", 404),
        ("/topics/events/partitions/0/records?offset=0", 404),  # below the log start (1)
        ("/topics/events/partitions/2/records", 404),
        ("/topics/nope/partitions/0/records", 404),
        ("/topics/events/partitions/x/records", 400),
        ("/topics/events/partitions/-1/records", 400),
        ("/topics/events/partitions/0/records?offset=-1", 400),
        ("/topics/events/partitions/0/records?offset=abc", 400),
        ("/topics/events/partitions/0/records?offset=", 400),
        ("/topics/events/partitions/0/records?max=0", 400),
        ("/topics/events/partitions/0/records?max=1.5", 400),
        ("/topics/events/partitions/0/records?encoding=latin1", 400),
        ("/topics/events/partitions/0/records?offset=1&offset=2", 400),
        ("/topics/events/partitions/0/records?limit=5", 400),
        ("/topics/events/partitions/0/records?" + "&".join(f"p{i}=1" for i in range(40)), 400),
    ],
)
async def test_rest_fetch_rejects_bad_requests(target, status):
    handlers = FakeHandlers()
    api = make_api(handlers)
    await make_topic(handlers, "events", 2)
    await produce_values(api, "events", 0, ["a", "b", "c"])
    handlers.registry.log("events", 0).log_start_offset = 1
    assert_error(await call(api, "GET", target), status)


# -- HTTP over real sockets, against the stand-in ------------------------------------------


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


class HttpClient:
    """A minimal h11 client on a trio stream, one request at a time (keep-alive capable)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.connection = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> HttpClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def request(
        self, method: str, target: str, body: Any = b"", headers: tuple[tuple[str, str], ...] = ()
    ) -> HttpReply:
        await self.send_head(method, target, body, headers)
        await self.send_body(body)
        return await self.read_response()

    async def send_head(
        self, method: str, target: str, body: Any = b"", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        if self.connection.our_state is h11.DONE:
            self.connection.start_next_cycle()
        length = len(_encode(body))
        all_headers = [("host", "127.0.0.1"), ("content-length", str(length)), *headers]
        await self.stream.send_all(
            self.connection.send(h11.Request(method=method, target=target, headers=all_headers))
        )

    async def send_body(self, body: Any) -> None:
        data = _encode(body)
        out = self.connection.send(h11.Data(data=data)) if data else b""
        await self.stream.send_all(out + self.connection.send(h11.EndOfMessage()))

    async def read_response(self, *, informational: bool = False) -> HttpReply:
        head: h11.Response | h11.InformationalResponse | None = None
        body = bytearray()
        while True:
            event = self.connection.next_event()
            if event is h11.NEED_DATA:
                self.connection.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.InformationalResponse) and informational:
                return HttpReply(event.status_code, _headers(event), b"")
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return HttpReply(head.status_code, _headers(head), bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("the server closed the connection without a response")

    async def aclose(self) -> None:
        await self.stream.aclose()


def _encode(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def _headers(event: h11.Response | h11.InformationalResponse) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in event.headers}


async def read_raw_response(stream: trio.abc.Stream) -> HttpReply:
    """Read one response from a stream that was written to without an h11 client."""
    client = HttpClient(stream)
    client.connection.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    client.connection.send(h11.EndOfMessage())
    return await client.read_response()


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


@pytest.fixture
def http_error_log():
    """The ERROR records that the ``dwal.http`` logger emits during the test."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("dwal.http")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@dataclass
class RunningGateway:
    gateway: HttpGateway
    port: int
    connection_ended: trio.MemoryReceiveChannel[None]


async def start_gateway(nursery: trio.Nursery, handlers: FakeHandlers) -> RunningGateway:
    """Serve `handlers` on 127.0.0.1; each connection task's end is reported on a channel."""
    gateway = HttpGateway(make_api(handlers), handlers.limits)
    ended_send, ended_receive = trio.open_memory_channel[None](64)

    async def handle(stream: trio.SocketStream) -> None:
        await gateway.handle_connection(stream)  # a raise here fails the test's nursery
        ended_send.send_nowait(None)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, handle, listeners)
    return RunningGateway(gateway, listeners[0].socket.getsockname()[1], ended_receive)


async def test_http_wal_round_trip_and_response_headers(nursery):
    server = await start_gateway(nursery, FakeHandlers())
    client = await HttpClient.connect(server.port)
    for expected in range(3):
        reply = await client.request("POST", "/", {"record": {"value": VALUE}})
        assert (reply.status, reply.json()) == (200, {"offset": expected})
        assert int(reply.headers["content-length"]) == len(reply.body)
    reply = await client.request("GET", "/", {"offset": 2})
    assert reply.json() == {"record": {"value": VALUE, "offset": 2}}
    reply = await client.request("GET", "/", {"offset": 3})
    assert reply.status == 404 and "error" in reply.json()
    await client.aclose()


async def test_http_keep_alive_serves_two_requests_on_one_connection(nursery):
    server = await start_gateway(nursery, FakeHandlers())
    client = await HttpClient.connect(server.port)
    first = await client.request("POST", "/", {"record": {"value": VALUE}})
    second = await client.request("GET", "/", {"offset": 0})
    assert (first.status, second.status) == (200, 200)
    assert "connection" not in first.headers
    statistics = server.gateway.statistics()
    assert (statistics.connections_accepted, statistics.requests_handled) == (1, 2)
    await client.aclose()


async def test_http_connection_close_is_honoured(nursery):
    server = await start_gateway(nursery, FakeHandlers())
    client = await HttpClient.connect(server.port)
    reply = await client.request("GET", "/healthz", headers=(("connection", "close"),))
    assert reply.status == 200 and reply.headers["connection"] == "close"
    assert await read_until_closed(client.stream) == b""
    await server.connection_ended.receive()


async def test_http_malformed_json_and_missing_fields_are_400(nursery):
    server = await start_gateway(nursery, FakeHandlers())
    client = await HttpClient.connect(server.port)
    reply = await client.request("POST", "/", b'{"record": ')
    assert reply.status == 400 and "not valid JSON" in reply.json()["error"]
    reply = await client.request("POST", "/", {"record": {}})
    assert reply.status == 400 and "value" in reply.json()["error"]
    reply = await client.request("GET", "/", {"offset": "zero"})
    assert reply.status == 400 and "offset" in reply.json()["error"]
    await client.aclose()


async def test_http_oversize_body_is_413_and_the_gateway_keeps_serving(nursery):
    handlers = FakeHandlers(limits=Limits(http_body_bytes_max=1024))
    server = await start_gateway(nursery, handlers)
    client = await HttpClient.connect(server.port)
    body = b'{"record": {"value": "' + b"x" * 2000 + b'"}}'
    await client.send_head("POST", "/", body)
    await client.stream.send_all(body[:100])  # the rest never comes: 413 must not wait for it
    reply = await client.read_response()
    assert reply.status == 413 and reply.headers["connection"] == "close"
    assert "1024" in reply.json()["error"]
    await client.aclose()
    await server.connection_ended.receive()
    fitting = b'{"record": {"value": "' + b"x" * (1024 - 25) + b'"}}'
    assert len(fitting) == 1024
    client = await HttpClient.connect(server.port)
    assert (await client.request("POST", "/", fitting)).json() == {"offset": 0}
    await client.aclose()


async def test_http_oversize_chunked_body_is_413(nursery):
    handlers = FakeHandlers(limits=Limits(http_body_bytes_max=1024))
    server = await start_gateway(nursery, handlers)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    chunk = b"x" * 600
    await stream.send_all(
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        + (b"258\r\n" + chunk + b"\r\n") * 2
    )
    reply = await read_raw_response(stream)
    assert reply.status == 413
    await stream.aclose()
    assert handlers.appends == []


async def test_http_expect_100_continue(nursery):
    server = await start_gateway(nursery, FakeHandlers())
    client = await HttpClient.connect(server.port)
    body = {"record": {"value": VALUE}}
    await client.send_head("POST", "/", body, headers=(("expect", "100-continue"),))
    assert (await client.read_response(informational=True)).status == 100
    await client.send_body(body)
    assert (await client.read_response()).json() == {"offset": 0}
    await client.aclose()


async def test_http_head_request_gets_headers_only(nursery):
    server = await start_gateway(nursery, FakeHandlers())
    client = await HttpClient.connect(server.port)
    reply = await client.request("HEAD", "/healthz")
    assert reply.status == 405 and reply.body == b""
    assert reply.headers["allow"] == "GET"
    assert (await client.request("GET", "/healthz")).status == 200  # still in step
    await client.aclose()


@pytest.mark.parametrize(
    "raw, status, error",
    [
        (b"THIS IS NOT HTTP\r\n\r\n", 400, "malformed HTTP request: illegal request line"),
        (b"GARBAGE\r\n\r\n", 400, "malformed HTTP request: illegal request line"),
        (b"GET / HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n", 400, "illegal header line"),
        (b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n", 400, "illegal header line"),
        (b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n", 400, "Content-Length"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "missing mandatory host: header"),
        (
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            400,
            "malformed HTTP request: illegal chunk header",
        ),
        (
            b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 200_000 + b"\r\n\r\n",
            431,
            "larger than the limit of 16384 bytes",
        ),
    ],
)
async def test_http_malformed_requests_get_a_plain_error_and_a_close(nursery, raw, status, error):
    server = await start_gateway(nursery, FakeHandlers())
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(raw)
    reply = await read_raw_response(stream)
    message = reply.json()["error"]
    assert reply.status == status
    assert error.lower() in message.lower()
    for python_literal in ("bytearray", "b'", 'b"', "\\r", "\\x"):
        assert python_literal not in message
    assert await read_until_closed(stream) == b""  # the gateway stopped sending
    await stream.aclose()  # which ends its lingering close at once
    await server.connection_ended.receive()


def _head_of(total_bytes: int) -> bytes:
    """A GET /healthz request whose line and headers are exactly `total_bytes` long."""
    start = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: "
    end = b"\r\n\r\n"
    return start + b"p" * (total_bytes - len(start) - len(end)) + end


@pytest.mark.parametrize("total_bytes", [16 * 1024 + 1, 17_000, 30_000, 40_000, 60_000])
async def test_http_head_above_the_limit_is_431_even_when_it_arrives_in_one_read(total_bytes):
    handlers = FakeHandlers()
    gateway = memory_gateway(handlers)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.handle_connection, server_stream)
        await client_stream.send_all(_head_of(total_bytes))  # one chunk: one read
        reply = await read_raw_response(client_stream)
        assert reply.status == 431, total_bytes
        assert str(handlers.limits.http_header_bytes_max) in reply.json()["error"]
        assert reply.headers["connection"] == "close"
        await client_stream.aclose()
    assert gateway.statistics().requests_handled == 0


async def test_http_head_of_exactly_the_limit_is_served():
    gateway = memory_gateway(FakeHandlers())
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.handle_connection, server_stream)
        await client_stream.send_all(_head_of(16 * 1024))
        assert (await read_raw_response(client_stream)).status == 200
        await client_stream.aclose()


@pytest.mark.parametrize("abort", ["close", "reset"])
async def test_http_client_disconnecting_mid_body_does_not_break_the_next_client(
    nursery, abort, http_error_log
):
    handlers = FakeHandlers()
    server = await start_gateway(nursery, handlers)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(b'POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{"rec')
    if abort == "reset":  # SO_LINGER 0: close sends RST instead of FIN
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()
    await server.connection_ended.receive()  # the task ended without raising
    assert handlers.appends == []
    assert http_error_log == []  # a peer going away is not a gateway failure
    client = await HttpClient.connect(server.port)
    reply = await client.request("POST", "/", {"record": {"value": VALUE}})
    assert (reply.status, reply.json()) == (200, {"offset": 0})
    await client.aclose()


async def test_http_connections_beyond_the_limit_get_503(nursery):
    server = await start_gateway(nursery, FakeHandlers(limits=Limits(http_connections_max=1)))
    first = await HttpClient.connect(server.port)
    assert (await first.request("GET", "/healthz")).status == 200  # now counted
    second = await HttpClient.connect(server.port)
    reply = await second.request("GET", "/healthz")
    assert reply.status == 503 and "maximum of 1 connections" in reply.json()["error"]
    assert reply.headers["connection"] == "close"
    await second.aclose()
    await server.connection_ended.receive()
    assert (await first.request("GET", "/healthz")).status == 200
    assert server.gateway.statistics().connections_refused == 1
    await first.aclose()


async def test_http_handler_bug_is_a_500_and_the_connection_goes_on(nursery, http_error_log):
    handlers = FakeHandlers()
    await make_topic(handlers, "wal", 1)
    handlers.failures[("wal", 0)] = RuntimeError("bug")
    server = await start_gateway(nursery, handlers)
    client = await HttpClient.connect(server.port)
    reply = await client.request("POST", "/", {"record": {"value": VALUE}})
    assert reply.status == 500 and reply.json()["error_code"] == "UNKNOWN_SERVER_ERROR"
    assert [record.getMessage() for record in http_error_log] == ["http_handler_failed"]
    assert (await client.request("GET", "/healthz")).status == 200
    await client.aclose()


# -- HTTP over in-memory streams, with trio's autojump clock --------------------------------


def memory_gateway(handlers: FakeHandlers, **timeouts_ms: int) -> HttpGateway:
    limits = dataclasses.replace(handlers.limits, **timeouts_ms)
    return HttpGateway(make_api(handlers), limits)


async def test_idle_keep_alive_connection_is_closed_after_the_read_timeout(autojump_clock):
    gateway = memory_gateway(FakeHandlers(), http_request_read_timeout_ms=30_000)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.handle_connection, server_stream)
        client = HttpClient(client_stream)
        assert (await client.request("GET", "/healthz")).status == 200
        started = trio.current_time()
        assert await read_until_closed(client_stream) == b""  # closed quietly, no 408
        assert trio.current_time() - started >= 30
    assert gateway.statistics().connections == 0


async def test_half_sent_request_gets_408_after_the_read_timeout(autojump_clock):
    gateway = memory_gateway(FakeHandlers(), http_request_read_timeout_ms=30_000)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.handle_connection, server_stream)
        await client_stream.send_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 50\r\n\r\n{")
        reply = await read_raw_response(client_stream)
        assert reply.status == 408
        assert trio.current_time() >= 30


async def test_client_that_never_reads_cannot_hold_the_connection(autojump_clock):
    gateway = memory_gateway(FakeHandlers(), http_response_write_timeout_ms=10_000)
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_stream.send_all, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        await gateway.handle_connection(server_stream)  # returns once the write times out
    assert trio.current_time() >= 10


async def test_peer_closing_mid_body_ends_only_its_connection_task(http_error_log):
    handlers = FakeHandlers()
    gateway = memory_gateway(handlers)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await client_stream.send_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
    await client_stream.send_eof()
    await gateway.handle_connection(server_stream)  # must return, not raise
    assert handlers.appends == [] and gateway.statistics().connections == 0
    assert http_error_log == []


# -- request bodies within the broker's shared memory budget ------------------------------

BUDGET_LIMITS = Limits(http_body_bytes_max=1024)


class RecordingApi:
    """Answers every request 200, noting its body and the pool's reserved bytes meanwhile."""

    def __init__(self, pool: MemoryPool) -> None:
        self.pool = pool
        self.seen: list[tuple[bytes, int]] = []

    async def handle(self, request: ApiRequest) -> ApiResponse:
        self.seen.append((request.body, self.pool.statistics().bytes_reserved))
        return ApiResponse(status=200, body={})


async def test_http_body_waits_for_memory_without_timing_out_then_gives_it_back(autojump_clock):
    handlers = FakeHandlers(limits=BUDGET_LIMITS)
    pool = MemoryPool(2048)  # shared with other (here: simulated) connections
    gateway = HttpGateway(
        make_api(handlers),
        dataclasses.replace(BUDGET_LIMITS, http_request_read_timeout_ms=30_000),
        memory_pool=pool,
    )
    await pool.reserve(2000)  # what other connections hold
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.handle_connection, server_stream)
        client = HttpClient(client_stream)
        body = {"record": {"value": "x" * 100}}
        await client.send_head("POST", "/", body)
        await client.send_body(body)
        await trio.testing.wait_all_tasks_blocked()
        statistics = pool.statistics()
        assert (statistics.waiters, statistics.bytes_wanted) == (1, len(_encode(body)))
        assert handlers.appends == []
        await trio.sleep(100)  # waiting for memory is not the client being slow: no 408
        assert handlers.appends == []
        pool.release(2000)
        reply = await client.read_response()
        assert (reply.status, reply.json()) == (200, {"offset": 0})
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().bytes_reserved == 0
        assert pool.statistics().bytes_reserved_peak <= 2048
        await client_stream.aclose()


async def test_http_body_bytes_are_reserved_while_handled_and_released_on_every_path():
    pool = MemoryPool(4096)
    api = RecordingApi(pool)
    gateway = HttpGateway(api, BUDGET_LIMITS, memory_pool=pool)  # type: ignore[arg-type]
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.handle_connection, server_stream)
        client = HttpClient(client_stream)
        assert (await client.request("POST", "/", b"b" * 300)).status == 200
        assert (await client.request("GET", "/healthz")).status == 200
        assert api.seen == [(b"b" * 300, 300), (b"", 0)]
        assert pool.statistics().bytes_reserved == 0

        # a chunked body reserves the most a body may have until it ends, then what it used
        await client_stream.send_all(
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"c8\r\n"
            + b"c" * 200
            + b"\r\n"
        )
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().bytes_reserved == BUDGET_LIMITS.http_body_bytes_max
        await client_stream.send_all(b"64\r\n" + b"d" * 100 + b"\r\n0\r\n\r\n")
        client.connection.start_next_cycle()
        client.connection.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
        client.connection.send(h11.EndOfMessage())
        assert (await client.read_response()).status == 200
        assert api.seen[-1] == (b"c" * 200 + b"d" * 100, 300)
        assert pool.statistics().bytes_reserved == 0

        # a client that goes away in the middle of a body gives its reservation back
        await client_stream.send_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 900\r\n\r\n{")
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().bytes_reserved == 900
        await client_stream.aclose()
    assert pool.statistics().bytes_reserved == 0
    assert len(api.seen) == 3


async def test_http_oversize_body_reserves_nothing():
    pool = MemoryPool(4096)
    gateway = HttpGateway(make_api(FakeHandlers()), BUDGET_LIMITS, memory_pool=pool)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.handle_connection, server_stream)
        await client_stream.send_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n")
        assert (await read_raw_response(client_stream)).status == 413
        await client_stream.aclose()
    statistics = pool.statistics()
    assert (statistics.bytes_reserved, statistics.bytes_reserved_peak) == (0, 0)


# -- end to end on the real broker storage -------------------------------------------------


@pytest.fixture
async def real_handlers(tmp_path):
    async with real_request_handlers(tmp_path, LogConfig(fsync="never")) as handlers:
        yield handlers


async def start_real_gateway(nursery: trio.Nursery, handlers: Any) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(serve_http, handlers, listeners)
    return listeners[0].socket.getsockname()[1]


async def test_end_to_end_wal_service(nursery, real_handlers):
    client = await HttpClient.connect(await start_real_gateway(nursery, real_handlers))
    reply = await client.request("GET", "/", {"offset": 0})
    assert reply.status == 404
    for expected in range(3):
        reply = await client.request("POST", "/", {"record": {"value": f"{VALUE}{expected}"}})
        assert (reply.status, reply.json()) == (200, {"offset": expected})
    for offset in range(3):
        reply = await client.request("GET", "/", {"offset": offset})
        assert reply.json() == {"record": {"value": f"{VALUE}{offset}", "offset": offset}}
    assert (await client.request("GET", "/", {"offset": 3})).status == 404
    assert (await client.request("POST", "/", b"{oops")).status == 400
    assert (await client.request("POST", "/", {"record": {"key": "k"}})).status == 400
    assert (await client.request("GET", "/", {"offset": -1})).status == 400
    assert real_handlers.registry.log("wal", 0).high_watermark == 3
    await client.aclose()


async def test_end_to_end_rest_produce_and_fetch_with_keys_and_partitions(nursery, real_handlers):
    await create_topic_on(real_handlers, "orders", 3)
    client = await HttpClient.connect(await start_real_gateway(nursery, real_handlers))
    records = [{"key": f"customer-{i % 4}", "value": f"order-{i}"} for i in range(12)]
    records.append({"value": "pinned", "partition": 2})
    reply = await client.request("POST", "/topics/orders/records", {"records": records})
    assert reply.status == 200
    offsets = reply.json()["offsets"]
    for record, entry in zip(records[:12], offsets[:12], strict=True):
        assert entry["partition"] == partition_for_key(record["key"].encode(), 3)
    assert offsets[12]["partition"] == 2
    seen: dict[str, tuple[int, int]] = {}
    for partition in range(3):
        reply = await client.request("GET", f"/topics/orders/partitions/{partition}/records")
        body = reply.json()
        assert body["next_offset"] == body["high_watermark"] == len(body["records"])
        for record in body["records"]:
            seen[record["value"]] = (partition, record["offset"])
    assert seen == {
        record["value"]: (entry["partition"], entry["offset"])
        for record, entry in zip(records, offsets, strict=True)
    }
    reply = await client.request("GET", "/topics/orders/partitions/0/records?offset=1&max=1")
    assert [r["offset"] for r in reply.json()["records"]] == [1]
    reply = await client.request("POST", "/topics/missing/records", [{"value": "x"}])
    assert reply.status == 404 and reply.json()["error_code"] == "UNKNOWN_TOPIC_OR_PARTITION"
    reply = await client.request("GET", "/topics/missing/partitions/0/records")
    assert reply.status == 404
    await client.aclose()


async def test_end_to_end_concurrent_first_wal_posts_both_succeed(real_handlers):
    # Both find no "wal" topic and ask the controller to create it; the one that loses the
    # race gets TOPIC_ALREADY_EXISTS, which is no error for it: its record is stored too.
    api = JsonApi(real_handlers)
    responses: list[ApiResponse] = []

    async def post(value: str) -> None:
        responses.append(await call(api, "POST", "/", {"record": {"value": value}}))

    async with trio.open_nursery() as group:
        group.start_soon(post, "a")
        group.start_soon(post, "b")
    assert sorted((r.status, r.body["offset"]) for r in responses) == [(200, 0), (200, 1)]
    assert len(real_handlers.member.image.topics["wal"].partitions) == 1
