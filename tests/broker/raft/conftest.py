"""Options of the deterministic Raft simulation (tests/broker/raft/test_simulation.py):

--sim-seed N        replay exactly one seed (printed by a failing run)
--sim-seeds COUNT   run COUNT seeds (default: the CI budget)
--sim-first-seed N  start counting seeds at N (default 0)
--sim-steps N       faults injected per seed (default 8)
"""

from __future__ import annotations


def pytest_addoption(parser):
    group = parser.getgroup("raft simulation")
    group.addoption("--sim-seed", type=int, default=None, help="replay one simulation seed")
    group.addoption("--sim-seeds", type=int, default=None, help="number of simulation seeds")
    group.addoption("--sim-first-seed", type=int, default=0, help="first simulation seed")
    group.addoption("--sim-steps", type=int, default=None, help="faults per simulation seed")
