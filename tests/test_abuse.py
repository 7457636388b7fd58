"""Bad input through the public API: every call here is wrong on purpose.

Each case asserts the named exception (an ``shm.ShmError`` subclass, or the
``ValueError``/``TypeError``/``KeyError`` a Python API owes its caller) and
then that the structure it was aimed at, or that sits next to it, still
works: a refused call changes nothing.

The checklist of issue 6: wrong names (nonexistent, invalid characters, too
long, not a str), wrong kinds (a dict opened as a channel or a queue, a
channel, a ring generation or a shard opened as a dict, a file that is not
ours), other layout versions (the header's version patched and re-sealed),
oversized requests, unencodable values (channels, queues, dict), wrong key
types (every dict method that takes a key; numeric mode), and bad timeouts
(negative, NaN, not a number) on every call that blocks. ``SharedDict``
takes no timeouts: its only waits are for a shard lock, bounded by its
holder (or recovered from a dead one).

Not repeated here, already in the files that own them: a flipped header byte
and a foreign file at the segment level (``test_segment.py``), codec
refusals object by object (``test_codec.py``), ``Sender.open`` of a missing
or slashed name, a negative timeout on ``send``/``recv``/``Queue.get``,
``bounded(-1)``/``bounded(2.5)`` (``test_channel.py``, ``test_queues.py``),
``SharedDict.open`` of a channel, ``Sender.open`` of a dict, bad keys for
``[]``/``in`` and msgpack-refused values for ``[]=`` (``test_dict.py``).
"""
from __future__ import annotations

import math
import os
import queue
import secrets
import threading
import zlib

import numpy as np
import pytest

import shm
from kernels import layout as L


@pytest.fixture
def chan():
    tx, rx = shm.bounded(4)
    yield tx, rx
    tx.close()
    rx.close()


@pytest.fixture
def d():
    d = shm.SharedDict(shards=1)
    yield d
    d.close()


def _works(tx, rx):
    tx.send("still works", timeout=5)
    assert rx.recv(timeout=5) == "still works"


def _dict_works(d):
    d["still"] = d.get("still", 0) + 1
    assert d["still"] >= 1


# --------------------------------------------------------------------------
# Names.

OPENERS = {
    "Sender.open": shm.Sender.open,
    "Receiver.open": shm.Receiver.open,
    "Queue.open": shm.Queue.open,
    "JoinableQueue.open": shm.JoinableQueue.open,
    "SharedDict.open": shm.SharedDict.open,
}
BAD_NAMES = {
    "empty": "", "slash": "a/b", "dot first": ".hidden", "dash first": "-x", "space": "a b",
    "not ascii": "é", "nul": "a\0b", "64 chars": "x" * 64, "only a slash": "/",
}


@pytest.mark.parametrize("opener", OPENERS)
def test_open_with_a_bad_name(opener, chan):
    open_ = OPENERS[opener]
    for why, name in BAD_NAMES.items():
        with pytest.raises(ValueError, match="invalid name"):
            open_(name)
    for name in (None, 42, b"shm_abc", ["shm_abc"]):
        with pytest.raises(TypeError, match="must be a str"):
            open_(name)
    with pytest.raises(shm.SegmentNotFound):
        open_("x" * 63)                       # the longest valid name, of nothing
    with pytest.raises(shm.SegmentNotFound):
        open_("/shm_nothing_" + secrets.token_hex(4))      # a leading slash is allowed
    _works(*chan)


@pytest.mark.parametrize("make", [
    lambda n: shm.bounded(2, name=n), lambda n: shm.unbounded(name=n), lambda n: shm.rendezvous(name=n),
    lambda n: shm.Queue(name=n), lambda n: shm.JoinableQueue(3, name=n), lambda n: shm.SimpleQueue(name=n),
    lambda n: shm.SharedDict(n)], ids=["bounded", "unbounded", "rendezvous", "Queue", "JoinableQueue",
                                        "SimpleQueue", "SharedDict"])
def test_create_with_a_bad_name_leaves_nothing(make, chan):
    before = set(os.listdir("/dev/shm"))
    for name in ("a/b", "x" * 64, "", ".x", "é"):
        with pytest.raises(ValueError, match="invalid name"):
            make(name)
    with pytest.raises(TypeError):
        make(7)
    assert set(os.listdir("/dev/shm")) == before
    _works(*chan)


def test_create_with_a_taken_name(chan, d):
    tx, rx = chan
    for make in (lambda: shm.unbounded(name=tx.name), lambda: shm.Queue(name=d.name),
                 lambda: shm.SharedDict(tx.name)):
        with pytest.raises(shm.SegmentExists):
            make()
    _works(tx, rx)
    _dict_works(d)


# --------------------------------------------------------------------------
# Kinds.

@pytest.mark.parametrize("opener", ["Sender.open", "Receiver.open", "Queue.open", "JoinableQueue.open"])
def test_a_dict_opened_as_a_channel(opener, d):
    with pytest.raises(shm.WrongKind, match="holds a dict, not a channel"):
        OPENERS[opener](d.name)
    _dict_works(d)


def test_a_queue_opened_as_a_dict():
    q = shm.JoinableQueue()
    with pytest.raises(shm.WrongKind, match="holds a channel, not a dict"):
        shm.SharedDict.open(q.name)
    q.put(1)
    assert q.get(timeout=5) == 1
    q.task_done()
    q.close()


def test_derived_segments_opened_as_structures(d):
    tx, rx = shm.unbounded(slot_size=0)
    tx.send_many(range(300))                       # past generation 0: a ring segment of its own
    tx.send("x" * 5000)                            # a blob segment
    fam = tx._c.family
    derived = sorted(n for n in os.listdir("/dev/shm") if n.startswith(fam) and n != tx.name)
    assert any("p" in n[len(fam):] for n in derived) and any("p" not in n[len(fam):] for n in derived)
    shards = [n for n in os.listdir("/dev/shm") if n.startswith(d._family) and n != d.name]
    for name in derived + shards:
        kind = "dict shard" if name in shards else "blob" if "p" in name[len(fam):] else "ring"
        for open_ in (shm.Receiver.open, shm.Queue.open):
            with pytest.raises(shm.WrongKind, match=f"holds a {kind}, not a channel"):
                open_(name)
        with pytest.raises(shm.WrongKind, match=f"holds a {kind}, not a dict"):
            shm.SharedDict.open(name)
    assert rx.recv_many(1000, timeout=5) == list(range(300)) + ["x" * 5000]
    _works(tx, rx)
    _dict_works(d)
    tx.close(); rx.close()


@pytest.mark.parametrize("opener", OPENERS)
def test_a_file_that_is_not_ours(opener, chan):
    name = f"test-foreign-{secrets.token_hex(4)}"
    with open(f"/dev/shm/{name}", "wb") as f:
        f.write(b"\x7fELF" + secrets.token_bytes(8188))
    try:
        with pytest.raises(shm.IncompatibleSegment, match="not an shm structure"):
            OPENERS[opener](name)
    finally:
        os.unlink(f"/dev/shm/{name}")
    _works(*chan)


# --------------------------------------------------------------------------
# Layout versions.

def _patch(seg, off, value):
    """Overwrite an immutable header word and re-seal the CRC: a well-formed header of another shm."""
    old = int(seg.w[off >> 3])
    seg.w[off >> 3] = value
    seg.w[L.SEG_CRC >> 3] = zlib.crc32(bytes(seg.u8[:L.SEG_CRC]))
    return old


_OPEN_CHILD = r"""
import sys, shm
for opener, name in zip(sys.argv[1::2], sys.argv[2::2]):
    cls, _, meth = opener.partition(".")
    try:
        h = getattr(getattr(shm, cls), meth)(name)
    except Exception as e:
        print(f"{type(e).__name__}: {e}")
    else:
        print("opened")
        h.close()
"""


def _open_elsewhere(*pairs):
    """What each ``opener(name)`` does in a fresh interpreter (one that has no handle cached)."""
    import subprocess
    import sys
    args = [x for pair in pairs for x in pair]
    p = subprocess.run([sys.executable, "-c", _OPEN_CHILD, *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.splitlines()


@pytest.mark.parametrize("version", [0, L.LAYOUT_VERSION + 1, 2**62])
def test_other_layout_version(version):
    q = shm.Queue()
    d = shm.SharedDict(shards=1)
    d["a"] = 1
    old_q = _patch(q._tx._c.ctrl, L.SEG_VERSION, version)
    old_d = _patch(d._ctrl, L.SEG_VERSION, version)
    want = f"IncompatibleSegment: segment {{!r}} has layout version {version}, this shm reads version " \
           f"{L.LAYOUT_VERSION}: open it with the shm release that created it"
    openers = ["Sender.open", "Receiver.open", "Queue.open", "JoinableQueue.open", "SharedDict.open"]
    got = _open_elsewhere(*[(o, q.name) for o in openers], *[(o, d.name) for o in openers])
    assert got == [want.format(q.name)] * 5 + [want.format(d.name)] * 5
    with pytest.raises(shm.IncompatibleSegment, match=f"layout version {version}"):
        shm.SharedDict.open(d.name)          # every SharedDict handle attaches for itself
    q.put({"a": 1})                          # handles already open validated the header when they attached
    assert q.get(timeout=5) == {"a": 1} and d["a"] == 1
    _patch(q._tx._c.ctrl, L.SEG_VERSION, old_q)
    _patch(d._ctrl, L.SEG_VERSION, old_d)
    assert _open_elsewhere(("Queue.open", q.name), ("SharedDict.open", d.name)) == ["opened"] * 2
    q.put(2)
    assert q.get(timeout=5) == 2
    _dict_works(d)
    q.close()
    d.close()


def test_a_resealed_header_naming_another_kind(chan, d):
    """The kind word itself rewritten (and the CRC made right): refused by kind, not by CRC."""
    tx, rx = chan
    _patch(tx._c.ctrl, L.SEG_KIND, L.KIND_DICT)
    _patch(d._ctrl, L.SEG_KIND, L.KIND_CHANNEL)
    got = _open_elsewhere(("Receiver.open", tx.name), ("SharedDict.open", tx.name), ("Sender.open", d.name))
    assert got[0].startswith("WrongKind:") and "holds a dict, not a channel" in got[0]
    assert got[1].startswith("CorruptSegment:"), got[1]       # a "dict" whose parameters are a channel's
    assert got[2].startswith("CorruptSegment:"), got[2]       # a "channel" whose parameters are a dict's
    _patch(tx._c.ctrl, L.SEG_KIND, L.KIND_CHANNEL)
    _patch(d._ctrl, L.SEG_KIND, L.KIND_DICT)
    _works(tx, rx)
    _dict_works(d)


# --------------------------------------------------------------------------
# Oversized requests and values.

def test_more_than_dev_shm_can_hold_leaves_nothing(chan):
    st = os.statvfs("/dev/shm")
    total = st.f_blocks * st.f_frsize
    before = set(os.listdir("/dev/shm"))
    for make in (lambda: shm.bounded(2**30), lambda: shm.Queue(2**30),
                 lambda: shm.bounded(total // 1000 + 1, slot_size=2000)):
        with pytest.raises(shm.OutOfSharedMemory, match="--shm-size") as e:
            make()
        assert isinstance(e.value, MemoryError)
    with pytest.raises(ValueError, match="at most 2\\*\\*30"):
        shm.bounded(2**30 + 1)
    for slot in (-1, 1 << 20, 1 << 40):
        with pytest.raises(ValueError, match="slot_size"):
            shm.bounded(2, slot_size=slot)
    assert set(os.listdir("/dev/shm")) == before
    _works(*chan)


@pytest.mark.parametrize("kind", ["bounded", "rendezvous", "Queue", "SharedDict"])
def test_large_values_go_out_of_band(kind):
    """Values far beyond a slot (or a shard's first heap) are carried, not refused."""
    big = {"blob": secrets.token_bytes(3 << 20), "n": 1}
    if kind == "SharedDict":
        d = shm.SharedDict(shards=1)
        d["big"] = big
        d["big2"] = big
        assert d["big"] == big and d["big2"] == big and len(d) == 2
        _dict_works(d)
        d.close()
        return
    if kind == "Queue":
        q = shm.Queue(2)
        q.put(big)
        assert q.get(timeout=5) == big
        q.close()
        return
    tx, rx = shm.bounded(2) if kind == "bounded" else shm.rendezvous()
    t = threading.Thread(target=lambda: tx.send(big, timeout=10))
    t.start()
    assert rx.recv(timeout=10) == big
    t.join()
    _works(tx, rx) if kind == "bounded" else None
    tx.close(); rx.close()


# --------------------------------------------------------------------------
# Unencodable values.

class _Unpicklable:
    def __reduce__(self):
        raise TypeError("not today")


UNENCODABLE = {        # codec: (values it refuses, words its message must contain)
    "msgpack": ([{1, 2}, object(), 2**64, 1j, _Unpicklable()], ("msgpack", "codec='pickle'")),
    "pickle": ([lambda: 1, threading.Lock(), _Unpicklable()], ("pickle", "picklable")),
    "bytes": (["text", 1, None, [b"a"]], ("bytes", "codec=")),
    "numpy": ([np.array([object()]), {1}], ("numpy", "pickle")),
}


@pytest.mark.parametrize("codec", UNENCODABLE)
@pytest.mark.parametrize("flavor", ["bounded", "unbounded", "rendezvous"])
def test_unencodable_values_on_channels(codec, flavor):
    values, words = UNENCODABLE[codec]
    tx, rx = {"bounded": lambda: shm.bounded(4, codec=codec), "unbounded": lambda: shm.unbounded(codec=codec),
              "rendezvous": lambda: shm.rendezvous(codec=codec)}[flavor]()
    for v in values:
        for send in (lambda: tx.send(v, timeout=0.01), lambda: tx.try_send(v), lambda: tx.send_many([v])):
            with pytest.raises(shm.EncodeError) as e:
                send()
            assert isinstance(e.value, TypeError)
            assert all(w in str(e.value) for w in words), str(e.value)
    assert len(rx) == 0 and rx.stats().sent == 0         # nothing was claimed
    if flavor != "rendezvous":
        ok = b"fine" if codec == "bytes" else "fine"
        tx.send(ok)
        assert rx.recv(timeout=5) == ok
    tx.close(); rx.close()


@pytest.mark.parametrize("cls", [shm.Queue, shm.JoinableQueue, shm.SimpleQueue])
def test_unencodable_values_on_queues(cls):
    q = cls()
    for v in UNENCODABLE["pickle"][0]:
        with pytest.raises(shm.EncodeError, match="picklable") as e:
            q.put(v)
        assert isinstance(e.value, TypeError)
        if cls is not shm.SimpleQueue:
            with pytest.raises(TypeError, match="picklable"):
                q.put_nowait(v)
    if cls is shm.JoinableQueue:
        assert q.unfinished_tasks == 0            # a refused put is not a task
        assert q.join(timeout=0) is True
    assert q.empty()
    q.put([1])
    assert q.get() == [1]
    q.close()


@pytest.mark.parametrize("codec", ["msgpack", "pickle"])
def test_unencodable_values_in_the_dict(codec):
    d = shm.SharedDict(shards=1, codec=codec)
    d["a"] = 1
    d["l"] = [1]
    values, words = UNENCODABLE[codec]
    for v in values:
        for op in (lambda: d.__setitem__("b", v), lambda: d.setdefault("b", v), lambda: d.update(b=v),
                   lambda: d.set_many([("b", v)]), lambda: d.compare_and_set("a", 1, v),
                   lambda: d.alter("l", lambda old: v), lambda: d.alter("b", lambda old: v, default=0)):
            with pytest.raises(TypeError) as e:
                op()
            assert all(w in str(e.value) for w in words), str(e.value)
    if codec == "msgpack":
        with pytest.raises(TypeError, match="codec='pickle'"):
            d.incr("a", 2**64)                      # leaves int64, and msgpack stops at 64 bits
    assert d.copy() == {"a": 1, "l": [1]}
    _dict_works(d)
    d.close()


# --------------------------------------------------------------------------
# Keys.

BAD_KEYS = [[1], {"a": 1}, {1}, object(), bytearray(b"k"), (1, [2]), np.array([1]), lambda: 1]


def test_wrong_key_types_on_every_dict_method(d):
    d["a"] = 1
    for k in BAD_KEYS:
        for op in (lambda: d.get(k), lambda: d.pop(k), lambda: d.pop(k, None), lambda: d.setdefault(k, 1),
                   lambda: d.incr(k), lambda: d.compare_and_set(k, None, 1), lambda: d.alter(k, str, default=1),
                   lambda: d.__delitem__(k), lambda: d.get_many(["a", k]), lambda: d.update([(k, 1)]),
                   lambda: d.set_many([("z", 1), (k, 1)])):
            with pytest.raises(TypeError, match="SharedDict keys must be"):
                op()
    d.pop("z")          # set_many wrote what preceded the bad key, as dict.update does
    assert d.copy() == {"a": 1}
    _dict_works(d)


@pytest.mark.parametrize("value_type", ["int64", "float64"])
def test_numeric_mode_refuses_other_types(value_type):
    d = shm.SharedDict(shards=1, key_type="int64", value_type=value_type)
    d[1] = 1
    for k in ("1", b"1", 1.5, 2**63, -(2**63) - 1, None, (1,), [1]):
        for op in (lambda: d.get(k), lambda: d.__setitem__(k, 1), lambda: d.incr(k), lambda: d.pop(k, None),
                   lambda: d.setdefault(k, 1), lambda: k in d, lambda: d.compare_and_set(k, 1, 2)):
            with pytest.raises(TypeError, match="int64 keys"):
                op()
    bad_values = ["1", None, [1], {1: 1}, True] + ([1.5, 2**63] if value_type == "int64" else [])
    for v in bad_values:
        for op in (lambda: d.__setitem__(2, v), lambda: d.setdefault(2, v), lambda: d.compare_and_set(1, 1, v),
                   lambda: d.update({2: v})):
            with pytest.raises(TypeError, match=f"{value_type} values"):
                op()
    for delta in ("1", None, [1]) + ((2**64, 0.5) if value_type == "int64" else ()):
        with pytest.raises(TypeError):
            d.incr(1, delta)
    assert d.copy() == {1: 1} and 2 not in d
    assert d.incr(1, 2) == 3
    d.close()


# --------------------------------------------------------------------------
# Timeouts.

BAD_TIMEOUTS = [(-1, ValueError), (-1e-9, ValueError), (-math.inf, ValueError), (math.nan, ValueError),
                ("1", TypeError), (b"1", TypeError), (object(), TypeError), (1j, TypeError), ([1], TypeError)]


def _blocking_calls():
    """(name, make, call(structure, timeout)): each would block on the structure make() returns."""
    def chan(make):
        def m():
            tx, rx = make()
            return (tx, rx), lambda: (tx.close(), rx.close())
        return m

    def queue_(cls, n=0):
        def m():
            q = cls(n)
            return q, q.close
        return m

    full = chan(lambda: _full(shm.bounded(1)))
    return [
        ("recv", chan(shm.unbounded), lambda c, t: c[1].recv(timeout=t)),
        ("recv bytes", chan(lambda: shm.bounded(2, codec="bytes")), lambda c, t: c[1].recv(timeout=t)),
        ("recv_many", chan(shm.unbounded), lambda c, t: c[1].recv_many(5, timeout=t)),
        ("send full", full, lambda c, t: c[0].send(2, timeout=t)),
        ("send_many full", full, lambda c, t: c[0].send_many([2, 3], timeout=t)),
        ("send rendezvous", chan(shm.rendezvous), lambda c, t: c[0].send(1, timeout=t)),
        ("Queue.get", queue_(shm.Queue), lambda q, t: q.get(timeout=t)),
        ("Queue.put full", lambda: ((q := shm.Queue(1)), q.put(0), (q, q.close))[-1],
         lambda q, t: q.put(1, timeout=t)),
        ("JoinableQueue.join", lambda: ((q := shm.JoinableQueue()), q.put(0), (q, q.close))[-1],
         lambda q, t: q.join(timeout=t)),
    ]


def _full(pair):
    pair[0].send(1)
    return pair


def _ready_calls():
    """The same calls where they would not block: a bad timeout is refused all the same."""
    def q_item():
        q = shm.JoinableQueue()
        q.put(1)
        return q, q.close
    return [
        ("recv ready", lambda: (_full(p := shm.bounded(2)), (p, lambda: (p[0].close(), p[1].close())))[-1],
         lambda c, t: c[1].recv(timeout=t)),
        ("send room", lambda: ((p := shm.bounded(2)), (p, lambda: (p[0].close(), p[1].close())))[-1],
         lambda c, t: c[0].send(1, timeout=t)),
        ("Queue.get ready", q_item, lambda q, t: q.get(timeout=t)),
        ("Queue.put room", q_item, lambda q, t: q.put(1, timeout=t)),
    ]


@pytest.mark.parametrize("name,make,call", _blocking_calls() + _ready_calls(),
                         ids=[c[0] for c in _blocking_calls() + _ready_calls()])
def test_bad_timeouts(name, make, call):
    s, close = make()
    try:
        for t, exc in BAD_TIMEOUTS:
            with pytest.raises(exc):
                call(s, t)
        # Still usable, and a good timeout still times out (or succeeds) as before.
        if name.endswith(("ready", "room")):
            call(s, 1)
        else:
            with pytest.raises((queue.Empty, queue.Full)) if "join" not in name else _no_raise():
                assert call(s, 0.01) in (None, False)
    finally:
        close()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_bad_batch_sizes(chan):
    tx, rx = chan
    tx.send(1)
    for n, exc in ((0, ValueError), (-1, ValueError), ("3", TypeError), (None, TypeError)):
        with pytest.raises(exc):
            rx.recv_many(n, timeout=0)
    assert rx.recv_many(3, timeout=0) == [1]
    _works(tx, rx)
