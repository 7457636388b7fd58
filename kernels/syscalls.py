"""The few system calls kernels make: futex wait/wake, yield, and a clock.

Parking a waiter uses a Linux futex on a word of shared memory (not
``FUTEX_PRIVATE``, so it works across processes that map the same segment).
The calls are emitted as direct calls to libc's ``syscall``,
``sched_yield`` and ``clock_gettime`` from LLVM: numba resolves them in the
running process, and unlike a ctypes function pointer this keeps the kernels
cacheable (numba refuses to cache code that holds ctypes pointers).

A futex word is 32 bits; ours is the low half of an aligned int64 word
(little-endian only, checked at import), so the rest of the code keeps to
int64 atomics.

On a platform without futexes (macOS), ``futex_wait`` sleeps at most 1 ms and
``futex_wake`` does nothing: waiting stays correct (every waiter re-checks its
condition after waking) but costs up to a millisecond of latency.
"""
from __future__ import annotations

import ctypes
import platform
import sys
import threading
import time

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic, overload

__all__ = ["futex_wait", "futex_wake", "sched_yield", "monotonic_ns", "thread_id", "HAVE_FUTEX"]

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("shm kernels assume a little-endian CPU (the futex word is the low half of an int64)")

_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine().lower())
HAVE_FUTEX = sys.platform.startswith("linux") and _SYS_FUTEX is not None
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_CLOCK_MONOTONIC = 1 if sys.platform.startswith("linux") else 6  # macOS: CLOCK_MONOTONIC == 6

_I64 = ir.IntType(64)
_I32 = ir.IntType(32)


def _libc_fn(builder, name, ret, args, var_arg=False):
    fnty = ir.FunctionType(ret, args, var_arg=var_arg)
    return cgutils.get_or_insert_function(builder.module, fnty, name)


def _timespec(builder, ns):
    """Stack-allocate a ``struct timespec`` holding ``ns`` nanoseconds."""
    ts = cgutils.alloca_once(builder, ir.ArrayType(_I64, 2))
    billion = ir.Constant(_I64, 1_000_000_000)
    builder.store(builder.sdiv(ns, billion), builder.gep(ts, [ir.Constant(_I32, 0), ir.Constant(_I32, 0)]))
    builder.store(builder.srem(ns, billion), builder.gep(ts, [ir.Constant(_I32, 0), ir.Constant(_I32, 1)]))
    return ts


def _word_addr(context, builder, aryty, ary, idx):
    arr = context.make_array(aryty)(context, builder, value=ary)
    ptr = cgutils.get_item_pointer(context, builder, aryty, arr, [idx], wraparound=False, boundscheck=False)
    return builder.ptrtoint(ptr, _I64)


def _check(fn, a, i):
    if not (isinstance(a, types.Array) and a.ndim == 1 and a.dtype in (types.int64, types.uint64)):
        raise errors.NumbaTypeError(f"syscalls.{fn}: expected a 1-D int64 array, got {a}")
    if not isinstance(i, types.Integer):
        raise errors.NumbaTypeError(f"syscalls.{fn}: the index must be an integer, got {i}")


@intrinsic
def _futex_wait(typingctx, a, i, expected, timeout_ns):
    _check("futex_wait", a, i)

    def codegen(context, builder, sig, args):
        ns = context.cast(builder, args[3], sig.args[3], types.int64)
        exp = context.cast(builder, args[2], sig.args[2], types.int64)
        if HAVE_FUTEX:
            addr = _word_addr(context, builder, sig.args[0], args[0], args[1])
            ts = _timespec(builder, ns)
            fn = _libc_fn(builder, "syscall", _I64, [_I64], var_arg=True)
            # futex(uaddr, FUTEX_WAIT, val, timeout, NULL, 0): sleeps only if
            # *uaddr (32 bits) still equals val; returns 0 when woken, -1 with
            # errno EAGAIN (value changed), ETIMEDOUT or EINTR otherwise.
            val32 = builder.and_(exp, ir.Constant(_I64, 0xFFFFFFFF))
            r = builder.call(fn, [ir.Constant(_I64, _SYS_FUTEX), addr, ir.Constant(_I64, _FUTEX_WAIT),
                                  val32, builder.ptrtoint(ts, _I64), ir.Constant(_I64, 0), ir.Constant(_I64, 0)])
            return r
        cap = ir.Constant(_I64, 1_000_000)
        ns = builder.select(builder.icmp_signed("<", ns, cap), ns, cap)
        ts = _timespec(builder, ns)
        fn = _libc_fn(builder, "nanosleep", _I32, [_I64, _I64])
        builder.call(fn, [builder.ptrtoint(ts, _I64), ir.Constant(_I64, 0)])
        return ir.Constant(_I64, -1)
    return types.int64(a, i, expected, timeout_ns), codegen


@intrinsic
def _futex_wake(typingctx, a, i, n):
    _check("futex_wake", a, i)

    def codegen(context, builder, sig, args):
        if not HAVE_FUTEX:
            return ir.Constant(_I64, 0)
        addr = _word_addr(context, builder, sig.args[0], args[0], args[1])
        cnt = context.cast(builder, args[2], sig.args[2], types.int64)
        fn = _libc_fn(builder, "syscall", _I64, [_I64], var_arg=True)
        return builder.call(fn, [ir.Constant(_I64, _SYS_FUTEX), addr, ir.Constant(_I64, _FUTEX_WAKE), cnt,
                                 ir.Constant(_I64, 0), ir.Constant(_I64, 0), ir.Constant(_I64, 0)])
    return types.int64(a, i, n), codegen


@intrinsic
def _sched_yield(typingctx):
    def codegen(context, builder, sig, args):
        builder.call(_libc_fn(builder, "sched_yield", _I32, []), [])
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def _monotonic_ns(typingctx):
    def codegen(context, builder, sig, args):
        ts = cgutils.alloca_once(builder, ir.ArrayType(_I64, 2))
        fn = _libc_fn(builder, "clock_gettime", _I32, [_I32, _I64])
        builder.call(fn, [ir.Constant(_I32, _CLOCK_MONOTONIC), builder.ptrtoint(ts, _I64)])
        sec = builder.load(builder.gep(ts, [ir.Constant(_I32, 0), ir.Constant(_I32, 0)]))
        nsec = builder.load(builder.gep(ts, [ir.Constant(_I32, 0), ir.Constant(_I32, 1)]))
        return builder.add(builder.mul(sec, ir.Constant(_I64, 1_000_000_000)), nsec)
    return types.int64(), codegen


@intrinsic
def _thread_id(typingctx):
    def codegen(context, builder, sig, args):
        return builder.call(_libc_fn(builder, "pthread_self", _I64, []), [])
    return types.int64(), codegen


# --------------------------------------------------------------------------
# Interpreter versions (reference bodies), through ctypes.

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


def futex_wait(a, i, expected, timeout_ns):
    """Sleep while the low 32 bits of ``a[i]`` equal ``expected``, at most ``timeout_ns``.

    Returns 0 if woken by ``futex_wake``, -1 on timeout, interruption, or if
    the word had already changed. Callers re-check their condition either way.
    """
    if not HAVE_FUTEX:
        time.sleep(min(timeout_ns, 1_000_000) / 1e9)
        return -1
    ts = _Timespec(timeout_ns // 1_000_000_000, timeout_ns % 1_000_000_000)
    addr = a.ctypes.data + i * 8
    r = _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_long(_FUTEX_WAIT),
                      ctypes.c_long(expected & 0xFFFFFFFF), ctypes.byref(ts), ctypes.c_void_p(0), ctypes.c_long(0))
    return 0 if r == 0 else -1


def futex_wake(a, i, n):
    """Wake up to ``n`` processes sleeping on ``a[i]``; returns how many woke."""
    if not HAVE_FUTEX:
        return 0
    addr = a.ctypes.data + i * 8
    return _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_long(_FUTEX_WAKE),
                         ctypes.c_long(n), ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_long(0))


def sched_yield():
    """Give up the CPU to another runnable thread."""
    _libc.sched_yield()


def monotonic_ns():
    """``CLOCK_MONOTONIC`` in nanoseconds (the same clock in every process)."""
    return time.monotonic_ns()


def thread_id():
    """``pthread_self()`` of the calling thread (never 0)."""
    return threading.get_ident()


@overload(thread_id, inline="always")
def _ol_thread_id():
    def impl():
        return _thread_id()
    return impl


@overload(futex_wait, inline="always")
def _ol_futex_wait(a, i, expected, timeout_ns):
    def impl(a, i, expected, timeout_ns):
        return _futex_wait(a, i, expected, timeout_ns)
    return impl


@overload(futex_wake, inline="always")
def _ol_futex_wake(a, i, n):
    def impl(a, i, n):
        return _futex_wake(a, i, n)
    return impl


@overload(sched_yield, inline="always")
def _ol_sched_yield():
    def impl():
        _sched_yield()
    return impl


@overload(monotonic_ns, inline="always")
def _ol_monotonic_ns():
    def impl():
        return _monotonic_ns()
    return impl
