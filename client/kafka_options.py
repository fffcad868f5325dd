"""Kafka's option spellings for DWAL's client classes.

Users of Kafka clients type `linger.ms` (the Java client, librdkafka, confluent-kafka) or
`linger_ms` (kafka-python, aiokafka). Each client class keeps a table of the Kafka options it
understands, `{dotted name: KafkaOption(DWAL keyword, converter)}`, and calls `translate`:
either spelling becomes DWAL's keyword with a value of the right type; an option that Kafka
sets on a client but DWAL sets elsewhere (the group session timeout is the broker's) says
where it belongs; an option nobody knows is an error naming the close matches. Nothing here
guesses: every accepted name is in a table.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class UnknownOptionError(TypeError):
    """An option that the client class does not take (the message says what to use)."""


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"expected true or false, got {value!r}")


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"expected a number, got {value!r}")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {value!r}")


def _as_is(value: Any) -> Any:
    return value


CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "bool": _boolean,
    "int": _integer,
    "number": _number,
    "str": _text,
    "any": _as_is,
}


@dataclass(frozen=True)
class KafkaOption:
    keyword: str  # the DWAL keyword argument it becomes
    kind: str = "int"  # a key of CONVERTERS
    convert: Callable[[Any], Any] | None = None  # instead of `kind`, e.g. a unit change


# Options a Kafka client takes that DWAL sets somewhere else: where they belong.
ELSEWHERE: dict[str, str] = {
    "session.timeout.ms": (
        "DWAL's group coordinator decides the session timeout: set the broker's "
        "group_session_timeout_ms (docs/configuration.md)"
    ),
    "heartbeat.interval.ms": (
        "DWAL's group coordinator tells members how often to heartbeat: set the broker's "
        "group_heartbeat_interval_ms (docs/configuration.md)"
    ),
    "partition.assignment.strategy": (
        "DWAL's group coordinator assigns partitions itself (server-side, like Kafka's "
        "group.protocol=consumer, KIP-848): there is no client assignor to choose"
    ),
    "group.protocol": "DWAL's groups always use the server-side protocol (KIP-848 style)",
    "auto.create.topics.enable": (
        "topic auto-creation is the broker's auto_create_topics setting (docs/configuration.md)"
    ),
    "num.partitions": "the partitions of auto-created topics are the broker's default_partitions",
    "security.protocol": "DWAL's native protocol has no TLS or SASL yet",
    "sasl.mechanism": "DWAL's native protocol has no TLS or SASL yet",
    "ssl.ca.location": "DWAL's native protocol has no TLS or SASL yet",
}


def dotted(name: str) -> str:
    """`linger_ms` and `linger.ms` are one option: its dotted spelling."""
    return name.replace("_", ".")


def translate(
    options: Mapping[str, Any], table: Mapping[str, KafkaOption], what: str
) -> dict[str, Any]:
    """DWAL keyword arguments for Kafka-spelled `options` (dotted or underscored names).

    Raises UnknownOptionError for an option that `what` (e.g. "Producer") does not take, with
    where it belongs or the close matches; ValueError for a value of the wrong type. Two
    spellings of one option are an error too.
    """
    result: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for name, value in options.items():
        key = dotted(name)
        option = table.get(key)
        if option is None:
            raise UnknownOptionError(_unknown(name, key, table, what))
        if option.keyword in given_as:
            raise UnknownOptionError(
                f"{what}: {name!r} and {given_as[option.keyword]!r} are the same option"
            )
        convert = option.convert or CONVERTERS[option.kind]
        try:
            result[option.keyword] = convert(value)
        except ValueError as error:
            raise ValueError(f"{what} option {name!r}: {error}") from None
        given_as[option.keyword] = name
    return result


def _unknown(name: str, key: str, table: Mapping[str, KafkaOption], what: str) -> str:
    if key in ELSEWHERE:
        return f"{what} does not take {name!r}: {ELSEWHERE[key]}"
    close = difflib.get_close_matches(key, list(table), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{what} does not take {name!r}{hint}"
