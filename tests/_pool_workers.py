"""Module-level task functions for tests/test_pool.py (spawned workers import them from here)."""
from __future__ import annotations

import os
import signal
import time

import numpy as np


def square(x):
    return x * x


def add(a, b):
    return a + b


def kw(a, b=0, *, c=0):
    return a + b + c


def boom_on(x, bad=3):
    if x == bad:
        raise ValueError(f"task {x} failed")
    return x


def pid_of(_x=None):
    return os.getpid()


def sleep_then(x, seconds=0.01):
    time.sleep(seconds)
    return x


def spin(x, us=20):
    t = time.perf_counter() + us * 1e-6
    while time.perf_counter() < t:
        pass
    return x


def die_on(x, bad=5):
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def segfault(_x=None):
    import ctypes
    ctypes.string_at(0)


def unpicklable_result(_x=None):
    return lambda: None


def acc_add(acc, x):
    return acc + x


def fill(view):
    view[...] = os.getpid()
    return int(view.shape[0])


def chunk_sum(view):
    return float(np.sum(view))


def double_inplace(view):
    view *= 2
    return None


_INIT = {}


def init_store(value):
    _INIT["value"] = value


def read_init(_x=None):
    return _INIT.get("value")


def init_raises():
    raise RuntimeError("initializer says no")


class NeedsArgs(Exception):
    """An exception whose __init__ takes two arguments: pickles, but fails to unpickle (a classic)."""

    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def raise_needs_args(_x=None):
    raise NeedsArgs(1, 2)


class _Unloadable:
    def __reduce__(self):
        return (_refuse, ())


def _refuse():
    raise RuntimeError("this object cannot be rebuilt here")


def unloadable_result(_x=None):
    return _Unloadable()


def big_bytes(n):
    return b"x" * n


def length(b):
    return len(b)


def exit_with(code):
    import sys
    sys.exit(code)


def deleted_shm_maps(_x=None):
    """How many /dev/shm mappings of this process belong to unlinked segments."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/dev/shm/" in line and "(deleted)" in line)
