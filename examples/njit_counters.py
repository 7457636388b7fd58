"""Count into one SharedDict from your own @njit loops, in two processes.

    python examples/njit_counters.py [N]

A numeric SharedDict (int64 keys, int64 values) is a histogram here. Each of
two worker processes buckets N normally distributed numbers (seeded, so the
run is reproducible) and counts every bucket with ``kernels.hashtable.incr_i64``
from an @njit loop: a lock-free add in shared memory, no Python call per
count. The loop returns to Python only when the kernel asks:

* NOTFOUND: the bucket is new. ``d.incr(key)`` from Python inserts it
  atomically (if the other worker inserted it first, it just adds 1).
* MOVED / UNMAPPED: a shard grew in another process; ``d.refresh()`` maps it.
* BUSY: a shard is being compacted right now; try again.
* NEED_GROW (from ``put_i64``, a plain store, if you insert from @njit):
  ``d.grow_for(key)``.

then carries on from the same element. The parent checks the shared totals
against a plain numpy count and prints them.
"""
import multiprocessing as mp
import sys
import time

import numba
import numpy as np

import shm
from kernels import hashtable as H

BUCKET = 10.0           # width of a histogram bucket


def sample(worker, n):
    """Worker ``worker``'s numbers, as int64 bucket keys (negative ones too)."""
    x = np.random.default_rng(1000 + worker).normal(0.0, 5000.0, n)
    return np.floor(x / BUCKET).astype(np.int64)


@numba.njit
def count(desc, keys, start):
    """Add 1 to d[k] for each k in keys[start:]; stop at the first status that needs Python."""
    for i in range(start, keys.size):
        st, _ = H.incr_i64(desc, keys[i], 1)
        if st != H.OK:
            return st, i
    return H.OK, keys.size


def count_all(d, keys):
    """Run ``count`` to the end, doing in Python what it cannot do itself. Returns its trips to Python."""
    i = trips = 0
    while True:
        st, i = count(d.kernel(), keys, i)
        if st == H.OK:
            return trips
        trips += 1
        key = int(keys[i])
        if st == H.NOTFOUND:
            d.incr(key)
            i += 1
        elif st == H.MOVED or st == H.UNMAPPED:
            d.refresh()
        elif st == H.NEED_GROW:
            d.grow_for(key)
        elif st != H.BUSY:
            raise RuntimeError(f"incr_i64: {H.STATUS_NAMES.get(st, st)}")


def worker(d, w, n, start, report):
    keys = sample(w, n)
    start.wait()                    # both count at the same time
    t0 = time.perf_counter()
    trips = count_all(d, keys)
    report.put((w, n, time.perf_counter() - t0, trips))
    d.close()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000
    d = shm.SharedDict(key_type="int64", value_type="int64", shards=16)
    count(d.kernel(), np.zeros(0, np.int64), 0)      # compile once, before forking
    ctx = mp.get_context("fork")
    start, report = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(d, w, n, start, report)) for w in range(2)]
    for p in procs:
        p.start()
    for w, m, dt, trips in sorted(report.get(timeout=300) for _ in procs):
        print(f"worker {w}: {m:,} incr_i64 from @njit in {dt:.3f} s = {m / dt / 1e6:.1f} M ops/s "
              f"({trips:,} returns to Python)")
    for p in procs:
        p.join()
        assert p.exitcode == 0, p.exitcode

    got = d.copy()
    keys, counts = np.unique(np.concatenate([sample(w, n) for w in range(2)]), return_counts=True)
    expected = dict(zip(keys.tolist(), counts.tolist()))
    assert got == expected, "the shared histogram lost or invented counts"
    busiest = max(got, key=lambda k: (got[k], -k))
    print(f"buckets {len(got)} total {sum(got.values())} busiest {busiest} ({got[busiest]}) "
          f"checksum {sum(k * v for k, v in got.items())} exact {got == expected}")
    d.unlink()
    d.close()
