"""The replica layer: the one write path, and this broker's part in replicating partitions.

Every append (Produce, the group coordinator, the gateways) and every read by a consumer
goes through `ReplicaManager`, which checks in the published metadata image that this
broker leads the partition and stamps the leader epoch into each batch. Leadership answers,
as Kafka gives them: an unknown topic or partition number -> UNKNOWN_TOPIC_OR_PARTITION; a
partition with no leader -> LEADER_NOT_AVAILABLE; another broker leads ->
NOT_LEADER_OR_FOLLOWER (retriable: the client refreshes its metadata).

Theory of operation. `apply_image` (a publisher listener, after the registry opened the
logs) makes this broker the leader or a follower of each partition it holds a replica of:

- Leader (in a leader epoch): the log's high watermark becomes replica-managed, and a
  `PartitionReplicas` (sans-I/O) tracks the followers. The HW is the minimum, over the
  maximal ISR, of what each member acknowledged: the leader its durable offset under
  fsync=always and its log end otherwise (recomputed after each append, and by a task that
  follows the log's `progress_event` for fsyncs), a follower its fetch offset. Followers'
  fetches reach `follower_fetch`. A task checks every second whether the ISR should
  shrink (a follower behind for `replica.lag.time.max.ms`) or expand (one caught up), and
  sends one AlterPartition at a time through the controller; the change counts once the
  image shows it. acks=all writes wait until the HW passes them (`wait_replicated`).
- Follower: the partition is handed to the `ReplicaFetcher` of its leader (one per leader
  broker), which copies batches, truncates a diverging log, starts a log that ends below
  the leader's log start again there (the leader answers such a fetch OFFSET_OUT_OF_RANGE
  with its log start), and sets the HW the leader says.

With one replica (a single node, or replication factor 1) the leader is its whole ISR and
the HW is its own acknowledged offset, which is what the log alone used to compute: the
same code path.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from broker.answers import error_of, wait_any
from broker.broker_lifecycle import NATIVE_LISTENER
from broker.controller.metadata_image import MetadataImage, PartitionInfo
from broker.controller.metadata_records import NO_LEADER, ConfigResourceType
from broker.event_log import log_event
from broker.replication.broker_link import BrokerLink, FetchLink
from broker.replication.partition_replicas import PartitionReplicas
from broker.replication.replica_fetcher import ReplicaFetcher
from broker.storage import AppendInfo, FetchSlice, ReplicaLog, StorageError
from broker.storage.file_descriptor_cache import process_cache
from broker.topic_registry import TopicRegistry
from protocol import ACKS_ALL, DwalError, ErrorCode

logger = logging.getLogger("dwal.replication")

TopicPartition = tuple[str, int]
# (leader id, its address) -> the link a fetcher sends its fetches over
LinkFactory = Callable[[int, tuple[str, int]], FetchLink]
ISR_CHECK_INTERVAL_SECONDS = 1.0
REPLICA_LAG_TIME_MAX_MS = 10_000  # Kafka's replica.lag.time.max.ms default
FETCH_BYTES_MAX = 8 * 1024 * 1024  # a follower's fetch: the bytes in flight per leader
PARTITION_FETCH_BYTES_MAX = 2 * 1024 * 1024


def _now_ms() -> int:
    return int(trio.current_time() * 1000)


def _manage_high_watermark(log: ReplicaLog) -> None:
    """Hand the log's high watermark to the replica layer. The first time after opening, it
    restarts from its checkpoint, or from the log start when there is none (a broker killed
    before its first checkpoint): never from the log end, since a follower must not pretend
    its whole log is committed - it could then not truncate a tail the new leader lacks, and
    would stay out of the ISR for good (found by the nemesis). A leader recomputes its HW from
    its ISR at once (alone: its own acknowledged offset), so a single node loses nothing."""
    if not log.high_watermark_managed_externally:
        restored = log.restored_high_watermark
        log.manage_high_watermark_externally(
            high_watermark=log.log_start_offset if restored is None else restored
        )


@dataclass(eq=False)
class _Leading:
    """A partition this broker leads, in one leader epoch."""

    topic: str
    partition: int
    log: ReplicaLog
    replicas: PartitionReplicas
    hw_changed: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    gone: bool = False  # leadership lost: waiters answer NOT_LEADER_OR_FOLLOWER

    @property
    def leader_epoch(self) -> int:
        return self.replicas.leader_epoch

    def wake(self) -> None:
        self.hw_changed.set()
        self.hw_changed = trio.Event()


@dataclass(eq=False)
class _Follower:
    fetcher: ReplicaFetcher
    address: tuple[str, int]
    scope: trio.CancelScope


class ReplicaManager:
    def __init__(
        self,
        node_id: int,
        registry: TopicRegistry,
        image: Callable[[], MetadataImage],
        *,
        broker_epoch: Callable[[], int] = lambda: -1,
        alter_partition: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
        frame_bytes_max: int = 64 * 1024 * 1024,
        replica_lag_time_max_ms: int = REPLICA_LAG_TIME_MAX_MS,
        peer_addresses: dict[int, tuple[str, int]] | None = None,
        link_factory: LinkFactory | None = None,
    ) -> None:
        """`image` returns the published image (whose logs the registry has opened);
        `alter_partition` sends an AlterPartition body to the controller; `link_factory`
        makes a fetcher's link to a leader (default: a `BrokerLink` to its native port; the
        cluster simulation passes links over its in-memory network)."""
        self.node_id = node_id
        self.registry = registry
        self.image = image
        self.broker_epoch = broker_epoch
        self.alter_partition = alter_partition
        self.frame_bytes_max = frame_bytes_max
        self.replica_lag_time_max_ms = replica_lag_time_max_ms
        self.peer_addresses = peer_addresses or {}  # overrides of registered listeners
        self.link_factory = link_factory or self._broker_link
        self._leading: dict[TopicPartition, _Leading] = {}
        # the log each local partition was last led or followed with (see apply_image)
        self._applied_logs: dict[TopicPartition, ReplicaLog] = {}
        self._followed: dict[TopicPartition, int] = {}  # partition -> leader it follows
        self._fetchers: dict[int, _Follower] = {}
        self._nursery: trio.Nursery | None = None
        self._draining = False  # stopping: appends are refused

    # -- leadership ------------------------------------------------------------------------

    def leader_epoch(self, topic: str, partition: int) -> int:
        """The leader epoch this broker leads the partition in; raises DwalError
        UNKNOWN_TOPIC_OR_PARTITION, LEADER_NOT_AVAILABLE or NOT_LEADER_OR_FOLLOWER."""
        state = self._partition_state(topic, partition)
        if state.leader == NO_LEADER:
            raise DwalError(
                ErrorCode.LEADER_NOT_AVAILABLE,
                f"{topic}-{partition} has no leader (its replicas {list(state.replicas)} are "
                "unavailable)",
            )
        if state.leader != self.node_id:
            raise DwalError(
                ErrorCode.NOT_LEADER_OR_FOLLOWER,
                f"broker {self.node_id} does not lead {topic}-{partition}; broker "
                f"{state.leader} does (leader epoch {state.leader_epoch})",
            )
        return state.leader_epoch

    def _partition_state(self, topic: str, partition: int) -> PartitionInfo:
        info = self.image().topics.get(topic)
        if info is None:
            raise DwalError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"unknown topic {topic!r}")
        if not 0 <= partition < len(info.partitions):
            raise DwalError(
                ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                f"topic {topic!r} has no partition {partition}",
            )
        return info.partitions[partition]

    def leader_log(
        self, topic: str, partition: int, *, current_leader_epoch: int = -1
    ) -> tuple[ReplicaLog, int]:
        """The log of a partition this broker leads, and the leader epoch; raises DwalError
        as `leader_epoch` does, or KAFKA_STORAGE_ERROR when its log could not be opened.
        With `current_leader_epoch` (a client's, >= 0) that differs from this broker's:
        FENCED_LEADER_EPOCH when the client's is older (its metadata is behind),
        UNKNOWN_LEADER_EPOCH when it is newer (this broker has not yet learned that it lost
        the leadership: its log may lack what the client read from the new leader)."""
        epoch = self.leader_epoch(topic, partition)
        if current_leader_epoch >= 0 and current_leader_epoch != epoch:
            code = (
                ErrorCode.FENCED_LEADER_EPOCH
                if current_leader_epoch < epoch
                else ErrorCode.UNKNOWN_LEADER_EPOCH
            )
            raise DwalError(
                code,
                f"{topic}-{partition} is in leader epoch {epoch} on broker {self.node_id}, "
                f"not {current_leader_epoch}",
            )
        log = self.registry.logs.get((topic, partition))
        if log is None:
            raise DwalError(
                ErrorCode.KAFKA_STORAGE_ERROR,
                f"the log of {topic}-{partition} is not available on broker {self.node_id}",
            )
        return log, epoch

    # -- the write path --------------------------------------------------------------------

    def check_acks(self, topic: str, partition: int, acks: int) -> None:
        """Refuse an acks=all write while the ISR is smaller than min.insync.replicas
        (NOT_ENOUGH_REPLICAS), before anything is appended; raises as `leader_log` does."""
        log, _ = self.leader_log(topic, partition)
        leading = self._leading.get((topic, partition))
        if acks == ACKS_ALL and leading is not None:
            code = leading.replicas.check_append(acks, log.config.min_insync_replicas)
            if code is not None:
                raise DwalError(
                    code,
                    f"{topic}-{partition} has {len(leading.replicas.isr)} in-sync replicas "
                    f"{list(leading.replicas.isr)}, below min.insync.replicas="
                    f"{log.config.min_insync_replicas}",
                )

    def isr_size(self, topic: str, partition: int) -> int:
        """The committed ISR's size of a partition this broker leads (1 when unknown)."""
        leading = self._leading.get((topic, partition))
        return 1 if leading is None else len(leading.replicas.isr)

    def append(
        self, topic: str, partition: int, batches: bytearray | memoryview, *, now_ms: int
    ) -> tuple[ReplicaLog, AppendInfo]:
        """Append record batches to a partition this broker leads, stamped with its leader
        epoch. Raises DwalError (leadership) and what PartitionLog.append raises."""
        log, epoch = self.leader_log(topic, partition)
        if self._draining:
            raise DwalError(
                ErrorCode.NOT_LEADER_OR_FOLLOWER,
                f"broker {self.node_id} is stopping: {topic}-{partition} moves to another leader",
            )
        info = log.append(batches, now_ms=now_ms, leader_epoch=epoch)
        leading = self._leading.get((topic, partition))
        if leading is not None and leading.log is log:
            self._leader_progress(leading)
        return log, info

    async def drain(self) -> None:
        """Before a controlled shutdown: refuse every new append (NOT_LEADER_OR_FOLLOWER,
        before anything is written, so clients resend it to the next leader) and return once
        every partition led here has its high watermark at its log end: the writes already
        appended are then answered as replicated instead of losing their leader halfway
        (an outcome the client cannot know). Safe to cancel (the caller bounds it)."""
        self._draining = True
        for leading in list(self._leading.values()):
            while not leading.gone and leading.log.high_watermark < leading.log.log_end_offset:
                await leading.hw_changed.wait()

    async def wait_replicated(self, topic: str, partition: int, end_offset: int) -> None:
        """Return once the HW of a partition this broker leads has passed `end_offset` (the
        last appended offset + 1) with enough in-sync replicas. Raises DwalError
        NOT_ENOUGH_REPLICAS_AFTER_APPEND (the ISR shrank below min.insync.replicas
        meanwhile) or NOT_LEADER_OR_FOLLOWER (leadership lost: the outcome is unknown).
        Safe to cancel."""
        leading = self._leading.get((topic, partition))
        if leading is None:
            raise DwalError(
                ErrorCode.NOT_LEADER_OR_FOLLOWER,
                f"broker {self.node_id} no longer leads {topic}-{partition}",
            )
        min_isr = leading.log.config.min_insync_replicas
        while True:
            if leading.gone:
                raise DwalError(
                    ErrorCode.NOT_LEADER_OR_FOLLOWER,
                    f"broker {self.node_id} lost the leadership of {topic}-{partition} while "
                    "the write was being replicated: it may or may not be kept",
                )
            result = leading.replicas.acks_all_result(end_offset, min_isr)
            if result == ErrorCode.NONE:
                return
            if result is not None:
                raise DwalError(
                    result,
                    f"{topic}-{partition}: written, but the ISR "
                    f"{list(leading.replicas.maximal_isr)} is below "
                    f"min.insync.replicas={min_isr}",
                )
            await leading.hw_changed.wait()

    def _acknowledged(self, log: ReplicaLog) -> int:
        return log.durable_offset if log.config.fsync == "always" else log.log_end_offset

    def _leader_progress(self, leading: _Leading) -> None:
        log = leading.log
        moved = leading.replicas.leader_progress(log.log_end_offset, self._acknowledged(log))
        self._publish_hw(leading, moved)

    def _publish_hw(self, leading: _Leading, moved: int | None) -> None:
        if moved is not None:
            leading.log.set_high_watermark(moved)
            leading.wake()

    # -- followers' fetches (on the leader) ----------------------------------------------------

    def follower_fetch(
        self,
        topic: str,
        partition: int,
        *,
        replica_id: int,
        broker_epoch: int,
        fetch_offset: int,
        current_leader_epoch: int,
        last_fetched_epoch: int,
        max_bytes: int,
    ) -> tuple[dict[str, Any], FetchSlice | None]:
        """Serve one partition of a follower's fetch: (the answer's fields, the slice to
        send or None). The fields hold a diverging epoch when the follower's log diverged,
        and error_code OFFSET_OUT_OF_RANGE with this log's `log_start_offset` when the
        fetch offset is below it (retention deleted those records here: the follower starts
        its log again there); neither counts toward the HW. Raises DwalError for a
        partition this broker does not lead in that epoch (FENCED_LEADER_EPOCH: the
        follower is behind; UNKNOWN_LEADER_EPOCH: this broker is)."""
        log, epoch = self.leader_log(topic, partition)
        broker = self.image().brokers.get(replica_id)
        if broker is None or broker.epoch != broker_epoch:
            # only a registered broker, in its current incarnation, counts toward the HW
            raise DwalError(
                ErrorCode.STALE_BROKER_EPOCH,
                f"replica {replica_id} with broker epoch {broker_epoch} is not a registered "
                "broker's current incarnation",
            )
        if current_leader_epoch >= 0 and current_leader_epoch != epoch:
            code = (
                ErrorCode.FENCED_LEADER_EPOCH
                if current_leader_epoch < epoch
                else ErrorCode.UNKNOWN_LEADER_EPOCH
            )
            raise DwalError(
                code, f"{topic}-{partition} is in leader epoch {epoch}, not {current_leader_epoch}"
            )
        leading = self._leading.get((topic, partition))
        if leading is None:
            raise DwalError(
                ErrorCode.NOT_LEADER_OR_FOLLOWER, f"{topic}-{partition} is becoming led here"
            )
        fields: dict[str, Any] = {"leader_id": self.node_id, "leader_epoch": epoch}
        if fetch_offset < log.log_start_offset:
            # Whatever the epochs say (as Kafka): the follower has nothing this log still has.
            fields.update(
                error_code=int(ErrorCode.OFFSET_OUT_OF_RANGE),
                error_message=(
                    f"fetch offset {fetch_offset} of broker {replica_id} is below the log "
                    f"start {log.log_start_offset} of {topic}-{partition}"
                ),
                log_start_offset=log.log_start_offset,
                high_watermark=log.high_watermark,
            )
            return fields, None
        if last_fetched_epoch >= 0:
            known_epoch, end = log.end_offset_for_leader_epoch(last_fetched_epoch)
            if known_epoch < last_fetched_epoch or end < fetch_offset:
                fields["diverging_epoch"] = {"epoch": known_epoch, "end_offset": end}
                fields["high_watermark"] = log.high_watermark
                return fields, None
        if fetch_offset > log.log_end_offset:
            # ahead without epochs to tell where it diverged: back to this log's end
            fields["diverging_epoch"] = {
                "epoch": log.latest_leader_epoch,
                "end_offset": log.log_end_offset,
            }
            fields["high_watermark"] = log.high_watermark
            return fields, None
        moved = leading.replicas.follower_fetched(replica_id, fetch_offset, _now_ms())
        self._publish_hw(leading, moved)
        fields["high_watermark"] = log.high_watermark
        fields["log_start_offset"] = log.log_start_offset
        piece = log.read(fetch_offset, max_bytes, up_to="log_end") if max_bytes > 0 else None
        return fields, piece

    async def serve_replica_fetch(
        self, body: dict[str, Any], *, max_bytes: int, max_wait_ms: int
    ) -> tuple[dict[str, Any], list[FetchSlice]]:
        """Answer a follower's Fetch (`replica_id` >= 0): each partition's batches from its
        fetch offset up to the log end, or why not (a diverging epoch, a fenced or unknown
        leader epoch, ...). Long-polls until `min_bytes` are there, a partition needs an
        answer at once (an error, a diverging epoch) or `max_wait_ms` passed. Returns the
        answer's body and its slices, in the order of the body's partitions (the caller
        closes them)."""
        deadline = trio.current_time() + max_wait_ms / 1000
        while True:
            events = []
            for entry in body["topics"]:
                for part in entry["partitions"]:
                    log = self.registry.logs.get((entry["topic"], part["partition"]))
                    if log is not None:
                        events.append(log.progress_event)  # the log end moving
            answer, parts, total, failed = self._read_for_follower(body, max_bytes)
            if total >= body["min_bytes"] or failed or trio.current_time() >= deadline:
                return answer, parts
            for piece in parts:
                piece.close()
            with trio.move_on_at(deadline):
                await wait_any(events)

    def _read_for_follower(
        self, body: dict[str, Any], max_bytes: int
    ) -> tuple[dict[str, Any], list[FetchSlice], int, bool]:
        answer: dict[str, Any] = {"topics": []}
        parts: list[FetchSlice] = []
        total = 0
        failed = False
        for entry in body["topics"]:
            results: list[dict[str, Any]] = []
            answer["topics"].append({"topic": entry["topic"], "partitions": results})
            for part in entry["partitions"]:
                result: dict[str, Any] = {"partition": part["partition"], "error_code": 0}
                results.append(result)
                budget = max(min(part["max_bytes"], max_bytes - total), 0)
                if total > 0 and not process_cache().may_borrow():
                    budget = 0  # out of descriptors for slices: the next fetch reads on
                try:
                    fields, piece = self.follower_fetch(
                        entry["topic"],
                        part["partition"],
                        replica_id=body["replica_id"],
                        broker_epoch=body["broker_epoch"],
                        fetch_offset=part["fetch_offset"],
                        current_leader_epoch=part["current_leader_epoch"],
                        last_fetched_epoch=part["last_fetched_epoch"],
                        max_bytes=budget,
                    )
                except Exception as error:
                    code, message = error_of(error)
                    result.update(error_code=int(code), error_message=message, size=0)
                    failed = True
                    continue
                result.update(fields, size=0)
                if "diverging_epoch" in fields or result["error_code"]:
                    failed = True  # answer at once: the follower must truncate first
                if piece is not None and piece.length:
                    parts.append(piece)
                    result["size"] = piece.length
                    total += piece.length
                elif piece is not None:
                    piece.close()
        return answer, parts, total, failed

    # -- following the image ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the fetchers, the leaders' progress tasks and the ISR checks until
        cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._check_isrs)
            task_status.started()
            await trio.sleep_forever()

    async def apply_image(self, previous: MetadataImage, image: MetadataImage) -> None:
        """Lead or follow each local partition as `image` says (a publisher listener, after
        the registry's)."""
        await trio.lowlevel.checkpoint()
        local = set()
        brokers_unchanged = image.brokers is previous.brokers
        for (topic, partition), log in list(self.registry.logs.items()):
            resource = (ConfigResourceType.TOPIC, topic)
            if (
                brokers_unchanged
                and self._applied_logs.get((topic, partition)) is log
                and image.topics.get(topic) is previous.topics.get(topic)
                and image.configs.get(resource) is previous.configs.get(resource)
            ):
                # Nothing it depends on changed (images share what did not change): at
                # 50,000 partitions, looking at each one per image was most of the cost.
                local.add((topic, partition))
                continue
            state = image.partition(topic, partition)
            if state is None:
                continue
            local.add((topic, partition))
            self._applied_logs[(topic, partition)] = log
            if state.leader == self.node_id:
                self._lead(topic, partition, log, state)
            else:
                self._follow(topic, partition, log, state, image)
        for tp in [tp for tp in self._applied_logs if tp not in local]:
            del self._applied_logs[tp]
        for tp in [tp for tp in self._leading if tp not in local]:
            self._stop_leading(tp)
        for tp in [tp for tp in self._followed if tp not in local]:
            self._stop_following(tp)

    def _lead(self, topic: str, partition: int, log: ReplicaLog, state: PartitionInfo) -> None:
        tp = (topic, partition)
        leading = self._leading.get(tp)
        if (
            leading is not None
            and leading.log is log
            and leading.leader_epoch == state.leader_epoch
        ):
            if state.partition_epoch > leading.replicas.partition_epoch:
                moved = leading.replicas.isr_change_committed(
                    state.isr, state.partition_epoch, replicas=state.replicas, now_ms=_now_ms()
                )
                self._publish_hw(leading, moved)
                self._protect_sole_copy(leading)
            self._leader_progress(leading)  # a config change (fsync policy) may move it
            return
        self._stop_leading(tp)
        self._stop_following(tp)
        _manage_high_watermark(log)
        replicas = PartitionReplicas(
            leader_id=self.node_id,
            leader_epoch=state.leader_epoch,
            partition_epoch=state.partition_epoch,
            replicas=state.replicas,
            isr=state.isr,
            log_end_offset=log.log_end_offset,
            high_watermark=log.high_watermark,
            leader_epoch_start_offset=log.log_end_offset,
            now_ms=_now_ms(),
            acknowledged_offset=self._acknowledged(log),
            replica_lag_time_max_ms=self.replica_lag_time_max_ms,
        )
        leading = _Leading(topic, partition, log, replicas)
        self._leading[tp] = leading
        log.set_high_watermark(replicas.high_watermark)
        if self._nursery is not None:
            self._nursery.start_soon(self._follow_progress, leading)
        self._protect_sole_copy(leading)
        log_event(
            logger,
            logging.INFO,
            "partition_led",
            partition=f"{topic}-{partition}",
            leader_epoch=state.leader_epoch,
            isr=",".join(map(str, state.isr)),
        )

    def _stop_leading(self, tp: TopicPartition) -> None:
        leading = self._leading.pop(tp, None)
        if leading is not None:
            leading.gone = True
            leading.scope.cancel()
            leading.wake()

    def _protect_sole_copy(self, leading: _Leading) -> None:
        """When the ISR is the leader alone, fsync its log now: every committed record may
        be in its page cache only (under fsync=interval or never the followers counted
        toward the HW with their page caches), and no other in-sync replica holds them any
        more, so a power loss of this machine would otherwise lose them (found by the
        cluster simulation: one broker cut off, then the leader losing power)."""
        if (
            len(leading.replicas.isr) == 1
            and leading.log.config.fsync != "always"
            and self._nursery is not None
        ):
            self._nursery.start_soon(self._flush_sole_copy, leading)

    async def _flush_sole_copy(self, leading: _Leading) -> None:
        try:
            await leading.log.wait_durable(leading.log.log_end_offset)
        except StorageError as error:  # the log failed, or was truncated or closed meanwhile
            if not leading.gone:
                log_event(
                    logger,
                    logging.ERROR,
                    "sole_copy_flush_failed",
                    partition=f"{leading.topic}-{leading.partition}",
                    error=str(error),
                )

    async def _follow_progress(self, leading: _Leading) -> None:
        """A leader's own acknowledged offset moves with its fsyncs too: recompute the HW."""
        with leading.scope:
            while not leading.gone:
                event = leading.log.progress_event
                self._leader_progress(leading)
                await event.wait()

    def _follow(
        self,
        topic: str,
        partition: int,
        log: ReplicaLog,
        state: PartitionInfo,
        image: MetadataImage,
    ) -> None:
        tp = (topic, partition)
        self._stop_leading(tp)
        _manage_high_watermark(log)
        leader = state.leader
        broker = image.brokers.get(leader) if leader != NO_LEADER else None
        address = None
        if broker is not None and not broker.fenced:
            address = self.peer_addresses.get(leader) or next(
                (
                    (item.host, item.port)
                    for item in broker.listeners
                    if item.name == NATIVE_LISTENER
                ),
                None,
            )
        if address is None or self._nursery is None:
            self._stop_following(tp)
            return
        follower = self._fetchers.get(leader)
        if follower is None or follower.address != address:
            if follower is not None:
                follower.scope.cancel()
            follower = self._start_fetcher(leader, address)
        previous = self._followed.get(tp)
        if previous is not None and previous != leader:
            self._stop_following(tp)
        current = follower.fetcher.partitions.get(tp)
        if current is None or current.leader_epoch != state.leader_epoch or current.log is not log:
            follower.fetcher.follow(tp, log, state.leader_epoch)
        self._followed[tp] = leader

    def _start_fetcher(self, leader: int, address: tuple[str, int]) -> _Follower:
        assert self._nursery is not None
        link = self.link_factory(leader, address)
        fetcher = ReplicaFetcher(
            self.node_id,
            leader,
            link,
            broker_epoch=self.broker_epoch,
            fetch_bytes_max=FETCH_BYTES_MAX,
            partition_fetch_bytes_max=PARTITION_FETCH_BYTES_MAX,
        )
        follower = _Follower(fetcher, address, trio.CancelScope())
        self._fetchers[leader] = follower

        async def run() -> None:
            with follower.scope:
                await fetcher.run()

        self._nursery.start_soon(run)
        return follower

    def _broker_link(self, leader: int, address: tuple[str, int]) -> FetchLink:
        return BrokerLink(
            address, client_id=f"dwal-replica-{self.node_id}", frame_bytes_max=self.frame_bytes_max
        )

    def _stop_following(self, tp: TopicPartition) -> None:
        leader = self._followed.pop(tp, None)
        if leader is None:
            return
        follower = self._fetchers.get(leader)
        if follower is not None:
            follower.fetcher.unfollow(tp)

    # -- ISR changes -----------------------------------------------------------------------

    async def _check_isrs(self) -> None:
        while True:
            await trio.sleep(ISR_CHECK_INTERVAL_SECONDS)
            now = _now_ms()
            for leading in list(self._leading.values()):
                proposal = leading.replicas.isr_change_wanted(now)
                if proposal is None or self.alter_partition is None or self._nursery is None:
                    continue
                brokers = self.image().brokers
                joining = set(proposal) - set(leading.replicas.isr)
                if any(b not in brokers or brokers[b].fenced for b in joining):
                    continue  # a returning broker fetches before it is unfenced: not yet
                leading.replicas.isr_change_sent(proposal)
                self._nursery.start_soon(self._send_isr_change, leading, proposal)

    async def _send_isr_change(self, leading: _Leading, isr: tuple[int, ...]) -> None:
        assert self.alter_partition is not None
        replicas = leading.replicas
        body = {
            "broker_id": self.node_id,
            "broker_epoch": self.broker_epoch(),
            "topics": [
                {
                    "topic": leading.topic,
                    "partitions": [
                        {
                            "partition": leading.partition,
                            "leader_epoch": replicas.leader_epoch,
                            "partition_epoch": replicas.partition_epoch,
                            "isr": list(isr),
                        }
                    ],
                }
            ],
        }
        error = None
        try:
            reply = await self.alter_partition(body)
            result = reply["topics"][0]["partitions"][0]
            if result["error_code"]:
                error = f"{ErrorCode(result['error_code']).name}: {result.get('error_message')}"
        except DwalError as failure:
            error = str(failure)
        log_event(
            logger,
            logging.INFO if error is None else logging.WARNING,
            "isr_change" if error is None else "isr_change_failed",
            partition=f"{leading.topic}-{leading.partition}",
            isr=",".join(map(str, isr)),
            error=error,
        )
        if leading.gone:
            return
        # Accepted changes reached the image before the answer (the controller call waits
        # for it); anything still pending was refused or changed nothing.
        if replicas.pending_isr is not None:
            self._publish_hw(leading, replicas.isr_change_failed())
