"""The `dwal` command line: run a broker, manage topics, produce and consume.

User errors (unknown topic, broker unreachable, bad flags) print one ``error:`` line to
stderr and exit with status 1 (2 for usage errors), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import signal
import sys
import time
from typing import NoReturn, Sequence

import trio

from client.admin import Admin, GroupAdmin
from client.cluster import connect
from client.consume_command import (
    check_consume_arguments,
    consume_command,
    group_consume_command,
    verify_command,
)
from client.exception_groups import single_error
from client.grpc_command import add_grpc_commands, run_grpc_command
from client.line_splitter import LineSplitter, OversizeLine
from client.limits import LIMITS
from client.producer import Producer
from client.topic_partition import TopicPartition
from protocol import DwalError, ErrorCode

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
WAIT_POLL_INTERVAL_S = 1.0  # `--wait`: how often a reassignment's progress is asked for


class UsageError(Exception):
    pass


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: it reports arguments it does not know with its own usage
    line (argparse would leave them to the top-level parser, whose usage says nothing about
    the subcommand's options)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error("unrecognized arguments: " + " ".join(extras))
        return parsed, extras


def _version() -> str:
    try:
        return importlib.metadata.version("dwal")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


def _partition_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a partition number (0, 1, ...), not {text!r}")
    return int(text)


def _broker_id(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a broker id (1, 2, ...), not {text!r}")
    return int(text)


def _broker_ids(text: str) -> list[int]:
    items = text.split(",")
    if not all(item.strip().isdigit() for item in items):
        raise argparse.ArgumentTypeError(
            f"must be broker ids separated by commas (e.g. 1,2,4), not {text!r}"
        )
    return [int(item) for item in items]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _batch_size(text: str) -> int:
    value = _positive_int(text)
    if value > LIMITS.cli_produce_buffer_bytes:
        raise argparse.ArgumentTypeError(
            f"must be at most the producer's buffer, {LIMITS.cli_produce_buffer_bytes} bytes, "
            f"not {text!r}"
        )
    return value


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of milliseconds >= 0, not {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def _add_output_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        "-f",
        choices=["text", "json"],
        default="text",
        help="text: tables for people (default); json: one JSON object",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dwal", description="DWAL, a distributed write-ahead log")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    bootstrap_default = os.environ.get("DWAL_BOOTSTRAP") or DEFAULT_BOOTSTRAP
    parser.add_argument(
        "--bootstrap",
        default=bootstrap_default,
        help="broker address host:port for client commands (also accepted after the "
        f"subcommand; default: $DWAL_BOOTSTRAP, else {DEFAULT_BOOTSTRAP})",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    def client_command(name: str, help_text: str, parent=commands) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_text)
        sub.add_argument(
            "--bootstrap",
            default=argparse.SUPPRESS,  # not given here: the top-level value (or its default)
            help=f"broker address host:port (default: $DWAL_BOOTSTRAP, else {DEFAULT_BOOTSTRAP})",
        )
        return sub

    # `dwal broker [flags]` is handed over to the broker package before parsing (see `main`);
    # listed here for `dwal --help`. `dwal broker decommission|recommission` are clients.
    broker = commands.add_parser(
        "broker",
        help="run a broker in the foreground (dwal broker --help); decommission|recommission N",
    )
    broker_commands = broker.add_subparsers(dest="broker_command", required=True)
    decommission = client_command(
        "decommission",
        "move every replica off a broker and place no new one on it",
        broker_commands,
    )
    decommission.add_argument("broker_id", type=_broker_id, help="the broker's node id")
    decommission.add_argument(
        "--wait",
        action="store_true",
        help="wait until no partition is left on the broker, printing progress",
    )
    recommission = client_command(
        "recommission", "let new replicas go to a decommissioned broker again", broker_commands
    )
    recommission.add_argument("broker_id", type=_broker_id, help="the broker's node id")

    topic = commands.add_parser("topic", help="manage topics")
    topic_commands = topic.add_subparsers(dest="topic_command", required=True)
    create = client_command("create", "create a topic", topic_commands)
    create.add_argument("name", help="topic name")
    create.add_argument(
        "--partitions", "-p", type=_positive_int, default=1, help="number of partitions (default 1)"
    )
    create.add_argument(
        "--replication-factor",
        "-r",
        type=_positive_int,
        default=-1,
        help="copies of each partition, on different brokers (default: the broker's default, "
        "min(3, number of brokers))",
    )
    create.add_argument(
        "--config",
        "-c",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="topic config override (repeatable)",
    )
    client_command("list", "list topics", topic_commands)
    describe = client_command(
        "describe", "configs, and per partition leader, replicas, ISR and offsets", topic_commands
    )
    describe.add_argument("name", help="topic name")
    _add_output_format(describe)
    delete = client_command("delete", "delete a topic and its data", topic_commands)
    delete.add_argument("name", help="topic name")
    grow = client_command("add-partitions", "grow a topic to more partitions", topic_commands)
    grow.add_argument("name", help="topic name")
    grow.add_argument("--partitions", "-p", type=_positive_int, required=True, help="the new total")
    alter = client_command("alter-config", "set or remove topic config overrides", topic_commands)
    alter.add_argument("name", help="topic name")
    alter.add_argument(
        "--set",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config override, e.g. retention.ms=86400000 (repeatable)",
    )
    alter.add_argument(
        "--delete",
        action="append",
        default=[],
        metavar="KEY",
        help="remove an override: the broker default applies again (repeatable)",
    )

    reassign = client_command(
        "reassign", "move partitions to other brokers, or cancel their move", topic_commands
    )
    reassign.add_argument("name", help="topic name")
    reassign.add_argument(
        "--partition",
        "-p",
        type=_partition_number,
        action="append",
        required=True,
        help="partition to move (repeatable: each gets the same replicas)",
    )
    target = reassign.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--replicas",
        type=_broker_ids,
        metavar="ID,ID,...",
        help="the new replicas, the preferred leader first (e.g. 1,2,4)",
    )
    target.add_argument(
        "--cancel", action="store_true", help="cancel the move: back to the replicas before it"
    )
    reassign.add_argument(
        "--wait", action="store_true", help="wait until the move completed, printing progress"
    )
    reassignments = client_command(
        "reassignments", "list the partitions being moved to other brokers", topic_commands
    )
    reassignments.add_argument("--topic", "-t", help="only this topic (default: every topic)")
    _add_output_format(reassignments)

    cluster = commands.add_parser("cluster", help="the cluster's brokers and controllers")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True)
    status = client_command(
        "status", "cluster id, active controller, quorum lag, brokers", cluster_commands
    )
    _add_output_format(status)

    leaders = commands.add_parser("leaders", help="partition leadership")
    leaders_commands = leaders.add_subparsers(dest="leaders_command", required=True)
    for name, help_text in (
        ("elect", "move leadership back to each partition's preferred replica"),
        ("rebalance", "the same: preferred leader election, as the controller does on its own"),
    ):
        elect = client_command(name, help_text, leaders_commands)
        elect.add_argument("--topic", "-t", help="only this topic (default: every topic)")
        elect.add_argument(
            "--partition",
            "-p",
            type=_partition_number,
            action="append",
            help="only this partition of --topic (repeatable; default all)",
        )

    group = commands.add_parser("group", help="manage consumer groups")
    group_commands = group.add_subparsers(dest="group_command", required=True)
    client_command("list", "list consumer groups", group_commands)
    group_describe = client_command(
        "describe", "members, offsets and lag of a group", group_commands
    )
    group_describe.add_argument("group", help="group id")
    group_delete = client_command(
        "delete", "delete an inactive group and its offsets", group_commands
    )
    group_delete.add_argument("group", help="group id")
    reset = client_command(
        "reset-offsets", "move an inactive group's committed offsets", group_commands
    )
    reset.add_argument("group", help="group id")
    reset.add_argument("--topic", "-t", required=True, help="topic whose offsets move")
    reset.add_argument(
        "--partition",
        "-p",
        type=_partition_number,
        action="append",
        help="partition to reset (repeatable; default all)",
    )
    reset.add_argument(
        "--to",
        nargs="+",
        required=True,
        metavar="TARGET",
        help="earliest | latest | offset N | timestamp MS",
    )
    reset.add_argument(
        "--execute", action="store_true", help="commit the new offsets (without it: only show them)"
    )

    produce = client_command("produce", "produce stdin lines as records")
    produce.add_argument("topic", help="topic to write to")
    produce.add_argument("--key", "-k", help="key of every record")
    produce.add_argument("--key-separator", help="split each line into KEY<sep>VALUE")
    produce.add_argument(
        "--partition",
        "-p",
        type=_partition_number,
        help="partition (default: by key, else sticky)",
    )
    produce.add_argument(
        "--partitioner",
        choices=["murmur2", "crc32"],
        default="murmur2",
        help="the hash of a key that picks its partition: murmur2, as Kafka's clients "
        "(default), or crc32, DWAL's earlier one (keeps keys where earlier records went)",
    )
    produce.add_argument(
        "--acks",
        choices=["0", "1", "all", "-1"],
        default="1",
        help="0: do not wait; 1: the leader wrote it; all (or -1): every in-sync replica "
        "has it (default 1)",
    )
    produce.add_argument(
        "--compression",
        choices=["none", "gzip", "lz4", "zstd"],
        default="none",
        help="compress each batch (default none)",
    )
    produce.add_argument(
        "--linger-ms",
        type=_milliseconds,
        default=5,
        help="wait up to this long for a batch to fill before sending it (default 5)",
    )
    produce.add_argument(
        "--batch-size",
        type=_batch_size,
        default=64 * 1024,
        help=f"batch size in bytes, 1 to {LIMITS.cli_produce_buffer_bytes} (default 65536)",
    )

    consume = client_command("consume", "print records, one per line")
    consume.add_argument("topic")
    consume.add_argument(
        "--partition",
        "-p",
        type=_partition_number,
        action="append",
        help="partition to read (repeatable; default all)",
    )
    consume.add_argument(
        "--offset",
        "-o",
        default="earliest",
        help="earliest, latest, or an offset (default earliest)",
    )
    consume.add_argument(
        "--num", "-n", type=_positive_int, help="exit after this many records (at least 1)"
    )
    consume.add_argument(
        "--exit-at-end",
        "-e",
        action="store_true",
        help="exit once every partition read is at its end (high watermark), like kcat -e",
    )
    consume.add_argument(
        "--group",
        "-g",
        help="consume as a member of this consumer group, "
        "from its committed offsets (the group assigns the partitions)",
    )
    consume.add_argument("--instance-id", help="static group membership id (with --group)")
    consume.add_argument(
        "--format",
        "-f",
        default="%v",
        help="output format: %%v value, %%k key, %%o offset, %%p partition, "
        "%%t topic, %%T timestamp, %%%% percent; \\n \\t \\\\ escapes (default %%v); "
        "or 'json' for one JSON object per record",
    )
    consume.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="skip damaged record batches (reported on stderr) instead of exiting 1",
    )
    consume.add_argument(
        "--give-up-after",
        type=_seconds,
        metavar="SECONDS",
        help="exit 1 once the broker has been unreachable this long (default: retry forever)",
    )

    verify = client_command("verify", "check the CRC of every record batch of a topic")
    verify.add_argument("topic")
    verify.add_argument(
        "--partition",
        "-p",
        type=_partition_number,
        action="append",
        help="partition to check (repeatable; default all)",
    )

    add_grpc_commands(commands)  # `dwal grpc produce|consume`: client/grpc_command.py
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["broker"] and arguments[1:2] not in (["decommission"], ["recommission"]):
        _run_broker_package(arguments[1:])
    args = build_parser().parse_args(arguments)
    if args.command == "grpc":  # synchronous grpcio, no trio: client/grpc_command.py
        return run_grpc_command(args)
    try:
        try:
            if args.command == "consume":
                check_consume_arguments(args)  # before connecting: a usage error needs no broker
            return trio.run(_run_client_command, args)
        except BaseExceptionGroup as group:
            raise single_error(group) from None
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DwalError as error:
        print(f"error: {error.message} ({error.code.name})", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


# -- broker ---------------------------------------------------------------------------


def _run_broker_package(arguments: list[str]) -> NoReturn:
    """Become ``python -m broker ARGUMENTS`` (same process id, so signals and a supervisor's
    PID reach the broker): the broker's command lives in the broker package, which the
    client package never imports."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "broker", *arguments])


# -- client commands --------------------------------------------------------------------


async def _run_client_command(args: argparse.Namespace) -> int:
    """Run one client command. The first SIGINT or SIGTERM asks it to stop gracefully (produce
    stops reading stdin and flushes what it read; consume stops following); a second one
    cancels everything."""
    stop = trio.Event()
    result = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def command() -> None:
                nonlocal result
                async with connect(args.bootstrap, client_id=f"dwal-{args.command}") as cluster:
                    result = await _dispatch(cluster, args, stop)
                nursery.cancel_scope.cancel()

            async def watch_signals() -> None:
                async for _ in signals:
                    if stop.is_set():
                        nursery.cancel_scope.cancel()
                        return
                    stop.set()
                    if args.command not in ("produce", "consume"):
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(command)
            nursery.start_soon(watch_signals)
    return result


async def _dispatch(cluster, args: argparse.Namespace, stop: trio.Event) -> int:
    if args.command == "topic":
        return await _topic_command(Admin(cluster), args)
    if args.command == "produce":
        return await _produce_command(cluster, args, stop)
    if args.command == "consume":
        if args.group is not None:
            return await group_consume_command(cluster, args, stop)
        return await consume_command(cluster, args, stop)
    if args.command == "verify":
        return await verify_command(cluster, args)
    if args.command == "group":
        return await _group_command(GroupAdmin(cluster), args)
    if args.command == "cluster":
        return await _cluster_command(Admin(cluster), args)
    if args.command == "leaders":
        return await _elect_leaders(Admin(cluster), args)
    if args.command == "broker":
        return await _broker_command(Admin(cluster), args)
    raise UsageError(f"unknown command {args.command}")


async def _until(stop: trio.Event, scope: trio.CancelScope) -> None:
    await stop.wait()
    scope.cancel()


async def _topic_command(admin: Admin, args: argparse.Namespace) -> int:
    match args.topic_command:
        case "create":
            await admin.create_topic(
                args.name,
                args.partitions,
                replication_factor=args.replication_factor,
                configs=dict(args.config),
            )
            print(f"created topic {args.name} with {args.partitions} partition(s)")
        case "list":
            for name in await admin.list_topics():
                print(name)
        case "describe":
            description = await admin.describe_topic(args.name)
            if args.format == "json":
                print(json.dumps(dataclasses.asdict(description)))
            else:
                _print_description(description)
        case "delete":
            await admin.delete_topic(args.name)
            print(f"deleted topic {args.name}")
        case "add-partitions":
            await admin.add_partitions(args.name, args.partitions)
            print(f"topic {args.name} now has {args.partitions} partitions")
        case "alter-config":
            configs = await admin.alter_configs(args.name, set=dict(args.set), delete=args.delete)
            print(
                f"altered topic {args.name}; overrides now: "
                + (", ".join(f"{k}={v}" for k, v in sorted(configs.items())) or "none")
            )
        case "reassign":
            return await _reassign(admin, args)
        case "reassignments":
            return await _list_reassignments(admin, args)
    return 0


def _print_description(description) -> None:
    print(f"topic: {description.name}")
    if description.topic_id:
        print(f"topic id: {description.topic_id}")
    print(f"partitions: {len(description.partitions)}")
    print("configs:")
    for key, value in sorted(description.configs.items()):
        print(f"  {key}={value}")
    print(
        f"{'PARTITION':>9} {'LEADER':>6} {'LOG-START':>12} {'HIGH-WATERMARK':>15} "
        f"{'LOG-END':>12} {'SIZE-BYTES':>12} {'SEGMENTS':>8} {'LEADER-EPOCH':>12}  "
        f"{'REPLICAS':<12} ISR"
    )
    for p in description.partitions:
        # "-": the answering broker holds no copy of the partition
        local = [p.log_start_offset, p.high_watermark, p.log_end_offset, p.size_bytes, p.segments]
        start, high, end, size, segments = local if p.local else ["-"] * 5
        print(
            f"{p.partition:>9} {_node(p.leader):>6} {start:>12} {high:>15} {end:>12} "
            f"{size:>12} {segments:>8} {p.leader_epoch:>12}  {_nodes(p.replicas):<12} "
            f"{_nodes(p.isr)}"
        )


def _node(node_id: int) -> str:
    return str(node_id) if node_id >= 0 else "none"


def _nodes(node_ids) -> str:
    return ",".join(str(n) for n in node_ids) or "-"


async def _cluster_command(admin: Admin, args: argparse.Namespace) -> int:
    description = await admin.describe_cluster()
    if args.format == "json":
        print(json.dumps(dataclasses.asdict(description)))
        return 0
    controller = description.controller_id
    print(f"cluster id: {description.cluster_id}")
    print(f"controller: {_node(controller)}")
    print(f"metadata offset: {description.metadata_offset}")
    members = [("voter", m) for m in description.voters]
    members += [("learner", m) for m in description.learners]
    print(f"{'CONTROLLER':>10} {'ROLE':<8} {'MATCH-INDEX':>12} {'LAG':>8}")
    for role, m in members:
        active = " (active)" if m.node_id == controller else ""
        match_index = m.match_index if m.match_index >= 0 else "-"
        lag = m.lag if m.lag >= 0 else "-"  # only the active controller knows
        print(f"{m.node_id:>10} {role:<8} {match_index:>12} {lag:>8}{active}")
    print(
        f"{'BROKER':>10} {'EPOCH':>8} {'FENCED':<6} {'SHUT-DOWN':<9} {'DECOMMISSIONED':<14} "
        f"{'PARTITIONS':>10} {'RACK':<10} LISTENERS"
    )
    for b in description.brokers:
        listeners = " ".join(f"{li.name}://{li.host}:{li.port}" for li in b.listeners) or "-"
        partitions = b.partitions if b.partitions >= 0 else "-"  # an older broker: unknown
        print(
            f"{b.node_id:>10} {b.epoch:>8} {_yes_no(b.fenced):<6} {_yes_no(b.shut_down):<9} "
            f"{_yes_no(b.decommissioned):<14} {partitions:>10} {b.rack or '-':<10} {listeners}"
        )
    return 0


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


async def _elect_leaders(admin: Admin, args: argparse.Namespace) -> int:
    if args.partition and args.topic is None:
        raise UsageError("--partition needs --topic")
    topics = None if args.topic is None else {args.topic: args.partition}
    results = await admin.elect_leaders(topics)
    failed = 0
    print(f"{'TOPIC':<24} {'PARTITION':>9}  RESULT")
    for tp, error in sorted(results.items()):
        if error is None:
            outcome = "elected its preferred replica"
        elif error.code == ErrorCode.ELECTION_NOT_NEEDED:
            outcome = "preferred replica already leads"
        else:
            failed += 1
            outcome = f"failed: {error.message} ({error.code.name})"
        print(f"{tp.topic:<24} {tp.partition:>9}  {outcome}")
    if not results:
        print("every partition's preferred replica leads: nothing to elect")
    if failed:
        print(f"error: {failed} election(s) failed", file=sys.stderr)
        return 1
    return 0


async def _reassign(admin: Admin, args: argparse.Namespace) -> int:
    """`dwal topic reassign`: one line per partition, then (with --wait) progress lines."""
    partitions = [TopicPartition(args.name, p) for p in sorted(set(args.partition))]
    replicas = None if args.cancel else args.replicas
    results = await admin.alter_partition_reassignments({tp: replicas for tp in partitions})
    moving = await admin.list_partition_reassignments(partitions)
    failed = 0
    for tp in partitions:
        error = results.get(tp)
        where = f"{tp.topic}-{tp.partition}"
        if error is not None:
            failed += 1
            print(f"{where}: failed: {error.message} ({error.code.name})")
        elif tp in moving:
            print(f"{where}: {_move_text(moving[tp])}")
        elif args.cancel:
            print(f"{where}: move cancelled")
        else:
            print(f"{where}: now on {_nodes(replicas or ())}")
    if failed:
        print(f"error: {failed} partition(s) not moved", file=sys.stderr)
        return 1
    if args.wait:
        await _wait_moved(admin, [tp for tp in partitions if tp in moving], moving)
    return 0


def _move_text(move) -> str:
    added = f"adding {_nodes(move.adding_replicas)}" if move.adding_replicas else ""
    removed = f"removing {_nodes(move.removing_replicas)}" if move.removing_replicas else ""
    changes = ", ".join(part for part in (added, removed) if part)
    return (
        f"moving to {_nodes(move.target_replicas)} ({changes}; in sync {_nodes(move.isr)}, "
        f"leader {_node(move.leader)})"
    )


async def _wait_moved(admin: Admin, partitions: list[TopicPartition], moving: dict) -> None:
    """Poll until none of `partitions` is moving; print each change of a move's state."""
    shown = {tp: _move_text(move) for tp, move in moving.items()}
    while partitions:
        await trio.sleep(WAIT_POLL_INTERVAL_S)
        now = await admin.list_partition_reassignments(partitions)
        for tp in partitions:
            where = f"{tp.topic}-{tp.partition}"
            if tp not in now:
                print(f"{where}: move completed", flush=True)
            elif _move_text(now[tp]) != shown.get(tp):
                shown[tp] = _move_text(now[tp])
                print(f"{where}: {shown[tp]}", flush=True)
        partitions = [tp for tp in partitions if tp in now]


async def _list_reassignments(admin: Admin, args: argparse.Namespace) -> int:
    partitions = None
    if args.topic is not None:
        info = await admin.describe_topic(args.topic)  # UNKNOWN_TOPIC_OR_PARTITION, at once
        partitions = [TopicPartition(args.topic, p.partition) for p in info.partitions]
    moving = await admin.list_partition_reassignments(partitions)
    if args.format == "json":
        rows = [
            {**dataclasses.asdict(move), "target_replicas": list(move.target_replicas)}
            for _, move in sorted(moving.items())
        ]
        print(json.dumps({"reassignments": rows}))
        return 0
    if not moving:
        print("no partition is being reassigned")
        return 0
    print(
        f"{'TOPIC':<24} {'PARTITION':>9}  {'TARGET':<12} {'ADDING':<10} {'REMOVING':<10} "
        f"{'ISR':<12} LEADER"
    )
    for tp, move in sorted(moving.items()):
        print(
            f"{tp.topic:<24} {tp.partition:>9}  {_nodes(move.target_replicas):<12} "
            f"{_nodes(move.adding_replicas):<10} {_nodes(move.removing_replicas):<10} "
            f"{_nodes(move.isr):<12} {_node(move.leader)}"
        )
    return 0


async def _broker_command(admin: Admin, args: argparse.Namespace) -> int:
    broker_id = args.broker_id
    if args.broker_command == "recommission":
        result = await admin.recommission_broker(broker_id)
        print(f"broker {broker_id} recommissioned: new replicas may go to it again")
        return 0
    result = await admin.decommission_broker(broker_id)
    if result.partitions == 0:
        print(f"broker {broker_id} decommissioned: it holds no replica")
        return 0
    print(
        f"broker {broker_id} decommissioned: {result.partitions} partition(s) moving off it "
        "(their new replicas catch up first)"
    )
    if args.wait:
        await _wait_decommissioned(admin, broker_id, result.partitions)
    return 0


async def _wait_decommissioned(admin: Admin, broker_id: int, left: int) -> None:
    """Poll DescribeCluster until the broker holds no replica; print each new count."""
    while left:
        await trio.sleep(WAIT_POLL_INTERVAL_S)
        description = await admin.describe_cluster()
        broker = next((b for b in description.brokers if b.node_id == broker_id), None)
        now = 0 if broker is None else max(broker.partitions, 0)
        if now != left:
            left = now
            print(f"broker {broker_id}: {left} partition(s) left", flush=True)
    print(f"broker {broker_id} holds no replica any more: it may be stopped", flush=True)


async def _read_stdin_chunks():
    descriptor = sys.stdin.fileno()
    while True:
        # abandon_on_cancel: a stop request must not wait for the next line of input. The
        # raw os.read holds no lock of sys.stdin's buffer, so the abandoned thread cannot
        # block the interpreter's exit.
        chunk = await trio.to_thread.run_sync(
            os.read, descriptor, LIMITS.cli_stdin_read_bytes, abandon_on_cancel=True
        )
        if not chunk:
            return
        yield chunk


async def _produce_command(cluster, args: argparse.Namespace, stop: trio.Event) -> int:
    # An unknown topic or partition is an error now, before any input is read.
    info = await cluster.topic(args.topic, allow_auto_topic_creation=True)
    count = len(info.partitions)
    if args.partition is not None and args.partition >= count:
        raise DwalError(
            ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
            f"topic {args.topic} has no partition {args.partition} "
            f"(it has {count}: 0 to {count - 1})",
        )
    record_limit = _record_limit(info)
    started = time.monotonic()
    tally = _ProduceTally(args, started)
    async with Producer(
        cluster,
        acks=args.acks,
        compression=args.compression,
        linger_ms=args.linger_ms,
        batch_size=args.batch_size,
        buffer_bytes_max=LIMITS.cli_produce_buffer_bytes,
        allow_auto_topic_creation=True,
        partitioner=args.partitioner,
    ) as producer:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as reading:
                nursery.start_soon(_until, stop, reading)
                await _produce_lines(producer, args, tally, record_limit)
            nursery.cancel_scope.cancel()
    return tally.summarize(time.monotonic() - started, interrupted=stop.is_set())


class _ProduceTally:
    """Counts records and keeps only failed or pending deliveries (bounded memory). Lines
    refused before sending (too large) are reported at once and counted as failed."""

    def __init__(self, args: argparse.Namespace, started: float) -> None:
        self.topic = args.topic
        self.count = 0
        self.refused = 0
        self.deliveries: list = []
        self.started = started
        self.last_progress = started

    def add(self, delivery) -> None:
        self.deliveries.append(delivery)
        self.count += 1

    def refuse(self, error: DwalError) -> None:
        self.refused += 1
        print(f"error: {error.message} ({error.code.name})", file=sys.stderr, flush=True)

    def tidy(self) -> None:
        self.deliveries = _drop_successes(self.deliveries)
        now = time.monotonic()
        if now - self.last_progress >= LIMITS.cli_progress_interval_s:
            self.last_progress = now
            rate = self.count / (now - self.started)
            print(
                f"progress: {_records(self.count)} sent, {rate:.0f} records/s",
                file=sys.stderr,
                flush=True,
            )

    def summarize(self, elapsed: float, *, interrupted: bool) -> int:
        failures = [d for d in self.deliveries if d.error is not None]
        done = self.count - len(failures)
        rate = f" ({done / elapsed:.0f} records/s)" if done and elapsed > 0 else ""
        note = " (stopped by signal: input after that was not read)" if interrupted else ""
        print(
            f"produced {_records(done)} to {self.topic} in {elapsed:.2f} s{rate}, "
            f"{len(failures) + self.refused} failed{note}"
        )
        if failures:
            error = failures[0].error
            print(f"error: {error.message} ({error.code.name})", file=sys.stderr)
        return 1 if failures or self.refused else 0


def _records(count: int) -> str:
    return f"{count} record" if count == 1 else f"{count} records"


async def _produce_lines(
    producer: Producer,
    args: argparse.Namespace,
    tally: _ProduceTally,
    record_limit: tuple[int, str],
) -> None:
    """Send each line of stdin as a record. A line longer than the topic's max.message.bytes
    is skipped (and reported at once) without ever being held in memory whole."""
    key = args.key.encode() if args.key is not None else None
    separator = args.key_separator.encode() if args.key_separator else None
    line_number = 0

    async def send(line: bytes) -> None:
        record_key = key
        if separator is not None and separator in line:
            record_key, _, line = line.partition(separator)
        try:
            delivery = await producer.send(args.topic, line, record_key, partition=args.partition)
        except DwalError as error:
            if error.code != ErrorCode.MESSAGE_TOO_LARGE:
                raise
            tally.refuse(DwalError(error.code, f"line {line_number} of stdin: {error.message}"))
            return
        tally.add(delivery)

    # The separator is not part of the record: a line may be longer by that much.
    splitter = LineSplitter(record_limit[0] + len(separator or b""))
    async for chunk in _read_stdin_chunks():
        for line in splitter.feed(chunk):
            line_number += 1
            if isinstance(line, OversizeLine):
                tally.refuse(_oversize_error(line, record_limit))
            else:
                await send(line)
        tally.tidy()
    for line in splitter.finish():
        line_number += 1
        await send(line)


def _record_limit(info) -> tuple[int, str]:
    """Return the size no record batch of the topic may exceed, and what sets it: the broker
    refuses batches over max.message.bytes, and a batch must fit in a segment."""
    limits = [
        (info.max_message_bytes, f"topic {info.name}'s max.message.bytes"),
        (info.segment_bytes, f"topic {info.name}'s segment.bytes"),
    ]
    known = [limit for limit in limits if limit[0] >= 0]
    if not known:  # an older broker: a bound of our own, for memory
        return LIMITS.cli_line_bytes_max_unknown, "the line limit"
    return min(known)


def _oversize_error(line: OversizeLine, record_limit: tuple[int, str]) -> DwalError:
    limit_bytes, limit_name = record_limit
    return DwalError(
        ErrorCode.MESSAGE_TOO_LARGE,
        f"line {line.line_number} of stdin has at least {line.size_bytes_min} bytes, over "
        f"{limit_name} of {limit_bytes}: line skipped",
    )


def _drop_successes(deliveries: list) -> list:
    """Keep only deliveries that are pending or failed (bounded memory on long streams)."""
    return [d for d in deliveries if not d.done or d.error is not None]


async def _group_command(admin: GroupAdmin, args: argparse.Namespace) -> int:
    match args.group_command:
        case "list":
            print(f"{'GROUP':<30} {'STATE':<12} {'MEMBERS':>7}")
            for listing in await admin.list_groups():
                print(f"{listing.group_id:<30} {listing.state:<12} {listing.members:>7}")
        case "describe":
            _print_group(await admin.describe_group(args.group))
        case "delete":
            await admin.delete_group(args.group)
            print(f"deleted group {args.group}")
        case "reset-offsets":
            return await _reset_offsets(admin, args)
    return 0


def _print_group(description) -> None:
    print(f"group: {description.group_id}")
    print(f"state: {description.state}")
    print(f"members: {len(description.members)}")
    for m in description.members:
        owned = ", ".join(f"{tp.topic}-{tp.partition}" for tp in m.assignment) or "-"
        static = f" instance={m.instance_id}" if m.instance_id else ""
        if m.away:
            static += f" away (session expires in {math.ceil(m.session_expires_in_ms / 1000)} s)"
        print(
            f"  {m.member_id} client={m.client_id or '-'} host={m.host or '-'}"
            f" epoch={m.member_epoch}{static} partitions: {owned}"
        )
    print(
        f"{'TOPIC':<24} {'PARTITION':>9} {'COMMITTED':>12} {'HIGH-WATERMARK':>15} "
        f"{'LAG':>10}  OWNER"
    )
    for p in description.offsets:
        committed = p.committed_offset if p.committed_offset >= 0 else "-"
        lag = p.lag if p.lag is not None else "-"
        print(
            f"{p.partition.topic:<24} {p.partition.partition:>9} {committed:>12} "
            f"{p.high_watermark:>15} {lag:>10}  {p.owner or '-'}"
        )


async def _reset_offsets(admin: GroupAdmin, args: argparse.Namespace) -> int:
    to, *rest = args.to
    if to in ("earliest", "latest") and not rest:
        value = None
    elif to in ("offset", "timestamp") and len(rest) == 1 and rest[0].isdigit():
        value = int(rest[0])
    else:
        raise UsageError("--to takes earliest, latest, offset N or timestamp MS")
    plan = await admin.reset_offsets(
        args.group, args.topic, to=to, value=value, partitions=args.partition, execute=args.execute
    )
    print(f"{'TOPIC':<24} {'PARTITION':>9} {'NEW-OFFSET':>12}")
    for tp, offset in sorted(plan.items()):
        print(f"{tp.topic:<24} {tp.partition:>9} {offset:>12}")
    if args.execute:
        print(f"committed new offsets for group {args.group}")
    else:
        print("dry run: nothing committed (add --execute to commit these offsets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
