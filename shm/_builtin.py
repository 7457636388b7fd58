"""Builtin function objects around the ``METH_O`` cfuncs of ``kernels/pycall.py``.

``bind(cf, d)`` returns a builtin function (the kind ``len`` is) whose C
implementation is the numba cfunc ``cf`` and whose ``self`` is the ring
descriptor ``d`` (the function keeps it alive):
calling it costs a ``METH_O`` call, ~30 ns, against ~50 ns for numba's
compiled entry point plus the interpreter work of passing addresses
(kernels/pycall.py says what was measured and what was rejected).

CPython keeps a pointer to the ``PyMethodDef`` in every function object it
makes from it, so each definition lives as long as this module (one per
cfunc, kept in ``_DEFS``; the cfuncs' machine code lives as long as numba's
library, i.e. the process).
"""
from __future__ import annotations

import ctypes

import numpy as np

from kernels import pycall as P
from kernels import ring as R

METH_O = 0x0008


class _MethodDef(ctypes.Structure):
    _fields_ = [
        ("ml_name", ctypes.c_char_p),
        ("ml_meth", ctypes.c_void_p),
        ("ml_flags", ctypes.c_int),
        ("ml_doc", ctypes.c_char_p),
    ]


_new = ctypes.pythonapi.PyCFunction_NewEx
_new.restype = ctypes.py_object
_new.argtypes = [ctypes.c_void_p, ctypes.py_object, ctypes.py_object]

_DEFS: dict[int, _MethodDef] = {}


def _bytes_offset() -> int:
    b = b"shm probe"
    off = ctypes.cast(ctypes.c_char_p(b), ctypes.c_void_p).value - id(b)
    if ctypes.string_at(id(b) + off, len(b)) != b:
        raise RuntimeError("cannot locate the buffer of a bytes object")
    return off


BYTES_OFF = _bytes_offset()     # id(b) + BYTES_OFF is the address of a bytes object's data


def _check_array_layout() -> None:
    a = np.arange(4, dtype=np.int64)
    if ctypes.c_int64.from_address(id(a) + P.ARRAY_DATA_OFF).value != a.ctypes.data:
        raise ImportError(f"shm: this numpy ({np.__version__}) does not keep an array's data pointer "
                          f"at offset {P.ARRAY_DATA_OFF} of the object, which kernels/pycall.py relies on")


_check_array_layout()


def bind(cf, d: np.ndarray):
    """A builtin function calling the ``METH_O`` cfunc ``cf`` with the descriptor ``d`` as ``self``."""
    if not (type(d) is np.ndarray and d.dtype == np.int64 and d.flags.c_contiguous
            and d.ndim == 1 and d.shape[0] >= R.D_LEN):
        raise TypeError(f"bind: a ring descriptor is a C-contiguous int64 array of {R.D_LEN}+ words, not {d!r}")
    md = _DEFS.get(cf.address)
    if md is None:
        name = cf.__name__.encode()
        md = _DEFS[cf.address] = _MethodDef(name, cf.address, METH_O, (cf.__doc__ or "").encode())
    return _new(ctypes.addressof(md), d, None)
