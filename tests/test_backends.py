"""The same behaviour on both backends: every test here runs on shared memory and on Redis.

The ``ns`` fixture is ``shm.connect("shm://")`` or ``shm.connect(<a real
redis-server on a loopback port>)`` (tests/_redis_server.py). The shapes are
those of tests/test_channel.py, tests/test_dict.py and tests/test_queues.py,
written once against a namespace; where the backends differ on purpose
(documented in shm/_redis_channel.py and shm/_redis_dict.py) the test says
so. After each Redis test, no key of ours may be left in the server: the
last handle out deletes, as the last process out unlinks locally.
"""
from __future__ import annotations

import collections
import math
import multiprocessing as mp
import os
import pickle
import queue
import threading
import time

import numpy as np
import pytest

import shm

LEASE = 2.0          # seconds: short, so that killed peers are noticed quickly here


@pytest.fixture(params=["shm", "redis"])
def ns(request):
    if request.param == "shm":
        yield shm.connect("shm://")
        return
    srv = request.getfixturevalue("redis_server")
    n = shm.connect(srv.url, lease=LEASE, retry_for=10, claim_after=5)
    yield n
    import gc
    gc.collect()
    c = n._backend.client()
    deadline = time.monotonic() + 5
    while c.keys("shm:*") and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    left = c.keys("shm:*")
    if left:
        c.delete(*left)
        pytest.fail(f"the test left keys in Redis: {sorted(left)[:10]}")


def _fork():
    return mp.get_context("fork")


# --------------------------------------------------------------------------
# Channels, one process.

def test_smoke(ns):
    tx, rx = ns.bounded(1)
    tx.send(7)
    assert rx.try_recv() == 7
    with pytest.raises(shm.Empty):
        rx.try_recv()
    tx.close(); rx.close()


@pytest.mark.parametrize("cap", [1, 10])
def test_capacity(ns, cap):
    tx, rx = ns.bounded(cap)
    assert tx.capacity == cap and rx.capacity == cap
    for i in range(cap):
        tx.try_send(i)
    with pytest.raises(shm.Full) as e:
        tx.try_send("x")
    assert e.value.message == "x" and isinstance(e.value, queue.Full)
    assert [rx.try_recv() for _ in range(cap)] == list(range(cap))
    tx.close(); rx.close()


def test_bad_capacity_and_unbounded(ns):
    with pytest.raises(ValueError):
        ns.bounded(-1)
    with pytest.raises(TypeError):
        ns.bounded(2.5)
    tx, rx = ns.unbounded()
    assert tx.capacity is None and rx.capacity is None
    tx.send_many(range(3000))
    assert not tx.is_full() and len(rx) == 3000
    assert rx.drain() == list(range(3000))
    tx.close(); rx.close()


def test_len_empty_full(ns):
    tx, rx = ns.bounded(2)
    assert (len(tx), tx.is_empty(), tx.is_full()) == (0, True, False)
    tx.send(())
    assert (len(rx), rx.is_empty(), rx.is_full()) == (1, False, False)
    tx.send(())
    assert (len(tx), tx.is_empty(), tx.is_full()) == (2, False, True)
    rx.recv()
    assert (len(rx), rx.is_empty(), rx.is_full()) == (1, False, False)
    tx.close(); rx.close()


def test_recv_timeout(ns):
    tx, rx = ns.bounded(1)
    t0 = time.monotonic()
    with pytest.raises(shm.Empty):
        rx.recv(timeout=0.2)
    assert 0.19 <= time.monotonic() - t0 < 2
    with pytest.raises(ValueError):
        rx.recv(timeout=-1)
    tx.send(1)
    assert rx.recv(timeout=0.2) == 1
    tx.close(); rx.close()


def test_send_timeout(ns):
    tx, rx = ns.bounded(1)
    tx.send(1, timeout=0.1)
    t0 = time.monotonic()
    with pytest.raises(shm.Full) as e:
        tx.send(2, timeout=0.2)
    assert 0.19 <= time.monotonic() - t0 < 2
    assert e.value.message == 2 and isinstance(e.value, queue.Full)
    with pytest.raises(ValueError):
        tx.send(3, timeout=-0.5)
    assert rx.recv() == 1
    tx.close(); rx.close()


def test_send_after_disconnect(ns):
    tx, rx = ns.bounded(100)
    tx.send(1); tx.send(2)
    rx.close()
    with pytest.raises(shm.Disconnected) as e:
        tx.send(3)
    assert e.value.message == 3
    with pytest.raises(shm.Disconnected):
        tx.try_send(4)
    assert tx.is_disconnected()
    tx.close()


def test_recv_after_disconnect(ns):
    tx, rx = ns.bounded(100)
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


def test_closed_handle_raises_closed(ns):
    tx, rx = ns.bounded(4)
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


def test_context_managers_and_iteration(ns):
    tx, rx = ns.bounded(8)
    with tx:
        for i in range(5):
            tx.send(i)
    assert tx.closed
    with rx:
        assert list(rx) == [0, 1, 2, 3, 4]
    assert rx.closed


def test_drain_and_many(ns):
    tx, rx = ns.bounded(1000)
    tx.send_many(range(500))
    assert len(rx) == 500
    assert rx.recv_many(300) == list(range(300))
    assert rx.drain() == list(range(300, 500))
    assert rx.drain() == []
    with pytest.raises(shm.Empty):
        rx.recv_many(10, timeout=0.05)
    tx.close()
    with pytest.raises(shm.Disconnected):
        rx.recv_many(10)
    rx.close()


def test_send_many_blocks_then_times_out_with_unsent(ns):
    tx, rx = ns.bounded(10)
    with pytest.raises(shm.Full) as e:
        tx.send_many(range(25), timeout=0.1)
    assert e.value.message == list(range(10, 25))
    assert rx.drain() == list(range(10))
    tx.close(); rx.close()


def test_repr_and_stats(ns):
    tx, rx = ns.bounded(4)
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


def test_codecs(ns):
    for codec, msgs in (("msgpack", [None, True, 1, -2**63, 2.5, "é", b"\0", [1, [2]], {"a": {"b": None}}]),
                        ("pickle", [(1, 2), {1, 2}, complex(1, 2), 2**100]),
                        ("bytes", [b"", b"x" * 70000, bytearray(b"ab")])):
        tx, rx = ns.unbounded(codec=codec)
        assert tx.codec == codec
        tx.send_many(msgs)
        got = rx.drain()
        assert got == [bytes(m) if isinstance(m, bytearray) else m for m in msgs], codec
        tx.close(); rx.close()
    tx, rx = ns.bounded(4, codec="numpy")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    tx.send(a)
    tx.send(a.T)            # not C-contiguous
    tx.send({"not": "an array"})
    b, c, d = rx.recv(), rx.recv(), rx.recv()
    assert b.dtype == np.float32 and b.shape == (3, 4) and (b == a).all()
    assert (c == a.T).all() and d == {"not": "an array"}
    tx.close(); rx.close()


def test_big_messages(ns):
    tx, rx = ns.bounded(4, codec="bytes")
    big = os.urandom(3 << 20)
    tx.send(big)
    assert rx.recv() == big
    tx.close(); rx.close()


def test_unencodable_leaves_channel_usable(ns):
    tx, rx = ns.bounded(4)
    with pytest.raises(shm.EncodeError) as e:
        tx.send({1, 2})
    assert isinstance(e.value, TypeError) and "pickle" in str(e.value)
    with pytest.raises(TypeError):
        tx.send_many([1, object()])
    assert rx.drain() in ([], [1])      # Redis encodes the batch first; shared memory sends up to the bad one
    tx.send(1)
    assert rx.recv() == 1
    tx.close(); rx.close()


def test_named_open_and_errors(ns):
    name = "shmtest-" + os.urandom(4).hex()
    tx, rx = ns.bounded(8, name=name)
    tx2 = ns.Sender.open(name)
    rx2 = ns.Receiver.open(name)
    assert tx2.name == name and tx2.capacity == 8 and rx2.codec == "msgpack"
    tx2.send("hello")
    assert rx2.recv() == "hello"
    with pytest.raises(shm.SegmentExists):
        ns.bounded(2, name=name)
    with pytest.raises(shm.SegmentNotFound):
        ns.Receiver.open("no-such-" + os.urandom(4).hex())
    d = ns.SharedDict()
    with pytest.raises(shm.WrongKind):
        ns.Sender.open(d.name)
    with pytest.raises(shm.WrongKind):
        ns.SharedDict.open(name)
    d.close()
    c = tx.clone()
    assert type(c) is type(tx) and c.name == name
    for h in (tx, rx, tx2, rx2, c):
        h.close()
    with pytest.raises(shm.SegmentNotFound):
        ns.Sender.open(name)            # the last handle out removed it


def test_pickled_handles_in_process(ns):
    tx, rx = ns.bounded(4)
    tx2 = pickle.loads(pickle.dumps(tx))
    tx.close()
    assert not rx.is_disconnected()     # the unpickled handle counts
    tx2.send("via pickle")
    assert rx.recv() == "via pickle"
    tx2.close()
    with pytest.raises(shm.Disconnected):
        rx.recv(timeout=5)
    rx.close()


def test_threads_share_one_receiver(ns):
    tx, rx = ns.bounded(64)
    n = 3000
    seen = collections.Counter()
    lock = threading.Lock()

    def consume():
        for m in rx:
            with lock:
                seen[m] += 1

    ts = [threading.Thread(target=consume) for _ in range(3)]
    for t in ts:
        t.start()
    for i in range(0, n, 100):
        tx.send_many(range(i, i + 100))
    tx.close()
    for t in ts:
        t.join(30)
    assert not any(t.is_alive() for t in ts)
    assert len(seen) == n and set(seen.values()) == {1}
    rx.close()


def test_asyncio_and_cancellation(ns):
    import asyncio
    tx, rx = ns.bounded(1)
    q = ns.Queue()

    async def main():
        await tx.send_async("a")
        with pytest.raises(shm.Full):
            await tx.send_async("b", timeout=0.1)
        assert await rx.recv_async(timeout=5) == "a"
        with pytest.raises(shm.Empty):
            await rx.recv_async(timeout=0.1)
        t = asyncio.create_task(rx.recv_async())
        await asyncio.sleep(0.1)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        tx.send("c")                        # the cancelled receive took nothing
        assert await rx.recv_async(timeout=5) == "c"
        await tx.send_many_async(["d"])
        assert await rx.recv_many_async(10, timeout=5) == ["d"]
        await q.put_async((1, 2))
        assert await q.get_async(timeout=5) == (1, 2)
        tx.close()
        return [m async for m in rx]        # ends: every sender is gone

    assert asyncio.run(main()) == []
    rx.close(); q.close()


# --------------------------------------------------------------------------
# Channels across processes.

def _producer(tx, start, n):
    for i in range(start, start + n, 50):
        tx.send_many(list(range(i, min(i + 50, start + n))))
    tx.close()


def _consumer(rx, out):
    got = []
    for m in rx:
        got.append(m)
    out.send_many(got)
    out.close()
    rx.close()


def test_mpmc_across_processes(ns):
    tx, rx = ns.bounded(256)
    res_tx, res_rx = shm.unbounded(codec="pickle")      # results come back over shared memory
    n = 2000
    ctx = _fork()
    ps = [ctx.Process(target=_producer, args=(tx, k * n, n)) for k in range(2)]
    cs = [ctx.Process(target=_consumer, args=(rx, res_tx)) for _ in range(2)]
    for p in ps + cs:
        p.start()
    tx.close(); rx.close(); res_tx.close()          # the parent keeps nothing of the channel
    got = list(res_rx)
    for p in ps + cs:
        p.join(30)
        assert p.exitcode == 0
    res_rx.close()
    assert sorted(got) == list(range(2 * n))        # each message exactly once


def _recv_one(rx, out):
    out.send(rx.recv(timeout=20))
    out.close()


def test_parent_closes_right_after_start(ns):
    tx, rx = ns.bounded(4)
    res_tx, res_rx = shm.unbounded(codec="pickle")
    ctx = _fork()
    p = ctx.Process(target=_recv_one, args=(rx, res_tx))
    p.start()
    rx.close(); res_tx.close()      # before the child has done anything
    tx.send("to the child")         # must not be Disconnected: the child's receiver counts
    assert res_rx.recv(timeout=30) == "to the child"
    p.join(30)
    assert p.exitcode == 0
    tx.close(); res_rx.close()


def _drain_to(rx, out):
    n = 0
    for _ in rx:
        n += 1
    out.send(n)
    out.close()


def test_inherited_unused_sender_does_not_keep_channel_open(ns):
    tx, rx = ns.bounded(16)
    res_tx, res_rx = shm.unbounded(codec="pickle")
    ctx = _fork()
    p = ctx.Process(target=_drain_to, args=(rx, res_tx))    # inherits tx too, but was not given it
    p.start()
    rx.close(); res_tx.close()
    tx.send_many(range(10))
    tx.close()                      # the child's loop ends: its inherited sender does not count
    assert res_rx.recv(timeout=30) == 10
    p.join(30)
    assert p.exitcode == 0
    res_rx.close()


def _square(args):
    rx, tx = args
    x = rx.recv(timeout=20)
    tx.send(x * x)
    return x


def test_pickled_handles_through_pool(ns):
    tx, rx = ns.unbounded()
    out_tx, out_rx = ns.unbounded()
    tx.send_many(range(1, 5))
    pool = _fork().Pool(2)
    got = pool.map(_square, [(rx, out_tx)] * 4)
    pool.close()
    pool.join()         # (workers that exit close what they unpickled; terminate() would leave leases to expire)
    assert sorted(got) == [1, 2, 3, 4]
    assert sorted(out_rx.drain()) == [1, 4, 9, 16]
    for h in (tx, rx, out_tx, out_rx):
        h.close()


# --------------------------------------------------------------------------
# Queue.

def test_queue_api(ns):
    q = ns.Queue(maxsize=2)
    assert (q.qsize(), q.empty(), q.full()) == (0, True, False)
    q.put({"a": (1, 2)})          # pickle codec: tuples stay tuples
    q.put_nowait({1, 2})
    assert (q.qsize(), q.empty(), q.full()) == (2, False, True)
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.05)
    assert q.get() == {"a": (1, 2)}
    assert q.get_nowait() == {1, 2}
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    q.join_thread()
    q.cancel_join_thread()
    name = q.name
    q2 = pickle.loads(pickle.dumps(q))
    q2.put("x")
    assert q.get() == "x"
    q2.close()
    q3 = type(q).open(name)
    q3.close()
    q.close()
    with pytest.raises(ValueError, match="closed"):
        q.put(1)
    assert "closed" in repr(q)


def _queue_worker(q, n):
    for i in range(n):
        q.put(("w", i))


def test_queue_across_processes(ns):
    q = ns.Queue()
    p = _fork().Process(target=_queue_worker, args=(q, 100))
    p.start()
    got = [q.get(timeout=20) for _ in range(100)]
    p.join(30)
    assert got == [("w", i) for i in range(100)]
    q.close()


# --------------------------------------------------------------------------
# SharedDict.

@pytest.fixture
def d(ns):
    x = ns.SharedDict()
    yield x
    x.close()


def test_basic_mapping(d):
    import collections.abc
    assert isinstance(d, collections.abc.MutableMapping)
    assert len(d) == 0 and list(d) == [] and dict(d) == {}
    d["a"] = 1
    d["b"] = [1, 2]
    d["c"] = {"x": None}
    assert d["a"] == 1 and d["b"] == [1, 2] and d["c"] == {"x": None}
    assert len(d) == 3 and set(d) == {"a", "b", "c"}
    assert "a" in d and "z" not in d
    assert d.get("z") is None and d.get("z", 5) == 5
    with pytest.raises(KeyError):
        d["z"]
    del d["a"]
    with pytest.raises(KeyError):
        del d["a"]
    assert sorted(d.keys()) == ["b", "c"]
    assert dict(d.items()) == {"b": [1, 2], "c": {"x": None}}
    assert ("b", [1, 2]) in d.items()
    assert d.copy() == {"b": [1, 2], "c": {"x": None}} and type(d.copy()) is dict
    assert d == {"b": [1, 2], "c": {"x": None}} and d != {"b": 1}


def test_dict_methods(d):
    assert d.setdefault("k", 1) == 1 and d.setdefault("k", 2) == 1
    assert d.pop("k") == 1 and d.pop("k", "gone") == "gone"
    with pytest.raises(KeyError):
        d.pop("k")
    d.update({"a": 1}, b=2)
    d.update([("c", 3)])
    assert d.copy() == {"a": 1, "b": 2, "c": 3}
    k, v = d.popitem()
    assert k in ("a", "b", "c") and v == {"a": 1, "b": 2, "c": 3}[k] and len(d) == 2
    d.clear()
    assert len(d) == 0 and d.copy() == {}
    with pytest.raises(KeyError):
        d.popitem()


def test_overwrites_and_types(d, ns):
    for v in (1, "one", 1.5, None, True, [1], {"n": 1}, b"raw", 2**64 - 1, -(2**63), 2**63 - 1,
              float("inf"), -0.0, ""):
        d["x"] = v
        got = d["x"]
        assert got == v and type(got) is type(v), v
    nan = float("nan")
    d["x"] = nan
    assert math.isnan(d["x"])
    d["x"] = 5
    d["x"] = "now a string"
    d["x"] = 6
    assert d["x"] == 6 and len(d) == 1
    with pytest.raises(TypeError) as e:        # beyond what msgpack can carry: the fix is named
        d["y"] = 2**70
    assert "pickle" in str(e.value) and "y" not in d
    p = ns.SharedDict(codec="pickle")
    p["y"] = 2**70
    p["s"] = {1, 2}
    p["t"] = (1, 2)
    assert p["y"] == 2**70 and p["s"] == {1, 2} and p["t"] == (1, 2)
    p.close()


def test_canonical_keys(d):
    d[1] = "one"
    assert d[1.0] == "one" and d[True] == "one"
    d[True] = "true"
    assert d[1] == "true" and len(d) == 1
    d[0.0] = "zero"
    assert d[-0.0] == "zero" and d[0] == "zero" and d[False] == "zero"
    d[2.5] = "float"
    d["1"] = "str"
    d[b"1"] = "bytes"
    assert d[1] == "true" and d["1"] == "str" and d[b"1"] == "bytes" and d[2.5] == "float"
    d[None] = "none"
    d[(1, "a", (b"x", None))] = "tuple"
    assert d[(1.0, "a", (b"x", None))] == "tuple"
    d[2**100] = "big"
    assert d[float(2**100)] == "big"
    assert set(d) == {1, 0, 2.5, "1", b"1", None, (1, "a", (b"x", None)), 2**100}


def test_wrong_key_types_and_values_leave_the_table_unchanged(d):
    d["a"] = 1
    for bad in ([1], {"a": 1}, {1}, object()):
        with pytest.raises(TypeError) as e:
            d[bad] = 1
        assert "SharedDict keys must be" in str(e.value)
    with pytest.raises(TypeError):
        [1] in d
    with pytest.raises(TypeError) as e:
        d["b"] = {1, 2}
    assert "msgpack" in str(e.value) and "pickle" in str(e.value)
    with pytest.raises(TypeError):
        d.set_many({"c": 1, "d": object()})
    # Redis encodes the whole batch first (nothing written); shared memory writes up to the bad item.
    assert d.copy() in ({"a": 1}, {"a": 1, "c": 1})


def test_incr(d):
    assert d.incr("n") == 1
    assert d.incr("n", 10) == 11
    assert d.incr("n", -20) == -9
    assert d.incr("m", 5, default=100) == 105
    d["f"] = 1.5
    assert d.incr("f", 1) == 2.5 and d["f"] == 2.5 and type(d["f"]) is float
    assert d.incr("n", 0.5) == -8.5
    d["g"] = 0.1
    assert d.incr("g", 0.2) == 0.1 + 0.2 == d["g"]           # Python's double arithmetic exactly
    d["s"] = "text"
    with pytest.raises(TypeError):
        d.incr("s")
    assert d["s"] == "text"
    d["big"] = 2**63 - 1
    assert d.incr("big") == 2**63        # leaves int64: stored through the codec, still exact
    assert d["big"] == 2**63 and d.incr("big", -1) == 2**63 - 1
    assert type(d["big"]) is int


def test_compare_and_set_and_alter(d):
    d["k"] = 1
    assert not d.compare_and_set("k", 2, 3)
    assert d.compare_and_set("k", 1, 3) and d["k"] == 3
    assert d.compare_and_set("k", 3.0, 4) and d["k"] == 4      # 3 == 3.0, as locally
    assert not d.compare_and_set("missing", None, 1) and "missing" not in d
    assert d.alter("k", lambda v: v * 10) == 40 and d["k"] == 40
    assert d.alter("new", lambda v: v + [1], default=[]) == [1]
    with pytest.raises(KeyError):
        d.alter("nothing", lambda v: v)
    with pytest.raises(ZeroDivisionError):
        d.alter("k", lambda v: v / 0)
    assert d["k"] == 40
    d["k"] = 41
    assert d["k"] == 41


def test_get_many_set_many(d):
    d.set_many({"a": 1, "b": 2})
    d.set_many([("c", 3)])
    assert d.get_many(["a", "b", "c", "z"], default=-1) == [1, 2, 3, -1]
    d.set_many({i: str(i) for i in range(2500)})
    assert d.get_many(range(2500)) == [str(i) for i in range(2500)]


def test_iteration_never_raises_while_writing(d):
    for i in range(1000):
        d[i] = i
    seen = []
    for k in d:
        seen.append(k)
        if k < 1000 and k % 10 == 0:
            d[k + 100000] = 0
        assert len(seen) <= 2000
    assert len([k for k in seen if k < 1000]) == 1000      # the keys present throughout: exactly once


def test_lifetime_and_errors(ns):
    name = "shmtest-d-" + os.urandom(3).hex()
    d = ns.SharedDict(name=name)
    assert d.name == name and name in repr(d)
    d["x"] = 1
    e = ns.SharedDict.open(name)
    assert e["x"] == 1
    e["y"] = 2
    assert d["y"] == 2
    with pytest.raises(shm.SegmentExists):
        ns.SharedDict(name=name)
    e.close()
    with d:
        pass
    assert d.closed and "closed" in repr(d)
    for op in (lambda: d["x"], lambda: d.__setitem__("x", 1), lambda: len(d), lambda: d.incr("x")):
        with pytest.raises(shm.Closed):
            op()
    with pytest.raises(shm.SegmentNotFound):
        ns.SharedDict.open(name)         # the last user left: gone
    with pytest.raises(ValueError):
        ns.SharedDict(key_type="int64", value_type="int64") if ns.url != "shm://" else ns.SharedDict(key_type="x")


def test_pickle_round_trip(d):
    d["a"] = 1
    e = pickle.loads(pickle.dumps(d))
    assert e["a"] == 1 and e.name == d.name
    e.close()


def _incr_many(d, n):
    for i in range(n):
        d.incr("hits")
        d.incr(("k", i % 7))
    d.alter("list", lambda v: v + [os.getpid()], default=[])


def test_concurrent_incr_loses_nothing(ns):
    d = ns.SharedDict()
    n = 300
    ctx = _fork()
    ps = [ctx.Process(target=_incr_many, args=(d, n)) for _ in range(3)]
    for p in ps:
        p.start()
    _incr_many(d, n)
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    assert d["hits"] == 4 * n
    assert sum(d[("k", j)] for j in range(7)) == 4 * n
    assert sorted(d["list"]) == sorted([p.pid for p in ps] + [os.getpid()])
    d.close()
