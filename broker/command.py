"""The `dwal broker` command: parse its flags, build the configuration, run a broker in the
foreground until SIGINT or SIGTERM.

It lives in the broker package, and `dwal` (in `client`) hands `dwal broker ...` over to it by
executing ``python -m broker ...`` in its own process, so that `client` never imports
`broker`. Every failed start prints one ``error:`` line: exit status 2 for bad flags or
configuration, 1 when the broker cannot start (port in use, data directory locked, unusable
or damaged).
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import resource
import signal
import sys
from typing import Sequence

import trio

from broker.config import BrokerConfig, ConfigError, build_config, load_toml
from broker.data_dir_lock import DataDirError
from broker.event_log import configure, log_event
from broker.node import run_broker
from broker.storage import StorageError
from broker.storage.file_descriptor_cache import (
    RESERVED_DESCRIPTORS_MIN,
    capacity_for_limit,
    process_cache,
)
from protocol import DwalError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwal broker", description="run a DWAL broker in the foreground"
    )
    parser.add_argument("--config", type=pathlib.Path, help="TOML configuration file")
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument(
        "--advertised-host", help="host name clients are told to connect to (default: --host)"
    )
    parser.add_argument("--port", type=int, help="native protocol port (default 9092)")
    parser.add_argument("--http-port", type=int, help="JSON/HTTP port (default 8080, -1 disables)")
    parser.add_argument("--http-host", help="JSON/HTTP listen address (default: --host)")
    parser.add_argument(
        "--grpc-port",
        type=int,
        help="serve the gRPC API on this port (default: off; make run uses 9090)",
    )
    parser.add_argument("--grpc-host", help="gRPC listen address (default: --host)")
    parser.add_argument(
        "--kafka-port",
        type=int,
        help="serve Kafka's wire protocol on this port (default: off; make run uses 9093)",
    )
    parser.add_argument("--kafka-host", help="Kafka protocol listen address (default: --host)")
    parser.add_argument("--data-dir", help="data directory (default ./data)")
    parser.add_argument(
        "--fsync",
        choices=["always", "interval", "never"],
        help="durability policy default for topics (default always)",
    )
    parser.add_argument(
        "--node-id", type=int, help="this node's id, a positive integer (default 1)"
    )
    parser.add_argument(
        "--controller-quorum",
        metavar="ID@HOST:PORT,...",
        help="the controller voters and their controller ports; without it the broker runs "
        "an embedded single-voter controller (a cluster of one)",
    )
    parser.add_argument(
        "--controller-port",
        type=int,
        help="port for Raft and brokers' controller requests (cluster only; default: this "
        "node's port in --controller-quorum, any free port for a broker-only node)",
    )
    parser.add_argument(
        "--controller-host", help="controller port's listen address (default: --host)"
    )
    parser.add_argument(
        "--roles",
        choices=["broker,controller", "broker"],
        help="broker,controller (default): a voter of the controller quorum too; broker: "
        "follows the metadata log as a learner",
    )
    parser.add_argument("--rack", help="this broker's rack, for rack-aware replica placement")
    parser.add_argument(
        "--default-replication-factor",
        type=int,
        help="replication factor of topics created without one (default: min(3, brokers))",
    )
    parser.add_argument(
        "--auto-create-topics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="create unknown topics on first produce (default off)",
    )
    parser.add_argument("--default-partitions", type=int, help="partitions of auto-created topics")
    parser.add_argument(
        "--auto-leader-rebalance",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the active controller moves leadership back to preferred replicas (default on)",
    )
    parser.add_argument(
        "--leader-imbalance-check-interval-ms",
        type=int,
        help="how often the controller checks leadership balance (default 300000)",
    )
    parser.add_argument(
        "--leader-imbalance-per-broker-percentage",
        type=int,
        help="share of a broker's preferred partitions led elsewhere that triggers a "
        "rebalance (default 10)",
    )
    parser.add_argument(
        "--producer-id-expiration-ms",
        type=int,
        help="forget an idempotent producer's state after this long without a write "
        "(default 86400000)",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="least severe event logged on stderr (default info)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `dwal broker` with `argv` (the flags after `broker`); returns the exit status."""
    args = build_parser().parse_args(argv)
    overrides = {
        "host": args.host,
        "advertised_host": args.advertised_host,
        "port": args.port,
        "http_port": args.http_port,
        "http_host": args.http_host,
        "grpc_port": args.grpc_port,
        "grpc_host": args.grpc_host,
        "kafka_port": args.kafka_port,
        "kafka_host": args.kafka_host,
        "data_dir": args.data_dir,
        "fsync": args.fsync,
        "node_id": args.node_id,
        "controller_quorum": args.controller_quorum,
        "controller_port": args.controller_port,
        "controller_host": args.controller_host,
        "roles": args.roles,
        "rack": args.rack,
        "default_replication_factor": args.default_replication_factor,
        "auto_create_topics": args.auto_create_topics,
        "default_partitions": args.default_partitions,
        "log_level": args.log_level,
        "auto_leader_rebalance_enable": args.auto_leader_rebalance,
        "leader_imbalance_check_interval_ms": args.leader_imbalance_check_interval_ms,
        "leader_imbalance_per_broker_percentage": args.leader_imbalance_per_broker_percentage,
        "producer_id_expiration_ms": args.producer_id_expiration_ms,
    }
    try:
        file_values = load_toml(args.config) if args.config else {}
        config = build_config(file_values, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure(config.log_level)
    try:
        open_files = _size_open_files(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        try:
            trio.run(_run_until_signalled, config, open_files)
        except BaseExceptionGroup as group:
            raise _single_error(group) from None
    except OSError as error:  # typically: the port is in use
        print(
            f"error: {error.strerror or error}" + (f": {error.filename}" if error.filename else ""),
            file=sys.stderr,
        )
        return 1
    except (DataDirError, StorageError, DwalError) as error:
        # the data dir is locked, unusable, damaged; the cluster refused this node
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def _size_open_files(config: BrokerConfig) -> dict[str, int | str]:
    """Raise the soft open-file limit to the hard one (as Go's runtime does), then size the
    process's descriptor cache for segment files from it (or from open_files_cached_max).
    Returns the figures to log once the broker started. Raises ConfigError when
    open_files_cached_max leaves too few descriptors for everything else."""
    soft_before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = soft_before
    if soft_before != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # e.g. an unlimited hard limit the kernel refuses
            pass
    limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
    capacity = config.open_files_cached_max or capacity_for_limit(limit)
    if capacity > limit - RESERVED_DESCRIPTORS_MIN:
        raise ConfigError(
            f"open_files_cached_max ({capacity}) must leave at least "
            f"{RESERVED_DESCRIPTORS_MIN} of the open-file limit ({limit}) for sockets and "
            "other files: raise the limit (ulimit -n) or lower the setting"
        )
    process_cache().set_capacity(capacity)
    return {
        "soft": limit,
        "hard": hard if hard != resource.RLIM_INFINITY else "unlimited",
        "soft_before": soft_before if soft_before != resource.RLIM_INFINITY else "unlimited",
        "segment_files_cached_max": capacity,
    }


async def _run_until_signalled(config: BrokerConfig, open_files: dict[str, int | str]) -> None:
    """Run until SIGINT or SIGTERM; the first one stops the broker gracefully (it leaves
    the cluster while still serving), a second one at once. Logs `open_files` once started
    (a start refused prints one error line and nothing else)."""
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
                await run_broker(config, stop=stop, task_status=task_status)
                nursery.cancel_scope.cancel()  # stopped gracefully: stop listening for signals

            await nursery.start(run)
            log_event(
                logging.getLogger("dwal.broker"), logging.INFO, "open_files_limit", **open_files
            )
            async for _ in signals:
                if stop.is_set():
                    nursery.cancel_scope.cancel()
                    break
                stop.set()


def _single_error(group: BaseExceptionGroup) -> BaseException:
    """The one error inside nested exception groups (a failed start has one cause); the
    group itself when there are several."""
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
    return group
