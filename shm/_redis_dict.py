"""SharedDict on Redis: ``ns.SharedDict()``, the local dict's API in a Redis hash.

Design notes
------------

**One hash.** A dict ``N`` is the hash ``shm:{N}:h``; each field is the
canonical key bytes of ``shm/_keys.py`` (so ``1``, ``1.0`` and ``True`` are
one key on every host, as locally) and each value is tagged by its first
byte, chosen so that the server can do arithmetic on numbers:

==========  ==============================================================
``-``/digit an int in int64 range, in decimal: ``HINCRBY`` works on it
``f``       a float, ``repr`` after the tag
``s``       a str, UTF-8 after the tag (msgpack and pickle dicts, as locally)
``k``       anything else: one byte of codec kind, then the codec's bytes
==========  ==============================================================

**Atomic operations are server-side scripts**, each one atomic in Redis:
``incr`` runs ``HINCRBY`` on an int (one round trip, as a hand-written
client would) and adds floats in the script with the same IEEE double
arithmetic as Python (``HINCRBYFLOAT`` was rejected: it computes in long
double and prints 17 digits, so ``0.1 + 0.2`` would not come back as
Python's ``0.30000000000000004``, and an int it touches comes back as a
float string with no way to tell the two apart). ``pop``, ``popitem``
(``HRANDFIELD``), ``setdefault`` (``HSETNX``) and ``del`` are scripts too.
``compare_and_set`` and ``alter`` compare-and-swap on the stored bytes: read,
compute in Python, then a script stores the new value only if the stored
bytes are still the ones read, else reads again. So ``alter``'s ``fn`` may
run more than once under contention (as in any optimistic loop; locally it
runs once, under the shard lock) and must not have side effects; if the
process dies inside ``fn``, nothing changed, as locally. ``incr`` falls back
to the same loop for what the script does not take (past int64, a
``default`` that is not a number, a value that is not one).

**Retries**: every script that is not idempotent runs through ``once``
with a per-thread sequence number (``shm/_redis.py``), so an ``incr`` or a
``pop`` retried after a dropped connection is applied once. ``incr``'s int
path is the one hot enough to be tuned: its script runs without the
prelude, and its command is packed once per thread (the sha, keys and op
field) and sent straight on a pooled connection (``Backend.run_packed``),
so that it costs the client less than redis-py's own ``hincrby`` and pays
for the script's extra server time (issue 7: ``python -m bench redis``).

**Reads go to the server every time.** The local dict serves repeated reads
from a per-handle cache validated by the shard's version in shared memory;
Redis has no such version to check for free (client-side caching with
invalidation messages would need RESP3 and a tracking connection per
process): every ``get`` is one ``HGET``. ``get_many``/``set_many`` are one
``HMGET``/``HSET`` per 1000 keys.

**Iteration** is ``HSCAN``: weakly consistent like the local dict's (never
raises because another process writes, and sees every key present for the
whole iteration), with the keys already seen remembered so none is yielded
twice when the server rehashes.

Not on Redis: numeric mode and ``kernel()`` (there is no shared memory to
hand to ``@njit`` code); ``shards``/``capacity`` are accepted and ignored.
"""
from __future__ import annotations

import weakref
from collections.abc import ItemsView, Mapping, MutableMapping, ValuesView
from dataclasses import dataclass

from ._keys import decode_key, encode_key
from ._redis import HandleBase, bulk, new_member
from .codec import get_codec
from .errors import Closed, CorruptSegment, DecodeError, SegmentExists
from .segment import check_name, new_name

__all__ = ["RedisDict", "RedisDictStats"]

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_MISSING = object()
CHUNK = 1000

# KEYS: meta, p, h, ops; ARGV: codec, lease_ms, member -> 0 if it exists
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('HSET', KEYS[1], 'kind', 'dict', 'codec', ARGV[1], 'version', '1')
redis.call('ZADD', KEYS[2], now() + tonumber(ARGV[2]), ARGV[3])
return 1
"""

# KEYS: meta, p, h, ops; ARGV: lease_ms, member, ops fields... -> 1 if it deleted the dict
CLOSE = """
redis.call('ZREM', KEYS[2], ARGV[2])
if #ARGV > 2 then redis.call('HDEL', KEYS[4], unpack(ARGV, 3)) end
return last_out(KEYS[1], {KEYS[2]}, tonumber(ARGV[1]))
"""

# KEYS: h, ops; ARGV: op field, seq, key, delta, delta is float (0/1), default (encoded, '' if not a number)
# -> {1, new value bytes} | {0}: do it in Python
INCR = """
return once(KEYS[2], ARGV[1], ARGV[2], function()
  local h, k = KEYS[1], ARGV[3]
  local v = redis.call('HGET', h, k)
  local missing = not v
  if missing then v = ARGV[6] end
  local c = string.byte(v, 1)
  if not c then return {0} end
  local isint = c == 45 or (c >= 48 and c <= 57)
  if isint and ARGV[5] == '0' then
    if missing then redis.call('HSET', h, k, v) end
    local r = redis.pcall('HINCRBY', h, k, ARGV[4])
    if type(r) == 'table' and r.err then
      if missing then redis.call('HDEL', h, k) end
      return {0}
    end
    return {1, redis.call('HGET', h, k)}
  end
  if isint or c == 102 then
    local cur = tonumber(c == 102 and string.sub(v, 2) or v)
    if not cur then return {0} end
    local s = 'f' .. string.format('%.17g', cur + tonumber(ARGV[4]))
    redis.call('HSET', h, k, s)
    return {1, s}
  end
  return {0}
end)
"""

# The common case on its own: an int delta, default 0. KEYS: h, ops; ARGV: op field, seq, key, delta
# -> the new value (an integer, or text past 2^53) | false: not an int there (or past int64): INCR
# does the rest. once_s written out, and run without the prelude: the prelude builds its closures
# and tables on every call, and a call this small notices (~1 us of the server's time). Its reply
# is kept as once_s keeps it (NUL, seq, a space, text), so a replay returns it as text.
INCR_INT = """
local tag = '\\0' .. ARGV[2] .. ' '
local prev = redis.call('HGET', KEYS[2], ARGV[1])
if prev and string.sub(prev, 1, #tag) == tag then return string.sub(prev, #tag + 1) end
local r = redis.pcall('HINCRBY', KEYS[1], ARGV[3], ARGV[4])
if type(r) == 'table' then return false end
local s
if r > -9007199254740992 and r < 9007199254740992 then s = string.format('%d', r)
else s = redis.call('HGET', KEYS[1], ARGV[3]); r = s end
redis.call('HSET', KEYS[2], ARGV[1], tag .. s)
return r
"""

# KEYS: h, ops; ARGV: op field, seq, key, expected ('' = absent), flag ('1': expected given), new -> 1/0
CAS = """
return once(KEYS[2], ARGV[1], ARGV[2], function()
  local v = redis.call('HGET', KEYS[1], ARGV[3])
  if ARGV[5] == '1' then
    if v ~= ARGV[4] then return 0 end
  elseif v then return 0 end
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[6])
  return 1
end)
"""

# KEYS: h, ops; ARGV: op field, seq, key -> value bytes or false
POP = """
return once(KEYS[2], ARGV[1], ARGV[2], function()
  local v = redis.call('HGET', KEYS[1], ARGV[3])
  if not v then return {} end
  redis.call('HDEL', KEYS[1], ARGV[3])
  return {v}
end)
"""

# KEYS: h, ops; ARGV: op field, seq -> {key, value} or {}
POPITEM = """
return once(KEYS[2], ARGV[1], ARGV[2], function()
  local k = redis.call('HRANDFIELD', KEYS[1])
  if not k then return {} end
  local v = redis.call('HGET', KEYS[1], k)
  redis.call('HDEL', KEYS[1], k)
  return {k, v}
end)
"""

# KEYS: h, ops; ARGV: op field, seq, key -> 1 if it was there
DEL = """
return once_s(KEYS[2], ARGV[1], ARGV[2], function()
  return redis.call('HDEL', KEYS[1], ARGV[3])
end)
"""

# KEYS: h; ARGV: key, value -> the value now (idempotent: no once)
SETDEFAULT = """
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
return redis.call('HGET', KEYS[1], ARGV[1])
"""


@dataclass(frozen=True)
class RedisDictStats:
    """A snapshot of a SharedDict on Redis."""

    name: str
    keys: int
    codec: str
    participants: int       # handles holding a live lease
    bytes_used: int         # MEMORY USAGE of the hash (an estimate by the server)
    url: str


class RedisDict(MutableMapping):
    """``shm.SharedDict`` on Redis. ``ns.SharedDict(name=None, *, codec="msgpack")``; ``ns.SharedDict.open(name)``."""

    _nsref = None
    _closed = True

    def __init__(self, name: str | None = None, *, codec="msgpack", shards: int | None = None,
                 key_type: str | None = None, value_type: str | None = None, capacity: int | None = None):
        if key_type not in (None, "any") or value_type not in (None, "any"):
            raise ValueError("numeric mode (key_type='int64', value_type=...) needs shared memory: it exists for "
                             "@njit code, which cannot reach Redis; use a plain SharedDict on Redis")
        codec_ = get_codec(codec)
        name = check_name(name) if name is not None else new_name()
        ns = self._nsref
        b = ns._backend
        base = f"shm:{{{name}}}"
        member = new_member()
        s = b.script(CREATE)
        keys = [base, base + ":p", base + ":h", base + ":ops"]
        ok = b.run(lambda c: s(keys=keys, args=[codec_.name, b.lease_ms, member], client=c),
                   what=f"creating SharedDict {name!r}")
        if not ok:
            raise SegmentExists(17, f"Redis at {b.shown} already has a structure named {name!r}")
        self._setup(name, codec_.name, member, True)

    @classmethod
    def open(cls, name: str) -> "RedisDict":
        """Attach to the SharedDict ``name`` (made by any process that reaches this Redis)."""
        name = check_name(name)
        member = new_member()
        base = f"shm:{{{name}}}"
        meta = cls._nsref._backend.attach("dict", base, base + ":p", member, name)
        self = cls.__new__(cls)
        self._setup(name, meta["codec"], member, True)
        return self

    def _setup(self, name, codec, member, registered):
        self._h = _Lease(self)
        c = self._codec = get_codec(codec)
        self._kind = c.kind
        self._enc = c.fast_encode
        self._dec_fast = c.fast_decode
        self._str_ok = c.name in ("msgpack", "pickle")
        self._h._init_handle(self._nsref, name, member, registered)
        self._name = name
        self._b = self._h._b
        self._hkey = self._h._base + ":h"
        self._ops = self._h._ops
        self._heads = {}            # op field -> the start of incr's pre-packed command
        self._closed = False

    # -- values ------------------------------------------------------------------
    def _value(self, value) -> bytes:
        t = type(value)
        if t is int and _I64_MIN <= value <= _I64_MAX:
            return str(value).encode()
        if t is float:
            return b"f" + repr(value).encode()
        if t is str and self._str_ok:
            try:
                return b"s" + value.encode()
            except UnicodeEncodeError:
                pass            # lone surrogates: the codec decides
        data = None
        if self._enc is not None:
            try:
                data = self._enc(value)
            except Exception:
                data = None
        if data is None:
            data = self._codec.encode(value)          # the codec's EncodeError (a TypeError)
        if type(data) is bytes:
            return b"k" + bytes((self._kind,)) + data
        if isinstance(data, memoryview):
            return b"k" + bytes((self._kind,)) + data.tobytes()
        import numpy as np
        kind, parts = data
        return b"k" + bytes((kind,)) + b"".join(p.reshape(-1).view(np.uint8).tobytes() if isinstance(p, np.ndarray)
                                                  else bytes(p) for p in parts)

    def _decode(self, raw: bytes):
        if not raw:
            raise DecodeError(f"SharedDict {self._name!r}: an empty value in Redis (not written by shm)")
        c = raw[0]
        if c == 0x73:
            try:
                return str(raw[1:], "utf-8")
            except UnicodeDecodeError:
                raise DecodeError(f"SharedDict {self._name!r}: a stored str value is not UTF-8") from None
        if c == 0x2D or 0x30 <= c <= 0x39:
            try:
                return int(raw)
            except ValueError:
                raise DecodeError(f"SharedDict {self._name!r}: {raw[:30]!r} is not a number") from None
        if c == 0x66:
            try:
                return float(raw[1:])
            except ValueError:
                raise DecodeError(f"SharedDict {self._name!r}: {raw[:30]!r} is not a float") from None
        if c == 0x6B and len(raw) >= 2:
            kind = raw[1]
            body = memoryview(raw)[2:]
            if kind == self._kind and self._dec_fast is not None:
                try:
                    return self._dec_fast(body)
                except Exception:
                    pass
            return self._codec.decode(kind, body)
        raise DecodeError(f"SharedDict {self._name!r}: a value in Redis that shm did not write ({raw[:30]!r})")

    def _key(self, key) -> bytes:
        return encode_key(key)

    def _check(self):
        if self._closed:
            raise Closed(f"SharedDict {self._name!r} was closed")
        if not self._h._registered:
            self._h._register()

    def _run(self, fn, what):
        return self._b.run(fn, what=what)

    def _script(self, src, keys, args, what):
        return self._b.eval(src, keys, args, what)

    def _once(self, src, args, what):
        field, seq = self._h._op()
        return self._script(src, [self._hkey, self._ops], [field, seq, *args], what)

    # -- reads ---------------------------------------------------------------------
    def __getitem__(self, key):
        self._check()
        kb = encode_key(key)
        raw = self._b.run(lambda c: c.hget(self._hkey, kb), what="a get")
        if raw is None:
            raise KeyError(key)
        return self._decode(raw)

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key):
        self._check()
        kb = encode_key(key)
        return bool(self._b.run(lambda c: c.hexists(self._hkey, kb), what="HEXISTS"))

    def get_many(self, keys, default=None) -> list:
        """``[d.get(k, default) for k in keys]`` in one ``HMGET`` per 1000 keys."""
        self._check()
        kbs = [encode_key(k) for k in keys]
        out = []
        for i in range(0, len(kbs), CHUNK):
            part = kbs[i:i + CHUNK]
            raws = self._b.run(lambda c: c.hmget(self._hkey, part), what="a get_many")
            out.extend(default if r is None else self._decode(r) for r in raws)
        return out

    # -- writes ----------------------------------------------------------------------
    def __setitem__(self, key, value):
        self._check()
        kb = encode_key(key)
        raw = self._value(value)
        self._b.run(lambda c: c.hset(self._hkey, kb, raw), what="a set")

    def __delitem__(self, key):
        self._check()
        if not int(self._once(DEL, [encode_key(key)], "a delete")):
            raise KeyError(key)

    def set_many(self, mapping) -> None:
        """``d[k] = v`` for every item: one ``HSET`` per 1000 items, pipelined (each item atomic on its own)."""
        self._check()
        items = mapping.items() if isinstance(mapping, Mapping) else mapping
        flat = []
        for k, v in items:
            flat.append(encode_key(k))
            flat.append(self._value(v))         # every value encoded before anything is written

        def go(c):
            p = c.pipeline(transaction=False)
            for i in range(0, len(flat), 2 * CHUNK):
                p.execute_command("HSET", self._hkey, *flat[i:i + 2 * CHUNK])
            p.execute()
        if flat:
            self._b.run(go, what="a set_many")

    def update(self, other=(), /, **kw):
        if isinstance(other, Mapping):
            items = list(other.items())
        elif hasattr(other, "keys"):
            items = [(k, other[k]) for k in other.keys()]
        else:
            items = list(other)
        self.set_many(items + list(kw.items()))

    # -- atomic read-modify-writes ---------------------------------------------------------
    def _cas(self, kb: bytes, expected: bytes | None, new: bytes) -> bool:
        return bool(self._once(CAS, [kb, b"" if expected is None else expected, "0" if expected is None else "1", new],
                               "a compare-and-set"))

    def _raw(self, kb):
        return self._b.run(lambda c: c.hget(self._hkey, kb), what="a get")

    def incr(self, key, delta=1, default=0):
        """Add ``delta`` to ``d[key]`` (``default`` if absent) atomically; return the new value.

        One round trip for ints (``HINCRBY``) and floats; anything else numeric (past int64,
        other types) goes through a compare-and-swap loop.
        """
        self._check()
        kb = encode_key(key)
        td = type(delta)
        if td is int and default == 0 and type(default) is int and _I64_MIN <= delta <= _I64_MAX:
            field, seq = self._h._op()
            head = self._heads.get(field)
            if head is None:
                head = self._heads[field] = self._b.packed_head(INCR_INT, 4, [self._hkey, self._ops], [field])
            r = self._b.run_packed(head + bulk(seq.encode()) + bulk(kb) + bulk(b"%d" % delta), INCR_INT, "an incr")
            if r is not None:
                return int(r)
        if (td is int and _I64_MIN <= delta <= _I64_MAX or td is float) and type(default) in (int, float) and \
                (type(default) is float or _I64_MIN <= default <= _I64_MAX):
            r = self._once(INCR, [kb, repr(delta) if td is float else str(delta), "1" if td is float else "0",
                                  self._value(default)], "an incr")
            if r[0] == 1:
                return self._decode(r[1])
        while True:
            raw = self._raw(kb)
            new = (default if raw is None else self._decode(raw)) + delta
            if self._cas(kb, raw, self._value(new)):
                return new

    def compare_and_set(self, key, expected, new) -> bool:
        """Set ``d[key] = new`` if it equals ``expected`` now; True if it did. Atomic."""
        self._check()
        kb = encode_key(key)
        nraw = self._value(new)
        while True:
            raw = self._raw(kb)
            if raw is None:
                return False
            cur = self._decode(raw)
            if cur != expected or type(cur) is not type(expected) and \
                    not (isinstance(cur, (int, float)) and isinstance(expected, (int, float))):
                return False
            if self._cas(kb, raw, nraw):
                return True

    def alter(self, key, fn, default=_MISSING):
        """Store ``fn(d[key])`` (or ``fn(default)`` if absent) atomically; return it.

        Optimistic: ``fn`` may run more than once when another process writes
        the key meanwhile, so it must have no side effects.
        """
        self._check()
        kb = encode_key(key)
        while True:
            raw = self._raw(kb)
            if raw is None:
                if default is _MISSING:
                    raise KeyError(key)
                cur = default
            else:
                cur = self._decode(raw)
            new = fn(cur)
            if self._cas(kb, raw, self._value(new)):
                return new

    def setdefault(self, key, default=None):
        """``d[key]`` if present, else set it to ``default`` and return that. Atomic."""
        self._check()
        raw = self._script(SETDEFAULT, [self._hkey], [encode_key(key), self._value(default)], "a setdefault")
        return self._decode(raw)

    def pop(self, key, default=_MISSING):
        """Remove ``key`` and return its value (or ``default``; KeyError without one). Atomic."""
        self._check()
        r = self._once(POP, [encode_key(key)], "a pop")
        if r:
            return self._decode(r[0])
        if default is _MISSING:
            raise KeyError(key)
        return default

    def popitem(self):
        """Remove and return some ``(key, value)``; KeyError if empty. Atomic."""
        self._check()
        r = self._once(POPITEM, [], "a popitem")
        if not r:
            raise KeyError("popitem(): SharedDict is empty")
        return self._decode_key(r[0]), self._decode(r[1])

    def clear(self) -> None:
        """Remove every key."""
        self._check()
        self._run(lambda c: c.delete(self._hkey), "a clear")

    # -- iteration ------------------------------------------------------------------------------
    def _decode_key(self, kb: bytes):
        try:
            return decode_key(kb)
        except Exception:
            raise CorruptSegment(f"SharedDict {self._name!r}: a key in Redis that shm did not write "
                                 f"({kb[:16]!r})") from None

    def _scan(self):
        """(key bytes, value bytes) pairs by HSCAN, each key once."""
        self._check()
        seen = set()
        cursor = 0
        while True:
            cursor, part = self._run(lambda c: c.hscan(self._hkey, cursor, count=1000), "an HSCAN")
            for kb, raw in part.items():
                if kb not in seen:
                    seen.add(kb)
                    yield kb, raw
            if cursor == 0:
                return

    def __iter__(self):
        for kb, _ in self._scan():
            yield self._decode_key(kb)

    def keys(self):
        return super().keys()

    def items(self):
        return _ItemsView(self)

    def values(self):
        return _ValuesView(self)

    def _iter_items(self):
        for kb, raw in self._scan():
            yield self._decode_key(kb), self._decode(raw)

    def __len__(self) -> int:
        self._check()
        return self._run(lambda c: c.hlen(self._hkey), "HLEN")

    def copy(self) -> dict:
        """A plain ``dict`` with the same items (one ``HGETALL``)."""
        self._check()
        raw = self._run(lambda c: c.hgetall(self._hkey), "HGETALL")
        return {self._decode_key(k): self._decode(v) for k, v in raw.items()}

    def __eq__(self, other):
        if isinstance(other, (RedisDict, Mapping)):
            return self.copy() == dict(other.items())
        return NotImplemented

    __hash__ = None

    # -- lifetime -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def url(self) -> str:
        return self._b.shown

    def stats(self) -> RedisDictStats:
        self._check()
        p = self._h._zset()

        def go(c):
            sec, usec = c.time()
            pipe = c.pipeline(transaction=False)
            pipe.hlen(self._hkey)
            pipe.zcount(p, sec * 1000 + usec // 1000, "+inf")
            pipe.memory_usage(self._hkey)
            return pipe.execute()
        n, parts, mem = self._run(go, "stats")
        return RedisDictStats(name=self._name, keys=n, codec=self._codec.name, participants=parts,
                              bytes_used=mem or 0, url=self._b.shown)

    def kernel(self):
        raise TypeError("kernel(): a SharedDict on Redis has no shared memory for @njit code")

    def __repr__(self):
        if self._closed:
            return "<shm.redis.SharedDict closed>"
        return f"<shm.redis.SharedDict {self._name!r} codec={self._codec.name} at {self._b.shown}>"

    def __reduce__(self):
        self._check()
        member = new_member()
        h = self._h
        self._b.renew_all([(h._meta_key, h._zset(), member)])
        ns = self._nsref
        return _rebuild, (ns.url, ns.opts, self._name, self._codec.name, member)

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
        """Give this handle's lease back (idempotent); the last handle out deletes the dict."""
        if self._closed:
            return
        self._closed = True
        self._h.close()

    def unlink(self) -> None:
        """Delete the dict from Redis now (other handles then see an empty dict)."""
        self._nsref.unlink(self._name)


class _Lease(HandleBase):
    """The dict's lease (a separate object, so the dict's own attributes stay the dict's)."""

    _kind = "dict"

    def __init__(self, d):
        self._d = weakref.ref(d)

    def _zset(self):
        return self._base + ":p"

    def close(self):
        if self._closed:
            return
        self._closed = True
        d = self._d()
        if d is not None:
            d._closed = True
        b = self._b
        b.drop(self)
        if not self._registered:
            return
        keys = [self._base, self._base + ":p", self._base + ":h", self._ops]
        try:
            b.eval(CLOSE, keys, [b.lease_ms, self._member, *self._fields.values()], "closing", retry=False)
        except Exception:
            pass        # the server is unreachable: the lease expires by itself


def _rebuild(url, opts, name, codec, member):
    from ._redis import namespace
    cls = namespace(url, opts).SharedDict
    self = cls.__new__(cls)
    self._setup(name, codec, member, True)
    return self


class _ItemsView(ItemsView):
    def __iter__(self):
        return self._mapping._iter_items()


class _ValuesView(ValuesView):
    def __iter__(self):
        for _, v in self._mapping._iter_items():
            yield v
