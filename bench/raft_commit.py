"""Commit throughput and latency of a 3-node Raft group (DWAL's metadata quorum).

Three RaftDrivers run in this one process (one trio run), each with its own TcpTransport on
127.0.0.1 and its own DurableStorage in a temporary directory (fsync on: every Ready with
entries or a vote is fdatasync'ed in a worker thread before its messages leave). Proposals
are key-value puts of `--value-bytes` bytes made on the leader by `concurrency` concurrent
callers in a closed loop; concurrent proposals share Readies, hence fsyncs (group commit).
Latency is from `propose()` to its return: committed on a quorum and applied on the leader.
Prints one line per concurrency level:

    raft_commit_3nodes_fsync concurrency=C proposals/s=N p50_ms=X p99_ms=Y fsyncs/s=F

One process means the three nodes share one Python interpreter (and its GIL): the figures
are a floor for a real deployment, where each controller has its own process and disk.
Usage: python bench/raft_commit.py [--seconds S] [--concurrency 1,16,128] [--value-bytes B]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from broker.raft.config import RaftConfig  # noqa: E402
from broker.raft.driver import DriverConfig, RaftDriver  # noqa: E402
from broker.raft.durable_storage import DurableStorage  # noqa: E402
from broker.raft.kv_demo import KeyValueStore, encode_put  # noqa: E402
from broker.raft.messages import Configuration, Role  # noqa: E402
from broker.raft.tcp_transport import TcpTransport, TcpTransportConfig  # noqa: E402

NODE_IDS = (1, 2, 3)


class Group:
    def __init__(self, directory: pathlib.Path) -> None:
        configuration = Configuration(voters=frozenset(NODE_IDS))
        self.storages = {
            node_id: DurableStorage.open(directory / f"node{node_id}", configuration)
            for node_id in NODE_IDS
        }
        self.transports = {
            node_id: TcpTransport(TcpTransportConfig(node_id=node_id), random.Random(node_id))
            for node_id in NODE_IDS
        }
        options = DriverConfig(tick_interval_seconds=0.05, proposal_timeout_seconds=30)
        self.drivers = {
            node_id: RaftDriver(
                RaftConfig(node_id=node_id, election_ticks=20, heartbeat_ticks=2),
                self.storages[node_id],
                self.transports[node_id],
                KeyValueStore(),
                options=options,
                random_source=random.Random(node_id),
            )
            for node_id in NODE_IDS
        }

    async def start(self, nursery: trio.Nursery) -> RaftDriver:
        for transport in self.transports.values():
            await nursery.start(transport.run)
        for node_id, transport in self.transports.items():
            for peer_id, peer in self.transports.items():
                if peer_id != node_id:
                    transport.set_peer(peer_id, "127.0.0.1", peer.listen_port)
        for driver in self.drivers.values():
            await nursery.start(driver.run)
        leader = self.drivers[1]
        leader.campaign()
        with trio.fail_after(30):
            while leader.node.role != Role.LEADER:
                await trio.sleep(0.01)
        return leader

    def close(self) -> None:
        for storage in self.storages.values():
            storage.close()


async def measure(leader: RaftDriver, concurrency: int, seconds: float, value: bytes) -> str:
    latencies: list[float] = []
    readies_before = leader.statistics().readies
    deadline = time.perf_counter() + seconds

    async def proposer(number: int) -> None:
        sequence = 0
        while time.perf_counter() < deadline:
            sequence += 1
            command = encode_put(b"key-%d" % number, value)
            start = time.perf_counter()
            await leader.propose(command)
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for number in range(concurrency):
            nursery.start_soon(proposer, number)
    elapsed = time.perf_counter() - started
    latencies.sort()
    count = len(latencies)
    p50 = latencies[count // 2] * 1000
    p99 = latencies[min(count - 1, int(count * 0.99))] * 1000
    readies = leader.statistics().readies - readies_before
    return (
        f"raft_commit_3nodes_fsync concurrency={concurrency} proposals/s={count / elapsed:.0f} "
        f"p50_ms={p50:.2f} p99_ms={p99:.2f} leader_readies/s={readies / elapsed:.0f}"
    )


async def main(arguments: argparse.Namespace) -> None:
    value = b"v" * arguments.value_bytes
    with tempfile.TemporaryDirectory(prefix="raft-bench-") as directory:
        group = Group(pathlib.Path(directory))
        try:
            async with trio.open_nursery() as nursery:
                leader = await group.start(nursery)
                await measure(leader, 8, 0.5, value)  # warm up
                for concurrency in arguments.concurrency:
                    print(await measure(leader, concurrency, arguments.seconds, value), flush=True)
                nursery.cancel_scope.cancel()
        finally:
            group.close()


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 16, 128],
    )
    parser.add_argument("--value-bytes", type=int, default=100)
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse_arguments())
