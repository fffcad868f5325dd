"""Run a DWAL cluster as real processes on 127.0.0.1, for tests.

`ClusterLauncher` declares nodes (a node id, free native/HTTP/controller ports, a data
directory, roles), starts each as ``python -m broker`` and waits for its ``broker_started``
line by reading its stderr as it arrives (bounded by a timeout, never by a sleep). A node can
be SIGKILLed, SIGTERMed and restarted by id on the same ports and data directory. Every
process the launcher ever started is SIGKILLed by PID at `kill_all` (the fixture's teardown),
whether the test passed or failed.

The controller ports must be known before the first process starts (they are the
``--controller-quorum``), so all ports are picked up front by binding (below the ephemeral
port range) and closing the socket; the listeners set SO_REUSEADDR, so a restarted node gets
its ports back at once.

With ``proxied=True`` every inter-broker link goes through a `FaultProxy` of its own: node
i's view of node j's controller port (its ``--controller-quorum``, where node i's own entry
stays its real port) and of node j's native port (its ``[peer_native_addresses]``, in a
config file of its own) is the proxy of the directed link i -> j. Clients still connect to
the brokers directly. `partition` blackholes every link across a cut (both directions);
`heal` lets every link pass again. Broker-only nodes (learners) are reached by the active
controller at their registered controller port, not through a proxy.

`wait_for` polls a condition with a bounded loop and short waits: the state it waits on
(fencing, leadership) lives in other processes and no output announces it to the test.
"""

from __future__ import annotations

import os
import random
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

import trio

import client
from fault_proxy import FaultProxy

REPO = pathlib.Path(__file__).resolve().parents[2]
# The whole line (up to its newline), so that a port is never read from a partial chunk.
STARTED = re.compile(rb"event=broker_started [^\n]*? port=(\d+)[^\n]*\n")
START_TIMEOUT_S = 30
# Short broker heartbeats and session (fencing after 2 s, not 6 s) and few
# __consumer_offsets partitions, so that the tests are quick on a small machine.
BROKER_SESSION_TIMEOUT_MS = 2000
BROKER_HEARTBEAT_INTERVAL_MS = 200
CLUSTER_CONFIG = f"""\
broker_session_timeout_ms = {BROKER_SESSION_TIMEOUT_MS}
broker_heartbeat_interval_ms = {BROKER_HEARTBEAT_INTERVAL_MS}
offsets_topic_partitions = 3
"""
POLL_INTERVAL_S = 0.05

_Result = TypeVar("_Result")


# Ports are picked below the kernel's ephemeral range (32768-60999 by default): a port the
# kernel may hand to any outgoing connection (a client's, another test's broker's) could be
# taken between picking it here and the node binding it.
_PORT_LOW, _PORT_HIGH = 20_000, 32_000
_port_turn = random.Random(os.getpid()).randrange(_PORT_LOW, _PORT_HIGH)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free on 127.0.0.1 a moment ago, outside the ephemeral
    range (all sockets are held open until every port is picked, so no two are the same)."""
    global _port_turn
    sockets: list[socket.socket] = []
    try:
        for _ in range(_PORT_HIGH - _PORT_LOW):
            if len(sockets) == count:
                break
            port = _port_turn
            _port_turn = _PORT_LOW + (_port_turn + 1 - _PORT_LOW) % (_PORT_HIGH - _PORT_LOW)
            held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                held.bind(("127.0.0.1", port))
            except OSError:
                held.close()
                continue
            sockets.append(held)
        assert len(sockets) == count, "no free ports below the ephemeral range"
        return [held.getsockname()[1] for held in sockets]
    finally:
        for held in sockets:
            held.close()


@dataclass
class NodeProcess:
    """One run of a node: its process and everything it wrote on stderr."""

    process: trio.Process
    output: bytearray = field(default_factory=bytearray)
    started: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()


@dataclass
class ClusterNode:
    node_id: int
    port: int
    http_port: int
    controller_port: int
    data_dir: pathlib.Path
    roles: str = "broker,controller"
    rack: str | None = None
    grpc_port: int = -1  # -1: the gRPC gateway is off (see ClusterLauncher.add_node)
    runs: list[NodeProcess] = field(default_factory=list)  # every start, the last is current

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def is_voter(self) -> bool:
        return "controller" in self.roles.split(",")

    @property
    def current(self) -> NodeProcess:
        assert self.runs, f"node {self.node_id} was never started"
        return self.runs[-1]

    @property
    def running(self) -> bool:
        return bool(self.runs) and self.current.returncode is None


@dataclass
class Link:
    """The proxies of the directed link source -> target: to its controller and native
    ports."""

    source: int
    target: int
    controller: FaultProxy
    native: FaultProxy

    @property
    def proxies(self) -> tuple[FaultProxy, FaultProxy]:
        return (self.controller, self.native)


class ClusterLauncher:
    """Declares, starts, signals and restarts the nodes of one cluster; see the module
    docstring. `config_path` is a TOML file given to every node with ``--config`` (with
    `proxied`, each node's copy adds its [peer_native_addresses])."""

    def __init__(
        self,
        nursery: trio.Nursery,
        tmp_path: pathlib.Path,
        config_path: pathlib.Path,
        *,
        proxied: bool = False,
    ) -> None:
        self.nursery = nursery
        self.tmp_path = tmp_path
        self.config_path = config_path
        self.proxied = proxied
        self.nodes: dict[int, ClusterNode] = {}
        self.links: dict[tuple[int, int], Link] = {}  # (source, target) -> its proxies
        self.processes: list[NodeProcess] = []  # every process ever started, for teardown

    def add_node(
        self,
        node_id: int,
        *,
        roles: str = "broker,controller",
        rack: str | None = None,
        data_dir: pathlib.Path | None = None,
        grpc: bool = False,
    ) -> ClusterNode:
        """Declare node `node_id` with free ports; `grpc` turns its gRPC gateway on."""
        assert node_id not in self.nodes, node_id
        port, http_port, controller_port, grpc_port = free_ports(4)
        node = ClusterNode(
            node_id,
            port,
            http_port,
            controller_port,
            data_dir or self.tmp_path / f"node-{node_id}",
            roles,
            rack,
            grpc_port if grpc else -1,
        )
        self.nodes[node_id] = node
        return node

    @property
    def quorum(self) -> str:
        """The --controller-quorum of every node without proxies: the voters declared so
        far."""
        voters = [node for node in self.nodes.values() if node.is_voter]
        return ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in voters)

    def quorum_seen_by(self, node_id: int) -> str:
        """Node `node_id`'s --controller-quorum: with proxies, every other voter at the
        proxy of the link to it (its own entry is always its real port)."""
        if not self.proxied:
            return self.quorum
        entries = []
        for voter in self.nodes.values():
            if not voter.is_voter:
                continue
            port = voter.controller_port
            if voter.node_id != node_id:
                port = self.links[node_id, voter.node_id].controller.listen_port
            entries.append(f"{voter.node_id}@127.0.0.1:{port}")
        return ",".join(entries)

    def config_of(self, node_id: int) -> pathlib.Path:
        """The --config file of node `node_id`: with proxies, a copy that sends its
        replica fetches to each peer through the proxy of the link."""
        if not self.proxied:
            return self.config_path
        lines = [self.config_path.read_text(), "", "[peer_native_addresses]"]
        for (source, target), link in sorted(self.links.items()):
            if source == node_id:
                lines.append(f'"{target}" = "127.0.0.1:{link.native.listen_port}"')
        path = self.tmp_path / f"node-{node_id}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    async def _open_links(self) -> None:
        """Start a proxy pair for every directed link between declared nodes that has none."""
        for source in self.nodes:
            for target, node in self.nodes.items():
                if source == target or (source, target) in self.links:
                    continue
                controller_port, native_port = free_ports(2)
                link = Link(
                    source,
                    target,
                    FaultProxy(
                        ("127.0.0.1", node.controller_port),
                        listen_port=controller_port,
                        name=f"{source}->{target} controller",
                    ),
                    FaultProxy(
                        ("127.0.0.1", node.port),
                        listen_port=native_port,
                        name=f"{source}->{target} native",
                    ),
                )
                for proxy in link.proxies:
                    await self.nursery.start(proxy.serve)
                self.links[source, target] = link

    def links_across(self, side: set[int]) -> list[Link]:
        """Every link between a node in `side` and one outside it, both directions."""
        return [link for (a, b), link in self.links.items() if (a in side) != (b in side)]

    def partition(self, side: set[int]) -> None:
        """Blackhole every link across the cut between `side` and the other nodes."""
        assert self.proxied, "partitions need ClusterLauncher(proxied=True)"
        for link in self.links_across(side):
            for proxy in link.proxies:
                proxy.blackhole()

    def heal(self) -> None:
        """Every link passes again (connections that lost bytes are reset)."""
        for link in self.links.values():
            for proxy in link.proxies:
                proxy.pass_through()

    def command(self, node: ClusterNode, data_dir: pathlib.Path) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "broker",
            "--config",
            str(self.config_of(node.node_id)),
            "--node-id",
            str(node.node_id),
            "--controller-quorum",
            self.quorum_seen_by(node.node_id),
            "--host",
            "127.0.0.1",
            "--port",
            str(node.port),
            "--http-port",
            str(node.http_port),
            "--grpc-port",
            str(node.grpc_port),
            "--controller-port",
            str(node.controller_port),
            "--data-dir",
            str(data_dir),
            "--roles",
            node.roles,
            "--fsync",
            "never",
        ]
        if node.rack is not None:
            command += ["--rack", node.rack]
        return command

    async def launch(self, node_id: int, *, data_dir: pathlib.Path | None = None) -> NodeProcess:
        """Start node `node_id` (on `data_dir`, by default its own) without waiting."""
        node = self.nodes[node_id]
        assert not node.running, f"node {node_id} is running already"
        if self.proxied:
            await self._open_links()
        process = await trio.lowlevel.open_process(
            self.command(node, data_dir or node.data_dir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        run = NodeProcess(process)
        self.processes.append(run)
        node.runs.append(run)
        self.nursery.start_soon(self._drain, run)
        return run

    async def _drain(self, run: NodeProcess) -> None:
        stream = run.process.stderr
        assert stream is not None
        try:
            while chunk := await stream.receive_some(65536):
                run.output += chunk
                if not run.started.is_set() and STARTED.search(run.output):
                    run.started.set()
        finally:
            await run.process.wait()
            run.exited.set()

    async def wait_started(self, node_id: int, *, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait for the current run of `node_id` to log broker_started; raises
        AssertionError with its output when it exits first or takes longer than
        `timeout_s`."""
        run = self.nodes[node_id].current
        await _wait_started_or_exited(run, timeout_s)
        if not run.started.is_set():
            state = "timed out" if run.returncode is None else f"exited with {run.returncode}"
            raise AssertionError(
                f"node {node_id} did not start ({state} after at most {timeout_s} s):\n"
                + run.text[-3000:]
            )

    async def start(self, *node_ids: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Launch the nodes `node_ids` (every declared node when none) together, since a
        voter serves only once a quorum is up; wait for each to log broker_started."""
        for node_id in node_ids or tuple(self.nodes):
            await self.launch(node_id)
        with trio.fail_after(timeout_s + 1):  # each wait is bounded; this bounds them all
            for node_id in node_ids or tuple(self.nodes):
                await self.wait_started(node_id, timeout_s=timeout_s)

    async def start_refused(
        self, node_id: int, *, data_dir: pathlib.Path | None = None, timeout_s: float = 30
    ) -> NodeProcess:
        """Start a node that must refuse to start; return its run once it has exited."""
        run = await self.launch(node_id, data_dir=data_dir)
        await _wait_started_or_exited(run, timeout_s)
        assert not run.started.is_set(), f"node {node_id} started:\n{run.text[-3000:]}"
        if run.returncode is None:
            raise AssertionError(
                f"node {node_id} did not exit within {timeout_s} s:\n{run.text[-3000:]}"
            )
        await run.exited.wait()  # its output is read to the end
        return run

    async def signal(self, node_id: int, signum: int, *, timeout_s: float = 30) -> int:
        """Send `signum` to the current run of `node_id`, wait for it to exit; returns the
        exit code."""
        run = self.nodes[node_id].current
        if run.returncode is None:
            try:
                os.kill(run.pid, signum)
            except ProcessLookupError:
                pass
        with trio.fail_after(timeout_s):
            await run.exited.wait()
        assert run.returncode is not None
        return run.returncode

    async def kill(self, node_id: int) -> None:
        await self.signal(node_id, signal.SIGKILL)

    async def stop(self, node_id: int) -> int:
        return await self.signal(node_id, signal.SIGTERM)

    def pause(self, node_id: int) -> None:
        """SIGSTOP the current run of `node_id` (it keeps its sockets, answers nothing)."""
        os.kill(self.nodes[node_id].current.pid, signal.SIGSTOP)

    def resume(self, node_id: int) -> None:
        """SIGCONT the current run of `node_id` (harmless if it was not stopped)."""
        run = self.nodes[node_id].current
        if run.returncode is None:
            try:
                os.kill(run.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    async def restart(self, node_id: int, *, timeout_s: float = START_TIMEOUT_S) -> None:
        """Stop `node_id` if it runs (SIGTERM), start it again, wait until it serves."""
        if self.nodes[node_id].running:
            await self.stop(node_id)
        await self.start(node_id, timeout_s=timeout_s)

    def kill_all(self) -> None:
        """SIGKILL every process this launcher started that has not exited (teardown)."""
        for run in self.processes:
            if run.returncode is None:
                try:
                    os.kill(run.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def outputs(self) -> str:
        """Every node's output of its current run, for assertion messages."""
        return "\n".join(
            f"--- node {node.node_id} ---\n{node.current.text[-2000:]}"
            for node in self.nodes.values()
            if node.runs
        )


async def _wait_started_or_exited(run: NodeProcess, timeout_s: float) -> None:
    """Return once `run` logged broker_started or exited (its output read to the end), or
    after `timeout_s`."""
    with trio.move_on_after(timeout_s):
        async with trio.open_nursery() as nursery:

            async def cancel_when(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(cancel_when, run.started)
            nursery.start_soon(cancel_when, run.exited)


async def wait_for(
    condition: Callable[[], Awaitable[_Result | None]],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = POLL_INTERVAL_S,
) -> tuple[_Result, float]:
    """Call `condition` every `interval_s` until it returns something other than None or
    False; returns (that value, seconds waited). A DwalError or ConnectionFailed raised by
    `condition` counts as "not yet". Raises AssertionError naming `what` and the last
    value or error after `timeout_s`."""
    started = time.monotonic()
    last: object = None
    while True:
        try:
            with trio.fail_after(max(timeout_s - (time.monotonic() - started), 0.01)):
                value = await condition()
        except (client.DwalError, client.ConnectionFailed, trio.TooSlowError) as error:
            value, last = None, error
        else:
            last = value
        waited_s = time.monotonic() - started
        if value is not None and value is not False:
            return value, waited_s
        if waited_s >= timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s; last: {last!r}")
        await trio.sleep(interval_s)


async def dwal(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    """Run ``dwal ARGS`` (``python -m client.cli``) to its end; returns the CompletedProcess
    with stdout and stderr captured. Raises AssertionError with its stderr on a non-zero
    exit."""
    with trio.fail_after(timeout_s):
        result = await trio.run_process(
            [sys.executable, "-m", "client.cli", *args],
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO,
        )
    if result.returncode != 0:
        raise AssertionError(f"dwal {' '.join(args)} failed: {result.stderr.decode()}")
    return result
