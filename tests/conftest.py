"""Shared fixtures: every test must leave /dev/shm exactly as it found it.

Cost knobs (environment variables, used by `make test` / `make stress`):
  SHM_TEST_COUNT   messages in the stress-shaped tests (default 20000)
  SHM_KILL_ROUNDS  rounds of the SIGKILL tests (default 6)
  SHM_STRESS       set to run the long soak tests
"""
from __future__ import annotations

import gc
import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)        # so spawned children can import tests/_workers.py

COUNT = int(os.environ.get("SHM_TEST_COUNT", "20000"))
KILL_ROUNDS = int(os.environ.get("SHM_KILL_ROUNDS", "6"))
STRESS = bool(os.environ.get("SHM_STRESS"))

SHM_DIR = "/dev/shm"


def _entries() -> set[str]:
    try:
        return set(os.listdir(SHM_DIR))
    except OSError:
        return set()


@pytest.fixture(autouse=True)
def shm_clean(request):
    """Fail a test that leaves segments behind (after giving children time to exit)."""
    before = _entries()
    yield
    deadline = time.monotonic() + 10.0
    leaked = set()
    while time.monotonic() < deadline:
        gc.collect()
        leaked = _entries() - before
        if not leaked:
            return
        time.sleep(0.05)
    for name in leaked:     # clean up so one leak does not cascade into every later test
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except OSError:
            pass
    pytest.fail(f"test left {len(leaked)} entries in /dev/shm: {sorted(leaked)[:10]}")


from _redis_server import redis_server  # noqa: E402,F401  (session: a loopback redis-server for the Redis backend)


@pytest.fixture(params=["fork", "spawn"])
def ctx(request):
    import multiprocessing as mp
    return mp.get_context(request.param)


def pytest_terminal_summary(terminalreporter):
    from _report import lines
    out = lines()
    if out:
        terminalreporter.section("shm fault and load figures")
        for line in out:
            terminalreporter.write_line(line)
