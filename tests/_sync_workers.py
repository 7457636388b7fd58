"""Worker functions for tests/test_sync.py (module level, so spawn children can import them).

A worker reports failure by raising (its exit code is then 1).
"""
from __future__ import annotations

import os
import time

import shm


def fetch_adds(counter, n):
    for _ in range(n):
        counter.fetch_add(1)


def locked_rmw(lock, cell, n):
    """A non-atomic read-modify-write (load, then store) of ``cell``, under ``lock``."""
    for _ in range(n):
        with lock:
            v = cell.load()
            if v % 7 == 0:
                time.sleep(0)            # widen the window between the read and the write
            cell.store(v + 1)


def barrier_rounds(barrier, counter, rounds, parties):
    for r in range(rounds):
        counter.fetch_add(1)
        barrier.wait(timeout=30)
        seen = counter.load()
        if seen < parties * (r + 1):
            raise AssertionError(f"round {r}: passed the barrier with counter {seen} < {parties * (r + 1)}")
        barrier.wait(timeout=30)         # nobody starts the next round before everyone has checked


def semaphore_users(sem, inside, peak, n):
    for _ in range(n):
        with sem:
            now = inside.fetch_add(1) + 1
            peak.fetch_max(now)
            time.sleep(0)
            inside.fetch_sub(1)


def wait_event(event, out):
    if not event.wait(timeout=30):
        raise AssertionError("event never set")
    out.fetch_add(1)


def wg_worker(wg, counter):
    wg.adopt()
    counter.fetch_add(1)
    wg.done()


def wg_adopt_and_hang(wg, ready):
    wg.adopt()
    ready.set()
    time.sleep(600)


def hold_lock_forever(lock, ready):
    lock.acquire()
    ready.set()
    time.sleep(600)


def acquire_lock_blocking(lock, started):
    started.set()
    lock.acquire()                       # parked until killed
    time.sleep(600)


def acquire_then_report(lock, out):
    if not lock.acquire(timeout=30):
        raise AssertionError("could not acquire")
    out.store(1 if lock.recovered else 2)
    lock.release()


def barrier_expect_broken(barrier, arrived):
    arrived.fetch_add(1)
    try:
        barrier.wait(timeout=60)
    except shm.BrokenBarrier:
        return
    raise AssertionError("barrier passed although a party died")


def attach_and_sleep(handle, ready):
    """Hold ``handle`` open (unpickled, so attached) and say so, then wait to be killed.

    Killed before unpickling, a child would leave its handle's pickle token
    live for as long as the parent (the lender) lives.
    """
    ready.set()
    time.sleep(600)


def hold_permit_forever(sem, ready):
    sem.acquire()
    ready.set()
    time.sleep(600)


def condition_consumer(cond, items, got):
    with cond:
        if not cond.wait_for(lambda: items.load() > 0, timeout=30):
            raise AssertionError("never notified")
        items.fetch_sub(1)
        got.fetch_add(1)


def notify_waiter(notify, got):
    if not notify.notified(timeout=30):
        raise AssertionError("never notified")
    got.fetch_add(1)


def rw_readers_writers(rw, cell, n, writer):
    for _ in range(n):
        if writer:
            with rw.write():
                v = cell.load()
                time.sleep(0)
                cell.store(v + 1)
        else:
            with rw.read():
                cell.load()


def make_and_die(conn):
    """Create a Lock, report its name, then die without closing it (SIGKILL)."""
    lock = shm.Lock()
    conn.send(lock.name)
    os.kill(os.getpid(), 9)


def park_on_everything(lock, sem, event, barrier, wg, notify, rw, out):
    """Block in six primitives at once, one thread each; count each wait that ends as expected."""
    import threading

    def run(fn):
        try:
            if fn():
                out.fetch_add(1)
        except shm.BrokenBarrier:
            out.fetch_add(1)
    waits = [lambda: lock.acquire(timeout=60), lambda: sem.acquire(timeout=60), lambda: event.wait(60),
             lambda: barrier.wait(60) >= 0, lambda: wg.wait(60), lambda: notify.notified(60),
             lambda: rw.acquire_read(timeout=60)]
    ts = [threading.Thread(target=run, args=(f,)) for f in waits]
    for t in ts:
        t.start()
    for t in ts:
        t.join(90)


def pool_task(args):
    """A Pool task: take the lock, bump the counter, and report what it saw."""
    lock, counter, sem, i = args
    with sem:
        with lock:
            counter.store(counter.load() + 1)
    return i, type(lock).__name__
