"""The shared-dict half of ``make demo``: worker processes sharing counters and state.

Two workers go through records, and for each one bump a per-user counter,
record their progress and read a shared setting: the shape of a worker pool
that shares counters, a cache and state. The same program runs on a
``SharedDict`` (``incr`` is atomic) and on a ``Manager().dict()``, which has
no atomic read-modify-write, so its counters take a ``Manager().Lock()``
(without one, updates are lost). Both must end with exact counts.
"""
from __future__ import annotations

import multiprocessing as mp
import time

WORKERS = 2
USERS = 997


def _work(d, wid: int, n: int, lock=None):
    setting = d["setting"]
    for i in range(wid, n * WORKERS, WORKERS):
        key = f"user:{i % USERS}"
        if lock is None:
            d.incr(key)
        else:
            with lock:
                d[key] = d.get(key, 0) + 1
        d[f"progress:{wid}"] = i
        if d.get("setting") != setting:
            raise AssertionError("the shared setting changed")


def _run(d, n, lock=None):
    ctx = mp.get_context("fork")
    d["setting"] = "v1"
    procs = [ctx.Process(target=_work, args=(d, w, n, lock)) for w in range(WORKERS)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    dt = time.perf_counter() - t0
    counted = sum(d.get(f"user:{u}", 0) for u in range(USERS))
    ok = all(p.exitcode == 0 for p in procs) and counted == n * WORKERS
    return counted, dt, ok


def main(n_records: int) -> bool:
    t0 = time.perf_counter()
    import shm
    shm.SharedDict                          # its kernels: compiled on the very first run, then cached
    load = time.perf_counter() - t0
    n = max(1000, n_records // 2)           # per worker
    n_mgr = max(500, n // 40)               # the manager is slow: fewer, and compare rates
    ops = 3                                 # incr, a write, a read per record
    print(f"\nshm demo, shared dict: {WORKERS} worker processes, per record: incr a per-user counter "
          f"({USERS} users), write progress, read a setting\n")
    print(f"  SharedDict's kernels loaded in {load:.2f} s\n")
    with shm.SharedDict() as d:
        c1, dt1, ok1 = _run(d, n)
        d.unlink()
    with mp.Manager() as m:
        c2, dt2, ok2 = _run(m.dict(), n_mgr, m.Lock())
    r1 = ops * n * WORKERS / dt1
    r2 = ops * n_mgr * WORKERS / dt2
    for label, c, dt, r, ok in (("shm.SharedDict, incr", c1, dt1, r1, ok1),
                                ("Manager().dict() + Manager().Lock()", c2, dt2, r2, ok2)):
        print(f"  {label:<36} {c:>9,} increments  {r / 1e3:>8.0f} k ops/s  {dt:6.2f} s  "
              f"{'every increment counted' if ok else 'WRONG COUNT'}")
    print(f"\n  shm.SharedDict: {r1 / r2:.0f}x Manager().dict() (ops/s; the manager ran "
          f"{n_mgr:,} records per worker instead of {n:,})")
    return ok1 and ok2
