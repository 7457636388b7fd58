"""shm: a shared-memory data plane for Python multiprocessing.

Lock-free MPMC channels and a sharded concurrent dict in POSIX shared
memory, driven by numba-compiled atomic kernels (``kernels``), so separate
processes exchange messages and share maps with no pipe and no manager
process in the way.

>>> import shm
>>> tx, rx = shm.bounded(128)
>>> tx.send([1, 2, 3]); rx.recv()
[1, 2, 3]

See README.md for the tour.
"""
from .channel import ChannelStats, MessageView, Receiver, Sender, bounded, rendezvous, unbounded
from .queues import JoinableQueue, Queue, SimpleQueue
from ._select import select, select_async
from .errors import (AccessDenied, BrokenBarrier, Closed, CorruptSegment, DecodeError, Disconnected, Empty, EncodeError, Full,
                     IncompatibleSegment, MessageTooLarge, OutOfSharedMemory, SegmentError,
                     SegmentExists, SegmentNotFound, SelectTimeout, ShmError, TooManyParticipants, WrongKind,
                     WorkerLost, BrokenPool)
from .errors import Lagged
from .errors import BackendUnavailable

__version__ = "0.1.0"


_SYNC = ("AtomicInt", "AtomicFloat", "Lock", "RLock", "RWLock", "Semaphore", "BoundedSemaphore", "Event",
         "Condition", "Barrier", "WaitGroup", "Notify")


_BROADCAST = ("broadcast", "BroadcastSender", "BroadcastReceiver", "watch", "Watch", "oneshot",
              "OneshotSender", "OneshotReceiver")


_POOL = ("Pool", "join", "AsyncResult")


def __getattr__(name):
    if name == "connect":
        from ._connect import connect   # shm.connect(url): the same API on shared memory or Redis
        return connect
    if name in _BROADCAST:
        from . import _broadcast        # its kernels load on first use
        return getattr(_broadcast, name)
    # SharedDict's kernels are compiled (first run) or loaded (cached) when
    # it is first used, so a program that only uses channels never pays for them.
    if name in ("SharedDict", "DictStats"):
        from . import dict as _dict
        return getattr(_dict, name)
    if name in _POOL:
        from . import pool as _pool      # the pool's kernels load on first use
        return getattr(_pool, name)
    if name in _SYNC:
        from . import sync as _sync      # the primitives' kernels load on first use too
        return getattr(_sync, name)
    raise AttributeError(f"module 'shm' has no attribute {name!r}")

__all__ = [*_SYNC, "BrokenBarrier",
    "bounded", "unbounded", "rendezvous", "Sender", "Receiver", "ChannelStats", "MessageView",
    "Queue", "SimpleQueue", "JoinableQueue", "SharedDict", "DictStats",
    "ShmError", "Empty", "Full", "Disconnected", "Closed", "EncodeError", "DecodeError",
    "MessageTooLarge", "SegmentError", "SegmentNotFound", "SegmentExists", "IncompatibleSegment",
    "CorruptSegment", "WrongKind", "OutOfSharedMemory", "TooManyParticipants", "AccessDenied",
    "connect", "BackendUnavailable",
    "select", "select_async", "SelectTimeout", "Lagged", *_BROADCAST, *_POOL, "WorkerLost", "BrokenPool",
]
