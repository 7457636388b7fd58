"""Receiver.recv_view: large bytes and arrays read in place, their slot lent until released."""
from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import signal

import numpy as np
import pytest

import shm
from kernels import ring as R

FORK = mp.get_context("fork")


@contextlib.contextmanager
def channel(cap, codec):
    tx, rx = shm.bounded(cap, codec=codec)
    with tx, rx:
        yield tx, rx
BIG = bytes(range(256)) * 4096 * 2          # 2 MiB: a blob message


def test_small_and_large_bytes():
    with channel(4, "bytes") as (tx, rx):
        tx.send(b"small")
        v = rx.recv_view(timeout=5)
        assert not v.lent and bytes(v) == b"small" and v.value.dtype == np.uint8
        tx.send(BIG)
        v = rx.recv_view(timeout=5)
        assert v.lent and len(v) == len(BIG) and bytes(v) == BIG
        assert isinstance(v.value, np.ndarray) and not v.value.flags.writeable
        with pytest.raises(ValueError):
            v.value[0] = 1
        assert np.asarray(v) is v.value or np.shares_memory(np.asarray(v), v.value)
        v.release()
        v.release()                             # idempotent
        assert not v.lent


def test_arrays_keep_dtype_and_shape_and_other_objects_are_decoded():
    with channel(4, "numpy") as (tx, rx):
        a = np.arange(600_000, dtype=np.float64).reshape(600, 1000)
        tx.send(a)
        with rx.recv_view(timeout=5) as v:
            assert v.lent and v.value.dtype == a.dtype and v.value.shape == a.shape
            assert np.array_equal(v.value, a)
        rec = np.zeros(50_000, dtype=[("x", "<i4"), ("y", "<f8")])
        rec["x"] = np.arange(50_000)
        tx.send(rec)
        with rx.recv_view(timeout=5) as v:
            assert v.value.dtype == rec.dtype and np.array_equal(v.value, rec)
        tx.send({"not": "an array"})
        v = rx.recv_view(timeout=5)
        assert not v.lent and v.value == {"not": "an array"}


def test_a_lent_slot_is_held_until_the_view_and_its_arrays_are_gone():
    with channel(2, "bytes") as (tx, rx):
        tx.send(BIG)
        v = rx.recv_view(timeout=5)
        part = v.value[10:20]                   # a view of the view keeps the loan too
        tx.send(BIG)                            # the other slot
        with pytest.raises(shm.Full):
            tx.send(BIG, timeout=0.2)           # the lent slot is not reused
        del v
        gc.collect()
        with pytest.raises(shm.Full):
            tx.send(BIG, timeout=0.2)
        assert bytes(part) == BIG[10:20]
        del part
        tx.send(BIG, timeout=5)                 # released by the garbage collector
        assert rx.recv(timeout=5) == BIG
        assert rx.recv(timeout=5) == BIG


def test_timeout_and_errors_are_recvs():
    with channel(2, "bytes") as (tx, rx):
        with pytest.raises(shm.Empty):
            rx.recv_view(timeout=0.05)
        with pytest.raises(ValueError):
            rx.recv_view(timeout=-1)
        tx.close()
        with pytest.raises(shm.Disconnected):
            rx.recv_view(timeout=5)


def test_views_outliving_their_channel():
    tx, rx = shm.bounded(2, codec="bytes")
    tx.send(BIG)
    v = rx.recv_view(timeout=5)
    a = v.value
    tx.close()
    rx.close()
    assert bytes(a[:256]) == BIG[:256]        # still mapped: no crash, no leak once collected
    v.release()
    del v, a


def test_unbounded_generations_with_lent_views():
    tx, rx = shm.unbounded(codec="bytes")
    views = []
    for i in range(600):                        # through several ring generations
        tx.send(bytes([i % 256]) * 70_000)
        if i % 3 == 0:
            views.append(rx.recv_view(timeout=5))
        else:
            assert rx.recv(timeout=5)[:1] == bytes([i % 256])
        if len(views) > 20:
            views.pop(0).release()
    for v in views:
        assert len(v) == 70_000
    del views
    gc.collect()
    tx.close()
    rx.close()


def _hold_view_then_hang(rx, fd):
    v = rx.recv_view(timeout=10)
    os.write(fd, b"%d" % len(v))
    signal.pause()


def test_a_killed_holder_never_wedges_the_others():
    tx, rx = shm.bounded(2, codec="bytes")
    r, w = os.pipe()
    p = FORK.Process(target=_hold_view_then_hang, args=(rx, w))
    p.start()
    os.close(w)
    tx.send(BIG)
    assert int(os.read(r, 32)) == len(BIG)     # the child holds the slot, lent
    os.close(r)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    for i in range(6):                          # the slot comes back: more than capacity gets through
        tx.send(BIG[:-1] + bytes([i]), timeout=30)
        with rx.recv_view(timeout=30) as v:
            assert v.value[-1] == i
    # And so does the blob pool entry the dead holder had: none is held, two blobs at most.
    a = tx.kernel().ctypes.data
    assert [R.blob_state_at(a, e) for e in range(2)] == [0, 0]
    assert tx.stats().blob_segments <= 2
    tx.close()
    rx.close()


def _sum_views(rx, out):
    total = 0.0
    for _ in range(8):
        with rx.recv_view(timeout=30) as v:
            total += float(v.value.sum())
    out.send(total)


def test_another_process_reads_arrays_in_place():
    tx, rx = shm.bounded(4, codec="numpy")
    a_out, b_out = FORK.Pipe()
    p = FORK.Process(target=_sum_views, args=(rx, b_out))
    p.start()
    want = 0.0
    for i in range(8):
        a = np.full(1 << 18, float(i))
        want += float(a.sum())
        tx.send(a, timeout=30)
    assert a_out.recv() == want
    p.join(10)
    assert p.exitcode == 0
    tx.close()
    rx.close()


def test_large_bytes_copied_out_on_two_threads_are_exact():
    """recv of a message of _bigcopy.BIG bytes or more: a new bytes filled by two threads."""
    from shm import _bigcopy
    data = np.random.default_rng(7).integers(0, 256, _bigcopy.BIG + 12345, dtype=np.uint8).tobytes()
    with channel(2, "bytes") as (tx, rx):
        tx.send(data)
        got = rx.recv(timeout=30)
        assert type(got) is bytes and got == data
        tx.send(data[:-1])
        assert rx.recv(timeout=30) == data[:-1]


def test_closing_the_receiver_gives_lent_slots_back():
    """A view outstanding when this process's last Receiver closes (its Sender still open)
    must not leave its slot READING under an index nobody will recover."""
    tx, rx = shm.bounded(2, codec="bytes")
    tx.send(BIG)
    v = rx.recv_view(timeout=5)
    rx.close()
    v.release()
    rx2 = shm.Receiver.open(tx.name)
    for i in range(5):                          # more than capacity: every slot comes round again
        tx.send(BIG[:-1] + bytes([i]), timeout=10)
        assert rx2.recv(timeout=10)[-1] == i
    tx.close()
    rx2.close()


def _drop_inherited_view(holder):
    holder.clear()
    gc.collect()
    os._exit(0)


def test_a_forked_child_dropping_an_inherited_view_does_not_release_it():
    with channel(2, "bytes") as (tx, rx):
        tx.send(BIG)
        holder = [rx.recv_view(timeout=5)]
        tx.send(BIG)
        p = FORK.Process(target=_drop_inherited_view, args=(holder,))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        with pytest.raises(shm.Full):
            tx.send(BIG, timeout=0.2)           # still lent: the parent's view
        holder[0].release()
        tx.send(BIG, timeout=10)
        assert rx.recv(timeout=10) == BIG
        assert rx.recv(timeout=10) == BIG
