"""asyncio for channels: awaitable send and receive, with no thread per waiter.

Design notes
------------
A blocked sync call parks its own thread on its channel side's sequence
word (``shm/_wait.py``). An event loop must not block, so an awaiting
coroutine hands the wait to a *bridge*: one daemon thread per process that
parks on every awaited word at once (``futex_waitv``, ``shm/_multiwait.py``)
and completes the waiting coroutines' futures through
``loop.call_soon_threadsafe`` (the loop's self-pipe: a file descriptor it
already watches).

The waiting protocol is the sync one, split across the two threads:

1. The coroutine tries the operation (``try_recv``/``try_send``), for up
   to ``SPIN`` seconds on its first round.
2. It registers: sets this process's bit in the side's waiter bitmap (so
   the other side starts bumping the word and waking), reads the word,
   then tries once more (the lost-wake-up guard: anything published before
   the bit was visible is seen by this try).
3. It awaits its future. The bridge completes it as soon as the word no
   longer holds the value read in 2 (woken or not), or every
   ``PEER_CHECK`` seconds after reaping dead peers (so a SIGKILLed sender
   still disconnects an awaiting receiver). Then back to 1.

Only step 1 and 2's tries take a message, and they are synchronous: a
coroutine cancelled while awaiting (``asyncio.wait_for``, ``asyncio.timeout``,
task cancellation) has taken nothing, and its registration is removed in a
``finally``. The same machinery serves ``shm.select_async`` (one future,
several words).

Rejected: a thread per waiter or per channel (threads multiply); an eventfd
per process signalled by the other side (the other side would need our file
descriptor: passing fds between unrelated processes is fragile);
``loop.run_in_executor`` around the blocking call (a thread per waiter, and
a cancelled wait would still take a message).
"""
from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np

from kernels import layout as L
from kernels import ring as R
from kernels import syscalls as S
from kernels import words as W

from ._multiwait import wait_any
from ._registry import PEER_CHECK
from .errors import Disconnected

__all__ = ["wait_ready", "Registration", "SPIN"]

# Retry this long before handing the wait to the bridge. A wake-up through
# the bridge costs two thread wake-ups (5-45 us each on this kind of VM); a
# peer answering within the spin costs none. The loop is held meanwhile, as
# a sync recv's spin holds its thread: 50 us is below what an event loop
# notices, and only the first wait of each await spins.
SPIN = 50e-6


def seq_word(side: int) -> int:
    """Byte offset, in the control segment, of ``side``'s sequence (futex) word."""
    return L.CH_RX_SEQ if side == R.SIDE_RX else L.CH_TX_SEQ


class Registration:
    """Some channel sides a coroutine waits on, with the word values it read, and its future."""

    __slots__ = ("sides", "words", "future", "loop", "done")

    def __init__(self, sides, loop):
        self.sides = sides              # [(chan, side)], distinct
        self.loop = loop
        self.future = loop.create_future()
        self.done = False
        self.words = []
        for chan, side in sides:
            chan._begin_wait(side)
        for chan, side in sides:        # after every bit is set (each set is a full barrier)
            off = chan.seq_offset(side) if hasattr(chan, "seq_offset") else seq_word(side)
            self.words.append((chan, chan.ctrl.addr + off, off >> 3, W.load(chan.ctrl.w, off >> 3)))
        _bridge().add(self)

    def fire(self) -> None:
        """From the bridge thread: wake the coroutine (idempotent)."""
        if not self.done:
            self.done = True
            try:
                self.loop.call_soon_threadsafe(_resolve, self.future)
            except RuntimeError:
                pass                    # the loop was closed: nobody is waiting any more

    def cancel(self) -> None:
        """From the coroutine, always (finally): unregister."""
        self.done = True
        _bridge().remove(self)
        for chan, side in self.sides:
            chan._end_wait(side)


def _resolve(fut) -> None:
    if not fut.done():
        fut.set_result(None)


async def wait_ready(sides, attempt, deadline):
    """Await until ``attempt()`` returns something other than None; None after ``deadline``.

    ``attempt`` runs in the loop's thread: it is the caller's non-blocking
    operation (returning None when it would block).
    """
    loop = asyncio.get_running_loop()
    spin_until = time.perf_counter() + SPIN
    while True:
        r = attempt()
        if r is not None:
            return r
        if time.perf_counter() < spin_until:
            os.sched_yield()            # let the peer run (2 cores): it may be about to answer
            continue                    # a peer that answers within the spin costs no wake-up
        reg = Registration(sides, loop)
        try:
            r = attempt()
            if r is not None:
                return r
            if deadline is None:
                await reg.future
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                done, _ = await asyncio.wait({reg.future}, timeout=remaining)
                if not done:
                    return None
        finally:
            reg.cancel()


async def messages(recv_async):
    """``async for``: ``await recv_async()`` until the other side is gone (Disconnected)."""
    while True:
        try:
            msg = await recv_async()
        except Disconnected:
            return
        yield msg


# --------------------------------------------------------------------------
# The bridge: one thread per process.

class _Bridge:
    def __init__(self):
        self.lock = threading.Lock()
        self.regs: set[Registration] = set()
        self.kick_word = np.zeros(1, np.int64)        # wakes the thread when the set changes
        self.thread = None

    def add(self, reg: Registration) -> None:
        with self.lock:
            self.regs.add(reg)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="shm-async-bridge", daemon=True)
                self.thread.start()
        self._kick()

    def remove(self, reg: Registration) -> None:
        with self.lock:
            self.regs.discard(reg)

    def _kick(self) -> None:
        W.fetch_add(self.kick_word, 0, 1)
        S.futex_wake(self.kick_word, 0, 1)

    def _run(self) -> None:
        next_tick = [time.monotonic() + PEER_CHECK]
        while True:
            try:
                self._once(next_tick)
            except Exception:           # never let the bridge die: wake everyone, go on
                with self.lock:
                    regs = list(self.regs)
                for r in regs:
                    r.fire()
                time.sleep(0.001)

    def _once(self, tick) -> None:
        """One round: fire what changed, park on the rest (and on our kick word)."""
        kick = int(W.load(self.kick_word, 0))
        with self.lock:
            regs = [r for r in self.regs if not r.done]
        now = time.monotonic()
        if now >= tick[0]:
            chans = {id(c): c for r in regs for c, _ in r.sides}
            for c in chans.values():
                try:
                    c.check_peers()
                except Exception:
                    pass
            for r in regs:
                r.fire()                # every waiter re-checks: a peer may have died
            tick[0] = now + PEER_CHECK
            return
        words = [(self.kick_word.ctypes.data, kick)]
        for r in regs:
            try:
                changed = any(chan.closed or W.load(chan.ctrl.w, idx) != seen for chan, _, idx, seen in r.words)
            except Exception:           # closed under us, say: let the coroutine find out
                changed = True
            if changed:
                r.fire()
            else:
                words.extend((addr, seen) for _, addr, _, seen in r.words)
        if not regs:
            tick[0] = now + PEER_CHECK
            wait_any(words, 3600.0)     # idle: only a new registration wakes us
        else:
            wait_any(words, max(0.0, tick[0] - now))


_BRIDGE: _Bridge | None = None
_BRIDGE_LOCK = threading.Lock()


def _bridge() -> _Bridge:
    global _BRIDGE
    b = _BRIDGE
    if b is None:
        with _BRIDGE_LOCK:
            if _BRIDGE is None:
                _BRIDGE = _Bridge()
            b = _BRIDGE
    return b


def _after_fork_child() -> None:
    global _BRIDGE, _BRIDGE_LOCK
    _BRIDGE = None                      # its thread does not exist here
    _BRIDGE_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_child)
