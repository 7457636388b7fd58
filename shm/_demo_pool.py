"""The pool part of ``make demo``: small tasks through shm.Pool and multiprocessing.Pool, same calls.

Each task is a few microseconds of Python (timed here first); both pools get
the same inputs through the same entry points with their default arguments,
and the results are checked against a sequential run.
"""
from __future__ import annotations

import multiprocessing as mp
import time

TASKS = 50_000


def task(i: int) -> int:
    # A few microseconds of pure-Python work: what a pool's per-task overhead competes with.
    acc = i
    for k in range(60):
        acc = (acc * 31 + k) % 1_000_003
    return acc


def main() -> bool:
    import shm
    t0 = time.perf_counter()
    want = [task(i) for i in range(TASKS)]
    each = (time.perf_counter() - t0) / TASKS
    print("\n  A pool of worker processes: shm.Pool vs multiprocessing.Pool, 2 workers each,")
    print(f"  {TASKS:,} tasks of {each * 1e6:.1f} us each (measured here, in one process; same function,")
    print(f"  same calls, default arguments; two cores allow at most {2 / each / 1e3:.0f} k tasks/s):\n")
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    ok = True
    rows = {}
    with shm.Pool(2, context=ctx) as sp, mp.get_context(ctx.get_start_method() if ctx else None).Pool(2) as pp:
        sp.map(task, range(100))
        pp.map(task, range(100))
        for label, call in (("imap", lambda p: list(p.imap(task, range(TASKS)))),
                            ("map", lambda p: p.map(task, range(TASKS))),
                            ("apply_async", lambda p: [r.get() for r in
                                                       [p.apply_async(task, (i,)) for i in range(TASKS)]])):
            for name, p in (("shm.Pool", sp), ("multiprocessing.Pool", pp)):
                t0 = time.perf_counter()
                got = call(p)
                dt = time.perf_counter() - t0
                good = got == want
                ok &= good
                rows[(label, name)] = dt
                print(f"  {name + '.' + label:<34} {TASKS / dt / 1e3:>7.0f} k tasks/s  {dt:6.2f} s  "
                      f"{'results ok' if good else 'WRONG RESULT'}")
            print(f"  {'':<34} {rows[(label, 'multiprocessing.Pool')] / rows[(label, 'shm.Pool')]:>7.1f}x\n")
    print("  map chunks the inputs in both pools, so both run near what two cores allow;")
    print("  imap (chunksize=1 by default in multiprocessing) and apply_async pay per task.")
    return ok
