"""Trio nurseries wrap exceptions in ExceptionGroups; the client's public context managers
use nurseries only for background tasks that never raise, so a group around a single error
is just noise for the caller. `single_error` unwraps it."""

from __future__ import annotations

import contextlib
from typing import Iterator


def single_error(error: BaseException) -> BaseException:
    """The innermost exception of nested one-element groups (or `error` itself)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


@contextlib.contextmanager
def unwrapped_errors() -> Iterator[None]:
    """Re-raise an ExceptionGroup holding one exception as that exception."""
    try:
        yield
    except BaseExceptionGroup as group:
        inner = single_error(group)
        if inner is group:
            raise
        raise inner from None
