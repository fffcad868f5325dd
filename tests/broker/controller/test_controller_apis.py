"""ControllerApis: request bodies in, decisions committed by a real QuorumController (one
voter on the memory network, MockClock), reply bodies out."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest
import trio
from quorum_cluster import CONFIG, raft_config

from broker.controller import NewTopic, create_topic
from broker.controller.controller_apis import ControllerApis
from broker.controller.metadata_records import ConfigResourceType
from broker.controller.quorum_controller import NotControllerError, QuorumController
from broker.limits import Limits
from broker.raft.log_storage import MemoryStorage
from broker.raft.memory_transport import MemoryNetwork
from broker.raft.messages import ConfigChange, ConfigChangeKind, Configuration
from broker.storage import LogConfig
from protocol import DwalError, ErrorCode
from protocol.api import ApiKey, check_request, check_response


async def start_controller(nursery, voters: frozenset[int] = frozenset({1})) -> QuorumController:
    """Node 1 of a quorum of `voters` (only node 1 runs), running in `nursery`."""
    network = MemoryNetwork(random.Random(1))
    await nursery.start(network.run)
    storage = MemoryStorage(Configuration(voters=voters))
    controller = QuorumController(raft_config(1), storage, network.endpoint(1), config=CONFIG)
    await nursery.start(controller.run)
    return controller


async def active_apis(nursery, **settings: Any) -> ControllerApis:
    controller = await start_controller(nursery)
    controller.driver.campaign()
    with trio.fail_after(10):
        await controller.wait_active()
    settings.setdefault("limits", Limits())
    return ControllerApis(controller, log_defaults=LogConfig(), **settings)


async def call(apis: ControllerApis, api_key: ApiKey, body: dict[str, Any]) -> dict[str, Any]:
    """Check the request as the server does, and the reply as the client does."""
    reply = await apis.handle(api_key, check_request(api_key, body))
    check_response(api_key, reply)
    return reply


def registration_body(broker_id: int, incarnation: str | None = None, **fields: Any) -> dict:
    body = {
        "broker_id": broker_id,
        "cluster_id": "",
        "incarnation_id": incarnation or str(uuid.uuid4()),
        "listeners": [{"name": "NATIVE", "host": "127.0.0.1", "port": 9000 + broker_id}],
        "rack": None,
    }
    body.update(fields)
    return body


async def register(apis: ControllerApis, broker_id: int, incarnation: str | None = None) -> int:
    reply = await call(apis, ApiKey.BROKER_REGISTRATION, registration_body(broker_id, incarnation))
    return reply["broker_epoch"]


async def heartbeat(
    apis: ControllerApis, broker_id: int, epoch: int, offset: int, *, shut_down: bool = False
) -> dict[str, Any]:
    body = {
        "broker_id": broker_id,
        "broker_epoch": epoch,
        "metadata_offset": offset,
        "want_shut_down": shut_down,
    }
    return await call(apis, ApiKey.BROKER_HEARTBEAT, body)


async def add_brokers(apis: ControllerApis, *broker_ids: int) -> dict[int, int]:
    """Register and unfence each broker; return their epochs."""
    epochs = {}
    for broker_id in broker_ids:
        epochs[broker_id] = await register(apis, broker_id)
        reply = await heartbeat(apis, broker_id, epochs[broker_id], epochs[broker_id])
        assert not reply["is_fenced"]
    return epochs


def topic_entry(name: str, partitions: int = 1, factor: int = 1, **configs: str) -> dict:
    return {
        "topic": name,
        "partitions": partitions,
        "replication_factor": factor,
        "configs": configs,
    }


async def create(apis: ControllerApis, *entries: dict, validate_only: bool = False) -> dict:
    body = {"topics": list(entries), "validate_only": validate_only}
    return await call(apis, ApiKey.CREATE_TOPICS, body)


def codes(reply: dict) -> list[tuple[str, int]]:
    return [(result["topic"], result["error_code"]) for result in reply["topics"]]


# Brokers.


async def test_register_gives_the_entry_index_as_epoch_and_a_retry_the_same(
    nursery, autojump_clock
):
    apis = await active_apis(nursery)
    controller = apis.controller
    before = controller.image.last_applied_index
    incarnation = str(uuid.uuid4())
    epoch = await register(apis, 7, incarnation)
    assert epoch == controller.image.last_applied_index > before, "the registering entry"
    broker = controller.image.brokers[7]
    assert broker.epoch == epoch and broker.fenced
    assert broker.incarnation_id == uuid.UUID(incarnation).bytes

    assert await register(apis, 7, incarnation) == epoch, "a retry of the same incarnation"
    assert controller.image.last_applied_index == epoch, "the retry committed nothing"

    again = await register(apis, 7)
    assert again > epoch, "a new incarnation registers anew"


async def test_register_refuses_a_bad_incarnation_and_another_cluster(nursery, autojump_clock):
    apis = await active_apis(nursery)
    before = apis.controller.image.last_applied_index
    with pytest.raises(DwalError) as caught:
        await call(apis, ApiKey.BROKER_REGISTRATION, registration_body(1, "not-a-uuid"))
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    body = registration_body(1, cluster_id="another-cluster")
    with pytest.raises(DwalError) as caught:
        await call(apis, ApiKey.BROKER_REGISTRATION, body)
    assert caught.value.code == ErrorCode.INCONSISTENT_CLUSTER_ID
    assert apis.controller.image.last_applied_index == before
    assert apis.controller.image.brokers == {}
    ours = registration_body(1, cluster_id=CONFIG.cluster_id)
    assert (await call(apis, ApiKey.BROKER_REGISTRATION, ours))["broker_epoch"] > before


async def test_heartbeat_unfences_once_the_broker_caught_up(nursery, autojump_clock):
    apis = await active_apis(nursery)
    epoch = await register(apis, 1)
    behind = await heartbeat(apis, 1, epoch, epoch - 1)
    assert behind == {"is_fenced": True, "should_shut_down": False}
    assert apis.controller.image.brokers[1].fenced
    caught_up = await heartbeat(apis, 1, epoch, epoch)
    assert caught_up == {"is_fenced": False, "should_shut_down": False}
    assert not apis.controller.image.brokers[1].fenced
    with pytest.raises(DwalError) as caught:
        await heartbeat(apis, 1, epoch - 1, epoch)
    assert caught.value.code == ErrorCode.STALE_BROKER_EPOCH
    with pytest.raises(DwalError) as caught:
        await heartbeat(apis, 99, epoch, epoch)
    assert caught.value.code == ErrorCode.BROKER_NOT_AVAILABLE


async def test_want_shut_down_fences_the_broker_and_tells_it_to_register_again(
    nursery, autojump_clock
):
    apis = await active_apis(nursery)
    epochs = await add_brokers(apis, 1)
    offset = apis.controller.image.last_applied_index
    reply = await heartbeat(apis, 1, epochs[1], offset, shut_down=True)
    assert reply == {"is_fenced": True, "should_shut_down": True}
    broker = apis.controller.image.brokers[1]
    assert broker.fenced and broker.shut_down
    again = await heartbeat(apis, 1, epochs[1], apis.controller.image.last_applied_index)
    assert again["should_shut_down"] and again["is_fenced"], "no unfencing a shut-down broker"


# Topics.


async def test_create_topics_answers_each_topic_in_order(nursery, autojump_clock):
    apis = await active_apis(nursery)
    await add_brokers(apis, 1, 2)
    reply = await create(
        apis,
        topic_entry("good", 2, 1),
        topic_entry("bad-config", **{"retention.ms": "soon"}),
        topic_entry("twice"),
        topic_entry("unknown-key", **{"no.such.key": "1"}),
        topic_entry("twice"),
        topic_entry("too-many-replicas", 1, 3),
        topic_entry("last"),
    )
    assert codes(reply) == [
        ("good", 0),
        ("bad-config", ErrorCode.INVALID_CONFIG),
        ("twice", ErrorCode.INVALID_REQUEST),
        ("unknown-key", ErrorCode.INVALID_CONFIG),
        ("twice", ErrorCode.INVALID_REQUEST),
        ("too-many-replicas", ErrorCode.INVALID_REPLICATION_FACTOR),
        ("last", 0),
    ]
    assert all(r.get("error_message") for r in reply["topics"] if r["error_code"])
    image = apis.controller.image
    assert sorted(image.topics) == ["good", "last"]
    assert reply["metadata_offset"] == image.last_applied_index, "the last change's entry"
    assert [len(p.replicas) for p in image.topics["good"].partitions] == [1, 1]

    again = await create(apis, topic_entry("good"))
    assert codes(again) == [("good", ErrorCode.TOPIC_ALREADY_EXISTS)]
    # Nothing committed; the offset is the image the refusal was decided on (a forwarding
    # broker waits for it, so it sees the topic that made the creation fail).
    assert apis.controller.image is image
    assert again["metadata_offset"] == image.last_applied_index


async def test_create_topics_keeps_valid_configs(nursery, autojump_clock):
    apis = await active_apis(nursery)
    await add_brokers(apis, 1)
    await create(apis, topic_entry("t", **{"retention.ms": "1000"}))
    image = apis.controller.image
    assert image.configs[(ConfigResourceType.TOPIC, "t")] == {"retention.ms": "1000"}


async def test_replication_factor_minus_one_takes_the_default(nursery, autojump_clock):
    apis = await active_apis(nursery)  # no default set: min(3, unfenced brokers)
    await add_brokers(apis, 1, 2)
    reply = await create(apis, topic_entry("two", 2, -1))
    assert codes(reply) == [("two", 0)]
    image = apis.controller.image
    assert [len(p.replicas) for p in image.topics["two"].partitions] == [2, 2]
    assert "min.insync.replicas" not in image.configs.get((ConfigResourceType.TOPIC, "two"), {})
    await add_brokers(apis, 3, 4)
    reply = await create(apis, topic_entry("three", 2, -1))
    image = apis.controller.image
    assert [len(p.replicas) for p in image.topics["three"].partitions] == [3, 3]
    # three copies: acks=all means two of them unless the request says otherwise
    configs = image.configs[(ConfigResourceType.TOPIC, "three")]
    assert configs["min.insync.replicas"] == "2"
    apis.default_replication_factor = 1  # the broker's default_replication_factor setting
    reply = await create(apis, topic_entry("one", 1, -1))
    assert [len(p.replicas) for p in apis.controller.image.topics["one"].partitions] == [1]


async def test_topics_max_is_a_policy_violation(nursery, autojump_clock):
    apis = await active_apis(nursery, limits=Limits(topics_max=2))
    await add_brokers(apis, 1)
    reply = await create(apis, topic_entry("a"), topic_entry("b"), topic_entry("c"))
    assert codes(reply) == [("a", 0), ("b", 0), ("c", ErrorCode.POLICY_VIOLATION)]
    again = await create(apis, topic_entry("a"))
    assert codes(again) == [("a", ErrorCode.TOPIC_ALREADY_EXISTS)], "an existing name"
    checked = await create(apis, topic_entry("d"), validate_only=True)
    assert codes(checked) == [("d", ErrorCode.POLICY_VIOLATION)]


async def test_validate_only_commits_nothing(nursery, autojump_clock):
    apis = await active_apis(nursery)
    await add_brokers(apis, 1)
    before = apis.controller.image
    reply = await create(
        apis,
        topic_entry("fine"),
        topic_entry("bad", **{"retention.ms": "x"}),
        topic_entry("too-many", 1, 2),
        validate_only=True,
    )
    assert codes(reply) == [
        ("fine", 0),
        ("bad", ErrorCode.INVALID_CONFIG),
        ("too-many", ErrorCode.INVALID_REPLICATION_FACTOR),
    ]
    assert reply["metadata_offset"] == before.last_applied_index, "nothing new committed"
    assert apis.controller.image is before


async def test_delete_topics_answers_each_topic(nursery, autojump_clock):
    apis = await active_apis(nursery)
    await add_brokers(apis, 1)
    await create(apis, topic_entry("a"), topic_entry("b"))
    reply = await call(apis, ApiKey.DELETE_TOPICS, {"topics": ["a", "missing", "b"]})
    assert codes(reply) == [("a", 0), ("missing", ErrorCode.UNKNOWN_TOPIC_OR_PARTITION), ("b", 0)]
    assert apis.controller.image.topics == {}
    assert reply["metadata_offset"] == apis.controller.image.last_applied_index


async def test_create_partitions_grows_refuses_and_validates(nursery, autojump_clock):
    apis = await active_apis(nursery)
    await add_brokers(apis, 1)
    await create(apis, topic_entry("a"), topic_entry("b", 2))
    body = {
        "topics": [
            {"topic": "a", "count": 3},
            {"topic": "b", "count": 2},
            {"topic": "missing", "count": 2},
        ],
        "validate_only": False,
    }
    reply = await call(apis, ApiKey.CREATE_PARTITIONS, body)
    assert codes(reply) == [
        ("a", 0),
        ("b", ErrorCode.INVALID_PARTITIONS),
        ("missing", ErrorCode.UNKNOWN_TOPIC_OR_PARTITION),
    ]
    image = apis.controller.image
    assert len(image.topics["a"].partitions) == 3
    assert reply["metadata_offset"] == image.last_applied_index

    body = {"topics": [{"topic": "b", "count": 5}], "validate_only": True}
    checked = await call(apis, ApiKey.CREATE_PARTITIONS, body)
    assert codes(checked) == [("b", 0)]
    assert checked["metadata_offset"] == image.last_applied_index, "nothing new committed"
    assert apis.controller.image is image


async def test_alter_configs_sets_deletes_and_validates(nursery, autojump_clock):
    apis = await active_apis(nursery)
    await add_brokers(apis, 1)
    await create(apis, topic_entry("t", **{"retention.ms": "1000", "segment.ms": "5000"}))
    key = (ConfigResourceType.TOPIC, "t")

    def body(**fields: Any) -> dict:
        return {"topic": "t", "set": {}, "delete": [], "validate_only": False, **fields}

    before = apis.controller.image
    checked = await call(
        apis, ApiKey.ALTER_CONFIGS, body(set={"retention.ms": "2000"}, validate_only=True)
    )
    assert checked == {
        "configs": {"retention.ms": "2000", "segment.ms": "5000"},
        "metadata_offset": before.last_applied_index,  # nothing new committed
    }
    assert apis.controller.image is before

    reply = await call(
        apis,
        ApiKey.ALTER_CONFIGS,
        body(set={"cleanup.policy": "compact"}, delete=["segment.ms", "not.set"]),
    )
    wanted = {"retention.ms": "1000", "cleanup.policy": "compact"}
    assert reply["configs"] == wanted
    assert apis.controller.image.configs[key] == wanted
    assert reply["metadata_offset"] == apis.controller.image.last_applied_index

    for bad in (body(set={"retention.ms": "never"}), body(set={"no.such": "1"})):
        with pytest.raises(DwalError) as caught:
            await call(apis, ApiKey.ALTER_CONFIGS, bad)
        assert caught.value.code == ErrorCode.INVALID_CONFIG
    with pytest.raises(DwalError) as caught:
        await call(apis, ApiKey.ALTER_CONFIGS, body(topic="missing"))
    assert caught.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    assert apis.controller.image.configs[key] == wanted


async def alter_partition(
    apis: ControllerApis, broker_id: int, epoch: int, topic: str, **partition: Any
) -> dict:
    body = {
        "broker_id": broker_id,
        "broker_epoch": epoch,
        "topics": [{"topic": topic, "partitions": [{"partition": 0, **partition}]}],
    }
    return await call(apis, ApiKey.ALTER_PARTITION, body)


async def test_alter_partition_and_elect_leaders(nursery, autojump_clock):
    """The preferred leader shuts down (leadership moves, it leaves the ISR), comes back,
    the leader adds it to the ISR (compare-and-swap on the partition epoch), and a
    preferred-leader election gives it its partition back."""
    apis = await active_apis(nursery)
    epochs = await add_brokers(apis, 1, 2)
    # Two replicas, committed directly: this test is about ISR changes and elections, not
    # about which replication factors CreateTopics accepts.
    new_topic = NewTopic(name="t", partitions=1, replication_factor=2, topic_id=uuid.uuid4().bytes)
    await apis.controller.submit(lambda image: create_topic(image, new_topic))
    preferred = apis.controller.image.topics["t"].partitions[0].replicas[0]
    other = 3 - preferred
    elect_body = {"topics": [{"topic": "t", "partitions": [0]}]}
    not_needed = await call(apis, ApiKey.ELECT_LEADERS, elect_body)
    result = not_needed["topics"][0]["partitions"][0]
    assert result["error_code"] == ErrorCode.ELECTION_NOT_NEEDED

    offset = apis.controller.image.last_applied_index
    await heartbeat(apis, preferred, epochs[preferred], offset, shut_down=True)
    epochs[preferred] = await register(apis, preferred)
    await heartbeat(apis, preferred, epochs[preferred], apis.controller.image.last_applied_index)
    state = apis.controller.image.topics["t"].partitions[0]
    assert state.leader == other and state.isr == (other,)

    unavailable = await call(apis, ApiKey.ELECT_LEADERS, elect_body)
    result = unavailable["topics"][0]["partitions"][0]
    assert result["error_code"] == ErrorCode.PREFERRED_LEADER_NOT_AVAILABLE

    stale = await alter_partition(
        apis,
        other,
        epochs[other],
        "t",
        leader_epoch=state.leader_epoch,
        partition_epoch=state.partition_epoch - 1,
        isr=[other, preferred],
    )
    result = stale["topics"][0]["partitions"][0]
    assert result["error_code"] == ErrorCode.INVALID_UPDATE_VERSION
    assert stale["metadata_offset"] == apis.controller.image.last_applied_index
    assert apis.controller.image.topics["t"].partitions[0] == state, "refused: unchanged"

    grown = await alter_partition(
        apis,
        other,
        epochs[other],
        "t",
        leader_epoch=state.leader_epoch,
        partition_epoch=state.partition_epoch,
        isr=[other, preferred],
    )
    result = grown["topics"][0]["partitions"][0]
    after = apis.controller.image.topics["t"].partitions[0]
    assert result == {
        "partition": 0,
        "error_code": 0,
        "leader": other,
        "leader_epoch": state.leader_epoch,
        "partition_epoch": state.partition_epoch + 1,
        "isr": [other, preferred],
    }
    assert after.isr == (other, preferred)
    assert grown["metadata_offset"] == apis.controller.image.last_applied_index

    unknown = await alter_partition(
        apis, other, epochs[other], "missing", leader_epoch=0, partition_epoch=0, isr=[other]
    )
    result = unknown["topics"][0]["partitions"][0]
    assert result["error_code"] == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION

    elected = await call(apis, ApiKey.ELECT_LEADERS, {"topics": None})
    assert elected["topics"] == [{"topic": "t", "partitions": [{"partition": 0, "error_code": 0}]}]
    assert elected["metadata_offset"] == apis.controller.image.last_applied_index
    final = apis.controller.image.topics["t"].partitions[0]
    assert final.leader == preferred and final.leader_epoch == state.leader_epoch + 1
    nothing = await call(apis, ApiKey.ELECT_LEADERS, {"topics": None})
    assert nothing["topics"] == [], "every preferred leader leads"


async def test_allocate_producer_ids_gives_disjoint_blocks_to_registered_brokers(
    nursery, autojump_clock
):
    apis = await active_apis(nursery)
    epochs = {broker_id: await register(apis, broker_id) for broker_id in (1, 2)}
    blocks = []
    for broker_id in (1, 2, 1):
        body = {"broker_id": broker_id, "broker_epoch": epochs[broker_id]}
        reply = await call(apis, ApiKey.ALLOCATE_PRODUCER_IDS, body)
        blocks.append((reply["producer_id_start"], reply["producer_id_len"]))
        assert reply["metadata_offset"] == apis.controller.image.last_applied_index
    assert blocks == [(0, 1000), (1000, 1000), (2000, 1000)]
    assert apis.controller.image.next_producer_id == 3000
    with pytest.raises(DwalError) as caught:
        await call(apis, ApiKey.ALLOCATE_PRODUCER_IDS, {"broker_id": 1, "broker_epoch": 999})
    assert caught.value.code == ErrorCode.STALE_BROKER_EPOCH
    with pytest.raises(DwalError) as caught:
        await call(apis, ApiKey.ALLOCATE_PRODUCER_IDS, {"broker_id": 7, "broker_epoch": 1})
    assert caught.value.code == ErrorCode.BROKER_NOT_AVAILABLE
    assert apis.controller.image.next_producer_id == 3000, "a refusal hands out nothing"


async def test_describe_cluster_lists_brokers_voters_and_learners_with_lag(nursery, autojump_clock):
    apis = await active_apis(nursery)
    epochs = await add_brokers(apis, 5)
    await apis.controller.driver.propose_config_change(
        ConfigChange(kind=ConfigChangeKind.ADD_LEARNER, node_id=4)
    )
    reply = await call(apis, ApiKey.DESCRIBE_CLUSTER, {})
    last_index = apis.controller.driver.node.last_index
    assert reply["cluster_id"] == CONFIG.cluster_id
    assert reply["controller_id"] == 1
    assert reply["metadata_offset"] == apis.controller.image.last_applied_index
    assert reply["brokers"] == [
        {
            "node_id": 5,
            "epoch": epochs[5],
            "fenced": False,
            "shut_down": False,
            "rack": None,
            "listeners": [{"name": "NATIVE", "host": "127.0.0.1", "port": 9005}],
            "decommissioned": False,
            "partitions": 0,
        }
    ]
    assert reply["voters"] == [{"node_id": 1, "match_index": last_index, "lag": 0}]
    [learner] = reply["learners"]
    assert learner["node_id"] == 4
    assert learner["lag"] == last_index - learner["match_index"] > 0, "node 4 never answered"


# A node that is not the active controller.


async def inactive_apis(nursery) -> ControllerApis:
    """Node 1 of two voters, alone: it can never become the active controller."""
    controller = await start_controller(nursery, frozenset({1, 2}))
    await trio.sleep(1)  # elections time out: still no leader
    assert controller.active_term is None
    return ControllerApis(controller, log_defaults=LogConfig(), limits=Limits())


NOT_CONTROLLER_BODIES = {
    ApiKey.BROKER_REGISTRATION: registration_body(1),
    ApiKey.BROKER_HEARTBEAT: {"broker_id": 1, "broker_epoch": 1, "metadata_offset": 1},
    ApiKey.CREATE_TOPICS: {"topics": [topic_entry("a"), topic_entry("b")]},
    ApiKey.DELETE_TOPICS: {"topics": ["a", "b"]},
    ApiKey.CREATE_PARTITIONS: {"topics": [{"topic": "a", "count": 2}]},
    ApiKey.ELECT_LEADERS: {"topics": None},
    ApiKey.ALTER_PARTITION_REASSIGNMENTS: {
        "topics": [{"topic": "a", "partitions": [{"partition": 0, "replicas": [1]}]}]
    },
    ApiKey.LIST_PARTITION_REASSIGNMENTS: {"topics": None},
    ApiKey.DECOMMISSION_BROKER: {"broker_id": 1},
    ApiKey.DESCRIBE_CLUSTER: {},
    ApiKey.ALLOCATE_PRODUCER_IDS: {"broker_id": 1, "broker_epoch": 1},
}


@pytest.mark.parametrize("api_key", list(NOT_CONTROLLER_BODIES), ids=lambda key: key.name)
async def test_a_node_that_is_not_active_raises_not_controller(api_key, nursery, autojump_clock):
    apis = await inactive_apis(nursery)
    with pytest.raises(NotControllerError) as caught:
        await call(apis, api_key, NOT_CONTROLLER_BODIES[api_key])
    assert caught.value.code == ErrorCode.NOT_CONTROLLER and caught.value.retriable


# Regression (fixed): these requests were answered from the image of a node that is not the
# active controller, which may be stale, instead of NOT_CONTROLLER as the module docstring
# promises; a forwarded request reaching a node that had just lost the leadership got a
# definitive (and possibly wrong) answer, which ControllerChannel does not retry.
STALE_IMAGE_BODIES = {
    "alter_configs_unknown_topic": (
        ApiKey.ALTER_CONFIGS,
        {"topic": "t", "set": {"retention.ms": "1"}},
    ),
    "alter_configs_validate_only": (
        ApiKey.ALTER_CONFIGS,
        {"topic": "t", "set": {"retention.ms": "1"}, "validate_only": True},
    ),
    "create_topics_validate_only": (
        ApiKey.CREATE_TOPICS,
        {"topics": [topic_entry("t")], "validate_only": True},
    ),
    "create_partitions_validate_only": (
        ApiKey.CREATE_PARTITIONS,
        {"topics": [{"topic": "t", "count": 2}], "validate_only": True},
    ),
    "alter_partition_unknown_topic": (
        ApiKey.ALTER_PARTITION,
        {
            "broker_id": 1,
            "broker_epoch": 1,
            "topics": [
                {
                    "topic": "t",
                    "partitions": [
                        {"partition": 0, "leader_epoch": 0, "partition_epoch": 0, "isr": [1]}
                    ],
                }
            ],
        },
    ),
}


@pytest.mark.parametrize("case", list(STALE_IMAGE_BODIES))
async def test_a_non_active_node_answers_not_controller_even_where_its_image_would_do(
    case, nursery, autojump_clock
):
    apis = await inactive_apis(nursery)
    api_key, body = STALE_IMAGE_BODIES[case]
    with pytest.raises(NotControllerError):
        reply = await call(apis, api_key, body)
        pytest.fail(f"answered {reply} from a non-active node's image")
