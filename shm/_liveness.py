"""Is that process alive? Answered without being fooled by zombies or PID reuse.

A participant is recorded as (pid, start time, pid namespace). It is dead when

* ``/proc/PID`` does not exist, or
* the process there started at another time (the PID was reused), or
* it is a zombie (``Z``) or dead (``X``): killed but not yet reaped, it will
  never run again.

``os.kill(pid, 0)`` would call a zombie alive and be fooled by PID reuse.
A process in another PID namespace (a container sharing ``/dev/shm``) has
PIDs we cannot interpret: we call it alive, so that nothing of a live process
is ever recovered. Reading ``/proc/PID/stat`` costs 20-30 us, which is why
it is only done on slow paths (parking, opening, closing, recovering).

If ``/proc`` is not available (macOS), we fall back to ``os.kill(pid, 0)``
and start time 0.
"""
from __future__ import annotations

import os
import time

_HAVE_PROC = os.path.isdir("/proc/self")
_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read_stat(pid: int | str):
    """(state, ppid, starttime) of ``pid`` from /proc, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    rest = data[data.rfind(b")") + 2:].split()
    # rest[0] is field 3 (state), rest[1] field 4 (ppid); field 22 (starttime) is rest[19].
    return rest[0].decode(), int(rest[1]), int(rest[19])


def _stat_fields(pid: int):
    """(state, starttime) of ``pid`` from /proc, or None if there is no such process."""
    st = _read_stat(pid)
    return None if st is None else (st[0], st[2])


def _pidns(pid: int | str = "self") -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return 0


class Identity:
    """This process: pid, start time and PID namespace. Re-read after fork."""

    __slots__ = ("pid", "start", "pidns")

    def __init__(self):
        self.pid = os.getpid()
        if _HAVE_PROC:
            st = _stat_fields(self.pid)
            self.start = st[1] if st else 0
        else:
            self.start = 0
        self.pidns = _pidns()


_me: Identity | None = None


def me() -> Identity:
    """The identity of the calling process (cached; reset in forked children)."""
    global _me
    if _me is None or _me.pid != os.getpid():
        _me = Identity()
    return _me


def _reset_after_fork():
    global _me
    _me = None


os.register_at_fork(after_in_child=_reset_after_fork)


def alive(pid: int, start: int, pidns: int = 0) -> bool:
    """Whether the process recorded as (pid, start, pidns) is still running."""
    if pid <= 0:
        return False
    if pidns and pidns != me().pidns:
        return True     # another namespace: we cannot tell, so never declare it dead
    if not _HAVE_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    st = _stat_fields(pid)
    if st is None:
        return False
    state, started = st
    if state in ("Z", "X", "x"):
        return False
    if start and started != start:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Liveness from a PID alone (no start time to check against)."""
    return alive(pid, 0, 0)


def boot_ticks() -> int:
    """Now, in the clock of ``/proc/PID/stat``'s starttime (ticks since boot).

    A process forked after this call has a start time at or after it.
    """
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _TCK) if _HAVE_PROC else 0


def children_started_since() -> list[int] | None:
    """Start times (``boot_ticks`` clock) of this process's running children; None if unknown."""
    if not _HAVE_PROC:
        return None
    me_pid = os.getpid()
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    out = []
    for name in names:
        st = _read_stat(name) if name.isdigit() else None
        if st is not None and st[1] == me_pid and st[0] not in ("Z", "X", "x"):
            out.append(st[2])
    return out
