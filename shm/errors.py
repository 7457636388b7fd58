"""Every error shm raises, under one base class.

Errors say who caused them, as trio's do:

* ``Closed``: *you* closed this handle, then used it.
* ``Disconnected``: the *other side* is gone: every receiver (for a send) or
  every sender (for a receive, once the queue is drained) has closed its
  handle or its process has died.
* ``Empty``/``Full``: the operation would block (or its timeout passed).
  They subclass ``queue.Empty``/``queue.Full`` so code written for the
  standard library's queues catches them unchanged.

A failed send carries the message it did not send (``err.message``), as
flume's ``SendError(msg)`` does, so nothing is lost.
"""
from __future__ import annotations

import queue
import threading

__all__ = [
    "ShmError", "Empty", "Full", "Disconnected", "Closed",
    "EncodeError", "DecodeError", "MessageTooLarge",
    "SegmentError", "SegmentNotFound", "SegmentExists", "AccessDenied", "IncompatibleSegment",
    "CorruptSegment", "WrongKind", "OutOfSharedMemory", "TooManyParticipants", "BrokenBarrier", "SelectTimeout", "Lagged",
    "BackendUnavailable",
]


class ShmError(Exception):
    """Base class of every error raised by shm."""


class Empty(ShmError, queue.Empty):
    """Nothing to receive (``try_recv``, or ``recv`` after its timeout)."""


class Full(ShmError, queue.Full):
    """No room to send (``try_send``, or ``send`` after its timeout).

    ``message`` is the object that was not sent.
    """

    def __init__(self, msg: str = "channel is full", message=None):
        super().__init__(msg)
        self.message = message


class Disconnected(ShmError):
    """The other side is gone.

    Raised by a send when no receiver is left, and by a receive when no
    sender is left and everything queued has been received. A failed send
    carries the unsent object as ``message``.
    """

    def __init__(self, msg: str = "the other side of the channel is gone", message=None):
        super().__init__(msg)
        self.message = message


class Closed(ShmError):
    """This handle was closed by your code and cannot be used any more."""


class EncodeError(ShmError, TypeError):
    """The channel's codec cannot encode this object. Nothing was sent."""


class DecodeError(ShmError, ValueError):
    """A received message could not be decoded with the channel's codec."""


class MessageTooLarge(ShmError, ValueError):
    """A message is larger than this structure can ever hold."""


class SegmentError(ShmError, OSError):
    """A problem with a shared-memory segment."""


class SegmentNotFound(SegmentError, FileNotFoundError):
    """No shared-memory segment has this name (or it was unlinked)."""


class SegmentExists(SegmentError, FileExistsError):
    """A shared-memory segment with this name already exists."""


class AccessDenied(SegmentError, PermissionError):
    """The segment belongs to another user: segments are created mode 0600, owner only."""


class IncompatibleSegment(SegmentError):
    """The segment was made by another layout version of shm, or is not ours."""


class CorruptSegment(SegmentError):
    """The segment's header or contents fail validation."""


class WrongKind(SegmentError):
    """The segment holds another kind of structure (say, a dict opened as a channel)."""


class OutOfSharedMemory(SegmentError, MemoryError):
    """``/dev/shm`` has no room for the segment; nothing was left behind."""


class TooManyParticipants(ShmError):
    """Every participant slot of the structure is taken by live processes."""


class BackendUnavailable(ShmError, ConnectionError):
    """A remote backend (``shm.connect("redis://...")``) could not be reached in time.

    Raised after the connection was retried with backoff for ``retry_for``
    seconds; the message says what was being done and the last error. What
    the server had acknowledged is intact; the operation that raised may or
    may not have been applied (a send retried later is never duplicated).
    """


class SelectTimeout(ShmError, TimeoutError):
    """``select``: none of the operations completed before the timeout."""


class BrokenBarrier(ShmError, threading.BrokenBarrierError):
    """``shm.Barrier``: the barrier was aborted, reset while waiting, timed out, or a process that had it open died."""


class Lagged(ShmError):
    """A broadcast subscriber fell more than the capacity behind: ``skipped`` messages were lost.

    The next receive continues from the oldest message still kept.
    """

    def __init__(self, skipped: int):
        super().__init__(f"this subscriber fell behind: {skipped} message(s) were overwritten before it read them")
        self.skipped = skipped


class WorkerLost(ShmError):
    """``shm.Pool``: the worker process running (or holding) this task died; the pool replaced it.

    ``worker`` is the worker's slot, ``pid`` its process id, ``signal`` the
    signal that killed it (or None) and ``exitcode`` its exit status as
    ``multiprocessing`` reports it (negative: killed by that signal).
    """

    def __init__(self, message: str, *, worker: int = -1, pid: int = 0, exitcode: int | None = None):
        super().__init__(message)
        self.worker = worker
        self.pid = pid
        self.exitcode = exitcode
        self.signal = -exitcode if exitcode is not None and exitcode < 0 else None

    def __reduce__(self):
        return (_rebuild_worker_lost, (self.args[0], self.worker, self.pid, self.exitcode))


def _rebuild_worker_lost(message, worker, pid, exitcode):
    return WorkerLost(message, worker=worker, pid=pid, exitcode=exitcode)


class BrokenPool(ShmError, RuntimeError):
    """``shm.Pool`` cannot run tasks: its workers fail to start (the initializer raised), or it was terminated."""
