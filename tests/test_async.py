"""asyncio twins of the blocking channel operations, across real processes.

Shapes: smoke, a sync producer process feeding an async consumer (fork and
spawn), sync and async receivers sharing one channel, cancellation that
takes nothing (one at a time and in a storm), timeouts through the API,
``asyncio.wait_for`` and ``asyncio.timeout``, a SIGKILLed sender
disconnecting an awaiting receiver, an awaiting process using no CPU, and
a process that exits while awaiting.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

import shm
import _report
import _workers as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(coro, guard=120):
    return asyncio.run(asyncio.wait_for(coro, guard))           # the guard only stops a hang


def test_smoke():
    async def main():
        tx, rx = shm.bounded(2)
        await tx.send_async("a")
        await tx.send_async({"b": [1, 2]})
        assert await rx.recv_async() == "a"
        assert await rx.recv_async(timeout=1) == {"b": [1, 2]}
        with pytest.raises(shm.Empty):
            await rx.recv_async(timeout=0.05)
        await tx.send_async(1)
        await tx.send_async(2)
        with pytest.raises(shm.Full) as e:
            await tx.send_async(3, timeout=0.05)
        assert e.value.message == 3
        with pytest.raises(ValueError):
            await rx.recv_async(timeout=-1)
        tx.close()
        assert [m async for m in rx] == [1, 2]                   # then Disconnected ends it
        with pytest.raises(shm.Closed):
            await tx.send_async(0)
        rx.close()
    run(main())


@pytest.mark.parametrize("flavor", ["bounded", "unbounded", "rendezvous"])
def test_sync_producer_async_consumer(ctx, flavor):
    n = 3000
    tx, rx = {"bounded": lambda: shm.bounded(8), "unbounded": shm.unbounded,
              "rendezvous": shm.rendezvous}[flavor]()
    p = ctx.Process(target=W.produce_ints, args=(tx, 0, n))
    p.start()
    tx.close()

    async def main():
        return [m async for m in rx]
    try:
        assert run(main()) == list(range(n))
    finally:
        p.join(60)
        rx.close()
    assert p.exitcode == 0
    _report.add("async: messages received", n)


def test_async_producer_sync_consumer(ctx):
    n = 3000
    tx, rx = shm.bounded(4)
    out_tx, out_rx = shm.unbounded()
    p = ctx.Process(target=W.collect, args=(rx, out_tx))
    p.start()
    rx.close()
    out_tx.close()

    async def main():
        for i in range(n):
            await tx.send_async(i)
        tx.close()
    run(main())
    assert out_rx.recv(timeout=60) == list(range(n))
    p.join(60)
    out_rx.close()
    assert p.exitcode == 0


def test_sync_and_async_receivers_share_a_channel():
    n = 4000
    tx, rx = shm.bounded(16, codec="msgpack")
    out_tx, out_rx = shm.unbounded()
    p = mp.get_context("fork").Process(target=W.collect, args=(rx, out_tx))
    p.start()
    out_tx.close()

    async def consume():
        return [m async for m in rx]

    async def main():
        task = asyncio.create_task(consume())
        for i in range(n):
            await tx.send_async(i)
        tx.close()
        return await task
    mine = run(main())
    theirs = out_rx.recv(timeout=60)
    p.join(60)
    rx.close()
    out_rx.close()
    assert sorted(mine + theirs) == list(range(n)), "lost or duplicated"
    assert mine == sorted(mine) and theirs == sorted(theirs)


def test_cancelled_receives_take_nothing():
    """A storm of receives cancelled at random points while messages arrive: each message once."""
    import random
    rng = random.Random(5)
    n = 2000
    tx, rx = shm.bounded(8)
    p = mp.get_context("fork").Process(target=W.produce_ints, args=(tx, 0, n))
    got = []

    async def main():
        p.start()
        tx.close()
        cancelled = 0
        while True:
            task = asyncio.create_task(rx.recv_async())
            await asyncio.sleep(0) if rng.random() < 0.5 else None
            if rng.random() < 0.3 and not task.done():
                task.cancel()
            try:
                got.append(await task)
            except asyncio.CancelledError:
                cancelled += 1
            except shm.Disconnected:
                return cancelled
    cancelled = run(main())
    p.join(60)
    rx.close()
    assert got == list(range(n)), "a cancelled receive took (or lost) a message"
    assert cancelled > 0
    _report.add("async: receives cancelled without taking a message", cancelled)


def test_wait_for_and_timeout_context():
    async def main():
        tx, rx = shm.bounded(2)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(rx.recv_async(), 0.05)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await rx.recv_async()
        tx.send("still here")                       # neither took anything
        assert rx.try_recv() == "still here"
        tx.close()
        rx.close()
    run(main())


def _die_after(tx, seconds):
    tx.send("first")
    time.sleep(seconds)
    os.kill(os.getpid(), signal.SIGKILL)


def test_killed_sender_disconnects_an_awaiting_receiver():
    tx, rx = shm.bounded(4)
    p = mp.get_context("fork").Process(target=_die_after, args=(tx, 0.2))
    p.start()
    tx.close()

    async def main():
        assert await rx.recv_async() == "first"
        t = time.monotonic()
        with pytest.raises(shm.Disconnected):
            await rx.recv_async()
        return time.monotonic() - t
    run(main(), guard=60)
    p.join(10)
    rx.close()
    assert p.exitcode == -signal.SIGKILL


def test_an_awaiting_process_uses_no_cpu():
    tx, rx = shm.bounded(4)

    async def main():
        before = resource.getrusage(resource.RUSAGE_SELF)
        t = time.monotonic()
        with pytest.raises(shm.Empty):
            await rx.recv_async(timeout=1.5)
        wall = time.monotonic() - t
        after = resource.getrusage(resource.RUSAGE_SELF)
        return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), wall
    cpu, wall = run(main())
    tx.close()
    rx.close()
    # A polling or spinning waiter burns ~100% of a core; parked, a few wake-ups per second.
    assert cpu < 0.2 * wall, f"{cpu:.3f} s of CPU while awaiting for {wall:.2f} s"


def test_a_process_exits_while_awaiting():
    code = r'''
import asyncio, shm, sys
tx, rx = shm.bounded(2)
async def main():
    asyncio.get_running_loop().call_later(0.2, sys.exit, 0)
    await rx.recv_async()
try:
    asyncio.run(main())
except SystemExit:
    pass
print("exited")
'''
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "exited" in p.stdout, p.stderr


def _async_child(rx, out_tx):
    async def main():
        return [m async for m in rx]
    out_tx.send(asyncio.run(main()))


def test_a_forked_child_awaits_too():
    """The bridge thread does not survive fork; the child gets its own."""
    tx, rx = shm.bounded(4)

    async def warm():                                  # start this process's bridge
        with pytest.raises(shm.Empty):
            await rx.recv_async(timeout=0.01)
    run(warm())
    out_tx, out_rx = shm.unbounded()
    p = mp.get_context("fork").Process(target=_async_child, args=(rx, out_tx))
    p.start()
    rx.close()
    out_tx.close()
    for i in range(100):
        tx.send(i)
    tx.close()
    assert out_rx.recv(timeout=60) == list(range(100))
    p.join(60)
    out_rx.close()
    assert p.exitcode == 0


def test_queue_get_and_put_async():
    async def main():
        q = shm.Queue(2)
        await q.put_async("x")
        await q.put_async(("t", 1))
        with pytest.raises(shm.Full):
            await q.put_async("y", timeout=0.05)
        assert await q.get_async() == "x"
        assert await q.get_async(timeout=1) == ("t", 1)
        with pytest.raises(shm.Empty):
            await q.get_async(timeout=0.05)
        q.close()
    run(main())


def _recv_later(rx, delay, out):
    for _ in range(2):
        time.sleep(delay)                   # the sender is parked before each receive
        out.send(rx.recv(timeout=60))


def test_rendezvous_send_async_is_woken_by_the_receiver_arriving(monkeypatch):
    """A rendezvous try_send completes only once a receiver waits: its arrival must wake the sender.

    The bridge's periodic re-check is pushed out to a minute, so only that
    wake-up can complete the send within its 20 s hang guard.
    """
    from shm import _async
    monkeypatch.setattr(_async, "PEER_CHECK", 60.0)
    tx, rx = shm.rendezvous()
    out_tx, out_rx = shm.bounded(2)
    p = mp.get_context("fork").Process(target=_recv_later, args=(rx, 1.0, out_tx))
    p.start()
    rx.close()

    async def main():
        await tx.send_async("met", timeout=20)
        i, _ = await shm.select_async([(tx, "again")], timeout=20)
        return i
    try:
        assert run(main()) == 0
        assert [out_rx.recv(timeout=30), out_rx.recv(timeout=30)] == ["met", "again"]
    finally:
        p.join(30)
        _close_all(tx, out_tx, out_rx)


def _close_all(*hs):
    for h in hs:
        h.close()


def test_batches_simplequeue_and_join_async():
    async def main():
        tx, rx = shm.bounded(4)
        await tx.send_many_async([1, 2, 3])
        assert await rx.recv_many_async(10, timeout=1) == [1, 2, 3]
        with pytest.raises(shm.Empty):
            await rx.recv_many_async(10, timeout=0.05)
        with pytest.raises(shm.Full) as e:
            await tx.send_many_async(range(10), timeout=0.1)
        assert e.value.message == [4, 5, 6, 7, 8, 9]       # what was not sent
        assert await rx.recv_many_async(10) == [0, 1, 2, 3]
        tx.close()
        rx.close()
        sq = shm.SimpleQueue()
        await sq.put_async("s")
        assert await sq.get_async() == "s"
        sq.close()
        jq = shm.JoinableQueue()
        jq.put("job")
        assert await jq.join_async(timeout=0.05) is False
        assert jq.get() == "job"
        asyncio.get_running_loop().call_later(0.1, jq.task_done)
        assert await jq.join_async(timeout=30) is True
        jq.close()
    run(main())
