"""Structured logging: one line per event, ``key=value`` pairs (logfmt).

Every component logs through the stdlib `logging` module under the ``dwal`` namespace with
`log_event`, so operators can grep and parse lines without a schema.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LEVELS = ("debug", "info", "warning", "error")


def _format_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"time={stamp}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"event={_format_value(record.getMessage())}",
        ]
        parts.extend(f"{key}={_format_value(value)}" for key, value in fields.items())
        if record.exc_info:
            parts.append(f"error={_format_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


def configure(level: str = "info") -> None:
    """Send every ``dwal`` logger's records to stderr, one logfmt line each."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("dwal")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})
