"""SharedDict: the MutableMapping contract, dict's methods, keys, values, errors."""
from __future__ import annotations

import collections.abc
import errno
import math
import os
import signal
import pickle

import numpy as np
import pytest

import shm
from shm._keys import decode_key, encode_key


@pytest.fixture
def d():
    x = shm.SharedDict()
    yield x
    x.close()


def test_basic_mapping(d):
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
    assert sorted(map(str, d.values())) == sorted(map(str, [[1, 2], {"x": None}]))
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


def test_overwrites_and_types(d):
    for v in (1, "one", 1.5, None, True, [1], {"n": 1}, b"raw", 2**64 - 1, -(2**63), 2**63 - 1):
        d["x"] = v
        got = d["x"]
        assert got == v and type(got) is type(v) if not isinstance(v, tuple) else True
    d["x"] = 5
    d["x"] = "now a string"
    d["x"] = 6
    assert d["x"] == 6 and len(d) == 1
    with pytest.raises(TypeError) as e:        # beyond what msgpack can carry: the fix is named
        d["y"] = 2**70
    assert "pickle" in str(e.value) and "y" not in d
    p = shm.SharedDict(codec="pickle")
    p["y"] = 2**70
    assert p["y"] == 2**70
    p.close()


def test_canonical_keys(d):
    d[1] = "one"
    assert d[1.0] == "one" and d[True] == "one"
    d[True] = "true"
    assert d[1] == "true" and len(d) == 1
    d[0.0] = "zero"
    assert d[-0.0] == "zero" and d[0] == "zero" and d[False] == "zero"
    d[2.5] = "float"
    assert d[2.5] == "float"
    d["1"] = "str"
    d[b"1"] = "bytes"
    assert d[1] == "true" and d["1"] == "str" and d[b"1"] == "bytes"
    d[None] = "none"
    d[(1, "a", (b"x", None))] = "tuple"
    assert d[(1.0, "a", (b"x", None))] == "tuple"
    d[2**100] = "big"
    assert d[2**100] == "big" and d[float(2**100)] == "big"     # 2.0**100 == 2**100, as in a dict
    d[1e20] = "1e20"
    assert d[10**20] == "1e20" and 10**20 in list(d)
    d[float("nan")] = "nan"
    assert d[float("nan")] == "nan"          # every NaN is one key
    keys = list(d)
    nans = [k for k in keys if isinstance(k, float) and math.isnan(k)]
    assert len(nans) == 1
    assert {k for k in keys if k not in nans} == {1, 0, 2.5, "1", b"1", None, (1, "a", (b"x", None)), 2**100, 10**20}


@pytest.mark.parametrize("key", ["", "é", "\ud800", b"", b"\0" * 100, 0, -1, 2**63 - 1, -(2**63), 2**64,
                                 1.5, -1e300, None, (), ((),), ("a", 1, 2.5, None, b"b")])
def test_key_encoding_round_trip(key):
    assert decode_key(encode_key(key)) == key or (isinstance(key, float) and math.isnan(key))


def test_wrong_key_types_leave_the_table_unchanged(d):
    d["a"] = 1
    for bad in ([1], {"a": 1}, {1}, object(), np.int64(3).tobytes().__class__ and bytearray(b"x")):
        with pytest.raises(TypeError) as e:
            d[bad] = 1
        assert "SharedDict keys must be" in str(e.value)
    with pytest.raises(TypeError):
        d[[1]]
    with pytest.raises(TypeError):
        [1] in d
    assert d.copy() == {"a": 1}


def test_unencodable_values_leave_the_table_unchanged(d):
    d["a"] = 1
    with pytest.raises(TypeError) as e:
        d["b"] = {1, 2}
    assert "msgpack" in str(e.value) and "pickle" in str(e.value)
    with pytest.raises(TypeError):
        d["a"] = object()
    assert d.copy() == {"a": 1}


def test_pickle_codec_takes_any_object():
    d = shm.SharedDict(codec="pickle")
    d["s"] = {1, 2}
    d["t"] = (1, 2)
    d["c"] = complex(1, 2)
    assert d["s"] == {1, 2} and d["t"] == (1, 2) and d["c"] == complex(1, 2)
    d.close()


def test_big_values_and_many_keys():
    d = shm.SharedDict(shards=4)
    big = os.urandom(5 << 20)
    d["big"] = big
    assert d["big"] == big
    n = 30000
    for i in range(n):
        d[i] = i * 2
    assert len(d) == n + 1 and d[n - 1] == 2 * (n - 1)
    st = d.stats()
    assert st.keys == n + 1 and st.growths > 4 and sum(st.per_shard_keys) == n + 1
    # Space freed by deletes is reclaimed by compaction.
    for i in range(n):
        del d[i]
    d["big"] = b"small now"
    before = d.stats().segment_bytes
    for i in range(2000):
        d[f"churn{i % 10}"] = os.urandom(500)
    after = d.stats()
    assert after.keys == 11 and after.segment_bytes < before
    d.close()


def test_incr(d):
    assert d.incr("n") == 1
    assert d.incr("n", 10) == 11
    assert d.incr("n", -20) == -9
    assert d.incr("m", 5, default=100) == 105
    d["f"] = 1.5
    assert d.incr("f", 1) == 2.5 and d["f"] == 2.5
    d["s"] = "text"
    with pytest.raises(TypeError):
        d.incr("s")
    assert d["s"] == "text"
    d["big"] = 2**63 - 1
    assert d.incr("big") == 2**63        # leaves int64: stored through the codec, still exact
    assert d["big"] == 2**63 and d.incr("big", -1) == 2**63 - 1


def test_compare_and_set_and_alter(d):
    d["k"] = 1
    assert not d.compare_and_set("k", 2, 3)
    assert d.compare_and_set("k", 1, 3) and d["k"] == 3
    assert not d.compare_and_set("missing", None, 1) and "missing" not in d
    assert d.alter("k", lambda v: v * 10) == 30 and d["k"] == 30
    assert d.alter("new", lambda v: v + [1], default=[]) == [1]
    with pytest.raises(KeyError):
        d.alter("nothing", lambda v: v)
    with pytest.raises(ZeroDivisionError):
        d.alter("k", lambda v: v / 0)
    assert d["k"] == 30
    d["k"] = 31                          # the lock was released after the exception
    assert d["k"] == 31


def test_get_many_set_many(d):
    d.set_many({"a": 1, "b": 2})
    d.set_many([("c", 3)])
    assert d.get_many(["a", "b", "c", "z"], default=-1) == [1, 2, 3, -1]


def test_iteration_never_raises_while_writing(d):
    for i in range(2000):
        d[i] = i
    seen = []
    for k in d:
        seen.append(k)
        if k < 2000:
            d[k + 100000] = 0            # writes (and growth) during iteration
        assert len(seen) <= 4000         # each key at most once: the loop ends
    assert set(range(2000)) <= set(seen)
    assert len([k for k in seen if k < 2000]) == 2000     # the keys present throughout: exactly once


def test_lifetime_and_errors():
    d = shm.SharedDict(name="shmtest-d-" + os.urandom(3).hex())
    name = d.name
    assert name in repr(d) and "keys=0" in repr(d)
    d["x"] = 1
    e = shm.SharedDict.open(name)
    assert e["x"] == 1
    e["y"] = 2
    assert d["y"] == 2
    e.close()
    with d:
        pass
    assert d.closed and "closed" in repr(d)
    for op in (lambda: d["x"], lambda: d.__setitem__("x", 1), lambda: len(d), lambda: d.incr("x")):
        with pytest.raises(shm.Closed):
            op()
    with pytest.raises(shm.SegmentNotFound):
        shm.SharedDict.open(name)         # the last user left: unlinked
    with pytest.raises(shm.SegmentNotFound):
        shm.SharedDict.open("no-such-dict-" + os.urandom(3).hex())


def test_wrong_kind_and_corruption():
    tx, rx = shm.bounded(2)
    with pytest.raises(shm.WrongKind):
        shm.SharedDict.open(tx.name)
    tx.close(); rx.close()
    d = shm.SharedDict()
    with pytest.raises(shm.WrongKind):
        shm.Sender.open(d.name)
    from kernels import layout as L
    d._ctrl.u8[L.SEG_NAME] ^= 0xFF        # scribble on the header: the CRC catches it
    with pytest.raises(shm.CorruptSegment):
        shm.SharedDict.open(d.name)
    d._ctrl.u8[L.SEG_NAME] ^= 0xFF
    d.close()


def test_pickle_round_trip_in_process(d):
    d["a"] = 1
    e = pickle.loads(pickle.dumps(d))
    assert e["a"] == 1 and e.name == d.name
    e.close()


def test_stats(d):
    d.update({i: "v" * i for i in range(100)})
    st = d.stats()
    assert st.keys == 100 and st.shards == len(st.per_shard_keys) and st.participants == 1
    assert st.bytes_used > sum(range(100)) and st.lock_waits >= 0 and st.repairs == 0


# --------------------------------------------------------------------------
# Numeric mode.

def test_numeric_mode_types():
    d = shm.SharedDict(key_type="int64", value_type="int64", capacity=1000)
    d[1] = 10
    d[-(2**63)] = 2**63 - 1
    assert d[1] == 10 and d[-(2**63)] == 2**63 - 1
    assert d.incr(1, 5) == 15 and d.incr(7) == 1
    with pytest.raises(TypeError):
        d["str"] = 1
    with pytest.raises(TypeError):
        d[2] = "x"
    with pytest.raises(TypeError):
        d[2] = 1.5
    assert sorted(d) == [-(2**63), 1, 7] and d.copy() == {1: 15, -(2**63): 2**63 - 1, 7: 1}
    d.close()
    f = shm.SharedDict(key_type="int64", value_type="float64")
    f[3] = 1.25
    f[4] = 2
    assert f[3] == 1.25 and f[4] == 2.0 and type(f[4]) is float
    f.close()
    with pytest.raises(ValueError):
        shm.SharedDict(key_type="int64")


def test_numeric_mode_from_njit():
    import numba
    from kernels import hashtable as H
    from kernels import layout as L

    @numba.njit
    def bump_all(desc, n, rounds):
        for _ in range(rounds):
            for k in range(n):
                st, v = H.incr_i64(desc, k, 1)
                if st != 0:
                    return st, k
        return 0, 0

    @numba.njit
    def fill(desc, n):
        for k in range(n):
            st = H.put_i64(desc, k, L.VK_I64, 0, 1000)
            if st < 0:
                return st, k
        return 0, 0

    @numba.njit
    def total(desc, n):
        s = 0
        for k in range(n):
            st, v = H.lookup_i64(desc, k)
            if st != 0:
                return -1
            s += v
        return s

    d = shm.SharedDict(key_type="int64", value_type="int64", shards=2)
    n = 5000
    k0 = 0
    while True:                            # the shards grow from Python when the kernel asks
        st, k = fill(d.kernel(), n)
        if st == 0:
            break
        assert st in (H.NEED_GROW, H.MOVED, H.UNMAPPED)
        d.grow_for(k) if st == H.NEED_GROW else d.refresh()
        k0 = k
    assert k0 >= 0
    assert bump_all(d.kernel(), n, 10) == (0, 0)
    assert total(d.kernel(), n) == 10 * n
    assert d[n - 1] == 10 and len(d) == n
    d.close()


def test_many_threads_over_time(d):
    # Each thread takes a result bank inside the kernels; banks of threads
    # that exited are given back, so a process can outlive many thread pools.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    d["n"] = 0
    for _ in range(30):
        t = threading.Thread(target=lambda: (d.incr("n"), d["n"]))
        t.start()
        t.join()
    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(lambda i: d.incr("n") > 0 and d["n"] > 0, range(400)))
    assert d["n"] == 30 + 400


def test_memory_follows_the_data():
    # A big value costs about its size (not a power of two above twice it),
    # and replacing or deleting it gives the memory back.
    d = shm.SharedDict(shards=1)
    base = d.stats().segment_bytes
    d["v"] = b"x" * (64 << 20)
    assert len(d["v"]) == 64 << 20
    assert d.stats().segment_bytes < (64 << 20) * 1.2
    d["v"] = 1
    assert d["v"] == 1 and d.stats().segment_bytes < base + (1 << 20)
    for i in range(40):
        d[i] = b"y" * 100_000
    grown = d.stats().segment_bytes
    for i in range(40):
        del d[i]
    # Garbage is compacted away once it is half the heap and over 1 MiB.
    assert len(d) == 1 and grown > 4_000_000 and d.stats().segment_bytes < base + (2 << 20)
    # Many small keys: a small constant per key over their bytes.
    for i in range(100_000):
        d[f"key{i:07d}"] = i
    assert d.stats().segment_bytes / 100_000 < 160
    d.close()


def test_out_of_shared_memory_leaves_the_dict_usable():
    st = os.statvfs("/dev/shm")
    too_big = st.f_blocks * st.f_frsize + 2**30
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(shm.OutOfSharedMemory) as e:
        shm.SharedDict(capacity=too_big // 8)
    assert "--shm-size" in str(e.value)
    assert set(os.listdir("/dev/shm")) == before            # nothing left behind
    d = shm.SharedDict(shards=1)
    d["n"] = 1
    d["s"] = "x"
    with pytest.raises(shm.OutOfSharedMemory):
        with d._locked(0) as lk:
            lk.compact(too_big)                              # a growth /dev/shm cannot hold
    from kernels import layout as L
    from shm import dict as D
    assert D._STAT(d._daddr, 0, L.SH_STATE) == L.SHARD_LIVE  # not left frozen to lock-free incr
    assert d.copy() == {"n": 1, "s": "x"}
    assert d.incr("n") == 2
    d["t"] = "y"
    del d["s"]
    assert d.copy() == {"n": 2, "t": "y"}
    d.close()


def test_iterating_after_close_raises_closed():
    d = shm.SharedDict(shards=2)
    d.update({i: i for i in range(10)})
    it = iter(d)
    next(it)
    d.close()
    with pytest.raises(shm.Closed):
        list(it)                      # never a read of unmapped memory
    with pytest.raises(shm.Closed):
        len(d)


def test_deletes_alone_give_memory_back():
    d = shm.SharedDict(shards=1)
    for i in range(60):
        d[i] = b"y" * 100_000
    full = d.stats().segment_bytes
    for i in range(60):
        del d[i]
    assert len(d) == 0 and full > 6_000_000 and d.stats().segment_bytes < 1_500_000
    d.close()


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _hold_lock_and_die(d):
    with d._locked(0, freeze=True):
        os.kill(os.getpid(), signal.SIGKILL)


def test_full_dev_shm_during_recovery_and_shrink(monkeypatch):
    # /dev/shm full (posix_fallocate fails) exactly when a dead holder's
    # shard needs rebuilding, or a SHRINK hint wants compacting: writes still
    # succeed on the old generation, nothing is reported failed that was done,
    # and no lock stays held.
    import multiprocessing as mp
    d = shm.SharedDict(shards=1)
    for i in range(40):
        d[i] = b"y" * 100_000
    p = mp.get_context("fork").Process(target=_hold_lock_and_die, args=(d,))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    monkeypatch.setattr(os, "posix_fallocate", _enospc)
    d["k"] = 2                               # recovers the dead holder's lock; the rebuild fails quietly
    assert d.pop("k") == 2 and "k" not in d
    for i in range(40):
        del d[i]                             # each may say SHRINK; the compaction fails quietly
    assert len(d) == 0 and d.incr("n") == 1
    monkeypatch.undo()
    d["after"] = 1                           # space is back: the next growth or shrink works
    for i in range(40):
        d[("x", i)] = b"z" * 100_000
    assert len(d) == 42
    d.close()


def test_a_million_keys():
    # From empty to a million keys, growing online; memory stays a small
    # constant per key over the key and value bytes.
    n = 1_000_000
    d = shm.SharedDict()
    for i in range(n):
        d[f"k{i}"] = i
    assert len(d) == n and d["k0"] == 0 and d[f"k{n - 1}"] == n - 1
    assert sum(1 for _ in d) == n
    st = d.stats()
    assert st.keys == n and st.growths >= 3 * st.shards
    assert st.segment_bytes / n < 160, f"{st.segment_bytes / n:.0f} bytes per key"
    d.close()


def test_str_values_are_stored_as_utf8_and_read_back_exactly():
    """str values skip the codec (UTF-8 with their own kind) where the codec would take them anyway."""
    from kernels import layout as L
    from shm import dict as D
    samples = ["", "a", "héllo ✓ 𝄞", "x" * 600, "y" * 5000]
    for codec in ("msgpack", "pickle"):
        d = shm.SharedDict(codec=codec)
        try:
            for i, s in enumerate(samples):
                d[i] = s
                d.update({f"u{i}": s})
                assert d.setdefault(f"s{i}", s) == s
            other = shm.SharedDict.open(d.name)
            for i, s in enumerate(samples):
                assert d[i] == s and other[i] == s and d[f"u{i}"] == s and d[f"s{i}"] == s
                assert type(other[i]) is str
            assert sorted(d.values(), key=len)[-1] == "y" * 5000
            other.close()
            if codec == "pickle":
                d["sur"] = "\ud800"                 # not UTF-8: the codec (pickle) takes it
                assert d["sur"] == "\ud800"
            else:
                with pytest.raises(TypeError, match="pickle"):
                    d["sur"] = "\ud800"
            kb = d._key(0)
            bad = b"\xff\xfe"                       # a damaged UTF-8 record: a named error
            assert D._PUT(d._daddr, id(kb) + D._OFF, len(kb), L.VK_STR, id(bad) + D._OFF, len(bad), 0) >= 0
            d._vc.clear()
            with pytest.raises(shm.DecodeError):
                d[0]
        finally:
            d.unlink()
            d.close()
    raw = shm.SharedDict(codec="bytes")
    try:
        with pytest.raises(TypeError):
            raw["k"] = "a str"                      # the bytes codec still refuses str
    finally:
        raw.unlink()
        raw.close()


def test_numeric_mode_takes_numpy_integer_keys():
    d = shm.SharedDict(key_type="int64", value_type="int64")
    try:
        d[np.int64(5)] = np.int64(7)
        d[np.int32(-3)] = 1
        assert d[5] == 7 and d[np.int64(5)] == 7 and d[-3] == 1 and np.uint8(5) in d
        assert d.incr(np.int64(5)) == 8
        assert sorted(d) == [-3, 5] and all(type(k) is int for k in d)
        with pytest.raises(TypeError, match="int64"):
            d[np.uint64(2**63)] = 1                  # beyond int64
        with pytest.raises(TypeError):
            d[np.float64(1.0)] = 1                   # not an integer type
    finally:
        d.unlink()
        d.close()
