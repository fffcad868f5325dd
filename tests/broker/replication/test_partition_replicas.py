"""The leader's replica state of one partition (broker/replication/partition_replicas.py):
unit tests of each rule, then a hypothesis state machine driving random sequences of leader
progress, follower fetches, time and ISR changes against the safety properties."""

from __future__ import annotations

import ast
import pathlib

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from broker.replication import partition_replicas as module
from broker.replication.partition_replicas import UNKNOWN_OFFSET, PartitionReplicas
from protocol.api import ACKS_ALL, ACKS_LEADER, ACKS_NONE
from protocol.errors import DwalError, ErrorCode

LAG_MS = 10_000


def leader_state(
    *,
    replicas=(1, 2, 3),
    isr=(1, 2, 3),
    log_end_offset=10,
    high_watermark=10,
    leader_epoch_start_offset=10,
    now_ms=0,
    **kwargs,
) -> PartitionReplicas:
    """Broker 1 leading epoch 5 at partition epoch 7."""
    return PartitionReplicas(
        leader_id=1,
        leader_epoch=5,
        partition_epoch=7,
        replicas=replicas,
        isr=isr,
        log_end_offset=log_end_offset,
        high_watermark=high_watermark,
        leader_epoch_start_offset=leader_epoch_start_offset,
        now_ms=now_ms,
        **kwargs,
    )


def follower(state: PartitionReplicas, replica_id: int):
    (found,) = [f for f in state.snapshot().followers if f.replica_id == replica_id]
    return found


# ----------------------------------------------------------------------------- sans-I/O


def test_module_imports_only_pure_python_and_protocol():
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "dataclasses", "protocol"}, imported


# ----------------------------------------------------------------------------- construction


def test_new_leader_gives_followers_unknown_offsets_and_the_benefit_of_the_doubt():
    state = leader_state(now_ms=500, log_end_offset=12, high_watermark=8)
    snapshot = state.snapshot()
    assert snapshot.high_watermark == 8
    assert snapshot.leader_log_end_offset == snapshot.leader_acknowledged_offset == 12
    assert snapshot.isr == snapshot.maximal_isr == (1, 2, 3)
    assert snapshot.pending_isr is None
    assert [(f.replica_id, f.log_end_offset, f.last_caught_up_ms) for f in snapshot.followers] == [
        (2, UNKNOWN_OFFSET, 500),
        (3, UNKNOWN_OFFSET, 500),
    ]
    assert state.isr_change_wanted(500 + LAG_MS) is None  # not yet lagging


def test_high_watermark_waits_for_every_isr_follower_to_report():
    state = leader_state(log_end_offset=20, high_watermark=10)
    assert state.follower_fetched(2, 20, now_ms=1) is None  # 3 still unknown
    assert state.high_watermark == 10
    assert state.follower_fetched(3, 15, now_ms=2) == 15
    assert state.high_watermark == 15


def test_leader_alone_in_the_isr_starts_at_its_acknowledged_offset():
    state = leader_state(isr=(1,), log_end_offset=12, high_watermark=8, acknowledged_offset=11)
    assert state.high_watermark == 11


def test_construction_checks_its_arguments():
    with pytest.raises(AssertionError):
        leader_state(isr=(2, 3))  # leader not in ISR
    with pytest.raises(AssertionError):
        leader_state(isr=(1, 4))  # not a replica
    with pytest.raises(AssertionError):
        leader_state(high_watermark=11, log_end_offset=10)


# ----------------------------------------------------------------------------- high watermark


def test_single_replica_high_watermark_is_the_leaders_acknowledged_offset():
    state = leader_state(replicas=(1,), isr=(1,), log_end_offset=0, high_watermark=0,
                         leader_epoch_start_offset=0)  # fmt: skip
    assert state.leader_progress(10, 4) == 4  # fsync=always: durable up to 4
    assert state.leader_progress(12, 4) is None
    assert state.leader_progress(12, 12) == 12
    assert state.high_watermark == 12


def test_high_watermark_is_the_minimum_over_the_isr_and_moves_only_forward():
    state = leader_state(log_end_offset=10, high_watermark=10)
    assert state.leader_progress(20, 20) is None
    assert state.follower_fetched(2, 18, now_ms=1) is None
    assert state.follower_fetched(3, 14, now_ms=1) == 14
    assert state.follower_fetched(2, 16, now_ms=2) is None  # 2 truncated: min 14 still
    assert state.follower_fetched(3, 20, now_ms=2) == 16
    # A follower reporting less (a truncated tail) never takes the HW back.
    assert state.follower_fetched(2, 12, now_ms=3) is None
    assert state.high_watermark == 16


def test_high_watermark_ignores_followers_outside_the_isr():
    state = leader_state(isr=(1, 2), log_end_offset=10, high_watermark=10)
    state.leader_progress(20, 20)
    assert state.follower_fetched(3, 11, now_ms=1) is None
    assert state.follower_fetched(2, 20, now_ms=1) == 20


def test_high_watermark_never_exceeds_the_leaders_acknowledged_offset():
    state = leader_state(log_end_offset=10, high_watermark=10)
    state.leader_progress(30, 12)  # written to 30, durable to 12
    state.follower_fetched(2, 30, now_ms=1)
    assert state.follower_fetched(3, 30, now_ms=1) == 12
    assert state.leader_progress(30, 30) == 30


# ----------------------------------------------------------------------------- fetch checks


def test_fetch_from_a_non_replica_or_the_leader_itself_is_refused():
    state = leader_state()
    for replica_id in (4, 1):
        with pytest.raises(DwalError) as caught:
            state.follower_fetched(replica_id, 10, now_ms=1)
        assert caught.value.code == ErrorCode.NOT_LEADER_OR_FOLLOWER
    assert state.snapshot() == leader_state().snapshot()  # nothing recorded


def test_fetch_offset_beyond_the_leaders_log_end_or_negative_is_refused():
    state = leader_state(log_end_offset=10)
    for offset in (11, -1):
        with pytest.raises(DwalError) as caught:
            state.follower_fetched(2, offset, now_ms=1)
        assert caught.value.code == ErrorCode.OFFSET_OUT_OF_RANGE
    assert follower(state, 2).log_end_offset == UNKNOWN_OFFSET


# ----------------------------------------------------------------------------- caught-up rule


def test_fetch_at_the_leaders_log_end_is_caught_up_now():
    state = leader_state(log_end_offset=10)
    state.follower_fetched(2, 10, now_ms=700)
    assert follower(state, 2).last_caught_up_ms == 700


def test_fetch_at_the_leaders_log_end_of_the_previous_fetch_is_caught_up_then():
    state = leader_state(log_end_offset=10)
    state.follower_fetched(2, 8, now_ms=100)  # leader LEO 10 at this fetch
    assert follower(state, 2).last_caught_up_ms == 0  # neither clause: unchanged
    state.leader_progress(15, 15)
    state.follower_fetched(2, 10, now_ms=300)  # has what the leader had at 100
    assert follower(state, 2).last_caught_up_ms == 100
    state.leader_progress(20, 20)
    state.follower_fetched(2, 14, now_ms=500)  # below 15, the LEO at its fetch at 300
    assert follower(state, 2).last_caught_up_ms == 100
    state.follower_fetched(2, 20, now_ms=900)
    assert follower(state, 2).last_caught_up_ms == 900


def test_first_fetch_below_the_log_end_does_not_count_as_caught_up():
    state = leader_state(log_end_offset=10, now_ms=50)
    state.follower_fetched(2, 0, now_ms=400)
    assert follower(state, 2).last_caught_up_ms == 50


def test_last_caught_up_time_never_moves_back():
    state = leader_state(log_end_offset=10)
    state.follower_fetched(2, 10, now_ms=1000)
    state.follower_fetched(2, 10, now_ms=900)  # a clock reading out of order
    assert follower(state, 2).last_caught_up_ms == 1000


def test_follower_under_a_steady_stream_of_writes_stays_in_sync():
    state = leader_state(log_end_offset=0, high_watermark=0, leader_epoch_start_offset=0)
    interval_ms = LAG_MS // 2
    fetched = {2: 0, 3: 0}
    for step in range(1, 50):
        now_ms = step * interval_ms
        for replica_id in (2, 3):
            state.follower_fetched(replica_id, fetched[replica_id], now_ms)
            fetched[replica_id] = state.log_end_offset  # the answer brings it to the LEO
        state.leader_progress(state.log_end_offset + 7, state.log_end_offset + 7)
        assert state.isr_change_wanted(now_ms) is None
        assert state.isr_change_wanted(now_ms + interval_ms - 1) is None


# ----------------------------------------------------------------------------- shrink


def test_follower_not_caught_up_for_longer_than_the_lag_time_is_shrunk_out():
    state = leader_state(log_end_offset=10)
    state.follower_fetched(2, 10, now_ms=0)
    state.follower_fetched(3, 10, now_ms=0)
    state.leader_progress(11, 11)
    state.follower_fetched(2, 11, now_ms=LAG_MS)
    assert state.isr_change_wanted(LAG_MS) is None  # exactly the lag time: still in sync
    assert state.isr_change_wanted(LAG_MS + 1) == (1, 2)


def test_followers_that_never_fetch_are_shrunk_out_after_the_lag_time():
    state = leader_state(now_ms=100)
    state.leader_progress(11, 11)
    assert state.isr_change_wanted(100 + LAG_MS) is None
    assert state.isr_change_wanted(101 + LAG_MS) == (1,)


def test_follower_holding_the_whole_log_is_not_lagging_however_old_its_fetch():
    state = leader_state(log_end_offset=10)
    state.follower_fetched(2, 10, now_ms=0)
    state.follower_fetched(3, 10, now_ms=0)
    assert state.isr_change_wanted(10 * LAG_MS) is None  # idle partition
    state.leader_progress(11, 11)
    assert state.isr_change_wanted(10 * LAG_MS) == (1,)


def test_the_leader_is_never_shrunk_out():
    state = leader_state(replicas=(1, 2), isr=(1, 2), acknowledged_offset=0)
    state.leader_progress(20, 0)  # even with nothing of its own acknowledged yet
    assert state.isr_change_wanted(5 * LAG_MS) == (1,)


# ----------------------------------------------------------------------------- expand


def expansion_state() -> PartitionReplicas:
    """ISR (1, 2) at HW 30, leader epoch started at offset 20, replica 3 outside."""
    state = leader_state(isr=(1, 2), log_end_offset=20, high_watermark=20,
                         leader_epoch_start_offset=20)  # fmt: skip
    state.leader_progress(30, 30)
    state.follower_fetched(2, 30, now_ms=0)
    assert state.high_watermark == 30
    return state


def test_follower_reaching_the_high_watermark_within_the_epoch_is_added():
    state = expansion_state()
    state.follower_fetched(3, 29, now_ms=1)
    assert state.isr_change_wanted(1) is None
    state.follower_fetched(3, 30, now_ms=2)
    assert state.isr_change_wanted(2) == (1, 2, 3)


def test_follower_below_the_leader_epoch_start_is_not_added():
    state = leader_state(isr=(1, 2), log_end_offset=20, high_watermark=10,
                         leader_epoch_start_offset=20)  # fmt: skip
    state.follower_fetched(3, 15, now_ms=1)  # above the HW, below the epoch's start
    assert state.isr_change_wanted(1) is None
    state.follower_fetched(3, 20, now_ms=2)
    assert state.isr_change_wanted(2) == (1, 2, 3)


def test_lagging_follower_at_the_high_watermark_is_not_added():
    state = expansion_state()
    state.leader_progress(40, 30)  # the leader's acknowledged offset holds the HW at 30
    state.follower_fetched(3, 30, now_ms=0)
    state.follower_fetched(2, 40, now_ms=LAG_MS)  # 2 stays in sync
    assert state.high_watermark == 30
    assert state.isr_change_wanted(LAG_MS + 1) is None  # 3 is at the HW but lags
    state.follower_fetched(3, 40, now_ms=LAG_MS + 1)
    assert state.isr_change_wanted(LAG_MS + 1) == (1, 2, 3)


def test_unknown_follower_is_not_added():
    state = leader_state(isr=(1, 2), log_end_offset=0, high_watermark=0,
                         leader_epoch_start_offset=0)  # fmt: skip
    assert state.isr_change_wanted(1) is None


def test_shrink_comes_before_expansion():
    state = expansion_state()
    state.leader_progress(31, 31)
    state.follower_fetched(3, 31, now_ms=LAG_MS + 1)
    assert state.isr_change_wanted(LAG_MS + 1) == (1,)  # 2 lags; 3 is eligible
    state.isr_change_sent((1,))
    state.isr_change_committed((1,), partition_epoch=8)
    assert state.isr_change_wanted(LAG_MS + 1) == (1, 3)


# ----------------------------------------------------------------------------- changes in flight


def test_one_change_in_flight_at_a_time():
    state = leader_state()
    state.leader_progress(11, 11)
    assert state.isr_change_wanted(LAG_MS + 1) == (1,)
    state.isr_change_sent((1,))
    assert state.isr_change_wanted(LAG_MS + 1) is None
    with pytest.raises(AssertionError):
        state.isr_change_sent((1, 2))


def test_pending_shrink_does_not_let_the_high_watermark_pass_the_removed_member():
    state = leader_state(log_end_offset=10)
    state.follower_fetched(2, 10, now_ms=0)
    state.follower_fetched(3, 10, now_ms=0)
    state.leader_progress(20, 20)
    state.follower_fetched(2, 20, now_ms=LAG_MS + 1)
    state.isr_change_sent(state.isr_change_wanted(LAG_MS + 1) or ())
    snapshot = state.snapshot()
    assert (snapshot.isr, snapshot.maximal_isr, snapshot.pending_isr) == (
        (1, 2, 3),
        (1, 2, 3),
        (1, 2),
    )
    assert state.high_watermark == 10
    assert state.follower_fetched(2, 20, now_ms=LAG_MS + 2) is None
    assert state.isr_change_committed((1, 2), partition_epoch=8) == 20
    assert state.snapshot().maximal_isr == (1, 2)


def test_refused_shrink_keeps_the_high_watermark_and_may_be_proposed_again():
    state = leader_state(log_end_offset=10)
    state.leader_progress(20, 20)
    state.follower_fetched(2, 20, now_ms=LAG_MS + 1)
    state.isr_change_sent((1, 2))
    assert state.isr_change_failed() is None
    assert state.high_watermark == 10
    assert state.snapshot().pending_isr is None
    assert state.isr_change_wanted(LAG_MS + 1) == (1, 2)


def test_pending_expansion_joins_the_maximal_isr_at_once():
    state = expansion_state()
    state.follower_fetched(3, 30, now_ms=1)
    state.isr_change_sent((1, 2, 3))
    assert state.snapshot().maximal_isr == (1, 2, 3)
    state.leader_progress(40, 40)
    assert state.follower_fetched(2, 40, now_ms=2) is None  # waits for 3 too
    assert state.follower_fetched(3, 35, now_ms=2) == 35


def test_refused_expansion_lets_the_high_watermark_advance_without_it():
    state = expansion_state()
    state.follower_fetched(3, 30, now_ms=1)
    state.isr_change_sent((1, 2, 3))
    state.leader_progress(40, 40)
    state.follower_fetched(2, 40, now_ms=2)
    assert state.isr_change_failed() == 40


def test_republished_image_leaves_a_pending_change_pending():
    state = leader_state()
    state.isr_change_sent((1, 2))
    assert state.isr_change_committed((1, 2, 3), partition_epoch=7) is None
    assert state.snapshot().pending_isr == (1, 2)
    with pytest.raises(AssertionError):
        state.isr_change_committed((1, 2, 3), partition_epoch=6)  # the image went back


def test_another_committed_change_settles_the_one_in_flight():
    state = leader_state()
    state.isr_change_sent((1, 2))
    state.isr_change_committed((1, 3), partition_epoch=8)  # e.g. broker 2 was fenced
    snapshot = state.snapshot()
    assert (snapshot.isr, snapshot.pending_isr, snapshot.partition_epoch) == ((1, 3), None, 8)
    assert state.partition_epoch == 8  # the next request is based on it


# ----------------------------------------------------------------------------- acks


def test_acks_all_is_refused_while_the_committed_isr_is_below_min_insync():
    state = leader_state(isr=(1, 2))
    assert state.check_append(ACKS_ALL, 2) is None
    assert state.check_append(ACKS_ALL, 3) == ErrorCode.NOT_ENOUGH_REPLICAS
    assert state.check_append(ACKS_LEADER, 3) is None
    assert state.check_append(ACKS_NONE, 3) is None


def test_append_check_counts_the_committed_isr_not_a_pending_change():
    state = leader_state(isr=(1, 2))
    state.follower_fetched(3, 10, now_ms=0)
    state.isr_change_sent((1, 2, 3))  # pending expansion: not yet committed
    assert state.check_append(ACKS_ALL, 3) == ErrorCode.NOT_ENOUGH_REPLICAS
    state.isr_change_committed((1, 2, 3), partition_epoch=8)
    state.isr_change_sent((1, 2))  # pending shrink: not yet committed
    assert state.check_append(ACKS_ALL, 3) is None


def test_acks_all_result_waits_for_the_high_watermark():
    state = leader_state(log_end_offset=10)
    state.leader_progress(15, 15)  # a write of offsets 10..14
    state.follower_fetched(2, 15, now_ms=1)
    assert state.acks_all_result(15, 2) is None
    state.follower_fetched(3, 14, now_ms=1)
    assert state.high_watermark == 14
    assert state.acks_all_result(15, 2) is None  # offset 14 not yet below the HW
    state.follower_fetched(3, 15, now_ms=1)
    assert state.acks_all_result(15, 2) == ErrorCode.NONE


def test_isr_shrunk_below_min_insync_while_waiting_gives_not_enough_after_append():
    state = leader_state(log_end_offset=10)
    state.follower_fetched(2, 10, now_ms=0)
    state.follower_fetched(3, 10, now_ms=0)
    assert state.check_append(ACKS_ALL, 3) is None
    state.leader_progress(15, 15)  # the write, offsets 10..14
    state.follower_fetched(2, 15, now_ms=LAG_MS + 1)
    state.isr_change_sent((1, 2))  # 3 lags
    assert state.acks_all_result(15, 3) is None
    state.isr_change_committed((1, 2), partition_epoch=8)  # the HW passes the write now
    assert state.high_watermark == 15
    assert state.acks_all_result(15, 3) == ErrorCode.NOT_ENOUGH_REPLICAS_AFTER_APPEND
    assert state.acks_all_result(15, 2) == ErrorCode.NONE


def test_after_append_counts_the_maximal_isr_whose_members_all_hold_the_write():
    state = leader_state(isr=(1, 2), log_end_offset=10)
    state.follower_fetched(3, 10, now_ms=0)
    state.isr_change_sent((1, 2, 3))
    state.leader_progress(15, 15)
    state.follower_fetched(2, 15, now_ms=1)
    state.follower_fetched(3, 15, now_ms=1)
    assert state.acks_all_result(15, 3) == ErrorCode.NONE  # three copies exist


# ----------------------------------------------------------------------------- snapshot


def test_snapshot_reports_the_state_for_describe():
    state = leader_state(log_end_offset=10, high_watermark=10)
    state.leader_progress(12, 11)
    state.follower_fetched(2, 12, now_ms=40)
    state.isr_change_sent((1, 2))
    snapshot = state.snapshot()
    assert snapshot.leader_id == 1 and snapshot.leader_epoch == 5
    assert snapshot.partition_epoch == 7
    assert (snapshot.leader_log_end_offset, snapshot.leader_acknowledged_offset) == (12, 11)
    assert (snapshot.isr, snapshot.maximal_isr, snapshot.pending_isr) == (
        (1, 2, 3),
        (1, 2, 3),
        (1, 2),
    )
    assert snapshot.high_watermark == 10
    two, three = snapshot.followers
    assert (two.replica_id, two.log_end_offset, two.last_caught_up_ms, two.last_fetch_ms) == (
        2,
        12,
        40,
        40,
    )
    assert (three.log_end_offset, three.last_fetch_ms) == (UNKNOWN_OFFSET, None)
    with pytest.raises(AttributeError):
        snapshot.high_watermark = 0  # type: ignore[misc]


def test_a_replica_added_by_a_reassignment_fetches_and_joins_and_a_removed_one_is_refused():
    state = PartitionReplicas(
        leader_id=1,
        leader_epoch=3,
        partition_epoch=4,
        replicas=(1, 2),
        isr=(1, 2),
        log_end_offset=10,
        high_watermark=10,
        leader_epoch_start_offset=0,
        now_ms=0,
    )
    # Replica 4 added (replicas: target 1, 4 then 2 leaving), outside the ISR.
    assert state.isr_change_committed((1, 2), 5, replicas=(1, 4, 2), now_ms=100) is None
    assert state.isr_change_wanted(100) is None, "4 has not fetched"
    assert state.leader_progress(12, 12) is None  # the HW waits for 2 only
    assert state.follower_fetched(2, 12, 150) == 12
    state.follower_fetched(4, 6, 200)  # catching up: not yet
    assert state.isr_change_wanted(200) is None
    assert state.follower_fetched(4, 12, 300) is None
    assert state.isr_change_wanted(300) == (1, 2, 4)
    state.isr_change_sent((1, 2, 4))
    # The controller completes the move: replicas 1, 4; 2 leaves (with the ISR).
    assert state.isr_change_committed((1, 4), 6, replicas=(1, 4), now_ms=400) is None
    assert state.snapshot().isr == (1, 4) and state.replicas == (1, 4)
    assert [f.replica_id for f in state.snapshot().followers] == [4]
    with pytest.raises(DwalError) as caught:
        state.follower_fetched(2, 12, 500)
    assert caught.value.code == ErrorCode.NOT_LEADER_OR_FOLLOWER
    assert state.leader_progress(15, 15) is None
    assert state.follower_fetched(4, 15, 600) == 15


# ----------------------------------------------------------------------------- properties

MODEL_LAG_MS = 1_000


class ReplicaStateMachine(RuleBasedStateMachine):
    """Random leader progress, follower fetches, time, and controller answers. Follower
    offsets are realistic: below the leader's LEO, and never truncated below the HW unless
    they already were below it (a follower never truncates below its own HW, which is at
    most the leader's). Replica 2, when it exists, is diligent: it fetches after every time
    step (steps of at most half the lag time), at the leader's LEO of its previous fetch;
    in the other runs time jumps up to three lag times and every follower fetches at random."""

    @initialize(
        replica_count=st.integers(1, 4),
        isr_mask=st.lists(st.booleans(), min_size=4, max_size=4),
        offsets=st.lists(st.integers(0, 20), min_size=3, max_size=3),
        diligent=st.booleans(),
    )
    def start(self, replica_count, isr_mask, offsets, diligent):
        self.replicas = tuple(range(1, replica_count + 1))
        isr = tuple(r for r in self.replicas if r == 1 or isr_mask[r - 1])
        high_watermark, epoch_start, acknowledged = sorted(offsets)
        log_end = acknowledged + 5
        self.now_ms = 0
        self.diligent = diligent and replica_count >= 2
        self.state = PartitionReplicas(
            leader_id=1,
            leader_epoch=3,
            partition_epoch=4,
            replicas=self.replicas,
            isr=isr,
            log_end_offset=log_end,
            high_watermark=high_watermark,
            leader_epoch_start_offset=epoch_start,
            now_ms=0,
            acknowledged_offset=acknowledged,
            replica_lag_time_max_ms=MODEL_LAG_MS,
        )
        self.isr = isr
        self.pending: tuple[int, ...] | None = None
        self.partition_epoch = 4
        self.offsets = {r: UNKNOWN_OFFSET for r in self.replicas if r != 1}
        # ISR members at election held the old leader's HW, at least the new leader's.
        self.floor = {r: (high_watermark if r in isr else 0) for r in self.offsets}
        self.leader_log_end, self.leader_acknowledged = log_end, acknowledged
        self.diligent_fetch = log_end  # what replica 2 asks for next
        self.high_watermark = high_watermark
        if isr == (1,):  # alone in the ISR: its own acknowledged offset at once
            self.high_watermark = max(high_watermark, acknowledged)
        self.shrink_sent_at_hw: int | None = None

    # ------------------------------------------------------------------ helpers

    def acknowledged(self, replica_id: int) -> int:
        return self.leader_acknowledged if replica_id == 1 else self.offsets[replica_id]

    def maximal(self) -> set[int]:
        return set(self.isr) | set(self.pending or ())

    def expect(self, returned: int | None) -> None:
        """Check a method's answer against the model: HW = max(HW, min over maximal)."""
        expected = max(self.high_watermark, min(map(self.acknowledged, self.maximal())))
        if expected > self.high_watermark:
            assert returned == expected == self.state.high_watermark
            assert all(self.acknowledged(m) >= expected for m in self.maximal())
        else:
            assert returned is None and self.state.high_watermark == self.high_watermark
        self.high_watermark = expected

    # ------------------------------------------------------------------ leader

    @rule(appended=st.integers(0, 5), data=st.data())
    def leader_appends(self, appended, data):
        self.leader_log_end += appended
        self.leader_acknowledged = data.draw(
            st.integers(self.leader_acknowledged, self.leader_log_end)
        )
        self.expect(self.state.leader_progress(self.leader_log_end, self.leader_acknowledged))

    # ------------------------------------------------------------------ followers

    def random_fetchers(self) -> list[int]:
        return [r for r in self.offsets if not (self.diligent and r == 2)]

    @precondition(lambda self: self.random_fetchers())
    @rule(data=st.data())
    def follower_fetches(self, data):
        replica_id = data.draw(st.sampled_from(self.random_fetchers()))
        self.fetch(replica_id, data.draw(st.integers(0, self.leader_log_end)))

    def fetch(self, replica_id: int, wanted: int) -> None:
        previous = self.offsets[replica_id]
        floor = self.floor[replica_id] if previous == UNKNOWN_OFFSET else previous
        floor = min(floor, self.high_watermark)
        offset = max(wanted, floor)
        self.offsets[replica_id] = offset
        self.expect(self.state.follower_fetched(replica_id, offset, self.now_ms))

    @rule(elapsed_ms=st.integers(0, 3 * MODEL_LAG_MS))
    def time_passes(self, elapsed_ms):
        if not self.diligent:
            self.now_ms += elapsed_ms
            return
        self.now_ms += elapsed_ms % (MODEL_LAG_MS // 2 + 1)
        self.fetch(2, self.diligent_fetch)
        self.diligent_fetch = self.leader_log_end

    # ------------------------------------------------------------------ ISR changes

    @rule(send=st.booleans())
    def leader_checks_isr(self, send):
        wanted = self.state.isr_change_wanted(self.now_ms)
        if self.pending is not None:
            assert wanted is None, "a second ISR change while one is in flight"
            return
        if wanted is None:
            return
        assert 1 in wanted and set(wanted) <= set(self.replicas)
        if self.diligent:
            assert 2 not in set(self.isr) - set(wanted), "the diligent follower was shrunk out"
        for joining in set(wanted) - set(self.isr):
            assert self.offsets[joining] >= self.high_watermark
        if send:
            self.state.isr_change_sent(wanted)
            self.pending = wanted
            shrink = not set(wanted) - set(self.isr)
            self.shrink_sent_at_hw = self.high_watermark if shrink else None
            assert self.state.high_watermark == self.high_watermark

    @precondition(lambda self: self.pending is not None)
    @rule()
    def controller_accepts(self):
        self.commit(self.pending or ())

    @rule(data=st.data())
    def controller_changes_isr_otherwise(self, data):
        """Another change: members removed (fenced), or replicas holding the HW added."""
        candidates = [
            r for r in self.replicas if r in self.isr or self.acknowledged(r) >= self.high_watermark
        ]
        chosen = data.draw(st.lists(st.sampled_from(candidates), unique=True))
        self.commit(tuple(dict.fromkeys((1, *chosen))))

    def commit(self, isr: tuple[int, ...]) -> None:
        self.partition_epoch += 1
        returned = self.state.isr_change_committed(isr, self.partition_epoch)
        self.isr, self.pending, self.shrink_sent_at_hw = isr, None, None
        self.expect(returned)

    @rule(data=st.data())
    def controller_reassigns(self, data):
        """A reassignment adds a replica (outside the ISR, knowing nothing yet) or removes
        one (out of the ISR too), in the same leader epoch."""
        removable = [r for r in self.replicas if r != 1 and not (self.diligent and r == 2)]
        if removable and data.draw(st.booleans()):
            removed = data.draw(st.sampled_from(removable))
            replicas = tuple(r for r in self.replicas if r != removed)
            del self.offsets[removed], self.floor[removed]
        else:
            added = max(self.replicas) + 1
            replicas = (*self.replicas, added)
            self.offsets[added], self.floor[added] = UNKNOWN_OFFSET, 0
        isr = tuple(r for r in self.isr if r in replicas)
        self.replicas = replicas
        self.partition_epoch += 1
        returned = self.state.isr_change_committed(
            isr, self.partition_epoch, replicas=replicas, now_ms=self.now_ms
        )
        self.isr, self.pending, self.shrink_sent_at_hw = isr, None, None
        self.expect(returned)
        assert self.state.snapshot().followers == tuple(
            f for f in self.state.snapshot().followers if f.replica_id in replicas
        )

    @rule()
    def image_republished(self):
        self.expect(self.state.isr_change_committed(self.isr, self.partition_epoch))

    @rule()
    def controller_refuses(self):
        returned = self.state.isr_change_failed()
        self.pending, self.shrink_sent_at_hw = None, None
        self.expect(returned)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def high_watermark_never_goes_back_nor_past_a_maximal_isr_member(self):
        snapshot = self.state.snapshot()
        assert snapshot.high_watermark == self.high_watermark
        assert set(snapshot.maximal_isr) == self.maximal()
        assert snapshot.high_watermark <= snapshot.leader_acknowledged_offset
        for member in self.maximal():
            offset = self.acknowledged(member)
            assert offset == UNKNOWN_OFFSET or offset >= snapshot.high_watermark

    @invariant()
    def pending_shrink_holds_the_high_watermark_for_removed_members(self):
        if self.pending is None or self.shrink_sent_at_hw is None:
            return
        for removed in set(self.isr) - set(self.pending):
            hw = self.state.high_watermark
            assert hw == self.shrink_sent_at_hw or hw <= self.acknowledged(removed)

    @invariant()
    def diligent_follower_is_never_shrunk_out(self):
        if self.diligent and 2 in self.isr and self.pending is None:
            wanted = self.state.isr_change_wanted(self.now_ms)  # asks, changes nothing
            assert wanted is None or 2 in wanted, (wanted, self.state.snapshot())

    @invariant()
    def at_most_one_change_in_flight(self):
        snapshot = self.state.snapshot()
        assert snapshot.pending_isr == self.pending
        assert snapshot.isr == self.isr
        assert snapshot.partition_epoch == self.partition_epoch


ReplicaStateMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestReplicaStateMachine = ReplicaStateMachine.TestCase
