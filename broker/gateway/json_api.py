"""The HTTP gateway's JSON API: (method, target, body bytes) in, (status, JSON body) out.

Theory of operation. `JsonApi.handle` routes one whole request to an endpoint and returns an
`ApiResponse`; it knows nothing about sockets or HTTP framing (the h11 shell in
`http_gateway` does that), so tests drive it with plain values and an in-memory stand-in for
`RequestHandlers`. The only things it awaits are the handlers' own coroutines (topic creation,
appends and reads). Endpoints:

- ``POST /`` and ``GET /``: the original WAL service, backed by partition 0 of topic ``wal``.
- ``POST /topics/{topic}/records`` and ``GET /topics/{topic}/partitions/{p}/records``.
- ``GET /healthz``.

Every client error becomes an `ApiError` with a clear message; a broker `DwalError` is mapped
to its HTTP status by `status_for_error_code`. Unexpected exceptions (bugs) propagate: the
HTTP shell answers them with 500 and keeps serving.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker.gateway.api_error import ApiError, api_error_from
from broker.gateway.record_reader import check_readable, read_records
from broker.gateway.json_records import (
    ENCODINGS,
    Encoding,
    ProducedRecord,
    bad_request,
    encode_field,
    parse_json,
    parse_offset_document,
    parse_produce_records,
    parse_wal_record,
    partition_for_key,
    record_to_json,
)
from protocol import (
    ACKS_ALL,
    ACKS_LEADER,
    DwalError,
    ErrorCode,
    ProtocolError,
    Record,
    build_batch,
    decode_records,
    validate_topic_name,
)

if TYPE_CHECKING:
    from broker.request_handlers import RequestHandlers

WAL_TOPIC = "wal"
WAL_PARTITION = 0
FETCH_RECORDS_DEFAULT = 100
_DIGITS = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiRequest:
    method: str  # upper case, as sent: "GET", "POST", ...
    target: str  # origin-form request target: path and optional query
    body: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiResponse:
    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()

    def encode_body(self) -> bytes:
        return json.dumps(self.body, ensure_ascii=False).encode("utf-8")


def _wall_clock_ms() -> int:
    return int(time.time() * 1000)


Query = dict[str, str]
Endpoint = Callable[..., Awaitable[ApiResponse]]


class JsonApi:
    """Answers JSON API requests with `handlers` (a `RequestHandlers` or a stand-in).

    `clock_ms` gives record timestamps (wall clock milliseconds by default).
    """

    def __init__(
        self, handlers: RequestHandlers, *, clock_ms: Callable[[], int] = _wall_clock_ms
    ) -> None:
        self._handlers = handlers
        self._limits = handlers.config.limits
        self._clock_ms = clock_ms
        self._keyless_records = 0  # round-robin position for records without key or partition

    async def handle(self, request: ApiRequest) -> ApiResponse:
        """Answer one request; client and broker errors become error responses.

        Raises only on bugs. Safe to cancel: an append already handed to the log stays.
        """
        try:
            endpoint, arguments, query = self._route(request)
            return await endpoint(request, query, *arguments)
        except ApiError as error:
            return ApiResponse(status=error.status, body=error.body(), headers=error.headers)
        except DwalError as error:
            api_error = api_error_from(error)
            return ApiResponse(status=api_error.status, body=api_error.body())
        except ProtocolError as error:
            return ApiResponse(
                status=500,
                body={
                    "error": f"stored records could not be decoded: {error}",
                    "error_code": ErrorCode.CORRUPT_MESSAGE.name,
                },
            )

    # -- routing ------------------------------------------------------------------------

    def _route(self, request: ApiRequest) -> tuple[Endpoint, tuple[str, ...], Query]:
        path, query_text = request.target.partition("?")[::2]
        segments = _path_segments(path)
        routes: dict[str, Endpoint]
        arguments: tuple[str, ...] = ()
        if segments == [""]:
            routes, allowed_query = {"GET": self._read_wal, "POST": self._produce_wal}, {"offset"}
        elif segments == ["healthz"]:
            routes, allowed_query = {"GET": self._health}, set()
        elif len(segments) == 3 and segments[0] == "topics" and segments[2] == "records":
            routes, allowed_query = {"POST": self._produce_records}, {"encoding"}
            arguments = (segments[1],)
        elif (
            len(segments) == 5
            and segments[0] == "topics"
            and segments[2] == "partitions"
            and segments[4] == "records"
        ):
            routes, allowed_query = {"GET": self._fetch_records}, {"offset", "max", "encoding"}
            arguments = (segments[1], segments[3])
        else:
            raise ApiError(404, f"no such resource: {_shorten(path)}")
        endpoint = routes.get(request.method)
        if endpoint is None:
            allow = ", ".join(sorted(routes))
            raise ApiError(
                405,
                f"method {_shorten(request.method)} is not allowed on "
                f"{_shorten(path)}; allowed: {allow}",
                headers=(("allow", allow),),
            )
        return (
            endpoint,
            arguments,
            _parse_query(query_text, allowed_query, self._limits.http_query_fields_max),
        )

    # -- the original WAL service -------------------------------------------------------

    async def _produce_wal(self, request: ApiRequest, query: Query) -> ApiResponse:
        """``{"record": {"value": "..."}}`` -> ``{"offset": N}``, appended with acks=all."""
        record = parse_wal_record(parse_json(request.body))
        await self._ensure_wal_topic()
        batch = build_batch([(self._clock_ms(), record.key, record.value)])
        offset = await self._handlers.append_batch(
            WAL_TOPIC,
            WAL_PARTITION,
            batch,
            acks=ACKS_ALL,  # in every in-sync replica (and durable on the leader)
            timeout_ms=self._limits.http_append_timeout_ms,
        )
        return ApiResponse(status=200, body={"offset": offset})

    async def _ensure_wal_topic(self) -> None:
        await self._handlers.ensure_topic(WAL_TOPIC, 1)

    async def _read_wal(self, request: ApiRequest, query: Query) -> ApiResponse:
        """``{"offset": N}`` (or ``?offset=N`` with an empty body) -> the record at N."""
        if request.body or "offset" not in query:
            if "offset" in query:
                raise bad_request("give the offset in the body or in the query, not both")
            offset = parse_offset_document(parse_json(request.body))
        else:
            offset = _integer_parameter(query, "offset")
        record = await self._read_wal_record(offset)
        body: dict[str, Any] = {"value": encode_field(record.value, "utf-8"), "offset": offset}
        if record.key is not None:
            body["key"] = encode_field(record.key, "utf-8")
        return ApiResponse(status=200, body={"record": body})

    async def _read_wal_record(self, offset: int) -> Record:
        """The record at `offset` of the WAL log, from the one batch that holds it."""
        try:
            data = await self._handlers.read_batch_containing(WAL_TOPIC, WAL_PARTITION, offset)
        except DwalError as error:
            if error.code != ErrorCode.UNKNOWN_TOPIC_OR_PARTITION:
                raise
            raise ApiError(
                404,
                f"offset {offset} has not been written yet: the log is empty",
                code=ErrorCode.OFFSET_OUT_OF_RANGE,
            ) from None
        if data is not None:
            for record in decode_records(data):
                if record.offset == offset:
                    return record
        raise ApiError(
            404,
            f"offset {offset} holds no record any more (removed by compaction)",
            code=ErrorCode.OFFSET_OUT_OF_RANGE,
        )

    # -- topics -------------------------------------------------------------------------

    async def _produce_records(self, request: ApiRequest, query: Query, topic: str) -> ApiResponse:
        """Append records, one batch per partition, in the order partitions first appear.

        Returns ``{"offsets": [{"partition", "offset"}, ...]}`` in input order. Partitions
        are appended independently: when some fail and others succeed, the answer is 200 and
        each failed record's entry has ``"offset": null`` with ``"error"`` and
        ``"error_code"``; when all fail, the first failure is the answer.
        """
        encoding = _encoding_parameter(query)
        records = parse_produce_records(
            parse_json(request.body), encoding, self._limits.http_produce_records_max
        )
        partitions = await self._partition_count(topic, create=True)
        chosen = self._choose_partitions(topic, records, partitions)
        groups: dict[int, list[int]] = {}
        for index, partition in enumerate(chosen):
            groups.setdefault(partition, []).append(index)
        now = self._clock_ms()
        offsets: list[dict[str, Any]] = [{} for _ in records]
        failures: list[DwalError] = []
        for partition, indexes in groups.items():
            batch = build_batch([(now, records[i].key, records[i].value) for i in indexes])
            try:
                base_offset = await self._handlers.append_batch(
                    topic,
                    partition,
                    batch,
                    acks=ACKS_LEADER,
                    timeout_ms=self._limits.http_append_timeout_ms,
                )
            except DwalError as error:
                failures.append(error)
                for i in indexes:
                    offsets[i] = {
                        "partition": partition,
                        "offset": None,
                        "error": error.message,
                        "error_code": error.code.name,
                    }
                continue
            for position, i in enumerate(indexes):
                offsets[i] = {"partition": partition, "offset": base_offset + position}
        if len(failures) == len(groups):
            raise failures[0]
        return ApiResponse(status=200, body={"offsets": offsets})

    def _choose_partitions(
        self, topic: str, records: list[ProducedRecord], partitions: int
    ) -> list[int]:
        """Explicit partition, else the hash of the key (murmur2, as Kafka), else round-robin.
        Raises ApiError 404."""
        chosen = []
        for index, record in enumerate(records):
            if record.partition is not None:
                if record.partition >= partitions:
                    raise ApiError(
                        404,
                        f"records[{index}].partition {record.partition} does not "
                        f"exist: topic {topic!r} has {partitions} partitions",
                        code=ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                    )
                chosen.append(record.partition)
            elif record.key is not None:
                chosen.append(partition_for_key(record.key, partitions))
            else:
                chosen.append(self._keyless_records % partitions)
                self._keyless_records = (self._keyless_records + 1) & 0xFFFF_FFFF
        return chosen

    async def _partition_count(self, topic: str, *, create: bool) -> int:
        reason = validate_topic_name(topic)
        if reason is not None:
            raise ApiError(400, f"invalid topic name: {reason}", code=ErrorCode.INVALID_TOPIC)
        handlers = self._handlers
        if create and handlers.config.auto_create_topics:
            await handlers.ensure_topic(topic, handlers.config.default_partitions)
        return handlers.partition_count(topic)

    async def _fetch_records(
        self, request: ApiRequest, query: Query, topic: str, partition_text: str
    ) -> ApiResponse:
        """Records from ``?offset=`` (default: log start), at most ``?max=`` of them."""
        if not _DIGITS.fullmatch(partition_text):
            raise bad_request(
                f"partition must be a non-negative integer, got {partition_text!r:.40}"
            )
        partition = int(partition_text)
        encoding = _encoding_parameter(query)
        records_max = self._limits.http_fetch_records_max
        limit = min(_integer_parameter(query, "max", FETCH_RECORDS_DEFAULT), records_max)
        if limit < 1:
            raise bad_request("max must be at least 1")
        partitions = await self._partition_count(topic, create=False)
        if partition >= partitions:
            raise ApiError(
                404,
                f"topic {topic!r} has no partition {partition} (it has {partitions})",
                code=ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
            )
        start, high_watermark = await self._handlers.readable_range(topic, partition)
        offset = _integer_parameter(query, "offset", start)
        check_readable(offset, start, high_watermark)
        records, next_offset = await read_records(
            self._handlers,
            topic,
            partition,
            offset,
            high_watermark,
            limit,
            self._limits.http_fetch_bytes_max,
        )
        return ApiResponse(
            status=200,
            body={
                "records": [record_to_json(record, encoding) for record in records],
                "next_offset": next_offset,
                "high_watermark": high_watermark,
                "log_start_offset": start,
            },
        )

    async def _health(self, request: ApiRequest, query: Query) -> ApiResponse:
        return ApiResponse(status=200, body={"status": "ok"})


def _path_segments(path: str) -> list[str]:
    """The percent-decoded segments of an origin-form path ("/" gives [""])."""
    if not path.startswith("/"):
        raise bad_request(
            f"the request target must be a path starting with '/', got {_shorten(path)!r}"
        )
    try:
        return [urllib.parse.unquote(segment, errors="strict") for segment in path.split("/")[1:]]
    except UnicodeDecodeError:
        raise bad_request("the request path is not valid percent-encoded UTF-8") from None


def _parse_query(text: str, allowed: set[str], fields_max: int) -> Query:
    try:
        pairs = urllib.parse.parse_qsl(
            text, keep_blank_values=True, errors="strict", max_num_fields=fields_max
        )
    except (ValueError, UnicodeDecodeError):
        raise bad_request(
            f"the query string is malformed or has more than {fields_max} parameters"
        ) from None
    query: Query = {}
    for name, value in pairs:
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise bad_request(f"unknown query parameter {_shorten(name)!r}; allowed: {known}")
        if name in query:
            raise bad_request(f"query parameter {name!r} is given twice")
        query[name] = value
    return query


def _integer_parameter(query: Query, name: str, default: int | None = None) -> int:
    text = query.get(name)
    if text is None:
        assert default is not None, name
        return default
    if not _DIGITS.fullmatch(text):
        raise bad_request(
            f"query parameter {name} must be a non-negative integer, got {_shorten(text)!r}"
        )
    return int(text)


def _encoding_parameter(query: Query) -> Encoding:
    text = query.get("encoding", "utf-8")
    for encoding in ENCODINGS:
        if text == encoding:
            return encoding
    raise bad_request(f"encoding must be one of {', '.join(ENCODINGS)}, got {_shorten(text)!r}")


def _shorten(text: str, length: int = 100) -> str:
    return text if len(text) <= length else text[:length] + "..."
