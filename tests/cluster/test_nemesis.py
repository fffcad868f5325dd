"""The nemesis: its checker catches each kind of violation (pure, synthetic histories), and
a few short seeds against a real proxied cluster find none.

Long runs: ``make nemesis SEEDS=5 DURATION=60`` (see nemesis.py)."""

from __future__ import annotations

import pytest

from cluster_launcher import CLUSTER_CONFIG, ClusterLauncher
from history_checker import Acknowledged, Consumed, History, OffsetSample, check
from nemesis import run_nemesis, save_outputs

CI_SEEDS = (1, 2)
CI_DURATION_S = 16
ACKNOWLEDGED_MIN = 200


def ack(partition: int, offset: int, value: bytes, at_s: float = 1.0) -> Acknowledged:
    return Acknowledged(partition=partition, offset=offset, value=value, at_s=at_s)


def clean_history() -> tuple[History, dict[int, dict[int, bytes]]]:
    history = History(started_s=0.0, ended_s=4.0)
    history.acknowledged += [
        ack(0, 0, b"w0-0", 1.0),
        ack(0, 1, b"w0-1", 2.0),
        ack(1, 0, b"w1-0", 3.0),
    ]
    history.unknown.append(b"w1-1")
    history.consumed += [
        Consumed(reader="c0", partition=0, offset=0, value=b"w0-0"),
        Consumed(reader="c1", partition=0, offset=0, value=b"w0-0"),  # re-read: allowed
    ]
    history.offsets += [
        OffsetSample(series="c0.1.1", partition=0, offset=1, at_s=1.5),
        OffsetSample(series="c0.1.1", partition=0, offset=1, at_s=1.6),
        OffsetSample(series="c1.1.1", partition=0, offset=0, at_s=1.7),  # another ownership
        OffsetSample(series="committed", partition=0, offset=1, at_s=2.0),
    ]
    # The unknown write landed, and one acknowledged value was stored twice (a resend).
    final = {0: {0: b"w0-0", 1: b"w0-1", 2: b"w0-1"}, 1: {0: b"w1-0", 1: b"w1-1"}}
    return history, final


def test_a_clean_history_passes_and_duplicates_only_count():
    history, final = clean_history()
    verdict = check(history, final)
    assert verdict.ok, verdict.details()
    assert (verdict.acknowledged, verdict.unknown, verdict.duplicates) == (3, 1, 1)
    assert verdict.max_unavailable_s == pytest.approx(1.0)
    assert verdict.line(7) == (
        "nemesis seed=7 acked=3 unknown=1 lost=0 reused=0 phantom=0 regressions=0 "
        "max_unavailable_s=1.0 dup=1"
    )


def test_a_duplicate_fails_a_history_of_idempotent_writers():
    history, final = clean_history()
    history.exactly_once = True
    verdict = check(history, final)
    assert not verdict.ok and verdict.duplicates == 1
    assert "dup: 1 values stored twice" in verdict.details()
    del final[0][2]  # without the second copy of w0-1
    assert check(history, final).ok


def test_an_acknowledged_record_missing_at_the_end_is_lost():
    history, final = clean_history()
    del final[1][1]
    del final[1][0]
    verdict = check(history, final)
    assert len(verdict.lost) == 1 and "w1-0" in verdict.lost[0], verdict.details()
    assert not verdict.ok


def test_an_acknowledged_record_at_another_offset_is_lost():
    history, final = clean_history()
    final[1] = {0: b"w1-1", 1: b"w1-0"}  # both there, in another order
    verdict = check(history, final)
    assert len(verdict.lost) == 1, verdict.details()
    assert len(verdict.reused) == 1  # 1/0 held w1-0 (acknowledged) and w1-1 (at the end)


def test_two_values_seen_at_one_offset_are_reused():
    history, final = clean_history()
    history.consumed.append(Consumed(reader="c0", partition=1, offset=1, value=b"w2-9"))
    verdict = check(history, final)
    assert verdict.reused == ("1/1: [b'w1-1', b'w2-9']",), verdict.details()
    assert len(verdict.phantom) == 1  # read, and not there at the end either


def test_two_acknowledgements_of_one_offset_are_reused_even_if_the_log_agrees():
    history, final = clean_history()
    history.acknowledged.append(ack(0, 1, b"w2-0"))
    verdict = check(history, final)
    assert len(verdict.reused) == 1 and len(verdict.lost) == 1, verdict.details()


def test_a_consumed_record_absent_at_the_end_is_a_phantom():
    history, final = clean_history()
    history.consumed.append(Consumed(reader="c1", partition=1, offset=2, value=b"w1-2"))
    verdict = check(history, final)
    assert len(verdict.phantom) == 1 and "w1-2" in verdict.phantom[0], verdict.details()
    assert not verdict.reused and not verdict.lost


def test_a_position_that_goes_back_within_one_ownership_is_a_regression():
    history, final = clean_history()
    history.offsets.append(OffsetSample(series="c0.1.1", partition=0, offset=0, at_s=3.0))
    verdict = check(history, final)
    assert len(verdict.regressions) == 1 and "c0.1.1" in verdict.regressions[0]


def test_a_committed_offset_that_goes_back_is_a_regression():
    history, final = clean_history()
    history.offsets.append(OffsetSample(series="committed", partition=0, offset=0, at_s=3.0))
    verdict = check(history, final)
    assert len(verdict.regressions) == 1 and "committed" in verdict.regressions[0]


def test_unavailability_counts_from_the_start_to_the_end_of_the_workload():
    history, final = clean_history()
    history.ended_s = 9.5
    assert check(history, final).max_unavailable_s == pytest.approx(6.5)
    history.acknowledged.clear()
    assert check(history, {}).max_unavailable_s == pytest.approx(9.5)


@pytest.mark.parametrize("seed", CI_SEEDS)
async def test_nemesis_finds_no_violation(nursery, tmp_path, seed):
    config_path = tmp_path / "cluster.toml"
    config_path.write_text(CLUSTER_CONFIG)
    launcher = ClusterLauncher(nursery, tmp_path, config_path, proxied=True)
    run = None
    try:
        verdict, run = await run_nemesis(launcher, seed, CI_DURATION_S, print)
        print(verdict.line(seed))
        assert verdict.ok, f"{verdict.line(seed)}\n{verdict.details()}\nlogs: {tmp_path}"
        assert run.healthy, f"not healthy after the heal; logs: {tmp_path}"
        assert verdict.acknowledged >= ACKNOWLEDGED_MIN, verdict.line(seed)
    finally:
        save_outputs(launcher, run, tmp_path)
        launcher.kill_all()
