"""Deterministic simulation of Raft clusters (3 and 5 nodes) under seeded faults.

Each seed is one test: a cluster of RaftDrivers with key-value stores on a MemoryNetwork and
simulated disks, under MockClock, with clients and a nemesis (see simulation/runner.py). A
failure prints its seed; `pytest tests/broker/raft/test_simulation.py --sim-seed N` replays it
exactly. CI runs CI_SEEDS seeds; `make sim` runs thousands (`--sim-seeds 3000`).
"""

from __future__ import annotations

import pytest
from simulation.runner import (
    SimulationFailure,
    SimulationSettings,
    run_simulation,
    settings_for_seed,
)

CI_SEEDS = 400
DEFAULT_STEPS = 8


def pytest_generate_tests(metafunc):
    if "seed" not in metafunc.fixturenames:
        return
    option = metafunc.config.getoption
    single = option("sim_seed", default=None)
    if single is not None:
        seeds = [single]
    else:
        first = option("sim_first_seed", default=0) or 0
        count = option("sim_seeds", default=None) or CI_SEEDS
        seeds = list(range(first, first + count))
    metafunc.parametrize("seed", seeds, ids=[f"seed={seed}" for seed in seeds])


@pytest.fixture
def steps(request) -> int:
    return request.config.getoption("sim_steps", default=None) or DEFAULT_STEPS


def test_simulation(seed, steps):
    report = run_simulation(seed, settings_for_seed(seed, steps))
    assert report.completed + report.unknown > 0 or report.crashes > 0


def test_a_seed_replays_exactly():
    settings = settings_for_seed(7)
    assert run_simulation(7, settings) == run_simulation(7, settings)


def test_the_checks_catch_a_node_that_loses_acknowledged_entries(monkeypatch):
    """Sanity check of the checkers: a disk that never fsyncs loses acknowledged entries on
    a crash, which must show up as a violated invariant or a non-linearizable history."""
    from simulation.disk import SimulatedDisk

    async def persist_without_fsync(self, ready):
        if ready.snapshot is not None:
            self.live.apply_snapshot(ready.snapshot)
        self.live.append(ready.entries)
        if ready.hard_state is not None:
            self.live.set_hard_state(ready.hard_state)

    monkeypatch.setattr(SimulatedDisk, "persist", persist_without_fsync)
    for seed in range(60):
        try:
            run_simulation(seed, SimulationSettings(nodes=3, fault_steps=8))
        except SimulationFailure as failure:
            assert f"--sim-seed {seed}" in str(failure)
            return
    pytest.fail("losing acknowledged writes went unnoticed in 60 seeds")
