"""Synchronisation primitives in one shared word: atomics, robust locks, semaphores, waiting.

Design notes
------------
What: the kernels behind ``shm/sync.py``: ``AtomicInt``/``AtomicFloat``
(crossbeam's ``AtomicCell``), a robust ``Lock`` (and ``RLock``, whose
recursion is counted by the owning process), ``Semaphore``, and the
park/notify protocol every blocking primitive (Event, Condition, Barrier,
WaitGroup, Notify, RWLock) is built on. Each primitive has its own KIND_SYNC
segment (``kernels/layout.py``: ``SYNC``); every kernel takes the address of
that segment's ``SYNC`` block (``c``) and word indices relative to it, all
int64, so the Python layer calls them through their compiled entry points
(~85 ns) with no argument typing.

Why one word per primitive: every operation is then one atomic instruction
(or one CAS loop) on one cache line, and a process killed at any instruction
leaves the word in a state some survivor can read and repair: there is no
second word that must change with it. The only per-process state is in the
``holds`` table (one word per participant, written only by its owner or by
the reaper of a dead owner), used to give back what a dead process held.

Rejected: POSIX robust pthread mutexes in shared memory (``EOWNERDEAD``) —
not reachable from numba without a C extension, tied to one thread, and their
robust list is per thread, so a mutex held by a *thread* that exits is
"recovered" while its process lives; ``posix_ipc`` semaphores — they cannot
tell who holds a permit, so a dead holder's permits are lost and a Lock
built on one wedges when its holder is SIGKILLed (faster-fifo's failure);
waiter counts in shared memory — a count cannot be repaired after a process
dies between its increment and decrement, a bit per participant can (the
channel's reason, ``shm/_registry.py``).

Words (``SYNC``)
----------------
``value``
    AtomicInt: the int64. AtomicFloat: the float64's bits. Lock/RLock/RWLock
    writer: ``0`` free; ``owner + 1`` (bits 0-15, the owner's participant
    index) held; ``ORPHAN`` (0xFFFF) free, but the last owner died holding
    it: the next acquirer takes it *recovered* (pthread's EOWNERDEAD).
    RWLock: the writer, as a Lock (readers count in their holds words).
    Semaphore: permits left. Event: 0/1. Barrier: generation << 32 | parties arrived.
    WaitGroup: units outstanding. Notify: permit (bit 0) | waiters << 1.
``seq``
    The futex word. A waiter sets its bit in ``waiters``, loads ``seq``,
    re-checks its condition, then ``futex_wait(seq, seen)``; whoever changes
    ``value`` so that a waiter may proceed then loads ``waiters`` and, only
    if a bit is set, bumps ``seq`` and wakes (``notify``).
``aux``, ``flag``
    Condition: ``value`` is the ticket tail, ``aux`` the notified head.
    Notify: ``aux`` holds wake credits. Barrier: ``aux`` is the last
    generation ended by ``reset()``, ``flag`` the broken bit.

Orderings
---------
==========================  ==========  =============================================
step                        ordering    pairs with
==========================  ==========  =============================================
lock CAS 0/ORPHAN -> me+1   acquire     the release CAS of the previous owner
lock release CAS owner -> 0 seq_cst     the next acquire CAS; and (as a full fence) the
                                        load of ``waiters`` after it (lost-wake-up guard)
orphan CAS dead+1 -> ORPHAN seq_cst     the next acquirer's CAS (a reaper's write)
RWLock reader: own count +1 seq_cst     the writer's scan of the counts after its CAS
  then load of the writer               and fence (Dekker: one of them sees the other)
RWLock writer: CAS, fence,  seq_cst     the readers' increments; a reader's decrement
  then load every count                 (seq_cst) releases what it read
atomic ops (AtomicInt ...)  seq_cst     each other: AtomicCell is sequentially consistent
semaphore CAS n -> n-1      acq_rel     the release fetch_add of ``release``
semaphore release fetch_add seq_cst     the waiter's bit set + load of ``value``
waiter bit set (fetch_or)   seq_cst     the notifier's load of ``waiters`` after its
                                        seq_cst change of ``value``: one of the two
                                        sees the other (Dekker), so no wake-up is lost
seq bump (fetch_add)        seq_cst     the waiter's ``futex_wait(seq, seen)`` compare
==========================  ==========  =============================================

Every state change a waiter waits for is a seq_cst read-modify-write (or
store) followed by ``notify``'s seq_cst load of ``waiters``; every waiter sets
its bit with a seq_cst fetch_or before it loads ``seq`` and re-checks.
Either the notifier sees the bit (and bumps ``seq`` after the change, so the
waiter's futex_wait returns at once or is woken) or the waiter's re-check
sees the change.

A waiter that was woken (one of ``n``) but leaves without taking what it
was woken for (its timeout passed) passes the wake-up on (``notify(1)``),
so wake-one never strands the next waiter. A waiter never notifies its own
futex word inside its wait loop: it would return from every futex_wait at
once and spin (found by tests/test_sync.py's CPU check on a parked reader).

RWLock readers each count in their own holds word (a cache line apart), so
readers in different processes never write a shared line; see "RWLock" below.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import atomics as A
from . import layout as L
from .memory import i64_at
from .ring import backoff
from .syscalls import futex_wait, futex_wake
from ._jit import jit

__all__ = [
    "ORPHAN", "OWNER_MASK",
    "fetch_add_at", "load_at", "store_at", "swap_at", "cas_at", "rmw_at",
    "f_load_at", "f_store_at", "f_rmw_at", "f_cas_at",
    "lock_try_at", "lock_release_at", "orphan_at", "notify_at", "park_at",
    "sem_try_at", "sem_release_at", "rw_read_try_at", "rw_read_release_at", "rw_write_try_at",
]

ORPHAN = 0xFFFF               # free, but its last owner died holding it
OWNER_MASK = 0xFFFF

# Word indices relative to the SYNC block.
VALUE = (L.SY_VALUE - L.SY_BASE) >> 3
SEQ = (L.SY_SEQ - L.SY_BASE) >> 3
AUX = (L.SY_AUX - L.SY_BASE) >> 3
FLAG = (L.SY_FLAG - L.SY_BASE) >> 3
WAITERS = (L.SY_WAITERS - L.SY_BASE) >> 3
RECOVERED = (L.SY_RECOVERED - L.SY_BASE) >> 3
NWORDS = L.SYNC.size >> 3

# rmw_at / f_rmw_at operations.
OP_ADD = 0
OP_AND = 1
OP_OR = 2
OP_XOR = 3
OP_MAX = 4
OP_MIN = 5
OP_SWAP = 6


@intrinsic
def _f64_of(typingctx, x):
    """The float64 whose bits are the int64 ``x``."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def _i64_of(typingctx, x):
    """The int64 holding the bits of the float64 ``x``."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


@jit(inline="always")
def _w(c, n):
    return i64_at(c, n)


# --------------------------------------------------------------------------
# AtomicInt / AtomicFloat: every operation seq_cst, as AtomicCell's.

@jit("int64(int64, int64)")
def fetch_add_at(c, v):
    """``old = value; value += v`` (wrapping); returns old. The hot path of AtomicInt."""
    return A.fetch_add(_w(c, 1), 0, v, "seq_cst")


@jit("int64(int64, int64)")
def load_at(c, i):
    return A.load(_w(c, NWORDS), i, "seq_cst")


@jit("int64(int64, int64, int64)")
def store_at(c, i, v):
    A.store(_w(c, NWORDS), i, v, "seq_cst")
    return v


@jit("int64(int64, int64, int64)")
def swap_at(c, i, v):
    return A.exchange(_w(c, NWORDS), i, v, "seq_cst")


@jit("int64(int64, int64, int64, int64)")
def cas_at(c, i, expected, new):
    """Compare-and-swap word ``i``; returns the value seen (success iff it equals ``expected``)."""
    return A.cas(_w(c, NWORDS), i, expected, new, "seq_cst")


@jit("int64(int64, int64, int64, int64)")
def rmw_at(c, i, op, v):
    """``old = w[i]; w[i] = op(old, v)``; returns old. OP_ADD/AND/OR/SWAP are one instruction."""
    w = _w(c, NWORDS)
    if op == OP_ADD:
        return A.fetch_add(w, i, v, "seq_cst")
    if op == OP_AND:
        return A.fetch_and(w, i, v, "seq_cst")
    if op == OP_OR:
        return A.fetch_or(w, i, v, "seq_cst")
    if op == OP_SWAP:
        return A.exchange(w, i, v, "seq_cst")
    old = A.load(w, i, "seq_cst")
    while True:
        if op == OP_XOR:
            new = old ^ v
        elif op == OP_MAX:
            new = old if old >= v else v
        else:
            new = old if old <= v else v
        if new == old:
            return old          # max/min that changes nothing: the load was the linearization point
        seen = A.cas(w, i, old, new, "seq_cst")
        if seen == old:
            return old
        old = seen


@jit("float64(int64, int64)")
def f_load_at(c, i):
    return _f64_of(A.load(_w(c, NWORDS), i, "seq_cst"))


@jit("float64(int64, int64, float64)")
def f_store_at(c, i, v):
    A.store(_w(c, NWORDS), i, _i64_of(v), "seq_cst")
    return v


@jit("float64(int64, int64, int64, float64)")
def f_rmw_at(c, i, op, v):
    """AtomicFloat's read-modify-writes (OP_ADD, OP_MAX, OP_MIN, OP_SWAP) as a CAS loop; returns old."""
    w = _w(c, NWORDS)
    if op == OP_SWAP:
        return _f64_of(A.exchange(w, i, _i64_of(v), "seq_cst"))
    bits = A.load(w, i, "seq_cst")
    while True:
        old = _f64_of(bits)
        if op == OP_ADD:
            new = old + v
        elif op == OP_MAX:
            new = old if old >= v else v
        else:
            new = old if old <= v else v
        nb = _i64_of(new)
        if nb == bits:
            return old
        seen = A.cas(w, i, bits, nb, "seq_cst")
        if seen == bits:
            return old
        bits = seen


@jit("int64(int64, int64, float64, float64)")
def f_cas_at(c, i, expected, new):
    """Set word ``i`` to ``new`` if its *bits* equal ``expected``'s; 1 if it did."""
    e = _i64_of(expected)
    return 1 if A.cas(_w(c, NWORDS), i, e, _i64_of(new), "seq_cst") == e else 0


# --------------------------------------------------------------------------
# Waiting and waking (see "seq" above).

@jit(inline="always")
def _notify(w, n):
    # After the caller's seq_cst change of the state: a full fence, then the
    # waiter bitmap. Only when someone is (about to be) parked: a system call.
    A.fence("seq_cst")
    for k in range(L.BITMAP_WORDS):
        if A.load(w, WAITERS + k, "seq_cst") != 0:
            A.fetch_add(w, SEQ, 1, "seq_cst")
            return futex_wake(w, SEQ, n) + 1
    return 0


@jit("int64(int64, int64)")
def notify_at(c, n):
    """Wake up to ``n`` parked waiters if any participant is waiting; 0 if none was."""
    return _notify(_w(c, NWORDS), n)


@jit("int64(int64, int64, int64)")
def park_at(c, seen, timeout_ns):
    """Sleep while ``seq`` still reads ``seen`` (at most ``timeout_ns``). Releases the GIL."""
    return futex_wait(_w(c, NWORDS), SEQ, seen, timeout_ns)


# --------------------------------------------------------------------------
# Robust locks.

@jit(inline="always")
def _lock_try(w, i, me):
    v = A.load(w, i, "relaxed")
    own = v & OWNER_MASK
    if own == 0 or own == ORPHAN:
        # acquire: pairs with the previous owner's release exchange (or the orphaning CAS).
        if A.cas(w, i, v, (v & ~OWNER_MASK) | (me + 1), "acquire") == v:
            return 2 if own == ORPHAN else 1
    return 0


@jit("int64(int64, int64, int64, int64)")
def lock_try_at(c, i, me, spins):
    """Take the lock in word ``i`` for participant ``me``, spinning up to ``spins`` backoff steps.

    1: taken; 2: taken, and its last owner had died holding it (recovered);
    0: held by someone else.
    """
    w = _w(c, NWORDS)
    k = 0
    while True:
        r = _lock_try(w, i, me)
        if r != 0:
            return r
        if k >= spins:
            return 0
        backoff(k if k < 7 else 7)
        k += 1


@jit("int64(int64, int64, int64)")
def lock_release_at(c, i, n):
    """Release the lock in word ``i`` and wake up to ``n`` waiters. Returns the owner field it had (0: was free)."""
    w = _w(c, NWORDS)
    v = A.load(w, i, "relaxed")
    while True:
        own = v & OWNER_MASK
        if own == 0 or own == ORPHAN:
            return 0
        # seq_cst: a release for the next owner, and the fence of the lost-wake-up guard.
        seen = A.cas(w, i, v, v & ~OWNER_MASK, "seq_cst")
        if seen == v:
            break
        v = seen
    _notify(w, n)
    return own


@jit("int64(int64, int64, int64)")
def orphan_at(c, i, dead):
    """Mark the lock in word ``i`` orphaned if participant ``dead`` holds it (its reaper). 1 if it did."""
    w = _w(c, NWORDS)
    v = A.load(w, i, "acquire")
    while (v & OWNER_MASK) == dead + 1:
        seen = A.cas(w, i, v, (v & ~OWNER_MASK) | ORPHAN, "seq_cst")
        if seen == v:
            A.fetch_add(w, RECOVERED, 1, "relaxed")
            _notify(w, 1 << 30)      # every waiter: RWLock readers may proceed too
            return 1
        v = seen
    return 0


# --------------------------------------------------------------------------
# Semaphores and the read side of RWLock. ``hold`` is the word index of the
# caller's holds entry, or -1 when the primitive does not track holders.

@jit("int64(int64, int64, int64)")
def sem_try_at(c, hold, spins):
    """Take one permit: 1 if taken, 0 if none is left (after ``spins`` backoff steps)."""
    w = _w(c, hold + 1 if hold >= NWORDS else NWORDS)
    k = 0
    v = A.load(w, VALUE, "relaxed")
    while True:
        if v > 0:
            # acq_rel: acquire pairs with release()'s fetch_add.
            seen = A.cas(w, VALUE, v, v - 1, "acq_rel")
            if seen == v:
                if hold >= 0:
                    # A process killed between the two instructions leaks this one permit.
                    A.fetch_add(w, hold, 1, "relaxed")
                return 1
            v = seen
            continue
        if k >= spins:
            return 0
        backoff(k if k < 7 else 7)
        k += 1
        v = A.load(w, VALUE, "relaxed")


@jit("int64(int64, int64, int64, int64)")
def sem_release_at(c, n, bound, hold):
    """Give back ``n`` permits and wake up to ``n`` waiters. Returns the new count, or -1 if past ``bound``."""
    w = _w(c, hold + 1 if hold >= NWORDS else NWORDS)
    v = A.load(w, VALUE, "relaxed")
    while True:
        if bound > 0 and v + n > bound:
            return -1
        seen = A.cas(w, VALUE, v, v + n, "seq_cst")
        if seen == v:
            break
        v = seen
    if hold >= 0:
        h = A.load(w, hold, "relaxed")
        A.store(w, hold, h - n if h >= n else 0, "relaxed")
    _notify(w, n)
    return v + n


# --------------------------------------------------------------------------
# RWLock: the writer in ``value`` (owner + 1 / ORPHAN, as a Lock), each
# reader's read-lock count in its own holds word, a cache line apart
# (crossbeam's ShardedLock with one shard per participant; Linux's brlock).
# A reader increments its own word, then loads ``value``; a writer CASes
# ``value``, then loads every reader word. Both seq_cst (Dekker): either the
# writer sees the reader's count or the reader sees the writer and backs
# off. Readers never write a shared line; a pending writer blocks new
# readers, so writers do not starve.

@jit("int64(int64, int64)")
def rw_read_try_at(c, hold):
    """Take a read lock: 1 if taken, 2 if taken after clearing a dead writer's orphaned lock, 0 if a writer holds (or waits for) it."""
    w = _w(c, hold + 1)
    if (A.load(w, VALUE, "relaxed") & OWNER_MASK) not in (0, ORPHAN):
        # A writer is in: back off without touching our count (so without waking it, or
        # ourselves: a waiter that notified its own futex word would never sleep).
        return 0
    A.fetch_add(w, hold, 1, "seq_cst")            # Dekker: before the load of the writer word
    v = A.load(w, VALUE, "seq_cst")
    while True:
        own = v & OWNER_MASK
        if own == 0:
            return 1
        if own == ORPHAN:
            seen = A.cas(w, VALUE, v, v & ~OWNER_MASK, "seq_cst")
            if seen == v:
                return 2
            v = seen
            continue
        # A writer came in since the first load (and may be draining readers): back off, and
        # wake it in case it parked on our count (rare: this may wake us once too).
        A.fetch_add(w, hold, -1, "seq_cst")
        _notify(w, 1 << 30)
        return 0


@jit("int64(int64, int64, int64)")
def rw_read_release_at(c, hold, n):
    """Drop ``n`` of this participant's read locks (a reaper: all of a dead one's); wakes a draining writer."""
    w = _w(c, hold + 1)
    h = A.load(w, hold, "relaxed")
    if n > h:
        n = h
    if n <= 0:
        return -1
    A.fetch_add(w, hold, -n, "seq_cst")           # release: pairs with the writer's scan
    if (A.load(w, VALUE, "seq_cst") & OWNER_MASK) != 0:
        _notify(w, 1 << 30)
    return h - n


@jit("int64(int64, int64, int64, int64, int64)")
def rw_write_try_at(c, me, holds0, stride, pending):
    """Take (or, if ``pending``, keep draining) the write lock for participant ``me``.

    1: held, no reader left; 2: the same, taken from a writer that died
    holding it; 3: ours, readers still draining (call again with pending=1,
    or ``lock_release_at`` to give up); 0: another writer has it.
    """
    w = _w(c, holds0 + stride * L.MAX_PARTICIPANTS)
    r = 1
    if pending == 0:
        r = _lock_try(w, VALUE, me)        # seq_cst enough: the CAS is acquire; the fence below orders the scan
        if r == 0:
            return 0
    A.fence("seq_cst")                      # Dekker: the writer word before the reader words
    for p in range(L.MAX_PARTICIPANTS):
        if A.load(w, holds0 + p * stride, "seq_cst") > 0:
            return 3
    return r
