"""The SharedDict examples: a Manager().dict() program run both ways, and @njit counters."""
from __future__ import annotations

import collections
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
MANAGER_PROGRAM = os.path.join(EXAMPLES, "manager_program.py")
NJIT_COUNTERS = os.path.join(EXAMPLES, "njit_counters.py")
ONE_LINE = "shared = manager.dict()  # <- change this one line to: shared = shm.SharedDict()"


def _run(path, *args, cwd) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True, text=True,
                       timeout=120, env=env, cwd=str(cwd))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _program_text():
    """The example's TEXT and stopwords, read without running it."""
    spec = importlib.util.spec_from_file_location("manager_program", MANAGER_PROGRAM)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.TEXT, mod.LINES_PER_CHUNK


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_manager_program_runs_both_ways(method, tmp_path):
    source = open(MANAGER_PROGRAM).read()
    assert source.count(ONE_LINE) == 1
    changed = source.replace(ONE_LINE, "shared = shm.SharedDict()")
    (tmp_path / "with_manager.py").write_text(source)
    (tmp_path / "with_shm.py").write_text(changed)
    with_manager = _run(tmp_path / "with_manager.py", method, cwd=tmp_path)
    with_shm = _run(tmp_path / "with_shm.py", method, cwd=tmp_path)
    assert with_shm == with_manager

    # The figures, computed here with a Counter over the same text.
    text, per = _program_text()
    stop = {"a", "the", "of", "to", "and", "in"}
    lines = text.splitlines()
    chunks = [lines[i:i + per] for i in range(0, len(lines), per)]
    tokens = [[w for ln in c for w in re.findall(r"[a-z]+(?:'[a-z]+)?", ln.lower()) if w not in stop]
              for c in chunks]
    total = collections.Counter(w for c in tokens for w in c)
    top = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
    n = len(chunks)
    expected = [
        f"chunks done True {n} of {n}",
        f"keys in the shared dict {2 * n + 4} status merging",
        f"lines counted {len(lines)} of {len(lines)}",
        f"words per chunk {[len(c) for c in tokens]}",
        "top words " + ", ".join(f"{w}={c}" for w, c in top),
        f"total words {sum(total.values())} distinct {len(total)}",
        "'netherfield' in chunk 02: True / chunk:99 present: False / get: -",
        f"after cleanup {n + 3} keys: chunk:00, chunk:01, chunk:02 ...",
    ]
    assert with_shm.splitlines() == expected
    assert sum(total.values()) > 150 and top[0] == ("that", 8)


def test_njit_counters(tmp_path):
    n = 300_000
    out = _run(NJIT_COUNTERS, n, cwd=tmp_path)

    # The same samples, bucketed and counted here with a Counter.
    total = collections.Counter()
    for w in range(2):
        x = np.random.default_rng(1000 + w).normal(0.0, 5000.0, n)
        total.update(np.floor(x / 10.0).astype(np.int64).tolist())
    busiest = min(total, key=lambda k: (-total[k], k))
    checksum = sum(k * v for k, v in total.items())
    assert (f"buckets {len(total)} total {2 * n} busiest {busiest} ({total[busiest]}) "
            f"checksum {checksum} exact True") in out.splitlines(), out

    workers = re.findall(r"^worker (\d): ([\d,]+) incr_i64 from @njit in [\d.]+ s = [\d.]+ M ops/s "
                         r"\(([\d,]+) returns to Python\)$", out, re.M)
    assert [w for w, _, _ in workers] == ["0", "1"], out
    assert all(int(m.replace(",", "")) == n for _, m, _ in workers)
    # every bucket was new to one of the two at least once: inserted from Python
    assert sum(int(t.replace(",", "")) for _, _, t in workers) >= len(total)
