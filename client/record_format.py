"""How `dwal consume` prints a record: a kcat-style format string, or JSON lines.

A format string is compiled once into literal bytes and field names; rendering a record
joins them. Escapes (``\\n``, ``\\t``, ``\\\\``) and ``%`` codes are read in one pass from
left to right, so ``\\\\n`` is a backslash followed by ``n``, never a newline. Any other
character after a backslash is kept as it is, backslash included.

JSON output has one object per line: topic, partition, offset, timestamp, key, value,
headers. Keys, values and header values are bytes: they are shown as a JSON string when
they are valid UTF-8, as ``{"base64": "..."}`` otherwise, and as null when absent.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from client.topic_partition import TopicPartition
from protocol import Record

JSON_FORMAT = "json"
_FIELDS = {
    "v": "value",
    "k": "key",
    "o": "offset",
    "p": "partition",
    "t": "topic",
    "T": "timestamp",
}
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


class FormatError(ValueError):
    """The format string is malformed (unknown %-code or a lone % at the end)."""


@dataclass(frozen=True)
class RecordFormat:
    """Compiled output format: `parts` are ("lit", bytes) and ("field", name) pairs, the last
    one ending with a newline; `json` is set for JSON lines instead."""

    parts: tuple[tuple[str, Any], ...]
    json: bool = False

    @property
    def value_only(self) -> bool:
        return self.parts == (("field", "value"), ("lit", b"\n"))


def compile_format(text: str) -> RecordFormat:
    """Compile `text` (``json`` for JSON lines); raises FormatError."""
    if text == JSON_FORMAT:
        return RecordFormat((), json=True)
    parts: list[tuple[str, Any]] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        following = text[i + 1] if i + 1 < len(text) else None
        if char == "\\" and following in _ESCAPES:
            literal.append(_ESCAPES[following])
            i += 2
        elif char == "%":
            if following is None:
                raise FormatError("the format ends with a lone %: write %% for a percent sign")
            if following == "%":
                literal.append("%")
            elif following in _FIELDS:
                parts.append(("lit", "".join(literal).encode()))
                literal = []
                parts.append(("field", _FIELDS[following]))
            else:
                raise FormatError(f"unknown format code %{following}")
            i += 2
        else:
            literal.append(char)
            i += 1
    parts.append(("lit", ("".join(literal) + "\n").encode()))
    return RecordFormat(tuple(part for part in parts if part[1]))


def render(fmt: RecordFormat, tp: TopicPartition, record: Record) -> bytes:
    """One record as `fmt` prints it, newline included."""
    if fmt.json:
        return render_json(tp, record)
    out = []
    for kind, value in fmt.parts:
        if kind == "lit":
            out.append(value)
        elif value == "value":
            out.append(record.value or b"")
        elif value == "key":
            out.append(record.key or b"")
        elif value == "offset":
            out.append(str(record.offset).encode())
        elif value == "partition":
            out.append(str(tp.partition).encode())
        elif value == "topic":
            out.append(tp.topic.encode())
        else:
            out.append(str(record.timestamp).encode())
    return b"".join(out)


def render_json(tp: TopicPartition, record: Record) -> bytes:
    document = {
        "topic": tp.topic,
        "partition": tp.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": _json_bytes(record.key),
        "value": _json_bytes(record.value),
        "headers": [{"key": name, "value": _json_bytes(value)} for name, value in record.headers],
    }
    return json.dumps(document, ensure_ascii=False).encode() + b"\n"


def _json_bytes(data: bytes | None) -> str | dict[str, str] | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}
