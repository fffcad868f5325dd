"""Real processes for the Kafka listener's tests: a `dwal broker` serving Kafka, the `dwal`
CLI and kcat.

`KafkaBroker` runs ``python -m client.cli broker ... --kafka-port P`` as a plain subprocess
(the Kafka clients under test block, so the tests are synchronous and the broker must not be
a task of theirs). A thread reads its stderr as it arrives, so the broker never blocks on a
full pipe, and sets an event on the ``broker_started`` line, which names the native and Kafka
ports it bound (port 0 asks for a free one; a restart keeps the ports of the first run). Every
wait is bounded. `stop_all` (the fixtures' teardown) SIGKILLs by PID every process a broker
object started, whether the test passed or not.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

import pytest
import trio

import client
from client import Admin

REPO = pathlib.Path(__file__).resolve().parents[2]
STARTED = re.compile(r"event=broker_started [^\n]*? port=(\d+)[^\n]*? kafka_port=(\d+)")
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30
COMMAND_TIMEOUT_S = 30


class KafkaBroker:
    """One broker (its data directory and ports) across restarts."""

    def __init__(
        self, data_dir: pathlib.Path, *options: str, port: int = 0, kafka_port: int = 0
    ) -> None:
        self.data_dir = data_dir
        self.options = options
        self.port = port
        self.kafka_port = kafka_port
        self.processes: list[subprocess.Popen] = []
        self.output: list[str] = []  # every line of every run

    @property
    def bootstrap(self) -> str:
        """The native listener, for `dwal` and the DWAL client."""
        return f"127.0.0.1:{self.port}"

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def text(self) -> str:
        return "".join(self.output)

    @property
    def running(self) -> bool:
        return bool(self.processes) and self.processes[-1].poll() is None

    def start(self, *, timeout_s: float = START_TIMEOUT_S) -> KafkaBroker:
        """Start a run and wait for its broker_started line; raises AssertionError with the
        broker's output when it exits first or takes longer than `timeout_s`."""
        assert not self.running, "the broker runs already"
        command = [
            sys.executable,
            "-m",
            "client.cli",
            "broker",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--kafka-port",
            str(self.kafka_port),
            "--http-port",
            "-1",
            "--grpc-port",
            "-1",
            "--fsync",
            "never",
            "--data-dir",
            str(self.data_dir),
            *self.options,
        ]
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            text=True,
        )
        self.processes.append(process)
        started = threading.Event()  # one per run: an earlier run's reader may still end
        threading.Thread(target=self._drain, args=(process, started), daemon=True).start()
        if not started.wait(timeout_s) or process.poll() is not None:
            state = "timed out" if process.poll() is None else f"exited {process.returncode}"
            raise AssertionError(f"broker did not start ({state}):\n{self.text[-3000:]}")
        return self

    def _drain(self, process: subprocess.Popen, started: threading.Event) -> None:
        assert process.stderr is not None
        try:
            for line in process.stderr:
                self.output.append(line)
                if not started.is_set() and (match := STARTED.search(line)):
                    self.port, self.kafka_port = int(match.group(1)), int(match.group(2))
                    started.set()
        finally:
            process.wait()
            started.set()  # a run that exits before starting wakes the waiter

    def signal(self, signum: int, *, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Send `signum` to the current run and wait for it to exit; returns its code."""
        process = self.processes[-1]
        if process.poll() is None:
            process.send_signal(signum)
        return process.wait(timeout_s)

    def restart(self, *, kill: bool = False) -> None:
        """Stop the current run (SIGTERM, or SIGKILL with `kill`), start again on the same
        ports and data."""
        self.signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.start()

    def stop_all(self) -> None:
        """SIGKILL every run still alive (teardown)."""
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.kill(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(STOP_TIMEOUT_S)


def run(
    command: Sequence[str], *, stdin: bytes = b"", timeout_s: float = COMMAND_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """Run `command` to its end (killed after `timeout_s`); raises AssertionError with its
    stderr on a non-zero exit."""
    try:
        result = subprocess.run(
            list(command), input=stdin, capture_output=True, timeout=timeout_s, cwd=REPO
        )
    except subprocess.TimeoutExpired as expired:
        raise AssertionError(
            f"{command} did not finish in {timeout_s} s; stderr: {expired.stderr!r}"
        ) from None
    if result.returncode != 0:
        raise AssertionError(
            f"{command} exited {result.returncode}; stderr: {result.stderr.decode()[-2000:]}"
        )
    return result


def dwal(*args: str, stdin: bytes = b"", timeout_s: float = COMMAND_TIMEOUT_S) -> bytes:
    """``dwal ARGS`` (``python -m client.cli``); returns its stdout."""
    return run([sys.executable, "-m", "client.cli", *args], stdin=stdin, timeout_s=timeout_s).stdout


def kcat_path() -> str:
    """kcat's path; skips the test, saying why loudly, when it is not installed."""
    path = shutil.which("kcat") or shutil.which("kafkacat")
    if path is None:
        pytest.skip(
            "KCAT IS NOT INSTALLED: the kcat tests of the Kafka listener did not run "
            "(.ci/run installs it with apt-get install kcat)"
        )
    return path


def kcat(*args: str, stdin: bytes = b"", timeout_s: float = COMMAND_TIMEOUT_S) -> bytes:
    """``kcat ARGS``; returns its stdout."""
    return run([kcat_path(), *args], stdin=stdin, timeout_s=timeout_s).stdout


def create_topics(bootstrap: str, *names: str, partitions: int = 1) -> None:
    """Create `names` through DWAL's own client at the native listener `bootstrap` (the
    clients under test then find them ready)."""

    async def create() -> None:
        async with client.connect(bootstrap) as cluster:
            admin = Admin(cluster)
            for name in names:
                await admin.create_topic(name, partitions)

    trio.run(create)
