"""The Kafka admin APIs (see `broker.gateway.kafka_entities` for the handler contract)."""

from __future__ import annotations

from broker.gateway.kafka_entities import KafkaApi

APIS: list[KafkaApi] = []
