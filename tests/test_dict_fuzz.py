"""Random bytes written over a SharedDict's shard segments (index, heap and
counters; the validated segment header aside), then the dict used: every
outcome is a value, a named exception, or a clean repair. Never a crash, a
hang, an absurd length or allocation, or a leak. Each case runs in its own
interpreter, so a segfault would show as a signal exit code.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import _report
from conftest import STRESS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = 200 if STRESS else 24
PER_CHILD = 4

CHILD = r'''
import mmap, os, random, sys
import shm
from shm.errors import ShmError
ok = errors = 0
for seed in map(int, sys.argv[1:]):
    rng = random.Random(seed)
    d = shm.SharedDict(shards=2)
    for i in range(200):
        d[f"k{i}"] = ("v" * (i % 50)) if i % 3 else i
    for n in sorted(os.listdir("/dev/shm")):
        if not n.startswith(d._family) or n == d._family:
            continue
        fd = os.open("/dev/shm/" + n, os.O_RDWR)
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size) as m:
            for _ in range(rng.choice([1, 3, 10, 50])):
                off = rng.randrange(256, size)
                ln = min(rng.choice([1, 8, 64, 512]), size - off)
                m[off:off + ln] = os.urandom(ln) if rng.random() < 0.7 else b"\xff" * ln
        os.close(fd)
    for op in range(300):
        k = f"k{rng.randrange(250)}"
        try:
            r = rng.random()
            if r < 0.3:
                d.get(k)
            elif r < 0.5:
                d[k] = "x" * rng.randrange(100)
            elif r < 0.6:
                d.pop(k, None)
            elif r < 0.7:
                d.incr(k)
            elif r < 0.8:
                assert 0 <= len(d) < 10_000
                list(d.items())
            else:
                d.copy()
            ok += 1
        except (ShmError, KeyError, TypeError) as e:   # DecodeError, CorruptSegment: named
            errors += 1
    d["after"] = 1                 # still usable
    assert d["after"] == 1
    d.unlink()
    d.close()
print(ok, errors)
'''


@pytest.mark.parametrize("first", range(0, CASES, PER_CHILD))
def test_random_bytes_in_shards(first):
    seeds = [str(1000 + s) for s in range(first, first + PER_CHILD)]
    p = subprocess.run([sys.executable, "-c", CHILD, *seeds], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"seeds {seeds}: exit {p.returncode}\n{p.stderr[-2000:]}"
    ok, errors = map(int, p.stdout.split())
    _report.add("dict fuzz: damaged shards used", PER_CHILD)
    _report.add("dict fuzz: operations on damaged shards", ok + errors)
