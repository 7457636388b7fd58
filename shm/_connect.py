"""``shm.connect(url)``: one program, on shared memory or on Redis.

>>> import shm
>>> ns = shm.connect()                          # or shm.connect("shm://"): this machine's shared memory
>>> ns = shm.connect("redis://db.internal:6379/0")   # the same constructors, across machines
>>> tx, rx = ns.bounded(1024, name="jobs")
>>> counts = ns.SharedDict(name="counts")
>>> rx2 = ns.Receiver.open("jobs")              # from any process on any host that reaches the server

A namespace has ``bounded``, ``unbounded``, ``rendezvous``, ``Queue``,
``SharedDict``, ``Sender``, ``Receiver`` (``.open(name)`` on the last four)
and ``url``. Code written against a namespace runs on either backend, and a
namespace pickles (by URL), so it can be handed to worker processes.

Design notes
------------

**A namespace object, not a global switch.** A process may use both
backends at once (shared memory between the workers of one host, Redis
between hosts), so the backend is chosen per call site by the namespace the
code was given, not by a setting. The local namespace is a thin object over
the module's own functions and classes: code that uses it pays nothing.

**URLs.** ``redis://[[user]:password@]host[:port][/db]`` and ``rediss://``
(TLS), parsed by redis-py; ``unix:///path/to/redis.sock?db=0`` too.
Options are keywords, not query parameters, so that redis-py's own query
parameters keep their meaning: ``lease`` (seconds a dead process still
counts as a peer, default 10), ``retry_for`` (seconds of reconnecting before
``BackendUnavailable``, default 10), ``claim_after`` (seconds an entry may
stay pending with a live but stalled receiver before another claims it,
default 30). Every handle of one structure should use the same ``lease``.

**The redis client is optional** (``pip install 'shm[redis]'``): it is
imported by the first Redis operation, so ``import shm`` works without it.

Rejected: a ``backend=`` argument on every constructor (every call site
would change when a program moves to Redis); an environment variable
choosing the backend (the two backends differ in what they guarantee,
which a reader of the code should see).
"""
from __future__ import annotations

__all__ = ["connect", "LocalNamespace", "LOCAL"]

_LOCAL_URLS = (None, "", "shm://", "shm:", "shm")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def connect(url: str | None = None, **opts):
    """The namespace for ``url``: ``"shm://"`` (or nothing) for shared memory, ``"redis://..."`` for Redis.

    Options (Redis only): ``lease=10``, ``retry_for=10``, ``claim_after=30`` seconds.
    Nothing is contacted until the first operation.
    """
    if url in _LOCAL_URLS:
        if opts:
            raise TypeError(f"shm.connect('shm://') takes no options (got {sorted(opts)})")
        return LOCAL
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in _REDIS_SCHEMES:
        from . import _redis
        _redis.redis_module()           # a clear ImportError now if the client is missing
        return _redis.namespace(url, _redis.check_opts(opts))
    raise ValueError(f"unknown backend URL {url!r}: use 'shm://' (this machine's shared memory), "
                     "'redis://host:port/db', 'rediss://...' (TLS) or 'unix:///path/redis.sock'")


class LocalNamespace:
    """``shm.connect("shm://")``: the module's own constructors (shared memory on this machine)."""

    url = "shm://"
    kind = "shm"

    @property
    def bounded(self):
        from .channel import bounded
        return bounded

    @property
    def unbounded(self):
        from .channel import unbounded
        return unbounded

    @property
    def rendezvous(self):
        from .channel import rendezvous
        return rendezvous

    @property
    def Sender(self):
        from .channel import Sender
        return Sender

    @property
    def Receiver(self):
        from .channel import Receiver
        return Receiver

    @property
    def Queue(self):
        from .queues import Queue
        return Queue

    @property
    def SharedDict(self):
        from .dict import SharedDict        # its kernels load on first use
        return SharedDict

    def __reduce__(self):
        return connect, ("shm://",)

    def __repr__(self):
        return "<shm namespace shm:// (shared memory on this machine)>"


LOCAL = LocalNamespace()
