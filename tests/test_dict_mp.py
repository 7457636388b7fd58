"""SharedDict across real processes: exact counters, growth under readers,
handles pickled every way, and SIGKILL at any point (holding a shard lock,
at each step of a growth, at random) never wedging or corrupting the table.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import random
import signal
import time

import pytest

import shm
import _dict_workers as DW
import _report
from conftest import COUNT, KILL_ROUNDS

FORK = mp.get_context("fork")


def _run(ctx, target, *args, timeout=120):
    p = ctx.Process(target=target, args=args)
    p.start()
    return p


def _join_ok(procs, timeout=120):
    for p in procs:
        p.join(timeout)
        assert p.exitcode == 0, f"child exit code {p.exitcode}"


# --------------------------------------------------------------------------
# Counting.

def test_counters_exact(ctx):
    """Two processes incrementing 100 shared counters: not one update lost."""
    rounds = max(2000, COUNT // 2)
    with shm.SharedDict() as d:
        d["cas"] = 0
        procs = [_run(ctx, DW.bump_counters, d, rounds, w) for w in range(2)]
        DW.bump_counters(shm.SharedDict.open(d.name), rounds, 2)     # and this process too
        _join_ok(procs)
        total = sum(d.get(f"c{i}", 0) for i in range(DW.N_COUNTERS))
        assert total == 3 * rounds
        per_round = len(range(0, rounds, 20))
        assert d["altered"] == 3 * per_round and d["cas"] == 3 * per_round
        _report.add("dict increments counted", total + 2 * 3 * per_round)
        d.unlink()


# --------------------------------------------------------------------------
# Handles travel every way.

@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pickled_into_process_pool_and_executor(method):
    ctx = mp.get_context(method)
    with shm.SharedDict() as d:
        p = ctx.Process(target=DW.process_hit, args=(d, d.name))
        p.start()
        _join_ok([p])
        with ctx.Pool(2) as pool:
            pids = pool.map(DW.pool_hit, [d] * 6)
        with cf.ProcessPoolExecutor(2, mp_context=ctx) as ex:
            pids += list(ex.map(DW.pool_hit, [d] * 6))
        assert d["hits"] == 13 and d["by-name"] == 1
        for pid in set(pids):
            assert d[f"pid-{pid}"] == pid
        d.unlink()


# --------------------------------------------------------------------------
# Growth while other processes read.

def test_growth_under_concurrent_readers():
    n_stable = 300
    with shm.SharedDict(shards=2) as d:
        for k in range(n_stable):
            d[k] = DW.stable_value(k)
        growths0 = d.stats().growths
        pipes = [os.pipe() for _ in range(2)]
        readers = [_run(FORK, DW.read_while_growing, d, n_stable, w) for _, w in pipes]
        for _, w in pipes:
            os.close(w)
        n = max(5000, COUNT)
        for i in range(n):               # grow from 300 keys to thousands, values up to 20 KB
            d[("w", i)] = "x" * (i % 97) * (200 if i % 50 == 0 else 1)
            if i % 3 == 0 and i:
                del d[("w", i - 1)]
        d["done"] = True
        out = []
        for r, _ in pipes:
            chunks = []
            while chunk := os.read(r, 4096):
                chunks.append(chunk)
            os.close(r)
            out.append(b"".join(chunks).decode())
        _join_ok(readers)
        for o in out:
            assert o.startswith("ok"), o
            _, reads, iters = o.split()
            assert int(iters) >= 1
            _report.add("dict reads checked during growth", int(reads))
        assert d.stats().growths - growths0 >= 4, "the table did not grow while readers read"
        assert len(d) == n_stable + n - len(range(3, n, 3)) + 1
        d.unlink()


# --------------------------------------------------------------------------
# SIGKILL.

def _dead(p, timeout=60):
    p.join(timeout)
    assert p.exitcode == -signal.SIGKILL, f"victim exit code {p.exitcode}"


def test_kill_inside_alter_recovers_the_lock(ctx):
    with shm.SharedDict() as d:
        d["k"] = "before"
        d["other"] = 1
        repairs = d.stats().repairs
        p = _run(ctx, DW.kill_in_alter, d, "k")
        _dead(p)
        # The shard's lock died with its holder: the next writer recovers it.
        t0 = time.monotonic()
        d.alter("k", lambda v: v + "+after")
        assert time.monotonic() - t0 < 30
        assert d["k"] == "before+after" and d["other"] == 1
        assert d.stats().repairs == repairs + 1
        d.incr("n")
        assert d.copy() == {"k": "before+after", "other": 1, "n": 1}
        _report.add("dict kills survived")
        d.unlink()


@pytest.mark.parametrize("point", ["frozen", "copied", "replaced", "published"])
def test_kill_mid_growth(ctx, point):
    """Killed at each step of a growth: survivors read (even through the old
    generation they map), write, and find every key the victim wrote before."""
    with shm.SharedDict(shards=1) as d:
        model = {("p", i): i for i in range(50)}
        d.update(model)
        gen0 = d._table_gen(0)
        repairs = d.stats().repairs
        p = _run(ctx, DW.kill_at, d, point, 0)
        _dead(p)
        assert d.get(("p", 7)) == 7               # lock-free read, possibly through the old generation
        snap = d.copy()
        victim = sorted(i for (tag, i) in snap if tag == "c")
        assert victim == list(range(len(victim))), "the victim's writes have a gap"
        assert all(snap[("c", i)] == "x" * 50 for i in victim)
        assert {k: v for k, v in snap.items() if k[0] == "p"} == model
        d[("p", 50)] = 50                          # a write takes the lock: recovered
        for i in range(len(victim), len(victim) + 2000):
            d[("c", i)] = "x" * 50                 # and the shard grows again
        assert d.stats().repairs == repairs + 1
        assert d._table_gen(0) > gen0 + 1
        assert len(d) == 51 + len(victim) + 2000
        _report.add("dict kills survived")
        d.unlink()                                 # conftest: no generation segment left behind


def test_kill_writers_at_random():
    """Writers SIGKILLed at random moments, round after round; the table
    always checks out against what they acknowledged, and stays usable."""
    rng = random.Random(1234)
    rounds = max(KILL_ROUNDS * 3, 6)
    kills = checked = 0
    with shm.SharedDict(shards=2) as d:
        for r in range(rounds):
            procs = [_run(FORK, DW.chaos_writer, d, w, rng.randrange(1 << 30)) for w in range(2)]
            time.sleep(rng.uniform(0.05, 0.3))
            victim = rng.randrange(2)
            os.kill(procs[victim].pid, signal.SIGKILL)
            _dead(procs[victim])
            kills += 1
            time.sleep(rng.uniform(0, 0.05))
            os.kill(procs[1 - victim].pid, signal.SIGKILL)   # the other one too, a moment later
            _dead(procs[1 - victim])
            kills += 1
            checked += DW.check_chaos(d, {0, 1})
            d[("probe", r)] = r                   # every shard still takes writes
            for s in range(8):
                d.incr(("probe-incr", s))
        assert all(d[("probe", r)] == r for r in range(rounds))
        _report.add("dict shards repaired after kills", d.stats().repairs)
        _report.add("dict kills survived", kills)
        _report.add("dict values checked after kills", checked)
        d.unlink()


def test_demo_shared_dict_part():
    """The shared-dict half of `make demo` counts exactly, on both backends."""
    from shm import _demo_dict
    with shm.SharedDict() as d:
        counted, _, ok = _demo_dict._run(d, 2000)
        assert ok and counted == 2000 * _demo_dict.WORKERS
        assert {d[f"progress:{w}"] for w in range(_demo_dict.WORKERS)} == {3998, 3999}
        d.unlink()
    with mp.Manager() as m:
        counted, _, ok = _demo_dict._run(m.dict(), 200, m.Lock())
        assert ok and counted == 400


def _njit_add(name, n_keys, rounds, out):
    import numba
    from kernels import hashtable as H

    @numba.njit
    def run(desc, n_keys, start, stop):
        for r in range(start, stop):
            st, _ = H.add_i64(desc, r % n_keys, 1, 1000)
            if st != H.OK:
                return r, st
        return stop, 0

    d = shm.SharedDict.open(name)
    r = 0
    trips = 0
    while r < rounds:
        r, st = run(d.kernel(), n_keys, r, rounds)
        if r < rounds:                      # back in Python: grow, remap, or do this one here
            trips += 1
            k = r % n_keys
            if st == H.NEED_GROW:
                d.grow_for(k)
            elif st in (H.MOVED, H.UNMAPPED):
                d.refresh()
            else:                           # BUSY and the rest: Python's incr waits and recovers
                d.incr(k)
                r += 1
    out.put(trips)
    d.close()


def test_njit_add_i64_from_two_processes(ctx):
    """add_i64 from @njit: missing keys inserted, none counted twice, nothing lost."""
    n_keys, rounds = 5000, 40_000
    with shm.SharedDict(key_type="int64", value_type="int64", shards=2) as d:
        out = ctx.Queue()
        procs = [ctx.Process(target=_njit_add, args=(d.name, n_keys, rounds, out)) for _ in range(2)]
        for p in procs:
            p.start()
        trips = [out.get(timeout=300) for _ in procs]
        _join_ok(procs)
        assert len(d) == n_keys
        assert sum(d.copy().values()) == 2 * rounds
        assert all(v == 2 * rounds // n_keys for v in d.copy().values())
        _report.add("dict njit add_i64 increments counted", 2 * rounds)
        d.unlink()
