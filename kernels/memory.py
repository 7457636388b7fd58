"""Raw memory for kernels: views of an address, and bounded copies.

The Python layer maps a segment once and hands kernels its *address* as an
int (calling numba with ints costs ~80 ns, with an ndarray ~80 ns more per
array). ``u8_at``/``i64_at`` turn an address back into an array view inside
nopython code. Nothing here checks that the address is mapped: callers build
addresses from live mappings and validated sizes only.

Hazard: numba's dead-code elimination treats an array made by ``carray``
(``u8_at``/``i64_at``) as a fresh local array, so a plain ``a[i] = v`` into
it is *removed* when ``a`` is not used afterwards (a "dead store" into what
is really shared memory; seen in practice). Kernels therefore write raw
memory only through ``atomics.store`` (``"relaxed"`` when no ordering is
needed: a plain store on x86, and a call numba never removes) or ``copy``.

``copy`` is the only way kernels move payload bytes. It refuses (returns -1)
a negative length or a range outside either array instead of copying: a
memcpy with a bad length corrupts memory far from the cause, and lengths in a
slot come from shared memory another process may have scribbled on.
"""
from __future__ import annotations

import ctypes

import numba
import numpy as np
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic, overload

__all__ = ["u8_at", "i64_at", "copy", "address_of"]


@intrinsic
def _ptr(typingctx, addr, dtype):
    if not isinstance(addr, types.Integer):
        raise errors.NumbaTypeError(f"memory: an address must be an integer, got {addr}")
    elem = dtype.dtype if isinstance(dtype, types.NumberClass) else dtype
    ptrty = types.CPointer(elem)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(ptrty))
    return ptrty(addr, dtype), codegen


def u8_at(addr, n):
    """A ``uint8[n]`` view of memory at ``addr``."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr))


def i64_at(addr, n):
    """An ``int64[n]`` view of memory at ``addr`` (8-byte aligned)."""
    return np.ctypeslib.as_array((ctypes.c_int64 * n).from_address(addr))


@overload(u8_at, inline="always")
def _ol_u8_at(addr, n):
    def impl(addr, n):
        return numba.carray(_ptr(addr, numba.uint8), (n,))
    return impl


@overload(i64_at, inline="always")
def _ol_i64_at(addr, n):
    def impl(addr, n):
        return numba.carray(_ptr(addr, numba.int64), (n,))
    return impl


@intrinsic
def address_of(typingctx, a):
    """The address of ``a[0]`` as an int64 (nopython only)."""
    if not isinstance(a, types.Array):
        raise errors.NumbaTypeError(f"address_of: expected an array, got {a}")

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, value=args[0])
        return builder.ptrtoint(arr.data, context.get_value_type(types.int64))
    return types.int64(a), codegen


@intrinsic
def _memcpy(typingctx, dst, doff, src, soff, n):
    def codegen(context, builder, sig, args):
        dty, _, sty, _, _ = sig.args
        d = context.make_array(dty)(context, builder, value=args[0])
        s = context.make_array(sty)(context, builder, value=args[2])
        i8p = cgutils.voidptr_t
        dp = builder.gep(builder.bitcast(d.data, i8p), [args[1]])
        sp = builder.gep(builder.bitcast(s.data, i8p), [args[3]])
        cgutils.raw_memcpy(builder, dp, sp, args[4], 1)
        return context.get_dummy_value()
    return types.none(dst, doff, src, soff, n), codegen


def _in_range(n, doff, dlen, soff, slen):
    # Written so that nothing can overflow int64 (doff + n could wrap).
    return (0 <= n and 0 <= doff <= dlen and 0 <= soff <= slen
            and n <= dlen - doff and n <= slen - soff)


def copy(dst, doff, src, soff, n):
    """Copy ``n`` bytes ``src[soff:soff+n]`` to ``dst[doff:doff+n]``.

    Both arrays are 1-D ``uint8``. Returns ``n``, or -1 (copying nothing) if
    ``n`` is negative or either range falls outside its array.
    """
    if not _in_range(n, doff, dst.shape[0], soff, src.shape[0]):
        return -1
    dst[doff:doff + n] = src[soff:soff + n]
    return n


@overload(copy, inline="always")
def _ol_copy(dst, doff, src, soff, n):
    for name, a in (("dst", dst), ("src", src)):
        if not (isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.uint8
                and a.layout == "C"):
            raise errors.NumbaTypeError(f"memory.copy: {name} must be a 1-D C-contiguous uint8 array")

    def impl(dst, doff, src, soff, n):
        # Written so that nothing can overflow int64 (doff + n could wrap).
        dlen = dst.shape[0]
        slen = src.shape[0]
        if n < 0 or doff < 0 or soff < 0 or doff > dlen or soff > slen or n > dlen - doff or n > slen - soff:
            return -1
        if n > 0:
            _memcpy(dst, doff, src, soff, n)
        return n
    return impl
