"""Metadata images for replication tests, built by the controller's own pure decisions:
brokers registered and unfenced, a topic placed, a broker fenced or unfenced."""

from __future__ import annotations

from broker.controller import (
    EMPTY_IMAGE,
    BrokerRegistration,
    Decision,
    Listener,
    MetadataImage,
    NewTopic,
    apply,
    create_topic,
    fence_broker,
    register_broker,
    unfence_broker,
)
from protocol import DwalError


def commit(image: MetadataImage, decision: Decision) -> MetadataImage:
    assert not isinstance(decision, DwalError), decision
    return apply(image, decision, entry_index=image.last_applied_index + 1)


def with_brokers(*broker_ids: int) -> MetadataImage:
    image = EMPTY_IMAGE
    for broker_id in broker_ids:
        registration = BrokerRegistration(
            broker_id=broker_id,
            incarnation_id=bytes([1]) + broker_id.to_bytes(15, "big"),
            listeners=(Listener("native", "127.0.0.1", 9000 + broker_id),),
        )
        image = commit(image, register_broker(image, registration))
        image = commit(image, unfence_broker(image, broker_id, image.brokers[broker_id].epoch))
    return image


def with_topic(
    image: MetadataImage, name: str = "t", partitions: int = 1, factor: int = 3
) -> MetadataImage:
    new_topic = NewTopic(
        name=name,
        partitions=partitions,
        replication_factor=factor,
        topic_id=b"\xff" + (len(image.topics) + 1).to_bytes(15, "big"),
    )
    return commit(image, create_topic(image, new_topic))


def fenced(image: MetadataImage, broker_id: int) -> MetadataImage:
    return commit(image, fence_broker(image, broker_id, image.brokers[broker_id].epoch))


def unfenced(image: MetadataImage, broker_id: int) -> MetadataImage:
    return commit(image, unfence_broker(image, broker_id, image.brokers[broker_id].epoch))
