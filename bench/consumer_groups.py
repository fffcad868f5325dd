"""Consumer group throughput and rebalance times against one broker process.

Starts a fresh `dwal broker` (fsync=never, data in a temporary directory, a group session
timeout of 6 s and a heartbeat interval of 300 ms), creates a 6-partition topic and produces
`--records` keyed records of 100 bytes, then measures:

    dwal_group_consume_1_member records/s=N MB/s=M
    dwal_group_consume_3_members records/s=N MB/s=M
    dwal_group_rebalance_join_ms=X
    dwal_group_rebalance_leave_ms=X
    dwal_group_rebalance_crash_ms=X session_timeout_ms=6000

One member consumes in this process; several members run as separate processes (this script
with the hidden `--member` mode), since one Python process uses one core. A member process
connects, prints "ready", and subscribes only when told "go" on its stdin, so interpreter
start-up is not measured; after every poll that returned records it prints its running record
count and, per partition, the offset after the last record returned. Consume throughput is
timed from the subscribe (joining the group included) until all records were returned; with
several members, records are counted once however many members read them.

Rebalance times are taken by sampling `GroupAdmin.describe_group` every 20 ms: from the moment
a third member is told to subscribe (join), one member gets SIGTERM and leaves the group
(leave), or one gets SIGKILL and the coordinator must wait for its session to expire (crash),
until the members' assignments again cover every partition evenly. The rebalance members are
idle (auto_offset_reset latest): they long-poll with the consumer's default max_wait_ms
(500 ms, `--max-wait-ms`), and apply assignment changes only between polls. A crashed
member's session runs from its last heartbeat, up to one heartbeat interval before the kill,
so the crash time can come out slightly below the session timeout.

Usage: python bench/consumer_groups.py [--records N] [--max-wait-ms MS]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client  # noqa: E402
from bench.broker_process import run_broker  # noqa: E402
from client import Admin, Consumer, GroupAdmin, Producer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPIC = "bench-groups"
PARTITIONS = 6
VALUE_BYTES = 100
SESSION_TIMEOUT_MS = 6000
HEARTBEAT_INTERVAL_MS = 300
SAMPLE_EVERY_S = 0.020
PARTITION_MAX_BYTES = 16 << 20
FETCH_MAX_BYTES = 32 << 20

# Every member process this script starts, so that all of them are ended whatever happens
# (the broker is stopped by run_broker when the nursery running it exits).
PROCESSES: list[trio.Process] = []


async def end_processes() -> None:
    """Kill (by PID) and reap every process started here that is still running."""
    with trio.CancelScope(shield=True):
        for process in PROCESSES:
            if process.returncode is None:
                try:
                    os.kill(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        with trio.move_on_after(10):
            for process in PROCESSES:
                await process.wait()


async def produce(bootstrap: str, records: int) -> float:
    """Create the topic and produce `records` records with keys spread over its partitions."""
    value = os.urandom(VALUE_BYTES // 2).hex().encode()[:VALUE_BYTES]
    keys = [b"key-%d" % i for i in range(1024)]
    async with client.connect(bootstrap) as cluster:
        await Admin(cluster).create_topic(TOPIC, partitions=PARTITIONS)
        async with Producer(
            cluster, acks=1, linger_ms=2, batch_size=256 * 1024, buffer_bytes_max=8 << 20
        ) as producer:
            send = producer.send_nowait
            started = time.perf_counter()
            await producer.send(TOPIC, value, keys[0])  # loads metadata
            count = 1
            burst = 1000  # about 100 kB between checkpoints
            while count < records:
                end = min(records, count + burst)
                try:
                    while count < end:
                        send(TOPIC, value, keys[count & 1023])
                        count += 1
                except trio.WouldBlock:  # the buffer is full: wait for room
                    await producer.send(TOPIC, value, keys[count & 1023])
                    count += 1
                await trio.lowlevel.checkpoint()
            await producer.flush()
            return time.perf_counter() - started


async def consume_in_process(bootstrap: str, group: str, expected: int) -> tuple[int, float]:
    async with client.connect(bootstrap) as cluster:
        async with Consumer(
            cluster,
            group_id=group,
            auto_offset_reset="earliest",
            partition_max_bytes=PARTITION_MAX_BYTES,
            fetch_max_bytes=FETCH_MAX_BYTES,
        ) as consumer:
            count = 0
            started = time.perf_counter()
            consumer.subscribe([TOPIC])
            while count < expected:
                for records in (await consumer.poll(timeout_ms=1000)).values():
                    count += len(records)
            elapsed = time.perf_counter() - started
            # Take the answer to the fetch still in flight before closing: a connection closed
            # with an answer unread is reset, and a reset connection stops the broker (the
            # reset escapes the server's handler inside an exception group).
            await consumer.poll(timeout_ms=0)
            return count, elapsed


# -- member processes --------------------------------------------------------------------


class Member:
    """A member process: `ready` once connected, `count` its records so far."""

    def __init__(self, process: trio.Process, name: str) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self.stdin, self.stdout = process.stdin, process.stdout
        self.name = name
        self.count = 0  # records returned, including any read again after a rebalance
        self.reached: dict[int, int] = {}  # partition: highest offset returned + 1
        self.ready = trio.Event()
        self.exited = trio.Event()

    async def read_output(self) -> None:
        pending = b""
        try:
            while True:
                chunk = await self.stdout.receive_some(65536)
                if not chunk:
                    return
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line == b"ready":
                        self.ready.set()
                    elif line.startswith(b"count "):
                        count, *ends = line[6:].split()
                        self.count = int(count)
                        for end in ends:
                            partition, offset = end.split(b":")
                            if int(offset) > self.reached.get(int(partition), 0):
                                self.reached[int(partition)] = int(offset)
        finally:
            self.exited.set()

    async def go(self) -> None:
        await self.stdin.send_all(b"go\n")

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            try:
                os.kill(self.process.pid, signum)
            except ProcessLookupError:
                pass

    async def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM (the member leaves the group), SIGKILL if it has not exited in time."""
        self.signal(signal.SIGTERM)
        with trio.move_on_after(timeout_s):
            await self.process.wait()
        if self.process.returncode is None:
            self.signal(signal.SIGKILL)
            await self.process.wait()


async def start_member(
    nursery: trio.Nursery,
    name: str,
    bootstrap: str,
    group: str,
    offset_reset: str,
    max_wait_ms: int,
) -> Member:
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--member",
            "--bootstrap",
            bootstrap,
            "--group",
            group,
            "--offset-reset",
            offset_reset,
            "--max-wait-ms",
            str(max_wait_ms),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    PROCESSES.append(process)
    member = Member(process, name)
    nursery.start_soon(member.read_output)
    with trio.fail_after(30):
        async with trio.open_nursery() as waiting:

            async def exited() -> None:
                await member.exited.wait()
                raise RuntimeError(f"member {name} exited before it was ready")

            waiting.start_soon(exited)
            await member.ready.wait()
            waiting.cancel_scope.cancel()
    return member


async def member_main(args: argparse.Namespace) -> None:
    """The hidden --member mode: join the group when told "go" on stdin, consume, print the
    running count after each poll that returned records; leave the group on SIGTERM/SIGINT
    or when stdin closes (the bench process is gone)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with client.connect(args.bootstrap) as cluster:
            stdin = trio.lowlevel.FdStream(os.dup(0))
            print("ready", flush=True)
            async with trio.open_nursery() as nursery:
                async with Consumer(
                    cluster,
                    group_id=args.group,
                    auto_offset_reset=args.offset_reset,
                    partition_max_bytes=PARTITION_MAX_BYTES,
                    fetch_max_bytes=FETCH_MAX_BYTES,
                    max_wait_ms=args.max_wait_ms,
                ) as consumer:
                    # close() runs outside this scope, so it commits and leaves uncancelled
                    with trio.CancelScope() as polling:

                        async def stop_on_signal() -> None:
                            async for _ in signals:
                                polling.cancel()
                                return

                        nursery.start_soon(stop_on_signal)
                        if await stdin.receive_some(64):  # "go"; nothing: the bench is gone
                            nursery.start_soon(_cancel_on_eof, stdin, polling)
                            count = 0
                            consumer.subscribe([TOPIC])
                            while True:
                                batch = await consumer.poll()
                                if batch:
                                    count += sum(len(records) for records in batch.values())
                                    ends = " ".join(
                                        f"{tp.partition}:{records[-1].offset + 1}"
                                        for tp, records in batch.items()
                                    )
                                    print(f"count {count} {ends}", flush=True)
                nursery.cancel_scope.cancel()


async def _cancel_on_eof(stream: trio.lowlevel.FdStream, scope: trio.CancelScope) -> None:
    while await stream.receive_some(64):
        pass
    scope.cancel()


# -- scenarios ---------------------------------------------------------------------------


async def consume_with_members(
    nursery: trio.Nursery, bootstrap: str, group: str, members: int, expected: int
) -> tuple[int, float]:
    started_members = [
        await start_member(nursery, f"{group}-{i}", bootstrap, group, "earliest", 500)
        for i in range(members)
    ]
    try:
        started = time.perf_counter()
        for member in started_members:
            await member.go()
        # Progress is counted in distinct records: per partition, the furthest any member got
        # (offsets start at 0 and have no gaps), so records read twice do not count.
        while _distinct(started_members) < expected:
            if any(m.exited.is_set() for m in started_members):
                raise RuntimeError("a member process exited while consuming")
            await trio.sleep(0.005)
        elapsed = time.perf_counter() - started
        returned = sum(m.count for m in started_members)
        if returned > expected:
            print(f"# {group}: {returned - expected} records read twice", file=sys.stderr)
        return expected, elapsed
    finally:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as stopping:
                for member in started_members:
                    stopping.start_soon(member.stop)


def _distinct(members: list[Member]) -> int:
    reached: dict[int, int] = {}
    for member in members:
        for partition, offset in member.reached.items():
            reached[partition] = max(reached.get(partition, 0), offset)
    return sum(reached.values())


def _balanced(description, members: int, each: int) -> bool:
    """`members` members, each assigned `each` partitions of the topic, all of them covered."""
    if len(description.members) != members:
        return False
    owned = []
    for member in description.members:
        mine = [tp for tp in member.assignment if tp.topic == TOPIC]
        if len(mine) != each:
            return False
        owned += mine
    return len(set(owned)) == len(owned) == PARTITIONS


async def wait_balanced(
    admin: GroupAdmin, group: str, members: int, each: int, since: float, timeout_s: float
) -> float:
    """Sample describe_group every 20 ms until balanced; returns ms since `since`."""
    with trio.fail_after(timeout_s):
        while True:
            tick = trio.current_time()
            try:
                description = await admin.describe_group(group)
            except client.DwalError as error:
                if error.code != client.ErrorCode.GROUP_ID_NOT_FOUND:
                    raise
                description = None  # no member has joined yet
            if description is not None and _balanced(description, members, each):
                return (time.perf_counter() - since) * 1000
            await trio.sleep_until(tick + SAMPLE_EVERY_S)


async def rebalance_times(nursery: trio.Nursery, bootstrap: str, max_wait_ms: int) -> None:
    group = "bench-rb"
    members: list[Member] = []
    try:
        async with client.connect(bootstrap) as cluster:
            admin = GroupAdmin(cluster)
            for name in ("a", "b"):
                members.append(
                    await start_member(nursery, name, bootstrap, group, "latest", max_wait_ms)
                )
            for member in members:
                await member.go()
            await wait_balanced(admin, group, 2, 3, time.perf_counter(), 30)

            third = await start_member(nursery, "c", bootstrap, group, "latest", max_wait_ms)
            members.append(third)
            started = time.perf_counter()
            await third.go()
            join_ms = await wait_balanced(admin, group, 3, 2, started, 30)
            print(f"dwal_group_rebalance_join_ms={join_ms:.0f}", flush=True)

            leaving = members[0]
            started = time.perf_counter()
            leaving.signal(signal.SIGTERM)  # it commits, leaves the group, exits
            leave_ms = await wait_balanced(admin, group, 2, 3, started, 30)
            print(f"dwal_group_rebalance_leave_ms={leave_ms:.0f}", flush=True)
            with trio.fail_after(10):
                await leaving.process.wait()

            crashing = members[1]
            started = time.perf_counter()
            crashing.signal(signal.SIGKILL)  # no leave: the coordinator waits for the session
            crash_ms = await wait_balanced(
                admin, group, 1, PARTITIONS, started, SESSION_TIMEOUT_MS / 1000 + 30
            )
            print(
                f"dwal_group_rebalance_crash_ms={crash_ms:.0f} "
                f"session_timeout_ms={SESSION_TIMEOUT_MS}",
                flush=True,
            )
    finally:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as stopping:
                for member in members:
                    stopping.start_soon(member.stop)


def print_rate(name: str, count: int, elapsed: float) -> None:
    rate = count / elapsed
    print(f"{name} records/s={rate:.0f} MB/s={rate * VALUE_BYTES / 1e6:.1f}", flush=True)


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="dwal-bench-") as data_dir:
        config = os.path.join(data_dir, "broker.toml")
        with open(config, "w") as file:
            file.write(
                f"group_session_timeout_ms = {SESSION_TIMEOUT_MS}\n"
                f"group_heartbeat_interval_ms = {HEARTBEAT_INTERVAL_MS}\n"
            )
        log_dir = os.path.join(data_dir, "log")
        terminated = False
        try:
            async with trio.open_nursery() as nursery:

                async def stop_on_sigterm(task_status=trio.TASK_STATUS_IGNORED) -> None:
                    nonlocal terminated
                    with trio.open_signal_receiver(signal.SIGTERM) as signals:
                        task_status.started()
                        async for _ in signals:
                            terminated = True
                            nursery.cancel_scope.cancel()

                await nursery.start(stop_on_sigterm)
                with trio.fail_after(30):
                    broker = await nursery.start(
                        run_broker, log_dir, "--config", config, "--fsync", "never"
                    )
                bootstrap = broker.bootstrap
                with trio.fail_after(300):
                    elapsed = await produce(bootstrap, args.records)
                print(f"# produced {args.records} records in {elapsed:.1f} s", file=sys.stderr)

                with trio.fail_after(300):
                    count, elapsed = await consume_in_process(bootstrap, "bench-1", args.records)
                print_rate("dwal_group_consume_1_member", count, elapsed)

                # On a 2-core machine the three member processes and the broker share the two
                # cores, so this measures contention as much as parallelism.
                with trio.fail_after(300):
                    count, elapsed = await consume_with_members(
                        nursery, bootstrap, "bench-3", 3, args.records
                    )
                print_rate("dwal_group_consume_3_members", count, elapsed)

                with trio.fail_after(120):
                    await rebalance_times(nursery, bootstrap, args.max_wait_ms)
                nursery.cancel_scope.cancel()
        finally:
            await end_processes()
        if terminated:
            sys.exit(143)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=1_000_000, help="records to produce")
    parser.add_argument(
        "--max-wait-ms",
        type=int,
        default=500,
        help="max_wait_ms (long-poll bound) of the idle members in the rebalance scenarios",
    )
    parser.add_argument("--member", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parser.add_argument("--offset-reset", default="earliest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.member:
        trio.run(member_main, args)
    else:
        trio.run(bench, args)


if __name__ == "__main__":
    main()
