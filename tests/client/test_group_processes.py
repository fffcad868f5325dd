"""Consumer groups with real processes: three `dwal consume --group` members share a
6-partition topic while a producer writes; one member is SIGKILLed; the broker is SIGKILLed
and restarted. Every record is consumed at least once, no partition has two live owners,
committed offsets never go back, and they survive the broker's crash."""

from __future__ import annotations

import signal
import subprocess
import sys

import trio
from dwal_process import REPO, kill

import client
from client import Admin, GroupAdmin, Producer, TopicPartition

GROUP_CONFIG = "group_session_timeout_ms = 2000\ngroup_heartbeat_interval_ms = 200\n"


class Output:
    """Wakes waiters whenever any member prints something."""

    def __init__(self) -> None:
        self.changed = trio.Event()

    def note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_until(self, condition) -> None:
        while not condition():
            await self.changed.wait()


class Member:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.output = bytearray()
        self.errors = bytearray()

    @property
    def lines(self) -> set[bytes]:
        return set(bytes(self.output).splitlines())


async def start_member(nursery, bootstrap: str, group: str, topic: str, output: Output) -> Member:
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "client.cli",
            "consume",
            topic,
            "--group",
            group,
            "--bootstrap",
            bootstrap,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    member = Member(process)

    async def drain(stream, buffer: bytearray) -> None:
        while chunk := await stream.receive_some(65536):
            buffer += chunk
            output.note()

    nursery.start_soon(drain, process.stdout, member.output)
    nursery.start_soon(drain, process.stderr, member.errors)
    return member


def kill_all(members: list[Member]) -> None:
    """SIGKILL every member still running, by PID (a test that failed leaves none behind)."""
    for member in members:
        kill(member.process)


async def watch_group(
    bootstrap: str,
    group: str,
    violations: list,
    stop: trio.Event,
    balanced: trio.Event,
    shares_wanted: tuple[int, ...] = (2, 2, 2),
) -> None:
    """Sample the group: a partition in two members' assignments, or a committed offset that
    went back, is a violation. Sets `balanced` once the members' shares of partitions are
    `shares_wanted` (sorted)."""
    last: dict[TopicPartition, int] = {}
    async with client.connect(bootstrap) as cluster:
        admin = GroupAdmin(cluster)
        while not stop.is_set():
            try:
                description = await admin.describe_group(group)
            except client.DwalError:
                description = None
            if description is not None:
                owned = [tp for m in description.members for tp in m.assignment]
                shares = sorted(len(m.assignment) for m in description.members)
                if tuple(shares) == shares_wanted:
                    balanced.set()
                if len(owned) != len(set(owned)):
                    violations.append(f"two owners: {sorted(owned)}")
                for p in description.offsets:
                    if p.committed_offset < last.get(p.partition, -1):
                        violations.append(f"{p.partition} went back to {p.committed_offset}")
                    last[p.partition] = max(p.committed_offset, last.get(p.partition, -1))
            with trio.move_on_after(0.1):  # a sampling period, not a wait for a condition
                await stop.wait()


async def test_group_failover_and_restart(broker_launcher, tmp_path):
    config = tmp_path / "dwal.toml"
    config.write_text(GROUP_CONFIG)
    data = tmp_path / "data"
    broker = await broker_launcher.start(data, "--config", str(config), "--fsync", "never")
    members: list[Member] = []
    violations: list[str] = []
    output = Output()
    expected = {b"v-%d" % i for i in range(30_000)}
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("t6", partitions=6)
        async with trio.open_nursery() as nursery:
            stop_watching, balanced = trio.Event(), trio.Event()
            try:
                nursery.start_soon(
                    watch_group, broker.bootstrap, "G", violations, stop_watching, balanced
                )
                for _ in range(3):
                    members.append(await start_member(nursery, broker.bootstrap, "G", "t6", output))
                with trio.fail_after(60):  # produce once the three share the partitions
                    await balanced.wait()
                async with Producer(cluster) as producer:
                    for i in range(15_000):
                        await producer.send("t6", b"v-%d" % i, key=b"%d" % i)
                with trio.fail_after(60):  # all three consume before one dies
                    await output.wait_until(lambda: all(m.output for m in members))
                members[0].process.kill()
                async with Producer(cluster) as producer:
                    for i in range(15_000, 30_000):
                        await producer.send("t6", b"v-%d" % i, key=b"%d" % i)
                with trio.fail_after(60):
                    await output.wait_until(
                        lambda: expected <= set().union(*(m.lines for m in members))
                    )
                for member in members[1:]:
                    member.process.send_signal(signal.SIGTERM)
                with trio.fail_after(30):
                    for member in members:
                        await member.process.wait()
                assert [m.process.returncode for m in members[1:]] == [0, 0]
                stop_watching.set()
            finally:
                kill_all(members)  # no-op when they stopped as planned
                stop_watching.set()
        assert not violations, violations[:5]
        description = await GroupAdmin(cluster).describe_group("G")
        assert description.members == () and sum(p.lag for p in description.offsets) == 0
    await broker_launcher.kill(broker)
    restarted = await broker_launcher.start(data, "--config", str(config), "--fsync", "never")
    async with client.connect(restarted.bootstrap) as cluster:
        after = await GroupAdmin(cluster).committed_offsets("G")
    assert sum(after.values()) == 30_000, after  # the commits survived the crash


async def test_a_group_of_cli_consumers_reads_partitions_added_under_it(broker_launcher, tmp_path):
    """`dwal topic add-partitions` while two `dwal consume --group` members run: both keep
    running, the new partitions are assigned, and every record of every partition is read."""
    config = tmp_path / "dwal.toml"
    config.write_text(GROUP_CONFIG)
    broker = await broker_launcher.start(tmp_path / "data", "--config", str(config))
    members: list[Member] = []
    violations: list[str] = []
    output = Output()
    expected = {b"old-%d" % i for i in range(400)} | {b"new-%d" % i for i in range(800)}
    async with client.connect(broker.bootstrap) as cluster:
        admin = Admin(cluster)
        await admin.create_topic("grow", partitions=2)
        async with trio.open_nursery() as nursery:
            stop_watching, balanced = trio.Event(), trio.Event()
            try:
                for _ in range(2):
                    members.append(
                        await start_member(nursery, broker.bootstrap, "gg2", "grow", output)
                    )
                async with Producer(cluster) as producer:
                    for i in range(400):
                        await producer.send("grow", b"old-%d" % i, partition=i % 2)
                with trio.fail_after(60):
                    await output.wait_until(
                        lambda: (
                            {b"old-%d" % i for i in range(400)}
                            <= set().union(*(m.lines for m in members))
                        )
                    )
                await admin.add_partitions("grow", 6)
                nursery.start_soon(
                    watch_group,
                    broker.bootstrap,
                    "gg2",
                    violations,
                    stop_watching,
                    balanced,
                    (3, 3),
                )
                async with Producer(cluster) as producer:
                    for i in range(800):
                        await producer.send("grow", b"new-%d" % i, partition=i % 6)
                with trio.fail_after(60):
                    await output.wait_until(
                        lambda: expected <= set().union(*(m.lines for m in members))
                    )
                with trio.fail_after(60):
                    await balanced.wait()
                assert [m.process.returncode for m in members] == [None, None], [
                    bytes(m.errors) for m in members
                ]
                for member in members:
                    member.process.send_signal(signal.SIGTERM)
                with trio.fail_after(30):
                    for member in members:
                        await member.process.wait()
                assert [m.process.returncode for m in members] == [0, 0]
            finally:
                kill_all(members)
                stop_watching.set()
    for member in members:
        assert b"error" not in bytes(member.errors) and b"Traceback" not in bytes(member.errors)
    assert not violations, violations[:5]
