"""Wall-clock time for the broker's shells. Cores never read clocks: they get time as an
argument, and tests pass in whatever time they like."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return int(time.time() * 1000)
