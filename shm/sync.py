"""Synchronisation primitives in shared memory, robust to processes that die.

>>> import shm
>>> n = shm.AtomicInt(0)
>>> n.fetch_add(5)
0
>>> lock = shm.Lock()
>>> with lock:
...     pass
>>> n.close(); lock.close()

What they are: crossbeam-utils' ``AtomicCell`` and ``WaitGroup``,
tokio's ``Notify``, and ``threading``'s ``Lock``, ``RLock``,
``Semaphore``, ``BoundedSemaphore``, ``Event``, ``Condition`` and
``Barrier``, plus a readers-writer lock, each in its own shared-memory
segment, usable from any process of this user: pickle one into a
``Process``/``Pool`` (fork or spawn), or ``shm.Lock.open(name)``.

Design notes
------------
*One segment per primitive* (``kernels/layout.py``: ``SYNC``), with the
participant table every shm structure has (``shm/_registry.py``), so that a
waiter can tell a live holder from a dead one, and the last process to
leave unlinks the segment. The word protocols are in ``kernels/sync.py``.

*Waiting* spins briefly (in the kernel for locks, a few retries for the
rest), then parks on the segment's futex word (``seq``) after setting this
participant's bit in the waiter bitmap and re-checking (the lost-wake-up
guard); a parked process uses no CPU. It wakes at least every
``PEER_CHECK`` (0.5 s) to reap dead participants, so a SIGKILLed peer is
noticed within about a second.

*When a process dies* (SIGKILL, os._exit, a crash) its reaper, the first
survivor that checks, gives back what the dead one held:

==================  =====================================================
Lock, RLock         released, marked *orphaned*: the next ``acquire()``
                    gets it and ``recovered`` is True (pthread's
                    EOWNERDEAD: what it protected may be half-updated)
RWLock              a dead writer's lock as Lock's; a dead reader's read
                    locks are dropped
Semaphore           permits are *not* given back by default (a semaphore
                    is a counter: the releaser is often another process);
                    ``return_on_death=True`` gives back the permits the
                    dead process acquired and did not release.
                    BoundedSemaphore defaults to ``return_on_death=True``
Barrier             broken, as by ``abort()``, once a survivor notices
                    (a waiting party checks every PEER_CHECK): every
                    waiter, until ``reset()``, gets ``shm.BrokenBarrier``
WaitGroup           units the dead process ``add``-ed and did not mark
                    ``done`` are counted done
Notify              its pending ``notified()`` calls are withdrawn
Condition           a dead waiter may consume one ``notify()``
==================  =====================================================

A process that *closes* its handle (or exits normally) while holding a
Lock, RLock or write lock leaves it orphaned too; its semaphore permits
(with ``return_on_death``) and WaitGroup units are handed back the same
way. Rejected: giving back a Semaphore's permits always (a consumer that
acquired a permit released by a producer would give it back on death,
creating an item that does not exist), and breaking a Barrier only when a
process dies *inside* ``wait()`` (one that dies before arriving wedges the
others just the same).
"""
from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
import weakref

from kernels import layout as L
from kernels import sync as K
from kernels import words as W

from . import _async, _chan
from . import _liveness
from ._registry import PEER_CHECK, Registry
from ._wait import deadline_of
from .errors import BrokenBarrier, Closed, CorruptSegment, SegmentNotFound, ShmError, WrongKind
from .segment import Segment, check_name, unlink_name

__all__ = ["AtomicInt", "AtomicFloat", "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Event",
           "Condition", "Barrier", "WaitGroup", "Notify", "RWLock"]


def _entry(dispatcher):
    """The compiled entry point of a kernel whose arguments are int64/float64 scalars (no typing: ~85 ns)."""
    sig = dispatcher.signatures[0]
    if not all(str(t) in ("int64", "float64") for t in sig):
        raise TypeError(f"{dispatcher.__name__}: fast entry needs scalar arguments, got {sig}")
    return dispatcher.overloads[sig].entry_point


_FADD = _entry(K.fetch_add_at)
_LOAD = _entry(K.load_at)
_STORE = _entry(K.store_at)
_SWAP = _entry(K.swap_at)
_CAS = _entry(K.cas_at)
_RMW = _entry(K.rmw_at)
_FLOAD = _entry(K.f_load_at)
_FSTORE = _entry(K.f_store_at)
_FRMW = _entry(K.f_rmw_at)
_FCAS = _entry(K.f_cas_at)
_LOCK_TRY = _entry(K.lock_try_at)
_LOCK_RELEASE = _entry(K.lock_release_at)
_ORPHAN = _entry(K.orphan_at)
_NOTIFY = _entry(K.notify_at)
_PARK = _entry(K.park_at)
_SEM_TRY = _entry(K.sem_try_at)
_SEM_RELEASE = _entry(K.sem_release_at)
_RW_READ_TRY = _entry(K.rw_read_try_at)
_RW_READ_RELEASE = _entry(K.rw_read_release_at)
_RW_WRITE_TRY = _entry(K.rw_write_try_at)

VALUE, SEQ, AUX, FLAG = K.VALUE, K.SEQ, K.AUX, K.FLAG
ALL = 1 << 30               # "wake everyone"
LOCK_SPIN = 10              # kernel backoff steps before a lock waiter parks (~3 us of pauses, then yields)
RETRIES = 8                 # immediate retries of other waits before parking
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_MASK32 = (1 << 32) - 1


def _i64(v) -> int:
    v = int(v.__index__() if not isinstance(v, int) else v)
    if not _I64_MIN <= v <= _I64_MAX:
        raise OverflowError(f"{v} does not fit a signed 64-bit word")
    return v


class _Sync:
    """One primitive's segment: creation, attachment, liveness, waiting, lifetime."""

    _TYPE = 0
    # Defaults, so close() works after a partial setup.
    _seg = None
    _c = 0
    _me = -1
    _closed = True
    _name = ""

    # ------------------------------------------------------------------
    _HOLD_STRIDE = L.WORD

    def _create(self, name, arg=0, arg2=0, flags=0, value=0):
        lay = L.sync_layout(self._HOLD_STRIDE)
        params = [0] * 8
        params[L.PY_TYPE] = self._TYPE
        params[L.PY_ARG] = arg
        params[L.PY_ARG2] = arg2
        params[L.PY_FLAGS] = flags
        params[L.PY_PARTICIPANTS] = lay["participants"]
        params[L.PY_TOKENS] = lay["tokens"]
        params[L.PY_HOLDS] = lay["holds"]
        params[L.PY_HOLD_STRIDE] = lay["hold_stride"]

        def init(seg):
            W.store(seg.w, L.SY_VALUE >> 3, value)

        seg = Segment.create(L.KIND_SYNC, lay["size"], name=check_name(name) if name is not None else None,
                             params=params, init=init)
        try:
            self._setup(seg)
        except BaseException:
            seg.close()
            unlink_name(seg.name)
            raise

    @classmethod
    def open(cls, name: str):
        """Attach to the primitive ``name`` (made by any process of this user)."""
        self = cls.__new__(cls)
        seg = Segment.attach(check_name(name), kind=L.KIND_SYNC, what=cls.__name__)
        try:
            t = seg.params[L.PY_TYPE]
            if t != cls._TYPE:
                raise WrongKind(f"{name!r} is a shm.{_TYPE_NAMES.get(t, f'sync-{t}')}, not a shm.{cls.__name__}: "
                                "open it with the matching class")
            self._setup(seg)
        except BaseException:
            seg.close()
            raise
        return self

    def _setup(self, seg: Segment) -> None:
        p = seg.params
        if p[L.PY_HOLD_STRIDE] != self._HOLD_STRIDE:
            raise CorruptSegment(f"{seg.name!r}: holds stride {p[L.PY_HOLD_STRIDE]}, a "
                                 f"{type(self).__name__} has {self._HOLD_STRIDE}")
        lay = L.sync_layout(self._HOLD_STRIDE)
        if (p[L.PY_PARTICIPANTS], p[L.PY_TOKENS], p[L.PY_HOLDS]) != (
                lay["participants"], lay["tokens"], lay["holds"]) or lay["size"] > seg.size:
            raise CorruptSegment(f"{seg.name!r}: inconsistent sync layout parameters")
        self._seg = seg
        self._name = seg.name
        self._holds0 = (lay["holds"] - L.SY_BASE) >> 3      # word index of holds[0], relative to SYNC
        self._hstride = self._HOLD_STRIDE >> 3               # words between two participants' holds
        self._registry = Registry(seg, lay["participants"], lay["tokens"], (L.SY_ROLES, L.SY_ROLES2),
                                  (L.SY_TOKENS, L.SY_TOKENS2), (L.SY_WAITERS, L.SY_WAITERS2))
        self._tlock = threading.Lock()
        self._nwait = 0
        self._closed = False
        self._local_setup()
        self._register()
        _OPEN[id(self)] = self

    def _local_setup(self) -> None:
        """Per-handle state of a subclass (reset again in a forked child)."""

    def _register(self) -> None:
        reg = self._registry
        me = reg.register(on_reap=self._reap)
        if self._seg.state & L.SEG_STATE_MASK not in (L.SEG_OPEN, L.SEG_CLOSING):
            reg.unregister(me)
            raise SegmentNotFound(f"{type(self).__name__} {self._name!r} was closed by its last user "
                                  "and is being removed")
        W.store(self._seg.w, (L.SY_BASE >> 3) + self._hw(me), 0)
        reg.set_role(me, L.ROLE_TX)
        self._me = me
        self._hold = self._hw(me)
        self._c = self._seg.addr + L.SY_BASE

    def _after_fork_child(self) -> None:
        self._tlock = threading.Lock()
        self._nwait = 0
        self._me = -1
        self._c = 0
        self._local_setup()
        if not self._closed:
            try:
                self._register()
            except ShmError:
                self._closed = True

    def _cw(self) -> int:
        """The SYNC block's address; raises Closed on a closed handle."""
        c = self._c
        if not c:
            raise Closed(f"{type(self).__name__} {self._name!r} was closed")
        return c

    # ------------------------------------------------------------------
    # Death and departure.

    def _recover(self, idx: int, died: bool) -> None:
        """Give back what participant ``idx`` holds (it died, or it is us, leaving)."""

    def _hw(self, idx: int) -> int:
        """Word index (relative to SYNC) of participant ``idx``'s holds word."""
        return self._holds0 + idx * self._hstride

    def _reap(self, idx: int) -> None:
        try:
            self._recover(idx, True)
        finally:
            W.store(self._seg.w, (L.SY_BASE >> 3) + self._hw(idx), 0)

    def _tick(self) -> None:
        """While blocked: reap dead participants (which gives back what they held)."""
        n = self._registry.sweep(on_reap=self._reap, skip=self._me)
        if n:
            W.fetch_add(self._seg.w, L.SY_REAPED >> 3, n)

    def _holds_of(self, idx: int) -> int:
        return W.load(self._seg.w, (L.SY_BASE >> 3) + self._hw(idx))

    # ------------------------------------------------------------------
    # Waiting: spin, then park on seq (kernels/sync.py: "seq").

    def _enter_wait(self) -> None:
        with self._tlock:
            self._nwait += 1
            if self._nwait == 1:
                W.bit_set(self._seg.w, L.SY_WAITERS >> 3, self._me)

    def _leave_wait(self) -> None:
        with self._tlock:
            self._nwait -= 1
            if self._nwait == 0 and self._me >= 0 and not self._closed:
                W.bit_clear(self._seg.w, L.SY_WAITERS >> 3, self._me)

    def _block(self, attempt, deadline, retries=RETRIES):
        """Call ``attempt()`` until it returns something other than None, or ``deadline`` passes (None)."""
        r = attempt()
        if r is not None:
            return r
        for _ in range(retries):
            r = attempt()
            if r is not None:
                return r
        c = self._cw()
        self._enter_wait()
        try:
            next_tick = time.monotonic() + PEER_CHECK
            while True:
                if self._closed:
                    raise Closed(f"{type(self).__name__} {self._name!r} was closed while waiting")
                seen = _LOAD(c, SEQ)            # after our bit is set: see the module notes
                r = attempt()                   # the lost-wake-up guard
                if r is not None:
                    return r
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return None
                if now >= next_tick:
                    self._tick()
                    next_tick = time.monotonic() + PEER_CHECK
                    continue
                wait = next_tick - now
                if deadline is not None:
                    wait = min(wait, deadline - now)
                _PARK(c, seen, int(wait * 1e9) + 1)
        finally:
            self._leave_wait()

    def _drive(self, gen):
        """Run a blocking operation written as a generator: each ``yield (attempt, deadline, retries)`` waits here."""
        try:
            req = next(gen)
            while True:
                req = gen.send(self._block(*req))
        except StopIteration as e:
            return e.value

    async def _drive_async(self, gen):
        """The same operation for asyncio: each wait is awaited (``shm/_async.py``), never blocking the loop.

        Cancelled while waiting, the generator is closed at its ``yield``: its
        ``finally``/``except GeneratorExit`` give back what the wait held.
        """
        try:
            req = next(gen)
            while True:
                attempt, deadline, _ = req
                try:
                    r = await _async.wait_ready([(self, 0)], attempt, deadline)
                except BaseException:
                    gen.close()
                    raise
                req = gen.send(r)
        except StopIteration as e:
            return e.value

    # The waiting interface shm/_async.py parks through (as a channel's).
    def seq_offset(self, side: int) -> int:
        return L.SY_SEQ

    def _begin_wait(self, side: int) -> None:
        self._enter_wait()

    def _end_wait(self, side: int) -> None:
        self._leave_wait()

    @property
    def ctrl(self):
        return self._seg

    def check_peers(self) -> None:
        if not self._closed:
            self._tick()

    @staticmethod
    def _deadline(blocking, timeout):
        if not blocking:
            if timeout is not None and timeout != -1:
                raise ValueError("can't specify a timeout for a non-blocking call")
            return 0.0
        if timeout is None or timeout == -1:
            return None
        return deadline_of(timeout)

    # ------------------------------------------------------------------
    # Lifetime.

    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._closed

    def _reduce_args(self) -> tuple:
        return ()

    def __reduce__(self):
        self._cw()
        token = self._registry.lend(L.ROLE_TX, L.TOKEN_PICKLE)
        return _rebuild, (type(self), self._name, token, self._reduce_args())

    def _restore(self, args) -> None:
        pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        """Detach this handle (idempotent); what it holds is given back (see the module notes).

        The last process to leave unlinks the primitive.
        """
        if self._closed:
            return
        self._closed = True
        _OPEN.pop(id(self), None)
        reg = getattr(self, "_registry", None)
        last = False
        if reg is not None and self._me >= 0 and reg.mine(self._me):
            try:
                reg.sweep(on_reap=self._reap, skip=self._me)
            except ShmError:
                pass
            try:
                self._recover(self._me, False)
            finally:
                W.store(self._seg.w, (L.SY_BASE >> 3) + self._hw(self._me), 0)
                W.bit_clear(self._seg.w, L.SY_WAITERS >> 3, self._me)
                reg.clear_role(self._me, L.ROLE_TX)
                reg.unregister(self._me)
                last = reg.claim_last_out()
        self._me = -1
        self._c = 0
        if last:
            unlink_name(self._name)
        if self._seg is not None:
            if self._nwait:
                # Another thread is parked on this mapping: unmapping it would crash that
                # thread. Keep the mapping (not the name) until exit; it sees Closed on waking.
                _KEPT.append(self._seg)
            else:
                self._seg.close()

    def unlink(self) -> None:
        """Remove the name now (processes that have it mapped keep using it)."""
        seg = self._seg
        if seg is not None and not seg.closed:
            seg.set_state(seg.state, L.SEG_UNLINKED)
        unlink_name(self._name)

    def stats(self) -> dict:
        """Participants, reaped dead ones, and recoveries (orphaned locks, permits given back)."""
        c = self._cw()
        return {"name": self._name, "type": type(self).__name__,
                "participants": len(self._registry.live_entries()),
                "waiting": self._registry.waiting_count(0),
                "reaped": W.load(self._seg.w, L.SY_REAPED >> 3),
                "recovered": _LOAD(c, K.RECOVERED)}

    def _describe(self) -> str:
        return ""

    def __repr__(self):
        if self._closed:
            return f"<shm.{type(self).__name__} {self._name!r} closed>"
        d = self._describe()
        return f"<shm.{type(self).__name__} {self._name!r}{' ' + d if d else ''}>"


def _rebuild(cls, name, token, args):
    self = cls.open(name)
    if token is not None:
        self._registry.retire(*token)
    self._restore(args)
    return self


# --------------------------------------------------------------------------
# Atomics.

class AtomicInt(_Sync):
    """A shared int64 (crossbeam's ``AtomicCell<i64>``): every operation is one sequentially consistent atomic.

    ``AtomicInt(value=0, *, name=None)``; ``AtomicInt.open(name)``. Arithmetic
    wraps at 64 bits, as the machine's does; values outside int64 raise
    ``OverflowError``. Also a context manager that closes the handle.
    """

    _TYPE = L.SYNC_ATOMIC_INT

    def __init__(self, value: int = 0, *, name: str | None = None):
        self._create(name, value=_i64(value))

    def load(self) -> int:
        return _LOAD(self._cw(), VALUE)

    def store(self, v) -> None:
        _STORE(self._cw(), VALUE, _i64(v))

    @property
    def value(self) -> int:
        return _LOAD(self._cw(), VALUE)

    @value.setter
    def value(self, v) -> None:
        _STORE(self._cw(), VALUE, _i64(v))

    def swap(self, v) -> int:
        """Store ``v``; return the previous value."""
        return _SWAP(self._cw(), VALUE, _i64(v))

    def compare_exchange(self, current, new) -> int:
        """Store ``new`` if the value is ``current``; return the value seen (== current on success)."""
        return _CAS(self._cw(), VALUE, _i64(current), _i64(new))

    def compare_and_set(self, current, new) -> bool:
        """Store ``new`` if the value is ``current``; whether it did."""
        current = _i64(current)
        return _CAS(self._cw(), VALUE, current, _i64(new)) == current

    def fetch_add(self, v=1) -> int:
        """Add ``v`` (wrapping); return the previous value."""
        c = self._c
        if c and type(v) is int:
            return _FADD(c, v)
        return _FADD(self._cw(), _i64(v))

    def fetch_sub(self, v=1) -> int:
        return _FADD(self._cw(), -_i64(v) if v != _I64_MIN else v)

    def fetch_and(self, v) -> int:
        return _RMW(self._cw(), VALUE, K.OP_AND, _i64(v))

    def fetch_or(self, v) -> int:
        return _RMW(self._cw(), VALUE, K.OP_OR, _i64(v))

    def fetch_xor(self, v) -> int:
        return _RMW(self._cw(), VALUE, K.OP_XOR, _i64(v))

    def fetch_max(self, v) -> int:
        return _RMW(self._cw(), VALUE, K.OP_MAX, _i64(v))

    def fetch_min(self, v) -> int:
        return _RMW(self._cw(), VALUE, K.OP_MIN, _i64(v))

    def __int__(self):
        return self.load()

    def __enter__(self):
        self._cw()
        return self

    def __exit__(self, *exc):
        self.close()

    def _describe(self):
        return f"value={self.load()}"


class AtomicFloat(_Sync):
    """A shared float64 (``AtomicCell<f64>``); ``fetch_add`` and friends are CAS loops.

    ``compare_and_set``/``compare_exchange`` compare the stored *bits*, as
    AtomicCell does: ``0.0`` does not match ``-0.0``, and a NaN matches the
    same NaN.
    """

    _TYPE = L.SYNC_ATOMIC_FLOAT

    def __init__(self, value: float = 0.0, *, name: str | None = None):
        self._create(name, value=struct.unpack("<q", struct.pack("<d", float(value)))[0])

    def load(self) -> float:
        return _FLOAD(self._cw(), VALUE)

    def store(self, v) -> None:
        _FSTORE(self._cw(), VALUE, float(v))

    @property
    def value(self) -> float:
        return _FLOAD(self._cw(), VALUE)

    @value.setter
    def value(self, v) -> None:
        _FSTORE(self._cw(), VALUE, float(v))

    def swap(self, v) -> float:
        return _FRMW(self._cw(), VALUE, K.OP_SWAP, float(v))

    def compare_and_set(self, current, new) -> bool:
        return _FCAS(self._cw(), VALUE, float(current), float(new)) == 1

    def compare_exchange(self, current, new) -> float:
        """Store ``new`` if the value's bits are ``current``'s; return the value seen."""
        c = self._cw()
        current, new = float(current), float(new)
        while True:
            seen = _FLOAD(c, VALUE)
            if _FCAS(c, VALUE, current, new) == 1:
                return current
            if _FLOAD(c, VALUE) == seen:
                return seen

    def fetch_add(self, v=1.0) -> float:
        return _FRMW(self._cw(), VALUE, K.OP_ADD, float(v))

    def fetch_sub(self, v=1.0) -> float:
        return _FRMW(self._cw(), VALUE, K.OP_ADD, -float(v))

    def fetch_max(self, v) -> float:
        return _FRMW(self._cw(), VALUE, K.OP_MAX, float(v))

    def fetch_min(self, v) -> float:
        return _FRMW(self._cw(), VALUE, K.OP_MIN, float(v))

    def __float__(self):
        return self.load()

    def __enter__(self):
        self._cw()
        return self

    def __exit__(self, *exc):
        self.close()

    def _describe(self):
        return f"value={self.load()!r}"


# --------------------------------------------------------------------------
# Locks.

class Lock(_Sync):
    """A robust process-shared lock: ``multiprocessing.Lock``'s API, and a dead holder releases it.

    ``acquire(blocking=True, timeout=None)`` returns True once held (False
    on timeout or when not blocking). If the previous holder died holding
    it (or closed its handle while holding it), the lock is handed to the
    next acquirer anyway and ``recovered`` is True until the next acquire:
    like pthread's ``EOWNERDEAD``, it says the data the lock protects may be
    half-updated. The holder is this *process* (participant): any thread of
    it, or another process, may ``release()`` it, as with multiprocessing's.

    **Locking behaviour:** not reentrant: acquiring twice from one process
    blocks (until the timeout), as ``threading.Lock`` does; use ``RLock``.
    """

    _TYPE = L.SYNC_LOCK
    _recovered = False

    def __init__(self, *, name: str | None = None):
        self._create(name)

    def _try(self, spins):
        r = _LOCK_TRY(self._cw(), VALUE, self._me, spins)
        if r == 0:
            return None
        self._recovered = r == 2
        return True

    def acquire(self, blocking: bool = True, timeout=None) -> bool:
        c = self._c
        if c and (timeout is None or timeout == -1):        # the fast path: one kernel call
            r = _LOCK_TRY(c, VALUE, self._me, LOCK_SPIN if blocking else 0)
            if r:
                self._recovered = r == 2
                return True
            if not blocking:
                return False
        return self._acquire_slow(blocking, timeout)

    def _acquire_slow(self, blocking, timeout) -> bool:
        return self._drive(self._acquire_g(blocking, timeout))

    async def acquire_async(self, timeout=None) -> bool:
        """``acquire()`` for asyncio: awaits the lock without blocking the event loop."""
        return await self._drive_async(self._acquire_g(True, timeout))

    def _acquire_g(self, blocking, timeout):
        deadline = self._deadline(blocking, timeout)
        if self._try(LOCK_SPIN if blocking else 0):
            return True
        if deadline == 0.0:
            return False
        got = None
        try:
            got = (yield (lambda: self._try(0), deadline, 0))
        finally:
            if got is None and self._c:
                _NOTIFY(self._c, 1)        # a wake-up meant for us goes to the next waiter
        return bool(got)

    def release(self) -> None:
        c = self._c or self._cw()
        if _LOCK_RELEASE(c, VALUE, 1) == 0:
            raise RuntimeError("release unlocked lock")

    def locked(self) -> bool:
        own = _LOAD(self._cw(), VALUE) & K.OWNER_MASK
        return own != 0 and own != K.ORPHAN

    @property
    def recovered(self) -> bool:
        """Whether the last ``acquire`` through this handle took the lock from a holder that had died."""
        return self._recovered

    def owner_pid(self) -> int | None:
        """The pid of the process holding the lock (None if free). Racy: for diagnostics."""
        own = _LOAD(self._cw(), VALUE) & K.OWNER_MASK
        if own == 0 or own == K.ORPHAN:
            return None
        return self._registry.entry(own - 1)[1]

    def _tick(self) -> None:
        super()._tick()
        own = _LOAD(self._cw(), VALUE) & K.OWNER_MASK
        if own not in (0, K.ORPHAN) and own - 1 != self._me:
            st = self._registry.state(own - 1)
            if st & L.PS_CODE_MASK == L.PS_FREE:        # its holder left without a close (cannot recover more)
                _ORPHAN(self._c, VALUE, own - 1)

    def _recover(self, idx: int, died: bool) -> None:
        if self._c:
            _ORPHAN(self._c, VALUE, idx)

    # threading.Condition's protocol.
    def _is_owned(self) -> bool:
        return (_LOAD(self._cw(), VALUE) & K.OWNER_MASK) == self._me + 1

    def _release_save(self):
        self.release()

    def _acquire_restore(self, saved) -> None:
        self.acquire()

    async def _acquire_restore_async(self, saved) -> None:
        await self.acquire_async()

    def __enter__(self):
        c = self._c
        if c:                           # acquire()'s fast path, one call less
            r = _LOCK_TRY(c, VALUE, self._me, LOCK_SPIN)
            if r:
                self._recovered = r == 2
                return self
        self._acquire_slow(True, None)
        return self

    def __exit__(self, *exc):
        if _LOCK_RELEASE(self._c or self._cw(), VALUE, 1) == 0:
            raise RuntimeError("release unlocked lock")

    def _describe(self):
        pid = self.owner_pid()
        return f"locked by pid {pid}" if pid is not None else "unlocked"


def _holder():
    """Who holds an RLock: the running asyncio task, if any (an event loop's tasks share a thread), else the thread."""
    if asyncio._get_running_loop() is not None:
        t = asyncio.current_task()
        if t is not None:
            return t
    return threading.get_ident()


class RLock(Lock):
    """A reentrant robust lock: ``multiprocessing.RLock``'s API, owned by one thread (or asyncio task) of one process.

    Recursion is counted per handle and thread (per task under asyncio); a
    dead owner releases it whatever its depth (``recovered`` as for ``Lock``).
    """

    _TYPE = L.SYNC_RLOCK

    def _local_setup(self) -> None:
        self._owner = None
        self._count = 0

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    async def acquire_async(self, timeout=None) -> bool:
        """``acquire`` for asyncio; the owner is the awaiting task (tasks share a thread)."""
        me = _holder()
        if self._owner == me:
            self._count += 1
            return True
        if not await Lock.acquire_async(self, timeout):
            return False
        self._owner, self._count = me, 1
        return True

    async def _acquire_restore_async(self, count) -> None:
        await Lock.acquire_async(self)
        self._owner, self._count = _holder(), count

    def acquire(self, blocking: bool = True, timeout=None) -> bool:
        me = _holder()
        if self._owner == me:
            self._count += 1
            return True
        if not super().acquire(blocking, timeout):
            return False
        self._owner, self._count = me, 1
        return True

    def release(self) -> None:
        if self._owner != _holder():
            raise RuntimeError("cannot release un-acquired lock")
        self._count -= 1
        if self._count == 0:
            self._owner = None
            super().release()

    def _is_owned(self) -> bool:
        return self._owner == _holder()

    def _release_save(self):
        if not self._is_owned():
            raise RuntimeError("cannot release un-acquired lock")
        count, self._count, self._owner = self._count, 0, None
        Lock.release(self)
        return count

    def _acquire_restore(self, count) -> None:
        Lock.acquire(self)
        self._owner, self._count = _holder(), count

    def _describe(self):
        pid = self.owner_pid()
        return f"locked by pid {pid}" if pid is not None else "unlocked"


class RWLock(_Sync):
    """Many readers or one writer, across processes (crossbeam's ShardedLock).

    ``acquire_read``/``release_read``, ``acquire_write``/``release_write``
    (``blocking``, ``timeout`` as ``Lock.acquire``), or ``with rw.read():``
    and ``with rw.write():``. A dead writer's lock is recovered as
    ``Lock``'s (``recovered``, for the next writer or reader); a dead
    reader's read locks are dropped.

    Sharded for reads: each process counts its read locks in its own cache
    line, so readers in different processes never write a shared line; a
    read costs one atomic on the reader's own line plus a load of the
    writer word. A writer takes the writer word (new readers then wait),
    then waits for every reader's count to drain: a waiting writer is not
    starved by a stream of readers. Read locks are per process (any thread
    of it may release one); a thread holding a read lock that asks for the
    write lock waits for itself (until its timeout), as with any RW lock.
    """

    _TYPE = L.SYNC_RWLOCK
    _HOLD_STRIDE = L.CACHE_LINE
    _recovered = False

    def __init__(self, *, name: str | None = None):
        self._create(name)

    def acquire_read(self, blocking: bool = True, timeout=None) -> bool:
        return self._drive(self._acquire_read_g(blocking, timeout))

    async def acquire_read_async(self, timeout=None) -> bool:
        """``acquire_read(timeout=...)`` for asyncio: awaits without blocking the event loop."""
        return await self._drive_async(self._acquire_read_g(True, timeout))

    def _acquire_read_g(self, blocking: bool = True, timeout=None):
        c = self._c
        if c:
            r = _RW_READ_TRY(c, self._hold)
            if r:
                self._recovered = r == 2
                return True
        deadline = self._deadline(blocking, timeout)
        if deadline == 0.0:
            return False

        def attempt():
            r = _RW_READ_TRY(self._cw(), self._hold)
            if r == 0:
                return None
            self._recovered = r == 2
            return True
        return bool((yield (attempt, deadline, RETRIES)))

    def release_read(self) -> None:
        if _RW_READ_RELEASE(self._c or self._cw(), self._hold, 1) < 0:
            raise RuntimeError("release_read without a read lock held by this process")

    def acquire_write(self, blocking: bool = True, timeout=None) -> bool:
        return self._drive(self._acquire_write_g(blocking, timeout))

    async def acquire_write_async(self, timeout=None) -> bool:
        """``acquire_write(timeout=...)`` for asyncio: awaits without blocking the event loop."""
        return await self._drive_async(self._acquire_write_g(True, timeout))

    def _acquire_write_g(self, blocking: bool = True, timeout=None):
        c = self._cw()
        deadline = self._deadline(blocking, timeout)
        state = {"pending": 0, "recovered": False}

        def attempt():
            r = _RW_WRITE_TRY(self._cw(), self._me, self._holds0, self._hstride, state["pending"])
            if r == 0:
                return None
            if state["pending"] == 0:
                state["recovered"] = r == 2
                state["pending"] = 1
            if r == 3:
                return None             # ours; readers still draining
            self._recovered = state["recovered"]
            return True
        got = None
        try:
            got = attempt() if deadline == 0.0 else (yield (attempt, deadline, RETRIES))
        finally:
            if got is None and state["pending"] and self._c:
                _LOCK_RELEASE(self._c, VALUE, ALL)       # give up the draining write lock: readers go on
            elif got is None and self._c and deadline != 0.0:
                _NOTIFY(c, ALL)
        return bool(got)

    def release_write(self) -> None:
        if _LOCK_RELEASE(self._c or self._cw(), VALUE, ALL) == 0:
            raise RuntimeError("release_write of an unlocked RWLock")

    @property
    def recovered(self) -> bool:
        """Whether the last acquire through this handle took the lock from a writer that had died."""
        return self._recovered

    def read(self):
        return _Guard(self.acquire_read, self.release_read)

    def write(self):
        return _Guard(self.acquire_write, self.release_write)

    def _recover(self, idx: int, died: bool) -> None:
        if self._c:
            _ORPHAN(self._c, VALUE, idx)
            _RW_READ_RELEASE(self._c, self._hw(idx), 1 << 40)

    def readers(self) -> int:
        """Read locks held now, over every process (racy: for diagnostics)."""
        self._cw()
        return sum(max(0, self._holds_of(i)) for i in range(L.MAX_PARTICIPANTS))

    def _describe(self):
        own = _LOAD(self._cw(), VALUE) & K.OWNER_MASK
        w = "writer" if own not in (0, K.ORPHAN) else "no writer"
        return f"readers={self.readers()} {w}"


class _Guard:
    def __init__(self, acquire, release):
        self._a, self._r = acquire, release

    def __enter__(self):
        self._a()
        return self

    def __exit__(self, *exc):
        self._r()


# --------------------------------------------------------------------------
# Semaphores.

class Semaphore(_Sync):
    """``multiprocessing.Semaphore`` in shared memory: ``acquire(blocking=True, timeout=None)``, ``release(n=1)``.

    ``return_on_death``: whether the permits a process acquired and had not
    released are given back when it dies (or closes its handle). Off by
    default: a semaphore is a counter, and the process that releases is
    often not the one that acquired.
    """

    _TYPE = L.SYNC_SEMAPHORE
    _BOUNDED = False

    def __init__(self, value: int = 1, *, name: str | None = None, return_on_death: bool | None = None):
        value = int(value)
        if value < 0 or value > _MASK32:
            raise ValueError("semaphore initial value must be >= 0 (and below 2**32)")
        if return_on_death is None:
            return_on_death = self._BOUNDED
        self._create(name, arg=value, arg2=value if self._BOUNDED else 0,
                     flags=L.SYNCF_RETURN_ON_DEATH if return_on_death else 0, value=value)

    def _local_setup(self):
        p = self._seg.params
        self._bound = p[L.PY_ARG2]
        self._track = bool(p[L.PY_FLAGS] & L.SYNCF_RETURN_ON_DEATH)

    def _try(self, spins):
        return True if _SEM_TRY(self._cw(), self._hold if self._track else -1, spins) else None

    def acquire(self, blocking: bool = True, timeout=None) -> bool:
        return self._drive(self._acquire_g(blocking, timeout))

    async def acquire_async(self, timeout=None) -> bool:
        """``acquire(timeout=...)`` for asyncio: awaits without blocking the event loop."""
        return await self._drive_async(self._acquire_g(True, timeout))

    def _acquire_g(self, blocking: bool = True, timeout=None):
        deadline = self._deadline(blocking, timeout)
        if self._try(LOCK_SPIN if blocking else 0):
            return True
        if deadline == 0.0:
            return False
        got = None
        try:
            got = (yield (lambda: self._try(0), deadline, 0))
        finally:
            if got is None and self._c and _LOAD(self._c, VALUE) > 0:
                _NOTIFY(self._c, 1)
        return bool(got)

    def release(self, n: int = 1) -> None:
        n = int(n)
        if n < 1:
            raise ValueError("n must be one or more")
        if _SEM_RELEASE(self._cw(), n, self._bound, self._hold if self._track else -1) < 0:
            raise ValueError("Semaphore released too many times")

    def get_value(self) -> int:
        return _LOAD(self._cw(), VALUE)

    @property
    def value(self) -> int:
        return self.get_value()

    def _recover(self, idx: int, died: bool) -> None:
        if self._c and self._track:
            h = self._holds_of(idx)
            if h > 0:
                _SEM_RELEASE(self._c, h, 0, -1)
                _RMW(self._c, K.RECOVERED, K.OP_ADD, h)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def _describe(self):
        return f"value={self.get_value()}" + (f"/{self._bound}" if self._bound else "")


class BoundedSemaphore(Semaphore):
    """A Semaphore whose ``release`` past its initial value raises ValueError; gives back a dead holder's permits."""

    _BOUNDED = True


# --------------------------------------------------------------------------
# Event, Condition, Barrier, WaitGroup, Notify.

class Event(_Sync):
    """``threading.Event`` across processes: ``set``, ``clear``, ``is_set``, ``wait(timeout=None) -> bool``."""

    _TYPE = L.SYNC_EVENT

    def __init__(self, *, name: str | None = None):
        self._create(name)

    def is_set(self) -> bool:
        return _LOAD(self._cw(), VALUE) != 0

    def set(self) -> None:
        c = self._cw()
        _STORE(c, VALUE, 1)
        _NOTIFY(c, ALL)

    def clear(self) -> None:
        _STORE(self._cw(), VALUE, 0)

    def wait(self, timeout=None) -> bool:
        return self._drive(self._wait_g(timeout))

    async def wait_async(self, timeout=None) -> bool:
        """``wait(timeout)`` for asyncio: awaits without blocking the event loop."""
        return await self._drive_async(self._wait_g(timeout))

    def _wait_g(self, timeout=None):
        c = self._cw()
        deadline = deadline_of(timeout)
        return bool((yield (lambda: True if _LOAD(c, VALUE) else None, deadline, RETRIES)))

    def _describe(self):
        return "set" if self.is_set() else "clear"


class Condition(_Sync):
    """``threading.Condition`` across processes, over a ``shm.Lock`` or ``shm.RLock`` (a new RLock by default).

    Waiters take tickets in order; ``notify(n)`` admits the next ``n``.
    A waiter that times out, or dies, keeps its ticket, so a ``notify()``
    racing with it may be spent on it: loop on your predicate
    (``wait_for``), as with any condition variable.
    """

    _TYPE = L.SYNC_CONDITION

    def __init__(self, lock=None, *, name: str | None = None):
        self._own_lock = lock is None
        if lock is None:
            lock = RLock()
        elif not isinstance(lock, Lock):
            raise TypeError("shm.Condition needs a shm.Lock or shm.RLock (threading locks are not shared)")
        self._lock = lock
        self._create(name)

    def close(self) -> None:
        """Detach this handle; a lock this handle made for itself is closed with it."""
        super().close()
        if getattr(self, "_own_lock", False) and self._lock is not None:
            self._lock.close()

    def _reduce_args(self):
        return (self._lock,)

    def _restore(self, args):
        (self._lock,) = args

    @classmethod
    def open(cls, name: str, lock=None):
        """Attach to the Condition ``name``; give it the same lock its creator used (``shm.Lock.open(...)``)."""
        self = super().open(name)
        self._lock = lock
        return self

    @property
    def lock(self):
        return self._lock

    def acquire(self, *args, **kw):
        return self._lock.acquire(*args, **kw)

    def release(self):
        return self._lock.release()

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def wait(self, timeout=None) -> bool:
        lock = self._lock
        if lock is None or not lock._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        c = self._cw()
        deadline = deadline_of(timeout)
        ticket = _RMW(c, VALUE, K.OP_ADD, 1)
        saved = lock._release_save()
        try:
            r = self._block(lambda: True if _LOAD(c, AUX) > ticket else None, deadline)
        finally:
            lock._acquire_restore(saved)
        return bool(r)

    async def wait_async(self, timeout=None) -> bool:
        """``wait`` for asyncio: the lock is re-acquired without blocking the loop, even when the
        wait is cancelled (as ``asyncio.Condition`` does)."""
        lock = self._lock
        if lock is None or not lock._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        c = self._cw()
        deadline = deadline_of(timeout)
        ticket = _RMW(c, VALUE, K.OP_ADD, 1)
        saved = lock._release_save()
        try:
            r = await self._drive_async(self._ticket_g(c, ticket, deadline))
        finally:
            cancelled = False
            while True:
                try:
                    await lock._acquire_restore_async(saved)
                    break
                except asyncio.CancelledError:
                    cancelled = True
            if cancelled:
                raise asyncio.CancelledError
        return bool(r)

    def _ticket_g(self, c, ticket, deadline):
        return (yield (lambda: True if _LOAD(c, AUX) > ticket else None, deadline, RETRIES))

    async def wait_for_async(self, predicate, timeout=None):
        """``wait_for`` for asyncio (the lock held)."""
        deadline = deadline_of(timeout)
        result = predicate()
        while not result:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            await self.wait_async(left)
            result = predicate()
        return result

    def wait_for(self, predicate, timeout=None):
        deadline = deadline_of(timeout)
        result = predicate()
        while not result:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.wait(left)
            else:
                self.wait()
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        if self._lock is not None and not self._lock._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        c = self._cw()
        while True:
            head = _LOAD(c, AUX)
            tail = _LOAD(c, VALUE)
            new = min(head + n, tail)
            if new <= head:
                return
            if _CAS(c, AUX, head, new) == head:
                break
        _NOTIFY(c, ALL)

    def notify_all(self) -> None:
        self.notify(1 << 40)

    def _describe(self):
        c = self._cw()
        return f"waiting={max(0, _LOAD(c, VALUE) - _LOAD(c, AUX))}"


class Barrier(_Sync):
    """``threading.Barrier`` across processes: ``Barrier(parties, action=None, timeout=None)``.

    ``wait(timeout=None)`` returns this party's arrival index (0 ..
    parties-1; the last arrival runs ``action``, which must be picklable to
    travel with the handle). A timeout breaks the barrier, as in threading.
    If any process that has the barrier open dies, the barrier breaks (as
    ``abort()``): waiters, now and until ``reset()``, raise
    ``shm.BrokenBarrier`` (a ``threading.BrokenBarrierError``) instead of
    waiting for a party that will never come.
    """

    _TYPE = L.SYNC_BARRIER

    def __init__(self, parties: int, action=None, timeout=None, *, name: str | None = None):
        parties = int(parties)
        if parties < 1 or parties > _MASK32:
            raise ValueError("parties must be at least 1")
        if timeout is not None:
            deadline_of(timeout)
        self._action, self._timeout = action, timeout
        self._create(name, arg=parties)

    def _local_setup(self):
        self._parties = self._seg.params[L.PY_ARG]
        if not hasattr(self, "_action"):
            self._action, self._timeout = None, None

    def _reduce_args(self):
        return (self._action, self._timeout)

    def _restore(self, args):
        self._action, self._timeout = args

    @property
    def parties(self) -> int:
        return self._parties

    @property
    def n_waiting(self) -> int:
        v = _LOAD(self._cw(), VALUE)
        return 0 if self.broken else min(v & _MASK32, self._parties)

    @property
    def broken(self) -> bool:
        return _LOAD(self._cw(), FLAG) != 0

    def wait(self, timeout=None) -> int:
        return self._drive(self._wait_g(timeout))

    async def wait_async(self, timeout=None) -> int:
        """``wait(timeout)`` for asyncio: awaits without blocking the event loop."""
        return await self._drive_async(self._wait_g(timeout))

    def _wait_g(self, timeout=None):
        c = self._cw()
        if timeout is None:
            timeout = self._timeout
        deadline = deadline_of(timeout)
        if _LOAD(c, FLAG):
            raise BrokenBarrier(f"barrier {self._name!r} is broken")
        old = _RMW(c, VALUE, K.OP_ADD, 1)
        gen, index = old >> 32, old & _MASK32
        if index >= self._parties:
            self.abort()
            raise BrokenBarrier(f"barrier {self._name!r}: more than {self._parties} parties arrived")
        if index == self._parties - 1:
            if self._action is not None:
                try:
                    self._action()
                except BaseException:
                    self.abort()
                    raise
            _STORE(c, VALUE, (gen + 1) << 32)
            _NOTIFY(c, ALL)
            return index

        def attempt():
            if _LOAD(c, VALUE) >> 32 != gen:
                return True
            if _LOAD(c, FLAG):
                return False
            return None
        try:
            r = (yield (attempt, deadline, RETRIES))
        except GeneratorExit:           # wait_async cancelled: leaving breaks it, as a timeout does
            self.abort()
            raise
        if r is None:
            self.abort()
            raise BrokenBarrier(f"barrier {self._name!r}: timed out, so broken")
        if r is False:
            raise BrokenBarrier(f"barrier {self._name!r} is broken")
        if _LOAD(c, AUX) == gen + 1:
            raise BrokenBarrier(f"barrier {self._name!r} was reset while waiting")
        return index

    def abort(self) -> None:
        c = self._cw()
        _STORE(c, FLAG, 1)
        _NOTIFY(c, ALL)

    def reset(self) -> None:
        c = self._cw()
        gen = _LOAD(c, VALUE) >> 32
        _STORE(c, AUX, gen + 1)
        _STORE(c, VALUE, (gen + 1) << 32)
        _STORE(c, FLAG, 0)
        _NOTIFY(c, ALL)

    def _recover(self, idx: int, died: bool) -> None:
        if died and self._c:
            _STORE(self._c, FLAG, 1)
            _NOTIFY(self._c, ALL)

    def _describe(self):
        return f"parties={self._parties} waiting={self.n_waiting}{' broken' if self.broken else ''}"


class WaitGroup(_Sync):
    """Go's ``sync.WaitGroup`` / crossbeam's ``WaitGroup`` across processes: ``add(n=1)``, ``done()``, ``wait()``.

    ``wait(timeout=None) -> bool`` returns True once the count is zero.

    **When a worker dies**: a unit a process ``adopt()``-ed is *its* unit:
    if it dies (or closes its handle) before calling ``done()``, the unit
    is counted done, so ``wait`` never hangs on a dead worker. Units only
    ``add()``-ed are anyone's: a process that dies without finishing one
    leaves it pending (``wait(timeout)`` then returns False). The pattern::

        wg.add(len(procs))              # parent, before starting them
        # each worker, first thing:     wg.adopt()
        # each worker, when finished:   wg.done()
        wg.wait()                       # parent

    (A worker killed between its start and its ``adopt()`` leaves its unit
    pending: adopt first.) ``aux`` counts the units not adopted yet;
    ``holds[p]`` the units participant ``p`` adopted and has not finished.
    """

    _TYPE = L.SYNC_WAITGROUP

    def __init__(self, *, name: str | None = None):
        self._create(name)

    def add(self, n: int = 1) -> None:
        """Add ``n`` units of work (anyone's to ``adopt`` or finish)."""
        n = int(n)
        if n < 0:
            raise ValueError("add a positive number of units (done() removes them)")
        c = self._cw()
        _RMW(c, VALUE, K.OP_ADD, n)
        _RMW(c, AUX, K.OP_ADD, n)

    def adopt(self, n: int = 1) -> None:
        """Make ``n`` added units this process's: counted done if it dies or closes before ``done()``."""
        c = self._cw()
        for _ in range(int(n)):
            pool = _LOAD(c, AUX)
            while True:
                if pool <= 0:
                    raise ValueError("no unadopted unit left: add() them first")
                seen = _CAS(c, AUX, pool, pool - 1)
                if seen == pool:
                    break
                pool = seen
            # A process killed between the two leaves this unit pending (never counted done twice).
            _RMW(c, self._hold, K.OP_ADD, 1)

    def done(self) -> None:
        """Finish one unit: one this process adopted if it has one, else one not adopted yet."""
        c = self._cw()
        if _RMW(c, self._hold, K.OP_ADD, -1) <= 0:
            _RMW(c, self._hold, K.OP_ADD, 1)
            pool = _LOAD(c, AUX)
            while pool > 0:
                seen = _CAS(c, AUX, pool, pool - 1)
                if seen == pool:
                    break
                pool = seen
        old = _RMW(c, VALUE, K.OP_ADD, -1)
        if old <= 0:
            _RMW(c, VALUE, K.OP_ADD, 1)
            raise ValueError("WaitGroup.done() called more times than add()")
        if old == 1:
            _NOTIFY(c, ALL)

    @property
    def count(self) -> int:
        return max(0, _LOAD(self._cw(), VALUE))

    def wait(self, timeout=None) -> bool:
        return self._drive(self._wait_g(timeout))

    async def wait_async(self, timeout=None) -> bool:
        """``wait(timeout)`` for asyncio: awaits without blocking the event loop."""
        return await self._drive_async(self._wait_g(timeout))

    def _wait_g(self, timeout=None):
        c = self._cw()
        deadline = deadline_of(timeout)
        return bool((yield (lambda: True if _LOAD(c, VALUE) <= 0 else None, deadline, RETRIES)))

    def _recover(self, idx: int, died: bool) -> None:
        if not self._c:
            return
        h = self._holds_of(idx)
        if h > 0:
            W.store(self._seg.w, (L.SY_BASE >> 3) + self._hw(idx), 0)
            if _RMW(self._c, VALUE, K.OP_ADD, -h) - h <= 0:
                _NOTIFY(self._c, ALL)
            _RMW(self._c, K.RECOVERED, K.OP_ADD, h)

    def _describe(self):
        return f"count={self.count}"


class Notify(_Sync):
    """tokio's ``Notify`` across processes: ``notify_one()``, ``notify_waiters()``, ``notified(timeout=None) -> bool``.

    ``notify_one`` wakes one waiting ``notified()``, or, if none waits,
    stores one permit that the next ``notified()`` consumes at once (at most
    one is stored). ``notify_waiters`` wakes every current waiter and
    stores nothing. ``value`` packs the permit (bit 0) and the number of
    waiters (bits 1+); ``aux`` counts wake credits handed to waiters.
    """

    _TYPE = L.SYNC_NOTIFY

    def __init__(self, *, name: str | None = None):
        self._create(name)

    def notify_one(self) -> None:
        c = self._cw()
        while True:
            v = _LOAD(c, VALUE)
            if v >> 1:
                if _CAS(c, VALUE, v, v - 2) == v:
                    _RMW(c, AUX, K.OP_ADD, 1)
                    _NOTIFY(c, 1)
                    return
            elif v & 1:
                return
            elif _CAS(c, VALUE, v, v | 1) == v:
                return

    def notify_waiters(self) -> None:
        c = self._cw()
        while True:
            v = _LOAD(c, VALUE)
            n = v >> 1
            if n == 0:
                return
            if _CAS(c, VALUE, v, v & 1) == v:
                _RMW(c, AUX, K.OP_ADD, n)
                _NOTIFY(c, ALL)
                return

    def _credit(self, c):
        cr = _LOAD(c, AUX)
        while cr > 0:
            seen = _CAS(c, AUX, cr, cr - 1)
            if seen == cr:
                return True
            cr = seen
        return None

    def notified(self, timeout=None) -> bool:
        return self._drive(self._notified_g(timeout))

    async def notified_async(self, timeout=None) -> bool:
        """``notified(timeout)`` for asyncio: awaits without blocking the event loop."""
        return await self._drive_async(self._notified_g(timeout))

    def _notified_g(self, timeout=None):
        c = self._cw()
        deadline = deadline_of(timeout)
        while True:
            v = _LOAD(c, VALUE)
            if v & 1:
                if _CAS(c, VALUE, v, v & ~1) == v:
                    return True
            elif _CAS(c, VALUE, v, v + 2) == v:
                break
        _RMW(c, self._hold, K.OP_ADD, 1)
        try:
            try:
                got = (yield (lambda: self._credit(c), deadline, RETRIES))
            except GeneratorExit:       # notified_async cancelled: withdraw; a credit already ours goes on
                if self._withdraw(c, 1) == 0:  # a notifier had counted us: its credit is now ours
                    self.notify_one()
                raise
            if got:
                return True
            return self._withdraw(c, 1) == 0
        finally:
            _RMW(c, self._hold, K.OP_ADD, -1)

    def _withdraw(self, c, n) -> int:
        """Take ``n`` waits off the count (or, if notifiers already counted them, their credits). Returns how many were still waiting."""
        left = 0
        for _ in range(n):
            while True:
                v = _LOAD(c, VALUE)
                if v >> 1:
                    if _CAS(c, VALUE, v, v - 2) == v:
                        left += 1
                        break
                    continue
                # Counted by a notifier already: its credit is on the way (spin a bounded while).
                end = time.monotonic() + 1.0
                while not self._credit(c) and time.monotonic() < end:
                    os.sched_yield()
                break
        return left

    def _recover(self, idx: int, died: bool) -> None:
        if died and self._c:
            h = self._holds_of(idx)
            if h > 0:
                self._withdraw(self._c, h)

    def _describe(self):
        v = _LOAD(self._cw(), VALUE)
        return f"waiting={v >> 1}{' permit' if v & 1 else ''}"


_TYPE_NAMES = {cls._TYPE: cls.__name__ for cls in (AtomicInt, AtomicFloat, Lock, RLock, Semaphore, Event,
                                                      Condition, Barrier, WaitGroup, Notify, RWLock)}
TYPE_NAMES = _TYPE_NAMES

_OPEN = weakref.WeakValueDictionary()
_KEPT: list = []        # mappings of handles closed while another thread waited on them


_chan.track_handles(_OPEN.values, after_fork_child="_after_fork_child")
