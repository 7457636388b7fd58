"""Blocking without burning CPU: spin briefly, then park on a futex.

Design notes
------------
A blocked ``recv`` (or ``send`` on a full channel) goes through three phases:

1. *Spin* inside a kernel (``ring.pop_spin_at``/``push_spin_at``): retry
   with crossbeam's Backoff (2**k ``pause`` instructions for k <= 6, then
   ``sched_yield``) for ``SPIN_STEPS`` steps, about 30-100 us. Waking a
   parked process costs 5-45 us on this kind of VM (an idle vCPU is halted
   and must be interrupted), so a peer that answers within the spin is served
   with no system call at all.
2. *Park*: set this process's bit in the channel's waiter bitmap, fence,
   read the futex word, re-check readiness (the lost-wake-up guard: anything
   published before our bit became visible is seen by this check), then
   ``futex_wait`` on the word. The other side, after each push or pop,
   fences and loads the waiter bitmap; only when a bit is set does it bump
   the word and ``futex_wake``. One of the two fences sees the other's
   store, so no wake-up is lost, and the fast path makes no system call.
3. *Check peers*: a parked waiter wakes at least every ``PEER_CHECK``
   seconds to reap dead participants (``shm/_registry.py``), so a SIGKILLed
   peer is noticed within about a second with no one calling anything.

A parked waiter uses no CPU: one futex wait per ``PEER_CHECK`` seconds.

The protocol is written once, here, over two callables (``attempt`` and
``park``); the channel supplies them for each side, and asyncio support
will adapt ``park`` to an event-loop wake-up source.
"""
from __future__ import annotations

import math
import time

from ._registry import PEER_CHECK

__all__ = ["SPIN_STEPS", "deadline_of", "block", "WOULD_BLOCK", "TIMED_OUT"]

SPIN_STEPS = 48      # kernel backoff steps before parking: 7 of pauses (~3 us), then yields

WOULD_BLOCK = object()
TIMED_OUT = object()


def deadline_of(timeout) -> float | None:
    """The monotonic deadline of ``timeout`` seconds (None: forever)."""
    if timeout is None:
        return None
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}") from None
    if math.isnan(t) or t < 0:
        raise ValueError("timeout must be a non-negative number of seconds (or None to wait forever)")
    return time.monotonic() + t


def block(attempt, park, deadline, tick, spin=None):
    """Call ``attempt()`` until it returns something other than WOULD_BLOCK.

    ``spin()`` is tried once before parking; ``park(seconds)`` sleeps until
    woken or the time passes; ``tick()`` runs every PEER_CHECK seconds while
    blocked. Returns TIMED_OUT once ``deadline`` passes.
    """
    r = attempt()
    if r is not WOULD_BLOCK:
        return r
    if spin is not None:
        r = spin()
        if r is not WOULD_BLOCK:
            return r
    # Peer checks are spaced across calls, not only within one: a caller
    # that polls with short timeouts (shm.Pool's collector, a select loop)
    # must still reap dead peers every PEER_CHECK seconds. The time of the
    # last check lives on the object ``tick`` is a method of, when it is one.
    owner = getattr(tick, "__self__", None)
    now = time.monotonic()
    last = getattr(owner, "_last_tick", None)
    if last is None:
        last = now
        _note_tick(owner, now)
    next_tick = last + PEER_CHECK
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return TIMED_OUT
        if now >= next_tick:
            tick()
            _note_tick(owner, now)
            next_tick = now + PEER_CHECK
            r = attempt()
            if r is not WOULD_BLOCK:
                return r
        wait = next_tick - now
        if deadline is not None:
            wait = min(wait, deadline - now)
        park(max(wait, 0.0))
        r = attempt()
        if r is not WOULD_BLOCK:
            return r


def _note_tick(owner, now: float) -> None:
    if owner is not None:
        try:
            owner._last_tick = now
        except AttributeError:      # an object with __slots__: per-call spacing only
            pass
