"""SIGKILL producers and consumers mid-stream: survivors never hang, nothing is
duplicated or corrupted, and a surviving producer's messages all arrive.

Accounting for a killed *consumer*: it logs each message to a pipe right after
``recv`` returns, so a kill between the two loses that one message (it was
delivered to a process that died); so does a kill inside the receive kernel
after the slot was claimed (``stats().lost``). Either way at most one message
per consumer kill, which the tests allow and count; nothing else may go
missing, and nothing may arrive twice.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import os
import random
import signal
import time

import pytest

import shm
from kernels import ring as R
import _report
import _workers as W
from conftest import COUNT, KILL_ROUNDS

FORK = mp.get_context("fork")


def _kill(p) -> bool:
    """SIGKILL ``p``; True if it died of it, False if it had already finished."""
    try:
        os.kill(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.join(10)
    assert p.exitcode in (0, -signal.SIGKILL), f"victim exit code {p.exitcode}"
    return p.exitcode == -signal.SIGKILL


def _run_round(rng, n, kill_producer: bool, kill_consumer: bool, cap=8):
    tx, rx = shm.bounded(cap, codec="bytes")
    fds = [os.pipe() for _ in range(2)]
    writers = [w for _, w in fds]
    readers = [r for r, _ in fds]
    prods = [FORK.Process(target=W.produce, args=(tx, t, n, 41)) for t in range(2)]
    cons = [FORK.Process(target=W.checked_consumer,
                         args=(rx, w, [x for x in writers if x != w] + readers)) for w in writers]
    for p in cons:
        p.start()
    for w in writers:
        os.close(w)         # before forking producers, so they hold no write end
    for p in prods:
        p.start()
    tx.close()
    rx.close()
    time.sleep(rng.uniform(0.002, 0.03))
    killed_p = kill_producer and _kill(prods[0])
    killed_c = False
    if kill_consumer:
        time.sleep(rng.uniform(0, 0.01))
        killed_c = _kill(cons[0])
    t0 = time.monotonic()
    recs = W.read_all_records(readers)      # returns once every consumer is done
    for p in prods[1:] + cons[1:]:
        p.join(60)
        assert p.exitcode == 0, f"a survivor failed (exit code {p.exitcode})"
    if not kill_producer:
        prods[0].join(60)
    return recs, killed_p, killed_c


def _check(recs, n, killed_producer: bool, consumer_kills: int):
    """No duplicate; the surviving producer loses at most one message per consumer kill."""
    seen = collections.Counter(recs)
    dups = [k for k, v in seen.items() if v > 1]
    assert not dups, f"duplicated messages: {dups[:5]}"
    survivor = sorted(s for t, s in recs if t == 1)
    missing = n - len(survivor)
    assert 0 <= missing <= consumer_kills, f"{missing} messages of the surviving producer lost"
    victim = sorted(s for t, s in recs if t == 0)
    if killed_producer:
        # What the killed producer sent is a prefix 0..k-1, minus what died with a killed consumer.
        k = (victim[-1] + 1) if victim else 0
        gaps = k - len(victim)
        assert gaps <= consumer_kills - missing, f"{gaps} gaps in the killed producer's messages"
    else:
        assert len(victim) + missing >= n - consumer_kills
    _report.add("channel: messages checked (crc32)", len(recs))


def _rounds(seed, kill_producer, kill_consumer):
    rng = random.Random(seed)
    n = max(COUNT, 20000)
    kills = 0
    for _ in range(KILL_ROUNDS):
        recs, kp, kc = _run_round(rng, n, kill_producer, kill_consumer)
        _check(recs, n, killed_producer=kp, consumer_kills=int(kc))
        kills += kp + kc
        if kp:
            _report.add("channel: producers SIGKILLed mid-stream")
        if kc:
            _report.add("channel: consumers SIGKILLed mid-stream")
    # A kill that lands after the victim finished tests nothing: most must land.
    want = KILL_ROUNDS * (kill_producer + kill_consumer)
    assert kills >= want // 2, f"only {kills} of {want} kills landed mid-stream"


@pytest.mark.timeout(600)
def test_kill_producer_repeatedly():
    _rounds(1, kill_producer=True, kill_consumer=False)


@pytest.mark.timeout(600)
def test_kill_consumer_repeatedly():
    _rounds(2, kill_producer=False, kill_consumer=True)


@pytest.mark.timeout(600)
def test_kill_producer_and_consumer_repeatedly():
    _rounds(3, kill_producer=True, kill_consumer=True)


def test_killed_last_sender_disconnects_blocked_receiver():
    """A receiver blocked in recv learns that the only sender was SIGKILLed."""
    tx, rx = shm.bounded(4)
    child = FORK.Process(target=_sender_then_sleep, args=(tx.name,))
    child.start()
    assert rx.recv(timeout=30) == "hello"       # the child's Sender is attached
    tx.close()                  # now the child's Sender is the only one
    t0 = time.monotonic()
    assert _kill(child)
    with pytest.raises(shm.Disconnected):
        rx.recv(timeout=30)
    _report.set("channel: ms for a blocked receiver to notice its SIGKILLed last sender",
                int((time.monotonic() - t0) * 1000))
    s = rx.stats()
    assert s.senders == 0 and s.reaped >= 1
    rx.close()


def test_receiver_polling_with_short_timeouts_still_reaps_dead_senders():
    """Peer checks are spaced across calls: recv(timeout=0.05) in a loop reaps a SIGKILLed sender.

    (Each call used to start its own PEER_CHECK clock, so a loop of short
    waits never checked, and messages queued behind a slot the dead sender
    had claimed stayed stuck: found by shm.Pool's result collector.)
    """
    tx, rx = shm.bounded(4)
    child = FORK.Process(target=_sender_then_sleep, args=(tx.name,))
    child.start()
    assert rx.recv(timeout=30) == "hello"
    tx.close()
    assert _kill(child)
    deadline = time.monotonic() + 30
    with pytest.raises(shm.Disconnected):
        while time.monotonic() < deadline:
            try:
                rx.recv(timeout=0.05)
            except shm.Empty:
                pass
    assert rx.stats().reaped >= 1
    rx.close()


def _sender_then_sleep(name):
    tx = shm.Sender.open(name)
    tx.send("hello")
    time.sleep(600)


def test_killed_parked_receiver_is_reaped_and_sender_disconnected():
    tx, rx = shm.bounded(1)
    name = tx.name
    rx.close()
    r, w = os.pipe()
    p = FORK.Process(target=W.parked_receiver, args=(name, w))
    p.start()
    os.close(w)
    assert os.read(r, 1) == b"r"
    os.close(r)
    deadline = time.monotonic() + 30
    while tx.stats().waiting_receivers == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tx.stats().waiting_receivers == 1
    assert _kill(p)
    tx.send(1)                  # fills the one slot
    with pytest.raises(shm.Disconnected) as e:
        tx.send(2, timeout=30)  # blocked until the dead receiver is reaped
    assert e.value.message == 2
    s = tx.stats()
    assert (s.waiting_receivers, s.receivers) == (0, 0)
    tx.close()


def test_killed_consumer_holding_a_slot_does_not_wedge_producer():
    """A consumer killed while it holds a claimed slot: the producer still gets through."""
    tx, rx = shm.bounded(2, codec="bytes")
    big = b"x" * 2_000_000          # blob messages keep the consumer inside its claim longer
    rng = random.Random(4)
    for _ in range(KILL_ROUNDS):
        c = FORK.Process(target=W.collect_count, args=(rx, _null_sender()))
        c.start()
        for _ in range(5):
            tx.send(big, timeout=60)
        time.sleep(rng.uniform(0, 0.01))
        assert _kill(c)
        # Survivors go on: the parent drains what is left and sends again.
        for m in rx.drain():
            assert m == big
        tx.send(b"after", timeout=60)
        assert rx.recv(timeout=60) == b"after"
        _report.add("channel: consumers SIGKILLed holding large messages")
    tx.close(); rx.close()


class _NullSender:
    def send(self, _):
        pass


def _null_sender():
    return _NullSender()


def test_killed_blob_senders_leak_no_pool_entry():
    """Producers SIGKILLed mid-send of blob messages, again and again: every pool entry comes back."""
    tx, rx = shm.bounded(4, codec="bytes")
    rng = random.Random(5)
    got = 0
    for _ in range(max(4, KILL_ROUNDS)):
        p = FORK.Process(target=W.blob_sender, args=(tx,))
        p.start()
        for _ in range(rng.randrange(1, 5)):
            m = rx.recv(timeout=30)
            assert m == bytes([m[0]]) * 300_000
            got += 1
        time.sleep(rng.uniform(0, 0.004))
        _kill(p)
        while True:             # what it published arrives whole; its claim is recovered meanwhile
            try:
                m = rx.recv(timeout=2)
            except shm.Empty:
                break
            assert m == bytes([m[0]]) * 300_000
            got += 1
        a = tx.kernel().ctypes.data
        assert [R.blob_state_at(a, e) for e in range(4)] == [0, 0, 0, 0]
        assert tx.stats().blob_segments <= 4
    _report.add("channel: blob senders SIGKILLed, every blob pool entry given back", max(4, KILL_ROUNDS))
    assert got > 0
    tx.close(); rx.close()


def test_producer_killed_while_growing_a_blob():
    """Killed between marking its entry's blob gone and unlinking it: the next holder makes a new one,
    and a process that never mapped the old blob reads what it carries (regression: the entry still
    named the unlinked blob, so a process with it mapped wrote there and the message was lost)."""
    name = f"grow{os.getpid()}"
    tx, rx = shm.bounded(1, codec="bytes", name=name)
    p = FORK.Process(target=W.die_while_growing_a_blob, args=(tx,))
    p.start()
    assert rx.recv(timeout=30) == b"a" * 5000       # we map that blob now
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    with pytest.raises(shm.Empty):
        rx.recv(timeout=3)                          # its claim is recovered (a tombstone) meanwhile
    tx.send(b"q" * 5000, timeout=10)                # fits the old blob, which must not be used
    spawn = mp.get_context("spawn")
    q = spawn.Queue()
    c = spawn.Process(target=W.recv_by_name, args=(name, q))
    c.start()
    assert q.get(timeout=120) == b"q" * 5000
    c.join(30)
    assert c.exitcode == 0
    tx.close(); rx.close()
