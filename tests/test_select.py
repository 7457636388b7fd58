"""``shm.select`` / ``shm.select_async``: exactly one operation completes, fairly, across processes."""
from __future__ import annotations

import asyncio
import collections
import multiprocessing as mp
import os
import signal
import time

import pytest

import shm
import _report


def _close(*handles):
    for h in handles:
        h.close()


def test_smoke_receives_and_sends():
    tx1, rx1 = shm.bounded(2)
    tx2, rx2 = shm.unbounded()
    try:
        tx2.send("b")
        assert shm.select([rx1, rx2], timeout=1) == (1, "b")
        assert shm.select([rx1, (tx1, "x")], timeout=1) == (1, None)
        assert rx1.try_recv() == "x"
        tx1.send("a")
        tx2.send("c")
        got = {shm.select([rx1, rx2], timeout=1), shm.select([rx1, rx2], timeout=1)}
        assert got == {(0, "a"), (1, "c")}                  # one message per call, none lost
        with pytest.raises(shm.SelectTimeout):
            shm.select([rx1, rx2], timeout=0)
        with pytest.raises(TimeoutError):                  # SelectTimeout is a TimeoutError
            shm.select([rx1, rx2], timeout=0.05)
        tx1.send(1)
        tx1.send(2)
        with pytest.raises(shm.SelectTimeout):             # full: the send cannot complete
            shm.select([(tx1, 3), rx2], timeout=0.05)
        assert [rx1.try_recv(), rx1.try_recv()] == [1, 2]  # and nothing was sent
    finally:
        _close(tx1, rx1, tx2, rx2)


def test_bad_arguments():
    tx, rx = shm.bounded(2)
    try:
        with pytest.raises(TypeError):
            shm.select([tx])                               # a Sender needs a message
        with pytest.raises(TypeError):
            shm.select([rx, "nope"])
        with pytest.raises(ValueError):
            shm.select([])
        with pytest.raises(ValueError):
            shm.select([rx], timeout=-1)
        rx2 = rx.clone()
        rx2.close()
        with pytest.raises(shm.Closed):
            shm.select([rx, rx2], timeout=0)
    finally:
        _close(tx, rx)


def _send_later(txs, which, delay, msg):
    time.sleep(delay)
    txs[which].send(msg)


@pytest.mark.parametrize("which", [0, 2])
def test_wakes_for_whichever_channel_gets_a_message(ctx, which):
    pairs = [shm.bounded(2), shm.unbounded(), shm.bounded(4)]
    txs = [t for t, _ in pairs]
    rxs = [r for _, r in pairs]
    p = ctx.Process(target=_send_later, args=(txs, which, 0.3, f"to {which}"))
    p.start()
    try:
        assert shm.select(rxs, timeout=60) == (which, f"to {which}")
    finally:
        p.join(30)
        _close(*txs, *rxs)
    assert p.exitcode == 0


def test_fair_when_several_are_ready():
    (tx1, rx1), (tx2, rx2) = shm.bounded(4), shm.bounded(4)
    counts = collections.Counter()
    try:
        for _ in range(4):
            tx1.send(0)
            tx2.send(1)
        for _ in range(2000):
            i, v = shm.select([rx1, rx2], timeout=1)
            assert v == i
            counts[i] += 1
            (tx1 if i == 0 else tx2).send(i)               # keep both always ready
    finally:
        _close(tx1, rx1, tx2, rx2)
    assert min(counts.values()) > 0.4 * 2000, f"one channel starved: {counts}"


def test_disconnected_operation_says_which():
    (tx1, rx1), (tx2, rx2) = shm.bounded(2), shm.bounded(2)
    tx2.close()
    try:
        with pytest.raises(shm.Disconnected) as e:
            shm.select([rx1, rx2], timeout=5)
        assert e.value.index == 1
        rx1.close()
        with pytest.raises(shm.Disconnected) as e:
            shm.select([(tx1, "x")], timeout=5)
        assert e.value.index == 0
    finally:
        _close(tx1, rx1, rx2)


def _die(tx):
    os.kill(os.getpid(), signal.SIGKILL)


def test_killed_peer_is_noticed():
    (tx1, rx1), (tx2, rx2) = shm.bounded(2), shm.bounded(2)
    p = mp.get_context("fork").Process(target=_die, args=(tx2,))
    p.start()
    tx2.close()
    p.join(10)
    try:
        with pytest.raises(shm.Disconnected) as e:      # within PEER_CHECK; the timeout is a hang guard
            shm.select([rx1, rx2], timeout=30)
        assert e.value.index == 1
    finally:
        _close(tx1, rx1, rx2)


def _producer(tx, tag, n):
    for i in range(n):
        tx.send((tag, i))
    tx.close()


def test_mpmc_through_select(ctx):
    """Three producer processes on three channels, one selecting consumer: everything once, in order per channel."""
    n = 2000
    pairs = [shm.bounded(8) for _ in range(3)]
    procs = [ctx.Process(target=_producer, args=(tx, k, n)) for k, (tx, _) in enumerate(pairs)]
    for p in procs:
        p.start()
    for tx, _ in pairs:
        tx.close()
    rxs = [rx for _, rx in pairs]
    seen = {k: [] for k in range(3)}
    live = list(range(3))
    try:
        while live:
            try:
                i, (tag, seq) = shm.select([rxs[k] for k in live], timeout=60)
            except shm.Disconnected as e:
                live.pop(e.index)
                continue
            seen[tag].append(seq)
    finally:
        for p in procs:
            p.join(30)
        _close(*rxs)
    assert all(seen[k] == list(range(n)) for k in range(3))
    _report.add("select: messages received", 3 * n)


def test_select_async_and_cancellation():
    (tx1, rx1), (tx2, rx2) = shm.bounded(2), shm.bounded(2)

    async def main():
        tx2.send("b")
        assert await shm.select_async([rx1, rx2], timeout=1) == (1, "b")
        with pytest.raises(shm.SelectTimeout):
            await shm.select_async([rx1, rx2], timeout=0.05)
        task = asyncio.create_task(shm.select_async([rx1, rx2]))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        tx1.send("kept")                                 # the cancelled select took nothing
        assert rx1.try_recv() == "kept"
        later = asyncio.get_running_loop().call_later(0.1, tx2.send, "late")
        assert await shm.select_async([rx1, rx2], timeout=30) == (1, "late")
        later.cancel()
    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        _close(tx1, rx1, tx2, rx2)


@pytest.mark.parametrize("waitv", [True, False])
def test_parked_select_uses_no_cpu_and_still_wakes(monkeypatch, waitv):
    """Parked on futex_waitv (or, without it, the 1 ms fallback): little CPU, and a send still wakes it."""
    import resource
    from shm import _multiwait
    if waitv and not _multiwait.HAVE_WAITV:
        pytest.skip("info: this kernel has no futex_waitv")
    monkeypatch.setattr(_multiwait, "HAVE_WAITV", waitv)
    (tx1, rx1), (tx2, rx2) = shm.bounded(2), shm.bounded(2)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF)
        t = time.monotonic()
        with pytest.raises(shm.SelectTimeout):
            shm.select([rx1, rx2], timeout=1.0)
        wall = time.monotonic() - t
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        assert cpu < 0.3 * wall, f"{cpu:.3f} s of CPU while parked for {wall:.2f} s"
        p = mp.get_context("fork").Process(target=_send_later, args=([tx1, tx2], 1, 0.2, "woke"))
        p.start()
        assert shm.select([rx1, rx2], timeout=30) == (1, "woke")
        p.join(30)
    finally:
        _close(tx1, rx1, tx2, rx2)


def test_default_returns_at_once_when_nothing_is_ready():
    (tx1, rx1), (tx2, rx2) = shm.bounded(2), shm.bounded(2)
    try:
        assert shm.select([rx1, rx2], default="idle") == (None, "idle")
        tx2.send("b")
        assert shm.select([rx1, rx2], default="idle") == (1, "b")
        with pytest.raises(ValueError):
            shm.select([rx1], timeout=1, default=None)
    finally:
        _close(tx1, rx1, tx2, rx2)
