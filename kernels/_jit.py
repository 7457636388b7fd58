"""The one decorator every kernel uses, and a compile cache that cannot go stale.

Design notes
------------
Every kernel is ``@njit(cache=True, nogil=True)``:

* ``cache=True`` because compile time is user time: a cold compile of the ring
  kernels costs seconds, a cached load a few milliseconds per kernel.
* ``nogil=True`` because a process may run kernels from several threads, and a
  spinning or parked waiter must not hold the GIL.

numba keys its cache on the *defining* file only (its source hash, mtime and
size). Our kernels call each other across files (``ring.py`` inlines
``atomics.py``), so editing ``atomics.py`` would leave stale machine code for
``ring.py`` running. We therefore register a cache locator, ahead of numba's
own, that claims only files inside this package and stamps every entry with a
hash of *all* of ``kernels/*.py``: any edit anywhere in the package
invalidates every cached kernel. Rejected: setting ``numba.config.CACHE_DIR``
(process-global, it would move the user's own cache too) and stamping with the
package version only (an edited checkout would run stale code).

The locator hooks ``numba.core.caching.CacheImpl._locator_classes``, which is
internal API; pyproject pins numba to the versions where it exists. If it is
missing, we warn and fall back to numba's default behaviour.
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings

import numba
from numba.core import caching as _caching

_HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A hash over every ``kernels/*.py`` file and numba's version."""
    h = hashlib.sha256(numba.__version__.encode())
    for name in sorted(os.listdir(_HERE)):
        if name.endswith(".py"):
            with open(os.path.join(_HERE, name), "rb") as f:
                h.update(name.encode())
                h.update(f.read())
    return h.hexdigest()


def _ours(py_file: str) -> bool:
    return os.path.dirname(os.path.abspath(py_file)) == _HERE


class _PackageStampMixin:
    def get_source_stamp(self):
        return source_hash()


class _UserProvidedLocator(_PackageStampMixin, _caching.UserProvidedCacheLocator):
    @classmethod
    def from_function(cls, py_func, py_file):
        if not _ours(py_file):
            return None
        return super().from_function(py_func, py_file)


class _InTreeLocator(_PackageStampMixin, _caching.InTreeCacheLocator):
    @classmethod
    def from_function(cls, py_func, py_file):
        if not _ours(py_file):
            return None
        return super().from_function(py_func, py_file)


class _UserWideLocator(_PackageStampMixin, _caching.UserWideCacheLocator):
    @classmethod
    def from_function(cls, py_func, py_file):
        if not _ours(py_file):
            return None
        return super().from_function(py_func, py_file)


def _install_locators() -> None:
    impl = getattr(_caching, "CacheImpl", None) or getattr(_caching, "_CacheImpl", None)
    classes = getattr(impl, "_locator_classes", None)
    if not isinstance(classes, list):
        warnings.warn(
            "shm: this numba has no CacheImpl._locator_classes; kernels are cached "
            "with numba's per-file stamps, which can go stale when kernels/ is edited",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    # Same preference order as numba's own: NUMBA_CACHE_DIR, then __pycache__
    # beside the source, then the user-wide cache directory.
    for cls in (_UserWideLocator, _InTreeLocator, _UserProvidedLocator):
        if cls not in classes:
            classes.insert(0, cls)


_install_locators()

jit = functools.partial(numba.njit, cache=True, nogil=True)
"""``@jit`` / ``@jit(signature)``: numba's njit with caching and without the GIL."""
