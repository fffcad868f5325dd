"""The topics this broker hosts: their partition logs, their configs, their metadata file.

Theory of operation. Topic metadata (name, partition count, config overrides) lives in
``<data_dir>/topics.json``, replaced atomically (write temp, fsync, rename, fsync dir) on
every change; it is the single-node stand-in for the metadata log that the controller
quorum will own. Each partition's records live in ``<data_dir>/<topic>-<partition>/``.

Creation writes the partition directories first and the metadata last, so a crash in
between leaves stray directories (reported at start, never served) rather than a topic
without logs. Deletion removes the topic from the metadata first, then renames its
directories to ``*.<id>-delete`` and removes them in a worker thread; leftovers of a crash
are removed at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import uuid
from dataclasses import dataclass

import trio

from broker.event_log import log_event
from broker.wall_clock import now_ms
from broker.limits import Limits
from broker.storage import FsyncRunner, LogConfig, PartitionLog, StorageError
from broker.storage.checkpoint import write_atomically
from protocol import DwalError, ErrorCode, validate_topic_name

logger = logging.getLogger("dwal.topics")

METADATA_FILE = "topics.json"
DELETE_SUFFIX = "-delete"


@dataclass(frozen=True)
class TopicMetadata:
    name: str
    partitions: int
    configs: dict[str, str]


class TopicRegistry:
    """Owns every PartitionLog of the broker. Create with `open`, end with `close`."""

    def __init__(self, data_dir: pathlib.Path, defaults: LogConfig, limits: Limits) -> None:
        self.data_dir = data_dir
        self.defaults = defaults
        self.limits = limits
        self.topics: dict[str, TopicMetadata] = {}
        self.logs: dict[tuple[str, int], PartitionLog] = {}
        self._metadata_lock = trio.Lock()
        self._flushed_at: dict[tuple[str, int], tuple[float, int]] = {}
        # group-commit fsyncs of every log run here once the broker starts it
        self.fsync_runner = FsyncRunner()

    # -- life cycle -------------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: pathlib.Path, defaults: LogConfig, limits: Limits) -> "TopicRegistry":
        """Load metadata and open (recovering) every partition log. Blocking."""
        registry = cls(data_dir, defaults, limits)
        data_dir.mkdir(parents=True, exist_ok=True)
        registry._remove_deleted_leftovers()
        registry.topics = registry._read_metadata()
        for topic in registry.topics.values():
            config = registry.log_config(topic)
            for partition in range(topic.partitions):
                directory = data_dir / f"{topic.name}-{partition}"
                registry.logs[(topic.name, partition)] = PartitionLog.open(
                    directory, config, now_ms=now_ms(), fsync_runner=registry.fsync_runner
                )
        registry._report_strays()
        log_event(
            logger,
            logging.INFO,
            "topics_loaded",
            topics=len(registry.topics),
            partitions=len(registry.logs),
            recovered_after_crash=sum(log.recovered_after_crash for log in registry.logs.values()),
            data_dir=str(data_dir),
        )
        return registry

    def close(self) -> None:
        """Flush and close every log (blocking)."""
        for log in self.logs.values():
            log.close()
        self.logs.clear()

    def _read_metadata(self) -> dict[str, TopicMetadata]:
        path = self.data_dir / METADATA_FILE
        try:
            raw = json.loads(path.read_text())
            return {
                name: TopicMetadata(name, int(entry["partitions"]), dict(entry.get("configs", {})))
                for name, entry in raw["topics"].items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise StorageError(f"cannot read topic metadata {path}: {error}") from None
        except (LookupError, TypeError, AttributeError) as error:
            raise StorageError(
                f"cannot read topic metadata {path}: bad structure ({error!r})"
            ) from None

    def _encode_metadata(self, topics: dict[str, TopicMetadata]) -> bytes:
        body = {
            "version": 1,
            "topics": {
                t.name: {"partitions": t.partitions, "configs": t.configs} for t in topics.values()
            },
        }
        return json.dumps(body, indent=1, sort_keys=True).encode()

    async def _write_metadata(self, topics: dict[str, TopicMetadata]) -> None:
        data = self._encode_metadata(topics)
        await trio.to_thread.run_sync(write_atomically, self.data_dir / METADATA_FILE, data)

    def _remove_deleted_leftovers(self) -> None:
        for entry in self.data_dir.iterdir():
            if entry.is_dir() and entry.name.endswith(DELETE_SUFFIX):
                shutil.rmtree(entry, ignore_errors=True)

    def _report_strays(self) -> None:
        for entry in self.data_dir.iterdir():
            if not entry.is_dir():
                continue
            topic, _, partition = entry.name.rpartition("-")
            if partition.isdigit() and (topic, int(partition)) not in self.logs:
                log_event(logger, logging.WARNING, "stray_partition_directory", path=str(entry))

    # -- lookups ----------------------------------------------------------------------

    def log_config(self, topic: TopicMetadata) -> LogConfig:
        return LogConfig.from_topic_configs(topic.configs, self.defaults)

    def topic(self, name: str) -> TopicMetadata:
        """Return the topic's metadata; raises DwalError UNKNOWN_TOPIC_OR_PARTITION."""
        topic = self.topics.get(name)
        if topic is None:
            raise DwalError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"unknown topic {name!r}")
        return topic

    def log(self, name: str, partition: int) -> PartitionLog:
        """Return a partition's log; raises DwalError UNKNOWN_TOPIC_OR_PARTITION."""
        log = self.logs.get((name, partition))
        if log is None:
            if name in self.topics:
                raise DwalError(
                    ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                    f"topic {name!r} has no partition {partition}",
                )
            raise DwalError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"unknown topic {name!r}")
        return log

    # -- changes ----------------------------------------------------------------------

    def check_new_topic(
        self, name: str, partitions: int, replication_factor: int, configs: dict[str, str]
    ) -> LogConfig:
        """Validate a creation; returns the topic's LogConfig or raises DwalError."""
        reason = validate_topic_name(name)
        if reason is not None:
            raise DwalError(ErrorCode.INVALID_TOPIC, reason)
        if name in self.topics:
            raise DwalError(ErrorCode.TOPIC_ALREADY_EXISTS, f"topic {name!r} already exists")
        if not 1 <= partitions <= self.limits.partitions_per_topic_max:
            raise DwalError(
                ErrorCode.INVALID_PARTITIONS,
                f"partitions must be between 1 and {self.limits.partitions_per_topic_max}",
            )
        if replication_factor not in (1, -1):
            raise DwalError(
                ErrorCode.INVALID_REPLICATION_FACTOR,
                f"replication factor {replication_factor} is larger than the 1 available broker",
            )
        if len(self.topics) >= self.limits.topics_max:
            raise DwalError(ErrorCode.POLICY_VIOLATION, "the broker hosts the maximum of topics")
        try:
            return LogConfig.from_topic_configs(configs, self.defaults)
        except ValueError as error:
            raise DwalError(ErrorCode.INVALID_CONFIG, str(error)) from None

    async def create_topic(
        self,
        name: str,
        partitions: int,
        replication_factor: int = 1,
        configs: dict[str, str] | None = None,
    ) -> TopicMetadata:
        """Create a topic durably; raises DwalError when it is invalid or exists."""
        configs = dict(configs or {})
        async with self._metadata_lock:
            config = self.check_new_topic(name, partitions, replication_factor, configs)
            topic = TopicMetadata(name, partitions, configs)
            logs = await trio.to_thread.run_sync(self._open_logs, topic, config)
            await self._write_metadata({**self.topics, name: topic})
            self.topics[name] = topic
            for partition, log in enumerate(logs):
                self.logs[(name, partition)] = log
        log_event(logger, logging.INFO, "topic_created", topic=name, partitions=partitions)
        return topic

    def _open_logs(
        self, topic: TopicMetadata, config: LogConfig, first: int = 0
    ) -> list[PartitionLog]:
        return [
            PartitionLog.open(
                self.data_dir / f"{topic.name}-{p}",
                config,
                now_ms=now_ms(),
                fsync_runner=self.fsync_runner,
            )
            for p in range(first, topic.partitions)
        ]

    async def add_partitions(self, name: str, total: int) -> TopicMetadata:
        """Grow a topic to `total` partitions (never shrink: existing keys would move and
        records would be lost). Raises DwalError UNKNOWN_TOPIC_OR_PARTITION or
        INVALID_PARTITIONS."""
        async with self._metadata_lock:
            topic = self.topic(name)
            if not topic.partitions < total <= self.limits.partitions_per_topic_max:
                raise DwalError(
                    ErrorCode.INVALID_PARTITIONS,
                    f"topic {name!r} has {topic.partitions} partitions: the new count must be "
                    f"above that and at most {self.limits.partitions_per_topic_max}",
                )
            grown = TopicMetadata(name, total, topic.configs)
            logs = await trio.to_thread.run_sync(
                self._open_logs, grown, self.log_config(topic), topic.partitions
            )
            await self._write_metadata({**self.topics, name: grown})
            self.topics[name] = grown
            for partition, log in enumerate(logs, start=topic.partitions):
                self.logs[(name, partition)] = log
        log_event(logger, logging.INFO, "topic_partitions_added", topic=name, partitions=total)
        return grown

    async def delete_topic(self, name: str) -> None:
        """Delete a topic and its data; raises DwalError if unknown."""
        async with self._metadata_lock:
            topic = self.topic(name)
            remaining = {k: v for k, v in self.topics.items() if k != name}
            await self._write_metadata(remaining)
            del self.topics[name]
            logs = [self.logs.pop((name, p)) for p in range(topic.partitions)]
        for log in logs:
            log.new_data_event.set()  # long-polling fetches re-check and find the topic gone
        await trio.to_thread.run_sync(self._remove_logs, logs)
        log_event(logger, logging.INFO, "topic_deleted", topic=name)

    def _remove_logs(self, logs: list[PartitionLog]) -> None:
        for log in logs:
            log.close()
            target = log.directory.with_name(
                f"{log.directory.name}.{uuid.uuid4().hex}{DELETE_SUFFIX}"
            )
            os.rename(log.directory, target)
            shutil.rmtree(target, ignore_errors=True)

    async def alter_configs(
        self, name: str, set_configs: dict[str, str], delete: list[str], validate_only: bool = False
    ) -> dict[str, str]:
        """Change a topic's config overrides; returns the new overrides."""
        async with self._metadata_lock:
            topic = self.topic(name)
            configs = {k: v for k, v in topic.configs.items() if k not in delete}
            configs.update(set_configs)
            try:
                config = LogConfig.from_topic_configs(configs, self.defaults)
            except ValueError as error:
                raise DwalError(ErrorCode.INVALID_CONFIG, str(error)) from None
            if validate_only:
                return configs
            updated = TopicMetadata(name, topic.partitions, configs)
            await self._write_metadata({**self.topics, name: updated})
            self.topics[name] = updated
            for partition in range(topic.partitions):
                self.logs[(name, partition)].update_config(config)
        log_event(logger, logging.INFO, "topic_configs_altered", topic=name)
        return configs

    # -- background maintenance -------------------------------------------------------

    async def apply_retention(self) -> int:
        """Roll idle segments and delete expired ones in every log; remove the files of
        deleted segments once their file.delete.delay.ms has passed. Returns segments removed."""
        removed = 0
        now = now_ms()
        for log in list(self.logs.values()):
            log.roll_if_due(now)
            count = log.apply_retention(now)
            if count:
                removed += count
                log_event(
                    logger,
                    logging.INFO,
                    "retention_deleted_segments",
                    partition=log.directory.name,
                    segments=count,
                    log_start_offset=log.log_start_offset,
                )
            await trio.to_thread.run_sync(log.delete_pending_files, now)
        return removed

    async def compact_logs(self) -> int:
        """Compact every log whose cleanup.policy includes compact and that has closed
        segments no compaction has covered yet (`compaction_dirty_bytes > 0`: a segment
        was rolled since the last compaction). One log at a time; a failure is logged and
        the other logs go on. Returns the number of partitions compacted."""
        compacted = 0
        for key, log in list(self.logs.items()):
            if self.logs.get(key) is not log or not log.compaction_dirty_bytes:
                continue  # deleted meanwhile, or nothing new to compact
            try:
                result = await log.compact(now_ms(), keys_max=self.limits.cleaner_keys_max)
            except StorageError as error:
                log_event(
                    logger,
                    logging.WARNING,
                    "log_compaction_failed",
                    partition=log.directory.name,
                    error=str(error),
                )
                continue
            compacted += 1
            log_event(
                logger,
                logging.INFO if result.segments_cleaned else logging.DEBUG,
                "log_compacted",
                partition=log.directory.name,
                segments=result.segments_cleaned,
                records_removed=result.records_removed,
                bytes_before=result.bytes_before,
                bytes_after=result.bytes_after,
            )
        return compacted

    async def flush_due_logs(self) -> None:
        """Flush logs whose periodic flush is due: every `flush.ms` under fsync=interval; and
        every `limits.recovery_point_interval_ms` under the other policies, so the recovery point
        moves on (under `never` this is the only fsync; under `always` appends are already
        durable and this only records it) and a restart rescans little of the log."""
        now = trio.current_time()
        for key, log in list(self.logs.items()):
            end = log.log_end_offset
            last_time, last_end = self._flushed_at.setdefault(key, (now, end))
            if end == last_end and log.durable_offset >= end:
                continue  # nothing new since the last periodic flush
            interval_s = (
                log.config.flush_interval_ms / 1000
                if log.config.fsync == "interval"
                else self.limits.recovery_point_interval_ms / 1000
            )
            if now - last_time >= interval_s:
                self._flushed_at[key] = (now, end)
                await log.flush()
