"""The requests the active controller answers, as request body -> reply body.

Brokers send these (registration, heartbeats, ISR changes) or forward them (an admin's
create/delete topics, create partitions, alter configs, elect leaders, reassign partitions,
decommission brokers) to the active controller; on the controller's own node the broker
calls them in process, on the same code path (see `ControllerChannel`). Every change is a
pure decision of `broker.controller.decisions` submitted to the `QuorumController`; each
reply that changed something carries `metadata_offset`, the index of the last entry it
committed, so the broker that forwarded it answers its client only once its own image has
applied it.

A node that is not the active controller raises NotControllerError (with the hint).
"""

from __future__ import annotations

import functools
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from broker.controller.decisions import (
    PRODUCER_ID_BLOCK_SIZE,
    REASSIGNMENTS_PER_ENTRY_MAX,
    AlterPartitionRequest,
    BrokerRegistration,
    Decision,
    NewTopic,
    alter_configs,
    allocate_producer_ids,
    alter_partition,
    alter_partition_reassignment,
    create_partitions,
    create_topic,
    decommission_broker,
    delete_topic,
    elect_leaders,
    recommission_broker,
    register_broker,
    shutdown_broker,
)
from broker.controller.metadata_image import MetadataImage
from broker.controller.metadata_records import ConfigResourceType, Listener
from broker.controller.quorum_controller import QuorumController
from broker.limits import Limits
from broker.storage import LogConfig
from protocol import DwalError, ErrorCode
from protocol.api import ApiKey

OFFSETS_TOPIC = "__consumer_offsets"
# Requests that change nothing: answered from the active controller's image as it is.
_READS = frozenset({ApiKey.DESCRIBE_CLUSTER, ApiKey.LIST_PARTITION_REASSIGNMENTS})
DECOMMISSION_ROUNDS_MAX = 10_000  # entries of REASSIGNMENTS_PER_ENTRY_MAX moves each


def _error_fields(error: DwalError) -> dict[str, Any]:
    return {"error_code": int(error.code), "error_message": error.message}


def _results_by_topic(
    partitions: Iterable[tuple[str, int]], outcomes: Mapping[tuple[str, int], DwalError | None]
) -> list[dict[str, Any]]:
    """One result per partition (the first time it is named, in that order), grouped by
    topic: error code 0 unless `outcomes` holds an error for it."""
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for topic, number in dict.fromkeys(partitions):
        result: dict[str, Any] = {"partition": number, "error_code": 0}
        error = outcomes.get((topic, number))
        if error is not None:
            result.update(_error_fields(error))
        by_topic.setdefault(topic, []).append(result)
    return [{"topic": topic, "partitions": results} for topic, results in by_topic.items()]


class ControllerApis:
    """Answers controller requests on the node of `controller` (only while it is active)."""

    def __init__(
        self,
        controller: QuorumController,
        *,
        log_defaults: LogConfig,
        limits: Limits,
        default_replication_factor: int | None = None,
    ) -> None:
        self.controller = controller
        self.log_defaults = log_defaults
        self.limits = limits
        self.default_replication_factor = default_replication_factor
        self.table: dict[ApiKey, Callable[[dict[str, Any]], Any]] = {
            ApiKey.BROKER_REGISTRATION: self.register_broker,
            ApiKey.BROKER_HEARTBEAT: self.broker_heartbeat,
            ApiKey.CREATE_TOPICS: self.create_topics,
            ApiKey.DELETE_TOPICS: self.delete_topics,
            ApiKey.CREATE_PARTITIONS: self.create_partitions,
            ApiKey.ALTER_CONFIGS: self.alter_configs,
            ApiKey.ELECT_LEADERS: self.elect_leaders,
            ApiKey.ALTER_PARTITION_REASSIGNMENTS: self.alter_partition_reassignments,
            ApiKey.LIST_PARTITION_REASSIGNMENTS: self.list_partition_reassignments,
            ApiKey.DECOMMISSION_BROKER: self.decommission_broker,
            ApiKey.ALTER_PARTITION: self.alter_partition,
            ApiKey.DESCRIBE_CLUSTER: self.describe_cluster,
            ApiKey.ALLOCATE_PRODUCER_IDS: self.allocate_producer_ids,
        }

    async def handle(self, api_key: ApiKey, body: dict[str, Any]) -> dict[str, Any]:
        """Answer one request (its body already checked against the schema). Raises
        NotControllerError, and DwalError for a refusal of the whole request."""
        # Even what only reads the image (validate_only, unknown-topic refusals) needs the
        # active controller's: another node's image may be behind.
        self.controller.require_active()
        reply = await self.table[api_key](body)
        if "metadata_offset" in reply and api_key not in _READS:
            # Refusals too: a broker that forwarded "create t" and got TOPIC_ALREADY_EXISTS
            # (another request won a race) must see `t` before it answers its client.
            reply["metadata_offset"] = max(
                reply["metadata_offset"], self.controller.image.last_applied_index
            )
        return reply

    # -- brokers ------------------------------------------------------------------------

    async def register_broker(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            incarnation = uuid.UUID(body["incarnation_id"]).bytes
        except ValueError:
            raise DwalError(ErrorCode.INVALID_REQUEST, "incarnation_id must be a uuid") from None
        registration = BrokerRegistration(
            broker_id=body["broker_id"],
            incarnation_id=incarnation,
            listeners=tuple(
                Listener(item["name"], item["host"], item["port"]) for item in body["listeners"]
            ),
            rack=body["rack"],
            cluster_id=body["cluster_id"] or None,
        )
        changes_max = self.controller.config.partition_changes_per_entry_max
        await self.controller.submit(
            lambda image: register_broker(image, registration, changes_max=changes_max)
        )
        broker = self.controller.image.brokers.get(registration.broker_id)
        if broker is None or broker.incarnation_id != incarnation:
            raise DwalError(ErrorCode.REQUEST_TIMED_OUT, "registration superseded: register again")
        return {"broker_epoch": broker.epoch}

    async def broker_heartbeat(self, body: dict[str, Any]) -> dict[str, Any]:
        broker_id, epoch = body["broker_id"], body["broker_epoch"]
        if body["want_shut_down"]:
            changes_max = self.controller.config.partition_changes_per_entry_max
            # The rest of the move is made by the controller's converge steps; the broker
            # waits until its image shows it leads nothing.
            await self.controller.submit(
                lambda image: shutdown_broker(image, broker_id, epoch, changes_max=changes_max)
            )
        reply = await self.controller.heartbeat(
            broker_id, epoch, metadata_offset=body["metadata_offset"]
        )
        return {"is_fenced": reply.fenced, "should_shut_down": reply.shut_down}

    async def allocate_producer_ids(self, body: dict[str, Any]) -> dict[str, Any]:
        broker_id, epoch = body["broker_id"], body["broker_epoch"]
        starts: list[int] = []

        def decide(image: MetadataImage) -> Decision:
            starts.append(image.next_producer_id)
            return allocate_producer_ids(image, broker_id, epoch)

        # Decisions run one at a time: the last image decided on is the committed block's.
        index = await self.controller.submit(decide)
        return {
            "producer_id_start": starts[-1],
            "producer_id_len": PRODUCER_ID_BLOCK_SIZE,
            "metadata_offset": index,
        }

    async def alter_partition(self, body: dict[str, Any]) -> dict[str, Any]:
        topics = []
        last = -1
        for entry in body["topics"]:
            results: list[dict[str, Any]] = []
            topics.append({"topic": entry["topic"], "partitions": results})
            for part in entry["partitions"]:
                result: dict[str, Any] = {"partition": part["partition"], "error_code": 0}
                results.append(result)
                topic = self.controller.image.topics.get(entry["topic"])
                if topic is None:
                    result.update(
                        _error_fields(
                            DwalError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, "unknown topic")
                        )
                    )
                    continue
                request = AlterPartitionRequest(
                    broker_id=body["broker_id"],
                    broker_epoch=body["broker_epoch"],
                    topic_id=topic.topic_id,
                    partition=part["partition"],
                    leader_epoch=part["leader_epoch"],
                    partition_epoch=part["partition_epoch"],
                    isr=tuple(part["isr"]),
                )
                try:
                    last = await self.controller.submit(
                        functools.partial(_alter_partition, request=request)
                    )
                except DwalError as error:
                    if error.code == ErrorCode.NOT_CONTROLLER:
                        raise
                    result.update(_error_fields(error))
                    continue
                info = self.controller.image.partition(entry["topic"], part["partition"])
                if info is not None:
                    result.update(
                        leader=info.leader,
                        leader_epoch=info.leader_epoch,
                        partition_epoch=info.partition_epoch,
                        isr=list(info.isr),
                    )
        return {"topics": topics, "metadata_offset": last}

    async def describe_cluster(self, body: dict[str, Any]) -> dict[str, Any]:
        """The cluster as the active controller sees it: brokers, and the quorum's members
        with how far each has replicated the log."""
        self.controller.require_active()
        image = self.controller.image
        status = self.controller.driver.node.status()

        def member(node_id: int) -> dict[str, Any]:
            progress = status.progress.get(node_id)
            if node_id == status.node_id:
                return {"node_id": node_id, "match_index": status.last_index, "lag": 0}
            if progress is None:
                return {"node_id": node_id, "match_index": -1, "lag": -1}
            return {
                "node_id": node_id,
                "match_index": progress.match,
                "lag": max(status.last_index - progress.match, 0),
            }

        return {
            "cluster_id": image.cluster_id or "",
            "controller_id": status.node_id,
            "metadata_offset": image.last_applied_index,
            "brokers": [
                {
                    "node_id": broker.broker_id,
                    "epoch": broker.epoch,
                    "fenced": broker.fenced,
                    "shut_down": broker.shut_down,
                    "rack": broker.rack,
                    "listeners": [
                        {"name": item.name, "host": item.host, "port": item.port}
                        for item in broker.listeners
                    ],
                    "decommissioned": broker.broker_id in image.decommissioned,
                    "partitions": image.partitions_on(broker.broker_id),
                }
                for broker in sorted(image.brokers.values(), key=lambda b: b.broker_id)
            ],
            "voters": [member(n) for n in sorted(status.configuration.voters)],
            "learners": [member(n) for n in sorted(status.configuration.learners)],
        }

    # -- topics -------------------------------------------------------------------------

    def new_topic(self, entry: dict[str, Any]) -> NewTopic:
        """The NewTopic of a CreateTopics entry; raises DwalError for a bad config.

        Replication factor -1 takes the broker's default_replication_factor, or, when that is
        not set, min(3, unfenced brokers not being decommissioned) (Kafka's advice: 3 where
        there are 3). A topic with
        3 or more replicas gets min.insync.replicas=2 unless the request sets it, so that
        acks=all survives one broker down and still means two copies."""
        configs = dict(entry["configs"])
        factor = entry["replication_factor"]
        if factor == -1:
            image = self.controller.image
            available = [b for b in image.unfenced_broker_ids() if b not in image.decommissioned]
            factor = self.default_replication_factor or min(3, max(len(available), 1))
        if (
            factor >= 3
            and "min.insync.replicas" not in configs
            and self.log_defaults.min_insync_replicas == 1  # not set in [topic_defaults]
        ):
            configs["min.insync.replicas"] = "2"
        check_topic_configs(configs, self.log_defaults)
        return NewTopic(
            name=entry["topic"],
            partitions=entry["partitions"],
            replication_factor=factor,
            topic_id=uuid.uuid4().bytes,
            configs=configs,
        )

    def decide_new_topic(self, image: MetadataImage, new_topic: NewTopic) -> Decision:
        """create_topic with this broker's limits (topics_max included)."""
        if new_topic.name not in image.topics and len(image.topics) >= self.limits.topics_max:
            return DwalError(
                ErrorCode.POLICY_VIOLATION,
                f"the cluster has the maximum of {self.limits.topics_max} topics",
            )
        return create_topic(image, new_topic, partitions_max=self.limits.partitions_per_topic_max)

    async def _each_topic(
        self, entries: list[Any], name_of: Callable[[Any], str], act: Callable[[Any], Any]
    ) -> dict[str, Any]:
        """Run `act(entry)` (an awaitable returning the committed entry's index, or None when
        nothing was committed) for each entry in order; one result per topic, a refusal
        alone in its entry. NOT_CONTROLLER stops the whole request (the caller retries)."""
        results = []
        last = -1
        for entry in entries:
            name = name_of(entry)
            try:
                committed = await act(entry)
                if committed is not None:
                    last = committed
                results.append({"topic": name, "error_code": 0})
            except DwalError as error:
                if error.code == ErrorCode.NOT_CONTROLLER:
                    raise
                results.append({"topic": name, **_error_fields(error)})
        return {"topics": results, "metadata_offset": last}

    async def _commit_or_check(
        self, decide: Callable[[MetadataImage], Decision], validate_only: bool
    ) -> int | None:
        """Commit the decision; with `validate_only`, only raise its refusal."""
        if not validate_only:
            return await self.controller.submit(decide)
        decision = decide(self.controller.image)
        if isinstance(decision, DwalError):
            raise decision
        return None

    async def create_topics(self, body: dict[str, Any]) -> dict[str, Any]:
        names = [entry["topic"] for entry in body["topics"]]

        async def act(entry: dict[str, Any]) -> int | None:
            if names.count(entry["topic"]) > 1:
                raise DwalError(ErrorCode.INVALID_REQUEST, f"topic {entry['topic']!r} given twice")
            decide = functools.partial(self.decide_new_topic, new_topic=self.new_topic(entry))
            return await self._commit_or_check(decide, body["validate_only"])

        return await self._each_topic(body["topics"], lambda entry: entry["topic"], act)

    async def delete_topics(self, body: dict[str, Any]) -> dict[str, Any]:
        async def act(name: str) -> int | None:
            return await self.controller.submit(functools.partial(_delete_topic, name=name))

        return await self._each_topic(body["topics"], lambda name: name, act)

    async def create_partitions(self, body: dict[str, Any]) -> dict[str, Any]:
        async def act(entry: dict[str, Any]) -> int | None:
            decide = functools.partial(
                create_partitions,
                name=entry["topic"],
                count=entry["count"],
                partitions_max=self.limits.partitions_per_topic_max,
            )
            return await self._commit_or_check(decide, body["validate_only"])

        return await self._each_topic(body["topics"], lambda entry: entry["topic"], act)

    async def alter_configs(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["topic"]
        image = self.controller.image
        if name not in image.topics:
            raise DwalError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"unknown topic {name!r}")
        current = dict(image.configs.get((ConfigResourceType.TOPIC, name), {}))
        wanted = {k: v for k, v in current.items() if k not in body["delete"]}
        wanted.update(body["set"])
        check_topic_configs(wanted, self.log_defaults)
        if body["validate_only"]:
            return {"configs": wanted, "metadata_offset": -1}
        changes: dict[str, str | None] = {key: None for key in body["delete"] if key in current}
        changes.update(body["set"])
        last = await self.controller.submit(
            lambda image: alter_configs(image, ConfigResourceType.TOPIC, name, changes)
        )
        configs = dict(self.controller.image.configs.get((ConfigResourceType.TOPIC, name), {}))
        return {"configs": configs, "metadata_offset": last}

    async def elect_leaders(self, body: dict[str, Any]) -> dict[str, Any]:
        wanted = (
            None
            if body["topics"] is None
            else [(entry["topic"], p) for entry in body["topics"] for p in entry["partitions"]]
        )
        outcomes: dict[tuple[str, int], DwalError | None] = {}

        def decide(image: MetadataImage) -> Decision:
            records = []
            outcomes.clear()
            for key, decision in elect_leaders(image, wanted).items():
                if isinstance(decision, DwalError):
                    outcomes[key] = decision
                else:
                    outcomes[key] = (
                        None
                        if decision
                        else DwalError(
                            ErrorCode.ELECTION_NOT_NEEDED,
                            "the preferred leader already leads",
                        )
                    )
                    records.extend(decision)
            return records

        last = await self.controller.submit(decide)
        return {"topics": _results_by_topic(sorted(outcomes), outcomes), "metadata_offset": last}

    # -- reassignment and decommission ------------------------------------------------------

    async def alter_partition_reassignments(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start, change or cancel (replicas None) each partition's move; one result per
        partition, in the request's order. Up to REASSIGNMENTS_PER_ENTRY_MAX partitions go in
        one entry; a partition named twice is refused INVALID_REQUEST (every copy)."""
        wanted = [
            (entry["topic"], part["partition"], part["replicas"])
            for entry in body["topics"]
            for part in entry["partitions"]
        ]
        named = Counter((topic, number) for topic, number, _ in wanted)
        outcomes: dict[tuple[str, int], DwalError | None] = {
            key: DwalError(ErrorCode.INVALID_REQUEST, f"{key[0]}-{key[1]} given more than once")
            for key, count in named.items()
            if count > 1
        }
        moves = [move for move in wanted if named[move[0], move[1]] == 1]
        last = -1
        for start in range(0, len(moves), REASSIGNMENTS_PER_ENTRY_MAX):
            chunk = moves[start : start + REASSIGNMENTS_PER_ENTRY_MAX]
            last = await self.controller.submit(
                functools.partial(_reassign_partitions, moves=chunk, outcomes=outcomes)
            )
        partitions = [(topic, number) for topic, number, _ in wanted]
        return {"topics": _results_by_topic(partitions, outcomes), "metadata_offset": last}

    async def list_partition_reassignments(self, body: dict[str, Any]) -> dict[str, Any]:
        """The partitions being reassigned (of those asked for; unknown ones are left
        out), by topic name and number, as the active controller's image has them."""
        image = self.controller.image
        wanted = (
            None
            if body["topics"] is None
            else {entry["topic"]: set(entry["partitions"]) for entry in body["topics"]}
        )
        topics = []
        for name in sorted(image.topics if wanted is None else set(wanted) & set(image.topics)):
            parts = [
                {
                    "partition": p.partition,
                    "replicas": list(p.replicas),
                    "adding_replicas": list(p.adding_replicas),
                    "removing_replicas": list(p.removing_replicas),
                    "isr": list(p.isr),
                    "leader": p.leader,
                }
                for p in image.topics[name].partitions
                if p.reassigning and (wanted is None or p.partition in wanted[name])
            ]
            if parts:
                topics.append({"topic": name, "partitions": parts})
        return {"topics": topics}

    async def decommission_broker(self, body: dict[str, Any]) -> dict[str, Any]:
        """Decommission the broker (every partition it holds starts moving off it, in
        entries of REASSIGNMENTS_PER_ENTRY_MAX moves), or recommission it. Answers how many
        partitions still list it (they move as their new replicas catch up)."""
        broker_id = body["broker_id"]
        last = -1
        if not body["decommissioned"]:
            last = await self.controller.submit(
                functools.partial(_recommission_broker, broker_id=broker_id)
            )
        else:
            for _ in range(DECOMMISSION_ROUNDS_MAX):
                decided: list[bool] = []
                last = await self.controller.submit(
                    functools.partial(_decommission_broker, broker_id=broker_id, decided=decided)
                )
                if not decided[-1]:
                    break
        image = self.controller.image
        return {
            "broker_id": broker_id,
            "decommissioned": broker_id in image.decommissioned,
            "partitions": image.partitions_on(broker_id),
            "partitions_not_moving": sum(
                broker_id in partition.target_replicas
                for topic in image.topics.values()
                for partition in topic.partitions
            ),
            "metadata_offset": last,
        }


def check_topic_configs(configs: dict[str, str], defaults: LogConfig) -> None:
    """Raise DwalError INVALID_CONFIG unless `configs` are valid topic overrides."""
    try:
        LogConfig.from_topic_configs(configs, defaults)
    except ValueError as error:
        raise DwalError(ErrorCode.INVALID_CONFIG, str(error)) from None


def _alter_partition(image: MetadataImage, *, request: AlterPartitionRequest) -> Decision:
    return alter_partition(image, request)


def _delete_topic(image: MetadataImage, *, name: str) -> Decision:
    return delete_topic(image, name)


def _reassign_partitions(
    image: MetadataImage,
    *,
    moves: list[tuple[str, int, list[int] | None]],
    outcomes: dict[tuple[str, int], DwalError | None],
) -> Decision:
    """One entry of reassignments; each partition's refusal (or None) goes to `outcomes`."""
    records = []
    for topic, number, replicas in moves:
        decision = alter_partition_reassignment(image, topic, number, replicas)
        if isinstance(decision, DwalError):
            outcomes[topic, number] = decision
        else:
            outcomes[topic, number] = None
            records.extend(decision)
    return records


def _decommission_broker(image: MetadataImage, *, broker_id: int, decided: list[bool]) -> Decision:
    decision = decommission_broker(image, broker_id)
    decided.append(bool(decision) and not isinstance(decision, DwalError))
    return decision


def _recommission_broker(image: MetadataImage, *, broker_id: int) -> Decision:
    return recommission_broker(image, broker_id)
