"""Lint (ruff) and type checks (mypy) as part of the suite, with the settings in
pyproject.toml, so CI fails on a style or typing regression like on any other bug."""

from __future__ import annotations

import pathlib

import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_ruff_finds_nothing():
    result = run_tool("ruff", "check", "protocol", "broker", "client", "bench", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing():
    result = run_tool("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
