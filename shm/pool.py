"""``shm.Pool``: rayon-style data parallelism across processes, over shared-memory work-stealing deques.

What ``multiprocessing.Pool`` and ``concurrent.futures.ProcessPoolExecutor``
users know (``map``, ``imap``, ``imap_unordered``, ``starmap``,
``apply_async``, ``submit``, ``close``/``join``/``terminate``), plus
rayon's shapes (``map_reduce``, ``fold``, ``shm.join``, ``for_each_chunk``
over a shared numpy array), with tasks and results in shared memory instead
of pipes.

Design notes
------------
*Where tasks live.* The caller pickles each *chunk* of tasks once
(``(fn, mode, extra, items)``) into the pool's arena, a region of the pool
segment (kernels/layout.py: ``pool_layout``) that only this process writes.
Each task is then one int64 naming its chunk record and index
(kernels/pool.py), pushed onto the *injector*, a Chase-Lev deque this
process owns (kernels/deque.py). Workers steal batches from the injector
into their own deques and from each other (kernels/pool.py ``take``), so a
chunk whose tasks turn out slow is spread over idle workers task by task;
no payload moves when a task is stolen. A chunk's arena space is reused
once every one of its tasks has a result. A payload larger than a quarter
of the arena gets a segment of its own (unlinked when the chunk is done);
when the arena or the injector is full, chunks wait in this process and go
out as results come back.

*Where results go.* Workers pickle results in batches (up to 256, or what
a millisecond produced) into one shm channel (bytes codec) read by a
*collector* thread here, which fills in ``map`` lists, ``imap`` iterators,
``AsyncResult``s and ``concurrent.futures.Future``s, and runs callbacks
(as ``multiprocessing.Pool``'s result handler thread does).

*A worker that dies* (SIGKILL, segfault, the OOM killer) is noticed by the
collector within ~50 ms, marked dead in the pool segment and replaced in its
slot; its deque is inherited by the replacement (and was stealable all
along). Which task it was holding is settled by the quiescence scan in
kernels/pool.py, not guessed: once no live worker is busy, every deque is
empty and the result channel is drained, each task pushed before the scan
without a result is reported as failed with ``shm.WorkerLost`` (naming the
worker, its pid and the signal), and the pool goes on. A lost task is never
run again: it may have had side effects before its worker died.

*Errors.* A task that raises re-raises in the caller, with the worker's
traceback as its ``__cause__`` (as ``concurrent.futures`` does). Arguments
that cannot be pickled raise in the caller at submission, before anything
is queued; a result that cannot be pickled fails its task with a
``TypeError`` that says so.

Rejected: one MPMC channel of tasks (the first design): a worker SIGKILLed
between receiving a message and recording it loses the message without a
trace, so a lost task could only be found by timeout; a deque claim is a
CAS on a word the parent can scan. A ``Manager``-style dispatcher process:
one more hop per task. Re-running lost tasks: see above.
"""
from __future__ import annotations

import atexit
import collections
import concurrent.futures as cf
import itertools
import math
import multiprocessing as mp
import os
import pickle
import signal
import struct
import sys
import threading
import time
import weakref

import numpy as np

from kernels import layout as L
from kernels import pool as K
from kernels import words as Wd

from . import _worker
from .errors import BrokenPool, Empty, WorkerLost
from .segment import Segment, shm_free_bytes, unlink_name
from .channel import unbounded

__all__ = ["Pool", "AsyncResult", "join"]

_DCAP = 128                      # a worker's deque: it holds at most one stolen batch (STEAL_MAX)
_ICAP = 1 << 16                  # the injector
_MAX_CHUNK = 8192                # tasks per chunk (a run names its tasks in 16 bits)
_ONES = b"\x01" * _MAX_CHUNK
_CHUNK_HEADER = struct.Struct("<qqq")   # kernels/layout.py CHUNK: id, nbytes, flags
_ARENA_DEFAULT = 8 << 20
_ARENA_MIN = 256 << 10
_STAGE_MAX = 256                 # coalesced single calls per chunk
_RESULT_SLOT = 16 << 10          # the result channel's inline slot (generation 0: 256 of them, 4 MiB)
_POLL = 0.05                     # the collector looks at worker processes this often

RUN, CLOSE, TERMINATE = 0, 1, 2


# --------------------------------------------------------------------------
# Results as callers see them.

_RESULTS_DONE = threading.Condition(threading.Lock())


class AsyncResult:
    """The result of ``apply_async``/``map_async``/``starmap_async``, as ``multiprocessing.pool.AsyncResult``.

    Light on purpose (no lock or event of its own: one module-wide condition
    is notified as results finish), because a program may hold tens of
    thousands of them and the garbage collector walks every one.
    """

    __slots__ = ("_done", "_value", "_error", "_callback", "_error_callback", "_job")

    def __init__(self, callback=None, error_callback=None):
        self._done = False
        self._value = None
        self._error = None
        self._callback = callback
        self._error_callback = error_callback
        self._job = None

    def ready(self) -> bool:
        return self._done

    def successful(self) -> bool:
        if not self._done:
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def wait(self, timeout=None) -> bool:
        if self._done:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with _RESULTS_DONE:
            while not self._done:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                _RESULTS_DONE.wait(left)
        return True

    def get(self, timeout=None):
        if not self.wait(timeout):
            raise mp.TimeoutError(f"the result was not ready within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value

    def _finish(self, value, error) -> None:
        self._value, self._error = value, error
        try:                    # the callback runs before get() returns (as multiprocessing's)
            if error is None and self._callback is not None:
                self._callback(value)
            elif error is not None and self._error_callback is not None:
                self._error_callback(error)
        except Exception:       # a callback's exception must not kill the collector (mp.Pool's too)
            import traceback
            traceback.print_exc()
        with _RESULTS_DONE:
            self._done = True
            _RESULTS_DONE.notify_all()

    def __repr__(self):
        return f"<shm.AsyncResult {'ready' if self._done else 'pending'}>"


class _Job:
    """Receives the results of the tasks of one call."""
    total = 0

    def task(self, i: int, ok: bool, value) -> None:
        raise NotImplementedError

    def tasks(self, start: int, values: list) -> None:
        """Tasks ``start .. start + len(values) - 1`` all returned."""
        for k, v in enumerate(values):
            self.task(start + k, True, v)

    def partial(self, count: int, value) -> None:          # reduce/fold chunks only
        raise NotImplementedError

    def fail(self, count: int, error) -> None:             # reduce/fold: ``count`` tasks failed
        raise NotImplementedError

    def abort(self, error) -> None:
        """Fail whatever has not finished (the pool was terminated or broke)."""
        raise NotImplementedError


class _MapJob(_Job):
    def __init__(self, total: int, result: AsyncResult, single: bool = False):
        self.total = self.left = total
        self.values = [None] * total
        self.errors: dict[int, BaseException] = {}
        self.result = result
        self.single = single
        if total == 0:
            result._finish([], None)

    def task(self, i, ok, value):
        if ok:
            self.values[i] = value
        else:
            self.errors[i] = value
        self.left -= 1
        if self.left == 0:
            self._done()

    def tasks(self, start, values):
        n = len(values)
        self.values[start:start + n] = values
        self.left -= n
        if self.left == 0:
            self._done()

    def _done(self):
        err = self.errors[min(self.errors)] if self.errors else None
        self.result._finish(None if err is not None else (self.values[0] if self.single else self.values), err)

    def abort(self, error):
        if not self.result.ready():
            self.result._finish(None, error)


class _OneJob(_Job):
    """``apply_async``: one task, straight into its AsyncResult."""
    __slots__ = ("result",)
    total = 1

    def __init__(self, result: AsyncResult):
        self.result = result

    def task(self, i, ok, value):
        self.result._finish(value, None) if ok else self.result._finish(None, value)

    def abort(self, error):
        if not self.result.ready():
            self.result._finish(None, error)


_FUTURES_COND = threading.Condition()


class _Future(cf.Future):
    """A ``concurrent.futures.Future`` whose condition is shared with every other one of ours.

    ``cf.Future`` gives each future its own ``threading.Condition`` (a lock,
    a deque, a list); with tens of thousands outstanding the garbage
    collector spends more time walking them than the pool spends on the
    tasks. Sharing one (reentrant) condition keeps every Future method and
    ``cf.wait``/``cf.as_completed`` working: they only lock it and notify it,
    and waiters re-check their own future's state.
    """

    def __init__(self):     # cf.Future.__init__'s fields, with the shared condition
        self._condition = _FUTURES_COND
        self._state = cf._base.RUNNING
        self._result = None
        self._exception = None
        self._waiters = []
        self._done_callbacks = []

    # cf.Future.result/exception wait on the condition once and then judge:
    # with a shared condition a wake-up may be for another future, so wait
    # in a loop until this one is done (or the time is up), then ask them.
    def _wait_done(self, timeout) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while self._state not in _SETTLED:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                self._condition.wait(left)

    def result(self, timeout=None):
        self._wait_done(timeout)
        return super().result(0)

    def exception(self, timeout=None):
        self._wait_done(timeout)
        return super().exception(0)


_SETTLED = (cf._base.FINISHED, cf._base.CANCELLED, cf._base.CANCELLED_AND_NOTIFIED)


class _FutureJob(_Job):
    total = 1

    def __init__(self, future: cf.Future):
        self.future = future

    def task(self, i, ok, value):
        if self.future.cancelled():
            return
        if ok:
            self.future.set_result(value)
        else:
            self.future.set_exception(value)

    def abort(self, error):
        if not self.future.done():
            self.future.set_exception(error)


class _StagedJob(_Job):
    """The jobs of coalesced single calls: task ``i`` of the chunk is call ``i``'s."""

    def __init__(self, jobs):
        self.jobs = jobs
        self.total = len(jobs)

    def task(self, i, ok, value):
        self.jobs[i].task(0, ok, value)

    def tasks(self, start, values):
        jobs = self.jobs
        for k, v in enumerate(values):
            jobs[start + k].task(0, True, v)

    def abort(self, error):
        for j in self.jobs:
            j.abort(error)


class _ReduceJob(_Job):
    def __init__(self, total, reduce, initial, has_initial, result: AsyncResult):
        self.total = self.left = total
        self.reduce = reduce
        self.acc, self.has = initial, has_initial
        self.error = None
        self.result = result
        if total == 0:
            self._done()

    def _add(self, v):
        if self.error is None:
            try:
                self.acc = self.reduce(self.acc, v) if self.has else v
                self.has = True
            except BaseException as e:
                self.error = e

    def partial(self, count, value):
        self._add(value)
        self._left(count)

    def task(self, i, ok, value):           # a task of the chunk raised
        if not ok and self.error is None:
            self.error = value
        self._left(1)

    def fail(self, count, error):
        if self.error is None:
            self.error = error
        self._left(count)

    def _left(self, n):
        self.left -= n
        if self.left == 0:
            self._done()

    def _done(self):
        if self.error is None and not self.has:
            self.error = TypeError("reduce of an empty iterable with no initial value")
        self.result._finish(self.acc if self.error is None else None, self.error)

    def abort(self, error):
        if not self.result.ready():
            self.result._finish(None, error)


_END = object()


class _IMapJob(_Job):
    """``imap`` (ordered) and ``imap_unordered``: an iterator fed by the collector."""

    def __init__(self, ordered: bool):
        self.ordered = ordered
        self.cond = threading.Condition(threading.Lock())
        self.ready: dict[int, tuple] = {}
        self.queue = collections.deque()
        self.next = 0
        self.total = None              # known once the feeder has seen the whole iterable
        self.yielded = 0
        self.error = None              # the feeder failed (pickling): raised after what was queued

    def task(self, i, ok, value):
        with self.cond:
            if self.ordered:
                self.ready[i] = (ok, value)
            else:
                self.queue.append((ok, value))
            self.cond.notify()

    def tasks(self, start, values):
        with self.cond:
            if self.ordered:
                for k, v in enumerate(values):
                    self.ready[start + k] = (True, v)
            else:
                self.queue.extend((True, v) for v in values)
            self.cond.notify()

    def feeder_done(self, total, error=None):
        with self.cond:
            self.total = total
            self.error = error
            self.cond.notify_all()

    def abort(self, error):
        with self.cond:
            self.error = error
            self.total = self.yielded if self.total is None else min(self.total, self.yielded)
            self.cond.notify_all()

    def get(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                if self.ordered and self.next in self.ready:
                    ok, value = self.ready.pop(self.next)
                    self.next += 1
                    break
                if not self.ordered and self.queue:
                    ok, value = self.queue.popleft()
                    break
                if self.total is not None and self.yielded >= self.total:
                    if self.error is not None:
                        err, self.error = self.error, None
                        raise err
                    return _END
                if deadline is None:
                    self.cond.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise mp.TimeoutError(f"no result within {timeout} s")
                    self.cond.wait(left)
            self.yielded += 1
        if not ok:
            raise value
        return value


class IMapIterator:
    """What ``imap``/``imap_unordered`` return: an iterator; ``next(timeout)`` as multiprocessing's."""

    def __init__(self, job: _IMapJob):
        self._job = job

    def __iter__(self):
        return self

    def next(self, timeout=None):
        v = self._job.get(timeout)
        if v is _END:
            raise StopIteration
        return v

    __next__ = next


# --------------------------------------------------------------------------
# The arena: payload records, allocated in order, freed in any order.

class _Arena:
    """A ring of variable-size records in the pool segment's arena; only this process allocates and frees."""

    def __init__(self, size: int):
        self.size = size
        self.head = 0
        self.live = collections.deque()          # [start, end, freed], oldest first

    def alloc(self, n: int):
        n = -(-n // L.ARENA_ALIGN) * L.ARENA_ALIGN
        if n > self.size:
            return None
        if not self.live:
            start = 0
        else:
            tail = self.live[0][0]
            if self.head > tail:
                if self.head + n <= self.size:
                    start = self.head
                elif n < tail:
                    start = 0
                else:
                    return None
            else:                      # wrapped: free space is [head, tail)
                if self.head + n < tail:
                    start = self.head
                else:
                    return None
        entry = [start, start + n, False]
        self.live.append(entry)
        self.head = start + n
        return entry

    def free(self, entry) -> None:
        entry[2] = True
        live = self.live
        while live and live[0][2]:
            live.popleft()


class _Chunk:
    __slots__ = ("cid", "job", "base", "n", "left", "got", "payload", "region", "seg", "seq", "first", "reduce")

    def __init__(self, cid, job, base, n, payload, reduce):
        self.cid, self.job, self.base, self.n = cid, job, base, n
        self.left = n
        self.reduce = reduce
        self.got = None if reduce else bytearray(n)
        self.payload = payload
        self.region = None
        self.seg = None
        self.seq = None
        self.first = 0


def _result_slot() -> int:
    """16 KiB, or less on a small /dev/shm (the channel's first generation takes 256 slots, 1/8 of what is free)."""
    free = shm_free_bytes()
    if free is None or free >= 256 * _RESULT_SLOT * 8:
        return _RESULT_SLOT
    return max(256, 1 << max(8, (free // 8 // 256).bit_length() - 1))


def _pages(n: int) -> int:
    return -(-n // 4096) * 4096


def _describe_exit(code) -> str:
    if code is None:
        return "died"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _chunks_of(n_items: int, chunksize, workers: int) -> int:
    if chunksize is None:
        chunksize = math.ceil(n_items / (workers * 4)) if n_items else 1
    chunksize = int(chunksize)
    if chunksize < 1:
        raise ValueError("chunksize must be >= 1")
    return min(chunksize, _MAX_CHUNK)


_POOLS: "weakref.WeakSet[Pool]" = weakref.WeakSet()


@atexit.register
def _terminate_all():
    for p in list(_POOLS):
        try:
            p.terminate()
        except Exception:
            pass


class Pool:
    """A pool of worker processes fed through shared-memory work-stealing deques.

    ``Pool(processes=None, initializer=None, initargs=(), maxtasksperchild=None, *, context=None, arena=None)``:
    ``processes`` defaults to ``os.cpu_count()``; ``context`` is a
    ``multiprocessing`` context or start-method name (default: the
    default context); ``arena`` is the bytes reserved for task payloads
    (default 8 MiB, less on a small ``/dev/shm``).

    Used as a context manager, a clean exit closes the pool and waits for
    its tasks (``close(); join()``, as ``ProcessPoolExecutor``); an exit by
    exception terminates it.
    """

    def __init__(self, processes: int | None = None, initializer=None, initargs=(), maxtasksperchild=None, *,
                 context=None, arena: int | None = None):
        if processes is None:
            processes = os.cpu_count() or 1
        processes = int(processes)
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if processes > L.MAX_PARTICIPANTS:
            raise ValueError(f"at most {L.MAX_PARTICIPANTS} processes")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None and (int(maxtasksperchild) != maxtasksperchild or maxtasksperchild < 1):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if context is None or isinstance(context, str):
            context = mp.get_context(context)
        self._ctx = context
        self._n = processes
        self._initializer, self._initargs = initializer, tuple(initargs)
        self._max_tasks = int(maxtasksperchild or 0)
        if arena is None:
            free = shm_free_bytes()
            arena = _ARENA_DEFAULT if free is None else max(_ARENA_MIN, min(_ARENA_DEFAULT, free // 8))
        arena = max(_ARENA_MIN, int(arena))
        lay = L.pool_layout(processes, _DCAP, _ICAP, arena)
        self._lay = lay

        def init(seg):
            for i in range(processes):
                Wd.store(seg.w, (lay["table"] + i * L.WK_SIZE + L.WK_STATE) >> 3, L.WS_DEAD)
                Wd.store(seg.w, (lay["table"] + i * L.WK_SIZE + L.WK_CURRENT) >> 3, -1)

        self._seg = Segment.create(L.KIND_POOL, lay["size"], init=init, params=(
            processes, _DCAP, _ICAP, lay["table"], lay["injector"], lay["deques"], lay["arena"],
            lay["size"] - lay["arena"]))
        self._c = self._seg.addr
        self._arena = _Arena(self._seg.params[L.PP_ARENA_SIZE])
        self._arena_off = lay["arena"]
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._chunks: dict[int, _Chunk] = {}
        self._pending: collections.deque[_Chunk] = collections.deque()
        self._stage = None               # (fn, [pickled (args, kwargs)], [job]) of coalesced calls
        self._feeders = 0                # imap feeder threads still reading their iterables
        self._cids = itertools.count(1)
        self._seq = 0
        self._outstanding = 0
        self._state = RUN
        self._broken: BaseException | None = None
        self._deaths: list[tuple] = []
        self._lost = 0
        self._arrays: list[Segment] = []
        self._owner = os.getpid()
        try:
            # Result batches are a few KiB: inline slots that hold them, so a flush is
            # one copy, not a blob segment created, mapped and replaced (bench/results/pool.md).
            self._tx, self._rx = unbounded(codec="bytes", slot_size=_result_slot())
            self._rx._chan().no_spin = True     # the collector shares the CPUs with the workers
        except BaseException:
            self._seg.close()
            unlink_name(self._seg.name)
            raise
        self._procs: list = [None] * processes
        self._collector = threading.Thread(target=self._collect, name="shm.Pool collector", daemon=True)
        try:
            for i in range(processes):
                self._start(i)
        except BaseException:
            self._cleanup(kill=True)
            raise
        self._collector.start()
        _POOLS.add(self)

    # ------------------------------------------------------------------
    # Workers.

    def _start(self, slot: int) -> None:
        p = self._ctx.Process(target=_worker.main, name=f"shm.Pool-{slot}", daemon=True, args=(
            self._seg.name, slot, self._tx, os.getpid(), self._initializer, self._initargs, self._max_tasks))
        p.start()
        self._procs[slot] = p

    def _word(self, slot: int, field: int) -> int:
        return (self._lay["table"] + slot * L.WK_SIZE + field) >> 3

    def _check_workers(self) -> None:
        for slot, p in enumerate(self._procs):
            if p is None or p.exitcode is None:
                continue
            code, pid = p.exitcode, p.pid
            state = int(self._seg.w[self._word(slot, L.WK_STATE)])
            current = int(self._seg.w[self._word(slot, L.WK_CURRENT)])
            Wd.store(self._seg.w, self._word(slot, L.WK_STATE), L.WS_DEAD)
            Wd.bit_clear(self._seg.w, L.PO_SLEEPERS >> 3, slot)      # it may have died parked
            self._procs[slot] = None
            try:
                p.close()
            except Exception:
                pass
            clean = code == 0 and state == L.WS_EXITED
            if not clean:
                self._deaths.append((slot, pid, code, current))
                Wd.store(self._seg.w, L.PO_REPLACED >> 3, int(self._seg.w[L.PO_REPLACED >> 3]) + 1)
            if self._state == TERMINATE or self._broken is not None:
                continue
            if code == 3 and state == L.WS_EXITED:
                continue                    # its initializer raised: reported by the worker; not restarted
            if self._state == RUN or self._outstanding:
                self._start(slot)

    # ------------------------------------------------------------------
    # The collector thread.

    def _collect(self) -> None:
        try:
            self._collect_loop()
        except BaseException as e:          # a bug here must not leave callers waiting forever
            with self._lock:
                self._break(BrokenPool(f"the pool's collector thread failed: {type(e).__name__}: {e}"), cause=e)
            raise

    def _collect_loop(self) -> None:
        rx = self._rx
        next_check = 0.0
        while True:
            try:
                msgs = rx.recv_many(64, timeout=_POLL)
            except Empty:
                msgs = []
            except Exception:
                if self._state == TERMINATE:
                    return
                raise
            with self._lock:
                for m in msgs:
                    self._dispatch(m)
                now = time.monotonic()
                if now >= next_check or not msgs:
                    next_check = now + _POLL
                    if self._state != TERMINATE:
                        self._check_workers()
                    if self._deaths and self._outstanding:
                        self._audit()
                    elif self._deaths and not self._outstanding:
                        self._deaths.clear()
                if self._stage is not None:
                    self._flush_stage()
                if self._pending:
                    self._push()
                if self._state == TERMINATE or (self._state == CLOSE and self._outstanding == 0
                                                and self._feeders == 0 and self._joining):
                    return

    def _dispatch(self, message: bytes) -> None:
        meta, blob = pickle.loads(message)
        try:
            values = pickle.loads(blob)
        except Exception as e:          # e.g. a class the worker has and this process cannot import
            err = TypeError(f"a worker's results could not be unpickled in the caller: {type(e).__name__}: {e}")
            err.__cause__ = e
            failed = []                 # every task the message covered fails with ``err``
            for cid, idx, code, n in meta:
                if code in (_worker.PARTIAL, _worker.PARTIAL_ERR):
                    failed.append((cid, idx, _worker.PARTIAL_ERR, 1))
                else:
                    failed.extend((cid, idx + k, _worker.ERR, 1) for k in range(n))
            meta, values = failed, [err] * len(failed)
        chunks = self._chunks
        for (cid, idx, code, _n), value in zip(meta, values):
            if cid == -1:           # a worker's initializer raised
                self._break(BrokenPool(f"a worker's initializer raised {type(value).__name__}: {value}; "
                                       "the pool cannot start workers"), cause=value)
                continue
            ch = chunks.get(cid)
            if ch is None:
                continue            # already settled (reported lost, or the pool was terminated)
            job = ch.job
            if code == _worker.PARTIAL:
                ch.left += idx
                job.partial(-idx, value)
            elif code == _worker.PARTIAL_ERR:
                ch.left += idx
                job.fail(-idx, value)
            elif code == _worker.LIST:
                n = len(value)
                if ch.got is not None:
                    ch.got[idx:idx + n] = _ONES[:n]
                ch.left -= n
                job.tasks(ch.base + idx, value)
            else:
                if ch.got is not None:
                    if ch.got[idx]:
                        continue
                    ch.got[idx] = 1
                ch.left -= 1
                job.task(ch.base + idx, code == _worker.OK, value)
            if ch.left == 0:
                self._finish(ch)

    def _finish(self, ch: _Chunk) -> None:
        del self._chunks[ch.cid]
        if ch.region is not None:
            self._arena.free(ch.region)
        if ch.seg is not None:
            unlink_name(ch.seg)
        self._outstanding -= ch.n
        if self._outstanding == 0:
            self._idle.notify_all()

    def _audit(self) -> None:
        """After a worker died: once nothing moves, fail the tasks no one holds (kernels/pool.py ``quiet``)."""
        seq = self._seq
        if not K.quiet(self._c):
            return
        while True:                 # results sent before the workers went idle
            try:
                msgs = self._rx.recv_many(256, timeout=0)
            except Empty:
                break
            for m in msgs:
                self._dispatch(m)
        if len(self._rx):
            # Messages queued behind a slot a dead worker claimed and never
            # filled: reap it (the channel then skips the slot) and look again later.
            self._rx._chan().check_peers()
            return
        deaths, self._deaths = self._deaths, []
        for ch in [c for c in self._chunks.values() if c.seq is not None and c.seq <= seq]:
            self._lost += ch.left
            self._fail_chunk(ch, lambda i, first=ch.first: self._lost_error(deaths, first, i))

    @staticmethod
    def _lost_error(deaths, first: int, idx: int) -> WorkerLost:
        def running(d):
            cur = d[3]
            if cur < 0 or idx < 0 or (cur >> K.REC_SHIFT) != (first >> K.REC_SHIFT):
                return False
            start = (cur >> K.START_SHIFT) & K.COUNT_MASK
            return start <= idx < start + (cur & K.COUNT_MASK)
        who = next((d for d in deaths if running(d)), deaths[-1])
        slot, pid, code, current = who
        held = "was running this task" if running(who) else "held this task"
        others = f" ({len(deaths)} workers died)" if len(deaths) > 1 else ""
        return WorkerLost(f"worker {slot} (pid {pid}) {_describe_exit(code)} while it {held}{others}; "
                          "the pool replaced it and goes on. The task was not run again: it may have had "
                          "side effects before the worker died.", worker=slot, pid=pid, exitcode=code)

    def _break(self, error: BaseException, cause=None) -> None:
        if self._broken is not None:
            return
        if cause is not None:
            error.__cause__ = cause
        self._broken = error
        for ch in list(self._chunks.values()):
            ch.job.abort(error)
            if ch.seg is not None:
                unlink_name(ch.seg)
                ch.seg = None
        if self._stage is not None:
            for j in self._stage[2]:
                j.abort(error)
            self._stage = None
        self._chunks.clear()
        self._pending.clear()
        self._outstanding = 0
        self._idle.notify_all()

    # ------------------------------------------------------------------
    # Submitting.

    def _check_running(self) -> None:
        if os.getpid() != self._owner:
            raise RuntimeError("this shm.Pool belongs to another process (a Pool cannot be used after fork)")
        if self._broken is not None:
            raise BrokenPool(str(self._broken)) from self._broken
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _encode(self, fn, mode, extra, items) -> bytes:
        try:
            return pickle.dumps((fn, mode, extra, items), protocol=5)
        except Exception as e:
            raise TypeError(f"shm.Pool cannot send this task to a worker: {e}. Tasks are pickled: use a function "
                            "defined at module level (not a lambda or a local function) and picklable "
                            "arguments.") from e

    def _make_chunks(self, job, fn, mode, extra, items: list, chunksize: int, base: int = 0,
                     reduce: bool = False) -> list[_Chunk]:
        out = []
        for off in range(0, len(items), chunksize):
            part = items[off:off + chunksize]
            out.append(_Chunk(next(self._cids), job, base + off, len(part), self._encode(fn, mode, extra, part),
                              reduce))
        return out

    def _enqueue(self, chunks: list[_Chunk], feeding: bool = False) -> None:
        with self._lock:
            if not feeding:
                self._check_running()
            elif self._broken is not None:
                raise BrokenPool(str(self._broken)) from self._broken
            for ch in chunks:
                self._chunks[ch.cid] = ch
                self._outstanding += ch.n
            self._pending.extend(chunks)
            self._push()

    def _push(self) -> None:
        """Write pending chunks into the arena and push their tasks (lock held).

        While a worker's death is being settled nothing new goes out, so the
        pool is sure to run dry and the quiescence scan to conclude even
        under a steady stream of submissions.
        """
        if self._deaths:
            return
        arena, seg = self._arena, self._seg
        while self._pending:
            ch = self._pending[0]
            if ch.region is None:
                payload = ch.payload
                big = len(payload) > arena.size // 4
                # A big payload gets a segment of its own and the record holds its name.
                region = arena.alloc(L.CK_DATA + (L.NAME_LEN if big else len(payload)))
                if region is None:
                    return                          # wait for results to free space
                flags = 0
                if big:
                    try:
                        name = self._payload_segment(payload)
                    except Exception as e:      # e.g. OutOfSharedMemory: this chunk fails, the pool goes on
                        arena.free(region)
                        self._pending.popleft()
                        self._fail_chunk(ch, lambda i, e=e: e)
                        continue
                    ch.seg = name
                    payload = name.encode("ascii")
                    flags = L.CHUNK_SEGMENT
                rec = self._arena_off + region[0]
                _CHUNK_HEADER.pack_into(seg.mm, rec, ch.cid, len(payload), flags)
                seg.mm[rec + L.CK_DATA: rec + L.CK_DATA + len(payload)] = payload
                ch.region = region
                ch.first = (region[0] >> 6) << K.REC_SHIFT
                ch.payload = None
            if K.push(self._c, ch.first | ch.n) == 0:
                return                              # the injector is full: the collector pushes later
            self._pending.popleft()
            self._seq += 1
            ch.seq = self._seq

    def _fail_chunk(self, ch: _Chunk, error_of) -> None:
        """Every task of ``ch`` without a result fails with ``error_of(index)`` (-1: a reduce chunk's rest; lock held)."""
        if ch.got is None:
            ch.job.fail(ch.left, error_of(-1))
        else:
            for i in range(ch.n):
                if not ch.got[i]:
                    ch.got[i] = 1
                    ch.job.task(ch.base + i, False, error_of(i))
        ch.left = 0
        self._finish(ch)

    def _payload_segment(self, payload: bytes) -> str:
        seg = Segment.create(L.KIND_BLOB, _pages(L.BLOB_DATA + len(payload)), family=self._seg.family,
                             params=(0, 0, 0, len(payload)))
        try:
            seg.mm[L.BLOB_DATA:L.BLOB_DATA + len(payload)] = payload
            return seg.name
        finally:
            seg.close()

    # ------------------------------------------------------------------
    # The multiprocessing.Pool surface.

    def apply_async(self, func, args=(), kwds=None, callback=None, error_callback=None) -> AsyncResult:
        """Run ``func(*args, **kwds)`` in a worker; an ``AsyncResult``."""
        res = AsyncResult(callback, error_callback)
        self._stage_call(func, tuple(args), dict(kwds or {}), _OneJob(res))
        return res

    # Single calls (apply_async, submit) are *coalesced*: while the injector
    # still holds work for the workers, a call joins a staged chunk instead of
    # being pushed alone (the workers are busy, so it would only wait there);
    # the chunk goes out when the injector runs empty at the next call, when
    # it holds _STAGE_MAX calls, or when the collector next wakes (results
    # arrive at least every few ms while workers are busy, and always before
    # one goes idle). Each call is pickled at once, so a bad argument still
    # raises here.
    def _stage_call(self, fn, args, kwargs, job) -> None:
        try:
            blob = pickle.dumps((args, kwargs), protocol=5)
        except Exception as e:
            raise TypeError(f"shm.Pool cannot send this task to a worker: {e}. Tasks are pickled: use "
                            "picklable arguments.") from e
        with self._lock:
            self._check_running()
            st = self._stage
            if st is not None and st[0] is not fn and st[0] != fn:     # bound methods are equal, not identical
                self._flush_stage()
                st = None
            if st is None:
                st = self._stage = (fn, [], [])
            st[1].append(blob)
            st[2].append(job)
            self._outstanding += 1
            if len(st[1]) >= _STAGE_MAX or K.lengths(self._c, -1) == 0:
                self._flush_stage()

    def _flush_stage(self) -> None:
        """Queue the staged calls as one chunk (lock held)."""
        st, self._stage = self._stage, None
        if st is None:
            return
        fn, blobs, jobs = st
        job = jobs[0] if len(jobs) == 1 else _StagedJob(jobs)
        self._outstanding -= len(blobs)
        try:
            ch = _Chunk(next(self._cids), job, 0, len(blobs), self._encode(fn, _worker.MODE_STAGED, None, blobs),
                        False)
        except TypeError as e:          # fn itself cannot be pickled: each call fails with the reason
            for j in jobs:
                j.task(0, False, e)
            return
        self._chunks[ch.cid] = ch
        self._outstanding += ch.n
        self._pending.append(ch)
        self._push()

    def apply(self, func, args=(), kwds=None):
        """``func(*args, **kwds)`` run in a worker (blocks)."""
        return self.apply_async(func, args, kwds).get()

    def _queue_all(self, job, func, mode, extra, items: list, chunksize, reduce: bool = False) -> None:
        """Queue every item of one call in chunks (nothing to queue: only check the pool runs)."""
        if items:
            self._enqueue(self._make_chunks(job, func, mode, extra, items, _chunks_of(len(items), chunksize, self._n),
                                            reduce=reduce))
        else:
            self._check_running()

    def _map_async(self, func, iterable, chunksize, mode, callback=None, error_callback=None) -> AsyncResult:
        items = list(iterable)
        res = AsyncResult(callback, error_callback)
        res._job = _MapJob(len(items), res)
        self._queue_all(res._job, func, mode, None, items, chunksize)
        return res

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None) -> AsyncResult:
        return self._map_async(func, iterable, chunksize, _worker.MODE_CALL, callback, error_callback)

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None) -> AsyncResult:
        return self._map_async(func, iterable, chunksize, _worker.MODE_STAR, callback, error_callback)

    def map(self, func, iterable, chunksize=None, *, progress=False) -> list:
        """``[func(x) for x in iterable]``, computed by the workers, in order.

        ``progress=True`` draws a progress bar on stderr while it runs.
        """
        return self._wait(self.map_async(func, iterable, chunksize), progress)

    def starmap(self, func, iterable, chunksize=None, *, progress=False) -> list:
        """``[func(*args) for args in iterable]``."""
        return self._wait(self.starmap_async(func, iterable, chunksize), progress)

    def _imap(self, func, iterable, chunksize, ordered) -> IMapIterator:
        job = _IMapJob(ordered)
        fixed = None if chunksize is None else _chunks_of(1, chunksize, self._n)
        with self._lock:
            self._check_running()
            self._feeders += 1          # close() may come next: join() waits for the feeder too

        def feed():
            n = 0
            size = 1
            try:
                it = iter(iterable)
                while True:
                    part = list(itertools.islice(it, fixed or size))
                    if not part:
                        break
                    self._enqueue(self._make_chunks(job, func, _worker.MODE_CALL, None, part, len(part), base=n),
                                  feeding=True)
                    n += len(part)
                    size = min(size * 2, 256)
            except BaseException as e:
                job.feeder_done(n, e)
            else:
                job.feeder_done(n)
            finally:
                with self._lock:
                    self._feeders -= 1
                    self._idle.notify_all()

        threading.Thread(target=feed, name="shm.Pool imap feeder", daemon=True).start()
        return IMapIterator(job)

    def imap(self, func, iterable, chunksize=None) -> IMapIterator:
        """Like ``map`` but lazy: an iterator of results in order, consumed while the workers run.

        With ``chunksize=None`` chunks start at one task and double up to
        256, so the first results come back at once and long inputs still
        travel in batches.
        """
        return self._imap(func, iterable, chunksize, True)

    def imap_unordered(self, func, iterable, chunksize=None) -> IMapIterator:
        """Like ``imap`` but results come in the order they are ready."""
        return self._imap(func, iterable, chunksize, False)

    # concurrent.futures
    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        """Run ``fn(*args, **kwargs)`` in a worker; a ``concurrent.futures.Future``."""
        fut = _Future()
        self._stage_call(fn, args, kwargs, _FutureJob(fut))
        return fut

    # ------------------------------------------------------------------
    # rayon's shapes.

    def map_reduce(self, func, iterable, reduce, *, initial=..., chunksize=None):
        """``functools.reduce(reduce, map(func, iterable)[, initial])``, reduced in the workers first.

        Each worker folds the results it computes with ``reduce`` and sends
        only its partial; this process combines the partials. ``reduce``
        must be associative and commutative (partials combine in whatever
        order workers finish them).
        """
        items = list(iterable)
        res = AsyncResult()
        job = _ReduceJob(len(items), reduce, None if initial is ... else initial, initial is not ..., res)
        self._queue_all(job, func, _worker.MODE_REDUCE, reduce, items, chunksize, reduce=True)
        return res.get()

    def fold(self, func, iterable, initial, combine, *, chunksize=None):
        """rayon's ``fold`` + ``reduce``: each worker computes ``acc = func(acc, x)`` from a fresh ``initial``.

        The partials are combined here with ``combine(a, b)`` (associative
        and commutative), starting from ``initial``.
        """
        items = list(iterable)
        res = AsyncResult()
        job = _ReduceJob(len(items), combine, initial, True, res)
        try:
            init = pickle.dumps(initial, protocol=5)
        except Exception as e:
            raise TypeError(f"fold's initial value must be picklable: {e}") from e
        self._queue_all(job, func, _worker.MODE_FOLD, init, items, chunksize, reduce=True)
        return res.get()

    def array(self, shape, dtype=float) -> np.ndarray:
        """A new zero-filled numpy array in shared memory, for ``for_each_chunk`` without a copy.

        It stays valid in this process for as long as it is referenced; the
        workers can map it until the pool is closed.
        """
        self._check_running()
        dt = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        seg = Segment.create(L.KIND_BLOB, _pages(L.BLOB_DATA + nbytes), family=self._seg.family,
                             params=(0, 0, 0, nbytes))
        self._arrays.append(seg)
        return np.frombuffer(seg.mm, dtype=dt, count=int(np.prod(shape, dtype=np.int64)),
                             offset=L.BLOB_DATA).reshape(shape)

    def _array_desc(self, arr: np.ndarray):
        for seg in self._arrays:
            lo = seg.addr + L.BLOB_DATA
            addr = arr.__array_interface__["data"][0]
            if lo <= addr < seg.addr + seg.size:
                return (seg.name, addr - seg.addr, arr.dtype.str, arr.shape, arr.strides)
        return None

    def for_each_chunk(self, array, func, *, chunks=None, progress=False) -> list:
        """Call ``func(view)`` in the workers on consecutive slices of ``array`` along its first axis.

        Each worker gets a zero-copy view of shared memory (no array data is
        pickled or sent through a pipe); writes to the view land in
        ``array``. An array made by ``pool.array()`` is used in place; any
        other array is copied into shared memory once (and, if it is
        writeable, copied back after the calls). ``chunks`` is the number of
        slices (default: four per worker). Returns ``func``'s results in
        slice order.
        """
        arr = np.asarray(array)
        if arr.ndim == 0:
            raise ValueError("for_each_chunk needs an array with at least one dimension")
        desc = self._array_desc(arr)
        copied = None
        if desc is None:
            copied = self.array(arr.shape, arr.dtype)
            copied[...] = arr
            desc = self._array_desc(copied)
        n = arr.shape[0]
        k = max(1, min(n, int(chunks) if chunks is not None else self._n * 4))
        bounds = [(n * i // k, n * (i + 1) // k) for i in range(k)]
        res = AsyncResult()
        job = res._job = _MapJob(len(bounds), res)
        try:
            self._enqueue(self._make_chunks(job, func, _worker.MODE_ARRAY, desc, bounds, 1))
            out = self._wait(res, progress)
        finally:
            if copied is not None:
                if isinstance(array, np.ndarray) and array.flags.writeable:
                    array[...] = copied
                self._release_array(copied)
        return out

    def _release_array(self, arr) -> None:
        desc = self._array_desc(arr)
        for seg in list(self._arrays):
            if desc is not None and seg.name == desc[0]:
                self._arrays.remove(seg)
                unlink_name(seg.name)         # the mapping stays valid while ``arr`` lives

    # ------------------------------------------------------------------
    # Waiting, progress, shutting down.

    def _wait(self, res: AsyncResult, progress: bool):
        if not progress:
            return res.get()
        from ._progress import Bar
        with Bar(sys.stderr) as bar:
            while not res.wait(0.1):
                done, total = self._progress_of(res)
                bar.show(done, total)
            done, total = self._progress_of(res)
            bar.show(total, total)
        return res.get()

    @staticmethod
    def _progress_of(res):
        job = getattr(res, "_job", None)
        if job is None:
            return (1, 1) if res.ready() else (0, 1)
        return job.total - job.left, job.total

    def close(self) -> None:
        """No more tasks; the workers exit once what is queued is done (``join()`` waits for it)."""
        with self._lock:
            if self._state == RUN:
                self._state = CLOSE

    _joining = False

    def join(self, timeout=None) -> None:
        """Wait for every queued task and for the workers to exit; after ``close()`` or ``terminate()``."""
        if self._state == RUN:
            raise ValueError("Pool is still running: call close() or terminate() first")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while (self._outstanding or self._feeders) and self._broken is None and self._state != TERMINATE:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("the pool's tasks did not finish in time")
                self._idle.wait(left if left is not None else 0.5)
            self._joining = True
        self._cleanup(kill=False)

    def terminate(self) -> None:
        """Stop the workers now; tasks not finished fail with ``BrokenPool``."""
        if os.getpid() != self._owner:
            return          # a forked child's copy: its lock may have been held at the fork
        with self._lock:
            if self._state == TERMINATE and self._seg is None:
                return
            self._state = TERMINATE
            self._break(BrokenPool("the pool was terminated"))
        self._cleanup(kill=True)

    def _cleanup(self, kill: bool) -> None:
        if os.getpid() != self._owner:
            return
        seg = self._seg
        if seg is None or seg.closed:
            return
        if self._collector.is_alive() and threading.current_thread() is not self._collector:
            if kill:
                self._state = TERMINATE
            self._collector.join(5)
            if self._collector.is_alive():
                self._state = TERMINATE
                self._collector.join(5)
        Wd.store(seg.w, L.PO_SHUTDOWN >> 3, L.POOL_STOP)
        K.wake_all(self._c)
        procs = [p for p in self._procs if p is not None]
        deadline = time.monotonic() + (0.5 if kill else 10.0)
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join(5)
        with self._lock:
            for ch in list(self._chunks.values()):
                if ch.seg is not None:
                    unlink_name(ch.seg)
            for ch in self._pending:
                if ch.seg is not None:
                    unlink_name(ch.seg)
            self._chunks.clear()
            self._pending.clear()
            for p in procs:
                try:
                    p.close()
                except Exception:
                    pass
            self._procs = [None] * self._n
            for a in self._arrays:
                unlink_name(a.name)
            self._arrays = []
            try:
                # The workers are gone: the result channel is ours alone, whatever
                # handles killed workers lent or left registered (unlink it whole).
                self._rx._chan().unlink()
            except Exception:
                pass
            try:
                self._tx.close()
                self._rx.close()
            except Exception:
                pass
            self._seg = None
            seg.set_state(seg.state, L.SEG_UNLINKED)
            unlink_name(seg.name)
            seg.close()
        _POOLS.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            self.join()
        else:
            self.terminate()

    def __reduce__(self):
        raise TypeError("a shm.Pool cannot be pickled or passed to another process")

    # ------------------------------------------------------------------
    @property
    def processes(self) -> int:
        return self._n

    def stats(self) -> dict:
        """Workers, tasks queued and running, tasks done and stolen per worker, workers replaced, tasks lost."""
        with self._lock:
            seg = self._seg
            if seg is None:
                return {"workers": self._n, "state": "closed"}
            w = seg.w
            workers = []
            for i in range(self._n):
                p = self._procs[i]
                workers.append({"slot": i, "pid": p.pid if p is not None else None,
                                "state": {0: "idle", 1: "busy", 2: "dead", 3: "exited"}.get(
                                    int(w[self._word(i, L.WK_STATE)]), "?"),
                                "done": int(w[self._word(i, L.WK_DONE)]),
                                "stolen": int(w[self._word(i, L.WK_STEALS)]),
                                "queued": int(K.lengths(self._c, i))})
            return {"workers": workers, "outstanding": self._outstanding, "injector": int(K.lengths(self._c, -1)),
                    "waiting": sum(c.n for c in self._pending), "pushed": int(w[L.PO_PUSHED >> 3]),
                    "replaced": int(w[L.PO_REPLACED >> 3]), "lost": self._lost,
                    "state": {RUN: "running", CLOSE: "closed", TERMINATE: "terminated"}[self._state]}

    def __repr__(self):
        state = {RUN: "running", CLOSE: "closed", TERMINATE: "terminated"}[self._state]
        return f"<shm.Pool processes={self._n} {state} outstanding={self._outstanding}>"


# --------------------------------------------------------------------------
# shm.join

_default: Pool | None = None
_default_lock = threading.Lock()


def _in_worker() -> bool:
    return mp.current_process().name.startswith("shm.Pool-")


def join(f, g, *, pool: Pool | None = None):
    """rayon's ``join``: ``(f(), g())``, with ``g`` run by a pool worker while this process runs ``f``.

    ``pool`` defaults to a pool created on first use (one worker per CPU,
    terminated at exit). Inside a pool worker both run here, one after the
    other (nested tasks are not stolen across processes). ``g`` must be
    picklable (a module-level function, or ``functools.partial`` of one).
    """
    if _in_worker():
        return f(), g()
    global _default
    if pool is None:
        with _default_lock:
            if _default is None or _default._state != RUN:
                _default = Pool()
            pool = _default
    fut = pool.submit(g)
    try:
        a = f()
    except BaseException:
        fut.cancel()
        raise
    return a, fut.result()
