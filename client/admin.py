"""Administration: topics and their configs."""

from __future__ import annotations

from dataclasses import dataclass

from client.cluster import Cluster
from protocol import ApiKey, DwalError, ErrorCode


@dataclass(frozen=True)
class PartitionDescription:
    partition: int
    leader: int
    leader_epoch: int
    log_start_offset: int
    high_watermark: int
    log_end_offset: int
    size_bytes: int
    segments: int


@dataclass(frozen=True)
class TopicDescription:
    name: str
    partitions: tuple[PartitionDescription, ...]
    configs: dict[str, str]


class Admin:
    """Create, list, describe, alter and delete topics. Every method raises DwalError with
    the broker's error code and message when the broker refuses."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        replication_factor: int = 1,
        configs: dict[str, str] | None = None,
        validate_only: bool = False,
    ) -> None:
        response = await self.cluster.call(
            ApiKey.CREATE_TOPICS,
            {
                "topics": [
                    {
                        "topic": name,
                        "partitions": partitions,
                        "replication_factor": replication_factor,
                        "configs": dict(configs or {}),
                    }
                ],
                "validate_only": validate_only,
            },
        )
        _raise_topic_errors(response.body["topics"])
        self.cluster.invalidate(name)

    async def delete_topic(self, name: str) -> None:
        response = await self.cluster.call(ApiKey.DELETE_TOPICS, {"topics": [name]})
        self.cluster.invalidate(name)
        _raise_topic_errors(response.body["topics"])

    async def list_topics(self) -> list[str]:
        response = await self.cluster.call(ApiKey.METADATA, {"topics": None})
        return sorted(t["topic"] for t in response.body["topics"])

    async def describe_topic(self, name: str) -> TopicDescription:
        return (await self.describe_topics([name]))[0]

    async def describe_topics(self, names: list[str] | None = None) -> list[TopicDescription]:
        response = await self.cluster.call(ApiKey.DESCRIBE_TOPICS, {"topics": names})
        out = []
        for entry in response.body["topics"]:
            if entry["error_code"]:
                raise DwalError(ErrorCode(entry["error_code"]), entry["error_message"])
            partitions = tuple(PartitionDescription(**p) for p in entry["partitions"])
            out.append(TopicDescription(entry["topic"], partitions, entry["configs"]))
        return out

    async def alter_configs(
        self,
        name: str,
        *,
        set: dict[str, str] | None = None,
        delete: list[str] | None = None,
        validate_only: bool = False,
    ) -> dict[str, str]:
        """Set and remove config overrides of a topic; returns the topic's overrides."""
        response = await self.cluster.call(
            ApiKey.ALTER_CONFIGS,
            {
                "topic": name,
                "set": dict(set or {}),
                "delete": list(delete or []),
                "validate_only": validate_only,
            },
        )
        return response.body["configs"]


def _raise_topic_errors(results: list[dict]) -> None:
    for result in results:
        if result["error_code"]:
            raise DwalError(ErrorCode(result["error_code"]), result["error_message"])
