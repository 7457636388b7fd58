"""Random bytes written over channel segments and a SharedDict's control
segment, then the structures used: every outcome is a value, a named
exception (a ``shm.ShmError``, or ``queue.Empty``/``queue.Full``/``KeyError``/
``TypeError`` where those are the API's contract) or a clean repair. Never a
crash, a hang, or an absurd allocation.

What is damaged, for bounded, unbounded and rendezvous channels: the control
segment (control block, participant and token tables, ring generation 0),
the later ring generations of an unbounded channel and the blob segments of
large messages, each listed from ``/dev/shm`` by the channel's family
prefix; for a SharedDict, its control segment (shard locks and generation
numbers, participant and token tables, the announce table). The damage is
random bytes, ``0xff`` runs, and plausible words (a position or generation
moved by a few, a stamp naming another lap or owner), half of it aimed at the
words the kernels read. Some cases damage the segment header instead: random
multi-byte damage (``tests/test_segment.py`` flips each header byte alone),
sometimes with the CRC recomputed so the parameters themselves are what is
validated.

Then the creating process uses its own handles (send/recv with small
timeouts, try_send/try_recv, batches, stats) and a fresh interpreter opens
each structure by name and uses it. Each batch of seeds runs in its own
interpreter (``python -c CHILD seeds...``), so a segfault shows as a signal
exit code; ``faulthandler`` turns an operation stuck for 20 s into a
traceback and an exit code, and the subprocess timeout is the last guard. A
memory limit turns an absurd allocation into a MemoryError, which fails the
case. ``tests/test_dict_fuzz.py`` does the same for the dict's shard segments.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import _report
import shm
from conftest import STRESS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANNEL_CASES = 240 if STRESS else 24
DICT_CASES = 60 if STRESS else 12
PER_CHILD = 8 if STRESS else 12
DICT_PER_CHILD = 6

# Shared by the creator and the opener: damage, the allowed outcomes, and a
# watchdog around every operation.
COMMON = r'''
import faulthandler, mmap, os, queue, random, resource, struct, sys, time, zlib
import numpy as np
import shm
from shm.errors import ShmError
from kernels import layout as L
from kernels import ring as R

# An absurd allocation must fail as MemoryError (which fails the case), not
# swap the machine to death. Address space, not RSS: /dev/shm mappings count.
resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))
ALLOWED = (ShmError, queue.Empty, queue.Full, KeyError, TypeError)
STUCK = 20.0          # seconds an operation may take before it counts as a hang
stats = {"ok": 0, "named": 0}
faults = []

def run(what, fn, *a, **k):
    faulthandler.dump_traceback_later(STUCK, exit=True)
    t0 = time.monotonic()
    try:
        fn(*a, **k)
        stats["ok"] += 1
    except ALLOWED:
        stats["named"] += 1
    except BaseException as e:
        import traceback
        faults.append(f"{what}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        faulthandler.cancel_dump_traceback_later()
    took = time.monotonic() - t0
    if took > 10.0:
        faults.append(f"{what}: took {took:.1f} s with a timeout of at most 0.02 s")

def finish():
    if faults:
        sys.stderr.write("\n".join(faults[:5]))
        sys.exit(3)
    print(stats["ok"], stats["named"])
'''

# A fresh interpreter that opens each damaged channel by name and uses it.
CHANNEL_OPENER = COMMON + r'''
for name in sys.argv[2:]:
    rng = random.Random(zlib.crc32(name.encode()) ^ int(sys.argv[1]))
    hs = []
    for cls in (shm.Receiver, shm.Sender):
        faulthandler.dump_traceback_later(STUCK, exit=True)
        try:
            hs.append(cls.open(name))
            stats["ok"] += 1
        except ALLOWED:
            stats["named"] += 1
        except BaseException as e:
            faults.append(f"{cls.__name__}.open: {type(e).__name__}: {e}")
        faulthandler.cancel_dump_traceback_later()
    for h in hs:
        for _ in range(8):
            t = rng.choice([0, 0.01])
            if isinstance(h, shm.Receiver):
                run("open: recv", h.recv, timeout=t)
                run("open: try_recv", h.try_recv)
            else:
                run("open: send", h.send, b"o" if h._c and h._c.raw else 1, timeout=t)
            run("open: stats", h.stats)
        run("open: close", h.close)
finish()
'''

CHILD = COMMON + r'''
import subprocess
from shm import _chan
from shm.segment import unlink_name

HOT_CHAN = []        # (offset, is_word) of control block, participant and token words
for off in range(L.CH_BASE, L.CH_END, 8):
    HOT_CHAN.append(off)
_lay = L.channel_layout(1, L.MIN_SLOT)
for i in range(3):
    for f in range(0, L.PT_SIZE, 8):
        HOT_CHAN.append(_lay["participants"] + i * L.PT_SIZE + f)
    for f in range(0, L.TK_SIZE, 8):
        HOT_CHAN.append(_lay["tokens"] + i * L.TK_SIZE + f)

def ring_words(ring_off, cap, slot):
    out = [ring_off + L.RG_TAIL, ring_off + L.RG_HEAD, ring_off + L.RG_CAP, ring_off + L.RG_SLOT,
           ring_off + L.RG_BASE, ring_off + L.RG_GEN, ring_off + L.RG_BLOB_HINT]
    for i in range(cap):
        s = ring_off + L.RING_HEADER + i * slot
        out += [s + L.SL_STAMP, s + L.SL_META, s + L.SL_BLOB]
        e = ring_off + L.RING_HEADER + cap * slot + i * L.BE_SIZE
        out += [e + L.BE_STATE, e + L.BE_INFO]
    return out

def plausible(rng, cur, cap):
    """A word that looks like what belongs there: the kernels' logic, not just their checks."""
    r = rng.random()
    if r < 0.3:
        return cur + rng.choice([-cap - 1, -cap, -2, -1, 1, 2, cap, cap + 1, 1 << 20])
    if r < 0.5:       # a stamp: another position, owner or state
        pos = ((cur >> R.POS_SHIFT) & R.POS_MASK) + rng.choice([-cap, -1, 0, 1, cap, 2 * cap, 1 << 40])
        return R.stamp(pos, rng.randrange(256), rng.randrange(4))
    if r < 0.6:
        return cur | R.SEALED_BIT
    if r < 0.7:
        return cur ^ (1 << rng.randrange(64))
    return rng.choice([0, -1, 1, 2, 3, 255, 256, 1 << 31, 1 << 47, (1 << 63) - 1, -(1 << 63)])

def damage(rng, path, hot, cap, mode):
    """Damage the segment at ``path``; ``hot`` lists word offsets worth aiming at."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size < L.SEG_HEADER:
            return 0
        with mmap.mmap(fd, size) as m:
            n = 0
            if mode == "header":
                for _ in range(rng.choice([1, 2, 4])):
                    off = rng.randrange(0, L.SEG_HEADER - 1)
                    ln = min(rng.choice([2, 3, 8, 16, 40]), L.SEG_HEADER - off)
                    m[off:off + ln] = os.urandom(ln) if rng.random() < 0.7 else b"\xff" * ln
                    n += 1
                if rng.random() < 0.5:      # re-seal: the parameters themselves must be validated
                    m[L.SEG_CRC:L.SEG_CRC + 8] = struct.pack("<q", zlib.crc32(m[:L.SEG_CRC]))
                return n
            for _ in range(rng.choice([1, 2, 4, 8, 20])):
                if hot and rng.random() < 0.6:
                    off = rng.choice(hot)
                    if off + 8 > size:
                        continue
                    cur = struct.unpack_from("<q", m, off)[0]
                    v = plausible(rng, cur, cap)
                    m[off:off + 8] = struct.pack("<q", ((v + (1 << 63)) % (1 << 64)) - (1 << 63))
                else:
                    off = rng.randrange(L.SEG_HEADER, size)
                    ln = min(rng.choice([1, 8, 64, 512]), size - off)
                    m[off:off + ln] = os.urandom(ln) if rng.random() < 0.7 else b"\xff" * ln
                n += 1
            return n
    finally:
        os.close(fd)

def family_files(family):
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(family))

def message(rng, codec, inline):
    r = rng.random()
    n = rng.choice([0, 5, inline, inline + 1, 3000]) if r < 0.8 else 70000
    if codec == "bytes":
        return os.urandom(n)
    if codec == "numpy" and rng.random() < 0.5:
        return np.arange(max(1, n // 8), dtype=np.int64)
    return {"i": rng.randrange(1000), "s": "x" * n}

def make(rng, seed):
    flavor = ("bounded", "unbounded", "rendezvous")[seed % 3]
    codec = rng.choice(["msgpack", "msgpack", "bytes", "numpy"])
    slot = rng.choice([32, 100, None])
    if flavor == "bounded":
        tx, rx = shm.bounded(rng.choice([1, 4, 16]), codec=codec, slot_size=slot)
    elif flavor == "unbounded":
        tx, rx = shm.unbounded(codec=codec, slot_size=slot)
    else:
        tx, rx = shm.rendezvous(codec=codec, slot_size=slot)
    c = tx._c
    if flavor == "rendezvous":          # a receiver must be waiting: give the message slot a blob
        import threading
        t = threading.Thread(target=lambda: rx.recv(timeout=5))
        t.start()
        tx.send(message(rng, codec, c.inline), timeout=5)
        t.join()
    else:
        n = c.capacity if flavor == "bounded" else rng.choice([10, 300, 700])   # 300+: a second generation
        for i in range(n):
            tx.send(message(rng, codec, c.inline) if i % 7 == 0 else (b"m" if codec == "bytes" else i), timeout=5)
        for _ in range(min(n, rng.randrange(0, 3))):     # a few taken, so head and tail differ
            rx.try_recv()
    return flavor, codec, tx, rx

def use(rng, flavor, codec, tx, rx, ops):
    small = b"s" if codec == "bytes" else 1
    for _ in range(ops):
        t = rng.choice([0, 0.005, 0.02])
        r = rng.random()
        if r < 0.15:
            run("send", tx.send, small, timeout=t)
        elif r < 0.22:
            run("send large", tx.send, message(rng, codec, tx._c.inline if tx._c else 64), timeout=t)
        elif r < 0.3:
            run("try_send", tx.try_send, small)
        elif r < 0.35:
            run("send_many", tx.send_many, [small] * rng.randrange(1, 40), timeout=t)
        elif r < 0.5:
            run("recv", rx.recv, timeout=t)
        elif r < 0.6:
            run("try_recv", rx.try_recv)
        elif r < 0.66:
            run("recv_many", rx.recv_many, rng.randrange(1, 50), timeout=t)
        elif r < 0.7:
            run("drain", rx.drain)
        elif r < 0.8:
            run("stats", lambda: (tx.stats(), rx.stats()))
        elif r < 0.85:
            run("len", lambda: (len(tx), rx.is_empty(), tx.is_full(), repr(rx)))
        elif r < 0.9:
            run("is_disconnected", lambda: (tx.is_disconnected(), rx.is_disconnected()))
        else:
            run("clone", lambda: rx.clone().close())


made = []
for seed in map(int, sys.argv[1:]):
    rng = random.Random(seed)
    flavor, codec, tx, rx = make(rng, seed)
    family, name = tx._c.family, tx.name
    mode = "header" if rng.random() < 0.2 else "body"
    files = family_files(family)
    damaged = 0
    for n in files:
        if rng.random() < 0.3 and len(files) > 1:
            continue            # not every segment every time: damage in one, sound others
        c = tx._c
        if n == name:
            hot = HOT_CHAN + ring_words(c.rings[0].ring_off, c.rings[0].cap, c.slot)
            cap = c.rings[0].cap
        elif "p" not in n[len(family):]:
            cap = _chan.RING0_UNBOUNDED << 1
            hot = ring_words(L.ring_layout(1, c.slot)["ring"], min(cap, 64), c.slot)
        else:
            hot, cap = [], 1     # a blob: its payload is the message
        damaged += damage(rng, "/dev/shm/" + n, hot, cap, mode if n == name or rng.random() < 0.5 else "body")
    stats["segments"] = stats.get("segments", 0) + len(files)
    stats["damages"] = stats.get("damages", 0) + damaged
    made.append((seed, flavor, codec, tx, rx, family, name))

# A fresh interpreter opens each damaged channel by name.
p = subprocess.run([sys.executable, "-c", os.environ["SHM_FUZZ_OPENER"], sys.argv[1]] + [m[6] for m in made],
                   capture_output=True, text=True, timeout=300)
if p.returncode != 0:
    faults.append(f"opener exited with {p.returncode}:\n{p.stderr[-3000:]}")
else:
    ok, named = map(int, p.stdout.split())
    stats["ok"] += ok
    stats["named"] += named

for seed, flavor, codec, tx, rx, family, name in made:
    rng = random.Random(seed + 1)
    use(rng, flavor, codec, tx, rx, 40)
    run("close tx", tx.close)
    run("close rx", rx.close)
    _chan.unlink_family(family)
    unlink_name(name)

# This process is still sound: a fresh channel works.
tx, rx = shm.bounded(2)
tx.send("after")
assert rx.recv(timeout=5) == "after"
tx.close(); rx.close()
left = [n for m in made for n in family_files(m[5])]
if left:
    faults.append(f"left in /dev/shm: {left}")
sys.stdout.write(f"{stats['segments']} {stats['damages']} ")
finish()
'''

# --------------------------------------------------------------------------
# The SharedDict's control segment.

DICT_OPENER = COMMON + r'''
for name in sys.argv[2:]:
    rng = random.Random(zlib.crc32(name.encode()) ^ int(sys.argv[1]))
    d = None
    faulthandler.dump_traceback_later(STUCK, exit=True)
    try:
        d = shm.SharedDict.open(name)
        stats["ok"] += 1
    except ALLOWED:
        stats["named"] += 1
    except BaseException as e:
        import traceback
        faults.append(f"SharedDict.open: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    faulthandler.cancel_dump_traceback_later()
    if d is not None:
        for _ in range(20):
            k = f"k{rng.randrange(120)}"
            run("open: get", d.get, k)
            run("open: set", d.__setitem__, k, rng.randrange(100))
            run("open: incr", d.incr, k)
        run("open: len", len, d)
        run("open: close", d.close)
finish()
'''

DICT_CHILD = COMMON + r'''
import subprocess
from shm import dict as shm_dict

def plausible(rng, cur):
    r = rng.random()
    if r < 0.35:
        return cur + rng.choice([-2, -1, 1, 2, 1 << 16, 1 << 20])
    if r < 0.55:      # a lock word: another owner, the waiters bit
        return rng.choice([0, 1, 2, 3, 5, 9, 200]) | rng.choice([0, L.LOCK_WAITERS])
    if r < 0.65:
        return cur ^ (1 << rng.randrange(64))
    return rng.choice([0, -1, 1, 2, 255, 1 << 31, 1 << 47, (1 << 63) - 1, -(1 << 63)])

def hot_words(nshards):
    lay = L.dict_layout(nshards)
    hot = list(range(L.DC_BASE, L.DC_END, 8))
    for s in range(nshards):
        hot += [lay["table"] + s * L.SE_SIZE + f for f in (L.SE_LOCK, L.SE_GEN, L.SE_LOCK_WAITS, L.SE_GROWTHS)]
    for i in range(3):
        hot += [lay["participants"] + i * L.PT_SIZE + f for f in range(0, L.PT_SIZE, 8)]
        hot += [lay["tokens"] + i * L.TK_SIZE + f for f in range(0, L.TK_SIZE, 8)]
        hot += [lay["announce"] + i * L.ANNOUNCE_SIZE]
    return hot

def damage(rng, path, hot, mode):
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size) as m:
            n = 0
            if mode == "header":
                for _ in range(rng.choice([1, 2, 4])):
                    off = rng.randrange(0, L.SEG_HEADER - 1)
                    ln = min(rng.choice([2, 3, 8, 16, 40]), L.SEG_HEADER - off)
                    m[off:off + ln] = os.urandom(ln) if rng.random() < 0.7 else b"\xff" * ln
                    n += 1
                if rng.random() < 0.5:
                    m[L.SEG_CRC:L.SEG_CRC + 8] = struct.pack("<q", zlib.crc32(m[:L.SEG_CRC]))
                return n
            for _ in range(rng.choice([1, 2, 4, 8, 20])):
                if rng.random() < 0.6:
                    off = rng.choice(hot)
                    cur = struct.unpack_from("<q", m, off)[0]
                    v = plausible(rng, cur)
                    m[off:off + 8] = struct.pack("<q", ((v + (1 << 63)) % (1 << 64)) - (1 << 63))
                else:
                    off = rng.randrange(L.SEG_HEADER, size)
                    ln = min(rng.choice([1, 8, 64, 512]), size - off)
                    m[off:off + ln] = os.urandom(ln) if rng.random() < 0.7 else b"\xff" * ln
                n += 1
            return n
    finally:
        os.close(fd)

def keep_locks_sane(d):
    """Put back a shard lock word that names a live participant, or none at all.

    A lock word naming a live process is that process holding the lock, as
    far as anyone can tell: waiting for it is the contract (no dict call takes
    a timeout). Participants 0-3 are this process and the opener (or what the
    damage made of them). Every other word (no owner but other bits set, an
    owner beyond the participant table or dead, a lock in the waiting
    handle's own name) the dict takes over and repairs: see
    test_dict_lock_word_naming_no_live_holder below.
    """
    w = d._ctrl.w
    for s in range(d._nshards):
        i = (d._table + s * L.SE_SIZE + L.SE_LOCK) >> 3
        owner = (int(w[i]) & L.LOCK_OWNER_MASK) - 1
        if 0 <= owner < 4:
            w[i] = 0

def use(rng, d, ops, what=""):
    for _ in range(ops):
        k = f"k{rng.randrange(120)}"
        r = rng.random()
        if r < 0.2:
            run(what + "get", d.get, k)
        elif r < 0.35:
            run(what + "set", d.__setitem__, k, "x" * rng.randrange(600))
        elif r < 0.45:
            run(what + "incr", d.incr, k)
        elif r < 0.5:
            run(what + "pop", d.pop, k, None)
        elif r < 0.55:
            run(what + "setdefault", d.setdefault, k, 1)
        elif r < 0.6:
            run(what + "compare_and_set", d.compare_and_set, k, 1, 2)
        elif r < 0.65:
            run(what + "del", d.__delitem__, k)
        elif r < 0.75:
            run(what + "len/items", lambda: (len(d), list(d.items())))
        elif r < 0.8:
            run(what + "iter", lambda: [x for x, _ in zip(d, range(10))])
        elif r < 0.85:
            run(what + "copy", d.copy)
        elif r < 0.95:
            run(what + "stats", d.stats)
        else:
            run(what + "repr", repr, d)


made = []
for seed in map(int, sys.argv[1:]):
    rng = random.Random(seed)
    d = shm.SharedDict(shards=rng.choice([1, 2, 4]))
    for i in range(100):
        d[f"k{i}"] = ("v" * (i % 50)) if i % 3 else i
    mode = "header" if rng.random() < 0.2 else "body"
    stats["damages"] = stats.get("damages", 0) + damage(rng, "/dev/shm/" + d.name, hot_words(d._nshards), mode)
    keep_locks_sane(d)
    made.append((seed, d, d.name, d._family))

p = subprocess.run([sys.executable, "-c", os.environ["SHM_FUZZ_OPENER"], sys.argv[1]] + [m[2] for m in made],
                   capture_output=True, text=True, timeout=300)
if p.returncode != 0:
    faults.append(f"opener exited with {p.returncode}:\n{p.stderr[-3000:]}")
else:
    ok, named = map(int, p.stdout.split())
    stats["ok"] += ok
    stats["named"] += named

for seed, d, name, family in made:
    use(random.Random(seed + 1), d, 80)
    run("close", d.close)
    shm_dict._unlink_all(name, family)

d = shm.SharedDict(shards=1)      # this process is still sound
d["after"] = 1
assert d["after"] == 1
d.close(); d.unlink()
left = [n for m in made for n in os.listdir("/dev/shm") if n.startswith(m[3])]
if left:
    faults.append(f"left in /dev/shm: {left}")
sys.stdout.write(f"{len(made)} {stats['damages']} ")
finish()
'''


def _run(script, opener, seeds):
    env = dict(os.environ, SHM_FUZZ_OPENER=opener)
    p = subprocess.run([sys.executable, "-c", script, *map(str, seeds)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=env)
    assert p.returncode == 0, f"seeds {seeds}: exit {p.returncode}\n{p.stdout[-500:]}\n{p.stderr[-4000:]}"
    return list(map(int, p.stdout.split()))


@pytest.mark.parametrize("first", range(0, CHANNEL_CASES, PER_CHILD))
def test_random_bytes_in_channel_segments(first):
    segments, damages, ok, named = _run(CHILD, CHANNEL_OPENER, range(5000 + first, 5000 + first + PER_CHILD))
    _report.add("fuzz: damaged channels used", PER_CHILD)
    _report.add("fuzz: channel segments damaged", segments)
    _report.add("fuzz: inputs fuzzed (damage written)", damages)
    _report.add("fuzz: operations on damaged segments", ok + named)


@pytest.mark.parametrize("first", range(0, DICT_CASES, DICT_PER_CHILD))
def test_random_bytes_in_dict_control_segment(first):
    n, damages, ok, named = _run(DICT_CHILD, DICT_OPENER, range(9000 + first, 9000 + first + DICT_PER_CHILD))
    _report.add("fuzz: damaged dict control segments used", n)
    _report.add("fuzz: inputs fuzzed (damage written)", damages)
    _report.add("fuzz: operations on damaged segments", ok + named)


# --------------------------------------------------------------------------
# What the fuzzer found, one case each.

RING_CHILD = r'''
import faulthandler, sys
faulthandler.dump_traceback_later(30, exit=True)      # a hang inside a kernel holds the GIL
import shm
from shm.errors import ShmError
from kernels import layout as L, ring as R

for what in sys.argv[1:]:
    tx, rx = shm.bounded(4)
    tx.send(0)
    rx.recv()                                # tail = head = 1
    c = tx._c
    ring, w = c.rings[0], c.ctrl.w
    slot1 = (ring.ring_off + L.RING_HEADER + 1 * c.slot) >> 3
    tail, head = (ring.ring_off + L.RG_TAIL) >> 3, (ring.ring_off + L.RG_HEAD) >> 3
    sends = [lambda: tx.try_send(1), lambda: tx.send(1, timeout=0.01), lambda: tx.send_many([1, 2], timeout=0.01)]
    recvs = [rx.try_recv, lambda: rx.recv(timeout=0.01), lambda: rx.recv_many(3, timeout=0.01), rx.drain]
    if what == "slot laps ahead of tail":    # producers re-read tail forever, with the GIL held
        w[slot1] = R.stamp(1 + 2 * 4, 0, R.FREE)
        ops = sends
    elif what == "slot laps ahead of head":  # consumers likewise
        w[slot1] = R.stamp(1 + 2 * 4, 0, R.PUBLISHED)
        ops = recvs
    elif what == "negative tail":            # returned as a position, read back as a status
        w[tail] = -(1 << 40)
        ops = sends
    elif what == "negative head":            # read back as a receive area a terabyte away
        w[head] = -(1 << 40)
        ops = recvs
    for op in ops:
        try:
            op()
            print(what, "ok")
        except ShmError as e:
            print(what, type(e).__name__)
    tx.close(); rx.close()
'''


@pytest.mark.parametrize("what", ["slot laps ahead of tail", "slot laps ahead of head", "negative tail",
                                  "negative head"])
def test_impossible_ring_positions_are_named_not_hangs(what):
    p = subprocess.run([sys.executable, "-c", RING_CHILD, what], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    got = p.stdout.splitlines()
    assert len(got) in (3, 4) and all(g.startswith(what) for g in got), got
    assert any(g.endswith(("CorruptSegment", "DecodeError")) for g in got), got


def test_participant_incarnations_past_2_23():
    """An entry's incarnation counts every claim of it: from 2**23 on, its state word is negative."""
    from kernels import layout as L
    from kernels import words as W
    from shm._registry import _state
    d = shm.SharedDict(shards=1)
    reg = d._registry
    # The next claim takes entry 1, freed 2**23 times already; entry 2 died that old.
    W.store(d._ctrl.w, reg._sw(1), _state((1 << 23) - 1, 0, L.PS_FREE))
    W.store(d._ctrl.w, reg._sw(2), _state(1 << 23, 2**22 - 1, L.PS_ALIVE))
    assert W.load(d._ctrl.w, reg._sw(2)) < 0
    e = shm.SharedDict.open(d.name)          # claims entry 1 (was: OverflowError)
    assert e._me == 1 and reg.state(1) < 0
    e["x"] = 1
    assert d["x"] == 1
    e.close()                                 # reaps entry 2 on the way out (was: OverflowError)
    assert reg.live_entries() == [0]
    d.close()


def test_a_forged_header_cannot_steer_segment_names():
    """A family that is not a valid name (header re-sealed with a correct CRC): CorruptSegment."""
    import zlib
    from kernels import layout as L
    d = shm.SharedDict(shards=1)
    u8 = d._ctrl.u8
    old = bytes(u8[L.SEG_FAMILY:L.SEG_FAMILY + 4])
    u8[L.SEG_FAMILY:L.SEG_FAMILY + 4] = list(b"../x")
    d._ctrl.w[L.SEG_CRC >> 3] = zlib.crc32(bytes(u8[:L.SEG_CRC]))
    with pytest.raises(shm.CorruptSegment, match="invalid family"):
        shm.SharedDict.open(d.name)           # was: ValueError from a shard name
    u8[L.SEG_FAMILY:L.SEG_FAMILY + 4] = list(old)
    d._ctrl.w[L.SEG_CRC >> 3] = zlib.crc32(bytes(u8[:L.SEG_CRC]))
    shm.SharedDict.open(d.name).close()
    d.close()


LOCK_CHILD = r'''
import faulthandler, sys
import shm
from kernels import layout as L
from kernels import words as W
d = shm.SharedDict(shards=1)
print(d.name, d._family, flush=True)
d["a"] = 1
W.store(d._ctrl.w, (d._table + L.SE_LOCK) >> 3, int(sys.argv[1]))
faulthandler.dump_traceback_later(5, exit=True)
d["b"] = 2                   # takes the shard lock (a repair takes one PEER_CHECK, 0.5 s)
assert d.copy() == {"a": 1, "b": 2}
d.close()
'''


@pytest.mark.parametrize("word", [1, 1 << 16, 0xFFFF], ids=["its own handle", "no owner, waiters bit",
                                                             "owner beyond the table"])
def test_dict_lock_word_naming_no_live_holder(word):
    p = subprocess.run([sys.executable, "-c", LOCK_CHILD, str(word)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    from shm.dict import _unlink_all
    name, family = p.stdout.split()[:2]
    _unlink_all(name, family)
    assert p.returncode == 0, p.stderr[-2000:]
