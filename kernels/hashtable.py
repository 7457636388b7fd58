"""A sharded hash table in shared memory: lock-free reads, robust per-shard locks.

Design notes
------------
What dashmap and flurry give Rust threads, for processes: the table is cut
into a power-of-two number of *shards* (dashmap); each shard has its own
lock, taken only by writers, and readers never take it (flurry).

A shard's data lives in one segment per *generation*: a header, an open
addressing index (linear probing) of one-word entries, and a heap of
records appended in place (``kernels/layout.py``: ``SHARD``, ``RECORD``).

* A record (hash, key length and value kind, the value or its length, the
  key, the value) is written once and never modified, except the in-place
  int64 of a ``VK_I64`` record, which ``incr`` changes by fetch_add.
* An index entry is ``EMPTY``, ``TOMB`` or ``offset/8 << 20 | tag`` (20
  bits of the hash): one word, so inserting, replacing (a new record, the
  entry swapped to it) and deleting (a tombstone) are each one release
  store, the commit point of the write.
* A writer holds the shard's lock (``SHARD_ENTRY.lock`` in the control
  segment: the owner's participant index + 1, and a waiters bit that makes
  the word a futex) for the whole operation, appends at ``bump``, stores the
  entry, then updates the counters.

*Reads are lock-free and never retry because of an ordinary write*: they
probe with acquire loads, and a record reached through an entry is
complete and immutable (release store of the entry / acquire load: the
record's bytes happen-before). They retry only if the shard moved to a new
generation (``state == REPLACED``, checked after an acquire fence once the
value is copied out), since a write after the move is not in the old one.

*Growth, compaction and repair are one operation*: under the lock, mark the
generation COMPACTING, wait for lock-free incrementers to leave (see below),
copy the live records into a fresh, larger or tighter generation (dropping
garbage and tombstones), mark the old one REPLACED, then publish the new
one's number in the shard table (readers that see REPLACED wait for the
number to change; published first, a compactor killed between the two
stores would leave the old generation looking current to the processes
that map it). A writer killed at any instruction leaves at most an
unreachable record and stale counters in the current generation; whoever
recovers its lock (``shm/dict.py``) compacts, which recounts everything
from the index. Space freed by deletes and replaced values is reclaimed the
same way: when the heap is full, the next generation is sized for the live
data, not the garbage.

*Lock-free increments*: ``incr`` on a ``VK_I64`` record is a fetch_add on
the record's value word, without the lock. So that a compaction (or a
locked read-modify-write) does not copy a value while an increment is
landing on the old record, an incrementer first *announces* the shard
generation it works in (its own line of the announce table, seq_cst),
then checks the generation is LIVE (seq_cst), adds, and clears its
announcement; the compactor sets COMPACTING (seq_cst) then waits until no
live participant announces that generation. Dekker: one of the two sees the
other. An incrementer that finds COMPACTING goes through the lock instead.
After adding, it re-reads the entry: if a writer replaced or deleted the
record meanwhile, the add landed on a dead record and it retries.

*The version word* (``SHARD_ENTRY.version``) lets a process keep values it
decoded and serve them again without reading the shard (``shm/dict.py``'s
read cache): ``unlock`` adds one (release) before freeing the lock, and a
lock-free increment adds ``VERSION_BUSY + 1`` before its fetch_add and
``1 - VERSION_BUSY`` after. ``get_at`` loads the version, then the lock,
then reads the value: a value read at version v with the lock free and no
increment in flight is current for as long as the lock stays free and the
version reads v (a later write either holds the lock or has changed the
version). A locked writer that dies leaves the lock held (no cache hits
until it is recovered, and the recovery's unlock bumps the version); an
incrementer that dies between its two adds leaves the busy count up (no
caching on that shard until its next compaction, which waits out live
incrementers and clears the count).

Rejected: a seqlock per shard (readers retry whenever anyone writes the
shard, and spin forever if a writer dies mid-write); per-bucket locks
(flurry's bins: more lock words to recover after a kill); moving records in
place (readers would need the seqlock again).

Every function takes a *dict descriptor*: a process-local int64 array
(``X_*``) with the validated address, size and geometry of each shard's
current generation. Offsets read from shared memory (entries, record
lengths) are bounds-checked before use, so a corrupt segment returns
``CORRUPT``, never a wild access.
"""
from __future__ import annotations

import llvmlite.ir as _ir
import numpy as np
from numba.core import cgutils as _cgutils
from numba.core import types as _types
from numba.extending import NativeValue as _NativeValue
from numba.extending import make_attribute_wrapper as _attr
from numba.extending import models as _models
from numba.extending import register_model as _register_model
from numba.extending import unbox as _unbox

from . import atomics as A
from . import layout as L
from ._jit import jit
from .hashing import hash_bytes, hash_i64
from .memory import copy, i64_at, u8_at
from .ring import backoff
from .syscalls import futex_wait, futex_wake, thread_id

# --------------------------------------------------------------------------
# Descriptor.

X_CTRL = 0          # control segment address
X_CTRL_SIZE = 1
X_NSHARDS = 2
X_SHIFT = 3         # 64 - log2(shards): shard = hash >> X_SHIFT (logical)
X_ME = 4            # participant index, -1 if not registered
X_TABLE = 5         # byte offset of the shard table in the control segment
X_ANNOUNCE = 6      # byte offset of the announce table
X_DST = 7           # address of the process-local result buffer (banks of areas)
X_DST_SIZE = 8
X_AREA_SIZE = 9     # bytes per result area
X_BANKS = 10        # address of the bank table (int64[2 * N_BANKS])
X_KEYMODE = 11      # 0: keys are encoded bytes; 1: int64 keys (numeric mode)
X_VALKIND = 12      # numeric mode: the one value kind stored (VK_I64 or VK_F64); else 0
X_OPS = 13          # address of this handle's operation counter (its participant entry's PT_OPS), 0: none
X_SEEN = 14         # address of an int64[2 * N_BANKS * N_AREAS] array, 0: none. For the get into area a,
                    # get_at stores [2a] the word index (in the control segment) of the key's shard lock
                    # (its version is SEEN_VERSION_DELTA words on) and [2a + 1] the shard's version
                    # before the read, -1 if it was locked or an increment was in flight. Per area, so
                    # per thread: another thread's get cannot overwrite it.
X_KEYBUF = 15       # address of a process-local uint8[KEYBUF] whose byte 0 is b"s", 0: none. The str-key
                    # kernels (put_str_*_at) build a key's canonical encoding there, b"s" + UTF-8. They
                    # run with the GIL held, so one buffer per descriptor is enough.
KEYBUF = 512
SEEN_VERSION_DELTA = (L.SE_VERSION - L.SE_LOCK) >> 3
X_SHARDS = 16       # per shard, X_STRIDE words:
S_ADDR = 0          #   mapped address of its current generation (0: not mapped)
S_SIZE = 1          #   mapped size
S_GEN = 2           #   generation number
S_NSLOTS = 3        #   index entries
S_INDEX = 4         #   byte offset of the index
S_HEAP = 5          #   byte offset of the heap
S_HEAP_SIZE = 6     #   heap bytes
X_STRIDE = 8

N_BANKS = 64        # threads of one process using one descriptor at once (Python reclaims exited ones)
N_AREAS = 4         # per thread: its areas are only reused by itself
AREA_SHIFT = 8      # get success: len << LEN_SHIFT | area << 8 | kind
LEN_SHIFT = 17
AREA_MASK = N_BANKS * N_AREAS - 1
assert N_BANKS * N_AREAS <= 1 << (LEN_SHIFT - AREA_SHIFT)

# Status codes (negative).
OK = 0
NOTFOUND = -1
NEED_GROW = -2      # the shard's index or heap is full: the caller compacts it (lock kept)
BUSY = -3           # the lock is held by someone else / the generation is compacting
MOVED = -4          # the mapped generation was replaced: remap the shard (X_SHARDS) and retry
NEED_BUF = -5       # the value does not fit the result area: call get_into_at with a buffer
WRONG_KIND = -6     # incr on a value that is not an int64
CORRUPT = -7
UNMAPPED = -8       # the shard is not mapped in this process yet
NO_BANK = -9        # every result bank belongs to another thread
CLOSED = -10
_I64_MAX = np.int64(9223372036854775807)
_I64_MIN = np.int64(-9223372036854775808)
OVERFLOW = -11      # incr would leave the int64 range: nothing was added
SHRINK = 2          # done (replaced or deleted), and the shard is now mostly garbage: the
                    # caller should compact it (shm/dict.py does) so its memory goes back
SHRINK_MIN = 1 << 20    # ...if that garbage is at least this many bytes
STATUS_NAMES = {OK: "OK", NOTFOUND: "NOTFOUND", NEED_GROW: "NEED_GROW", BUSY: "BUSY", MOVED: "MOVED",
                NEED_BUF: "NEED_BUF", WRONG_KIND: "WRONG_KIND", CORRUPT: "CORRUPT", UNMAPPED: "UNMAPPED",
                NO_BANK: "NO_BANK", CLOSED: "CLOSED", OVERFLOW: "OVERFLOW", SHRINK: "SHRINK"}

MAX_LOAD_NUM = 3     # an index may be 3/4 full (live entries and tombstones)
HEAP_START = 8       # records start past the heap's first word, so a live entry (offset/8 << 20 | tag)
                     # is at least 1 << 20 and can never read as EMPTY (0) or TOMB (1)
MAX_LOAD_DEN = 4


# --------------------------------------------------------------------------
# Addressing.

@jit(inline="always")
def _ctrl(d):
    return i64_at(d[X_CTRL], d[X_CTRL_SIZE] >> 3)


@jit(inline="always")
def _sx(s):
    return X_SHARDS + s * X_STRIDE


@jit(inline="always")
def shard_of(d, h):
    return (h >> d[X_SHIFT]) & (d[X_NSHARDS] - 1)


@jit(inline="always")
def _entry_w(d, x, i):
    return (d[x + S_INDEX] >> 3) + i


@jit(inline="always")
def _record_size(n, kind, vlen):
    body = L.RECORD_HEADER + n
    if kind != L.VK_I64 and kind != L.VK_F64:
        body += vlen
    return (body + 7) & ~7


@jit(inline="always")
def _tag(h):
    return (h >> 20) & L.ENTRY_TAG_MASK


@jit
def _memeq(a, aoff, b, boff, n):
    i = 0
    while i + 8 <= n:
        wa = 0
        wb = 0
        for k in range(8):
            wa |= (a[aoff + i + k] & 0xFF) << (8 * k)
            wb |= (b[boff + i + k] & 0xFF) << (8 * k)
        if wa != wb:
            return False
        i += 8
    while i < n:
        if a[aoff + i] != b[boff + i]:
            return False
        i += 1
    return True


@jit
def _find(d, s, key, koff, n, h):
    """Probe shard ``s`` for the key. Returns (entry index, entry, record offset in the segment).

    When absent: (-1, insert slot (first tombstone or empty on the path; -1 if the index
    is full), 0). A record offset of -1 means the entry pointed outside the heap (corrupt).
    """
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    b = u8_at(d[x + S_ADDR], d[x + S_SIZE])
    nslots = d[x + S_NSLOTS]
    heap = d[x + S_HEAP]
    hsize = d[x + S_HEAP_SIZE]
    mask = nslots - 1
    i = h & mask
    tag = _tag(h)
    free = -1
    for _ in range(nslots):
        e = A.load(w, _entry_w(d, x, i), "acquire")
        if e == L.ENTRY_EMPTY:
            return -1, (free if free >= 0 else i), 0
        if e == L.ENTRY_TOMB:
            if free < 0:
                free = i
        elif (e & L.ENTRY_TAG_MASK) == tag:
            off = (e >> L.ENTRY_SHIFT) << 3
            if off < 0 or off + L.RECORD_HEADER > hsize:
                return i, e, -1
            ro = heap + off
            info = A.load(w, (ro + L.RC_INFO) >> 3, "relaxed")
            klen = info & 0xFFFFFFFF
            if A.load(w, ro >> 3, "relaxed") == h and klen == n:
                if off + L.RECORD_HEADER + n > hsize:
                    return i, e, -1
                if _memeq(b, ro + L.RECORD_HEADER, key, koff, n):
                    return i, e, ro
        i = (i + 1) & mask
    return -1, free, 0


@jit(inline="always")
def _mapped(d, s):
    return d[_sx(s) + S_ADDR] != 0


@jit(inline="always")
def _state(d, s):
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    return A.load(w, L.SH_STATE >> 3, "acquire")


@jit(inline="always")
def _hash(d, key, koff, n):
    if d[X_KEYMODE] == 1 and n == 8:
        v = 0
        for k in range(8):
            v |= (key[koff + k] & 0xFF) << (8 * k)
        return hash_i64(v)
    return hash_bytes(key, koff, n)


# --------------------------------------------------------------------------
# Result areas (the same per-thread banks as kernels/ring.py).

@jit(inline="always")
def _area(d):
    banks = i64_at(d[X_BANKS], 2 * N_BANKS)
    tid = thread_id()
    b = -1
    for k in range(N_BANKS):
        if A.load(banks, k, "relaxed") == tid:
            b = k
            break
    if b < 0:
        for k in range(N_BANKS):
            if A.load(banks, k, "relaxed") == 0 and A.cas(banks, k, 0, tid, "relaxed") == 0:
                b = k
                break
    if b < 0:
        return -1
    j = A.load(banks, N_BANKS + b, "relaxed")
    A.store(banks, N_BANKS + b, (j + 1) & (N_AREAS - 1), "relaxed")
    return b * N_AREAS + j


# --------------------------------------------------------------------------
# Reads (lock-free).

@jit
def get(d, key, koff, n, dst, dst_off, dst_cap):
    """Look up the key; copy its value (bytes, or the 8-byte number) into ``dst``.

    Returns ``len << 8 | kind`` (>= 0), NOTFOUND, NEED_BUF (``dst_cap`` too
    small; the length is in the return of ``value_len``), MOVED, UNMAPPED or
    CORRUPT. Lock-free; usable from a user's own @njit code.
    """
    return _get(d, key, koff, n, dst, dst_off, dst_cap, _hash(d, key, koff, n))


@jit(inline="always")
def _get(d, key, koff, n, dst, dst_off, dst_cap, h):
    s = shard_of(d, h)
    if not _mapped(d, s):
        return UNMAPPED
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    b = u8_at(d[x + S_ADDR], d[x + S_SIZE])
    i, e, ro = _find(d, s, key, koff, n, h)
    r = NOTFOUND
    if i >= 0:
        if ro < 0:
            return CORRUPT
        info = A.load(w, (ro + L.RC_INFO) >> 3, "relaxed")
        kind = (info >> 32) & 0xFF
        if kind == L.VK_I64 or kind == L.VK_F64:
            if dst_cap < 8:
                return NEED_BUF
            v = A.load(w, (ro + L.RC_VALUE) >> 3, "relaxed")
            for k in range(8):
                dst[dst_off + k] = (v >> (8 * k)) & 0xFF
            r = (8 << 8) | kind
        else:
            vlen = A.load(w, (ro + L.RC_VALUE) >> 3, "relaxed")
            voff = ro + L.RECORD_HEADER + (info & 0xFFFFFFFF)
            if vlen < 0 or voff + vlen > d[x + S_HEAP] + d[x + S_HEAP_SIZE]:
                return CORRUPT
            if vlen > dst_cap:
                return NEED_BUF
            copy(dst, dst_off, b, voff, vlen)
            r = (vlen << 8) | kind
    # Everything above happens-before this check (the fence orders the loads
    # and copies before it); a write made after the shard moved is not in
    # this generation, so a move seen now means: read again in the new one.
    A.fence("acquire")
    if A.load(w, L.SH_STATE >> 3, "acquire") == L.SHARD_REPLACED:
        return MOVED
    return r


@jit
def value_len(d, key, koff, n):
    """The stored value's length in bytes (8 for numbers), NOTFOUND, MOVED or UNMAPPED."""
    h = _hash(d, key, koff, n)
    s = shard_of(d, h)
    if not _mapped(d, s):
        return UNMAPPED
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    i, e, ro = _find(d, s, key, koff, n, h)
    if i < 0:
        return NOTFOUND
    if ro < 0:
        return CORRUPT
    info = A.load(w, (ro + L.RC_INFO) >> 3, "relaxed")
    kind = (info >> 32) & 0xFF
    if kind == L.VK_I64 or kind == L.VK_F64:
        return 8
    return A.load(w, (ro + L.RC_VALUE) >> 3, "relaxed")


@jit(inline="always")
def _lock_w(d, s):
    """Word index of shard ``s``'s lock in the control segment (its version is SEEN_VERSION_DELTA on)."""
    return (d[X_TABLE] + s * L.SE_SIZE + L.SE_LOCK) >> 3


@jit(inline="always")
def _tick(d):
    """Count one operation on this handle's participant entry (``X_OPS``), for ``python -m shm top``.

    Only the entry's owner writes it: a relaxed load and store, no locked
    instruction. Threads of one process calling from ``@njit(nogil=True)``
    code at once may lose ticks; the figure is a rate, not an account.
    """
    a = d[X_OPS]
    if a != 0:
        w = i64_at(a, 1)
        A.store(w, 0, A.load(w, 0, "relaxed") + 1, "relaxed")


@jit("int64(int64, int64, int64)", nogil=False)
def get_at(daddr, key_addr, n):
    """``get`` into the calling thread's next result area: the Python fast path.

    Returns ``len << 17 | area << 8 | kind`` or a status.
    """
    d = i64_at(daddr, X_SHARDS)
    if d[X_CTRL_SIZE] == 0:
        return CLOSED
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    _tick(d)
    a = _area(d)
    if a < 0:
        return NO_BANK
    cap = d[X_AREA_SIZE]
    key = u8_at(key_addr, n)
    h = _hash(d, key, 0, n)
    # The version, then the lock, then the value (see "The version word").
    if d[X_SEEN] != 0:
        c = _ctrl(d)
        lw = _lock_w(d, shard_of(d, h))
        v = A.load(c, lw + SEEN_VERSION_DELTA, "acquire")
        seen = i64_at(d[X_SEEN], 2 * (AREA_MASK + 1))
        # Through atomics.store: a plain store into a carray view is a dead store to numba.
        A.store(seen, 2 * a, lw, "relaxed")
        A.store(seen, 2 * a + 1, v if A.load(c, lw, "acquire") == 0 and 0 <= v < L.VERSION_BUSY else -1,
                "relaxed")
    r = _get(d, key, 0, n, u8_at(d[X_DST] + a * cap, cap), 0, cap, h)
    if r >= 0:
        return ((r >> 8) << LEN_SHIFT) | (a << AREA_SHIFT) | (r & 0xFF)
    return r


@jit("int64(int64, int64, int64, int64, int64)", nogil=False)
def get_into_at(daddr, key_addr, n, dst_addr, cap):
    """``get`` into a buffer the caller allocated (values larger than an area)."""
    d = i64_at(daddr, X_SHARDS)
    if d[X_CTRL_SIZE] == 0:
        return CLOSED
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    return get(d, u8_at(key_addr, n), 0, n, u8_at(dst_addr, cap), 0, cap)


@jit("int64(int64, int64, int64)", nogil=False)
def value_len_at(daddr, key_addr, n):
    d = i64_at(daddr, X_SHARDS)
    if d[X_CTRL_SIZE] == 0:
        return CLOSED
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    return value_len(d, u8_at(key_addr, n), 0, n)


@jit("int64(int64, int64, int64)", nogil=False)
def shard_of_at(daddr, key_addr, n):
    """Which shard the key lives in."""
    d = i64_at(daddr, X_SHARDS)
    return shard_of(d, _hash(d, u8_at(key_addr, n), 0, n))


# --------------------------------------------------------------------------
# Locks (robust: the owner is recorded; shm/dict.py recovers a dead owner's).

@jit
def try_lock(d, s, spins):
    """Take shard ``s``'s lock, spinning up to ``spins`` backoff steps. 1 if taken, else 0."""
    c = _ctrl(d)
    lw = _lock_w(d, s)
    mine = d[X_ME] + 1
    k = 0
    while True:
        # acquire: pairs with the previous holder's release in unlock.
        if A.load(c, lw, "relaxed") == 0 and A.cas(c, lw, 0, mine, "acquire") == 0:
            return 1
        if k >= spins:
            return 0
        backoff(k if k < 10 else 7)
        k += 1


@jit
def unlock(d, s):
    """Release shard ``s``'s lock (held by this participant); wake a parked waiter."""
    c = _ctrl(d)
    lw = _lock_w(d, s)
    # Before the lock is seen free: pairs with get_at's load of the version
    # and a cache hit's load of the lock (shm/dict.py).
    A.fetch_add(c, lw + SEEN_VERSION_DELTA, 1, "release")
    old = A.exchange(c, lw, 0, "release")
    if old & L.LOCK_WAITERS:
        futex_wake(c, lw, 1)
    return OK if (old & L.LOCK_OWNER_MASK) == d[X_ME] + 1 else CORRUPT


@jit("int64(int64, int64, int64)")
def lock_spin_at(daddr, s, spins):
    d = i64_at(daddr, X_SHARDS)
    if d[X_CTRL_SIZE] == 0 or d[X_ME] < 0:
        return CLOSED
    return try_lock(d, s, spins)


@jit("int64(int64, int64)", nogil=False)
def unlock_at(daddr, s):
    d = i64_at(daddr, X_SHARDS)
    if d[X_CTRL_SIZE] == 0:
        return CLOSED
    return unlock(d, s)


@jit("int64(int64, int64)", nogil=False)
def settle_version_at(daddr, s):
    """Clear shard ``s``'s in-flight increment count and bump its version.

    Only for a frozen shard (COMPACTING, no live announcer, lock held): any
    count left is from incrementers that died between their two adds.
    """
    d = i64_at(daddr, X_SHARDS)
    if d[X_CTRL_SIZE] == 0:
        return CLOSED
    c = _ctrl(d)
    vw = _lock_w(d, s) + SEEN_VERSION_DELTA
    v = A.load(c, vw, "relaxed")
    while True:
        seen = A.cas(c, vw, v, (v & L.VERSION_MASK) + 1, "acq_rel")
        if seen == v:
            return OK
        v = seen


@jit("int64(int64, int64, int64)")
def lock_park_at(daddr, s, timeout_ns):
    """Park until the lock word changes (or ``timeout_ns``); returns the owner seen (+1), 0 if free."""
    d = i64_at(daddr, X_SHARDS)
    if d[X_CTRL_SIZE] == 0:
        return CLOSED
    c = _ctrl(d)
    lw = _lock_w(d, s)
    v = A.load(c, lw, "relaxed")
    if v == 0:
        return 0
    if not v & L.LOCK_WAITERS:
        if A.cas(c, lw, v, v | L.LOCK_WAITERS, "relaxed") != v:
            return A.load(c, lw, "relaxed") & L.LOCK_OWNER_MASK
        v = v | L.LOCK_WAITERS
    A.fetch_add(c, (d[X_TABLE] + s * L.SE_SIZE + L.SE_LOCK_WAITS) >> 3, 1, "relaxed")
    futex_wait(c, lw, v, timeout_ns)
    return A.load(c, lw, "relaxed") & L.LOCK_OWNER_MASK


@jit("int64(int64, int64, int64)", nogil=False)
def lock_steal_at(daddr, s, dead):
    """Take over the lock of dead participant ``dead`` (its reaper). 1 if taken, 0 if not held by it."""
    d = i64_at(daddr, X_SHARDS)
    c = _ctrl(d)
    lw = _lock_w(d, s)
    v = A.load(c, lw, "acquire")
    if (v & L.LOCK_OWNER_MASK) != dead + 1:
        return 0
    # Held in the dead participant's name; the reaper acts for it (see ring.recover_at).
    return 1 if A.cas(c, lw, v, (d[X_ME] + 1) | (v & L.LOCK_WAITERS), "acq_rel") == v else 0


@jit("int64(int64, int64)", nogil=False)
def lock_owner_at(daddr, s):
    d = i64_at(daddr, X_SHARDS)
    return (A.load(_ctrl(d), _lock_w(d, s), "acquire") & L.LOCK_OWNER_MASK) - 1


# --------------------------------------------------------------------------
# Writes (the caller holds the shard's lock).

@jit(inline="always")
def _done(w, garbage):
    """OK, or SHRINK if over half the heap in use (and SHRINK_MIN bytes) is now garbage.

    Measured against the bytes in use, not the heap's size: a compacted heap
    has room for as much again, so deletes alone could never reach half of it.
    """
    return SHRINK if garbage >= SHRINK_MIN and 2 * garbage > A.load(w, L.SH_BUMP >> 3, "relaxed") else OK


@jit
def _store(d, s, key, koff, n, h, kind, val, voff, vlen, num):
    """Insert or replace under the lock. ``num`` is the value word of a numeric kind."""
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    b = u8_at(d[x + S_ADDR], d[x + S_SIZE])
    if A.load(w, L.SH_STATE >> 3, "acquire") == L.SHARD_REPLACED:
        return MOVED
    i, e, ro = _find(d, s, key, koff, n, h)
    if i >= 0 and ro < 0:
        return CORRUPT
    if i >= 0 and (kind == L.VK_I64 or kind == L.VK_F64) and \
            ((A.load(w, (ro + L.RC_INFO) >> 3, "relaxed") >> 32) & 0xFF) == kind:
        # A number replacing a number of the same kind: one atomic store in
        # place (readers see the old value or the new one; an incrementer
        # racing with it is ordered before or after). No garbage.
        A.store(w, (ro + L.RC_VALUE) >> 3, num, "release")
        return OK
    size = _record_size(n, kind, vlen)
    bump = max(A.load(w, L.SH_BUMP >> 3, "relaxed"), HEAP_START)
    heap = d[x + S_HEAP]
    if bump + size > d[x + S_HEAP_SIZE]:
        return NEED_GROW
    count = A.load(w, L.SH_COUNT >> 3, "relaxed")
    tombs = A.load(w, L.SH_TOMBS >> 3, "relaxed")
    if i < 0:
        slot = e
        if slot < 0:
            return NEED_GROW
        reuse = A.load(w, _entry_w(d, x, slot), "relaxed") == L.ENTRY_TOMB
        if not reuse and (count + tombs + 1) * MAX_LOAD_DEN > d[x + S_NSLOTS] * MAX_LOAD_NUM:
            return NEED_GROW
    ro_new = heap + bump
    A.store(w, (ro_new + L.RC_HASH) >> 3, h, "relaxed")
    A.store(w, (ro_new + L.RC_INFO) >> 3, n | (kind << 32), "relaxed")
    if kind == L.VK_I64 or kind == L.VK_F64:
        A.store(w, (ro_new + L.RC_VALUE) >> 3, num, "relaxed")
    else:
        A.store(w, (ro_new + L.RC_VALUE) >> 3, vlen, "relaxed")
        copy(b, ro_new + L.RECORD_HEADER + n, val, voff, vlen)
    copy(b, ro_new + L.RECORD_HEADER, key, koff, n)
    A.store(w, L.SH_BUMP >> 3, bump + size, "relaxed")
    entry = ((bump >> 3) << L.ENTRY_SHIFT) | _tag(h)
    if i >= 0:
        # Replace: readers see the old record or the new one, never a mix.
        A.store(w, _entry_w(d, x, i), entry, "release")
        oinfo = A.load(w, (ro + L.RC_INFO) >> 3, "relaxed")
        okind = (oinfo >> 32) & 0xFF
        old = _record_size(oinfo & 0xFFFFFFFF, okind, A.load(w, (ro + L.RC_VALUE) >> 3, "relaxed"))
        garbage = A.load(w, L.SH_GARBAGE >> 3, "relaxed") + old
        A.store(w, L.SH_GARBAGE >> 3, garbage, "relaxed")
        return _done(w, garbage)
    A.store(w, _entry_w(d, x, slot), entry, "release")
    if reuse:
        A.store(w, L.SH_TOMBS >> 3, tombs - 1, "relaxed")
    A.store(w, L.SH_COUNT >> 3, count + 1, "relaxed")
    return 1        # inserted


@jit
def _delete(d, s, key, koff, n, h):
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    if A.load(w, L.SH_STATE >> 3, "acquire") == L.SHARD_REPLACED:
        return MOVED
    i, e, ro = _find(d, s, key, koff, n, h)
    if i < 0:
        return NOTFOUND
    if ro < 0:
        return CORRUPT
    A.store(w, _entry_w(d, x, i), L.ENTRY_TOMB, "release")
    info = A.load(w, (ro + L.RC_INFO) >> 3, "relaxed")
    size = _record_size(info & 0xFFFFFFFF, (info >> 32) & 0xFF, A.load(w, (ro + L.RC_VALUE) >> 3, "relaxed"))
    garbage = A.load(w, L.SH_GARBAGE >> 3, "relaxed") + size
    A.store(w, L.SH_GARBAGE >> 3, garbage, "relaxed")
    A.store(w, L.SH_COUNT >> 3, A.load(w, L.SH_COUNT >> 3, "relaxed") - 1, "relaxed")
    A.store(w, L.SH_TOMBS >> 3, A.load(w, L.SH_TOMBS >> 3, "relaxed") + 1, "relaxed")
    return _done(w, garbage)


@jit
def put(d, key, koff, n, kind, val, voff, vlen, num, spins):
    """Insert or replace a key, taking and releasing its shard's lock.

    Returns OK (replaced), 1 (inserted), SHRINK (replaced, and the shard is
    mostly garbage now: a hint, the write is done), NEED_GROW, BUSY (the
    lock stayed held for ``spins`` backoff steps), MOVED, UNMAPPED or
    CORRUPT. On NEED_GROW and BUSY nothing was written. Usable from @njit code.
    """
    h = _hash(d, key, koff, n)
    s = shard_of(d, h)
    if not _mapped(d, s):
        return UNMAPPED
    if not try_lock(d, s, spins):
        return BUSY
    r = _store(d, s, key, koff, n, h, kind, val, voff, vlen, num)
    unlock(d, s)
    return r


@jit("int64(int64, int64, int64, int64, int64, int64, int64)", nogil=False)
def put_at(daddr, key_addr, n, kind, val_addr, vlen, num):
    """``put`` for the Python fast path (a short spin for the lock)."""
    d = i64_at(daddr, X_SHARDS)
    if d[X_CTRL_SIZE] == 0 or d[X_ME] < 0:
        return CLOSED
    if d[X_VALKIND] != 0 and kind != d[X_VALKIND]:
        return WRONG_KIND       # numeric mode holds one kind: Python converts or refuses
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    _tick(d)
    return put(d, u8_at(key_addr, n), 0, n, kind, u8_at(val_addr, vlen), 0, vlen, num, 7)


@jit("int64(int64, int64, int64, int64, int64, int64, int64)", nogil=False)
def store_locked_at(daddr, key_addr, n, kind, val_addr, vlen, num):
    """Insert or replace while the caller already holds the key's shard lock."""
    d = i64_at(daddr, X_SHARDS)
    if d[X_CTRL_SIZE] == 0:
        return CLOSED
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    _tick(d)
    key = u8_at(key_addr, n)
    h = _hash(d, key, 0, n)
    return _store(d, shard_of(d, h), key, 0, n, h, kind, u8_at(val_addr, vlen), 0, vlen, num)


@jit("int64(int64, int64, int64, int64)", nogil=False)
def delete_at(daddr, key_addr, n, locked):
    """Delete a key (taking its shard lock unless ``locked``). OK, SHRINK, NOTFOUND, BUSY, MOVED."""
    d = i64_at(daddr, X_SHARDS)
    if d[X_CTRL_SIZE] == 0 or d[X_ME] < 0:
        return CLOSED
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    _tick(d)
    key = u8_at(key_addr, n)
    h = _hash(d, key, 0, n)
    s = shard_of(d, h)
    if not _mapped(d, s):
        return UNMAPPED
    if locked:
        return _delete(d, s, key, 0, n, h)
    if not try_lock(d, s, 7):
        return BUSY
    r = _delete(d, s, key, 0, n, h)
    unlock(d, s)
    return r


# --------------------------------------------------------------------------
# str keys and str/bytes values straight from Python objects.
#
# ``put_at`` takes seven ints, so ``d[k] = v`` in Python computed
# ``id(kb) + BYTES_OFF`` and ``len(kb)`` for the key and the value and paid
# numba's wrapper one int conversion per argument: ~165 ns of call for a
# ~75 ns kernel. The kernels below take the Python objects themselves: the
# argument types ``PYSTR`` and ``PYBYTES`` unbox a ``str`` (to its UTF-8: the
# str's own buffer when it is ASCII, see ``_unbox_str``) or a ``bytes``
# (``PyBytes_AsStringAndSize``) into (address, length), with the C API's own
# type check, and ``PYINT`` an int (``PyLong_AsLong``). A wrong object, a
# lone surrogate (UnicodeEncodeError), a long non-ASCII str (ValueError) or
# an int beyond int64 (OverflowError) raises before the kernel runs, and the
# caller takes its general path. Measured: ~80 ns per call instead of ~165.
# They are only callable through their compiled entry point
# (``overloads[sig].entry_point``, as shm/dict.py does); the dispatcher
# types a str as ``unicode_type`` and finds no match.


class PyBufType(_types.Type):
    """(address, length) of a Python str's UTF-8 or a bytes object's data, borrowed for the call."""

    def __init__(self, what):
        self.what = what
        super().__init__(name=f"PyBuf({what})")


PYSTR = PyBufType("str")
PYBYTES = PyBufType("bytes")


class PyIntType(_types.Type):
    """A Python int as an int64 (``.v``), converted by ``PyLong_AsLong``.

    numba's own int64 argument goes through ``PyNumber_Long`` and
    ``PyLong_AsLongLong``, which in CPython 3.11 takes a slow byte-array
    path for any int above 2**30, such as every address: ~13 ns a call
    (measured). OverflowError beyond int64, TypeError for a non-int.
    """

    def __init__(self):
        super().__init__(name="PyInt")


PYINT = PyIntType()


@_register_model(PyIntType)
class _PyIntModel(_models.StructModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, [("v", _types.int64)])


_attr(PyIntType, "v", "v")


@_unbox(PyIntType)
def _unbox_pyint(typ, obj, c):
    b, api = c.builder, c.pyapi
    fn = api._get_function(_ir.FunctionType(_ir.IntType(64), [api.pyobj]), name="PyLong_AsLong")
    v = b.call(fn, [obj])
    bad = b.and_(b.icmp_signed("==", v, _ir.Constant(v.type, -1)), _cgutils.is_not_null(b, api.err_occurred()))
    out = _cgutils.create_struct_proxy(typ)(c.context, b)
    out.v = v
    return _NativeValue(out._getvalue(), is_error=bad)


@_register_model(PyBufType)
class _PyBufModel(_models.StructModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, [("ptr", _types.int64), ("n", _types.int64)])


_attr(PyBufType, "ptr", "ptr")
_attr(PyBufType, "n", "n")


STR_UTF8_MAX = 256      # a non-ASCII str longer than this (in code points) is refused by PYSTR


def _unbox_str(obj, c):
    """(address, length) of a str's UTF-8, or an error set (TypeError, UnicodeEncodeError, ValueError).

    An ASCII str is its own UTF-8: its buffer, nothing allocated. Otherwise
    ``PyUnicode_AsUTF8AndSize`` makes the UTF-8 and CPython keeps it on the
    str (freed with it), as for every C API that asks; a long non-ASCII
    str is refused instead (ValueError: the caller's general path encodes
    it into a temporary), so that a user's big text does not silently keep
    its UTF-8 twin for as long as it lives.
    """
    b, api = c.builder, c.pyapi
    i64 = _ir.IntType(64)
    p_ptr = _cgutils.alloca_once_value(b, _ir.Constant(i64, 0))
    p_n = _cgutils.alloca_once_value(b, _ir.Constant(i64, -1))
    getlen = api._get_function(_ir.FunctionType(api.py_ssize_t, [api.pyobj]), name="PyUnicode_GetLength")
    n = b.call(getlen, [obj])                   # -1 and TypeError if not a str
    with b.if_then(b.icmp_signed(">=", n, _ir.Constant(n.type, 0))):
        ok, data, _, _, ascii_, _ = api.string_as_string_size_and_kind(obj)
        is_ascii = b.and_(ok, b.icmp_unsigned("!=", ascii_, _ir.Constant(ascii_.type, 0)))
        with b.if_else(is_ascii) as (ascii_str, other):
            with ascii_str:
                b.store(b.ptrtoint(data, i64), p_ptr)
                b.store(b.sext(n, i64) if n.type != i64 else n, p_n)
            with other:
                with b.if_else(b.icmp_signed("<=", n, _ir.Constant(n.type, STR_UTF8_MAX))) as (short, long_):
                    with short:
                        ok2, buf, m = api.string_as_string_and_size(obj)
                        with b.if_then(ok2):
                            b.store(b.ptrtoint(buf, i64), p_ptr)
                            b.store(b.sext(m, i64) if m.type != i64 else m, p_n)
                    with long_:
                        api.err_set_string("PyExc_ValueError",
                                           "a long non-ASCII str: encode it (the general path)")
    return b.load(p_ptr), b.load(p_n)


@_unbox(PyBufType)
def _unbox_pybuf(typ, obj, c):
    if typ.what == "str":
        ptr, n = _unbox_str(obj, c)
        bad = c.builder.icmp_signed("<", n, _ir.Constant(n.type, 0))
    else:
        pbuf = _cgutils.alloca_once(c.builder, c.pyapi.cstring)
        pn = _cgutils.alloca_once(c.builder, c.pyapi.py_ssize_t)
        ok = c.pyapi.bytes_as_string_and_size(obj, pbuf, pn)
        ptr, n = c.builder.ptrtoint(c.builder.load(pbuf), _ir.IntType(64)), c.builder.load(pn)
        bad = c.builder.not_(ok)
    out = _cgutils.create_struct_proxy(typ)(c.context, c.builder)
    out.ptr = ptr
    out.n = n
    return _NativeValue(out._getvalue(), is_error=bad)


@jit(inline="always")
def _str_key(d, k):
    """The str key ``k``'s canonical bytes (b"s" + UTF-8) in the key buffer: (buffer, length), -1 if too long."""
    buf = u8_at(d[X_KEYBUF], KEYBUF)
    n = k.n + 1
    if d[X_KEYBUF] == 0 or n > KEYBUF:
        return buf, -1
    copy(buf, 1, u8_at(k.ptr, k.n), 0, k.n)
    return buf, n


@jit(inline="always")
def _put_str(daddr, k, kind, val, vlen, num):
    d = i64_at(daddr, X_SHARDS)
    if d[X_CTRL_SIZE] == 0 or d[X_ME] < 0:
        return CLOSED
    if d[X_KEYMODE] != 0:
        return WRONG_KIND       # numeric mode: int keys only (Python raises the TypeError)
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    key, n = _str_key(d, k)
    if n < 0:
        return NEED_BUF         # a key longer than the buffer: the general path
    _tick(d)
    return put(d, key, 0, n, kind, val, 0, vlen, num, 7)


@jit(_types.int64(PYINT, PYSTR, PYINT), nogil=False)
def put_str_i64_at(daddr, key, num):
    """``d[key] = num`` for a str key and an int64 value: ``put_at``'s statuses, NEED_BUF for a long key."""
    return _put_str(daddr.v, key, L.VK_I64, u8_at(key.ptr, 0), 0, num.v)


@jit(_types.int64(PYINT, PYSTR, PYSTR), nogil=False)
def put_str_str_at(daddr, key, val):
    """``d[key] = val`` for a str key and a str value (stored as VK_STR, its UTF-8)."""
    return _put_str(daddr.v, key, L.VK_STR, u8_at(val.ptr, val.n), val.n, 0)


@jit(_types.int64(PYINT, PYSTR, PYBYTES, PYINT), nogil=False)
def put_str_bytes_at(daddr, key, val, kind):
    """``d[key] = value`` for a str key and a value the codec encoded to ``val`` (of kind ``kind``)."""
    return _put_str(daddr.v, key, kind.v, u8_at(val.ptr, val.n), val.n, 0)


# --------------------------------------------------------------------------
# Lock-free increments.

@jit(inline="always")
def _ann_w(d, me):
    return (d[X_ANNOUNCE] + me * L.ANNOUNCE_SIZE) >> 3


@jit(inline="always")
def _add_checked(w, vw, delta):
    """Atomically add ``delta`` unless the int64 would overflow. Returns (ok, old)."""
    # Compare against the bounds before adding: numba emits signed adds as
    # ``add nsw``, so LLVM may fold a wrapped-result test like ``old + delta < old``
    # to ``delta < 0`` (measured: it does). These comparisons cannot overflow.
    old = A.load(w, vw, "relaxed")
    while True:
        if (delta > 0 and old > _I64_MAX - delta) or (delta < 0 and old < _I64_MIN - delta):
            return False, old
        seen = A.cas(w, vw, old, old + delta, "seq_cst")
        if seen == old:
            return True, old
        old = seen


@jit
def incr(d, key, koff, n, delta, out, out_off):
    """Add ``delta`` to an int64 value without the lock; the new value goes to ``out``.

    Returns OK, NOTFOUND (take the locked path: insert the default),
    WRONG_KIND (the value is not an int64), OVERFLOW (the result would not
    fit an int64: the locked path stores it as a big int), BUSY (the generation is being
    compacted or read-modify-written under the lock: take the locked path),
    MOVED, UNMAPPED or CORRUPT. Usable from @njit code.
    """
    h = _hash(d, key, koff, n)
    s = shard_of(d, h)
    if not _mapped(d, s):
        return UNMAPPED
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    c = _ctrl(d)
    me = d[X_ME]
    if me < 0:
        return CLOSED
    aw = _ann_w(d, me)
    while True:
        i, e, ro = _find(d, s, key, koff, n, h)
        if i < 0:
            return MOVED if A.load(w, L.SH_STATE >> 3, "acquire") == L.SHARD_REPLACED else NOTFOUND
        if ro < 0:
            return CORRUPT
        kind = (A.load(w, (ro + L.RC_INFO) >> 3, "relaxed") >> 32) & 0xFF
        if kind != L.VK_I64:
            return WRONG_KIND
        # Dekker with the compactor: announce, then check the generation (both seq_cst).
        A.store(c, aw, ((s + 1) << 32) | d[x + S_GEN], "seq_cst")
        st = A.load(w, L.SH_STATE >> 3, "seq_cst")
        if st != L.SHARD_LIVE:
            A.store(c, aw, 0, "release")
            return MOVED if st == L.SHARD_REPLACED else BUSY
        vw = _lock_w(d, s) + SEEN_VERSION_DELTA
        A.fetch_add(c, vw, L.VERSION_BUSY + 1, "seq_cst")
        ok, old = _add_checked(w, (ro + L.RC_VALUE) >> 3, delta)
        A.fetch_add(c, vw, 1 - L.VERSION_BUSY, "release")
        A.store(c, aw, 0, "release")
        if not ok:
            return OVERFLOW
        if A.load(w, _entry_w(d, x, i), "acquire") == e:
            v = old + delta
            for k in range(8):
                out[out_off + k] = (v >> (8 * k)) & 0xFF
            return OK
        # The record was replaced or deleted while we added: that add landed on a
        # dead record; do it again on whatever the key is now.


@jit("int64(int64, int64, int64, int64)", nogil=False)
def incr_at(daddr, key_addr, n, delta):
    """``incr`` with the new value in the calling thread's next result area.

    Returns ``area`` (>= 0, the area holds the new int64) or a status.
    """
    d = i64_at(daddr, X_SHARDS)
    if d[X_CTRL_SIZE] == 0:
        return CLOSED
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    _tick(d)
    a = _area(d)
    if a < 0:
        return NO_BANK
    cap = d[X_AREA_SIZE]
    r = incr(d, u8_at(key_addr, n), 0, n, delta, u8_at(d[X_DST] + a * cap, cap), 0)
    return a if r == OK else r


@jit("int64(int64, int64)", nogil=False)
def announcers_at(daddr, s):
    """Participants announcing the mapped generation of shard ``s`` (a bitmask of the first 64, plus a count)."""
    d = i64_at(daddr, X_SHARDS)
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    c = _ctrl(d)
    want = ((s + 1) << 32) | d[_sx(s) + S_GEN]
    n = 0
    for p in range(L.MAX_PARTICIPANTS):
        if A.load(c, _ann_w(d, p), "seq_cst") == want:
            n += 1
    return n


@jit("int64(int64, int64)", nogil=False)
def announcer_at(daddr, s):
    """The first participant announcing shard ``s``'s mapped generation, or -1."""
    d = i64_at(daddr, X_SHARDS)
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    c = _ctrl(d)
    want = ((s + 1) << 32) | d[_sx(s) + S_GEN]
    for p in range(L.MAX_PARTICIPANTS):
        if A.load(c, _ann_w(d, p), "seq_cst") == want:
            return p
    return -1


@jit("int64(int64, int64)", nogil=False)
def clear_announce_at(daddr, p):
    d = i64_at(daddr, X_SHARDS)
    A.store(_ctrl(d), _ann_w(d, p), 0, "seq_cst")
    return OK


@jit("int64(int64, int64, int64)", nogil=False)
def set_state_at(daddr, s, state):
    """Set the mapped generation's state (the caller holds the lock); returns the old state."""
    d = i64_at(daddr, X_SHARDS)
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    return A.exchange(w, L.SH_STATE >> 3, state, "seq_cst")


@jit("int64(int64, int64, int64)", nogil=False)
def publish_at(daddr, s, gen):
    """Mark the mapped generation REPLACED, then name ``gen`` in the shard table.

    One kernel call, so no Python-level exception (KeyboardInterrupt) can
    land between the two stores; a SIGKILL there is recovered by whoever
    takes the lock next (``shm/dict.py``). seq_cst: a reader that sees the
    new number (acquire) also sees REPLACED on the old generation.
    """
    d = i64_at(daddr, X_SHARDS)
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    A.exchange(w, L.SH_STATE >> 3, L.SHARD_REPLACED, "seq_cst")
    A.store(_ctrl(d), (d[X_TABLE] + s * L.SE_SIZE + L.SE_GEN) >> 3, gen, "seq_cst")
    return OK


# --------------------------------------------------------------------------
# Compaction (growth, shrinking, repair): old generation -> new generation.

@jit("int64(int64, int64, int64, int64, int64, int64, int64, int64)", nogil=False)
def compact_at(daddr, s, new_addr, new_size, nslots, index_off, heap_off, heap_size):
    """Copy shard ``s``'s live records into a fresh generation segment.

    The caller holds the lock and has set the old generation COMPACTING and
    waited for incrementers to leave. Records are re-validated (bounds,
    hash, key length) and anything that does not check out is dropped.
    Returns the number of records copied, or NEED_GROW if the new segment
    is too small (nothing is published either way: the caller does that).
    """
    d = i64_at(daddr, X_SHARDS)
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    x = _sx(s)
    ow = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    ob = u8_at(d[x + S_ADDR], d[x + S_SIZE])
    nw = i64_at(new_addr, new_size >> 3)
    nb = u8_at(new_addr, new_size)
    oheap = d[x + S_HEAP]
    ohsize = d[x + S_HEAP_SIZE]
    mask = nslots - 1
    bump = HEAP_START
    count = 0
    for i in range(d[x + S_NSLOTS]):
        e = A.load(ow, _entry_w(d, x, i), "acquire")
        if e == L.ENTRY_EMPTY or e == L.ENTRY_TOMB:
            continue
        off = (e >> L.ENTRY_SHIFT) << 3
        if off < 0 or off + L.RECORD_HEADER > ohsize:
            continue
        ro = oheap + off
        h = A.load(ow, ro >> 3, "relaxed")
        info = A.load(ow, (ro + L.RC_INFO) >> 3, "relaxed")
        klen = info & 0xFFFFFFFF
        kind = (info >> 32) & 0xFF
        val = A.load(ow, (ro + L.RC_VALUE) >> 3, "relaxed")
        vlen = 0 if (kind == L.VK_I64 or kind == L.VK_F64) else val
        if vlen < 0 or (e & L.ENTRY_TAG_MASK) != _tag(h):
            continue
        size = _record_size(klen, kind, vlen)
        if off + size > ohsize:
            continue
        if bump + size > heap_size:
            return NEED_GROW
        j = h & mask
        placed = False
        for _ in range(nslots):
            if A.load(nw, (index_off >> 3) + j, "relaxed") == L.ENTRY_EMPTY:
                placed = True
                break
            j = (j + 1) & mask
        if not placed:
            return NEED_GROW
        copy(nb, heap_off + bump, ob, ro, size)
        A.store(nw, (index_off >> 3) + j, ((bump >> 3) << L.ENTRY_SHIFT) | _tag(h), "relaxed")
        bump += size
        count += 1
    A.store(nw, L.SH_BUMP >> 3, bump, "relaxed")
    A.store(nw, L.SH_COUNT >> 3, count, "relaxed")
    A.store(nw, L.SH_TOMBS >> 3, 0, "relaxed")
    A.store(nw, L.SH_GARBAGE >> 3, 0, "relaxed")
    A.store(nw, L.SH_STATE >> 3, L.SHARD_LIVE, "release")
    return count


@jit("int64(int64, int64, int64)", nogil=False)
def shard_stat_at(daddr, s, field_off):
    """A word of shard ``s``'s mapped generation header (SH_*), or UNMAPPED/CLOSED."""
    d = i64_at(daddr, X_SHARDS)
    if d[X_CTRL_SIZE] == 0:
        return CLOSED
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    if not _mapped(d, s):
        return UNMAPPED
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    return A.load(w, field_off >> 3, "acquire")


# --------------------------------------------------------------------------
# Iteration: a snapshot of one shard.

@jit("int64(int64, int64, int64, int64, int64)", nogil=False)
def snapshot_at(daddr, s, dst_addr, cap, with_values):
    """Copy every live record of shard ``s`` into ``dst`` as [klen:4][kind:1][pad:3][vlen:8][key][value].

    Returns the bytes written, ``-(needed + 100)`` if ``cap`` is too small,
    MOVED if the generation was replaced meanwhile (start the shard again).
    Each entry is read once: a key present for the whole scan is seen
    exactly once; keys written during it may or may not be.
    """
    d = i64_at(daddr, X_SHARDS)
    if d[X_CTRL_SIZE] == 0:
        return CLOSED
    d = i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)
    if not _mapped(d, s):
        return UNMAPPED
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    b = u8_at(d[x + S_ADDR], d[x + S_SIZE])
    dst = u8_at(dst_addr, cap)
    heap = d[x + S_HEAP]
    hsize = d[x + S_HEAP_SIZE]
    at = 0
    need = 0
    for i in range(d[x + S_NSLOTS]):
        e = A.load(w, _entry_w(d, x, i), "acquire")
        if e == L.ENTRY_EMPTY or e == L.ENTRY_TOMB:
            continue
        off = (e >> L.ENTRY_SHIFT) << 3
        if off < 0 or off + L.RECORD_HEADER > hsize:
            continue
        ro = heap + off
        info = A.load(w, (ro + L.RC_INFO) >> 3, "relaxed")
        klen = info & 0xFFFFFFFF
        kind = (info >> 32) & 0xFF
        val = A.load(w, (ro + L.RC_VALUE) >> 3, "relaxed")
        numeric = kind == L.VK_I64 or kind == L.VK_F64
        vlen = 8 if numeric else val
        if vlen < 0 or off + L.RECORD_HEADER + klen + (0 if numeric else vlen) > hsize:
            continue
        body = 16 + klen + (vlen if with_values else 0)
        need += body
        if at + body > cap:
            continue
        dst[at] = klen & 0xFF
        dst[at + 1] = (klen >> 8) & 0xFF
        dst[at + 2] = (klen >> 16) & 0xFF
        dst[at + 3] = (klen >> 24) & 0xFF
        dst[at + 4] = kind
        wv = vlen if with_values else 0
        for k in range(8):
            dst[at + 8 + k] = (wv >> (8 * k)) & 0xFF
        copy(dst, at + 16, b, ro + L.RECORD_HEADER, klen)
        if with_values:
            if numeric:
                for k in range(8):
                    dst[at + 16 + klen + k] = (val >> (8 * k)) & 0xFF
            else:
                copy(dst, at + 16 + klen, b, ro + L.RECORD_HEADER + klen, vlen)
        at += body
    A.fence("acquire")
    if A.load(w, L.SH_STATE >> 3, "acquire") == L.SHARD_REPLACED:
        return MOVED
    if need > at:
        return -(need + 100)
    return at


# --------------------------------------------------------------------------
# The numeric mode: int64 keys, int64 or float64 values, for a user's @njit
# loops (and the Python layer's numeric dicts). The key is 8 bytes in the
# record, compared as one word; nothing is allocated per call.

@jit
def _find_i64(d, s, key, h):
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    nslots = d[x + S_NSLOTS]
    heap = d[x + S_HEAP]
    hsize = d[x + S_HEAP_SIZE]
    mask = nslots - 1
    i = h & mask
    tag = _tag(h)
    free = -1
    for _ in range(nslots):
        e = A.load(w, _entry_w(d, x, i), "acquire")
        if e == L.ENTRY_EMPTY:
            return -1, (free if free >= 0 else i), 0
        if e == L.ENTRY_TOMB:
            if free < 0:
                free = i
        elif (e & L.ENTRY_TAG_MASK) == tag:
            off = (e >> L.ENTRY_SHIFT) << 3
            if off < 0 or off + L.RECORD_HEADER + 8 > hsize:
                return i, e, -1
            ro = heap + off
            if (A.load(w, (ro + L.RC_INFO) >> 3, "relaxed") & 0xFFFFFFFF) == 8 and \
                    A.load(w, (ro + L.RECORD_HEADER) >> 3, "relaxed") == key and \
                    A.load(w, ro >> 3, "relaxed") == h:
                return i, e, ro
        i = (i + 1) & mask
    return -1, free, 0


@jit
def lookup_i64(d, key):
    """Numeric mode: ``(status, value bits)`` of int64 ``key``.

    Status OK, NOTFOUND, MOVED or UNMAPPED (on those two, return to Python
    and call the dict's ``refresh()``). The bits are the int64 itself, or a
    float64's bits (``lookup_f64`` reinterprets them).
    """
    _tick(d)
    h = hash_i64(key)
    s = shard_of(d, h)
    if not _mapped(d, s):
        return UNMAPPED, 0
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    i, e, ro = _find_i64(d, s, key, h)
    v = 0
    r = NOTFOUND
    if i >= 0:
        if ro < 0:
            return CORRUPT, 0
        v = A.load(w, (ro + L.RC_VALUE) >> 3, "relaxed")
        r = OK
    A.fence("acquire")
    if A.load(w, L.SH_STATE >> 3, "acquire") == L.SHARD_REPLACED:
        return MOVED, 0
    return r, v


@jit
def _store_i64(d, s, key, h, kind, num):
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    if A.load(w, L.SH_STATE >> 3, "acquire") == L.SHARD_REPLACED:
        return MOVED
    i, e, ro = _find_i64(d, s, key, h)
    if i >= 0:
        if ro < 0:
            return CORRUPT
        info = A.load(w, (ro + L.RC_INFO) >> 3, "relaxed")
        if ((info >> 32) & 0xFF) == kind:
            # Same numeric kind: overwrite in place (an atomic store; an
            # incrementer racing with it is ordered before or after).
            A.store(w, (ro + L.RC_VALUE) >> 3, num, "release")
            return OK
    size = _record_size(8, kind, 0)
    bump = max(A.load(w, L.SH_BUMP >> 3, "relaxed"), HEAP_START)
    if bump + size > d[x + S_HEAP_SIZE]:
        return NEED_GROW
    count = A.load(w, L.SH_COUNT >> 3, "relaxed")
    tombs = A.load(w, L.SH_TOMBS >> 3, "relaxed")
    reuse = False
    if i < 0:
        if e < 0:
            return NEED_GROW
        reuse = A.load(w, _entry_w(d, x, e), "relaxed") == L.ENTRY_TOMB
        if not reuse and (count + tombs + 1) * MAX_LOAD_DEN > d[x + S_NSLOTS] * MAX_LOAD_NUM:
            return NEED_GROW
    ro_new = d[x + S_HEAP] + bump
    A.store(w, (ro_new + L.RC_HASH) >> 3, h, "relaxed")
    A.store(w, (ro_new + L.RC_INFO) >> 3, 8 | (kind << 32), "relaxed")
    A.store(w, (ro_new + L.RC_VALUE) >> 3, num, "relaxed")
    A.store(w, (ro_new + L.RECORD_HEADER) >> 3, key, "relaxed")
    A.store(w, L.SH_BUMP >> 3, bump + size, "relaxed")
    entry = ((bump >> 3) << L.ENTRY_SHIFT) | _tag(h)
    if i >= 0:
        A.store(w, _entry_w(d, x, i), entry, "release")
        A.store(w, L.SH_GARBAGE >> 3, A.load(w, L.SH_GARBAGE >> 3, "relaxed") + size, "relaxed")
        return OK
    A.store(w, _entry_w(d, x, e), entry, "release")
    if reuse:
        A.store(w, L.SH_TOMBS >> 3, tombs - 1, "relaxed")
    A.store(w, L.SH_COUNT >> 3, count + 1, "relaxed")
    return 1


@jit
def put_i64(d, key, kind, num, spins):
    """Numeric mode: store ``num`` (int64 bits, of ``kind`` VK_I64 or VK_F64) under int64 ``key``.

    Takes the shard lock (spinning up to ``spins`` steps: BUSY if it stays
    taken). Returns OK/1 (replaced/inserted), NEED_GROW (return to Python:
    the dict's ``grow_for(key)`` grows the shard), BUSY (retry, or do this
    put from Python, which waits for the lock and recovers a dead holder's),
    MOVED or UNMAPPED (the dict's ``refresh()``).
    """
    _tick(d)
    h = hash_i64(key)
    s = shard_of(d, h)
    if not _mapped(d, s):
        return UNMAPPED
    if not try_lock(d, s, spins):
        return BUSY
    r = _store_i64(d, s, key, h, kind, num)
    unlock(d, s)
    return r


@jit
def incr_i64(d, key, delta):
    """Numeric mode: ``(status, new value)`` after adding ``delta`` lock-free.

    NOTFOUND (the key is absent: put it first, or call the dict's ``incr``
    from Python), OVERFLOW (the sum leaves int64: nothing added), BUSY (a
    compaction is running: retry), MOVED, UNMAPPED.
    """
    _tick(d)
    h = hash_i64(key)
    s = shard_of(d, h)
    if not _mapped(d, s):
        return UNMAPPED, 0
    x = _sx(s)
    w = i64_at(d[x + S_ADDR], d[x + S_SIZE] >> 3)
    c = _ctrl(d)
    me = d[X_ME]
    if me < 0:
        return CLOSED, 0
    aw = _ann_w(d, me)
    while True:
        i, e, ro = _find_i64(d, s, key, h)
        if i < 0:
            return (MOVED if A.load(w, L.SH_STATE >> 3, "acquire") == L.SHARD_REPLACED else NOTFOUND), 0
        if ro < 0:
            return CORRUPT, 0
        if ((A.load(w, (ro + L.RC_INFO) >> 3, "relaxed") >> 32) & 0xFF) != L.VK_I64:
            return WRONG_KIND, 0
        A.store(c, aw, ((s + 1) << 32) | d[x + S_GEN], "seq_cst")
        st = A.load(w, L.SH_STATE >> 3, "seq_cst")
        if st != L.SHARD_LIVE:
            A.store(c, aw, 0, "release")
            return (MOVED if st == L.SHARD_REPLACED else BUSY), 0
        ok, old = _add_checked(w, (ro + L.RC_VALUE) >> 3, delta)
        A.store(c, aw, 0, "release")
        if not ok:
            return OVERFLOW, old
        if A.load(w, _entry_w(d, x, i), "acquire") == e:
            return OK, old + delta


@jit
def add_i64(d, key, delta, spins):
    """Numeric mode: ``incr_i64`` that inserts a missing key (as ``delta``).

    An existing key takes the lock-free path; a missing one is inserted
    under the shard lock (spinning up to ``spins`` steps), after checking
    again that no other process inserted it meanwhile. Returns ``(status,
    new value)``: OK, BUSY (the lock stayed held: retry, or call the dict's
    ``incr`` from Python, which waits and recovers a dead holder's lock),
    NEED_GROW (``grow_for(key)``), OVERFLOW, WRONG_KIND, MOVED, UNMAPPED.
    """
    st, v = incr_i64(d, key, delta)
    if st != NOTFOUND:
        return st, v
    h = hash_i64(key)
    s = shard_of(d, h)
    if not try_lock(d, s, spins):
        return BUSY, 0
    i, e, ro = _find_i64(d, s, key, h)
    if i >= 0:
        unlock(d, s)                # inserted meanwhile: add to it, lock-free
        return incr_i64(d, key, delta)
    r = _store_i64(d, s, key, h, L.VK_I64, delta)
    unlock(d, s)
    if r < 0:
        return r, 0
    return OK, delta


@jit(inline="always")
def _full(daddr):
    d = i64_at(daddr, X_SHARDS)
    return i64_at(daddr, X_SHARDS + d[X_NSHARDS] * X_STRIDE)


@jit(inline="always")
def _area_word(d, a):
    return i64_at(d[X_DST] + a * d[X_AREA_SIZE], 1)


@jit("int64(int64, int64)", nogil=False)
def get_num_at(daddr, key):
    """Numeric mode, from Python: ``area`` (>= 0, holding the value's bits) or a status."""
    d = _full(daddr)
    if d[X_CTRL_SIZE] == 0:
        return CLOSED
    a = _area(d)
    if a < 0:
        return NO_BANK
    r, v = lookup_i64(d, key)
    if r != OK:
        return r
    A.store(_area_word(d, a), 0, v, "relaxed")
    return a


@jit("int64(int64, int64, int64, int64)", nogil=False)
def put_num_at(daddr, key, kind, num):
    d = _full(daddr)
    if d[X_CTRL_SIZE] == 0 or d[X_ME] < 0:
        return CLOSED
    return put_i64(d, key, kind, num, 7)


@jit("int64(int64, int64, int64, int64)", nogil=False)
def store_num_locked_at(daddr, key, kind, num):
    d = _full(daddr)
    if d[X_CTRL_SIZE] == 0:
        return CLOSED
    h = hash_i64(key)
    return _store_i64(d, shard_of(d, h), key, h, kind, num)


@jit("int64(int64, int64, int64)", nogil=False)
def incr_num_at(daddr, key, delta):
    d = _full(daddr)
    if d[X_CTRL_SIZE] == 0:
        return CLOSED
    a = _area(d)
    if a < 0:
        return NO_BANK
    r, v = incr_i64(d, key, delta)
    if r != OK:
        return r
    A.store(_area_word(d, a), 0, v, "relaxed")
    return a


@jit("int64(int64, int64)", nogil=False)
def shard_of_num_at(daddr, key):
    d = i64_at(daddr, X_SHARDS)
    return shard_of(d, hash_i64(key))
