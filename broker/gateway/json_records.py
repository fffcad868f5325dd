"""JSON request bodies and records of the HTTP gateway: checked values in, JSON values out.

Pure functions, no I/O. Every check of client input raises `ApiError` (400 unless stated)
with a message naming the offending field, such as ``records[3].value``.

Value encodings. With ``utf-8`` (the default) a record's key and value are JSON strings
stored as their UTF-8 bytes and read back decoded as UTF-8 (undecodable bytes become
U+FFFD). With ``base64`` they are standard base64 strings of arbitrary bytes. A JSON
``null`` value is a tombstone (a record without a value, as compaction understands it).
Numbers, objects, arrays and booleans are refused rather than silently stored as their JSON
text, so that what a client reads back is always what it wrote.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Literal

from broker.gateway.api_error import ApiError
from protocol import ErrorCode, Record
from protocol.partitioning import partition_for_key as _partition_for_key

Encoding = Literal["utf-8", "base64"]
ENCODINGS: tuple[Encoding, ...] = ("utf-8", "base64")

_RECORD_FIELDS = frozenset({"value", "key", "partition"})
_WAL_RECORD_FIELDS = frozenset({"value", "key"})


@dataclass(frozen=True, slots=True, kw_only=True)
class ProducedRecord:
    """One record a client asks to append; `partition` None lets the gateway choose."""

    key: bytes | None
    value: bytes | None
    partition: int | None = None


def parse_json(body: bytes) -> Any:
    """Decode a request body as one JSON document (UTF-8); raises ApiError 400."""
    if not body:
        raise ApiError(
            400,
            "the request body is empty; a JSON document is expected",
            code=ErrorCode.INVALID_REQUEST,
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(
            400,
            f"the request body is not UTF-8 (bad byte at position {error.start})",
            code=ErrorCode.INVALID_REQUEST,
        ) from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        message = f"{error.msg} at line {error.lineno} column {error.colno}"
    except RecursionError:
        message = "it is nested too deeply"
    except ValueError as error:  # NaN/Infinity, or an integer with too many digits
        message = str(error)
    raise ApiError(
        400, f"the request body is not valid JSON: {message}", code=ErrorCode.INVALID_REQUEST
    )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def bad_request(message: str) -> ApiError:
    return ApiError(400, message, code=ErrorCode.INVALID_REQUEST)


def _check_object(value: Any, where: str, allowed: frozenset[str]) -> dict[str, Any]:
    if type(value) is not dict:
        raise bad_request(f"{where} must be a JSON object, got {_json_type(value)}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise bad_request(
            f"{where} has unknown field {unknown[0]!r}; "
            f"allowed fields: {', '.join(sorted(allowed))}"
        )
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def parse_wal_record(document: Any) -> ProducedRecord:
    """Check ``{"record": {"value": "...", "key": "..." (optional)}}``; value must be a string."""
    top = _check_object(document, "the request body", frozenset({"record"}))
    if "record" not in top:
        raise bad_request('the request body needs a "record" field: {"record": {"value": "..."}}')
    record = _check_object(top["record"], "record", _WAL_RECORD_FIELDS)
    if "value" not in record:
        raise bad_request('record needs a "value" field: {"record": {"value": "..."}}')
    if type(record["value"]) is not str:
        raise bad_request(f"record.value must be a string, got {_json_type(record['value'])}")
    return ProducedRecord(
        key=_decode_field(record.get("key"), "record.key", "utf-8"),
        value=_decode_field(record["value"], "record.value", "utf-8"),
    )


def parse_offset_document(document: Any) -> int:
    """Check ``{"offset": N}`` with N a non-negative integer; returns N."""
    top = _check_object(document, "the request body", frozenset({"offset"}))
    if "offset" not in top:
        raise bad_request('the request body needs an "offset" field: {"offset": 0}')
    return check_offset(top["offset"], "offset")


def check_offset(value: Any, where: str) -> int:
    if type(value) is not int:
        raise bad_request(f"{where} must be an integer, got {_json_type(value)}")
    if value < 0:
        raise bad_request(f"{where} must not be negative, got {value}")
    return value


def parse_produce_records(
    document: Any, encoding: Encoding, records_max: int
) -> list[ProducedRecord]:
    """Check ``{"records": [...]}`` or a bare list of records; raises ApiError.

    More than `records_max` records is refused with 413.
    """
    if type(document) is dict:
        document = _check_object(document, "the request body", frozenset({"records"}))
        if "records" not in document:
            raise bad_request('the request body needs a "records" field: {"records": [...]}')
        document = document["records"]
    if type(document) is not list:
        raise bad_request(f"records must be an array, got {_json_type(document)}")
    if not document:
        raise bad_request("records must not be empty")
    if len(document) > records_max:
        raise ApiError(
            413,
            f"a request may carry at most {records_max} records, got {len(document)}",
            code=ErrorCode.RECORD_LIST_TOO_LARGE,
        )
    return [
        _parse_record(entry, f"records[{index}]", encoding) for index, entry in enumerate(document)
    ]


def _parse_record(entry: Any, where: str, encoding: Encoding) -> ProducedRecord:
    record = _check_object(entry, where, _RECORD_FIELDS)
    if "value" not in record:
        raise bad_request(f'{where} needs a "value" field (a string, or null for a tombstone)')
    partition = record.get("partition")
    if partition is not None and (type(partition) is not int or partition < 0):
        raise bad_request(
            f"{where}.partition must be a non-negative integer, got {partition!r:.40}"
        )
    return ProducedRecord(
        key=_decode_field(record.get("key"), f"{where}.key", encoding),
        value=_decode_field(record["value"], f"{where}.value", encoding),
        partition=partition,
    )


def _decode_field(value: Any, where: str, encoding: Encoding) -> bytes | None:
    if value is None:
        return None
    if type(value) is not str:
        raise bad_request(f"{where} must be a string or null, got {_json_type(value)}")
    if encoding == "utf-8":
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(f"{where} holds a lone UTF-16 surrogate escape") from None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where} is not valid base64") from None


def encode_field(data: bytes | None, encoding: Encoding) -> str | None:
    """The JSON string for stored bytes (None stays None)."""
    if data is None:
        return None
    if encoding == "utf-8":
        return data.decode("utf-8", errors="replace")
    return base64.b64encode(data).decode("ascii")


def record_to_json(record: Record, encoding: Encoding) -> dict[str, Any]:
    return {
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": encode_field(record.key, encoding),
        "value": encode_field(record.value, encoding),
    }


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition of a keyed record: protocol's default (Kafka's murmur2 of the key modulo
    the partition count), the same as DWAL's producer and the gRPC gateway."""
    return _partition_for_key(key, partitions)
