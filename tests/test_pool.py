"""shm.Pool: the multiprocessing.Pool / concurrent.futures surface, rayon's shapes, and dying workers.

Real worker processes (fork and spawn), real SIGKILLs and a real segfault.
Every task's outcome is checked: a value, its own exception, or
``WorkerLost`` for the tasks a killed worker held, and never a hang.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import multiprocessing as mp
import os
import pickle
import random
import signal
import threading
import time

import numpy as np
import pytest

import shm
import _pool_workers as W
import _report
from conftest import KILL_ROUNDS

FORK = mp.get_context("fork")


def _started(p, timeout=30.0):
    """Wait until every worker has started (recorded itself in the pool segment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(w["state"] in ("idle", "busy") for w in p.stats()["workers"]):
            return p
        time.sleep(0.01)
    raise AssertionError(f"workers did not start: {p.stats()}")


@pytest.fixture
def pool():
    p = _started(shm.Pool(2, context=FORK))
    yield p
    p.terminate()


# --------------------------------------------------------------------------
# smoke

def test_smoke_every_entry_point(ctx):
    with shm.Pool(2, context=ctx) as p:
        assert p.map(W.square, range(100)) == [x * x for x in range(100)]
        assert p.map(W.square, []) == []
        assert p.starmap(W.add, [(1, 2), (3, 4)]) == [3, 7]
        assert list(p.imap(W.square, range(50))) == [x * x for x in range(50)]
        assert sorted(p.imap_unordered(W.square, range(50))) == [x * x for x in range(50)]
        assert p.apply(W.kw, (1,), {"b": 2, "c": 3}) == 6
        assert p.apply_async(W.add, (2, 3)).get(30) == 5
        assert p.submit(W.kw, 1, b=2, c=4).result(30) == 7
        assert p.map_async(W.square, [3]).get(30) == [9]
        assert p.starmap_async(W.add, [(5, 5)]).get(30) == [10]
        assert p.map_reduce(W.square, range(1000), W.add) == sum(x * x for x in range(1000))
        assert p.fold(W.acc_add, range(1000), 0, W.add) == sum(range(1000))
    assert p.stats()["state"] == "closed"


def test_map_chunksizes_and_order(pool):
    data = list(range(5000))
    for cs in (None, 1, 7, 1000, 100_000):
        assert pool.map(W.square, data, chunksize=cs) == [x * x for x in data]
    assert list(pool.imap(W.square, iter(data), chunksize=3)) == [x * x for x in data]
    with pytest.raises(ValueError):
        pool.map(W.square, data, chunksize=0)


def test_imap_next_timeout_and_generators(pool):
    it = pool.imap(W.sleep_then, [0, 1], chunksize=1)
    assert it.next(timeout=30) == 0
    gen = (i for i in range(300))
    assert list(pool.imap_unordered(W.square, gen)) != [] and True
    slow = pool.imap(W.sleep_then, [(5)], chunksize=1)
    # sleep_then(5) sleeps 10 ms: a zero timeout expires first.
    with pytest.raises(mp.TimeoutError):
        slow.next(timeout=0)
    assert slow.next(timeout=30) == 5


def test_callbacks_run_and_futures_compose(pool):
    got, errs = [], []
    done = threading.Event()
    r = pool.apply_async(W.square, (7,), callback=lambda v: (got.append(v), done.set()))
    assert r.get(30) == 49 and done.wait(10) and got == [49]
    e = pool.apply_async(W.boom_on, (3,), error_callback=errs.append)
    with pytest.raises(ValueError):
        e.get(30)
    assert e.ready() and not e.successful()
    assert isinstance(errs[0], ValueError)
    futs = [pool.submit(W.square, i) for i in range(200)]
    assert sorted(f.result(30) for f in cf.as_completed(futs, timeout=60)) == [i * i for i in range(200)]


def test_shm_join():
    with shm.Pool(2, context=FORK) as p:
        a, b = shm.join(functools.partial(W.square, 3), functools.partial(W.pid_of), pool=p)
        assert a == 9 and b != os.getpid() and b in [w["pid"] for w in p.stats()["workers"]]


# --------------------------------------------------------------------------
# errors: what the caller gets, and the pool stays usable

def test_task_exception_reraises_with_remote_traceback(pool):
    with pytest.raises(ValueError, match="task 3 failed") as ei:
        pool.map(W.boom_on, range(10))
    assert "boom_on" in str(ei.value.__cause__)          # the worker's traceback
    # imap raises at that position and goes on.
    it = pool.imap(W.boom_on, range(6), chunksize=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError):
        next(it)
    assert list(it) == [4, 5]
    fut = pool.submit(W.boom_on, 3)
    assert isinstance(fut.exception(30), ValueError)
    assert pool.map(W.square, range(10)) == [x * x for x in range(10)]


def test_unpicklable_arguments_raise_at_submission(pool):
    with pytest.raises(TypeError, match="module level"):
        pool.map(lambda x: x, range(3))
    with pytest.raises(TypeError, match="cannot send"):
        pool.submit(W.square, threading.Lock())
    assert pool.stats()["outstanding"] == 0
    assert pool.map(W.square, range(5)) == [0, 1, 4, 9, 16]


def test_unpicklable_result_fails_only_that_task(pool):
    with pytest.raises(TypeError, match="could not be pickled"):
        pool.apply(W.unpicklable_result)
    assert pool.apply(W.square, (4,)) == 16


def test_reduce_errors_and_empty(pool):
    with pytest.raises(TypeError, match="empty"):
        pool.map_reduce(W.square, [], W.add)
    assert pool.map_reduce(W.square, [], W.add, initial=5) == 5
    assert pool.map_reduce(W.square, [2], W.add, initial=5) == 9
    with pytest.raises(ValueError, match="task 3"):
        pool.map_reduce(W.boom_on, range(10), W.add)
    assert pool.fold(W.acc_add, [], 10, W.add) == 10


def test_state_errors():
    p = shm.Pool(1, context=FORK)
    with pytest.raises(ValueError, match="still running"):
        p.join()
    p.close()
    with pytest.raises(ValueError, match="not running"):
        p.submit(W.square, 1)
    p.join()
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(p)
    with pytest.raises(ValueError):
        shm.Pool(0)
    with pytest.raises(TypeError):
        shm.Pool(1, initializer=42)


def test_initializer_runs_and_a_failing_one_breaks_the_pool(ctx):
    with shm.Pool(2, initializer=W.init_store, initargs=("hello",), context=ctx) as p:
        assert set(p.map(W.read_init, range(20))) == {"hello"}
    p = shm.Pool(2, initializer=W.init_raises, context=FORK)
    try:
        with pytest.raises(shm.BrokenPool, match="initializer"):
            p.map(W.square, range(10))
        with pytest.raises(shm.BrokenPool):
            p.submit(W.square, 1)
    finally:
        p.terminate()


def test_terminate_fails_what_is_pending():
    p = shm.Pool(2, context=FORK)
    r = p.map_async(W.sleep_then, [1] * 50, chunksize=1)
    f = p.submit(W.sleep_then, 2, 5)
    time.sleep(0.05)
    p.terminate()
    with pytest.raises(shm.BrokenPool, match="terminated"):
        r.get(10)
    with pytest.raises(shm.BrokenPool):
        f.result(10)
    p.terminate()                       # idempotent


def test_exit_by_exception_terminates():
    with pytest.raises(KeyError):
        with shm.Pool(1, context=FORK) as p:
            p.submit(W.sleep_then, 1, 5)
            raise KeyError("out")
    assert p.stats()["state"] == "closed"


def test_maxtasksperchild_replaces_workers(pool):
    with shm.Pool(2, maxtasksperchild=3, context=FORK) as p:
        pids = set(p.map(W.pid_of, range(40), chunksize=1))
        assert len(pids) > 2
        assert p.stats()["lost"] == 0


# --------------------------------------------------------------------------
# for_each_chunk: shared numpy memory, nothing pickled

def test_for_each_chunk_shares_memory(pool):
    a = pool.array((1000, 3), dtype=np.int64)
    sizes = pool.for_each_chunk(a, W.fill, chunks=10)
    assert sum(sizes) == 1000 and len(sizes) == 10
    workers = {w["pid"] for w in pool.stats()["workers"]}
    assert set(np.unique(a)) <= workers and 0 not in a       # every row written by a worker, in place
    b = np.arange(100, dtype=np.float64)
    assert pool.for_each_chunk(b, W.chunk_sum, chunks=4) == [float(np.sum(b[i * 25:(i + 1) * 25])) for i in range(4)]
    pool.for_each_chunk(b, W.double_inplace)                  # an ordinary array: copied in, and back
    assert (b == 2 * np.arange(100)).all()
    with pytest.raises(ValueError):
        pool.for_each_chunk(np.float64(3), W.chunk_sum)


def test_progress_bar(pool, capfd):
    assert pool.map(W.sleep_then, range(20), chunksize=1, progress=True) == list(range(20))
    err = capfd.readouterr().err
    assert "20/20" in err and "100.0%" in err


# --------------------------------------------------------------------------
# stealing: uneven work spreads over the workers

def test_idle_workers_steal(pool):
    # One chunk of 40 tasks of 10 ms: without stealing one worker runs it all (~0.4 s).
    t = time.monotonic()
    assert pool.map(W.sleep_then, range(40), chunksize=40) == list(range(40))
    st = pool.stats()
    assert all(w["done"] > 0 for w in st["workers"]), st
    assert sum(w["stolen"] for w in st["workers"]) > 0, st
    _report.set("pool: ms for one 40-task chunk of 10 ms tasks on 2 workers (400 unsplit)",
                int(1000 * (time.monotonic() - t)))


# --------------------------------------------------------------------------
# dying workers: WorkerLost for what they held, the pool goes on

def test_worker_killed_by_its_task_is_reported_and_replaced(ctx):
    with shm.Pool(2, context=ctx) as p:
        out = []
        for x in range(10):
            try:
                out.append(p.apply(W.die_on, (x, 5)))
            except shm.WorkerLost as e:
                out.append(e)
        lost = [e for e in out if isinstance(e, shm.WorkerLost)]
        assert len(lost) == 1 and out[:5] == list(range(5)) and out[6:] == list(range(6, 10))
        e = lost[0]
        assert e.signal == signal.SIGKILL and e.exitcode == -signal.SIGKILL and e.pid > 0
        assert "SIGKILL" in str(e) and f"pid {e.pid}" in str(e)
        assert p.stats()["replaced"] == 1 and p.stats()["lost"] == 1
        assert p.map(W.square, range(10)) == [x * x for x in range(10)]


def test_segfault_in_a_map_fails_only_its_tasks(pool):
    futs = [pool.submit(W.square, i) for i in range(50)]
    bad = pool.submit(W.segfault)
    futs += [pool.submit(W.square, i) for i in range(50, 100)]
    e = bad.exception(60)
    assert isinstance(e, shm.WorkerLost) and e.signal == signal.SIGSEGV
    ok = [f for f in futs if f.exception(60) is None]
    lost = [f for f in futs if isinstance(f.exception(60), shm.WorkerLost)]
    assert len(ok) + len(lost) == 100
    assert all(f.result() == i * i for i, f in enumerate(futs) if f in ok)


def test_external_sigkills_mid_map_account_for_every_task():
    """Kill workers at random moments of long maps: each task is its value or WorkerLost, never twice, never hung."""
    rng = random.Random(7)
    kills = lost_total = 0
    with shm.Pool(2, context=FORK) as p:
        for rnd in range(max(2, KILL_ROUNDS)):
            n = 3000
            r = p.map_async(functools.partial(W.spin, us=50), range(n), chunksize=rng.choice([1, 16, 500]))
            for _ in range(2):
                time.sleep(rng.uniform(0.005, 0.05))
                victim = rng.choice([w["pid"] for w in p.stats()["workers"] if w["pid"]])
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
            try:
                res = r.get(120)
                assert res == list(range(n))
            except shm.WorkerLost:
                pass
            job_values = _outcomes(p, n)
            lost_total += job_values
        st = p.stats()
        assert st["replaced"] >= 1
        assert p.map(W.square, range(100)) == [x * x for x in range(100)]
    _report.add("pool: workers SIGKILLed mid-map (every task accounted for)", kills)
    _report.add("pool: tasks reported WorkerLost", lost_total)


def _outcomes(p, n) -> int:
    """Run n tasks as futures while a worker is killed; check every one; return how many were lost."""
    futs = [p.submit(W.spin, i, 200) for i in range(n // 10)]
    time.sleep(0.01)
    victim = next((w["pid"] for w in p.stats()["workers"] if w["pid"]), None)
    if victim:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lost = 0
    for i, f in enumerate(futs):
        e = f.exception(120)
        if e is None:
            assert f.result() == i
        else:
            assert isinstance(e, shm.WorkerLost), e
            lost += 1
    return lost


def test_parent_killed_workers_exit_and_gc_reclaims(tmp_path):
    """SIGKILL the pool's parent: its workers notice and exit; `shm gc` removes the pool's segments."""
    import subprocess
    import sys
    code = (
        "import sys, time, os; sys.path.insert(0, %r)\n"
        "import shm, multiprocessing as mp, _pool_workers as W\n"
        "p = shm.Pool(2, context=mp.get_context('fork'))\n"
        "a = p.array(1000)\n"
        "p.map_async(W.sleep_then, [1] * 10000, chunksize=1)\n"
        "print(' '.join(str(w['pid']) for w in p.stats()['workers']), flush=True)\n"
        "time.sleep(60)\n" % os.path.dirname(__file__))
    before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(x) for x in pids):
        time.sleep(0.05)
    assert not any(_alive(x) for x in pids), "workers outlived their parent"
    from shm import _admin
    left = set(os.listdir("/dev/shm")) - before
    assert left                                    # the pool segment, its array and result channel
    removed = set(_admin.gc())
    assert left <= removed, (left, removed)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def test_inspect_shows_the_pool_and_gc_leaves_a_live_one_alone(pool):
    from shm import _admin
    a = pool.array(100)
    r = pool.map_async(W.sleep_then, range(20), chunksize=1)
    deadline = time.monotonic() + 30
    while True:                 # a worker records its pid when it starts: give both the time to
        info = _admin.describe(pool._seg.name)
        if sum(p["alive"] for p in info["participants"]) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert info["kind"] == "pool" and info["workers"] == 2
    assert sum(p["alive"] for p in info["participants"]) == 2
    assert {p["pid"] for p in info["participants"]} == {w["pid"] for w in pool.stats()["workers"]}
    before = set(os.listdir("/dev/shm"))
    assert not set(_admin.gc()) & before            # nothing of a live pool is collected
    assert r.get(60) == list(range(20))
    a[:] = 1
    assert pool.for_each_chunk(a, W.chunk_sum, chunks=2) == [50.0, 50.0]


def test_results_and_errors_that_cannot_be_unpickled_fail_only_their_tasks(pool):
    e = pool.submit(W.raise_needs_args).exception(30)
    assert isinstance(e, RuntimeError) and "NeedsArgs" in str(e)       # its repr, since it cannot travel
    with pytest.raises(TypeError, match="could not be unpickled"):
        pool.apply(W.unloadable_result)
    futs = [pool.submit(W.square, i) for i in range(20)]
    assert [f.result(30) for f in futs] == [i * i for i in range(20)]


def test_large_arguments_and_results(pool):
    blob = os.urandom(5 << 20)                      # larger than a quarter of the arena: its own segment
    assert pool.apply(W.length, (blob,)) == len(blob)
    assert pool.map(W.length, [blob[:1 << 20]] * 12, chunksize=1) == [1 << 20] * 12
    assert len(pool.apply(W.big_bytes, (3 << 20,))) == 3 << 20


POOL_FULL_CHILD = r'''
import os, sys, multiprocessing as mp
sys.path.insert(0, "tests")
import shm, _pool_workers as W
from shm.errors import OutOfSharedMemory
assert os.listdir("/dev/shm") == []
with shm.Pool(2, context=mp.get_context("fork")) as p:
    assert p.map(W.square, range(100)) == [x * x for x in range(100)]
    f = p.submit(W.length, b"z" * (5 << 20))          # its own payload segment: no room for it
    e = f.exception(60)
    assert isinstance(e, OutOfSharedMemory) and "--shm-size" in str(e), repr(e)
    try:
        p.array(1 << 20)                               # 8 MiB
        raise SystemExit("an 8 MiB array fitted in 3 MiB")
    except OutOfSharedMemory:
        pass
    assert p.map(W.square, range(100)) == [x * x for x in range(100)]
assert os.listdir("/dev/shm") == [], os.listdir("/dev/shm")
print("ok")
'''


def test_pool_in_a_full_dev_shm():
    import subprocess
    import sys
    from test_full_shm import ROOT, _can_mount
    if not _can_mount():
        pytest.skip("needs root and unshare to mount a small private /dev/shm")
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount -t tmpfs -o size=3m tmpfs /dev/shm && exec "$0" -c "$1"', sys.executable,
                        POOL_FULL_CHILD], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"


def test_a_forked_child_cannot_use_the_pool_and_exits_cleanly(pool):
    pool.map(W.square, range(10))
    pid = os.fork()
    if pid == 0:                                    # the child: refuses, and its exit touches nothing
        code = 0
        try:
            pool.submit(W.square, 1)
            code = 1
        except RuntimeError as e:
            code = 0 if "another process" in str(e) else 2
        pool.terminate()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pool.map(W.square, range(10)) == [x * x for x in range(10)]


def test_futures_work_with_every_concurrent_futures_helper(pool):
    slow = pool.submit(W.sleep_then, "slow", 0.5)
    fast = [pool.submit(W.square, i) for i in range(50)]
    with pytest.raises(cf.TimeoutError):
        slow.result(timeout=0.01)
    assert not slow.cancel() and slow.running()
    done, pending = cf.wait(fast, timeout=60, return_when=cf.ALL_COMPLETED)
    assert len(done) == 50 and not pending
    seen = []
    slow.add_done_callback(lambda f: seen.append(f.result()))
    first = cf.wait([slow] + fast, timeout=60, return_when=cf.FIRST_COMPLETED)[0]
    assert first
    assert [f.result() for f in cf.as_completed([slow], timeout=60)] == ["slow"]
    assert seen == ["slow"] and slow.done()
    # Many futures outstanding at once, waited on from several threads.
    futs = [pool.submit(W.square, i) for i in range(3000)]
    out = {}
    ths = [threading.Thread(target=lambda k=k: out.__setitem__(k, [f.result(60) for f in futs[k::4]]))
           for k in range(4)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    assert sorted(v for vs in out.values() for v in vs) == sorted(i * i for i in range(3000))


def test_forkserver_start_method():
    with shm.Pool(2, context="forkserver") as p:
        assert p.map(W.square, range(10)) == [x * x for x in range(10)]
        with pytest.raises(shm.WorkerLost) as ei:
            p.apply(W.die_on, (5, 5))
        assert ei.value.signal == signal.SIGKILL
        assert p.submit(W.add, 1, 2).result(30) == 3


def test_a_worker_killed_while_parked_leaves_no_phantom_sleeper(pool):
    from kernels import layout as L
    pool.map(W.square, range(10))
    w = pool._seg.w
    bits = lambda: sum(bin(int(w[(L.PO_SLEEPERS >> 3) + k]) & (2**64 - 1)).count("1") for k in range(L.BITMAP_WORDS))

    def settles_at_two():       # parked workers wake every 100 ms to look at their parent: poll
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            n = bits()
            assert n <= 2                           # one bit per slot: a dead worker is never counted twice
            if n == 2:
                return True
            time.sleep(0.01)
        return False
    assert settles_at_two()
    victim = pool.stats()["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pool.stats()["workers"][0]["pid"] == victim:
        time.sleep(0.02)
    assert settles_at_two()                          # the replacement's bit, and no phantom
    assert pool.map(W.square, range(10)) == [x * x for x in range(10)]


# --------------------------------------------------------------------------
# found in review

def test_sys_exit_in_a_task_fails_that_task_only():
    with shm.Pool(1, context=FORK) as p:            # one worker: a hang would be total
        for code in (0, 3, None):
            with pytest.raises(SystemExit):
                p.apply(W.exit_with, (code,))
        assert p.map(W.square, range(10)) == [x * x for x in range(10)]
        assert p.stats()["replaced"] == 0 and p.stats()["lost"] == 0


def test_imap_then_close_then_iterate():
    p = shm.Pool(2, context=FORK)
    it = p.imap(W.square, (i for i in range(2000)))
    p.close()
    assert list(it) == [i * i for i in range(2000)]
    p.join()


def test_callback_runs_before_get_returns(pool):
    seen = []
    for i in range(50):
        r = pool.apply_async(W.square, (i,), callback=seen.append)
        assert r.get(30) == i * i and seen[-1] == i * i


def test_a_death_is_settled_under_a_steady_stream_of_submissions(pool):
    stop = threading.Event()
    futs = []

    def stream():
        while not stop.is_set():
            futs.append(pool.submit(W.spin, 1, 100))
            time.sleep(0.0002)
    t = threading.Thread(target=stream)
    t.start()
    try:
        time.sleep(0.1)
        bad = pool.submit(W.die_on, 5, 5)
        assert isinstance(bad.exception(30), shm.WorkerLost)    # settled while the stream goes on
    finally:
        stop.set()
        t.join(30)
    for f in futs:
        e = f.exception(60)
        assert e is None or isinstance(e, shm.WorkerLost)


def test_terminate_with_big_payloads_pending_leaves_nothing():
    p = shm.Pool(1, context=FORK)
    p.submit(W.sleep_then, 1, 1)
    for _ in range(3):
        p.submit(W.length, os.urandom(3 << 20))     # each in its own segment
    p.terminate()                                   # the conftest fixture checks /dev/shm


def test_workers_do_not_keep_every_copied_array_mapped(pool):
    for _ in range(8):
        pool.for_each_chunk(np.ones(1 << 16), W.chunk_sum, chunks=4)
    counts = pool.map(W.deleted_shm_maps, range(8), chunksize=1)
    assert max(counts) <= 5, counts                 # at most the 4 most recent, not all 8


def test_demo_pool_part(monkeypatch, capsys):
    """The pool part of `make demo` gets every result right (on fewer tasks)."""
    from shm import _demo_pool
    monkeypatch.setattr(_demo_pool, "TASKS", 2000)
    assert _demo_pool.main()
    assert "results ok" in capsys.readouterr().out
