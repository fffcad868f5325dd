"""How `dwal broker` starts, and refuses to, as real processes.

One broker per data directory: a second one is refused, naming the directory and the
holder's pid, and the lock dies with its holder (kill -9 included). A start refused for a
busy port, a held lock or a bad configuration changes nothing in the data directory (no
clean-shutdown marker, no checkpoint, not even a created directory), so a later crash of the
running broker is still followed by a recovery. Every refused start prints exactly one
``error:`` line.
"""

from __future__ import annotations

import pathlib

import pytest
import trio

import client
from client import Admin, Consumer, Producer

TOPIC = "events"
PARTITIONS = 4
CLEAN_SHUTDOWN_FILE = ".clean-shutdown"


def snapshot(directory: pathlib.Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry under `directory`, itself included: relative path -> (mtime in ns, the
    bytes of a file or None for a directory). Empty if `directory` does not exist."""
    if not directory.exists():
        return {}
    entries: dict[str, tuple[int, bytes | None]] = {}
    for path in [directory, *sorted(directory.rglob("*"))]:
        content = path.read_bytes() if path.is_file() else None
        entries[str(path.relative_to(directory))] = (path.lstat().st_mtime_ns, content)
    return entries


def changes(before: dict, after: dict) -> list[str]:
    """What differs between two snapshots, one short line per path."""
    found = [f"created {path}" for path in sorted(after.keys() - before.keys())]
    found += [f"removed {path}" for path in sorted(before.keys() - after.keys())]
    for path in sorted(before.keys() & after.keys()):
        (mtime_before, content_before), (mtime_after, content_after) = before[path], after[path]
        if content_before != content_after:
            found.append(f"rewrote {path}")
        elif mtime_before != mtime_after:
            found.append(f"touched {path}")
    return found


def clean_shutdown_markers(data_dir: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob(CLEAN_SHUTDOWN_FILE))


def one_error_line(broker) -> str:
    """The refused broker's only line of output, which must be an ``error:`` line."""
    lines = broker.output.decode(errors="replace").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


async def start_refused(launcher, data_dir: pathlib.Path, *extra: str, **ports: int):
    """Start a broker that must refuse to start; return it once it has exited."""
    with pytest.raises(RuntimeError, match="exited before it started"):
        await launcher.start(data_dir, *extra, **ports)
    refused = launcher.processes[-1]
    await refused.exited.wait()
    return refused


async def produce(bootstrap: str, values: list[bytes], *, create: bool = False) -> None:
    async with client.connect(bootstrap) as cluster:
        if create:
            await Admin(cluster).create_topic(TOPIC, PARTITIONS)
        async with Producer(cluster, acks=1) as producer:
            deliveries = [
                await producer.send(TOPIC, value, partition=number % PARTITIONS)
                for number, value in enumerate(values)
            ]
        for delivery in deliveries:
            await delivery.wait()


async def read_values(bootstrap: str, count: int) -> list[bytes]:
    """The first `count` values of the topic, sorted (waits for them; fails after 30 s)."""
    values: list[bytes] = []
    async with client.connect(bootstrap) as cluster:
        consumer = Consumer(cluster, auto_offset_reset="earliest")
        await consumer.assign_topic(TOPIC)
        with trio.fail_after(30):
            while len(values) < count:
                for records in (await consumer.poll(timeout_ms=1000)).values():
                    values.extend(record.value for record in records)
    return sorted(values)


def numbered(prefix: bytes, count: int) -> list[bytes]:
    return [b"%s-%03d" % (prefix, number) for number in range(count)]


async def crashed_data_dir(launcher, data_dir: pathlib.Path) -> list[bytes]:
    """Fill `data_dir` through a broker that is then killed (no clean-shutdown markers);
    return the values written."""
    values = numbered(b"crashed", 40)
    broker = await launcher.start(data_dir)
    await produce(broker.bootstrap, values, create=True)
    await launcher.kill(broker)
    assert clean_shutdown_markers(data_dir) == []
    return values


async def test_second_broker_on_a_data_dir_is_refused_and_the_first_keeps_serving(
    broker_launcher, tmp_path
):
    data_dir = tmp_path / "data"
    first = await broker_launcher.start(data_dir)
    before_values = numbered(b"before", 40)
    await produce(first.bootstrap, before_values, create=True)
    before = snapshot(data_dir)

    refused = await start_refused(broker_launcher, data_dir)  # its own free ports

    assert changes(before, snapshot(data_dir)) == []
    assert refused.process.returncode == 1
    assert one_error_line(refused) == (
        f"error: data directory {data_dir} is in use by another broker (pid {first.pid})"
    )
    after_values = numbered(b"after", 40)
    await produce(first.bootstrap, after_values)
    assert await read_values(first.bootstrap, 80) == sorted(before_values + after_values)


async def test_a_refused_second_start_on_a_live_data_dir_still_lets_a_crash_recover(
    broker_launcher, tmp_path
):
    # The scenario: `make run` twice (same port, same data dir), then kill -9 of the
    # running broker. The refused start must not have marked the live logs cleanly shut down.
    data_dir = tmp_path / "data"
    running = await broker_launcher.start(data_dir)
    async with client.connect(running.bootstrap) as cluster:
        await Admin(cluster).create_topic(TOPIC, PARTITIONS, configs={"segment.bytes": "1024"})
        async with Producer(cluster, acks=1) as producer:
            for number in range(30):  # one batch at a time: about six segments per partition
                await (await producer.send(TOPIC, b"%0100d" % number, partition=0)).wait()
    before = snapshot(data_dir)

    refused = await start_refused(broker_launcher, data_dir, port=running.port)

    assert changes(before, snapshot(data_dir)) == []
    assert refused.process.returncode == 1
    assert one_error_line(refused) in (
        f"error: cannot listen on 127.0.0.1:{running.port}: Address already in use",
        f"error: data directory {data_dir} is in use by another broker (pid {running.pid})",
    )
    await broker_launcher.kill(running)
    assert clean_shutdown_markers(data_dir) == []
    # Proof that the restart recovers: every partition (the topic's and __consumer_offsets')
    # reports it was opened after an unclean shutdown.
    restarted = await broker_launcher.start(data_dir)
    partitions = len(list(data_dir.glob("*-[0-9]*")))
    assert f"partitions={partitions} recovered_after_crash={partitions} ".encode() in (
        restarted.output
    ), restarted.output.decode()


@pytest.mark.parametrize("busy", ["port", "http_port", "grpc_port", "kafka_port"])
async def test_a_start_refused_on_a_busy_port_changes_nothing(broker_launcher, tmp_path, busy):
    data_dir = tmp_path / "data"
    values = await crashed_data_dir(broker_launcher, data_dir)
    other = await broker_launcher.start(tmp_path / "other", grpc_port=0, kafka_port=0)
    busy_port = getattr(other, busy)
    before = snapshot(data_dir)

    refused = await start_refused(broker_launcher, data_dir, **{busy: busy_port})

    assert changes(before, snapshot(data_dir)) == []
    assert refused.process.returncode == 1
    assert one_error_line(refused) == (
        f"error: cannot listen on 127.0.0.1:{busy_port}: Address already in use"
    )
    missing = tmp_path / "missing"
    await start_refused(broker_launcher, missing, **{busy: busy_port})
    assert not missing.exists(), "a refused start created the data directory"
    restarted = await broker_launcher.start(data_dir)
    assert await read_values(restarted.bootstrap, 40) == sorted(values)


async def test_a_start_refused_on_bad_config_changes_nothing(broker_launcher, tmp_path):
    data_dir = tmp_path / "data"
    values = await crashed_data_dir(broker_launcher, data_dir)
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[limits]\nfetch_bytes_max = 10\n")
    before = snapshot(data_dir)

    refused = await start_refused(broker_launcher, data_dir, "--config", str(bad_config))

    assert changes(before, snapshot(data_dir)) == []
    assert refused.process.returncode == 2  # a configuration error (docs/cli.md)
    assert "fetch_bytes_max" in one_error_line(refused)
    missing = tmp_path / "missing"
    await start_refused(broker_launcher, missing, "--config", str(bad_config))
    assert not missing.exists(), "a refused start created the data directory"
    restarted = await broker_launcher.start(data_dir)
    assert await read_values(restarted.bootstrap, 40) == sorted(values)


async def test_the_lock_dies_with_its_holder(broker_launcher, tmp_path):
    data_dir = tmp_path / "data"
    values = await crashed_data_dir(broker_launcher, data_dir)  # its broker was kill -9ed
    restarted = await broker_launcher.start(data_dir)
    assert (data_dir / ".lock").read_text() == f"{restarted.pid}\n"
    assert await read_values(restarted.bootstrap, 40) == sorted(values)
    assert await broker_launcher.stop(restarted) == 0  # a clean stop releases it too
    again = await broker_launcher.start(data_dir)
    assert await read_values(again.bootstrap, 40) == sorted(values)


async def test_an_unusable_data_dir_is_one_error_line(broker_launcher, tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    refused = await start_refused(broker_launcher, not_a_directory / "data")
    assert refused.process.returncode == 1
    assert one_error_line(refused) == (
        f"error: cannot use data directory {not_a_directory / 'data'}: Not a directory"
    )


async def test_damaged_topic_metadata_is_one_error_line(broker_launcher, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "topics.json").write_text("{not json")
    refused = await start_refused(broker_launcher, data_dir)
    assert refused.process.returncode == 1
    assert one_error_line(refused).startswith(
        f"error: cannot read topic metadata {data_dir / 'topics.json'}: "
    )


async def test_start_line_omits_a_disabled_http_port(broker_launcher, tmp_path):
    running = await broker_launcher.start(tmp_path / "data", http_port=-1)
    assert running.http_port is None
    (start_line,) = [
        line for line in running.output.splitlines() if b"event=broker_started" in line
    ]
    assert b" port=%d " % running.port in start_line
    assert b"http_port" not in start_line
    with_http = await broker_launcher.start(tmp_path / "other")
    assert with_http.http_port is not None and with_http.http_port > 0
