"""Storage conformance suite (STYLE rule 15): MemoryStorage and DurableStorage pass the same
tests, plus a stateful comparison of DurableStorage (with reopening) against MemoryStorage.
Crash and damage tests of DurableStorage live in test_io_storage_recovery.py."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from broker.raft.durable_storage import DurableStorage, DurableStorageConfig
from broker.raft.log_storage import CompactedError, MemoryStorage, UnavailableError, limit_bytes
from broker.raft.messages import Configuration, Entry, EntryKind, HardState, Snapshot

INITIAL = Configuration(voters=frozenset({1, 2, 3}))
SMALL = DurableStorageConfig(segment_bytes_max=400, cache_bytes_max=200)


def entries(first: int, terms: list[int], size: int = 10) -> list[Entry]:
    return [
        Entry(
            term=term,
            index=first + offset,
            kind=EntryKind.CONFIG_CHANGE if (first + offset) % 7 == 0 else EntryKind.NORMAL,
            data=bytes([(first + offset) % 256]) * size,
        )
        for offset, term in enumerate(terms)
    ]


@pytest.fixture(params=["memory", "durable"])
def make_storage(request, tmp_path):
    opened = []

    def make(initial: Configuration = INITIAL):
        if request.param == "memory":
            return MemoryStorage(initial)
        storage = DurableStorage.open(tmp_path / f"raft{len(opened)}", initial, SMALL)
        opened.append(storage)
        return storage

    yield make
    for storage in opened:
        storage.close()


def test_empty_storage(make_storage):
    storage = make_storage()
    assert storage.initial_state() == (HardState(), INITIAL)
    assert (storage.first_index(), storage.last_index(), storage.term(0)) == (1, 0, 0)
    assert storage.entries(1, 1) == []
    assert storage.snapshot().index == 0
    with pytest.raises(UnavailableError):
        storage.term(1)
    with pytest.raises(UnavailableError):
        storage.entries(1, 2)
    with pytest.raises(CompactedError):
        storage.entries(0, 1)


def test_append_and_read_back(make_storage):
    storage = make_storage()
    written = entries(1, sorted([1, 1, 2, 2, 2, 3] * 5))
    storage.append(written[:10])
    storage.append(written[10:])
    assert storage.last_index() == 30
    assert storage.entries(1, 31) == written
    assert storage.entries(5, 9) == written[4:8]
    assert [storage.term(i) for i in range(31)] == [0] + [e.term for e in written]
    with pytest.raises(UnavailableError):
        storage.entries(30, 32)


def test_max_bytes_limits_but_returns_at_least_one(make_storage):
    storage = make_storage()
    written = entries(1, [1] * 20, size=50)
    storage.append(written)
    assert storage.entries(1, 21, max_bytes=1) == written[:1]
    for budget in (0, 74, 75, 150, 200, 10_000):
        assert storage.entries(3, 21, max_bytes=budget) == limit_bytes(written[2:], budget)


def test_append_replaces_a_conflicting_suffix(make_storage):
    storage = make_storage()
    storage.append(entries(1, [1, 1, 1, 2, 2, 2, 2, 2]))
    replacement = entries(5, [3, 3], size=3)
    storage.append(replacement)
    assert storage.last_index() == 6
    assert storage.entries(1, 7) == entries(1, [1, 1, 1, 2]) + replacement


def test_append_of_stored_entries_drops_what_follows_them(make_storage):
    storage = make_storage()
    written = entries(1, [1, 1, 2, 2, 2])
    storage.append(written)
    storage.append(written[1:4])
    assert storage.last_index() == 4  # the contract: every entry after them goes
    assert storage.entries(1, 5) == written[:4]
    storage.append(written[3:])
    assert storage.entries(1, 6) == written


def test_hard_state_is_kept(make_storage):
    storage = make_storage()
    storage.append(entries(1, [1, 2]))
    storage.set_hard_state(HardState(term=2, vote=3, commit=2))
    assert storage.initial_state() == (HardState(term=2, vote=3, commit=2), INITIAL)


def test_create_snapshot_then_compact(make_storage):
    storage = make_storage()
    written = entries(1, [1] * 5 + [2] * 15, size=30)
    storage.append(written)
    configuration = Configuration(voters=frozenset({1, 2}), learners=frozenset({4}))
    snapshot = storage.create_snapshot(12, configuration, b"state at 12")
    assert snapshot == Snapshot(index=12, term=2, configuration=configuration, data=b"state at 12")
    assert storage.snapshot() == snapshot and storage.first_index() == 1
    storage.compact(10)
    assert (storage.first_index(), storage.last_index(), storage.term(10)) == (11, 20, 2)
    assert storage.entries(11, 21) == written[10:]
    with pytest.raises(CompactedError):
        storage.term(9)
    with pytest.raises(CompactedError):
        storage.entries(10, 12)
    storage.compact(12)
    assert storage.first_index() == 13 and storage.term(12) == 2
    assert storage.initial_state()[1] == configuration
    storage.append(entries(21, [3, 3]))
    assert storage.entries(13, 23) == written[12:] + entries(21, [3, 3])


def test_append_covered_by_a_snapshot_is_ignored(make_storage):
    storage = make_storage()
    written = entries(1, [1] * 10)
    storage.append(written)
    storage.create_snapshot(8, INITIAL, b"")
    storage.compact(8)
    storage.append(written[2:6])
    assert storage.entries(9, 11) == written[8:]
    storage.append(written[5:])  # overlaps both sides of the compaction point
    assert storage.last_index() == 10 and storage.entries(9, 11) == written[8:]


def test_apply_snapshot_replaces_everything(make_storage):
    storage = make_storage()
    storage.append(entries(1, [1, 1, 2, 2]))
    configuration = Configuration(voters=frozenset({1, 2, 3, 4}))
    snapshot = Snapshot(index=50, term=4, configuration=configuration, data=b"image")
    storage.apply_snapshot(snapshot)
    assert (storage.first_index(), storage.last_index(), storage.term(50)) == (51, 50, 4)
    assert storage.snapshot() == snapshot and storage.initial_state()[1] == configuration
    storage.append(entries(51, [4, 5]))
    assert storage.entries(51, 53) == entries(51, [4, 5])
    with pytest.raises(CompactedError):
        storage.entries(50, 51)


def test_apply_snapshot_behind_the_log_end(make_storage):
    storage = make_storage()
    storage.append(entries(1, [1] * 30))
    snapshot = Snapshot(index=10, term=1, configuration=INITIAL, data=b"")
    storage.apply_snapshot(snapshot)
    assert (storage.first_index(), storage.last_index()) == (11, 10)


# A stateful comparison: DurableStorage (reopened now and then) behaves as MemoryStorage.


class DurableAgainstMemory(RuleBasedStateMachine):
    """Raft's rules hold: committed entries (and snapshots, taken at or below the commit
    index) are never overwritten; an index and a term name one entry."""

    @initialize()
    def start(self):
        self.directory = Path(tempfile.mkdtemp(prefix="raft-storage-"))
        self.durable = DurableStorage.open(self.directory, INITIAL, SMALL)
        self.memory = MemoryStorage(INITIAL)
        self.term = 1
        self.commit = 0

    def teardown(self):
        if hasattr(self, "durable"):
            self.durable.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    @rule(back=st.integers(0, 12), count=st.integers(1, 12), bump=st.booleans())
    def append(self, back, count, bump):
        first = max(self.commit + 1, self.memory.last_index() + 1 - back)
        if bump:
            self.term += 1
        terms = [max(self.term, self.memory.term(first - 1))] * count
        batch = [
            Entry(term=e.term, index=e.index, kind=e.kind, data=e.data[: (e.term * 31) % 90])
            for e in entries(first, terms, 90)
        ]
        self.durable.append(batch)
        self.memory.append(batch)

    @rule(data=st.data(), vote=st.integers(0, 3))
    def advance_commit(self, data, vote):
        self.commit = data.draw(st.integers(self.commit, self.memory.last_index()))
        hard_state = HardState(term=self.term, vote=vote, commit=self.commit)
        self.durable.set_hard_state(hard_state)
        self.memory.set_hard_state(hard_state)

    @rule(data=st.data())
    def snapshot_and_compact(self, data):
        low = self.memory.snapshot().index + 1
        if low > self.commit:
            return
        index = data.draw(st.integers(low, self.commit))
        compact_to = data.draw(st.integers(self.memory.first_index() - 1, index))
        state = f"state {index}".encode()
        assert self.durable.create_snapshot(index, INITIAL, state) == self.memory.create_snapshot(
            index, INITIAL, state
        )
        self.durable.compact(compact_to)
        self.memory.compact(compact_to)
        self.durable.sync()

    @rule(jump=st.integers(1, 20), term_bump=st.integers(0, 2))
    def apply_snapshot(self, jump, term_bump):
        index = self.commit + jump
        self.term += term_bump
        term = max(self.term, self.memory.term(self.commit))
        if index <= self.memory.last_index() and jump % 2:
            term = self.memory.term(index)  # a snapshot that matches the log
        snapshot = Snapshot(index=index, term=term, configuration=INITIAL, data=b"from leader")
        self.durable.apply_snapshot(snapshot)
        self.memory.apply_snapshot(snapshot)
        self.commit = index
        self.term = max(self.term, term)
        hard_state = HardState(term=self.term, vote=0, commit=index)
        self.durable.set_hard_state(hard_state)
        self.memory.set_hard_state(hard_state)

    @rule()
    def reopen(self):
        self.durable.close()
        self.durable = DurableStorage.open(self.directory, INITIAL, SMALL)
        # Reopening drops the entries between the compaction point and the snapshot.
        snapshot_index = self.memory.snapshot().index
        if self.memory.first_index() <= snapshot_index:
            self.memory.compact(snapshot_index)

    @invariant()
    def same_view(self):
        if not hasattr(self, "durable"):
            return
        durable, memory = self.durable, self.memory
        assert durable.first_index() == memory.first_index()
        assert durable.last_index() == memory.last_index()
        assert durable.snapshot() == memory.snapshot()
        assert durable.initial_state() == memory.initial_state()
        low, high = memory.first_index(), memory.last_index() + 1
        assert durable.entries(low, high) == memory.entries(low, high)
        assert [durable.term(i) for i in range(low - 1, high)] == [
            memory.term(i) for i in range(low - 1, high)
        ]
        for budget in (1, 300):
            assert durable.entries(low, high, budget) == memory.entries(low, high, budget)


DurableAgainstMemory.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_durable_storage_behaves_as_memory_storage = DurableAgainstMemory.TestCase
