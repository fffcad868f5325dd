"""Fixtures for the broker's tests (tests/broker and the folders below it)."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable

import pytest


class FdatasyncSpy:
    """Stands in for os.fdatasync: counts the calls, can hold each until `release` is set
    (at most 30 s), and can fail them with `error` instead of syncing."""

    def __init__(self, monkeypatch, *, hold: bool = False, error: OSError | None = None):
        self.calls = 0
        self.entered = threading.Event()  # set by the first call
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self._error = error
        self._lock = threading.Lock()  # calls come from worker threads
        self._real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", self)

    def hold(self) -> None:
        """Make calls from now on wait for `release`."""
        self.release.clear()

    def __call__(self, descriptor: int) -> None:
        with self._lock:
            self.calls += 1
        self.entered.set()
        self.release.wait(30)
        if self._error is not None:
            raise self._error
        self._real(descriptor)


@pytest.fixture
def fdatasync_spy(monkeypatch) -> Callable[..., FdatasyncSpy]:
    """`fdatasync_spy(hold=False, error=None)` puts a FdatasyncSpy in place of os.fdatasync
    from that moment (the fsyncs of the test's set-up are not counted) until the test ends."""
    return functools.partial(FdatasyncSpy, monkeypatch)
