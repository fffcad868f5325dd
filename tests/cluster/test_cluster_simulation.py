"""The whole-cluster deterministic simulation (see sim_cluster.py): three combined nodes with
their controllers, replica managers, fetchers and in-memory logs, under MockClock on the
in-memory network, with crashes, power losses, isolations, cut links and muted nodes (their
answers to clients lost, then crashed), and acks=all idempotent writers (resending a write
whose outcome is unknown until answered) and readers checked by the nemesis checker of the
real-process runs, exactly once (dup=0).

`pytest tests/cluster/test_cluster_simulation.py --sim-seed N` replays one seed (the line a
failing seed prints names it); `--sim-seeds COUNT` runs more (`make sim` runs
$(CLUSTER_SIM_SEEDS)); `--sim-duration S` sets the simulated seconds under faults.
Odd seeds run fsync.policy=always (power losses of any nodes, all at once included), even
seeds fsync.policy=never (a power loss hits one node while the others run): the rows of
docs/guarantees.md that promise "nothing lost".
"""

from __future__ import annotations

import pytest
from history_checker import Acknowledged, Consumed, History, check
from sim_cluster import SimSettings, run_simulation, settings_for_seed

CI_SEEDS = 10
CI_DURATION_S = 30.0

pytestmark = pytest.mark.timeout(300)


def pytest_generate_tests(metafunc):
    if "seed" not in metafunc.fixturenames:
        return
    option = metafunc.config.getoption
    single = option("sim_seed", default=None)
    if single is not None:
        seeds = [single]
    else:
        first = option("sim_first_seed", default=0) or 0
        seeds = list(range(first, first + (option("sim_seeds", default=None) or CI_SEEDS)))
    metafunc.parametrize("seed", seeds, ids=[f"seed={seed}" for seed in seeds])


@pytest.fixture
def duration_s(request) -> float:
    return request.config.getoption("sim_duration", default=None) or CI_DURATION_S


def test_cluster_simulation(seed, duration_s):
    result = run_simulation(seed, settings_for_seed(seed, duration_s))
    print(result.line())
    assert result.verdict.acknowledged > 0, "no write was acknowledged: the run proves nothing"
    assert result.ok, (
        f"{result.line()}\n{result.verdict.details()}\n"
        + "\n".join(result.diverged + result.anomalies)
        + "\nlast events:\n"
        + "\n".join(result.log[-30:])
        + f"\nreplay with --sim-seed {seed}"
    )


def test_a_seed_replays_exactly():
    """Two runs of one seed take the same course: the same acknowledgements at the same
    simulated times, the same reads, the same final logs."""
    settings = SimSettings(fsync="never", duration_s=8.0)
    first = run_simulation(7, settings)
    second = run_simulation(7, settings)
    assert first.verdict.acknowledged > 0
    assert first.digest == second.digest
    assert first.log == second.log


def test_a_copy_retention_deleted_still_counts_as_a_duplicate():
    """Under retention the first copy of a value stored twice may be gone at the end: a
    reader saw it (or its writer was acknowledged there), so it is a duplicate all the same."""
    history = History(exactly_once=True)
    history.consumed.append(Consumed(reader="reader0", partition=0, offset=3, value=b"w0-1"))
    final = {0: {40: b"w0-1", 41: b"w0-2"}}
    verdict = check(history, final)
    assert verdict.duplicates == 1 and not verdict.ok
    history.acknowledged.append(Acknowledged(partition=0, offset=40, value=b"w0-1", at_s=1.0))
    history.consumed[0] = Consumed(reader="reader0", partition=0, offset=40, value=b"w0-1")
    assert check(history, final).ok
