"""``make demo`` / ``python -m shm demo``: a real multi-process pipeline, timed against multiprocessing.

Three stages in separate processes: a source makes records, two workers
score them, a sink adds the scores up. The same program runs twice: over
shm channels, then over ``multiprocessing.Queue`` (with sentinels, since
queues have no disconnection), and the demo prints what each did and how
fast. Messages are dict-shaped Python objects, as a real pipeline's are.
Then worker processes share counters and state through a ``SharedDict``,
and the same through a ``Manager().dict()`` (``shm/_demo_dict.py``); then
small tasks go through ``shm.Pool`` and ``multiprocessing.Pool``
(``shm/_demo_pool.py``).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

RECORDS = 200_000
WORKERS = 2
BATCH = 64


def make(i: int) -> dict:
    return {"id": i, "user": f"u{i % 997}", "vals": [i % 7, i % 11, i % 13], "ok": i % 3 == 0}


def score(r: dict) -> dict:
    return {"id": r["id"], "score": sum(r["vals"]) + (10 if r["ok"] else 0)}


def expected_total(n: int) -> int:
    return sum(score(make(i))["score"] for i in range(n))


# --------------------------------------------------------------------------
# shm: channels end by disconnection, so no sentinels.

def shm_source(tx, n, batched):
    if batched:
        for start in range(0, n, BATCH):
            tx.send_many([make(i) for i in range(start, min(n, start + BATCH))])
    else:
        for i in range(n):
            tx.send(make(i))
    tx.close()


def shm_worker(rx, tx, batched):
    if batched:
        while True:
            try:
                tx.send_many([score(r) for r in rx.recv_many(BATCH)])
            except Exception as e:          # Disconnected: the source is done and drained
                if type(e).__name__ != "Disconnected":
                    raise
                break
    else:
        for r in rx:
            tx.send(score(r))
    tx.close()


def shm_sink(rx, out, batched):
    total = count = 0
    if batched:
        while True:
            try:
                for r in rx.recv_many(BATCH):
                    total += r["score"]
                    count += 1
            except Exception as e:
                if type(e).__name__ != "Disconnected":
                    raise
                break
    else:
        for r in rx:
            total += r["score"]
            count += 1
    out.send((count, total))


def run_shm(n, batched=False):
    import shm
    ctx = mp.get_context("fork")
    tx1, rx1 = shm.bounded(1024)
    tx2, rx2 = shm.bounded(1024)
    out_tx, out_rx = shm.bounded(1)
    procs = [ctx.Process(target=shm_source, args=(tx1, n, batched))]
    procs += [ctx.Process(target=shm_worker, args=(rx1, tx2, batched)) for _ in range(WORKERS)]
    procs += [ctx.Process(target=shm_sink, args=(rx2, out_tx, batched))]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for h in (tx1, rx1, tx2, rx2, out_tx):
        h.close()        # the children hold what they use; closing here lets disconnection flow
    count, total = out_rx.recv()
    dt = time.perf_counter() - t0
    for p in procs:
        p.join()
    out_rx.close()
    return count, total, dt


# --------------------------------------------------------------------------
# multiprocessing.Queue: the same program with sentinels.

def mp_source(q, n):
    for i in range(n):
        q.put(make(i))
    for _ in range(WORKERS):
        q.put(None)


def mp_worker(q_in, q_out):
    for r in iter(q_in.get, None):
        q_out.put(score(r))
    q_out.put(None)


def mp_sink(q, out):
    total = count = done = 0
    while done < WORKERS:
        r = q.get()
        if r is None:
            done += 1
            continue
        total += r["score"]
        count += 1
    out.put((count, total))


def run_mp(n):
    ctx = mp.get_context("fork")
    q1, q2, out = ctx.Queue(1024), ctx.Queue(1024), ctx.Queue()
    procs = [ctx.Process(target=mp_source, args=(q1, n))]
    procs += [ctx.Process(target=mp_worker, args=(q1, q2)) for _ in range(WORKERS)]
    procs += [ctx.Process(target=mp_sink, args=(q2, out))]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    count, total = out.get()
    dt = time.perf_counter() - t0
    for p in procs:
        p.join()
    return count, total, dt


# --------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    n = int(argv[0]) if argv else RECORDS
    print(f"shm demo: a pipeline of {2 + WORKERS} processes (source -> {WORKERS} workers -> sink), "
          f"{n:,} dict-shaped records, on {os.cpu_count()} cores\n")
    import subprocess
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import shm"], check=True)
    print(f"  a fresh interpreter's `import shm`: {time.perf_counter() - t0:.2f} s "
          f"(the numba kernels compile on the very first run, then load from the cache)\n")

    want = expected_total(n)
    rows = []
    for label, fn in (("shm channels, send/recv", lambda: run_shm(n)),
                      ("shm channels, send_many/recv_many", lambda: run_shm(n, batched=True)),
                      ("multiprocessing.Queue, put/get", lambda: run_mp(n))):
        count, total, dt = fn()
        ok = count == n and total == want
        rows.append((label, dt, ok))
        print(f"  {label:<36} {count:>9,} records  {n / dt / 1e3:>8.0f} k records/s  "
              f"{dt:6.2f} s  {'checksum ok' if ok else 'WRONG RESULT'}")
    base = rows[-1][1]
    print()
    for label, dt, _ in rows[:-1]:
        print(f"  {label}: {base / dt:.1f}x multiprocessing.Queue")
    print("\n  Each record crossed two channels (source -> worker -> sink), so every process")
    print("  sent or received each record once; nothing went through a pipe or a manager process.")
    from . import _demo_dict
    dict_ok = _demo_dict.main(n)
    from . import _demo_pool
    pool_ok = _demo_pool.main()
    left = [x for x in os.listdir("/dev/shm") if x.startswith("shm_")] if os.path.isdir("/dev/shm") else []
    print(f"\n  shared memory left behind: {len(left)} segments")
    return 0 if all(ok for _, _, ok in rows) and dict_ok and pool_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
