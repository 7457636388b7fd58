"""Broadcast rings: every subscriber reads every message (tokio's ``broadcast``, across processes).

Design notes
------------
One ring of ``capacity`` slots (a power of two) in one segment
(``kernels/layout.py``: ``BROADCAST``, ``BSLOT``). Publishers write the
message at position ``tail`` into slot ``tail % capacity`` and then advance
``tail``; nothing is ever removed: a subscriber keeps its own cursor (in
its process) and reads position after position. A slot is overwritten one
lap later, so a subscriber more than ``capacity`` messages behind has lost
the oldest ones: it is told how many (``LAGGED``; ``shm.Lagged(n)``) and
continues from the oldest message still there.

*Publishers take a lock* (``lock``: owner participant + 1, CAS; robust: the
Python layer takes over a dead owner's lock). Broadcast is usually one
publisher, the lock is uncontended, and it makes the writer side a plain
single-writer seqlock, which is what readers that never write need:

1. ``stamp = -(pos + 1)`` (relaxed), then a release fence: the stores
   below cannot become visible before it.
2. Copy the payload, its length and kind.
3. ``stamp = pos + 1`` (release): pairs with the reader's acquire load.
4. ``tail = pos + 1`` (release): pairs with the reader's acquire load of
   ``tail``; a position is readable only once ``tail`` is past it, and its
   stamp says complete by then.
5. seq_cst fence; if any subscriber's waiter bit is set, bump ``seq`` and
   ``futex_wake`` (the same Dekker as a channel's: a subscriber sets its
   bit, fences, reads ``seq``, re-checks ``tail``, then sleeps).

A publisher killed at any step leaves ``tail`` where it was: the slot it
was writing is at an unpublished position, and the next lock holder writes
that position again. Readers never wait on a dead publisher.

*A subscriber reads* position ``cur``: ``tail`` (acquire); nothing if
``cur >= tail``; lagged if ``cur < tail - capacity``; else the stamp
(acquire) must be ``cur + 1`` (else a later lap has overwritten or is
overwriting the slot: lagged), copy out, acquire fence, and the stamp must
still be ``cur + 1`` (else the copy may be torn: lagged). Lengths come from
shared memory and are bounded by the slot before any copy.

Rejected: per-subscriber cursors in shared memory with publishers waiting
for the slowest (that is a channel per subscriber, and one stalled
subscriber would stall everyone); lock-free multi-publisher claiming by
fetch_add (a publisher killed between claiming and stamping leaves a hole
that readers cannot tell from a slow writer without a claim table).
"""
from __future__ import annotations

import numpy as np

from . import atomics as A
from . import layout as L
from ._jit import jit
from .memory import copy, i64_at, u8_at
from .ring import backoff
from .syscalls import futex_wait, futex_wake

# Descriptor: a process-local int64 array.
D_BASE = 0          # segment address
D_SIZE = 1          # segment size (0: closed)
D_CAP = 2           # slots (power of two)
D_SLOT = 3          # bytes per slot
D_SLOTS = 4         # byte offset of slot 0
D_ME = 5            # participant index, -1 if none
D_LEN = 8

# Status codes (negative).
EMPTY = -1          # nothing at this position yet
LAGGED = -2         # this position was overwritten: the caller moves to tail - capacity
CLOSED = -3
TOO_BIG = -4        # publish: the payload does not fit a slot
NOT_OWNER = -5      # unlock: the lock is not ours
CORRUPT = -6
KIND_SHIFT = 40     # read_at: kind << KIND_SHIFT | length


@jit(inline="always")
def _words(d):
    return i64_at(d[D_BASE], d[D_SIZE] >> 3)


@jit(inline="always")
def _slot_w(d, pos):
    """Word index of the slot for position ``pos``."""
    return (d[D_SLOTS] + (pos & (d[D_CAP] - 1)) * d[D_SLOT]) >> 3


@jit("int64(int64, int64)", nogil=False)
def lock_at(daddr, spins):
    """Take the publishers' lock, spinning up to ``spins`` backoff steps. 1 if taken, 0 if not."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0 or d[D_ME] < 0:
        return CLOSED
    w = _words(d)
    mine = d[D_ME] + 1
    k = 0
    while True:
        # acquire: pairs with the previous holder's release in unlock_at.
        if A.load(w, L.BC_LOCK >> 3, "relaxed") == 0 and A.cas(w, L.BC_LOCK >> 3, 0, mine, "acquire") == 0:
            return 1
        if k >= spins:
            return 0
        backoff(k if k < 10 else 7)
        k += 1


@jit("int64(int64)", nogil=False)
def unlock_at(daddr):
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    w = _words(d)
    mine = d[D_ME] + 1
    return 0 if A.cas(w, L.BC_LOCK >> 3, mine, 0, "release") == mine else NOT_OWNER


@jit("int64(int64)", nogil=False)
def lock_owner_at(daddr):
    """The participant holding the publishers' lock, or -1."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    return A.load(_words(d), L.BC_LOCK >> 3, "acquire") - 1


@jit("int64(int64, int64)", nogil=False)
def steal_at(daddr, owner):
    """Take over the lock from ``owner`` (dead, or a word no holder explains). 1 if taken."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0 or d[D_ME] < 0:
        return CLOSED
    w = _words(d)
    return 1 if A.cas(w, L.BC_LOCK >> 3, owner + 1, d[D_ME] + 1, "acq_rel") == owner + 1 else 0


@jit("int64(int64, int64, int64, int64)", nogil=False)
def publish_at(daddr, src_addr, n, kind):
    """Publish ``n`` bytes at ``src_addr`` (the caller holds the lock). Returns the position or a status."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    if n < 0 or n > d[D_SLOT] - L.BS_DATA:
        return TOO_BIG
    w = _words(d)
    b = u8_at(d[D_BASE], d[D_SIZE])
    pos = A.load(w, L.BC_TAIL >> 3, "relaxed")
    if pos < 0:
        return CORRUPT
    sw = _slot_w(d, pos)
    A.store(w, sw + (L.BS_STAMP >> 3), -(pos + 1), "relaxed")
    A.fence("release")
    if copy(b, (sw << 3) + L.BS_DATA, u8_at(src_addr, n), 0, n) < 0:
        return CORRUPT
    A.store(w, sw + (L.BS_LEN >> 3), n, "relaxed")
    A.store(w, sw + (L.BS_KIND >> 3), kind, "relaxed")
    A.store(w, sw + (L.BS_STAMP >> 3), pos + 1, "release")
    A.store(w, L.BC_TAIL >> 3, pos + 1, "release")
    A.fence("seq_cst")
    for i in range(L.BITMAP_WORDS):
        if A.load(w, (L.BC_WAITERS >> 3) + i, "relaxed") != 0:
            A.fetch_add(w, L.BC_SEQ >> 3, 1, "seq_cst")
            futex_wake(w, L.BC_SEQ >> 3, 1 << 30)
            break
    return pos


@jit("int64(int64, int64, int64, int64)", nogil=False)
def read_at(daddr, cur, dst_addr, cap):
    """Copy the message at position ``cur`` to ``dst``: ``kind << 40 | length``, EMPTY or LAGGED."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    w = _words(d)
    tail = A.load(w, L.BC_TAIL >> 3, "acquire")
    if cur >= tail:
        return EMPTY
    if cur < tail - d[D_CAP] or cur < 0:
        return LAGGED
    sw = _slot_w(d, cur)
    s1 = A.load(w, sw + (L.BS_STAMP >> 3), "acquire")
    if s1 != cur + 1:
        return LAGGED
    n = A.load(w, sw + (L.BS_LEN >> 3), "relaxed")
    kind = A.load(w, sw + (L.BS_KIND >> 3), "relaxed")
    if n < 0 or n > d[D_SLOT] - L.BS_DATA or n > cap or kind < 0 or kind > 255:
        # Torn (being rewritten) or damaged: the stamp re-check tells which.
        A.fence("acquire")
        return LAGGED if A.load(w, sw + (L.BS_STAMP >> 3), "relaxed") != s1 else CORRUPT
    copy(u8_at(dst_addr, cap), 0, u8_at(d[D_BASE], d[D_SIZE]), (sw << 3) + L.BS_DATA, n)
    A.fence("acquire")
    if A.load(w, sw + (L.BS_STAMP >> 3), "relaxed") != s1:
        return LAGGED
    return (kind << KIND_SHIFT) | n


@jit("int64(int64)", nogil=False)
def tail_at(daddr):
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    return A.load(_words(d), L.BC_TAIL >> 3, "acquire")


@jit("int64(int64, int64, int64)")
def park_at(daddr, cur, timeout_ns):
    """Sleep until a position past ``cur`` is published (or ``timeout_ns``).

    The caller has set its waiter bit (and clears it after). Fence, read
    ``seq``, re-check ``tail``, then sleep only while ``seq`` is unchanged.
    Returns 1 if it did not sleep because a message is there.
    """
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    w = _words(d)
    A.fence("seq_cst")
    seq = A.load(w, L.BC_SEQ >> 3, "seq_cst")
    if A.load(w, L.BC_TAIL >> 3, "acquire") > cur:
        return 1
    futex_wait(w, L.BC_SEQ >> 3, seq, timeout_ns)
    return 0


@jit("int64(int64)")
def wake_at(daddr):
    """Wake every parked subscriber (after a close or a reap)."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    w = _words(d)
    A.fetch_add(w, L.BC_SEQ >> 3, 1, "seq_cst")
    return futex_wake(w, L.BC_SEQ >> 3, 1 << 30)


def descriptor(seg_addr: int, seg_size: int, capacity: int, slot: int, slots_off: int) -> np.ndarray:
    d = np.zeros(D_LEN, np.int64)
    d[D_BASE], d[D_SIZE], d[D_CAP], d[D_SLOT], d[D_SLOTS], d[D_ME] = \
        seg_addr, seg_size, capacity, slot, slots_off, -1
    return d
