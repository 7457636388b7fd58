"""Dict benchmarks: shm.SharedDict against Manager().dict(), UltraDict, shared-memory-dict, lmdb and a plain dict.

Every role is its own forked process (``common.run_roles``); each run
starts from a fresh store made and filled by the parent before the fork, and
is timed from the ready barrier. Cases:

* ``small``, ``b100``, ``k10``, ``m1``: one process sets, then gets, keys
  ``"key<i>"`` cycling over the key set (small values: ints and short
  strings; then bytes values of 100 B, 10 KiB, 1 MiB), ops/s of each phase;
* ``incr``: two processes each add 1 to 100 shared counters, again and
  again; ops/s of both together and the *lost updates* (increments made
  minus the counters' final sum);
* ``rw``: one writer and one reader at the same time for a fixed duration:
  the writer's sets/s and the reader's gets/s;
* ``njit``: numeric mode (``key_type="int64", value_type="int64"``) from
  @njit loops calling ``kernels.hashtable.incr_i64`` / ``lookup_i64``, plus
  the same operations from Python for reference.

Each (case, peer) first gets a pilot run (time-boxed) that sizes its
operation counts to about ``--seconds`` per run; then ``--reps`` measured
runs, interleaved across peers; the tables give medians and min-max.
Targets are ratios of medians of the same run.
"""
from __future__ import annotations

import cProfile
import io
import itertools
import json
import os
import pstats
import time
from dataclasses import dataclass, field

import numpy as np

from . import dictpeers as DP
from .common import (REPO, ForeignLoad, LoadSampler, QuietGate, RunError, SampleStats, ShmWatch, Unavailable,
                     _version, best_ns, calibrate, fmt_rate, log, machine, median, now, results_dir, run_info,
                     run_roles, select_cases)

KiB, MiB = 1 << 10, 1 << 20
RUN_TIMEOUT = 90.0
CHUNK = 256                 # operations between two clock reads (chunks start at 1 and double)
NCOUNTERS = 100
SMALL_KEYS = 10_000       # keys of the small-values and 100 B cases
RW_KEYS = 1000
NJ_KEYS = 1 << 17           # numeric case: keys 0..NJ_KEYS-1, visited in a random order
NJ_KEYS_BIG = 1 << 20

GATE = QuietGate()


# --------------------------------------------------------------------------
# The measured loops (identical for every peer: only the callable differs).

def _ops(op, src, n, limit, pairs):
    """Call ``op`` on items of ``src`` (cycling) ``n`` times or until ``limit`` s; return (done, seconds)."""
    it = itertools.cycle(src)
    islice = itertools.islice
    done, ch = 0, 1
    t0 = now()
    deadline = t0 + limit
    while done < n:
        c = min(ch, n - done)
        if pairs:
            for k, v in islice(it, c):
                op(k, v)
        else:
            for k in islice(it, c):
                op(k)
        done += c
        if now() >= deadline:
            break
        if ch < CHUNK:
            ch *= 2
    return done, now() - t0


def _profile_text(pr, top=14):
    if pr is None:
        return None
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.lstrip().startswith("ncalls"):
            lines = lines[i:]
            break
    return "\n".join(ln.replace(REPO + "/", "") for ln in lines)


# --------------------------------------------------------------------------
# Roles (each in its own forked process).

def r_getset(R, store, keys, pairs, n_set, n_get, limit, profile=False):
    h = store.open()
    pr = cProfile.Profile() if profile else None
    t0 = R.ready()
    if pr:
        pr.enable()
    ns, ts = _ops(h.set, pairs, n_set, limit, True)
    ng, tg = _ops(h.get, keys, n_get, limit, False)
    if pr:
        pr.disable()
    t1 = now()
    k0, v0 = pairs[0]
    got = h.get(k0)
    if got != v0:
        raise RunError(f"get({k0!r}) after the set phase returned {str(got)[:60]!r}, expected {str(v0)[:60]!r}")
    R.report(t0=t0, t1=t1, set_ops=ns, set_s=ts, get_ops=ng, get_s=tg, profile=_profile_text(pr))
    h.close()


def r_incr(R, store, keys, n, limit, profile=False):
    h = store.open()
    src = keys[R.index * len(keys) // 2:] + keys[:R.index * len(keys) // 2]    # start half-way apart
    pr = cProfile.Profile() if profile else None
    t0 = R.ready()
    if pr:
        pr.enable()
    done, dt = _ops(h.incr, src, n, limit, False)
    if pr:
        pr.disable()
    R.report(t0=t0, t1=t0 + dt, ops=done, profile=_profile_text(pr))
    h.close()


def r_writer(R, store, pairs, seconds, profile=False):
    h = store.open()
    pr = cProfile.Profile() if profile else None
    t0 = R.ready()
    if pr:
        pr.enable()
    done, dt = _ops(h.set, pairs, 1 << 60, seconds, True)
    if pr:
        pr.disable()
    R.report(t0=t0, t1=t0 + dt, ops=done, role="writer", profile=_profile_text(pr))
    h.close()


def r_reader(R, store, keys, check, seconds, profile=False):
    h = store.open()
    pr = cProfile.Profile() if profile else None
    src = keys[len(keys) // 2:] + keys[:len(keys) // 2]
    t0 = R.ready()
    if pr:
        pr.enable()
    done, dt = _ops(h.get, src, 1 << 60, seconds, False)
    if pr:
        pr.disable()
    v = h.get(keys[0])
    if v not in check:
        raise RunError(f"reader: get({keys[0]!r}) returned {str(v)[:60]!r}")
    R.report(t0=t0, t1=t0 + dt, ops=done, role="reader", profile=_profile_text(pr))
    h.close()


# @njit loops over the numeric kernels (compiled in the parent before forking).

_NJ = {}


def _njit_funcs():
    if _NJ:
        return _NJ
    import numba

    from kernels import hashtable as H
    from kernels import layout as L
    incr_i64, lookup_i64, put_i64 = H.incr_i64, H.lookup_i64, H.put_i64
    VK_I64 = L.VK_I64

    @numba.njit(cache=True)
    def nj_incr(d, keys, start, n):
        """incr_i64(d, keys[i % len], 1) for i in [start, n); returns (stop index, status)."""
        m = keys.shape[0] - 1            # a power of two minus one
        i = start
        while i < n:
            r, v = incr_i64(d, keys[i & m], 1)
            if r != 0:
                return i, r
            i += 1
        return n, 0

    @numba.njit(cache=True)
    def nj_lookup(d, keys, start, n, acc):
        m = keys.shape[0] - 1
        i = start
        s = 0
        while i < n:
            r, v = lookup_i64(d, keys[i & m])
            if r != 0:
                acc[0] += s
                return i, r
            s += v
            i += 1
        acc[0] += s                     # keep the loads alive
        return n, 0

    @numba.njit(cache=True)
    def nj_fill(d, keys, start, value):
        for i in range(start, keys.shape[0]):
            r = put_i64(d, keys[i], VK_I64, value, 7)
            if r < 0:
                return i, r
        return keys.shape[0], 0

    d0 = np.zeros(H.X_SHARDS + H.X_STRIDE, np.int64)    # no shard mapped: every call returns UNMAPPED
    d0[H.X_NSHARDS] = 1
    d0[H.X_SHIFT] = 64
    k0 = np.zeros(1, np.int64)
    nj_incr(d0, k0, 0, 0)
    nj_lookup(d0, k0, 0, 0, np.zeros(1, np.int64))
    nj_fill(d0, k0, 1, 0)
    _NJ.update(incr=nj_incr, lookup=nj_lookup, fill=nj_fill, H=H)
    return _NJ


def _nj_drive(d, call, key_of, n):
    """Run an @njit loop to ``n`` ops, going back to Python on a status and resuming. Returns resumes."""
    H = _NJ["H"]
    done, resumes = 0, 0
    while done < n:
        done, r = call(done, n)
        if r == 0:
            break
        resumes += 1
        if r in (H.MOVED, H.UNMAPPED):
            d.refresh()
        elif r == H.NEED_GROW:
            d.grow_for(key_of(done))
        elif r == H.NOTFOUND:
            d[key_of(done)] = 0
        elif r == H.BUSY:
            time.sleep(0)
        else:
            raise RunError(f"@njit loop: status {H.STATUS_NAMES.get(r, r)} at op {done}")
        if resumes > 100_000:
            raise RunError("@njit loop: over 100000 resumes")
    return resumes


def r_nj(R, store, op, keys, n):
    nj = _njit_funcs()
    d = store.d
    kd = d.kernel()                      # the descriptor belongs to the process that uses it
    acc = np.zeros(1, np.int64)
    keys = np.roll(keys, R.index * (keys.shape[0] // 2))    # a second process starts half-way apart
    mask = keys.shape[0] - 1
    fn = nj["incr"] if op == "incr" else nj["lookup"]
    if op == "incr":
        def call(i, m):
            return fn(kd, keys, i, m)
    else:
        def call(i, m):
            return fn(kd, keys, i, m, acc)
    t0 = R.ready()
    resumes = _nj_drive(d, call, lambda i: int(keys[i & mask]), n)
    t1 = now()
    R.report(t0=t0, t1=t1, ops=n, resumes=resumes)


def r_py_num(R, store, op, keys, n, limit):
    d = store.d
    src = [int(k) for k in keys[:NJ_KEYS]]
    fn = d.incr if op == "incr" else d.__getitem__
    t0 = R.ready()
    done, dt = _ops(fn, src, n, limit, False)
    R.report(t0=t0, t1=t0 + dt, ops=done)


class _NumStore(DP.Store):
    """A numeric SharedDict with int64 keys ``keys``, all 0, filled by an @njit put_i64 loop."""

    leak_is_bug = True

    def __init__(self, keys):
        import shm
        nj = _njit_funcs()
        self.keys = keys
        self.d = shm.SharedDict(key_type="int64", value_type="int64", capacity=keys.shape[0])
        self.shm_prefixes = (self.d.name,)
        kd = self.d.kernel()
        try:
            _nj_drive(self.d, lambda i, m: nj["fill"](kd, keys, i, 0), lambda i: int(keys[i]), keys.shape[0])
        except BaseException:
            self.d.close()
            raise

    def total(self):
        """Sum of every value (an @njit lookup loop: the 1M-key dict is too big for a Python loop)."""
        nj = _njit_funcs()
        kd = self.d.kernel()
        acc = np.zeros(1, np.int64)
        ks = self.keys
        _nj_drive(self.d, lambda i, m: nj["lookup"](kd, ks, i, m, acc), lambda i: int(ks[i]), ks.shape[0])
        return int(acc[0])

    def destroy(self):
        self.d.close()


class NumPeer(DP.DictPeer):
    module = "numba"

    def __init__(self, key, name, op, procs=1, nkeys=NJ_KEYS, python=False, note=""):
        self.key, self.name, self.op, self.procs, self.nkeys, self.python = key, name, op, procs, nkeys, python
        self.note = note


# --------------------------------------------------------------------------
# Cases.

@dataclass
class Case:
    key: str
    title: str
    kind: str                   # getset | incr | rw | njit
    peers: list
    about: str = ""
    value_bytes: int = 0        # getset: 0 = small values
    nkeys: int = 0
    smd_nkeys: int = 0
    rows: dict = field(default_factory=dict)

    def keys_for(self, peer):
        n = self.smd_nkeys if peer.key.startswith("smd") and self.smd_nkeys else self.nkeys
        return [f"key{i}" for i in range(n)]

    def values(self, n, new=False):
        if self.value_bytes:
            return [bytes([(i + (7 if new else 0)) % 251]) * self.value_bytes for i in range(n)]
        if new:
            return [i + 1 if i % 2 == 0 else f"new{i}" for i in range(n)]
        return [i if i % 2 == 0 else f"val{i}" for i in range(n)]


@dataclass
class Row(SampleStats):
    peer: object
    status: str = "ok"          # ok | unavailable | error
    reason: str = ""
    n: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)
    failures: list = field(default_factory=list)


def getset_peers():
    return [DP.ShmDictPeer(), DP.UltraDictPeer(), DP.LmdbPeer(), DP.ManagerPeer(), DP.SmdPeer(),
            DP.PlainDictPeer()]


def make_cases():
    gs_about = ("One process: a set phase (`d[k] = v` over the keys, cycling, new values), then a get phase "
                "(`d[k]`), each sized to ~0.4x `--seconds`. The store is made and filled before the fork. "
                "shared-memory-dict gets {smd} keys instead of {n} (it pickles the whole dict on every "
                "operation).")
    cases = []
    for key, title, vb, n, smd in (("small", "get / set, small values (ints and short strings), 10,000 keys", 0,
                                    10_000, 1_000),
                                   ("b100", "get / set, 100 B values (bytes), 10,000 keys", 100, 10_000, 1_000),
                                   ("k10", "get / set, 10 KiB values, 1,000 keys", 10 * KiB, 1_000, 100),
                                   ("mib", "get / set, 1 MiB values, 32 keys", MiB, 32, 4)):
        cases.append(Case(key, title, "getset", getset_peers(), gs_about.format(smd=f"{smd:,}", n=f"{n:,}"),
                          value_bytes=vb, nkeys=n, smd_nkeys=smd))
    cases.append(Case(
        "incr", f"two processes each incrementing {NCOUNTERS} shared counters", "incr",
        [DP.ShmDictPeer(),
         DP.LmdbPeer(),
         DP.ManagerPeer(locked=True),
         DP.UltraDictPeer(shared_lock=True, locked=True, key="ultradict-lock",
                          name="UltraDict, shared_lock=True, with its lock",
                          note="`UltraDict(shared_lock=True)`, `with d.lock: d[k] += 1` (its lock, an "
                               "`atomics` spinlock in shared memory, is the one that works across "
                               "processes that were not forked from the creator)."),
         DP.SmdPeer(locked=True),
         # Without a lock around the read-modify-write: every peer loses updates.
         DP.LmdbPeer(locked=False, key="lmdb-nolock", name="lmdb, no lock (read txn, then write txn)"),
         DP.ManagerPeer(key="manager-nolock", name="Manager().dict(), no lock"),
         DP.UltraDictPeer(shared_lock=True, locked=False, key="ultradict-nolock",
                          name="UltraDict, shared_lock=True, no lock",
                          note="`d[k] += 1` without taking `d.lock` (each get and set is safe on its own; the "
                               "read-modify-write is not)."),
         DP.SmdPeer(key="smd-nolock", name="shared-memory-dict, no lock")],
        f"Counters `\"key0\"`..`\"key{NCOUNTERS - 1}\"` start at 0; each process adds 1 to each in turn (the "
        "second starts half-way round), the way a user of that peer would: shm `d.incr(k)`; lmdb one write "
        "transaction (get, add, put: lmdb runs one write transaction at a time); the others "
        "`with lock: d[k] += 1` with the lock the peer offers (UltraDict's own, a `Manager().Lock()`, a "
        "`multiprocessing.Lock`). The *no lock* rows do the same read-modify-write without the lock (lmdb: "
        "a read transaction, then a write transaction), to show the updates they lose. Rate = all "
        "increments / (last process done - barrier). **Lost** = increments made - final sum of the counters.",
        nkeys=NCOUNTERS))
    cases.append(Case(
        "rw", f"one writer + one reader at the same time, small values, {RW_KEYS:,} keys", "rw",
        [DP.ShmDictPeer(), DP.UltraDictPeer(), DP.LmdbPeer(), DP.ManagerPeer()],
        "Both processes start at the barrier and stop after `--seconds`: the writer sets the keys in turn "
        "(new values), the reader gets them in turn (starting half-way round). UltraDict keeps its default "
        "lock here (one writer; the reader never locks).",
        nkeys=RW_KEYS))
    big = f"{NJ_KEYS_BIG:,}"
    cases.append(Case(
        "num", f"numeric mode from @njit: SharedDict(key_type=\"int64\", value_type=\"int64\"), "
                f"{NJ_KEYS:,} keys", "njit",
        [NumPeer("nj-incr", "@njit loop of incr_i64(d, key, 1)", "incr"),
         NumPeer("nj-lookup", "@njit loop of lookup_i64(d, key)", "lookup"),
         NumPeer("nj-incr-2p", "@njit incr_i64, two processes at once", "incr", procs=2,
                 note="both processes increment the same keys; lost updates checked"),
         NumPeer("nj-incr-1m", f"@njit incr_i64, {big} keys", "incr", nkeys=NJ_KEYS_BIG),
         NumPeer("nj-lookup-1m", f"@njit lookup_i64, {big} keys", "lookup", nkeys=NJ_KEYS_BIG),
         NumPeer("py-incr", "Python loop of d.incr(key) (same dict)", "incr", python=True),
         NumPeer("py-get", "Python loop of d[key] (same dict)", "lookup", python=True)],
        f"`SharedDict(key_type=\"int64\", value_type=\"int64\", capacity=keys)`, filled with 0 for keys "
        f"0..N-1 by an @njit `put_i64` loop in the parent; each process takes `d.kernel()` itself and runs an "
        f"@njit loop over the keys in a random order (a permutation, cycled). On a status other than OK "
        f"the loop returns to Python, which calls `d.refresh()` (MOVED/UNMAPPED), `d.grow_for(key)` "
        f"(NEED_GROW) or sets the key, and resumes. {NJ_KEYS:,} keys (~6 MB of index and records) stay in "
        f"the L3 cache; the {big}-key rows show the DRAM-bound case."))
    return cases


# --------------------------------------------------------------------------
# Runs.

def _fail_reason(e: BaseException) -> str:
    s = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    if not s:
        return type(e).__name__
    head, tail = s[0], s[-1].strip()
    tail = tail if len(tail) <= 120 else tail[:117] + "..."     # e.g. a dump of the bytes a peer could not read
    return (head if tail == head else f"{head} ... {tail}")[:300]


def run_once(case: Case, peer, n: dict, watch: ShmWatch, opts, profile=False) -> dict:
    GATE.wait()
    with ForeignLoad() as fl:
        out = _run_once(case, peer, n, watch, opts, profile)
    out["other"] = fl.cores
    return out


def _run_once(case, peer, n, watch, opts, profile):
    store = None
    try:
        if case.kind == "njit":
            keys = np.random.default_rng(12345).permutation(peer.nkeys).astype(np.int64)
            store = _NumStore(keys)
            if peer.python:
                roles = [(r_py_num, (store, peer.op, keys, n["ops"], n["limit"]))]
            else:
                roles = [(r_nj, (store, peer.op, keys, n["ops"]))] * peer.procs
            res = run_roles(roles, RUN_TIMEOUT)
            ops = sum(r["ops"] for r in res)
            dt = max(r["t1"] for r in res) - min(r["t0"] for r in res)
            out = {"rate": ops / dt, "ops": ops, "seconds": dt, "resumes": sum(r.get("resumes", 0) for r in res)}
            if peer.op == "incr":
                out["lost"] = ops - store.total()
            return out
        keys = case.keys_for(peer)
        init = dict(zip(keys, [0] * len(keys) if case.kind == "incr" else case.values(len(keys))))
        store = peer.make(init, value_bytes=case.value_bytes)
        if case.kind == "getset":
            pairs = list(zip(keys, case.values(len(keys), new=True)))
            res = run_roles([(r_getset, (store, keys, pairs, n["set"], n["get"], n["limit"], profile))],
                            RUN_TIMEOUT)
            r = res[0]
            return {"set": r["set_ops"] / r["set_s"], "get": r["get_ops"] / r["get_s"],
                    "set_ops": r["set_ops"], "get_ops": r["get_ops"], "seconds": r["t1"] - r["t0"],
                    "profiles": [("get/set", r.get("profile"))]}
        if case.kind == "incr":
            res = run_roles([(r_incr, (store, keys, n["ops"], n["limit"], profile))] * 2, RUN_TIMEOUT)
            ops = sum(r["ops"] for r in res)
            dt = max(r["t1"] for r in res) - min(r["t0"] for r in res)
            total = store.total(keys)
            return {"rate": ops / dt, "ops": ops, "lost": ops - total, "seconds": dt,
                    "profiles": [(f"process {i}", r.get("profile")) for i, r in enumerate(res)]}
        if case.kind == "rw":
            pairs = list(zip(keys, case.values(len(keys), new=True)))
            check = set(case.values(len(keys))[:1] + case.values(len(keys), new=True)[:1])
            res = run_roles([(r_writer, (store, pairs, n["seconds"], profile)),
                             (r_reader, (store, keys, check, n["seconds"], profile))], RUN_TIMEOUT)
            w, r = res
            return {"writer": w["ops"] / (w["t1"] - w["t0"]), "reader": r["ops"] / (r["t1"] - r["t0"]),
                    "seconds": max(w["t1"], r["t1"]) - min(w["t0"], r["t0"]),
                    "profiles": [("writer", w.get("profile")), ("reader", r.get("profile"))]}
        raise ValueError(case.kind)
    finally:
        if store is not None:
            try:
                store.destroy()
            except Exception as e:
                log(f"   {peer.name}: destroy failed: {e!r}")
            watch.sweep(peer.name, store.shm_prefixes, is_bug=store.leak_is_bug)


def _sizes(case: Case, peer, m: dict | None, opts) -> dict:
    """Operation counts for a measured run, from the pilot's rates (None: the pilot itself)."""
    T = opts.seconds
    if case.kind == "rw":
        return {"seconds": T}
    pilot_s = 0.15 if opts.quick else 0.25
    if case.kind == "getset":
        if m is None:
            return {"set": 1 << 60, "get": 1 << 60, "limit": pilot_s}
        return {"set": calibrate(m["set"], 0.4 * T, 4, 50_000_000), "get": calibrate(m["get"], 0.4 * T, 4, 50_000_000),
                "limit": max(2.0, 4 * T)}
    if case.kind == "incr":
        if m is None:
            return {"ops": 1 << 60, "limit": pilot_s}
        return {"ops": calibrate(m["rate"] / 2, 0.8 * T, 4, 50_000_000), "limit": max(2.0, 4 * T)}
    if case.kind == "njit":
        if peer.python:
            if m is None:
                return {"ops": 1 << 60, "limit": pilot_s}
            return {"ops": calibrate(m["rate"], 0.6 * T, 1000, 50_000_000), "limit": max(2.0, 4 * T)}
        if m is None:
            return {"ops": 2_000_000}
        return {"ops": calibrate(m["rate"] / peer.procs, 0.6 * T, 1_000_000, 2_000_000_000)}
    raise ValueError(case.kind)


def _show(case, m):
    if case.kind == "getset":
        return f"set {fmt_rate(m['set'])}/s get {fmt_rate(m['get'])}/s"
    if case.kind == "rw":
        return f"writer {fmt_rate(m['writer'])}/s reader {fmt_rate(m['reader'])}/s"
    s = f"{fmt_rate(m['rate'])} ops/s"
    if "lost" in m:
        s += f" lost {m['lost']}"
    return s


def run_case(case: Case, opts, watch: ShmWatch):
    log(f"\n== {case.title}")
    for peer in case.peers:
        row = case.rows[peer.key] = Row(peer)
        try:
            peer.check()
        except Unavailable as e:
            row.status, row.reason = "unavailable", str(e)
        except Exception as e:
            row.status, row.reason = "unavailable", f"{type(e).__name__}: {e}"
        if row.status != "ok":
            log(f"   {peer.name:46s} unavailable: {row.reason}")
    for row in [r for r in case.rows.values() if r.status == "ok"]:
        if case.kind == "rw":
            row.n = _sizes(case, row.peer, None, opts)
            continue
        try:
            m = run_once(case, row.peer, _sizes(case, row.peer, None, opts), watch, opts)
            row.n = _sizes(case, row.peer, m, opts)
            log(f"   pilot {row.peer.name:46s} {_show(case, m)}")
        except Exception as e:
            row.status, row.reason = "error", _fail_reason(e)
            log(f"   pilot {row.peer.name:46s} FAILED: {row.reason}")
    reps = opts.reps
    for rep in range(reps):
        for row in [r for r in case.rows.values() if r.status == "ok"]:
            try:
                m = run_once(case, row.peer, row.n, watch, opts)
                m.pop("profiles", None)
                row.samples.append(m)
                log(f"   run {rep + 1}/{reps} {row.peer.name:46s} {_show(case, m)}  ({m['seconds']:.2f} s, "
                    f"other load {m['other']:.2f} cores)")
            except Exception as e:
                log(f"   run {rep + 1}/{reps} {row.peer.name:46s} FAILED: {_fail_reason(e)}")
                row.failures.append(_fail_reason(e))
                if not row.samples and rep == reps - 1:
                    row.status, row.reason = "error", _fail_reason(e)


# --------------------------------------------------------------------------
# Targets.

@dataclass
class Target:
    text: str
    case: str
    peer: str
    other: str | None
    metric: str
    factor: float
    mode: str = "ratio"         # ratio (>= factor x other) | above (> other) | abs (> factor) | zero
    short: str = ""


TARGETS = [
    Target("get from Python faster than UltraDict's (local-copy) get", "small", "shm", "ultradict", "get", 1,
           "above", "UltraDict get"),
    Target("set >= 5x lmdb's set", "small", "shm", "lmdb", "set", 5, short="5x lmdb set"),
    Target("set >= 5x UltraDict's set", "small", "shm", "ultradict", "set", 5, short="5x UltraDict set"),
    Target("get >= 50x Manager().dict()'s get", "small", "shm", "manager", "get", 50, short="50x Manager get"),
    Target("set >= 50x Manager().dict()'s set", "small", "shm", "manager", "set", 50, short="50x Manager set"),
    Target("two-process incr >= 3x lmdb write transactions", "incr", "shm", "lmdb", "rate", 3, short="3x lmdb"),
    Target("two-process incr >= 100x Manager dict + Manager lock", "incr", "shm", "manager-lock", "rate", 100,
           short="100x Manager+lock"),
    Target("two-process incr: zero lost updates", "incr", "shm", None, "lost", 0, "zero"),
    Target("1 writer + 1 reader: reader at least as fast as UltraDict's reader", "rw", "shm", "ultradict",
           "reader", 1, short="UltraDict reader"),
    Target("1 writer + 1 reader: writer >= 5x lmdb's writer", "rw", "shm", "lmdb", "writer", 5,
           short="5x lmdb writer"),
    Target("@njit numeric: incr_i64 > 10 M ops/s", "num", "nj-incr", None, "rate", 10e6, "abs", "10 M/s"),
    Target("@njit numeric: lookup_i64 > 10 M ops/s", "num", "nj-lookup", None, "rate", 10e6, "abs", "10 M/s"),
]

# The same Python get/set ratios at every value size (information: the targets are judged on small values).
SIZE_RATIOS = [t for t in TARGETS if t.case == "small"]


def _verdict(t: Target, cases: dict, case_key=None) -> dict:
    ck = case_key or t.case
    c = cases.get(ck)
    row = c.rows.get(t.peer) if c else None
    other = c.rows.get(t.other) if (c and t.other) else None
    verdict, measured, ratio = "NOT RUN", "-", None
    if c is None:
        pass
    elif row is None or not row.samples:
        verdict, measured = "FAIL", f"shm side has no result ({row.reason if row else 'missing'})"
    elif t.mode == "zero":
        lost = [s["lost"] for s in row.samples]
        measured = f"lost {sum(lost)} of {sum(s['ops'] for s in row.samples):,} increments over {len(lost)} runs"
        verdict = "PASS" if all(x == 0 for x in lost) else "FAIL"
    elif t.mode == "abs":
        v = row.med(t.metric)
        measured = f"{fmt_rate(v)} ops/s"
        verdict = "PASS" if v > t.factor else "FAIL"
        ratio = v / t.factor
    elif other is None or not other.samples:
        verdict = "N/A"
        measured = f"reference unavailable ({other.reason if other else 'missing'})"
    else:
        a, b = row.med(t.metric), other.med(t.metric)
        ratio = a / b if b > 0 else float("inf")
        measured = f"{fmt_rate(a)}/s vs {fmt_rate(b)}/s = {ratio:.2f}x (need {'>' if t.mode == 'above' else '>='} " \
                   f"{t.factor:g}x)"
        ok = ratio > t.factor if t.mode == "above" else ratio >= t.factor
        verdict = "PASS" if ok else "FAIL"
    return {"target": t.text, "case": ck, "measured": measured, "verdict": verdict, "ratio": ratio}


def judge(cases: dict) -> list[dict]:
    return [_verdict(t, cases) for t in TARGETS]


def size_ratios(cases: dict) -> list[dict]:
    out = []
    for ck in ("small", "b100", "k10", "mib"):
        if ck in cases:
            out.append({"case": ck, "cells": [_verdict(t, cases, ck) for t in SIZE_RATIOS]})
    return out


def target_lines(case):
    out = []
    for t in TARGETS:
        if t.case != case.key:
            continue
        if t.mode == "abs":
            out.append((t.metric, t.short, t.factor))
        elif t.other:
            o = case.rows.get(t.other)
            if o is not None and o.samples:
                out.append((t.metric, t.short, o.med(t.metric) * t.factor))
    return out


# --------------------------------------------------------------------------
# Where shm's time goes: split timings in one process, and profiled runs of failing cases.

def _best_ns(fn, k, reps=7):
    return best_ns(fn, k, reps)


def breakdown() -> dict:
    """ns per operation of SharedDict's Python paths and of their parts (one process, no contention)."""
    import msgpack

    import shm
    import shm.dict as SD
    out = {}
    K = 2000
    d = shm.SharedDict(capacity=2 * K + SMALL_KEYS)
    try:
        keys = [f"key{i}" for i in range(K)]
        ints = [f"int{i}" for i in range(K)]
        many = [f"many{i}" for i in range(SMALL_KEYS)]
        vals = [f"new{i}" for i in range(K)]
        for i, k in enumerate(keys):
            d[k] = f"val{i}"
        for k in ints + many:
            d[k] = 7
        kbs = [d._key(k) for k in keys]
        ikbs = [d._key(k) for k in ints]
        da, OFF = d._daddr, SD._OFF
        GET, PUT, INCR, SHARD_OF = SD._GET, SD._PUT, SD._INCR, SD._SHARD_OF
        get, st, incr = d.__getitem__, d.__setitem__, d.incr

        def loop(fn, xs):
            def f():
                for x in xs:
                    fn(x)
            return f

        def kern(fn, kbs, *extra):
            def f():
                for kb in kbs:
                    fn(da, id(kb) + OFF, len(kb), *extra)
            return f

        def setloop(xs, v):
            def f():
                for k in xs:
                    st(k, v)
            return f

        plain = dict.fromkeys(keys, "val")
        out["plain dict get (bound method), for reference"] = _best_ns(loop(plain.__getitem__, keys), K)
        out[f"d[k], short str value ({K:,} keys: key cache hits)"] = _best_ns(loop(get, keys), K)
        out[f"d[k], int value ({K:,} keys: key cache hits)"] = _best_ns(loop(get, ints), K)
        out["  key cache lookup (d._kc.get)"] = _best_ns(loop(d._kc.get, keys), K)
        out["  get kernel call alone (get_at)"] = _best_ns(kern(GET, kbs), K)
        out["  shard-of kernel call (a minimal kernel call)"] = _best_ns(kern(SHARD_OF, kbs), K)
        enc = msgpack.packb("val1234")
        area = memoryview(bytearray(enc))
        n = len(enc)
        out["  slice the result area + decode (d's msgpack decoder)"] = _best_ns(
            lambda: [d._dec_fast(area[0:n]) for _ in range(K)], K)
        out["  msgpack.unpackb(bytes), no options, for reference"] = _best_ns(
            lambda: [msgpack.unpackb(enc) for _ in range(K)], K)
        out[f"d[k], int value, {SMALL_KEYS:,} keys cycled (more than the {SD.KEY_CACHE:,}-key cache)"] = \
            _best_ns(loop(get, many), SMALL_KEYS, reps=3)
        out["  encode_key (what a key cache miss adds, plus the cache insert)"] = _best_ns(loop(d._key, keys), K)
        out[f"d[k] = v, short str value ({K:,} keys)"] = _best_ns(lambda: [st(k, v) for k, v in zip(keys, vals)], K)
        out[f"d[k] = v, int value ({K:,} keys)"] = _best_ns(setloop(ints, 9), K)
        out["  msgpack encode (short str)"] = _best_ns(loop(d._enc, vals), K)
        PUT_STR = SD._PUT_STR_I64

        def put_str():
            for k in ints:
                PUT_STR(da, k, 9)
        out["  put kernel call alone, int value (put_str_i64_at: the str key and the int as objects)"] = \
            _best_ns(put_str, K)
        out["  put_at, the general path's kernel (non-str keys: seven int arguments)"] = \
            _best_ns(kern(PUT, ikbs, SD._VK_I64, 0, 0, 9), K)
        out[f"d[k] = v, int value, {SMALL_KEYS:,} keys cycled"] = _best_ns(setloop(many, 9), SMALL_KEYS, reps=3)
        out[f"d.incr(k) ({K:,} keys)"] = _best_ns(loop(incr, ints), K)
        out["  incr kernel call alone (incr_at)"] = _best_ns(kern(INCR, ikbs, 1), K)
    finally:
        d.close()
    return out


def profiled_runs(cases: dict, verdicts: list, watch: ShmWatch, opts) -> dict:
    """The shm side of every case with a failed target again, under cProfile (for proportions)."""
    failed = []
    for v in verdicts:
        if v["verdict"] == "FAIL" and v["case"] in cases and v["case"] not in failed and v["case"] != "num":
            failed.append(v["case"])
    out = {}
    for ck in failed:
        case = cases[ck]
        row = case.rows.get("shm")
        if row is None or row.status != "ok" or not row.n:
            continue
        try:
            m = run_once(case, row.peer, row.n, watch, opts, profile=True)
            out[ck] = {"measured": _show(case, m), "profiles": m.get("profiles", [])}
        except Exception as e:
            out[ck] = {"error": _fail_reason(e)}
    return out


# --------------------------------------------------------------------------
# Reports.

def _ratio(case, row, metric, ref_key):
    ref = case.rows.get(ref_key)
    if ref is None or not ref.samples or not row.samples:
        return "-"
    a, b = row.med(metric), ref.med(metric)
    if not (a > 0 and b > 0):
        return "-"
    return f"{a / b:.2f}x"


def case_table(case: Case) -> list[str]:
    L = []
    ref = "shm"
    if case.kind == "getset":
        head = ["peer", "set ops/s", "get ops/s", "shm set is", "shm get is", "set over runs", "get over runs",
                "keys", "other load"]
    elif case.kind == "incr":
        head = ["peer", "increments/s (both)", "shm is", "lost updates (median)", "lost, all runs",
                "ops/s over runs", "other load"]
    elif case.kind == "rw":
        head = ["peer", "writer sets/s", "reader gets/s", "shm writer is", "shm reader is", "writer over runs",
                "reader over runs", "other load"]
    else:
        head = ["loop", "ops/s", "ns/op", "over runs", "ops/run", "Python re-entries", "lost", "other load"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|---|" + "|".join("---" if "over runs" in h else "---:" for h in head[1:]) + "|")
    blank = " |" * (len(head) - 2)
    shm_row = case.rows.get(ref)
    for row in case.rows.values():
        nm = row.peer.name
        name = f"**{nm}**" if row.peer.key.startswith(("shm", "nj", "py")) else nm
        if not row.samples:
            what = "unavailable" if row.status == "unavailable" else "failed"
            L.append(f"| {name} | {what}: {row.reason.replace('|', '/')} |" + blank)
            continue
        other = f"{row.med('other'):.2f}"
        if case.kind == "getset":
            lo_s, hi_s = row.span("set")
            lo_g, hi_g = row.span("get")
            nk = len(case.keys_for(row.peer))
            def vs(m):
                return "-" if row.peer.key == ref or shm_row is None else _ratio(case, shm_row, m, row.peer.key)
            cells = [fmt_rate(row.med("set")), fmt_rate(row.med("get")), vs("set"), vs("get"),
                     f"{fmt_rate(lo_s)}-{fmt_rate(hi_s)}", f"{fmt_rate(lo_g)}-{fmt_rate(hi_g)}", f"{nk:,}"]
        elif case.kind == "incr":
            lo, hi = row.span("rate")
            lost = [s["lost"] for s in row.samples]
            pct = median([s["lost"] / s["ops"] for s in row.samples]) * 100
            cells = [fmt_rate(row.med("rate")),
                     "-" if row.peer.key == ref or shm_row is None else _ratio(case, shm_row, "rate", row.peer.key),
                     f"{median(lost):,.0f} ({pct:.1f}%)", ", ".join(f"{x:,}" for x in lost),
                     f"{fmt_rate(lo)}-{fmt_rate(hi)}"]
        elif case.kind == "rw":
            lo_w, hi_w = row.span("writer")
            lo_r, hi_r = row.span("reader")
            cells = [fmt_rate(row.med("writer")), fmt_rate(row.med("reader")),
                     "-" if row.peer.key == ref or shm_row is None else _ratio(case, shm_row, "writer", row.peer.key),
                     "-" if row.peer.key == ref or shm_row is None else _ratio(case, shm_row, "reader", row.peer.key),
                     f"{fmt_rate(lo_w)}-{fmt_rate(hi_w)}", f"{fmt_rate(lo_r)}-{fmt_rate(hi_r)}"]
        else:
            lo, hi = row.span("rate")
            lost = [s["lost"] for s in row.samples if "lost" in s]
            cells = [fmt_rate(row.med("rate")), f"{1e9 / row.med('rate'):.1f}",
                     f"{fmt_rate(lo)}-{fmt_rate(hi)}", f"{median([s['ops'] for s in row.samples]):,.0f}",
                     f"{median([s.get('resumes', 0) for s in row.samples]):.0f}",
                     (str(sum(lost)) if lost else "-")]
        L.append(f"| {name} | " + " | ".join(cells + [other]) + " |")
        if row.failures:
            L.append(f"| ↳ {len(row.failures)} failed run(s): {row.failures[0].replace('|', '/')} |" + blank)
    if case.kind in ("getset", "incr", "rw"):
        L.append("")
        L.append("\"shm ... is\": shm's median divided by this peer's median (above 1: shm is faster).")
    return L


def limits(cases, verdicts, bd) -> list[str]:
    """Plain statements tying each failed target to a measured cost."""
    out = []
    failed = [v["target"] for v in verdicts if v["verdict"] == "FAIL"]

    def med(ck, peer, metric):
        c = cases.get(ck)
        r = c.rows.get(peer) if c else None
        return r.med(metric) if (r and r.samples) else None

    def ns(prefix):
        v = next((v for k, v in bd.items() if k.strip().startswith(prefix)), None)
        return "?" if v is None else f"{v:.0f}"

    g = med("small", "shm", "get")
    need = [(f, med("small", p, "get")) for f, p, t in ((1, "ultradict", "get from Python"),
                                                        (50, "manager", "get >= 50x"))
            if any(x.startswith(t) for x in failed)]
    need = [(f, b) for f, b in need if b]
    if g and need and bd:
        f, b = max(need, key=lambda x: x[0] * x[1])
        out.append(
            f"get: shm {1e9 / g:.0f} ns per get in the benchmark loop; the target needs under {1e9 / (f * b):.0f} "
            f"ns. In one process `d[k]` costs {ns('d[k], int value (')} ns for an int value and "
            f"{ns('d[k], short str value')} ns for a short string when the key is in the handle's key cache: the "
            f"get kernel call {ns('get kernel call')} ns (a minimal kernel call alone ~{ns('shard-of kernel')} ns: "
            f"numba's dispatch, argument unboxing, return), slicing the result area and decoding "
            f"{ns('slice the result')} ns (a bare `msgpack.unpackb` {ns('msgpack.unpackb')} ns). The small-values "
            f"case cycles {SMALL_KEYS:,} keys, more than the key cache holds, so every call also encodes its key "
            f"(+{ns('encode_key')} ns): an int get then costs {ns('d[k], int value, ')} ns. A plain dict get is "
            f"{ns('plain dict get')} ns.")
    s = med("small", "shm", "set")
    for peer, nm, f in (("lmdb", "lmdb", 5), ("ultradict", "UltraDict", 5), ("manager", "Manager", 50)):
        b = med("small", peer, "set")
        if s and b and bd and any(t.startswith("set") and nm in t for t in failed):
            out.append(
                f"set vs {nm}: shm {fmt_rate(s)}/s, {nm} {fmt_rate(b)}/s; {f}x needs {fmt_rate(f * b)}/s, i.e. "
                f"{1e9 / (f * b):.0f} ns per set. One process: `d[k] = v` costs {ns('d[k] = v, short str')} ns for "
                f"a short string and {ns('d[k] = v, int value (')} ns for an int (the put kernel alone "
                f"{ns('put kernel')} ns); {ns('d[k] = v, int value, ')} ns cycling {SMALL_KEYS:,} keys.")
    inc = med("incr", "shm", "rate")
    if inc and bd and any(t.startswith("two-process incr >=") for t in failed):
        out.append(
            f"incr: {fmt_rate(inc)}/s for both processes ({2e9 / inc:.0f} ns per increment per process) against "
            f"{ns('d.incr(k)')} ns for `d.incr(k)` in one process alone (kernel {ns('incr kernel')} ns): the rest "
            "is the two processes contending for the same counters' cache lines and for 2 cores.")
    rr, ur = med("rw", "shm", "reader"), med("rw", "ultradict", "reader")
    if rr and ur and any("reader at least" in t for t in failed):
        out.append(
            f"reader: shm {fmt_rate(rr)}/s vs UltraDict {fmt_rate(ur)}/s while a writer runs. UltraDict's reader "
            "reads its local copy and replays the writer's deltas in between; shm's reader pays the full get "
            "path above on every call, and shares the writer's cache lines.")
    for peer in ("nj-incr", "nj-lookup"):
        v = med("num", peer, "rate")
        if v and v <= 10e6:
            out.append(f"{peer}: {fmt_rate(v)}/s = {1e9 / v:.0f} ns per op in the @njit loop.")
    return out


def problems(cases) -> list[str]:
    """What the run saw going wrong on the shm side (each is a SharedDict bug or performance problem)."""
    out = []
    for c in cases.values():
        for r in c.rows.values():
            if not r.peer.key.startswith(("shm", "nj", "py")):
                continue
            if r.failures or r.status == "error":
                out.append(f"{c.key} / {r.peer.name}: {len(r.failures)} failed run(s)"
                           + (f": {r.failures[0]}" if r.failures else f": {r.reason}"))
            lost = [s["lost"] for s in r.samples if "lost" in s]
            if any(lost):
                out.append(f"{c.key} / {r.peer.name}: lost updates {lost}")
    return out


def write_markdown(path, cases, verdicts, sizes, info, bd, prof, watch, opts, wall, tmp_left):
    L = []
    title = "# Dict benchmarks"
    if opts.quick:
        title += " (QUICK RUN: short runs, 1 repetition; not the reference results)"
    L += [title, ""]
    L.append(
        "Generated by `python -m bench dicts`" + (" --quick" if opts.quick else "") + f" in {wall / 60:.1f} min. "
        "shm.SharedDict side by side with `multiprocessing.Manager().dict()`, UltraDict, shared-memory-dict, "
        "lmdb and a plain in-process dict. Every role is a separate forked process; each run uses a fresh "
        "store, made and filled by the parent before the fork, and is timed from a barrier once every process "
        "is set up. A time-boxed pilot run sizes each peer's operation counts to about "
        f"{opts.seconds:g} s per run; then {opts.reps} measured run(s) per peer, interleaved across peers. "
        "Tables give the **median** and the min-max over runs; every ratio is between medians of this same "
        "run. The machine is shared: before each run the harness waits briefly for other processes to go "
        "quiet, and *other load* is the median number of cores processes outside the benchmark used during "
        "the runs (0 = undisturbed).")
    L += ["", "## Machine", "", "| | |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in info.items()]
    L += ["", "## Targets", "", "Python get/set targets are judged on the small-values case (the next table "
          "repeats the ratios at every value size).", "",
          "| target | measured (medians) | verdict |", "|---|---|---|"]
    for v in verdicts:
        L.append(f"| {v['target']} | {v['measured']} | **{v['verdict']}** |")
    if sizes:
        L += ["", "The get/set ratios at every value size (information):", ""]
        heads = [t.text for t in SIZE_RATIOS]
        L.append("| values | " + " | ".join(heads) + " |")
        L.append("|---|" + "|".join("---:" for _ in heads) + "|")
        for s in sizes:
            cells = []
            for c in s["cells"]:
                cells.append("-" if c["ratio"] is None else f"{c['ratio']:.2f}x {c['verdict']}")
            L.append(f"| {cases[s['case']].title.split(', ', 1)[1]} | " + " | ".join(cells) + " |")
    L.append("")
    for case in cases.values():
        L += [f"## {case.title}", ""]
        if case.about:
            L += [case.about, ""]
        L += case_table(case)
        L.append("")
    L += ["## Peer configurations", ""]
    seen = set()
    for case in cases.values():
        for row in case.rows.values():
            p = row.peer
            if p.note in seen or not p.note:
                continue
            seen.add(p.note)
            L.append(f"- **{p.name}**: {p.note}")
    L.append("")
    L += ["## Where shm's time goes", ""]
    lim = limits(cases, verdicts, bd)
    if lim:
        L += ["Failed targets, tied to measured costs (computed from this run):", ""]
        L += [f"- {x}" for x in lim]
        L.append("")
    if bd:
        L += ["Split timings, one process, no contention (best of several loops of 2,000 calls, 10,000 for the cycled "
              "rows; indented rows are parts of the row above them):", "", "| operation | ns per call |", "|---|---:|"]
        L += [f"| {k.replace(' ', '&nbsp;', 2) if k.startswith('  ') else k} | {v:.0f} |" for k, v in bd.items()]
        L.append("")
    for ck, p in prof.items():
        if "error" in p:
            L += [f"Profiled run of `{ck}` failed: {p['error']}", ""]
            continue
        L += [f"`{ck}`, the shm side again under cProfile ({p['measured']}; profiling slows it, read it for "
              "proportions). Top functions by own time:", ""]
        for role, text in p["profiles"]:
            if text:
                L += [f"{role}:", "", "```"] + text.splitlines()[:16] + ["```", ""]
    probs = problems(cases)
    L += ["## SharedDict problems seen in this run", ""]
    L += [f"- {x}" for x in probs] if probs else ["- none (no failed shm run, no lost update)"]
    L += ["", "## Hygiene", ""]
    leaks = ShmWatch.summary(watch.leaks)
    removed = ShmWatch.summary(watch.removed)
    L.append("- shm segments left in /dev/shm after a run (a bug if any): " + ("; ".join(leaks) if leaks else "none"))
    L.append("- removed after peers (their own leftovers): " + ("; ".join(removed) if removed else "none"))
    new = watch.new_since_start()
    L.append(f"- /dev/shm entries before the run: {len(watch.before)}; new entries at the end: {len(new)}"
             + (f" ({', '.join(new[:5])})" if new else ""))
    L.append("- lmdb directories left in the temp dir: " + (", ".join(tmp_left) if tmp_left else "none"))
    L.append("- processes: every run's children (and Manager servers) are joined or killed by pid before the next run")
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def write_png(path, cases, info, opts):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    panels = []
    for c in cases.values():
        if not any(r.samples for r in c.rows.values()):
            continue
        if c.kind == "getset":
            panels += [(c, "set", "sets/s"), (c, "get", "gets/s")]
        elif c.kind == "rw":
            panels += [(c, "writer", "writer sets/s"), (c, "reader", "reader gets/s")]
        else:
            panels.append((c, "rate", "increments/s (both processes)" if c.kind == "incr" else "ops/s"))
    if not panels:
        return
    ncol = 4
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.3 * nrow), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (case, metric, unit) in zip(axes.flat, panels):
        rows = list(case.rows.values())
        names, vals, errs, colors = [], [], [], []
        for r in rows:
            lab = r.peer.name
            if case.kind == "incr" and r.samples:
                lost = median([s["lost"] for s in r.samples])
                lab += f" (lost {lost:,.0f})" if lost else " (lost 0)"
            names.append(lab)
            if r.samples:
                v = r.med(metric)
                lo, hi = r.span(metric)
                vals.append(v)
                errs.append((v - lo, hi - v))
            else:
                vals.append(0)
                errs.append((0, 0))
            colors.append("#d62728" if r.peer.key.startswith(("shm", "nj", "py")) else
                          ("#2ca02c" if r.peer.key == "dict" else "#7f7f7f"))
        y = np.arange(len(rows))
        ax.barh(y, vals, color=colors, xerr=np.array(errs).T, capsize=2)
        ax.set_yticks(y)
        ax.set_yticklabels([n + ("" if v else "  (n/a)") for n, v in zip(names, vals)], fontsize=6.5)
        ax.invert_yaxis()
        pos = [v for v in vals if v > 0]
        if pos and max(pos) / min(pos) > 20:
            ax.set_xscale("log")
        lines = list({x[2]: x for x in target_lines(case) if x[0] == metric}.values())    # one line per threshold
        for (tm, label, thr), ls in zip(lines, ("--", ":", "-.", (0, (1, 3)))):
            ax.axvline(thr, color="#1f77b4", linestyle=ls, linewidth=1.1, label=f"target: {label}")
            ax.set_xlim(right=max(ax.get_xlim()[1], thr * (1.5 if ax.get_xscale() == "log" else 1.12)))
        if lines:
            ax.legend(fontsize=6, loc="lower right", framealpha=0.85)
        ax.set_xlabel(unit, fontsize=7.5)
        ttl = (f"{metric}: " if case.kind in ("getset", "rw") else "") + case.title
        ttl = ttl if len(ttl) < 72 else ttl[:69] + "..."
        ax.set_title(ttl, fontsize=7.5)
        ax.tick_params(axis="x", labelsize=6.5)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for yi, v in zip(y, vals):
            if v > 0:
                ax.text(v, yi, " " + fmt_rate(v), va="center", fontsize=6)
    fig.suptitle(f"shm.SharedDict vs peers ({'quick run' if opts.quick else 'medians of ' + str(opts.reps) + ' runs'}"
                 f"; {info['cpu']}, {info['cores']} cores, Python {info['python']}, {info['date']})", fontsize=9.5)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=105)
    plt.close(fig)


def write_json(path, cases, verdicts, sizes, info, bd, prof):
    data = {"machine": info, "targets": verdicts, "size_ratios": sizes, "breakdown_ns": bd,
            "profiled_runs": prof, "cases": {}}
    for c in cases.values():
        data["cases"][c.key] = {
            "title": c.title, "kind": c.kind,
            "rows": {k: {"name": r.peer.name, "status": r.status, "reason": r.reason, "n": r.n,
                         "samples": r.samples, "failures": r.failures} for k, r in c.rows.items()},
        }
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


# --------------------------------------------------------------------------
# Entry point.

def add_args(ap):
    """--cases and --no-profile are common to every group (``bench/__main__.py``)."""


def main(opts) -> int:
    t_start = time.monotonic()
    cases = select_cases({c.key: c for c in make_cases()}, opts)
    if not cases:
        return 0
    out_dir = results_dir(opts)
    watch = ShmWatch()
    info = machine()
    info["peers"] = ", ".join(f"{d} {_version(d)}" for d in ("UltraDict", "shared-memory-dict", "lmdb", "atomics"))
    log(f"dicts: {len(cases)} case(s), reps={opts.reps}, ~{opts.seconds:g} s per run; results -> {out_dir}")
    if "num" in cases:
        t = time.monotonic()
        try:
            _njit_funcs()
            log(f"compiled the @njit loops in {time.monotonic() - t:.1f} s")
        except Exception as e:
            log(f"compiling the @njit loops failed: {e!r}")
    bd, prof = {}, {}
    with LoadSampler() as load:
        for case in cases.values():
            try:
                run_case(case, opts, watch)
            except KeyboardInterrupt:
                raise
            except Exception as e:        # a bug in the harness must not lose the other cases
                log(f"case {case.key} failed: {e!r}")
        verdicts = judge(cases)
        if not getattr(opts, "no_profile", False):
            log("\n== where shm's time goes")
            try:
                GATE.wait()
                with ForeignLoad() as fl:
                    bd = breakdown()
                info["other load during the split timings"] = f"{fl.cores:.2f} cores"
            except Exception as e:
                log(f"breakdown failed: {e!r}")
            prof = profiled_runs(cases, verdicts, watch, opts)
    run_info(info, GATE, load)
    sizes = size_ratios(cases)
    tmp_left = DP.leftover_tmp()
    wall = time.monotonic() - t_start
    md = os.path.join(out_dir, "dicts.md")
    write_markdown(md, cases, verdicts, sizes, info, bd, prof, watch, opts, wall, tmp_left)
    write_json(os.path.join(out_dir, "dicts.json"), cases, verdicts, sizes, info, bd, prof)
    try:
        write_png(os.path.join(out_dir, "dicts.png"), cases, info, opts)
    except Exception as e:
        log(f"plot failed: {e!r}")
    log("\n== targets")
    for v in verdicts:
        log(f"  {v['verdict']:7s} {v['target']}: {v['measured']}")
    for x in problems(cases):
        log(f"  shm problem: {x}")
    leaks = ShmWatch.summary(watch.leaks)
    if leaks:
        log("  shm left segments in /dev/shm: " + "; ".join(leaks))
    if tmp_left:
        log(f"  lmdb directories left: {tmp_left}")
    log(f"\nwrote {md} (+ .png, .json) in {wall / 60:.1f} min")
    return 0
