"""One process's view of one channel: segments, rings, roles, blobs, recovery.

Design notes
------------
``shm/channel.py`` is the public surface (``bounded``, ``Sender``,
``Receiver``); everything they share in a process lives in one ``_Chan``
per channel name, so two handles of one channel in one process register one
participant and map each segment once.

Segments of a channel named N (family F, a random ``shm_`` name):

* ``N``: the control segment: header, control block, participant and token
  tables, and ring generation 0 (``kernels/layout.py``).
* ``F`` + ``r<gen>``: ring generation ``gen`` >= 1 of an unbounded channel.
* ``F`` + ``r<gen>p<entry>g<blobgen>``: the blob of one entry of a ring's
  blob pool: the payload of a message too large for a slot's inline area
  (``slot - 32`` bytes).

*Messages.* A payload that fits inline is copied into the slot by one kernel
call (``ring.push_at``, ~0.1 us from Python), and out again into one of the
receive areas (``ring.pop_at``). A larger payload goes to a blob: the
producer, holding its slot, takes an entry of the ring's blob pool
(``ring.blob_take_at``: the entry freed last first, so a stream of large
messages reuses one blob that stays in cache), fills the entry's blob
(created on first need, grown when too small) and publishes; the consumer
reads it and gives the entry back. Blobs are kept for the next message
while the channel's blob bytes stay under ``blob_budget``, and always up to
``reserve=``. Only an entry's holder touches its blob, and a dead holder's
entry is freed with its slot by recovery (kernels/ring.py, "Blob pool").

*Unbounded channels* chain ring generations (crossbeam's list flavour /
SegQueue, with blocks that double up to 1M slots): a producer that finds
generation g full seals it (``ring.seal_at``), makes g+1 (one creator at a
time, elected by CAS on the ``grow`` word) and advances ``tail_gen``;
consumers drain g, see it sealed, advance ``head_gen`` and the winner of that
CAS unlinks g. Positions continue across generations, so FIFO order and the
sent/received counts are global.

*Roles and disconnection* are per process (``shm/_registry.py``). Each
role has its own descriptor per ring, so a forked child's first use of a
role goes through the slow path (``D_ME`` = -1 there) and confirms it: a
child counts as holding every handle it inherited until it first uses the
channel, and from then on only the roles it uses. That keeps both common
shapes right: consumers that inherited an unused Sender do not keep the
channel open after the parent's last Sender closes, and a parent that closes
its Sender right after starting producer children does not see the channel
disconnect before they run.

*Unlinking.* The last participant to leave (by closing its last handle, or
at interpreter exit) unlinks every segment of the channel, unless a token is
still out (a pickled handle not yet unpickled, whose lender lives).
"""
from __future__ import annotations

import atexit
import functools
import math
import mmap
from itertools import accumulate, islice
import os
import struct
import threading
import time
import weakref

import numpy as np

from kernels import layout as L
from kernels import pycall as P
from kernels import ring as R
from kernels import words as W

from . import _liveness, _wait
from . import _bigcopy
from ._builtin import BYTES_OFF, bind
from ._registry import Registry
import msgpack

from .codec import K_MSGPACK, K_NDARRAY, K_RAW, get_codec, ndarray_header
from .errors import (Closed, CorruptSegment, DecodeError, Disconnected, Empty, Full,
                     IncompatibleSegment, OutOfSharedMemory, SegmentExists, SegmentNotFound, ShmError)
from .segment import Segment, check_name, new_name, unlink_name

__all__ = ["_Chan", "close_all"]


def _entry(dispatcher):
    """The compiled entry point of a kernel whose signature is all integers.

    Calling it skips numba's argument typing (~85 ns instead of ~160 ns for
    three ints) and checks nothing, which is safe only because every
    argument is an int the channel computed itself.
    """
    sig = dispatcher.signatures[0]
    if not all(str(t) == "int64" for t in sig):
        raise TypeError(f"{dispatcher.__name__}: fast entry needs an all-int64 signature, got {sig}")
    return dispatcher.overloads[sig].entry_point


_PUSH = _entry(R.push_at)
_PUSH_SPIN = _entry(R.push_spin_at)
_PUSH_MANY = _entry(R.push_many_at)
_PUSH_MANY_FIXED = _entry(R.push_many_fixed_at)
_CLAIM = _entry(R.claim_push_at)
_PUBLISH = _entry(R.publish_at)
_PUBLISH_INLINE = _entry(R.publish_inline_at)
_POP = _entry(R.pop_at)
_POP_SPIN = _entry(R.pop_spin_at)
_POP_MANY = _entry(R.pop_many_at)
_RELEASE = _entry(R.release_at)
_BLOB_TAKE = _entry(R.blob_take_at)
_BLOB_ENTRY = _entry(R.blob_entry_at)
_BLOB_GIVE = _entry(R.blob_give_at)
_BLOB_INFO = _entry(R.blob_info_at)
_BLOB_STATE = _entry(R.blob_state_at)
_SET_BLOB_INFO = _entry(R.set_blob_info_at)
_PARK = _entry(R.park_at)
_WAKE = _entry(R.wake_at)
_COUNTER = _entry(R.counter_at)
_SEAL = _entry(R.seal_at)
_RECOVER = _entry(R.recover_at)
_INIT_RING = _entry(R.init_ring_at)
_TAKEN = _entry(R.rendezvous_taken_at)
_COPY = _entry(R.copy_at)
_UNPIN = _entry(R.unpin_at)
_CANCEL = _entry(R.rendezvous_cancel_at)



DEFAULT_SLOT = 512            # 480 bytes inline: most dict-shaped messages fit
MAX_SLOT = 1 << 20
BATCH = 256                   # messages per recv_many kernel call
SEND_SPIN = 40                # retries (with sched_yield) of a blocked send before it parks
RING0_UNBOUNDED = 256         # slots of an unbounded channel's first generation
MAX_RING_BYTES = 16 << 20     # bytes of slots in its largest generations
BLOB_MIN = 1 << L.BLOB_MIN_LG     # smallest blob segment: a page (a 1 KiB message must not cost 64 KiB)


def _blob_budget() -> int:
    """Blob bytes a channel keeps for reuse: 256 MiB, or an eighth of /dev/shm if that is smaller.

    Docker's default /dev/shm is 64 MiB: kept blobs must not be what fills it.
    """
    total = None
    try:
        st = os.statvfs("/dev/shm")
        total = st.f_blocks * st.f_frsize
    except OSError:
        pass
    return min(256 << 20, total // 8) if total else 256 << 20


BLOB_BUDGET = _blob_budget()

_OPEN: dict[str, "_Chan"] = {}
_OPEN_LOCK = threading.RLock()


_THREE_WORDS = struct.Struct("<qqq")


@functools.lru_cache(maxsize=64)
def _fixed_struct(n: int, count: int) -> struct.Struct:
    """A struct that unpacks ``count`` back-to-back byte strings of ``n`` bytes."""
    return struct.Struct(f"{n}s" * count)


def _round_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _blob_name(family: str, gen: int, e: int, bgen: int) -> str:
    return f"{family}r{gen:x}p{e:x}g{bgen:x}"      # p, g: not hex digits, so names never collide


def _new_blob(family: str, public: str, gen: int, e: int, bgen: int, cap: int) -> Segment:
    """Create generation ``bgen`` of pool entry ``e``'s blob, ``cap`` payload bytes, reserved and mapped."""
    name = _blob_name(family, gen, e, bgen)
    kw = dict(name=name, family=family, public_name=public, params=[gen, e, bgen, cap, 0, 0, 0, 0])
    try:
        return Segment.create(L.KIND_BLOB, L.BLOB_DATA + cap, **kw)
    except SegmentExists:
        unlink_name(name)     # left by a producer that died; the slot is ours
        return Segment.create(L.KIND_BLOB, L.BLOB_DATA + cap, **kw)


def _check_reserve(reserve) -> int:
    """``reserve=`` of bounded()/rendezvous(): the blob capacity to make per pool entry, 0 for none."""
    if isinstance(reserve, bool) or not isinstance(reserve, int):
        raise TypeError(f"reserve must be an int (bytes per message), not {type(reserve).__name__}")
    if reserve < 0:
        raise ValueError("reserve must be >= 0 bytes")
    return max(BLOB_MIN, _round_pow2(reserve)) if reserve else 0


_RETRY = object()      # an attempt changed state (new generation, registered): try again at once


class _Ring:
    """One ring generation as mapped in this process, with its two descriptors.

    ``busy`` counts kernel calls running without the GIL on this ring (spins
    and parks); a ring is unmapped only when it is zero, and its descriptors
    are zeroed first, so a kernel entered later returns CLOSED instead of
    touching the unmapped memory.
    """

    def __init__(self, chan: "_Chan", gen: int, seg: Segment, own: bool, ring_off: int, cap: int):
        self.gen = gen
        self.seg = seg
        self.own = own              # a separate segment (gen >= 1), unmapped with the ring
        self.cap = cap
        self.ring_off = ring_off
        self.busy = 0
        self.dtx = np.zeros(R.D_LEN, np.int64)
        self.drx = np.zeros(R.D_LEN, np.int64)
        for d in (self.dtx, self.drx):
            d[R.D_BASE] = seg.addr
            d[R.D_SIZE] = seg.size
            d[R.D_RING] = ring_off
            d[R.D_CAP] = cap
            d[R.D_SLOT] = chan.slot
            d[R.D_ME] = -1
            d[R.D_CTRL] = chan.ctrl.addr
            d[R.D_CTRL_SIZE] = chan.ctrl.size
            d[R.D_KIND] = chan.codec.kind
            d[R.D_GEN] = gen
            d[R.D_FLAGS] = R.DF_WAKE_ALL_TX if chan.flavor == L.FLAVOR_RENDEZVOUS else 0
        # Which blobs of the pool this process has mapped, for push_blob_at (a
        # bounded channel's one ring only: a send finishing what the builtin
        # claimed must find the same ring).
        self.blobmap = np.zeros(3 * cap, np.int64) if chan.flavor == L.FLAVOR_BOUNDED else None
        if self.blobmap is not None:
            self.dtx[R.D_BLOBMAP] = self.drx[R.D_BLOBMAP] = self.blobmap.ctypes.data
            self.drx[R.D_BLOB_BUDGET] = BLOB_BUDGET
        chan.rx0.fill(self.drx)
        self.rx_extra: list[np.ndarray] = []     # other threads' receive descriptors (_Rx)
        self.tx_addr = self.dtx.ctypes.data
        self.rx_addr = self.drx.ctypes.data
        # The fast paths (shm/channel.py) as builtins bound to the descriptors
        # (kernels/pycall.py). A rendezvous send never takes the inline fast path.
        if chan.flavor == L.FLAVOR_RENDEZVOUS:
            self.push_b = self.push_b_spin = _not_inline
        else:
            self.push_b = bind(P.push_bytes, self.dtx)
            self.push_b_spin = bind(P.push_bytes_spin, self.dtx)
        self.pop_b = bind(P.pop_bytes, self.drx)
        self.pop_b_spin = bind(P.pop_bytes_spin, self.drx)

    def set_me(self, role: int, me: int) -> None:
        if role == L.ROLE_TX:
            self.dtx[R.D_ME] = me
        else:
            for d in [self.drx] + self.rx_extra:
                d[R.D_ME] = me

    def invalidate_tx_rx_me(self) -> None:
        for d in [self.dtx, self.drx] + self.rx_extra:
            d[R.D_ME] = -1

    def pinned(self) -> bool:
        """Whether a blob message popped from this ring is still being read in this process."""
        return any(d[R.D_PINS] for d in [self.drx] + self.rx_extra)

    def invalidate(self) -> None:
        for d in [self.dtx, self.drx] + self.rx_extra:
            d[R.D_SIZE] = 0
            d[R.D_CTRL_SIZE] = 0

    def unmap(self) -> None:
        self.invalidate()
        if self.own:
            self.seg.close()


class _Loan:
    """A blob message lent in place: its slot stays claimed (READING, ours)
    and its ring pinned until ``release()``, which the garbage collector
    calls once the ``MessageView`` and every array made from it are gone.

    Arrays made from the view have this object as their ``base`` (numpy's
    ``__array_interface__``), which is how their lifetime keeps the loan.
    ``_arr`` is numpy's view of the blob mapping: it keeps the mapping
    alive even if the channel is closed meanwhile (``Segment.close``).
    A process killed while holding loans is a consumer killed mid-read:
    the survivors' recovery releases its slots (``kernels/ring.py``).
    """

    __slots__ = ("__array_interface__", "_arr", "_chan", "_ring", "_daddr", "_pos", "_n", "_done", "_pid",
                 "__weakref__")

    def __init__(self, chan: "_Chan", ring: "_Ring", daddr: int, pos: int, arr: np.ndarray):
        self._arr = arr
        self.__array_interface__ = arr.__array_interface__
        self._chan, self._ring, self._daddr, self._pos, self._n = chan, ring, daddr, pos, arr.nbytes
        self._done = False
        self._pid = os.getpid()
        chan.loans.add(self)

    def release(self, locks: bool = True) -> None:
        if self._done:
            return
        self._done = True
        if os.getpid() != self._pid:
            return      # a forked child's copy: the slot is the parent's to give back
        try:
            # A closed channel's descriptors answer CLOSED: nothing is touched.
            self._chan._after_blob_read(self._ring, self._daddr, self._pos, self._n, locks)
        finally:
            _UNPIN(self._daddr)

    def __del__(self):
        try:
            self.release(locks=False)
        except Exception:
            pass        # at interpreter exit the modules may be gone; the segments go with the channel


class MessageView:
    """A received message read in place (``Receiver.recv_view``).

    ``value`` is a read-only numpy array over the message where it lies in
    shared memory when the message is raw bytes (``codec="bytes"``: a
    ``uint8`` array) or an array (``codec="numpy"``: its dtype and shape);
    any other message is decoded as ``recv`` would, and small messages
    (inline in the ring) are copied anyway, both cheaply. ``np.asarray(view)``
    and ``bytes(view)`` work too.

    A lent message keeps its ring slot until the view is released: by
    ``release()``, by leaving a ``with`` block, or when the view and every
    array made from it are garbage. Meanwhile producers cannot reuse that
    slot (a channel of capacity ``n`` holds at most ``n`` unreleased views
    before senders block; a rendezvous channel, one). After ``release()``,
    or once this process's last Receiver of the channel is closed (which
    releases its views), an array you kept stays readable but may be
    overwritten by the next message: copy what you keep.
    """

    __slots__ = ("value", "_loan")

    def __init__(self, value, loan: _Loan | None = None):
        self._loan = loan
        self.value = np.asarray(loan) if loan is not None else value

    @classmethod
    def of(cls, value) -> "MessageView":
        """A view of a message already copied out (bytes become a uint8 array); nothing lent."""
        return cls(np.frombuffer(value, np.uint8) if type(value) is bytes else value)

    @property
    def lent(self) -> bool:
        """Whether the message is read in place in shared memory (and holds its slot until released)."""
        return self._loan is not None

    def release(self) -> None:
        """Give the slot back now; the view's arrays may then be overwritten."""
        loan, self._loan = self._loan, None
        if loan is not None:
            loan.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.value)
        return a if dtype is None else a.astype(dtype)

    def __bytes__(self) -> bytes:
        v = self.value
        return v.tobytes() if isinstance(v, np.ndarray) else bytes(v)

    def __len__(self) -> int:
        v = self.value
        return v.nbytes if isinstance(v, np.ndarray) else len(v)

    def __repr__(self):
        v = self.value
        what = f"array {v.dtype} {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
        return f"<MessageView {what}{', lent' if self._loan is not None else ''}>"


def _not_inline(data) -> int:
    """A rendezvous channel's ``push_b``: its sends always take the general path."""
    return R.TOO_BIG


class _Rx:
    """Receive areas and the descriptors that use them.

    ``pop_at`` copies a message into a receive area of the calling thread's
    bank (``kernels/ring.py``: up to N_BANKS threads share the primary
    descriptor, each with areas of its own). A thread that finds every bank
    taken (``NO_BANK``) gets a private ``_Rx``: its own areas and its own
    copy of each ring's descriptor.
    """

    def __init__(self, chan: "_Chan", primary: bool):
        self.primary = primary
        self.area = chan.area
        self.scratch_size = chan.scratch_size
        # MAP_PRIVATE: Python's anonymous mmap is MAP_SHARED by default, and a
        # receive buffer shared with forked children would mix their messages.
        self.scratch = mmap.mmap(-1, self.scratch_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = np.frombuffer(self.scratch, np.uint8)
        self.scratch_addr = self.view.ctypes.data
        self.lens = np.zeros(BATCH, np.int64)
        self.lens_addr = self.lens.ctypes.data
        # One bank table per buffer, shared by the descriptors of every ring
        # generation that pop into it (each would otherwise hand bank 0 to a
        # different thread, and two threads would share areas).
        self.banks = np.zeros(2 * R.N_BANKS, np.int64)
        self.descs: dict[int, tuple[np.ndarray, int]] = {}

    def fill(self, d: np.ndarray) -> None:
        d[R.D_DST] = self.scratch_addr
        d[R.D_DST_SIZE] = self.scratch_size
        d[R.D_AREA_SIZE] = self.area
        d[R.D_BATCH] = self.area * R.N_BANKS * R.N_AREAS
        d[R.D_BANKS] = self.banks.ctypes.data
        d[R.D_PINS] = 0

    def addr(self, ring: _Ring) -> int:
        """This thread's descriptor address on ``ring``."""
        if self.primary:
            return ring.rx_addr
        e = self.descs.get(ring.gen)
        if e is None:
            d = ring.drx.copy()
            self.fill(d)
            ring.rx_extra.append(d)
            for g in [g for g in self.descs if g < ring.gen - 1]:
                del self.descs[g]
            e = self.descs[ring.gen] = (d, d.ctypes.data)
        return e[1]


class _Chan:
    """This process's state for one channel (shared by its handles)."""

    # Park at once when empty, without the spin phase: for a receiver that
    # shares 2 cores with its senders (shm.Pool's result collector), where
    # spinning takes the CPU the senders need.
    no_spin = False

    def __init__(self, ctrl: Segment):
        self.ctrl = ctrl
        self.name = ctrl.name
        p = ctrl.params
        self.flavor = p[L.P_FLAVOR]
        self.capacity = p[L.P_CAPACITY]
        self.slot = p[L.P_SLOT]
        self.family = ctrl.family
        if not (L.MIN_SLOT <= self.slot <= MAX_SLOT and self.slot % L.SLOT_ALIGN == 0):
            raise CorruptSegment(f"channel {self.name!r}: implausible slot size {self.slot}")
        if self.flavor not in (L.FLAVOR_BOUNDED, L.FLAVOR_UNBOUNDED, L.FLAVOR_RENDEZVOUS):
            raise CorruptSegment(f"channel {self.name!r}: unknown flavor {self.flavor}")
        try:
            self.codec = get_codec(p[L.P_CODEC])
        except ValueError:
            raise CorruptSegment(f"channel {self.name!r}: unknown codec id {p[L.P_CODEC]}") from None
        ring_cap = p[L.P_RING_CAP]
        if not 1 <= ring_cap <= (ctrl.size // L.MIN_SLOT):
            raise CorruptSegment(f"channel {self.name!r}: implausible ring capacity {ring_cap}")
        lay = L.channel_layout(ring_cap, self.slot)
        if (p[L.P_RING] != lay["ring"] or p[L.P_PARTICIPANTS] != lay["participants"]
                or p[L.P_TOKENS] != lay["tokens"] or lay["size"] > ctrl.size):
            raise CorruptSegment(f"channel {self.name!r}: inconsistent layout parameters")
        self.inline = self.slot - L.SLOT_HEADER
        # Largest payload the handles' one-call fast path may push (a
        # rendezvous send must wait for its taker, so it never takes it).
        self.fast_inline = -1 if self.flavor == L.FLAVOR_RENDEZVOUS else self.inline
        self.kind = self.codec.kind
        self.encode = self.codec.encode
        self.raw = self.codec.id == 0                        # bytes codec: bytes pass as they are
        self.fast_encode = self.codec.fast_encode or self.codec.encode
        self.fast_decode = self.codec.fast_decode or bytes      # bytes codec: buf is already bytes
        self.registry = Registry(ctrl, lay["participants"], lay["tokens"],
                                 (L.CH_TX_ROLES, L.CH_RX_ROLES), (L.CH_TX_TOKENS, L.CH_RX_TOKENS),
                                 (L.CH_RX_WAITERS, L.CH_TX_WAITERS))
        # Receive buffers: N_BANKS x N_AREAS areas for single pops, then a batch region.
        self.area = max(64, (self.inline + 63) // 64 * 64)
        self.scratch_size = self.area * R.N_BANKS * R.N_AREAS + self.inline * BATCH
        self.rx0 = _Rx(self, primary=True)
        self.scratch = self.rx0.scratch          # the shared descriptor's receive areas
        self.rx_states: dict[int, _Rx] = {}     # private ones, for threads beyond N_BANKS
        self.me = -1
        self.counts = [0, 0]             # open handles per role in this process
        self.confirmed = [False, False]  # the role's descriptors carry D_ME
        self.pending: set[int] = set()   # roles inherited across fork, not yet used
        self.sticky = False              # keep inherited roles anyway (shm.Queue)
        self.fork_tokens: list = []
        self.lent_forks: list = []      # (token, value, boot ticks) lent by before_fork, for close
        self.waiting = [0, 0]
        self.inflight = 0                # kernel calls running without the GIL
        self.lock = threading.RLock()
        self.wait_lock = threading.Lock()
        self.blob_lock = threading.RLock()     # reentrant: a view released by a finaliser may need it
        self.loans: weakref.WeakSet = weakref.WeakSet()     # this process's outstanding recv_view loans
        self.batch_lock = threading.Lock()
        self.blobs: dict[tuple[int, int], tuple[int, Segment]] = {}
        r0 = _Ring(self, 0, ctrl, False, lay["ring"], ring_cap)
        self.rings: dict[int, _Ring] = {0: r0}
        self.txr = self.rxr = r0
        self.tx_addr = r0.tx_addr
        self.rx_addr = r0.rx_addr
        self.push_b, self.push_b_spin = r0.push_b, r0.push_b_spin
        self.pop_b, self.pop_b_spin = r0.pop_b, r0.pop_b_spin
        self.closed = False
        self._last_check = 0.0
        self._blob_reads = 0
        self.reserve = int(ctrl.w[L.CH_BLOB_RESERVE >> 3])    # blob bytes per slot kept whatever the budget
        self.cold: set = set()          # blobs a forked child inherited mapped, page tables not filled in

    # ------------------------------------------------------------------
    # Creation and attachment.

    @classmethod
    def create(cls, flavor: int, capacity: int, *, name=None, codec="msgpack", slot_size=None,
               reserve=0) -> "_Chan":
        codec = get_codec(codec)
        blob_cap = _check_reserve(reserve)
        if slot_size is None:
            slot = DEFAULT_SLOT
        else:
            slot_size = int(slot_size)
            if slot_size < 0 or slot_size > MAX_SLOT - L.SLOT_HEADER:
                raise ValueError(f"slot_size must be between 0 and {MAX_SLOT - L.SLOT_HEADER} bytes")
            slot = max(L.MIN_SLOT, (slot_size + L.SLOT_HEADER + L.SLOT_ALIGN - 1) // L.SLOT_ALIGN * L.SLOT_ALIGN)
        if flavor == L.FLAVOR_BOUNDED:
            ring_cap = capacity
        elif flavor == L.FLAVOR_RENDEZVOUS:
            ring_cap = 1
        else:
            ring_cap = RING0_UNBOUNDED
        lay = L.channel_layout(ring_cap, slot)
        if name is not None:
            name = check_name(name)
        family = new_name()
        params = [0] * 8
        params[L.P_FLAVOR] = flavor
        params[L.P_CAPACITY] = capacity
        params[L.P_SLOT] = slot
        params[L.P_CODEC] = codec.id
        params[L.P_RING] = lay["ring"]
        params[L.P_RING_CAP] = ring_cap
        params[L.P_PARTICIPANTS] = lay["participants"]
        params[L.P_TOKENS] = lay["tokens"]

        made: list[Segment] = []      # reserve=: every pool entry's blob, made before anyone can open it

        def init(seg):
            args = np.array([ring_cap, slot, 0, 0], np.int64)
            _INIT_RING(seg.addr, seg.size, lay["ring"], args.ctypes.data)
            if blob_cap:
                w = seg.w
                for i in range(ring_cap):
                    made.append(_new_blob(family, name or family, 0, i, 1, blob_cap))
                    w[(lay["pool"] + i * L.BE_SIZE + L.BE_INFO) >> 3] = 1 << 8 | (blob_cap.bit_length() - 1)
                w[L.CH_BLOB_RESERVE >> 3] = blob_cap
                w[L.CH_BLOB_BYTES >> 3] = blob_cap * ring_cap
                w[L.CH_BLOB_SEGMENTS >> 3] = ring_cap

        def drop_blobs():
            for b in made:
                b.close()
                b.unlink()

        try:
            seg = Segment.create(L.KIND_CHANNEL, lay["size"], name=name or family, family=family,
                                 params=params, init=init)
        except BaseException:
            drop_blobs()
            raise
        try:
            chan = cls(seg)
            chan._register()
        except BaseException:
            drop_blobs()
            seg.close()
            seg.unlink()
            raise
        for i, b in enumerate(made):
            chan._keep_blob((0, i), 1, b)
        with _OPEN_LOCK:
            _OPEN[chan.name] = chan
        return chan

    @classmethod
    def open(cls, name: str) -> "_Chan":
        """This process's _Chan for ``name``, attaching to the channel if needed."""
        name = check_name(name)
        with _OPEN_LOCK:
            chan = _OPEN.get(name)
            if chan is not None and not chan.closed:
                return chan
            seg = Segment.attach(name, kind=L.KIND_CHANNEL, what="channel")
            try:
                chan = cls(seg)
                chan._register()
                if chan.flavor == L.FLAVOR_UNBOUNDED:
                    chan.refresh_tx()
                    chan.refresh_rx()
                chan._map_reserved()
            except BaseException:
                if chan is not None and chan.me >= 0:
                    chan.registry.unregister(chan.me)
                seg.close()
                raise
            _OPEN[name] = chan
            return chan

    def _register(self) -> None:
        """Claim a participant entry, refusing a channel that is being unlinked."""
        reg = self.registry
        self.me = reg.register(on_reap=self._recover)
        deadline = time.monotonic() + 5.0
        while True:
            st = self.ctrl.state
            code = st & L.SEG_STATE_MASK
            if code == L.SEG_OPEN:
                return
            if code == L.SEG_CLOSING and time.monotonic() < deadline:
                if _liveness.pid_alive(st >> 8):
                    time.sleep(0.0005)
                    continue
                self.ctrl.set_state(st, L.SEG_OPEN)   # its closer died mid-check
                continue
            reg.unregister(self.me)
            self.me = -1
            raise SegmentNotFound(f"channel {self.name!r} was closed by its last user and is being removed")

    # ------------------------------------------------------------------
    # Roles.

    def acquire_role(self, role: int) -> None:
        with self.lock:
            self._check_open()
            if self.me < 0 or not self.registry.mine(self.me):
                self._reset_registration()
                self._register()
            self.counts[role] += 1
            # Always (idempotent): the count can be above zero with the bit
            # clear, when it counts handles inherited across fork that this
            # child was not given (settle_inherited released their role).
            self.registry.set_role(self.me, role)
            self._confirm(role)
            if self.cold:
                self._warm_hint()

    def release_role(self, role: int) -> None:
        with self.lock:
            if self.closed or self.counts[role] <= 0:
                return
            self.counts[role] -= 1
            if self.counts[role] > 0:
                return
            self.pending.discard(role)
            if role == L.ROLE_RX:
                # Views still lent give their slots back while our descriptors
                # can still release them (a slot left READING under an index
                # our Sender keeps registered would never be recovered).
                for loan in list(self.loans):
                    loan.release()
            if self.me >= 0 and self.registry.mine(self.me):
                self.registry.clear_role(self.me, role)
            for ring in self.rings.values():
                ring.set_me(role, -1)
            self.confirmed[role] = False
            self.wake_all()
            if self.counts[0] == 0 and self.counts[1] == 0:
                self._detach()

    def _reset_registration(self) -> None:
        self.me = -1
        self.confirmed = [False, False]
        for ring in self.rings.values():
            ring.set_me(0, -1)
            ring.set_me(1, -1)

    def _confirm(self, role: int) -> None:
        """Point this role's descriptors at our participant (first use of the role)."""
        if not self.confirmed[role]:
            self.confirmed[role] = True
            for ring in self.rings.values():
                ring.set_me(role, self.me)
        if self.pending and not self.sticky:
            # First use of the channel since fork: only the roles we use count from now on.
            for r in self.pending - {role}:
                if not self.confirmed[r]:
                    self.registry.clear_role(self.me, r)
            self.pending.clear()

    def confirm(self, role: int) -> None:
        """Slow path of an op that got UNREGISTERED: (re)register and confirm ``role``."""
        with self.lock:
            self._check_open()
            if self.counts[role] <= 0:
                raise Closed("this handle is closed")
            if self.me < 0 or not self.registry.mine(self.me):
                self._reset_registration()
                self._register()
            self.registry.set_role(self.me, role)
            self._confirm(role)
            if self.cold:
                self._warm_hint()

    def _check_open(self):
        if self.closed:
            raise Closed(f"channel {self.name!r} is closed in this process")

    # ------------------------------------------------------------------
    # fork

    def before_fork(self) -> None:
        toks = []
        if self.me >= 0 and not self.closed:
            for role in (L.ROLE_TX, L.ROLE_RX):
                if self.counts[role] > 0:
                    tok = self.registry.lend_fork(role, self.lent_forks)
                    if tok is not None:
                        toks.append(tok)
        self.fork_tokens = toks

    def after_fork_parent(self) -> None:
        self.fork_tokens = []     # the child retires them (or they expire, or we do at close)

    def after_fork_child(self) -> None:
        self.lock = threading.RLock()
        self.wait_lock = threading.Lock()
        self.blob_lock = threading.RLock()
        self.loans = weakref.WeakSet()      # the parent's views are the parent's
        # fork() shares mappings but not their page tables: each 4 KiB page
        # of an inherited blob would cost a fault (~1.4 us here) on first
        # touch, while a new mapping with MAP_POPULATE costs ~0.4 us a page
        # (madvise(MADV_POPULATE_WRITE) on the inherited one: ~0.9). Large
        # blobs are mapped again on their first use here (_blob_seg).
        self.cold = {k for k, (_, seg) in self.blobs.items() if seg.size >= 1 << 20}
        for k in self.cold:
            self._set_blobmap(k, None)      # so the builtin leaves them to _blob_seg
        self.lent_forks = []                # the parent's to retire
        self.batch_lock = threading.Lock()
        self.rx_states = {}
        self.waiting = [0, 0]
        self.inflight = 0
        self.rx0.banks[:] = 0               # the threads that held banks are not here
        for ring in self.rings.values():
            ring.busy = 0
            ring.rx_extra.clear()
        self._reset_registration()
        inherited = {r for r in (L.ROLE_TX, L.ROLE_RX) if self.counts[r] > 0}
        self.pending = set()
        if inherited and not self.closed:
            try:
                self._register()
                for r in inherited:
                    self.registry.set_role(self.me, r)
                self.pending = inherited
            except ShmError:
                self.me = -1
        for t, v in self.fork_tokens:
            self.registry.retire(t, v)
        self.fork_tokens = []

    def settle_inherited(self, keep: set[int]) -> None:
        """A multiprocessing child now knows which of its inherited handles it was given.

        Roles of handles reachable from its Process (target args, kwargs,
        attributes) keep counting; the others, inherited but not handed to
        it, stop counting now instead of at its first use of the channel.
        """
        with self.lock:
            if not self.pending or self.sticky or self.me < 0:
                return
            for r in self.pending - keep:
                if not self.confirmed[r]:
                    self.registry.clear_role(self.me, r)
            self.pending.clear()

    # ------------------------------------------------------------------
    # Kernel calls that run without the GIL.

    def nogil(self, ring: _Ring, fn, *args):
        """Run a GIL-releasing kernel on ``ring`` so close() never unmaps under it."""
        if self.closed:
            return R.CLOSED
        self.inflight += 1
        ring.busy += 1
        try:
            return fn(*args)
        finally:
            ring.busy -= 1
            self.inflight -= 1

    # ------------------------------------------------------------------
    # Rings (unbounded generations).

    def _ring_name(self, gen: int) -> str:
        return f"{self.family}r{gen:x}"

    def ring(self, gen: int) -> _Ring | None:
        """Generation ``gen``, mapped (None if it does not exist, or is still being made)."""
        r = self.rings.get(gen)
        if r is not None:
            return r
        try:
            seg = Segment.attach(self._ring_name(gen), kind=L.KIND_RING, what="channel ring")
        except SegmentNotFound:
            return None
        p = seg.params
        cap, slot = p[L.PR_CAP], p[L.PR_SLOT]
        lay = L.ring_layout(cap, slot)
        if p[L.PR_GEN] != gen or slot != self.slot or p[L.PR_RING] != lay["ring"] or lay["size"] > seg.size:
            seg.close()
            raise CorruptSegment(f"ring generation {gen} of channel {self.name!r} has inconsistent parameters")
        r = _Ring(self, gen, seg, True, lay["ring"], cap)
        for role in (0, 1):
            if self.confirmed[role]:
                r.set_me(role, self.me)
        self.rings[gen] = r
        return r

    def _gen_cap(self, gen: int) -> int:
        return min(RING0_UNBOUNDED << gen, max(RING0_UNBOUNDED, MAX_RING_BYTES // self.slot))

    def _retired(self, gen: int) -> bool:
        return W.load(self.ctrl.w, L.CH_HEAD_GEN >> 3) > gen

    def _make_ring(self, gen: int) -> _Ring | None:
        """Ensure generation ``gen`` exists and map it; None if it was already retired.

        One creator at a time, elected by CAS on the control block's ``grow``
        word (``gen << 32 | creator pid``; a dead creator's claim is taken
        over). A segment a dead creator left half-made is unlinked and made
        again by the new creator. A generation is never re-created once
        consumers have retired it (``head_gen`` is past it): callers re-read
        the generation counters instead.
        """
        grow_w = L.CH_GROW >> 3
        want = (gen << 32) | os.getpid()
        while True:
            try:
                r = self.ring(gen)
            except (CorruptSegment, IncompatibleSegment):
                r = None
                broken = True           # half-made: its creator died, or is still writing it
            else:
                broken = False
            if r is not None:
                return r
            if self._retired(gen):
                return None
            prev = self.ring(gen - 1) if gen > 0 else None
            if prev is None or not _COUNTER(prev.tx_addr, 2):
                if self._retired(gen - 1):
                    continue            # the previous one was retired meanwhile; ours exists now
                raise CorruptSegment(f"channel {self.name!r}: generation {gen - 1} is missing or not sealed")
            base = _COUNTER(prev.tx_addr, 0)
            cur = W.load(self.ctrl.w, grow_w)
            if cur == 0 or (cur >> 32) < gen or not _liveness.pid_alive(cur & 0xFFFFFFFF):
                if W.cas(self.ctrl.w, grow_w, cur, want) != cur:
                    continue
                try:
                    if broken or self._retired(gen):
                        if self._retired(gen):
                            return None
                        unlink_name(self._ring_name(gen))
                    self._create_ring(gen, base)
                finally:
                    W.cas(self.ctrl.w, grow_w, want, 0)
            else:
                time.sleep(0.0002)

    def _create_ring(self, gen: int, base: int) -> None:
        """Make generation ``gen``: twice the previous one, or smaller if /dev/shm is short.

        Each generation records its own capacity, so when the doubled one
        does not fit, halving down to the first generation's size keeps the
        channel growing in what space there is; only when even that fails
        does the send raise ``OutOfSharedMemory``.
        """
        cap = self._gen_cap(gen)
        while True:
            try:
                return self._create_ring_of(gen, base, cap)
            except OutOfSharedMemory:
                if cap <= RING0_UNBOUNDED:
                    raise
                cap //= 2

    def _create_ring_of(self, gen: int, base: int, cap: int) -> None:
        lay = L.ring_layout(cap, self.slot)
        params = [0] * 8
        params[L.PR_GEN] = gen
        params[L.PR_CAP] = cap
        params[L.PR_SLOT] = self.slot
        params[L.PR_BASE] = base
        params[L.PR_RING] = lay["ring"]

        def init(seg):
            args = np.array([cap, self.slot, base, gen], np.int64)
            _INIT_RING(seg.addr, seg.size, lay["ring"], args.ctypes.data)

        name = self._ring_name(gen)
        for _ in range(2):
            try:
                Segment.create(L.KIND_RING, lay["size"], name=name, family=self.family,
                               public_name=self.name, params=params, init=init).close()
                return
            except SegmentExists:
                try:
                    Segment.attach(name, kind=L.KIND_RING).close()
                    return      # made by an earlier creator after all
                except (CorruptSegment, IncompatibleSegment, SegmentNotFound):
                    unlink_name(name)   # half-made by a creator that died; we hold `grow`

    def refresh_tx(self) -> None:
        """Point our sends at the current tail generation."""
        with self.lock:
            while True:
                g = W.load(self.ctrl.w, L.CH_TAIL_GEN >> 3)
                hg = W.load(self.ctrl.w, L.CH_HEAD_GEN >> 3)
                if g < hg:
                    # The tail was left behind a generation consumers already
                    # retired (its producer died between sealing and publishing
                    # the next one): catch it up.
                    W.cas(self.ctrl.w, L.CH_TAIL_GEN >> 3, g, hg)
                    continue
                if g == self.txr.gen:
                    return
                r = self._make_ring(g) if g > 0 else self.rings[0]
                if r is None:
                    continue
                self.txr = r
                self.tx_addr = r.tx_addr
                self.push_b, self.push_b_spin = r.push_b, r.push_b_spin
                self._drop_old_rings()
                return

    def refresh_rx(self) -> None:
        """Point our receives at the current head generation."""
        with self.lock:
            while True:
                g = W.load(self.ctrl.w, L.CH_HEAD_GEN >> 3)
                if g == self.rxr.gen:
                    return
                r = self._make_ring(g) if g > 0 else self.rings[0]
                if r is None:
                    continue
                self.rxr = r
                self.rx_addr = r.rx_addr
                self.pop_b, self.pop_b_spin = r.pop_b, r.pop_b_spin
                self._drop_old_rings()
                return

    def _drop_old_rings(self) -> None:
        below = min(self.txr.gen, self.rxr.gen)
        for gen in [g for g in self.rings if 0 < g < below]:
            ring = self.rings[gen]
            if ring.busy or ring.pinned():
                continue        # a spinning or parked thread, or a blob being read, still uses it
            del self.rings[gen]
            ring.unmap()
            with self.blob_lock:
                stale = [k for k in self.blobs if k[0] == gen]
                segs = [self.blobs.pop(k)[1] for k in stale]
            for seg in segs:
                seg.close()

    def on_full(self, ring: _Ring) -> None:
        """``ring`` (our tail generation) is full: seal it and move on."""
        _SEAL(ring.tx_addr)
        self.on_sealed_tx(ring)

    def on_sealed_tx(self, ring: _Ring) -> None:
        """``ring`` is sealed: make the next generation and publish it as the tail."""
        with self.lock:
            if _COUNTER(ring.tx_addr, 2) and self._make_ring(ring.gen + 1) is not None:
                W.cas(self.ctrl.w, L.CH_TAIL_GEN >> 3, ring.gen, ring.gen + 1)
            self.refresh_tx()

    def on_sealed_rx(self, ring: _Ring) -> None:
        """``ring`` (our head generation) is sealed and drained: move on, retiring it if we win."""
        with self.lock:
            sealed = _COUNTER(ring.rx_addr, 2)
            drained = _COUNTER(ring.rx_addr, 1) >= _COUNTER(ring.rx_addr, 0)
            if sealed and drained and self._make_ring(ring.gen + 1) is not None:
                if W.cas(self.ctrl.w, L.CH_HEAD_GEN >> 3, ring.gen, ring.gen + 1) == ring.gen:
                    # Never leave tail_gen pointing at what we are about to unlink.
                    W.cas(self.ctrl.w, L.CH_TAIL_GEN >> 3, ring.gen, ring.gen + 1)
                    self._retire_ring(ring)
            self.refresh_rx()

    def _retire_ring(self, ring: _Ring) -> None:
        """Unlink a drained generation and the blobs of its pool."""
        for e in range(ring.cap):
            if _BLOB_STATE(ring.tx_addr, e) != 0:
                continue    # a consumer still reads it, and unlinks the blob after (the ring is sealed)
            info = _BLOB_INFO(ring.tx_addr, e)
            if info > 0 and info & 0xFF:
                self._unlink_blob(ring.gen, e, info >> 8, 1 << (info & 0xFF))
        if ring.gen > 0:
            unlink_name(self._ring_name(ring.gen))

    # ------------------------------------------------------------------
    # Blobs: each ring has a pool of ``cap`` entries, each with at most one
    # blob segment (kernels/ring.py, "Blob pool"). Only the entry's holder
    # (the producer or consumer of the message it carries) touches its
    # blob or its info; this process's mappings are kept per entry.

    def _unlink_blob(self, gen, e, bgen, bcap, locks: bool = True) -> None:
        if unlink_name(_blob_name(self.family, gen, e, bgen)):
            W.fetch_add(self.ctrl.w, L.CH_BLOB_BYTES >> 3, -bcap)
            W.fetch_add(self.ctrl.w, L.CH_BLOB_SEGMENTS >> 3, -1)
        if not locks:
            return      # a finaliser: leave our mapping to the next locked pass (or close)
        with self.blob_lock:
            old = self.blobs.pop((gen, e), None)
            self._set_blobmap((gen, e), None)
        if old is not None:
            old[1].close()

    def _set_blobmap(self, key, bgen_seg) -> None:
        """Tell push_blob_at which blob of entry ``key`` we have mapped (None: none).

        The builtin runs holding the GIL, between any two of these stores:
        the entry is invalidated first and its bgen, which it matches
        against the pool, written last, so it never sees a half-made entry.
        """
        ring = self.rings.get(key[0])
        m = ring.blobmap if ring is not None else None
        if m is None:
            return
        i = 3 * key[1]
        m[i] = 0
        if bgen_seg is not None:
            bgen, seg = bgen_seg
            m[i + 1] = seg.addr + L.BLOB_DATA
            m[i + 2] = min(seg.params[L.PB_CAPACITY], seg.size - L.BLOB_DATA)
            m[i] = bgen

    def _blob(self, gen: int, e: int, bgen: int) -> Segment:
        """This process's mapping of entry ``e``'s blob generation ``bgen``: the one it has, if it is that."""
        have = self.blobs.get((gen, e))
        if have is not None and have[0] == bgen and not self.cold:
            return have[1]
        return self._blob_seg(gen, e, bgen)

    def _blob_seg(self, gen: int, e: int, bgen: int, populate: bool = False) -> Segment:
        """This process's mapping of entry ``e``'s blob generation ``bgen``, attaching it if need be."""
        key = (gen, e)
        with self.blob_lock:
            have = self.blobs.get(key)
            if key in self.cold:
                self.cold.discard(key)
                populate = have is not None and have[0] == bgen     # inherited (see after_fork_child)
            elif have is not None and have[0] == bgen:
                return have[1]
        seg = Segment.attach(_blob_name(self.family, gen, e, bgen), kind=L.KIND_BLOB, what="message blob",
                             populate=populate)
        p = seg.params
        if p[L.PB_GEN] != gen or p[L.PB_ENTRY] != e or p[L.PB_BLOBGEN] != bgen \
                or L.BLOB_DATA + p[L.PB_CAPACITY] > seg.size:
            seg.close()
            raise CorruptSegment(f"blob {seg.name!r} of channel {self.name!r} has inconsistent parameters")
        self._keep_blob(key, bgen, seg)
        return seg

    def _map_reserved(self) -> None:
        """Map the blobs ``reserve=`` made, pages and all, when opening rather than in the first send or recv.

        Faulting in a mapping of shared pages one by one costs ~1.4 us a
        4 KiB page here (22 ms for 64 MiB), mapping them all at once ~0.4 us
        (MAP_POPULATE). A blob replaced meanwhile is left to its first use.
        """
        if not self.reserve:
            return
        ring = self.rings[0]
        for e in range(ring.cap):
            self._map_entry(ring, e, populate=True)

    def _warm_hint(self) -> None:
        """A forked child's first use of a role: map afresh now the inherited blob the next large
        message most likely goes through (the pool's hint), so a receiver does it while it waits."""
        for ring in list(self.rings.values()):
            e = int(ring.seg.w[(ring.ring_off + L.RG_BLOB_HINT) >> 3])
            if (ring.gen, e) in self.cold:
                self._map_entry(ring, e)        # (a cold one is mapped afresh with its pages)

    def _map_entry(self, ring: _Ring, e: int, populate: bool = False) -> None:
        """Map entry ``e``'s blob ahead of its use, if it has one; one replaced meanwhile is left to that use."""
        info = _BLOB_INFO(ring.tx_addr, e)
        if info > 0 and info & 0xFF:
            try:
                self._blob_seg(ring.gen, e, info >> 8, populate)
            except ShmError:
                pass

    def _keep_blob(self, key, bgen, seg) -> None:
        with self.blob_lock:
            old = self.blobs.get(key)
            self.blobs[key] = (bgen, seg)
            self._set_blobmap(key, (bgen, seg))
        if old is not None and old[1] is not seg:
            old[1].close()

    def _take_entry(self, ring: _Ring, pos: int, lg: int) -> int:
        """A pool entry for the message of the claimed slot ``pos``, preferably with a blob of ``2**lg``."""
        for k in range(2000):
            e = _BLOB_TAKE(ring.tx_addr, pos, lg)
            if e >= 0:
                return e
            if e != R.BUSY:
                raise Closed(f"channel {self.name!r} was closed while this message was being sent; "
                             "it was not sent")
            # Every entry was taken while we looked: others are moving them. Never for long.
            time.sleep(0 if k < 100 else 0.001)
        raise CorruptSegment(f"channel {self.name!r}: its blob pool has no free entry, yet a free one "
                             "is always there; its ring is corrupt")

    def _drop_blob(self, ring: _Ring, addr: int, e: int, bgen: int, lg: int, locks: bool = True) -> None:
        """Unlink the blob of entry ``e``, which we hold. Marked gone first (low byte 0, the generation
        stays): a holder killed in between leaves a state the next one handles."""
        _SET_BLOB_INFO(addr, e, bgen << 8)
        self._unlink_blob(ring.gen, e, bgen, 1 << lg, locks)

    @staticmethod
    def _abandon(addr: int, pos: int, e: int) -> None:
        """A send that will not be published: give back its pool entry (if it took one), tombstone its slot."""
        if e >= 0:
            _BLOB_GIVE(addr, pos, e)
        _PUBLISH(addr, pos, 0, 0, L.FLAG_TOMB)

    def _entry_info(self, addr: int, e: int) -> tuple[int, int]:
        """(bgen, log2 capacity) of the blob of entry ``e``, which we hold; lg 0: none."""
        info = _BLOB_INFO(addr, e)
        if info == R.CLOSED:
            raise Closed(f"channel {self.name!r} was closed in this process")
        if info < 0 or info & 0xFF > 47:
            raise CorruptSegment(f"blob pool entry {e} of channel {self.name!r} is corrupt")
        return info >> 8, info & 0xFF

    def _blob_for_write(self, ring: _Ring, pos: int, e: int, n: int) -> Segment:
        """Entry ``e``'s blob (taken for ``pos``), grown to hold ``n`` bytes."""
        addr = ring.tx_addr
        bgen, lg = self._entry_info(addr, e)
        if lg and 1 << lg >= n:
            try:
                seg = self._blob(ring.gen, e, bgen)
            except (SegmentNotFound, CorruptSegment):
                seg = None
            # The copy goes by address: check against the mapping, never the shared words alone.
            if seg is not None and seg.params[L.PB_CAPACITY] >= n and L.BLOB_DATA + n <= seg.size:
                return seg
        # Replace it. The entry's bgen always names the only blob that may
        # exist for it: mark it gone (low byte 0, same generation: a holder
        # killed from here on leaves a state the next one handles), unlink
        # it, bump the generation, then create. With no blob now the
        # generation stays: a holder killed inside Segment.create may have
        # left that name. Never restart at 1: a process still mapping an
        # older blob of that name would use it.
        if lg:
            self._drop_blob(ring, addr, e, bgen, lg)
        elif bgen:
            unlink_name(_blob_name(self.family, ring.gen, e, bgen))     # a killed creator's, if any
        bgen += 1
        _SET_BLOB_INFO(addr, e, bgen << 8)
        cap = max(BLOB_MIN, _round_pow2(n))
        seg = _new_blob(self.family, self.name, ring.gen, e, bgen, cap)
        _SET_BLOB_INFO(addr, e, bgen << 8 | (cap.bit_length() - 1))
        W.fetch_add(self.ctrl.w, L.CH_BLOB_BYTES >> 3, cap)
        W.fetch_add(self.ctrl.w, L.CH_BLOB_SEGMENTS >> 3, 1)
        self._keep_blob((ring.gen, e), bgen, seg)
        return seg

    def _write_blob(self, ring: _Ring, pos: int, kind: int, parts, n: int, held: bool = False) -> None:
        """Take a pool entry, fill its blob with ``parts`` and publish; on failure give it back and tombstone.

        ``held``: push_blob_at claimed ``pos`` and may have taken an entry
        (its slot names it). Counted as in flight (close() waits for it
        before unmapping) since the copy writes to the blob by address.
        """
        self.inflight += 1
        e = -1
        try:
            if held:
                e = _BLOB_ENTRY(ring.tx_addr, pos)
            if self.closed:
                raise Closed(f"channel {self.name!r} was closed in this process")
            if e < 0:
                e = self._take_entry(ring, pos, max(BLOB_MIN, _round_pow2(n)).bit_length() - 1)
            seg = self._blob_for_write(ring, pos, e, n)
            at = seg.addr + L.BLOB_DATA
            for part in parts:
                if type(part) is bytes:
                    m = len(part)
                    _COPY(at, id(part) + BYTES_OFF, m)
                else:
                    a = part if isinstance(part, np.ndarray) else np.frombuffer(part, np.uint8)
                    a = a.reshape(-1).view(np.uint8)
                    m = a.shape[0]
                    seg.u8[at - seg.addr:at - seg.addr + m] = a
                at += m
        except BaseException:
            self._abandon(ring.tx_addr, pos, e)
            raise
        finally:
            self.inflight -= 1
        if _PUBLISH(ring.tx_addr, pos, n, kind, L.FLAG_BLOB) != R.OK:
            raise Closed(f"channel {self.name!r} was closed while this message was being sent; "
                         "it was not sent")

    def _read_blob(self, ring: _Ring, pos: int, meta: int, lend: int = 0):
        """Decode the blob message of the claimed slot ``pos``, then give back its entry and the slot.

        ``lend`` (the receiving descriptor's address): raw bytes and arrays
        are lent in place, as a MessageView (the slot and its entry stay
        claimed and the ring pinned until the view is released, see
        ``_Loan``); anything else is decoded as usual.
        """
        addr = ring.rx_addr
        n = meta & L.META_LEN_MASK
        kind = (meta >> L.META_KIND_SHIFT) & 0xFF
        lent = False
        try:
            e = _BLOB_ENTRY(addr, pos)
            if e < 0:
                raise CorruptSegment(f"no blob pool entry holds the message at position {pos}")
            bgen, lg = self._entry_info(addr, e)
            bcap = 1 << lg if lg else 0
            if n > bcap:
                raise CorruptSegment(f"a message of {n} bytes in a blob of {bcap}")
            seg = self._blob(ring.gen, e, bgen)
            a, b = L.BLOB_DATA, L.BLOB_DATA + n
            arr = self._lendable(seg, kind, a, n) if lend else None
            if arr is not None:
                loan = _Loan(self, ring, lend, pos, arr)
                try:
                    v = MessageView(None, loan)
                except BaseException:
                    loan._done = True       # our finally (and the caller's) release and unpin
                    raise
                lent = True
                return v
            if kind == self.kind and self.raw:
                self.inflight += 1          # a large one is copied without the GIL: close() waits for it
                try:
                    return _bigcopy.to_bytes(seg, a, n)     # one copy, straight into a new bytes
                finally:
                    self.inflight -= 1
            view = memoryview(seg.mm)[a:b]
            try:
                return self.codec.decode(kind, view)    # msgpack/pickle/arrays read in place
            finally:
                view.release()
        except (SegmentNotFound, CorruptSegment) as e:
            raise DecodeError(f"a large message on channel {self.name!r} was lost: {e}") from None
        finally:
            if not lent:        # else the loan releases the slot (and its entry) when done
                self._after_blob_read(ring, addr, pos, n)

    def _after_blob_read(self, ring: _Ring, addr: int, pos: int, n: int, locks: bool = True) -> None:
        """Give back the entry and the slot of a blob message read; drop the blob if it will not be reused.

        ``locks=False`` (a loan released by the garbage collector, which may
        run while this very thread holds ``blob_lock``): no lock is taken and
        the budget is left to the next ordinary read.
        """
        if self.closed:
            return      # a loan outliving its channel: the slot went with it (close() recovered it)
        self._blob_reads += 1
        try:
            e = _BLOB_ENTRY(addr, pos)
            if e < 0:
                return
            try:
                # Keep the blob for the next message, unless the ring is sealed
                # (never reused) or the channel holds too much (checked every
                # 64 reads, and for every blob of 1 MiB or more) and this blob
                # is more than reserve= promised to keep. (Over the budget, the
                # pop builtin leaves every blob message to this path.)
                sealed = self.flavor == L.FLAVOR_UNBOUNDED and _COUNTER(addr, 2) > 0    # (CLOSED is -9)
                if sealed or (locks and (not self._blob_reads & 63 or n >= 1 << 20)
                              and self.ctrl.w[L.CH_BLOB_BYTES >> 3] > BLOB_BUDGET):
                    info = _BLOB_INFO(addr, e)
                    if info > 0 and info & 0xFF and (sealed or 1 << (info & 0xFF) > self.reserve):
                        self._drop_blob(ring, addr, e, info >> 8, info & 0xFF, locks)
            finally:
                _BLOB_GIVE(addr, pos, e)
        finally:
            _RELEASE(addr, pos)

    def _lendable(self, seg: Segment, kind: int, a: int, n: int):
        """A read-only array over a blob message that can be lent in place, else None."""
        if kind == K_RAW:
            arr = np.frombuffer(seg.mm, np.uint8, n, a)
        elif kind == K_NDARRAY:
            v = memoryview(seg.mm)[a:a + n]
            try:
                dtype, shape, off = ndarray_header(v)
            finally:
                v.release()
            arr = np.frombuffer(seg.mm, dtype, math.prod(shape), a + off).reshape(shape)
        else:
            return None
        arr.flags.writeable = False
        return arr

    # ------------------------------------------------------------------
    # Sending.

    def parts_of(self, data):
        """(kind, parts, total length) of what the codec made."""
        if isinstance(data, tuple):
            kind, parts = data
        else:
            kind, parts = self.kind, [data]
        n = 0
        for part in parts:
            n += part.nbytes if isinstance(part, (np.ndarray, memoryview)) else len(part)
        return kind, parts, n

    def finish_claimed(self, data, pushed: int) -> None:
        """Finish the send the fast path's builtin left at ``CLAIMED - p``.

        It claimed position ``p`` of the (one) ring, and maybe took a pool
        entry, for a blob this process has not mapped. Whatever goes wrong
        here, the slot is tombstoned and the entry given back.
        """
        ring, pos = self.rings[0], R.CLAIMED - pushed
        try:
            kind, parts, n = self.parts_of(data)
        except BaseException:
            self._abandon(ring.tx_addr, pos, _BLOB_ENTRY(ring.tx_addr, pos))
            raise
        self._write_blob(ring, pos, kind, parts, n, held=True)

    def send(self, obj, data, deadline, blocking=True) -> None:
        """The slow path of a send: blocking, large messages, generations, errors."""
        self._check_open()
        kind, parts, n = self.parts_of(data)
        rendezvous = self.flavor == L.FLAVOR_RENDEZVOUS
        if n > self.inline and not rendezvous:
            ring = self.txr
            pos = _CLAIM(ring.tx_addr)          # first try: no closures, no waiting machinery
            if pos >= 0:
                self._write_blob(ring, pos, kind, parts, n)
                return
        if n <= self.inline:
            payload = parts[0] if len(parts) == 1 and type(parts[0]) is bytes else \
                b"".join(p.reshape(-1).view(np.uint8).tobytes() if isinstance(p, np.ndarray) else bytes(p)
                         for p in parts)
            src = id(payload) + BYTES_OFF

            def write(ring, pos):
                if _PUBLISH_INLINE(ring.tx_addr, pos, src, n, kind) != R.OK:
                    raise Closed(f"channel {self.name!r} was closed while this message was being "
                                 "sent; it was not sent")
        else:
            def write(ring, pos):
                self._write_blob(ring, pos, kind, parts, n)

        if rendezvous and not blocking and not self._receiver_waiting():
            raise Full("no receiver is waiting on the rendezvous channel", message=obj)

        def attempt():
            ring = self.txr
            r = _CLAIM(ring.tx_addr)
            if r >= 0:
                write(ring, r)
                return (ring, r)
            return self._push_status(r, ring, obj)

        if not blocking:
            res = _retrying(attempt)
            if res is _wait.WOULD_BLOCK:
                self._maybe_check_peers()
                res = _retrying(attempt)
            if res is _wait.WOULD_BLOCK:
                raise Full(f"channel {self.name!r} is full", message=obj)
        else:
            def spin():
                for _ in range(SEND_SPIN):
                    os.sched_yield()
                    r = _retrying(attempt)
                    if r is not _wait.WOULD_BLOCK:
                        return r
                return _wait.WOULD_BLOCK

            res = _wait.block(lambda: _retrying(attempt), lambda s: self.park(L.ROLE_TX, s),
                              deadline, self.check_peers, spin=spin)
            if res is _wait.TIMED_OUT:
                raise Full(f"channel {self.name!r} stayed full until the timeout", message=obj)
        if rendezvous:
            self._await_taken(obj, *res, deadline, blocking)

    def _push_status(self, r, ring, obj):
        if r == R.FULL:
            if self.flavor == L.FLAVOR_UNBOUNDED:
                self.on_full(ring)
                return _RETRY
            return _wait.WOULD_BLOCK
        if r == R.SEALED:
            self.on_sealed_tx(ring)
            return _RETRY
        if r == R.DISCONNECTED:
            raise Disconnected(f"every receiver of channel {self.name!r} is gone; the message was not sent",
                               message=obj)
        if r == R.UNREGISTERED:
            self.confirm(L.ROLE_TX)
            return _RETRY
        if r == R.CLOSED:
            if self.closed:
                raise Closed(f"channel {self.name!r} was closed in this process")
            self.refresh_tx()
            return _RETRY
        raise CorruptSegment(f"channel {self.name!r}: unexpected ring status {R.STATUS_NAMES.get(r, r)}")

    def _receiver_waiting(self) -> bool:
        return self.registry.waiting_count(R.SIDE_RX) > 0

    def _await_taken(self, obj, ring, pos, deadline, blocking):
        """Rendezvous: wait until a receiver has taken our message, or take it back."""
        if not blocking:
            deadline = time.monotonic() + 0.01    # a waiting receiver takes it within microseconds

        def attempt():
            return None if _TAKEN(ring.tx_addr, pos) else _wait.WOULD_BLOCK

        r = _wait.block(attempt, lambda s: self.park(L.ROLE_TX, s), deadline, self.check_peers)
        if r is _wait.TIMED_OUT and _CANCEL(ring.tx_addr, pos):
            raise Full(("no receiver was waiting" if not blocking else "no receiver took the message "
                        "before the timeout") + f" (rendezvous channel {self.name!r})", message=obj)

    def send_many(self, items, deadline) -> None:
        """Send every item in order; inline ones go ``BATCH`` per kernel call.

        Each chunk is encoded with C-level ``map`` and pushed as one
        concatenated buffer with an ``array('q')`` of offsets, so the per-item
        cost is the codec plus a few C calls. If an item cannot be encoded,
        every item before it is sent, then the EncodeError is raised. On
        ``Full``/``Disconnected`` the exception's ``.message`` is the list of
        items not sent.
        """
        it = iter(items)
        fenc, raw, inline = self.fast_encode, self.raw, self.inline
        batchable = self.flavor != L.FLAVOR_RENDEZVOUS
        # msgpack's and pickle's encoders always return bytes; numpy's may return parts.
        fenc_may_not_bytes = self.codec.name not in ("msgpack", "pickle")
        while True:
            chunk = list(islice(it, BATCH))
            if not chunk:
                return
            failed = None
            try:
                datas = chunk if raw and set(map(type, chunk)) == {bytes} else list(map(fenc, chunk))
            except Exception:
                datas = []
                for obj in chunk:           # find the culprit; send what precedes it
                    try:
                        datas.append(self.encode(obj))
                    except Exception as e:
                        failed = e
                        break
                chunk = chunk[:len(datas)]
            n = len(datas)
            batch = batchable and n > 0 and (not fenc_may_not_bytes or set(map(type, datas)) == {bytes})
            if batch:
                lens = list(map(len, datas))
                fixed = lens[0] if lens.count(lens[0]) == n else -1
                batch = (fixed if fixed >= 0 else max(lens)) <= inline
            if batch:
                data = b"".join(datas)
                src = id(data) + BYTES_OFF
                if fixed < 0:
                    lens_arr = np.array(lens, np.int64)
                    lens_addr = lens_arr.ctypes.data
            k = 0
            while k < n:
                if batch:
                    if fixed >= 0:
                        r = _PUSH_MANY_FIXED(self.tx_addr, src + k * fixed, fixed, n - k)
                    else:
                        skip = sum(lens[:k]) if k else 0
                        r = _PUSH_MANY(self.tx_addr, src + skip, len(data) - skip, lens_addr + 8 * k, n - k)
                    if r > 0:
                        k += r
                        continue
                try:        # full (or not batchable): one blocking send, then batch again
                    self.send(chunk[k], datas[k], deadline)
                except (Full, Disconnected) as e:
                    e.message = chunk[k:] + ([] if failed is not None else list(it))
                    raise
                k += 1
            if failed is not None:
                raise failed

    # ------------------------------------------------------------------
    # Receiving.

    def rx_state(self) -> _Rx:
        """A private receive state for the calling thread (when the shared banks are all taken)."""
        ident = threading.get_ident()
        st = self.rx_states.get(ident)
        if st is None:
            with self.lock:
                st = self.rx_states.setdefault(ident, _Rx(self, primary=False))
        return st

    def recv(self, st: _Rx, r, deadline, blocking=True, view=False):
        """The slow path of a receive, given the fast path's first result (or None).

        ``view``: return a ``MessageView`` (``Receiver.recv_view``): a blob
        message stays in its blob, lent to the caller.
        """
        rendezvous = self.flavor == L.FLAVOR_RENDEZVOUS and blocking
        if rendezvous:
            self._begin_wait(R.SIDE_RX)
        try:
            checked = False
            if r is None:
                r = _POP(st.addr(self.rxr))
            while True:
                if r == R.NO_BANK:
                    st = self.rx_state()
                    r = _POP(st.addr(self.rxr))
                    continue
                if r >= 0:
                    v = self.decode_area(st, r)
                    return MessageView.of(v) if view else v
                if r <= R.BLOB_AREA:
                    return self._decode_blob_area(st, r, view)
                if r == R.EMPTY:
                    if not blocking:
                        if not checked and self._maybe_check_peers():
                            checked = True
                            r = _POP(st.addr(self.rxr))
                            continue
                        raise Empty(f"channel {self.name!r} is empty")
                    r = _wait.block(lambda: self._pop_attempt(st), lambda s: self.park(L.ROLE_RX, s),
                                    deadline, self.check_peers,
                                    spin=None if self.no_spin else (lambda: self._pop_spin(st)))
                    if r is _wait.TIMED_OUT:
                        raise Empty(f"nothing arrived on channel {self.name!r} before the timeout")
                    continue
                if r == R.DISCONNECTED:
                    raise Disconnected(f"every sender of channel {self.name!r} is gone and it is empty")
                if r == R.SEALED:
                    self.on_sealed_rx(self.rxr)
                elif r == R.UNREGISTERED:
                    self.confirm(L.ROLE_RX)
                elif r == R.CLOSED:
                    if self.closed:
                        raise Closed(f"channel {self.name!r} was closed in this process")
                    self.refresh_rx()
                elif r == R.CORRUPT:
                    raise DecodeError(f"a message on channel {self.name!r} had an impossible length "
                                      "and was dropped (corrupt segment?)")
                else:
                    raise CorruptSegment(f"channel {self.name!r}: unexpected ring status {r}")
                r = _POP(st.addr(self.rxr))
        finally:
            if rendezvous:
                self._end_wait(R.SIDE_RX)

    def _pop_attempt(self, st: _Rx):
        r = _POP(st.addr(self.rxr))
        return _wait.WOULD_BLOCK if r == R.EMPTY else r

    def _pop_spin(self, st: _Rx):
        ring = self.rxr
        r = self.nogil(ring, _POP_SPIN, st.addr(ring), _wait.SPIN_STEPS)
        return _wait.WOULD_BLOCK if r == R.EMPTY else r

    def decode_area(self, st: _Rx, r):
        n = r >> R.LEN_SHIFT
        off = ((r >> R.AREA_SHIFT) & R.AREA_MASK) * self.area
        return self.decode(r & 0xFF, st.scratch[off:off + n])

    def decode(self, kind, buf: bytes):
        """Decode a message copied out as ``bytes``."""
        if kind == self.kind:
            if self.raw:
                return buf
            if self.fast_decode is not None:
                try:
                    return self.fast_decode(buf)
                except Exception:
                    pass        # decode() raises the codec's DecodeError
        return self.codec.decode(kind, buf)

    def _decode_blob_area(self, st: _Rx, r, view=False):
        pos, meta, gen = _THREE_WORDS.unpack_from(st.scratch, (R.BLOB_AREA - r) * self.area)
        # The ring it came from, not self.rxr (another thread may have moved on);
        # pop_at pinned it, so it is still mapped here.
        ring = self.rings.get(gen) or self.ring(gen)
        if ring is None:
            raise DecodeError(f"a large message on channel {self.name!r} was lost: its ring is gone")
        daddr = st.addr(ring)
        lent = False
        try:
            if view:
                v = self._read_blob(ring, pos, meta, lend=daddr)
                if type(v) is MessageView:
                    lent = True
                    return v
                return MessageView.of(v)
            return self._read_blob(ring, pos, meta)
        finally:
            if not lent:
                _UNPIN(daddr)

    def recv_many(self, max_items: int, deadline, blocking=True) -> list:
        """Up to ``max_items`` messages: waits for the first, then takes what is queued."""
        st = self.rx0
        out: list = []
        while len(out) < max_items:
            with self.batch_lock:       # one batch region per descriptor
                r = _POP_MANY(self.rx_addr, st.lens_addr, min(BATCH, max_items - len(out)))
                if r > 0:
                    self._unbatch(st, r, out)
                    continue
            if r == R.BLOB:
                r = None        # the single-message path takes blobs
            elif r in (R.EMPTY, R.DISCONNECTED) and out:
                return out
            try:
                out.append(self.recv(st, r, deadline, blocking))
            except (Empty, Disconnected):
                if out:
                    return out
                raise
        return out

    def _unbatch(self, st: _Rx, r: int, out: list) -> None:
        """Decode ``r`` messages left back to back in the batch region."""
        at = self.area * R.N_BANKS * R.N_AREAS
        sc = st.scratch
        v = st.lens[:r]
        first = int(v[0])
        if first >> L.META_KIND_SHIFT == self.kind and (self.raw or self.kind == K_MSGPACK):
            if (v == first).all():                  # same kind and length: one struct unpack
                n = first & L.META_LEN_MASK
                if self.raw:
                    out.extend(_fixed_struct(n, r).unpack_from(sc, at))
                    return
                end = at + n * r
            elif ((v >> L.META_KIND_SHIFT) == self.kind).all():
                end = at + int((v & L.META_LEN_MASK).sum())
                if self.raw:
                    ends = list(accumulate((v & L.META_LEN_MASK).tolist(), initial=at))
                    out.extend([sc[a:b] for a, b in zip(ends, ends[1:])])
                    return
            else:
                end = -1
            if end >= 0:
                # msgpack: the messages are whole objects back to back, one stream.
                unp = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=0)
                unp.feed(sc[at:end])
                got = list(unp)
                if len(got) != r:
                    raise DecodeError(f"a batch on channel {self.name!r} did not decode to {r} messages")
                out.extend(got)
                return
        dec = self.decode
        for x in v.tolist():
            n = x & L.META_LEN_MASK
            out.append(dec(x >> L.META_KIND_SHIFT, sc[at:at + n]))
            at += n

    # ------------------------------------------------------------------
    # Parking and peers.

    def _begin_wait(self, side: int) -> None:
        with self.wait_lock:
            self.waiting[side] += 1
            if self.waiting[side] == 1 and self.me >= 0:
                self.registry.set_waiting(self.me, side)
                if side == R.SIDE_RX and self.flavor == L.FLAVOR_RENDEZVOUS and not self.closed:
                    # A try_send (send_async, select) completes only once a receiver
                    # waits: wake senders parked on that, as a push wakes receivers.
                    _WAKE(self.rings[0].rx_addr, R.SIDE_TX, 1 << 30)

    def _end_wait(self, side: int) -> None:
        with self.wait_lock:
            self.waiting[side] -= 1
            if self.waiting[side] == 0 and self.me >= 0 and not self.closed:
                self.registry.clear_waiting(self.me, side)

    def park(self, role: int, seconds: float) -> None:
        """Sleep until the other side wakes us or ``seconds`` pass (lost-wake-up safe)."""
        if self.closed:
            return
        side = R.SIDE_RX if role == L.ROLE_RX else R.SIDE_TX
        ring = self.rxr if role == L.ROLE_RX else self.txr
        addr = ring.rx_addr if role == L.ROLE_RX else ring.tx_addr
        self._begin_wait(side)
        try:
            self.nogil(ring, _PARK, addr, side, int(seconds * 1e9))
        finally:
            self._end_wait(side)

    def wake_all(self) -> None:
        if not self.closed:
            for side in (R.SIDE_RX, R.SIDE_TX):
                _WAKE(self.rings[0].rx_addr, side, 1 << 30)

    def _maybe_check_peers(self) -> int:
        """Rate-limited check_peers, for non-blocking calls that keep failing."""
        now = time.monotonic()
        if now - self._last_check < _PEER_CHECK_NB:
            return 0
        self._last_check = now
        return self.check_peers()

    def check_peers(self) -> int:
        """Reap dead participants, recovering the slots they held. Returns how many."""
        with self.lock:
            if self.closed or self.me < 0:
                return 0
            n = self.registry.sweep(on_reap=self._recover, skip=self.me)
            if n:
                W.fetch_add(self.ctrl.w, L.CH_REAPED >> 3, n)
                self.wake_all()
            return n

    def _recover(self, dead: int) -> None:
        gens = set(self.rings)
        if self.flavor == L.FLAVOR_UNBOUNDED:
            hg = W.load(self.ctrl.w, L.CH_HEAD_GEN >> 3)
            tg = W.load(self.ctrl.w, L.CH_TAIL_GEN >> 3)
            gens |= set(range(hg, tg + 1))
        for gen in sorted(gens):
            try:
                ring = self.ring(gen)
            except ShmError:
                continue
            if ring is None:
                continue
            r = self.nogil(ring, _RECOVER, ring.tx_addr, dead)
            if r < 0:
                continue
            tombs, dropped = r & 0xFFFFFFFF, r >> 32
            if tombs:
                W.fetch_add(self.ctrl.w, L.CH_TOMBSTONES >> 3, tombs)
            if dropped:
                W.fetch_add(self.ctrl.w, L.CH_DROPPED >> 3, dropped)

    # ------------------------------------------------------------------
    # Introspection.

    def positions(self) -> tuple[int, int]:
        """(sent, received): the global tail and head positions."""
        if self.flavor == L.FLAVOR_UNBOUNDED:
            try:
                self.refresh_tx()
                self.refresh_rx()
            except ShmError:
                pass
        return _COUNTER(self.txr.tx_addr, 0), _COUNTER(self.rxr.rx_addr, 1)

    def depth(self) -> int:
        if self.flavor == L.FLAVOR_RENDEZVOUS:
            return 0
        sent, received = self.positions()
        d = max(0, sent - received)
        return min(d, self.capacity) if self.flavor == L.FLAVOR_BOUNDED else d

    def holders(self, role: int) -> int:
        """Processes holding ``role`` (plus outstanding tokens)."""
        return len(self.registry.role_holders(role)) + self.registry.token_count(role)

    def counter(self, off: int) -> int:
        return W.load(self.ctrl.w, off >> 3)

    # ------------------------------------------------------------------
    # Leaving.

    def _detach(self) -> None:
        """No handle of ours is open: leave, and unlink everything if we are the last."""
        if self.closed:
            return
        with _OPEN_LOCK:
            if _OPEN.get(self.name) is self:
                del _OPEN[self.name]
        reg = self.registry
        last = False
        if self.me >= 0 and reg.mine(self.me):
            try:
                n = reg.sweep(on_reap=self._recover, skip=self.me)
                if n:       # stats().reaped counts every reap, not only a parked waiter's
                    W.fetch_add(self.ctrl.w, L.CH_REAPED >> 3, n)
            except ShmError:
                pass
            # From here other threads of ours get Closed: their kernel calls
            # see D_ME = -1 (UNREGISTERED) and the slow path finds us closed.
            self.closed = True
            for ring in self.rings.values():
                ring.invalidate_tx_rx_me()
            self._wait_inflight()
            # A slot another thread of ours claimed and never published or
            # released (it was interrupted, or raced this close) would
            # otherwise stay attributed to an index nobody will ever reap.
            for ring in list(self.rings.values()):
                _RECOVER(ring.tx_addr, self.me)
            for side in (0, 1):
                reg.clear_waiting(self.me, side)
            reg.unregister(self.me)
            reg.retire_orphaned_forks(self.lent_forks)
            self.lent_forks = []
            last = reg.claim_last_out()
        self.me = -1
        for side in (R.SIDE_RX, R.SIDE_TX):     # the other side re-checks who is left
            _WAKE(self.rings[0].rx_addr, side, 1 << 30)
        self.closed = True
        if last:
            self._destroy()
        self._unmap()

    def _destroy(self) -> None:
        """Unlink every segment of this channel."""
        for gen, ring in list(self.rings.items()):
            for e in range(ring.cap):
                info = _BLOB_INFO(ring.tx_addr, e)
                if info > 0:
                    unlink_name(_blob_name(self.family, gen, e, info >> 8))
            if gen > 0:
                unlink_name(self._ring_name(gen))
        unlink_family(self.family)
        unlink_name(self.name)

    def _wait_inflight(self, timeout: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            time.sleep(0.001)
        return not self.inflight

    def _unmap(self) -> None:
        """Unmap everything once no GIL-free kernel call or raw copy of ours is running."""
        self.closed = True
        for ring in self.rings.values():
            ring.invalidate()
        if not self._wait_inflight():
            return      # a thread is stuck in a kernel: leave the mappings to the garbage collector
        with self.blob_lock:
            blobs, self.blobs = self.blobs, {}
        for _, seg in blobs.values():
            seg.close()
        for ring in self.rings.values():
            ring.unmap()
        self.ctrl.close()

    def unlink(self) -> None:
        """Unlink every segment now, whoever is still attached."""
        with self.lock:
            self._check_open()
            self.ctrl.set_state(self.ctrl.state, L.SEG_UNLINKED)
            self._destroy()


def _retrying(attempt):
    while True:
        r = attempt()
        if r is not _RETRY:
            return r


_PEER_CHECK_NB = 0.25


def unlink_family(family: str) -> int:
    """Unlink every segment whose name starts with ``family`` (Linux: listed from /dev/shm)."""
    n = 0
    if not family or not os.path.isdir("/dev/shm"):
        return 0
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return 0
    for nm in names:
        if nm.startswith(family) and nm != family:
            n += unlink_name(nm)
    return n


# --------------------------------------------------------------------------
# Process-wide hooks.

def _before_fork():
    with _OPEN_LOCK:
        chans = list(_OPEN.values())
    for c in chans:
        try:
            c.before_fork()
        except Exception:
            pass


def _after_fork_parent():
    for c in list(_OPEN.values()):
        c.after_fork_parent()


def _after_fork_child():
    global _OPEN_LOCK
    _OPEN_LOCK = threading.RLock()
    for c in list(_OPEN.values()):
        try:
            c.after_fork_child()
        except Exception:
            pass
    _install_mp_finalizer()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent,
                    after_in_child=_after_fork_child)

_HANDLES: "weakref.WeakSet" = weakref.WeakSet()


EXIT_HOOKS: list = []        # other structures' close-everything functions (registered by track_handles)


def track_handles(handles, *, after_fork_child: str, before_fork: str | None = None,
                  after_fork_parent: str | None = None) -> None:
    """Process lifetime for a structure's open handles (dicts, primitives, broadcasts).

    ``handles()`` returns them. At exit (atexit, and multiprocessing children,
    which leave through ``os._exit``, via ``close_all``) each is closed; around
    a fork each gets the named method. A handle that raises is skipped.
    """
    def each(method):
        def hook():
            for h in list(handles()):
                try:
                    getattr(h, method)()
                except Exception:
                    pass
        return hook
    close = each("close")
    atexit.register(close)
    EXIT_HOOKS.append(close)
    os.register_at_fork(**{k: each(m) for k, m in (("before", before_fork), ("after_in_parent", after_fork_parent),
                                                   ("after_in_child", after_fork_child)) if m})


def close_all() -> None:
    """Close every handle this process holds (at exit)."""
    for h in list(_HANDLES):
        try:
            h.close()
        except Exception:
            pass
    for hook in EXIT_HOOKS:
        try:
            hook()
        except Exception:
            pass


atexit.register(close_all)


def _install_mp_finalizer():
    # multiprocessing children leave through os._exit(), skipping atexit;
    # their finalizers run first. _bootstrap() clears the finalizer registry
    # after unpickling, then runs after-fork hooks, so we (re-)register there.
    try:
        from multiprocessing import util
    except ImportError:  # pragma: no cover
        return
    util.Finalize(None, close_all, exitpriority=100)


class _MpHook:
    pass


_mp_hook = _MpHook()


def _reachable_handles(root, limit: int = 20000) -> list:
    """shm handles reachable from ``root`` through containers and object attributes."""
    from .channel import _Handle
    found, seen, stack = [], set(), [root]
    while stack and len(seen) < limit:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, _Handle):
            found.append(o)
        elif isinstance(o, (tuple, list, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (str, bytes, bytearray, int, float, complex, bool, type(None), np.ndarray,
                            memoryview, type)) or callable(o) and not hasattr(o, "__self__"):
            continue
        elif hasattr(o, "__self__"):
            stack.append(o.__self__)            # a bound method: its object
        else:
            d = getattr(o, "__dict__", None)
            if isinstance(d, dict):
                stack.extend(d.values())
            for cls in type(o).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if isinstance(slot, str) and slot not in ("__dict__", "__weakref__"):
                        v = getattr(o, slot, None)
                        if v is not None:
                            stack.append(v)
    return found


def _mp_after_fork(_):
    """In a multiprocessing child (after _bootstrap set current_process())."""
    _install_mp_finalizer()
    try:
        import multiprocessing
        proc = multiprocessing.current_process()
        handles = _reachable_handles(proc.__dict__)
    except Exception:
        return
    keep: dict[int, set[int]] = {}
    for h in handles:
        c = getattr(h, "_c", None)
        if c is not None:
            keep.setdefault(id(c), set()).add(h._role)
    for c in list(_OPEN.values()):
        try:
            c.settle_inherited(keep.get(id(c), set()))
        except Exception:
            pass


def _register_mp_hook():
    try:
        from multiprocessing import util
    except ImportError:  # pragma: no cover
        return
    util.register_after_fork(_mp_hook, _mp_after_fork)


_register_mp_hook()
