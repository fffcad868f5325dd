"""Unit and property tests of the core's parts: the message codec, RaftConfig, MemoryStorage,
RaftLog, progress and the Ready/advance contract."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.raft import (
    CompactedError,
    ConfigChange,
    ConfigChangeKind,
    Configuration,
    Entry,
    EntryKind,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    RaftConfig,
    RaftNode,
    Snapshot,
    UnavailableError,
    decode_config_change,
    decode_message,
    encode_config_change,
    encode_message,
)
from broker.raft.progress import Progress, ProgressState
from broker.raft.raft_log import RaftLog
from protocol import ProtocolError

VOTERS = Configuration(voters=frozenset({1, 2, 3}))

# -- codec ------------------------------------------------------------------------------------

node_ids = st.integers(min_value=1, max_value=2**64 - 1)
uint64 = st.integers(min_value=0, max_value=2**64 - 1)
small = st.integers(min_value=0, max_value=1000)


@st.composite
def appends(draw):
    term = draw(st.integers(min_value=1, max_value=1000))
    index = draw(small)
    log_term = draw(st.integers(min_value=0, max_value=term))
    terms = sorted(draw(st.lists(st.integers(min_value=max(log_term, 1), max_value=term))))
    entries = tuple(
        Entry(
            term=t,
            index=index + 1 + i,
            kind=draw(st.sampled_from(EntryKind)),
            data=draw(st.binary(max_size=20)),
        )
        for i, t in enumerate(terms)
    )
    return Message(
        type=MessageType.APPEND,
        source=1,
        target=2,
        term=term,
        index=index,
        log_term=log_term,
        entries=entries,
        commit=draw(uint64),
    )


@st.composite
def snapshot_messages(draw):
    members = draw(st.lists(node_ids, unique=True, max_size=6))
    split = draw(st.integers(min_value=0, max_value=len(members)))
    snapshot = Snapshot(
        index=draw(st.integers(min_value=1, max_value=2**64 - 1)),
        term=draw(uint64),
        configuration=Configuration(
            voters=frozenset(members[:split]), learners=frozenset(members[split:])
        ),
        data=draw(st.binary(max_size=50)),
    )
    return Message(
        type=MessageType.SNAPSHOT, source=3, target=1, term=draw(node_ids), snapshot=snapshot
    )


@st.composite
def other_messages(draw):
    kind = draw(
        st.sampled_from(
            [
                t
                for t in MessageType
                if t not in (MessageType.APPEND, MessageType.SNAPSHOT, MessageType.PROPOSE)
            ]
        )
    )
    source, target = draw(st.lists(node_ids, min_size=2, max_size=2, unique=True))
    term = (
        0 if kind == MessageType.READ_INDEX else draw(st.integers(min_value=1, max_value=2**64 - 1))
    )
    return Message(
        type=kind,
        source=source,
        target=target,
        term=term,
        log_term=draw(uint64),
        index=draw(uint64),
        commit=draw(uint64),
        reject=draw(st.booleans()),
        reject_hint=draw(uint64),
        context=draw(st.binary(max_size=16)),
    )


@st.composite
def proposals(draw):
    data = draw(st.lists(st.binary(max_size=10), min_size=1, max_size=4))
    return Message(
        type=MessageType.PROPOSE,
        source=2,
        target=1,
        term=0,
        entries=tuple(Entry(term=0, index=0, data=d) for d in data),
    )


@settings(max_examples=200, deadline=None)
@given(st.one_of(appends(), snapshot_messages(), other_messages(), proposals()))
def test_encode_decode_round_trip(message):
    assert decode_message(encode_message(message)) == message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_error(data):
    try:
        decode_message(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(appends(), st.data())
def test_corrupted_messages_raise_only_protocol_error(message, data):
    encoded = bytearray(encode_message(message))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        position = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
        encoded[position] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded)))
    try:
        decode_message(bytes(encoded[:cut]))
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(min_value=-(2**63), max_value=2**64 - 1),
            st.binary(max_size=8),
            st.text(max_size=4),
            st.lists(st.integers(min_value=0, max_value=5), max_size=3),
        ),
        min_size=13,
        max_size=13,
    )
)
def test_well_formed_msgpack_of_wrong_shape_raises_only_protocol_error(fields):
    fields[0] = 1
    try:
        decode_message(msgpack.packb(fields, use_bin_type=True))
    except ProtocolError:
        pass


@pytest.mark.parametrize(
    "message",
    [
        # APPEND entries not following the anchor index.
        Message(
            type=MessageType.APPEND,
            source=1,
            target=2,
            term=2,
            index=5,
            entries=(Entry(term=2, index=7),),
        ),
        # Entry terms going down.
        Message(
            type=MessageType.APPEND,
            source=1,
            target=2,
            term=3,
            index=0,
            entries=(Entry(term=3, index=1), Entry(term=2, index=2)),
        ),
        # Entry term beyond the message's term.
        Message(
            type=MessageType.APPEND, source=1, target=2, term=2, entries=(Entry(term=3, index=1),)
        ),
        Message(type=MessageType.HEARTBEAT, source=1, target=1, term=2),
        Message(type=MessageType.HEARTBEAT, source=1, target=2, term=0),
        Message(type=MessageType.SNAPSHOT, source=1, target=2, term=2),
        Message(
            type=MessageType.VOTE, source=1, target=2, term=2, entries=(Entry(term=1, index=1),)
        ),
    ],
)
def test_inconsistent_messages_are_protocol_errors(message):
    with pytest.raises(ProtocolError):
        decode_message(encode_message(message))


def test_unknown_format_version_or_type_is_a_protocol_error():
    encoded = msgpack.unpackb(
        encode_message(Message(type=MessageType.HEARTBEAT, source=1, target=2, term=1))
    )
    for position, value in ((0, 2), (1, 99), (2, 0), (9, 1)):
        fields = list(encoded)
        fields[position] = value
        with pytest.raises(ProtocolError):
            decode_message(msgpack.packb(fields, use_bin_type=True))


@pytest.mark.parametrize("kind", list(ConfigChangeKind))
def test_config_change_round_trip(kind):
    change = ConfigChange(kind=kind, node_id=7)
    assert decode_config_change(encode_config_change(change)) == change


@pytest.mark.parametrize("data", [b"", b"\x90", msgpack.packb([9, 1]), msgpack.packb([0, 0])])
def test_bad_config_change_is_a_protocol_error(data):
    with pytest.raises(ProtocolError):
        decode_config_change(data)


def test_configuration_apply():
    config = Configuration(voters=frozenset({1, 2}), learners=frozenset({3}))
    promote = config.apply(ConfigChange(kind=ConfigChangeKind.ADD_VOTER, node_id=3))
    assert promote == Configuration(voters=frozenset({1, 2, 3}))
    removed = config.apply(ConfigChange(kind=ConfigChangeKind.REMOVE_VOTER, node_id=2))
    assert removed.voters == {1} and removed.learners == {3}


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"node_id": 0},
        {"heartbeat_ticks": 0},
        {"election_ticks": 1, "heartbeat_ticks": 1},
        {"max_append_entries": 0},
        {"max_inflight_appends": 0},
        {"max_uncommitted_bytes": 10, "max_append_bytes": 100},
        {"max_pending_reads": 0},
    ],
)
def test_config_validate_rejects_bad_settings(overrides):
    config = RaftConfig(**{"node_id": 1, **overrides})
    with pytest.raises(ValueError):
        config.validate()
    with pytest.raises(ValueError):
        RaftNode(config, MemoryStorage(VOTERS), random.Random(0))


def test_default_config_is_valid():
    RaftConfig(node_id=1).validate()


# -- MemoryStorage ----------------------------------------------------------------------------


def entries(first: int, terms: list[int]) -> list[Entry]:
    return [Entry(term=t, index=first + i, data=b"%d" % (first + i)) for i, t in enumerate(terms)]


def test_memory_storage_append_replaces_the_suffix():
    storage = MemoryStorage(VOTERS)
    assert (storage.first_index(), storage.last_index(), storage.term(0)) == (1, 0, 0)
    storage.append(entries(1, [1, 1, 1]))
    storage.append(entries(2, [2]))
    assert storage.last_index() == 2
    assert [e.term for e in storage.entries(1, 3)] == [1, 2]
    with pytest.raises(UnavailableError):
        storage.entries(1, 4)
    with pytest.raises(UnavailableError):
        storage.term(3)


def test_memory_storage_max_bytes_returns_at_least_one_entry():
    storage = MemoryStorage(VOTERS)
    storage.append(entries(1, [1] * 5))
    assert len(storage.entries(1, 6, max_bytes=1)) == 1
    assert len(storage.entries(1, 6, max_bytes=10_000)) == 5


def test_memory_storage_snapshot_and_compact():
    storage = MemoryStorage(VOTERS)
    storage.append(entries(1, [1, 1, 2, 2]))
    snapshot = storage.create_snapshot(3, VOTERS, b"state")
    assert (snapshot.index, snapshot.term) == (3, 2)
    storage.compact(3)
    assert storage.first_index() == 4 and storage.term(3) == 2
    with pytest.raises(CompactedError):
        storage.term(2)
    with pytest.raises(CompactedError):
        storage.entries(3, 4)
    storage.append(entries(2, [1, 1, 2, 3]))  # the covered prefix is ignored
    assert [e.term for e in storage.entries(4, 6)] == [2, 3]
    other = Snapshot(index=10, term=4, configuration=VOTERS, data=b"x")
    storage.apply_snapshot(other)
    assert (storage.first_index(), storage.last_index()) == (11, 10)
    assert storage.initial_state() == (HardState(), VOTERS)


# -- RaftLog ----------------------------------------------------------------------------------


def test_raft_log_reads_across_storage_and_the_unstable_tail():
    storage = MemoryStorage(VOTERS)
    storage.append(entries(1, [1, 1, 1]))
    log = RaftLog(storage)
    log.append(entries(4, [2, 2]))
    assert log.last_index() == 5 and log.last_term() == 2
    assert [e.index for e in log.slice(2, 6)] == [2, 3, 4, 5]
    log.append(entries(3, [3]))  # overwrites 3 (in storage) and drops 4, 5
    assert [e.term for e in log.slice(1, 4)] == [1, 1, 3]
    assert log.unstable.offset == 3
    log.unstable.stable_to(3, 2)  # a stale acknowledgement changes nothing
    assert log.unstable_entries()
    storage.append(log.unstable_entries())
    log.unstable.stable_to(3, 3)
    assert log.unstable_entries() == () and log.last_index() == 3


def test_find_conflict_by_term():
    storage = MemoryStorage(VOTERS)
    storage.append(entries(1, [1, 3, 3, 4, 4, 5, 5, 5, 6]))
    log = RaftLog(storage)
    assert log.find_conflict_by_term(9, 3) == (3, 3)
    assert log.find_conflict_by_term(9, 6) == (9, 6)
    assert log.find_conflict_by_term(5, 2) == (1, 1)
    assert log.find_conflict_by_term(5, 0) == (0, 0)


def test_maybe_append_ignores_stale_duplicates_and_rejects_mismatch():
    storage = MemoryStorage(VOTERS)
    log = RaftLog(storage)
    assert log.maybe_append(0, 0, 0, tuple(entries(1, [1, 1, 1]))) == 3
    assert log.maybe_append(0, 0, 2, tuple(entries(1, [1]))) == 1  # stale: no truncation
    assert log.last_index() == 3 and log.committed == 1
    assert log.maybe_append(3, 2, 3, tuple(entries(4, [2]))) is None


# -- progress ---------------------------------------------------------------------------------


def test_progress_probe_replicate_and_inflights():
    progress = Progress(next_index=5, max_inflight=2, is_learner=False)
    assert progress.state == ProgressState.PROBE and not progress.is_paused()
    progress.sent_entries(1, 5)
    assert progress.is_paused()  # one probe at a time
    assert progress.maybe_decrease_to(4, 1)  # rejected at 4, hint 1
    assert progress.next == 2 and not progress.is_paused()
    assert not progress.maybe_decrease_to(7, 1)  # stale rejection
    assert progress.maybe_update(4)
    progress.become_replicate()
    progress.sent_entries(2, 6)
    progress.sent_entries(2, 8)
    assert progress.is_paused() and progress.next == 9
    progress.inflights.free_le(6)
    assert not progress.is_paused()


def test_progress_snapshot_state_is_paused_until_probe():
    progress = Progress(next_index=5, max_inflight=2, is_learner=False)
    progress.become_snapshot(20)
    assert progress.is_paused() and progress.next == 21
    progress.become_probe()
    assert progress.next == 21


# -- Ready / advance --------------------------------------------------------------------------


def test_ready_reports_hard_state_and_entries_until_advanced():
    storage = MemoryStorage(Configuration(voters=frozenset({1})))
    node = RaftNode(RaftConfig(node_id=1), storage, random.Random(0))
    assert not node.has_ready()
    node.campaign()
    ready = node.ready()
    assert ready.soft_state is not None and ready.hard_state is not None
    assert ready.hard_state.term == 1 and ready.hard_state.vote == 1
    assert ready.entries and ready.must_sync
    assert not node.has_ready()  # while a Ready is outstanding
    with pytest.raises(AssertionError):
        node.ready()
    storage.append(ready.entries)
    storage.set_hard_state(ready.hard_state)
    node.advance(ready)
    assert not node.has_ready()
    node.propose(b"x")
    ready = node.ready()
    assert [e.data for e in ready.entries] == [b"x"]
    assert [e.data for e in ready.committed_entries] == [b"x"]  # single node: same Ready
    assert ready.hard_state is not None and not ready.soft_state
    storage.append(ready.entries)
    node.advance(ready)
    assert node.applied_index == node.commit_index == ready.entries[-1].index


def test_status_reports_progress_on_the_leader():
    storage = MemoryStorage(Configuration(voters=frozenset({1})))
    node = RaftNode(RaftConfig(node_id=1), storage, random.Random(0))
    node.campaign()
    status = node.status()
    assert status.role.name == "LEADER" and status.term == 1
    assert set(status.progress) == {1}
    assert status.progress[1].state == ProgressState.REPLICATE
