"""The group coordinator shell (broker/group_coordinator.py) driven directly, without sockets:
request bodies in, answers or DwalError out, committed offsets kept in __consumer_offsets
and replayed at start. The group state machine has its own tests (tests/broker/groups); these
check what the shell adds: ownership checks on commits, durability and replay of offsets
and tombstones, expiry driven by its loop, and the translation of requests.

The coordinator is that of a whole running node (`running_node`): __consumer_offsets is
created through its controller, and the coordinator coordinates the groups of the offsets
partitions the node leads, loaded as the metadata publisher shows it leads them. A restart
is a new node on the same data directory, which replays the offsets at start.

The shell reads the wall clock through `broker.group_coordinator.now_ms`; tests that need
time to pass replace it with trio's (MockClock) clock, so sessions expire in virtual time.
Nodes start and topics are created at the real clock's pace (`at_real_pace`).
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from broker_test_support import at_real_pace, create_topic, running_node

import broker.group_coordinator as group_coordinator_module
from broker.group_coordinator import OFFSETS_TOPIC, offset_key
from broker.node import BrokerNode
from broker.storage import LogConfig
from protocol import ApiKey, DwalError, ErrorCode, build_batch, check_request

SESSION_TIMEOUT_MS = 1_000


class Coordinator:
    """The GroupCoordinator of a running node, with helpers to call it."""

    def __init__(self, node: BrokerNode) -> None:
        self.node = node
        self.coordinator = node.coordinator

    def heartbeat(self, group_id="g", member_id=None, epoch=0, **fields) -> dict:
        body = {"group_id": group_id, "member_id": member_id, "member_epoch": epoch, **fields}
        checked = check_request(ApiKey.CONSUMER_GROUP_HEARTBEAT, body)
        return self.coordinator.heartbeat(checked, "client", "127.0.0.1")

    def join(self, *topics: str, group_id="g", instance_id=None) -> dict:
        return self.heartbeat(
            group_id,
            subscribed_topic_names=list(topics),
            instance_id=instance_id,
            rebalance_timeout_ms=5_000,
        )

    async def commit(
        self, offsets: dict[tuple[str, int], int], group_id="g", member_id=None, epoch=-1
    ) -> dict[tuple[str, int], int]:
        """Commit; returns each partition's error code."""
        topics: dict[str, list] = {}
        for (topic, partition), offset in offsets.items():
            topics.setdefault(topic, []).append({"partition": partition, "offset": offset})
        body = {
            "group_id": group_id,
            "member_id": member_id,
            "member_epoch": epoch,
            "topics": [{"topic": t, "partitions": p} for t, p in topics.items()],
        }
        reply = await self.coordinator.commit(check_request(ApiKey.OFFSET_COMMIT, body))
        return {
            (t["topic"], p["partition"]): p["error_code"]
            for t in reply["topics"]
            for p in t["partitions"]
        }

    def committed(self, *partitions: tuple[str, int], group_id="g") -> dict:
        topics: dict[str, list[int]] = {}
        for topic, partition in partitions:
            topics.setdefault(topic, []).append(partition)
        body = {
            "group_id": group_id,
            "topics": [{"topic": t, "partitions": p} for t, p in topics.items()]
            if partitions
            else None,
        }
        reply = self.coordinator.fetch_offsets(check_request(ApiKey.OFFSET_FETCH, body))
        return {
            (t["topic"], p["partition"]): p["offset"]
            for t in reply["topics"]
            for p in t["partitions"]
        }

    async def delete(self, *group_ids: str) -> list[int]:
        body = check_request(ApiKey.DELETE_GROUPS, {"group_ids": list(group_ids)})
        reply = await self.coordinator.delete_groups(body)
        return [g["error_code"] for g in reply["groups"]]

    def describe(self, group_id="g") -> dict:
        body = check_request(ApiKey.CONSUMER_GROUP_DESCRIBE, {"group_ids": [group_id]})
        return self.coordinator.describe_groups(body)["groups"][0]


@contextlib.asynccontextmanager
async def open_coordinator(data_dir: pathlib.Path) -> AsyncIterator[Coordinator]:
    """A running node over `data_dir` (kept across restarts), with topics "a" (2 partitions)
    and "b" (1) and __consumer_offsets (2 partitions, both led here: created up front, as
    the handlers do before a group's first heartbeat); stopped when the block exits."""
    async with contextlib.AsyncExitStack() as stack:
        with at_real_pace():
            node = await stack.enter_async_context(
                running_node(
                    data_dir,
                    LogConfig(fsync="never"),
                    offsets_topic_partitions=2,
                    group_session_timeout_ms=SESSION_TIMEOUT_MS,
                    group_heartbeat_interval_ms=100,
                )
            )
            for name, partitions in (("a", 2), ("b", 1)):
                if name not in node.registry.topics:
                    await create_topic(node, name, partitions)
            await node.coordinator.ensure_offsets_topic()
        assert node.coordinator.loaded_partitions == {0, 1}
        yield Coordinator(node)


@pytest.fixture
async def node(tmp_path) -> AsyncIterator[Coordinator]:
    async with open_coordinator(tmp_path / "data") as node:
        yield node


def replayed_records(caplog: pytest.LogCaptureFixture) -> int:
    """How many __consumer_offsets records the coordinator replayed, as it reports them."""
    return sum(
        record.fields["records"]  # type: ignore[attr-defined]
        for record in caplog.records
        if record.getMessage() == "group_offsets_loaded"
    )


def assigned(response: dict) -> set[tuple[str, int]]:
    return {(t["topic"], p) for t in response["assignment"] or () for p in t["partitions"]}


def error_of(call) -> ErrorCode:
    with pytest.raises(DwalError) as caught:
        call()
    return caught.value.code


# -- commits ----------------------------------------------------------------------------


async def test_a_member_commits_only_partitions_it_owns(node):
    member = node.join("a")
    assert assigned(member) == {("a", 0), ("a", 1)}
    results = await node.commit(
        {("a", 0): 5, ("b", 0): 7}, member_id=member["member_id"], epoch=member["member_epoch"]
    )
    assert results == {("a", 0): ErrorCode.NONE, ("b", 0): ErrorCode.PARTITION_NOT_OWNED}
    assert node.committed(("a", 0), ("b", 0)) == {("a", 0): 5, ("b", 0): -1}


async def test_a_member_cannot_commit_for_a_partition_another_member_owns(node):
    first = node.join("a")
    second = node.join("b")
    assert assigned(second) == {("b", 0)}
    results = await node.commit(
        {("b", 0): 3}, member_id=first["member_id"], epoch=first["member_epoch"]
    )
    assert results == {("b", 0): ErrorCode.PARTITION_NOT_OWNED}
    results = await node.commit(
        {("b", 0): 3}, member_id=second["member_id"], epoch=second["member_epoch"]
    )
    assert results == {("b", 0): ErrorCode.NONE}
    assert node.committed(("b", 0)) == {("b", 0): 3}


async def commit_error(node: Coordinator, **fields) -> ErrorCode:
    with pytest.raises(DwalError) as caught:
        await node.commit({("a", 0): 1}, **fields)
    return caught.value.code


async def test_commits_from_unknown_or_stale_members_are_refused(node):
    first = node.join("a")
    member_id, epoch = first["member_id"], first["member_epoch"]
    assert await commit_error(node, member_id="ghost", epoch=epoch) == ErrorCode.UNKNOWN_MEMBER_ID
    assert await commit_error(node) == ErrorCode.UNKNOWN_MEMBER_ID  # the group has members
    code = await commit_error(node, member_id=member_id, epoch=epoch + 1)
    assert code == ErrorCode.FENCED_MEMBER_EPOCH
    assert await commit_error(node, group_id="empty", member_id="x") == ErrorCode.UNKNOWN_MEMBER_ID
    # A second member makes the first give up a partition; its epoch then moves on.
    node.join("a")
    told = node.heartbeat(
        member_id=member_id, epoch=epoch, owned_partitions=[{"topic": "a", "partitions": [0, 1]}]
    )
    kept = sorted(p for _, p in assigned(told))
    released = node.heartbeat(
        member_id=member_id, epoch=epoch, owned_partitions=[{"topic": "a", "partitions": kept}]
    )
    assert released["member_epoch"] > epoch
    assert (
        await commit_error(node, member_id=member_id, epoch=epoch) == ErrorCode.STALE_MEMBER_EPOCH
    )
    assert node.committed(("a", 0)) == {("a", 0): -1}  # nothing was written


async def test_commit_checks_every_partition(node):
    results = await node.commit({("a", 0): -1, ("a", 9): 1, ("nope", 0): 1, ("a", 1): 4})
    assert results == {
        ("a", 0): ErrorCode.INVALID_REQUEST,
        ("a", 9): ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
        ("nope", 0): ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
        ("a", 1): ErrorCode.NONE,
    }
    assert node.committed(("a", 0), ("a", 1)) == {("a", 0): -1, ("a", 1): 4}


# -- offsets survive restarts, deletions too ---------------------------------------------


async def test_committed_offsets_survive_a_restart_and_the_latest_wins(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dwal.groups")
    async with open_coordinator(tmp_path / "data") as node:
        await node.commit({("a", 0): 5, ("a", 1): 6})
        await node.commit({("a", 0): 7})
        await node.commit({("b", 0): 1}, group_id="other")
    caplog.clear()
    async with open_coordinator(tmp_path / "data") as node:  # a restart: replays the offsets
        assert replayed_records(caplog) == 4
        assert node.committed(("a", 0), ("a", 1)) == {("a", 0): 7, ("a", 1): 6}
        assert node.committed(group_id="other") == {("b", 0): 1}


async def test_a_deleted_group_stays_deleted_after_a_restart(tmp_path):
    async with open_coordinator(tmp_path / "data") as node:
        await node.commit({("a", 0): 5, ("b", 0): 6}, group_id="gone")
        await node.commit({("a", 0): 9}, group_id="kept")
        assert await node.delete("gone") == [ErrorCode.NONE]
    async with open_coordinator(tmp_path / "data") as node:
        assert node.committed(("a", 0), ("b", 0), group_id="gone") == {
            ("a", 0): -1,
            ("b", 0): -1,
        }
        groups = node.coordinator.list_groups()["groups"]
        assert [g["group_id"] for g in groups] == ["kept"]
        assert node.describe("gone")["error_code"] == ErrorCode.GROUP_ID_NOT_FOUND
        assert await node.delete("gone") == [ErrorCode.GROUP_ID_NOT_FOUND]
        assert node.committed(("a", 0), group_id="kept") == {("a", 0): 9}


async def test_a_commit_after_a_deletion_survives_a_restart(tmp_path):
    async with open_coordinator(tmp_path / "data") as node:
        await node.commit({("a", 0): 5})
        assert await node.delete("g") == [ErrorCode.NONE]
        await node.commit({("a", 1): 2})
    async with open_coordinator(tmp_path / "data") as node:
        assert node.committed() == {("a", 1): 2}


async def test_replay_skips_records_it_does_not_understand(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dwal.groups")
    async with open_coordinator(tmp_path / "data") as node:
        await node.commit({("a", 0): 5})
        partition = node.coordinator.partition_of("g")
        foreign = build_batch(
            [
                (0, b"not msgpack \xc1", b"x"),
                (0, None, b"keyless"),
                (0, offset_key("g", "a", 1), b"\xc1 not msgpack"),
            ]
        )
        node.node.replicas.append(OFFSETS_TOPIC, partition, bytearray(foreign), now_ms=0)
    caplog.clear()
    async with open_coordinator(tmp_path / "data") as node:
        assert replayed_records(caplog) == 4  # read past the foreign records, not stopped
        assert node.committed(("a", 0), ("a", 1)) == {("a", 0): 5, ("a", 1): -1}


# -- fetching offsets, administering groups ----------------------------------------------


async def test_offset_fetch_for_an_unknown_group_answers_minus_one(node):
    assert node.committed(("a", 0), ("b", 0), group_id="never-seen") == {
        ("a", 0): -1,
        ("b", 0): -1,
    }
    assert node.committed(group_id="never-seen") == {}


async def test_group_ids_are_checked(node):
    for group_id in ("", "x" * 256):
        assert error_of(lambda: node.join("a", group_id=group_id)) == ErrorCode.INVALID_GROUP_ID
        assert error_of(lambda: node.committed(group_id=group_id)) == ErrorCode.INVALID_GROUP_ID


async def test_a_group_with_members_cannot_be_deleted(node):
    member = node.join("a")
    assert await node.delete("g", "unknown") == [
        ErrorCode.NON_EMPTY_GROUP,
        ErrorCode.GROUP_ID_NOT_FOUND,
    ]
    node.heartbeat(member_id=member["member_id"], epoch=-1)  # leaves
    assert await node.delete("g") == [ErrorCode.NONE]
    assert node.describe()["error_code"] == ErrorCode.GROUP_ID_NOT_FOUND


# -- membership through the shell ---------------------------------------------------------


async def test_an_unknown_member_with_an_epoch_creates_no_group(node):
    code = error_of(lambda: node.heartbeat(member_id="ghost", epoch=3))
    assert code == ErrorCode.UNKNOWN_MEMBER_ID
    code = error_of(lambda: node.heartbeat(subscribed_topic_regex="(", rebalance_timeout_ms=1))
    assert code == ErrorCode.INVALID_REGULAR_EXPRESSION
    assert node.coordinator.list_groups()["groups"] == []


async def test_a_heartbeat_with_a_stale_or_future_epoch_is_fenced(node):
    member = node.join("a")
    member_id, epoch = member["member_id"], member["member_epoch"]
    node.join("b")  # the group epoch moves on
    code = error_of(lambda: node.heartbeat(member_id=member_id, epoch=epoch + 5))
    assert code == ErrorCode.FENCED_MEMBER_EPOCH
    again = node.heartbeat(member_id=member_id, epoch=epoch)  # its own epoch is still fine
    assert again["member_id"] == member_id


async def test_a_static_member_rejoins_with_its_partitions(node):
    first = node.join("a", instance_id="instance-1")
    owned = assigned(first)
    assert owned == {("a", 0), ("a", 1)}
    node.heartbeat(member_id=first["member_id"], epoch=-2, instance_id="instance-1")
    group_epoch = node.describe()["group_epoch"]
    again = node.join("a", instance_id="instance-1")
    assert again["member_id"] != first["member_id"]
    assert assigned(again) == owned
    assert node.describe()["group_epoch"] == group_epoch  # no rebalance
    code = error_of(lambda: node.join("a", instance_id="instance-1"))
    assert code == ErrorCode.UNRELEASED_INSTANCE_ID


async def test_a_member_that_stops_heartbeating_expires(node, autojump_clock, monkeypatch):
    monkeypatch.setattr(group_coordinator_module, "now_ms", lambda: int(trio.current_time() * 1000))
    quiet = node.join("a")
    steady = node.join("a")
    assert assigned(quiet) and not assigned(steady)
    for _ in range(3 * SESSION_TIMEOUT_MS // 100):  # `steady` heartbeats, `quiet` does not
        await trio.sleep(0.1)  # virtual time: the node's expiry loop runs meanwhile
        steady = node.heartbeat(member_id=steady["member_id"], epoch=steady["member_epoch"])
    members = [m["member_id"] for m in node.describe()["members"]]
    assert members == [steady["member_id"]]
    assert assigned(steady) == {("a", 0), ("a", 1)}
    code = error_of(lambda: node.heartbeat(member_id=quiet["member_id"], epoch=1))
    assert code == ErrorCode.UNKNOWN_MEMBER_ID


async def test_a_new_topic_reaches_a_regex_subscriber_through_the_expiry_loop(
    node, autojump_clock, monkeypatch
):
    # Group time stands still: the member, which does not heartbeat until the end, cannot
    # expire while the topic is created (at the real clock's pace, however long that takes).
    monkeypatch.setattr(group_coordinator_module, "now_ms", lambda: 0)
    member = node.heartbeat(subscribed_topic_regex="new-.*", rebalance_timeout_ms=5_000)
    assert assigned(member) == set()
    await trio.sleep(0.3)  # virtual time: a pass of the node's loop learns the topics there are
    with at_real_pace():  # a controller call: see at_real_pace
        await create_topic(node.node, "new-topic", 2)
    await trio.sleep(0.3)  # virtual time: the next pass of the loop, no heartbeat
    # the loop, not a heartbeat, told the group: its target already has the new topic
    [described] = node.describe()["members"]
    assert described["target_assignment"] == [{"topic": "new-topic", "partitions": [0, 1]}]
    member = node.heartbeat(member_id=member["member_id"], epoch=member["member_epoch"])
    assert assigned(member) == {("new-topic", 0), ("new-topic", 1)}


async def test_a_large_offsets_partition_loads_in_the_background(node, monkeypatch):
    """Past LOAD_INLINE_BYTES_MAX a newly led offsets partition loads off the publisher's
    path: its groups get COORDINATOR_LOAD_IN_PROGRESS (retriable) until it is loaded, then
    their committed offsets are there."""
    await node.commit({("a", 0): 7})
    coordinator = node.coordinator
    partition = coordinator.partition_of("g")
    release = trio.Event()
    real_load = coordinator._load_partition

    async def held_load(log, into):
        await release.wait()
        return await real_load(log, into)

    monkeypatch.setattr(group_coordinator_module, "LOAD_INLINE_BYTES_MAX", 0)
    monkeypatch.setattr(coordinator, "_load_partition", held_load)
    coordinator._unload_partition(partition)  # as when leadership moved away and came back
    image = node.node.member.image
    await coordinator.apply_image(image, image)
    with pytest.raises(DwalError) as caught:
        node.heartbeat("g")
    assert caught.value.code == ErrorCode.COORDINATOR_LOAD_IN_PROGRESS
    assert caught.value.retriable
    release.set()
    with trio.fail_after(10):
        while partition not in coordinator.loaded_partitions:
            await trio.sleep(0.01)
    assert coordinator.offsets["g"][("a", 0)].offset == 7
    assert node.heartbeat("g")["member_epoch"] >= 1  # served again
