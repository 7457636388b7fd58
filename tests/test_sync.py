"""shm's synchronisation primitives: API smoke tests, correctness across real
processes under fork and spawn, and SIGKILL tests (a dead holder never wedges
the others). Hang guards are timeouts only; nothing asserts on timing.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import threading
import time

import pytest

import shm
from shm import _admin
import _sync_workers as SW

FORK = mp.get_context("fork")
N_ADDS = 100_000


def _start(ctx, target, *args):
    p = ctx.Process(target=target, args=args)
    p.start()
    return p


def _join_ok(procs, timeout=120):
    for p in procs:
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
        assert p.exitcode == 0, f"child exit code {p.exitcode}"


def _kill(p):
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL


def _closing(*handles):
    class _C:
        def __enter__(self):
            return handles

        def __exit__(self, *exc):
            for h in handles:
                h.close()
    return _C()


# --------------------------------------------------------------------------
# Smoke tests, one process.

def test_atomic_int_smoke():
    with shm.AtomicInt(5) as a:
        assert a.load() == 5 and a.value == 5 and int(a) == 5
        assert a.fetch_add(3) == 5 and a.fetch_sub(2) == 8 and a.load() == 6
        assert a.swap(10) == 6
        assert a.compare_and_set(10, 11) and not a.compare_and_set(10, 12) and a.load() == 11
        assert a.compare_exchange(0, 1) == 11
        assert a.fetch_and(0b1010) == 11 and a.load() == 0b1010
        assert a.fetch_or(0b0101) == 0b1010 and a.load() == 0b1111
        assert a.fetch_xor(0b0011) == 0b1111 and a.load() == 0b1100
        assert a.fetch_max(100) == 12 and a.fetch_max(5) == 100 and a.fetch_min(-7) == 100 and a.load() == -7
        a.value = (1 << 63) - 1
        assert a.fetch_add(1) == (1 << 63) - 1 and a.load() == -(1 << 63)        # wraps like the machine
        with pytest.raises(OverflowError):
            a.store(1 << 63)
        assert "value=" in repr(a)
    assert a.closed and "closed" in repr(a)
    with pytest.raises(shm.Closed):
        a.fetch_add(1)
    with pytest.raises(shm.Closed):
        a.load()


def test_atomic_float_smoke():
    with shm.AtomicFloat(1.5) as f:
        assert f.load() == 1.5 and float(f) == 1.5
        assert f.fetch_add(2) == 1.5 and f.value == 3.5
        assert f.fetch_sub(0.5) == 3.5 and f.value == 3.0
        assert f.fetch_max(10) == 3.0 and f.fetch_min(-1) == 10.0 and f.value == -1.0
        assert f.swap(0.0) == -1.0
        assert not f.compare_and_set(-0.0, 1.0)           # bits compared, as AtomicCell does
        assert f.compare_and_set(0.0, 2.5) and f.value == 2.5
        assert f.compare_exchange(1.0, 7.0) == 2.5
        f.value = float("inf")
        assert f.load() == float("inf")


def test_lock_smoke():
    with _closing(shm.Lock()) as (lock,):
        assert not lock.locked() and "unlocked" in repr(lock)
        assert lock.acquire() is True and lock.locked() and not lock.recovered
        assert f"pid {os.getpid()}" in repr(lock) and lock.owner_pid() == os.getpid()
        assert lock.acquire(False) is False
        assert lock.acquire(timeout=0.05) is False
        with pytest.raises(ValueError):
            lock.acquire(False, timeout=1)
        lock.release()
        with pytest.raises(RuntimeError):
            lock.release()
        with lock:
            assert lock.locked()
        assert not lock.locked()
        # A thread waiting in acquire is woken by release.
        lock.acquire()
        got = []
        t = threading.Thread(target=lambda: got.append(lock.acquire(timeout=30)))
        t.start()
        time.sleep(0.05)
        lock.release()
        t.join(30)
        assert got == [True]
        lock.release()


def test_rlock_smoke():
    with _closing(shm.RLock()) as (r,):
        with r:
            with r:
                assert r.locked()
            assert r.locked()
        assert not r.locked()
        r.acquire()
        err = []

        def other():
            try:
                r.release()
            except RuntimeError:
                err.append("refused")
            err.append(r.acquire(timeout=0.05))
        t = threading.Thread(target=other)
        t.start()
        t.join(30)
        assert err == ["refused", False]
        r.release()
        with pytest.raises(RuntimeError):
            r.release()


def test_semaphore_smoke():
    with _closing(shm.Semaphore(2), shm.BoundedSemaphore(1)) as (s, b):
        assert s.acquire() and s.acquire() and not s.acquire(False) and s.get_value() == 0
        assert s.acquire(timeout=0.05) is False
        s.release(2)
        assert s.value == 2
        s.release()                    # an unbounded semaphore may go past its initial value
        assert s.value == 3
        with pytest.raises(ValueError):
            shm.Semaphore(-1)
        with b:
            assert b.value == 0
        with pytest.raises(ValueError):
            b.release()
        assert "value=1/1" in repr(b)


def test_event_smoke():
    with _closing(shm.Event()) as (e,):
        assert not e.is_set() and e.wait(0.02) is False
        t = threading.Timer(0.05, e.set)
        t.start()
        assert e.wait(30) is True and e.is_set()
        t.join()
        e.clear()
        assert not e.is_set() and "clear" in repr(e)
        with pytest.raises(ValueError):
            e.wait(-1)


def test_condition_smoke_with_threads():
    with _closing(shm.Condition()) as (cond,):
        items = []

        def consumer(out):
            with cond:
                out.append(cond.wait_for(lambda: len(items) > 0, timeout=30))
                items.pop()
        outs = [[], []]
        ts = [threading.Thread(target=consumer, args=(o,)) for o in outs]
        for t in ts:
            t.start()
        time.sleep(0.05)
        for _ in range(2):
            with cond:
                items.append(1)
                cond.notify()
        for t in ts:
            t.join(30)
        assert outs == [[True], [True]]
        with pytest.raises(RuntimeError):
            cond.wait(0.01)                 # the lock is not held
        with pytest.raises(RuntimeError):
            cond.notify()
        with cond:
            assert cond.wait(0.02) is False
            cond.notify_all()
    with pytest.raises(TypeError):
        shm.Condition(threading.Lock())


def test_barrier_smoke_with_threads():
    with _closing(shm.Barrier(3)) as (b,):
        assert b.parties == 3 and b.n_waiting == 0 and not b.broken
        out = []
        ts = [threading.Thread(target=lambda: out.append(b.wait(30))) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert sorted(out) == [0, 1, 2]
        # A timeout breaks it; reset mends it.
        with pytest.raises(shm.BrokenBarrier):
            b.wait(timeout=0.05)
        assert b.broken
        with pytest.raises(threading.BrokenBarrierError):      # shm.BrokenBarrier is one
            b.wait()
        b.reset()
        assert not b.broken and b.n_waiting == 0
        # abort() wakes a waiter with BrokenBarrier.
        err = []

        def waiter():
            try:
                b.wait(30)
            except shm.BrokenBarrier:
                err.append("broken")
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.05)
        b.abort()
        t.join(30)
        assert err == ["broken"]
        b.reset()


def test_barrier_action():
    ran = []
    with _closing(shm.Barrier(1, action=lambda: ran.append(1))) as (b,):
        assert b.wait() == 0 and b.wait() == 0
        assert ran == [1, 1]


def test_waitgroup_smoke():
    with _closing(shm.WaitGroup()) as (wg,):
        assert wg.wait(0) is True and wg.count == 0
        wg.add(2)
        assert wg.wait(0.02) is False and wg.count == 2
        wg.adopt()
        wg.done()
        wg.done()
        assert wg.wait(1) is True
        with pytest.raises(ValueError):
            wg.done()
        with pytest.raises(ValueError):
            wg.adopt()
        assert wg.count == 0


def test_notify_smoke():
    with _closing(shm.Notify()) as (n,):
        assert n.notified(0.02) is False
        n.notify_one()                       # no waiter: a permit is stored (only one)
        n.notify_one()
        assert n.notified(0) is True and n.notified(0.02) is False
        got = []
        ts = [threading.Thread(target=lambda: got.append(n.notified(30))) for _ in range(3)]
        for t in ts:
            t.start()
        deadline = time.monotonic() + 30
        while "waiting=3" not in repr(n) and time.monotonic() < deadline:
            time.sleep(0.01)
        n.notify_one()
        n.notify_waiters()
        for t in ts:
            t.join(30)
        assert got == [True, True, True]
        assert n.notified(0.02) is False        # notify_waiters stores no permit


def test_close_while_another_thread_waits():
    e = shm.Event()
    err = []

    def waiter():
        try:
            e.wait(30)
        except shm.Closed:
            err.append("closed")
    t = threading.Thread(target=waiter)
    t.start()
    deadline = time.monotonic() + 30
    while e._nwait == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    e.close()                    # the waiter wakes within a peer check and sees Closed, no crash
    t.join(30)
    assert err == ["closed"]


def test_rwlock_smoke():
    with _closing(shm.RWLock()) as (rw,):
        assert rw.acquire_read() and rw.acquire_read()
        assert "readers=2" in repr(rw)
        assert rw.acquire_write(timeout=0.02) is False
        rw.release_read()
        rw.release_read()
        with pytest.raises(RuntimeError):
            rw.release_read()
        with rw.write():
            assert rw.acquire_read(timeout=0.02) is False
            assert rw.acquire_write(False) is False
        with rw.read():
            pass
        with pytest.raises(RuntimeError):
            rw.release_write()
        # A writer waiting for readers to drain blocks new readers (writers do not starve).
        rw.acquire_read()
        got = []
        t = threading.Thread(target=lambda: got.append(rw.acquire_write(timeout=30)))
        t.start()
        deadline = time.monotonic() + 30
        while "no writer" in repr(rw) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert rw.acquire_read(timeout=0.05) is False
        rw.release_read()
        t.join(30)
        assert got == [True]
        rw.release_write()
        # A writer that gives up (timeout) lets readers in again.
        rw.acquire_read()
        assert rw.acquire_write(timeout=0.05) is False
        assert rw.acquire_read(timeout=5) is True
        rw.release_read()
        rw.release_read()
        assert rw.readers() == 0


def test_open_by_name_pickle_and_wrong_kind():
    lock = shm.Lock(name="sync_test_lock")
    try:
        other = shm.Lock.open("sync_test_lock")
        assert other.name == lock.name
        other.acquire()
        assert lock.locked() and not lock.acquire(False)
        other.release()
        other.close()
        with pytest.raises(shm.WrongKind):
            shm.Semaphore.open("sync_test_lock")
        with pytest.raises(shm.SegmentNotFound):
            shm.Event.open("sync_no_such_thing")
        copy = pickle.loads(pickle.dumps(lock))
        assert copy.name == lock.name and not copy.locked()
        copy.close()
        assert os.path.exists("/dev/shm/sync_test_lock")
    finally:
        lock.close()
    assert not os.path.exists("/dev/shm/sync_test_lock")         # the last to leave unlinks


def test_ls_and_gc_know_the_sync_kind():
    r, w = FORK.Pipe(duplex=False)
    p = _start(FORK, SW.make_and_die, w)
    assert r.poll(60)
    name = r.recv()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    with _closing(shm.Event(name="sync_test_alive")):
        rows = {r["name"]: r for r in _admin.list_segments()}
        assert rows[name]["kind"] == "sync" and rows[name]["type"] == "Lock"
        assert [p_["alive"] for p_ in rows[name]["participants"]] == [False]
        assert rows["sync_test_alive"]["type"] == "Event"
        removed = _admin.gc()
        assert name in removed and "sync_test_alive" not in removed
        assert not os.path.exists(f"/dev/shm/{name}") and os.path.exists("/dev/shm/sync_test_alive")


# --------------------------------------------------------------------------
# Across processes.

def test_fetch_add_two_processes_exact(ctx):
    with shm.AtomicInt(0) as n:
        procs = [_start(ctx, SW.fetch_adds, n, N_ADDS) for _ in range(2)]
        _join_ok(procs)
        assert n.load() == 2 * N_ADDS


def test_lock_protects_read_modify_write(ctx):
    with _closing(shm.Lock(), shm.AtomicInt(0)) as (lock, cell):
        k = 3000
        procs = [_start(ctx, SW.locked_rmw, lock, cell, k) for _ in range(2)]
        SW.locked_rmw(lock, cell, k)
        _join_ok(procs)
        assert cell.load() == 3 * k


def test_barrier_rounds(ctx):
    parties, rounds = 3, 20
    with _closing(shm.Barrier(parties), shm.AtomicInt(0)) as (b, counter):
        procs = [_start(ctx, SW.barrier_rounds, b, counter, rounds, parties) for _ in range(parties - 1)]
        SW.barrier_rounds(b, counter, rounds, parties)
        _join_ok(procs)
        assert counter.load() == parties * rounds and not b.broken


def test_semaphore_never_exceeds_its_count(ctx):
    with _closing(shm.Semaphore(2), shm.AtomicInt(0), shm.AtomicInt(0)) as (sem, inside, peak):
        procs = [_start(ctx, SW.semaphore_users, sem, inside, peak, 300) for _ in range(3)]
        _join_ok(procs)
        assert 1 <= peak.load() <= 2 and inside.load() == 0 and sem.get_value() == 2


def test_event_wakes_other_processes(ctx):
    with _closing(shm.Event(), shm.AtomicInt(0)) as (e, out):
        procs = [_start(ctx, SW.wait_event, e, out) for _ in range(2)]
        time.sleep(0.1)
        e.set()
        _join_ok(procs)
        assert out.load() == 2


def test_waitgroup_across_processes(ctx):
    with _closing(shm.WaitGroup(), shm.AtomicInt(0)) as (wg, counter):
        wg.add(3)
        procs = [_start(ctx, SW.wg_worker, wg, counter) for _ in range(3)]
        assert wg.wait(timeout=60) is True
        assert counter.load() == 3
        _join_ok(procs)


def test_condition_and_notify_across_processes(ctx):
    with _closing(shm.Condition(), shm.Notify(), shm.AtomicInt(0), shm.AtomicInt(0)) as (cond, note, items, got):
        procs = [_start(ctx, SW.condition_consumer, cond, items, got) for _ in range(2)]
        procs += [_start(ctx, SW.notify_waiter, note, got) for _ in range(2)]
        for _ in range(2):
            with cond:
                items.fetch_add(1)
                cond.notify()
        deadline = time.monotonic() + 60
        while got.load() < 4 and time.monotonic() < deadline:
            note.notify_one()              # a waiter not parked yet takes the stored permit
            time.sleep(0.01)
        _join_ok(procs)
        assert got.load() == 4 and items.load() == 0


def test_rwlock_writers_lose_nothing(ctx):
    with _closing(shm.RWLock(), shm.AtomicInt(0)) as (rw, cell):
        procs = [_start(ctx, SW.rw_readers_writers, rw, cell, 1000, w) for w in (True, True, False)]
        _join_ok(procs)
        assert cell.load() == 2000


def test_handles_travel_through_a_pool(ctx):
    with _closing(shm.RLock(), shm.AtomicInt(0), shm.BoundedSemaphore(2)) as (lock, counter, sem):
        with ctx.Pool(2) as pool:
            out = pool.map(SW.pool_task, [(lock, counter, sem, i) for i in range(40)], chunksize=4)
        assert sorted(out) == [(i, "RLock") for i in range(40)]
        assert counter.load() == 40 and sem.get_value() == 2 and not lock.locked()


# --------------------------------------------------------------------------
# SIGKILL.

def test_killed_lock_holder_is_recovered(ctx):
    with _closing(shm.Lock(), shm.Event(), shm.AtomicInt(0)) as (lock, ready, out):
        p = _start(ctx, SW.hold_lock_forever, lock, ready)
        assert ready.wait(60)
        assert lock.acquire(timeout=0.05) is False
        _kill(p)
        assert lock.acquire(timeout=30) is True      # within a peer check (~0.5 s), bounded here by 30
        assert lock.recovered
        lock.release()
        assert lock.acquire(timeout=5) and not lock.recovered
        lock.release()
        assert lock.stats()["recovered"] == 1


def test_killed_lock_holder_recovered_by_another_waiter():
    with _closing(shm.Lock(), shm.Event(), shm.AtomicInt(0)) as (lock, ready, out):
        p = _start(FORK, SW.hold_lock_forever, lock, ready)
        assert ready.wait(60)
        q = _start(FORK, SW.acquire_then_report, lock, out)
        time.sleep(0.1)
        _kill(p)
        _join_ok([q])
        assert out.load() == 1                    # the waiting process got it, and was told


def test_killed_waiter_does_not_disturb(ctx):
    with _closing(shm.Lock(), shm.Event()) as (lock, started):
        lock.acquire()
        p = _start(ctx, SW.acquire_lock_blocking, lock, started)
        assert started.wait(60)
        time.sleep(0.2)                            # let it park
        _kill(p)
        lock.release()
        assert lock.acquire(timeout=5) and not lock.recovered
        lock.release()
        with _closing(shm.AtomicInt(0)) as (out,):
            q = _start(ctx, SW.acquire_then_report, lock, out)
            _join_ok([q])
            assert out.load() == 2


def test_killed_barrier_party_breaks_the_barrier(ctx):
    with _closing(shm.Barrier(3), shm.AtomicInt(0), shm.Event()) as (b, arrived, ready):
        victim = _start(ctx, SW.attach_and_sleep, b, ready)
        assert ready.wait(60)
        waiters = [_start(ctx, SW.barrier_expect_broken, b, arrived) for _ in range(2)]
        deadline = time.monotonic() + 60
        while arrived.load() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        _kill(victim)
        _join_ok(waiters)                          # each got BrokenBarrier, not a hang
        assert b.broken
        with pytest.raises(shm.BrokenBarrier):
            b.wait(1)
        b.reset()
        assert not b.broken


def test_killed_holder_gives_back_bounded_permits():
    with _closing(shm.BoundedSemaphore(1), shm.Semaphore(1), shm.Event(), shm.Event()) as (bs, s, r1, r2):
        p = _start(FORK, SW.hold_permit_forever, bs, r1)
        q = _start(FORK, SW.hold_permit_forever, s, r2)
        assert r1.wait(60) and r2.wait(60)
        _kill(p)
        _kill(q)
        assert bs.acquire(timeout=30) is True     # given back: return_on_death is BoundedSemaphore's default
        bs.release()
        assert s.acquire(timeout=1.5) is False    # a plain Semaphore's permits are not given back
        assert s.get_value() == 0


def test_killed_waitgroup_worker_counts_as_done():
    with _closing(shm.WaitGroup(), shm.Event()) as (wg, ready):
        wg.add(2)
        p = _start(FORK, SW.wg_adopt_and_hang, wg, ready)
        assert ready.wait(60)
        wg.done()                                  # the other unit, finished here
        assert wg.wait(0.05) is False
        _kill(p)
        assert wg.wait(timeout=30) is True


def test_killed_reader_and_writer_of_rwlock():
    with _closing(shm.RWLock(), shm.Event()) as (rw, ready):
        p = _start(FORK, SW.hold_lock_forever, _Reader(rw), ready)
        assert ready.wait(60)
        assert rw.acquire_write(timeout=0.05) is False
        _kill(p)
        assert rw.acquire_write(timeout=30) is True and not rw.recovered
        rw.release_write()


class _Reader:
    """Adapts an RWLock's read side to the ``acquire()`` that hold_lock_forever calls."""

    def __init__(self, rw):
        self.rw = rw

    def acquire(self):
        return self.rw.acquire_read()


def test_killed_writer_of_rwlock_is_recovered_by_a_reader():
    with _closing(shm.RWLock(), shm.Event()) as (rw, ready):
        p = _start(FORK, SW.hold_lock_forever, _Writer(rw), ready)
        assert ready.wait(60)
        assert rw.acquire_read(timeout=0.05) is False
        _kill(p)
        assert rw.acquire_read(timeout=30) is True and rw.recovered
        rw.release_read()
        assert rw.acquire_write(timeout=5) is True and not rw.recovered
        rw.release_write()


class _Writer:
    def __init__(self, rw):
        self.rw = rw

    def acquire(self):
        return self.rw.acquire_write()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")    # utime + stime


def test_parked_waiters_use_no_cpu_and_all_wake():
    """A process blocked in seven primitives at once (a thread each) uses no CPU, then every wait ends."""
    prims = (shm.Lock(), shm.Semaphore(0), shm.Event(), shm.Barrier(2), shm.WaitGroup(), shm.Notify(),
             shm.RWLock(), shm.AtomicInt(0))
    with _closing(*prims) as (lock, sem, event, barrier, wg, notify, rw, out):
        lock.acquire()
        wg.add(1)
        rw.acquire_write()
        p = _start(FORK, SW.park_on_everything, lock, sem, event, barrier, wg, notify, rw, out)
        deadline = time.monotonic() + 60
        while (lock.stats()["waiting"], sem.stats()["waiting"], event.stats()["waiting"],
               barrier.n_waiting, notify.stats()["waiting"], rw.stats()["waiting"]) != (1, 1, 1, 1, 1, 1):
            assert time.monotonic() < deadline and p.is_alive(), "the waiters never parked"
            time.sleep(0.01)
        time.sleep(0.2)                        # past the spin phase
        c0, t0 = _cpu_seconds(p.pid), time.monotonic()
        time.sleep(1.5)
        used = (_cpu_seconds(p.pid) - c0) / (time.monotonic() - t0)
        assert used < 0.10, f"seven parked waiters used {used:.0%} of a core"
        lock.release()
        sem.release()
        event.set()
        barrier.wait(30)
        wg.done()
        notify.notify_one()
        rw.release_write()
        _join_ok([p])
        assert out.load() == 7


def test_killed_waiters_of_every_kind_do_not_disturb():
    """SIGKILL a process parked in seven primitives: each still works for the others."""
    prims = (shm.Lock(), shm.Semaphore(0), shm.Event(), shm.Barrier(2), shm.WaitGroup(), shm.Notify(),
             shm.RWLock(), shm.AtomicInt(0))
    with _closing(*prims) as (lock, sem, event, barrier, wg, notify, rw, out):
        lock.acquire()
        wg.add(1)
        rw.acquire_write()
        p = _start(FORK, SW.park_on_everything, lock, sem, event, barrier, wg, notify, rw, out)
        deadline = time.monotonic() + 60
        while barrier.n_waiting != 1 or notify.stats()["waiting"] != 1:
            assert time.monotonic() < deadline, "the waiters never parked"
            time.sleep(0.01)
        _kill(p)
        lock.release()
        assert lock.acquire(timeout=5) and not lock.recovered
        sem.release()
        assert sem.acquire(timeout=5)
        event.set()
        assert event.wait(5)
        wg.done()
        assert wg.wait(5)
        rw.release_write()
        assert rw.acquire_read(timeout=5)
        rw.release_read()
        assert "waiting=1" in repr(notify)
        deadline = time.monotonic() + 30
        while notify.notified(0.1) is False:       # the dead waiter's wait is withdrawn when it is reaped
            notify.notify_one()
            assert time.monotonic() < deadline
        # The dead party had arrived: this wait completes its generation, or, if a survivor has
        # reaped the dead one by now, raises BrokenBarrier. Either way, no hang.
        try:
            barrier.wait(30)
        except shm.BrokenBarrier:
            pass
        lock.release()
