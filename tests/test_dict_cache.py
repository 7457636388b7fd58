"""The per-handle read cache of SharedDict: a value served again must still be the current one.

A handle keeps small immutable values it read and serves them again while
the key's shard lock is free and the shard's version word is unchanged
(``kernels/hashtable.py``, "The version word"). These tests try to catch
it serving a stale value: after every kind of write from another process,
while a write is in progress under the lock, and after an incrementer died
between its two version adds. They also check what it must never hold:
mutable values, and anything after close.
"""
from __future__ import annotations

import multiprocessing as mp

import pytest

import shm
from kernels import layout as L
from kernels import words as W

FORK = mp.get_context("fork")


def _writer(d, conn):
    """Apply each (op, args) the parent sends, then acknowledge."""
    while True:
        msg = conn.recv()
        if msg is None:
            return
        op, args = msg
        if op == "set":
            d[args[0]] = args[1]
        elif op == "del":
            del d[args[0]]
        elif op == "incr":
            d.incr(args[0], args[1])
        elif op == "cas":
            d.compare_and_set(*args)
        elif op == "alter":
            d.alter(args[0], lambda v: (v or "") + "!")
        elif op == "pop":
            d.pop(args[0])
        elif op == "update":
            d.update(args[0])
        elif op == "clear":
            d.clear()
        elif op == "grow":
            d.update({f"g{i}": i for i in range(args[0])})
        conn.send("ok")


def test_reads_see_every_write_from_another_process():
    d = shm.SharedDict(shards=2)
    d.update({"s": "a", 7: 1.5, "i": 10, "b": b"x"})
    here, there = FORK.Pipe()
    p = FORK.Process(target=_writer, args=(d, there))
    p.start()

    def do(op, *args):
        here.send((op, args))
        assert here.recv() == "ok"

    try:
        for _ in range(2):                      # the second read of each is served from the cache
            assert (d["s"], d[7], d["i"], d["b"]) == ("a", 1.5, 10, b"x")
        assert len(d._vc) == 4
        steps = [
            (("set", "s", "b"), lambda: d["s"] == "b"),
            (("set", 7, 2.5), lambda: d[7] == 2.5),
            (("incr", "i", 5), lambda: d["i"] == 15),              # lock-free: bumps the version too
            (("cas", "s", "b", "c"), lambda: d["s"] == "c"),
            (("alter", "s"), lambda: d["s"] == "c!"),
            (("del", "b"), lambda: "b" not in d),
            (("set", "b", b"y"), lambda: d["b"] == b"y"),
            (("pop", "s"), lambda: d.get("s") is None),
            (("update", {"s": "u", "i": 0}), lambda: (d["s"], d["i"]) == ("u", 0)),
            (("grow", 5000), lambda: (d["s"], d[7], d["i"]) == ("u", 2.5, 0)),   # shards move
            (("set", "s", "after growth"), lambda: d["s"] == "after growth"),
            (("clear",), lambda: len(d) == 0 and d.get("s") is None and d.get(7) is None),
        ]
        for (op, *args), check in steps:
            for k in ("s", 7, "i", "b"):
                d.get(k)                        # cache whatever is there now
            do(op, *args)
            assert check(), f"a stale value after {op} {args}"
    finally:
        here.send(None)
        p.join(30)
        d.unlink()
        d.close()
    assert p.exitcode == 0


def test_a_write_under_the_lock_is_never_hidden_by_the_cache():
    """While a writer holds the lock (alive, or dead and not yet recovered), reads go to the table."""
    d = shm.SharedDict(shards=1)
    other = shm.SharedDict.open(d.name)
    try:
        d["k"] = "old"
        assert other["k"] == "old" and other["k"] == "old"       # cached in `other`
        kb = d._key("k")
        with d._locked(d._shard(kb)) as lk:
            lk.store(kb, *d._value("new")[:2], 0)                 # published; version not bumped yet
            assert other["k"] == "new"                            # the held lock makes it miss
        assert other["k"] == "new" and other["k"] == "new"
    finally:
        other.close()
        d.unlink()
        d.close()


def test_an_increment_that_died_mid_add_stops_caching_until_a_compaction():
    d = shm.SharedDict(shards=1)
    try:
        d["k"] = "v"
        vw = (d._table + L.SE_VERSION) >> 3
        # What an incrementer killed between its two version adds leaves behind.
        W.fetch_add(d._ctrl.w, vw, L.VERSION_BUSY + 1)
        d._vc.clear()
        assert d["k"] == "v" and "k" not in d._vc
        d.pop("missing", None)              # a frozen operation: waits out live incrementers, settles
        assert W.load(d._ctrl.w, vw) < L.VERSION_BUSY
        assert d["k"] == "v" and "k" in d._vc
    finally:
        d.unlink()
        d.close()


def test_only_immutable_values_are_handed_out_again():
    d = shm.SharedDict()
    try:
        d.update({"l": [1, 2], "m": {"a": 1}, "long": "x" * 5000, "t": "short"})
        v = d["l"]
        v.append(3)
        assert d["l"] == [1, 2]
        d["m"]["b"] = 2
        assert d["m"] == {"a": 1}
        d["long"]
        d["t"]
        assert set(d._vc) == {"t"}
    finally:
        d.unlink()
        d.close()


def test_the_cache_is_bounded_and_gone_after_close():
    from shm import dict as D
    d = shm.SharedDict()
    try:
        for i in range(D.VALUE_CACHE + 10):
            d[i] = i
            d[i]
            assert len(d._vc) <= D.VALUE_CACHE
        d["k"] = "v"
        assert d["k"] == "v" and d["k"] == "v"
    finally:
        d.unlink()
        d.close()
    with pytest.raises(shm.Closed):
        d["k"]


def test_threads_sharing_a_handle_never_mix_up_what_they_saw():
    """Each read records its shard and version in its own thread's result area, not a shared word."""
    import sys
    import threading
    d = shm.SharedDict(shards=4)
    w = shm.SharedDict.open(d.name)             # writes through another handle: no cache interplay
    keys, shards = [], set()
    for i in range(100):
        s = d._shard(d._key(f"k{i}"))
        if s not in shards:
            shards.add(s)
            keys.append(f"k{i}")
    stop = threading.Event()

    def spin(k):
        while not stop.is_set():
            d.get(k)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                 # switch threads as often as possible
    threads = [threading.Thread(target=spin, args=(k,)) for k in keys[1:]]
    try:
        for t in threads:
            t.start()
        for n in range(3000):
            for k in keys:
                w[k] = f"v{n}"
            for k in keys:
                assert d[k] == f"v{n}", f"{k}: stale after write {n}"
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        sys.setswitchinterval(old)
        w.close()
        d.unlink()
        d.close()


def test_repeated_reads_are_served_without_reading_the_table():
    """A hit costs no kernel call: the handle's operation count (stats().ops) does not move."""
    d = shm.SharedDict(shards=4)
    try:
        d.update({"s": "a", 7: 1.5, "i": 10, "l": [1]})
        for k in ("s", 7, "i", "l"):
            d[k]
        before = d.stats().ops
        for _ in range(100):
            assert (d["s"], d[7], d["i"]) == ("a", 1.5, 10)
        assert d.stats().ops == before
        for _ in range(10):
            d["l"]                              # a list: read from the table every time
        assert d.stats().ops == before + 10
        kb = d._key("s")
        lock_w = (d._table + d._shard(kb) * L.SE_SIZE + L.SE_LOCK) >> 3
        assert d._vc["s"][:2] == (lock_w, W.load(d._ctrl.w, lock_w + ((L.SE_VERSION - L.SE_LOCK) >> 3)))
    finally:
        d.unlink()
        d.close()
