"""Atomic operations on 64-bit words of a shared buffer, for nopython code.

numba has no public CPU atomics, so each operation here is an ``@intrinsic``
that emits one LLVM atomic instruction (``load atomic``, ``store atomic``,
``cmpxchg``, ``atomicrmw``, ``fence``) on the address of ``a[i]``.

Each public function is written twice, as in KatanaGraph's ``numpy_atomic``:

* a plain-Python *reference body*, which states the semantics and is what runs
  when the function is called from the interpreter or under
  ``NUMBA_DISABLE_JIT=1`` (it is not atomic there: it is the specification);
* an ``@overload`` that numba uses inside ``@njit`` code, which emits the
  atomic instruction. ``tests/test_atomics.py`` checks both agree.

Arguments
---------
``a`` is a 1-D C-contiguous ``int64`` or ``uint64`` array (a view of shared
memory, usually) and ``i`` an element index. Indices are **not** bounds
checked: callers compute them from validated layouts (``kernels/layout.py``).

``order`` is an explicit string literal, one of ``"relaxed"`` (LLVM
``monotonic``), ``"acquire"``, ``"release"``, ``"acq_rel"``, ``"seq_cst"``.
LLVM refuses a release or acq_rel load, an acquire or acq_rel store; those are
rejected here at compile time with a ``NumbaTypeError``. A compare-and-swap's
failure ordering is derived from its success ordering (the strongest one LLVM
accepts: ``acq_rel``/``acquire`` -> ``acquire``, ``release``/``relaxed`` ->
``monotonic``, ``seq_cst`` -> ``seq_cst``).

Alignment
---------
Every word must be 8-byte aligned. A locked instruction that straddles a cache
line costs ~1 us instead of ~2 ns on x86 and faults on ARM, and numba does not
warn, so the layouts keep every atomic word aligned and a test checks it.

On x86-64 an acquire load and a release store are plain ``mov``; only ARM
shows a missing ordering (``ldar``/``stlr``/``dmb``). Reason about orderings:
do not rely on x86 forgiving you.
"""
from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic, overload

__all__ = [
    "load", "store", "cas", "fetch_add", "fetch_or", "fetch_and", "exchange",
    "fence", "pause",
]

_LLVM_ORDER = {
    "relaxed": "monotonic",
    "monotonic": "monotonic",
    "acquire": "acquire",
    "release": "release",
    "acq_rel": "acq_rel",
    "seq_cst": "seq_cst",
}
_LOAD_ORDERS = {"relaxed", "monotonic", "acquire", "seq_cst"}
_STORE_ORDERS = {"relaxed", "monotonic", "release", "seq_cst"}
_CAS_FAILURE = {
    "monotonic": "monotonic",
    "acquire": "acquire",
    "release": "monotonic",
    "acq_rel": "acquire",
    "seq_cst": "seq_cst",
}
_WORD_TYPES = (types.int64, types.uint64)
_IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


# --------------------------------------------------------------------------
# Type checks shared by every intrinsic.

def _check_word_array(fn, a):
    if not (isinstance(a, types.Array) and a.ndim == 1 and a.dtype in _WORD_TYPES):
        raise errors.NumbaTypeError(
            f"atomics.{fn}: expected a 1-D int64 or uint64 array, got {a}")
    if a.layout != "C":
        raise errors.NumbaTypeError(f"atomics.{fn}: the array must be C-contiguous, got {a}")
    if not a.mutable:
        raise errors.NumbaTypeError(f"atomics.{fn}: the array is read-only")


def _check_index(fn, i):
    if not isinstance(i, types.Integer):
        raise errors.NumbaTypeError(f"atomics.{fn}: the index must be an integer, got {i}")


def _order(fn, order, allowed):
    if not isinstance(order, types.StringLiteral):
        raise errors.NumbaTypeError(
            f"atomics.{fn}: the ordering must be a string literal such as \"acquire\", got {order}")
    o = order.literal_value
    if o not in allowed:
        raise errors.NumbaTypeError(
            f"atomics.{fn}: ordering {o!r} is not allowed here; use one of {sorted(allowed)}")
    return _LLVM_ORDER[o]


def _word_ptr(context, builder, aryty, ary, idx):
    arr = context.make_array(aryty)(context, builder, value=ary)
    return cgutils.get_item_pointer(context, builder, aryty, arr, [idx],
                                    wraparound=False, boundscheck=False)


def _as_word(context, builder, val, fromty, toty):
    return context.cast(builder, val, fromty, toty)


# --------------------------------------------------------------------------
# Intrinsics: one LLVM instruction each.

@intrinsic(prefer_literal=True)
def _load(typingctx, a, i, order):
    _check_word_array("load", a)
    _check_index("load", i)
    o = _order("load", order, _LOAD_ORDERS)

    def codegen(context, builder, sig, args):
        ptr = _word_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load_atomic(ptr, o, 8)
    return a.dtype(a, i, order), codegen


@intrinsic(prefer_literal=True)
def _store(typingctx, a, i, v, order):
    _check_word_array("store", a)
    _check_index("store", i)
    o = _order("store", order, _STORE_ORDERS)

    def codegen(context, builder, sig, args):
        ptr = _word_ptr(context, builder, sig.args[0], args[0], args[1])
        val = _as_word(context, builder, args[2], sig.args[2], sig.args[0].dtype)
        builder.store_atomic(val, ptr, o, 8)
        return context.get_dummy_value()
    return types.none(a, i, v, order), codegen


@intrinsic(prefer_literal=True)
def _cas(typingctx, a, i, expected, new, order):
    _check_word_array("cas", a)
    _check_index("cas", i)
    o = _order("cas", order, set(_LLVM_ORDER))

    def codegen(context, builder, sig, args):
        wt = sig.args[0].dtype
        ptr = _word_ptr(context, builder, sig.args[0], args[0], args[1])
        exp = _as_word(context, builder, args[2], sig.args[2], wt)
        new_ = _as_word(context, builder, args[3], sig.args[3], wt)
        pair = builder.cmpxchg(ptr, exp, new_, o, _CAS_FAILURE[o])
        return builder.extract_value(pair, 0)
    return a.dtype(a, i, expected, new, order), codegen


def _make_rmw(op, name):
    @intrinsic(prefer_literal=True)
    def _rmw(typingctx, a, i, v, order):
        _check_word_array(name, a)
        _check_index(name, i)
        o = _order(name, order, set(_LLVM_ORDER))

        def codegen(context, builder, sig, args):
            ptr = _word_ptr(context, builder, sig.args[0], args[0], args[1])
            val = _as_word(context, builder, args[2], sig.args[2], sig.args[0].dtype)
            return builder.atomic_rmw(op, ptr, val, o)
        return a.dtype(a, i, v, order), codegen
    return _rmw


_fetch_add = _make_rmw("add", "fetch_add")
_fetch_or = _make_rmw("or", "fetch_or")
_fetch_and = _make_rmw("and", "fetch_and")
_exchange = _make_rmw("xchg", "exchange")


@intrinsic(prefer_literal=True)
def _fence(typingctx, order):
    o = _order("fence", order, {"acquire", "release", "acq_rel", "seq_cst"})

    def codegen(context, builder, sig, args):
        builder.fence(o)
        return context.get_dummy_value()
    return types.none(order), codegen


@intrinsic
def _pause(typingctx):
    """x86 ``pause`` (about 25 ns on this kind of machine); a no-op elsewhere.

    ``builder.asm("pause")`` aborts unless LLVM's asm parser was initialised,
    so the SSE2 intrinsic is used instead.
    """
    def codegen(context, builder, sig, args):
        if _IS_X86:
            fnty = ir.FunctionType(ir.VoidType(), [])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


# --------------------------------------------------------------------------
# Public functions: the Python body is the reference semantics; the overload
# is what nopython code gets.

def _word(a, v):
    """``v`` as the array's word type, wrapping like the machine instruction."""
    v = int(v) & 0xFFFF_FFFF_FFFF_FFFF
    if a.dtype == np.int64 and v >= 1 << 63:
        v -= 1 << 64
    return a.dtype.type(v)


def load(a, i, order):
    """Return ``a[i]``."""
    return a[i]


def store(a, i, v, order):
    """``a[i] = v``."""
    a[i] = _word(a, v)


def cas(a, i, expected, new, order):
    """Compare-and-swap: if ``a[i] == expected`` set it to ``new``.

    Returns the value seen (the swap happened iff it equals ``expected``).
    On failure it behaves like an atomic load with the failure ordering.
    Operands are taken modulo 2**64 as the array's word type.
    """
    old = a[i]
    if old == _word(a, expected):
        a[i] = _word(a, new)
    return old


def fetch_add(a, i, v, order):
    """``old = a[i]; a[i] += v; return old`` (wrapping)."""
    old = a[i]
    a[i] = _word(a, int(old) + int(v))
    return old


def fetch_or(a, i, v, order):
    """``old = a[i]; a[i] |= v; return old``."""
    old = a[i]
    a[i] = _word(a, int(old) | (int(v) & 0xFFFF_FFFF_FFFF_FFFF))
    return old


def fetch_and(a, i, v, order):
    """``old = a[i]; a[i] &= v; return old``."""
    old = a[i]
    a[i] = _word(a, int(old) & (int(v) & 0xFFFF_FFFF_FFFF_FFFF))
    return old


def exchange(a, i, v, order):
    """``old = a[i]; a[i] = v; return old``."""
    old = a[i]
    a[i] = _word(a, v)
    return old


def fence(order):
    """A memory fence. A no-op in the interpreter."""


def pause():
    """A CPU spin-loop hint. A no-op in the interpreter."""


@overload(load, prefer_literal=True, inline="always")
def _ol_load(a, i, order):
    def impl(a, i, order):
        return _load(a, i, order)
    return impl


@overload(store, prefer_literal=True, inline="always")
def _ol_store(a, i, v, order):
    def impl(a, i, v, order):
        _store(a, i, v, order)
    return impl


@overload(cas, prefer_literal=True, inline="always")
def _ol_cas(a, i, expected, new, order):
    def impl(a, i, expected, new, order):
        return _cas(a, i, expected, new, order)
    return impl


@overload(fetch_add, prefer_literal=True, inline="always")
def _ol_fetch_add(a, i, v, order):
    def impl(a, i, v, order):
        return _fetch_add(a, i, v, order)
    return impl


@overload(fetch_or, prefer_literal=True, inline="always")
def _ol_fetch_or(a, i, v, order):
    def impl(a, i, v, order):
        return _fetch_or(a, i, v, order)
    return impl


@overload(fetch_and, prefer_literal=True, inline="always")
def _ol_fetch_and(a, i, v, order):
    def impl(a, i, v, order):
        return _fetch_and(a, i, v, order)
    return impl


@overload(exchange, prefer_literal=True, inline="always")
def _ol_exchange(a, i, v, order):
    def impl(a, i, v, order):
        return _exchange(a, i, v, order)
    return impl


@overload(fence, prefer_literal=True, inline="always")
def _ol_fence(order):
    def impl(order):
        _fence(order)
    return impl


@overload(pause, inline="always")
def _ol_pause():
    def impl():
        _pause()
    return impl
