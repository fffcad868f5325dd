"""Broker settings that reach the controller and the partition logs: leader balancing
(Kafka's auto.leader.rebalance.* settings) and the idempotent producers' expiration."""

from __future__ import annotations

import pytest
from broker_test_support import create_topic, running_node

from broker.command import build_parser
from broker.config import ConfigError, build_config
from broker.wall_clock import now_ms
from protocol.record_batch import encode_batch

HOUR_MS = 3_600_000


def test_leader_balancing_and_producer_expiration_from_the_file_and_flags():
    config = build_config(
        {
            "auto_leader_rebalance_enable": False,
            "leader_imbalance_check_interval_ms": 5_000,
            "producer_id_expiration_ms": 60_000,
        },
        {"leader_imbalance_per_broker_percentage": 25, "producers_max": None},
    )
    assert config.auto_leader_rebalance_enable is False
    assert config.leader_imbalance_check_interval_ms == 5_000
    assert config.leader_imbalance_per_broker_percentage == 25
    assert config.log_defaults.producer_id_expiration_ms == 60_000
    assert config.log_defaults.producers_max == 10_000  # not given: the default
    defaults = build_config({}, {})
    assert defaults.kafka_port == -1  # off unless given
    assert defaults.group_classic_session_timeout_ms_min == 6_000  # Kafka's
    assert defaults.auto_leader_rebalance_enable is True
    assert defaults.leader_imbalance_check_interval_ms == 300_000
    assert defaults.log_defaults.producer_id_expiration_ms == 86_400_000


@pytest.mark.parametrize(
    "setting, text",
    [
        ({"leader_imbalance_check_interval_ms": 0}, "leader_imbalance_check_interval_ms"),
        ({"leader_imbalance_per_broker_percentage": 101}, "leader_imbalance_per_broker"),
        ({"producer_id_expiration_ms": 0}, "producer_id_expiration_ms"),
        ({"auto_leader_rebalance_enable": "yes"}, "auto_leader_rebalance_enable"),
        ({"group_classic_initial_rebalance_delay_ms": -1}, "initial_rebalance_delay"),
        ({"group_classic_session_timeout_ms_min": 0}, "session_timeout_ms_min"),
        (
            {"group_classic_session_timeout_ms_min": 10, "group_classic_session_timeout_ms_max": 9},
            "session_timeout_ms_min",
        ),
        ({"kafka_port": 70000}, "kafka_port"),
    ],
)
def test_bad_values_are_refused(setting, text):
    with pytest.raises(ConfigError, match=text):
        build_config(setting, {})


def test_the_flags_parse():
    args = build_parser().parse_args(
        [
            "--no-auto-leader-rebalance",
            "--leader-imbalance-check-interval-ms",
            "700",
            "--leader-imbalance-per-broker-percentage",
            "0",
            "--producer-id-expiration-ms",
            "9000",
        ]
    )
    assert args.auto_leader_rebalance is False
    assert (args.leader_imbalance_check_interval_ms, args.producer_id_expiration_ms) == (700, 9000)
    assert args.leader_imbalance_per_broker_percentage == 0


async def test_the_controller_gets_the_balancing_settings(tmp_path):
    async with running_node(
        tmp_path,
        auto_leader_rebalance_enable=False,
        leader_imbalance_check_interval_ms=1_500,
        leader_imbalance_per_broker_percentage=30,
    ) as node:
        controller = node.member.controller
        assert controller is not None
        assert controller.config.auto_leader_rebalance_enable is False
        assert controller.config.leader_imbalance_check_interval_seconds == 1.5
        assert controller.config.leader_imbalance_per_broker_percentage == 30


async def test_the_retention_pass_forgets_idle_idempotent_producers(tmp_path):
    config = build_config({"producer_id_expiration_ms": HOUR_MS}, {})
    async with running_node(tmp_path, log_config=config.log_defaults) as node:
        await create_topic(node, "t")
        log = node.registry.log("t", 0)
        recent = now_ms()
        for producer_id, timestamp in ((7, recent - 2 * HOUR_MS), (8, recent)):
            batch = encode_batch(
                [[0, None, b"v", []]],
                base_timestamp=timestamp,
                producer_id=producer_id,
                producer_epoch=0,
                base_sequence=0,
            )
            await node.handlers.append_batch("t", 0, batch)
        assert log.statistics().producer_count == 2
        await node.registry.apply_retention()
        assert log.statistics().producer_count == 1  # producer 7 was idle for two hours
