"""The `dwal` command line as a user runs it: real processes against a broker."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import signal
import subprocess
import sys

import trio
from client_test_support import wait_for_assignment
from dwal_process import REPO, dwal

import client
from client import Consumer
from client.cli import build_parser


async def test_topic_commands_and_round_trip(broker):
    b = ["--bootstrap", broker.bootstrap]
    out = await dwal(
        "topic", "create", "cli", "--partitions", "3", "--config", "retention.ms=86400000", *b
    )
    assert b"created topic cli" in out.stdout
    assert (await dwal("topic", "list", *b)).stdout.split() == [b"cli"]
    lines = b"".join(b"line-%d\n" % i for i in range(2000))
    out = await dwal("produce", "cli", *b, stdin=lines)
    assert b"produced 2000 records" in out.stdout
    out = await dwal("consume", "cli", "--num", "2000", *b)
    assert sorted(out.stdout.splitlines()) == sorted(lines.splitlines())
    described = (await dwal("topic", "describe", "cli", *b)).stdout.decode()
    assert "retention.ms=86400000" in described and "partitions: 3" in described
    hw_total = sum(
        int(line.split()[3])
        for line in described.splitlines()
        if line.strip() and line.split()[0].isdigit()
    )
    assert hw_total == 2000
    failed = await dwal("topic", "create", "cli", *b, check=False)
    assert failed.returncode == 1 and b"already exists" in failed.stderr
    assert b"Traceback" not in failed.stderr
    await dwal("topic", "delete", "cli", *b)
    assert (await dwal("topic", "list", *b)).stdout == b""


async def test_keys_partition_and_format(broker):
    b = ["--bootstrap", broker.bootstrap]
    await dwal("topic", "create", "fmt", "--partitions", "2", *b)
    await dwal(
        "produce", "fmt", "--partition", "1", "--key-separator", ":", *b, stdin=b"k1:v1\nk2:v2\n"
    )
    out = await dwal(
        "consume", "fmt", "--partition", "1", "--num", "2", "--format", "%k=%v@%p/%o", *b
    )
    assert out.stdout == b"k1=v1@1/0\nk2=v2@1/1\n"
    out = await dwal("consume", "fmt", "--partition", "1", "--offset", "1", "--num", "1", *b)
    assert out.stdout == b"v2\n"


async def test_user_errors_exit_non_zero_without_traceback(broker):
    b = ["--bootstrap", broker.bootstrap]
    for args in (
        ["consume", "nosuch", "--num", "1", *b],
        ["produce", "nosuch", *b],
        ["topic", "describe", "nosuch", *b],
        ["topic", "list", "--bootstrap", "127.0.0.1:1"],
    ):
        result = await dwal(*args, stdin=b"x\n", check=False)
        assert result.returncode == 1, args
        assert result.stderr.startswith(b"error: "), result.stderr
        assert b"Traceback" not in result.stderr


async def test_consume_follows_and_stops_cleanly_on_sigterm(broker):
    b = ["--bootstrap", broker.bootstrap]
    await dwal("topic", "create", "follow", *b)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "client.cli", "consume", "follow", *b],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        await dwal("produce", "follow", *b, stdin=b"first\nsecond\n")
        received = b""
        with trio.fail_after(30):
            while received.count(b"\n") < 2:
                received += await process.stdout.receive_some(1024)
        assert received == b"first\nsecond\n"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()


async def test_broker_command_reads_toml_config(broker_launcher, tmp_path):
    config = tmp_path / "dwal.toml"
    config.write_text(
        'log_level = "debug"\nauto_create_topics = true\n'
        '[topic_defaults]\n"segment.bytes" = 1048576\n'
    )
    running = await broker_launcher.start(tmp_path / "d", "--config", str(config))
    b = ["--bootstrap", running.bootstrap]
    await dwal("produce", "auto", *b, stdin=b"a\n")  # allowed: auto_create_topics = true
    described = (await dwal("topic", "describe", "auto", *b)).stdout.decode()
    assert "segment.bytes=1048576" in described
    assert await broker_launcher.stop(running) == 0
    assert b"level=debug" in running.output and b"event=broker_stopped" in running.output


async def test_broker_rejects_bad_config(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('port = "not a number"\n')
    result = await dwal("broker", "--config", str(config), check=False)
    assert result.returncode == 2 and b"port must be an integer" in result.stderr


async def test_produce_stops_reading_on_sigterm_and_flushes(broker):
    b = ["--bootstrap", broker.bootstrap]
    await dwal("topic", "create", "stdin", *b)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "client.cli", "produce", "stdin", *b],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        await process.stdin.send_all(b"one\ntwo\n")  # stdin stays open: produce keeps reading
        consumed = await dwal("consume", "stdin", "--num", "2", *b)
        assert consumed.stdout == b"one\ntwo\n"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
        summary = await process.stdout.receive_some(4096)
        assert b"produced 2 records" in summary and b"stopped by signal" in summary
    finally:
        if process.returncode is None:
            process.kill()


async def test_produce_and_consume_edge_cases(broker):
    b = ["--bootstrap", broker.bootstrap]
    result = await dwal("produce", "missing", *b, stdin=b"", check=False)
    assert result.returncode == 1 and b"unknown topic" in result.stderr
    await dwal("topic", "create", "edge", *b)
    await dwal("produce", "edge", "--key-separator", "=", *b, stdin=b"k=v\nno-separator\nk2=last")
    out = await dwal("consume", "edge", "--num", "3", "--format", "[%k] %v", *b)
    assert out.stdout == b"[k] v\n[] no-separator\n[k2] last\n"
    result = await dwal("consume", "edge", "--offset", "7", "--num", "1", *b, check=False)
    assert result.returncode == 1 and b"outside edge-0's range [0, 3]" in result.stderr


async def test_broker_start_errors_are_one_line(broker, tmp_path):
    taken = await dwal(
        "broker",
        "--port",
        str(broker.port),
        "--http-port",
        "-1",
        "--grpc-port",
        "-1",
        "--data-dir",
        str(tmp_path / "x"),
        check=False,
    )
    assert taken.returncode == 1
    assert b"error: cannot listen on 127.0.0.1" in taken.stderr and b"Traceback" not in taken.stderr
    config = tmp_path / "limits.toml"
    config.write_text("[limits]\nfetch_bytes_max = 10\n")
    bad = await dwal("broker", "--config", str(config), check=False)
    assert bad.returncode == 2 and b"fetch_bytes_max" in bad.stderr


async def test_group_commands(group_broker):
    b = ["--bootstrap", group_broker.bootstrap]
    await dwal("topic", "create", "gc", "--partitions", "2", *b)
    await dwal(
        "produce",
        "gc",
        "--key-separator",
        ":",
        *b,
        stdin=b"".join(b"%d:v%d\n" % (i, i) for i in range(50)),
    )
    out = await dwal("consume", "gc", "--group", "cli-group", "--num", "50", *b)
    assert sorted(out.stdout.splitlines()) == sorted(b"v%d" % i for i in range(50))
    listed = (await dwal("group", "list", *b)).stdout.decode()
    assert "cli-group" in listed and "empty" in listed
    described = (await dwal("group", "describe", "cli-group", *b)).stdout.decode()
    lags = [line.split()[4] for line in described.splitlines() if line.startswith("gc ")]
    assert lags == ["0", "0"], described
    dry = (
        await dwal("group", "reset-offsets", "cli-group", "--topic", "gc", "--to", "earliest", *b)
    ).stdout.decode()
    assert "dry run" in dry
    described = (await dwal("group", "describe", "cli-group", *b)).stdout.decode()
    assert [line.split()[2] for line in described.splitlines() if line.startswith("gc ")] == [
        line.split()[3] for line in described.splitlines() if line.startswith("gc ")
    ], "a dry run must not move the committed offsets"
    await dwal(
        "group",
        "reset-offsets",
        "cli-group",
        "--topic",
        "gc",
        "--to",
        "offset",
        "20",
        "--execute",
        *b,
    )
    out = await dwal("consume", "gc", "--group", "cli-group", "--num", "5", *b)
    assert len(out.stdout.splitlines()) == 5
    await dwal("group", "delete", "cli-group", *b)
    assert "cli-group" not in (await dwal("group", "list", *b)).stdout.decode()
    missing = await dwal("group", "describe", "cli-group", *b, check=False)
    assert missing.returncode == 1 and b"does not exist" in missing.stderr


async def test_version():
    result = await dwal("--version")
    assert result.stdout == f"dwal {importlib.metadata.version('dwal')}\n".encode()


async def test_unknown_options_print_the_subcommands_usage():
    for args, usage in (
        (["produce", "t", "--bogus"], b"usage: dwal produce "),
        (["topic", "create", "t", "--bogus"], b"usage: dwal topic create "),
        (["group", "delete", "g", "extra"], b"usage: dwal group delete "),
        (["broker", "--bogus"], b"usage: dwal broker "),
    ):
        result = await dwal(*args, check=False)
        assert result.returncode == 2, args
        assert result.stderr.startswith(usage), result.stderr
        assert b"unrecognized arguments: " in result.stderr


def test_every_option_has_help():
    def parsers(parser: argparse.ArgumentParser, name: str):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from parsers(sub, f"{name} {sub_name}")

    missing = [
        f"{name} {action.option_strings[0]}"
        for name, parser in parsers(build_parser(), "dwal")
        for action in parser._actions
        if action.option_strings and not action.help
    ]
    assert not missing


async def test_group_admin_names_an_away_static_member(broker):
    b = ["--bootstrap", broker.bootstrap]
    await dwal("topic", "create", "st", "--partitions", "2", *b)
    session_s = broker.config.group_session_timeout_ms / 1000
    static = rb"static member 'worker-2' \(away; its session expires in (\d+) s unless it rejoins\)"
    delete = ["group", "delete", "sg", *b]
    reset = ["group", "reset-offsets", "sg", "--topic", "st", "--to", "earliest", "--execute", *b]
    async with client.connect(broker.bootstrap) as cluster:
        active = Consumer(cluster, group_id="sg")
        active.subscribe(["st"])
        await wait_for_assignment(active, 2)
        member = Consumer(cluster, group_id="sg", group_instance_id="worker-2")
        member.subscribe(["st"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_assignment, active, 1)
            nursery.start_soon(wait_for_assignment, member, 1)
        await member.close()  # a static member leaves for a while: it still holds the group
        both = re.compile(
            rb"error: group 'sg' is held by 1 active member and "
            + static
            + rb": stop the group's consumers first \(NON_EMPTY_GROUP\)\n"
        )
        for command in (delete, reset):
            result = await dwal(*command, check=False)
            assert result.returncode == 1 and both.fullmatch(result.stderr), result.stderr
        await active.close()
    only_static = re.compile(
        rb"error: group 'sg' is held by " + static + rb" \(NON_EMPTY_GROUP\)\n"
    )
    for command in (delete, reset):
        result = await dwal(*command, check=False)
        assert result.returncode == 1, command
        match = only_static.fullmatch(result.stderr)
        assert match, result.stderr
        assert 0 < int(match.group(1)) <= session_s
    described = (await dwal("group", "describe", "sg", *b)).stdout.decode()
    assert re.search(r"instance=worker-2 away \(session expires in \d+ s\)", described)


async def test_the_http_port_is_named_as_such(broker):
    address = f"127.0.0.1:{broker.http_port}"
    result = await dwal("topic", "list", "--bootstrap", address, check=False)
    assert result.returncode == 1
    assert result.stderr == (
        f"error: {address} speaks HTTP, not the DWAL protocol (NETWORK_EXCEPTION)\n".encode()
    )
