"""numba kernels for shm: atomics, raw memory, system calls, the ring buffer.

Nothing in this package touches a Python object: every function is nopython
code (or its plain-Python reference) working on arrays of shared memory, so a
user's own ``@njit`` function can call the non-blocking ones in a loop.

Modules
-------
``atomics``   atomic load/store/cas/fetch_add/fetch_or/fetch_and/exchange/fence/pause
``memory``    views of raw addresses, bounded copies
``syscalls``  futex wait/wake, sched_yield, a monotonic clock
``layout``    the byte layout of every shared segment
``ring``      the MPMC ring buffer (Vyukov, with owner-tagged stamps)
``words``     atomic word operations callable from the interpreter (slow paths)
"""
from . import _jit  # noqa: F401  (installs the package-wide cache stamp first)
