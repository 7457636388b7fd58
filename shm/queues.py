"""Drop-in replacements for ``multiprocessing.Queue``, ``SimpleQueue`` and ``JoinableQueue``.

Change one line::

    from multiprocessing import Queue        # before
    from shm import Queue                    # after

and a program keeps working, with the data in shared memory instead of a
pipe fed by a background thread. Same methods and signatures, the pickle
codec (any picklable object), the standard library's ``queue.Empty`` and
``queue.Full`` (``shm.Empty``/``shm.Full`` subclass them).

Differences worth knowing:

* ``put`` returns once the object is in shared memory: there is no feeder
  thread, so ``join_thread()``/``cancel_join_thread()`` have nothing to do
  and the "deadlock on join with unconsumed items" of ``multiprocessing``
  (CPython gh-73983) cannot happen.
* ``qsize()`` works on every platform (it raises on macOS for
  ``multiprocessing``); like theirs, it is approximate.
* A producer killed in the middle of ``put`` never wedges the queue (a
  ``multiprocessing.Queue`` writer killed while holding its lock does).
* Queues can be passed to any process, not only through inheritance, and
  ``Queue.open(name)`` attaches from an unrelated one.
* Every process that has the queue counts as a possible producer and
  consumer (a forked child included, whatever it uses first), so ``get``
  blocks like ``multiprocessing``'s; but once *no* process holds the queue
  open any more (all closed or died), ``get`` raises ``shm.Disconnected``
  instead of blocking forever.
"""
from __future__ import annotations

import time

from kernels import layout as L
from kernels import words as W

from . import _async
from .channel import Receiver, Sender, _deadline, bounded, unbounded

__all__ = ["Queue", "SimpleQueue", "JoinableQueue"]


class Queue:
    """``multiprocessing.Queue(maxsize=0)`` in shared memory."""

    def __init__(self, maxsize: int = 0, *, ctx=None, name: str | None = None):
        if maxsize is None or maxsize <= 0:
            self._tx, self._rx = unbounded(codec="pickle", name=name)
            self._maxsize = 0
        else:
            self._tx, self._rx = bounded(int(maxsize), codec="pickle", name=name)
            self._maxsize = int(maxsize)
        self._closed = False
        self._sticky()

    def _sticky(self):
        # Keep both roles registered in forked children whatever they use first.
        self._tx._chan().sticky = True

    @classmethod
    def open(cls, name: str) -> "Queue":
        """Attach to the queue made with ``name=`` in another process."""
        q = cls.__new__(cls)
        q._tx = Sender.open(name)
        q._rx = Receiver.open(name)
        q._maxsize = q._tx.capacity or 0
        q._closed = False
        q._sticky()
        return q

    # -- pickling: handles travel by name ---------------------------------
    def __getstate__(self):
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        return self._tx, self._rx, self._maxsize

    def __setstate__(self, state):
        self._tx, self._rx, self._maxsize = state
        self._closed = False
        self._sticky()

    def _check(self):
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    # -- the multiprocessing.Queue API ------------------------------------
    def put(self, obj, block: bool = True, timeout: float | None = None) -> None:
        self._check()
        if block:
            self._tx.send(obj, timeout)
        else:
            self._tx.try_send(obj)

    def get(self, block: bool = True, timeout: float | None = None):
        self._check()
        if block:
            return self._rx.recv(timeout)
        return self._rx.try_recv()

    async def put_async(self, obj, timeout: float | None = None) -> None:
        """``put`` for asyncio: awaits room without blocking the event loop."""
        self._check()
        await self._tx.send_async(obj, timeout)

    async def get_async(self, timeout: float | None = None):
        """``get`` for asyncio: awaits an item without blocking the event loop."""
        self._check()
        return await self._rx.recv_async(timeout)

    def put_nowait(self, obj) -> None:
        self.put(obj, False)

    def get_nowait(self):
        return self.get(False)

    def qsize(self) -> int:
        """Approximate number of items queued (other processes keep going)."""
        return len(self._rx)

    def empty(self) -> bool:
        """Approximate, like ``multiprocessing.Queue.empty``."""
        return self.qsize() == 0

    def full(self) -> bool:
        """Approximate, like ``multiprocessing.Queue.full``."""
        return self._maxsize > 0 and self.qsize() >= self._maxsize

    def close(self) -> None:
        """This process will neither put nor get any more. Other processes go on."""
        if not self._closed:
            self._closed = True
            self._tx.close()
            self._rx.close()

    def join_thread(self) -> None:
        """No feeder thread to wait for: every put is already in shared memory."""

    def cancel_join_thread(self) -> None:
        """No feeder thread: nothing to cancel."""

    @property
    def name(self) -> str:
        return self._tx.name

    def __repr__(self):
        state = "closed" if self._closed else f"{self._tx.name!r} qsize={self.qsize()}"
        return f"<shm.{type(self).__name__} {state}>"


class SimpleQueue:
    """``multiprocessing.SimpleQueue()`` in shared memory: put, get, empty, close."""

    def __init__(self, *, ctx=None, name: str | None = None):
        self._q = Queue(0, name=name)

    def put(self, obj) -> None:
        self._q.put(obj)

    def get(self):
        return self._q.get()

    async def put_async(self, obj) -> None:
        await self._q.put_async(obj)

    async def get_async(self):
        return await self._q.get_async()

    def empty(self) -> bool:
        return self._q.empty()

    def close(self) -> None:
        self._q.close()

    def __getstate__(self):
        return self._q

    def __setstate__(self, state):
        self._q = state

    def __repr__(self):
        return f"<shm.SimpleQueue {self._q.name!r}>" if not self._q._closed else "<shm.SimpleQueue closed>"


class JoinableQueue(Queue):
    """``multiprocessing.JoinableQueue(maxsize=0)``: a Queue with ``task_done`` and ``join``.

    The count of unfinished tasks lives in the channel's control block;
    ``join`` sleeps on it (a futex), woken when it drops to zero. As with
    ``multiprocessing``, a consumer that dies between ``get`` and
    ``task_done`` leaves a task unfinished forever (``join(timeout)`` is
    there for that).
    """

    def _tasks(self):
        return self._tx._chan().ctrl.w, L.CH_TASKS >> 3

    def put(self, obj, block: bool = True, timeout: float | None = None) -> None:
        self._check()
        w, i = self._tasks()
        W.fetch_add(w, i, 1)            # counted before it can be taken and marked done
        try:
            super().put(obj, block, timeout)
        except BaseException:
            self._task_done(w, i)
            raise

    def task_done(self) -> None:
        """Mark one task taken with ``get`` as finished."""
        self._check()
        w, i = self._tasks()
        self._task_done(w, i, check=True)

    @staticmethod
    def _task_done(w, i, check=False):
        old = W.fetch_add(w, i, -1)
        if old <= 0:
            W.fetch_add(w, i, 1)
            if check:
                raise ValueError("task_done() called too many times")
            return
        if old == 1:
            W.futex_wake(w, i, 1 << 30)

    def join(self, timeout: float | None = None) -> bool:
        """Block until every item put has been marked done (or ``timeout`` passes).

        Returns True when all tasks are done, False on timeout (``multiprocessing``'s
        ``join`` takes no timeout and returns None). A negative or NaN timeout is
        a ``ValueError``, as for ``get`` and ``put``.
        """
        self._check()
        w, i = self._tasks()
        deadline = _deadline(timeout)     # a NaN deadline would never pass: ValueError, as for a negative one
        while True:
            v = W.load(w, i)
            if v <= 0:
                return True
            wait = 0.5
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return False
            W.futex_wait(w, i, v, int(wait * 1e9))

    async def join_async(self, timeout: float | None = None) -> bool:
        """``join`` for asyncio: awaits every task done without blocking the event loop."""
        self._check()
        w, i = self._tasks()
        r = await _async.wait_ready([(_TasksWord(self._tx._chan()), 0)],
                                    lambda: True if W.load(w, i) <= 0 else None, _deadline(timeout))
        return r is not None

    @property
    def unfinished_tasks(self) -> int:
        w, i = self._tasks()
        return W.load(w, i)



class _TasksWord:
    """The unfinished-tasks word as something shm/_async.py can park on (task_done wakes it at 0)."""

    def __init__(self, chan):
        self.chan = chan
        self.ctrl = chan.ctrl

    @property
    def closed(self) -> bool:
        return self.chan.closed

    def seq_offset(self, side: int) -> int:
        return L.CH_TASKS

    def _begin_wait(self, side: int) -> None:
        pass                            # task_done wakes every waiter when the count reaches 0

    def _end_wait(self, side: int) -> None:
        pass

    def check_peers(self) -> None:
        self.chan.check_peers()
