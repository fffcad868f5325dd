VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
RUN_FLAGS ?= --host 127.0.0.1 --port 9092 --http-port 8080 --grpc-port 9090 --kafka-port 9093 --data-dir ./data

.PHONY: run cluster test bench lint sim nemesis clean

# Two stamps: the runtime alone (enough to run a broker or a benchmark) and, on top of it,
# the test tools (pytest, hypothesis, ruff, mypy). Each is redone when pyproject.toml changes.
$(VENV)/.runtime-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.runtime-installed
	$(PIP) install -q -e '.[test]'
	touch $@

run: $(VENV)/.runtime-installed
	$(VENV)/bin/dwal broker $(RUN_FLAGS)

# Three nodes, each a broker and a controller voter, in the foreground on 127.0.0.1: node N
# has native port 9091+N, HTTP port 8079+N, gRPC port 9390+N, Kafka port 9291+N, controller port
# 9191+N and data in
# ./cluster/N.
# Ctrl-C (or any node exiting) stops all three: the EXIT trap SIGTERMs every PID started.
CLUSTER_QUORUM := 1@127.0.0.1:9192,2@127.0.0.1:9193,3@127.0.0.1:9194

cluster: SHELL := /bin/bash
cluster: $(VENV)/.runtime-installed
	@pids=""; \
	stop() { kill $$pids 2>/dev/null; wait; }; \
	trap stop EXIT; trap 'exit 130' INT TERM; \
	for n in 1 2 3; do \
		$(VENV)/bin/dwal broker --node-id $$n --controller-quorum $(CLUSTER_QUORUM) \
			--host 127.0.0.1 --port $$((9091 + n)) --http-port $$((8079 + n)) \
			--grpc-port $$((9390 + n)) --kafka-port $$((9291 + n)) \
			--controller-port $$((9191 + n)) --data-dir ./cluster/$$n & \
		pids="$$pids $$!"; \
	done; \
	wait -n

test: $(VENV)/.test-installed
	$(PY) -m pytest -q tests

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check protocol broker client bench tests
	$(VENV)/bin/mypy

bench: $(VENV)/.runtime-installed
	$(PY) bench/produce_consume.py

# Seeds of the Raft core simulation, of the controller quorum simulation (a controller
# seed runs a whole quorum on a MockClock, so it costs far more than a Raft one) and of the
# whole-cluster simulation (brokers, controllers and replicas; about 2 s a seed, each with
# CLUSTER_SIM_DURATION simulated seconds of faults). One seed replays with
# `pytest tests/cluster/test_cluster_simulation.py --sim-seed N`.
SIM_SEEDS ?= 3000
CONTROLLER_SIM_SEEDS ?= 300
CLUSTER_SIM_SEEDS ?= 100
CLUSTER_SIM_DURATION ?= 60

sim: $(VENV)/.test-installed
	$(PY) -m pytest tests/broker/raft/test_simulation.py --sim-seeds $(SIM_SEEDS) -q
	$(PY) -m pytest tests/broker/controller/test_controller_quorum_simulation.py \
		--controller-sim-seeds $(CONTROLLER_SIM_SEEDS) -q
	$(PY) -m pytest tests/cluster/test_cluster_simulation.py -q -k "test_cluster_simulation[" \
		--sim-seeds $(CLUSTER_SIM_SEEDS) --sim-duration $(CLUSTER_SIM_DURATION)

# Seeded fault injection against a real three-node cluster whose inter-broker links go
# through proxies (tests/cluster/nemesis.py): SEEDS is N (seeds 1..N) or a list "4,7,9";
# DURATION is the seconds of faults per seed. One line per seed; a failed seed keeps its
# temp directory (data and every node's output) and makes the target fail.
SEEDS ?= 3
DURATION ?= 60

nemesis: $(VENV)/.test-installed
	$(PY) tests/cluster/nemesis.py --seeds $(SEEDS) --duration $(DURATION)

clean:
	rm -rf $(VENV) data cluster *.egg-info
