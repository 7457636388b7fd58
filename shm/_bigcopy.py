"""Large messages copied out into ``bytes`` on two threads.

Design notes
------------
What: ``to_bytes(seg, off, n)`` copies ``n`` bytes of a segment into a new
``bytes`` object; from ``BIG`` bytes up (8 MiB) it uses two threads, one per
half (numpy's copy releases the GIL).

Why: a large copy into memory nobody has touched yet is dominated by the
kernel allocating and zeroing pages, not by the copy: a new 64 MiB ``bytes``
took ~29 ms here, most of it in page faults (~1.7 us per 4 KiB page). Faults
on different pages proceed in parallel, so two threads take ~19 ms
(measured). The sending process is usually idle while its large message is
being read, so the second thread costs nobody anything in the common case.

Rejected:

* The same for the *sender's* copy into a new blob. Its pages must be
  reserved before they are touched (``posix_fallocate``), or a full
  ``/dev/shm`` raises SIGBUS at the first write instead of
  ``OutOfSharedMemory``. Reserving is serial in the kernel (the inode
  lock), and so is ``MADV_POPULATE_WRITE`` over one mapping from two
  threads: 64 MiB took 40-44 ms either way, against 29 ms for two threads
  faulting unreserved pages (measured), which we will not risk.
* Transparent huge pages for the new ``bytes`` (``MADV_HUGEPAGE``): 6.6 ms,
  or 70-140 ms when the kernel had to compact memory first.
* More than two threads (two cores).
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from ._builtin import BYTES_OFF as _BYTES_OFF

BIG = 8 << 20           # copies of at least this many bytes use two threads

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


class _Memory:
    """The buffer of the bytes ``b``, writable, for numpy (no ctypes array type per length).

    Holds ``b``: an array over it keeps it alive, so a copy thread still
    running when the caller is interrupted (Ctrl-C in ``join``) never writes
    into freed memory.
    """

    def __init__(self, b: bytes):
        self.b = b
        self.__array_interface__ = {"data": (id(b) + _BYTES_OFF, False), "shape": (len(b),),
                                    "typestr": "|u1", "version": 3}


def two_threads() -> bool:
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except (AttributeError, OSError):
        return (os.cpu_count() or 1) >= 2


def _halves(work, n: int) -> None:
    """``work(lo, hi)`` on [0, n/2) in a helper thread and [n/2, n) here; the first error re-raised."""
    mid = (n // 2) & ~4095
    err: list[BaseException] = []

    def run():
        try:
            work(0, mid)
        except BaseException as e:      # noqa: BLE001 (handed to the caller)
            err.append(e)

    t = threading.Thread(target=run, name="shm-copy", daemon=True)
    t.start()
    try:
        work(mid, n)
    finally:
        t.join()
    if err:
        raise err[0]


def to_bytes(seg, off: int, n: int) -> bytes:
    """A new bytes object holding ``seg``'s [off, off + n)."""
    if n < BIG or not two_threads():
        return seg.mm[off:off + n]
    b = _new_bytes(None, n)             # uninitialised, ours alone until returned
    dst = np.asarray(_Memory(b))
    src = seg.u8

    def work(lo, hi):
        dst[lo:hi] = src[off + lo:off + hi]

    _halves(work, n)
    return b

