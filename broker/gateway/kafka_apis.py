"""The Kafka data APIs: Metadata, Produce, Fetch, ListOffsets, OffsetForLeaderEpoch.

Views of the broker's own handlers (`RequestHandlers`), as every gateway is: a Produce is
the native produce of the same batches (stored verbatim: DWAL's batch header is Kafka's v2
header), a Fetch the native fetch, whose batches are handed to the Kafka client as they are
when a Kafka client wrote them and transcoded to Kafka's record encoding when a DWAL client
did (`protocol.kafka_transcode`). See `broker.gateway.kafka_entities` for the contract.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import trio
from kio.schema.errors import ErrorCode as KafkaErrorCode

from broker.controller.metadata_records import NO_LEADER
from broker.gateway.kafka_entities import (
    KafkaApi,
    KafkaContext,
    Later,
    element,
    kafka_error,
    make,
    ms,
)
from broker.group_coordinator import OFFSETS_TOPIC
from broker.request_handlers import Reply
from broker.storage import FetchSlice
from protocol import DwalError, ErrorCode, ProtocolError, decode_records
from protocol.kafka_transcode import check_kafka_batches, to_kafka_batches

# A fetch answer larger than this is read and transcoded in a worker thread.
FETCH_INLINE_BYTES_MAX = 64 * 1024
_EPOCH = datetime.datetime.fromtimestamp(0, datetime.timezone.utc)


def _topic_uuid(topic_id: bytes) -> uuid.UUID:
    return uuid.UUID(bytes=topic_id) if len(topic_id) == 16 else uuid.UUID(int=0)


# -- Metadata ---------------------------------------------------------------------------


async def metadata(ctx: KafkaContext, request: Any) -> Any:
    handlers = ctx.handlers
    names: list[str] | None
    if request.topics is None or (ctx.api_version == 0 and not request.topics):
        names = None  # every topic
    else:
        names = [topic.name for topic in request.topics if topic.name is not None]
    allow = bool(getattr(request, "allow_auto_topic_creation", True))
    reply = await handlers.metadata(
        {"topics": names, "allow_auto_topic_creation": allow}, b"", ctx.request_context()
    )
    image = handlers.member.image
    response_type = ctx.response_type
    broker_type = element(response_type, "brokers")
    topic_type = element(response_type, "topics")
    partition_type = element(topic_type, "partitions")
    brokers = []
    for broker_id in sorted(image.brokers):
        broker = image.brokers[broker_id]
        address = ctx.kafka_address(broker_id)
        if address is None or broker.fenced:
            continue
        brokers.append(
            make(broker_type, node_id=broker_id, host=address[0], port=address[1], rack=broker.rack)
        )
    topics = []
    for entry in reply.body["topics"]:
        name = entry["topic"]
        info = image.topics.get(name)
        partitions = tuple(
            make(
                partition_type,
                error_code=kafka_error(p["error_code"]),
                partition_index=p["partition"],
                leader_id=p["leader"] if p["leader"] != NO_LEADER else -1,
                leader_epoch=p["leader_epoch"],
                replica_nodes=tuple(p["replicas"]),
                isr_nodes=tuple(p["isr"]),
                offline_replicas=(),
            )
            for p in entry["partitions"]
        )
        topics.append(
            make(
                topic_type,
                error_code=kafka_error(entry["error_code"]),
                name=name,
                topic_id=_topic_uuid(info.topic_id) if info is not None else uuid.UUID(int=0),
                is_internal=name == OFFSETS_TOPIC,
                partitions=partitions,
            )
        )
    return make(
        response_type,
        brokers=tuple(brokers),
        cluster_id=image.cluster_id,
        # Admin requests may go to any broker (they are forwarded to the active controller),
        # so the broker answering is as good a "controller" as any for a Kafka client.
        controller_id=handlers.config.node_id,
        topics=tuple(topics),
    )


# -- Produce ----------------------------------------------------------------------------


async def produce(ctx: KafkaContext, request: Any) -> Any:
    """Appends now (in request order), answers later: the handler returns `Later`."""
    response_type = ctx.response_type
    topic_type = element(response_type, "responses")
    partition_type = element(topic_type, "partition_responses")
    acks = int(request.acks)
    refused: dict[tuple[str, int], tuple[KafkaErrorCode, str]] = {}
    order: list[tuple[str, list[int]]] = []
    native_topics: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for topic in request.topic_data:
        name = topic.name
        indexes: list[int] = []
        order.append((name, indexes))
        native_partitions: list[dict[str, Any]] = []
        for part in topic.partition_data:
            index = int(part.index)
            indexes.append(index)
            if request.transactional_id is not None:
                refused[(name, index)] = (
                    KafkaErrorCode.invalid_request,
                    "transactions are not supported (idempotent producers are)",
                )
                continue
            records = part.records
            try:
                if not records:
                    raise ProtocolError("the partition's record data is empty")
                check_kafka_batches(records)
            except ProtocolError as error:
                refused[(name, index)] = (KafkaErrorCode.corrupt_message, str(error))
                continue
            native_partitions.append({"partition": index, "size": len(records)})
            chunks.append(records)
        if native_partitions:
            native_topics.append({"topic": name, "partitions": native_partitions})
    results: dict[tuple[str, int], dict[str, Any]] = {}
    finish = None
    if native_topics:
        body = {"acks": acks, "timeout_ms": ms(request.timeout), "topics": native_topics}
        try:
            finish = await ctx.handlers.start_produce(body, b"".join(chunks))
        except DwalError as error:
            for entry in native_topics:
                for part in entry["partitions"]:
                    refused[(entry["topic"], part["partition"])] = (
                        kafka_error(error.code),
                        error.message,
                    )

    async def answer() -> Any:
        if finish is not None:
            reply: Reply = await finish()
            for entry in reply.body["topics"]:
                for result in entry["partitions"]:
                    results[(entry["topic"], result["partition"])] = result
        topics = []
        for name, indexes in order:
            partitions = []
            for index in indexes:
                if (name, index) in refused:
                    code, message = refused[(name, index)]
                    partitions.append(
                        make(
                            partition_type,
                            index=index,
                            error_code=code,
                            base_offset=-1,
                            error_message=message,
                            record_errors=(),
                        )
                    )
                    continue
                result = results.get((name, index), {})
                partitions.append(
                    make(
                        partition_type,
                        index=index,
                        error_code=kafka_error(result.get("error_code", ErrorCode.NONE)),
                        base_offset=result.get("base_offset", -1),
                        log_append_time=_append_time(result.get("log_append_time", -1)),
                        log_start_offset=result.get("log_start_offset", -1),
                        record_errors=(),
                        error_message=result.get("error_message"),
                    )
                )
            topics.append(make(topic_type, name=name, partition_responses=tuple(partitions)))
        return make(response_type, responses=tuple(topics))

    return Later(answer, send=acks != 0)


def _append_time(value: int) -> datetime.datetime | None:
    if value < 0:
        return None
    return _EPOCH + datetime.timedelta(milliseconds=value)


# -- Fetch ------------------------------------------------------------------------------


async def fetch(ctx: KafkaContext, request: Any) -> Any:
    response_type = ctx.response_type
    topic_type = element(response_type, "responses")
    partition_type = element(topic_type, "partitions")
    max_bytes = int(getattr(request, "max_bytes", 0x7FFFFFFF))
    body = {
        "max_wait_ms": ms(request.max_wait),
        "min_bytes": int(request.min_bytes),
        "max_bytes": max(max_bytes, 1),
        "replica_id": -1,
        "broker_epoch": -1,
        "topics": [
            {
                "topic": topic.topic,
                "partitions": [
                    {
                        "partition": int(part.partition),
                        "fetch_offset": int(part.fetch_offset),
                        "max_bytes": int(part.partition_max_bytes),
                        "current_leader_epoch": int(getattr(part, "current_leader_epoch", -1)),
                        "last_fetched_epoch": -1,
                    }
                    for part in topic.partitions
                ],
            }
            for topic in request.topics
        ],
    }
    reply = await ctx.handlers.fetch(body, b"", ctx.request_context())
    try:
        pieces: list[FetchSlice] = list(reply.parts)  # type: ignore[arg-type]
        if reply.tail_bytes > FETCH_INLINE_BYTES_MAX:
            # reading the segments and transcoding DWAL's batches (some 250k records/s) take
            # a worker thread, so that a large fetch never stalls the event loop
            datas = await trio.to_thread.run_sync(_kafka_records_of, pieces)
        else:
            datas = _kafka_records_of(pieces)
        parts = iter(datas)
        topics = []
        for entry in reply.body["topics"]:
            partitions = []
            for result in entry["partitions"]:
                records = next(parts) if result.get("size", 0) else b""
                hw = result.get("high_watermark", -1)
                partitions.append(
                    make(
                        partition_type,
                        partition_index=result["partition"],
                        error_code=kafka_error(result["error_code"]),
                        high_watermark=hw,
                        last_stable_offset=hw,
                        log_start_offset=result.get("log_start_offset", -1),
                        aborted_transactions=None,
                        preferred_read_replica=-1,
                        records=records,
                    )
                )
            topics.append(make(topic_type, topic=entry["topic"], partitions=tuple(partitions)))
    finally:
        reply.close()
    # session_id 0: no incremental fetch session (KIP-227); every fetch lists its partitions
    return make(
        response_type, error_code=KafkaErrorCode.none, session_id=0, responses=tuple(topics)
    )


def _kafka_records_of(pieces: list[FetchSlice]) -> list[bytes]:
    """Each fetched piece's batches as a Kafka client reads them. Raises OSError."""
    return [to_kafka_batches(piece.read_bytes()) for piece in pieces]


# -- ListOffsets ------------------------------------------------------------------------


async def list_offsets(ctx: KafkaContext, request: Any) -> Any:
    response_type = ctx.response_type
    topic_type = element(response_type, "topics")
    partition_type = element(topic_type, "partitions")
    body = {
        "topics": [
            {
                "topic": topic.name,
                "partitions": [
                    {"partition": int(p.partition_index), "timestamp": int(p.timestamp)}
                    for p in topic.partitions
                ],
            }
            for topic in request.topics
        ]
    }
    reply = await ctx.handlers.list_offsets(body, b"", ctx.request_context())
    asked = {
        (topic.name, int(p.partition_index)): int(p.timestamp)
        for topic in request.topics
        for p in topic.partitions
    }
    topics = []
    for entry in reply.body["topics"]:
        partitions = []
        for result in entry["partitions"]:
            epoch = -1
            if not result["error_code"]:
                epoch = _leader_epoch(ctx, entry["topic"], result["partition"])
                timestamp = asked.get((entry["topic"], result["partition"]), -1)
                if timestamp >= 0 and result.get("offset", -1) >= 0:
                    result = await _first_record_at_or_after(ctx, entry["topic"], result, timestamp)
            partitions.append(
                make(
                    partition_type,
                    partition_index=result["partition"],
                    error_code=kafka_error(result["error_code"]),
                    timestamp=result.get("timestamp", -1),
                    offset=result.get("offset", -1),
                    leader_epoch=epoch,
                )
            )
        topics.append(make(topic_type, name=entry["topic"], partitions=tuple(partitions)))
    return make(response_type, topics=tuple(topics))


async def _first_record_at_or_after(
    ctx: KafkaContext, topic: str, result: dict[str, Any], timestamp: int
) -> dict[str, Any]:
    """`result` of a lookup by timestamp, made exact. DWAL's time index finds the first batch
    whose max_timestamp is at or after `timestamp`, and DWAL's clients look inside it
    themselves; a Kafka client takes the answer as the first record at or after it (it seeks
    there), so the gateway reads that batch (one, whole) and looks for the record. Raises
    nothing: a batch that cannot be read leaves the batch's answer."""
    partition = result["partition"]
    try:
        data = await ctx.handlers.read_batches(topic, partition, result["offset"], 1)
        records = decode_records(data, allow_partial_tail=True)
    except (DwalError, ProtocolError):
        return result
    for record in records:
        if record.offset >= result["offset"] and record.timestamp >= timestamp:
            return {**result, "offset": record.offset, "timestamp": record.timestamp}
    return result


def _leader_epoch(ctx: KafkaContext, topic: str, partition: int) -> int:
    state = ctx.handlers.member.image.partition(topic, partition)
    return -1 if state is None else state.leader_epoch


# -- OffsetForLeaderEpoch ---------------------------------------------------------------


async def offset_for_leader_epoch(ctx: KafkaContext, request: Any) -> Any:
    """Where a leader epoch ends in the leader's log: what a consumer asks after a leader
    change to check that its position was not truncated away (KIP-320)."""
    response_type = ctx.response_type
    topic_type = element(response_type, "topics")
    partition_type = element(topic_type, "partitions")
    topics = []
    for topic in request.topics:
        partitions = []
        for part in topic.partitions:
            try:
                log, _ = ctx.handlers.replicas.leader_log(
                    topic.topic,
                    int(part.partition),
                    current_leader_epoch=int(part.current_leader_epoch),
                )
                epoch, end_offset = log.end_offset_for_leader_epoch(int(part.leader_epoch))
                partitions.append(
                    make(
                        partition_type,
                        error_code=KafkaErrorCode.none,
                        partition=part.partition,
                        leader_epoch=epoch,
                        end_offset=end_offset,
                    )
                )
            except DwalError as error:
                partitions.append(
                    make(
                        partition_type,
                        error_code=kafka_error(error.code),
                        partition=part.partition,
                        leader_epoch=-1,
                        end_offset=-1,
                    )
                )
        topics.append(make(topic_type, topic=topic.topic, partitions=tuple(partitions)))
    return make(response_type, topics=tuple(topics))


APIS: list[KafkaApi] = [
    KafkaApi(0, 0, 12, produce),  # v0-2 (message format v0/v1) answer UNSUPPORTED_VERSION
    KafkaApi(1, 4, 12, fetch, concurrent=True),  # v13+ name topics by id
    KafkaApi(2, 1, 9, list_offsets),
    KafkaApi(3, 0, 12, metadata),
    KafkaApi(23, 2, 4, offset_for_leader_epoch),
]
