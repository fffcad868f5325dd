"""`dwal topic reassign`, `dwal topic reassignments`, `dwal leaders rebalance` and `dwal broker
decommission|recommission` as a user runs them: the parser, and real `dwal` processes
against a single in-process broker (a cluster of one: every move is refused or changes
nothing there; tests/cluster/test_reassignment.py moves partitions between real brokers)."""

from __future__ import annotations

import json

import pytest
from dwal_process import dwal
from test_cli_cluster import table

from client import cli
from client.cli import build_parser


def test_reassign_needs_a_partition_and_replicas_or_cancel(capsys):
    parsed = build_parser().parse_args(
        ["topic", "reassign", "t", "-p", "0", "-p", "2", "--replicas", "3,1,2", "--wait"]
    )
    assert (parsed.partition, parsed.replicas, parsed.cancel, parsed.wait) == (
        [0, 2],
        [3, 1, 2],
        False,
        True,
    )
    cancel = build_parser().parse_args(["topic", "reassign", "t", "-p", "1", "--cancel"])
    assert cancel.cancel and cancel.replicas is None
    for bad in (
        ["topic", "reassign", "t", "--replicas", "1"],  # no partition
        ["topic", "reassign", "t", "-p", "0"],  # neither replicas nor cancel
        ["topic", "reassign", "t", "-p", "0", "--replicas", "1", "--cancel"],
        ["topic", "reassign", "t", "-p", "0", "--replicas", "1,,2"],
        ["topic", "reassign", "t", "-p", "0", "--replicas", "one"],
    ):
        with pytest.raises(SystemExit) as caught:
            build_parser().parse_args(bad)
        assert caught.value.code == 2
    assert "must be broker ids separated by commas" in capsys.readouterr().err


def test_broker_decommission_is_a_client_command_and_the_rest_runs_a_broker(monkeypatch):
    handed_over: list[list[str]] = []

    def run_broker_package(arguments: list[str]) -> None:
        handed_over.append(arguments)
        raise SystemExit(0)

    monkeypatch.setattr(cli, "_run_broker_package", run_broker_package)
    with pytest.raises(SystemExit):
        cli.main(["broker", "--node-id", "1"])
    assert handed_over == [["--node-id", "1"]]
    parsed = build_parser().parse_args(["broker", "decommission", "3", "--wait"])
    assert (parsed.command, parsed.broker_command, parsed.broker_id, parsed.wait) == (
        "broker",
        "decommission",
        3,
        True,
    )
    assert build_parser().parse_args(["broker", "recommission", "3"]).broker_id == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["broker", "decommission", "-1"])


async def test_reassign_on_a_single_broker(broker):
    b = ["--bootstrap", broker.bootstrap]
    await dwal("topic", "create", "moves", "--partitions", "2", *b)
    same = await dwal("topic", "reassign", "moves", "-p", "0", "-p", "1", "--replicas", "1", *b)
    assert same.stdout.decode().splitlines() == ["moves-0: now on 1", "moves-1: now on 1"]
    refused = await dwal(
        "topic", "reassign", "moves", "-p", "0", "--replicas", "1,2", *b, check=False
    )
    assert refused.returncode == 1
    assert refused.stdout.decode() == (
        "moves-0: failed: broker 2 is not registered (INVALID_REPLICA_ASSIGNMENT)\n"
    )
    assert refused.stderr == b"error: 1 partition(s) not moved\n"
    cancel = await dwal("topic", "reassign", "moves", "-p", "1", "--cancel", *b, check=False)
    assert cancel.returncode == 1
    assert "moves-1 is not being reassigned (NO_REASSIGNMENT_IN_PROGRESS)" in cancel.stdout.decode()
    listed = await dwal("topic", "reassignments", *b)
    assert listed.stdout == b"no partition is being reassigned\n"
    as_json = await dwal("topic", "reassignments", "-t", "moves", "-f", "json", *b)
    assert json.loads(as_json.stdout) == {"reassignments": []}
    unknown = await dwal("topic", "reassignments", "-t", "nope", *b, check=False)
    assert unknown.returncode == 1 and b"UNKNOWN_TOPIC_OR_PARTITION" in unknown.stderr


async def test_leaders_rebalance_and_decommission_on_a_single_broker(broker):
    b = ["--bootstrap", broker.bootstrap]
    await dwal("topic", "create", "solo", *b)
    rebalanced = await dwal("leaders", "rebalance", *b)
    assert "nothing to elect" in rebalanced.stdout.decode()
    refused = await dwal("broker", "decommission", "1", *b, check=False)
    assert refused.returncode == 1
    assert b"cannot move" in refused.stderr and b"off broker 1" in refused.stderr
    assert refused.stderr.endswith(b"(INVALID_REPLICATION_FACTOR)\n")
    status = (await dwal("cluster", "status", *b)).stdout.decode()
    [row] = table(status, "BROKER")
    assert row[4] == "no", "refused: not marked"
    assert row[5] == "1", "it holds solo-0"
    unknown = await dwal("broker", "decommission", "7", *b, check=False)
    assert unknown.returncode == 1 and b"BROKER_NOT_AVAILABLE" in unknown.stderr
    back = await dwal("broker", "recommission", "1", *b)
    assert back.stdout == b"broker 1 recommissioned: new replicas may go to it again\n"
