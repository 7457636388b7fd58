"""Broadcast, watch and oneshot channels across real processes, with kills.

Shapes: smoke; fan-out to subscriber processes (fork and spawn) that each
get every message in order; a slow subscriber told exactly how many it
lost (Lagged) and going on in order; subscribers joining by name from
another process; disconnection by close and by SIGKILL; a publisher killed
holding the publishers' lock; random publisher kills with checksummed
messages never torn; watch across processes; oneshot; async; bad input.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import resource
import signal
import time
import zlib

import pytest

import shm
import _report

FORK = mp.get_context("fork")


def _close(*hs):
    for h in hs:
        h.close()


def test_smoke():
    tx, rx = shm.broadcast(4)
    rx2 = tx.subscribe()
    try:
        assert tx.send({"tick": 1}) == 2                    # two subscribers
        assert rx.recv(timeout=1) == {"tick": 1} and rx2.recv(timeout=1) == {"tick": 1}
        with pytest.raises(shm.Empty):
            rx.try_recv()
        with pytest.raises(shm.Empty):
            rx.recv(timeout=0.05)
        for i in range(10):
            tx.send(i)
        assert len(rx) == 4
        with pytest.raises(shm.Lagged) as e:
            rx.recv()
        assert e.value.skipped == 6                         # 10 sent, 4 kept
        assert [rx.recv() for _ in range(4)] == [6, 7, 8, 9]
        late = tx.subscribe()                               # sees only what comes next
        tx.send("next")
        assert late.recv(timeout=1) == "next" and rx.recv(timeout=1) == "next"
        late.close()
        with pytest.raises(shm.Closed):
            late.recv()
    finally:
        _close(tx, rx, rx2)


def test_bad_input():
    with pytest.raises(ValueError):
        shm.broadcast(0)
    tx, rx = shm.broadcast(8, slot_size=128)
    try:
        with pytest.raises(shm.MessageTooLarge, match="slot_size="):
            tx.send("x" * 500)
        with pytest.raises(TypeError, match="pickle"):
            tx.send({1, 2})
        tx.send("fine")
        assert rx.recv(timeout=1) == "fine"
        with pytest.raises(ValueError):
            rx.recv(timeout=-1)
        with pytest.raises(shm.WrongKind):
            shm.Watch.open(tx.name)
        with pytest.raises(shm.WrongKind):
            shm.Receiver.open(tx.name)
        with pytest.raises(shm.SegmentNotFound):
            shm.BroadcastReceiver.open("shm_nonexistent1")
    finally:
        _close(tx, rx)


def _subscriber(rx, n, out):
    got = [rx.recv(timeout=60) for _ in range(n)]
    out.send(got)


def test_fan_out_to_subscriber_processes(ctx):
    n, k = 500, 3
    tx, rx = shm.broadcast(1024)
    subs = [rx] + [tx.subscribe() for _ in range(k - 1)]
    outs = [shm.unbounded() for _ in range(k)]
    procs = [ctx.Process(target=_subscriber, args=(subs[i], n, outs[i][0])) for i in range(k)]
    for p in procs:
        p.start()
    try:
        for i in range(n):
            tx.send(i)
        for i in range(k):
            assert outs[i][1].recv(timeout=120) == list(range(n))
    finally:
        for p in procs:
            p.join(60)
        _close(tx, *subs, *[h for pair in outs for h in pair])
    assert all(p.exitcode == 0 for p in procs)
    _report.add("broadcast: messages delivered to subscriber processes", n * k)


def _slow_subscriber(rx, total, out):
    got, skipped = [], 0
    while len(got) + skipped < total:
        try:
            got.append(rx.recv(timeout=60))
        except shm.Lagged as e:
            skipped += e.skipped
        time.sleep(0.0005)
    out.send((got, skipped))


def test_a_slow_subscriber_is_told_what_it_lost():
    total = 3000
    tx, rx = shm.broadcast(16)
    out_tx, out_rx = shm.unbounded()
    p = FORK.Process(target=_slow_subscriber, args=(rx, total, out_tx))
    p.start()
    try:
        for i in range(total):
            tx.send(i)
        got, skipped = out_rx.recv(timeout=120)
    finally:
        p.join(60)
        _close(tx, rx, out_tx, out_rx)
    assert got == sorted(set(got)), "out of order or duplicated"
    assert len(got) + skipped == total and skipped > 0
    assert got[-1] == total - 1
    _report.add("broadcast: messages skipped by a slow subscriber, all accounted for", skipped)


def _join_by_name(name, ready, out):
    rx = shm.BroadcastReceiver.open(name)
    ready.send("subscribed")
    out.send([rx.recv(timeout=60) for _ in range(3)])
    rx.close()


def test_subscribers_join_by_name_from_another_process(ctx):
    tx, rx = shm.broadcast(64)
    ready_tx, ready_rx = shm.bounded(1)
    out_tx, out_rx = shm.bounded(1)
    tx.send("before")                                       # not for the late subscriber
    p = ctx.Process(target=_join_by_name, args=(tx.name, ready_tx, out_tx))
    p.start()
    try:
        assert ready_rx.recv(timeout=120) == "subscribed"
        for m in ("a", "b", "c"):
            tx.send(m)
        assert out_rx.recv(timeout=120) == ["a", "b", "c"]
    finally:
        p.join(60)
        _close(tx, rx, ready_tx, ready_rx, out_tx, out_rx)
    assert p.exitcode == 0


def _publish_then_die(tx, n):
    for i in range(n):
        tx.send(i)
    os.kill(os.getpid(), signal.SIGKILL)


def test_disconnected_after_close_or_sigkill():
    tx, rx = shm.broadcast(8)
    tx.send(1)
    tx.close()
    assert list(rx) == [1]                                  # drained, then Disconnected ends it
    rx.close()
    tx, rx = shm.broadcast(8)
    p = FORK.Process(target=_publish_then_die, args=(tx, 3))
    p.start()
    tx.close()
    try:
        assert [rx.recv(timeout=60) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(shm.Disconnected):               # noticed by the parked subscriber's peer check
            rx.recv(timeout=30)
    finally:
        p.join(10)
        rx.close()
    assert p.exitcode == -signal.SIGKILL


def _die_holding_the_lock(tx):
    tx._port._lock()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_publisher_killed_holding_the_lock_does_not_wedge_the_others():
    tx, rx = shm.broadcast(8)
    p = FORK.Process(target=_die_holding_the_lock, args=(tx,))
    p.start()
    p.join(10)
    assert p.exitcode == -signal.SIGKILL
    try:
        tx.send("after")                                    # takes the dead owner's lock over
        assert rx.recv(timeout=10) == "after"
        assert int(tx._port.seg.w[shm._broadcast.L.BC_RECOVERED >> 3]) == 1
    finally:
        _close(tx, rx)


def _checked(tag, i):
    body = f"{tag}:{i}:" + "x" * (i % 200)
    return [body, zlib.crc32(body.encode())]


def _publisher(tx, tag, n):
    for i in range(n):
        tx.send(_checked(tag, i))


def test_random_publisher_kills_never_tear_a_message():
    rng = random.Random(11)
    rounds = 8
    tx, rx = shm.broadcast(4096, slot_size=512)
    kills = received = 0
    try:
        for r in range(rounds):
            victims = [FORK.Process(target=_publisher, args=(tx, f"p{r}.{j}", 100_000)) for j in range(2)]
            for v in victims:
                v.start()
            time.sleep(rng.uniform(0.02, 0.1))
            for v in victims:
                os.kill(v.pid, signal.SIGKILL)
                v.join(10)
                kills += v.exitcode == -signal.SIGKILL
            last = {}
            while True:
                try:
                    body, crc = rx.try_recv()
                except shm.Empty:
                    break
                except shm.Lagged:
                    last.clear()
                    continue
                assert zlib.crc32(body.encode()) == crc, f"torn message {body[:40]!r}"
                tag, i, _ = body.split(":")
                assert int(i) > last.get(tag, -1), "out of order"
                last[tag] = int(i)
                received += 1
            tx.send("alive")                                # the lock is never left with the dead
            assert rx.recv(timeout=10) == "alive"
    finally:
        _close(tx, rx)
    assert kills >= rounds
    _report.add("broadcast: publishers SIGKILLed mid-stream", kills)
    _report.add("broadcast: messages checked (crc32)", received)


def _watch_setter(w, n):
    for i in range(1, n + 1):
        w.set({"v": i})
        time.sleep(0.0002)


def test_watch_across_processes(ctx):
    w = shm.watch({"v": 0})
    try:
        assert w.get() == {"v": 0} and w.version == 1
        assert w.changed(timeout=0.05) is False
        p = ctx.Process(target=_watch_setter, args=(w, 200))
        p.start()
        assert w.wait_for(lambda v: v["v"] == 200, timeout=120) == {"v": 200}
        p.join(60)
        assert p.exitcode == 0 and w.version == 201
        other = shm.Watch.open(w.name)
        other.set({"v": "x"})
        assert w.changed(timeout=10) is True and w.get() == {"v": "x"}
        with pytest.raises(TimeoutError):
            w.wait_for(lambda v: False, timeout=0.05)
        other.close()
    finally:
        w.close()


def _oneshot_send(tx, value):
    tx.send(value)


def _oneshot_die(tx):
    os.kill(os.getpid(), signal.SIGKILL)


def test_oneshot(ctx):
    tx, rx = shm.oneshot()
    p = ctx.Process(target=_oneshot_send, args=(tx, {"result": 42}))
    p.start()
    tx.close()
    assert rx.recv(timeout=120) == {"result": 42}
    p.join(60)
    with pytest.raises(shm.Closed):
        rx.recv()
    a, b = shm.oneshot()
    a.send(1)
    with pytest.raises(shm.Closed):
        a.send(2)
    assert b.recv(timeout=1) == 1
    tx, rx = shm.oneshot()
    p = FORK.Process(target=_oneshot_die, args=(tx,))
    p.start()
    tx.close()
    with pytest.raises(shm.Disconnected):
        rx.recv(timeout=30)
    p.join(10)
    rx.close()


def test_async_subscriber_and_watch():
    async def main():
        tx, rx = shm.broadcast(16)
        w = shm.watch(0)
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, tx.send, "hello")
        assert await rx.recv_async(timeout=30) == "hello"
        with pytest.raises(shm.Empty):
            await rx.recv_async(timeout=0.05)
        loop.call_later(0.05, w.set, 5)
        assert await w.wait_for_async(lambda v: v == 5, timeout=30) == 5
        assert await w.changed_async(timeout=0.05) is False
        for i in range(3):
            tx.send(i)
        tx.close()
        assert [m async for m in rx] == [0, 1, 2]
        rx.close()
        w.close()
    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_parked_subscriber_uses_no_cpu():
    tx, rx = shm.broadcast(8)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF)
        t = time.monotonic()
        with pytest.raises(shm.Empty):
            rx.recv(timeout=1.0)
        wall = time.monotonic() - t
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        assert cpu < 0.3 * wall, f"{cpu:.3f} s of CPU while parked for {wall:.2f} s"
    finally:
        _close(tx, rx)
