"""The ring kernels as CPython builtins (kernels/pycall.py, shm/_builtin.py).

They take and return Python objects themselves, so what is checked here is
what a C extension gets wrong: reference counts, wrong argument types, and
an error never left pending.
"""
import gc
import sys

import numpy as np
import pytest

import shm
from kernels import pycall as P
from kernels import ring as R
from shm._builtin import bind


@pytest.fixture
def chan():
    tx, rx = shm.bounded(4, codec="bytes")
    yield tx, rx, tx._c, rx._c
    tx.close()
    rx.close()


def test_push_then_pop_round_trip(chan):
    tx, rx, ct, cr = chan
    assert ct.push_b(b"hello") == R.OK
    assert ct.push_b_spin(b"") == R.OK
    assert len(rx) == 2
    assert cr.pop_b(cr.kind) == b"hello"
    got = cr.pop_b_spin(cr.kind)
    assert got == b"" and type(got) is bytes
    assert cr.pop_b(cr.kind) == R.EMPTY
    assert cr.pop_b_spin(cr.kind) == R.EMPTY      # after spinning


def test_reference_counts_balance(chan):
    tx, rx, ct, cr = chan
    data = b"q" * 50
    before = sys.getrefcount(data)
    for _ in range(2000):
        assert ct.push_b(data) == R.OK
        out = cr.pop_b(cr.kind)
        assert out == data and out is not data
        assert sys.getrefcount(out) == 2          # ours and getrefcount's argument
    assert sys.getrefcount(data) == before
    status = [ct.push_b(data) for _ in range(5)]
    assert status == [R.OK] * 4 + [R.FULL]        # capacity 4
    assert sys.getrefcount(data) == before


def test_push_of_anything_but_bytes_pushes_nothing(chan):
    tx, rx, ct, cr = chan

    class B(bytes):
        pass

    for bad in (bytearray(b"ab"), memoryview(b"ab"), "ab", 7, None):
        assert ct.push_b(bad) == P.NOT_BYTES
        assert ct.push_b_spin(bad) == P.NOT_BYTES
    assert len(rx) == 0
    assert ct.push_b(B(b"sub")) == R.OK           # a bytes subclass is bytes
    assert rx.recv(timeout=5) == b"sub"
    tx.send(b"after")                             # nothing left pending: the channel works
    assert rx.recv(timeout=5) == b"after"


def test_too_big_full_and_other_kinds_are_left_to_the_caller(chan):
    tx, rx, ct, cr = chan
    big = b"x" * (ct.inline + 1)
    r = ct.push_b(big)
    assert r == R.CLAIMED - 0               # no blob mapped here yet: position 0 claimed, left to us
    ct.finish_claimed(big, r)               # the general path finishes it, and maps the blob
    assert rx.recv() == big                 # its pool entry is free again, and the hint
    assert ct.push_b(big + b"!") == R.OK    # now the builtin does the whole send
    assert rx.recv() == big + b"!"
    assert ct.push_b(b"x" * ct.inline) == R.OK
    r = cr.pop_b(cr.kind + 1)                     # a message of another kind: pop_at's int
    assert isinstance(r, int) and r >= 0 and r >> R.LEN_SHIFT == ct.inline and r & 0xFF == cr.kind
    for _ in range(4):
        ct.push_b(b"y")
    assert ct.push_b(b"z") == R.FULL
    assert ct.push_b_spin(b"z") == R.FULL


def test_wrong_descriptor_or_kind_raises_type_error(chan):
    tx, rx, ct, cr = chan
    with pytest.raises(TypeError):
        cr.pop_b("not a kind")
    for bad in (12345, None, np.zeros(R.D_LEN, np.int32), np.zeros(R.D_LEN - 1, np.int64),
                np.zeros(2 * R.D_LEN, np.int64)[::2]):
        with pytest.raises(TypeError, match="descriptor"):
            bind(P.push_bytes, bad)
    tx.send(b"still fine")
    assert rx.recv(timeout=5) == b"still fine"


def test_closed_descriptor_answers_closed():
    """A function outliving its channel keeps the descriptor alive, and the descriptor says CLOSED."""
    tx, rx = shm.bounded(4, codec="bytes")
    push, pop, kind = tx._c.push_b, rx._c.pop_b, rx._c.kind
    tx.close()
    rx.close()
    del tx, rx
    gc.collect()
    assert push(b"x") == R.CLOSED
    assert pop(kind) == R.CLOSED


def test_blob_push_is_left_to_the_caller_where_there_is_no_map():
    """Unbounded: a send finishing a claim must find the ring the builtin used; generations move."""
    tx, rx = shm.unbounded(codec="bytes")
    big = b"u" * 5000
    assert tx._c.push_b(big) == R.TOO_BIG
    tx.send(big)
    assert tx._c.push_b(big) == R.TOO_BIG       # even with the blob mapped: nothing claimed
    assert rx.recv() == big and len(rx) == 0
    tx.close(); rx.close()


def test_blob_push_full_claims_nothing():
    tx, rx = shm.bounded(2, codec="bytes")
    big = b"f" * 5000
    tx.send(big); tx.send(big)
    assert tx._c.push_b(big) == R.FULL
    assert [rx.recv(), rx.recv()] == [big, big]
    with pytest.raises(shm.Empty):
        rx.try_recv()
    tx.close(); rx.close()


def test_pop_builtin_reads_blob_messages_mapped_here():
    """Blob messages under 8 MiB come back from the builtin as bytes, larger ones are left to Python;
    every slot and pool entry is given back either way."""
    tx, rx = shm.bounded(4, codec="bytes")
    d = rx._c.rings[0].drx
    for i in range(200):
        m = bytes([i % 256]) * (1000 + i * 37)
        tx.send(m)
        assert rx.recv() == m
    assert d[R.D_BLOB_READS] == 200             # every one read by the builtin
    assert d[R.D_PINS] == 0
    a = rx._c.rings[0].dtx.ctypes.data
    assert [R.blob_state_at(a, e) for e in range(4)] == [0, 0, 0, 0]
    tx.send(b"b" * (1 << 20))                   # 1 MiB: read by the builtin too
    assert rx.recv() == b"b" * (1 << 20)
    assert d[R.D_BLOB_READS] == 201
    tx.send(b"c" * (8 << 20))                   # 8 MiB and more: left to Python (two threads)
    assert rx.recv() == b"c" * (8 << 20)
    assert d[R.D_BLOB_READS] == 201 and d[R.D_PINS] == 0
    assert [R.blob_state_at(a, e) for e in range(4)] == [0, 0, 0, 0]
    tx.close(); rx.close()
