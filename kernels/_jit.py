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
invalidates every cached kernel. The hash is taken when this module is
imported, before any kernel module is read; a process that sees the files
change after that stops saving and loading (it could otherwise store code
compiled from the old sources under the new sources' stamp: found when a
kernel edit during a test run left a stale ``get_at`` in the cache). Rejected: setting ``numba.config.CACHE_DIR``
(process-global, it would move the user's own cache too) and stamping with the
package version only (an edited checkout would run stale code).

When neither ``__pycache__`` beside the kernels nor the user-wide cache
directory is writable (a system-wide install used by an account without a
home, say), numba would refuse to decorate at all. A last locator then
uses ``<tmp>/shm-numba-<uid>``, created mode 0700 and used only if it is a
real directory owned by this user and closed to others: a cache directory
someone else can write would let them plant machine code we then run.

The locator hooks ``numba.core.caching.CacheImpl._locator_classes``, which is
internal API; pyproject pins numba to the versions where it exists. If it is
missing, we warn and fall back to numba's default behaviour.
"""
from __future__ import annotations

import functools
import hashlib
import os
import stat
import tempfile
import warnings

import numba
from numba.core import caching as _caching

_HERE = os.path.dirname(os.path.abspath(__file__))


def _fingerprint() -> tuple:
    """(name, mtime, size) of every ``kernels/*.py``: cheap enough to check at every cache access."""
    out = []
    for name in sorted(os.listdir(_HERE)):
        if name.endswith(".py"):
            st = os.stat(os.path.join(_HERE, name))
            out.append((name, st.st_mtime_ns, st.st_size))
    return tuple(out)


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


# What this process's kernels were compiled from: taken before any kernel
# module is read. If a file changes after that (someone editing kernels/
# while this process compiles), the machine code here may be from either
# version: it must not be saved (or loaded) under either version's stamp.
_IMPORT_FINGERPRINT = _fingerprint()
source_hash()


class _PackageStampMixin:
    def get_source_stamp(self):
        if _fingerprint() != _IMPORT_FINGERPRINT:
            return "changed-since-import-" + os.urandom(8).hex()     # matches nothing, ever
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


def private_cache_root() -> str | None:
    """``<tmp>/shm-numba-<uid>`` if it is (or can be made) a 0700 directory owned by us, else None."""
    root = os.path.join(tempfile.gettempdir(), f"shm-numba-{os.getuid()}")
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        st = os.lstat(root)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return root


class _PrivateTempLocator(_PackageStampMixin, _caching._SourceFileBackedLocatorMixin, _caching._CacheLocator):
    """The last resort: a private per-user directory under the temporary directory."""

    def __init__(self, py_func, py_file, root):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(root, self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self):
        return self._cache_path

    @classmethod
    def from_function(cls, py_func, py_file):
        if not _ours(py_file):
            return None
        root = private_cache_root()
        if root is None:
            return None
        self = cls(py_func, py_file, root)
        try:
            self.ensure_cache_path()
        except OSError:
            return None
        return self


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
    # Then, for our files only, the private temporary directory.
    for cls in (_PrivateTempLocator, _UserWideLocator, _InTreeLocator, _UserProvidedLocator):
        if cls not in classes:
            classes.insert(0, cls)


_install_locators()

jit = functools.partial(numba.njit, cache=True, nogil=True)
"""``@jit`` / ``@jit(signature)``: numba's njit with caching and without the GIL."""
