"""Ring kernels callable as CPython builtin functions: the channel fast path without numba's wrapper.

Design notes
------------
What: four numba ``cfunc``s with CPython's ``METH_O`` calling convention,
``PyObject *f(PyObject *self, PyObject *arg)``:

=================== ===================== ==========================================
function            ``arg``               returns
=================== ===================== ==========================================
``push_bytes``      a bytes object        ``push_at``'s status as an int (0 = OK);
                                          too big for a slot: ``push_blob_at``'s
                                          (``CLAIMED - p``: finish position p)
``push_bytes_spin`` a bytes object        the same, an inline one retried while FULL
                                          (``SPIN``)
``pop_bytes``       the codec kind (int)  the message as a new bytes object if it
                                          is inline and of that kind (or a blob
                                          under 8 MiB mapped here: ``_pop_blob``),
                                          else ``pop_at``'s int result
``pop_bytes_spin``  the codec kind (int)  the same, retried while EMPTY (``SPIN``)
=================== ===================== ==========================================

``self`` is the ring descriptor (an int64 numpy array, ``kernels/ring.py``
``D_*``). ``shm/_builtin.py`` turns each into a real builtin function object
bound to it (``PyCFunction_NewEx``); the function holds a reference to the
descriptor, so a descriptor can never be freed under a call that is about to
use it (a closed one answers CLOSED: ``D_SIZE`` is 0). So ``Sender.send`` calls ``push(data)`` with the
bytes object itself and ``Receiver.recv`` gets a bytes object back.

Why: the Python ``send``/``recv`` of a 64 B message spent more time getting
into the kernel than in it. numba's compiled entry point (``overloads[sig]
.entry_point``, what shm/_chan.py used) converts every int argument through
``PyNumber_Long`` and ``PyLong_AsLongLong`` and its result back: ~50 ns for
``push_at(addr, id(data) + BYTES_OFF, len(data))`` plus ~35 ns of ``id``,
``+`` and ``len`` in the interpreter; ``recv`` then sliced the receive area
into bytes (~40 ns). A ``METH_O`` builtin costs what ``len(b)`` costs
(~30 ns, measured with the same loop). The pushed bytes are read in place
(``PyBytes_AsString``); the popped message is copied once, from the receive
area into the new bytes object (``PyBytes_FromStringAndSize``).

Rejected: ctypes or cffi callbacks (they convert every argument: several
hundred ns); the PYBYTES argument type that kernels/hashtable.py gives the
dict's set path (it still goes through numba's wrapper: ~80 ns a call);
returning a Python object from ``@njit`` (numba boxes no bytes in nopython
mode).

Contract: the caller holds the GIL and keeps it: nothing here blocks (the
spin variants spin for at most ``SPIN`` backoff steps, ~3 us, as
``pop_spin_gil_at`` does). ``self`` is checked once, when ``bind`` makes the
function (a C-contiguous int64 array of at least ``D_LEN`` words); a pop's
``arg`` that is not an int raises TypeError by returning NULL with
CPython's own error set; a push of something that is not bytes clears that error and
returns ``NOT_BYTES`` instead, so the caller can take its general path. The
only CPython calls are ``PyLong_AsLong``, ``PyLong_FromLong``,
``PyBytes_Size``, ``PyBytes_AsString``, ``PyBytes_FromStringAndSize``,
``PyErr_Occurred`` and ``PyErr_Clear``; no reference is kept past the call.
These are the only kernels that see Python objects, and only at their
boundary: the ring protocol they run is ``push_at``/``pop_at``'s.
"""
from __future__ import annotations

import llvmlite.ir as _ir
from numba import cfunc as _cfunc
from numba import types as _types
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic as _intrinsic

from . import atomics as _A
from . import layout as L
from . import ring as R
from ._jit import jit
from .memory import i64_at
from .syscalls import _libc_fn as _capi     # an external C function: here CPython's API

ARRAY_DATA_OFF = 16  # offsetof(PyArrayObject_fields, data): numpy's ABI since 1.x; shm/_builtin.py checks it
SPIN = 7            # backoff steps the spin variants retry for (127 pauses, ~3 us)
NOT_BYTES = -100    # push: the argument is not a bytes object (nothing was pushed)
BLOB_READ_MAX = 8 << 20     # pop: larger blob messages are left to Python (shm/_bigcopy.py: two threads)

_I64 = _ir.IntType(64)
_PTR = _cgutils.voidptr_t
_SIG = _types.voidptr(_types.voidptr, _types.voidptr)


@_intrinsic
def _as_long(typingctx, obj):
    """``PyLong_AsLong(obj)``: -1 with an error set if it is not an int."""
    def codegen(context, builder, sig, args):
        return builder.call(_capi(builder, "PyLong_AsLong", _I64, [_PTR]), args)
    return _types.int64(_types.voidptr), codegen


@_intrinsic
def _array_data(typingctx, obj):
    """The data pointer of the numpy array ``obj`` (``PyArrayObject.data``, right after the object header)."""
    def codegen(context, builder, sig, args):
        p = builder.bitcast(builder.gep(builder.bitcast(args[0], _PTR), [_ir.Constant(_I64, ARRAY_DATA_OFF)]),
                            _I64.as_pointer())
        return builder.load(p)
    return _types.int64(_types.voidptr), codegen


@_intrinsic
def _from_long(typingctx, v):
    """``PyLong_FromLong(v)``: a new reference."""
    def codegen(context, builder, sig, args):
        return builder.call(_capi(builder, "PyLong_FromLong", _PTR, [_I64]), args)
    return _types.voidptr(_types.int64), codegen


@_intrinsic
def _bytes_size(typingctx, obj):
    """``PyBytes_Size(obj)``: -1 with TypeError set if it is not bytes."""
    def codegen(context, builder, sig, args):
        return builder.call(_capi(builder, "PyBytes_Size", _I64, [_PTR]), args)
    return _types.int64(_types.voidptr), codegen


@_intrinsic
def _bytes_data(typingctx, obj):
    """``PyBytes_AsString(obj)`` as an address (obj is known to be bytes)."""
    def codegen(context, builder, sig, args):
        p = builder.call(_capi(builder, "PyBytes_AsString", _PTR, [_PTR]), args)
        return builder.ptrtoint(p, _I64)
    return _types.int64(_types.voidptr), codegen


@_intrinsic
def _new_bytes(typingctx, addr, n):
    """``PyBytes_FromStringAndSize(addr, n)``: a new reference, or NULL and MemoryError."""
    def codegen(context, builder, sig, args):
        fn = _capi(builder, "PyBytes_FromStringAndSize", _PTR, [_PTR, _I64])
        return builder.call(fn, [builder.inttoptr(args[0], _PTR), args[1]])
    return _types.voidptr(_types.int64, _types.int64), codegen


@_intrinsic
def _is_null(typingctx, p):
    """``p == NULL`` for a ``PyObject *``."""
    def codegen(context, builder, sig, args):
        return _cgutils.is_null(builder, args[0])
    return _types.boolean(_types.voidptr), codegen


@_intrinsic
def _error_set(typingctx):
    """``PyErr_Occurred() != NULL``."""
    def codegen(context, builder, sig, args):
        e = builder.call(_capi(builder, "PyErr_Occurred", _PTR, []), [])
        return _cgutils.is_not_null(builder, e)
    return _types.boolean(), codegen


@_intrinsic
def _clear_error(typingctx):
    """``PyErr_Clear()``."""
    def codegen(context, builder, sig, args):
        builder.call(_capi(builder, "PyErr_Clear", _ir.VoidType(), []), [])
        return context.get_dummy_value()
    return _types.none(), codegen


@_intrinsic
def _null(typingctx):
    """A NULL ``PyObject *``: the builtin raises the error already set."""
    def codegen(context, builder, sig, args):
        return _ir.Constant(_PTR, None)
    return _types.voidptr(), codegen


@jit(inline="always")
def _push(self, data, steps):
    daddr = _array_data(self)
    n = _bytes_size(data)
    if n < 0:
        _clear_error()
        return _from_long(NOT_BYTES)
    src = _bytes_data(data)
    if steps == 0:
        r = R.push_at(daddr, src, n)
    else:
        r = R.push_spin_gil_at(daddr, src, n, steps)
    if r == R.TOO_BIG:
        r = R.push_blob_at(daddr, src, n)
    return _from_long(r)


@jit(inline="always")
def _pop(self, arg, steps):
    daddr = _array_data(self)
    kind = _as_long(arg)
    if kind == -1 and _error_set():
        return _null()
    if steps == 0:
        r = R.pop_at(daddr)
    else:
        r = R.pop_spin_gil_at(daddr, steps)
    if r >= 0 and (r & 0xFF) == kind:
        # pop_at copied the message into receive area ((r >> 8) & AREA_MASK)
        # of this descriptor's buffer; the area stays ours until the next
        # N_AREAS pops from this thread, far beyond this copy.
        d = i64_at(daddr, R.D_LEN)
        at = d[R.D_DST] + ((r >> R.AREA_SHIFT) & R.AREA_MASK) * d[R.D_AREA_SIZE]
        return _new_bytes(at, r >> R.LEN_SHIFT)
    if r <= R.BLOB_AREA:
        b = _pop_blob(daddr, r, kind)
        if not _is_null(b):
            return b
    return _from_long(r)


@jit(inline="always")
def _pop_blob(daddr, r, kind):
    """A blob message pop_at claimed (``r`` names its area): as new bytes, read from the blob mapped here.

    Under ``BLOB_READ_MAX``, of ``kind``, with its blob in the process-local map
    (bounded channels), while the channel's blobs stay under the budget
    (``D_BLOB_BUDGET``; over it, Python reads them and drops blobs). NULL
    (nothing done, no error set) otherwise: the caller returns ``r`` and
    Python reads the message.
    """
    d = i64_at(daddr, R.D_LEN)
    if d[R.D_BLOBMAP] == 0:
        return _null()
    if _A.load(i64_at(d[R.D_CTRL], d[R.D_CTRL_SIZE] >> 3), L.CH_BLOB_BYTES >> 3, "relaxed") > d[R.D_BLOB_BUDGET]:
        return _null()
    words = i64_at(d[R.D_DST] + (R.BLOB_AREA - r) * d[R.D_AREA_SIZE], 3)
    pos = words[0]
    meta = words[1]
    n = meta & L.META_LEN_MASK
    if ((meta >> L.META_KIND_SHIFT) & 0xFF) != kind or n >= BLOB_READ_MAX or words[2] != d[R.D_GEN]:
        return _null()
    src = R.blob_mapped_at(daddr, pos, n)
    if src == 0:
        return _null()
    b = _new_bytes(src, n)
    if _is_null(b):
        _clear_error()              # Python reads it again, and raises MemoryError there
        return b
    R.blob_read_done_at(daddr, pos)
    _A.store(d, R.D_BLOB_READS, d[R.D_BLOB_READS] + 1, "relaxed")     # (never d[i] = v on a raw view)
    return b


@_cfunc(_SIG, cache=True)
def push_bytes(self, data):
    """METH_O: push the bytes ``data`` through the descriptor ``self``; its status."""
    return _push(self, data, 0)


@_cfunc(_SIG, cache=True)
def push_bytes_spin(self, data):
    """``push_bytes``, retried with backoff while FULL for up to ``SPIN`` steps."""
    return _push(self, data, SPIN)


@_cfunc(_SIG, cache=True)
def pop_bytes(self, kind):
    """METH_O: pop through the descriptor ``self``; bytes if inline and of ``kind``, else ``pop_at``'s int."""
    return _pop(self, kind, 0)


@_cfunc(_SIG, cache=True)
def pop_bytes_spin(self, kind):
    """``pop_bytes``, retried with backoff while EMPTY for up to ``SPIN`` steps."""
    return _pop(self, kind, SPIN)
