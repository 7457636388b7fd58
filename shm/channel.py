"""Channels between processes: bounded, unbounded and rendezvous.

What flume and crossbeam-channel give Rust threads, for Python processes:
multi-producer multi-consumer channels whose messages live in POSIX shared
memory, moved by lock-free ring buffers (``kernels/ring.py``) with no pipe,
no feeder thread and no manager process in the way.

>>> import shm
>>> tx, rx = shm.bounded(16)
>>> tx.send({"job": 1})
>>> rx.recv()
{'job': 1}
>>> tx.close(); rx.close()

Flavors (all behind the same ``Sender``/``Receiver``):

* ``bounded(n)``: at most ``n`` queued messages; ``send`` blocks when full.
* ``unbounded()``: ``send`` never blocks; the queue grows in generations
  of shared memory (like crossbeam's list flavour).
* ``rendezvous()`` (``bounded(0)``): ``send`` returns once a receiver has
  taken the message.

Handles are process-safe and thread-safe, picklable (pass them to
``multiprocessing.Process``, ``Pool`` or ``ProcessPoolExecutor`` under fork,
spawn or forkserver), and can be re-opened by name from an unrelated process
with ``Sender.open(name)``/``Receiver.open(name)``. Closing the last handle
in every process unlinks the channel's shared memory.

Disconnection: when every Sender is closed (or its process died, even by
SIGKILL), receivers get what is still queued and then ``Disconnected``;
when every Receiver is gone, ``send`` raises ``Disconnected`` carrying the
unsent message. A dead peer is noticed within about a second.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from kernels import layout as L
from kernels import ring as R

from . import _async, _chan
from ._chan import MessageView, _Chan
from ._wait import deadline_of
from .errors import Closed, Disconnected, Empty, Full

__all__ = ["bounded", "unbounded", "rendezvous", "Sender", "Receiver", "ChannelStats", "MessageView"]

_EMPTY = R.EMPTY
_NOTHING = object()
_FLAVOR_NAMES = {L.FLAVOR_BOUNDED: "bounded", L.FLAVOR_UNBOUNDED: "unbounded", L.FLAVOR_RENDEZVOUS: "rendezvous"}


def bounded(capacity: int, *, name: str | None = None, codec: str = "msgpack",
            slot_size: int | None = None, reserve: int = 0) -> tuple["Sender", "Receiver"]:
    """A channel holding at most ``capacity`` messages; returns ``(Sender, Receiver)``.

    ``capacity=0`` makes a rendezvous channel. ``name`` makes it openable by
    that name from any process (default: a fresh unguessable name, still
    reachable through the handles, which pickle by name). ``codec`` is
    ``"msgpack"`` (default), ``"pickle"``, ``"bytes"`` or ``"numpy"``.
    ``slot_size`` is the largest message in bytes carried inline in a slot
    (default 480); larger messages travel through blob segments, taken from
    a pool of ``capacity`` (the one freed last first, so it is still in cache).

    ``reserve``: make every pool entry's blob now, for encoded messages up to this
    many bytes (rounded up to a power of two), and keep them for the
    channel's life: the first large messages then pay no fresh shared
    memory (64 MiB: ~40 ms), and a ``/dev/shm`` too small for
    ``capacity * reserve`` raises ``OutOfSharedMemory`` here, not
    mid-stream. Handles opened elsewhere map these blobs when they attach.
    Larger messages still work (the blob they go through grows).
    """
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
    if capacity < 0:
        raise ValueError("capacity must be >= 0 (0 makes a rendezvous channel)")
    if capacity == 0:
        return rendezvous(name=name, codec=codec, slot_size=slot_size, reserve=reserve)
    if capacity > 1 << 30:
        raise ValueError("capacity must be at most 2**30 (use unbounded() for an unlimited queue)")
    return _pair(_Chan.create(L.FLAVOR_BOUNDED, capacity, name=name, codec=codec, slot_size=slot_size,
                              reserve=reserve))


def unbounded(*, name: str | None = None, codec: str = "msgpack",
              slot_size: int | None = None) -> tuple["Sender", "Receiver"]:
    """A channel whose ``send`` never blocks: it grows in shared-memory generations."""
    return _pair(_Chan.create(L.FLAVOR_UNBOUNDED, 0, name=name, codec=codec, slot_size=slot_size))


def rendezvous(*, name: str | None = None, codec: str = "msgpack",
               slot_size: int | None = None, reserve: int = 0) -> tuple["Sender", "Receiver"]:
    """A channel of capacity 0: ``send`` completes only when a receiver takes the message.

    ``reserve`` as for ``bounded``.
    """
    return _pair(_Chan.create(L.FLAVOR_RENDEZVOUS, 0, name=name, codec=codec, slot_size=slot_size,
                              reserve=reserve))


def _pair(chan: _Chan):
    try:
        tx = Sender._attach(chan)
        rx = Receiver._attach(chan)
    except BaseException:
        chan.unlink()
        raise
    return tx, rx


@dataclass(frozen=True)
class ChannelStats:
    """A snapshot of a channel (racy by nature: other processes keep going)."""

    name: str
    flavor: str
    codec: str
    capacity: int | None
    depth: int                 # messages queued now
    sent: int                  # messages ever sent (claimed by senders)
    received: int              # messages ever received (claimed by receivers)
    senders: int               # processes holding a Sender (plus handles in transit)
    receivers: int             # processes holding a Receiver (plus handles in transit)
    waiting_senders: int       # processes parked in send
    waiting_receivers: int     # processes parked in recv
    recovered: int             # slots recovered from producers that died mid-send
    lost: int                  # messages lost with consumers that died mid-receive
    reaped: int                # dead participants cleaned up
    blob_bytes: int            # shared memory held by large-message blobs
    blob_segments: int


class _Handle:
    """Common to Sender and Receiver.

    The hot methods (``send``/``try_send``, ``recv``/``try_recv``) are
    closures made when the handle is attached, stored in the instance so
    they shadow the class's methods: the constants they need are bound
    once instead of looked up on every call. Closing the handle removes
    them, and the class's methods then raise ``Closed``.
    """

    _role = -1
    _FAST = ()

    def __init__(self, *a, **k):
        raise TypeError(f"use shm.bounded()/unbounded()/rendezvous() or {type(self).__name__}.open(name)")

    @classmethod
    def _attach(cls, chan: _Chan):
        self = object.__new__(cls)
        self._c = None
        chan.acquire_role(cls._role)
        self._c = chan
        self.__dict__.update(self._fast(chan))
        _chan._HANDLES.add(self)
        return self

    def _fast(self, chan) -> dict:
        return {}

    @classmethod
    def open(cls, name: str):
        """Attach to the channel ``name`` (made by any process of this user).

        Raises ``SegmentNotFound`` if there is none, ``WrongKind`` if ``name``
        is another kind of structure, ``IncompatibleSegment`` for another
        layout version.
        """
        chan = _Chan.open(name)
        try:
            return cls._attach(chan)
        except BaseException:
            if chan.counts[0] == 0 and chan.counts[1] == 0:
                chan._detach()
            raise

    def _chan(self) -> _Chan:
        c = getattr(self, "_c", None)
        if c is None:
            raise Closed(f"this {type(self).__name__} was closed")
        return c

    # -- lifecycle --------------------------------------------------------
    def close(self) -> None:
        """Close this handle (idempotent). Other handles and processes go on.

        The last handle of a role everywhere disconnects the other side; the
        last handle of the channel everywhere unlinks its shared memory.
        """
        c = getattr(self, "_c", None)
        if c is None:
            return
        self._c = None
        for k in self._FAST:
            self.__dict__.pop(k, None)
        _chan._HANDLES.discard(self)
        c.release_role(self._role)

    @property
    def closed(self) -> bool:
        return getattr(self, "_c", None) is None

    def __enter__(self):
        self._chan()
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def clone(self):
        """Another handle of the same kind on the same channel (like ``os.dup``)."""
        return type(self).open(self._chan().name)

    __copy__ = clone

    def __deepcopy__(self, memo):
        return self.clone()

    def __reduce__(self):
        c = self._chan()
        token = None
        if c.me >= 0:
            token = c.registry.lend(self._role, L.TOKEN_PICKLE)
        return _rebuild, (type(self), c.name, token)

    # -- introspection ----------------------------------------------------
    @property
    def name(self) -> str:
        """The channel's name: ``Sender.open(name)`` attaches to it."""
        return self._chan().name

    @property
    def capacity(self) -> int | None:
        """Maximum queued messages: an int (0 for rendezvous), None if unbounded."""
        c = self._chan()
        return None if c.flavor == L.FLAVOR_UNBOUNDED else c.capacity

    @property
    def codec(self) -> str:
        return self._chan().codec.name

    def __len__(self) -> int:
        """Messages queued now (approximate: other processes keep going)."""
        return self._chan().depth()

    def is_empty(self) -> bool:
        return len(self) == 0

    def is_full(self) -> bool:
        c = self._chan()
        return c.flavor == L.FLAVOR_BOUNDED and c.depth() >= c.capacity or c.flavor == L.FLAVOR_RENDEZVOUS

    def stats(self) -> ChannelStats:
        c = self._chan()
        sent, received = c.positions()
        return ChannelStats(
            name=c.name, flavor=_FLAVOR_NAMES[c.flavor], codec=c.codec.name,
            capacity=None if c.flavor == L.FLAVOR_UNBOUNDED else c.capacity,
            depth=c.depth(), sent=sent, received=received,
            senders=c.holders(L.ROLE_TX), receivers=c.holders(L.ROLE_RX),
            waiting_senders=c.registry.waiting_count(R.SIDE_TX),
            waiting_receivers=c.registry.waiting_count(R.SIDE_RX),
            recovered=c.counter(L.CH_TOMBSTONES), lost=c.counter(L.CH_DROPPED),
            reaped=c.counter(L.CH_REAPED), blob_bytes=c.counter(L.CH_BLOB_BYTES),
            blob_segments=c.counter(L.CH_BLOB_SEGMENTS))

    def kernel(self):
        """The ring descriptor, for the non-blocking kernels in your own ``@njit`` code.

        ``kernels.ring.try_push(d, payload, n)`` and ``try_pop(d, out)`` take
        it; see ``examples/njit_pipeline.py``. Bounded channels only, and
        payloads must fit a slot inline (``slot_size``). Recovery of dead
        peers runs in the Python layer (any blocked call, or ``stats()``).
        """
        c = self._chan()
        if c.flavor != L.FLAVOR_BOUNDED:
            raise TypeError("kernel(): only bounded channels can be driven from @njit code")
        c.confirm(self._role)
        ring = c.rings[0]
        return ring.dtx if self._role == L.ROLE_TX else ring.drx

    def __repr__(self):
        c = getattr(self, "_c", None)
        if c is None:
            return f"<shm.{type(self).__name__} closed>"
        cap = "" if c.flavor != L.FLAVOR_BOUNDED else f"({c.capacity})"
        try:
            depth = c.depth()
            tail = f" depth={depth} senders={c.holders(L.ROLE_TX)} receivers={c.holders(L.ROLE_RX)}"
        except Exception:
            tail = ""
        return f"<shm.{type(self).__name__} {c.name!r} {_FLAVOR_NAMES[c.flavor]}{cap} codec={c.codec.name}{tail}>"


def _rebuild(cls, name, token):
    h = cls.open(name)
    if token is not None:
        h._c.registry.retire(*token)
    return h


class Sender(_Handle):
    """The sending end of a channel."""

    _role = L.ROLE_TX
    _FAST = ("send", "try_send")

    def _fast(self, c):
        return {"send": _make_send(c, True), "try_send": _make_send(c, False)}

    def send(self, obj, timeout: float | None = None) -> None:
        """Send ``obj``, waiting up to ``timeout`` seconds for room (None: forever).

        Raises ``Full`` (with ``.message``) on timeout, ``Disconnected`` (with
        ``.message``) if no receiver is left, ``EncodeError`` (a TypeError) if
        the codec cannot encode ``obj``; in each case nothing was sent.
        """
        raise Closed("this Sender was closed")

    def try_send(self, obj) -> None:
        """Send ``obj`` if there is room now, else raise ``Full`` (with ``.message``).

        On a rendezvous channel, succeeds only if a receiver is waiting.
        """
        raise Closed("this Sender was closed")

    def send_many(self, items, timeout: float | None = None) -> None:
        """Send every item of ``items`` in order, batching the kernel calls.

        ``timeout`` bounds the whole call. On ``Full``/``Disconnected`` the
        exception's ``.message`` is the list of items not sent.
        """
        c = self._chan()
        c.send_many(items, _deadline(timeout))

    async def send_async(self, obj, timeout: float | None = None) -> None:
        """``send`` for asyncio: awaits room without blocking the event loop.

        Same errors as ``send``. Cancelled while waiting, it has sent nothing.
        """
        c = self._chan()
        deadline = _deadline(timeout)
        try_send = self.try_send

        def attempt():
            try:
                try_send(obj)
                return True
            except Full:
                return None

        if await _async.wait_ready([(c, R.SIDE_TX)], attempt, deadline) is None:
            raise Full(f"no room on channel {c.name!r} before the timeout", message=obj)

    async def send_many_async(self, items, timeout: float | None = None) -> None:
        """``send_many`` for asyncio: each item awaits room in turn; ``timeout`` bounds the whole call.

        On ``Full``/``Disconnected`` the exception's ``.message`` is the list of items not sent.
        """
        await _send_each_async(self.send_async, items, timeout)

    def is_disconnected(self) -> bool:
        """True when no receiver is left (this also reaps receivers that died)."""
        c = self._chan()
        c._maybe_check_peers()
        return not c.registry.has_role(L.ROLE_RX)


class Receiver(_Handle):
    """The receiving end of a channel. Iterating yields messages until disconnected."""

    _role = L.ROLE_RX
    _FAST = ("recv", "try_recv", "_poll")

    def _fast(self, c):
        return {"recv": _make_recv(c, True), "try_recv": _make_recv(c, False), "_poll": _make_poll(c)}

    def _poll(self, nothing):
        """``try_recv`` that returns ``nothing`` instead of raising Empty (async and select retry loops)."""
        raise Closed("this Receiver was closed")

    def recv(self, timeout: float | None = None):
        """Receive the next message, waiting up to ``timeout`` seconds (None: forever).

        Raises ``Empty`` on timeout and ``Disconnected`` once every sender is
        gone and the channel is drained.
        """
        raise Closed("this Receiver was closed")

    def try_recv(self):
        """Receive a message if one is queued now, else raise ``Empty``."""
        raise Closed("this Receiver was closed")

    def recv_view(self, timeout: float | None = None) -> MessageView:
        """Receive the next message without copying it out of shared memory.

        For large raw bytes (``codec="bytes"``) and arrays (``codec="numpy"``):
        the returned ``MessageView``'s ``value`` is a read-only numpy array
        over the message in place, so a 64 MiB array costs no copy on this
        side. The message keeps its slot in the channel until the view is
        released (``release()``, a ``with`` block, or garbage collection of
        the view and its arrays). Other messages come decoded, as from
        ``recv``. Same timeout and errors as ``recv``.
        """
        c = self._chan()
        return c.recv(c.rx0, None, _deadline(timeout), view=True)

    def recv_many(self, max_items: int, timeout: float | None = None) -> list:
        """Wait up to ``timeout`` for at least one message, then return up to ``max_items`` queued ones."""
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        return self._chan().recv_many(max_items, _deadline(timeout))

    def drain(self) -> list:
        """Every message queued right now, without waiting (possibly ``[]``)."""
        c = self._chan()
        out = []
        while True:
            try:
                out.extend(c.recv_many(_chan.BATCH, None, blocking=False))
            except (Empty, Disconnected):
                return out

    def __iter__(self):
        recv = self.recv
        while True:
            try:
                yield recv()
            except Disconnected:
                return

    async def recv_async(self, timeout: float | None = None):
        """``recv`` for asyncio: awaits a message without blocking the event loop.

        Same errors as ``recv``. Cancelled while waiting (``asyncio.wait_for``,
        ``asyncio.timeout``, ``task.cancel()``), it has taken no message.
        """
        poll = self._poll
        if timeout is None or timeout >= 0:     # (NaN and negatives go to _deadline's ValueError)
            v = poll(_NOTHING)                  # the fast path: a message is there
            if v is not _NOTHING:
                return v
        c = self._chan()
        deadline = _deadline(timeout)

        def attempt():
            v = poll(_NOTHING)
            return None if v is _NOTHING else (v,)

        r = await _async.wait_ready([(c, R.SIDE_RX)], attempt, deadline)
        if r is None:
            raise Empty(f"nothing arrived on channel {c.name!r} before the timeout")
        return r[0]

    async def recv_many_async(self, max_items: int, timeout: float | None = None) -> list:
        """``recv_many`` for asyncio: awaits at least one message, then takes up to ``max_items`` queued."""
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        c = self._chan()

        def attempt():
            try:
                return c.recv_many(max_items, None, blocking=False)
            except Empty:
                return None

        r = await _async.wait_ready([(c, R.SIDE_RX)], attempt, _deadline(timeout))
        if r is None:
            raise Empty(f"nothing arrived on channel {c.name!r} before the timeout")
        return r

    def __aiter__(self):
        """``async for msg in rx``: messages until every sender is gone and the channel is drained."""
        return _async.messages(self.recv_async)


    def is_disconnected(self) -> bool:
        """True when no sender is left (queued messages may remain)."""
        c = self._chan()
        c._maybe_check_peers()
        return not c.registry.has_role(L.ROLE_TX)


async def _send_each_async(send_async, items, timeout) -> None:
    """``await send_async(item, left)`` for each item within one ``timeout``;
    on Full/Disconnected the exception's ``.message`` is the list not sent."""
    deadline = _deadline(timeout)
    items = list(items)
    for k, obj in enumerate(items):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await send_async(obj, left)
        except (Full, Disconnected) as e:
            e.message = items[k:]
            raise


def _deadline(timeout):
    """``deadline_of``, refusing what ``send``/``recv`` refuse: a negative or NaN
    timeout (ValueError) and a str or bytes (TypeError, which float() would take)."""
    if timeout is not None and not timeout >= 0:
        raise ValueError("timeout must be a non-negative number of seconds (or None)")
    return deadline_of(timeout)


# --------------------------------------------------------------------------
# The fast paths. Everything they need is bound in the closure; the common
# case is one call of a builtin bound to the ring's descriptor
# (``c.push_b``/``c.pop_b``, kernels/pycall.py: the kernel plus ~30 ns of
# call) and the codec. The builtins are re-read from ``c`` at every call:
# an unbounded channel replaces them when it moves to a new ring.

def _make_send(c: _Chan, blocking: bool):
    raw, fenc, enc, slow, finish, CLAIMED = c.raw, c.fast_encode, c.encode, c.send, c.finish_claimed, R.CLAIMED

    if blocking:
        def send(obj, timeout=None):
            if timeout is not None and not timeout >= 0:     # negative or NaN, even when it would not wait
                raise ValueError("timeout must be a non-negative number of seconds (or None)")
            if raw and type(obj) is bytes:
                data = obj
            else:
                try:
                    data = fenc(obj)
                except Exception:
                    data = enc(obj)             # raises the codec's EncodeError
            # Pushed inline, retried briefly while full; anything else (too
            # big, not bytes, full for longer, closed...) takes the general path.
            # A blob message too (bounded channels): claimed, written, published
            # if the blob it takes is mapped here, else claimed for finish().
            r = c.push_b_spin(data)
            if r == 0:
                return
            if r <= CLAIMED:
                return finish(data, r)
            slow(obj, data, deadline_of(timeout))
        send.__doc__ = Sender.send.__doc__
        return send

    def try_send(obj):
        if raw and type(obj) is bytes:
            data = obj
        else:
            try:
                data = fenc(obj)
            except Exception:
                data = enc(obj)
        r = c.push_b(data)
        if r == 0:
            return
        if r <= CLAIMED:
            return finish(data, r)
        slow(obj, data, None, blocking=False)
    try_send.__doc__ = Sender.try_send.__doc__
    return try_send


def _make_poll(c: _Chan):
    EMPTY, AMASK, LSHIFT = _EMPTY, R.AREA_MASK, R.LEN_SHIFT
    scratch, area, slow, rx0, kind, dec = c.scratch, c.area, c.recv, c.rx0, c.kind, c.decode

    def poll(nothing):
        r = c.pop_b(kind)
        if type(r) is bytes:
            return dec(kind, r)
        if r >= 0:
            off = ((r >> 8) & AMASK) * area
            return dec(r & 0xFF, scratch[off:off + (r >> LSHIFT)])
        if r == EMPTY:              # no exception to make and catch: ~0.2 us instead of ~1.4
            return nothing
        try:
            return slow(rx0, r, None, blocking=False)
        except Empty:
            return nothing
    return poll


def _make_recv(c: _Chan, blocking: bool):
    scratch, area, kind, fdec = c.scratch, c.area, c.kind, c.fast_decode
    cdec, dec, slow, rx0 = c.codec.decode, c.decode, c.recv, c.rx0
    AMASK, LSHIFT = R.AREA_MASK, R.LEN_SHIFT

    if not blocking:
        def try_recv():
            r = c.pop_b(kind)
            if type(r) is bytes:
                return dec(kind, r)
            if r >= 0:
                off = ((r >> 8) & AMASK) * area
                return dec(r & 0xFF, scratch[off:off + (r >> LSHIFT)])
            return slow(rx0, r, None, blocking=False)
        try_recv.__doc__ = Receiver.try_recv.__doc__
        return try_recv

    # One closure per codec, so the common case takes no branch it does not need.
    # ``pop_b_spin`` returns the message as bytes when it is inline and of
    # this codec's kind; otherwise pop_at's int (another kind in a receive
    # area, a blob, or a status for the general path).
    if c.raw:
        def recv(timeout=None):
            if timeout is not None and not timeout >= 0:     # negative or NaN, even when it would not wait
                raise ValueError("timeout must be a non-negative number of seconds (or None)")
            r = c.pop_b_spin(kind)
            if type(r) is bytes:
                return r
            if r >= 0:
                off = ((r >> 8) & AMASK) * area
                return cdec(r & 0xFF, scratch[off:off + (r >> LSHIFT)])
            return slow(rx0, r, deadline_of(timeout))
    else:
        def recv(timeout=None):
            if timeout is not None and not timeout >= 0:     # negative or NaN, even when it would not wait
                raise ValueError("timeout must be a non-negative number of seconds (or None)")
            r = c.pop_b_spin(kind)
            if type(r) is bytes:
                try:
                    return fdec(r)
                except Exception:
                    return cdec(kind, r)        # raises the codec's DecodeError
            if r >= 0:
                off = ((r >> 8) & AMASK) * area
                return cdec(r & 0xFF, scratch[off:off + (r >> LSHIFT)])
            return slow(rx0, r, deadline_of(timeout))
    recv.__doc__ = Receiver.recv.__doc__
    return recv
