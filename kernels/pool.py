"""The process pool's kernels: finding work, going idle, and knowing when nothing moves.

``shm.Pool`` (shm/pool.py) keeps its tasks in Chase-Lev deques
(kernels/deque.py) inside one KIND_POOL segment (kernels/layout.py:
``POOL``, ``WORKER``, ``pool_layout``):

* the *injector*: a deque owned by the pool's parent process, which pushes
  every task there; workers only steal from it (crossbeam's ``Injector``);
* one deque per worker, owned by that worker: it steals batches into it
  from the injector or from other workers, and pops from it (rayon's
  scheduler: local LIFO, steal FIFO).

Design notes
------------
*Finding work* (``take``): pop the own deque; else steal a batch (up to
half, at most ``STEAL_MAX`` runs) from the injector into it; else from the
other workers' deques, starting at a random one; pop. A run longer than
the caller's ``leaf`` is split in halves and the right halves pushed back
on the own deque (rayon's adaptive splitting): thieves take the largest
pieces from the top while the owner works through the left end, and the
worker makes one kernel call per leaf run, not per task (it sizes ``leaf``
to ~100 us of work from the tasks' measured duration). A worker that split
a run or holds two or more while others sleep wakes one of them, so work
spreads (rayon's "tickle").

*Going idle* (``spin``, then ``idle_park``): the worker first looks at
the deques for ``SPIN_NS`` (yielding the CPU between looks), then sends its
results, then ``idle_park`` stores ``WS_IDLE``, sets its bit of
``sleepers`` (seq_cst RMW; a bitmap, so the parent can clear the bit of a
worker that died parked), reads the ``wake`` word, then looks at every
deque once more; only if all are empty does it ``futex_wait`` on ``wake``.
Whoever makes work visible (the parent after pushing, a worker after
stealing a batch) fences and reads ``sleepers``; when it is non-zero it
bumps ``wake`` and wakes. Either the parker sees the work or the pusher sees
the parker: no wake-up is lost (the channel's protocol, shm/_wait.py).
Parking is bounded (the caller passes ~100 ms) so a worker notices its
parent's death.

*Knowing what a dead worker took* (``quiet``): a worker SIGKILLed between
claiming a task (a CAS on some deque's ``top``, or its own ``pop``) and
reporting its result took that task with it, and no word in shared memory
says for certain which one: ``current`` is written after the claim. The
pool therefore does not guess. A worker is ``WS_BUSY`` whenever it may hold
a task: it stores ``WS_BUSY`` and bumps ``epoch`` (both seq_cst) *before*
any claim, and stores ``WS_IDLE`` only after its results are sent. The
parent's scan reads ``epoch``, every worker's state, every deque's length,
and ``epoch`` again. If no live worker was BUSY, every deque was empty and
``epoch`` did not move, then at that moment no task was anywhere but in a
result already sent: any worker that turned BUSY during the scan would have
bumped ``epoch``, and only BUSY workers move tasks. So a task pushed before
the scan with no result after draining the result channel is lost, and
reported as such (``shm.WorkerLost``, naming the dead worker; the one whose
``current`` it is, when there is one). A dead worker's slot is marked
``WS_DEAD`` by the parent before it scans; its deque stays stealable.

*A dead owner's deque* (``settle``): an owner killed inside ``pop`` may
leave ``bottom`` one below ``top`` (it lowered ``bottom``, lost the race
for the last task, and died before restoring it), or equal to it with the
last task hidden at ``top`` and a stealer still about to CAS ``top`` for
it. The replacement worker, the deque's next owner, finds it empty and
moves ``top`` (by CAS) and ``bottom`` one past, so any such stale CAS fails
and cannot take what the new owner pushes into that slot; the hidden task
was the dead owner's and is reported lost by the scan.

Rejected: per-task state words (claim = CAS on the task's own word):
a second CAS per task, and still a window between taking a task word out
of a deque and marking it; timeouts (a task is lost when it has been out for
too long) report slow tasks as lost; and re-running lost tasks, which could
run a task twice (it may have had side effects before its worker died).
"""
from __future__ import annotations

from . import atomics as A
from . import deque as DQ
from . import layout as L
from .memory import i64_at
from .syscalls import futex_wait, futex_wake, monotonic_ns, sched_yield
from ._jit import jit

__all__ = ["take", "settle", "spin", "idle_park", "push", "SPIN_NS", "quiet", "wake_all", "lengths", "STEAL_MAX",
           "REC_SHIFT", "START_SHIFT", "COUNT_MASK", "MAX_RUN"]

SPIN_NS = 50_000      # an idle worker looks for work this long before it parks
STEAL_MAX = 32        # runs moved by one steal_batch: small enough that a batch spreads

# A deque entry is a *run* of tasks of one chunk: record << 32 | start << 16 | count,
# the record's arena offset in ARENA_ALIGN units, and tasks [start, start + count).
REC_SHIFT = 32
START_SHIFT = 16
COUNT_MASK = 0xFFFF
MAX_RUN = COUNT_MASK

_SIZE = L.SEG_SIZE >> 3
_P = L.SEG_PARAMS >> 3
_EPOCH = L.PO_EPOCH >> 3
_WAKE = L.PO_WAKE >> 3
_SLEEPERS = L.PO_SLEEPERS >> 3
_PUSHED = L.PO_PUSHED >> 3


@jit(inline="always")
def _seg(c):
    n = A.load(i64_at(c, _SIZE + 1), _SIZE, "relaxed") >> 3
    return i64_at(c, n)


@jit(inline="always")
def _wk(w, i, field):
    return (w[_P + L.PP_TABLE] + i * L.WK_SIZE + field) >> 3


@jit(inline="always")
def _dq(w, i):
    """Word offset of worker ``i``'s deque (``-1``: the injector)."""
    if i < 0:
        return w[_P + L.PP_INJECTOR] >> 3
    stride = ((DQ.BUF + w[_P + L.PP_DCAP]) * 8 + L.CACHE_LINE - 1) // L.CACHE_LINE * L.CACHE_LINE
    return (w[_P + L.PP_DEQUES] + i * stride) >> 3


@jit(inline="always")
def _sleepers(w):
    """Workers parked or about to park (set bits of the ``sleepers`` bitmap)."""
    n = 0
    for k in range(L.BITMAP_WORDS):
        x = A.load(w, _SLEEPERS + k, "seq_cst")
        while x != 0:
            x &= x - 1
            n += 1
    return n


@jit(inline="always")
def _wake(w, n):
    """After making work visible: wake up to ``n`` sleepers, if any (returns how many were asked)."""
    A.fence("seq_cst")
    s = _sleepers(w)
    if s <= 0:
        return 0
    A.fetch_add(w, _WAKE, 1, "seq_cst")
    futex_wake(w, _WAKE, n if n < s else s)
    return n


@jit(inline="always")
def _any_work(w):
    nw = w[_P + L.PP_WORKERS]
    if DQ.length(w, _dq(w, -1)) > 0:
        return True
    for i in range(nw):
        if DQ.length(w, _dq(w, i)) > 0:
            return True
    return False


@jit(inline="always")
def _item(rec, start, count):
    return (rec << REC_SHIFT) | (start << START_SHIFT) | count


@jit("int64(int64, int64, int64, int64)")
def take(c, me, r, leaf):
    """Worker ``me``: the next run of at most ``leaf`` tasks, or -1 when there is no work anywhere.

    Looks in the own deque, then the injector, then the peers (from ``r``).
    A run longer than ``leaf`` is split in halves, the right halves pushed
    back onto the own deque where idle workers can steal them (rayon's
    adaptive splitting): one call per run, and stealable pieces as large as
    possible.
    """
    w = _seg(c)
    dcap = w[_P + L.PP_DCAP]
    mine = _dq(w, me)
    st, task = DQ.pop(w, mine, dcap)
    if st != DQ.OK:
        icap = w[_P + L.PP_ICAP]
        nw = w[_P + L.PP_WORKERS]
        moved = 0
        src = _dq(w, -1)
        for attempt in range(4):                 # RETRY: lost a race with another stealer
            moved = DQ.steal_batch(w, src, icap, w, mine, dcap, STEAL_MAX)
            if moved or DQ.length(w, src) == 0:
                break
        if moved == 0:
            for k in range(nw):
                v = (r + k) % nw
                if v == me:
                    continue
                src = _dq(w, v)
                for attempt in range(4):
                    moved = DQ.steal_batch(w, src, dcap, w, mine, dcap, STEAL_MAX)
                    if moved or DQ.length(w, src) == 0:
                        break
                if moved:
                    A.store(w, _wk(w, me, L.WK_STEALS), w[_wk(w, me, L.WK_STEALS)] + moved, "relaxed")
                    break
        if moved == 0:
            A.store(w, _wk(w, me, L.WK_CURRENT), -1, "relaxed")
            return -1
        if moved >= 2 or DQ.length(w, src) > 0:
            _wake(w, 1)                          # work left here or there: another sleeper can help
        st, task = DQ.pop(w, mine, dcap)
        if st != DQ.OK:                          # stolen back from us already: try again later
            A.store(w, _wk(w, me, L.WK_CURRENT), -1, "relaxed")
            return -1
    rec = task >> REC_SHIFT
    start = (task >> START_SHIFT) & COUNT_MASK
    count = task & COUNT_MASK
    if leaf < 1:
        leaf = 1
    split = False
    while count > leaf:
        half = count >> 1
        if DQ.push(w, mine, dcap, _item(rec, start + half, count - half)) != DQ.OK:
            break
        count = half
        split = True
    if split:
        _wake(w, 1)                              # stealable work while others sleep: one comes to help
    task = _item(rec, start, count)
    A.store(w, _wk(w, me, L.WK_CURRENT), task, "relaxed")
    A.store(w, _wk(w, me, L.WK_DONE), w[_wk(w, me, L.WK_DONE)] + count, "relaxed")
    return task


@jit("int64(int64, int64, int64, int64)")
def settle(c, me, pid, start):
    """A (re)started worker ``me`` takes its slot: settles the deque a dead owner left, turns BUSY."""
    w = _seg(c)
    d = _dq(w, me)
    while True:
        t = A.load(w, d + DQ.TOP, "acquire")
        if A.load(w, d + DQ.BOTTOM, "relaxed") > t:
            break                   # tasks left: a stale stealer's CAS at t still takes the task it read
        # Empty (or bottom left below top): move both one past t, so that a
        # stealer that read top == t (and the task the dead owner was popping
        # there) before the owner died fails its CAS instead of taking
        # whatever this worker pushes into slot t next.
        if A.cas(w, d + DQ.TOP, t, t + 1, "seq_cst") == t:
            A.store(w, d + DQ.BOTTOM, t + 1, "release")
            break
    A.store(w, _wk(w, me, L.WK_CURRENT), -1, "relaxed")
    A.store(w, _wk(w, me, L.WK_PID), pid, "relaxed")
    A.store(w, _wk(w, me, L.WK_START), start, "relaxed")
    A.store(w, _wk(w, me, L.WK_STATE), L.WS_BUSY, "seq_cst")
    A.fetch_add(w, _EPOCH, 1, "seq_cst")
    return 0


@jit("int64(int64, int64, int64)")
def idle_park(c, me, timeout_ns):
    """Worker ``me``, holding nothing and with its results sent: sleep until work appears (or the timeout).

    Returns 1 if it slept, 0 if work was already visible. Turns BUSY again
    (and bumps ``epoch``) before returning, either way.
    """
    w = _seg(c)
    A.store(w, _wk(w, me, L.WK_STATE), L.WS_IDLE, "seq_cst")
    A.store(w, _wk(w, me, L.WK_CURRENT), -1, "relaxed")
    bit = 1 << (me & 63)
    A.fetch_or(w, _SLEEPERS + (me >> 6), bit, "seq_cst")
    A.fence("seq_cst")          # pairs with _wake's fence: it sees our bit, or we see its work
    seen = A.load(w, _WAKE, "seq_cst")
    slept = 0
    if not _any_work(w) and A.load(w, L.PO_SHUTDOWN >> 3, "seq_cst") == L.POOL_RUN:
        futex_wait(w, _WAKE, seen, timeout_ns)
        slept = 1
    A.fetch_and(w, _SLEEPERS + (me >> 6), ~bit, "seq_cst")
    A.store(w, _wk(w, me, L.WK_STATE), L.WS_BUSY, "seq_cst")
    A.fetch_add(w, _EPOCH, 1, "seq_cst")
    return slept


@jit("int64(int64, int64)")
def spin(c, ns):
    """Look for work for up to ``ns`` nanoseconds, yielding the CPU between looks: 1 if some appeared.

    A worker that ran out of work calls this before it sends its results
    and parks: a parent submitting task after task then finds it awake (no
    wake-up system call) and its results go back in batches.
    """
    w = _seg(c)
    t_end = monotonic_ns() + ns
    while True:
        if _any_work(w):
            return 1
        if monotonic_ns() >= t_end:
            return 0
        sched_yield()


@jit("int64(int64, int64)")
def push(c, task):
    """The parent (the injector's owner): push one run of tasks. 1, or 0 when the injector is full."""
    w = _seg(c)
    d = _dq(w, -1)
    before = DQ.length(w, d)
    if DQ.push(w, d, w[_P + L.PP_ICAP], task) != DQ.OK:
        return 0
    A.fetch_add(w, _PUSHED, task & COUNT_MASK, "relaxed")
    # Wake a sleeper only while fewer runs wait than workers sleep: runs that
    # pile up behind a wake-up already sent need no system call of their own
    # (the woken worker steals half of what is there, and wakes the next).
    A.fence("seq_cst")
    if before < _sleepers(w):
        _wake(w, 1)
    return 1


@jit("int64(int64)")
def quiet(c):
    """1 if, during this call, no live worker held or could take a task and every deque was empty."""
    w = _seg(c)
    e1 = A.load(w, _EPOCH, "seq_cst")
    nw = w[_P + L.PP_WORKERS]
    for i in range(nw):
        if A.load(w, _wk(w, i, L.WK_STATE), "seq_cst") == L.WS_BUSY:
            return 0
    if DQ.length(w, _dq(w, -1)) > 0:
        return 0
    for i in range(nw):
        if DQ.length(w, _dq(w, i)) > 0:
            return 0
    A.fence("seq_cst")
    return 1 if A.load(w, _EPOCH, "seq_cst") == e1 else 0


@jit("int64(int64)")
def wake_all(c):
    """Wake every parked worker (shutdown)."""
    w = _seg(c)
    A.fetch_add(w, _WAKE, 1, "seq_cst")
    return futex_wake(w, _WAKE, 1 << 30)


@jit("int64(int64, int64)")
def lengths(c, i):
    """Tasks in deque ``i`` (-1: the injector) now: a racy figure for stats."""
    w = _seg(c)
    return DQ.length(w, _dq(w, i))
