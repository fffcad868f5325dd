VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
RUN_FLAGS ?= --host 127.0.0.1 --port 9092 --http-port 8080 --data-dir ./data

.PHONY: run test bench lint sim clean

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

test: $(VENV)/.test-installed
	$(PY) -m pytest -q tests

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check protocol broker client bench tests
	$(VENV)/bin/mypy

bench: $(VENV)/.runtime-installed
	$(PY) bench/produce_consume.py

# Seeds of the Raft core simulation and of the controller quorum simulation (a controller
# seed runs a whole cluster on a MockClock, so it costs far more than a Raft one).
SIM_SEEDS ?= 3000
CONTROLLER_SIM_SEEDS ?= 300

sim: $(VENV)/.test-installed
	$(PY) -m pytest tests/broker/raft/test_simulation.py --sim-seeds $(SIM_SEEDS) -q
	$(PY) -m pytest tests/broker/controller/test_controller_quorum_simulation.py \
		--controller-sim-seeds $(CONTROLLER_SIM_SEEDS) -q

clean:
	rm -rf $(VENV) data *.egg-info
