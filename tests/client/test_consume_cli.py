"""`dwal consume` as an operator runs it: exit at end, JSON lines, format escapes, refused
options, a closed stdout, and a broker that goes away and comes back (real processes)."""

from __future__ import annotations

import base64
import json
import os
import signal

import pytest
import trio
from dwal_process import running_dwal

import client
from client import Admin, Producer

GROUP_CONFIG = "group_session_timeout_ms = 2000\ngroup_heartbeat_interval_ms = 200\n"


async def produce(bootstrap: str, topic: str, values, **send_options) -> None:
    async with client.connect(bootstrap) as cluster:
        async with Producer(cluster, linger_ms=1) as producer:
            for value in values:
                await producer.send(topic, value, **send_options)


async def create(bootstrap: str, topic: str, partitions: int = 1) -> None:
    async with client.connect(bootstrap) as cluster:
        await Admin(cluster).create_topic(topic, partitions=partitions)


async def test_exit_at_end_prints_everything_then_exits(broker):
    await create(broker.bootstrap, "ends", partitions=3)
    await produce(broker.bootstrap, "ends", [b"v-%d" % i for i in range(500)])
    async with running_dwal("consume", "ends", "-e", "--bootstrap", broker.bootstrap) as dwal:
        assert await dwal.wait_exit() == 0
    assert sorted(dwal.stdout_lines) == sorted(b"v-%d" % i for i in range(500))


async def test_exit_at_end_of_an_empty_topic_and_with_a_group(broker):
    await create(broker.bootstrap, "empty", partitions=2)
    async with running_dwal("consume", "empty", "-e", "--bootstrap", broker.bootstrap) as dwal:
        assert await dwal.wait_exit() == 0
    assert dwal.stdout == b""
    await produce(broker.bootstrap, "empty", [b"x", b"y"])
    async with running_dwal(
        "consume", "empty", "-e", "--group", "ge", "--bootstrap", broker.bootstrap
    ) as dwal:
        assert await dwal.wait_exit() == 0
    assert sorted(dwal.stdout_lines) == [b"x", b"y"]


async def test_json_lines_show_text_as_strings_and_binary_as_base64(broker):
    await create(broker.bootstrap, "js")
    await produce(broker.bootstrap, "js", [b"caf\xc3\xa9"], key=b"k1", headers=[("h", b"\xff")])
    await produce(broker.bootstrap, "js", [b"\x00\xff\xfe"])
    await produce(broker.bootstrap, "js", [None], key=b"\x80")
    async with running_dwal(
        "consume", "js", "-e", "--format", "json", "--bootstrap", broker.bootstrap
    ) as dwal:
        assert await dwal.wait_exit() == 0
    documents = [json.loads(line) for line in dwal.stdout_lines]
    assert [d["offset"] for d in documents] == [0, 1, 2]
    first, second, third = documents
    assert first["topic"] == "js" and first["partition"] == 0
    assert isinstance(first["timestamp"], int) and first["timestamp"] > 0
    assert first["key"] == "k1" and first["value"] == "café"
    assert first["headers"] == [
        {"key": "h", "value": {"base64": base64.b64encode(b"\xff").decode()}}
    ]
    assert second["key"] is None and second["headers"] == []
    assert base64.b64decode(second["value"]["base64"]) == b"\x00\xff\xfe"
    assert third["value"] is None and base64.b64decode(third["key"]["base64"]) == b"\x80"


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("A\\\\nB", b"A\\nB\n"),  # the shell's 'A\\nB': a backslash, then n
        ("A\\nB", b"A\nB\n"),
        ("%v\\t%o|100%%|\\q", b"val\t0|100%|\\q\n"),
    ],
)
async def test_format_escapes_are_read_left_to_right(broker, fmt, expected):
    await create(broker.bootstrap, "esc")
    await produce(broker.bootstrap, "esc", [b"val"])
    async with running_dwal(
        "consume", "esc", "-e", "-f", fmt, "--bootstrap", broker.bootstrap
    ) as dwal:
        assert await dwal.wait_exit() == 0
    assert bytes(dwal.stdout) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num", "-1"], "positive integer"),
        (["--num", "0"], "positive integer"),
        (["--group", ""], "--group needs a group id"),
        (["--instance-id", "w1"], "--instance-id only applies with --group"),
        (["--group", "g", "--instance-id", ""], "--instance-id needs an id"),
        (["-f", "%v%"], "lone %"),
        (["-f", "%x"], "unknown format code %x"),
        (["--group", "g", "--offset", "latest"], "reset-offsets"),
        (["--give-up-after", "0"], "seconds > 0"),
    ],
)
async def test_refused_options_need_no_broker(args, message):
    # port 1: nothing listens, so only a check made before connecting can answer
    async with running_dwal("consume", "t", *args, "--bootstrap", "127.0.0.1:1") as dwal:
        assert await dwal.wait_exit() == 2
    assert message in dwal.stderr_text and "Traceback" not in dwal.stderr_text


async def test_a_closed_stdout_stops_a_consumer_that_has_nothing_to_print(broker):
    await create(broker.bootstrap, "quiet")
    await produce(broker.bootstrap, "quiet", [b"only"])
    read_end, write_end = os.pipe()
    try:
        async with running_dwal(
            "consume", "quiet", "--bootstrap", broker.bootstrap, stdout=write_end
        ) as dwal:
            os.close(write_end)
            write_end = -1
            first = await trio.to_thread.run_sync(os.read, read_end, 100)
            assert first == b"only\n"
            os.close(read_end)  # as `head -1` does after its line; no record follows
            read_end = -1
            assert await dwal.wait_exit() == 0
    finally:
        for descriptor in (read_end, write_end):
            if descriptor >= 0:
                os.close(descriptor)


@pytest.mark.parametrize("group", [None, "restart-group"])
async def test_consumer_warns_while_the_broker_is_away_and_resumes(
    broker_launcher, tmp_path, group
):
    config = tmp_path / "dwal.toml"
    config.write_text(GROUP_CONFIG)
    data = tmp_path / "data"
    broker = await broker_launcher.start(data, "--config", str(config), "--fsync", "always")
    await create(broker.bootstrap, "away", partitions=2)
    await produce(broker.bootstrap, "away", [b"before-%d" % i for i in range(100)])
    group_args = ["--group", group] if group else []
    async with running_dwal(
        "consume", "away", *group_args, "--bootstrap", broker.bootstrap
    ) as dwal:
        await dwal.wait_until(lambda d: len(d.stdout_lines) == 100)
        await broker_launcher.kill(broker)
        await dwal.wait_until(lambda d: "retrying (attempt 3)" in d.stderr_text)
        assert "warning: broker unreachable" in dwal.stderr_text
        assert "NETWORK_EXCEPTION" in dwal.stderr_text
        restarted = await broker_launcher.start(
            data, "--config", str(config), "--fsync", "always", port=broker.port
        )
        await produce(restarted.bootstrap, "away", [b"after-%d" % i for i in range(100)])
        expected = {b"before-%d" % i for i in range(100)} | {b"after-%d" % i for i in range(100)}
        await dwal.wait_until(lambda d: expected <= set(d.stdout_lines))
        await dwal.wait_until(lambda d: "note: reading again after" in d.stderr_text)
        dwal.process.send_signal(signal.SIGTERM)
        assert await dwal.wait_exit() == 0
    assert "Traceback" not in dwal.stderr_text


@pytest.mark.parametrize("group", [None, "give-up-group"])
async def test_give_up_after_exits_1_with_network_exception(broker_launcher, tmp_path, group):
    config = tmp_path / "dwal.toml"
    config.write_text(GROUP_CONFIG)
    broker = await broker_launcher.start(tmp_path / "data", "--config", str(config))
    await create(broker.bootstrap, "gone")
    await produce(broker.bootstrap, "gone", [b"one"])
    group_args = ["--group", group] if group else []
    async with running_dwal(
        "consume", "gone", *group_args, "--give-up-after", "1", "--bootstrap", broker.bootstrap
    ) as dwal:
        await dwal.wait_until(lambda d: d.stdout_lines == [b"one"])
        await broker_launcher.kill(broker)
        assert await dwal.wait_exit() == 1
    last_line = dwal.stderr_text.strip().splitlines()[-1]
    assert last_line.startswith("error: gave up after") and "(NETWORK_EXCEPTION)" in last_line
    assert "Traceback" not in dwal.stderr_text
