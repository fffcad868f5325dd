"""Broker configuration: defaults, a TOML file, then command-line flags, in that order.

A TOML file holds the same names as the flags (with underscores) at top level, topic
defaults in a ``[topic_defaults]`` table using topic config names (``"segment.bytes"``), and
limits in a ``[limits]`` table (see `broker.limits.Limits`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any

from broker.limits import Limits
from broker.storage import LogConfig
from broker.storage.file_descriptor_cache import CAPACITY_MIN


class ConfigError(Exception):
    """The configuration is invalid; the message says which setting and why."""


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    node_id: int = 1
    host: str = "127.0.0.1"
    port: int = 9092
    advertised_host: str | None = None  # what Metadata tells clients; None: `host`
    http_host: str | None = None  # None: same as host
    http_port: int = 8080  # 0 picks a free port; -1 disables the HTTP gateway
    grpc_host: str | None = None  # None: same as host
    # The gRPC API (log.v1.Log): off (-1) unless given (`make run` serves it on 9090), so
    # that several brokers on one host need no extra flag; 0 picks a free port.
    grpc_port: int = -1
    kafka_host: str | None = None  # None: same as host
    # Kafka's wire protocol (kafka-python, librdkafka, kcat...): off (-1) unless given
    # (`make run` serves it on 9093), for the same reason as grpc_port; 0 picks a free port.
    kafka_port: int = -1
    data_dir: pathlib.Path = pathlib.Path("./data")
    log_level: str = "info"
    auto_create_topics: bool = False
    default_partitions: int = 1
    retention_check_interval_ms: int = 60_000
    offsets_topic_partitions: int = 16
    group_session_timeout_ms: int = 30_000
    group_heartbeat_interval_ms: int = 3_000
    group_members_max: int = 1000
    # Kafka's classic groups (JoinGroup/SyncGroup, through the Kafka listener): a new group's
    # first rebalance waits this long for more members (Kafka's
    # group.initial.rebalance.delay.ms, 3000 there), and the session timeouts members may ask
    # for (group.min/max.session.timeout.ms)
    group_classic_initial_rebalance_delay_ms: int = 100
    group_classic_session_timeout_ms_min: int = 6_000
    group_classic_session_timeout_ms_max: int = 1_800_000
    # The cluster. None: an embedded single-voter controller (a cluster of one node).
    # Else "ID@HOST:PORT,...": the controller voters and their controller ports.
    controller_quorum: str | None = None
    controller_host: str | None = None  # the controller port's listen address; None: host
    # Raft and brokers' controller requests (cluster only). None: a voter's port in
    # controller_quorum; for a broker-only node any free port (it registers the one bound).
    controller_port: int | None = None
    roles: str = "broker,controller"  # "broker": follows the metadata log as a learner
    rack: str | None = None
    broker_heartbeat_interval_ms: int = 1_000
    broker_session_timeout_ms: int = 6_000  # a broker silent this long is fenced
    # a follower that has not caught up with its leader for this long leaves the ISR
    # (Kafka's replica.lag.time.max.ms)
    replica_lag_time_max_ms: int = 10_000
    # of topics created without one; None: min(3, unfenced brokers)
    default_replication_factor: int | None = None
    # Where this broker reaches other brokers' native ports for replication, by node id,
    # instead of the address they registered (a TOML table only): for networks where a
    # broker's advertised address is not the one its peers use, and for fault-injection
    # tests that put a proxy on each directed link.
    peer_native_addresses: dict[int, tuple[str, int]] = field(default_factory=dict)
    # Segment files' descriptors kept open at once (a process-wide LRU cache; more are
    # opened on demand, closing the least recently used). None: three quarters of the
    # open-file limit, which `dwal broker` first raises to its hard limit.
    open_files_cached_max: int | None = None
    # The active controller gives leadership back to preferred replicas on its own (Kafka's
    # auto.leader.rebalance.enable, leader.imbalance.check.interval.seconds and
    # leader.imbalance.per.broker.percentage, same defaults).
    auto_leader_rebalance_enable: bool = True
    leader_imbalance_check_interval_ms: int = 300_000
    leader_imbalance_per_broker_percentage: int = 10
    log_defaults: LogConfig = field(default_factory=LogConfig)
    limits: Limits = field(default_factory=Limits)

    @property
    def controller_bind_host(self) -> str:
        return self.controller_host or self.host

    @property
    def controller_listen_port(self) -> int:
        """The port to bind for the controller listener (cluster only)."""
        if self.controller_port is not None:
            return self.controller_port
        own = self.quorum_voters().get(self.node_id)
        return own[1] if own is not None else 0

    @property
    def is_controller(self) -> bool:
        return "controller" in self.roles.split(",")

    def quorum_voters(self) -> dict[int, tuple[str, int]]:
        """The controller voters by node id ({} for the embedded single voter). The string
        was checked by `build_config`."""
        return parse_quorum(self.controller_quorum) if self.controller_quorum else {}

    @property
    def http_bind_host(self) -> str:
        return self.http_host or self.host

    @property
    def grpc_bind_host(self) -> str:
        return self.grpc_host or self.host

    @property
    def kafka_bind_host(self) -> str:
        return self.kafka_host or self.host

    @property
    def client_host(self) -> str:
        """The host clients are told to connect to: advertised_host, else the listen host
        (a wildcard listen address is no address to connect to: use this machine's name)."""
        if self.advertised_host:
            return self.advertised_host
        if self.host in ("0.0.0.0", "::", ""):
            return socket.getfqdn()
        return self.host


_SIMPLE_KEYS = {
    "node_id": int,
    "host": str,
    "port": int,
    "advertised_host": str,
    "http_host": str,
    "http_port": int,
    "grpc_host": str,
    "grpc_port": int,
    "kafka_host": str,
    "kafka_port": int,
    "data_dir": str,
    "log_level": str,
    "auto_create_topics": bool,
    "default_partitions": int,
    "retention_check_interval_ms": int,
    "offsets_topic_partitions": int,
    "group_session_timeout_ms": int,
    "group_heartbeat_interval_ms": int,
    "group_members_max": int,
    "group_classic_initial_rebalance_delay_ms": int,
    "group_classic_session_timeout_ms_min": int,
    "group_classic_session_timeout_ms_max": int,
    "controller_quorum": str,
    "controller_host": str,
    "controller_port": int,
    "roles": str,
    "rack": str,
    "broker_heartbeat_interval_ms": int,
    "broker_session_timeout_ms": int,
    "default_replication_factor": int,
    "replica_lag_time_max_ms": int,
    "open_files_cached_max": int,
    "auto_leader_rebalance_enable": bool,
    "leader_imbalance_check_interval_ms": int,
    "leader_imbalance_per_broker_percentage": int,
}

# Settings of every partition log that no topic config overrides (LogConfig's broker-only
# fields): idempotent producers' state is forgotten after producer_id_expiration_ms without
# a write (Kafka's producer.id.expiration.ms), and beyond producers_max per partition.
_LOG_BROKER_KEYS = {"producer_id_expiration_ms": int, "producers_max": int}


def _peer_addresses(value: Any) -> dict[int, tuple[str, int]]:
    """The [peer_native_addresses] table: {"2" = "host:port", ...}; raises ConfigError."""
    if not isinstance(value, dict):
        raise ConfigError('[peer_native_addresses] must be a table of node id = "host:port"')
    addresses: dict[int, tuple[str, int]] = {}
    for node, address in value.items():
        host, colon, port = str(address).rpartition(":")
        try:
            node_id, port_number = int(node), int(port)
        except ValueError:
            node_id = port_number = -1
        if node_id < 1 or not colon or not host or not 0 < port_number <= 65535:
            raise ConfigError(
                f'peer_native_addresses: {node!r} = {address!r} is not a node id = "host:port"'
            )
        addresses[node_id] = (host.strip("[]"), port_number)
    return addresses


def parse_quorum(text: str) -> dict[int, tuple[str, int]]:
    """Parse "1@host:9192,2@host:9193" into {1: ("host", 9192), ...}; raises ConfigError."""
    voters: dict[int, tuple[str, int]] = {}
    for item in text.split(","):
        node, at, address = item.strip().partition("@")
        host, colon, port = address.rpartition(":")
        try:
            node_id, port_number = int(node), int(port)
        except ValueError:
            node_id = port_number = -1
        if not at or not colon or not host or node_id < 1 or not 0 < port_number <= 65535:
            raise ConfigError(
                f"controller_quorum: {item.strip()!r} is not ID@HOST:PORT (a positive id, a "
                "port between 1 and 65535)"
            )
        if node_id in voters:
            raise ConfigError(f"controller_quorum: node {node_id} is listed twice")
        voters[node_id] = (host.strip("[]"), port_number)
    return voters


def _check_type(key: str, value: Any, kind: type) -> Any:
    if kind is int and (type(value) is not int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if kind is bool and type(value) is not bool:
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if kind is str and type(value) is not str:
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def load_toml(path: pathlib.Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None


def build_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> BrokerConfig:
    """Merge a TOML file's values with flag overrides (None means "not given")."""
    values: dict[str, Any] = {}
    topic_defaults: dict[str, str] = {}
    limits: dict[str, Any] = {}
    log_settings: dict[str, Any] = {}
    for key, value in file_values.items():
        if key == "topic_defaults":
            if not isinstance(value, dict):
                raise ConfigError("[topic_defaults] must be a table")
            topic_defaults.update({k: _config_string(v) for k, v in value.items()})
        elif key == "peer_native_addresses":
            values["peer_native_addresses"] = _peer_addresses(value)
        elif key == "limits":
            if not isinstance(value, dict):
                raise ConfigError("[limits] must be a table")
            limits.update(value)
        elif key in _SIMPLE_KEYS:
            values[key] = _check_type(key, value, _SIMPLE_KEYS[key])
        elif key in _LOG_BROKER_KEYS:
            log_settings[key] = _check_type(key, value, _LOG_BROKER_KEYS[key])
        elif key == "fsync":
            topic_defaults["fsync.policy"] = _check_type(key, value, str)
        elif key == "auto.create.topics":  # Kafka's spelling of the same setting
            values["auto_create_topics"] = _check_type(key, value, bool)
        else:
            raise ConfigError(f"unknown setting {key!r} in config file")
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "fsync":
            topic_defaults["fsync.policy"] = value
        elif key in _LOG_BROKER_KEYS:
            log_settings[key] = value
        else:
            values[key] = value
    return _assemble(values, topic_defaults, limits, log_settings)


def _config_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _assemble(
    values: dict[str, Any],
    topic_defaults: dict[str, str],
    limits: dict,
    log_settings: dict[str, Any],
) -> BrokerConfig:
    try:
        log_defaults = LogConfig.from_topic_configs(topic_defaults, LogConfig())
    except ValueError as error:
        raise ConfigError(f"topic_defaults: {error}") from None
    try:
        log_defaults = dataclasses.replace(log_defaults, **log_settings)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    known_limits = {f.name for f in dataclasses.fields(Limits)}
    for key, value in limits.items():
        if key not in known_limits:
            raise ConfigError(f"unknown limit {key!r}")
        _check_type(f"limits.{key}", value, int)
        if value < 1:
            raise ConfigError(f"limits.{key} must be positive")
    if "data_dir" in values:
        values["data_dir"] = pathlib.Path(values["data_dir"])
    config = BrokerConfig(log_defaults=log_defaults, limits=Limits(**limits), **values)
    _validate(config)
    return config


def _validate(config: BrokerConfig) -> None:
    for name in ("port",):
        port = getattr(config, name)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{name} must be between 0 and 65535, got {port}")
    for name in ("http_port", "grpc_port", "kafka_port"):
        port = getattr(config, name)
        if not -1 <= port <= 65535:
            raise ConfigError(f"{name} must be between -1 (disabled) and 65535, got {port}")
    if config.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log_level must be one of debug, info, warning, error")
    if not 1 <= config.default_partitions <= config.limits.partitions_per_topic_max:
        raise ConfigError("default_partitions is out of range")
    if config.retention_check_interval_ms < 10:
        raise ConfigError("retention_check_interval_ms must be at least 10")
    if not 1 <= config.offsets_topic_partitions <= 1000:
        raise ConfigError("offsets_topic_partitions must be between 1 and 1000")
    if not 100 <= config.group_heartbeat_interval_ms < config.group_session_timeout_ms:
        raise ConfigError(
            "group_heartbeat_interval_ms must be at least 100 and below group_session_timeout_ms"
        )
    if config.group_members_max < 1:
        raise ConfigError("group_members_max must be positive")
    if not 0 <= config.group_classic_initial_rebalance_delay_ms <= 300_000:
        raise ConfigError("group_classic_initial_rebalance_delay_ms must be between 0 and 300000")
    if not (
        0
        < config.group_classic_session_timeout_ms_min
        <= config.group_classic_session_timeout_ms_max
    ):
        raise ConfigError(
            "group_classic_session_timeout_ms_min must be positive and at most "
            "group_classic_session_timeout_ms_max"
        )
    if config.node_id < 1:
        raise ConfigError(f"node_id must be a positive integer, got {config.node_id}")
    if config.roles not in ("broker,controller", "controller,broker", "broker"):
        raise ConfigError(
            f"roles must be 'broker,controller' or 'broker' (a controller is also a broker), "
            f"got {config.roles!r}"
        )
    if config.controller_quorum is not None:
        voters = parse_quorum(config.controller_quorum)
        if config.is_controller and config.node_id not in voters:
            raise ConfigError(
                f"node {config.node_id} has the controller role but is not in controller_quorum"
                f" ({', '.join(map(str, sorted(voters)))}); list it there or use --roles broker"
            )
        if not config.is_controller and config.node_id in voters:
            raise ConfigError(
                f"node {config.node_id} is a voter in controller_quorum: give it the "
                "controller role"
            )
        if config.controller_port is not None:
            if not 0 <= config.controller_port <= 65535:
                raise ConfigError("controller_port must be between 0 and 65535")
            own = voters.get(config.node_id)
            if own is not None and own[1] != config.controller_port:
                raise ConfigError(
                    f"controller_port {config.controller_port} is not node {config.node_id}'s "
                    f"port in controller_quorum ({own[0]}:{own[1]}): the other voters could "
                    "not reach it"
                )
    elif not config.is_controller:
        raise ConfigError("a broker-only node (--roles broker) needs --controller-quorum")
    if not 10 <= config.broker_heartbeat_interval_ms < config.broker_session_timeout_ms:
        raise ConfigError(
            "broker_heartbeat_interval_ms must be at least 10 and below broker_session_timeout_ms"
        )
    if config.replica_lag_time_max_ms < 100:
        raise ConfigError("replica_lag_time_max_ms must be at least 100")
    factor = config.default_replication_factor
    if factor is not None and not 1 <= factor <= 128:
        raise ConfigError("default_replication_factor must be between 1 and 128")
    if config.leader_imbalance_check_interval_ms < 10:
        raise ConfigError("leader_imbalance_check_interval_ms must be at least 10")
    if not 0 <= config.leader_imbalance_per_broker_percentage <= 100:
        raise ConfigError("leader_imbalance_per_broker_percentage must be between 0 and 100")
    cached = config.open_files_cached_max
    if cached is not None and cached < CAPACITY_MIN:
        raise ConfigError(f"open_files_cached_max must be at least {CAPACITY_MIN}")
    if config.rack is not None and not 0 < len(config.rack) <= 255:
        raise ConfigError("rack must be 1 to 255 characters")
    for problem in config.limits.problems():
        raise ConfigError(problem)
