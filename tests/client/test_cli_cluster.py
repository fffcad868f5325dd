"""`dwal topic describe`, `dwal cluster status`, `dwal leaders elect`, `dwal topic create`
and `dwal consume` as a user runs them: real `dwal` processes against a fake cluster
(fake_broker.FakeCluster with a FakeControlPlane or PartitionLogs) served by this test's trio
run."""

from __future__ import annotations

import argparse
import json
import re

import trio
from dwal_process import REPO, dwal, running_dwal
from fake_broker import FakeCluster, FakeControlPlane, FakeTopic, PartitionLogs

from client.cli import build_parser
from protocol import ApiKey, ErrorCode


async def start_control_plane(nursery: trio.Nursery, brokers: int = 3) -> FakeControlPlane:
    topics = {"t": FakeTopic(partitions=2)}
    fake = await FakeCluster.start(nursery, brokers, topics)
    plane = await FakeControlPlane(fake, topics).start(nursery)
    view = fake.view
    view.move("t", 0, 1, 5)
    view.replicas[("t", 0)], view.isr[("t", 0)] = [1, 2, 0], [1, 2]
    view.move("t", 1, 2, 3)
    view.replicas[("t", 1)], view.isr[("t", 1)] = [2, 1], [2, 1]
    return plane


def table(output: str, header: str) -> list[list[str]]:
    """The rows (split on blanks) of the table whose header line starts with `header`: the
    lines after it that start with a number."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [header])
    rows = []
    for line in lines[start + 1 :]:
        if not line.split()[0].isdigit():
            break
        rows.append(line.split())
    return rows


async def test_topic_describe_shows_leader_epoch_replicas_and_isr(nursery):
    plane = await start_control_plane(nursery)
    b = ["--bootstrap", plane.cluster.bootstrap]
    output = (await dwal("topic", "describe", "t", *b)).stdout.decode()
    assert "topic: t\ntopic id: id-of-t\npartitions: 2\n" in output
    header = output.splitlines()[output.splitlines().index("configs:") + 2].split()
    assert header == [
        "PARTITION",
        "LEADER",
        "LOG-START",
        "HIGH-WATERMARK",
        "LOG-END",
        "SIZE-BYTES",
        "SEGMENTS",
        "LEADER-EPOCH",
        "REPLICAS",
        "ISR",
    ]
    # broker 0 answers: it holds a copy of partition 0, none of partition 1
    assert table(output, "PARTITION") == [
        ["0", "1", "0", "100", "100", "1000", "1", "5", "1,2,0", "1,2"],
        ["1", "2", "-", "-", "-", "-", "-", "3", "2,1", "2,1"],
    ]


async def test_topic_describe_as_json(nursery):
    plane = await start_control_plane(nursery)
    b = ["--bootstrap", plane.cluster.bootstrap]
    output = (await dwal("topic", "describe", "t", "--format", "json", *b)).stdout
    described = json.loads(output)
    assert described["name"] == "t" and described["topic_id"] == "id-of-t"
    assert described["configs"] == {"retention.ms": "86400000"}
    first, second = described["partitions"]
    assert first["leader"] == 1 and first["leader_epoch"] == 5
    assert first["replicas"] == [1, 2, 0] and first["isr"] == [1, 2] and first["local"]
    assert second["local"] is False and second["high_watermark"] == -1


async def test_cluster_status(nursery):
    plane = await start_control_plane(nursery)
    plane.controller_id = 1
    plane.voters = {0: (40, 2), 1: (42, 0), 2: (-1, -1)}
    plane.learners = {3: (41, 1)}
    plane.fenced = {2}
    plane.epochs = {0: 7}
    ports = {node_id: broker.port for node_id, broker in plane.cluster.brokers.items()}
    b = ["--bootstrap", plane.cluster.bootstrap]
    output = (await dwal("cluster", "status", *b)).stdout.decode()
    assert output.startswith("cluster id: fake-cluster-id\ncontroller: 1\nmetadata offset: 42\n")
    assert table(output, "CONTROLLER") == [
        ["0", "voter", "40", "2"],
        ["1", "voter", "42", "0", "(active)"],
        ["2", "voter", "-", "-"],
        ["3", "learner", "41", "1"],
    ]
    # The fake answers as a broker from before decommissioning: not decommissioned, and
    # no partition count ("-").
    assert table(output, "BROKER") == [
        ["0", "7", "no", "no", "no", "-", "-", f"CLIENT://127.0.0.1:{ports[0]}"],
        ["1", "11", "no", "no", "no", "-", "-", f"CLIENT://127.0.0.1:{ports[1]}"],
        ["2", "12", "yes", "no", "no", "-", "-", f"CLIENT://127.0.0.1:{ports[2]}"],
    ]


async def test_cluster_status_as_json_after_not_controller_answers(nursery):
    plane = await start_control_plane(nursery, brokers=1)
    plane.not_controller = 2  # the controller moves: the command retries
    b = ["--bootstrap", plane.cluster.bootstrap]
    status = json.loads((await dwal("cluster", "status", "-f", "json", *b)).stdout)
    assert plane.refused == 2
    assert status["cluster_id"] == "fake-cluster-id" and status["controller_id"] == 0
    assert status["voters"] == [{"node_id": 0, "match_index": 42, "lag": 0}]
    [broker] = status["brokers"]
    assert broker["epoch"] == 10 and broker["fenced"] is False
    assert broker["listeners"] == [
        {"name": "CLIENT", "host": "127.0.0.1", "port": plane.cluster.brokers[0].port}
    ]


async def test_topic_create_passes_the_replication_factor(nursery):
    plane = await start_control_plane(nursery)
    b = ["--bootstrap", plane.cluster.bootstrap]
    await dwal("topic", "create", "r3", "--partitions", "2", "--replication-factor", "3", *b)
    assert plane.cluster.view.replicas[("r3", 1)] == [1, 2, 0]


async def test_topic_create_without_a_replication_factor_leaves_it_to_the_broker(nursery):
    plane = await start_control_plane(nursery)
    b = ["--bootstrap", plane.cluster.bootstrap]
    await dwal("topic", "create", "rd", "--partitions", "2", *b)
    assert [entry["replication_factor"] for entry in plane.created] == [-1]
    assert plane.cluster.view.replicas[("rd", 1)] == [1, 2, 0]  # the broker's default: 3
    help_text = (await dwal("topic", "create", "--help")).stdout.decode()
    assert "the broker's default" in " ".join(help_text.split())


async def test_consume_reads_the_other_partitions_while_one_has_no_leader(nursery):
    topics = {"ev": FakeTopic(partitions=3)}
    fake = await FakeCluster.start(nursery, 3, topics)
    logs = await PartitionLogs(fake).start(nursery)
    for partition in range(3):
        logs.move("ev", partition, partition, 1)
        logs.records[("ev", partition)].extend(b"p%d-%d" % (partition, n) for n in range(10))
    logs.move("ev", 1, -1, 2)  # its leader died; no other is elected yet
    fake.view.replicas[("ev", 1)] = fake.view.isr[("ev", 1)] = [1, 2, 0]
    async with running_dwal(
        "consume", "ev", "--offset", "earliest", "--bootstrap", fake.bootstrap
    ) as process:
        await process.wait_until(lambda p: len(p.stdout_lines) >= 20)
        assert sorted(process.stdout_lines) == sorted(
            b"p%d-%d" % (partition, n) for partition in (0, 2) for n in range(10)
        )
        await process.wait_until(lambda p: "warning: ev-1" in p.stderr_text)
        assert not process.finished
        assert "LEADER_NOT_AVAILABLE" in process.stderr_text
        assert "error" not in process.stderr_text
        logs.move("ev", 1, 2, 3)  # a leader is elected
        await process.wait_until(lambda p: len(p.stdout_lines) >= 30)
        await process.wait_until(lambda p: "note: ev-1 readable again" in p.stderr_text)
        assert not process.finished
    assert process.stdout_lines[20:] == [b"p1-%d" % n for n in range(10)]
    assert "error" not in process.stderr_text


async def test_leaders_elect(nursery):
    plane = await start_control_plane(nursery)
    plane.elections[("t", 1)] = ErrorCode.ELECTION_NOT_NEEDED
    b = ["--bootstrap", plane.cluster.bootstrap]
    output = (await dwal("leaders", "elect", "--topic", "t", *b)).stdout.decode()
    assert [line.split() for line in output.splitlines()] == [
        ["TOPIC", "PARTITION", "RESULT"],
        "t 0 elected its preferred replica".split(),
        "t 1 preferred replica already leads".split(),
    ]
    plane.elections[("t", 0)] = ErrorCode.PREFERRED_LEADER_NOT_AVAILABLE
    failed = await dwal("leaders", "elect", "-t", "t", "-p", "0", *b, check=False)
    assert failed.returncode == 1 and failed.stderr == b"error: 1 election(s) failed\n"
    assert b"(PREFERRED_LEADER_NOT_AVAILABLE)" in failed.stdout
    usage = await dwal("leaders", "elect", "--partition", "0", *b, check=False)
    assert usage.returncode == 2 and usage.stderr == b"error: --partition needs --topic\n"
    assert [key for _, key in plane.received].count(ApiKey.ELECT_LEADERS) == 2


def test_every_command_has_a_section_in_the_cli_docs():
    docs = (REPO / "docs" / "cli.md").read_text()

    def commands(parser: argparse.ArgumentParser, path: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield f"{path} {name}".strip()
                    yield from commands(sub, f"{path} {name}")

    missing = [
        command
        for command in commands(build_parser(), "")
        if not re.search(rf"^##+ `(dwal )?{re.escape(command)}[ `]", docs, re.MULTILINE)
    ]
    assert not missing
