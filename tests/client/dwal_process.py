"""Run `dwal` client commands as real processes.

`dwal(...)` runs ``python -m client.cli ARGS`` to its end and returns its exit code and output.

`running_dwal(...)` starts it, collects stdout and stderr as they arrive, and wakes waiters on
each chunk, so tests wait for a line to appear rather than for time to pass. The process is
SIGKILLed by PID when the block exits, whether the test passed or failed (a `fail_after`
firing included).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
from typing import AsyncIterator, Callable

import trio

REPO = pathlib.Path(__file__).resolve().parents[2]


async def dwal(
    *args: str,
    stdin: bytes = b"",
    check: bool = True,
    timeout_s: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``dwal ARGS`` with `stdin` to its end; returns the CompletedProcess (stdout and
    stderr captured). With `check`, a non-zero exit raises AssertionError with its stderr."""
    with trio.fail_after(timeout_s):
        result = await trio.run_process(
            [sys.executable, "-m", "client.cli", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO,
            env=env,
        )
    if check and result.returncode != 0:
        raise AssertionError(f"dwal {' '.join(args)} failed: {result.stderr.decode()}")
    return result


class DwalProcess:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stdout = bytearray()
        self.stderr = bytearray()
        self._changed = trio.Event()
        self.open_streams = 0  # pipes not at end of file yet

    @property
    def finished(self) -> bool:
        """The process exited and all its output has been read."""
        return self.process.returncode is not None and self.open_streams == 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stdout_lines(self) -> list[bytes]:
        return bytes(self.stdout).splitlines()

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace")

    def _note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(
        self, condition: Callable[["DwalProcess"], bool], *, timeout_s: float = 60
    ) -> None:
        """Wait until `condition(self)` holds, re-checking whenever output arrives or the
        process exits; raises TooSlowError (with the output) after `timeout_s`."""
        try:
            with trio.fail_after(timeout_s):
                while True:
                    # `finished` first: trio.Process.returncode polls the OS, so the process
                    # may exit between two reads; it counts as first only if it had exited
                    # before the condition was found false.
                    finished = self.finished
                    if condition(self):
                        return
                    if finished:
                        raise AssertionError(
                            f"dwal exited with {self.process.returncode} first; "
                            f"stderr: {self.stderr_text!r}"
                        )
                    await self._changed.wait()
        except trio.TooSlowError:
            raise AssertionError(
                f"condition not met in {timeout_s} s; stdout tail {bytes(self.stdout[-300:])!r}; "
                f"stderr {self.stderr_text[-1000:]!r}"
            ) from None

    async def wait_exit(self, *, timeout_s: float = 60) -> int:
        """Wait for the process to exit and its output to be read; returns the exit code."""
        await self.wait_until(lambda dwal: dwal.finished, timeout_s=timeout_s)
        assert self.process.returncode is not None
        return self.process.returncode

    async def _drain(self, stream, buffer: bytearray) -> None:
        try:
            while chunk := await stream.receive_some(65536):
                buffer += chunk
                self._note()
        finally:
            self.open_streams -= 1
            self._note()

    async def _watch_exit(self) -> None:
        await self.process.wait()
        self._note()


@contextlib.asynccontextmanager
async def running_dwal(*args: str, stdout: int = subprocess.PIPE) -> AsyncIterator[DwalProcess]:
    """Start ``dwal ARGS`` (stdin closed); yields a DwalProcess; kills it by PID at the end.
    With `stdout` other than PIPE (a file descriptor), stdout is not collected."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "client.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    dwal = DwalProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            if process.stdout is not None:
                dwal.open_streams += 1
                nursery.start_soon(dwal._drain, process.stdout, dwal.stdout)
            dwal.open_streams += 1
            nursery.start_soon(dwal._drain, process.stderr, dwal.stderr)
            nursery.start_soon(dwal._watch_exit)
            try:
                yield dwal
            finally:
                kill(process)
    finally:
        kill(process)


def kill(process: trio.Process) -> None:
    """SIGKILL `process` by PID unless it has exited already."""
    if process.returncode is None:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
