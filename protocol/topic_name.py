"""Topic name rules, as Kafka's: ``[a-zA-Z0-9._-]``, 1 to 249 characters, not '.' or '..'."""

from __future__ import annotations

import re

TOPIC_NAME_CHARS_MAX = 249
_LEGAL = re.compile(r"[a-zA-Z0-9._-]+")


def validate_topic_name(name: object) -> str | None:
    """Return None when `name` is a legal topic name, else the reason it is not."""
    if type(name) is not str or not name:
        return "topic name must be a non-empty string"
    if len(name) > TOPIC_NAME_CHARS_MAX:
        return f"topic name is longer than {TOPIC_NAME_CHARS_MAX} characters"
    if name in (".", ".."):
        return "topic name cannot be '.' or '..'"
    if not _LEGAL.fullmatch(name):
        return "topic name may contain only ASCII letters, digits, '.', '_' and '-'"
    return None
