"""Fixtures that run brokers: in-process (fast, same trio run) or as real processes.

Real processes are started with port 0 and report the ports they bound in their
``broker_started`` log line, which the fixture waits for by reading the process's stderr
(no polling, no sleeps). Every process a fixture starts is killed by PID when the test ends,
whether it passed or not.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import trio

from broker.config import BrokerConfig
from broker.node import run_broker
from broker.storage import LogConfig

REPO = pathlib.Path(__file__).resolve().parent.parent
# The whole line (up to its newline), so that a port is never read from a partial chunk;
# http_port is absent when the HTTP gateway is disabled.
STARTED = re.compile(rb"event=broker_started [^\n]*? port=(\d+)(?: http_port=(\d+))?[^\n]*\n")
GRPC_STARTED = re.compile(rb" grpc_port=(\d+)")
KAFKA_STARTED = re.compile(rb" kafka_port=(\d+)")


@dataclass
class InProcessBroker:
    config: BrokerConfig
    port: int
    http_port: int | None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def pytest_addoption(parser):
    """Options of the deterministic simulations: the Raft core's
    (tests/broker/raft/test_simulation.py) and the whole cluster's
    (tests/cluster/test_cluster_simulation.py). A failing seed prints the option that
    replays it."""
    group = parser.getgroup("simulations")
    group.addoption("--sim-seed", type=int, default=None, help="replay one simulation seed")
    group.addoption("--sim-seeds", type=int, default=None, help="number of simulation seeds")
    group.addoption("--sim-first-seed", type=int, default=0, help="first simulation seed")
    group.addoption("--sim-steps", type=int, default=None, help="Raft faults per seed")
    group.addoption(
        "--sim-duration", type=float, default=None, help="cluster simulation seconds under faults"
    )


@pytest.fixture
async def broker(nursery, tmp_path) -> InProcessBroker:
    """A broker running inside the test's trio run, fsync=never for speed."""
    config = BrokerConfig(
        port=0,
        http_port=0,
        grpc_port=-1,
        data_dir=tmp_path / "data",
        log_defaults=LogConfig(fsync="never"),
    )
    addresses = await nursery.start(run_broker, config)
    return InProcessBroker(config, addresses.port, addresses.http_port)


@pytest.fixture
async def group_broker(nursery, tmp_path) -> InProcessBroker:
    """An in-process broker with short group timeouts (session 1.5 s, heartbeat 0.1 s)."""
    config = BrokerConfig(
        port=0,
        http_port=-1,
        grpc_port=-1,
        data_dir=tmp_path / "data",
        log_defaults=LogConfig(fsync="never"),
        offsets_topic_partitions=4,
        group_session_timeout_ms=1500,
        group_heartbeat_interval_ms=100,
    )
    addresses = await nursery.start(run_broker, config)
    return InProcessBroker(config, addresses.port, addresses.http_port)


@dataclass
class BrokerProcess:
    process: trio.Process
    data_dir: pathlib.Path
    port: int = 0
    http_port: int | None = None
    grpc_port: int | None = None  # when started with grpc_port >= 0
    kafka_port: int | None = None  # when started with kafka_port >= 0
    output: bytearray = field(default_factory=bytearray)
    exited: trio.Event = field(default_factory=trio.Event)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid


class BrokerLauncher:
    """Starts `dwal broker` processes and guarantees they are gone at teardown."""

    def __init__(self, nursery: trio.Nursery, tmp_path: pathlib.Path) -> None:
        self.nursery = nursery
        self.tmp_path = tmp_path
        self.processes: list[BrokerProcess] = []

    async def start(
        self,
        data_dir: pathlib.Path | None = None,
        *extra: str,
        port: int = 0,
        http_port: int = 0,
        grpc_port: int = -1,
        kafka_port: int = -1,
        timeout_s: float = 30,
    ) -> BrokerProcess:
        data_dir = data_dir or self.tmp_path / "data"
        command = [
            sys.executable,
            "-m",
            "client.cli",
            "broker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--kafka-port",
            str(kafka_port),
            "--data-dir",
            str(data_dir),
            *extra,
        ]
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        broker = BrokerProcess(process, data_dir)
        self.processes.append(broker)
        ready = trio.Event()
        self.nursery.start_soon(self._drain, broker, ready)
        with trio.fail_after(timeout_s):
            await ready.wait()
        if not broker.port:
            raise RuntimeError(
                "broker exited before it started:\n" + broker.output.decode(errors="replace")
            )
        return broker

    async def _drain(self, broker: BrokerProcess, ready: trio.Event) -> None:
        stream = broker.process.stderr
        assert stream is not None
        try:
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                broker.output += chunk
                if not ready.is_set() and (match := STARTED.search(broker.output)):
                    broker.port = int(match.group(1))
                    broker.http_port = None if match.group(2) is None else int(match.group(2))
                    grpc = GRPC_STARTED.search(match.group(0))
                    broker.grpc_port = None if grpc is None else int(grpc.group(1))
                    kafka = KAFKA_STARTED.search(match.group(0))
                    broker.kafka_port = None if kafka is None else int(kafka.group(1))
                    ready.set()
        finally:
            await broker.process.wait()
            ready.set()
            broker.exited.set()

    async def signal(self, broker: BrokerProcess, signum: int, *, timeout_s: float = 30) -> int:
        """Send `signum` and wait for the process to exit; returns its exit code."""
        if broker.process.returncode is None:
            broker.process.send_signal(signum)
        with trio.fail_after(timeout_s):
            await broker.exited.wait()
        return broker.process.returncode

    async def kill(self, broker: BrokerProcess) -> None:
        await self.signal(broker, signal.SIGKILL)

    async def stop(self, broker: BrokerProcess) -> int:
        return await self.signal(broker, signal.SIGTERM)

    def kill_all(self) -> None:
        for broker in self.processes:
            if broker.process.returncode is None:
                try:
                    os.kill(broker.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
async def broker_launcher(nursery, tmp_path):
    launcher = BrokerLauncher(nursery, tmp_path)
    try:
        yield launcher
    finally:
        launcher.kill_all()
