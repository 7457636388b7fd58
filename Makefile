# shm: the two commands a new user runs are `make demo` and `make test`.
# Both create the virtual environment (.venv) if it is missing.

PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test stress bench env clean clean-shm redis-server

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(VPY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

env: $(STAMP)

# The main job: a real multi-process pipeline and shared dict, timed against multiprocessing.
demo: $(STAMP)
	$(VPY) -m shm demo

# The whole suite. Cost knobs (environment): SHM_TEST_COUNT scales message
# counts in the stress-shaped tests (default 20000); SHM_KILL_ROUNDS the kill
# tests' rounds (default 6); SHM_CHAOS_SECONDS / SHM_CHAOS_KILLS the kill chaos
# (default 30 s and at least 200 kills); SHM_LOAD_SECONDS the load test (default
# 10). The suite is sized to finish in minutes on 2 cores.
test: $(STAMP) redis-server
	$(VPY) -m pytest -q

# The Redis backend's tests start their own redis-server on a loopback port
# (tests/_redis_server.py); install it from the system's packages if missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { echo "installing redis-server (for the Redis backend's tests)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }; } || \
	  echo "redis-server could not be installed: the Redis backend's tests will be skipped (apt-get install redis-server)"

# The same suite, ten times the messages and kill rounds, a minute of load,
# 4 minutes and 1000+ kills of chaos, plus the soak tests.
stress: $(STAMP) redis-server
	SHM_TEST_COUNT=200000 SHM_KILL_ROUNDS=60 SHM_LOAD_SECONDS=60 SHM_STRESS=1 $(VPY) -m pytest -q

# Benchmarks against peers (installs the peers as the `bench` extra). Results
# go to bench/results/ as Markdown tables and PNG charts.
bench: $(STAMP)
	$(VPY) -m pip install -q -e '.[bench]'
	$(VPY) -m bench

clean-shm: $(STAMP)
	$(VPY) -m shm gc

clean:
	rm -rf $(VENV) build *.egg-info kernels/__pycache__ shm/__pycache__
