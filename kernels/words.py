"""Atomic word operations callable from the interpreter, for slow paths.

The Python layer (``shm/``) holds no atomics of its own: when it registers a
participant, lends a token, flips a segment's state or sets a waiter bit, it
calls one of these compiled kernels on an ``int64`` view of the segment. They
cost ~0.3 us a call (a numba call with an array argument), which is fine for
paths taken once per open, close, park or recovery; the hot paths are the
``*_at`` kernels in ``ring.py``.

Indices are word indices (byte offset // 8), bounds-checked here because the
callers are Python code, not kernels. Every operation is seq_cst: these are
rare, and the registry protocols are easier to argue with one total order.
"""
from __future__ import annotations

from . import atomics as A
from . import syscalls as S
from ._jit import jit

_SIG = "int64[::1]"


@jit(f"boolean({_SIG}, int64)")
def _ok(a, i):
    return 0 <= i < a.shape[0]


@jit(f"int64({_SIG}, int64)")
def load(a, i):
    """Atomic seq_cst load of ``a[i]``."""
    if not _ok(a, i):
        raise IndexError("word index out of range")
    return A.load(a, i, "seq_cst")


@jit(f"int64({_SIG}, int64, int64)")
def store(a, i, v):
    """Atomic seq_cst store ``a[i] = v``; returns ``v``."""
    if not _ok(a, i):
        raise IndexError("word index out of range")
    A.store(a, i, v, "seq_cst")
    return v


@jit(f"int64({_SIG}, int64, int64, int64)")
def cas(a, i, expected, new):
    """Compare-and-swap; returns the value seen (success iff == expected)."""
    if not _ok(a, i):
        raise IndexError("word index out of range")
    return A.cas(a, i, expected, new, "seq_cst")


@jit(f"int64({_SIG}, int64, int64)")
def fetch_add(a, i, v):
    if not _ok(a, i):
        raise IndexError("word index out of range")
    return A.fetch_add(a, i, v, "seq_cst")


@jit(f"int64({_SIG}, int64, int64)")
def fetch_or(a, i, v):
    if not _ok(a, i):
        raise IndexError("word index out of range")
    return A.fetch_or(a, i, v, "seq_cst")


@jit(f"int64({_SIG}, int64, int64)")
def fetch_and(a, i, v):
    if not _ok(a, i):
        raise IndexError("word index out of range")
    return A.fetch_and(a, i, v, "seq_cst")


@jit(f"int64({_SIG}, int64, int64)")
def bit_set(a, word, bit):
    """Set bit ``bit`` of the bitmap starting at word ``word``; returns 1 if it was clear."""
    i = word + (bit >> 6)
    if not _ok(a, i):
        raise IndexError("bitmap index out of range")
    m = 1 << (bit & 63)
    return 0 if A.fetch_or(a, i, m, "seq_cst") & m else 1


@jit(f"int64({_SIG}, int64, int64)")
def bit_clear(a, word, bit):
    """Clear bit ``bit`` of the bitmap at word ``word``; returns 1 if it was set."""
    i = word + (bit >> 6)
    if not _ok(a, i):
        raise IndexError("bitmap index out of range")
    m = 1 << (bit & 63)
    return 1 if A.fetch_and(a, i, ~m, "seq_cst") & m else 0


@jit(f"int64({_SIG}, int64, int64)")
def bit_test(a, word, bit):
    i = word + (bit >> 6)
    if not _ok(a, i):
        raise IndexError("bitmap index out of range")
    return 1 if A.load(a, i, "seq_cst") & (1 << (bit & 63)) else 0


@jit(f"int64({_SIG}, int64, int64, int64)")
def futex_wait(a, i, expected, timeout_ns):
    """Sleep while the low 32 bits of ``a[i]`` equal ``expected`` (at most ``timeout_ns``).

    Releases the GIL. Returns 0 if woken, -1 otherwise; callers re-check.
    """
    if not _ok(a, i):
        raise IndexError("word index out of range")
    return S.futex_wait(a, i, expected, timeout_ns)


@jit(f"int64({_SIG}, int64, int64)")
def futex_wake(a, i, n):
    """Wake up to ``n`` processes sleeping on ``a[i]``."""
    if not _ok(a, i):
        raise IndexError("word index out of range")
    return S.futex_wake(a, i, n)
