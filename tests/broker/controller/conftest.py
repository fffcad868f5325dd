"""Options of the controller quorum simulation (test_controller_quorum_simulation.py):

--controller-sim-seed N        replay exactly one seed (printed by a failing run)
--controller-sim-seeds COUNT   run COUNT seeds, from 0 (default: the CI budget)
"""

from __future__ import annotations


def pytest_addoption(parser):
    group = parser.getgroup("controller simulation")
    group.addoption("--controller-sim-seed", type=int, default=None, help="replay one seed")
    group.addoption("--controller-sim-seeds", type=int, default=None, help="number of seeds")
