"""Channels on Redis: ``ns.bounded``, ``ns.unbounded``, ``Sender``, ``Receiver``, ``Queue``.

The local channels' API and errors over a Redis Stream with one consumer
group, for processes on several machines (``shm.connect(url)``).

Design notes
------------

**One stream, one group, competing consumers.** A channel ``N`` is the
stream ``shm:{N}:q`` and its consumer group ``g``, made with the channel.
Every Receiver is a consumer of the group (named by its lease member), so
each message is delivered to one receiver (``XREADGROUP ... >``), as with
the local ring. A message is one stream entry with one field: the codec's
*kind* byte as the field name, the encoded message as its value (the same
codecs and kinds as shared memory, so a pickle message is refused on a
msgpack channel, as locally).

**Acknowledged after decoding.** A receiver decodes what it read, then one
script acknowledges and deletes the entries (``XACK`` + ``XDEL``) *if they
are still its own*; only then does ``recv`` return them. A receiver that
dies between the read and the acknowledgement leaves the entries pending
in the group; another receiver claims them (``XCLAIM``) once the dead one's
lease has expired, or once an entry has been pending ``claim_after``
seconds (30 by default: a receiver stalled that long). If a stalled receiver
wakes up after its entries were claimed, the ownership check in its
acknowledgement drops them, so a message is never returned twice. A
receiver that lost the connection in the middle of a read reads its own
pending entries again (``XREADGROUP ... 0``) before new ones.

**Capacity.** ``bounded(n)``: the send script refuses to add past ``n``
entries in the stream, and an entry stays in the stream until a receiver
acknowledged it, so ``n`` counts messages queued *or being decoded*.
``send`` then waits by polling (from 0.5 ms, doubling to 20 ms): Redis has
no way to block a client until a stream gets shorter. ``len()`` is
``XLEN``. Rendezvous channels (capacity 0) are refused: a send that returns
only once a receiver has taken the message would need a second round trip
per message and a way to withdraw a message nobody took in time.

**Disconnection** (see ``shm/_redis.py`` for leases): a send raises
``Disconnected`` when no receiver holds a live lease; a receive raises it
when no sender holds one and the stream is empty (nothing queued, nothing
pending with any receiver). A blocked receive waits in slices of 0.5 s of
``XREADGROUP BLOCK``, and between slices one script claims what dead
receivers left and checks for senders, so it notices within about
``lease + 0.5`` seconds that a killed sender is gone.

**Round trips.** A send is one script (``once`` for retries, the capacity
and receiver checks, ``XADD``); ``send_many`` sends up to 500 messages per
script call. A receive is two: the read (a script when something is there,
else ``XREADGROUP BLOCK``) and the acknowledgement; ``recv_many(n)`` is the
same two for up to ``n`` messages. That is what a hand-written consumer
does (``XREADGROUP`` then ``XACK``): see ``bench/redis.py``.

**asyncio**: ``send_async``/``recv_async`` (and the ``_many`` forms,
``async for``, ``Queue.put_async``/``get_async``) try on the event loop's
thread, one round trip each, and ``await asyncio.sleep`` between tries
(up to 50 ms apart on an empty channel): a cancellation can only land in
the sleep, so a cancelled ``recv_async`` has taken nothing, as locally. A
blocking ``XREADGROUP`` in an executor thread was rejected: cancelling the
awaiting task cannot stop the thread, which would take the message and
lose it.

Rejected: Redis lists (``LPUSH``/``BRPOP``) lose a message when the
consumer that popped it dies, and ``BLMOVE`` to a per-consumer list needs a
reaper for those lists; pub/sub delivers to every subscriber and drops
messages for a disconnected one.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time

from ._redis import HandleBase, _no_script, new_member
from .channel import ChannelStats, _deadline, _send_each_async
from .codec import get_codec
from .errors import Closed, DecodeError, Disconnected, Empty, Full, SegmentExists
from .segment import check_name, new_name

__all__ = ["RedisSender", "RedisReceiver", "RedisQueue", "make_channel"]

ASYNC_POLL_MAX = 0.05    # longest sleep between two polls of recv_async on an empty channel
SLICE = 0.5               # seconds of one XREADGROUP BLOCK between checks for senders and claims
CLAIM_EVERY = 1.0         # seconds between two looks for entries that dead receivers left pending
SEND_BATCH = 500          # messages per send script call in send_many
READ_BATCH = 500          # most messages read at once by drain()
_FIELD = {k: str(k).encode() for k in range(4)}

# KEYS: meta, q, tx, rx; ARGV: flavor, capacity, codec, lease_ms, tx member, rx member -> 0 if it exists
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('HSET', KEYS[1], 'kind', 'channel', 'flavor', ARGV[1], 'capacity', ARGV[2], 'codec', ARGV[3],
           'version', '1', 'recovered', '0')
redis.call('XGROUP', 'CREATE', KEYS[2], 'g', '0', 'MKSTREAM')
local t = now() + tonumber(ARGV[4])
redis.call('ZADD', KEYS[3], t, ARGV[5])
redis.call('ZADD', KEYS[4], t, ARGV[6])
return 1
"""

# KEYS: rx, q, ops; ARGV: field, seq, capacity, kind1, data1, ... -> messages added (-1: no receiver)
SEND = """
return once_s(KEYS[3], ARGV[1], ARGV[2], function()
  if redis.call('ZCOUNT', KEYS[1], now(), '+inf') == 0 then return -1 end
  local n = (#ARGV - 3) / 2
  local cap = tonumber(ARGV[3])
  if cap > 0 then
    local room = cap - redis.call('XLEN', KEYS[2])
    if room < n then n = math.max(room, 0) end
  end
  for i = 1, n do redis.call('XADD', KEYS[2], '*', ARGV[2 + 2 * i], ARGV[3 + 2 * i]) end
  return n
end)
"""

# KEYS: q, tx, rx, meta; ARGV: consumer, count, '>' (new entries) or '0>' (our pending ones first),
# claim (0/1), claim_after_ms
# -> {1, id, field, value, ...} | {0} nothing now | {-1} disconnected | {-2} channel gone
POLL = """
local q = KEYS[1]
local out = {1}
local function take(entries)
  for _, e in ipairs(entries) do
    if type(e) == 'table' and type(e[2]) == 'table' and #e[2] >= 2 then
      out[#out + 1] = e[1]; out[#out + 1] = e[2][1]; out[#out + 1] = e[2][2]
    end
  end
end
if ARGV[3] == '0>' then     -- first what a read whose reply was lost left pending with us, in order
  local r = redis.pcall('XREADGROUP', 'GROUP', 'g', ARGV[1], 'COUNT', ARGV[2], 'STREAMS', q, '0')
  if type(r) == 'table' and r.err then return {-2} end
  if r then take(r[1][2]) end
  if #out > 1 then return out end
end
local r = redis.pcall('XREADGROUP', 'GROUP', 'g', ARGV[1], 'COUNT', ARGV[2], 'STREAMS', q, '>')
if type(r) == 'table' and r.err then return {-2} end
if r then take(r[1][2]) end
if #out > 1 then return out end
local t = now()
if ARGV[4] == '1' then
  local ids = {}
  local limit = tonumber(ARGV[5])
  for _, e in ipairs(redis.call('XPENDING', q, 'g', '-', '+', 32)) do
    if e[2] ~= ARGV[1] then
      local s = redis.call('ZSCORE', KEYS[3], e[2])
      if (not s) or tonumber(s) < t or tonumber(e[3]) >= limit then ids[#ids + 1] = e[1] end
    end
  end
  if #ids > 0 then
    take(redis.call('XCLAIM', q, 'g', ARGV[1], 0, unpack(ids)))
    if #out > 1 then redis.call('HINCRBY', KEYS[4], 'recovered', (#out - 1) / 3) end
    if #out > 1 then return out end
  end
end
if redis.call('ZCOUNT', KEYS[2], t, '+inf') == 0 and redis.call('XLEN', q) == 0 then
  if redis.call('EXISTS', KEYS[4]) == 0 then return {-2} end
  return {-1}
end
return {0}
"""

# KEYS: q, ops; ARGV: field, seq, consumer, id... -> '*' (all were ours) or the ids that were, space-separated
ACK = """
return once_s(KEYS[2], ARGV[1], ARGV[2], function()
  local mine = {}
  for i = 4, #ARGV do
    if #redis.call('XPENDING', KEYS[1], 'g', ARGV[i], ARGV[i], 1, ARGV[3]) > 0 then mine[#mine + 1] = ARGV[i] end
  end
  if #mine > 0 then
    redis.call('XACK', KEYS[1], 'g', unpack(mine))
    redis.call('XDEL', KEYS[1], unpack(mine))
  end
  if #mine == #ARGV - 3 then return '*' end
  return table.concat(mine, ' ')
end)
"""

# KEYS: meta, tx, rx, q, ops; ARGV: lease_ms, role zset index (2 or 3), member, ops fields...
# -> 1 if it deleted the channel
CLOSE = """
local zset = KEYS[tonumber(ARGV[2])]
redis.call('ZREM', zset, ARGV[3])
if #ARGV > 3 then redis.call('HDEL', KEYS[5], unpack(ARGV, 4)) end
if ARGV[2] == '3' and redis.call('EXISTS', KEYS[4]) == 1 then
  local ok, p = pcall(redis.call, 'XPENDING', KEYS[4], 'g', '-', '+', 1, ARGV[3])
  if ok and #p == 0 then pcall(redis.call, 'XGROUP', 'DELCONSUMER', KEYS[4], 'g', ARGV[3]) end
end
return last_out(KEYS[1], {KEYS[2], KEYS[3]}, tonumber(ARGV[1]))
"""

# KEYS: meta, q, tx, rx -> {xlen, added, read, pending, senders, receivers, recovered}
STATS = """
local t = now()
local xlen = redis.call('XLEN', KEYS[2])
local added, read, pending = 0, 0, 0
if xlen > 0 or redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do if info[i] == 'entries-added' then added = info[i + 1] end end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
    for i = 1, #g, 2 do
      if g[i] == 'entries-read' and type(g[i + 1]) == 'number' then read = g[i + 1] end
      if g[i] == 'pending' then pending = g[i + 1] end
    end
  end
end
return {xlen, added, read, pending, redis.call('ZCOUNT', KEYS[3], t, '+inf'),
        redis.call('ZCOUNT', KEYS[4], t, '+inf'), tonumber(redis.call('HGET', KEYS[1], 'recovered') or '0')}
"""


def make_channel(ns, flavor: str, capacity: int, name: str | None, codec: str):
    if flavor == "bounded":
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        if capacity == 0:
            ns.rendezvous()
    codec_ = get_codec(codec)
    name = check_name(name) if name is not None else new_name()
    b = ns._backend
    base = f"shm:{{{name}}}"
    tx_m, rx_m = new_member(), new_member()
    s = b.script(CREATE)
    keys = [base, base + ":q", base + ":tx", base + ":rx", base + ":ops"]
    ok = b.run(lambda c: s(keys=keys, args=[flavor, capacity, codec_.name, b.lease_ms, tx_m, rx_m], client=c),
               what=f"creating channel {name!r}")
    if not ok:
        raise SegmentExists(17, f"Redis at {b.shown} already has a structure named {name!r}")
    meta = {"flavor": flavor, "capacity": str(capacity), "codec": codec_.name}
    return ns.Sender._new(name, meta, tx_m, True), ns.Receiver._new(name, meta, rx_m, True)


class _RedisHandle(HandleBase):
    """Common to RedisSender and RedisReceiver (the local ``_Handle``'s API)."""

    _kind = "channel"
    _role = ""
    _nsref = None

    def __init__(self, *a, **k):
        raise TypeError(f"use ns.bounded()/unbounded() or ns.{type(self).__name__}.open(name)")

    @classmethod
    def _new(cls, name, meta, member, registered):
        self = object.__new__(cls)
        self._set_meta(meta)
        self._init_handle(cls._nsref, name, member, registered)
        self._keys_all = [self._base, self._base + ":tx", self._base + ":rx", self._base + ":q", self._ops]
        self._send_keys = [self._base + ":rx", self._base + ":q", self._ops]
        self._send_cap = self._cap if self._flavor == "bounded" else 0
        return self

    def _set_meta(self, meta):
        self._flavor = meta["flavor"]
        self._cap = int(meta["capacity"])
        self._codec = get_codec(meta["codec"])

    def _zset(self) -> str:
        return f"{self._base}:{self._role}"

    @classmethod
    def open(cls, name: str):
        """Attach to the channel ``name`` (made by any process that reaches this Redis)."""
        name = check_name(name)
        member = new_member()
        b = cls._nsref._backend
        base = f"shm:{{{name}}}"
        meta = b.attach("channel", base, f"{base}:{cls._role}", member, name)
        return cls._new(name, meta, member, True)

    def _check(self):
        if self._closed:
            raise Closed(f"this {type(self).__name__} was closed")
        if not self._registered:
            self._register()

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        """Close this handle (idempotent): its lease is given back; the last handle out deletes the channel."""
        if self._closed:
            return
        self._closed = True
        b = self._b
        b.drop(self)
        if not self._registered:
            return
        args = [b.lease_ms, "2" if self._role == "tx" else "3", self._member, *self._fields.values()]
        try:
            b.eval(CLOSE, self._keys_all, args, "closing", retry=False)
        except Exception:
            pass        # the server is unreachable: the lease expires by itself

    @property
    def closed(self) -> bool:
        return self._closed

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

    def clone(self):
        """Another handle of the same kind on the same channel."""
        self._check()
        return type(self).open(self._name)

    __copy__ = clone

    def __deepcopy__(self, memo):
        return self.clone()

    def __reduce__(self):
        self._check()
        member = new_member()       # a lease for the handle in transit, adopted by the unpickler
        b = self._b
        b.renew_all([(self._meta_key, self._zset(), member)])
        ns = self._ns
        meta = {"flavor": self._flavor, "capacity": str(self._cap), "codec": self._codec.name}
        return _rebuild, (ns.url, ns.opts, self._role, self._name, meta, member)

    # -- introspection -----------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def capacity(self) -> int | None:
        return None if self._flavor == "unbounded" else self._cap

    @property
    def codec(self) -> str:
        return self._codec.name

    @property
    def url(self) -> str:
        return self._b.shown

    def __len__(self) -> int:
        """Messages in the stream now: queued, or read and not yet acknowledged."""
        self._check()
        return self._b.run(lambda c: c.xlen(self._base + ":q"), what="XLEN")

    def is_empty(self) -> bool:
        return len(self) == 0

    def is_full(self) -> bool:
        return self._flavor == "bounded" and len(self) >= self._cap

    def stats(self) -> ChannelStats:
        self._check()
        s = self._b.script(STATS)
        k = self._keys_all
        xlen, added, read, pending, ntx, nrx, rec = self._b.run(
            lambda c: s(keys=[k[0], k[3], k[1], k[2]], client=c), what="stats")
        return ChannelStats(name=self._name, flavor=self._flavor, codec=self._codec.name,
                            capacity=self.capacity, depth=xlen, sent=added, received=read, senders=ntx,
                            receivers=nrx, waiting_senders=0, waiting_receivers=0, recovered=rec, lost=0,
                            reaped=0, blob_bytes=0, blob_segments=0)

    def __repr__(self):
        if self._closed:
            return f"<shm.redis.{type(self).__name__} closed>"
        cap = f"({self._cap})" if self._flavor == "bounded" else ""
        return (f"<shm.redis.{type(self).__name__} {self._name!r} {self._flavor}{cap} codec={self._codec.name} "
                f"at {self._b.shown}>")


def _rebuild(url, opts, role, name, meta, member):
    from ._redis import namespace
    ns = namespace(url, opts)
    cls = ns.Sender if role == "tx" else ns.Receiver
    return cls._new(name, meta, member, True)


class RedisSender(_RedisHandle):
    """The sending end of a channel on Redis."""

    _role = "tx"

    def _encode(self, obj):
        c = self._codec
        f = c.fast_encode
        if f is not None:
            try:
                return _FIELD[c.kind], f(obj)
            except Exception:
                pass
        data = c.encode(obj)
        if type(data) is bytes:
            return _FIELD[c.kind], data
        if isinstance(data, memoryview):
            return _FIELD[c.kind], data.tobytes()
        kind, parts = data
        import numpy as np
        return _FIELD[kind], b"".join(p.reshape(-1).view(np.uint8).tobytes() if isinstance(p, np.ndarray)
                                      else bytes(p) for p in parts)

    def _push(self, flat: list, what: str) -> int:
        """Add the (field, data) pairs in ``flat``, as many as fit; return how many (Disconnected if no receiver)."""
        if not self._registered:
            self._register()
        field, seq = self._op()
        n = int(self._b.eval(SEND, self._send_keys, [field, seq, self._send_cap, *flat], what))
        if n < 0:
            raise Disconnected(f"every receiver of channel {self._name!r} is gone")
        return n

    def send(self, obj, timeout: float | None = None) -> None:
        """Send ``obj``, waiting up to ``timeout`` seconds for room (None: forever).

        ``Full`` (with ``.message``) on timeout, ``Disconnected`` (with
        ``.message``) if no receiver is left, ``EncodeError`` if the codec
        cannot encode it; in each case nothing was sent.
        """
        if self._closed:
            raise Closed("this Sender was closed")
        deadline = _deadline(timeout)
        flat = list(self._encode(obj))
        delay = 0.0005
        while True:
            try:
                if self._push(flat, "a send"):
                    return
            except Disconnected as e:
                e.message = obj
                raise
            if deadline is not None and time.monotonic() >= deadline:
                raise Full(f"no room on channel {self._name!r} before the timeout", message=obj)
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 2, 0.02)

    def try_send(self, obj) -> None:
        """Send ``obj`` if there is room now, else raise ``Full`` (with ``.message``)."""
        if self._closed:
            raise Closed("this Sender was closed")
        flat = list(self._encode(obj))
        try:
            n = self._push(flat, "a send")
        except Disconnected as e:
            e.message = obj
            raise
        if not n:
            raise Full(f"channel {self._name!r} is full", message=obj)

    def send_many(self, items, timeout: float | None = None) -> None:
        """Send every item in order, up to 500 per round trip; ``timeout`` bounds the whole call.

        On ``Full``/``Disconnected`` the exception's ``.message`` is the list of items not sent.
        """
        if self._closed:
            raise Closed("this Sender was closed")
        deadline = _deadline(timeout)
        items = list(items)
        enc = [self._encode(x) for x in items]      # EncodeError before anything is sent
        i = 0
        delay = 0.0005
        while i < len(items):
            flat = [v for pair in enc[i:i + SEND_BATCH] for v in pair]
            try:
                n = self._push(flat, "a send_many")
            except Disconnected as e:
                e.message = items[i:]
                raise
            i += n
            if n:
                delay = 0.0005
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise Full(f"no room on channel {self._name!r} before the timeout", message=items[i:])
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 2, 0.02)

    async def send_async(self, obj, timeout: float | None = None) -> None:
        """``send`` for asyncio: each try is one round trip on the loop's thread, with
        ``asyncio.sleep`` between tries (0.5 ms doubling to 20 ms) while the channel is full.

        Same errors as ``send``. Cancelled while waiting, it has sent nothing.
        """
        if self._closed:
            raise Closed("this Sender was closed")
        deadline = _deadline(timeout)
        delay = 0.0005
        while True:
            try:
                self.try_send(obj)
                return
            except Full:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Full(f"no room on channel {self._name!r} before the timeout", message=obj) from None
            await asyncio.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, 0.02)

    async def send_many_async(self, items, timeout: float | None = None) -> None:
        """``send_many`` for asyncio, item by item; ``.message`` of Full/Disconnected is the list not sent."""
        await _send_each_async(self.send_async, items, timeout)

    def is_disconnected(self) -> bool:
        """True when no receiver holds a live lease."""
        self._check()
        k = self._base + ":rx"
        return self._b.run(lambda c: c.zcount(k, _server_ms(c), "+inf"), what="ZCOUNT") == 0


def _server_ms(c) -> int:
    sec, usec = c.time()
    return sec * 1000 + usec // 1000


class RedisReceiver(_RedisHandle):
    """The receiving end of a channel on Redis. Iterating yields messages until disconnected."""

    _role = "rx"
    _recheck = False
    _next_claim = 0.0

    def _decode(self, field: bytes, data: bytes):
        c = self._codec
        try:
            kind = int(field)
        except ValueError:
            raise DecodeError(f"a message on channel {self._name!r} has a field {field[:20]!r}, not a codec "
                              "kind: it was not sent by shm") from None
        if kind == c.kind and c.fast_decode is not None:
            try:
                return c.fast_decode(data)
            except Exception:
                pass
        return c.decode(kind, data)

    def _poll(self, count: int):
        """One read script: new entries, or (after a lost reply) our pending ones first, claims, peers."""
        b = self._b
        now = time.monotonic()
        claim = now >= self._next_claim
        if claim:
            self._next_claim = now + CLAIM_EVERY
        k = self._keys_all
        s = b.script(POLL)
        head = [s.sha, 4, k[3], k[1], k[2], k[0], self._member, count]
        tail = [1 if claim else 0, int(b.opts["claim_after"] * 1000)]

        def go(c):
            # The mode is chosen at each attempt: a retry after a lost reply reads
            # what that read delivered first, so nothing is skipped or reordered.
            recheck = self._recheck
            cmd = ["EVALSHA", *head, "0>" if recheck else ">", *tail]
            try:
                r = c.execute_command(*cmd)
            except _no_script():
                head[0] = s.sha = c.script_load(s.script)
                cmd[1] = s.sha
                r = c.execute_command(*cmd)
            if recheck:
                self._recheck = False
            return r
        return b.run(go, what="a receive", on_retry=self._lost_reply)

    def _lost_reply(self):
        self._recheck = True

    def _finish(self, triples: list) -> list:
        """Decode, acknowledge what is still ours, return those messages in order."""
        out, ids, err = [], [], None
        for i in range(0, len(triples), 3):
            mid, field, data = triples[i], triples[i + 1], triples[i + 2]
            try:
                out.append(self._decode(field, data))
            except Exception as e:          # DecodeError: acknowledged (it will never decode), then raised
                if err is None:
                    err = e
                out.append(_BAD)
            ids.append(mid)
        field, seq = self._op()
        r = self._b.eval(ACK, [self._base + ":q", self._ops], [field, seq, self._member, *ids], "an acknowledgement")
        if r != b"*":
            mine = set(r.split())
            out = [v for v, m in zip(out, ids) if m in mine]
        if err is not None:
            good = [v for v in out if v is not _BAD]
            if not good:
                raise err
            return good
        return out

    def _receive(self, count: int, timeout, blocking: bool) -> list:
        if self._closed:
            raise Closed("this Receiver was closed")
        if not self._registered:
            self._register()
        deadline = _deadline(timeout) if blocking else None
        q = self._base + ":q"
        while True:
            r = self._poll(count)
            code = r[0]
            if code == 1:
                got = self._finish(r[1:])
                if got:
                    return got
                continue
            if code < 0:
                raise Disconnected(f"every sender of channel {self._name!r} is gone and it is drained"
                                   if code == -1 else f"channel {self._name!r} was deleted")
            if not blocking:
                raise Empty(f"channel {self._name!r} is empty")
            left = SLICE if deadline is None else min(SLICE, deadline - time.monotonic())
            if left <= 0:
                raise Empty(f"nothing arrived on channel {self._name!r} before the timeout")
            ms = max(1, int(left * 1000))
            try:
                # After a lost reply, no new read: the loop's poll reads what it delivered first.
                res = self._b.run(lambda c: None if self._recheck else
                                  c.xreadgroup("g", self._member, {q: ">"}, count=count, block=ms),
                                  what="a receive", on_retry=self._lost_reply)
            except Exception as e:
                from ._redis import redis_module
                if isinstance(e, redis_module().exceptions.ResponseError) and "NOGROUP" in str(e):
                    raise Disconnected(f"channel {self._name!r} was deleted") from None
                raise
            if res:
                flat = []
                for mid, fields in res[0][1]:
                    if fields:
                        (f, v), = fields.items()
                        flat += (mid, f, v)
                if flat:
                    got = self._finish(flat)
                    if got:
                        return got

    def recv(self, timeout: float | None = None):
        """Receive the next message, waiting up to ``timeout`` seconds (None: forever).

        ``Empty`` on timeout, ``Disconnected`` once every sender is gone and the channel is drained.
        """
        return self._receive(1, timeout, True)[0]

    def try_recv(self):
        """A message if one is queued now, else ``Empty``."""
        return self._receive(1, None, False)[0]

    def recv_many(self, max_items: int, timeout: float | None = None) -> list:
        """Wait up to ``timeout`` for at least one message, then return up to ``max_items`` (two round trips)."""
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        return self._receive(max_items, timeout, True)

    def drain(self) -> list:
        """Every message queued right now, without waiting (possibly ``[]``)."""
        out = []
        while True:
            try:
                out.extend(self._receive(READ_BATCH, None, False))
            except (Empty, Disconnected):
                return out

    def __iter__(self):
        while True:
            try:
                yield self.recv()
            except Disconnected:
                return

    async def _receive_async(self, count: int, timeout):
        deadline = _deadline(timeout)
        delay = 0.0005
        while True:
            try:
                return self._receive(count, None, False)       # one poll: no await inside, so
            except Empty:                                       # a cancellation never takes a message
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Empty(f"nothing arrived on channel {self._name!r} before the timeout") from None
            await asyncio.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, ASYNC_POLL_MAX)

    async def recv_async(self, timeout: float | None = None):
        """``recv`` for asyncio: polls (one round trip on the loop's thread each time), with
        ``asyncio.sleep`` between polls (0.5 ms doubling to 50 ms) while the channel is empty.

        Same errors as ``recv``. Cancelled while waiting, it has taken no message.
        """
        return (await self._receive_async(1, timeout))[0]

    async def recv_many_async(self, max_items: int, timeout: float | None = None) -> list:
        """``recv_many`` for asyncio."""
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        return await self._receive_async(max_items, timeout)

    def __aiter__(self):
        """``async for msg in rx``: messages until every sender is gone and the channel is drained."""
        return self._messages()

    async def _messages(self):
        while True:
            try:
                yield await self.recv_async()
            except Disconnected:
                return

    def is_disconnected(self) -> bool:
        """True when no sender holds a live lease (queued messages may remain)."""
        self._check()
        k = self._base + ":tx"
        return self._b.run(lambda c: c.zcount(k, _server_ms(c), "+inf"), what="ZCOUNT") == 0


_BAD = object()


def _rebuild_queue(url, opts, tx, rx, maxsize):
    from ._redis import namespace
    q = namespace(url, opts).Queue.__new__(namespace(url, opts).Queue)
    q._tx, q._rx, q._maxsize, q._closed = tx, rx, maxsize, False
    return q


class RedisQueue:
    """``multiprocessing.Queue(maxsize=0)`` on Redis: the pickle codec, ``queue.Empty``/``queue.Full``.

    Every process that has the queue holds a sender and a receiver, so
    ``get`` blocks as long as any process holds the queue open.
    """

    _nsref = None

    def __init__(self, maxsize: int = 0, *, ctx=None, name: str | None = None):
        ns = self._nsref
        if maxsize is None or maxsize <= 0:
            self._tx, self._rx = ns.unbounded(codec="pickle", name=name)
            self._maxsize = 0
        else:
            self._tx, self._rx = ns.bounded(int(maxsize), codec="pickle", name=name)
            self._maxsize = int(maxsize)
        self._closed = False

    @classmethod
    def open(cls, name: str):
        q = cls.__new__(cls)
        q._tx = cls._nsref.Sender.open(name)
        q._rx = cls._nsref.Receiver.open(name)
        q._maxsize = q._tx.capacity or 0
        q._closed = False
        return q

    def __reduce__(self):
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        ns = self._nsref
        return _rebuild_queue, (ns.url, ns.opts, self._tx, self._rx, self._maxsize)

    def _check(self):
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    def put(self, obj, block: bool = True, timeout: float | None = None) -> None:
        self._check()
        if block:
            self._tx.send(obj, timeout)
        else:
            self._tx.try_send(obj)

    def get(self, block: bool = True, timeout: float | None = None):
        self._check()
        if block:
            return self._rx.recv(timeout)
        return self._rx.try_recv()

    async def put_async(self, obj, timeout: float | None = None) -> None:
        self._check()
        await self._tx.send_async(obj, timeout)

    async def get_async(self, timeout: float | None = None):
        self._check()
        return await self._rx.recv_async(timeout)

    def put_nowait(self, obj) -> None:
        self.put(obj, False)

    def get_nowait(self):
        return self.get(False)

    def qsize(self) -> int:
        self._check()
        return len(self._rx)

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return bool(self._maxsize) and self.qsize() >= self._maxsize

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._tx.close()
            self._rx.close()

    def join_thread(self) -> None:
        pass

    def cancel_join_thread(self) -> None:
        pass

    @property
    def name(self) -> str:
        return self._tx.name

    def __repr__(self):
        if self._closed:
            return "<shm.redis.Queue closed>"
        return f"<shm.redis.Queue {self._tx.name!r} maxsize={self._maxsize} at {self._tx.url}>"


assert issubclass(Empty, queue.Empty) and issubclass(Full, queue.Full)
del threading
