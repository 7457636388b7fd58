"""SharedDict's str-key write path: kernels that take the key and value objects themselves.

``d[k] = v`` with a str key calls ``put_str_*_at`` with the str (and an
int, a str, or the codec's bytes): the kernel builds the key's canonical
encoding itself. These tests pin that it stores exactly what the general
path (``encode_key`` + ``put_at``) stores, and that everything it cannot
take falls back to the general path with the same results and errors.
"""
from __future__ import annotations

import pytest

import shm
from kernels import hashtable as H
from kernels import layout as L
from shm import dict as D
from shm._keys import encode_key

KEYS = ["", "a", "key1234", "héllo ✓ 𝄞", "x" * (H.KEYBUF - 2), "y" * (H.KEYBUF - 1), "z" * H.KEYBUF,
        "w" * 5000, "\ud800 lone", "nul\x00inside", "ü" * H.STR_UTF8_MAX, "ü" * (H.STR_UTF8_MAX + 1)]
VALUES = [0, 1, -1, 2**63 - 1, -2**63, 2**63, 2**64 - 1, True, False, None, 1.5, float("inf"),
          "", "s", "héllo ✓ 𝄞", "v" * 600, "ü" * (H.STR_UTF8_MAX + 1), b"", b"\x00\xff", [1, "a"], {"k": [None]}]


@pytest.fixture
def d():
    x = shm.SharedDict()
    yield x
    x.unlink()
    x.close()


def _fast(d, key) -> bool:
    """True if ``d[key] = ...`` went through the str-key kernels (the general path caches the key's encoding)."""
    return key not in d._kc


def test_every_key_and_value_round_trips_through_another_handle(d):
    other = shm.SharedDict.open(d.name)
    try:
        for i, k in enumerate(KEYS):
            for v in VALUES:
                d[k] = v
                got = other[k]
                assert got == v and type(got) is type(v), (k[:20], v)
                assert d[k] == v and type(d[k]) is type(v)
            other[k] = i                         # and the other way round
            assert d[k] == i
        assert sorted(other) == sorted(KEYS) and len(d) == len(KEYS)
        # What the kernels stored is the canonical encoding the general path finds.
        for k in KEYS:
            kb = encode_key(k)
            r = D._GET(other._daddr, id(kb) + D._OFF, len(kb))
            assert r >= 0, k[:20]
    finally:
        other.close()


def test_the_kernels_take_what_they_should(d):
    d["ascii"] = 1
    d["ünïcode"] = "ü"
    d["short"] = "str"
    d["bytes"] = b"raw"
    d["list"] = [1, 2]
    d["y" * (H.KEYBUF - 1)] = 1                  # b"s" + 511 bytes: exactly the key buffer
    for k in ("ascii", "ünïcode", "short", "bytes", "list", "y" * (H.KEYBUF - 1)):
        assert _fast(d, k), k
    d["z" * H.KEYBUF] = 1                        # one byte more: the general path
    d["\udc80"] = 1                              # a lone surrogate (surrogatepass in encode_key)
    d["big"] = 2**64 - 1                         # beyond int64: the codec (msgpack: a uint64)
    for k in ("z" * H.KEYBUF, "\udc80", "big"):
        assert not _fast(d, k), k
    assert d["z" * H.KEYBUF] == 1 and d["\udc80"] == 1 and d["big"] == 2**64 - 1


def test_long_non_ascii_strs_get_no_utf8_copy_attached(d):
    """CPython keeps the UTF-8 it makes for a non-ASCII str on the str: only short ones may get one."""
    import sys
    v = "ü" * (H.STR_UTF8_MAX + 1)
    k = "ключ" * 100
    sv, sk = sys.getsizeof(v), sys.getsizeof(k)
    d["k"] = v
    d[k] = 1
    d[k] = v
    assert sys.getsizeof(v) == sv and sys.getsizeof(k) == sk
    assert d["k"] == v and d[k] == v and not _fast(d, k)
    short = "ключ"
    d[short] = short
    assert _fast(d, short) and d[short] == short
    with pytest.raises(ValueError):
        D._PUT_STR_STR(d._daddr, "k", v)


def test_wrong_objects_raise_instead_of_reaching_the_kernel(d):
    with pytest.raises(TypeError):
        D._PUT_STR_I64(d._daddr, b"not a str", 1)
    with pytest.raises(TypeError):
        D._PUT_STR_STR(d._daddr, "k", b"not a str")
    with pytest.raises(TypeError):
        D._PUT_STR_BYTES(d._daddr, "k", "not bytes", L.VK_STR)
    with pytest.raises(OverflowError):
        D._PUT_STR_I64(d._daddr, "k", 2**64)
    with pytest.raises(OverflowError):
        D._PUT_STR_I64(d._daddr, "k", -2**63 - 1)
    with pytest.raises(TypeError):
        D._PUT_STR_I64(d._daddr, "k", 1.5)
    with pytest.raises(TypeError):
        D._PUT_STR_I64(float(d._daddr), "k", 1)
    with pytest.raises(UnicodeEncodeError):
        D._PUT_STR_STR(d._daddr, "\ud800", "v")
    assert len(d) == 0


def test_int64_edges_through_the_int_kernel(d):
    for v in (-1, 0, 2**31, 2**32 + 5, 2**62, 2**63 - 1, -2**63, -2**31 - 7):
        assert D._PUT_STR_I64(d._daddr, "e", v) >= 0
        assert d["e"] == v and type(d["e"]) is int


def test_unencodable_values_and_numeric_mode_still_refuse(d):
    d["k"] = "before"
    with pytest.raises(TypeError, match="pickle"):
        d["k"] = "\ud800"                        # msgpack refuses lone surrogates: unchanged
    with pytest.raises(TypeError):
        d["k"] = object()
    assert d["k"] == "before"
    n = shm.SharedDict(key_type="int64", value_type="int64")
    try:
        with pytest.raises(TypeError, match="int64"):
            n["k"] = 1
        assert len(n) == 0
    finally:
        n.unlink()
        n.close()
    p = shm.SharedDict(codec="pickle")
    try:
        p["sur"] = "\ud800"                      # pickle takes it: the general path stores it
        assert p["sur"] == "\ud800"
    finally:
        p.unlink()
        p.close()


def test_closed_dict_raises_closed():
    x = shm.SharedDict()
    x["a"] = 1
    x.close()
    with pytest.raises(shm.Closed):
        x["a"] = 2
    with pytest.raises(shm.Closed):
        x["b"] = "s"
    with pytest.raises(shm.Closed):
        x["c"] = [1]


def test_growth_and_overwrites_through_the_fast_path():
    x = shm.SharedDict(shards=1)                 # starts tiny: every kind of NEED_GROW on the way
    try:
        n = 5000
        for r in range(3):
            for i in range(n):
                x[f"k{i}"] = i + r if i % 3 == 0 else (f"s{i}-{r}" if i % 3 == 1 else [i, r])
        assert len(x) == n
        for i in range(n):
            v = x[f"k{i}"]
            assert v == (i + 2 if i % 3 == 0 else (f"s{i}-2" if i % 3 == 1 else [i, 2]))
        assert x.stats().growths > 0
    finally:
        x.unlink()
        x.close()


def test_read_cache_sees_fast_path_writes(d):
    other = shm.SharedDict.open(d.name)
    try:
        d["k"] = 1
        assert other["k"] == 1 and other["k"] == 1       # the second read is served from the cache
        d["k"] = 2                                        # int over int: in place, under the lock
        assert other["k"] == 2
        d["k"] = "two"
        assert other["k"] == "two"
        d["k"] = b"2"
        assert other["k"] == b"2"
    finally:
        other.close()


def test_threads_share_the_key_buffer_safely(d):
    import threading

    errors = []

    def work(t):
        try:
            for i in range(3000):
                k = f"t{t}-{i}" + "é" * (i % 3)
                d[k] = f"{t}:{i}"
                if d[k] != f"{t}:{i}":
                    errors.append(k)
        except Exception as e:          # pragma: no cover
            errors.append(repr(e))

    ts = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == [] and len(d) == 4 * 3000
