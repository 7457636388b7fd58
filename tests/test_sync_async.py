"""asyncio twins of the primitives' blocking calls, across real processes.

Each twin is the sync call's own code (shm/sync.py drives one generator
either way), so these tests check what only the async side can get wrong:
the wait goes through the bridge (the loop keeps running), a peer in
another process wakes it, a SIGKILLed holder is recovered, and a cancelled
wait gives back what it held (a Lock wake-up, a Semaphore permit, a Notify
credit) or, for a Barrier, breaks it as a timeout would.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time

import pytest

import shm
import _sync_workers as SW

FORK = mp.get_context("fork")


def run(coro, guard=120):
    return asyncio.run(asyncio.wait_for(coro, guard))


async def _ticking(coro):
    """Await ``coro`` while another task counts loop turns: proof the loop was not blocked."""
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)
    t = asyncio.create_task(tick())
    try:
        return await coro, ticks
    finally:
        t.cancel()


def _release_later(lock, delay):
    lock.acquire()
    time.sleep(delay)
    lock.release()


def test_lock_acquire_async_waits_for_another_process():
    lock = shm.Lock()
    p = FORK.Process(target=_release_later, args=(lock, 0.3))
    p.start()
    try:
        while not lock.locked():
            time.sleep(0.005)
        got, ticks = run(_ticking(lock.acquire_async(timeout=30)))
        assert got is True and ticks >= 5            # the loop ran while we waited
        assert run(shm.Lock.open(lock.name).acquire_async(timeout=0.05)) is False   # held by us now
        lock.release()
    finally:
        p.join(30)
        lock.close()


def test_a_sigkilled_holder_is_recovered_by_an_awaiting_acquirer():
    lock = shm.Lock()
    ready = FORK.Event()
    p = FORK.Process(target=SW.hold_lock_forever, args=(lock, ready))
    p.start()
    try:
        assert ready.wait(60)
        os.kill(p.pid, signal.SIGKILL)
        assert run(lock.acquire_async(timeout=60)) is True and lock.recovered
        lock.release()
    finally:
        p.join(10)
        lock.close()


def _set_later(ev, delay):
    time.sleep(delay)
    ev.set()


def _done_later(wg, delay):
    time.sleep(delay)
    wg.done()


def _notify_later(n, delay):
    time.sleep(delay)
    n.notify_one()


def test_event_waitgroup_notify_semaphore_rwlock():
    ev, wg, nt, sem, rw = shm.Event(), shm.WaitGroup(), shm.Notify(), shm.Semaphore(1), shm.RWLock()
    wg.add(1)
    procs = [FORK.Process(target=_set_later, args=(ev, 0.1)), FORK.Process(target=_done_later, args=(wg, 0.1)),
             FORK.Process(target=_notify_later, args=(nt, 0.3))]
    for p in procs:
        p.start()
    wg.done()                                       # ours; the child's done() completes it

    async def main():
        assert await ev.wait_async(timeout=30) is True
        assert await wg.wait_async(timeout=30) is True
        assert await nt.notified_async(timeout=30) is True
        assert await sem.acquire_async(timeout=1) is True
        assert await sem.acquire_async(timeout=0.05) is False
        sem.release()
        assert await rw.acquire_read_async(timeout=1) and await rw.acquire_read_async(timeout=1)
        assert await rw.acquire_write_async(timeout=0.05) is False    # readers in
        rw.release_read()
        rw.release_read()
        assert await rw.acquire_write_async(timeout=1) is True
        rw.release_write()
        rl = shm.RLock()
        assert await rl.acquire_async(timeout=1) and await rl.acquire_async(timeout=1)   # reentrant per task

        async def other_task():
            return await rl.acquire_async(timeout=0.05)
        assert await asyncio.create_task(other_task()) is False                      # another task: no
        rl.release()
        rl.release()
        assert await asyncio.create_task(other_task()) is True
        rl.close()
    try:
        run(main())
    finally:
        for p in procs:
            p.join(30)
        for h in (ev, wg, nt, sem, rw):
            h.close()


def _barrier_party(b, out):
    out.send(b.wait(timeout=60))


def test_barrier_wait_async_with_a_sync_party_in_another_process():
    b = shm.Barrier(2)
    out_tx, out_rx = shm.bounded(1)
    p = FORK.Process(target=_barrier_party, args=(b, out_tx))
    p.start()
    try:
        mine = run(b.wait_async(timeout=60))
        assert sorted([mine, out_rx.recv(timeout=60)]) == [0, 1]
    finally:
        p.join(30)
        b.close()
        out_tx.close()
        out_rx.close()


def test_cancelled_waits_give_back_what_they_held():
    sem, nt, b, lock = shm.Semaphore(0), shm.Notify(), shm.Barrier(2), shm.Lock()

    async def cancel_soon(coro):
        t = asyncio.create_task(coro)
        await asyncio.sleep(0.05)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    async def main():
        await cancel_soon(sem.acquire_async())
        sem.release()
        assert sem.acquire(timeout=1) is True        # the permit was not taken by the cancelled wait
        await cancel_soon(b.wait_async())
        assert b.broken                              # a party left: broken, as by a timeout
        lock.acquire()
        await cancel_soon(shm.Lock.open(lock.name).acquire_async())
        lock.release()
        assert lock.acquire(timeout=1) is True
        lock.release()
        t = asyncio.create_task(nt.notified_async())
        await asyncio.sleep(0.05)
        nt.notify_one()                              # counted for t...
        t.cancel()                                   # ...which is cancelled before it wakes
        try:
            await t
        except asyncio.CancelledError:
            assert nt.notified(timeout=5) is True    # the notification went on, not lost
    try:
        run(main())
    finally:
        for h in (sem, nt, b, lock):
            h.close()


def _produce_items(cond, cell, n):
    for i in range(n):
        with cond:
            cell.fetch_add(1)
            cond.notify_all()
        time.sleep(0.01)


def test_condition_wait_for_async_across_processes():
    lock = shm.Lock()
    cond = shm.Condition(lock)
    cell = shm.AtomicInt(0)
    p = FORK.Process(target=_produce_items, args=(cond, cell, 20))
    p.start()

    async def main():
        await lock.acquire_async()
        try:
            assert await cond.wait_for_async(lambda: cell.load() >= 20, timeout=60)
            assert lock._is_owned()                 # held again on the way out
            assert await cond.wait_async(timeout=0.05) is False
        finally:
            lock.release()
        t = asyncio.create_task(_wait_holding(lock, cond))
        await asyncio.sleep(0.05)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert lock.acquire(timeout=5)               # the cancelled waiter released it on the way out
        lock.release()
        c2 = shm.Condition()                         # over an RLock (the default): owned by this task
        await c2.lock.acquire_async()
        assert await c2.wait_async(0.01) is False and c2.lock._is_owned()
        c2.release()
        c2.close()
    try:
        run(main())
    finally:
        p.join(60)
        for h in (cond, lock, cell):
            h.close()


async def _wait_holding(lock, cond):
    await lock.acquire_async()
    try:
        await cond.wait_async()
    finally:
        lock.release()
