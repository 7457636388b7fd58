"""Broadcast, watch and oneshot channels between processes (tokio::sync's, across processes).

>>> import shm
>>> tx, rx = shm.broadcast(16)
>>> rx2 = tx.subscribe()                # or shm.BroadcastReceiver.open(tx.name) in any process
>>> tx.send({"tick": 1})                # returns how many processes subscribe
1
>>> rx.recv(), rx2.recv()
({'tick': 1}, {'tick': 1})

* ``broadcast(capacity)``: every subscriber gets every message. The ring
  keeps the last ``capacity`` messages; a subscriber that falls further
  behind gets ``shm.Lagged`` (``.skipped`` messages lost) and continues
  from the oldest one still there. Subscribers join (from the next message
  on) and leave at any time, from any process.
* ``watch(initial)``: one latest value with a version: ``get()``,
  ``set(v)``, ``changed(timeout)``, ``wait_for(pred, timeout)``.
* ``oneshot()``: one value, sent once, received once.

The protocol is in ``kernels/broadcast.py``. Messages are encoded by the
codec and must fit a slot (``slot_size``, 512 bytes by default, header
included): a larger one raises ``MessageTooLarge`` naming the fix.
Publishers share a robust lock: a publisher SIGKILLed while publishing
leaves nothing half-visible, and the next one takes the lock over.
"""
from __future__ import annotations

import threading
import time
import weakref

import numpy as np

from kernels import broadcast as B
from kernels import layout as L
from kernels import ring as R
from kernels import words as W

from . import _async, _chan, _wait
from ._chan import BYTES_OFF, _entry
from ._registry import PEER_CHECK, Registry
from .channel import _deadline, bounded
from .codec import get_codec
from .errors import (Closed, CorruptSegment, Disconnected, Empty, Lagged, MessageTooLarge, SegmentNotFound,
                     ShmError, WrongKind)
from .segment import Segment, check_name, new_name

__all__ = ["broadcast", "BroadcastSender", "BroadcastReceiver", "Watch", "watch", "oneshot",
           "OneshotSender", "OneshotReceiver"]

_LOCK = _entry(B.lock_at)
_UNLOCK = _entry(B.unlock_at)
_OWNER = _entry(B.lock_owner_at)
_STEAL = _entry(B.steal_at)
_PUBLISH = _entry(B.publish_at)
_READ = _entry(B.read_at)
_TAIL = _entry(B.tail_at)
_PARK = _entry(B.park_at)
_WAKE = _entry(B.wake_at)
_LEN_MASK = (1 << B.KIND_SHIFT) - 1
SPIN = 64
DEFAULT_SLOT = 512


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _create(capacity: int, slot_size: int, codec, name, watch: bool) -> Segment:
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError("capacity must be an int >= 1")
    if not isinstance(slot_size, int) or slot_size < 64 or slot_size > 1 << 30:
        raise ValueError("slot_size must be an int between 64 and 2**30 bytes")
    cap = _pow2(capacity)
    slot = (slot_size + 7) // 8 * 8
    codec_ = get_codec(codec)
    lay = L.broadcast_layout(cap, slot)
    params = [0] * 8
    params[L.PC_CAPACITY] = cap
    params[L.PC_SLOT] = slot
    params[L.PC_CODEC] = codec_.id
    params[L.PC_WATCH] = int(watch)
    params[L.PC_PARTICIPANTS] = lay["participants"]
    params[L.PC_TOKENS] = lay["tokens"]
    params[L.PC_SLOTS] = lay["slots"]
    name = check_name(name) if name is not None else new_name()
    return Segment.create(L.KIND_BROADCAST, lay["size"], name=name, family=name, params=params)


class _Port:
    """One handle's attachment: the segment, its participant entry, a descriptor."""

    def __init__(self, seg: Segment, roles: tuple, watch: bool | None):
        self.lent_forks: list = []      # (token, value, boot ticks) lent by before_fork, for close
        p = seg.params
        cap, slot = p[L.PC_CAPACITY], p[L.PC_SLOT]
        lay = L.broadcast_layout(cap, slot) if cap > 0 and slot > 0 else None
        if (lay is None or cap & (cap - 1) or slot < 64 or slot % 8 or lay["size"] > seg.size
                or p[L.PC_SLOTS] != lay["slots"] or p[L.PC_PARTICIPANTS] != lay["participants"]
                or p[L.PC_TOKENS] != lay["tokens"]):
            raise CorruptSegment(f"broadcast {seg.name!r}: inconsistent layout parameters")
        if watch is not None and bool(p[L.PC_WATCH]) != watch:
            what = "a watch" if p[L.PC_WATCH] else "a broadcast channel"
            raise WrongKind(f"{seg.name!r} is {what}: open it with "
                            f"shm.{'Watch' if p[L.PC_WATCH] else 'BroadcastReceiver'}.open")
        try:
            self.codec = get_codec(p[L.PC_CODEC])
        except ValueError:
            raise CorruptSegment(f"broadcast {seg.name!r}: unknown codec id {p[L.PC_CODEC]}") from None
        self.seg, self.name, self.cap, self.slot, self.roles = seg, seg.name, cap, slot, roles
        self.max_payload = slot - L.BS_DATA
        self.registry = Registry(seg, lay["participants"], lay["tokens"], (L.BC_TX_ROLES, L.BC_RX_ROLES),
                                 (L.BC_TX_TOKENS, L.BC_RX_TOKENS), (L.BC_WAITERS, L.BC_WAITERS2))
        self.d = B.descriptor(seg.addr, seg.size, cap, slot, lay["slots"])
        self.daddr = self.d.ctypes.data
        self.buf = np.zeros(slot, np.uint8)
        self.bufv = self.buf.data.cast("B")
        self.bufaddr = self.buf.ctypes.data     # numpy rebuilds .ctypes on every access (~1 us)
        self.closed = False
        self.ctrl = seg                 # for shm/_async.py
        self.me = -1
        self.waiting = 0
        self.wait_lock = threading.Lock()
        self._register()
        _PORTS.add(self)

    def _register(self) -> None:
        reg = self.registry
        self.me = reg.register(on_reap=self._recover)
        if self.seg.state & L.SEG_STATE_MASK not in (L.SEG_OPEN, L.SEG_CLOSING):
            reg.unregister(self.me)
            self.me = -1
            raise SegmentNotFound(f"{self.name!r} was closed by its last user and is being removed")
        for role in self.roles:
            reg.set_role(self.me, role)
        self.d[B.D_ME] = self.me

    def _recover(self, dead: int) -> None:
        """A dead participant's publisher lock is taken over and released."""
        if self.me >= 0 and _OWNER(self.daddr) == dead and _STEAL(self.daddr, dead) == 1:
            _UNLOCK(self.daddr)
            W.fetch_add(self.seg.w, L.BC_RECOVERED >> 3, 1)

    def check_peers(self) -> int:
        if self.closed or self.me < 0:
            return 0
        n = self.registry.sweep(on_reap=self._recover, skip=self.me)
        if n:
            W.fetch_add(self.seg.w, L.BC_REAPED >> 3, n)
            _WAKE(self.daddr)
        return n

    # -- waiting (the interface shm/_async.py and shm/_select.py use) ------
    def seq_offset(self, side: int) -> int:
        return L.BC_SEQ

    def _begin_wait(self, side: int) -> None:
        with self.wait_lock:
            self.waiting += 1
            if self.waiting == 1 and self.me >= 0:
                self.registry.set_waiting(self.me, 0)

    def _end_wait(self, side: int) -> None:
        with self.wait_lock:
            self.waiting -= 1
            if self.waiting == 0 and self.me >= 0 and not self.closed:
                self.registry.clear_waiting(self.me, 0)

    # -- publishing -----------------------------------------------------------
    def encode(self, obj):
        c = self.codec
        try:
            data = (c.fast_encode or c.encode)(obj)
        except Exception:
            data = c.encode(obj)        # raises the codec's EncodeError
        kind = c.kind
        if type(data) is not bytes:
            kind, parts = data
            data = b"".join(q.reshape(-1).view(np.uint8).tobytes() if isinstance(q, np.ndarray) else bytes(q)
                            for q in parts)
        if len(data) > self.max_payload:
            raise MessageTooLarge(f"a message of {len(data)} encoded bytes does not fit {self.name!r}, whose "
                                  f"slots hold {self.max_payload}: create it with slot_size={len(data) + 64} "
                                  "or more (or send a name or a SharedDict key instead)")
        return kind, data

    def publish(self, kind: int, data: bytes) -> int:
        self._lock()
        try:
            pos = _PUBLISH(self.daddr, id(data) + BYTES_OFF, len(data), kind)
        finally:
            _UNLOCK(self.daddr)
        if pos < 0:
            raise CorruptSegment(f"{self.name!r}: publishing failed (status {pos})")
        return pos

    def _lock(self) -> None:
        if self.closed:
            raise Closed(f"{self.name!r} was closed in this process")
        r = _LOCK(self.daddr, SPIN)
        if r == 1:
            return
        next_check = time.monotonic() + PEER_CHECK
        while True:
            if r == B.CLOSED:
                raise Closed(f"{self.name!r} was closed in this process")
            time.sleep(20e-6)
            r = _LOCK(self.daddr, 0)
            if r == 1:
                return
            if time.monotonic() >= next_check:
                owner = _OWNER(self.daddr)
                if owner == self.me or owner >= L.MAX_PARTICIPANTS or owner < -1:
                    # A lock word no holder explains (this handle holds no lock now): take it.
                    if _STEAL(self.daddr, owner) == 1:
                        return
                self.check_peers()      # a dead owner's lock is taken over and released
                next_check = time.monotonic() + PEER_CHECK

    # -- reading --------------------------------------------------------------
    def read(self, cur: int):
        """(status, value): status >= 0 is the read; EMPTY / LAGGED / CLOSED as in the kernel."""
        r = _READ(self.daddr, cur, self.bufaddr, self.slot)
        if r < 0:
            return r, None
        kind, n = r >> B.KIND_SHIFT, r & _LEN_MASK
        buf = self.bufv[:n]
        c = self.codec
        if kind == c.kind and c.fast_decode is not None:
            try:
                return r, c.fast_decode(buf)
            except Exception:
                pass
        return r, c.decode(kind, buf)

    def tail(self) -> int:
        return _TAIL(self.daddr)

    def park(self, cur: int, seconds: float) -> None:
        self._begin_wait(0)
        try:
            _PARK(self.daddr, cur, int(seconds * 1e9))
        finally:
            self._end_wait(0)

    def publishers(self) -> int:
        return len(self.registry.role_holders(L.ROLE_TX)) + self.registry.token_count(L.ROLE_TX)

    def subscribers(self) -> int:
        """Subscriber handles (and subscribers in transit): a popcount of the role and token words.

        Plain loads: a count for the caller, not a synchronisation (role_holders'
        per-bit loop cost ~10 us a send).
        """
        w = self.seg.w
        n = 0
        for k in range(L.BITMAP_WORDS):
            n += bin(int(w[(L.BC_RX_ROLES >> 3) + k]) & 0xFFFFFFFFFFFFFFFF).count("1")
        return n + bin(int(w[L.BC_RX_TOKENS >> 3]) & 0xFFFFFFFFFFFFFFFF).count("1")

    def lend(self, role):
        return self.registry.lend(role, L.TOKEN_PICKLE)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        _PORTS.discard(self)
        last = False
        reg = self.registry
        if self.me >= 0 and reg.mine(self.me):
            try:                        # reap the dead first: they must not keep the segment alive
                n = reg.sweep(on_reap=self._recover, skip=self.me)
                if n:
                    W.fetch_add(self.seg.w, L.BC_REAPED >> 3, n)
            except ShmError:
                pass
            for role in self.roles:
                reg.clear_role(self.me, role)
            reg.unregister(self.me)
            reg.retire_orphaned_forks(self.lent_forks)
            self.lent_forks = []
            last = reg.claim_last_out()
        if not last:
            _WAKE(self.daddr)           # subscribers re-check: we may have been the last publisher
        self.me = -1
        self.d[B.D_SIZE] = 0
        if last:
            self.seg.unlink()
        self.seg.close()

    # fork: the parent lends a token per role so that, between the fork and
    # the child's registration, the child's inherited roles already count
    # (a parent that closes its publisher right after forking one must not
    # disconnect the subscribers). The child registers, then retires them.
    def before_fork(self) -> None:
        self.fork_tokens = []
        if self.me >= 0 and not self.closed:
            for role in self.roles:
                tok = self.registry.lend_fork(role, self.lent_forks)
                if tok is not None:
                    self.fork_tokens.append(tok)

    def after_fork_parent(self) -> None:
        self.fork_tokens = []           # the child retires them (or they expire, or we do at close)

    def after_fork_child(self) -> None:
        self.lent_forks = []            # the parent's to retire
        self.wait_lock = threading.Lock()
        self.waiting = 0
        self.d[B.D_ME] = -1
        self.me = -1
        if not self.closed:
            try:
                self._register()
            except ShmError:
                self.closed = True
        for t, v in getattr(self, "fork_tokens", ()):
            self.registry.retire(t, v)
        self.fork_tokens = []


_PORTS: "weakref.WeakSet[_Port]" = weakref.WeakSet()


def _attach(name: str, roles: tuple, watch: bool | None) -> _Port:
    seg = Segment.attach(check_name(name), kind=L.KIND_BROADCAST, what="broadcast channel")
    try:
        return _Port(seg, roles, watch)
    except BaseException:
        seg.close()
        raise


def _retire(port: _Port, token) -> None:
    if token is not None:
        port.registry.retire(*token)


# --------------------------------------------------------------------------
# broadcast

def broadcast(capacity: int, *, name: str | None = None, codec: str = "msgpack",
              slot_size: int = DEFAULT_SLOT) -> tuple["BroadcastSender", "BroadcastReceiver"]:
    """A broadcast channel keeping the last ``capacity`` messages: ``(sender, first subscriber)``."""
    seg = _create(capacity, slot_size, codec, name, watch=False)
    try:
        tx = BroadcastSender._of(_Port(seg, (L.ROLE_TX,), False))
    except BaseException:
        seg.unlink()
        seg.close()
        raise
    return tx, tx.subscribe()


class _Handle:
    def __init__(self, *a, **k):
        raise TypeError(f"use shm.broadcast()/shm.watch() or {type(self).__name__}.open(name)")

    def _p(self) -> _Port:
        p = self._port
        if p.closed:
            raise Closed(f"this {type(self).__name__} was closed")
        return p

    @property
    def name(self) -> str:
        return self._port.name

    @property
    def capacity(self) -> int:
        return self._port.cap

    def close(self) -> None:
        """Close this handle (idempotent); the last handle everywhere unlinks the segment."""
        self._port.close()

    @property
    def closed(self) -> bool:
        return self._port.closed

    def __enter__(self):
        self._p()
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        state = "closed" if self._port.closed else f"capacity={self._port.cap}"
        return f"<shm.{type(self).__name__} {self._port.name!r} {state}>"


class BroadcastSender(_Handle):
    """The publishing end of a broadcast channel (any number of them, in any processes)."""

    @classmethod
    def _of(cls, port):
        self = object.__new__(cls)
        self._port = port
        return self

    @classmethod
    def open(cls, name: str) -> "BroadcastSender":
        """Attach as a publisher to the broadcast channel ``name``."""
        return cls._of(_attach(name, (L.ROLE_TX,), False))

    def send(self, obj) -> int:
        """Publish ``obj`` to every subscriber; returns how many subscribers there are (processes' handles).

        Never blocks on subscribers: the oldest message is overwritten when
        the ring is full, and subscribers that had not read it get ``Lagged``.
        """
        p = self._p()
        kind, data = p.encode(obj)
        p.publish(kind, data)
        return p.subscribers()

    def subscribe(self) -> "BroadcastReceiver":
        """A new subscriber in this process, receiving what is published from now on."""
        return BroadcastReceiver.open(self._p().name)

    def __reduce__(self):
        return _rebuild_tx, (self._p().name, self._port.lend(L.ROLE_TX))


def _rebuild_tx(name, token):
    tx = BroadcastSender.open(name)
    _retire(tx._port, token)
    return tx


class BroadcastReceiver(_Handle):
    """One subscriber: reads every message published after it subscribed, in order."""

    @classmethod
    def open(cls, name: str, *, _cursor: int | None = None) -> "BroadcastReceiver":
        """Subscribe to the broadcast channel ``name``, from the next message published."""
        self = object.__new__(cls)
        self._port = _attach(name, (L.ROLE_RX,), False)
        self._cur = self._port.tail() if _cursor is None else _cursor
        return self

    def try_recv(self):
        """The next message if there is one, else ``Empty``; ``Lagged`` if some were lost (then go on)."""
        p = self._p()
        r, v = p.read(self._cur)
        if r >= 0:
            self._cur += 1
            return v
        return self._not_read(p, r)

    def _not_read(self, p: _Port, r: int):
        if r == B.LAGGED:
            tail = p.tail()
            new = max(tail - p.cap, self._cur + 1)
            skipped = new - self._cur
            self._cur = new
            raise Lagged(skipped)
        if r == B.EMPTY:
            if p.publishers() == 0:
                p.check_peers()
                if p.publishers() == 0 and p.tail() <= self._cur:
                    raise Disconnected(f"every publisher of {p.name!r} is gone and every message was read")
            raise Empty(f"no new message on {p.name!r}")
        if r == B.CLOSED:
            raise Closed("this BroadcastReceiver was closed")
        raise CorruptSegment(f"broadcast {p.name!r}: read failed (status {r})")

    def _attempt(self):
        try:
            return (self.try_recv(),)
        except Empty:
            return None

    def recv(self, timeout: float | None = None):
        """The next message, waiting up to ``timeout`` seconds (``Empty`` after it).

        Raises ``Lagged`` (``.skipped``) when messages were overwritten before
        this subscriber read them (the next call continues from the oldest
        kept), ``Disconnected`` once every publisher is gone and all is read.
        """
        p = self._p()
        deadline = _deadline(timeout)
        r = _wait.block(lambda: self._attempt() or _wait.WOULD_BLOCK, lambda s: p.park(self._cur, s),
                        deadline, p.check_peers)
        if r is _wait.TIMED_OUT:
            raise Empty(f"no new message on {p.name!r} before the timeout")
        return r[0]

    async def recv_async(self, timeout: float | None = None):
        """``recv`` for asyncio (cancelled while waiting, it has read nothing)."""
        p = self._p()
        r = await _async.wait_ready([(p, R.SIDE_RX)], self._attempt, _deadline(timeout))
        if r is None:
            raise Empty(f"no new message on {p.name!r} before the timeout")
        return r[0]

    def __iter__(self):
        """Messages until every publisher is gone (``Lagged`` propagates: catch it to go on)."""
        while True:
            try:
                yield self.recv()
            except Disconnected:
                return

    def __aiter__(self):
        return _async.messages(self.recv_async)


    def __len__(self) -> int:
        """Messages published that this subscriber has not read (at most the capacity)."""
        p = self._p()
        return max(0, min(p.tail() - self._cur, p.cap))

    def __reduce__(self):
        # The new process's subscriber continues from this one's position.
        return _rebuild_rx, (self._p().name, self._port.lend(L.ROLE_RX), self._cur)


def _rebuild_rx(name, token, cur):
    rx = BroadcastReceiver.open(name, _cursor=cur)
    _retire(rx._port, token)
    return rx


# --------------------------------------------------------------------------
# watch

def watch(initial, *, name: str | None = None, codec: str = "msgpack", slot_size: int = DEFAULT_SLOT) -> "Watch":
    """A watched value: ``get``, ``set``, ``changed``, ``wait_for`` from any process."""
    seg = _create(2, slot_size, codec, name, watch=True)
    try:
        w = Watch._of(_Port(seg, (L.ROLE_TX, L.ROLE_RX), True))
        w.set(initial)
    except BaseException:
        seg.unlink()
        seg.close()
        raise
    return w


class Watch(_Handle):
    """One latest value with a version, shared by processes (tokio's ``watch``).

    ``version`` counts the values set so far; ``changed()`` waits for one
    newer than this handle last saw through ``get``/``changed``/``wait_for``.
    """

    @classmethod
    def _of(cls, port):
        self = object.__new__(cls)
        self._port = port
        self._seen = 0
        return self

    @classmethod
    def open(cls, name: str) -> "Watch":
        return cls._of(_attach(name, (L.ROLE_TX, L.ROLE_RX), True))

    @property
    def version(self) -> int:
        return self._p().tail()

    def set(self, value) -> None:
        """Make ``value`` the current value (and wake whoever waits in ``changed``)."""
        p = self._p()
        kind, data = p.encode(value)
        p.publish(kind, data)

    def get(self):
        """The current value (and mark it seen)."""
        p = self._p()
        while True:
            tail = p.tail()
            if tail <= 0:
                raise CorruptSegment(f"watch {p.name!r} holds no value")
            r, v = p.read(tail - 1)
            if r >= 0:
                self._seen = tail
                return v
            if r != B.LAGGED:           # LAGGED: a set overwrote it while we read: read the newer one
                raise CorruptSegment(f"watch {p.name!r}: read failed (status {r})")

    def _newer(self):
        return True if self._p().tail() > self._seen else None

    def changed(self, timeout: float | None = None) -> bool:
        """Wait until a value newer than the last one seen is set: True, or False after ``timeout``."""
        p = self._p()
        r = _wait.block(lambda: self._newer() or _wait.WOULD_BLOCK, lambda s: p.park(self._seen, s),
                        _deadline(timeout), p.check_peers)
        return r is not _wait.TIMED_OUT

    async def changed_async(self, timeout: float | None = None) -> bool:
        p = self._p()
        return await _async.wait_ready([(p, R.SIDE_RX)], self._newer, _deadline(timeout)) is not None

    def wait_for(self, predicate, timeout: float | None = None):
        """Wait until ``predicate(value)`` is true and return that value (``TimeoutError`` after ``timeout``)."""
        deadline = _deadline(timeout)
        while True:
            v = self.get()
            if predicate(v):
                return v
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0 or not self.changed(left):
                raise TimeoutError(f"no value of watch {self.name!r} satisfied the predicate in time")

    async def wait_for_async(self, predicate, timeout: float | None = None):
        deadline = _deadline(timeout)
        while True:
            v = self.get()
            if predicate(v):
                return v
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0 or not await self.changed_async(left):
                raise TimeoutError(f"no value of watch {self.name!r} satisfied the predicate in time")

    def __reduce__(self):
        return _rebuild_watch, (self._p().name, self._port.lend(L.ROLE_TX))


def _rebuild_watch(name, token):
    w = Watch.open(name)
    _retire(w._port, token)
    return w


# --------------------------------------------------------------------------
# oneshot: a bounded(1) channel used once.

def oneshot(*, codec: str = "msgpack") -> tuple["OneshotSender", "OneshotReceiver"]:
    """One value, sent once and received once: ``(sender, receiver)``.

    If the sender is closed (or its process dies) without sending, the
    receiver gets ``Disconnected``.
    """
    tx, rx = bounded(1, codec=codec)
    return OneshotSender(tx), OneshotReceiver(rx)


class OneshotSender:
    def __init__(self, tx):
        self._tx = tx

    def send(self, value) -> None:
        """Send the value (once: a second send raises ``Closed``)."""
        if self._tx.closed:
            raise Closed("this oneshot was already used (or closed)")
        try:
            self._tx.send(value)
        finally:
            self._tx.close()

    def close(self) -> None:
        self._tx.close()

    def __reduce__(self):
        return OneshotSender, (self._tx,)


class OneshotReceiver:
    def __init__(self, rx):
        self._rx = rx

    def recv(self, timeout: float | None = None):
        """The value, waiting up to ``timeout`` (``Empty`` after it; ``Disconnected`` if none will come)."""
        v = self._rx.recv(timeout)
        self._rx.close()
        return v

    def try_recv(self):
        v = self._rx.try_recv()
        self._rx.close()
        return v

    async def recv_async(self, timeout: float | None = None):
        v = await self._rx.recv_async(timeout)
        self._rx.close()
        return v

    def close(self) -> None:
        self._rx.close()

    def __reduce__(self):
        return OneshotReceiver, (self._rx,)


# --------------------------------------------------------------------------
# Process lifetime.

_chan.track_handles(lambda: _PORTS, before_fork="before_fork", after_fork_parent="after_fork_parent",
                    after_fork_child="after_fork_child")
