import dataclasses

import pytest

from broker.storage import TOPIC_CONFIG_KEYS, LogConfig
from broker.storage.log_config import BROKER_ONLY_FIELDS


def test_defaults():
    config = LogConfig()
    assert config.segment_bytes == 1024**3
    assert config.segment_ms == 7 * 24 * 3600 * 1000
    assert config.retention_ms == 7 * 24 * 3600 * 1000
    assert config.retention_bytes == -1
    assert config.index_interval_bytes == 4096
    assert config.max_message_bytes == 1024 * 1024 + 12
    assert config.fsync == "always"
    assert config.flush_interval_ms == 1000
    assert config.file_delete_delay_ms == 60_000
    assert config.cleanup_policy == "delete"
    assert config.delete_retention_ms == 24 * 3600 * 1000
    assert config.min_insync_replicas == 1
    assert config.producer_id_expiration_ms == 24 * 3600 * 1000
    assert config.producers_max == 10_000


def test_keys_cover_every_field_but_the_brokers_own():
    assert BROKER_ONLY_FIELDS == {"producer_id_expiration_ms", "producers_max"}
    assert sorted([*TOPIC_CONFIG_KEYS.values(), *BROKER_ONLY_FIELDS]) == sorted(
        field.name for field in dataclasses.fields(LogConfig)
    )


def test_the_brokers_own_fields_are_checked_and_carried_over_topic_configs():
    for bad in (dict(producer_id_expiration_ms=0), dict(producers_max=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LogConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a known topic config"):
        LogConfig.from_topic_configs({"producer.id.expiration.ms": "5"}, LogConfig())
    defaults = LogConfig(producer_id_expiration_ms=5_000, producers_max=7)
    config = LogConfig.from_topic_configs({"segment.bytes": "2048"}, defaults)
    assert (config.producer_id_expiration_ms, config.producers_max) == (5_000, 7)
    assert "producers_max" not in str(config.to_topic_configs())


def test_round_trip_through_topic_configs():
    config = LogConfig(segment_bytes=4096, fsync="interval", cleanup_policy="compact,delete")
    configs = config.to_topic_configs()
    assert set(configs) == set(TOPIC_CONFIG_KEYS)
    assert all(isinstance(value, str) for value in configs.values())
    assert LogConfig.from_topic_configs(configs, LogConfig()) == config


def test_overrides_apply_on_top_of_defaults():
    defaults = LogConfig(retention_bytes=10_000)
    config = LogConfig.from_topic_configs(
        {
            "segment.bytes": "2048",
            "fsync.policy": "never",
            "retention.ms": "-1",
            "cleanup.policy": "delete, compact",
            "min.insync.replicas": "2",
            "flush.ms": " 500 ",
        },
        defaults,
    )
    assert config.segment_bytes == 2048
    assert config.fsync == "never"
    assert config.retention_ms == -1
    assert config.cleanup_policy == "compact,delete"
    assert config.min_insync_replicas == 2
    assert config.flush_interval_ms == 500
    assert config.retention_bytes == 10_000  # untouched default


@pytest.mark.parametrize(
    "key, value",
    [
        ("segment.bytes", "abc"),
        ("segment.bytes", "100"),
        ("segment.bytes", "1.5"),
        ("segment.bytes", ""),
        ("segment.bytes", str(2**31)),
        ("segment.ms", "0"),
        ("retention.ms", "-2"),
        ("retention.bytes", "ten"),
        ("index.interval.bytes", "-1"),
        ("max.message.bytes", "0"),
        ("fsync.policy", "sometimes"),
        ("flush.ms", "0"),
        ("file.delete.delay.ms", "-5"),
        ("cleanup.policy", "keep"),
        ("cleanup.policy", "delete,keep"),
        ("delete.retention.ms", "x"),
        ("min.insync.replicas", "0"),
    ],
)
def test_bad_value_names_the_key(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        LogConfig.from_topic_configs({key: value}, LogConfig())


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"segment\.byte "):
        LogConfig.from_topic_configs({"segment.byte": "2048"}, LogConfig())


def test_non_string_value_is_refused():
    with pytest.raises(ValueError, match=r"segment\.bytes"):
        configs = {"segment.bytes": 2048}
        LogConfig.from_topic_configs(configs, LogConfig())  # type: ignore[arg-type]


def test_message_states_the_rule():
    with pytest.raises(ValueError, match=r"segment\.bytes must be an integer between 1024 and"):
        LogConfig.from_topic_configs({"segment.bytes": "10"}, LogConfig())


def test_direct_construction_is_checked():
    with pytest.raises(ValueError, match=r"retention\.bytes"):
        LogConfig(retention_bytes=-7)
    with pytest.raises(ValueError, match=r"fsync\.policy"):
        LogConfig(fsync="sometimes")
