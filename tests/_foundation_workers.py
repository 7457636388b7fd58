"""Functions the foundation tests run in child processes.

They live in a module of their own (not in a test file) so that a child
started with the ``spawn`` method can import them without importing pytest
or a test module. Each worker attaches to a segment by name, does its part,
records its result in the segment and closes its mapping; the parent owns
the segment and unlinks it.

The kernels here are compiled without ``cache=True`` on purpose: they inline
``kernels/atomics.py``, and numba's default cache key covers only this file,
so a cached copy would keep running stale atomics after an edit there.
"""
from __future__ import annotations

import os
import time

import numba
import numpy as np

from kernels import atomics as A
from kernels import syscalls as S
from kernels import words as W
from shm.segment import Segment

BARRIER_TIMEOUT_NS = 60_000_000_000     # hang guard only: a sibling that never arrives


@numba.njit(nogil=True)
def barrier(w, i, parties, deadline_ns):
    """Arrive at the counter ``w[i]`` and spin until ``parties`` have arrived.

    Returns False if the deadline passed first (a sibling died or never started).
    """
    A.fetch_add(w, i, 1, "seq_cst")
    while A.load(w, i, "acquire") < parties:
        if S.monotonic_ns() > deadline_ns:
            return False
        A.pause()
    return True


@numba.njit(nogil=True)
def atomic_increments(w, i, n):
    # The result is used (summed), so the add must be a `lock xadd`, not a `lock add`.
    s = 0
    for _ in range(n):
        s += A.fetch_add(w, i, 1, "relaxed")
    return s


@numba.njit(nogil=True)
def plain_increments(w, i, n):
    # LLVM folds this loop into a single non-atomic `add n` to memory.
    for _ in range(n):
        w[i] += 1


@numba.njit(nogil=True)
def split_increments(w, i, n):
    # A read-modify-write made of an atomic load and an atomic store: each
    # access is atomic, the pair is not, and LLVM cannot fold the loop.
    for _ in range(n):
        A.store(w, i, A.load(w, i, "relaxed") + 1, "relaxed")


INCREMENTS = {"atomic": atomic_increments, "plain": plain_increments, "split": split_increments}


def count(name: str, barrier_i: int, counter_i: int, n: int, mode: str, times_i: int) -> None:
    """Attach to ``name``, meet the sibling at the barrier, then add 1 ``n`` times.

    ``mode`` is a key of INCREMENTS: how each 1 is added. The loop's start and
    end (monotonic ns) go to the first free pair of words from ``times_i``,
    so the parent can tell whether the two loops really overlapped.
    """
    increment = INCREMENTS[mode]
    increment(np.zeros(1, np.int64), 0, 1)     # compile now: the sibling must not wait for it
    seg = Segment.attach(name)
    try:
        w = seg.w
        if not barrier(w, barrier_i, 2, time.monotonic_ns() + BARRIER_TIMEOUT_NS):
            raise SystemExit(3)
        t0 = time.monotonic_ns()
        increment(w, counter_i, n)
        t1 = time.monotonic_ns()
        k = W.fetch_add(w, times_i, 1)
        w[times_i + 1 + 2 * k] = t0
        w[times_i + 2 + 2 * k] = t1
        del w
    finally:
        seg.close()


@numba.njit(nogil=True)
def park(w, i, expected, timeout_ns):
    return S.futex_wait(w, i, expected, timeout_ns)


def futex_parker(name: str, word_i: int, result_i: int, timeout_ns: int) -> None:
    """Park on ``w[word_i]`` (expected 0); store the futex result + 100 in ``w[result_i]``."""
    seg = Segment.attach(name)
    try:
        r = park(seg.w, word_i, 0, timeout_ns)
        W.store(seg.w, result_i, r + 100)
    finally:
        seg.close()


def read_and_reply(name: str, offset: int, length: int, reply_offset: int) -> None:
    """Attach, check that bytes [offset, offset+length) hold i % 251, then write the reply.

    The reply is the byte pattern (255 - i % 251) at ``reply_offset``, and the
    child's pid in the word just before it, so the parent sees it really ran.
    """
    seg = Segment.attach(name)
    try:
        data = bytes(seg.u8[offset:offset + length])
        expected = bytes(i % 251 for i in range(length))
        if data != expected:
            raise SystemExit(4)
        seg.u8[reply_offset:reply_offset + length] = [255 - i % 251 for i in range(length)]
        W.store(seg.w, (reply_offset >> 3) - 1, os.getpid())
    finally:
        seg.close()


def attach_and_exit(name: str) -> None:
    """Attach, read the header and exit without closing: what a careless child does."""
    seg = Segment.attach(name)
    assert seg.size >= 256
