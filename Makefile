VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: run test bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/dwal broker --host 127.0.0.1 --port 9092 --http-port 8080 --data-dir ./data

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check protocol broker client bench tests
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(PY) bench/produce_consume.py

clean:
	rm -rf $(VENV) data

.PHONY: sim
sim: $(VENV)/.installed
	$(PY) -m pytest tests/broker/raft/test_simulation.py --sim-seeds 3000 -q
