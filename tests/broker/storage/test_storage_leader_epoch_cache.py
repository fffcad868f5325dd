"""The leader-epoch cache alone: assignment rules, OffsetsForLeaderEpoch answers, truncation
at both ends and the checkpoint format, checked against a simple model."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.storage.leader_epoch_cache import (
    UNDEFINED_EPOCH,
    UNDEFINED_OFFSET,
    EpochEntry,
    LeaderEpochCache,
    LeaderEpochError,
    parse_checkpoint,
)

UNDEFINED = (UNDEFINED_EPOCH, UNDEFINED_OFFSET)


def cache_of(*pairs: tuple[int, int]) -> LeaderEpochCache:
    return LeaderEpochCache(EpochEntry(epoch, start) for epoch, start in pairs)


def test_assign_records_only_new_larger_epochs():
    cache = LeaderEpochCache()
    assert cache.latest_epoch == UNDEFINED_EPOCH
    assert cache.assign(0, 0)
    assert not cache.assign(0, 5)  # the same epoch again: its start stays
    assert not cache.assign(-1, 7)  # a batch without an epoch
    assert cache.assign(3, 10)
    assert cache.entries() == (EpochEntry(0, 0), EpochEntry(3, 10))
    with pytest.raises(LeaderEpochError, match="below the latest epoch 3"):
        cache.assign(2, 20)
    with pytest.raises(LeaderEpochError, match="below the start"):
        cache.assign(4, 9)
    assert cache.entries() == (EpochEntry(0, 0), EpochEntry(3, 10))
    assert cache.assign(5, 10)  # epoch 3 wrote nothing: replaced
    assert cache.entries() == (EpochEntry(0, 0), EpochEntry(5, 10))
    assert cache.latest_epoch == 5


def test_end_offset_for_follows_kafka():
    cache = cache_of((1, 0), (3, 10), (6, 25))
    log_end = 40
    assert cache.end_offset_for(1, log_end) == (1, 10)
    assert cache.end_offset_for(2, log_end) == (1, 10)  # largest epoch <= 2 is 1
    assert cache.end_offset_for(3, log_end) == (3, 25)
    assert cache.end_offset_for(5, log_end) == (3, 25)
    assert cache.end_offset_for(6, log_end) == (6, 40)  # the latest: the log end
    assert cache.end_offset_for(9, log_end) == (6, 40)
    assert cache.end_offset_for(UNDEFINED_EPOCH, log_end) == UNDEFINED
    assert LeaderEpochCache().end_offset_for(4, log_end) == UNDEFINED
    # Below every known epoch: where this log's history starts (Kafka's answer).
    assert cache_of((2, 5), (4, 9)).end_offset_for(1, log_end) == (1, 5)


def test_truncation_at_both_ends():
    cache = cache_of((1, 0), (3, 10), (6, 25))
    assert not cache.truncate_from_end(26)
    assert cache.truncate_from_end(25)  # epoch 6 started there: dropped
    assert cache.entries() == (EpochEntry(1, 0), EpochEntry(3, 10))
    assert not cache.truncate_from_start(0)
    assert cache.truncate_from_start(12)  # epoch 3 covers 12: it now starts there
    assert cache.entries() == (EpochEntry(3, 12),)
    assert cache.end_offset_for(1, 30) == (1, 12)
    assert cache.truncate_from_end(5)
    assert cache.entries() == () and cache.latest_epoch == UNDEFINED_EPOCH


def test_checkpoint_round_trip_and_bad_files():
    cache = cache_of((1, 0), (3, 10))
    data = cache.checkpoint_bytes()
    assert data == b"0\n2\n1 0\n3 10\n"
    parsed = parse_checkpoint(data)
    assert parsed is not None and parsed.entries() == cache.entries()
    empty = parse_checkpoint(LeaderEpochCache().checkpoint_bytes())
    assert empty is not None and empty.entries() == ()
    for bad in (
        b"",
        b"1\n0\n",  # unknown version
        b"0\n2\n1 0\n",  # count mismatch
        b"0\n1\n1 0",  # torn: no final newline
        b"0\n2\n3 10\n1 0\n",  # out of order
        b"0\n2\n1 10\n3 10\n",  # starts not increasing
        b"0\n1\n-1 0\n",
        b"0\n1\n1 x\n",
    ):
        assert parse_checkpoint(bad) is None, bad


class Model:
    """Epochs as a plain list of (epoch, start), recomputed the obvious way."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, int]] = []

    def assign(self, epoch: int, start: int) -> None:
        if epoch < 0 or (self.entries and epoch == self.entries[-1][0]):
            return
        if self.entries and start == self.entries[-1][1]:
            self.entries.pop()
        self.entries.append((epoch, start))

    def end_offset_for(self, epoch: int, log_end: int) -> tuple[int, int]:
        if epoch < 0 or not self.entries:
            return UNDEFINED
        below = [n for n, (e, _) in enumerate(self.entries) if e <= epoch]
        if not below:
            return epoch, self.entries[0][1]
        n = below[-1]
        end = self.entries[n + 1][1] if n + 1 < len(self.entries) else log_end
        return self.entries[n][0], end

    def truncate_from_end(self, offset: int) -> None:
        self.entries = [(e, s) for e, s in self.entries if s < offset]

    def truncate_from_start(self, offset: int) -> None:
        covering = [n for n, (_, s) in enumerate(self.entries) if s <= offset]
        if covering:
            n = covering[-1]
            self.entries = [(self.entries[n][0], offset)] + self.entries[n + 1 :]


operations = st.lists(
    st.one_of(
        st.tuples(st.just("assign"), st.integers(-1, 12), st.integers(0, 60)),
        st.tuples(st.just("end"), st.integers(0, 60)),
        st.tuples(st.just("start"), st.integers(0, 60)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(operations=operations, queries=st.lists(st.integers(-1, 14), max_size=10))
def test_cache_matches_the_model(operations, queries):
    cache, model = LeaderEpochCache(), Model()
    for operation in operations:
        if operation[0] == "assign":
            _, epoch, start = operation
            goes_back = (
                model.entries
                and epoch >= 0
                and epoch != model.entries[-1][0]
                and (epoch < model.entries[-1][0] or start < model.entries[-1][1])
            )
            if goes_back:
                with pytest.raises(LeaderEpochError):
                    cache.assign(epoch, start)
                continue
            cache.assign(epoch, start)
            model.assign(epoch, start)
        elif operation[0] == "end":
            cache.truncate_from_end(operation[1])
            model.truncate_from_end(operation[1])
        else:
            cache.truncate_from_start(operation[1])
            model.truncate_from_start(operation[1])
        assert [(e.epoch, e.start_offset) for e in cache.entries()] == model.entries
        epochs = [e for e, _ in model.entries]
        starts = [s for _, s in model.entries]
        assert epochs == sorted(set(epochs)) and starts == sorted(set(starts))
    for epoch in queries:
        assert cache.end_offset_for(epoch, 100) == model.end_offset_for(epoch, 100)
    reloaded = parse_checkpoint(cache.checkpoint_bytes())
    assert reloaded is not None and reloaded.entries() == cache.entries()
