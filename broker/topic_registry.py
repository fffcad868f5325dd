"""The partition logs this broker holds, kept in line with the metadata image.

Theory of operation. Which topics exist, their partitions, replicas and configs is decided by
the controller quorum and lives in the metadata image; this registry holds this broker's
copies: each partition it is a replica of has a log in ``<data_dir>/<topic>-<partition>/``.
The metadata publisher calls `apply_image` with each new image: logs of new partitions are
created (or opened, recovering what a crash left), logs of removed topics (or of a topic
recreated under the same name: another topic id) and of partitions reassigned away from this
broker are removed, config changes reach the open logs. `topics` mirrors every topic of the
image (name, partition count, configs), local or not.

Each image is compared with the previous one: only topics whose `TopicInfo` or config
changed (images share unchanged ones) are looked at, so applying an image costs little more
than its changes, however many partitions the broker holds.

A partition log that cannot be created or opened is left out (its partition answers
KAFKA_STORAGE_ERROR here), its failure kept in `failed_partitions` with a clear reason, and
tried again with the next image. A directory created by the failed attempt is removed, so a
creation that ran out of descriptors or disk space leaves nothing half-created; a directory
that existed before (data) is never removed.

Deletion renames a topic's directories to ``*.<id>-delete`` and removes them in a worker
thread; leftovers of a crash are removed at the next start. Directories that no image
claims are reported as strays, never served or removed.

Open files. Segment files are opened on demand through the process's descriptor cache
(`broker.storage.file_descriptor_cache`); `flush_due_logs` closes, every
`limits.open_files_idle_ms`, the descriptors unused since its previous pass, so that idle
partitions hold none.

``topics.json`` is the topic list of a single-node data directory from before the metadata
quorum; `read_legacy_topics` reads it so that the node can adopt those topics (see
`broker.cluster_member`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor  # now: importing it later needs a descriptor
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from broker.controller.metadata_image import EMPTY_IMAGE, MetadataImage
from broker.controller.metadata_records import ConfigResourceType
from broker.event_log import log_event
from broker.wall_clock import now_ms
from broker.limits import Limits
from broker.storage import FsyncRunner, LogConfig, PartitionLog, StorageError
from broker.storage.file_descriptor_cache import open_files_limit, process_cache
from protocol import DwalError, ErrorCode

logger = logging.getLogger("dwal.topics")
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")

LEGACY_TOPICS_FILE = "topics.json"
DELETE_SUFFIX = "-delete"
# Logs opened or closed at once (a start, a shutdown, a topic's creation): their fsyncs
# overlap, and one journal commit of the file system serves several.
LOG_THREADS = 8
# Descriptors the registry holds in reserve (on /dev/null) and lets go of to remove what a
# creation that ran out of descriptors made: listing a directory takes descriptors too.
RESERVED_DESCRIPTORS = 4
# Errors that say the machine ran out of something, not that the data is bad.
_EXHAUSTION_ERRNOS = {
    errno.EMFILE: "the broker has too many open files",
    errno.ENFILE: "the system has too many open files",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.ENOMEM: "out of memory",
}


@dataclass(frozen=True)
class TopicMetadata:
    name: str
    partitions: int
    configs: dict[str, str]
    topic_id: bytes = b""
    local_partitions: frozenset[int] = field(default_factory=frozenset)  # replicas held here


class TopicRegistry:
    """Owns every PartitionLog of the broker. Create with `open`, end with `close`."""

    def __init__(self, data_dir: pathlib.Path, defaults: LogConfig, limits: Limits) -> None:
        self.data_dir = data_dir
        self.defaults = defaults
        self.limits = limits
        self.topics: dict[str, TopicMetadata] = {}
        self.logs: dict[tuple[str, int], PartitionLog] = {}
        # Local partitions whose log could not be opened or created, with the reason; tried
        # again with every image.
        self.failed_partitions: dict[tuple[str, int], str] = {}
        self._image = EMPTY_IMAGE  # the last image applied
        self._flushed_at: dict[tuple[str, int], tuple[float, int]] = {}
        self._interval_logs: set[tuple[str, int]] = set()  # under fsync=interval
        self._full_flush_pass_at: float | None = None
        self._idle_files_closed_at: float | None = None
        self._reserved_descriptors: list[int] = []
        # group-commit fsyncs of every log run here once the broker starts it
        self.fsync_runner = FsyncRunner()

    # -- life cycle -------------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: pathlib.Path, defaults: LogConfig, limits: Limits) -> "TopicRegistry":
        """Create the registry of `data_dir` (no log is open until `apply_image`) and remove
        the leftovers of interrupted deletions. Blocking."""
        registry = cls(data_dir, defaults, limits)
        data_dir.mkdir(parents=True, exist_ok=True)
        registry._remove_deleted_leftovers()
        registry._reserve_descriptors()
        return registry

    def report_loaded(self) -> None:
        """Log what the first image opened (and any stray directory), and close the
        descriptors loading left open (the partitions are idle until used). Blocking."""
        process_cache().close_unused()
        self._report_strays()
        log_event(
            logger,
            logging.INFO,
            "topics_loaded",
            topics=len(self.topics),
            partitions=len(self.logs),
            recovered_after_crash=sum(log.recovered_after_crash for log in self.logs.values()),
            data_dir=str(self.data_dir),
        )

    def close(self) -> None:
        """Flush and close every log, LOG_THREADS at a time. Blocking. Raises the first
        StorageError once every log was tried."""
        logs = list(self.logs.values())
        self.logs.clear()
        self._release_descriptors()

        def close_one(log: PartitionLog) -> StorageError | None:
            try:
                log.close()
            except StorageError as error:
                return error
            return None

        failures = [error for error in _in_threads(close_one, logs) if error is not None]
        if failures:
            raise failures[0]

    def _reserve_descriptors(self) -> None:
        while len(self._reserved_descriptors) < RESERVED_DESCRIPTORS:
            try:
                self._reserved_descriptors.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                return  # fewer in reserve; taken again after the next failed creation

    def _release_descriptors(self) -> None:
        for fd in self._reserved_descriptors:
            os.close(fd)
        self._reserved_descriptors.clear()

    # -- following the metadata image -----------------------------------------------------

    async def apply_image(self, image: MetadataImage, node_id: int) -> None:
        """Make the logs match `image`: remove removed topics' logs, open or create the logs
        of the partitions `node_id` holds a replica of, apply config changes. A log that
        cannot be opened is reported, left out (its partition answers KAFKA_STORAGE_ERROR
        here) and kept in `failed_partitions`; the others go on."""
        previous = self._image
        for name, removed in list(self.topics.items()):
            gone = image.topics.get(name)
            if gone is None or gone.topic_id != removed.topic_id:
                await self._remove_topic(name)
        failed_topics = {name for name, _ in self.failed_partitions}
        to_open: list[tuple[str, int, LogConfig]] = []
        for name, info in image.topics.items():
            resource = (ConfigResourceType.TOPIC, name)
            if (
                info is previous.topics.get(name)
                and image.configs.get(resource) is previous.configs.get(resource)
                and name in self.topics
                and name not in failed_topics
            ):
                continue  # unchanged since the previous image
            configs = dict(image.configs.get(resource, {}))
            held = self.topics.get(name)
            local = frozenset(p.partition for p in info.partitions if node_id in p.replicas)
            if (
                held is not None
                and held.configs == configs
                and held.partitions == len(info.partitions)
                and held.local_partitions == local
                and name not in failed_topics
            ):
                continue
            topic = TopicMetadata(name, len(info.partitions), configs, info.topic_id, local)
            config = self.log_config(topic)
            if held is not None and held.configs != configs:
                for partition in held.local_partitions:
                    log = self.logs.get((name, partition))
                    if log is not None:
                        log.update_config(config)
                        self._note_fsync_policy((name, partition), config)
            moved_away = sorted(held.local_partitions - local) if held is not None else []
            if moved_away:  # reassigned to other brokers: this copy is no longer a replica
                await self._remove_partitions(name, moved_away)
            to_open.extend((name, p, config) for p in sorted(local) if (name, p) not in self.logs)
            self.topics[name] = topic
        if to_open:
            opened = await trio.to_thread.run_sync(self._open_logs, to_open)
            for (name, partition, config), log in zip(to_open, opened):
                if log is not None:
                    self.logs[(name, partition)] = log
                    self._note_fsync_policy((name, partition), config)
        self._image = image

    def _note_fsync_policy(self, key: tuple[str, int], config: LogConfig) -> None:
        if config.fsync == "interval":
            self._interval_logs.add(key)

    def _open_logs(self, logs: list[tuple[str, int, LogConfig]]) -> list[PartitionLog | None]:
        """Open or create each (topic, partition, config)'s log, LOG_THREADS at a time;
        record and report those that fail (None), removing what a failed creation made.
        Blocking."""

        def open_one(
            entry: tuple[str, int, LogConfig],
        ) -> tuple[bool, PartitionLog | OSError | StorageError]:
            name, partition, config = entry
            directory = self.data_dir / f"{name}-{partition}"
            existed = directory.exists()
            try:
                log = PartitionLog.open(
                    directory, config, now_ms=now_ms(), fsync_runner=self.fsync_runner
                )
            except (OSError, StorageError) as error:
                return existed, error
            return existed, log

        opened: list[PartitionLog | None] = []
        for (name, partition, _), (existed, outcome) in zip(logs, _in_threads(open_one, logs)):
            if isinstance(outcome, PartitionLog):
                self.failed_partitions.pop((name, partition), None)
                opened.append(outcome)
            else:
                directory = self.data_dir / f"{name}-{partition}"
                self._open_failed(name, partition, directory, existed, outcome)
                opened.append(None)
        return opened

    def _open_failed(
        self,
        name: str,
        partition: int,
        directory: pathlib.Path,
        existed: bool,
        error: OSError | StorageError,
    ) -> None:
        reason = failure_reason(error)
        removed = False
        if not existed:  # a creation: leave nothing half-made behind
            self._release_descriptors()  # out of descriptors, rmtree could not list it
            try:
                shutil.rmtree(directory, ignore_errors=True)
            finally:
                self._reserve_descriptors()
            removed = not directory.exists()
        self.failed_partitions[(name, partition)] = reason
        log_event(
            logger,
            logging.ERROR,
            "partition_create_failed" if not existed else "partition_open_failed",
            partition=f"{name}-{partition}",
            path=str(directory),
            reason=reason,
            directory_removed=removed,
        )

    async def _remove_topic(self, name: str) -> None:
        topic = self.topics.pop(name)
        for key in [key for key in self.failed_partitions if key[0] == name]:
            del self.failed_partitions[key]
        logs = [log for p in topic.local_partitions if (log := self.logs.pop((name, p), None))]
        for partition in topic.local_partitions:
            self._flushed_at.pop((name, partition), None)
            self._interval_logs.discard((name, partition))
        for log in logs:
            log.new_data_event.set()  # long-polling fetches re-check and find the topic gone
        await trio.to_thread.run_sync(self._remove_logs, logs)
        log_event(logger, logging.INFO, "topic_logs_removed", topic=name, partitions=len(logs))

    async def _remove_partitions(self, name: str, partitions: list[int]) -> None:
        logs = [log for p in partitions if (log := self.logs.pop((name, p), None))]
        for log in logs:
            log.new_data_event.set()  # long-polling fetches re-check and find it gone
        await trio.to_thread.run_sync(self._remove_logs, logs)
        log_event(
            logger,
            logging.INFO,
            "partition_logs_removed",
            topic=name,
            partitions=",".join(map(str, partitions)),
        )

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
        """The topic's LogConfig. Overrides are checked before the controller accepts
        them; one that still does not parse (a newer broker's setting) is reported and the
        broker defaults apply."""
        try:
            return LogConfig.from_topic_configs(topic.configs, self.defaults)
        except ValueError as error:
            log_event(
                logger, logging.ERROR, "topic_config_invalid", topic=topic.name, error=str(error)
            )
            return self.defaults

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

    def _remove_logs(self, logs: list[PartitionLog]) -> None:
        for log in logs:
            log.close()
            target = log.directory.with_name(
                f"{log.directory.name}.{uuid.uuid4().hex}{DELETE_SUFFIX}"
            )
            os.rename(log.directory, target)
            shutil.rmtree(target, ignore_errors=True)

    # -- background maintenance -------------------------------------------------------

    async def apply_retention(self) -> int:
        """Roll idle segments, forget expired idempotent producers and delete expired
        segments in every log; remove the files of deleted segments once their
        file.delete.delay.ms has passed. Returns segments removed."""
        removed = 0
        now = now_ms()
        for log in list(self.logs.values()):
            log.roll_if_due(now)
            log.expire_producers(now)  # idempotent producers idle for producer.id.expiration
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
        durable and this only records it) and a restart rescans little of the log. Also
        closes the file descriptors unused for `limits.open_files_idle_ms` (see the module's
        theory)."""
        now = trio.current_time()
        self._close_idle_files(now)
        # Every log under fsync=interval on each call; the others (a flush every
        # recovery_point_interval_ms) in a pass over every log at a tenth of that interval,
        # so that a broker of many partitions does not look at each of them every 50 ms.
        full_pass_s = self.limits.recovery_point_interval_ms / 10_000
        if self._full_flush_pass_at is None or now - self._full_flush_pass_at >= full_pass_s:
            self._full_flush_pass_at = now
            keys = list(self.logs)
            self._interval_logs = {
                key for key, log in self.logs.items() if log.config.fsync == "interval"
            }
        else:
            keys = list(self._interval_logs)
        for key in keys:
            log = self.logs.get(key)
            if log is None:
                continue  # removed meanwhile
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

    def _close_idle_files(self, now: float) -> None:
        """Every `limits.open_files_idle_ms`, close the cached descriptors unused since the
        previous pass (so each closes after one to two intervals unused). Closing never
        waits for the disk (no fsync), so it runs here, on the event loop."""
        last = self._idle_files_closed_at
        if last is None:
            self._idle_files_closed_at = now
            return
        if now - last < self.limits.open_files_idle_ms / 1000:
            return
        self._idle_files_closed_at = now
        closed = process_cache().close_idle()
        if closed:
            log_event(logger, logging.DEBUG, "idle_files_closed", descriptors=closed)


def _in_threads(function: Callable[[_Item], _Result], items: list[_Item]) -> list[_Result]:
    """`[function(item) for item in items]`, run by LOG_THREADS threads (joined before
    returning), so that the fsyncs of many logs opened or closed at once overlap."""
    if len(items) <= 1:
        return [function(item) for item in items]
    workers = min(LOG_THREADS, len(items))
    with ThreadPoolExecutor(workers, thread_name_prefix="dwal-logs") as pool:
        return list(pool.map(function, items))


def failure_reason(error: BaseException) -> str:
    """Why opening or creating a log failed, in words an operator can act on: running out
    of descriptors or disk space is named as such (with the open-file limit), anything
    else is the error's own message."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno in _EXHAUSTION_ERRNOS:
        reason = _EXHAUSTION_ERRNOS[cause.errno]
        if cause.errno in (errno.EMFILE, errno.ENFILE):
            cache = process_cache()
            reason += (
                f" (open-file limit {open_files_limit()}, of which {cache.capacity} for "
                "segment files: raise `ulimit -n` or lower open_files_cached_max)"
            )
        return f"{reason}: {error}"
    return str(error)


def read_legacy_topics(data_dir: pathlib.Path) -> dict[str, TopicMetadata] | None:
    """The topics of a pre-quorum single-node data directory (``topics.json``), or None
    when there is no such file. Raises StorageError for a file that does not parse."""
    path = data_dir / LEGACY_TOPICS_FILE
    try:
        raw = json.loads(path.read_text())
        return {
            name: TopicMetadata(name, int(entry["partitions"]), dict(entry.get("configs", {})))
            for name, entry in raw["topics"].items()
        }
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise StorageError(f"cannot read topic metadata {path}: {error}") from None
    except (LookupError, TypeError, AttributeError) as error:
        raise StorageError(
            f"cannot read topic metadata {path}: bad structure ({error!r})"
        ) from None
