"""Waiting on several channel operations at once: ``shm.select`` and ``shm.select_async``.

>>> import shm
>>> tx1, rx1 = shm.bounded(4); tx2, rx2 = shm.bounded(4)
>>> tx2.send("b")
>>> shm.select([rx1, rx2], timeout=1)           # (index of the one that completed, value)
(1, 'b')
>>> shm.select([rx1, (tx1, "x")], timeout=1)    # a (Sender, message) pair is a send
(1, None)

What crossbeam's ``Select`` and flume's ``Selector`` give Rust threads:
exactly one of the operations completes (a receive takes one message, a
send puts one), and the call says which.

Design notes
------------
*Fairness.* Each round tries the operations starting at a random one, so
when several are ready each is equally likely to be chosen and none starves
(crossbeam shuffles the same way).

*Waiting* is the single-channel protocol (``shm/_wait.py``) over every side
at once: set this process's waiter bit on each side, read each side's
sequence word, try every operation again (the lost-wake-up guard), then
sleep on all the words with one ``futex_waitv`` (``shm/_multiwait.py``)
until any changes. Every ``PEER_CHECK`` seconds it reaps dead peers of
every channel, so a SIGKILLed peer is noticed as in ``recv``.

*Disconnection* makes an operation ready (as in crossbeam): a receive on a
drained channel whose senders are gone, or a send with no receiver left,
raises ``Disconnected`` with ``.index`` naming the operation, so the caller
can drop it and select again.

Rejected: a thread per operation; polling; a select kernel in numba (the
operations are the handles' own ``try_recv``/``try_send``, with their
codecs, blobs and generations: one code path, no copy of it).
"""
from __future__ import annotations

import random
import time

from kernels import ring as R
from kernels import words as W

from . import _async
from ._multiwait import wait_any
from ._registry import PEER_CHECK
from .channel import Receiver, Sender, _deadline
from .errors import Disconnected, Empty, Full, SelectTimeout

__all__ = ["select", "select_async"]

_NOTHING = object()


class _Op:
    __slots__ = ("index", "handle", "message", "is_send")

    def __init__(self, index, op):
        if isinstance(op, Receiver):
            self.handle, self.message, self.is_send = op, None, False
        elif isinstance(op, tuple) and len(op) == 2 and isinstance(op[0], Sender):
            self.handle, self.message, self.is_send = op[0], op[1], True
        else:
            raise TypeError(f"select: operation {index} must be a Receiver or a (Sender, message) pair, "
                            f"not {type(op).__name__}")
        self.index = index

    def attempt(self):
        """(index, value) if it completed now, else None. Raises Disconnected with .index."""
        try:
            if self.is_send:
                self.handle.try_send(self.message)
                return self.index, None
            v = self.handle._poll(_NOTHING)
            return None if v is _NOTHING else (self.index, v)
        except (Empty, Full):
            return None
        except Disconnected as e:
            e.index = self.index
            raise


def _ops(ops) -> list[_Op]:
    out = [_Op(i, op) for i, op in enumerate(ops)]
    if not out:
        raise ValueError("select needs at least one operation")
    return out


def _attempt_all(ops):
    n = len(ops)
    start = random.randrange(n)
    for k in range(n):
        r = ops[(start + k) % n].attempt()
        if r is not None:
            return r
    return None


def _sides(ops):
    seen, out = set(), []
    for op in ops:
        c = op.handle._chan()
        side = R.SIDE_TX if op.is_send else R.SIDE_RX
        if (id(c), side) not in seen:
            seen.add((id(c), side))
            out.append((c, side))
    return out


_NO_DEFAULT = object()


def select(ops, timeout: float | None = None, *, default=_NO_DEFAULT):
    """Complete exactly one of ``ops`` and return ``(index, value)``.

    ``ops`` holds Receivers (a receive: ``value`` is the message) and
    ``(Sender, message)`` pairs (a send: ``value`` is None). Waits up to
    ``timeout`` seconds (None: forever; 0: only what is ready now) and raises
    ``SelectTimeout`` (a ``TimeoutError``) if none completed. With
    ``default=``, nothing waits: if no operation is ready now it returns
    ``(None, default)`` (crossbeam's ``default`` branch). An operation whose
    other side is gone raises ``Disconnected`` with ``.index``.
    """
    ops = _ops(ops)
    if default is not _NO_DEFAULT:
        if timeout is not None:
            raise ValueError("select: give a timeout or a default, not both")
        r = _attempt_all(ops)
        return r if r is not None else (None, default)
    deadline = _deadline(timeout)
    r = _attempt_all(ops)
    if r is not None:
        return r
    sides = _sides(ops)
    for c, side in sides:
        c._begin_wait(side)
    try:
        next_tick = time.monotonic() + PEER_CHECK
        while True:
            words = []
            for c, side in sides:
                off = _async.seq_word(side)
                words.append((c.ctrl.addr + off, W.load(c.ctrl.w, off >> 3)))
            r = _attempt_all(ops)
            if r is not None:
                return r
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise SelectTimeout(f"none of the {len(ops)} operations completed before the timeout")
            if now >= next_tick:
                for c, _ in sides:
                    c.check_peers()
                next_tick = now + PEER_CHECK
                continue
            wait_any(words, (next_tick if deadline is None else min(next_tick, deadline)) - now)
    finally:
        for c, side in sides:
            c._end_wait(side)


async def select_async(ops, timeout: float | None = None):
    """``select`` for asyncio: awaits without blocking the event loop (same arguments and results).

    Cancelling it (``asyncio.wait_for``, ``asyncio.timeout``) completes no operation.
    """
    ops = _ops(ops)
    deadline = _deadline(timeout)
    r = await _async.wait_ready(_sides(ops), lambda: _attempt_all(ops), deadline)
    if r is None:
        raise SelectTimeout(f"none of the {len(ops)} operations completed before the timeout")
    return r
