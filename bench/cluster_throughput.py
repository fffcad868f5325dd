"""Produce and consume throughput of one broker, then of a 3-broker cluster, in one run.

First a single node (`python -m broker` without --controller-quorum: an embedded one-voter
controller), then three nodes forming a cluster (each a broker and a controller voter,
--controller-quorum naming all three). Each gets a fresh temporary data directory and free
ports on 127.0.0.1; a topic of `--partitions` (12) partitions with one replica each (RF=1),
so in the cluster every broker leads a third of them and the client sends to all three
(bootstrapped on all three addresses). Per record size (100 B and 1 KiB by default) the
client produces for `--seconds` (or `--records`, whichever ends first), then consumes the
topic from the start. The settings are those of bench/produce_consume.py, so the single-node
figures are comparable with its `fsync_never` lines: acks=1, linger_ms=2, batch_size 256 KiB,
producer buffer 8 MiB for records under 1 KiB and 32 MiB from 1 KiB, fsync policy "never"
(`--fsync`, `--acks` to change), a consumer fetching up to 16 MiB per partition and 32 MiB
per request. Produce latency is sampled on every 997th record, from `send()` to the answer.

On this 2-core machine the three broker processes and the client process share 2 cores, so
the cluster is not expected to be faster here: the figures show the cost of spreading the
partitions over processes (more connections and requests, fewer records per request), not
the scaling of a cluster of machines. Where the one broker process is the bottleneck (it
runs on one core) three processes can still come out ahead by using the second core.
Nothing is asserted about time.

Prints one line per figure, then a table side by side:

    single_node produce_100B records/s=N MB/s=M p50_ms=X p99_ms=Y
    cluster_3 consume_100B records/s=N MB/s=M

`LocalBrokers` (below) runs the broker processes; bench/controller_failover.py uses it too.
Every process it starts is stopped by PID when its block exits, on errors too: SIGTERM, then
SIGKILL after STOP_TIMEOUT_S.

Usage: python bench/cluster_throughput.py [--seconds 5] [--records 5000000]
       [--sizes 100,1024] [--partitions 12] [--fsync never] [--acks 1]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client  # noqa: E402
from bench.produce_consume import percentile  # noqa: E402
from client import Admin, Consumer, Producer  # noqa: E402
from protocol import ApiKey  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
STARTED = re.compile(rb"event=broker_started [^\n]*\n")  # the whole line, never a partial one
OUTPUT_KEPT_BYTES = 64 * 1024  # the end of a broker's log, for the error if it exits
STOP_TIMEOUT_S = 10  # after SIGTERM, then SIGKILL
START_TIMEOUT_S = 60  # until broker_started
TOPIC_READY_TIMEOUT_S = 30  # until every broker's metadata has every partition's leader
CONSUME_TIMEOUT_S = 120
LATENCY_SAMPLE_EVERY = 997  # as bench/produce_consume.py


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free on 127.0.0.1 a moment ago."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclasses.dataclass(eq=False)
class BrokerNode:
    node_id: int
    port: int
    controller_port: int
    data_dir: pathlib.Path
    process: trio.Process | None = None
    started: trio.Event = dataclasses.field(default_factory=trio.Event)
    started_at: float = 0.0  # perf_counter time its broker_started line was read
    exited: trio.Event = dataclasses.field(default_factory=trio.Event)
    output: bytearray = dataclasses.field(default_factory=bytearray)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class LocalBrokers:
    """Broker processes on 127.0.0.1, one data directory each under `root`. With `cluster`,
    every node is a controller voter of one quorum; without, each is a node of its own. Use
    `open_brokers`, which stops them all. A task per process reads its stderr for as long as
    it runs (so it never blocks writing its log) and keeps the end of it. A node keeps its
    ports and data directory across restarts."""

    def __init__(
        self,
        nursery: trio.Nursery,
        root: pathlib.Path,
        node_ids: Sequence[int],
        *,
        cluster: bool,
        options: Sequence[str],
    ) -> None:
        self._nursery = nursery
        self.cluster = cluster
        self.options = tuple(options)
        ports = free_ports(2 * len(node_ids))
        self.nodes = {
            node_id: BrokerNode(node_id, ports[2 * i], ports[2 * i + 1], root / f"node-{node_id}")
            for i, node_id in enumerate(node_ids)
        }

    def bootstrap(self, node_ids: Sequence[int] | None = None) -> str:
        """The native addresses of `node_ids` (default: all), comma-separated."""
        ids = self.nodes if node_ids is None else node_ids
        return ",".join(self.nodes[node_id].address for node_id in ids)

    def command(self, node: BrokerNode) -> list[str]:
        command = [sys.executable, "-m", "broker", "--node-id", str(node.node_id)]
        command += [
            "--port",
            str(node.port),
            "--http-port",
            "-1",
            "--grpc-port",
            "-1",
            "--data-dir",
            str(node.data_dir),
        ]
        if self.cluster:
            quorum = ",".join(
                f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes.values()
            )
            command += ["--controller-quorum", quorum]
            command += ["--controller-port", str(node.controller_port)]
        return command + list(self.options)

    async def spawn(self, node_id: int) -> float:
        """Start the node's process; returns the perf_counter time it was started at."""
        node = self.nodes[node_id]
        assert node.process is None or node.process.returncode is not None, "still running"
        # fresh ones: the reader of a killed process may not have seen its end of file yet
        node.started, node.exited, node.output = trio.Event(), trio.Event(), bytearray()
        spawned_at = time.perf_counter()
        node.process = await trio.lowlevel.open_process(
            self.command(node),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        self._nursery.start_soon(_read_output, node, node.process)
        return spawned_at

    async def wait_started(self, node_id: int, timeout_s: float = START_TIMEOUT_S) -> float:
        """Wait for the node's `broker_started` line; returns the perf_counter time it was
        read at. Raises RuntimeError with the end of its log if the process exits first or
        `timeout_s` passes."""
        node = self.nodes[node_id]
        with trio.move_on_after(timeout_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when, node.exited, nursery.cancel_scope)
                await node.started.wait()
                nursery.cancel_scope.cancel()
        if node.started.is_set():
            return node.started_at
        log = node.output.decode(errors="replace")
        why = "exited" if node.exited.is_set() else f"did not serve within {timeout_s} s"
        raise RuntimeError(f"node {node_id} {why}; the end of its log:\n{log}")

    async def start_all(self) -> dict[int, float]:
        """Spawn every node at once (a quorum needs a majority before any node serves) and
        wait until all serve; returns per node the seconds from its spawn to serving."""
        spawned_at = {node_id: await self.spawn(node_id) for node_id in self.nodes}
        return {
            node_id: await self.wait_started(node_id) - spawned_at[node_id]
            for node_id in self.nodes
        }

    async def restart(self, node_id: int) -> float:
        """Spawn the node and wait until it serves; returns the seconds that took."""
        spawned_at = await self.spawn(node_id)
        return await self.wait_started(node_id) - spawned_at

    async def kill(self, node_id: int) -> float:
        """SIGKILL the node's process and reap it; returns the perf_counter time of the kill."""
        process = self.nodes[node_id].process
        assert process is not None and process.returncode is None, "not running"
        killed_at = time.perf_counter()
        os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        return killed_at

    async def stop(self, node_id: int) -> None:
        """SIGTERM the node's process, SIGKILL after STOP_TIMEOUT_S; reap it. Does nothing
        for a node never started or already reaped; runs shielded from cancellation."""
        process = self.nodes[node_id].process
        if process is None:
            return
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT_S):
                    await process.wait()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
            await process.wait()

    async def stop_all(self) -> None:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for node_id in self.nodes:
                    nursery.start_soon(self.stop, node_id)


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _read_output(node: BrokerNode, process: trio.Process) -> None:
    """Read the process's stderr to its end; sets the events and keeps the output that
    `node` had when this process was spawned (a later spawn of the node replaces them)."""
    assert process.stderr is not None
    started, exited, output = node.started, node.exited, node.output
    try:
        while chunk := await process.stderr.receive_some(65536):
            output += chunk
            if not started.is_set() and STARTED.search(output):
                node.started_at = time.perf_counter()
                started.set()
            del output[:-OUTPUT_KEPT_BYTES]
    finally:
        exited.set()


@contextlib.asynccontextmanager
async def open_brokers(
    root: pathlib.Path, node_ids: Sequence[int], *, cluster: bool, options: Sequence[str] = ()
) -> AsyncIterator[LocalBrokers]:
    """A `LocalBrokers` whose processes (none started yet) are all stopped by PID when the
    block exits, however it exits."""
    async with trio.open_nursery() as nursery:
        brokers = LocalBrokers(nursery, root, node_ids, cluster=cluster, options=options)
        try:
            yield brokers
        finally:
            await brokers.stop_all()
            nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------------- throughput


async def wait_topic_ready(brokers: LocalBrokers, topic: str, partitions: int) -> list[int]:
    """Wait until every running broker's metadata names a leader for every partition;
    returns the leader of each partition."""
    leaders: list[int] = []
    body = {"topics": [topic], "allow_auto_topic_creation": False}
    with trio.fail_after(TOPIC_READY_TIMEOUT_S):
        for node in brokers.nodes.values():
            async with client.connect(node.address) as cluster:
                connection = await cluster.connection("127.0.0.1", node.port)
                while True:
                    answer = (await cluster.call(ApiKey.METADATA, body, connection=connection)).body
                    entry = answer["topics"][0]
                    leaders = [p["leader"] for p in entry.get("partitions", ())]
                    if not entry["error_code"] and len(leaders) == partitions and -1 not in leaders:
                        break
                    await trio.sleep(0.05)
    return leaders


@dataclasses.dataclass(frozen=True)
class Figures:
    records: int
    seconds: float
    value_bytes: int
    latencies_ms: tuple[float, ...] = ()

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds

    @property
    def megabytes_per_second(self) -> float:
        return self.records * self.value_bytes / self.seconds / 1e6


async def produce(
    bootstrap: str, topic: str, value_bytes: int, arguments: argparse.Namespace
) -> Figures:
    """Produce as bench/produce_consume.py does, to every partition (keyless, sticky)."""
    latencies: list[float] = []
    value = os.urandom(value_bytes // 2 + 1).hex().encode()[:value_bytes]
    buffer_bytes = (8 << 20) if value_bytes < 1024 else (32 << 20)
    acks = arguments.acks if arguments.acks == "all" else int(arguments.acks)
    async with client.connect(bootstrap) as cluster, trio.open_nursery() as nursery:
        async with Producer(
            cluster, acks=acks, linger_ms=2, batch_size=256 * 1024, buffer_bytes_max=buffer_bytes
        ) as producer:
            await (await producer.send(topic, value)).wait()  # loads metadata
            count = 1
            burst = max(10, 100_000 // value_bytes)  # about 100 kB between checkpoints
            next_sample = LATENCY_SAMPLE_EVERY
            started = time.perf_counter()
            deadline = started + arguments.seconds
            while count < arguments.records and time.perf_counter() < deadline:
                sent = 0
                try:
                    while sent < burst:
                        producer.send_nowait(topic, value)
                        sent += 1
                except trio.WouldBlock:  # the buffer is full: wait for room
                    await producer.send(topic, value)
                    sent += 1
                count += sent
                if count >= next_sample:
                    next_sample += LATENCY_SAMPLE_EVERY
                    delivery = await producer.send(topic, value)
                    nursery.start_soon(_sample_latency, delivery, time.perf_counter(), latencies)
                    count += 1
                await trio.lowlevel.checkpoint()
            await producer.flush()
            elapsed = time.perf_counter() - started
    return Figures(count, elapsed, value_bytes, tuple(latencies))


async def _sample_latency(delivery: client.Delivery, sent_at: float, latencies: list) -> None:
    await delivery.wait()
    latencies.append((time.perf_counter() - sent_at) * 1000)


async def consume(bootstrap: str, topic: str, expected: int, value_bytes: int) -> Figures:
    """Read the topic from the start until `expected` records came back."""
    async with client.connect(bootstrap) as cluster:
        consumer = Consumer(
            cluster,
            auto_offset_reset="earliest",
            partition_max_bytes=16 << 20,
            fetch_max_bytes=32 << 20,
        )
        await consumer.assign_topic(topic)
        count = 0
        started = time.perf_counter()
        with trio.fail_after(CONSUME_TIMEOUT_S):
            while count < expected:
                for records in (await consumer.poll(timeout_ms=1000)).values():
                    count += len(records)
        return Figures(count, time.perf_counter() - started, value_bytes)


def size_label(value_bytes: int) -> str:
    return f"{value_bytes}B" if value_bytes < 1024 else f"{value_bytes / 1024:g}KiB"


async def measure(
    setup: str, node_count: int, arguments: argparse.Namespace
) -> dict[tuple[str, int], Figures]:
    """Start `node_count` nodes (a cluster if more than one), produce and consume each size,
    stop them; returns figures by (produce|consume, size)."""
    results: dict[tuple[str, int], Figures] = {}
    with tempfile.TemporaryDirectory(prefix="dwal-cluster-throughput-") as temporary:
        options = ["--fsync", arguments.fsync]  # log level info: broker_started is info
        async with open_brokers(
            pathlib.Path(temporary),
            range(1, node_count + 1),
            cluster=node_count > 1,
            options=options,
        ) as brokers:
            await brokers.start_all()
            bootstrap = brokers.bootstrap()
            async with client.connect(bootstrap) as cluster:
                for value_bytes in arguments.sizes:
                    await Admin(cluster).create_topic(
                        f"bench-{value_bytes}", partitions=arguments.partitions
                    )
            for value_bytes in arguments.sizes:
                topic = f"bench-{value_bytes}"
                leaders = await wait_topic_ready(brokers, topic, arguments.partitions)
                spread = " ".join(
                    f"node{node_id}={leaders.count(node_id)}" for node_id in sorted(set(leaders))
                )
                print(f"{setup} topic={topic} partitions led by: {spread}", flush=True)
                label = f"{setup} produce_{size_label(value_bytes)}"
                figures = await produce(bootstrap, topic, value_bytes, arguments)
                results["produce", value_bytes] = figures
                print(
                    f"{label} records/s={figures.records_per_second:.0f} "
                    f"MB/s={figures.megabytes_per_second:.1f} "
                    f"p50_ms={percentile(list(figures.latencies_ms), 0.5):.2f} "
                    f"p99_ms={percentile(list(figures.latencies_ms), 0.99):.2f}",
                    flush=True,
                )
                figures = await consume(bootstrap, topic, figures.records, value_bytes)
                results["consume", value_bytes] = figures
                print(
                    f"{setup} consume_{size_label(value_bytes)} "
                    f"records/s={figures.records_per_second:.0f} "
                    f"MB/s={figures.megabytes_per_second:.1f}",
                    flush=True,
                )
    return results


def print_table(
    single: dict[tuple[str, int], Figures], cluster: dict[tuple[str, int], Figures]
) -> None:
    print()
    print(f"{'':18} {'1 node':>22} {'3 nodes':>22} {'3 / 1':>6}")
    print(f"{'':18} {'records/s':>12} {'MB/s':>9} {'records/s':>12} {'MB/s':>9}")
    for key in single:
        one, three = single[key], cluster[key]
        print(
            f"{key[0] + ' ' + size_label(key[1]):18} "
            f"{one.records_per_second:12.0f} {one.megabytes_per_second:9.1f} "
            f"{three.records_per_second:12.0f} {three.megabytes_per_second:9.1f} "
            f"{three.records_per_second / one.records_per_second:6.2f}"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="produce duration per size")
    parser.add_argument("--records", type=int, default=5_000_000, help="max records per size")
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(size) for size in text.split(",")],
        default=[100, 1024],
        help="record value sizes in bytes, comma-separated",
    )
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--fsync", choices=["always", "interval", "never"], default="never")
    parser.add_argument("--acks", choices=["1", "all"], default="1")
    arguments = parser.parse_args()
    print(
        f"partitions={arguments.partitions} replication_factor=1 acks={arguments.acks} "
        f"fsync={arguments.fsync} seconds={arguments.seconds} records_max={arguments.records} "
        f"cores={os.cpu_count()}",
        flush=True,
    )
    single = await measure("single_node", 1, arguments)
    cluster = await measure("cluster_3", 3, arguments)
    print_table(single, cluster)


if __name__ == "__main__":
    trio.run(main)
