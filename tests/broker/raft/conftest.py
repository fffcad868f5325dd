"""The options of the deterministic Raft simulation (tests/broker/raft/test_simulation.py)
are registered in tests/conftest.py, shared with the whole-cluster simulation
(tests/cluster/test_cluster_simulation.py): --sim-seed, --sim-seeds, --sim-first-seed,
--sim-steps."""
