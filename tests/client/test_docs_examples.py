"""Every example in docs/examples/ runs, as a user would run it, against a real broker.

An example is a whole program: it reads the broker address from DWAL_BOOTSTRAP, makes the
topics it needs (names of its own, so examples do not disturb each other), checks what it
shows with `assert`, and exits 0. docs/client-api.md links to each.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
import trio

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "docs" / "examples").glob("*.py"))


def test_there_are_examples():
    assert EXAMPLES, "docs/examples/ holds no example"


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
async def test_the_example_runs(broker, example):
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, str(example)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO,
            env={**os.environ, "DWAL_BOOTSTRAP": broker.bootstrap, "PYTHONPATH": str(REPO)},
        )
    assert result.returncode == 0, (
        f"{example.name} exited {result.returncode}:\n"
        f"{result.stdout.decode(errors='replace')}\n{result.stderr.decode(errors='replace')}"
    )
