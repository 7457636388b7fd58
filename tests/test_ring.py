"""The ring kernel itself: user @njit loops, a nogil hammer, recovery, and a model."""
from __future__ import annotations

import collections
import multiprocessing as mp
import threading

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import shm
from conftest import COUNT
from kernels import atomics as A
from kernels import layout as L
from kernels import ring as R
from kernels.memory import i64_at

FORK = mp.get_context("fork")


# --------------------------------------------------------------------------
# A user's own @njit loops (the example in examples/njit_pipeline.py).

@numba.njit
def njit_produce(d, n):
    payload = np.empty(64, np.uint8)
    i = 0
    while i < n:
        for k in range(8):
            payload[k] = (i >> (8 * k)) & 0xFF
        r = R.try_push(d, payload, 64)
        if r == R.OK:
            i += 1
        elif r == R.FULL:
            A.pause()
        else:
            return r
    return 0


@numba.njit
def njit_consume(d, n, out):
    buf = np.empty(256, np.uint8)
    got = 0
    total = 0
    while got < n:
        r = R.try_pop(d, buf)
        if r >= 0:
            v = 0
            for k in range(8):
                v |= np.int64(buf[k]) << (8 * k)
            if (r >> 8) != 64 or v != got:
                out[1] += 1           # wrong length or out of order
            total += v
            got += 1
        elif r == R.EMPTY:
            A.pause()
        else:
            return r
    out[0] = total
    return 0


def _njit_producer(tx, n):
    d = tx.kernel()
    assert njit_produce(d, n) == 0
    tx.close()


def test_njit_loops_across_processes():
    n = COUNT * 10
    tx, rx = shm.bounded(1024, codec="bytes")
    p = FORK.Process(target=_njit_producer, args=(tx, n))
    p.start()
    tx.close()                  # the child's Sender is the only one left
    out = np.zeros(2, np.int64)
    assert njit_consume(rx.kernel(), n, out) == 0
    p.join(60)
    assert p.exitcode == 0
    assert out[0] == n * (n - 1) // 2 and out[1] == 0
    with pytest.raises(shm.Disconnected):
        rx.recv(timeout=30)
    rx.close()


def test_kernel_descriptor_only_for_bounded():
    tx, rx = shm.unbounded()
    with pytest.raises(TypeError):
        tx.kernel()
    tx.close(); rx.close()


# --------------------------------------------------------------------------
# Many threads on one ring, without the GIL: the lock-free protocol under real parallelism.

@numba.njit(nogil=True)
def hammer_produce(d, base, n):
    payload = np.empty(8, np.uint8)
    i = 0
    while i < n:
        v = base + i
        for k in range(8):
            payload[k] = (v >> (8 * k)) & 0xFF
        r = R.try_push(d, payload, 8)
        if r == R.OK:
            i += 1
        else:
            A.pause()
    return 0


@numba.njit(nogil=True)
def hammer_consume(d, total, popped, out, out_n):
    buf = np.empty(256, np.uint8)
    while A.load(popped, 0, "acquire") < total:
        r = R.try_pop(d, buf)
        if r >= 0:
            v = 0
            for k in range(8):
                v |= np.int64(buf[k]) << (8 * k)
            out[out_n[0]] = v
            out_n[0] += 1
            A.fetch_add(popped, 0, 1, "seq_cst")
        else:
            A.pause()
    return 0


@pytest.mark.parametrize("cap", [1, 2, 7, 64])
def test_nogil_threads_hammer_one_ring(cap):
    producers, consumers, n = 3, 3, max(COUNT, 5000)
    tx, rx = shm.bounded(cap, codec="bytes")
    dtx, drx = tx.kernel(), rx.kernel()
    total = producers * n
    popped = np.zeros(1, np.int64)
    outs = [np.zeros(total, np.int64) for _ in range(consumers)]
    out_ns = [np.zeros(1, np.int64) for _ in range(consumers)]
    # Each consumer thread gets its own copy of the descriptor (as each thread of a process should).
    ts = [threading.Thread(target=hammer_produce, args=(dtx, k * n, n)) for k in range(producers)]
    ts += [threading.Thread(target=hammer_consume, args=(drx.copy(), total, popped, outs[c], out_ns[c]))
           for c in range(consumers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    got = np.concatenate([outs[c][:out_ns[c][0]] for c in range(consumers)])
    assert collections.Counter(got.tolist()) == collections.Counter(range(total))
    for c in range(consumers):           # per producer, each consumer sees increasing values
        vals = outs[c][:out_ns[c][0]]
        for k in range(producers):
            mine = vals[(vals >= k * n) & (vals < (k + 1) * n)]
            assert np.all(np.diff(mine) > 0)
    tx.close(); rx.close()


# --------------------------------------------------------------------------
# Recovery of slots held by a dead participant (crafted, one process).

DEAD = 200      # a participant index nobody uses


def _stamp_at(d, pos):
    w = i64_at(int(d[R.D_BASE]), int(d[R.D_SIZE]) >> 3)
    off = int(d[R.D_RING]) + L.RING_HEADER + (pos % int(d[R.D_CAP])) * int(d[R.D_SLOT])
    return w, off >> 3


def test_set_blob_info_writes():
    """Regression: a plain store into a raw-address view was removed as dead code."""
    tx, rx = shm.bounded(4)
    d = tx.kernel()
    a = d.ctypes.data
    assert R.set_blob_info_at(a, 1, 77) == R.OK
    assert R.blob_info_at(a, 1) == 77
    R.set_blob_info_at(a, 1, 0)
    assert R.blob_info_at(a, 4) == R.CORRUPT and R.set_blob_info_at(a, -1, 5) == R.CORRUPT
    tx.close(); rx.close()


def test_recover_producer_dead_before_advancing_tail():
    tx, rx = shm.bounded(4, codec="bytes")
    d = tx.kernel()
    tx.send(b"first")
    w, sw = _stamp_at(d, 1)
    # A producer claimed position 1 and died before advancing tail or writing anything.
    assert A.cas(w, sw, R.stamp(1, 0, R.FREE), R.stamp(1, DEAD, R.WRITING), "seq_cst") == R.stamp(1, 0, R.FREE)
    assert R.blocker_at(d.ctypes.data, R.SIDE_RX) == -1         # tail is not past it yet
    assert R.owned_by_at(d.ctypes.data, DEAD) == 1
    # Another producer helps: tail moves past the dead claim and the next message lands at 2.
    tx.send(b"second")
    assert rx.recv() == b"first"
    with pytest.raises(shm.Empty):
        rx.try_recv()                                            # stuck behind the dead claim
    assert R.blocker_at(rx.kernel().ctypes.data, R.SIDE_RX) == DEAD
    r = R.recover_at(d.ctypes.data, DEAD)
    assert (r & 0xFFFFFFFF, r >> 32) == (1, 0)                   # one tombstone
    assert rx.recv(timeout=5) == b"second"
    assert R.owned_by_at(d.ctypes.data, DEAD) == 0
    tx.close(); rx.close()


def test_recover_consumer_dead_holding_a_slot():
    tx, rx = shm.bounded(2, codec="bytes")
    big = b"y" * 100_000                 # a blob message: pop returns BLOB and keeps the slot
    tx.send(big)
    tx.send(b"small")
    victim = rx.kernel().copy()
    victim[R.D_ME] = DEAD
    assert R.try_pop(victim, np.empty(256, np.uint8)) == R.BLOB
    assert int(victim[R.D_POS]) == 0
    with pytest.raises(shm.Full):
        tx.try_send(b"x")               # the ring holds "small" plus the dead consumer's slot
    d = tx.kernel()
    r = R.recover_at(d.ctypes.data, DEAD)
    assert (r & 0xFFFFFFFF, r >> 32) == (0, 1)                   # the big message is lost with its taker
    tx.send(b"x", timeout=5)
    assert rx.recv() == b"small" and rx.recv() == b"x"
    tx.close(); rx.close()


def test_recover_dead_producer_mid_blob():
    tx, rx = shm.bounded(2, codec="bytes")
    d = tx.kernel().copy()
    d[R.D_ME] = DEAD
    pos = R.claim_push_at(d.ctypes.data)
    assert pos == 0                     # claimed by DEAD, never published
    tx.send(b"after")
    r = R.recover_at(tx.kernel().ctypes.data, DEAD)
    assert r & 0xFFFFFFFF == 1
    assert rx.recv(timeout=5) == b"after"
    tx.close(); rx.close()


def _entry_states(d):
    return [R.blob_state_at(d.ctypes.data, e) for e in range(int(d[R.D_CAP]))]


def test_recover_frees_the_pool_entries_of_the_dead():
    """A dead producer's entry (taken, blob half written) and a dead consumer's (message being read)."""
    tx, rx = shm.bounded(4, codec="bytes")
    d = tx.kernel()
    tx.send(b"y" * 100_000)                 # a blob message at position 0, its entry held for it
    held = _entry_states(d)
    assert sorted(held) == [0, 0, 0, 1]     # held for position 0 (state = position + 1)
    victim = rx.kernel().copy()
    victim[R.D_ME] = DEAD
    assert R.try_pop(victim, np.empty(256, np.uint8)) == R.BLOB    # a consumer takes it, then dies
    dp = tx.kernel().copy()
    dp[R.D_ME] = DEAD
    pos = R.claim_push_at(dp.ctypes.data)   # a producer claims position 1 ...
    assert pos == 1
    e = R.blob_take_at(dp.ctypes.data, pos, 12)      # ... takes an entry, and dies before publishing
    assert e >= 0 and _entry_states(d)[e] == 2
    r = R.recover_at(d.ctypes.data, DEAD)
    assert (r & 0xFFFFFFFF, r >> 32) == (1, 1)
    assert _entry_states(d) == [0, 0, 0, 0]
    tx.send(b"z" * 100_000)
    assert rx.recv(timeout=5) == b"z" * 100_000
    assert _entry_states(d) == [0, 0, 0, 0]
    tx.close(); rx.close()


def test_recover_leaves_an_entry_the_dead_producer_only_tried_for():
    """The slot names the entry a dead taker tried; someone else holds it: recovery must not free it."""
    tx, rx = shm.bounded(4, codec="bytes")
    d = tx.kernel()
    a = d.ctypes.data
    other = R.blob_take_at(a, 7, 12)        # held for position 7 by a live producer
    dp = tx.kernel().copy()
    dp[R.D_ME] = DEAD
    pos = R.claim_push_at(dp.ctypes.data)
    w, sw = _stamp_at(d, pos)
    A.store(w, sw + (L.SL_BLOB >> 3), other, "seq_cst")     # the taker stored it, then lost the CAS and died
    R.recover_at(a, DEAD)
    assert _entry_states(d)[other] == 8
    assert R.blob_give_at(a, 7, other) == R.OK and _entry_states(d) == [0, 0, 0, 0]
    tx.close(); rx.close()


def test_blob_take_prefers_the_last_freed_then_a_large_enough_blob():
    tx, rx = shm.bounded(4, codec="bytes")
    a = tx.kernel().ctypes.data
    for e, lg in ((0, 12), (1, 20), (2, 0), (3, 16)):
        R.set_blob_info_at(a, e, 1 << 8 | lg)
    assert R.blob_take_at(a, 0, 16) == 1            # from entry 0 on, the first free one big enough
    assert R.blob_give_at(a, 0, 1) == R.OK          # entry 1 is the hint now
    assert R.blob_give_at(a, 0, 1) == R.CORRUPT     # not held any more
    assert R.blob_take_at(a, 2, 12) == 1            # the hint first, though entry 2 is the slot's own
    assert R.blob_take_at(a, 2, 14) == 3            # hint taken: from entry 2 on, big enough: 3
    assert R.blob_take_at(a, 3, 30) == 0            # nothing that large: the first free one from 3 on
    assert R.blob_take_at(a, 4, 12) == 2
    assert R.blob_take_at(a, 5, 12) == R.BUSY       # every entry held
    assert R.blob_give_at(a, 2, 3) == R.OK and R.blob_take_at(a, 5, 12) == 3
    for pos, e in ((2, 1), (3, 0), (4, 2), (5, 3)):
        assert R.blob_give_at(a, pos, e) == R.OK
    assert _entry_states(tx.kernel()) == [0, 0, 0, 0]
    for e in range(4):
        R.set_blob_info_at(a, e, 0)
    tx.close(); rx.close()


# --------------------------------------------------------------------------
# The channel against collections.deque.

SIZES = st.one_of(st.integers(0, 300), st.sampled_from([223, 224, 225, 5000, 70_000]))


class ChannelModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cap = None
        self.model = collections.deque()

    @precondition(lambda self: self.cap is None)
    @rule(cap=st.one_of(st.none(), st.integers(1, 6)), slot=st.sampled_from([None, 64, 1000]))
    def make(self, cap, slot):
        if cap is None:
            self.tx, self.rx = shm.unbounded(codec="bytes", slot_size=slot)
            self.cap = float("inf")
        else:
            self.tx, self.rx = shm.bounded(cap, codec="bytes", slot_size=slot)
            self.cap = cap
        self.n = 0

    def _msg(self, size):
        self.n += 1
        return self.n.to_bytes(4, "little") * (size // 4) + b"!" * (size % 4)

    @precondition(lambda self: self.cap is not None)
    @rule(size=SIZES)
    def try_send(self, size):
        m = self._msg(size)
        if len(self.model) < self.cap:
            self.tx.try_send(m)
            self.model.append(m)
        else:
            with pytest.raises(shm.Full):
                self.tx.try_send(m)

    @precondition(lambda self: self.cap is not None)
    @rule(sizes=st.lists(SIZES, max_size=12))
    def send_many(self, sizes):
        msgs = [self._msg(s) for s in sizes]
        room = self.cap - len(self.model)
        if len(msgs) <= room:
            self.tx.send_many(msgs, timeout=0)
            self.model.extend(msgs)
        else:
            with pytest.raises(shm.Full) as e:
                self.tx.send_many(msgs, timeout=0)
            sent = len(msgs) - len(e.value.message)
            assert e.value.message == msgs[sent:]
            self.model.extend(msgs[:sent])

    @precondition(lambda self: self.cap is not None)
    @rule()
    def try_recv(self):
        if self.model:
            assert self.rx.try_recv() == self.model.popleft()
        else:
            with pytest.raises(shm.Empty):
                self.rx.try_recv()

    @precondition(lambda self: self.cap is not None)
    @rule(k=st.integers(1, 10))
    def recv_many(self, k):
        if self.model:
            got = self.rx.recv_many(k, timeout=0)
            assert 1 <= len(got) <= k
            assert got == [self.model.popleft() for _ in got]
        else:
            with pytest.raises(shm.Empty):
                self.rx.recv_many(k, timeout=0)

    @precondition(lambda self: self.cap is not None)
    @rule()
    def drain(self):
        assert self.rx.drain() == list(self.model)
        self.model.clear()

    @invariant()
    def lengths_agree(self):
        if self.cap is not None:
            assert len(self.rx) == len(self.model)
            s = self.rx.stats()
            assert s.sent - s.received == len(self.model)

    def teardown(self):
        if self.cap is not None:
            self.tx.close()
            self.rx.close()


TestChannelModel = ChannelModel.TestCase
TestChannelModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
