"""A bounded MPMC ring buffer in shared memory that survives SIGKILL.

The algorithm is Dmitry Vyukov's bounded MPMC queue, as in crossbeam's
``ArrayQueue``/``array`` channel flavour:

  <https://www.1024cores.net/home/lock-free-algorithms/queues/bounded-mpmc-queue>

with one change so that a process killed at any instruction never wedges the
others: a slot is claimed by compare-and-swap on *its own stamp*, and the
stamp names the claimant. Vyukov (and crossbeam) claim a position by CAS on
``tail``/``head`` and only then touch the slot, so a process that dies between
the two leaves a claimed position that nothing in memory attributes to
anyone; consumers then see "empty" forever and producers fill up and stop.
Here the claim and the attribution are one atomic step, and ``tail``/``head``
are advanced afterwards by the claimant *or by anyone who sees the claim*
(helping, as in the LCRQ and Michael-Scott queues), so a claimant that dies
before advancing them stalls no one.

Rejected: intent records (write "pid P is about to claim position p" before
the CAS; 12 ns a push, and a recovering process must prove a claim from a set
of stale intents); a lock around the ring (a dead holder wedges everyone, as
faster-fifo's unrobust pthread mutex does).

Layout (``kernels/layout.py``: ``RING``, ``SLOT``)
--------------------------------------------------
``tail`` and ``head`` are 64-bit positions, each on its own 128-byte line.
``tail``'s bit 62 (``SEALED``) seals the ring: an unbounded channel seals a
full generation and moves on to the next one. Slot ``i`` serves the positions
``p`` with ``p % cap == i``. Each slot has a 32-byte header and an inline
payload of ``slot - 32`` bytes:

* ``stamp`` = ``(p & POS_MASK) << 10 | owner << 2 | state``, where ``p`` is
  the position the slot currently serves, ``owner`` a participant index
  (``MAX_PARTICIPANTS`` = 256) and ``state`` one of

  ====== =========================================================
  FREE       ready for the producer of position ``p``
  WRITING    claimed by producer ``owner`` for position ``p``
  PUBLISHED  holds the message of position ``p``
  READING    claimed by consumer ``owner`` for position ``p``
  ====== =========================================================

  Positions are compared modulo 2**54 (``_pdiff``), so they may wrap.
* ``meta`` = ``len | kind << 48 | flags << 56``; flags ``FLAG_BLOB`` (the
  payload lives in a blob segment of the ring's blob pool, below) and
  ``FLAG_TOMB`` (no message: a dead producer's claim).
* ``blob``: the blob pool entry the slot's producer took (or last tried to
  take) for the message of the slot's position.

Blob pool
---------
A message too large for a slot travels in a *blob*, a segment of its own
(``shm/_chan.py`` creates, grows and maps them). The ring has a pool of
``cap`` entries after its slots (``BLOB_ENTRY``), each owning at most one
blob: ``info`` = ``bgen << 8 | log2(capacity)`` names and sizes it (low byte
0: none now), ``state`` says who holds the entry: 0 (free) or ``p + 1``,
taken for the message of position ``p`` (modulo 2**54, as in stamps). A producer that holds the slot of
``p`` (WRITING) takes an entry (``blob_take_at``), fills its blob and
publishes; the consumer that claims the slot (READING) finds the entry
through the slot's ``blob`` word (``blob_entry_at``), reads, and gives the
entry back (``blob_give_at``), which also records it as the ring's
``blob_hint``. The taker tries the hint first, so a steady stream of large
messages goes through one blob that stays in cache instead of round a
circle of ``cap`` of them (1 MiB messages through 16 slots: 21 GB/s with a
blob per slot, 40 with the pool's last-freed-first).

Every holder holds a slot, each slot at most one entry, so ``cap`` entries
never run out; ``BUSY`` (all taken while we looked: others moved them) is
retried. Only the holder touches an entry's ``info`` and blob.

Crash safety: ``state`` names the position, which is never reused, and a
taker stores the entry's index in its slot's ``blob`` word before the CAS
that takes it. So whatever a dead participant held is found from the slots
it held: ``recover`` frees the entry named by a dead producer's or
consumer's slot if its state is still ``p + 1`` (else the whole pool is
searched for ``p + 1``: the index store may not be visible to the
recoverer; none found: the taker died before its CAS, or the consumer
after giving the entry back). A rendezvous send taken back unread
(``rendezvous_cancel_at``) frees its entry the same way. The holder keeps
``info`` crash-consistent too: it clears the low byte (no blob, same
generation) before unlinking a blob, and sets it only once the new one
exists.

========================= ============================== =============================================
step                      operation                      ordering: pairs with
========================= ============================== =============================================
take                      store slot.blob = e, then      acquire: the release of the last holder's
                          CAS state 0 -> p + 1           give, so its reads of the blob happen before
                                                         we overwrite it; release: orders the store
                                                         to slot.blob before the take
read info, fill blob      holder only                    published to the consumer by the slot's
                                                         PUBLISHED (release) / claim (acquire)
find (consumer)           load slot.blob, check          acquire
                          state == p + 1
give                      CAS state p + 1 -> 0; store    release: the next taker's acquire
                          blob_hint = e (relaxed)
========================= ============================== =============================================

Rejected: a Treiber stack of free entries (O(1) take, but a taker that dies
between its pop and recording what it popped leaks the entry, and nothing
in memory says which); a blob per slot (the first design: no protocol at
all, but a stream of large messages writes round ``cap`` cold blobs).

Transitions and orderings
-------------------------
========================= ============================== =============================================
step                      operation                      ordering: pairs with
========================= ============================== =============================================
push: claim slot          CAS FREE(t) -> WRITING(t, me)  acquire: the release of FREE(t) by the
                                                         consumer of ``t - cap``, so its reads of the
                                                         old payload happen before we overwrite it
push: advance tail        CAS tail t -> t+1              relaxed: positions order nothing; stamps do
push: publish             store PUBLISHED(t)             release: the consumer's acquire of the stamp
                                                         (seq_cst, to double as the wake-check fence)
pop: claim slot           CAS PUBLISHED(h) -> READING    acquire: the producer's release of PUBLISHED
pop: advance head         CAS head h -> h+1              relaxed
pop: release slot         store FREE(h + cap)            release: the next producer's claim (acquire)
                                                         (seq_cst, to double as the wake-check fence)
wake check (both sides)   [fence]; load waiter bitmap    seq_cst: the waiter's fence after setting its
                                                         bit (Dekker): one of the two sees the other.
                                                         After a single publish/release the seq_cst
                                                         store is the fence (one xchg on x86, not
                                                         mov + mfence); batches fence once at the end
disconnect check (pop)    load sender bitmap, *then*     acquire: the closer's fetch_and of its bit,
                          re-check the head slot         so its last publish is visible
========================= ============================== =============================================

A producer at ``tail == t`` reads the stamp of slot ``t % cap``:

* ``FREE(t)``: claim it;
* position ``t``, any other state: someone claimed ``t`` and has not yet
  advanced ``tail``: help (CAS ``tail`` t -> t+1) and retry;
* position ``t - cap``: the previous lap is still queued or being read: FULL;
* anything newer: our ``tail`` was stale: retry.

A consumer at ``head == h`` reads the stamp of slot ``h % cap``:

* ``PUBLISHED(h)``: claim it;
* ``READING(h)`` or position ``h + cap``: claimed already: help advance ``head``;
* ``FREE(h)``/``WRITING(h)`` or an older position: nothing published yet: EMPTY
  (or DISCONNECTED if no sender is left and ``tail == head``, or SEALED if the
  ring is sealed at ``h``).

Recovery (``recover``): once a participant is known to be dead (the Python
layer proves it, ``shm/_registry.py``), every stamp it owns is moved forward,
never back (moving back would race with helpers that already advanced
``tail``/``head`` past it):

* ``WRITING(t, dead)`` -> take it over, make sure ``tail`` is past ``t``, free
  the pool entry it took, if any, and publish a tombstone, which consumers
  skip;
* ``READING(h, dead)`` -> take it over, make sure ``head`` is past ``h``, free
  its pool entry, if any, and free the slot. That message is lost: the dead
  consumer had taken it.

Waiting is not in the ring: kernels return EMPTY/FULL and the Python layer
spins, then parks on a futex word of the channel's control block
(``park``); every push and pop ends with a cheap check of the waiter bitmap
(``_wake``) so a parked peer is woken at once and no wake-up is lost.

Every store into shared memory is an ``atomics.store`` (``"relaxed"`` where
no ordering is needed, a plain ``mov`` on x86) or a ``memory.copy``, never
``w[i] = v``: see ``kernels/memory.py`` for why.

Every kernel here takes a *descriptor*: a process-local ``int64[16]`` array
(``D_*`` below) holding the validated addresses and sizes of the mapped
segments. Kernels never trust sizes read from shared memory, and check every
length read from a slot before copying. ``*_at`` variants take the
descriptor's address instead, for the Python fast path: calling numba with
three ints costs ~85 ns, with two arrays ~320 ns. The short non-blocking
``*_at`` kernels keep the GIL (``nogil=False``): releasing and retaking it
costs ~35 ns a call, more than their work; the ones that spin, park or scan a
whole ring release it.
"""
from __future__ import annotations

import numpy as np

from . import atomics as A
from . import layout as L
from ._jit import jit
from .memory import copy, i64_at, u8_at
from .syscalls import futex_wait, futex_wake, sched_yield, thread_id

# --------------------------------------------------------------------------
# Descriptor (process-local int64[D_LEN]).

D_BASE = 0          # address of the segment holding the ring
D_SIZE = 1          # its mapped size in bytes
D_RING = 2          # byte offset of the ring header in that segment
D_CAP = 3           # slots
D_SLOT = 4          # slot size in bytes
D_ME = 5            # this process's participant index, -1 if not registered
D_CTRL = 6          # address of the channel control segment
D_CTRL_SIZE = 7     # its mapped size
D_DST = 8           # address of the process-local receive buffer
D_DST_SIZE = 9      # its size
D_KIND = 10         # kind byte stamped on messages pushed by push_at
D_POS = 11          # out (try_pop): position of a blob message popped
D_META = 12         # out (try_pop): its meta word
D_AREA_SIZE = 14    # pop_at: bytes per receive area (>= inline capacity, >= 16)
D_BATCH = 15        # pop_many_at: byte offset of the batch region in the receive buffer
D_BANKS = 16        # pop_at: address of the bank table (int64[2 * N_BANKS]) shared by every
                    # descriptor that uses this receive buffer: [tid] * N_BANKS, [next] * N_BANKS
D_GEN = 17          # the ring generation this descriptor serves
D_PINS = 18         # blob messages popped through it and not yet released (keeps the ring mapped)
D_FLAGS = 19        # DF_* below
D_BLOBMAP = 20      # push_blob_at: address of this process's map of the ring's blob pool, int64[3 * cap]:
                    # per entry the bgen, payload address and capacity of its blob as mapped here
                    # (bgen 0: not mapped); 0: no map (push_blob_at answers TOO_BIG)
D_BLOB_READS = 21   # the pop builtin: blob messages it read itself (informational)
D_BLOB_BUDGET = 22  # the pop builtin: over this many blob bytes (CH_BLOB_BYTES) it leaves blob
                    # messages to Python, which drops a blob every 64 reads until under again
D_LEN = 32

DF_WAKE_ALL_TX = 1  # a release wakes every parked sender (rendezvous: "taken" and "room" waiters share a word)

# pop_at copies each message into a *receive area* and returns which; the
# Python caller then copies it out. Each thread that pops into a receive
# buffer gets a bank of N_AREAS areas of its own (found by pthread_self() in
# the buffer's bank table, claimed by CAS on first use), used round robin,
# so a thread descheduled between the pop and its copy-out (a GIL switch,
# 5 ms) never finds its area reused by another thread. The bank table
# belongs to the buffer, not to a descriptor: every ring generation's
# descriptor points at the same one. A thread that finds every bank taken
# gets NO_BANK and the Python layer gives it a private buffer.
N_BANKS = 8
N_AREAS = 64
AREA_SHIFT = 8      # pop_at success: len << 17 | (bank * N_AREAS + area) << 8 | kind
AREA_MASK = N_BANKS * N_AREAS - 1
LEN_SHIFT = 17
BLOB_AREA = -16     # pop_at: a blob message; its area index is BLOB_AREA - r; it holds pos, meta

# --------------------------------------------------------------------------
# Status codes (negative; a pop's success value is len << 8 | kind >= 0).

OK = 0
EMPTY = -1
FULL = -2
DISCONNECTED = -3
SEALED = -4
TOO_BIG = -5
BLOB = -6
UNREGISTERED = -7
CORRUPT = -8
CLOSED = -9         # the descriptor was closed (its mapping is gone or going)
NO_BANK = -10       # pop_at: every receive bank of this descriptor belongs to another thread
BUSY = -11          # blob_take_at: every pool entry was taken while we looked (retry)
CLAIMED = -1000     # push_blob_at: position p is claimed (WRITING, ours), the message not written:
                    # returns CLAIMED - p, and the caller finishes the send (or tombstones it)
STATUS_NAMES = {OK: "OK", EMPTY: "EMPTY", FULL: "FULL", DISCONNECTED: "DISCONNECTED",
                SEALED: "SEALED", TOO_BIG: "TOO_BIG", BLOB: "BLOB",
                UNREGISTERED: "UNREGISTERED", CORRUPT: "CORRUPT", CLOSED: "CLOSED",
                NO_BANK: "NO_BANK", BUSY: "BUSY"}

# --------------------------------------------------------------------------
# Stamps.

FREE = 0
WRITING = 1
PUBLISHED = 2
READING = 3
STATE_MASK = 3
OWNER_SHIFT = 2
OWNER_MASK = 0xFF
POS_SHIFT = 10
POS_BITS = 54
POS_MASK = (1 << POS_BITS) - 1
_POS_HALF = 1 << (POS_BITS - 1)
SEALED_BIT = 1 << 62
SIDE_RX = 0         # receivers waiting for messages
SIDE_TX = 1         # senders waiting for space

SPIN_STEPS = 10     # backoff steps of 2**k pauses (k <= 6) before yielding
WRITER_SPIN = 4096  # pauses a pop waits for a producer mid-write at head (~100 us at most)
YIELD_STEPS = 4     # sched_yield()s before giving up a spin
STALE_LIMIT = 1 << 16   # re-reads of an unchanged tail (head) behind its slot before CORRUPT


@jit(inline="always")
def stamp(pos, owner, state):
    return ((pos & POS_MASK) << POS_SHIFT) | (owner << OWNER_SHIFT) | state


@jit(inline="always")
def stamp_pos(s):
    return (s >> POS_SHIFT) & POS_MASK


@jit(inline="always")
def stamp_owner(s):
    return (s >> OWNER_SHIFT) & OWNER_MASK


@jit(inline="always")
def stamp_state(s):
    return s & STATE_MASK


@jit(inline="always")
def _pdiff(a, b):
    """``a - b`` for positions modulo 2**54, as a signed number."""
    d = (a - b) & POS_MASK
    if d >= _POS_HALF:
        d -= 1 << POS_BITS
    return d


# --------------------------------------------------------------------------
# Addressing.

@jit(inline="always")
def _words(d):
    return i64_at(d[D_BASE], d[D_SIZE] >> 3)


@jit(inline="always")
def _bytes(d):
    return u8_at(d[D_BASE], d[D_SIZE])


@jit(inline="always")
def _ctrl(d):
    return i64_at(d[D_CTRL], d[D_CTRL_SIZE] >> 3)


@jit(inline="always")
def _slot_off(d, pos):
    """Byte offset of the slot serving ``pos``."""
    return d[D_RING] + L.RING_HEADER + (pos % d[D_CAP]) * d[D_SLOT]


@jit(inline="always")
def _tail_w(d):
    return (d[D_RING] + L.RG_TAIL) >> 3


@jit(inline="always")
def _head_w(d):
    return (d[D_RING] + L.RG_HEAD) >> 3


@jit(inline="always")
def _inline_cap(d):
    return d[D_SLOT] - L.SLOT_HEADER


# --------------------------------------------------------------------------
# Roles and wake-ups (control block words).

@jit(inline="always")
def _any_bits(c, word_off, nwords):
    for k in range(nwords):        # participants are usually < 64: one load
        if A.load(c, (word_off >> 3) + k, "acquire") != 0:
            return True
    return False


@jit(inline="always")
def has_receivers(c):
    # The token word first: a handle in transit is claimed by setting the
    # claimant's role bit *then* clearing the token bit, so a token read of 0
    # implies the role bit is already visible to the bitmap read that follows.
    if A.load(c, L.CH_RX_TOKENS >> 3, "seq_cst") != 0:
        return True
    return _any_bits(c, L.CH_RX_ROLES, L.BITMAP_WORDS)


@jit(inline="always")
def has_senders(c):
    if A.load(c, L.CH_TX_TOKENS >> 3, "seq_cst") != 0:
        return True
    return _any_bits(c, L.CH_TX_ROLES, L.BITMAP_WORDS)


@jit(inline="always")
def _seq_w(side):
    return (L.CH_RX_SEQ if side == SIDE_RX else L.CH_TX_SEQ) >> 3


@jit(inline="always")
def _waiters_off(side):
    return L.CH_RX_WAITERS if side == SIDE_RX else L.CH_TX_WAITERS


@jit(inline="always")
def _wake(c, side, n):
    """Wake up to ``n`` parked waiters of ``side`` if any is parked.

    seq_cst fence: pairs with the waiter's fence in ``park`` after it set its
    bit. Either we see its bit, or it sees what we published before this call.
    """
    A.fence("seq_cst")
    acc = 0
    base = _waiters_off(side) >> 3
    for k in range(L.BITMAP_WORDS):
        acc |= A.load(c, base + k, "relaxed")
    if acc != 0:
        w = _seq_w(side)
        A.fetch_add(c, w, 1, "seq_cst")
        futex_wake(c, w, n)


@jit(inline="always")
def _tx_wakes(d, n):
    return (1 << 30) if d[D_FLAGS] & DF_WAKE_ALL_TX else n


@jit(inline="always")
def _wake_sc(c, side, n):
    """``_wake`` right after a seq_cst store.

    The store and these seq_cst loads order like the fence would (a seq_cst
    load after a seq_cst store is ordered; a relaxed one is not, and on ARM
    would let the load pass the store and miss a waiter's bit). On x86 that
    is an ``xchg`` and plain loads instead of ``mov`` + ``mfence``.
    """
    acc = 0
    base = _waiters_off(side) >> 3
    for k in range(L.BITMAP_WORDS):
        acc |= A.load(c, base + k, "seq_cst")
    if acc != 0:
        w = _seq_w(side)
        A.fetch_add(c, w, 1, "seq_cst")
        futex_wake(c, w, n)


# --------------------------------------------------------------------------
# Push.

@jit
def _claim_push(w, d, me):
    """Claim the slot at ``tail`` for ``me``. Returns its position or FULL/SEALED."""
    tw = _tail_w(d)
    cap = d[D_CAP]
    last = -1
    stale = 0
    while True:
        tail = A.load(w, tw, "relaxed")
        if tail < 0:
            return CORRUPT      # a position never gets there; returned, it would read as a status
        if tail & SEALED_BIT:
            return SEALED
        sw = _slot_off(d, tail) >> 3
        s = A.load(w, sw, "acquire")
        free = stamp(tail, 0, FREE)
        if s == free:
            # acquire: pairs with the release of FREE(t) by the consumer of t - cap.
            if A.cas(w, sw, free, stamp(tail, me, WRITING), "acquire") != free:
                continue
            while True:
                cur = A.load(w, tw, "relaxed")
                if cur == tail:
                    if A.cas(w, tw, tail, tail + 1, "relaxed") == tail:
                        return tail
                elif cur == (tail | SEALED_BIT):
                    # Sealed before our claim became visible in tail: position
                    # ``tail`` will never be consumed. Give the slot back.
                    A.cas(w, sw, stamp(tail, me, WRITING), free, "release")
                    return SEALED
                else:
                    return tail      # someone helped
        dp = _pdiff(stamp_pos(s), tail)
        if dp == 0:
            A.cas(w, tw, tail, tail + 1, "relaxed")    # help the claimant of `tail`
        elif dp < 0:
            # The previous lap still holds the slot. (A stale tail cannot get
            # here: the slot of a position already claimed shows that position
            # or a later one.)
            return FULL
        # dp > 0: our tail was stale; retry. A claimed position is in tail
        # before its slot can move on, so a tail that stays behind its slot
        # is corrupt, not stale: never spin on it forever.
        stale = stale + 1 if tail == last else 0
        last = tail
        if stale > STALE_LIMIT:
            return CORRUPT


@jit(inline="always")
def _publish(w, d, pos, meta):
    sw = _slot_off(d, pos) >> 3
    A.store(w, sw + 1, meta, "relaxed")
    # release would do for the consumer; seq_cst also orders it before the
    # waiter-bitmap load that follows (_wake_sc), in one instruction.
    A.store(w, sw, stamp(pos, 0, PUBLISHED), "seq_cst")


@jit
def try_push(d, src, n):
    """Push ``src[:n]`` with kind ``d[D_KIND]``. Non-blocking.

    Returns OK, FULL, DISCONNECTED (no receiver left), SEALED, TOO_BIG
    (``n`` exceeds the inline capacity ``slot - 32``: use ``claim_push``
    and a blob), or UNREGISTERED. Usable from a user's own ``@njit`` code.
    """
    me = d[D_ME]
    if me < 0:
        return UNREGISTERED
    if n < 0 or n > _inline_cap(d) or n > src.shape[0]:
        return TOO_BIG
    c = _ctrl(d)
    if not has_receivers(c):
        return DISCONNECTED
    w = _words(d)
    pos = _claim_push(w, d, me)
    if pos < 0:
        return pos
    off = _slot_off(d, pos)
    copy(_bytes(d), off + L.SLOT_HEADER, src, 0, n)
    _publish(w, d, pos, n | (d[D_KIND] << L.META_KIND_SHIFT))
    _wake_sc(c, SIDE_RX, 1)
    return OK


@jit("int64(int64, int64, int64)", nogil=False)
def push_at(daddr, src_addr, n):
    """``try_push`` for the Python fast path: descriptor and payload by address."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    if n < 0 or n > _inline_cap(d):
        return TOO_BIG
    return try_push(d, u8_at(src_addr, n), n)


@jit
def try_push_many(d, src, lens, count, fixed):
    """Push ``count`` messages laid out back to back in ``src``, in order.

    Message ``j`` is ``lens[j]`` bytes long, or ``fixed`` bytes if
    ``fixed >= 0`` (then ``lens`` is not read). Stops at the first that does
    not fit (full ring, or a payload above the inline capacity). Returns how
    many were pushed, or a status if none was.
    """
    me = d[D_ME]
    if me < 0:
        return UNREGISTERED
    c = _ctrl(d)
    if not has_receivers(c):
        return DISCONNECTED
    w = _words(d)
    b = _bytes(d)
    kind = d[D_KIND] << L.META_KIND_SHIFT
    icap = _inline_cap(d)
    done = 0
    at = 0
    status = OK
    for j in range(count):
        n = fixed if fixed >= 0 else lens[j]
        if n < 0 or n > icap or at + n > src.shape[0]:
            status = TOO_BIG
            break
        pos = _claim_push(w, d, me)
        if pos < 0:
            status = pos
            break
        copy(b, _slot_off(d, pos) + L.SLOT_HEADER, src, at, n)
        _publish(w, d, pos, n | kind)
        at += n
        done += 1
    if done > 0:
        _wake(c, SIDE_RX, done)
        return done
    return status


@jit("int64(int64, int64, int64, int64, int64)", nogil=False)
def push_many_at(daddr, src_addr, src_len, lens_addr, count):
    """``try_push_many`` with per-message lengths (an int64 array's address)."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    return try_push_many(d, u8_at(src_addr, src_len), i64_at(lens_addr, count), count, -1)


@jit("int64(int64, int64, int64, int64)", nogil=False)
def push_many_fixed_at(daddr, src_addr, item_len, count):
    """``try_push_many`` of ``count`` messages of ``item_len`` bytes each."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    return try_push_many(d, u8_at(src_addr, item_len * count), i64_at(daddr, 1), count, item_len)


@jit("int64(int64)", nogil=False)
def claim_push_at(daddr):
    """Claim a slot for a blob message. Returns its position (owned, WRITING) or a status.

    The caller takes a pool entry and fills its blob, then calls ``publish_at`` (or
    ``publish_at`` with FLAG_TOMB if it cannot: the slot must not stay claimed).
    """
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    me = d[D_ME]
    if me < 0:
        return UNREGISTERED
    if not has_receivers(_ctrl(d)):
        return DISCONNECTED
    return _claim_push(_words(d), d, me)


@jit("int64(int64, int64, int64, int64, int64)", nogil=False)
def publish_at(daddr, pos, n, kind, flags):
    """Publish the claimed slot ``pos`` with the given length, kind and flags."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    w = _words(d)
    sw = _slot_off(d, pos) >> 3
    if A.load(w, sw, "relaxed") != stamp(pos, d[D_ME], WRITING):
        return CORRUPT
    _publish(w, d, pos, (n & L.META_LEN_MASK) | (kind << L.META_KIND_SHIFT) | (flags << L.META_FLAGS_SHIFT))
    _wake(_ctrl(d), SIDE_RX, 1)
    return OK


@jit("int64(int64, int64, int64, int64, int64)", nogil=False)
def publish_inline_at(daddr, pos, src_addr, n, kind):
    """Copy ``n`` bytes into the claimed slot ``pos`` and publish them with ``kind``."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    w = _words(d)
    off = _slot_off(d, pos)
    if A.load(w, off >> 3, "relaxed") != stamp(pos, d[D_ME], WRITING):
        return CORRUPT
    if n < 0 or n > _inline_cap(d):
        return TOO_BIG
    copy(_bytes(d), off + L.SLOT_HEADER, u8_at(src_addr, n), 0, n)
    _publish(w, d, pos, n | (kind << L.META_KIND_SHIFT))
    _wake(_ctrl(d), SIDE_RX, 1)
    return OK


# --------------------------------------------------------------------------
# Pop.

@jit
def _claim_pop(w, d, me, peek_blob):
    """Claim the slot at ``head`` for ``me``.

    Returns its position (slot READING, head advanced) or EMPTY, SEALED,
    DISCONNECTED. If ``peek_blob``, a blob message at head is left unclaimed
    and BLOB returned instead (batch pops stop there).
    """
    hw = _head_w(d)
    tw = _tail_w(d)
    c = _ctrl(d)
    checked_senders = False
    senders = True
    waited = 0
    last = -1
    stale = 0
    while True:
        head = A.load(w, hw, "relaxed")
        if head < 0:
            return CORRUPT      # see _claim_push
        sw = _slot_off(d, head) >> 3
        s = A.load(w, sw, "acquire")
        if s == stamp(head, 0, PUBLISHED):
            if peek_blob and (w[sw + 1] >> L.META_FLAGS_SHIFT) & L.FLAG_BLOB:
                return BLOB
            # acquire: pairs with the producer's release of PUBLISHED(h).
            if A.cas(w, sw, s, stamp(head, me, READING), "acquire") != s:
                continue
            A.cas(w, hw, head, head + 1, "relaxed")   # may fail: someone helped
            return head
        dp = _pdiff(stamp_pos(s), head)
        st = stamp_state(s)
        if (dp == 0 and st == READING) or dp == d[D_CAP]:
            A.cas(w, hw, head, head + 1, "relaxed")   # help the claimant of `head`
            continue
        if dp > d[D_CAP]:
            # A stale head, moved on by others: re-read it. One that stays
            # behind its slot is corrupt (see _claim_push).
            stale = stale + 1 if head == last else 0
            last = head
            if stale > STALE_LIMIT:
                return CORRUPT
            continue
        # Nothing published at head. Check disconnection *before* re-checking
        # the slot (flume's "check disconnect before msg"): a sender clears
        # its role bit after its last publish, so if we see no sender, we also
        # see everything any of them published.
        if not checked_senders:
            senders = has_senders(c)
            checked_senders = True
            continue
        tail = A.load(w, tw, "relaxed")
        if dp == 0 and st == WRITING and _pdiff(tail & ~SEALED_BIT, head) > 0 and waited < WRITER_SPIN:
            # A producer claimed the head slot and is still copying into it while
            # later messages may be complete behind it: like crossbeam, wait for
            # it rather than report "empty" (its window is nanoseconds). A dead
            # producer is bounded by WRITER_SPIN and left to recovery.
            A.pause()
            waited += 1
            continue
        tail = A.load(w, tw, "relaxed")
        if (tail & SEALED_BIT) and _pdiff(tail & ~SEALED_BIT, head) <= 0:
            return SEALED
        if not senders and _pdiff(tail & ~SEALED_BIT, head) <= 0:
            return DISCONNECTED
        return EMPTY


@jit(inline="always")
def _release(w, d, pos):
    # release (made seq_cst, see _publish): pairs with the next producer's acquire
    # claim of FREE(pos + cap).
    A.store(w, _slot_off(d, pos) >> 3, stamp(pos + d[D_CAP], 0, FREE), "seq_cst")


@jit
def _pop_one(d, dst, aux):
    me = d[D_ME]
    if me < 0:
        return UNREGISTERED
    w = _words(d)
    b = _bytes(d)
    while True:
        pos = _claim_pop(w, d, me, False)
        if pos < 0:
            return pos
        off = _slot_off(d, pos)
        meta = w[(off >> 3) + 1]
        flags = (meta >> L.META_FLAGS_SHIFT) & 0xFF
        if flags & L.FLAG_TOMB:
            _release(w, d, pos)
            _wake_sc(_ctrl(d), SIDE_TX, _tx_wakes(d, 1))
            continue
        if flags & L.FLAG_BLOB:
            A.store(aux, 0, pos, "relaxed")
            A.store(aux, 1, meta, "relaxed")
            return BLOB
        n = meta & L.META_LEN_MASK
        r = copy(dst, 0, b, off + L.SLOT_HEADER, n) if n <= _inline_cap(d) else -1
        _release(w, d, pos)
        _wake_sc(_ctrl(d), SIDE_TX, _tx_wakes(d, 1))
        if r < 0:
            return CORRUPT
        return (n << 8) | ((meta >> L.META_KIND_SHIFT) & 0xFF)


@jit
def try_pop(d, dst):
    """Pop one message into ``dst``. Non-blocking.

    Returns ``len << 8 | kind`` (>= 0) on success, or EMPTY, DISCONNECTED
    (empty and no sender left), SEALED, BLOB (an out-of-band message: its
    slot is claimed, ``d[D_POS]``/``d[D_META]`` say which; read the blob then
    call ``release``), CORRUPT (a length that cannot be right: the message is
    dropped), or UNREGISTERED. Usable from a user's own ``@njit`` code.
    """
    return _pop_one(d, dst, d[D_POS:D_META + 1])


@jit(inline="always")
def _bank(banks):
    """This thread's bank in the table ``banks``, claiming a free one if needed; -1 if none."""
    tid = thread_id()
    for b in range(N_BANKS):
        if A.load(banks, b, "relaxed") == tid:
            return b
    for b in range(N_BANKS):
        if A.load(banks, b, "relaxed") == 0 and A.cas(banks, b, 0, tid, "relaxed") == 0:
            return b
    return -1


@jit(inline="always")
def _pop_area(d):
    banks = i64_at(d[D_BANKS], 2 * N_BANKS)
    b = _bank(banks)
    if b < 0:
        return NO_BANK
    # Only this thread uses its bank's counter: no atomic RMW needed.
    k = A.load(banks, N_BANKS + b, "relaxed")
    A.store(banks, N_BANKS + b, (k + 1) & (N_AREAS - 1), "relaxed")
    area = b * N_AREAS + k
    at = d[D_DST] + area * d[D_AREA_SIZE]
    r = _pop_one(d, u8_at(at, d[D_AREA_SIZE]), i64_at(at, 3))
    if r >= 0:
        return ((r >> 8) << LEN_SHIFT) | (area << AREA_SHIFT) | (r & 0xFF)
    if r == BLOB:
        # The area says which message (pos, meta) and which ring generation;
        # the pin keeps that ring mapped in this process until the release.
        A.store(i64_at(at, 3), 2, d[D_GEN], "relaxed")
        A.fetch_add(d, D_PINS, 1, "relaxed")
        return BLOB_AREA - area
    return r


@jit("int64(int64)", nogil=False)
def pop_at(daddr):
    """``try_pop`` for the Python fast path, into the next receive area.

    Returns ``len << 17 | area << 8 | kind`` on success, ``BLOB_AREA - area``
    for a blob message (the area holds its position and meta word), or a
    status (NO_BANK: this thread needs a descriptor of its own).
    """
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    return _pop_area(d)


@jit
def try_pop_many(d, dst, lens, maxn):
    """Pop up to ``maxn`` inline messages back to back into ``dst``.

    ``lens[j] = len | kind << 48`` for each. Stops early when empty, at a
    blob message (left in place for ``try_pop``), or when ``dst`` has no room
    for another full slot. Returns the count, or a status if none was popped.
    """
    me = d[D_ME]
    if me < 0:
        return UNREGISTERED
    w = _words(d)
    b = _bytes(d)
    icap = _inline_cap(d)
    got = 0
    freed = 0
    at = 0
    status = OK
    while got < maxn and at + icap <= dst.shape[0] and got < lens.shape[0]:
        pos = _claim_pop(w, d, me, True)
        if pos < 0:
            status = pos
            break
        off = _slot_off(d, pos)
        meta = w[(off >> 3) + 1]
        flags = (meta >> L.META_FLAGS_SHIFT) & 0xFF
        n = meta & L.META_LEN_MASK
        if flags & L.FLAG_TOMB:
            _release(w, d, pos)
            freed += 1
            continue
        if n > icap:
            _release(w, d, pos)
            status = CORRUPT
            break
        copy(dst, at, b, off + L.SLOT_HEADER, n)
        _release(w, d, pos)
        A.store(lens, got, n | (((meta >> L.META_KIND_SHIFT) & 0xFF) << L.META_KIND_SHIFT), "relaxed")
        at += n
        got += 1
    if got + freed > 0:
        _wake(_ctrl(d), SIDE_TX, _tx_wakes(d, got + freed))
    if got > 0:
        return got
    if status == OK:
        status = EMPTY
    return status


@jit("int64(int64, int64, int64)", nogil=False)
def pop_many_at(daddr, lens_addr, maxn):
    """``try_pop_many`` into the batch region of the receive buffer (callers serialise)."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    return try_pop_many(d, u8_at(d[D_DST] + d[D_BATCH], d[D_DST_SIZE] - d[D_BATCH]),
                        i64_at(lens_addr, maxn), maxn)


@jit(inline="always")
def _release_read(w, d, pos):
    """Free the slot ``pos`` we hold READING and wake a sender; CORRUPT if it is not ours (recovered)."""
    if A.load(w, _slot_off(d, pos) >> 3, "relaxed") != stamp(pos, d[D_ME], READING):
        return CORRUPT
    _release(w, d, pos)
    _wake_sc(_ctrl(d), SIDE_TX, _tx_wakes(d, 1))
    return OK


@jit("int64(int64, int64)", nogil=False)
def release_at(daddr, pos):
    """Free the slot ``pos`` this process claimed with a BLOB pop."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    return _release_read(_words(d), d, pos)





@jit("int64(int64)", nogil=False)
def unpin_at(daddr):
    """A blob message popped through this descriptor was released (or given up)."""
    d = i64_at(daddr, D_LEN)
    return A.fetch_add(d, D_PINS, -1, "relaxed") - 1


# --------------------------------------------------------------------------
# Blob pool (see "Blob pool" above).

@jit(inline="always")
def _entry_w(d, e):
    """Word index of blob pool entry ``e`` (its state; info follows)."""
    return (d[D_RING] + L.RING_HEADER + d[D_CAP] * d[D_SLOT] + e * L.BE_SIZE) >> 3


@jit(inline="always")
def _hint_w(d):
    return (d[D_RING] + L.RG_BLOB_HINT) >> 3


@jit(inline="always")
def _take(d, w, pos, lg):
    cap = d[D_CAP]
    bw = (_slot_off(d, pos) + L.SL_BLOB) >> 3
    hint = A.load(w, _hint_w(d), "relaxed")
    start = pos % cap
    for rnd in range(2):
        for k in range(cap + 1):
            if k == 0:
                if rnd == 1 or hint < 0 or hint >= cap:
                    continue
                e = hint
            else:
                e = (start + k - 1) % cap
            ew = _entry_w(d, e)
            if A.load(w, ew, "relaxed") != 0:
                continue
            if rnd == 0 and (A.load(w, ew + 1, "relaxed") & 0xFF) < lg:
                continue
            A.store(w, bw, e, "relaxed")
            if A.cas(w, ew, 0, (pos & POS_MASK) + 1, "acq_rel") == 0:
                return e
    return BUSY


@jit("int64(int64, int64, int64)", nogil=False)
def blob_take_at(daddr, pos, lg):
    """Take a free pool entry for the message of ``pos``, whose slot the caller holds (WRITING).

    First the entry freed last (``blob_hint``), then, from the slot's own
    entry on, the first free one whose blob holds ``2**lg`` bytes, then the
    first free one at all (the caller grows its blob). Returns the entry,
    or BUSY if every entry was taken while we looked.
    """
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    return _take(d, _words(d), pos, lg)


@jit("int64(int64, int64, int64)", nogil=False)
def push_blob_at(daddr, src, n):
    """Push ``n`` bytes at ``src`` through a blob, if this process has the blob it takes mapped.

    Claims a slot, takes a pool entry (``_take``) and, if the process-local
    map (``D_BLOBMAP``, kept by shm/_chan.py) holds that entry's current
    blob, large enough, copies and publishes: OK. FULL, SEALED,
    DISCONNECTED, UNREGISTERED, CLOSED, CORRUPT: nothing was claimed.
    ``CLAIMED - p``: position ``p`` is claimed (and maybe an entry taken,
    named by its slot): the caller creates or maps the blob, writes and
    publishes, or tombstones. TOO_BIG: no map (not a bounded channel).
    """
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    mp = d[D_BLOBMAP]
    if mp == 0:
        return TOO_BIG
    me = d[D_ME]
    if me < 0:
        return UNREGISTERED
    if not has_receivers(_ctrl(d)):
        return DISCONNECTED
    w = _words(d)
    pos = _claim_push(w, d, me)
    if pos < 0:
        return pos
    lg = L.BLOB_MIN_LG
    while (1 << lg) < n:
        lg += 1
    e = _take(d, w, pos, lg)
    if e < 0:
        return CLAIMED - pos
    info = A.load(w, _entry_w(d, e) + 1, "relaxed")
    m = i64_at(mp, 3 * d[D_CAP])
    if (info & 0xFF) == 0 or m[3 * e] != (info >> 8) or m[3 * e + 2] < n:
        return CLAIMED - pos
    copy(u8_at(m[3 * e + 1], n), 0, u8_at(src, n), 0, n)
    _publish(w, d, pos, (n & L.META_LEN_MASK) | (d[D_KIND] << L.META_KIND_SHIFT)
             | (L.FLAG_BLOB << L.META_FLAGS_SHIFT))
    _wake(_ctrl(d), SIDE_RX, 1)
    return OK


@jit(inline="always")
def _held_entry(d, w, pos):
    """The entry the slot of ``pos`` names, if it is held for ``pos``; else -1."""
    e = A.load(w, (_slot_off(d, pos) + L.SL_BLOB) >> 3, "relaxed")
    if e < 0 or e >= d[D_CAP] or A.load(w, _entry_w(d, e), "acquire") != (pos & POS_MASK) + 1:
        return -1
    return e


@jit(inline="always")
def _give(d, w, pos, e):
    """Give back entry ``e`` held for ``pos`` (release: our reads of its blob come first); it becomes the hint."""
    held = (pos & POS_MASK) + 1
    if A.cas(w, _entry_w(d, e), held, 0, "release") != held:
        return False
    A.store(w, _hint_w(d), e, "relaxed")
    return True


@jit("int64(int64, int64, int64)", nogil=False)
def blob_mapped_at(daddr, pos, n):
    """Where the ``n``-byte payload of the blob message at ``pos`` (our READING slot) is mapped here, or 0.

    0 unless the entry is held for ``pos`` and the process-local map
    (``D_BLOBMAP``) has its current blob, large enough.
    """
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0 or d[D_BLOBMAP] == 0:
        return 0
    w = _words(d)
    e = _held_entry(d, w, pos)
    if e < 0:
        return 0
    info = A.load(w, _entry_w(d, e) + 1, "relaxed")
    lg = info & 0xFF
    m = i64_at(d[D_BLOBMAP], 3 * d[D_CAP])
    if lg == 0 or lg > 47 or (1 << lg) < n or m[3 * e] != (info >> 8) or m[3 * e + 2] < n:
        return 0
    return m[3 * e + 1]


@jit("int64(int64, int64)", nogil=False)
def blob_read_done_at(daddr, pos):
    """The pop builtin has read the blob message at ``pos`` itself: give back its entry, then the slot; unpin."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    A.fetch_add(d, D_PINS, -1, "relaxed")
    w = _words(d)
    e = _held_entry(d, w, pos)      # none if we were recovered under us (taken for dead)
    if e >= 0:
        _give(d, w, pos, e)
    return _release_read(w, d, pos)


@jit("int64(int64, int64)", nogil=False)
def blob_entry_at(daddr, pos):
    """The pool entry holding the message of ``pos``, whose slot the caller holds; CORRUPT if none does."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    e = _held_entry(d, _words(d), pos)
    return e if e >= 0 else CORRUPT


@jit("int64(int64, int64, int64)", nogil=False)
def blob_give_at(daddr, pos, e):
    """Give back entry ``e``, taken for the message of ``pos``; it becomes the hint. CORRUPT if not held so."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    if e < 0 or e >= d[D_CAP]:
        return CORRUPT
    return OK if _give(d, _words(d), pos, e) else CORRUPT


@jit("int64(int64, int64)", nogil=False)
def blob_info_at(daddr, e):
    """Entry ``e``'s ``bgen << 8 | log2(capacity)`` (its holder's to trust); CORRUPT if out of range."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    if e < 0 or e >= d[D_CAP]:
        return CORRUPT
    return A.load(_words(d), _entry_w(d, e) + 1, "relaxed")


@jit("int64(int64, int64)", nogil=False)
def blob_state_at(daddr, e):
    """Entry ``e``'s state: 0 free, else the position it was taken for plus one."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    if e < 0 or e >= d[D_CAP]:
        return CORRUPT
    return A.load(_words(d), _entry_w(d, e), "acquire")


@jit("int64(int64, int64, int64)", nogil=False)
def set_blob_info_at(daddr, e, info):
    """The holder of entry ``e`` records its blob (``bgen << 8 | log2(capacity)``)."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    if e < 0 or e >= d[D_CAP]:
        return CORRUPT
    A.store(_words(d), _entry_w(d, e) + 1, info, "relaxed")
    return OK


@jit(inline="always")
def _free_entry_of(d, w, sw, pos):
    """Free the pool entry held for ``pos`` (a slot taken over from its dead or cancelled owner), if any.

    The slot's ``blob`` word names it, unless the taker died before that
    store was visible here (nothing orders it before our read in the C++
    model): then look through the whole pool, which is rare (recovery).
    ``pos`` is unique, so an entry held for it is that message's.
    """
    held = (pos & POS_MASK) + 1
    e = A.load(w, sw + (L.SL_BLOB >> 3), "relaxed")
    if e >= 0 and e < d[D_CAP] and A.cas(w, _entry_w(d, e), held, 0, "release") == held:
        return
    for e in range(d[D_CAP]):
        if A.load(w, _entry_w(d, e), "relaxed") == held:
            A.cas(w, _entry_w(d, e), held, 0, "release")
            return


@jit("int64(int64, int64, int64)", nogil=False)
def copy_at(dst_addr, src_addr, n):
    """memcpy ``n`` bytes between two addresses the caller has validated."""
    if n <= 0:
        return 0
    return copy(u8_at(dst_addr, n), 0, u8_at(src_addr, n), 0, n)


# --------------------------------------------------------------------------
# Spinning and parking.

@jit(inline="always")
def backoff(step):
    """One step of crossbeam's Backoff: spin 2**step pauses, then yield."""
    if step <= 6:
        for _ in range(1 << step):
            A.pause()
    else:
        sched_yield()


@jit(inline="always")
def _pop_spin(d, steps):
    r = _pop_area(d)
    k = 0
    while r == EMPTY and k < steps:
        backoff(k if k < SPIN_STEPS else 7)
        k += 1
        if d[D_SIZE] == 0:       # closed by another thread while we spun
            return CLOSED
        r = _pop_area(d)
    return r


@jit(inline="always")
def _push_spin(d, src_addr, n, steps):
    if n < 0 or n > _inline_cap(d):
        return TOO_BIG
    src = u8_at(src_addr, n)
    r = try_push(d, src, n)
    k = 0
    while r == FULL and k < steps:
        backoff(k if k < SPIN_STEPS else 7)
        k += 1
        if d[D_SIZE] == 0:
            return CLOSED
        r = try_push(d, src, n)
    return r


@jit("int64(int64, int64)")
def pop_spin_at(daddr, steps):
    """``pop_at``, retried with backoff while EMPTY for up to ``steps`` steps (no GIL)."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    return _pop_spin(d, steps)


@jit("int64(int64, int64)", nogil=False)
def pop_spin_gil_at(daddr, steps):
    """``pop_spin_at`` keeping the GIL: for a few microseconds of spinning, cheaper to call."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    return _pop_spin(d, steps)


@jit("int64(int64, int64, int64, int64)")
def push_spin_at(daddr, src_addr, n, steps):
    """``push_at``, retried with backoff while FULL for up to ``steps`` steps (no GIL)."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    return _push_spin(d, src_addr, n, steps)


@jit("int64(int64, int64, int64, int64)", nogil=False)
def push_spin_gil_at(daddr, src_addr, n, steps):
    """``push_spin_at`` keeping the GIL (short spins)."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    return _push_spin(d, src_addr, n, steps)


@jit
def ready(d, side):
    """Whether a pop (SIDE_RX) or push (SIDE_TX) could make progress now.

    True when in doubt: the caller retries, and parks again if it cannot.
    """
    w = _words(d)
    c = _ctrl(d)
    if side == SIDE_RX:
        if not has_senders(c):
            return True
        head = A.load(w, _head_w(d), "relaxed")
        tail = A.load(w, _tail_w(d), "relaxed")
        if tail & SEALED_BIT:
            return True
        s = A.load(w, _slot_off(d, head) >> 3, "acquire")
        dp = _pdiff(stamp_pos(s), head)
        st = stamp_state(s)
        return not ((dp == 0 and (st == FREE or st == WRITING)) or dp < 0)
    if not has_receivers(c):
        return True
    tail = A.load(w, _tail_w(d), "relaxed")
    if tail & SEALED_BIT:
        return True
    s = A.load(w, _slot_off(d, tail) >> 3, "acquire")
    return _pdiff(stamp_pos(s), tail) >= 0


@jit("int64(int64, int64, int64)")
def park_at(daddr, side, timeout_ns):
    """Sleep until woken, ``timeout_ns`` passes, or the ring looks ready.

    The caller must have set its bit in the side's waiter bitmap first
    (``kernels.registry.bit_set``) and clear it afterwards. Protocol:
    bit set (seq_cst RMW); fence; read the futex word; re-check readiness
    (the lost-wake-up guard: a push that happened before our bit was visible
    is seen here); sleep only if the futex word is unchanged. Returns 1 if it
    did not sleep because the ring was ready, else 0.
    """
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    c = _ctrl(d)
    A.fence("seq_cst")
    sw = _seq_w(side)
    seq = A.load(c, sw, "seq_cst")
    if ready(d, side):
        return 1
    futex_wait(c, sw, seq, timeout_ns)
    return 0


@jit("int64(int64, int64, int64)")
def wake_at(daddr, side, n):
    """Wake up to ``n`` parked waiters of ``side`` (after a close, say)."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    c = _ctrl(d)
    w = _seq_w(side)
    A.fetch_add(c, w, 1, "seq_cst")
    return futex_wake(c, w, n)


# --------------------------------------------------------------------------
# Introspection and recovery.

@jit("int64(int64, int64)", nogil=False)
def counter_at(daddr, which):
    """0: tail (messages claimed for sending), 1: head (claimed for receiving), 2: sealed."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    w = _words(d)
    if which == 0:
        return A.load(w, _tail_w(d), "relaxed") & ~SEALED_BIT
    if which == 1:
        return A.load(w, _head_w(d), "relaxed")
    return 1 if A.load(w, _tail_w(d), "relaxed") & SEALED_BIT else 0


@jit("int64(int64)", nogil=False)
def seal_at(daddr):
    """Seal the ring: no push succeeds from now on. Returns the sealed tail."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    w = _words(d)
    return A.fetch_or(w, _tail_w(d), SEALED_BIT, "seq_cst") & ~SEALED_BIT


@jit("int64(int64, int64)")
def blocker_at(daddr, side):
    """The participant whose claim blocks ``side``, or -1.

    SIDE_RX: the producer still WRITING the slot at ``head`` while ``tail``
    is past it. SIDE_TX: the producer or consumer still holding the previous
    lap of the slot at ``tail``.
    """
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    w = _words(d)
    cap = d[D_CAP]
    if side == SIDE_RX:
        head = A.load(w, _head_w(d), "relaxed")
        tail = A.load(w, _tail_w(d), "relaxed") & ~SEALED_BIT
        if _pdiff(tail, head) <= 0:
            return -1
        s = A.load(w, _slot_off(d, head) >> 3, "acquire")
        if stamp_state(s) == WRITING and _pdiff(stamp_pos(s), head) == 0:
            return stamp_owner(s)
        return -1
    tail = A.load(w, _tail_w(d), "relaxed") & ~SEALED_BIT
    s = A.load(w, _slot_off(d, tail) >> 3, "acquire")
    st = stamp_state(s)
    if _pdiff(stamp_pos(s), tail) == -cap and (st == WRITING or st == READING):
        return stamp_owner(s)
    return -1


@jit("int64(int64, int64)")
def owned_by_at(daddr, owner):
    """How many slots participant ``owner`` holds (WRITING or READING)."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    w = _words(d)
    n = 0
    for i in range(d[D_CAP]):
        s = A.load(w, (d[D_RING] + L.RING_HEADER + i * d[D_SLOT]) >> 3, "acquire")
        st = stamp_state(s)
        if (st == WRITING or st == READING) and stamp_owner(s) == owner:
            n += 1
    return n


@jit("int64(int64, int64)")
def recover_at(daddr, dead):
    """Move every slot held by the dead participant ``dead`` forward.

    The caller must have proved ``dead`` dead and own its reaping
    (``shm/_registry.py``): the entry stays REAPING, under the caller's
    exclusive ownership, until this returns, so slots are taken over *in the
    dead participant's own name* (no other process can act in it, and a
    reaper killed half-way leaves them attributed to an entry the next
    reaper recovers again). The caller need not be registered itself.
    Returns ``tombstones | dropped << 32``.
    """
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    w = _words(d)
    me = dead
    cap = d[D_CAP]
    tw = _tail_w(d)
    hw = _head_w(d)
    tombs = 0
    dropped = 0
    for i in range(cap):
        sw = (d[D_RING] + L.RING_HEADER + i * d[D_SLOT]) >> 3
        s = A.load(w, sw, "acquire")
        st = stamp_state(s)
        if stamp_owner(s) != dead or not (st == WRITING or st == READING):
            continue
        pos = stamp_pos(s)
        if st == WRITING:
            if A.cas(w, sw, s, stamp(pos, me, WRITING), "acq_rel") != s:
                continue
            _free_entry_of(d, w, sw, pos)
            tail = A.load(w, tw, "relaxed")
            if tail & SEALED_BIT and _pdiff(tail & ~SEALED_BIT, pos) <= 0:
                # Sealed at this claim: it will never be consumed. Free it.
                A.store(w, sw, stamp(pos, 0, FREE), "release")
                continue
            if _pdiff(tail & ~SEALED_BIT, pos) == 0 and (tail & SEALED_BIT) == 0:
                A.cas(w, tw, tail, tail + 1, "relaxed")
            A.store(w, sw + 1, L.FLAG_TOMB << L.META_FLAGS_SHIFT, "relaxed")
            A.store(w, sw, stamp(pos, 0, PUBLISHED), "release")
            tombs += 1
        else:
            if A.cas(w, sw, s, stamp(pos, me, READING), "acq_rel") != s:
                continue
            _free_entry_of(d, w, sw, pos)
            head = A.load(w, hw, "relaxed")
            if _pdiff(head, pos) == 0:
                A.cas(w, hw, head, head + 1, "relaxed")
            A.store(w, sw, stamp(pos + cap, 0, FREE), "release")
            dropped += 1
    c = _ctrl(d)
    if tombs or dropped:
        _wake(c, SIDE_RX, 1 << 30)
        _wake(c, SIDE_TX, 1 << 30)
    return tombs | (dropped << 32)


@jit("int64(int64, int64, int64, int64)")
def init_ring_at(seg_addr, seg_size, ring_off, args_addr):
    """Initialise a ring header and its stamps in a fresh segment.

    ``args`` (int64[4]) = cap, slot, base position, generation. Slot
    ``(base + j) % cap`` starts FREE for position ``base + j``.
    """
    w = i64_at(seg_addr, seg_size >> 3)
    a = i64_at(args_addr, 4)
    cap = a[0]
    slot = a[1]
    base = a[2]
    r = ring_off >> 3
    A.store(w, r + (L.RG_CAP >> 3), cap, "relaxed")
    A.store(w, r + (L.RG_SLOT >> 3), slot, "relaxed")
    A.store(w, r + (L.RG_BASE >> 3), base, "relaxed")
    A.store(w, r + (L.RG_GEN >> 3), a[3], "relaxed")
    for j in range(cap):
        p = base + j
        sw = (ring_off + L.RING_HEADER + (p % cap) * slot) >> 3
        A.store(w, sw, stamp(p, 0, FREE), "relaxed")
        A.store(w, sw + 1, 0, "relaxed")
    A.store(w, r + (L.RG_HEAD >> 3), base, "relaxed")
    A.store(w, r + (L.RG_TAIL >> 3), base, "release")
    return OK


@jit("int64(int64, int64)", nogil=False)
def rendezvous_taken_at(daddr, pos):
    """1 if the message at ``pos`` was claimed by a consumer, else 0."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    s = A.load(_words(d), _slot_off(d, pos) >> 3, "acquire")
    return 0 if s == stamp(pos, 0, PUBLISHED) else 1


@jit("int64(int64, int64)", nogil=False)
def rendezvous_cancel_at(daddr, pos):
    """Take back the unclaimed message at ``pos``: 1 if taken back, 0 if a consumer has it."""
    d = i64_at(daddr, D_LEN)
    if d[D_SIZE] == 0:
        return CLOSED
    w = _words(d)
    sw = _slot_off(d, pos) >> 3
    s = stamp(pos, 0, PUBLISHED)
    if A.cas(w, sw, s, stamp(pos, d[D_ME], READING), "acquire") != s:
        return 0
    A.cas(w, _head_w(d), pos, pos + 1, "relaxed")
    _free_entry_of(d, w, sw, pos)       # a large message's blob pool entry comes back with it
    _release(w, d, pos)
    _wake_sc(_ctrl(d), SIDE_TX, _tx_wakes(d, 1))
    return 1
