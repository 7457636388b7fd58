"""The Redis backend's connection: retries, server-side scripts, leases, fork and exit.

``shm.connect("redis://host:6379/0")`` returns a ``RedisNamespace`` whose
constructors (``bounded``, ``unbounded``, ``Queue``, ``SharedDict``,
``Sender.open`` ...) make the same handles as the local library, kept in
Redis instead of shared memory: channels in ``shm/_redis_channel.py``, the
dict in ``shm/_redis_dict.py``. This module is what they share.

Design notes
------------

**Keys.** Everything of a structure named ``N`` lives under ``shm:{N}``
(the braces are a Redis Cluster hash tag: all of a structure's keys hash to
one slot, so its scripts may touch them together):

==================  =====  ====================================================
``shm:{N}``         hash   meta: kind (channel/dict), flavor, capacity, codec
``shm:{N}:q``       stream a channel's messages, consumer group ``g``
``shm:{N}:tx/rx``   zset   a channel's sender/receiver handles -> lease expiry
``shm:{N}:p``       zset   a dict's handles -> lease expiry
``shm:{N}:h``       hash   a dict's items (canonical key bytes -> value bytes)
``shm:{N}:ops``     hash   the last reply of each handle's thread (see below)
==================  =====  ====================================================

**Leases instead of a participant table.** The local library sees a dead
peer through its pid. Across machines there is no pid to look at, so each
handle holds a *lease*: a member of a sorted set whose score is the server's
clock (``TIME``, so the hosts' clocks never matter) plus ``lease`` seconds
(10 by default). One daemon thread per process renews every lease of that
process every ``lease / 5`` seconds, in one pipelined round trip. A closed
handle removes its member at once; a killed or partitioned process's
members expire after at most ``lease`` seconds, and then it no longer counts
as a sender, receiver or participant. That is the whole of disconnection on
Redis: *as far as it can be observed*, within ``lease`` seconds, with no
false alarm while a process is only slow (its thread keeps renewing).

**The last handle out deletes**, as locally: a ``close`` that leaves no live
lease deletes every key of the structure in the same script. A structure
whose processes were all killed stays in Redis until ``ns.unlink(name)``
(as a local one stays in ``/dev/shm`` until ``python -m shm gc``): nothing
expires on its own, because a TTL would also delete messages that a
consumer simply had not come back for yet.

**Retries that never apply an operation twice.** redis-py retries a
command on a dropped connection by default, which for ``XADD`` or
``HINCRBY`` means applying it twice when only the reply was lost. Its own
retries are turned off here; ``Backend.run`` retries instead, with
exponential backoff (20 ms doubling to 1 s) for up to ``retry_for`` seconds
(10 by default), then raises ``BackendUnavailable``. Every operation that is
not idempotent is a script that takes a per-thread sequence number and
stores its reply in ``shm:{N}:ops`` (Lua ``once``): a retry with the same
number gets the stored reply instead of running again. So a send retried
after a lost reply is not duplicated, an ``incr`` is not counted twice, a
``pop`` retried does not lose the value, and a receiver's acknowledgement
retried still returns the messages it acknowledged.

**Fork and pickling.** Handles carry the URL, their options and the
structure's name, never a connection: a connection pool is made on first use
in each process (and again after a fork). Before a fork, the parent renews
a fresh lease for each of its handles *for the child* (one pipelined round
trip), so a parent that closes its end right after ``Process.start()``
never disconnects a channel the child has not touched yet. In a
``multiprocessing`` child, inherited handles that are not reachable from the
``Process`` object give their lease back (as the local library keeps only
the roles a child was given), and register again if used. A pickled handle
carries a lease taken when it was pickled, which the unpickler adopts.

Rejected: one connection per handle (a process with hundreds of handles
would hold hundreds of sockets; a pool shares them); keyspace notifications
to detect disconnection (not delivered to a client that is itself
partitioned, and off by default); client-side clocks for leases (hosts'
clocks drift; ``TIME`` in a script is one clock).
"""
from __future__ import annotations

import atexit
import hashlib
import itertools
import os
import secrets
import threading
import time
import urllib.parse
import weakref

from .errors import AccessDenied, BackendUnavailable

__all__ = ["Backend", "RedisNamespace", "redis_module", "display_url"]

DEFAULTS = {"lease": 10.0, "retry_for": 10.0, "claim_after": 30.0}

_redis = None


def redis_module():
    """The ``redis`` package, imported on first use (the library imports without it)."""
    global _redis
    if _redis is None:
        try:
            import redis
            import redis.exceptions  # noqa: F401
        except ImportError:
            raise ImportError("shm.connect('redis://...') needs the redis client: pip install 'shm[redis]' "
                              "(or pip install redis)") from None
        _redis = redis
    return _redis


def _no_script():
    return redis_module().exceptions.NoScriptError


def _auth_errors():
    exc = redis_module().exceptions
    return (exc.AuthenticationError, exc.AuthenticationWrongNumberOfArgsError)


_RETRYABLE = None


def _retryable():
    """The errors a retry may cure (not authentication: AuthenticationError is a ConnectionError)."""
    global _RETRYABLE
    if _RETRYABLE is None:
        exc = redis_module().exceptions
        _RETRYABLE = (exc.ConnectionError, exc.TimeoutError, exc.BusyLoadingError, exc.TryAgainError,
                      exc.ReadOnlyError)
    return _RETRYABLE


def display_url(url: str) -> str:
    """``url`` without its password (for messages and reprs)."""
    try:
        p = urllib.parse.urlsplit(url)
        if p.password:
            user = p.username or ""
            host = p.hostname or ""
            if p.port:
                host = f"{host}:{p.port}"
            return urllib.parse.urlunsplit((p.scheme, f"{user}:***@{host}", p.path, p.query, p.fragment))
    except ValueError:
        pass
    return url


def new_member() -> str:
    """A lease member: host, pid and 48 random bits (readable in ``ZRANGE``, unique everywhere)."""
    return f"{os.uname().nodename[:24]}:{os.getpid()}:{secrets.token_hex(6)}"


def bulk(b: bytes) -> bytes:
    """``b`` as one argument of a command in the wire protocol (RESP bulk string)."""
    return b"$%d\r\n%b\r\n" % (len(b), b)


# --------------------------------------------------------------------------
# Server-side scripts. Times are milliseconds of the server's clock.

_LUA_PRELUDE = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function once(ops, field, seq, fn)
  local prev = redis.call('HGET', ops, field)
  if prev and string.byte(prev, 1) ~= 0 then
    local p = cmsgpack.unpack(prev)
    if type(p) == 'table' and p[1] == seq then return p[2] end
  end
  local r = fn()
  redis.call('HSET', ops, field, cmsgpack.pack({seq, r}))
  return r
end
-- once() for a number or string reply, kept as text (cheaper than cmsgpack on the hot
-- paths): a replay returns it as a string. A false reply is not kept.
local function once_s(ops, field, seq, fn)
  local tag = '\0' .. seq .. ' '
  local prev = redis.call('HGET', ops, field)
  if prev and string.sub(prev, 1, #tag) == tag then return string.sub(prev, #tag + 1) end
  local r = fn()
  if r then redis.call('HSET', ops, field, tag .. r) end
  return r
end
local SUFFIXES = {':q', ':tx', ':rx', ':p', ':h', ':ops'}
local function disarm(base)
  redis.call('PERSIST', base)
  for _, s in ipairs(SUFFIXES) do redis.call('PERSIST', base .. s) end
end
"""

# KEYS: meta, zset; ARGV: kind, lease_ms, member -> {0} | {-1, kind} | {1, meta...}
ATTACH = """
local kind = redis.call('HGET', KEYS[1], 'kind')
if not kind then return {0} end
if kind ~= ARGV[1] then return {-1, kind} end
redis.call('ZADD', KEYS[2], now() + tonumber(ARGV[2]), ARGV[3])
local out = {1}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do out[#out + 1] = v end
return out
"""

# KEYS: meta, zset; ARGV: lease_ms, member... -> 0 if the structure is gone
RENEW = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = now() + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[2], t, ARGV[i]) end
if redis.call('PTTL', KEYS[1]) >= 0 then disarm(KEYS[1]) end
return 1
"""

# The close scripts' end, for channels and dicts: delete everything if no
# lease is left, else arm a timer that deletes it after the last lease left
# would expire, disarmed by the next renewal (so handles whose process was
# killed, or that were pickled and never unpickled, do not keep it forever).
# ARGV[1] of the caller is the lease in ms; zsets: the structure's lease sets.
_LUA_LAST_OUT = """
local function last_out(base, zsets, lease)
  local t = now()
  local latest = 0
  for _, z in ipairs(zsets) do
    redis.call('ZREMRANGEBYSCORE', z, '-inf', '(' .. t)
    local top = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
    if #top > 0 and tonumber(top[2]) > latest then latest = tonumber(top[2]) end
  end
  local keys = {base}
  for _, s in ipairs(SUFFIXES) do keys[#keys + 1] = base .. s end
  if latest == 0 then
    redis.call('DEL', unpack(keys))
    return 1
  end
  for _, k in ipairs(keys) do redis.call('PEXPIREAT', k, latest + lease) end
  return 0
end
"""

# KEYS: zset; ARGV: member
RELEASE = """
return redis.call('ZREM', KEYS[1], ARGV[1])
"""


class Backend:
    """One process's connection to one Redis URL: a pool, the scripts, the lease thread."""

    def __init__(self, url: str, opts: dict):
        self.url = url
        self.shown = display_url(url)
        self.opts = opts
        self.lease = float(opts["lease"])
        self.lease_ms = int(self.lease * 1000)
        self.retry_for = float(opts["retry_for"])
        self._scripts = {}
        self._pid = -1
        self._client = None
        self._lock = threading.Lock()
        self._leases: dict[int, tuple] = {}       # id(handle) -> (meta key, zset key, member)
        self._thread = None
        self._wake = threading.Event()
        _BACKENDS.add(self)

    # -- the client ----------------------------------------------------------
    def client(self):
        c = self._client
        if c is not None and self._pid == os.getpid():
            return c
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                r = redis_module()
                from redis.backoff import NoBackoff
                from redis.retry import Retry
                self._client = r.Redis.from_url(
                    self.url, socket_timeout=max(5.0, self.lease), socket_connect_timeout=2.0,
                    retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0,
                    decode_responses=False, single_connection_client=False)
                self._scripts = {}
                self._pid = os.getpid()
            return self._client

    def script(self, src: str):
        """A registered script (EVALSHA, loaded again by redis-py after a server restart)."""
        s = self._scripts.get(src)
        if s is None:
            s = self.client().register_script(_LUA_PRELUDE + (_LUA_LAST_OUT if "last_out(" in src else "") + src)
            self._scripts[src] = s
        return s

    def eval(self, src: str, keys: list, args: list, what: str, on_retry=None, retry: bool = True):
        """Run the script ``src`` (EVALSHA; loaded again after a server restart), with ``run``'s retries
        (``retry=False``: one attempt, for closing, which must not hold up an exit while the server is down)."""
        s = self.script(src)
        cmd = ["EVALSHA", s.sha, len(keys), *keys, *args]

        def go(c):
            try:
                return c.execute_command(*cmd)
            except _no_script():
                s.sha = cmd[1] = c.script_load(s.script)
                return c.execute_command(*cmd)
        if not retry:
            return go(self.client())
        return self.run(go, what=what, on_retry=on_retry)

    # -- pre-packed scripts (the hottest calls) ---------------------------------
    def packed_head(self, src: str, nargs: int, keys: list, fixed: list) -> bytes:
        """The start of an ``EVALSHA`` of ``src`` (run as it is, without the prelude) in the wire
        protocol: the command, the sha, ``keys`` and the first arguments ``fixed``, for a call with
        ``nargs`` arguments in all. Append the others with ``bulk`` and pass it to ``run_packed``."""
        sha = hashlib.sha1(src.encode()).hexdigest()
        parts = [b"*%d\r\n" % (3 + len(keys) + nargs), bulk(b"EVALSHA"), bulk(sha.encode()),
                 bulk(b"%d" % len(keys))]
        parts += [bulk(x if type(x) is bytes else str(x).encode()) for x in (*keys, *fixed)]
        return b"".join(parts)

    def run_packed(self, packet: bytes, src: str, what: str):
        """Send ``packet`` (from ``packed_head``) and return the reply, with ``run``'s retries: the
        same bytes, so the same sequence number, on every attempt. Straight on a pooled connection,
        skipping redis-py's per-command layers (argument packing, its retry wrapper, per-command
        metrics), which cost more than the server's work on a call this small."""
        out = [packet]

        def go(c):
            pool = c.connection_pool
            try:
                conn = pool.get_connection()
            except TypeError:                           # redis-py before 5.3 wants a command name
                conn = pool.get_connection("EVALSHA")
            try:
                try:
                    conn.send_packed_command(out, check_health=False)
                    return conn.read_response()
                except _no_script():                    # a restarted or flushed server: load it again
                    c.script_load(src)
                    conn.send_packed_command(out, check_health=False)
                    return conn.read_response()
            finally:
                pool.release(conn)          # a connection that failed is disconnected by redis-py: it
                                            # connects again on its next use
        return self.run(go, what=what)

    # -- retries ---------------------------------------------------------------
    def run(self, fn, *args, what: str = "the operation", on_retry=None):
        """``fn(client, *args)``, retried with backoff while the server cannot be reached.

        ``fn`` must be safe to repeat (idempotent, or a ``once`` script with
        the same sequence number). ``on_retry()`` is called before each retry.
        """
        try:
            return fn(self.client(), *args)       # the fast path: no loop, no bookkeeping
        except BaseException as e:
            if not isinstance(e, _retryable()):
                raise
            err = e
        start = time.monotonic()
        delay = 0.02
        while True:
            if isinstance(err, _auth_errors()):
                raise AccessDenied(f"Redis at {self.shown} refused our credentials ({err}): check the user "
                                   "and password in the URL (redis://user:password@host:port/db)") from None
            t = time.monotonic()
            if t - start >= self.retry_for:
                raise BackendUnavailable(
                    f"Redis at {self.shown} could not be reached for {t - start:.1f} s while doing "
                    f"{what} (last error: {type(err).__name__}: {err}). Nothing acknowledged was lost; the "
                    "operation may not have been applied and can be called again once the server is back: "
                    "check that redis-server is running and reachable, or give it longer with "
                    "shm.connect(url, retry_for=SECONDS)") from None
            time.sleep(min(delay, max(0.0, self.retry_for - (t - start))))
            delay = min(delay * 2, 1.0)
            if on_retry is not None:
                on_retry()
            try:
                return fn(self.client(), *args)
            except _retryable() as e:
                err = e

    # -- leases ----------------------------------------------------------------
    def attach(self, kind: str, meta_key: str, zset: str, member: str, name: str):
        """Take a lease on the structure; return its meta fields (dict of str)."""
        from .errors import SegmentNotFound, WrongKind
        s = self.script(ATTACH)
        r = self.run(lambda c: s(keys=[meta_key, zset], args=[kind, self.lease_ms, member], client=c),
                     what=f"opening {name!r}")
        if r[0] == 0:
            raise SegmentNotFound(2, f"Redis at {self.shown} has no {_KIND_WORDS[kind]} named {name!r}")
        if r[0] == -1:
            raise WrongKind(f"{name!r} in Redis at {self.shown} is a {r[1].decode()}, not a {_KIND_WORDS[kind]}")
        it = iter(r[1:])
        return {k.decode(): v.decode() for k, v in zip(it, it)}

    def hold(self, handle, meta_key: str, zset: str, member: str) -> None:
        """Renew this lease from the lease thread until ``drop``."""
        with self._lock:
            self._leases[id(handle)] = (meta_key, zset, member)
        self._ensure_thread()

    def drop(self, handle) -> None:
        with self._lock:
            self._leases.pop(id(handle), None)

    def release(self, zset: str, member: str) -> None:
        """Give one lease back now (best effort, no retries)."""
        s = self.script(RELEASE)
        try:
            s(keys=[zset], args=[member], client=self.client())
        except Exception:
            pass

    def _ensure_thread(self) -> None:
        t = self._thread
        if t is not None and t.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._wake = threading.Event()
                self._thread = threading.Thread(target=self._renew_loop, args=(weakref.ref(self), self._wake),
                                                name="shm-redis-leases", daemon=True)
                self._thread.start()

    @staticmethod
    def _renew_loop(ref, wake):
        # Every lease was just taken (creation, open, pickling, the parent's plan
        # for a forked child), so the first renewal waits one period: a
        # multiprocessing child gives back what it was not given before then.
        wait = ref().lease / 5
        while not wake.wait(wait):
            self = ref()
            if self is None:
                return
            every = self.lease / 5
            ok = self.renew_all()
            del self
            # After a failure, try again soon: the leases must be back before they expire.
            wait = every if ok else min(0.2, every)

    def renew_all(self, leases=None) -> bool:
        """Renew every lease held (or ``leases``) in one pipelined round trip; False if it failed."""
        if leases is None:
            with self._lock:
                leases = list(self._leases.values())
        if not leases:
            return True
        groups: dict[tuple, list] = {}
        for meta, zset, member in leases:
            groups.setdefault((meta, zset), []).append(member)
        try:
            s = self.script(RENEW)
            c = self.client()
            if not c.script_exists(s.sha)[0]:
                s.sha = c.script_load(s.script)
            p = c.pipeline(transaction=False)
            for (meta, zset), members in groups.items():
                p.evalsha(s.sha, 2, meta, zset, self.lease_ms, *members)
            p.execute()
            return True
        except Exception:
            return False

    # -- fork --------------------------------------------------------------------
    def before_fork(self) -> dict:
        """Leases for a child about to be forked: {id(handle): member}, registered now."""
        with self._lock:
            leases = dict(self._leases)
        if not leases or self._pid != os.getpid():
            return {}
        plan = {hid: (meta, zset, new_member()) for hid, (meta, zset, _) in leases.items()}
        self.renew_all(list(plan.values()))
        return {hid: m for hid, (_, _, m) in plan.items()}

    def after_fork_child(self) -> None:
        self._lock = threading.Lock()
        self._client = None
        self._pid = -1
        self._thread = None
        self._scripts = {}
        self._leases = {}


_KIND_WORDS = {"channel": "channel", "dict": "SharedDict"}
_BACKENDS: "weakref.WeakSet[Backend]" = weakref.WeakSet()


# --------------------------------------------------------------------------
# Handles: process lifetime (exit, fork, multiprocessing children).

_HANDLES: "weakref.WeakSet" = weakref.WeakSet()      # every open Redis handle of this process
_FORK_PLAN: dict = {}


class HandleBase:
    """What Redis handles (senders, receivers, dicts) share: lease, sequence numbers, lifetime.

    A subclass sets ``_kind`` ("channel" or "dict") and implements
    ``_zset()`` (the key of its lease set) and ``_meta_key``.
    """

    _b = None
    _member = None
    _registered = False
    _closed = True

    def _init_handle(self, ns, name: str, member: str | None, registered: bool):
        self._ns = ns
        self._b = ns._backend
        self._name = name
        self._base = f"shm:{{{name}}}"
        self._meta_key = self._base
        self._ops = self._base + ":ops"
        self._member = member or new_member()
        self._registered = registered
        self._closed = False
        self._seq = itertools.count(1)
        self._fields: dict[int, str] = {}
        _HANDLES.add(self)
        self._b.hold(self, self._meta_key, self._zset(), self._member)

    # a per-thread field in shm:{N}:ops, and the next sequence number
    def _op(self):
        ident = threading.get_ident()
        f = self._fields.get(ident)
        if f is None:
            f = self._fields[ident] = f"{self._member}/{ident}"
        return f, str(next(self._seq))

    def _register(self) -> None:
        """Take the lease again (an inherited handle used for the first time)."""
        self._member = new_member()
        self._b.attach(self._kind, self._meta_key, self._zset(), self._member, self._name)
        self._b.hold(self, self._meta_key, self._zset(), self._member)
        self._registered = True

    def _forget_lease(self) -> None:
        """In a multiprocessing child that was not given this handle: give its lease back."""
        self._registered = False
        self._b.drop(self)
        self._b.release(self._zset(), self._member)

    def _after_fork_child(self, member) -> None:
        self._fields = {}
        if member is None:
            self._registered = False
        else:
            self._member = member
            self._b.hold(self, self._meta_key, self._zset(), member)


def _before_fork():
    global _FORK_PLAN
    plan = {}
    for b in list(_BACKENDS):
        try:
            plan.update(b.before_fork())
        except Exception:
            pass
    _FORK_PLAN = plan


def _after_fork_parent():
    global _FORK_PLAN
    _FORK_PLAN = {}


def _after_fork_child():
    global _FORK_PLAN
    plan, _FORK_PLAN = _FORK_PLAN, {}
    for b in list(_BACKENDS):
        b.after_fork_child()
    for h in list(_HANDLES):
        if not h._closed:
            try:
                h._after_fork_child(plan.get(id(h)))
            except Exception:
                pass


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child)


def _reachable(root, limit: int = 20000) -> set:
    """ids of the Redis handles reachable from ``root`` (containers and attributes)."""
    found, seen, stack = set(), set(), [root]
    while stack and len(seen) < limit:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, HandleBase):
            found.add(id(o))
            continue
        if isinstance(o, (tuple, list, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (str, bytes, bytearray, int, float, complex, bool, type(None), memoryview, type)):
            continue
        elif hasattr(o, "__self__"):
            stack.append(o.__self__)
        else:
            d = getattr(o, "__dict__", None)
            if isinstance(d, dict):
                stack.extend(d.values())
    return found


def _mp_after_fork(_):
    """In a multiprocessing child: keep the leases of the handles it was given, give back the others."""
    try:
        import multiprocessing
        keep = _reachable(multiprocessing.current_process().__dict__)
    except Exception:
        return
    for h in list(_HANDLES):
        if not h._closed and h._registered and id(h) not in keep:
            try:
                h._forget_lease()
            except Exception:
                pass


class _MpHook:
    pass


_mp_hook = _MpHook()
try:
    from multiprocessing import util as _mp_util
    _mp_util.register_after_fork(_mp_hook, _mp_after_fork)
except ImportError:  # pragma: no cover
    pass


def close_all() -> None:
    """Close every Redis handle of this process (at exit: leases given back, last one out deletes)."""
    for h in list(_HANDLES):
        try:
            h.close()
        except Exception:
            pass


def _install_exit_hooks():
    atexit.register(close_all)
    # multiprocessing children leave through os._exit(); the local library runs
    # its EXIT_HOOKS from a multiprocessing finalizer there.
    from . import _chan
    _chan.EXIT_HOOKS.append(close_all)


_install_exit_hooks()


# --------------------------------------------------------------------------
# The namespace.

_NAMESPACES: dict = {}


def namespace(url: str, opts: dict) -> "RedisNamespace":
    """This process's namespace for ``url`` and ``opts`` (one pool per URL and options)."""
    key = (url, tuple(sorted(opts.items())))
    ns = _NAMESPACES.get(key)
    if ns is None:
        ns = _NAMESPACES[key] = RedisNamespace._make(url, opts)
    return ns


class RedisNamespace:
    """``shm.connect("redis://...")``: the library's constructors, on Redis.

    ``bounded(n)``, ``unbounded()``, ``Queue(maxsize)``, ``SharedDict()``,
    ``Sender.open(name)``, ``Receiver.open(name)``, ``SharedDict.open(name)``,
    ``Queue.open(name)``, ``unlink(name)``. Picklable (by URL and options).
    """

    kind = "redis"

    def __init__(self, *a, **k):
        raise TypeError("use shm.connect('redis://host:port/db')")

    @classmethod
    def _make(cls, url: str, opts: dict) -> "RedisNamespace":
        from . import _redis_channel as C
        from . import _redis_dict as D
        self = object.__new__(cls)
        self.url = url
        self.opts = dict(opts)
        self._backend = Backend(url, self.opts)
        attrs = {"_nsref": self, "__module__": __name__}
        self.Sender = type("Sender", (C.RedisSender,), dict(attrs))
        self.Receiver = type("Receiver", (C.RedisReceiver,), dict(attrs))
        self.Queue = type("Queue", (C.RedisQueue,), dict(attrs))
        self.SharedDict = type("SharedDict", (D.RedisDict,), dict(attrs))
        return self

    def bounded(self, capacity: int, *, name: str | None = None, codec: str = "msgpack",
                slot_size: int | None = None):
        """A channel holding at most ``capacity`` messages (counted until a receiver has decoded them)."""
        from . import _redis_channel as C
        return C.make_channel(self, "bounded", capacity, name, codec)

    def unbounded(self, *, name: str | None = None, codec: str = "msgpack", slot_size: int | None = None):
        """A channel whose ``send`` never blocks (bounded by the server's memory)."""
        from . import _redis_channel as C
        return C.make_channel(self, "unbounded", 0, name, codec)

    def rendezvous(self, *, name: str | None = None, codec: str = "msgpack", slot_size: int | None = None):
        raise ValueError("rendezvous channels (capacity 0) are not available on Redis: a send cannot wait for a "
                         "receiver's take in one server round trip; use bounded(1)")

    def unlink(self, name: str) -> bool:
        """Delete every key of the structure ``name`` now, whoever still has it open. True if it existed."""
        from .segment import check_name
        name = check_name(name)
        base = f"shm:{{{name}}}"
        keys = [base] + [base + s for s in (":q", ":tx", ":rx", ":p", ":h", ":ops")]
        return bool(self._backend.run(lambda c: c.delete(*keys), what=f"unlinking {name!r}"))

    def ping(self) -> float:
        """Seconds for one round trip to the server (raises BackendUnavailable if it is down)."""
        t = time.perf_counter()
        self._backend.run(lambda c: c.ping(), what="PING")
        return time.perf_counter() - t

    def __reduce__(self):
        return _connect_opts, (self.url, self.opts)

    def __repr__(self):
        return f"<shm namespace {self._backend.shown}>"


def _connect_opts(url, opts):
    from ._connect import connect
    return connect(url, **opts)


def check_opts(opts: dict) -> dict:
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"shm.connect(): unknown option(s) {sorted(unknown)}; options are {sorted(DEFAULTS)}")
    out = dict(DEFAULTS)
    for k, v in opts.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"shm.connect(): {k} must be a positive number of seconds, not {v!r}")
        out[k] = float(v)
    return out


__all__ += ["HandleBase", "close_all", "namespace", "check_opts", "new_member"]
