"""Waiting on several futex words at once: what ``select`` and the asyncio bridge park on.

A blocked ``recv`` parks on one word (its channel side's sequence word,
``kernels/ring.py``: ``park_at``). Waiting for any of several channels
needs a wait on several words: Linux's ``futex_waitv`` (5.16+) sleeps
until any of them is woken or no longer holds the value the caller read,
with no thread per word. Called through ctypes, which releases the GIL
for the duration of the system call.

Rejected: one thread per channel (threads and wake-ups multiply with the
number of channels); polling with short sleeps (latency or CPU, pick one).
Where ``futex_waitv`` is missing (older kernels, macOS) we fall back to a
``futex_wait`` on the first word, at most 1 ms at a time: correct, since
every waiter re-checks its conditions after any return, but not free.

Words are 64-bit in our layouts; the futex is their low 32 bits (the
kernels bump the word on every wake-up, so the low half changes too).
"""
from __future__ import annotations

import ctypes
import errno
import platform
import sys
import time

import numpy as np

from kernels import syscalls as S

__all__ = ["wait_any", "HAVE_WAITV"]

_SYS_FUTEX_WAITV = {"x86_64": 449, "amd64": 449, "aarch64": 449, "arm64": 449}.get(platform.machine().lower())
_FUTEX2_SIZE_U32 = 0x02
_CLOCK_MONOTONIC = 1
_MAX = 128                      # the kernel's limit on words per call


class _Waitv(ctypes.Structure):
    _fields_ = [("val", ctypes.c_uint64), ("uaddr", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _probe() -> bool:
    if not sys.platform.startswith("linux") or _SYS_FUTEX_WAITV is None:
        return False
    word = ctypes.c_uint64(0)
    w = (_Waitv * 1)()
    w[0].val, w[0].uaddr, w[0].flags = 1, ctypes.addressof(word), _FUTEX2_SIZE_U32
    r = _syscall(ctypes.c_long(_SYS_FUTEX_WAITV), w, ctypes.c_uint(1), ctypes.c_uint(0),
                 ctypes.c_void_p(0), ctypes.c_int(_CLOCK_MONOTONIC))
    return r == -1 and ctypes.get_errno() == errno.EAGAIN      # the value differed: it exists


HAVE_WAITV = _probe()


def wait_any(words, timeout: float) -> None:
    """Sleep until one of ``words`` (``(address, expected)`` pairs) is woken or changed, or ``timeout``.

    Returns early, spuriously or not: callers re-check their conditions.
    """
    n = len(words)
    if n == 0:
        time.sleep(timeout)
        return
    if not HAVE_WAITV or n > _MAX:
        addr, expected = words[0]
        ns = int(min(timeout, 0.001 if n > 1 else timeout) * 1e9)
        arr = (ctypes.c_int64 * 1).from_address(addr)
        S.futex_wait(np.ctypeslib.as_array(arr), 0, expected, max(ns, 0))
        return
    w = (_Waitv * n)()
    for i, (addr, expected) in enumerate(words):
        w[i].val = expected & 0xFFFFFFFF
        w[i].uaddr = addr
        w[i].flags = _FUTEX2_SIZE_U32
    deadline = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + int(max(timeout, 0.0) * 1e9)
    ts = _Timespec(deadline // 1_000_000_000, deadline % 1_000_000_000)
    _syscall(ctypes.c_long(_SYS_FUTEX_WAITV), w, ctypes.c_uint(n), ctypes.c_uint(0),
             ctypes.byref(ts), ctypes.c_int(_CLOCK_MONOTONIC))
