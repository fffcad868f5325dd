"""A real broker process whose open-file limit is 256 (soft and hard, so the start cannot
raise it) hosts 400 partitions, far more than the 85 it could when each partition kept three
files open, and serves produce and fetch on every one of them, restarted too, with its
descriptors within the limit. A soft limit below the hard one is raised to it at start."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import pytest
import trio

import client
from client import Admin, Consumer, Producer, TopicPartition

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPEN_FILES_MAX = 256
TOPICS, PARTITIONS = 4, 100
STARTED = b"event=broker_started "


def open_files_limiter(soft: int, hard: int):
    def limit_open_files() -> None:  # runs in the child, before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit_open_files


class LimitedBroker:
    """`dwal broker` processes under the limit; each is killed by PID when the test ends."""

    def __init__(self, nursery: trio.Nursery, data_dir) -> None:
        self.nursery = nursery
        self.data_dir = data_dir
        self.processes: list[trio.Process] = []
        self.output = bytearray()
        self._output_grew = trio.Event()

    async def wait_for_output(self, text: bytes) -> None:
        """Return once every process's output so far contains `text` (at most 10 s)."""
        with trio.fail_after(10):
            while text not in self.output:
                await self._output_grew.wait()

    async def start(
        self, soft: int = OPEN_FILES_MAX, hard: int = OPEN_FILES_MAX
    ) -> tuple[trio.Process, str]:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "client.cli",
                "broker",
                "--port",
                "0",
                "--http-port",
                "-1",
                "--grpc-port",
                "-1",
            ]
            + ["--data-dir", str(self.data_dir), "--fsync", "never"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=REPO,
            preexec_fn=open_files_limiter(soft, hard),
        )
        self.processes.append(process)
        started = trio.Event()
        port: list[int] = []
        output = bytearray()  # this process's

        async def drain() -> None:
            assert process.stderr is not None
            while chunk := await process.stderr.receive_some(65536):
                output.extend(chunk)
                self.output += chunk
                self._output_grew.set()
                self._output_grew = trio.Event()
                if not started.is_set() and STARTED in output:
                    line = output[output.index(STARTED) :].split(b"\n")[0]
                    port.append(int(line.split(b" port=")[1].split(b" ")[0]))
                    started.set()
            started.set()

        self.nursery.start_soon(drain)
        with trio.fail_after(15):
            await started.wait()
        assert port, "the broker exited:\n" + self.output.decode(errors="replace")[-3000:]
        return process, f"127.0.0.1:{port[0]}"

    def kill_all(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                try:
                    os.kill(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
async def limited_broker(nursery, tmp_path):
    launcher = LimitedBroker(nursery, tmp_path / "data")
    try:
        yield launcher
    finally:
        launcher.kill_all()


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def produce_to_all(bootstrap: str, partitions: list[TopicPartition], tag: str) -> None:
    async with client.connect(bootstrap) as cluster:
        async with Producer(cluster, acks=1, linger_ms=5) as producer:
            deliveries = [
                await producer.send(tp.topic, f"{tag}-{tp}", partition=tp.partition)
                for tp in partitions
            ]
            for delivery in deliveries:
                await delivery.wait()


async def fetch_all(bootstrap: str, partitions: list[TopicPartition]) -> dict:
    """Every record of every partition, read from the start."""
    found: dict[TopicPartition, list[bytes]] = {tp: [] for tp in partitions}
    async with client.connect(bootstrap) as cluster:
        consumer = Consumer(cluster, auto_offset_reset="earliest")
        consumer.assign(partitions)
        await consumer.seek_to_beginning(partitions)
        with trio.fail_after(10):
            while sum(map(len, found.values())) < 2 * len(partitions):
                for tp, records in (await consumer.poll(timeout_ms=200)).items():
                    found[tp].extend(record.value for record in records)
    return found


@pytest.mark.timeout(60)
async def test_a_broker_under_ulimit_256_serves_400_partitions(limited_broker):
    process, bootstrap = await limited_broker.start()
    partitions = [TopicPartition(f"t{t}", p) for t in range(TOPICS) for p in range(PARTITIONS)]
    async with client.connect(bootstrap) as cluster:
        for topic in range(TOPICS):
            await Admin(cluster).create_topic(f"t{topic}", PARTITIONS)
    await produce_to_all(bootstrap, partitions, "first")
    assert open_descriptors(process.pid) <= OPEN_FILES_MAX
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        await process.wait()
    process, bootstrap = await limited_broker.start()
    await produce_to_all(bootstrap, partitions, "second")
    found = await fetch_all(bootstrap, partitions)
    for tp in partitions:
        assert found[tp] == [f"first-{tp}".encode(), f"second-{tp}".encode()], tp
    assert open_descriptors(process.pid) <= OPEN_FILES_MAX
    assert b"Too many open files" not in limited_broker.output
    await limited_broker.wait_for_output(b"event=open_files_limit soft=256 hard=256 ")


async def test_the_soft_limit_is_raised_to_the_hard_one(limited_broker):
    process, _ = await limited_broker.start(soft=128, hard=OPEN_FILES_MAX)
    with open(f"/proc/{process.pid}/limits") as limits:
        [line] = [line for line in limits if line.startswith("Max open files")]
    assert line.split()[3:5] == [str(OPEN_FILES_MAX), str(OPEN_FILES_MAX)]
    await limited_broker.wait_for_output(
        b"event=open_files_limit soft=256 hard=256 soft_before=128 segment_files_cached_max=192"
    )


async def test_a_cache_leaving_too_few_descriptors_is_refused(tmp_path):
    config = tmp_path / "dwal.toml"
    config.write_text("open_files_cached_max = 250\n")  # 256 - 250 < 64 for everything else
    with trio.fail_after(20):
        refused = await trio.run_process(
            [
                sys.executable,
                "-m",
                "client.cli",
                "broker",
                "--port",
                "0",
                "--http-port",
                "-1",
                "--grpc-port",
                "-1",
            ]
            + ["--data-dir", str(tmp_path / "data"), "--config", str(config)],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO,
            preexec_fn=open_files_limiter(OPEN_FILES_MAX, OPEN_FILES_MAX),
        )
    assert refused.returncode == 2
    assert refused.stderr.decode().splitlines() == [
        "error: open_files_cached_max (250) must leave at least 64 of the open-file limit (256) "
        "for sockets and other files: raise the limit (ulimit -n) or lower the setting"
    ]
    assert not (tmp_path / "data").exists()
