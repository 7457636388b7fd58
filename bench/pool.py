"""``shm.Pool`` against ``multiprocessing.Pool``, ``ProcessPoolExecutor``, loky and mpire (issue 5).

``python -m bench pool`` (``--quick`` for a short run). Every contender has
2 worker processes and is driven through its own idiomatic entry points:

| case | what |
|---|---|
| ``s1``, ``s10``, ``s100`` | many small tasks of 1, 10, 100 µs of busy CPU (a ``perf_counter`` spin loop) through ``map`` (default chunking), per-task submission (``apply_async``, or ``submit`` where that is the API), ``imap`` and ``imap_unordered`` (default arguments) where the library has them |
| ``large`` | 8 tasks of 50 ms each, through ``map`` and through per-task submission |
| ``numpy`` | sum of squares of a 200 MB float64 array in 8 slices: ``shm.Pool`` through ``pool.array`` + ``for_each_chunk`` (zero-copy views); the others pass the slices as arguments (the natural way: they are pickled through pipes) |

Repetitions are interleaved: each round starts every contender's pool
(timed separately, then warmed through every entry point), and runs each
case and entry point on every contender back to back, in an order rotated
from one measurement to the next, so the runs a ratio compares are seconds
apart on this shared, noisy machine. The task count of each (case, entry
point, contender) is sized once, from an untimed pilot run, to about
0.4 s x ``--seconds``. The tables give medians and min-max over the rounds;
the targets are ratios of medians from the same run.

Besides wall time each run records, from ``/proc``: the CPU time of the
parent (all its threads) and of the worker processes, the bytes written
through ``write()``-family syscalls by the parent and the workers (pipes,
sockets: shared memory is not a syscall, so shm's tasks and results do not
count), and the CPU other processes used meanwhile (the machine is shared).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .common import (LoadSampler, QuietGate, ShmWatch, Unavailable, _busy_seconds, _version, fmt_rate, log,
                     machine, median, now, results_dir, run_info, select_cases)

WORKERS = 2
REFERENCE_REPS = 5            # rounds in a reference run (``--reps`` sets it otherwise)
GATE = QuietGate(limit=0.5, per_run=1.5, budget=30.0)

_pc = time.perf_counter


# --------------------------------------------------------------------------
# The work: module-level functions so that every pool can pickle them by reference.

def spin_1us(x):
    end = _pc() + 1e-6
    while _pc() < end:
        pass
    return x


def spin_10us(x):
    end = _pc() + 10e-6
    while _pc() < end:
        pass
    return x


def spin_100us(x):
    end = _pc() + 100e-6
    while _pc() < end:
        pass
    return x


def spin_50ms(x):
    end = _pc() + 50e-3
    while _pc() < end:
        pass
    return x


def sumsq(a):
    """Sum of squares of a float64 slice (a view in shared memory for shm, an unpickled copy otherwise)."""
    return float(np.dot(a, a))


def noop(x):
    return x


# A probe for "where shm.Pool's time goes": the worker's result flush (pickle + channel send), timed in
# the worker by wrapping ``shm._worker.Worker.flush`` (run only in a separate, unmeasured pool).
_FLUSH = {"n": 0, "cpu": 0.0, "wall": 0.0}


def _probe_install():
    from shm import _worker
    orig = _worker.Worker.flush

    def flush(self):
        had = bool(getattr(self, "buf", None) or getattr(self, "partials", None))
        c, w = time.thread_time(), now()
        orig(self)
        if had:
            _FLUSH["n"] += 1
            _FLUSH["cpu"] += time.thread_time() - c
            _FLUSH["wall"] += now() - w
    _worker.Worker.flush = flush


def _probe_stats(_):
    time.sleep(0.02)
    return os.getpid(), dict(_FLUSH)


SMALL = {"s1": (spin_1us, 1e-6), "s10": (spin_10us, 10e-6), "s100": (spin_100us, 100e-6)}


# --------------------------------------------------------------------------
# /proc: CPU and syscall I/O of a set of processes.

def _proc_cpu(pid) -> float:
    """CPU seconds of every thread of ``pid`` (/proc/<pid>/task/*/schedstat: ns on a CPU)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def _proc_io(pid) -> tuple[int, int]:
    """(wchar, rchar) of ``pid``: bytes through write()/read()-family syscalls (pipes, sockets, files)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            d = dict(line.split(":") for line in f)
        return int(d["wchar"]), int(d["rchar"])
    except (OSError, KeyError, ValueError):
        return 0, 0


def _self_cpu() -> float:
    return time.process_time()          # every thread of this process, ns resolution


class Meter:
    """Wall, CPU and syscall bytes of one measured run (the parent and the given worker pids)."""

    def __init__(self, pids):
        self.pids = list(pids)

    def __enter__(self):
        self.io0 = [_proc_io(p) for p in self.pids]
        self.me_io0 = _proc_io("self")
        self.cpu0 = [_proc_cpu(p) for p in self.pids]
        self.busy0 = _busy_seconds()
        self.self0 = _self_cpu()
        self.thread0 = time.thread_time()
        self.t0 = now()
        return self

    def __exit__(self, *exc):
        self.wall = now() - self.t0
        self.parent_cpu = _self_cpu() - self.self0
        self.caller_cpu = time.thread_time() - self.thread0
        self.worker_cpu = sum(_proc_cpu(p) for p in self.pids) - sum(self.cpu0)
        me = _proc_io("self")
        io1 = [_proc_io(p) for p in self.pids]
        self.parent_wbytes = me[0] - self.me_io0[0]
        self.worker_wbytes = sum(a[0] for a in io1) - sum(a[0] for a in self.io0)
        self.worker_rbytes = sum(a[1] for a in io1) - sum(a[1] for a in self.io0)
        busy = _busy_seconds() - self.busy0
        self.foreign = max(0.0, busy - self.parent_cpu - self.worker_cpu) / max(self.wall, 1e-6)

    def sample(self, **kw) -> dict:
        d = {"seconds": self.wall, "parent_cpu": self.parent_cpu, "caller_cpu": self.caller_cpu,
             "worker_cpu": self.worker_cpu,
             "pipe_bytes": self.parent_wbytes + self.worker_wbytes, "worker_read_bytes": self.worker_rbytes,
             "foreign_cores": self.foreign}
        d.update(kw)
        return d


# --------------------------------------------------------------------------
# Contenders. Each entry point returns the results (checked after the clock stops).

ENTRY_POINTS = ["map", "submit", "imap", "imap_unordered"]


class Contender:
    name = ""
    short = ""
    calls: dict = {}              # entry point -> how it is called (None: the library has no such entry point)
    start_method = ""

    def start(self):
        raise NotImplementedError

    def stop(self):
        raise NotImplementedError

    def pids(self) -> list[int]:
        return []

    def map(self, fn, items):
        raise NotImplementedError

    def submit(self, fn, items):
        raise NotImplementedError

    def imap(self, fn, items):
        raise NotImplementedError

    def imap_unordered(self, fn, items):
        raise NotImplementedError

    def prime(self, ep, fn) -> None:
        """Untimed, before each measured call of entry point ``ep`` with ``fn``."""

    def prepare_array(self, src):
        """Untimed: where the array the reduction reads lives (its own copy for shm)."""
        return src

    def reduce(self, arr, chunks: int) -> float:
        n = arr.shape[0]
        return sum(self.map(sumsq, [arr[n * i // chunks: n * (i + 1) // chunks] for i in range(chunks)]))

    reduce_how = "`sum(map(sumsq, [a[lo:hi] for 8 slices]))`: each slice pickled through a pipe"


class ShmPool(Contender):
    name = "shm.Pool"
    short = "shm"
    calls = {"map": "map(f, xs)", "submit": "[apply_async(f, (x,)) ...] then .get()",
             "imap": "list(imap(f, xs))", "imap_unordered": "list(imap_unordered(f, xs))"}
    reduce_how = ("`a = pool.array(...)` (filled once, untimed), `sum(pool.for_each_chunk(a, sumsq, chunks=8))`: "
                  "each worker gets a zero-copy view")

    def __init__(self):
        self.payload_sizes = []

    def start(self):
        try:
            import shm
            self.pool = shm.Pool(WORKERS)
        except Exception as e:
            raise Unavailable(f"shm.Pool: {type(e).__name__}: {e}") from None
        ctx = getattr(self.pool, "_ctx", None)
        self.start_method = ctx.get_start_method() if ctx is not None else "default"
        enc = getattr(self.pool, "_encode", None)
        if enc is not None:         # count the bytes of every task payload pickled into the arena
            sizes = self.payload_sizes

            def spy(*a, **k):
                b = enc(*a, **k)
                sizes.append(len(b))
                return b
            self.pool._encode = spy

    def stop(self):
        self.pool.close()
        self.pool.join()

    def pids(self):
        return [p.pid for p in getattr(self.pool, "_procs", []) if p is not None]

    def map(self, fn, items):
        return self.pool.map(fn, items)

    def submit(self, fn, items):
        rs = [self.pool.apply_async(fn, (x,)) for x in items]
        return [r.get() for r in rs]

    def imap(self, fn, items):
        return list(self.pool.imap(fn, items))

    def imap_unordered(self, fn, items):
        return list(self.pool.imap_unordered(fn, items))

    def prepare_array(self, src):
        a = self.pool.array(src.shape, src.dtype)
        a[...] = src
        return a

    def reduce(self, arr, chunks):
        return sum(self.pool.for_each_chunk(arr, sumsq, chunks=chunks))


class MpPool(Contender):
    name = "multiprocessing.Pool"
    short = "mp.Pool"
    calls = {"map": "map(f, xs)", "submit": "[apply_async(f, (x,)) ...] then .get()",
             "imap": "list(imap(f, xs))  (chunksize=1)", "imap_unordered": "list(imap_unordered(f, xs))  (chunksize=1)"}

    def start(self):
        import multiprocessing as mp
        self.pool = mp.Pool(WORKERS)
        self.start_method = mp.get_start_method()

    def stop(self):
        self.pool.close()
        self.pool.join()

    def pids(self):
        return [p.pid for p in self.pool._pool]

    def map(self, fn, items):
        return self.pool.map(fn, items)

    def submit(self, fn, items):
        rs = [self.pool.apply_async(fn, (x,)) for x in items]
        return [r.get() for r in rs]

    def imap(self, fn, items):
        return list(self.pool.imap(fn, items))

    def imap_unordered(self, fn, items):
        return list(self.pool.imap_unordered(fn, items))


class Executor(Contender):
    calls = {"map": "list(map(f, xs))  (chunksize=1)", "submit": "[submit(f, x) ...] then .result()",
             "imap": None, "imap_unordered": None}

    def pids(self):
        return list(getattr(self.ex, "_processes", {}) or {})

    def map(self, fn, items):
        return list(self.ex.map(fn, items))

    def submit(self, fn, items):
        fs = [self.ex.submit(fn, x) for x in items]
        return [f.result() for f in fs]


class PPE(Executor):
    name = "ProcessPoolExecutor"
    short = "PPE"

    def start(self):
        import concurrent.futures as cf
        import multiprocessing as mp
        self.ex = cf.ProcessPoolExecutor(WORKERS)
        self.start_method = mp.get_start_method()

    def stop(self):
        self.ex.shutdown(wait=True)


class Loky(Executor):
    name = "loky"
    short = "loky"

    def start(self):
        try:
            import loky
        except ImportError as e:
            raise Unavailable(f"loky not installed ({e}); pip install loky") from None
        # A fresh reusable executor each round (the previous one was shut down), so its start is timed too.
        self.ex = loky.get_reusable_executor(max_workers=WORKERS)
        self.start_method = "loky"

    def stop(self):
        self.ex.shutdown(wait=True, kill_workers=False)


class Mpire(Contender):
    name = "mpire"
    short = "mpire"
    calls = {"map": "map(f, xs)", "submit": "[apply_async(f, (x,)) ...] then .get()",
             "imap": "list(imap(f, xs))", "imap_unordered": "list(imap_unordered(f, xs))"}

    def start(self):
        try:
            from mpire import WorkerPool
        except ImportError as e:
            raise Unavailable(f"mpire not installed ({e}); pip install mpire") from None
        # keep_alive: the workers outlive one map call (the default restarts them for every call).
        self.pool = WorkerPool(n_jobs=WORKERS, keep_alive=True)
        self.start_method = "fork"

    def stop(self):
        self.pool.terminate()

    def prime(self, ep, fn):
        # keep_alive workers keep the settings of the call that started them: switching between map,
        # imap_unordered and apply_async on the same live workers fails (TypeError in the worker). So the
        # workers are restarted and warmed with this entry point and function before each measured call.
        self.pool.stop_and_join(keep_alive=False)
        getattr(self, ep)(fn, list(range(2 * WORKERS)))

    def pids(self):
        return [w.pid for w in getattr(self.pool, "_workers", []) if w is not None and w.pid]

    def map(self, fn, items):
        return self.pool.map(fn, items)

    def submit(self, fn, items):
        rs = [self.pool.apply_async(fn, (x,)) for x in items]
        return [r.get() for r in rs]

    def imap(self, fn, items):
        return list(self.pool.imap(fn, items))

    def imap_unordered(self, fn, items):
        return list(self.pool.imap_unordered(fn, items))


def contenders():
    return [ShmPool(), MpPool(), PPE(), Loky(), Mpire()]


# --------------------------------------------------------------------------
# Cases.

@dataclass
class Case:
    key: str
    title: str
    # rows: (contender, entry point) -> list of samples
    samples: dict = field(default_factory=dict)
    serial: list = field(default_factory=list)      # seconds per task (or per reduction) in one process


# Tasks per measured run: sized per contender from a pilot run to about TARGET_SECONDS x --seconds
# (so a slow per-task path does not eat the time budget and a fast one is not timed over a few ms).
TARGET_SECONDS = 0.4
PILOT_TASKS = 1500
MIN_TASKS, MAX_TASKS = 1000, 300_000
LARGE_N, LARGE_S = 8, 50e-3
ARRAY_BYTES = 200_000_000
ARRAY_CHUNKS = 8


def make_cases():
    return [Case("s1", "many tasks of 1 µs"), Case("s10", "many tasks of 10 µs"),
            Case("s100", "many tasks of 100 µs"),
            Case("large", f"{LARGE_N} tasks of {LARGE_S * 1e3:.0f} ms"),
            Case("numpy", f"sum of squares of a {ARRAY_BYTES // 10**6} MB float64 array in {ARRAY_CHUNKS} slices")]


def _serial(fn, n, batches: int = 10) -> float:
    """CPU seconds per task of ``fn`` called in this thread (the median of ``batches`` batches).

    CPU time, not wall time: on this shared machine a batch timed by the wall clock includes the time
    other processes ran; the tasks are wall-clock spins, so a preempted one costs a little less CPU, not more.
    """
    k = max(1, n // batches)
    per = []
    for _ in range(batches):
        t = time.thread_time()
        for i in range(k):
            fn(i)
        per.append((time.thread_time() - t) / k)
    return median(per)


def _has(c: Contender, ep: str) -> bool:
    return c.calls.get(ep, "") is not None


def _rotated(xs, k):
    k %= max(1, len(xs))
    return xs[k:] + xs[:k]


def measure_small(c: Contender, case: Case, ep: str, n: int, record: bool = True):
    """One run of ``n`` tasks of ``case``'s size through ``ep``; returns its rate (None if it failed)."""
    fn = SMALL[case.key][0]
    items = list(range(n))
    try:
        c.prime(ep, fn)
        with Meter(c.pids()) as m:
            out = getattr(c, ep)(fn, items)
        ok = (sorted(out) if ep == "imap_unordered" else list(out)) == items
        sample = m.sample(n=n, rate=n / m.wall, ok=ok)
    except Exception as e:
        sample = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        log(f"    {c.name} {case.key} {ep}: {sample['error']}")
    if record:
        case.samples.setdefault((c.name, ep), []).append(sample)
    return sample.get("rate")


def measure_large(c: Contender, case: Case, ep: str) -> None:
    items = list(range(LARGE_N))
    try:
        c.prime(ep, noop)
        with Meter(c.pids()) as m:
            out = getattr(c, ep)(spin_50ms, items)
        sample = m.sample(n=LARGE_N, rate=LARGE_N / m.wall, ok=list(out) == items)
    except Exception as e:
        sample = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        log(f"    {c.name} large {ep}: {sample['error']}")
    case.samples.setdefault((c.name, ep), []).append(sample)


def measure_numpy(c: Contender, case: Case, src, expect: float) -> None:
    arr = None
    try:
        arr = c.prepare_array(src)
        c.prime("map", noop)
        before = len(getattr(c, "payload_sizes", []))
        with Meter(c.pids()) as m:
            got = c.reduce(arr, ARRAY_CHUNKS)
        sample = m.sample(n=1, rate=src.nbytes / m.wall, ok=abs(got - expect) <= 1e-9 * abs(expect))
        sizes = getattr(c, "payload_sizes", None)
        if sizes is not None:
            sample["task_payload_bytes"] = sum(sizes[before:])
            sample["task_payloads"] = len(sizes) - before
    except Exception as e:
        sample = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        log(f"    {c.name} numpy: {sample['error']}")
    finally:
        del arr
    case.samples.setdefault((c.name, "reduce"), []).append(sample)


def start_all(cons, rnd, starts, unavailable) -> list:
    """Start every available contender's pool (rotated order), warm every entry point; the started ones."""
    live = []
    for c in _rotated(cons, rnd):
        if c.name in unavailable:
            continue
        t0 = now()
        try:
            c.start()
            c.map(noop, list(range(4 * WORKERS)))        # every worker up, imports done
        except Exception as e:
            unavailable[c.name] = str(e) if isinstance(e, Unavailable) else f"{type(e).__name__}: {e}"
            log(f"  {c.name}: unavailable: {unavailable[c.name]}")
            try:
                c.stop()
            except Exception:
                pass
            continue
        starts.setdefault(c.name, []).append(now() - t0)
        for ep in ENTRY_POINTS:             # first-call costs (imports, threads) before any clock
            if _has(c, ep):
                try:
                    c.prime(ep, noop)
                    getattr(c, ep)(noop, list(range(64)))
                except Exception as e:
                    log(f"  {c.name}: warming {ep} failed: {type(e).__name__}: {str(e)[:200]}")
        live.append(c)
    order = {c.name: i for i, c in enumerate(cons)}
    return sorted(live, key=lambda c: order[c.name])


def stop_all(live, watch) -> None:
    for c in live:
        try:
            c.stop()
        except Exception as e:
            log(f"  {c.name}: stop failed: {type(e).__name__}: {e}")
        watch.sweep(c.name, ("psm_", "wnsm_", "loky-", "mp-"))


def pilot_sizes(live, cases, opts) -> dict:
    """Tasks per measured run for each (case, entry point, contender), from one short untimed run."""
    sizes = {}
    for case in cases.values():
        if case.key not in SMALL:
            continue
        for ep in ENTRY_POINTS:
            for c in live:
                if _has(c, ep):
                    rate = measure_small(c, case, ep, PILOT_TASKS, record=False) or 0.0
                    n = int(rate * TARGET_SECONDS * opts.seconds)
                    sizes[(case.key, ep, c.name)] = max(MIN_TASKS, min(MAX_TASKS, n // 100 * 100))
    return sizes


def run_round(rnd, live, cases, sizes, src, expect) -> None:
    """Every case, every entry point: the contenders one after the other (rotated), so each ratio pairs close runs."""
    k = rnd
    for case in cases.values():
        t0 = now()
        if case.key in SMALL:
            for ep in ENTRY_POINTS:
                k += 1
                for c in _rotated(live, k):
                    if _has(c, ep):
                        measure_small(c, case, ep, sizes[(case.key, ep, c.name)])
        elif case.key == "large":
            for ep in ("map", "submit"):
                k += 1
                for c in _rotated(live, k):
                    measure_large(c, case, ep)
        elif case.key == "numpy":
            for c in _rotated(live, k):
                measure_numpy(c, case, src, expect)
        log(f"  round {rnd + 1}: {case.key:6s} {now() - t0:5.1f} s")


def run_serial(cases, opts, src) -> None:
    for case in cases.values():
        if case.key in SMALL:
            case.serial.append(_serial(SMALL[case.key][0], 5000))
        elif case.key == "large":
            case.serial.append(LARGE_S)       # a wall-clock spin: under others' load it takes less CPU, not less time
        elif case.key == "numpy":
            t = now()
            sumsq(src)
            case.serial.append(now() - t)


def probe_flushes(cases, opts) -> list[dict]:
    """shm.Pool's result flushes on the small-task map/imap runs, in a separate pool (not the measured one)."""
    import shm
    out = []
    try:
        pool = shm.Pool(WORKERS, initializer=_probe_install)
    except Exception as e:
        log(f"  flush probe unavailable: {type(e).__name__}: {e}")
        return out

    def snapshot():
        seen = {}
        for _ in range(6):
            seen.update(dict(pool.map(_probe_stats, range(4 * WORKERS), chunksize=1)))
            if len(seen) >= WORKERS:
                break
        return seen
    try:
        pool.map(noop, list(range(64)))
        pids = [p.pid for p in getattr(pool, "_procs", []) if p is not None]
        for key in [k for k in ("s1", "s10") if k in cases]:
            fn = SMALL[key][0]
            n = int((200_000 if key == "s1" else 40_000) * opts.seconds)
            for ep in ("map", "imap"):
                for _ in range(2):
                    before = snapshot()
                    c0 = sum(_proc_cpu(p) for p in pids)
                    t0 = now()
                    if ep == "map":
                        pool.map(fn, range(n))
                    else:
                        for _x in pool.imap(fn, range(n)):
                            pass
                    wall = now() - t0
                    wcpu = sum(_proc_cpu(p) for p in pids) - c0
                    after = snapshot()
                    d = {f: sum(after[p][f] - before.get(p, {f: 0})[f] for p in after) for f in ("n", "cpu", "wall")}
                    if d["n"] and wcpu > 0:
                        out.append({"case": key, "entry": ep, "tasks": n, "seconds": wall, "flushes": d["n"],
                                    "flush_cpu_us": d["cpu"] / d["n"] * 1e6, "flush_wall_us": d["wall"] / d["n"] * 1e6,
                                    "flush_share": d["cpu"] / wcpu, "worker_cpu_us_per_task": wcpu / n * 1e6})
    except Exception as e:
        log(f"  flush probe failed: {type(e).__name__}: {e}")
    finally:
        pool.terminate()
    return out


# --------------------------------------------------------------------------
# Summaries, targets, report.

def summarize(cases) -> dict:
    """(case, contender, entry) -> medians and spans."""
    out = {}
    for case in cases.values():
        task = median(case.serial) if case.key != "numpy" else float("nan")
        for (name, ep), samples in case.samples.items():
            good = [s for s in samples if "error" not in s]
            errs = [s["error"] for s in samples if "error" in s]
            if not good:
                out[(case.key, name, ep)] = {"error": errs[0] if errs else "not run"}
                continue
            rates = [s["rate"] for s in good]
            d = {"rate": median(rates), "min": min(rates), "max": max(rates), "runs": len(good),
                 "seconds": median([s["seconds"] for s in good]),
                 "parent_cores": median([s["parent_cpu"] / s["seconds"] for s in good]),
                 "worker_cores": median([s["worker_cpu"] / s["seconds"] for s in good]),
                 "pipe_bytes": median([s["pipe_bytes"] for s in good]),
                 "pipe_bytes_per_task": median([s["pipe_bytes"] / s["n"] for s in good]),
                 "foreign_cores": median([s["foreign_cores"] for s in good]),
                 "caller_us": median([s["caller_cpu"] / s["n"] * 1e6 for s in good]),
                 "threads_us": median([(s["parent_cpu"] - s["caller_cpu"]) / s["n"] * 1e6 for s in good]),
                 "workers_us": median([s["worker_cpu"] / s["n"] * 1e6 for s in good]),
                 "cpu_us": median([(s["parent_cpu"] + s["worker_cpu"]) / s["n"] * 1e6 for s in good]),
                 # the share of the CPU used (parent + workers) that ran the tasks themselves
                 "efficiency": median([s["n"] * task / max(s["parent_cpu"] + s["worker_cpu"], 1e-9)
                                       for s in good]) if case.key in SMALL else float("nan"),
                 "all_ok": all(s["ok"] for s in good), "errors": errs}
            if any("task_payload_bytes" in s for s in good):
                d["task_payload_bytes"] = max(s.get("task_payload_bytes", 0) for s in good)
                d["task_payloads"] = max(s.get("task_payloads", 0) for s in good)
            out[(case.key, name, ep)] = d
    return out


def judge(cases, summ) -> list[dict]:
    v = []
    shm, mpn = ShmPool.name, MpPool.name
    if "s10" in cases:
        serial = median(cases["s10"].serial)
        ideal = WORKERS / serial if serial > 0 else float("nan")
        for ep in ENTRY_POINTS:
            a, b = summ.get(("s10", shm, ep), {}), summ.get(("s10", mpn, ep), {})
            text = f"10 µs tasks, `{ep}`: shm.Pool >= 3x multiprocessing.Pool"
            if not a.get("rate") or not b.get("rate"):
                v.append({"target": text, "verdict": "n/a", "measured": "not measured"})
                continue
            r = a["rate"] / b["rate"]
            bound = 1 / b["efficiency"] if b["efficiency"] > 0 else float("inf")
            ok = r >= 3.0 and a["all_ok"]
            note = (f"mp.Pool already spends {b['efficiency']:.0%} of the CPU it uses on the tasks themselves, so "
                    f"a pool with no overhead at all, given the same CPU, would be at most {bound:.1f}x: "
                    "**3x cannot be met by construction** through this entry point"
                    if bound < 3.0 else
                    f"mp.Pool spends {b['efficiency']:.0%} of its CPU on the tasks (shm.Pool "
                    f"{a['efficiency']:.0%}): up to {bound:.1f}x is possible at equal CPU")
            per_cpu = b["cpu_us"] / a["cpu_us"] if a["cpu_us"] > 0 else float("nan")
            v.append({"target": text, "verdict": "PASS" if ok else "FAIL", "ratio": r, "bound": bound,
                      "per_cpu_ratio": per_cpu,
                      "measured": f"{r:.2f}x ({fmt_rate(a['rate'])} vs {fmt_rate(b['rate'])} tasks/s, "
                                  f"{a['rate'] / ideal:.0%} and {b['rate'] / ideal:.0%} of the 2-core ideal "
                                  f"{fmt_rate(ideal)}/s; per CPU second used: {per_cpu:.2f}x); {note}"})
    if "large" in cases:
        for ep in ("map", "submit"):
            a = summ.get(("large", shm, ep), {})
            for other in [c.name for c in contenders()[1:]]:
                b = summ.get(("large", other, ep), {})
                text = f"{LARGE_N} x {LARGE_S * 1e3:.0f} ms tasks, `{ep}`: shm.Pool no worse than {other} (>= 0.9x)"
                if not a.get("rate") or not b.get("rate"):
                    v.append({"target": text, "verdict": "n/a", "measured": "not measured"})
                    continue
                r = a["rate"] / b["rate"]
                v.append({"target": text, "verdict": "PASS" if r >= 0.9 and a["all_ok"] else "FAIL", "ratio": r,
                          "measured": f"{r:.2f}x ({a['seconds'] * 1e3:.0f} vs {b['seconds'] * 1e3:.0f} ms)"})
    if "numpy" in cases:
        a = summ.get(("numpy", shm, "reduce"), {})
        text = "numpy reduction: no array data through pipes (shm.Pool)"
        if not a.get("rate"):
            v.append({"target": text, "verdict": "n/a", "measured": "not measured"})
        else:
            piped = a["pipe_bytes"]
            payload = a.get("task_payload_bytes")
            limit = ARRAY_BYTES / 1000          # generous: 0.1% of the array
            ok = piped < limit and (payload is None or payload < limit) and a["all_ok"]
            pay = (f"; task payloads pickled into the shared arena: {payload} B in {a.get('task_payloads')} "
                   f"chunk records" if payload is not None else "")
            v.append({"target": text, "verdict": "PASS" if ok else "FAIL",
                      "measured": f"{piped:,} B written through syscalls by the parent and the workers during the "
                                  f"reduction (array: {ARRAY_BYTES:,} B){pay}"})
    return v


def _b(x) -> str:
    if x != x:
        return "-"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= k:
            return f"{x / k:.1f} {unit}"
    return f"{x:.0f} B"


def write_markdown(path, cons, cases, summ, verdicts, starts, unavailable, info, opts, reps, wall, probe=()):
    L = ["# shm.Pool vs multiprocessing.Pool, ProcessPoolExecutor, loky, mpire", "",
         f"`python -m bench pool`{' --quick' if opts.quick else ''}: {WORKERS} workers each, {reps} round(s); "
         "each round starts every pool, then runs each case and entry point on every contender back to back "
         "(order rotated between measurements). Task counts are sized per contender from a pilot run to "
         f"~{TARGET_SECONDS * opts.seconds:g} s a run. Medians (min-max across rounds). Throughput = tasks / wall "
         "time from the first call to the last result. *of ideal*: of 2 / (cost of one task called in one "
         "process). *CPU on tasks*: the share of the CPU the parent and the workers used that ran the tasks "
         "themselves (tasks x cost of one task / CPU seconds); the rest is the pool's overhead. "
         "*parent / workers cores*: CPU seconds per wall second of the calling process (all its "
         "threads) and of the workers together (2 usable cores in all). *pipe bytes*: bytes the parent and "
         "the workers wrote through write()-family syscalls (pipes, sockets) during the run, from "
         "/proc/<pid>/io; shared memory does not count. *other load*: cores used by other processes on this "
         "shared machine meanwhile.", ""]
    L += ["## Targets (issue 5)", ""]
    for v in verdicts:
        L.append(f"- **{v['verdict']}**: {v['target']}: {v['measured']}")
    if unavailable:
        L += ["", "Unavailable: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items())]
    L += ["", "## How each contender is called", "", "| contender | start method | map | per-task | imap | "
          "imap_unordered | numpy reduction |", "|---|---|---|---|---|---|---|"]
    for c in cons:
        calls = [c.calls.get(ep) or "n/a (no such entry point)" for ep in ENTRY_POINTS]
        L.append(f"| {c.name} | {c.start_method or '-'} | " + " | ".join(f"`{x}`" if "n/a" not in x else x
                                                                          for x in calls) + f" | {c.reduce_how} |")
    L += ["", "Pool start (constructor + a first `map` of 8 no-op tasks), median: "
          + ", ".join(f"{k} {median(v) * 1e3:.0f} ms" for k, v in starts.items()) + "."]
    for case in cases.values():
        serial = median(case.serial)
        L += ["", f"## {case.key}: {case.title}", ""]
        if case.key in SMALL or case.key == "large":
            ideal = WORKERS / serial if serial > 0 else float("nan")
            if case.key in SMALL:
                L.append(f"One task costs {serial * 1e6:.1f} µs of CPU when called in one process (call overhead "
                         f"included): the ideal for {WORKERS} workers on {WORKERS} cores is "
                         f"**{fmt_rate(ideal)} tasks/s**.")
            else:
                L.append(f"Each task spins {LARGE_S * 1e3:.0f} ms of wall-clock time: the ideal for {WORKERS} workers "
                         f"is **{fmt_rate(ideal)} tasks/s** ({LARGE_N // WORKERS} rounds of tasks). This measures how "
                         "promptly a pool hands out and collects a few long tasks; *CPU on tasks* does not apply (a "
                         "preempted spin uses less CPU).")
            L += ["", "| entry point | contender | tasks/run | tasks/s (min-max) | vs mp.Pool | of ideal | "
                  "CPU on tasks | parent / workers cores | pipe bytes / task | other load |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            eps = ENTRY_POINTS if case.key in SMALL else ["map", "submit"]
            for ep in eps:
                ref = summ.get((case.key, MpPool.name, ep), {}).get("rate")
                for c in cons:
                    d = summ.get((case.key, c.name, ep))
                    if d is None:
                        continue
                    if "error" in d:
                        L.append(f"| {ep} | {c.name} | | {d['error']} | | | | | | |")
                        continue
                    n = case.samples[(c.name, ep)][0].get("n", "")
                    name = f"**{c.name}**" if c is cons[0] else c.name
                    L.append(f"| {ep} | {name} | {n} | {fmt_rate(d['rate'])} ({fmt_rate(d['min'])}-"
                             f"{fmt_rate(d['max'])}){'' if d['all_ok'] else ' WRONG RESULTS'} | "
                             f"{(d['rate'] / ref) if ref else float('nan'):.2f}x | {d['rate'] / ideal:.0%} | "
                             f"{'-' if d['efficiency'] != d['efficiency'] else format(d['efficiency'], '.0%')} | "
                             f"{d['parent_cores']:.2f} / {d['worker_cores']:.2f} | "
                             f"{_b(d['pipe_bytes_per_task'])} | {d['foreign_cores']:.2f} |")
        else:
            L.append(f"`np.dot(a, a)` over the whole array in one process: {serial * 1e3:.0f} ms "
                     f"({_b(ARRAY_BYTES / serial)}/s; memory-bandwidth bound).")
            L += ["", "| contender | ms (min-max) | vs mp.Pool | parent / workers cores | pipe bytes | "
                  "workers read through syscalls | task payloads pickled | other load |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
            ref = summ.get(("numpy", MpPool.name, "reduce"), {}).get("seconds")
            for c in cons:
                d = summ.get(("numpy", c.name, "reduce"))
                if d is None:
                    continue
                if "error" in d:
                    L.append(f"| {c.name} | {d['error']} | | | | | | |")
                    continue
                lo, hi = ARRAY_BYTES / d["max"], ARRAY_BYTES / d["min"]
                pay = (f"{_b(d['task_payload_bytes'])} ({d['task_payloads']} records, in the shared arena)"
                       if "task_payload_bytes" in d else "the slices (~200 MB)")
                wr = median([s["worker_read_bytes"] for s in case.samples[(c.name, "reduce")] if "error" not in s])
                L.append(f"| {c.name} | {d['seconds'] * 1e3:.0f} ({lo * 1e3:.0f}-{hi * 1e3:.0f})"
                         f"{'' if d['all_ok'] else ' WRONG RESULT'} | "
                         f"{(ref / d['seconds']) if ref else float('nan'):.2f}x | "
                         f"{d['parent_cores']:.2f} / {d['worker_cores']:.2f} | {_b(d['pipe_bytes'])} | {_b(wr)} | "
                         f"{pay} | {d['foreign_cores']:.2f} |")
    if "s10" in cases:
        L += ["", "## Where the time goes: CPU per 10 µs task", "",
              "CPU microseconds per task (medians over the rounds), from the same runs as the s10 table: the "
              "thread that calls the pool, the parent's other threads (mp.Pool's task and result handler "
              "threads, concurrent.futures' manager thread, shm.Pool's collector), and the workers (the task "
              "itself is ~" + f"{median(cases['s10'].serial) * 1e6:.1f} µs of it). On 2 cores the sum bounds "
              "the throughput: 2 / (sum) tasks/s at best, less when one part is a serial bottleneck (the "
              "calling thread and the collector each run on one core).", "",
              "| entry point | contender | calling thread | other parent threads | workers | sum | "
              "bound 2 / sum |", "|---|---|---:|---:|---:|---:|---:|"]
        for ep in ENTRY_POINTS:
            for c in cons:
                d = summ.get(("s10", c.name, ep))
                if not d or "error" in d:
                    continue
                tot = d["caller_us"] + d["threads_us"] + d["workers_us"]
                name = f"**{c.name}**" if c is cons[0] else c.name
                L.append(f"| {ep} | {name} | {d['caller_us']:.1f} | {d['threads_us']:.1f} | {d['workers_us']:.1f} | "
                         f"{tot:.1f} | {fmt_rate(2e6 / tot)}/s |")
    if probe:
        L += ["", "## Where shm.Pool's workers spend CPU besides the tasks: result flushes", "",
              "A separate shm.Pool (not the one measured above; same code, with `Worker.flush` wrapped to time "
              "it) runs the small-task `map` and `imap` twice each, one after the other. A flush pickles the "
              "results a worker has buffered (up to 64 records or 2 ms) and sends them through the pool's "
              "result channel; a batch larger than a channel slot (16 KiB) travels out of band in a blob "
              "blob segment. Rows are in the order they ran on that one pool: the channel creates a blob "
              "segment when a large batch finds no free blob in its pool (the one freed last is taken "
              "first), or when a batch outgrows its blob, so the later rows show the warm cost and the first "
              "ones what a fresh pool (as in the tables above, one per round) pays.", "",
              "| case | entry point | tasks | flushes | CPU per flush | wall per flush | share of worker CPU | "
              "worker CPU per task |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in probe:
            L.append(f"| {r['case']} | {r['entry']} | {r['tasks']} | {r['flushes']} | {r['flush_cpu_us']:.0f} µs | "
                     f"{r['flush_wall_us']:.0f} µs | {r['flush_share']:.0%} | {r['worker_cpu_us_per_task']:.2f} µs "
                     f"(task {median(cases[r['case']].serial) * 1e6:.2f}) |")
    L += ["", "## Notes", ""] + NOTES
    L += ["", "## Machine", "", "| | |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in info.items()]
    L += ["", f"Wall time {wall / 60:.1f} min.", ""]
    with open(path, "w") as f:
        f.write("\n".join(L))


NOTES = [
    "- *What 3x can mean.* 2 workers on 2 cores run at best 2 / (cost of one task) tasks per second, and the "
    "calling process shares those cores. `multiprocessing.Pool.map` cuts the input into len / (4 x workers) "
    "tasks per pickled chunk, so on 10 µs tasks nearly all of its CPU already runs the tasks (the *CPU on "
    "tasks* column): no pool can be 3x faster through `map` at equal CPU. The 3x target can only be met "
    "where mp.Pool pays a pickle and a pipe message per task: `apply_async`, and `imap` / "
    "`imap_unordered` (chunksize=1 by default). The verdicts say which is which, from the measured shares.",
    "- The machine is shared: *other load* is the CPU other processes took during each run (often about "
    "one of the two cores). Throughput is then below the ideal for every contender; the ratios compare "
    "runs made seconds apart, in rotated order.",
    "- `ProcessPoolExecutor` and loky have no `imap`; their `map` (chunksize=1) submits every task as its own "
    "work item up front.",
    "- mpire is used with `keep_alive=True` so its workers live across calls (by default each `map` call "
    "starts and stops them).",
    "- The numpy case: the others pickle each 25 MB slice through a pipe (the pipe bytes column); "
    "shm.Pool's workers map the array's segment once and slice it in place. Its task payloads (function, "
    "array descriptor, bounds) are pickled into the pool's shared arena; results come back through a shm "
    "channel. Neither is a syscall.",
]


def write_chart(path, cases, summ) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cons = contenders()
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    panels = [k for k in ("s1", "s10", "s100", "large") if k in cases] + (["numpy"] if "numpy" in cases else [])
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        case = cases[key]
        if key == "numpy":
            names, vals = [], []
            for i, c in enumerate(cons):
                d = summ.get(("numpy", c.name, "reduce"), {})
                if d.get("seconds"):
                    names.append(c.short)
                    vals.append(d["seconds"] * 1e3)
                    ax.bar(len(names) - 1, vals[-1], color=colors[i])
            ax.set_xticks(range(len(names)), names, rotation=30)
            ax.axhline(median(case.serial) * 1e3, color="k", ls=":", lw=1, label="np.dot in 1 process")
            ax.set_ylabel("ms (lower is better)")
            ax.set_title(f"numpy: {ARRAY_BYTES // 10**6} MB sum of squares", fontsize=9)
            ax.legend(fontsize=7)
            continue
        eps = ENTRY_POINTS if key in SMALL else ["map", "submit"]
        w = 0.8 / len(cons)
        for i, c in enumerate(cons):
            xs, ys = [], []
            for j, ep in enumerate(eps):
                d = summ.get((key, c.name, ep), {})
                if d.get("rate"):
                    xs.append(j + (i - (len(cons) - 1) / 2) * w)
                    ys.append(d["rate"])
            ax.bar(xs, ys, width=w, color=colors[i], label=c.short)
        serial = median(case.serial)
        if serial > 0:
            ax.axhline(WORKERS / serial, color="k", ls=":", lw=1, label="2-core ideal")
        if key == "s10":
            mp10 = summ.get(("s10", MpPool.name, "map"), {}).get("rate")
            for j, ep in enumerate(eps):
                r = summ.get(("s10", MpPool.name, ep), {}).get("rate")
                if r:
                    ax.plot([j - 0.45, j + 0.45], [3 * r] * 2, color="#d62728", ls="--", lw=1,
                            label="3x mp.Pool (target)" if j == 0 else None)
            del mp10
        if key in SMALL:
            ax.set_yscale("log")
            ax.set_ylabel("tasks/s (log)")
        else:
            ax.set_ylim(bottom=0)
            ax.set_ylabel("tasks/s")
        ax.set_xticks(range(len(eps)), eps, fontsize=8)
        ax.set_title(case.title, fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------

def add_args(ap):
    pass


def main(opts) -> int:
    t_start = time.monotonic()
    cases = select_cases({c.key: c for c in make_cases()}, opts)
    if not cases:
        return 0
    reps = REFERENCE_REPS if opts.reference else opts.reps
    out_dir = results_dir(opts)
    watch = ShmWatch()
    info = machine()
    info["peers"] = ", ".join(f"{d} {_version(d)}" for d in ("loky", "mpire"))
    log(f"pool: {len(cases)} case(s), {reps} round(s), scale {opts.seconds:g}; results -> {out_dir}")
    src = expect = None
    if "numpy" in cases:
        src = np.random.default_rng(5).random(ARRAY_BYTES // 8)
        expect = float(np.dot(src, src))
    cons = contenders()
    starts: dict = {}
    unavailable: dict = {}
    sizes = None
    with LoadSampler() as load:
        for rnd in range(reps):
            GATE.wait()
            run_serial(cases, opts, src)
            live = start_all(cons, rnd, starts, unavailable)
            log(f"  round {rnd + 1}: started " + ", ".join(f"{c.name} {starts[c.name][-1]:.2f} s" for c in live))
            try:
                if sizes is None:
                    t0 = now()
                    sizes = pilot_sizes(live, cases, opts)
                    log(f"  pilots {now() - t0:.1f} s")
                run_round(rnd, live, cases, sizes, src, expect)
            finally:
                stop_all(live, watch)
        probe = probe_flushes(cases, opts) if "shm.Pool" not in unavailable else []
    run_info(info, GATE, load)
    summ = summarize(cases)
    verdicts = judge(cases, summ)
    wall = time.monotonic() - t_start
    md = os.path.join(out_dir, "pool.md")
    write_markdown(md, cons, cases, summ, verdicts, starts, unavailable, info, opts, reps, wall, probe)
    try:
        write_chart(os.path.join(out_dir, "pool.png"), cases, summ)
    except Exception as e:
        log(f"chart failed: {type(e).__name__}: {e}")
    with open(os.path.join(out_dir, "pool.json"), "w") as f:
        json.dump({"machine": info, "verdicts": verdicts, "starts": starts, "unavailable": unavailable,
                   "shm_flush_probe": probe,
                   "summary": {"|".join(k): v for k, v in summ.items()},
                   "cases": {k: {"title": c.title, "serial_seconds": c.serial,
                                 "samples": {"|".join(kk): vv for kk, vv in c.samples.items()}}
                             for k, c in cases.items()}}, f, indent=1, default=str)
    log("\n== targets")
    for v in verdicts:
        log(f"  {v['verdict']:4s} {v['target']}: {v['measured']}")
    log(f"\nwrote {md} (+ .json, .png) in {wall / 60:.1f} min")
    return 0
