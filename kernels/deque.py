"""A work-stealing deque in shared memory: Chase-Lev, as crossbeam-deque's Worker and Stealer.

The foundation of ``shm.Pool`` (kernels/pool.py, shm/pool.py): each worker
process owns one deque of int64 task ids, pushes and pops at the bottom
(LIFO, cache-warm), and idle workers steal from the top of others' (FIFO,
oldest first), one task or half of what is there (``steal_batch``).

Design notes
------------
The algorithm is Chase and Lev, "Dynamic Circular Work-Stealing Deque"
(SPAA 2005), with the memory orderings of Lê, Pop, Cohen and Zappa Nardelli,
"Correct and Efficient Work-Stealing for Weak Memory Models" (PPoPP 2013),
which crossbeam-deque follows. A deque lives at word offset ``base`` of any
shared int64 array (a segment, or an anonymous shared mapping):

* ``w[base + TOP]``: the next index to steal; only ever increases, by CAS
  (stealers, and the owner taking the last task). Its own cache line.
* ``w[base + BOTTOM]``: one past the newest task; written by the owner
  only. Its own cache line.
* ``w[base + BUF + (i % cap)]``: the tasks, ``cap`` a power of two. Fixed
  capacity: ``push`` says FULL rather than growing (a worker whose deque is
  full runs the task itself, or pushes to the pool's injector channel).

Orderings, and what each pairs with:

* ``push``: read ``top`` (acquire: pairs with a stealer's CAS, so the slot
  it freed may be reused), store the task (relaxed), then ``bottom = b + 1``
  (release: pairs with a stealer's acquire load of ``bottom``, which then
  sees the task).
* ``pop``: ``bottom = b - 1`` (relaxed), a seq_cst fence, then read ``top``:
  the fence pairs with the stealer's fence between its loads of ``top`` and
  ``bottom``, so the owner and a stealer cannot both take the last task
  without one of them seeing the other; when exactly one task is left both
  race on a seq_cst CAS of ``top``.
* ``steal``: read ``top`` (acquire), seq_cst fence, read ``bottom``
  (acquire), read the task, then CAS ``top`` from t to t + 1 (seq_cst): only
  the winner owns the task it read; a loser says RETRY.
* ``steal_batch``: ``steal`` repeated (one CAS per task: the owner pops
  without a CAS while more than one task is left, so one CAS over a range
  could hand a task to both), into the destination's free slots, published
  by one release store of its ``bottom``.

*A process killed at any instruction* loses at most what it was taking:
a stealer killed after winning its CAS took the task with it (as a
channel consumer killed after a pop), and one killed inside
``steal_batch`` took every task it had won so far (up to ``max_n``: they
are published to its own deque only at the end); one killed before a CAS
took nothing. An
owner killed in ``pop`` between lowering ``bottom`` and restoring it leaves
``bottom`` one low: the task there is hidden from stealers. The pool
(issue 5) has to settle that when it replaces a dead worker: its new owner
knows from the pool's accounting which task ids were finished (shm.Pool:
kernels/pool.py ``settle`` and the quiescence scan).

Rejected: a growable buffer (crossbeam swaps buffers under epoch
reclamation; across processes that needs a shared allocator and a reclaim
protocol that survives kills, while a fixed capacity with a FULL fallback
keeps every word at a fixed place); a lock per deque (the point is that
stealing never blocks the owner).
"""
from __future__ import annotations

from . import atomics as A
from ._jit import jit

TOP = 0             # word offsets within a deque
BOTTOM = 16         # 128 bytes on: its own cache line
BUF = 32

OK = 0
EMPTY = -1
RETRY = -2          # steal: lost the race for the task; try again (or another deque)
FULL = -3


def words(cap: int) -> int:
    """Words a deque of ``cap`` tasks (a power of two) occupies."""
    if cap < 1 or cap & (cap - 1):
        raise ValueError("a deque's capacity is a power of two")
    return BUF + cap


@jit
def init(w, base, cap):
    A.store(w, base + TOP, 0, "relaxed")
    A.store(w, base + BOTTOM, 0, "release")


@jit
def length(w, base):
    """Tasks in the deque now (racy: a hint for stealers choosing a victim)."""
    n = A.load(w, base + BOTTOM, "acquire") - A.load(w, base + TOP, "acquire")
    return n if n > 0 else 0


@jit
def push(w, base, cap, task):
    """Owner only: push ``task`` at the bottom. OK or FULL."""
    b = A.load(w, base + BOTTOM, "relaxed")
    t = A.load(w, base + TOP, "acquire")
    if b - t >= cap:
        return FULL
    A.store(w, base + BUF + (b & (cap - 1)), task, "relaxed")
    A.store(w, base + BOTTOM, b + 1, "release")
    return OK


@jit
def pop(w, base, cap):
    """Owner only: ``(OK, task)`` from the bottom (newest first), or ``(EMPTY, 0)``."""
    b = A.load(w, base + BOTTOM, "relaxed") - 1
    A.store(w, base + BOTTOM, b, "relaxed")
    A.fence("seq_cst")
    t = A.load(w, base + TOP, "relaxed")
    if t > b:                               # it was empty: put bottom back
        A.store(w, base + BOTTOM, b + 1, "relaxed")
        return EMPTY, 0
    task = A.load(w, base + BUF + (b & (cap - 1)), "relaxed")
    if t < b:
        return OK, task                     # more than one left: no stealer can reach this one
    # The last task: race the stealers for it on top.
    won = A.cas(w, base + TOP, t, t + 1, "seq_cst") == t
    A.store(w, base + BOTTOM, b + 1, "relaxed")
    return (OK, task) if won else (EMPTY, 0)


@jit
def steal(w, base, cap):
    """Anyone: ``(OK, task)`` from the top (oldest first), ``(EMPTY, 0)``, or ``(RETRY, 0)``."""
    t = A.load(w, base + TOP, "acquire")
    A.fence("seq_cst")
    b = A.load(w, base + BOTTOM, "acquire")
    if t >= b:
        return EMPTY, 0
    task = A.load(w, base + BUF + (t & (cap - 1)), "relaxed")
    if A.cas(w, base + TOP, t, t + 1, "seq_cst") != t:
        return RETRY, 0
    return OK, task


@jit
def steal_batch(w, base, cap, dw, dbase, dcap, max_n):
    """Steal up to half of the deque (at most ``max_n``, at most what fits) into deque ``dbase`` of ``dw``.

    The caller owns the destination. One CAS per task, as crossbeam does
    for LIFO workers: the owner pops from the bottom without a CAS while
    more than one task is left, so a single CAS over a range could hand a
    task to both. The tasks go into the destination's free slots and are
    published by one release store of its ``bottom`` at the end. Returns
    how many moved.
    """
    t = A.load(w, base + TOP, "acquire")
    A.fence("seq_cst")
    b = A.load(w, base + BOTTOM, "acquire")
    n = b - t
    if n <= 0:
        return 0
    n = (n + 1) // 2
    db = A.load(dw, dbase + BOTTOM, "relaxed")
    room = dcap - (db - A.load(dw, dbase + TOP, "acquire"))
    if n > room:
        n = room
    if n > max_n:
        n = max_n
    moved = 0
    while moved < n:
        st, task = steal(w, base, cap)
        if st != OK:
            break
        A.store(dw, dbase + BUF + ((db + moved) & (dcap - 1)), task, "relaxed")
        moved += 1
    if moved:
        A.store(dw, dbase + BOTTOM, db + moved, "release")
    return moved
