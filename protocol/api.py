"""API keys, versions and the body schemas of every request and response.

Bodies are msgpack maps. Where a request carries record batches (Produce) or a response
does (Fetch), the batches travel as the frame's raw tail and the body says, per partition,
how many tail bytes belong to it (`size`), in the order the partitions are listed.
"""

from __future__ import annotations

import enum
from typing import Any

from .errors import ProtocolError
from .schema import BOOL, INT, STR, ListOf, MapOf, Optional, Struct


class ApiKey(enum.IntEnum):
    PRODUCE = 0
    FETCH = 1
    LIST_OFFSETS = 2
    METADATA = 3
    OFFSET_COMMIT = 8
    OFFSET_FETCH = 9
    FIND_COORDINATOR = 10
    LIST_GROUPS = 16
    API_VERSIONS = 18
    CREATE_TOPICS = 19
    INIT_PRODUCER_ID = 22
    DELETE_TOPICS = 20
    ALTER_CONFIGS = 33
    DELETE_GROUPS = 42
    CREATE_PARTITIONS = 37
    CONSUMER_GROUP_HEARTBEAT = 68
    CONSUMER_GROUP_DESCRIBE = 69
    DESCRIBE_TOPICS = 75
    # the control plane (KRaft's numbers): brokers to the active controller, and operators
    ELECT_LEADERS = 43
    ALTER_PARTITION_REASSIGNMENTS = 45
    LIST_PARTITION_REASSIGNMENTS = 46
    ALTER_PARTITION = 56
    DESCRIBE_CLUSTER = 60
    BROKER_REGISTRATION = 62
    BROKER_HEARTBEAT = 63
    ALLOCATE_PRODUCER_IDS = 67
    # DWAL's own (no Kafka counterpart), numbered above Kafka's range as DWAL's error codes
    DECOMMISSION_BROKER = 1000


# Special timestamps of ListOffsets, as in Kafka.
LATEST_TIMESTAMP = -1
EARLIEST_TIMESTAMP = -2

ACKS_NONE = 0
ACKS_LEADER = 1
ACKS_ALL = -1

_TOPIC_ERROR = Struct(
    topic=STR,
    error_code=INT,
    error_message=(Optional(STR), None),
)

_TOPIC_PARTITIONS = Struct(topic=STR, partitions=ListOf(INT))
_LISTENER = Struct(name=STR, host=STR, port=INT)
_PARTITION_RESULT = Struct(partition=INT, error_code=INT, error_message=(Optional(STR), None))
_GROUP_ERROR = Struct(group_id=STR, error_code=INT, error_message=(Optional(STR), None))
_REPLICAS_MAX = 128  # brokers in one partition's replica list (the metadata records' limit)

REQUESTS: dict[ApiKey, Struct] = {
    ApiKey.API_VERSIONS: Struct(),
    ApiKey.METADATA: Struct(
        topics=(Optional(ListOf(STR)), None),
        allow_auto_topic_creation=(BOOL, False),
    ),
    ApiKey.CREATE_TOPICS: Struct(
        topics=ListOf(
            Struct(
                topic=STR,
                partitions=(INT, 1),
                replication_factor=(INT, 1),
                configs=(MapOf(STR), {}),
            ),
            length_max=1000,
        ),
        validate_only=(BOOL, False),
    ),
    ApiKey.DELETE_TOPICS: Struct(topics=ListOf(STR, length_max=1000)),
    ApiKey.DESCRIBE_TOPICS: Struct(topics=(Optional(ListOf(STR)), None)),
    ApiKey.ALTER_CONFIGS: Struct(
        topic=STR,
        set=(MapOf(STR), {}),
        delete=(ListOf(STR), []),
        validate_only=(BOOL, False),
    ),
    ApiKey.PRODUCE: Struct(
        acks=(INT, ACKS_LEADER),
        timeout_ms=(INT, 30_000),
        topics=ListOf(
            Struct(topic=STR, partitions=ListOf(Struct(partition=INT, size=INT))),
            length_max=10_000,
        ),
    ),
    ApiKey.FETCH: Struct(
        max_wait_ms=(INT, 500),
        min_bytes=(INT, 1),
        max_bytes=(INT, 50 * 1024 * 1024),
        # A follower broker: its id and broker epoch (consumers: -1). A follower reads up to
        # the log end, a consumer below the high watermark.
        replica_id=(INT, -1),
        broker_epoch=(INT, -1),
        topics=ListOf(
            Struct(
                topic=STR,
                partitions=ListOf(
                    Struct(
                        partition=INT,
                        fetch_offset=INT,
                        max_bytes=(INT, 1024 * 1024),
                        # the leader epoch the fetcher believes current (-1: not checked);
                        # older: FENCED_LEADER_EPOCH, newer: UNKNOWN_LEADER_EPOCH
                        current_leader_epoch=(INT, -1),
                        # a follower: the epoch of its last batch (-1: none); a log that
                        # diverged gets diverging_epoch in the answer instead of records
                        last_fetched_epoch=(INT, -1),
                    )
                ),
            ),
            length_max=10_000,
        ),
    ),
    ApiKey.LIST_OFFSETS: Struct(
        topics=ListOf(
            Struct(topic=STR, partitions=ListOf(Struct(partition=INT, timestamp=INT))),
        ),
    ),
    ApiKey.CREATE_PARTITIONS: Struct(
        topics=ListOf(Struct(topic=STR, count=INT), length_max=1000),
        validate_only=(BOOL, False),
    ),
    ApiKey.FIND_COORDINATOR: Struct(key=STR, key_type=(INT, 0)),
    ApiKey.CONSUMER_GROUP_HEARTBEAT: Struct(
        group_id=STR,
        member_id=(Optional(STR), None),
        member_epoch=INT,
        instance_id=(Optional(STR), None),
        rebalance_timeout_ms=(INT, -1),
        subscribed_topic_names=(Optional(ListOf(STR, length_max=10_000)), None),
        subscribed_topic_regex=(Optional(STR), None),
        owned_partitions=(Optional(ListOf(_TOPIC_PARTITIONS, length_max=10_000)), None),
    ),
    ApiKey.OFFSET_COMMIT: Struct(
        group_id=STR,
        member_id=(Optional(STR), None),
        member_epoch=(INT, -1),
        topics=ListOf(
            Struct(
                topic=STR,
                partitions=ListOf(
                    Struct(partition=INT, offset=INT, metadata=(Optional(STR), None))
                ),
            ),
            length_max=10_000,
        ),
    ),
    ApiKey.OFFSET_FETCH: Struct(
        group_id=STR,
        topics=(Optional(ListOf(_TOPIC_PARTITIONS, length_max=10_000)), None),
    ),
    ApiKey.LIST_GROUPS: Struct(),
    ApiKey.CONSUMER_GROUP_DESCRIBE: Struct(group_ids=ListOf(STR, length_max=1000)),
    ApiKey.DELETE_GROUPS: Struct(group_ids=ListOf(STR, length_max=1000)),
    # An idempotent producer asks any broker for a producer id (epoch 0) at its start.
    ApiKey.INIT_PRODUCER_ID: Struct(),
    # A broker asks the active controller for a block of producer ids to hand out.
    ApiKey.ALLOCATE_PRODUCER_IDS: Struct(broker_id=INT, broker_epoch=INT),
    # A broker (re)registers with the active controller at start; the answer is its epoch.
    ApiKey.BROKER_REGISTRATION: Struct(
        broker_id=INT,
        cluster_id=STR,  # the cluster the broker's data dir belongs to
        incarnation_id=STR,  # random per process start
        listeners=ListOf(_LISTENER, length_max=16),
        rack=(Optional(STR), None),
    ),
    ApiKey.BROKER_HEARTBEAT: Struct(
        broker_id=INT,
        broker_epoch=INT,
        metadata_offset=INT,  # the last metadata log entry the broker's image applied
        want_shut_down=(BOOL, False),
    ),
    ApiKey.DESCRIBE_CLUSTER: Struct(),
    # None: every partition whose preferred leader does not lead
    ApiKey.ELECT_LEADERS: Struct(
        topics=(Optional(ListOf(_TOPIC_PARTITIONS, length_max=10_000)), None),
    ),
    # Move partitions to new replicas (KIP-455); replicas None cancels a partition's move.
    ApiKey.ALTER_PARTITION_REASSIGNMENTS: Struct(
        topics=ListOf(
            Struct(
                topic=STR,
                partitions=ListOf(
                    Struct(
                        partition=INT,
                        replicas=(Optional(ListOf(INT, length_max=_REPLICAS_MAX)), None),
                    ),
                    length_max=10_000,
                ),
            ),
            length_max=1000,
        ),
    ),
    # None: every partition being reassigned
    ApiKey.LIST_PARTITION_REASSIGNMENTS: Struct(
        topics=(Optional(ListOf(_TOPIC_PARTITIONS, length_max=10_000)), None),
    ),
    # decommissioned false: recommission (new replicas may go to the broker again)
    ApiKey.DECOMMISSION_BROKER: Struct(broker_id=INT, decommissioned=(BOOL, True)),
    # A partition leader asks the controller to change the ISR (compare-and-swap on the
    # partition epoch it knows).
    ApiKey.ALTER_PARTITION: Struct(
        broker_id=INT,
        broker_epoch=INT,
        topics=ListOf(
            Struct(
                topic=STR,
                partitions=ListOf(
                    Struct(partition=INT, leader_epoch=INT, partition_epoch=INT, isr=ListOf(INT))
                ),
            ),
            length_max=10_000,
        ),
    ),
}

_PARTITION_META = Struct(
    partition=INT,
    error_code=(INT, 0),
    leader=INT,
    leader_epoch=(INT, 0),
    replicas=(ListOf(INT), []),
    isr=(ListOf(INT), []),
)

RESPONSES: dict[ApiKey, Struct] = {
    ApiKey.API_VERSIONS: Struct(api_versions=ListOf(ListOf(INT))),
    ApiKey.METADATA: Struct(
        brokers=ListOf(Struct(node_id=INT, host=STR, port=INT)),
        controller_id=(INT, -1),
        topics=ListOf(
            Struct(
                topic=STR,
                error_code=(INT, 0),
                error_message=(Optional(STR), None),
                partitions=(ListOf(_PARTITION_META), []),
                # the topic's max.message.bytes and segment.bytes; -1: not said (older broker)
                max_message_bytes=(INT, -1),
                segment_bytes=(INT, -1),
            )
        ),
    ),
    # metadata_offset (admin answers): the metadata log entry that holds the change; the
    # answering broker's image has applied it. -1: not said (older broker, nothing changed)
    ApiKey.CREATE_TOPICS: Struct(topics=ListOf(_TOPIC_ERROR), metadata_offset=(INT, -1)),
    ApiKey.DELETE_TOPICS: Struct(topics=ListOf(_TOPIC_ERROR), metadata_offset=(INT, -1)),
    ApiKey.DESCRIBE_TOPICS: Struct(
        topics=ListOf(
            Struct(
                topic=STR,
                error_code=(INT, 0),
                error_message=(Optional(STR), None),
                configs=(MapOf(STR), {}),
                topic_id=(STR, ""),
                partitions=(
                    ListOf(
                        Struct(
                            partition=INT,
                            leader=INT,
                            leader_epoch=(INT, 0),
                            log_start_offset=INT,
                            high_watermark=INT,
                            log_end_offset=INT,
                            size_bytes=INT,
                            segments=(INT, 0),
                            replicas=(ListOf(INT), []),
                            isr=(ListOf(INT), []),
                            # False: the answering broker holds no copy (offsets above: -1)
                            local=(BOOL, True),
                        )
                    ),
                    [],
                ),
            )
        )
    ),
    ApiKey.ALTER_CONFIGS: Struct(configs=(MapOf(STR), {}), metadata_offset=(INT, -1)),
    ApiKey.PRODUCE: Struct(
        topics=ListOf(
            Struct(
                topic=STR,
                partitions=ListOf(
                    Struct(
                        partition=INT,
                        error_code=INT,
                        error_message=(Optional(STR), None),
                        base_offset=(INT, -1),
                        log_append_time=(INT, -1),
                        log_start_offset=(INT, -1),
                        # an error after the batches were appended (their replication or
                        # fsync failed, the leadership was lost meanwhile): they may be kept,
                        # so resending them could store them twice
                        maybe_appended=(BOOL, False),
                    )
                ),
            )
        )
    ),
    ApiKey.FETCH: Struct(
        topics=ListOf(
            Struct(
                topic=STR,
                partitions=ListOf(
                    Struct(
                        partition=INT,
                        error_code=INT,
                        error_message=(Optional(STR), None),
                        high_watermark=(INT, -1),
                        log_start_offset=(INT, -1),
                        size=(INT, 0),
                        # to a follower whose log diverged: the largest epoch of the leader
                        # not above its last fetched epoch, and where that epoch ends; the
                        # follower truncates there and fetches again
                        diverging_epoch=(Optional(Struct(epoch=INT, end_offset=INT)), None),
                        # the leader as this broker knows it (-1: not said)
                        leader_id=(INT, -1),
                        leader_epoch=(INT, -1),
                    )
                ),
            )
        )
    ),
    ApiKey.LIST_OFFSETS: Struct(
        topics=ListOf(
            Struct(
                topic=STR,
                partitions=ListOf(
                    Struct(
                        partition=INT,
                        error_code=INT,
                        error_message=(Optional(STR), None),
                        offset=(INT, -1),
                        timestamp=(INT, -1),
                    )
                ),
            )
        )
    ),
    ApiKey.CREATE_PARTITIONS: Struct(topics=ListOf(_TOPIC_ERROR), metadata_offset=(INT, -1)),
    ApiKey.FIND_COORDINATOR: Struct(node_id=INT, host=STR, port=INT),
    ApiKey.CONSUMER_GROUP_HEARTBEAT: Struct(
        member_id=STR,
        member_epoch=INT,
        heartbeat_interval_ms=INT,
        assignment=(Optional(ListOf(_TOPIC_PARTITIONS)), None),
    ),
    ApiKey.OFFSET_COMMIT: Struct(
        topics=ListOf(
            Struct(
                topic=STR,
                partitions=ListOf(
                    Struct(partition=INT, error_code=INT, error_message=(Optional(STR), None))
                ),
            )
        )
    ),
    ApiKey.OFFSET_FETCH: Struct(
        topics=ListOf(
            Struct(
                topic=STR,
                partitions=ListOf(
                    Struct(
                        partition=INT,
                        offset=INT,
                        metadata=(Optional(STR), None),
                        error_code=(INT, 0),
                    )
                ),
            )
        )
    ),
    ApiKey.LIST_GROUPS: Struct(groups=ListOf(Struct(group_id=STR, state=STR, members=INT))),
    ApiKey.CONSUMER_GROUP_DESCRIBE: Struct(
        groups=ListOf(
            Struct(
                group_id=STR,
                error_code=(INT, 0),
                error_message=(Optional(STR), None),
                state=(STR, "dead"),
                group_epoch=(INT, 0),
                assignment_epoch=(INT, 0),
                members=(
                    ListOf(
                        Struct(
                            member_id=STR,
                            instance_id=(Optional(STR), None),
                            client_id=(STR, ""),
                            host=(STR, ""),
                            member_epoch=INT,
                            # time left until the member is removed unless it heartbeats (an
                            # away static member: rejoins); -1: not said (older broker)
                            session_expires_in_ms=(INT, -1),
                            subscribed_topic_names=(ListOf(STR), []),
                            subscribed_topic_regex=(Optional(STR), None),
                            assignment=(ListOf(_TOPIC_PARTITIONS), []),
                            target_assignment=(ListOf(_TOPIC_PARTITIONS), []),
                        )
                    ),
                    [],
                ),
            )
        )
    ),
    ApiKey.DELETE_GROUPS: Struct(groups=ListOf(_GROUP_ERROR)),
    ApiKey.INIT_PRODUCER_ID: Struct(producer_id=INT, producer_epoch=INT),
    ApiKey.ALLOCATE_PRODUCER_IDS: Struct(
        producer_id_start=INT, producer_id_len=INT, metadata_offset=(INT, -1)
    ),
    ApiKey.BROKER_REGISTRATION: Struct(broker_epoch=INT),  # the registering entry's index
    ApiKey.BROKER_HEARTBEAT: Struct(is_fenced=BOOL, should_shut_down=BOOL),
    ApiKey.DESCRIBE_CLUSTER: Struct(
        cluster_id=STR,
        controller_id=INT,  # the active controller (which answers it, forwarded if need be)
        metadata_offset=INT,  # the last entry the answering node's image applied
        brokers=ListOf(
            Struct(
                node_id=INT,
                epoch=INT,
                fenced=BOOL,
                shut_down=(BOOL, False),
                rack=(Optional(STR), None),
                listeners=ListOf(_LISTENER),
                # being decommissioned: it receives no new replica (false: older broker)
                decommissioned=(BOOL, False),
                # partitions listing it among their replicas, moving ones included (-1: not
                # said, older broker)
                partitions=(INT, -1),
            )
        ),
        # the controller quorum as the answering node sees it; lag (entries behind the
        # leader's log end) is only known when the answering node is the active controller
        voters=(ListOf(Struct(node_id=INT, match_index=(INT, -1), lag=(INT, -1))), []),
        learners=(ListOf(Struct(node_id=INT, match_index=(INT, -1), lag=(INT, -1))), []),
    ),
    ApiKey.ELECT_LEADERS: Struct(
        topics=ListOf(Struct(topic=STR, partitions=ListOf(_PARTITION_RESULT))),
        metadata_offset=(INT, -1),
    ),
    ApiKey.ALTER_PARTITION_REASSIGNMENTS: Struct(
        topics=ListOf(Struct(topic=STR, partitions=ListOf(_PARTITION_RESULT))),
        metadata_offset=(INT, -1),
    ),
    ApiKey.LIST_PARTITION_REASSIGNMENTS: Struct(
        topics=ListOf(
            Struct(
                topic=STR,
                partitions=ListOf(
                    Struct(
                        partition=INT,
                        replicas=ListOf(INT),  # the target, then the replicas leaving
                        adding_replicas=ListOf(INT),
                        removing_replicas=ListOf(INT),
                        isr=(ListOf(INT), []),
                        leader=(INT, -1),
                    )
                ),
            )
        ),
    ),
    ApiKey.DECOMMISSION_BROKER: Struct(
        broker_id=INT,
        decommissioned=BOOL,
        # partitions still listing the broker among their replicas (moving ones included):
        # 0 once every move off it completed
        partitions=INT,
        # of those, partitions whose move off it has not started (none once accepted)
        partitions_not_moving=(INT, 0),
        metadata_offset=(INT, -1),
    ),
    ApiKey.ALTER_PARTITION: Struct(
        metadata_offset=(INT, -1),
        topics=ListOf(
            Struct(
                topic=STR,
                partitions=ListOf(
                    Struct(
                        partition=INT,
                        error_code=INT,
                        error_message=(Optional(STR), None),
                        leader=(INT, -1),
                        leader_epoch=(INT, -1),
                        partition_epoch=(INT, -1),
                        isr=(ListOf(INT), []),
                    )
                ),
            )
        ),
    ),
}

# Supported version range per api key: (min, max).
API_VERSIONS: dict[ApiKey, tuple[int, int]] = {key: (0, 0) for key in REQUESTS}


def api_key_of(value: int) -> ApiKey | None:
    try:
        return ApiKey(value)
    except ValueError:
        return None


def check_request(api_key: ApiKey, body: Any) -> dict[str, Any]:
    """Check a request body against its schema; raises ProtocolError."""
    return REQUESTS[api_key].check(body, api_key.name.lower())


def check_response(api_key: ApiKey, body: Any) -> dict[str, Any]:
    """Check a response body against its schema; raises ProtocolError."""
    return RESPONSES[api_key].check(body, api_key.name.lower())


def check_tail_sizes(sizes: list[int], tail_bytes: int) -> None:
    """Check that per-partition `size` fields tile the tail exactly."""
    total = 0
    for size in sizes:
        if size < 0:
            raise ProtocolError("a partition's size must not be negative")
        total += size
    if total != tail_bytes:
        raise ProtocolError(
            f"partition sizes add up to {total}, but the tail has {tail_bytes} bytes"
        )
