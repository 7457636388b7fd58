"""Channels: crossbeam-channel's test shapes (array.rs, list.rs, zero.rs), across processes.

Names follow crossbeam's: smoke, capacity, len_empty_full, try_recv,
recv_timeout, try_send, send_timeout, send_after_disconnect,
recv_after_disconnect, disconnect_wakes_sender/receiver, spsc, mpmc,
linearizable, drops. Every message in the stress shapes is checked to
arrive exactly once.
"""
from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing as mp
import os
import pickle
import threading
import time

import numpy as np
import pytest

import shm
from kernels import ring as R
from conftest import COUNT
import _workers as W


def _results(ctx):
    """A plain shm channel to bring results back from children."""
    return shm.unbounded(codec="pickle")


# --------------------------------------------------------------------------
# API shapes, one process.

def test_smoke():
    tx, rx = shm.bounded(1)
    tx.send(7)
    assert rx.try_recv() == 7
    with pytest.raises(shm.Empty):
        rx.try_recv()
    tx.close(); rx.close()


@pytest.mark.parametrize("cap", [1, 2, 10, 1000])
def test_capacity(cap):
    tx, rx = shm.bounded(cap)
    assert tx.capacity == cap and rx.capacity == cap
    for i in range(cap):
        tx.try_send(i)
    with pytest.raises(shm.Full) as e:
        tx.try_send("x")
    assert e.value.message == "x"
    assert [rx.try_recv() for _ in range(cap)] == list(range(cap))
    tx.close(); rx.close()


def test_capacity_of_flavors():
    for make, cap in ((shm.unbounded, None), (shm.rendezvous, 0)):
        tx, rx = make()
        assert tx.capacity == cap == rx.capacity
        tx.close(); rx.close()
    tx, rx = shm.bounded(0)
    assert tx.capacity == 0
    tx.close(); rx.close()


def test_bad_capacity():
    with pytest.raises(ValueError):
        shm.bounded(-1)
    with pytest.raises(TypeError):
        shm.bounded(2.5)


def test_len_empty_full():
    tx, rx = shm.bounded(2)
    assert (len(tx), tx.is_empty(), tx.is_full()) == (0, True, False)
    tx.send(())
    assert (len(rx), rx.is_empty(), rx.is_full()) == (1, False, False)
    tx.send(())
    assert (len(tx), tx.is_empty(), tx.is_full()) == (2, False, True)
    rx.recv()
    assert (len(rx), rx.is_empty(), rx.is_full()) == (1, False, False)
    tx.close(); rx.close()


def test_recv_timeout():
    tx, rx = shm.bounded(1)
    t0 = time.monotonic()
    with pytest.raises(shm.Empty):
        rx.recv(timeout=0.2)
    assert time.monotonic() - t0 >= 0.19
    with pytest.raises(ValueError):
        rx.recv(timeout=-1)
    tx.send(1)
    assert rx.recv(timeout=0.2) == 1
    tx.close(); rx.close()


def test_send_timeout():
    tx, rx = shm.bounded(1)
    tx.send(1, timeout=0.1)
    t0 = time.monotonic()
    with pytest.raises(shm.Full) as e:
        tx.send(2, timeout=0.2)
    assert time.monotonic() - t0 >= 0.19
    assert e.value.message == 2
    assert isinstance(e.value, __import__("queue").Full)
    with pytest.raises(ValueError):
        tx.send(3, timeout=-0.5)
    assert rx.recv() == 1
    tx.close(); rx.close()


def test_send_after_disconnect():
    tx, rx = shm.bounded(100)
    tx.send(1); tx.send(2)
    rx.close()
    with pytest.raises(shm.Disconnected) as e:
        tx.send(3)
    assert e.value.message == 3
    with pytest.raises(shm.Disconnected):
        tx.try_send(4)
    assert tx.is_disconnected()
    tx.close()


def test_recv_after_disconnect():
    tx, rx = shm.bounded(100)
    for i in range(3):
        tx.send(i)
    tx.close()
    assert rx.is_disconnected()
    assert [rx.recv(), rx.recv(), rx.recv()] == [0, 1, 2]
    with pytest.raises(shm.Disconnected):
        rx.recv()
    with pytest.raises(shm.Disconnected):
        rx.try_recv()
    rx.close()


def test_closed_handle_raises_closed():
    tx, rx = shm.bounded(4)
    tx.close()
    tx.close()      # idempotent
    with pytest.raises(shm.Closed):
        tx.send(1)
    with pytest.raises(shm.Closed):
        pickle.dumps(tx)
    assert tx.closed and "closed" in repr(tx)
    rx.close()
    with pytest.raises(shm.Closed):
        rx.recv()
    assert isinstance(shm.Closed("x"), shm.ShmError)


def test_context_managers_and_iteration():
    tx, rx = shm.bounded(8)
    with tx:
        for i in range(5):
            tx.send(i)
    assert tx.closed
    with rx:
        assert list(rx) == [0, 1, 2, 3, 4]
    assert rx.closed


def test_drain_and_many():
    tx, rx = shm.bounded(1000)
    tx.send_many(range(500))
    assert len(rx) == 500
    got = rx.recv_many(300)
    assert got == list(range(300))
    assert rx.drain() == list(range(300, 500))
    assert rx.drain() == []
    with pytest.raises(shm.Empty):
        rx.recv_many(10, timeout=0.05)
    tx.close()
    with pytest.raises(shm.Disconnected):
        rx.recv_many(10)
    rx.close()


def test_send_many_blocks_then_times_out_with_unsent():
    tx, rx = shm.bounded(10)
    with pytest.raises(shm.Full) as e:
        tx.send_many(range(25), timeout=0.1)
    assert e.value.message == list(range(10, 25))
    assert rx.drain() == list(range(10))
    tx.close(); rx.close()


def test_repr_and_stats():
    tx, rx = shm.bounded(4, name=None)
    tx.send("a")
    r = repr(tx)
    assert "Sender" in r and tx.name in r and "bounded(4)" in r
    s = rx.stats()
    assert (s.flavor, s.capacity, s.depth, s.sent, s.received) == ("bounded", 4, 1, 1, 0)
    assert (s.senders, s.receivers, s.codec) == (1, 1, "msgpack")
    rx.recv()
    s = tx.stats()
    assert (s.depth, s.sent, s.received, s.lost, s.recovered) == (0, 1, 1, 0, 0)
    tx.close(); rx.close()


def test_threads_share_one_receiver():
    tx, rx = shm.bounded(64)
    n = 20000
    seen = collections.Counter()
    lock = threading.Lock()

    def consume():
        local = []
        for m in rx:
            local.append(m)
        with lock:
            seen.update(local)

    ts = [threading.Thread(target=consume) for _ in range(4)]
    for t in ts:
        t.start()
    tx.send_many(range(n // 2))
    for i in range(n // 2, n):
        tx.send(i)
    tx.close()
    for t in ts:
        t.join(60)
    assert seen == collections.Counter(range(n))
    rx.close()


# --------------------------------------------------------------------------
# Messages of every size and codec.

@pytest.mark.parametrize("size", [0, 1, 223, 224, 225, 4096, 70_000, 1 << 20])
def test_sizes(size):
    tx, rx = shm.bounded(4, codec="bytes")
    for k in range(3):
        m = bytes([k]) * size
        tx.send(m)
        assert rx.recv() == m
    tx.close(); rx.close()


def test_slot_size_option():
    tx, rx = shm.bounded(4, codec="bytes", slot_size=4000)
    m = b"z" * 4000
    tx.send(m)
    assert rx.recv() == m
    assert rx.stats().blob_segments == 0
    tx.send(m + b"!")
    assert rx.recv() == m + b"!"
    assert rx.stats().blob_segments == 1
    tx.close(); rx.close()


def test_codecs():
    for codec, objs in [
        ("msgpack", [None, True, 1, -2**63, 1.5, "é", b"\0", [1, [2]], {"a": {"b": 1}}, {1: 2}]),
        ("pickle", [{1, 2}, (1, 2), complex(1, 2), frozenset({"a"}), Ellipsis]),
        ("bytes", [b"", b"abc", b"x" * 1000]),
    ]:
        tx, rx = shm.bounded(32, codec=codec)
        for o in objs:
            tx.send(o)
        assert [rx.recv() for _ in objs] == objs
        assert tx.codec == codec
        tx.close(); rx.close()


def test_numpy_codec():
    tx, rx = shm.bounded(4, codec="numpy")
    arrays = [np.arange(10), np.zeros((3, 4), np.float32), np.array(3.5), np.ones(100_000),
              np.arange(12).reshape(3, 4).T, np.array(["ab", "c"])]
    for a in arrays:
        tx.send(a)
        b = rx.recv()
        assert isinstance(b, np.ndarray) and b.dtype == a.dtype and b.shape == a.shape
        assert np.array_equal(a, b)
    tx.send({"not": "an array"})
    assert rx.recv() == {"not": "an array"}
    tx.close(); rx.close()


def test_unencodable_leaves_channel_usable():
    tx, rx = shm.bounded(4)
    with pytest.raises(shm.EncodeError) as e:
        tx.send({1, 2})
    assert isinstance(e.value, TypeError) and "msgpack" in str(e.value) and "pickle" in str(e.value)
    with pytest.raises(TypeError):
        tx.send_many([1, object()])
    assert rx.recv(timeout=10) == 1       # items before the failing one were sent
    tx.send("fine")
    assert rx.recv(timeout=10) == "fine" and len(rx) == 0
    tx.close(); rx.close()


def test_pickle_is_never_decoded_on_a_msgpack_channel():
    from kernels import ring as R
    from shm.codec import K_PICKLE
    tx, rx = shm.bounded(4, codec="bytes")
    name = tx.name
    # Write a pickle-kind message by hand into a bytes channel.
    d = tx.kernel()
    d[R.D_KIND] = K_PICKLE
    payload = np.frombuffer(pickle.dumps("boom"), np.uint8).copy()
    assert R.try_push(d, payload, payload.size) == R.OK
    d[R.D_KIND] = 0
    with pytest.raises(shm.DecodeError):
        rx.recv()
    tx.send(b"ok")
    assert rx.recv() == b"ok"
    assert name
    tx.close(); rx.close()


# --------------------------------------------------------------------------
# Processes.

def test_spsc(ctx):
    n = COUNT
    tx, rx = shm.bounded(64)
    p = ctx.Process(target=W.produce_ints, args=(tx, 0, n))
    p.start()
    tx.close()
    for i in range(n):
        assert rx.recv(timeout=60) == i
    with pytest.raises(shm.Disconnected):
        rx.recv(timeout=60)
    p.join(30)
    rx.close()


def test_mpmc(ctx):
    """Two producers, two consumers: every message arrives exactly once."""
    n = COUNT // 2
    tx, rx = shm.bounded(32)
    out_tx, out_rx = _results(ctx)
    procs = [ctx.Process(target=W.produce_ints, args=(tx, k * n, n)) for k in range(2)]
    procs += [ctx.Process(target=W.collect, args=(rx, out_tx)) for _ in range(2)]
    for p in procs:
        p.start()
    tx.close(); rx.close(); out_tx.close()
    got = [out_rx.recv(timeout=120) for _ in range(2)]
    for p in procs:
        p.join(30)
    seen = collections.Counter(got[0] + got[1])
    assert seen == collections.Counter(range(2 * n))
    for part in got:       # each producer's messages arrive in order at each consumer
        for k in range(2):
            mine = [x for x in part if k * n <= x < (k + 1) * n]
            assert mine == sorted(mine)
    out_rx.close()


def test_mpmc_checked_mixed_sizes():
    """Checked payloads of mixed sizes (inline, straddling, blobs) through 3 producers."""
    ctx = mp.get_context("fork")
    n = max(COUNT // 10, 500)
    tx, rx = shm.bounded(16, codec="bytes")
    fds = [os.pipe() for _ in range(2)]
    writers = [w for _, w in fds]
    readers = [r for r, _ in fds]
    cons = [ctx.Process(target=W.checked_consumer, args=(rx, w, [x for x in writers if x != w] + readers))
            for w in writers]
    for p in cons:
        p.start()
    for w in writers:
        os.close(w)
    prods = [ctx.Process(target=W.produce, args=(tx, t, n, 97)) for t in range(3)]
    for p in prods:
        p.start()
    tx.close(); rx.close()
    recs = W.read_all_records(readers)
    for p in prods + cons:
        p.join(30)
        assert p.exitcode == 0
    assert collections.Counter(recs) == collections.Counter((t, i) for t in range(3) for i in range(n))


def test_linearizable(ctx):
    """Each process sends then try_recvs at capacity = processes: try_recv never fails."""
    k = 3
    tx, rx = shm.bounded(k)
    out_tx, out_rx = _results(ctx)
    procs = [ctx.Process(target=W.linearizable, args=(tx, rx, max(COUNT // 10, 1000), out_tx)) for _ in range(k)]
    for p in procs:
        p.start()
    out_tx.close()
    bad = [out_rx.recv(timeout=120) for _ in range(k)]
    for p in procs:
        p.join(30)
    assert bad == [0] * k
    tx.close(); rx.close(); out_rx.close()


def test_disconnect_wakes_receiver(ctx):
    tx, rx = shm.bounded(4)
    out_tx, out_rx = _results(ctx)
    p = ctx.Process(target=W.block_recv_report, args=(rx, out_tx))
    p.start()
    rx.close(); out_tx.close()
    # Wait until the child is parked in recv, then drop the last sender.
    deadline = time.monotonic() + 60
    while tx.stats().waiting_receivers == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    tx.close()
    assert out_rx.recv(timeout=30) == ("disconnected", None)
    p.join(30)
    out_rx.close()


def test_disconnect_wakes_sender(ctx):
    tx, rx = shm.bounded(2)
    out_tx, out_rx = _results(ctx)
    p = ctx.Process(target=W.block_send_report, args=(tx, out_tx, 2))
    p.start()
    tx.close(); out_tx.close()
    deadline = time.monotonic() + 60
    while rx.stats().waiting_senders == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    rx.close()
    assert out_rx.recv(timeout=30) == ("disconnected", 2)
    p.join(30)
    out_rx.close()


def test_named_channel_between_unrelated_processes(ctx):
    name = "shmtest-" + os.urandom(4).hex()
    tx, rx = shm.bounded(8, name=name)
    assert tx.name == name
    procs = [ctx.Process(target=W.produce_by_name, args=(name, k * 100, 100)) for k in range(2)]
    for p in procs:
        p.start()
    got = [rx.recv(timeout=60) for _ in range(200)]
    for p in procs:
        p.join(30)
    assert sorted(got) == list(range(200))
    with pytest.raises(shm.SegmentExists):
        shm.bounded(2, name=name)
    rx2 = shm.Receiver.open(name)
    assert rx2.name == name
    rx2.close(); tx.close(); rx.close()
    with pytest.raises(shm.SegmentNotFound):
        shm.Receiver.open(name)


def test_open_errors():
    with pytest.raises(shm.SegmentNotFound):
        shm.Sender.open("no-such-channel-" + os.urandom(4).hex())
    with pytest.raises(ValueError):
        shm.Sender.open("bad/name")


def test_pickled_handles_through_pool(ctx):
    tx, rx = shm.bounded(64)
    with ctx.Pool(2) as pool:
        done = pool.map(W.pool_task, [(tx, i) for i in range(20)])
    assert sorted(done) == list(range(20))
    assert sorted(rx.recv(timeout=30) for _ in range(20)) == [i * i for i in range(20)]
    tx.close(); rx.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pickled_handles_through_executor(method):
    tx, rx = shm.bounded(64)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as ex:
        futs = [ex.submit(W.pool_task, (tx, i)) for i in range(10)]
        assert sorted(f.result(timeout=60) for f in futs) == list(range(10))
        got = ex.submit(W.pool_consume, rx, 10).result(timeout=60)
    assert got == [i * i for i in range(10)]
    tx.close(); rx.close()


def test_parent_closes_right_after_start(ctx):
    """A child that has not attached yet still counts (tokens): no early disconnect."""
    tx, rx = shm.bounded(16)
    out_tx, out_rx = _results(ctx)
    p = ctx.Process(target=W.collect, args=(rx, out_tx))
    p.start()
    rx.close(); out_tx.close()
    for i in range(50):
        tx.send(i, timeout=60)      # must not raise Disconnected while the child starts
    tx.close()
    assert out_rx.recv(timeout=60) == list(range(50))
    p.join(30)
    out_rx.close()


def test_inherited_unused_sender_does_not_keep_channel_open():
    """fork: consumers inherit the parent's Sender but never use it."""
    ctx = mp.get_context("fork")
    tx, rx = shm.bounded(16)
    out_tx, out_rx = _results(ctx)
    procs = [ctx.Process(target=W.collect_count, args=(rx, out_tx)) for _ in range(2)]
    for p in procs:
        p.start()
    for i in range(100):
        tx.send(i)
    tx.close()
    counts = [out_rx.recv(timeout=60) for _ in range(2)]
    assert sum(counts) == 100
    for p in procs:
        p.join(30)
    rx.close(); out_tx.close(); out_rx.close()


def test_pipeline_children_count_only_channels_they_were_given():
    """fork: a sink inherits the source's channel but was not given it: it must not keep it open."""
    from shm import demo
    count, total, _ = demo.run_shm(3000)
    assert (count, total) == (3000, demo.expected_total(3000))
    count, total, _ = demo.run_shm(3000, batched=True)
    assert (count, total) == (3000, demo.expected_total(3000))


def _uses_global_sender():
    _GLOBAL["tx"].send("from a global")
    _GLOBAL["tx"].close()


_GLOBAL = {}


def test_forked_child_using_an_inherited_global_handle():
    """A handle not passed as an argument still works when the child uses it (it re-registers)."""
    tx, rx = shm.bounded(4)
    _GLOBAL["tx"] = tx
    p = mp.get_context("fork").Process(target=_uses_global_sender)
    p.start()
    assert rx.recv(timeout=60) == "from a global"
    p.join(30)
    _GLOBAL.clear()
    tx.close(); rx.close()


def test_large_numpy_array_capacity_4(ctx):
    """A 64 MiB array gets through a channel of capacity 4 (and back)."""
    tx, rx = shm.bounded(4, codec="numpy")
    back_tx, back_rx = shm.bounded(4, codec="numpy")
    p = ctx.Process(target=W.echo, args=(rx, back_tx, 2))
    p.start()
    a = np.arange(8 << 20, dtype=np.float64)      # 64 MiB
    tx.send(a)
    tx.send(a[::-1])
    first, second = back_rx.recv(timeout=60), back_rx.recv(timeout=60)
    p.join(60)
    assert first.dtype == a.dtype and first.shape == a.shape and np.array_equal(first, a)
    assert np.array_equal(second, a[::-1])
    for h in (tx, rx, back_tx, back_rx):
        h.close()


# --------------------------------------------------------------------------
# Flavors.

def test_unbounded_never_blocks_and_keeps_order():
    tx, rx = shm.unbounded()
    n = max(COUNT, 5000)
    for i in range(n):
        tx.try_send(i)          # never Full
    assert len(rx) == n
    assert [rx.recv() for _ in range(n)] == list(range(n))
    s = rx.stats()
    assert (s.sent, s.received, s.depth) == (n, n, 0)
    tx.close(); rx.close()


def test_unbounded_across_processes(ctx):
    n = COUNT
    tx, rx = shm.unbounded()
    out_tx, out_rx = _results(ctx)
    procs = [ctx.Process(target=W.produce_ints, args=(tx, k * n, n)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)     # producers finish without any receiver draining
    tx.close()
    got = list(rx)
    assert collections.Counter(got) == collections.Counter(range(2 * n))
    for k in range(2):
        mine = [x for x in got if k * n <= x < (k + 1) * n]
        assert mine == sorted(mine)
    rx.close(); out_tx.close(); out_rx.close()


def test_unbounded_big_messages():
    tx, rx = shm.unbounded(codec="bytes")
    msgs = [bytes([i % 256]) * (100_000 if i % 50 == 0 else 100) for i in range(2000)]
    for m in msgs:
        tx.send(m)
    assert [rx.recv() for _ in msgs] == msgs
    tx.close(); rx.close()


def test_rendezvous_send_waits_for_receiver(ctx):
    tx, rx = shm.rendezvous()
    with pytest.raises(shm.Full):
        tx.try_send(1)                 # nobody waiting
    with pytest.raises(shm.Full) as e:
        tx.send(2, timeout=0.1)        # nobody took it
    assert e.value.message == 2
    with pytest.raises(shm.Empty):
        rx.try_recv()                  # and it was taken back
    out_tx, out_rx = _results(ctx)
    p = ctx.Process(target=W.collect, args=(rx, out_tx))
    p.start()
    rx.close(); out_tx.close()
    for i in range(20):
        tx.send(i, timeout=60)
        assert len(tx) == 0
    tx.close()
    assert out_rx.recv(timeout=60) == list(range(20))
    p.join(30)
    out_rx.close()


def test_parked_receiver_uses_no_cpu(ctx):
    """A receiver blocked for 2 s burns (almost) no CPU while parked."""
    tx, rx = shm.bounded(4)
    out_tx, out_rx = _results(ctx)
    p = ctx.Process(target=W.block_recv_report, args=(rx, out_tx))
    p.start()
    deadline = time.monotonic() + 60
    while tx.stats().waiting_receivers == 0 and time.monotonic() < deadline:
        time.sleep(0.01)

    def cpu(pid):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    c0, t0 = cpu(p.pid), time.monotonic()
    time.sleep(2.0)
    c1, t1 = cpu(p.pid), time.monotonic()
    tx.send("wake")
    assert out_rx.recv(timeout=30) == ("msg", "wake")
    p.join(30)
    assert (c1 - c0) / (t1 - t0) < 0.02
    tx.close(); rx.close(); out_tx.close(); out_rx.close()


# --------------------------------------------------------------------------
# reserve=: every pool entry's blob made with the channel.

def _blob_files(tx):
    fam = tx._c.family
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(fam) and "p" in f[len(fam):])


def test_reserve_makes_every_slot_blob_up_front():
    tx, rx = shm.bounded(3, codec="bytes", reserve=100_000)
    st = tx.stats()
    assert (st.blob_segments, st.blob_bytes) == (3, 3 * 131072)      # rounded up to a power of two
    before = _blob_files(tx)
    assert len(before) == 3
    m = os.urandom(100_000)
    for k in range(7):                  # round every slot twice: the same three blobs carry them all
        tx.send(m[k:])
        assert rx.recv() == m[k:]
    assert _blob_files(tx) == before
    big = os.urandom(300_000)           # larger than reserved: that slot's blob grows, nothing is lost
    tx.send(big)
    assert rx.recv() == big
    assert tx.stats().blob_segments == 3 and tx.stats().blob_bytes == 2 * 131072 + 524288
    tx.close(); rx.close()


def test_reserve_blobs_survive_the_blob_budget(monkeypatch):
    """A channel over its blob budget drops the blob it just read, but never a reserved one."""
    monkeypatch.setattr(shm._chan, "BLOB_BUDGET", 1 << 19)
    tx, rx = shm.bounded(4, codec="bytes", reserve=1 << 20)
    before = _blob_files(tx)
    m = b"r" * (1 << 20)
    for _ in range(8):
        tx.send(m)
        assert rx.recv() == m
    assert _blob_files(tx) == before and tx.stats().blob_segments == 4
    tx.send(m + b"+")                   # grows past the reserve: this one goes after reading
    assert rx.recv() == m + b"+"
    assert tx.stats().blob_segments == 3
    tx.close(); rx.close()
    tx2, rx2 = shm.bounded(4, codec="bytes")     # without reserve the same traffic keeps nothing
    for _ in range(4):
        tx2.send(m)
        assert rx2.recv() == m
    assert tx2.stats().blob_segments == 0
    tx2.close(); rx2.close()


def test_reserve_across_processes(ctx):
    """Opened by name in a fresh process, which maps the reserved blobs; 2 MiB arrays arrive whole."""
    tx, rx = shm.bounded(2, codec="numpy", reserve=4 << 20, name=f"resv{os.getpid()}")
    q = ctx.Queue()
    p = ctx.Process(target=W.send_arrays_by_name, args=(tx.name, 5, 1 << 18, q))
    p.start()
    for k in range(5):
        a = rx.recv(timeout=60)
        assert a.shape == (1 << 18,) and a.dtype == np.float64 and (a == k).all()
    p.join(60)
    assert p.exitcode == 0 and q.get(timeout=5) == 2      # it found both reserved blobs mapped at open
    assert rx.stats().blob_segments == 2
    tx.close(); rx.close()


def test_reserve_rendezvous_and_bad_values():
    tx, rx = shm.bounded(0, codec="bytes", reserve=5000)
    assert tx.stats().blob_segments == 1 and tx.stats().blob_bytes == 8192
    t = threading.Thread(target=tx.send, args=(b"q" * 5000,))
    t.start()
    assert rx.recv(timeout=30) == b"q" * 5000
    t.join(30)
    tx.close(); rx.close()
    with pytest.raises(ValueError, match="reserve"):
        shm.bounded(2, reserve=-1)
    with pytest.raises(TypeError, match="reserve"):
        shm.bounded(2, reserve=1.5)
    with pytest.raises(TypeError):
        shm.unbounded(reserve=1 << 20)
    tx, rx = shm.bounded(2, reserve=0)
    assert tx.stats().blob_segments == 0
    tx.close(); rx.close()


# --------------------------------------------------------------------------
# The blob pool: large messages take the blob freed last.

def _held_entries(tx):
    d = tx._c.rings[0].dtx      # (kernel() refuses a rendezvous channel)
    return [e for e in range(int(d[R.D_CAP])) if R.blob_state_at(d.ctypes.data, e) != 0]


def test_a_stream_of_large_messages_reuses_the_blob_freed_last():
    tx, rx = shm.bounded(16, codec="bytes")
    m = os.urandom(1 << 20)
    for _ in range(40):
        tx.send(m)
        assert rx.recv() == m
    assert tx.stats().blob_segments == 1        # one hot blob (a blob per slot made 16)
    for k in range(10):                         # three in flight at a time: three blobs
        for j in range(3):
            tx.send(m[j + k:])
        for j in range(3):
            assert rx.recv() == m[j + k:]
    assert tx.stats().blob_segments == 3
    assert _held_entries(tx) == []
    tx.close(); rx.close()


def test_blob_pool_under_mpmc_mixed_sizes():
    """Two producers, two consumers, inline and blob messages of many sizes: each arrives once, intact."""
    tx, rx = shm.bounded(6, codec="bytes")
    n = max(200, COUNT // 50)

    def produce(tag):
        for i in range(n):
            size = (i * 7919 + tag * 104729) % 300_000
            tx.send(bytes([tag, i % 251]) + (b"%d" % i).ljust(8, b".") + bytes([i % 256]) * size, timeout=60)

    got = collections.Counter()
    lock = threading.Lock()

    def consume():
        while True:
            try:
                m = rx.recv(timeout=10)
            except shm.Empty:
                return
            i = int(m[2:10].rstrip(b"."))
            assert m[1] == i % 251 and len(m) == 10 + (i * 7919 + m[0] * 104729) % 300_000
            assert m[10:] == bytes([i % 256]) * (len(m) - 10)
            with lock:
                got[(m[0], i)] += 1
            if sum(got.values()) == 2 * n:
                return

    ts = [threading.Thread(target=produce, args=(t,)) for t in (1, 2)] + \
         [threading.Thread(target=consume) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert got == collections.Counter({(t, i): 1 for t in (1, 2) for i in range(n)})
    assert _held_entries(tx) == [] and tx.stats().blob_segments <= 6
    tx.close(); rx.close()


def test_rendezvous_large_send_timing_out_gives_its_blob_back():
    """Regression: a blob message taken back unread kept its pool entry, and the next large send hung."""
    tx, rx = shm.rendezvous(codec="bytes")
    big = b"r" * 50_000
    for _ in range(3):
        with pytest.raises(shm.Full):
            tx.send(big, timeout=0.05)
        assert _held_entries(tx) == []
    t = threading.Thread(target=tx.send, args=(big + b"!",), kwargs={"timeout": 30})
    t.start()
    assert rx.recv(timeout=30) == big + b"!"
    t.join(30)
    assert _held_entries(tx) == []
    tx.close(); rx.close()


def test_a_large_send_with_a_huge_timeout():
    """Regression: the builtin claimed the slot, then computing the deadline raised: the channel wedged."""
    tx, rx = shm.bounded(2, codec="bytes")
    big = b"h" * 10_000
    tx.send(big, timeout=10 ** 400)
    tx.send(b"small")
    assert rx.recv(timeout=5) == big and rx.recv(timeout=5) == b"small"
    tx.close(); rx.close()


def test_a_forked_child_maps_the_hint_blob_afresh_at_first_use():
    """fork() does not copy a shared mapping's page tables: the child maps the likely next blob anew
    (pages and all) at its first use, and the others when it first needs them."""
    tx, rx = shm.bounded(2, codec="bytes", reserve=2 << 20)
    tx.send(b"w" * (1 << 20))
    assert rx.recv() == b"w" * (1 << 20)         # entry 0 given back: the hint
    fork = mp.get_context("fork")
    q = fork.Queue()
    p = fork.Process(target=W.cold_blobs_after_first_use, args=(rx, q))
    p.start()
    before, after = q.get(timeout=60)
    p.join(30)
    assert before == [(0, 0), (0, 1)] and after == [(0, 1)]
    tx.close(); rx.close()


def _blobs_made(tx):
    """Blob segments ever created in ring 0's pool (each creation bumps its entry's generation)."""
    d = tx._c.rings[0].dtx
    return sum(max(0, R.blob_info_at(d.ctypes.data, e)) >> 8 for e in range(int(d[R.D_CAP])))


@pytest.mark.parametrize("shape", ["numpy", "unbounded", "bytes"])
def test_over_the_blob_budget_blobs_are_dropped_one_read_in_64(monkeypatch, shape):
    """Regression (review): a channel over its blob budget must not drop, and then re-create, a blob on
    every read: it drops one every 64 reads (and every blob of 1 MiB or more)."""
    monkeypatch.setattr(shm._chan, "BLOB_BUDGET", 512 << 10)
    if shape == "numpy":
        tx, rx = shm.bounded(8, codec="numpy")
        make = lambda i: np.full(25_000, i, np.float64)             # ~200 KB
        same = lambda a, i: a.shape == (25_000,) and (a == i).all()
    else:
        tx, rx = (shm.unbounded(codec="bytes") if shape == "unbounded" else shm.bounded(8, codec="bytes"))
        make = lambda i: bytes([i % 256]) * 200_000
        same = lambda m, i: m == bytes([i % 256]) * 200_000
    for i in range(6):                  # a deep queue: 6 blobs held, over the budget
        tx.send(make(i))
    for i in range(6, 134):
        tx.send(make(i))
        assert same(rx.recv(timeout=10), i - 6)
    assert _blobs_made(tx) <= 12, _blobs_made(tx)
    tx.close(); rx.close()
