"""SharedDict: a sharded concurrent hash table in shared memory.

>>> import shm
>>> d = shm.SharedDict()
>>> d["hits"] = 0
>>> d.incr("hits")            # atomic across processes, lock-free for ints
1
>>> d["user:7"] = {"name": "ada", "langs": ["en", "fr"]}
>>> dict(d)
{'hits': 1, 'user:7': {'name': 'ada', 'langs': ['en', 'fr']}}
>>> d.close(); d.unlink()

It replaces ``multiprocessing.Manager().dict()``: the table itself lives in
shared memory (``kernels/hashtable.py`` has the design), so every process
reads and writes it directly, with no manager process and no RPC.

* Reads never take a lock and never wait for writers.
* A write locks one shard of the table (its key's), for a few hundred
  nanoseconds.
* ``incr`` on an int value is a lock-free fetch-and-add.
* ``compare_and_set``, ``setdefault``, ``pop``, ``popitem`` and ``alter``
  are atomic: they hold the key's shard lock across the read and the
  write.
* Each handle keeps the small immutable values it read (ints, floats,
  short strings and bytes, under str and int keys) and serves them again
  while the key's shard is unlocked and its version unchanged (two loads
  of shared memory, no kernel call): reads stay linearizable, and a
  repeated read costs about what a local dict lookup costs.
* The table grows (and reclaims deleted space) shard by shard, online.
* A process killed while holding a shard lock, even in the middle of
  growing the shard, never wedges the others: the first survivor to wait
  for that lock finds its owner dead, rebuilds the shard from its index,
  and goes on.

Keys are ``str``, ``bytes``, ``int``, ``float``, ``bool``, ``None`` and
tuples of these, encoded canonically (``shm/_keys.py``). Values go through
the codec (``msgpack`` by default, ``pickle`` for any object), except ints
in int64 range, which are stored as numbers so that ``incr`` can work in
place.

Numeric mode (``key_type="int64"``, ``value_type="int64"`` or
``"float64"``): the same table, with int keys and numeric values only, whose
``lookup_i64``/``put_i64``/``incr_i64`` kernels a user's own ``@njit``
loops can call with ``d.kernel()`` (``examples/njit_counters.py``).
"""
from __future__ import annotations

import os
import struct
import threading
import time
import weakref
from collections.abc import ItemsView, Mapping, MutableMapping, ValuesView
from dataclasses import dataclass

import numpy as np

from kernels import hashtable as H
from kernels import layout as L
from kernels import words as W

from . import _liveness
from . import _chan
from ._chan import BYTES_OFF, _entry
from ._keys import decode_key, encode_key
from ._registry import PEER_CHECK, Registry
from .codec import get_codec
from .errors import Closed, CorruptSegment, DecodeError, OutOfSharedMemory, SegmentExists, SegmentNotFound, ShmError
from .segment import Segment, check_name, new_name, unlink_name

__all__ = ["SharedDict", "DictStats"]

_GET = _entry(H.get_at)
_GET_INTO = _entry(H.get_into_at)
_VLEN = _entry(H.value_len_at)
_PUT = _entry(H.put_at)
_STORE_LOCKED = _entry(H.store_locked_at)
_DELETE = _entry(H.delete_at)
_INCR = _entry(H.incr_at)
_SHARD_OF = _entry(H.shard_of_at)
_LOCK_SPIN = _entry(H.lock_spin_at)
_UNLOCK = _entry(H.unlock_at)
_LOCK_PARK = _entry(H.lock_park_at)
_LOCK_STEAL = _entry(H.lock_steal_at)
_LOCK_OWNER = _entry(H.lock_owner_at)
_ANNOUNCER = _entry(H.announcer_at)
_SETTLE = _entry(H.settle_version_at)
_CLEAR_ANNOUNCE = _entry(H.clear_announce_at)
_SET_STATE = _entry(H.set_state_at)
_PUBLISH = _entry(H.publish_at)
_COMPACT = _entry(H.compact_at)
_STAT = _entry(H.shard_stat_at)
_SNAPSHOT = _entry(H.snapshot_at)
_GET_NUM = _entry(H.get_num_at)
_PUT_NUM = _entry(H.put_num_at)
_STORE_NUM_LOCKED = _entry(H.store_num_locked_at)
_INCR_NUM = _entry(H.incr_num_at)
_SHARD_OF_NUM = _entry(H.shard_of_num_at)


def _obj_entry(dispatcher):
    """The compiled entry point of a kernel whose arguments are ``H.PYSTR``, ``H.PYBYTES`` and ``H.PYINT``.

    No dispatcher typing: each argument is converted by its type's unboxer,
    which checks the object's type itself (a wrong one raises TypeError).
    """
    (sig,) = dispatcher.signatures
    if not all(t in (H.PYSTR, H.PYBYTES, H.PYINT) for t in sig):
        raise TypeError(f"{dispatcher.__name__}: unexpected signature {sig}")
    return dispatcher.overloads[sig].entry_point


_PUT_STR_I64 = _obj_entry(H.put_str_i64_at)
_PUT_STR_STR = _obj_entry(H.put_str_str_at)
_PUT_STR_BYTES = _obj_entry(H.put_str_bytes_at)

_I64 = struct.Struct("<q")
_unpack_i64 = _I64.unpack_from
_OFF = BYTES_OFF
_AMASK = H.AREA_MASK
_VK_I64 = L.VK_I64
_VK_STR = L.VK_STR
_SHRINK = H.SHRINK
_NOTFOUND = H.NOTFOUND
_F64 = struct.Struct("<d")
_SNAP_HEAD = struct.Struct("<IB3xq")
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1

AREA = 512                    # result area: values up to this many bytes come back in one call
MIN_SLOTS = 16
MIN_HEAP = 4096               # a new dict's shards start this small...
MIN_GROWN_HEAP = 64 << 10     # ...and a compacted shard never gets less
GROWN_HEADROOM = 256 << 10    # room a compaction leaves for writes, at least (a compaction costs
                              # ~0.7 ms: with room for only as much as the live data, a small
                              # shard under overwrites compacted every ~1000 sets, ~0.5 us a set)
SPIN = 10                     # backoff steps spent spinning on a shard lock before parking
KEY_CACHE = 1 << 15           # encoded str keys remembered per handle (cleared when full)
VALUE_CACHE = 1 << 16         # values remembered per handle for cached reads (cleared when full)
VALUE_CACHE_MAX = 1024        # longest str or bytes value kept there
_CACHEABLE = frozenset((int, float, str, bytes, bool, type(None)))    # immutable: safe to hand out again
_VER_DELTA = H.SEEN_VERSION_DELTA
_NOVALUE = object()
_KEY_TYPES = {None: 0, "any": 0, "int64": 1}
_VALUE_TYPES = {None: 0, "any": 0, "int64": 1, "float64": 2}


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _default_shards() -> int:
    return max(4, _pow2((os.cpu_count() or 2) * 4))       # dashmap's default


@dataclass(frozen=True)
class DictStats:
    """A snapshot of a SharedDict (racy by nature: other processes keep writing)."""

    name: str
    keys: int
    shards: int
    bytes_used: int              # heap bytes in the current generations, garbage included
    garbage_bytes: int           # of which replaced or deleted, reclaimed at the next compaction
    segment_bytes: int           # shared memory mapped for the shards
    per_shard_keys: tuple
    lock_waits: int              # lock acquisitions that had to wait, all shards
    growths: int                 # shard generations made (growth and compaction)
    repairs: int                 # shards rebuilt after their lock holder died
    participants: int
    ops: int                     # operations done by every handle so far (approximate; for rates)


class SharedDict(MutableMapping):
    """A dict in shared memory, safe to use from any number of processes at once.

    ``SharedDict(name=None, *, codec="msgpack", shards=None, key_type=None,
    value_type=None, capacity=None)`` creates one; ``SharedDict.open(name)``
    attaches to it from any process. ``capacity`` presizes for that many keys.
    """

    # ------------------------------------------------------------------
    # Creation, attachment, lifetime.

    def __init__(self, name: str | None = None, *, codec="msgpack", shards: int | None = None,
                 key_type: str | None = None, value_type: str | None = None, capacity: int | None = None):
        if key_type not in _KEY_TYPES or value_type not in _VALUE_TYPES:
            raise ValueError("key_type must be None or 'int64'; value_type None, 'int64' or 'float64'")
        numeric = _KEY_TYPES[key_type] == 1
        if numeric != (_VALUE_TYPES[value_type] != 0):
            raise ValueError("numeric mode needs both key_type='int64' and value_type='int64' or 'float64'")
        nshards = _default_shards() if shards is None else int(shards)
        if nshards < 1 or nshards & (nshards - 1) or nshards > 4096:
            raise ValueError("shards must be a power of two between 1 and 4096")
        codec_ = get_codec(codec)
        lay = L.dict_layout(nshards)
        family = new_name()
        name = check_name(name) if name is not None else None
        params = [0] * 8
        params[L.PD_SHARDS] = nshards
        params[L.PD_CODEC] = codec_.id
        params[L.PD_KEY_TYPE] = _KEY_TYPES[key_type]
        params[L.PD_VALUE_TYPE] = _VALUE_TYPES[value_type]
        params[L.PD_PARTICIPANTS] = lay["participants"]
        params[L.PD_TOKENS] = lay["tokens"]
        params[L.PD_TABLE] = lay["table"]
        params[L.PD_ANNOUNCE] = lay["announce"]
        per_shard = max(0, int(capacity or 0)) // nshards + 1
        slots = max(MIN_SLOTS, _pow2(per_shard * 2))
        heap = max(MIN_HEAP, _pow2(per_shard * 64))
        made = []

        def init(seg):
            for s in range(nshards):       # every shard starts at generation 1
                made.append(self._create_gen(family, name or family, s, 1, slots, heap))
                W.store(seg.w, (lay["table"] + s * L.SE_SIZE + L.SE_GEN) >> 3, 1)

        try:
            ctrl = Segment.create(L.KIND_DICT, lay["size"], name=name or family, family=family,
                                  params=params, init=init)
        except BaseException:
            for nm in made:
                unlink_name(nm)
            raise
        try:
            self._setup(ctrl)
        except BaseException:
            ctrl.close()
            _unlink_all(ctrl.name, family)
            raise

    @classmethod
    def open(cls, name: str) -> "SharedDict":
        """Attach to the SharedDict ``name`` (made by any process of this user)."""
        self = cls.__new__(cls)
        seg = Segment.attach(check_name(name), kind=L.KIND_DICT, what="SharedDict")
        try:
            self._setup(seg)
        except BaseException:
            seg.close()
            raise
        return self

    # Defaults, so close() works after a partial setup.
    _ctrl = None
    _me = -1
    _closed = True

    def _setup(self, ctrl: Segment) -> None:
        p = ctrl.params
        nshards = p[L.PD_SHARDS]
        if nshards < 1 or nshards & (nshards - 1) or nshards > 4096:
            raise CorruptSegment(f"SharedDict {ctrl.name!r}: implausible shard count {nshards}")
        lay = L.dict_layout(nshards)
        if (p[L.PD_PARTICIPANTS], p[L.PD_TOKENS], p[L.PD_TABLE], p[L.PD_ANNOUNCE]) != (
                lay["participants"], lay["tokens"], lay["table"], lay["announce"]) or lay["size"] > ctrl.size:
            raise CorruptSegment(f"SharedDict {ctrl.name!r}: inconsistent layout parameters")
        try:
            self._codec = get_codec(p[L.PD_CODEC])
        except ValueError:
            raise CorruptSegment(f"SharedDict {ctrl.name!r}: unknown codec id {p[L.PD_CODEC]}") from None
        self._ctrl = ctrl
        self._name = ctrl.name
        self._family = ctrl.family
        self._nshards = nshards
        self._numeric = p[L.PD_KEY_TYPE] == 1
        self._vtype = p[L.PD_VALUE_TYPE]
        self._table = lay["table"]
        self._lock = threading.RLock()
        self._enc = self._codec.fast_encode or self._codec.encode
        self._dec_fast = self._codec.fast_decode
        self._kind = self._codec.kind
        # str values go in as UTF-8 where the codec would take them anyway (not "bytes"/"numpy")
        self._str_ok = self._codec.name in ("msgpack", "pickle")
        self._registry = Registry(ctrl, lay["participants"], lay["tokens"], (L.DC_ROLES, L.DC_ROLES2),
                                  (L.DC_TOKENS, L.DC_TOKENS2), (L.DC_WAITERS, L.DC_WAITERS2))
        self._scratch = np.zeros(H.N_BANKS * H.N_AREAS * AREA, np.uint8)
        self._scratch_mv = memoryview(self._scratch)
        self._sbytes = self._scratch.data.cast("B")
        self._banks = np.zeros(2 * H.N_BANKS, np.int64)
        d = np.zeros(H.X_SHARDS + nshards * H.X_STRIDE, np.int64)
        d[H.X_CTRL] = ctrl.addr
        d[H.X_CTRL_SIZE] = ctrl.size
        d[H.X_NSHARDS] = nshards
        d[H.X_SHIFT] = 64 - (nshards.bit_length() - 1)
        d[H.X_ME] = -1
        d[H.X_TABLE] = lay["table"]
        d[H.X_ANNOUNCE] = lay["announce"]
        d[H.X_DST] = self._scratch.ctypes.data
        d[H.X_DST_SIZE] = self._scratch.size
        d[H.X_AREA_SIZE] = AREA
        d[H.X_BANKS] = self._banks.ctypes.data
        d[H.X_KEYMODE] = 1 if self._numeric else 0
        self._keybuf = np.zeros(H.KEYBUF, np.uint8)
        self._keybuf[0] = ord("s")          # the str-key kernels write the UTF-8 after it
        d[H.X_KEYBUF] = self._keybuf.ctypes.data
        d[H.X_VALKIND] = ((L.VK_I64 if self._vtype == 1 else L.VK_F64) if self._numeric else 0)
        self._d = d
        self._daddr = d.ctypes.data
        self._segs: list[Segment | None] = [None] * nshards
        self._snap = np.zeros(1 << 16, np.uint8)
        self._kc: dict[str, bytes] = {}
        self._held: set[int] = set()      # shards whose lock this handle holds (under self._lock)
        # The read cache: key -> (lock word index, version, value); see kernels/hashtable.py,
        # "The version word". Numeric mode's increments do not bump versions: no cache there.
        self._vc: dict = {}
        self._cw = memoryview(ctrl.mm).cast("q") if not self._numeric else None
        self._seen = np.zeros(2 * H.N_BANKS * H.N_AREAS, np.int64)
        self._sw = memoryview(self._seen)
        if not self._numeric:
            d[H.X_SEEN] = self._seen.ctypes.data
        self._closed = False
        self._register()
        for s in range(nshards):
            self._map(s)
        _OPEN[id(self)] = self

    def _register(self) -> None:
        reg = self._registry
        self._me = reg.register(on_reap=self._recover)
        st = self._ctrl.state
        if st & L.SEG_STATE_MASK not in (L.SEG_OPEN, L.SEG_CLOSING):
            reg.unregister(self._me)
            self._me = -1
            raise SegmentNotFound(f"SharedDict {self._name!r} was closed by its last user and is being removed")
        reg.set_role(self._me, L.ROLE_TX)
        self._d[H.X_ME] = self._me
        self._d[H.X_OPS] = self._ops_addr(self._me)

    def _ops_addr(self, me: int) -> int:
        """Address of participant ``me``'s operation counter (the kernels tick it; ``top`` reads it)."""
        return self._ctrl.addr + self._ctrl.params[L.PD_PARTICIPANTS] + me * L.PT_SIZE + L.PT_OPS

    def _after_fork_child(self) -> None:
        self._lock = threading.RLock()
        self._held = set()
        self._banks[:] = 0
        self._d[H.X_ME] = -1
        self._d[H.X_OPS] = 0
        self._me = -1
        if not self._closed:
            try:
                self._register()
            except ShmError:
                self._closed = True
                self._vc = {}

    # ------------------------------------------------------------------
    # Shard generations.

    def _gen_name(self, s: int, gen: int, family: str | None = None) -> str:
        return f"{family or self._family}s{s:x}g{gen:x}"

    def _create_gen(self, family, public, s, gen, nslots, heap) -> str:
        self._new_gen(family, public, s, gen, nslots, heap).close()
        return self._gen_name(s, gen, family)

    def _new_gen(self, family, public, s, gen, nslots, heap) -> Segment:
        """Create shard ``s``'s generation ``gen`` (empty) and return it, mapped."""
        lay = L.shard_layout(nslots, heap)
        params = [0] * 8
        params[L.PS_SHARD] = s
        params[L.PS_GEN] = gen
        params[L.PS_NSLOTS] = nslots
        params[L.PS_INDEX] = lay["index"]
        params[L.PS_HEAP] = lay["heap"]
        params[L.PS_HEAP_SIZE] = lay["size"] - lay["heap"]
        name = self._gen_name(s, gen, family)
        try:
            return Segment.create(L.KIND_SHARD, lay["size"], name=name, family=family, public_name=public,
                                  params=params)
        except SegmentExists:
            unlink_name(name)       # left half-made by a process that died; we hold the lock
            return Segment.create(L.KIND_SHARD, lay["size"], name=name, family=family, public_name=public,
                                  params=params)

    def _table_gen(self, s: int) -> int:
        return W.load(self._ctrl.w, (self._table + s * L.SE_SIZE + L.SE_GEN) >> 3)

    def _map(self, s: int) -> None:
        """Map shard ``s``'s current generation (validated) into the descriptor."""
        for _ in range(1000):
            gen = self._table_gen(s)
            try:
                seg = Segment.attach(self._gen_name(s, gen), kind=L.KIND_SHARD, what="SharedDict shard")
            except SegmentNotFound:
                if self._table_gen(s) != gen:
                    continue        # it moved on while we looked
                raise CorruptSegment(f"SharedDict {self._name!r}: shard {s} generation {gen} is missing")
            p = seg.params
            nslots, heap_size = p[L.PS_NSLOTS], p[L.PS_HEAP_SIZE]
            lay = L.shard_layout(nslots, heap_size) if nslots > 0 and not nslots & (nslots - 1) else None
            if (lay is None or p[L.PS_SHARD] != s or p[L.PS_GEN] != gen or p[L.PS_INDEX] != lay["index"]
                    or p[L.PS_HEAP] != lay["heap"] or lay["size"] > seg.size):
                seg.close()
                raise CorruptSegment(f"SharedDict {self._name!r}: shard {s} has inconsistent parameters")
            self._install(s, seg, gen)
            return
        raise CorruptSegment(f"SharedDict {self._name!r}: shard {s} keeps moving")

    def _install(self, s: int, seg: Segment, gen: int) -> None:
        """Point the descriptor at ``seg``, shard ``s``'s generation ``gen`` (validated or made by us)."""
        p = seg.params
        x = H.X_SHARDS + s * H.X_STRIDE
        d = self._d
        d[x + H.S_ADDR] = seg.addr
        d[x + H.S_SIZE] = seg.size
        d[x + H.S_GEN] = gen
        d[x + H.S_NSLOTS] = p[L.PS_NSLOTS]
        d[x + H.S_INDEX] = p[L.PS_INDEX]
        d[x + H.S_HEAP] = p[L.PS_HEAP]
        d[x + H.S_HEAP_SIZE] = p[L.PS_HEAP_SIZE]
        old, self._segs[s] = self._segs[s], seg
        if old is not None:
            old.close()     # every kernel call holds the GIL: none is using it now

    def _refresh(self, s: int) -> None:
        """The mapped generation of ``s`` was replaced: follow it (waiting out a compaction)."""
        deadline = time.monotonic() + PEER_CHECK
        while True:
            mapped = int(self._d[H.X_SHARDS + s * H.X_STRIDE + H.S_GEN])
            if self._table_gen(s) != mapped or self._segs[s] is None:
                self._map(s)
                return
            st = _STAT(self._daddr, s, L.SH_STATE)
            if st == H.CLOSED:
                raise Closed(f"SharedDict {self._name!r} was closed")
            if st != L.SHARD_REPLACED:
                return      # current (we may have just repaired and remapped it ourselves)
            if time.monotonic() > deadline:
                self._check_lock_owner(s)
                if _LOCK_OWNER(self._daddr, s) < 0 and self._table_gen(s) == mapped:
                    # Marked REPLACED, never published, and nobody holds the
                    # lock: its compactor is gone. Taking the lock rebuilds it.
                    with self._locked(s):
                        pass
                deadline = time.monotonic() + PEER_CHECK
            time.sleep(0.0001)

    def refresh(self) -> None:
        """Map every shard's current generation (after a numeric @njit call returned MOVED or UNMAPPED)."""
        self._check()
        with self._lock:
            for s in range(self._nshards):
                if (self._segs[s] is None or int(self._d[H.X_SHARDS + s * H.X_STRIDE + H.S_GEN]) != self._table_gen(s)
                        or _STAT(self._daddr, s, L.SH_STATE) == L.SHARD_REPLACED):
                    self._refresh(s)

    # ------------------------------------------------------------------
    # Locks, compaction, recovery.

    def _acquire(self, s: int) -> None:
        """Take shard ``s``'s lock, parking while it is held, recovering it from a dead owner."""
        if _LOCK_SPIN(self._daddr, s, SPIN) == 1:
            self._after_acquire(s)
            self._held.add(s)
            return
        next_check = time.monotonic() + PEER_CHECK
        while True:
            if _LOCK_SPIN(self._daddr, s, 0) == 1:
                self._after_acquire(s)
                self._held.add(s)
                return
            _LOCK_PARK(self._daddr, s, int(PEER_CHECK * 1e9))
            if time.monotonic() >= next_check:
                self._check_lock_owner(s)
                next_check = time.monotonic() + PEER_CHECK

    def _check_lock_owner(self, s: int) -> None:
        """Reap the holder of shard ``s``'s lock if it is dead (which recovers the shard)."""
        owner = _LOCK_OWNER(self._daddr, s)
        if owner == self._me and s in self._held:
            return          # ours
        word = W.load(self._ctrl.w, (self._table + s * L.SE_SIZE + L.SE_LOCK) >> 3)
        if word != 0 and (owner < 0 or owner >= L.MAX_PARTICIPANTS or owner == self._me):
            # A lock word no holder explains (damaged memory): no owner, an owner beyond the
            # participant table, or this very handle, which holds no lock of s (its thread lock
            # serialises its shard locks). Take it over and rebuild the shard, as from a dead holder.
            if _LOCK_STEAL(self._daddr, s, owner):
                self._repair(s)
            return
        if owner < 0:
            return
        st, pid, start, ns = self._registry.entry(owner)
        code = st & L.PS_CODE_MASK
        if code == L.PS_FREE or (code == L.PS_ALIVE and not _liveness.alive(pid, start, ns)) or \
                code in (L.PS_REAPING, L.PS_CLAIMING):
            n = self._registry.sweep(on_reap=self._recover, skip=self._me)
            if n:
                W.fetch_add(self._ctrl.w, L.DC_REAPED >> 3, n)
            if code == L.PS_FREE and _LOCK_OWNER(self._daddr, s) == owner:
                # Its entry was freed (reaped by a process that did not recover locks): take it over.
                if _LOCK_STEAL(self._daddr, s, owner):
                    self._repair(s)

    def _after_acquire(self, s: int) -> None:
        """We hold the lock: make sure we map the current generation, and that it is sound.

        On any failure (a full /dev/shm for the rebuild, a corrupt segment,
        KeyboardInterrupt) the lock is released, never kept by a live process.
        """
        try:
            if int(self._d[H.X_SHARDS + s * H.X_STRIDE + H.S_GEN]) != self._table_gen(s):
                self._map(s)
            if _STAT(self._daddr, s, L.SH_STATE) in (L.SHARD_COMPACTING, L.SHARD_REPLACED):
                # Left mid-compaction by a holder that died (before its recovery ran): rebuild it.
                self._rebuild(s)
        except BaseException:
            self._release(s)
            raise

    def _rebuild(self, s: int) -> None:
        """Compact shard ``s`` (locked) from its index; if that fails, make the old generation live again.

        The old generation is sound whatever step its last holder died at
        (at most an unreachable record and stale counters), so serving it is
        safe; the next holder tries the rebuild again.
        """
        try:
            self._compact(s, 0)
        except BaseException:
            if int(self._d[H.X_SHARDS + s * H.X_STRIDE + H.S_GEN]) == self._table_gen(s):
                _SET_STATE(self._daddr, s, L.SHARD_LIVE)
            raise
        self._thaw(s)

    def _release(self, s: int) -> None:
        self._held.discard(s)
        _UNLOCK(self._daddr, s)

    def _recover(self, dead: int) -> None:
        """Reap participant ``dead``: rebuild every shard whose lock it held, clear its announcement."""
        if self._me < 0:
            return
        _CLEAR_ANNOUNCE(self._daddr, dead)
        for s in range(self._nshards):
            if _LOCK_STEAL(self._daddr, s, dead):
                self._repair(s)

    def _repair(self, s: int) -> None:
        """We hold the lock of a shard whose holder died: rebuild it from its index, then release.

        Never raises: it runs inside a registry sweep, which must finish
        reaping. A rebuild that fails leaves the old generation live (see
        ``_rebuild``); the next lock holder tries again.
        """
        try:
            self._map(s)
            # A holder killed between publishing a generation and unlinking its
            # predecessor left that name behind.
            unlink_name(self._gen_name(s, int(self._d[H.X_SHARDS + s * H.X_STRIDE + H.S_GEN]) - 1))
            self._rebuild(s)
            W.fetch_add(self._ctrl.w, L.DC_REPAIRS >> 3, 1)
        except Exception:
            pass
        finally:
            self._release(s)

    def _freeze(self, s: int) -> None:
        """Stop lock-free increments on shard ``s`` (we hold its lock) and wait for those under way."""
        _SET_STATE(self._daddr, s, L.SHARD_COMPACTING)
        deadline = time.monotonic() + PEER_CHECK
        while True:
            p = _ANNOUNCER(self._daddr, s)
            if p < 0:
                _SETTLE(self._daddr, s)     # clears what incrementers that died mid-add left in the version
                return
            if time.monotonic() > deadline:
                st, pid, start, ns = self._registry.entry(p)
                if not _liveness.alive(pid, start, ns):
                    _CLEAR_ANNOUNCE(self._daddr, p)     # it died mid-increment: its add is done or not
                deadline = time.monotonic() + PEER_CHECK
            time.sleep(0)

    def _mostly_garbage(self, s: int) -> bool:
        garbage = _STAT(self._daddr, s, L.SH_GARBAGE)
        return garbage >= H.SHRINK_MIN and 2 * garbage > _STAT(self._daddr, s, L.SH_BUMP)

    def _thaw(self, s: int) -> None:
        if _STAT(self._daddr, s, L.SH_STATE) == L.SHARD_COMPACTING:
            _SET_STATE(self._daddr, s, L.SHARD_LIVE)

    def _compact(self, s: int, extra: int) -> None:
        """Move shard ``s`` (locked) to a new generation sized for its live data plus ``extra`` bytes."""
        self._freeze(s)
        x = H.X_SHARDS + s * H.X_STRIDE
        # Counters are hints (a killed writer leaves them stale, damage can
        # make them absurd): the copy never needs more than the old index and heap.
        count = min(max(0, _STAT(self._daddr, s, L.SH_COUNT)), int(self._d[x + H.S_NSLOTS]))
        live = min(max(0, _STAT(self._daddr, s, L.SH_BUMP) - _STAT(self._daddr, s, L.SH_GARBAGE)),
                   int(self._d[x + H.S_HEAP_SIZE]))
        nslots = max(MIN_SLOTS, _pow2(2 * (count + 2)))
        # The live records, room for as much again (amortised growth; at least
        # GROWN_HEADROOM), plus the write that asked: a 64 MiB value gets a
        # ~64 MiB heap, not a power of two above 128.
        room = max(live, GROWN_HEADROOM)
        heap = max(MIN_GROWN_HEAP, -(-(live + room + extra + 2 * L.RECORD_HEADER) // 4096) * 4096)
        old_gen = int(self._d[x + H.S_GEN])
        gen = old_gen + 1
        while True:
            try:
                # Kept mapped: the copy faults its pages in once, and this very
                # mapping becomes the shard's (no second attach, no second set of faults).
                seg = self._new_gen(self._family, self._name, s, gen, nslots, heap)
            except OutOfSharedMemory:
                # /dev/shm is short: the headroom is an optimisation, the data is not.
                tight = max(MIN_HEAP, -(-(live + extra + 2 * L.RECORD_HEADER) // 4096) * 4096)
                if heap <= tight:
                    raise
                heap = tight
                continue
            name = seg.name
            p = seg.params
            try:
                r = _COMPACT(self._daddr, s, seg.addr, seg.size, nslots, p[L.PS_INDEX], p[L.PS_HEAP],
                             p[L.PS_HEAP_SIZE])
                used = int(seg.w[L.SH_BUMP >> 3])
            except BaseException:
                seg.close()
                raise
            # Room for what the caller is about to write, and an index at most half full.
            if r >= 0 and used + extra <= p[L.PS_HEAP_SIZE] and 2 * (r + 1) <= nslots:
                break
            seg.close()
            unlink_name(name)            # too small (the counters were stale): bigger, again
            nslots *= 2
            heap *= 2
        # Mark the old generation replaced, then publish the new one. Readers
        # that see REPLACED wait in _refresh for the table to name the new
        # generation; writes only start there after we unlock, so they miss
        # nothing. The other order has a window: killed between the two
        # stores, we would leave the old generation looking current to every
        # process that maps it, and their lock-free reads stale for good.
        try:
            _PUBLISH(self._daddr, s, gen)      # both stores in one kernel call
        except BaseException:
            seg.close()
            raise
        self._install(s, seg, gen)             # the published generation, as mapped for the copy
        unlink_name(self._gen_name(s, old_gen))
        W.fetch_add(self._ctrl.w, (self._table + s * L.SE_SIZE + L.SE_GROWTHS) >> 3, 1)
        W.fetch_add(self._ctrl.w, L.DC_GROWTHS >> 3, 1)

    def _locked(self, s: int, freeze: bool = False):
        return _ShardLock(self, s, freeze)

    # ------------------------------------------------------------------
    # Keys and values.

    def _key(self, key) -> bytes:
        if type(key) is str and not self._numeric:
            kb = encode_key(key)
            kc = self._kc
            if len(kc) >= KEY_CACHE:
                kc.clear()
            kc[key] = kb        # str keys repeat: keep their encoding (a dict lookup is cheaper)
            return kb
        if self._numeric:
            if isinstance(key, np.integer):
                key = int(key)          # numpy ints, as numeric values already are (numpy users' keys)
            if type(key) is not int and not isinstance(key, int) or not _I64_MIN <= key <= _I64_MAX:
                raise TypeError(f"this SharedDict has int64 keys (numeric mode), not {type(key).__name__}"
                                + ("" if not isinstance(key, int) else " out of int64 range"))
            return _I64.pack(key)
        return encode_key(key)

    def _value(self, value):
        """(kind, bytes or None, number) for a value."""
        if self._numeric:
            if self._vtype == 1:
                if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or \
                        not _I64_MIN <= int(value) <= _I64_MAX:
                    raise TypeError(f"this SharedDict holds int64 values (numeric mode), not {value!r}")
                return L.VK_I64, None, int(value)
            if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
                raise TypeError(f"this SharedDict holds float64 values (numeric mode), not {value!r}")
            return L.VK_F64, None, _I64.unpack(_F64.pack(float(value)))[0]
        if type(value) is int and _I64_MIN <= value <= _I64_MAX:
            return L.VK_I64, None, value
        if type(value) is str and self._str_ok:
            try:
                return _VK_STR, value.encode(), 0
            except UnicodeEncodeError:
                pass                # lone surrogates: the codec decides
        try:
            data = self._enc(value)
        except Exception:
            data = self._codec.encode(value)      # raises the codec's EncodeError (a TypeError)
        if type(data) is not bytes:
            kind, parts = data
            data = b"".join(p.reshape(-1).view(np.uint8).tobytes() if isinstance(p, np.ndarray) else bytes(p)
                            for p in parts)
            return kind, data, 0
        return self._kind, data, 0

    def _decode(self, kind: int, buf):
        if kind == _VK_STR:
            try:
                return str(buf, "utf-8")
            except UnicodeDecodeError:
                raise DecodeError(f"SharedDict {self._name!r}: a stored str value is not UTF-8 "
                                  "(the dict's shared memory was overwritten)") from None
        if kind == L.VK_I64:
            return _I64.unpack_from(buf, 0)[0]
        if kind == L.VK_F64:
            return _F64.unpack_from(buf, 0)[0]
        if kind == self._kind and self._dec_fast is not None:
            try:
                return self._dec_fast(buf)
            except Exception:
                pass
        return self._codec.decode(kind, buf)

    # ------------------------------------------------------------------
    # Reads.

    def _lookup(self, key, kb: bytes):
        """(found, value) for encoded key ``kb``."""
        while True:
            if self._numeric:
                r = _GET_NUM(self._daddr, _I64.unpack(kb)[0])
                if r >= 0:
                    bits = _I64.unpack_from(self._sbytes, r * AREA)[0]
                    if self._vtype == 2:
                        return True, _F64.unpack(_I64.pack(bits))[0]
                    return True, bits
            else:
                r = _GET(self._daddr, id(kb) + BYTES_OFF, len(kb))
                if r >= 0:
                    off = ((r >> H.AREA_SHIFT) & H.AREA_MASK) * AREA
                    return True, self._decode(r & 0xFF, self._sbytes[off:off + (r >> H.LEN_SHIFT)])
            if r == H.NOTFOUND:
                return False, None
            self._slow_status(r, kb)
            if r == H.NEED_BUF:
                found, v = self._lookup_big(kb)
                if found is not None:
                    return found, v

    def _lookup_big(self, kb: bytes):
        n = _VLEN(self._daddr, id(kb) + BYTES_OFF, len(kb))
        if n == H.NOTFOUND:
            return False, None
        if n < 0:
            return None, None
        buf = np.empty(max(n, 8), np.uint8)
        r = _GET_INTO(self._daddr, id(kb) + BYTES_OFF, len(kb), buf.ctypes.data, buf.size)
        if r >= 0:
            return True, self._decode(r & 0xFF, memoryview(buf)[:r >> 8])
        if r == H.NOTFOUND:
            return False, None
        return None, None      # it changed under us: look again

    def _slow_status(self, r: int, kb: bytes | None = None) -> None:
        """Handle a status that is not an answer: remap, or raise."""
        if self._closed or r == H.CLOSED:
            raise Closed(f"SharedDict {self._name!r} was closed")
        if r == H.MOVED or r == H.UNMAPPED:
            with self._lock:
                s = self._shard(kb) if kb is not None else None
                if s is None:
                    self.refresh()
                else:
                    self._refresh(s)
            return
        if r == H.NEED_BUF or r == H.BUSY or r == H.NEED_GROW:
            return
        if r == H.CLOSED:
            raise Closed(f"SharedDict {self._name!r} was closed")
        if r == H.NO_BANK:
            if self._reclaim_banks():
                return
            raise ShmError(f"more than {H.N_BANKS} live threads of this process use SharedDict {self._name!r}: "
                           "give each group of threads its own handle (SharedDict.open(name))")
        if r == H.CORRUPT:
            raise CorruptSegment(f"SharedDict {self._name!r}: a shard's index points outside its heap")
        raise ShmError(f"SharedDict {self._name!r}: unexpected status {H.STATUS_NAMES.get(r, r)}")

    def _reclaim_banks(self) -> bool:
        """Free the result banks of threads that have exited; True if any was freed.

        A bank is claimed by thread id inside the kernels and never given
        back there. The kernels that claim banks run with the GIL held, so
        this (also under the GIL) never races with a claim.
        """
        live = set(threading._active) | {threading.get_ident()}
        freed = False
        for b in range(H.N_BANKS):
            if self._banks[b] != 0 and int(self._banks[b]) not in live:
                self._banks[b] = 0
                freed = True
        return freed

    def _shard(self, kb: bytes) -> int:
        if self._numeric:
            return _SHARD_OF_NUM(self._daddr, _I64.unpack(kb)[0])
        return _SHARD_OF(self._daddr, id(kb) + BYTES_OFF, len(kb))

    def __getitem__(self, key):
        # The fastest path: a value this handle read before, still current if the
        # shard's lock is free and its version unchanged (lock first, then version).
        t = type(key)
        if t is str or t is int:
            e = self._vc.get(key)
            if e is not None:
                cw = self._cw
                i = e[0]
                if cw[i] == 0 and cw[i + _VER_DELTA] == e[1]:
                    return e[2]
            kb = self._kc.get(key) if t is str else None
        else:
            kb = None
        if kb is None:
            kb = self._key(key)
        # The fast path: one kernel call. A closed dict's descriptor makes the
        # kernel return CLOSED, so no check is needed here.
        r = _GET(self._daddr, id(kb) + _OFF, len(kb))
        if r >= 0:
            kind = r & 0xFF
            a = (r >> 8) & _AMASK
            off = a * AREA
            if kind == _VK_I64:
                v = _unpack_i64(self._sbytes, off)[0]
            else:
                buf = self._sbytes[off:off + (r >> 17)]
                v = _NOVALUE
                if kind == self._kind:
                    try:
                        v = self._dec_fast(buf)
                    except Exception:
                        pass
                if v is _NOVALUE:
                    v = self._decode(kind, buf)
            # Keep it for cached reads (inlined: this runs on every miss).
            tv = type(v)
            if (t is str or t is int) and tv in _CACHEABLE:
                sw = self._sw
                ver = sw[2 * a + 1]
                if ver >= 0 and self._cw is not None and (
                        (tv is not str and tv is not bytes) or len(v) <= VALUE_CACHE_MAX):
                    vc = self._vc
                    if len(vc) >= VALUE_CACHE:
                        vc.clear()
                    vc[key] = (sw[2 * a], ver, v)
            return v
        if r == _NOTFOUND:
            raise KeyError(key)
        found, v = self._lookup(key, kb)
        if not found:
            raise KeyError(key)
        return v

    def get(self, key, default=None):
        """``d[key]`` if present, else ``default`` (lock-free)."""
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key):
        try:
            self[key]
        except KeyError:
            return False
        return True

    def get_many(self, keys, default=None) -> list:
        """``[d.get(k, default) for k in keys]``."""
        get = self.get
        return [get(k, default) for k in keys]

    # ------------------------------------------------------------------
    # Writes.

    def __setitem__(self, key, value):
        # The fast path for str keys: one kernel call that takes the key and
        # the value (int, str, or the codec's bytes) as Python objects. An
        # object it cannot take raises before the kernel runs (an int beyond
        # int64, a lone surrogate), a status other than done comes back
        # negative: either way the general path below does the whole write.
        if type(key) is str:
            tv = type(value)
            try:
                if tv is int:
                    r = _PUT_STR_I64(self._daddr, key, value)
                elif tv is str and self._str_ok:
                    r = _PUT_STR_STR(self._daddr, key, value)
                else:
                    data = self._enc(value)
                    r = _PUT_STR_BYTES(self._daddr, key, data, self._kind) if type(data) is bytes else -1
            except Exception:
                r = -1
            if r >= 0:
                if r == _SHRINK:
                    self._shrink(self._key(key))
                return
            kb = self._kc.get(key)
        else:
            kb = None
        if kb is None:
            kb = self._key(key)
        if type(value) is int:
            try:
                r = _PUT(self._daddr, id(kb) + _OFF, len(kb), _VK_I64, 0, 0, value)
            except OverflowError:       # beyond int64: through the codec
                r = None
            if r is not None and r >= 0:
                if r == _SHRINK:
                    self._shrink(kb)
                return
        else:
            kind = self._kind
            try:
                if type(value) is str and self._str_ok:
                    data = value.encode()
                    kind = _VK_STR
                else:
                    data = self._enc(value)
            except Exception:
                data = None
            if type(data) is bytes:
                r = _PUT(self._daddr, id(kb) + _OFF, len(kb), kind, id(data) + _OFF, len(data), 0)
                if r >= 0:
                    if r == _SHRINK:
                        self._shrink(kb)
                    return
        self._set_slow(key, kb, value)

    def _set_slow(self, key, kb, value):
        self._check()
        kind, data, num = self._value(value)
        while True:
            if data is None:
                r = _PUT(self._daddr, id(kb) + _OFF, len(kb), kind, 0, 0, num)
            else:
                r = _PUT(self._daddr, id(kb) + _OFF, len(kb), kind, id(data) + _OFF, len(data), 0)
            if r >= 0:
                if r == _SHRINK:
                    self._shrink(kb)
                return
            if r == H.BUSY or r == H.NEED_GROW:
                with self._locked(self._shard(kb)) as lk:
                    lk.store(kb, kind, data, num)
                return
            self._slow_status(r, kb)

    def __delitem__(self, key):
        if not self._delete(key):
            raise KeyError(key)

    def _delete(self, key) -> bool:
        if self._closed:
            raise Closed(f"SharedDict {self._name!r} was closed")
        kb = self._key(key)
        while True:
            r = _DELETE(self._daddr, id(kb) + BYTES_OFF, len(kb), 0)
            if r == H.OK:
                return True
            if r == _SHRINK:
                self._shrink(kb)
                return True
            if r == H.NOTFOUND:
                return False
            if r == H.BUSY:
                with self._locked(self._shard(kb)) as lk:
                    return lk.delete(kb)
            self._slow_status(r, kb)

    def _shrink(self, kb: bytes) -> None:
        """Compact ``kb``'s shard if it is still mostly garbage (after a SHRINK hint)."""
        s = self._shard(kb)
        with self._locked(s) as lk:
            lk.shrink = True

    def set_many(self, mapping) -> None:
        """``d[k] = v`` for every item (each write atomic on its own)."""
        items = mapping.items() if isinstance(mapping, Mapping) else mapping
        for k, v in items:
            self[k] = v

    # ------------------------------------------------------------------
    # Atomic read-modify-writes.

    def incr(self, key, delta=1, default=0):
        """Add ``delta`` to ``d[key]`` (``default`` if absent) atomically; return the new value.

        Lock-free for int values: a fetch-and-add in shared memory, never a
        lost update, across any number of processes. Other numeric values
        (floats, big ints) take the key's shard lock.
        """
        kb = self._kc.get(key) if type(key) is str else None
        if kb is None:
            self._check()
            kb = self._key(key)
        if type(delta) is int and _I64_MIN <= delta <= _I64_MAX:
            while True:
                if self._numeric:
                    if self._vtype == 2:
                        break
                    r = _INCR_NUM(self._daddr, _I64.unpack(kb)[0], delta)
                else:
                    r = _INCR(self._daddr, id(kb) + BYTES_OFF, len(kb), delta)
                if r >= 0:
                    return _I64.unpack_from(self._sbytes, r * AREA)[0]
                if r in (H.NOTFOUND, H.WRONG_KIND, H.BUSY, H.OVERFLOW):
                    break
                self._slow_status(r, kb)
        with self._locked(self._shard(kb), freeze=True) as lk:
            found, cur = lk.lookup(key, kb)
            new = (cur if found else default) + delta
            kind, data, num = self._value(new)
            lk.store(kb, kind, data, num)
            return new

    def compare_and_set(self, key, expected, new) -> bool:
        """Set ``d[key] = new`` if it equals ``expected`` now; True if it did. Atomic."""
        kb = self._key(key)
        kind, data, num = self._value(new)
        with self._locked(self._shard(kb), freeze=True) as lk:
            found, cur = lk.lookup(key, kb)
            if not found or cur != expected or type(cur) is not type(expected) and \
                    not (isinstance(cur, (int, float)) and isinstance(expected, (int, float))):
                return False
            lk.store(kb, kind, data, num)
            return True

    def setdefault(self, key, default=None):
        """``d[key]`` if present, else set it to ``default`` and return that. Atomic."""
        if self._closed:
            raise Closed(f"SharedDict {self._name!r} was closed")
        kb = self._key(key)
        found, v = self._lookup(key, kb)
        if found:
            return v
        kind, data, num = self._value(default)
        with self._locked(self._shard(kb)) as lk:
            found, v = lk.lookup(key, kb)
            if found:
                return v
            lk.store(kb, kind, data, num)
            return default

    _MISSING = object()

    def pop(self, key, default=_MISSING):
        """Remove ``key`` and return its value (or ``default``; KeyError without one). Atomic."""
        kb = self._key(key)
        with self._locked(self._shard(kb), freeze=True) as lk:
            found, v = lk.lookup(key, kb)
            if found:
                lk.delete(kb)
                return v
        if default is SharedDict._MISSING:
            raise KeyError(key)
        return default

    def popitem(self):
        """Remove and return some ``(key, value)``; KeyError if empty. Atomic per item."""
        self._check()
        start = self._me % self._nshards
        for i in range(self._nshards):
            s = (start + i) % self._nshards
            with self._locked(s, freeze=True) as lk:
                for kb, kind, val in self._snapshot(s, values=True, limit=1):
                    lk.delete(kb)
                    return self._decode_key(kb), self._decode(kind, val)
        raise KeyError("popitem(): SharedDict is empty")

    def alter(self, key, fn, default=_MISSING):
        """Store ``fn(d[key])`` (or ``fn(default)`` if absent) under the key's shard lock; return it.

        If the process dies inside ``fn``, the value is unchanged and the
        lock is recovered by the next process that needs it. ``fn`` runs with
        the lock held: it must not use this dict itself.
        """
        kb = self._key(key)
        with self._locked(self._shard(kb), freeze=True) as lk:
            found, cur = lk.lookup(key, kb)
            if not found:
                if default is SharedDict._MISSING:
                    raise KeyError(key)
                cur = default
            new = fn(cur)
            kind, data, num = self._value(new)
            lk.store(kb, kind, data, num)
            return new

    def update(self, other=(), /, **kw):
        if isinstance(other, Mapping):
            other = other.items()
        elif hasattr(other, "keys"):
            other = ((k, other[k]) for k in other.keys())
        for k, v in other:
            self[k] = v
        for k, v in kw.items():
            self[k] = v

    def clear(self) -> None:
        """Remove every key (shard by shard: concurrent writers may add some back)."""
        self._check()
        for s in range(self._nshards):
            with self._locked(s, freeze=True) as lk:
                for kb, _, _ in self._snapshot(s, values=False):
                    lk.delete(kb)
                lk.compact()

    # ------------------------------------------------------------------
    # Iteration (weakly consistent, one shard snapshot at a time).

    def _snapshot(self, s: int, values: bool, limit: int = -1):
        """[(key bytes, kind, value bytes)] of shard ``s``: a consistent read of its index."""
        while True:
            buf = self._snap
            r = _SNAPSHOT(self._daddr, s, buf.ctypes.data, buf.size, 1 if values else 0)
            if r <= -100:
                self._snap = np.zeros(_pow2(-r - 100), np.uint8)
                continue
            if r < 0:
                if (r == H.MOVED or r == H.UNMAPPED) and not self._closed:
                    with self._lock:
                        self._refresh(s)
                else:
                    self._slow_status(r)
                continue
            mv = memoryview(buf)
            out = []
            at = 0
            while at < r and limit != 0:
                klen, kind, vlen = _SNAP_HEAD.unpack_from(mv, at)
                kb = bytes(mv[at + 16:at + 16 + klen])
                val = bytes(mv[at + 16 + klen:at + 16 + klen + vlen]) if values else None
                out.append((kb, kind, val))
                at += 16 + klen + (vlen if values else 0)
                limit -= 1
            return out

    def _decode_key(self, kb: bytes):
        try:
            return _I64.unpack(kb)[0] if self._numeric else decode_key(kb)
        except Exception:       # ValueError, UnicodeDecodeError, struct.error: damaged memory
            raise CorruptSegment(f"SharedDict {self._name!r}: a stored key is damaged ({kb[:16]!r}); "
                                 "the dict's shared memory was overwritten") from None

    def __iter__(self):
        self._check()
        for s in range(self._nshards):
            for kb, _, _ in self._snapshot(s, values=False):
                yield self._decode_key(kb)

    def items(self):
        return _ItemsView(self)

    def values(self):
        return _ValuesView(self)

    def _iter_items(self):
        self._check()
        for s in range(self._nshards):
            for kb, kind, val in self._snapshot(s, values=True):
                yield self._decode_key(kb), self._decode(kind, val)

    def __len__(self) -> int:
        """Keys now (approximate while other processes write)."""
        self._check()
        total = 0
        for s in range(self._nshards):
            while True:
                n = _STAT(self._daddr, s, L.SH_COUNT)
                st = _STAT(self._daddr, s, L.SH_STATE)
                if n == H.CLOSED or st == H.CLOSED:
                    raise Closed(f"SharedDict {self._name!r} was closed")
                if st != L.SHARD_REPLACED:
                    # Clamped to the index: a damaged counter never yields an absurd length.
                    total += min(max(n, 0), int(self._d[H.X_SHARDS + s * H.X_STRIDE + H.S_NSLOTS]))
                    break
                with self._lock:
                    self._refresh(s)
        return total

    def copy(self) -> dict:
        """A plain ``dict`` with the same items."""
        return dict(self._iter_items())

    def __eq__(self, other):
        if isinstance(other, (SharedDict, Mapping)):
            return self.copy() == dict(other.items())
        return NotImplemented

    __hash__ = None

    # ------------------------------------------------------------------
    # Numeric mode from @njit code.

    def kernel(self) -> np.ndarray:
        """The descriptor for ``kernels.hashtable.lookup_i64/put_i64/incr_i64`` in your @njit code.

        Numeric mode only. Take it in the process that uses it; after a
        kernel returns MOVED or UNMAPPED, call ``refresh()``; after
        NEED_GROW, ``grow_for(key)``; after NOTFOUND from ``incr_i64``,
        ``incr(key)`` from Python inserts the key; then retry. One thread
        per handle at a time: a handle announces its lock-free increments
        in one slot (give each thread its own ``SharedDict.open(name)``).
        """
        self._check()
        if not self._numeric:
            raise TypeError("kernel(): only a numeric SharedDict (key_type='int64') can be driven from @njit code")
        return self._d

    def grow_for(self, key) -> None:
        """Make room for one more key in ``key``'s shard (after a NEED_GROW from @njit code)."""
        kb = self._key(key)
        with self._locked(self._shard(kb)) as lk:
            lk.compact(64)

    # ------------------------------------------------------------------
    # Lifetime.

    def _check(self):
        if self._closed:
            raise Closed(f"SharedDict {self._name!r} was closed")

    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> DictStats:
        self._check()
        keys, used, garbage, size = [], 0, 0, 0
        waits = 0
        for s in range(self._nshards):
            keys.append(max(0, _STAT(self._daddr, s, L.SH_COUNT)))
            used += max(0, _STAT(self._daddr, s, L.SH_BUMP))
            garbage += max(0, _STAT(self._daddr, s, L.SH_GARBAGE))
            size += self._segs[s].size if self._segs[s] is not None else 0
            waits += W.load(self._ctrl.w, (self._table + s * L.SE_SIZE + L.SE_LOCK_WAITS) >> 3)
        return DictStats(name=self._name, keys=sum(keys), shards=self._nshards, bytes_used=used,
                         garbage_bytes=garbage, segment_bytes=size, per_shard_keys=tuple(keys),
                         lock_waits=waits, growths=W.load(self._ctrl.w, L.DC_GROWTHS >> 3),
                         repairs=W.load(self._ctrl.w, L.DC_REPAIRS >> 3),
                         participants=len(self._registry.live_entries()),
                         ops=self._registry.ops_total())

    def __repr__(self):
        if self._closed:
            return "<shm.SharedDict closed>"
        mode = " numeric" if self._numeric else f" codec={self._codec.name}"
        return f"<shm.SharedDict {self._name!r} keys={len(self)} shards={self._nshards}{mode}>"

    def __reduce__(self):
        self._check()
        token = self._registry.lend(L.ROLE_TX, L.TOKEN_PICKLE)
        return _rebuild, (self._name, token)

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        """Detach this process (idempotent). The last process to leave unlinks the dict."""
        if self._closed:
            return
        self._closed = True
        self._vc = {}
        self._cw = None                 # drop the view first, so the control segment can be unmapped
        _OPEN.pop(id(self), None)
        reg = self._registry
        last = False
        if self._me >= 0 and reg.mine(self._me):
            try:
                n = reg.sweep(on_reap=self._recover, skip=self._me)
                if n:       # stats().reaped counts every reap, not only a waiting writer's
                    W.fetch_add(self._ctrl.w, L.DC_REAPED >> 3, n)
            except ShmError:
                pass
            reg.clear_role(self._me, L.ROLE_TX)
            reg.unregister(self._me)
            last = reg.claim_last_out()
        self._me = -1
        self._d[H.X_CTRL_SIZE] = 0
        self._d[H.X_ME] = -1
        self._d[H.X_OPS] = 0
        for s in range(self._nshards):
            self._d[H.X_SHARDS + s * H.X_STRIDE + H.S_ADDR] = 0      # kernels: UNMAPPED, never a stale address
        if last:
            _unlink_all(self._name, self._family)
        for seg in self._segs:
            if seg is not None:
                seg.close()
        self._segs = [None] * self._nshards
        self._ctrl.close()

    def unlink(self) -> None:
        """Remove the dict's shared memory now (processes that have it mapped keep it)."""
        ctrl = self._ctrl
        if ctrl is not None and not ctrl.closed:
            ctrl.set_state(ctrl.state, L.SEG_UNLINKED)
        _unlink_all(self._name, self._family)


class _ShardLock:
    """``with d._locked(s, freeze)``: hold shard ``s``'s lock (and optionally stop lock-free incr)."""

    def __init__(self, d: SharedDict, s: int, freeze: bool):
        self.d, self.s, self.freeze = d, s, freeze
        self.shrink = False         # a write said SHRINK: compact on the way out

    def __enter__(self):
        d = self.d
        d._check()
        d._lock.acquire()
        try:
            d._acquire(self.s)
        except BaseException:
            d._lock.release()
            raise
        if self.freeze:
            try:
                d._freeze(self.s)
            except BaseException:       # KeyboardInterrupt while waiting out an incrementer
                d._thaw(self.s)
                d._release(self.s)
                d._lock.release()
                raise
        return self

    def __exit__(self, *exc):
        d = self.d
        try:
            try:
                if self.shrink and d._mostly_garbage(self.s):
                    d._compact(self.s, 0)
            except Exception:
                pass        # SHRINK is a hint and the write is done: never fail it (a full /dev/shm)
            finally:
                # Always: a compaction that failed (a full /dev/shm) must not
                # leave the shard frozen to lock-free increments.
                d._thaw(self.s)
                d._release(self.s)
        finally:
            d._lock.release()

    def lookup(self, key, kb):
        return self.d._lookup(key, kb)

    def store(self, kb, kind, data, num):
        d = self.d
        while True:
            if d._numeric:
                r = _STORE_NUM_LOCKED(d._daddr, _I64.unpack(kb)[0], kind, num)
            elif data is None:
                r = _STORE_LOCKED(d._daddr, id(kb) + BYTES_OFF, len(kb), kind, 0, 0, num)
            else:
                r = _STORE_LOCKED(d._daddr, id(kb) + BYTES_OFF, len(kb), kind, id(data) + BYTES_OFF,
                                  len(data), 0)
            if r >= 0:
                self.shrink |= r == _SHRINK
                return
            if r == H.NEED_GROW:
                self.compact(len(kb) + (len(data) if data is not None else 0) + 64)
                continue
            if r == H.MOVED:
                d._map(self.s)
                continue
            d._slow_status(r, kb)

    def delete(self, kb) -> bool:
        d = self.d
        while True:
            r = _DELETE(d._daddr, id(kb) + BYTES_OFF, len(kb), 1)
            if r == H.OK or r == _SHRINK:
                self.shrink |= r == _SHRINK
                return True
            if r == H.NOTFOUND:
                return False
            if r == H.MOVED:
                d._map(self.s)
                continue
            d._slow_status(r, kb)

    def compact(self, extra: int = 0) -> None:
        self.d._compact(self.s, extra)
        self.shrink = False
        if self.freeze:
            self.d._freeze(self.s)      # the new generation: keep increments out until we leave


class _ItemsView(ItemsView):
    """Items read shard by shard (one snapshot each), not key by key."""

    def __iter__(self):
        return self._mapping._iter_items()


class _ValuesView(ValuesView):
    def __iter__(self):
        return (v for _, v in self._mapping._iter_items())


def _rebuild(name, token):
    d = SharedDict.open(name)
    if token is not None:
        d._registry.retire(*token)
    return d


def _unlink_all(name: str, family: str) -> None:
    from ._chan import unlink_family
    unlink_family(family)
    unlink_name(name)


_OPEN = weakref.WeakValueDictionary()      # id -> SharedDict (dicts are unhashable)


_chan.track_handles(_OPEN.values, after_fork_child="_after_fork_child")
