"""Machinery shared by the benchmark groups.

* ``run_roles``: run each role (producer, consumer, ...) in its own forked
  process. Every role sets itself up, then waits on one barrier (the ready
  handshake); ``Role.ready()`` returns the time the barrier opened, and the
  role reports its own timestamps with ``Role.report()``. A role that raises,
  dies or overruns the timeout fails the run (``RunError``) and every child
  of the run is killed by its pid, so no run leaves processes behind.
* ``calibrate``/``repeat``: a short pilot run sizes the message count so a
  run takes about ``target`` seconds for *that* peer; the measured runs then
  repeat, and the median is reported.
* ``ShmWatch``: what each peer leaves in /dev/shm (and /tmp), checked after
  every run and at the end.
* ``machine``: the facts printed at the top of every report.

Timestamps are ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux, the same
clock in every process), so a consumer's end time and a producer's start
time can be subtracted across processes.
"""
from __future__ import annotations

import datetime
import importlib.metadata as md
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback

CTX = mp.get_context("fork")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

now = time.perf_counter


class RunError(Exception):
    """A run failed: a role raised, died, or did not finish in time."""


class Unavailable(Exception):
    """A peer cannot be used here (import failed, feature missing)."""


# --------------------------------------------------------------------------
# Forked runs.

class Role:
    """What a role function sees of the run: the ready barrier and the report pipe."""

    def __init__(self, index, barrier, done, conn, barrier_timeout):
        self.index = index
        self._barrier = barrier
        self._done = done
        self._conn = conn
        self._barrier_timeout = barrier_timeout
        self._reported = False

    def ready(self) -> float:
        """Wait until every role of the run is set up; return the start time."""
        self._barrier.wait(self._barrier_timeout)
        return now()

    def report(self, **result) -> None:
        """Send this role's result to the parent, then wait until the whole run is over.

        Waiting keeps every endpoint open until all consumers have their
        messages (a publisher that leaves early can take undelivered samples
        with it); the role closes its endpoints after this returns.
        """
        self._conn.send(("ok", self.index, result))
        self._reported = True
        self._done.wait(120)


def _child(fn, args, role: Role):
    code = 0
    try:
        fn(role, *args)
        if not role._reported:
            role._conn.send(("error", role.index, f"role {fn.__name__} returned without a report"))
    except BaseException:
        code = 1
        try:
            role._conn.send(("error", role.index, traceback.format_exc(limit=8)))
        except Exception:
            pass
    finally:
        try:
            role._conn.close()
        except Exception:
            pass
    if code:
        sys.exit(code)


def run_roles(roles, timeout: float = 60.0, after_start=None) -> list[dict]:
    """Run ``roles`` (a list of ``(fn, args)``), each in a forked process.

    ``fn(role, *args)`` must call ``role.ready()`` once set up and
    ``role.report(**result)`` when done. ``after_start()`` runs in the parent
    once every child is started (the parent drops its own handles there).
    Returns the results in role order; raises RunError on any failure.
    """
    k = len(roles)
    barrier = CTX.Barrier(k)
    done = CTX.Event()
    procs, conns = [], []
    errors = []
    results: dict[int, dict] = {}
    try:
        for i, (fn, args) in enumerate(roles):
            r, w = CTX.Pipe(duplex=False)
            p = CTX.Process(target=_child, args=(fn, args, Role(i, barrier, done, w, timeout)),
                            name=f"bench-{fn.__name__}-{i}", daemon=True)
            p.start()
            w.close()
            procs.append(p)
            conns.append(r)
        if after_start is not None:
            after_start()
        pending = {c: i for i, c in enumerate(conns)}
        deadline = now() + timeout
        while pending and not errors:
            left = deadline - now()
            if left <= 0:
                errors.append(f"timed out after {timeout:.0f} s (roles not finished: "
                              f"{sorted(procs[i].name for i in pending.values())})")
                break
            for c in mpc.wait(list(pending), timeout=min(left, 1.0)):
                i = pending.pop(c)
                try:
                    status, _, payload = c.recv()
                except (EOFError, OSError):
                    procs[i].join(1)
                    errors.append(f"{procs[i].name} died without a result (exit code {procs[i].exitcode})")
                    continue
                if status == "ok":
                    results[i] = payload
                else:
                    errors.append(f"{procs[i].name} failed:\n{payload}")
    finally:
        done.set()
        if errors:
            try:
                barrier.abort()
            except Exception:
                pass
        for p in procs:
            p.join(10 if not errors else 2)
        for p in procs:
            if p.is_alive():
                p.kill()            # only our own children, by pid
                p.join(5)
        for c in conns:
            c.close()
    if errors:
        raise RunError("; ".join(errors))
    return [results[i] for i in range(k)]


def elapsed(results: list[dict]) -> float:
    """Seconds from the earliest start to the last consumer's end."""
    t0 = min(r["t0"] for r in results)
    t1 = max(r["t1"] for r in results if r.get("consumer"))
    return t1 - t0


# --------------------------------------------------------------------------
# Other load on the machine (it is shared and noisy).

_TICK = os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (all cores)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / _TICK


def _our_seconds() -> float:
    """CPU seconds of this process and of its children that have been reaped."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


class ForeignLoad:
    """Cores used by *other* processes while a block runs (ours: this process and reaped children)."""

    def __enter__(self):
        self.t0, self.b0, self.o0 = now(), _busy_seconds(), _our_seconds()
        return self

    def __exit__(self, *exc):
        dt = max(now() - self.t0, 1e-6)
        self.cores = max(0.0, (_busy_seconds() - self.b0) - (_our_seconds() - self.o0)) / dt


class QuietGate:
    """Before a run, wait (within a budget) until other processes use less than ``limit`` cores."""

    def __init__(self, limit=0.3, per_run=3.0, budget=90.0):
        self.limit, self.per_run, self.budget = limit, per_run, budget
        self.waited = 0.0

    def wait(self) -> float:
        """Wait for quiet; return the foreign load seen in the last 0.2 s window."""
        start = now()
        while True:
            with ForeignLoad() as f:
                time.sleep(0.2)
            spent = now() - start
            if f.cores < self.limit or spent >= self.per_run or self.waited + spent >= self.budget:
                self.waited += spent
                return f.cores


# --------------------------------------------------------------------------
# Sizing and repetition.

def median(xs):
    return statistics.median(xs) if xs else float("nan")


class SampleStats:
    """``med``/``span`` of a result row's ``samples`` (a dict of metrics per measured run)."""

    def med(self, metric):
        return median([s[metric] for s in self.samples if metric in s])

    def span(self, metric):
        xs = [s[metric] for s in self.samples if metric in s]
        return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))


def best_ns(fn, k: int, reps: int = 5) -> float:
    """ns per operation of ``fn`` (which does ``k`` of them): the best of ``reps`` calls."""
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter_ns()
        fn()
        best = min(best, (time.perf_counter_ns() - t) / k)
    return best


def select_cases(cases: dict, opts) -> dict:
    """The cases ``--cases`` names (every case without it; other groups' keys are theirs)."""
    if not opts.cases:
        return cases
    want = [k.strip() for k in opts.cases.split(",") if k.strip()]
    return {k: cases[k] for k in want if k in cases}


def results_dir(opts) -> str:
    """bench/results/ for a reference run, results/quick/ or results/partial/ otherwise."""
    full = getattr(opts, "reference", False)
    out = opts.out or os.path.join(REPO, "bench", "results", "" if full else ("quick" if opts.quick else "partial"))
    os.makedirs(out, exist_ok=True)
    return out


def run_info(info: dict, gate, load) -> None:
    """The waiting and load figures of a finished run, into its machine table."""
    info["quiet checks before runs (0.2 s each, longer while others were busy)"] = f"{gate.waited:.0f} s in total"
    if load.samples:
        info["load average during run (1 min, min/median/max)"] = (
            f"{min(load.samples):.2f} / {median(load.samples):.2f} / {max(load.samples):.2f}")
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())


def calibrate(rate: float, target: float, lo: int, hi: int, multiple: int = 1) -> int:
    """A message count that takes about ``target`` seconds at ``rate``."""
    n = int(rate * target) if rate > 0 else lo
    n = max(lo, min(hi, n))
    return max(multiple, n // multiple * multiple)


# --------------------------------------------------------------------------
# /dev/shm and /tmp hygiene.

class ShmWatch:
    """Snapshots of /dev/shm, and removal of what a peer left behind."""

    DIR = "/dev/shm"

    def __init__(self):
        self.before = self.list()
        self.removed: dict[str, set] = {}   # peer -> names we removed after it (its own leftovers)
        self.leaks: dict[str, set] = {}     # shm -> names it left (a bug to report)

    def list(self) -> set[str]:
        try:
            return set(os.listdir(self.DIR))
        except OSError:
            return set()

    def sweep(self, owner: str, prefixes, *, is_bug: bool = False) -> list[str]:
        """Remove /dev/shm entries starting with any of ``prefixes``; return their names."""
        prefixes = tuple(p for p in prefixes if p)
        if not prefixes:
            return []
        gone = []
        for name in sorted(self.list()):
            if name.startswith(prefixes):
                try:
                    os.unlink(os.path.join(self.DIR, name))
                    gone.append(name)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    gone.append(f"{name} (could not remove: {e})")
        if gone:
            (self.leaks if is_bug else self.removed).setdefault(owner, set()).update(gone)
        return gone

    @staticmethod
    def summary(d: dict) -> list[str]:
        out = []
        for owner, names in sorted(d.items()):
            names = sorted(names)
            out.append(f"{owner}: {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        return out

    def new_since_start(self) -> list[str]:
        return sorted(self.list() - self.before)


# --------------------------------------------------------------------------
# Machine facts.

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "?"


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _git(*args) -> str:
    try:
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:
        return ""


def machine() -> dict:
    dirty = _git("status", "--porcelain", "--", "shm", "kernels")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable cores": len(os.sched_getaffinity(0)),
        "memory": _meminfo(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numba": _version("numba"),
        "numpy": _version("numpy"),
        "msgpack": _version("msgpack"),
        "shm commit": (_git("rev-parse", "--short", "HEAD") or "?") + (" (shm/ or kernels/ modified)" if dirty else ""),
        "peers": ", ".join(f"{d} {_version(d)}" for d in ("faster-fifo", "pyzmq", "iceoryx2")),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


class LoadSampler:
    """Samples the 1-minute load average in the background (to report how noisy the run was)."""

    def __init__(self, every: float = 5.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, args=(every,), daemon=True)

    def _loop(self, every):
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(2)


def fmt_rate(x: float) -> str:
    if x != x:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.1f}"


def fmt_num(x: float, digits: int = 2) -> str:
    if x != x:
        return "-"
    return f"{x:.{digits}f}"


def log(*a):
    print(*a, file=sys.stderr, flush=True)
