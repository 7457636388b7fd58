"""The body of a ``shm.Pool`` worker process.

A worker attaches the pool's segment, runs the initializer, then loops:
take a task (``kernels.pool.take``: own deque, injector, peers), decode its
chunk's payload from the arena (cached: the tasks of one chunk share it),
run it, and buffer the result. Results go back to the parent through one
shm channel (bytes, pickled here in batches): when ``FLUSH_COUNT`` records
are buffered, when ``FLUSH_SECONDS`` have passed since the last send, and
always before going idle, so the parent's quiescence scan (kernels/pool.py)
never sees an idle worker holding unsent results.

A task that raises anything, ``SystemExit`` and ``KeyboardInterrupt``
included, fails that task only: a worker leaves its loop only when the pool
says so (``POOL_STOP``), at ``maxtasksperchild``, or when its parent is
gone, and only then marks itself ``WS_EXITED`` (a clean exit the parent
does not count as a death).
"""
from __future__ import annotations

import os
import pickle
import random
import signal
import sys
import time
import traceback

from kernels import layout as L
from kernels import pool as K

from . import _liveness
from .errors import Disconnected
from .segment import Segment

OK = 0
ERR = 1
PARTIAL = 2        # (cid, -count, PARTIAL, value): count tasks of a reduce/fold chunk, folded
PARTIAL_ERR = 3    # (cid, -count, PARTIAL_ERR, error): their partial could not be sent
LIST = 4           # (cid, start, LIST, [values]): tasks start .. start + len - 1 all returned

MODE_CALL = 0       # fn(x)
MODE_STAR = 1       # fn(*x)
MODE_APPLY = 2      # fn(*args, **kwargs), x = (args, kwargs)
MODE_REDUCE = 3     # fn(x) folded into this worker's partial with extra = reduce
MODE_FOLD = 4       # acc = fn(acc, x), starting from extra = initial
MODE_ARRAY = 5      # fn(view[start:stop]), x = (start, stop), extra = the array's descriptor
MODE_STAGED = 6     # fn(*args, **kwargs), x = pickle.dumps((args, kwargs)): calls coalesced by submit

FLUSH_COUNT = 64               # result records (a LIST record holds a whole run)
LEAF_SECONDS = 300e-6          # a worker takes runs of about this much work
MAX_LEAF = 1024
FLUSH_SECONDS = 0.002            # ...or this long since the last send (every result, when tasks are slower)
SPIN_NS = int(os.environ.get("SHM_POOL_SPIN_NS", K.SPIN_NS))   # (an experiment knob; see kernels/pool.py)
PARK_NS = 100_000_000        # an idle worker looks at its parent at least this often
_CACHE = 64                  # decoded chunks kept


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (the ``__cause__`` of what the caller gets)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


def _rebuild_exc(exc, tb):
    exc.__cause__ = RemoteTraceback(tb)
    return exc


class _Raised:
    """An exception with its formatted traceback, picklable (concurrent.futures does the same)."""

    def __init__(self, exc: BaseException):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.exc = exc
        self.tb = f'\n"""\n{tb}"""'

    def __reduce__(self):
        return _rebuild_exc, (self.exc, self.tb)


def _picklable_error(exc: BaseException):
    wrapped = _Raised(exc)
    try:
        pickle.loads(pickle.dumps(wrapped, protocol=5))     # both ways: a custom __init__ can fail to load
        return wrapped
    except Exception:
        return _Raised(RuntimeError(f"{type(exc).__name__}: {exc} (the exception itself could not be pickled)"))


class _Arrays:
    """Shared arrays for ``for_each_chunk``, mapped once per worker; the ``KEEP`` most recent stay mapped.

    (A copied array's segment is unlinked by the parent after its call; its
    pages are freed only when every worker has unmapped it too.)
    """

    KEEP = 4

    def __init__(self):
        self.maps = {}

    def view(self, desc):
        import numpy as np
        name, offset, dtype, shape, strides = desc
        seg = self.maps.pop(name, None)
        if seg is None:
            while len(self.maps) >= self.KEEP:
                old = self.maps.pop(next(iter(self.maps)))
                try:
                    old.close()
                except Exception:       # a view the task kept still uses it: let it go with the view
                    pass
            seg = Segment.attach(name, kind=L.KIND_BLOB, what="pool array")
        self.maps[name] = seg           # most recent last
        count = 1
        for s in shape:
            count *= s
        base = np.frombuffer(seg.mm, dtype=np.dtype(dtype), count=count, offset=offset)
        return np.lib.stride_tricks.as_strided(base, shape=shape, strides=strides)

    def close(self):
        for seg in self.maps.values():
            try:
                seg.close()
            except Exception:
                pass
        self.maps.clear()


class Worker:
    def __init__(self, pool_name: str, slot: int, results, parent_pid: int, max_tasks: int = 0):
        self.seg = Segment.attach(pool_name, kind=L.KIND_POOL, what="pool")
        self.c = self.seg.addr
        self.slot = slot
        self.results = results
        self.parent_pid = parent_pid
        p = self.seg.params
        self.arena_off = p[L.PP_ARENA]
        self.arena_size = p[L.PP_ARENA_SIZE]
        self.mm = self.seg.mm
        self.cache: dict[int, tuple] = {}
        self.segs: dict[str, Segment] = {}
        self.arrays = _Arrays()
        self.buf: list = []
        self.partials: dict[int, list] = {}
        self.last_flush = time.perf_counter()
        self.rng = random.Random()
        self.ran = 0
        self.max_tasks = max_tasks

    # ------------------------------------------------------------------
    def chunk(self, rec: int):
        """The decoded ``(id, fn, mode, extra, items)`` of the chunk record at arena offset ``rec``."""
        base = self.arena_off + rec
        w = self.seg.w
        cid = int(w[(base + L.CK_ID) >> 3])
        hit = self.cache.get(rec)
        if hit is not None and hit[0] == cid:
            return hit
        n = int(w[(base + L.CK_NBYTES) >> 3])
        flags = int(w[(base + L.CK_FLAGS) >> 3])
        data = self.mm[base + L.CK_DATA: base + L.CK_DATA + n]
        if flags & L.CHUNK_SEGMENT:
            name = data.decode("ascii")
            seg = Segment.attach(name, kind=L.KIND_BLOB, what="pool task payload")
            try:
                size = int(seg.params[L.PB_CAPACITY])
                data = seg.mm[L.BLOB_DATA:L.BLOB_DATA + size]
            finally:
                seg.close()
        fn, mode, extra, items = pickle.loads(data)
        if len(self.cache) >= _CACHE:
            self.cache.pop(next(iter(self.cache)))
        hit = self.cache[rec] = (cid, fn, mode, extra, items)
        return hit

    def run(self, task: int) -> None:
        """Run the tasks of one run (kernels/pool.py: ``record << 32 | start << 16 | count``)."""
        rec = (task >> K.REC_SHIFT) << 6
        start = (task >> K.START_SHIFT) & K.COUNT_MASK
        count = task & K.COUNT_MASK
        buf = self.buf
        try:
            cid, fn, mode, extra, items = self.chunk(rec)
        except BaseException as e:      # the payload could not be decoded (e.g. fn not importable here)
            err = _picklable_error(e)
            cid = self._cid_at(rec)
            for i in range(start, start + count):
                buf.append((cid, i, ERR, err))
            return
        if mode in (MODE_REDUCE, MODE_FOLD):
            for i in range(start, start + count):
                self.fold(cid, fn, mode, extra, items[i], i)
            return
        # One loop per mode; when a task raises, the tasks before it (``vals``)
        # are reported, then its error, and the loop resumes after it.
        i, end = start, start + count
        while i < end:
            vals = []
            app = vals.append
            try:
                if mode == MODE_CALL:
                    for x in items[i:end]:
                        app(fn(x))
                elif mode == MODE_STAR:
                    for x in items[i:end]:
                        app(fn(*x))
                elif mode == MODE_STAGED:
                    loads = pickle.loads
                    for x in items[i:end]:
                        a, k = loads(x)
                        app(fn(*a, **k))
                elif mode == MODE_APPLY:
                    for a, k in items[i:end]:
                        app(fn(*a, **k))
                else:
                    view = self.arrays.view(extra)
                    for lo, hi in items[i:end]:
                        app(fn(view[lo:hi]))
            except BaseException as e:         # SystemExit too: it fails the task, not the worker
                j = i + len(vals)
                if vals:
                    buf.append((cid, i, LIST, vals))
                buf.append((cid, j, ERR, _picklable_error(e)))
                i = j + 1
                continue
            if vals:
                buf.append((cid, i, LIST, vals))
            break

    def fold(self, cid, fn, mode, extra, x, i) -> None:
        try:
            p = self.partials.get(cid)
            if mode == MODE_REDUCE:
                v = fn(x)
                if p is None:
                    self.partials[cid] = [1, v]
                else:
                    p[1] = extra(p[1], v)
                    p[0] += 1
            else:  # MODE_FOLD
                if p is None:
                    p = self.partials[cid] = [0, pickle.loads(extra)]
                p[1] = fn(p[1], x)
                p[0] += 1
        except BaseException as e:
            self.buf.append((cid, i, ERR, _picklable_error(e)))

    def _cid_at(self, rec: int) -> int:
        return int(self.seg.w[(self.arena_off + rec + L.CK_ID) >> 3])

    # ------------------------------------------------------------------
    def flush(self) -> None:
        if self.partials:
            for cid, (count, acc) in self.partials.items():
                self.buf.append((cid, -count, PARTIAL, acc))
            self.partials.clear()
        if not self.buf:
            return
        buf, self.buf = self.buf, []
        # Two layers: what the records are (always loadable), then their values,
        # so a value the parent cannot unpickle fails its own tasks, not the batch.
        meta = [(cid, idx, code, len(v) if code == LIST else 1) for cid, idx, code, v in buf]
        try:
            values = pickle.dumps([r[3] for r in buf], protocol=5)
        except Exception:
            buf = [self._one(r) for r in buf]
            meta = [(cid, idx, code, len(v) if code == LIST else 1) for cid, idx, code, v in buf]
            values = pickle.dumps([r[3] for r in buf], protocol=5)
        self.results.send(pickle.dumps((meta, values), protocol=5))
        self.last_flush = time.perf_counter()

    @staticmethod
    def _one(r):
        try:
            pickle.dumps(r, protocol=5)
            return r
        except Exception as e:
            cid, idx, code, value = r
            what = "partial result" if code == PARTIAL else "result"
            err = _picklable_error(TypeError(
                f"the task's {what} ({type(value).__name__}) could not be pickled to send it back to the caller: {e}"))
            return (cid, idx, PARTIAL_ERR if code == PARTIAL else ERR, err)

    def parent_gone(self) -> bool:
        return os.getppid() != self.parent_pid

    def loop(self) -> None:
        c, me, take, run = self.c, self.slot, K.take, self.run
        shutdown = self.seg.w[L.PO_SHUTDOWN >> 3:(L.PO_SHUTDOWN >> 3) + 1]
        rng = self.rng.randrange
        nw = int(self.seg.params[L.PP_WORKERS])
        clock = time.perf_counter
        per_task = LEAF_SECONDS        # measured seconds per task (EMA): the first run is one task
        while True:
            leaf = int(LEAF_SECONDS / per_task) if per_task > 0 else 64
            if self.max_tasks and leaf > self.max_tasks - self.ran:
                leaf = self.max_tasks - self.ran
            task = take(c, me, rng(nw), 1 if leaf < 1 else (MAX_LEAF if leaf > MAX_LEAF else leaf))
            if task >= 0:
                t0 = clock()
                run(task)
                t1 = clock()
                n = task & K.COUNT_MASK
                per_task = 0.5 * per_task + 0.5 * ((t1 - t0) / n)
                self.ran += n
                if len(self.buf) >= FLUSH_COUNT or t1 - self.last_flush > FLUSH_SECONDS:
                    self.flush()
                    if self.parent_gone():
                        return
                if self.max_tasks and self.ran >= self.max_tasks:
                    self.flush()
                    return
                continue
            if shutdown[0] == L.POOL_RUN and K.spin(c, SPIN_NS):
                if self.buf and clock() - self.last_flush > FLUSH_SECONDS:
                    self.flush()
                continue                # more work came while we looked: results keep batching
            self.flush()                # always before going idle (kernels/pool.py: quiescence)
            if shutdown[0] != L.POOL_RUN or self.parent_gone():
                return
            K.idle_park(c, me, PARK_NS)


def _set_state(seg, slot: int, state: int) -> None:
    from kernels import words as Wd
    Wd.store(seg.w, (seg.params[L.PP_TABLE] + slot * L.WK_SIZE + L.WK_STATE) >> 3, state)


def main(pool_name: str, slot: int, results, parent_pid: int, initializer, initargs, max_tasks: int = 0) -> None:
    """Entry point of a worker process (``multiprocessing.Process`` target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the parent's to handle (it terminates the pool)
    try:
        w = Worker(pool_name, slot, results, parent_pid, max_tasks or 0)
    except Exception as e:
        print(f"shm.Pool worker {slot}: cannot attach the pool ({e}); exiting", file=sys.stderr)
        sys.exit(2)
    ident = _liveness.me()
    K.settle(w.c, slot, ident.pid, ident.start)
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as e:
            _set_state(w.seg, slot, L.WS_EXITED)
            results.send(pickle.dumps(([(-1, slot, ERR, 1)], pickle.dumps([_picklable_error(e)], protocol=5)),
                                      protocol=5))
            results.close()
            w.seg.close()
            sys.exit(3)
    try:
        w.loop()            # an exception out of here is a crash: the parent sees a non-zero exit
        w.flush()
    except Disconnected:
        if w.parent_gone():
            os._exit(0)     # nobody left to report to
        raise
    _set_state(w.seg, slot, L.WS_EXITED)
    try:
        w.arrays.close()
        results.close()
    finally:
        w.seg.close()
