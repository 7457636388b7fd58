"""Regression tests for interleavings and kill points found in review.

Each test stages one precise interleaving: a process SIGKILLed at an exact
point, or a thread paused at a GIL switch point. The pause or kill is put
in place by wrapping an internal function of shm in the test. The memory,
the processes and the signals are real.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import shm
from shm import _chan, _liveness
from kernels import layout as L
from kernels import ring as R
from kernels import words as W

FORK = mp.get_context("fork")


# --------------------------------------------------------------------------
# Unbounded channels: generations.

def _die_while_making_generation(tx):
    def die(*_):
        os.kill(os.getpid(), signal.SIGKILL)
    _chan._INIT_RING = die          # inside the init of the next generation's segment
    for i in range(300):
        tx.send(b"m%d" % i)


def test_killed_while_creating_a_generation():
    """A producer killed while making generation 1 leaves a half-made segment; others go on."""
    tx, rx = shm.unbounded(codec="bytes")
    p = FORK.Process(target=_die_while_making_generation, args=(tx,))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    got = []
    while True:
        try:
            got.append(rx.recv(timeout=1))
        except shm.Empty:
            break
    assert got == [b"m%d" % i for i in range(len(got))] and len(got) >= 256
    for i in range(600):                # past the broken generation, and a new one after it
        tx.send(b"n%d" % i)
    assert [rx.recv(timeout=10) for _ in range(600)] == [b"n%d" % i for i in range(600)]
    tx.close(); rx.close()


def _die_before_publishing_tail(tx, kill_gen, total):
    orig = _chan._Chan._make_ring

    def make_ring(self, gen):
        r = orig(self, gen)
        if gen == kill_gen and sys._getframe(1).f_code.co_name == "on_sealed_tx":
            os.kill(os.getpid(), signal.SIGKILL)     # after making gen, before tail_gen moves to it
        return r
    _chan._Chan._make_ring = make_ring
    for i in range(total):
        tx.send(b"m%d" % i)


def _newcomer_sends(name, n, out):
    with shm.Sender.open(name) as s:
        for i in range(n):
            s.send(b"new%d" % i)
    out.send("done")


@pytest.mark.parametrize("kill_gen", [2, 3])
def test_tail_gen_left_behind_a_retired_generation(kill_gen):
    """The tail generation pointer is caught up; a newcomer's sends are never lost."""
    total = sum(256 << g for g in range(kill_gen)) + 1
    tx, rx = shm.unbounded(codec="bytes")
    p = FORK.Process(target=_die_before_publishing_tail, args=(tx, kill_gen, total))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    tx.close()
    drained = 0
    while True:
        try:
            rx.recv(timeout=1)
            drained += 1
        except shm.ShmError:
            break
    assert drained >= total - 1
    out_tx, out_rx = shm.bounded(1)
    q = mp.get_context("spawn").Process(target=_newcomer_sends, args=(rx.name, 10, out_tx))
    q.start()
    out_tx.close()
    assert out_rx.recv(timeout=120) == "done"
    q.join(60)
    assert [rx.recv(timeout=10) for _ in range(10)] == [b"new%d" % i for i in range(10)]
    rx.close(); out_rx.close()


def test_receive_areas_do_not_alias_across_generations():
    """Two threads receiving across a generation boundary never read each other's area."""
    tx, rx = shm.unbounded(codec="bytes")
    c = rx._c
    for i in range(300):
        tx.send(b"msg-%03d" % i)
    popped, go, out = threading.Event(), threading.Event(), {}

    def a():
        r = _chan._POP(c.rx_addr)           # what the fast path does, then a GIL switch
        popped.set()
        go.wait()
        off = ((r >> R.AREA_SHIFT) & R.AREA_MASK) * c.area
        out["A"] = c.scratch[off:off + (r >> R.LEN_SHIFT)]

    t = threading.Thread(target=a)
    t.start()
    popped.wait()
    got = [rx.recv() for _ in range(257)]     # crosses into generation 1
    go.set()
    t.join()
    assert out["A"] == b"msg-000"
    assert got == [b"msg-%03d" % i for i in range(1, 258)]
    tx.close(); rx.close()


def test_blob_is_read_from_the_ring_it_was_popped_from():
    tx, rx = shm.unbounded(codec="bytes", slot_size=32)
    msg = {1: b"A" * 100, 513: b"B" * 100}
    for i in range(520):
        tx.send(msg.get(i, b"%d" % i))
    popped, go = threading.Event(), threading.Event()
    orig = _chan._Chan._decode_blob_area

    def paused(self, st, r, *more):
        if threading.current_thread().name == "A":
            popped.set()
            go.wait()
        return orig(self, st, r, *more)

    res = {}
    _chan._Chan._decode_blob_area = paused
    try:
        others = [rx.recv()]

        def a():
            res["A"] = rx.recv(timeout=5)
        t = threading.Thread(target=a, name="A")
        t.start()
        popped.wait()
        others += [rx.recv(timeout=5) for _ in range(256)]     # into generation 1
        go.set()
        t.join()
    finally:
        _chan._Chan._decode_blob_area = orig
    while True:
        try:
            others.append(rx.recv(timeout=0.5))
        except shm.Empty:
            break
    assert res["A"] == msg[1]
    assert others.count(msg[513]) == 1 and msg[1] not in others
    assert len(others) + 1 == 520
    tx.close(); rx.close()


# --------------------------------------------------------------------------
# Registration, close and threads.

def _claim_and_die(tx):
    c = tx._c
    c.confirm(L.ROLE_TX)
    _chan._CLAIM(c.txr.tx_addr)             # slot WRITING(pos, our index)
    os.kill(os.getpid(), signal.SIGKILL)    # killed between claim and publish


def _open_receiver_and_wait(name, ev):
    rx = shm.Receiver.open(name)
    ev.wait(60)
    rx.close()


def test_full_table_registration_recovers_the_dead():
    """A newcomer reaping a dead producer to get an entry recovers its slot first."""
    tx, rx = shm.bounded(8, codec="bytes")
    c = rx._c
    reg = c.registry
    tx.send(b"m0")
    p = FORK.Process(target=_claim_and_die, args=(tx,))
    p.start()
    p.join(30)
    tx.send(b"m2")
    tx.send(b"m3")
    me = _liveness.me()
    faked = []
    try:
        for i in range(L.MAX_PARTICIPANTS):         # stand-ins for 255 live participants
            s = reg.state(i)
            if s & 0xFF == L.PS_FREE:
                base = (reg.table + i * L.PT_SIZE) >> 3
                c.ctrl.w[base + 1], c.ctrl.w[base + 2], c.ctrl.w[base + 3] = me.pid, me.start, me.pidns
                W.store(c.ctrl.w, reg._sw(i), ((s >> 40) + 1) << 40 | me.pid << 8 | L.PS_ALIVE)
                faked.append(i)
        ctx = mp.get_context("spawn")
        ev = ctx.Event()
        q = ctx.Process(target=_open_receiver_and_wait, args=(tx.name, ev))
        q.start()
        got = [rx.recv(timeout=30) for _ in range(3)]
        assert got == [b"m0", b"m2", b"m3"]
        assert c.counter(L.CH_TOMBSTONES) == 1
        ev.set()
        q.join(60)
    finally:
        for i in faked:
            s = reg.state(i)
            W.store(c.ctrl.w, reg._sw(i), (s >> 40) << 40 | L.PS_FREE)
    tx.close(); rx.close()


def _close_while_thread_holds_slot(tx):
    paused, go = threading.Event(), threading.Event()
    real = _chan._Chan._blob_for_write

    def bfw(self, *args):
        paused.set()
        go.wait()
        return real(self, *args)
    _chan._Chan._blob_for_write = bfw
    res = []

    def a():
        try:
            tx.send(b"x" * 5000)
            res.append("sent")
        except shm.Closed:
            res.append("closed")
    t = threading.Thread(target=a, daemon=True)
    t.start()
    paused.wait()
    _chan.close_all()                   # what interpreter exit runs (every handle of ours)
    go.set()
    t.join()
    os._exit(0 if res == ["closed"] else 3)     # the send must report Closed


def test_close_while_another_thread_holds_a_claimed_slot():
    """The closing process recovers its own claimed slot: nobody waits behind it."""
    tx, rx = shm.bounded(8, codec="bytes", slot_size=32)
    tx.send(b"m0")
    p = FORK.Process(target=_close_while_thread_holds_slot, args=(tx,))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    tx.send(b"m2")
    tx.send(b"m3")
    assert [rx.recv(timeout=10) for _ in range(3)] == [b"m0", b"m2", b"m3"]
    tx.close(); rx.close()


CLOSE_DURING_COPY = r'''
import threading, shm
from shm import _chan
tx, rx = shm.bounded(4, codec="bytes", slot_size=32)
paused, go = threading.Event(), threading.Event()
real = _chan._COPY
def copy(dst, src, n):
    paused.set(); go.wait()
    return real(dst, src, n)
_chan._COPY = copy
def a():
    try:
        tx.send(b"x" * 100_000)
        print("sent", flush=True)
    except shm.Closed:
        print("closed", flush=True)
t = threading.Thread(target=a); t.start(); paused.wait()
threading.Timer(0.2, go.set).start()       # close_all waits for the copy in flight
_chan.close_all()
go.set(); t.join()
print("survived", flush=True)
'''


def test_close_during_a_blob_copy_does_not_crash():
    r = subprocess.run([sys.executable, "-c", CLOSE_DURING_COPY], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    assert "survived" in r.stdout
