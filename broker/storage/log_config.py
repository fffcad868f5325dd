"""Per-partition log settings, and their Kafka-style topic config names.

Topic configs arrive as strings keyed by dotted names (`segment.bytes`); `LogConfig` holds
them typed and checked. Every rule lives in one table, `_RULES`, used both when parsing
topic configs and when a `LogConfig` is built directly, so a bad value is refused the same
way from either side. A few fields are the broker's alone (`BROKER_ONLY_FIELDS`): no topic
config sets them, and topic configs carry them over from the broker's defaults.
"""

from __future__ import annotations

import dataclasses
import re
import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .producer_state import PRODUCERS_MAX_LIMIT

KIBIBYTE = 1024
MEBIBYTE = 1024 * KIBIBYTE
GIBIBYTE = 1024 * MEBIBYTE
DAY_MS = 24 * 60 * 60 * 1000

SEGMENT_BYTES_MIN = 1024
# Positions in the offset index are u32; appends roll between batches so a segment never
# grows past segment_bytes (a single batch above it is refused), which stays below 2 GiB.
SEGMENT_BYTES_MAX = 2**31 - 1
LONG_MAX = 2**63 - 1

FSYNC_POLICIES = ("always", "interval", "never")
CLEANUP_POLICIES = ("delete", "compact", "compact,delete")


@dataclass(frozen=True, kw_only=True, slots=True)
class LogConfig:
    """Settings of one partition log. Raises ValueError (naming the topic config key) when
    a value is out of range."""

    segment_bytes: int = GIBIBYTE
    segment_ms: int = 7 * DAY_MS
    retention_ms: int = 7 * DAY_MS  # -1: unlimited
    retention_bytes: int = -1  # -1: unlimited
    index_interval_bytes: int = 4096
    max_message_bytes: int = MEBIBYTE + 12
    fsync: str = "always"
    flush_interval_ms: int = 1000
    file_delete_delay_ms: int = 60_000
    cleanup_policy: str = "delete"
    delete_retention_ms: int = DAY_MS
    min_insync_replicas: int = 1
    # The broker's alone (not topic configs):
    producer_id_expiration_ms: int = DAY_MS  # an idle idempotent producer's state is dropped
    # idempotent producers per partition (~1.4 KB each); more evict the least recently written
    producers_max: int = 10_000

    def __post_init__(self) -> None:
        for key, field_name in TOPIC_CONFIG_KEYS.items():
            _RULES[key].check(key, getattr(self, field_name))
        for field_name, rule in _BROKER_ONLY_RULES.items():
            rule.check(field_name, getattr(self, field_name))

    @property
    def deletes_old_segments(self) -> bool:
        """True when cleanup.policy includes delete: retention removes segments by age/size."""
        return "delete" in self.cleanup_policy.split(",")

    @property
    def compacts(self) -> bool:
        """True when cleanup.policy includes compact: the cleaner keeps the last value per key."""
        return "compact" in self.cleanup_policy.split(",")

    @classmethod
    def from_topic_configs(cls, configs: Mapping[str, str], defaults: LogConfig) -> LogConfig:
        """Return `defaults` overridden by the string `configs` (dotted topic config names).

        Raises ValueError naming the key on an unknown key or a bad value.
        """
        overrides: dict[str, Any] = {}
        for key, text in configs.items():
            if key not in TOPIC_CONFIG_KEYS:
                raise ValueError(f"{key} is not a known topic config")
            if not isinstance(text, str):
                raise ValueError(f"{key} must be given as a string, not {type(text).__name__}")
            overrides[TOPIC_CONFIG_KEYS[key]] = _RULES[key].parse(key, text)
        return dataclasses.replace(defaults, **overrides)

    def to_topic_configs(self) -> dict[str, str]:
        """Return every topic config key with its value as a string."""
        return {key: str(getattr(self, name)) for key, name in TOPIC_CONFIG_KEYS.items()}


@dataclass(frozen=True, slots=True)
class _Rule:
    """How to parse and check one config value."""

    parse_text: Callable[[str], object | None]  # None: not parseable
    is_valid: Callable[[object], bool]
    requirement: str  # completes "<key> must be ..."

    def parse(self, key: str, text: str) -> object:
        value = self.parse_text(text)
        if value is None:
            raise ValueError(f"{key} must be {self.requirement}, not {text!r}")
        self.check(key, value)
        return value

    def check(self, key: str, value: object) -> None:
        if not self.is_valid(value):
            raise ValueError(f"{key} must be {self.requirement}, not {value!r}")


_INTEGER_PATTERN = re.compile(r"-?[0-9]{1,19}")


def _parse_integer(text: str) -> int | None:
    stripped = text.strip()
    return int(stripped) if _INTEGER_PATTERN.fullmatch(stripped) else None


def _integer_rule(minimum: int, maximum: int = LONG_MAX) -> _Rule:
    if maximum == LONG_MAX:
        requirement = f"an integer >= {minimum}"
    else:
        requirement = f"an integer between {minimum} and {maximum}"
    return _Rule(
        _parse_integer,
        lambda value: type(value) is int and minimum <= value <= maximum,
        requirement,
    )


def _parse_cleanup_policy(text: str) -> str | None:
    parts = sorted({part.strip() for part in text.split(",")})
    policy = ",".join(parts)
    return policy if policy in CLEANUP_POLICIES else None


_RULES: Mapping[str, _Rule] = types.MappingProxyType(
    {
        "segment.bytes": _integer_rule(SEGMENT_BYTES_MIN, SEGMENT_BYTES_MAX),
        "segment.ms": _integer_rule(1),
        "retention.ms": _integer_rule(-1),
        "retention.bytes": _integer_rule(-1),
        "index.interval.bytes": _integer_rule(0, SEGMENT_BYTES_MAX),
        "max.message.bytes": _integer_rule(1, SEGMENT_BYTES_MAX),
        "fsync.policy": _Rule(
            lambda text: text.strip(),
            lambda value: value in FSYNC_POLICIES,
            "one of " + ", ".join(FSYNC_POLICIES),
        ),
        "flush.ms": _integer_rule(1),
        "file.delete.delay.ms": _integer_rule(0),
        "cleanup.policy": _Rule(
            _parse_cleanup_policy,
            lambda value: value in CLEANUP_POLICIES,
            "delete, compact or compact,delete",
        ),
        "delete.retention.ms": _integer_rule(0),
        "min.insync.replicas": _integer_rule(1, 2**31 - 1),
    }
)

TOPIC_CONFIG_KEYS: Mapping[str, str] = types.MappingProxyType(
    {
        "segment.bytes": "segment_bytes",
        "segment.ms": "segment_ms",
        "retention.ms": "retention_ms",
        "retention.bytes": "retention_bytes",
        "index.interval.bytes": "index_interval_bytes",
        "max.message.bytes": "max_message_bytes",
        "fsync.policy": "fsync",
        "flush.ms": "flush_interval_ms",
        "file.delete.delay.ms": "file_delete_delay_ms",
        "cleanup.policy": "cleanup_policy",
        "delete.retention.ms": "delete_retention_ms",
        "min.insync.replicas": "min_insync_replicas",
    }
)
# Fields no topic config sets, checked by these rules (messages name the field).
_BROKER_ONLY_RULES: Mapping[str, _Rule] = types.MappingProxyType(
    {
        "producer_id_expiration_ms": _integer_rule(1),
        "producers_max": _integer_rule(1, PRODUCERS_MAX_LIMIT),
    }
)
BROKER_ONLY_FIELDS = frozenset(_BROKER_ONLY_RULES)
assert set(_RULES) == set(TOPIC_CONFIG_KEYS)
assert set(TOPIC_CONFIG_KEYS.values()) | BROKER_ONLY_FIELDS == {
    field.name for field in dataclasses.fields(LogConfig)
}
assert not BROKER_ONLY_FIELDS & set(TOPIC_CONFIG_KEYS.values())
