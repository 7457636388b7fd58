"""shm._liveness.alive(): not fooled by exited children, zombies or PID reuse.

Every process here is real: children made with os.fork or multiprocessing,
zombies made by exiting without being waited for (os.waitid with WNOWAIT
waits for the exit but leaves the child unreaped, so the zombie state is
reached deterministically, without polling).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest

from shm import _liveness

pytestmark = pytest.mark.skipif(not _liveness._HAVE_PROC, reason="needs /proc")


def _start_of(pid):
    return _liveness._stat_fields(pid)[1]


def _state_of(pid):
    return _liveness._stat_fields(pid)[0]


def _wait_exit_keep_zombie(pid):
    """Block until ``pid`` has exited, leaving it unreaped (a zombie)."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def _fork_sleeper():
    """A forked child that waits (in a pipe read) until told to exit; returns (pid, write end)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    return pid, w


def test_this_process_is_alive():
    me = _liveness.me()
    assert me.pid == os.getpid()
    assert me.start == _start_of(os.getpid()) > 0
    assert me.pidns == os.stat("/proc/self/ns/pid").st_ino
    assert _liveness.alive(me.pid, me.start)
    assert _liveness.alive(me.pid, me.start, me.pidns)
    assert _liveness.alive(me.pid, 0)                     # no start time recorded: pid alone
    assert _liveness.pid_alive(me.pid)


def test_live_child_then_exited_child():
    ctx = mp.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    p = ctx.Process(target=child_end.recv)                # blocks until we send
    p.start()
    try:
        start = _start_of(p.pid)
        assert _liveness.alive(p.pid, start)
        assert _liveness.alive(p.pid, start, _liveness.me().pidns)
        parent_end.send(None)
        p.join(60)                                        # hang guard
        assert p.exitcode == 0
        # Exited and reaped: /proc/PID is gone (or, if the pid was already
        # reused, the start time differs).
        assert not _liveness.alive(p.pid, start)
        assert not _liveness.alive(p.pid, start, _liveness.me().pidns)
    finally:
        if p.is_alive():
            p.kill()
            p.join()


def test_zombie_is_dead():
    pid, w = _fork_sleeper()
    try:
        start = _start_of(pid)
        assert _liveness.alive(pid, start)
        os.close(w)                                       # EOF: the child exits
        w = -1
        _wait_exit_keep_zombie(pid)
        assert _state_of(pid) == "Z"                      # still in /proc, never to run again
        assert os.kill(pid, 0) is None                    # os.kill would call it alive...
        assert not _liveness.alive(pid, start)            # ...alive() does not
        assert not _liveness.alive(pid, 0)
        assert not _liveness.pid_alive(pid)
    finally:
        if w != -1:
            os.close(w)
        os.waitpid(pid, 0)


def test_killed_but_unreaped_child_is_dead():
    pid, w = _fork_sleeper()
    try:
        start = _start_of(pid)
        os.kill(pid, signal.SIGKILL)
        _wait_exit_keep_zombie(pid)
        assert not _liveness.alive(pid, start)
    finally:
        os.close(w)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_start_time_mismatch_means_the_pid_was_reused():
    me = _liveness.me()
    assert not _liveness.alive(me.pid, me.start + 1)
    assert not _liveness.alive(me.pid, me.start - 1, me.pidns)
    pid, w = _fork_sleeper()
    try:
        start = _start_of(pid)
        assert _liveness.alive(pid, start)
        assert not _liveness.alive(pid, start + 12345)    # a live process, but not the one recorded
    finally:
        os.close(w)
        os.waitpid(pid, 0)


def test_another_pid_namespace_is_never_declared_dead():
    me = _liveness.me()
    other_ns = me.pidns + 1
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    # Same pid values mean nothing across namespaces: alive, whatever we see.
    assert _liveness.alive(dead, 123, other_ns)
    assert _liveness.alive(me.pid, me.start + 1, other_ns)
    # In our own namespace the same records are dead.
    assert not _liveness.alive(dead, 123, me.pidns)
    assert not _liveness.alive(me.pid, me.start + 1, me.pidns)


@pytest.mark.parametrize("pid", [0, -1, -os.getpid()])
def test_non_positive_pids_are_dead(pid):
    assert not _liveness.alive(pid, 0)
    assert not _liveness.alive(pid, 0, _liveness.me().pidns)


def test_identity_is_re_read_after_fork():
    me = _liveness.me()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            c = _liveness.me()
            ok = (c.pid == os.getpid() != me.pid and c.start == _start_of(os.getpid())
                  and c.pidns == me.pidns and _liveness.alive(c.pid, c.start, c.pidns))
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert _liveness.me() is me                           # the parent's cached identity is untouched


def test_command_names_with_parentheses_and_spaces():
    # /proc/PID/stat puts the command name in parentheses; a name holding
    # ") Z (" must not be read as a zombie state.
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            with open("/proc/self/comm", "w") as f:
                f.write("a) Z 1 (b")
            os.write(ready_w, b"1")
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        with open(f"/proc/{pid}/stat", "rb") as f:
            assert b"(a) Z 1 (b)" in f.read()
        assert _state_of(pid) in ("S", "R")
        assert _liveness.alive(pid, _start_of(pid))
    finally:
        os.close(ready_r)
        os.close(w)
        os.waitpid(pid, 0)


# --------------------------------------------------------------------------
# Fork tokens of children that died before they could claim them.

def _lend_as_if_forked(handle):
    """What os.fork does to our side: lend the fork tokens (the child then never runs)."""
    port = handle._c if hasattr(handle, "_c") else handle._port
    port.before_fork()
    port.after_fork_parent()
    return port


@pytest.mark.parametrize("kind", ["channel", "broadcast"])
def test_a_fork_token_whose_child_died_unclaimed_does_not_outlive_the_lender(kind):
    """A child SIGKILLed before it registered leaves its fork token unclaimed; the lender's
    close retires it (no running child started after the lend), so the segments go now,
    not FORK_TOKEN_TTL later."""
    import shm
    tx, rx = shm.bounded(4, codec="bytes") if kind == "channel" else shm.broadcast(64)
    before = set(os.listdir("/dev/shm"))
    _lend_as_if_forked(tx)
    tx.close()
    rx.close()
    assert not (set(os.listdir("/dev/shm")) & before), "segments kept alive by a dead child's token"


def test_a_fork_token_is_kept_while_a_child_forked_after_it_runs():
    import subprocess
    import shm
    tx, rx = shm.bounded(4, codec="bytes")
    name = tx.name
    _lend_as_if_forked(tx)
    child = subprocess.Popen(["sleep", "30"])      # started after the lend: it may still claim it
    try:
        tx.close()
        rx.close()
        assert any(n.startswith(name) or name in n for n in os.listdir("/dev/shm")), \
            "the channel went while a child that may hold its handle runs"
    finally:
        child.kill()
        child.wait()
        again = shm.Sender.open(name)
        again._c.unlink()
        again.close()
    assert _liveness.children_started_since() is not None
