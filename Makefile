# `make run` and `make test` set everything up in a local virtual environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run demo test test-slow bench screenshots clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/streamlit run dashboard/app.py --server.address 127.0.0.1 --server.headless true

demo: $(VENV)/.installed
	$(VENV)/bin/prunecore prune --model sample:resnet20 --sparsity 0.3 --data sample --check --out build/pruned_resnet20.pt

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) bench/bench_engine.py

screenshots: $(VENV)/.installed
	PRUNECORE_SCREENSHOTS=dashboard/screenshots $(PY) -m pytest -q tests/test_browser.py

clean:
	rm -rf $(VENV) build *.egg-info
