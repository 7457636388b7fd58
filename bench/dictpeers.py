"""The map peers of the ``dicts`` group, behind one small interface.

A ``DictPeer`` makes a ``Store`` in the parent, before the fork, filled
with the run's initial items. Every role (a forked child) calls
``store.open()`` and gets a ``Handle`` with

* ``get(k)``, ``set(k, v)``: the peer's own bound methods where its API
  allows (``d.__getitem__``, ``d.__setitem__``), so nobody pays for a
  wrapper call it does not need; lmdb needs a transaction per operation,
  so its callables are small functions;
* ``incr(k)``: add 1 to an int value, the way a user of that peer would:
  ``d.incr(k)`` for shm, ``with lock: d[k] += 1`` for the locked peers, a
  write transaction for lmdb, a bare ``d[k] += 1`` for the unlocked ones;
* ``close()``.

After the run the parent reads the result with ``store.total(keys)`` (the
sum of the counters) and removes everything with ``store.destroy()``.

Peer modules (UltraDict, shared_memory_dict, lmdb) are imported lazily, so a
missing one makes that peer *unavailable*, never a crash. UltraDict
monkeypatches ``multiprocessing.resource_tracker`` when imported; nothing
else in the benchmark relies on the tracker (shm never uses it, and
shared-memory-dict's segment is created and removed here without it).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import secrets
import shutil
import struct
import tempfile

from .common import CTX, Unavailable

MiB = 1 << 20
_TMPDIRS: list[str] = []
_Q = struct.Struct("<q")


def _rand(prefix: str) -> str:
    return prefix + secrets.token_hex(5)


class Handle:
    get = set = incr = None

    def close(self):
        pass


class Store:
    shm_prefixes: tuple = ()      # /dev/shm names this store may leave behind
    leak_is_bug = False           # True for shm: anything left is a bug to report

    def open(self) -> Handle:
        raise NotImplementedError

    def total(self, keys) -> int:
        raise NotImplementedError

    def destroy(self):
        pass


class _MappingStore(Store):
    """A peer used through its mapping interface: ``self.d``, and ``self.lock`` or None."""

    lock = None

    def open(self):
        d, lock = self.d, self.lock
        h = Handle()
        h.get, h.set = d.__getitem__, d.__setitem__
        if lock is not None:
            def incr(k):
                with lock:
                    d[k] = d[k] + 1
        else:
            def incr(k):
                d[k] = d[k] + 1
        h.incr = incr
        return h

    def total(self, keys):
        return sum(self.d[k] for k in keys)


class DictPeer:
    key = "?"
    name = "?"
    module = None                 # importable module this peer needs
    note = ""
    shared = True                 # False: a process-local dict (the ceiling)

    def check(self):
        if self.module and importlib.util.find_spec(self.module) is None:
            raise Unavailable(f"{self.module} is not installed")

    def make(self, init: dict, *, value_bytes: int = 0) -> Store:
        raise NotImplementedError


# --------------------------------------------------------------------------
# shm

class _ShmStore(Store):
    leak_is_bug = True

    def __init__(self, init, capacity=None, **kw):
        import shm
        self.d = shm.SharedDict(capacity=capacity or len(init), **kw)
        self.shm_prefixes = (self.d.name,)
        for k, v in init.items():
            self.d[k] = v

    def open(self):
        d = self.d                 # inherited: the child registered itself at fork
        h = Handle()
        h.get, h.set, h.incr = d.__getitem__, d.__setitem__, d.incr
        h.close = d.close
        h.d = d
        return h

    def total(self, keys):
        return sum(self.d[k] for k in keys)

    def destroy(self):
        self.d.close()             # the last one out unlinks


class ShmDictPeer(DictPeer):
    key = "shm"
    name = "shm.SharedDict"
    module = "shm"
    note = "`SharedDict(capacity=<keys>)`, default msgpack codec; `d[k]`, `d[k] = v`, `d.incr(k)`."

    def make(self, init, **kw):
        return _ShmStore(init)


# --------------------------------------------------------------------------
# multiprocessing.Manager().dict()

class _ManagerStore(_MappingStore):
    def __init__(self, init, locked):
        self.m = CTX.Manager()
        self.d = self.m.dict(init)
        self.lock = self.m.Lock() if locked else None


    def destroy(self):
        self.m.shutdown()


class ManagerPeer(DictPeer):
    key = "manager"
    name = "Manager().dict()"
    note = ("`multiprocessing.Manager().dict()` (fork context): every operation is a pickled "
            "round trip to the manager process.")

    def __init__(self, locked=False, key=None, name=None):
        self.locked = locked
        if locked:
            self.key = "manager-lock"
            self.name = "Manager().dict() + Manager().Lock()"
            self.note = "`with lock: d[k] += 1`, the lock a `Manager().Lock()` (two more round trips)."
        self.key, self.name = key or self.key, name or self.name

    def make(self, init, **kw):
        return _ManagerStore(init, self.locked)


# --------------------------------------------------------------------------
# UltraDict

def _ultra_sizes(init, value_bytes):
    """(stream buffer, full-dump segment) sizes: generous, so dumps are rare and always fit."""
    dump = len(pickle.dumps(init, pickle.HIGHEST_PROTOCOL))
    buf = 4 * MiB if value_bytes <= 1024 else max(32 * MiB, 128 * value_bytes)
    return buf, 2 * dump + buf + MiB


class _UltraStore(_MappingStore):
    def __init__(self, init, value_bytes, shared_lock, locked):
        from UltraDict import UltraDict
        self.name = _rand("bdu")
        self.shm_prefixes = (self.name,)
        buf, full = _ultra_sizes(init, value_bytes)
        # auto_unlink=False: a forked child that exits must not unlink it; destroy() does.
        self.d = UltraDict(name=self.name, create=True, buffer_size=buf, full_dump_size=full,
                           shared_lock=shared_lock, auto_unlink=False)
        self.d.update(init)
        self.lock = self.d.lock if locked else None

    def destroy(self):
        self.d.close(unlink=True)


class UltraDictPeer(DictPeer):
    key = "ultradict"
    name = "UltraDict"
    module = "UltraDict"

    def __init__(self, shared_lock=False, locked=False, key=None, name=None, note=None):
        self.shared_lock = shared_lock
        self.locked = locked
        if key:
            self.key = key
        if name:
            self.name = name
        self.note = note or (
            "`UltraDict(buffer_size=4 MiB (32+ MiB for 10 KiB+ values), full_dump_size=fixed)`, "
            "default lock (a `multiprocessing.RLock`: shared here only because every process is forked "
            "from the one that made it). Every process keeps a full local copy; reads replay the shared "
            "update stream into it, writes append a pickled delta (a full pickle of the whole dict when the "
            "stream buffer is full).")

    def check(self):
        super().check()
        if self.shared_lock and importlib.util.find_spec("atomics") is None:
            raise Unavailable("shared_lock=True needs the atomics package")

    def make(self, init, value_bytes=0, **kw):
        return _UltraStore(init, value_bytes, self.shared_lock, self.locked)


# --------------------------------------------------------------------------
# shared-memory-dict

@contextlib.contextmanager
def _untracked():
    """Create a multiprocessing.shared_memory segment without starting a resource tracker."""
    from multiprocessing import resource_tracker as rt
    reg = rt.register
    rt.register = lambda name, rtype: None if rtype == "shared_memory" else reg(name, rtype)
    try:
        yield
    finally:
        rt.register = reg


class _SmdStore(_MappingStore):
    def __init__(self, init, locked):
        import shared_memory_dict as smd
        self.name = _rand("bds")
        self.seg = f"sm_{self.name}"
        self.shm_prefixes = (self.seg,)
        size = 2 * len(pickle.dumps(init, pickle.HIGHEST_PROTOCOL)) + 64 * 1024
        with _untracked():
            self.d = smd.SharedMemoryDict(name=self.name, size=size)
        self.d.update(init)
        self.lock = CTX.Lock() if locked else None     # inherited by the forked roles


    def destroy(self):
        import _posixshmem
        try:
            self.d.cleanup()
        finally:
            try:
                _posixshmem.shm_unlink("/" + self.seg)     # it never unlinks by itself
            except FileNotFoundError:
                pass


class SmdPeer(DictPeer):
    key = "smd"
    name = "shared-memory-dict"
    module = "shared_memory_dict"

    def __init__(self, locked=False, key=None, name=None):
        self.locked = locked
        if locked:
            self.key = "smd-lock"
            self.name = "shared-memory-dict + multiprocessing.Lock"
        self.key, self.name = key or self.key, name or self.name
        self.note = (
            "`SharedMemoryDict(name, size)`: the whole dict is one pickle in one segment; every read "
            "unpickles it (after copying the whole segment), every write unpickles and re-pickles it. Its "
            "own lock (`SHARED_MEMORY_USE_LOCK=1`) is left off: it guards each get and each set separately "
            "(and, on writes, is released before the generator that does the write runs), so it cannot make "
            "`d[k] += 1` atomic"
            + ("; here `with lock: d[k] += 1` with a `multiprocessing.Lock`." if locked else "."))

    def make(self, init, **kw):
        return _SmdStore(init, self.locked)


# --------------------------------------------------------------------------
# lmdb

class _LmdbStore(Store):
    def __init__(self, init, raw_bytes, locked=True):
        self.locked = locked
        self.dir = tempfile.mkdtemp(prefix="bench-lmdb-")
        _TMPDIRS.append(self.dir)
        size = sum(len(pickle.dumps(v)) + 64 for v in init.values())
        self.map_size = max(256 * MiB, 16 * size)
        self.raw = raw_bytes
        env = self._env()
        try:
            with env.begin(write=True) as txn:
                for k, v in init.items():
                    txn.put(k.encode(), self._enc(v))
        finally:
            env.close()            # an lmdb environment must not cross a fork: children open their own

    def _enc(self, v):
        if type(v) is int:
            return _Q.pack(v)
        return v if self.raw else pickle.dumps(v, pickle.HIGHEST_PROTOCOL)

    def _env(self):
        import lmdb
        return lmdb.open(self.dir, map_size=self.map_size, sync=False, metasync=False)

    def open(self):
        env = self._env()
        begin = env.begin
        raw, loads, dumps, P = self.raw, pickle.loads, pickle.dumps, pickle.HIGHEST_PROTOCOL
        unpack, pack = _Q.unpack, _Q.pack
        h = Handle()
        if raw:
            def get(k):
                with begin() as txn:
                    return txn.get(k.encode())

            def set_(k, v):
                with begin(write=True) as txn:
                    txn.put(k.encode(), v)
        else:
            def get(k):
                with begin() as txn:
                    v = txn.get(k.encode())
                return unpack(v)[0] if len(v) == 8 else loads(v)

            def set_(k, v):
                with begin(write=True) as txn:
                    txn.put(k.encode(), pack(v) if type(v) is int else dumps(v, P))

        if self.locked:
            def incr(k):
                kb = k.encode()
                with begin(write=True) as txn:          # lmdb's writer lock: one write txn at a time
                    txn.put(kb, pack(unpack(txn.get(kb))[0] + 1))
        else:
            def incr(k):
                kb = k.encode()
                with begin() as txn:
                    v = unpack(txn.get(kb))[0]
                with begin(write=True) as txn:
                    txn.put(kb, pack(v + 1))
        h.get, h.set, h.incr = get, set_, incr
        h.close = env.close
        return h

    def total(self, keys):
        env = self._env()
        try:
            with env.begin() as txn:
                return sum(_Q.unpack(txn.get(k.encode()))[0] for k in keys)
        finally:
            env.close()

    def destroy(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class LmdbPeer(DictPeer):
    key = "lmdb"
    name = "lmdb"
    module = "lmdb"
    note = ("`lmdb.open(tmpdir, sync=False, metasync=False)` in each process; a read transaction per get, a "
            "write transaction per set and per increment (`get`, add, `put`). Keys `str.encode()`d; ints "
            "packed as 8 bytes, other values pickled, bytes values stored raw.")

    def __init__(self, locked=True, key=None, name=None):
        self.locked = locked
        self.key, self.name = key or self.key, name or self.name

    def make(self, init, value_bytes=0, **kw):
        return _LmdbStore(init, raw_bytes=value_bytes > 0, locked=self.locked)


# --------------------------------------------------------------------------
# The ceiling: a plain dict in the process itself (nothing shared).

class _PlainStore(Store):
    def __init__(self, init):
        self.d = dict(init)

    def open(self):
        h = Handle()
        h.get, h.set = self.d.__getitem__, self.d.__setitem__
        return h


class PlainDictPeer(DictPeer):
    key = "dict"
    name = "plain dict (in-process ceiling)"
    shared = False
    note = "A plain `dict` in the measuring process: nothing shared, the ceiling for any Python loop."

    def make(self, init, **kw):
        return _PlainStore(init)


def leftover_tmp() -> list[str]:
    """lmdb directories made by this process that still exist (each store removes its own)."""
    return [p for p in _TMPDIRS if os.path.exists(p)]
