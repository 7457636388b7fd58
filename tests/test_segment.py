"""shm.segment.Segment and the errors it raises, on real /dev/shm segments.

Every damaged segment here is damaged for real (header words overwritten
through a mapping, files truncated with os.truncate, foreign files dropped
into /dev/shm), and every test closes and unlinks what it made.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

import _foundation_workers as FW
from kernels import layout as L
from kernels import words as W
from shm import _liveness
from shm.errors import (CorruptSegment, IncompatibleSegment, OutOfSharedMemory, SegmentError, SegmentExists,
                        SegmentNotFound, ShmError, WrongKind)
from shm.segment import Segment, check_name, new_name, unlink_name

SHM = "/dev/shm"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _path(name):
    return os.path.join(SHM, name)


def _exists(name):
    return os.path.exists(_path(name))


def _test_name():
    return f"shmtest_{secrets.token_hex(5)}"


@pytest.fixture
def seg():
    """A fresh 4 KiB blob segment, closed and unlinked afterwards."""
    s = Segment.create(kind=L.KIND_BLOB, size=4096, params=(7, 8, 9))
    try:
        yield s
    finally:
        s.close()
        unlink_name(s.name)


def _reseal(s):
    """Recompute the header CRC after editing immutable header words on purpose."""
    s.w[L.SEG_CRC >> 3] = zlib.crc32(bytes(s.u8[:L.SEG_CRC]))


def _dead_pid():
    """The pid of a child that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# --------------------------------------------------------------------------
# Round trips.

def test_create_attach_close_unlink_round_trip(seg):
    assert seg.state == L.SEG_OPEN
    assert (seg.kind, seg.size, seg.params) == (L.KIND_BLOB, 4096, (7, 8, 9, 0, 0, 0, 0, 0))
    other = Segment.attach(seg.name, kind=L.KIND_BLOB)
    try:
        assert (other.kind, other.size, other.params) == (seg.kind, seg.size, seg.params)
        assert other.family == seg.family == seg.name
        assert other.public_name == seg.public_name == seg.name
        me = _liveness.me()
        assert other.creator == seg.creator == (me.pid, me.start)
        assert other.addr != seg.addr                      # two mappings of one segment
        # Bytes written through one mapping are read through the other, both ways.
        pattern = np.arange(900, dtype=np.uint32).view(np.uint8)
        seg.u8[256:256 + pattern.size] = pattern
        assert bytes(other.u8[256:256 + pattern.size]) == pattern.tobytes()
        other.w[500] = -12345
        assert seg.w[500] == -12345
    finally:
        other.close()
    assert other.closed and not seg.closed
    assert seg.unlink() is True
    assert seg.unlink() is False                           # already gone
    assert not _exists(seg.name)
    with pytest.raises(SegmentNotFound):
        Segment.attach(seg.name)


def test_mapping_stays_valid_after_unlink(seg):
    other = Segment.attach(seg.name)
    try:
        seg.unlink()
        assert not _exists(seg.name)
        seg.w[100] = 77                                    # still shared between the mappings
        assert other.w[100] == 77
    finally:
        other.close()


def test_round_trip_with_a_child_process(ctx, seg):
    off, n, reply = 512, 300, 1032
    seg.u8[off:off + n] = [i % 251 for i in range(n)]
    p = ctx.Process(target=FW.read_and_reply, args=(seg.name, off, n, reply))
    p.start()
    p.join(120)                                           # hang guard
    if p.is_alive():
        p.kill()
        p.join()
    assert p.exitcode == 0                                # 4: the child read other bytes
    assert W.load(seg.w, (reply >> 3) - 1) == p.pid
    assert seg.u8[reply:reply + n].tolist() == [255 - i % 251 for i in range(n)]


def test_kind_is_checked_on_attach(seg):
    Segment.attach(seg.name, kind=L.KIND_BLOB).close()
    with pytest.raises(WrongKind) as ei:
        Segment.attach(seg.name, kind=L.KIND_CHANNEL)
    msg = str(ei.value)
    assert f"segment {seg.name!r} holds a blob, not a channel" in msg
    assert isinstance(ei.value, SegmentError) and isinstance(ei.value, ShmError)


# --------------------------------------------------------------------------
# Names and permissions.

def test_created_mode_is_0600_whatever_the_umask():
    old = os.umask(0)                                     # even a permissive umask must not widen it
    try:
        s = Segment.create(kind=L.KIND_BLOB, size=4096)
    finally:
        os.umask(old)
    try:
        assert os.stat(_path(s.name)).st_mode & 0o777 == 0o600
    finally:
        s.close()
        s.unlink()


def test_default_names():
    names = [new_name() for _ in range(2000)]
    assert len(set(names)) == len(names)
    for n in names:
        assert re.fullmatch(r"shm_[a-z2-7]{10}", n), n
        assert len("/" + n) <= 31                          # macOS's PSHMNAMLEN
        assert check_name(n) == n
    s = Segment.create(kind=L.KIND_BLOB, size=256)
    try:
        assert re.fullmatch(r"shm_[a-z2-7]{10}", s.name)
        assert _exists(s.name)
    finally:
        s.close()
        s.unlink()


def test_check_name_accepts():
    for name, expected in [("a", "a"), ("A_b.c-d9", "A_b.c-d9"), ("_x", "_x"), ("x" * 63, "x" * 63),
                           ("/abc", "abc")]:
        assert check_name(name) == expected


def test_check_name_rejects():
    for name in ["", "/", "a/b", "/a/b", "x" * 64, "/" + "x" * 64, ".hidden", "-x", "a b", "caf\u00e9",
                 "a\0b", ".."]:
        with pytest.raises(ValueError) as ei:
            check_name(name)
        assert "no slash" in str(ei.value) and "not starting with '.' or '-'" in str(ei.value)
        with pytest.raises(ValueError):
            Segment.create(kind=L.KIND_BLOB, size=256, name=name)
        with pytest.raises(ValueError):
            Segment.attach(name)
    for name in [b"abc", None, 5]:
        with pytest.raises(TypeError):
            check_name(name)


def test_attaching_a_missing_name():
    name = _test_name()
    with pytest.raises(SegmentNotFound) as ei:
        Segment.attach(name)
    assert isinstance(ei.value, FileNotFoundError)
    assert ei.value.errno == errno.ENOENT
    assert name in str(ei.value)


def test_creating_an_existing_name(seg):
    seg.w[100] = 4242
    with pytest.raises(SegmentExists) as ei:
        Segment.create(kind=L.KIND_BLOB, size=8192, name=seg.name)
    assert isinstance(ei.value, FileExistsError)
    assert seg.name in str(ei.value)
    # The existing segment is untouched: same size, same data, still valid.
    other = Segment.attach(seg.name)
    try:
        assert other.size == 4096 and other.w[100] == 4242
    finally:
        other.close()


def test_failed_init_leaves_nothing():
    name = _test_name()

    def init(s):
        s.w[40] = 1
        raise RuntimeError("init failed on purpose")

    with pytest.raises(RuntimeError, match="on purpose"):
        Segment.create(kind=L.KIND_BLOB, size=4096, name=name, init=init)
    assert not _exists(name)


def test_family_reads_back_as_created():
    with pytest.raises(ValueError, match="family"):
        Segment.create(kind=L.KIND_BLOB, size=4096, family="a_family_of_20chars")    # longer than FAMILY_LEN
    s = Segment.create(kind=L.KIND_BLOB, size=4096, family="a_family_of_16ch")
    try:
        other = Segment.attach(s.name)
        try:
            assert other.family == s.family
        finally:
            other.close()
    finally:
        s.close()
        s.unlink()


# --------------------------------------------------------------------------
# Damaged and foreign segments.

def test_bad_magic(seg):
    seg.w[L.SEG_MAGIC >> 3] = 0x0123456789
    with pytest.raises(IncompatibleSegment, match="not an shm structure \\(bad magic number\\)"):
        Segment.attach(seg.name)


def test_other_layout_version(seg):
    seg.w[L.SEG_VERSION >> 3] = L.LAYOUT_VERSION + 1
    _reseal(seg)
    with pytest.raises(IncompatibleSegment) as ei:
        Segment.attach(seg.name)
    assert f"layout version {L.LAYOUT_VERSION + 1}, this shm reads version {L.LAYOUT_VERSION}" in str(ei.value)


def test_every_flipped_header_byte_is_caught(seg):
    """Flip each byte of the immutable header (and the CRC) in turn: each attach must refuse."""
    for off in range(L.SEG_CRC + 8):
        seg.u8[off] ^= 0xFF
        try:
            if off < L.SEG_VERSION:
                exc, text = IncompatibleSegment, "bad magic"
            elif off < L.SEG_VERSION + 8:
                exc, text = IncompatibleSegment, "layout version"
            else:
                exc, text = CorruptSegment, "corrupt header (CRC mismatch)"
            with pytest.raises(exc, match=re.escape(text)):
                Segment.attach(seg.name)
        finally:
            seg.u8[off] ^= 0xFF
    Segment.attach(seg.name).close()                      # restored: valid again


def test_state_word_is_mutable_and_not_covered_by_the_crc(seg):
    assert seg.set_state(L.SEG_OPEN, L.SEG_UNLINKED)
    assert not seg.set_state(L.SEG_OPEN, L.SEG_UNLINKED)  # a CAS: the state is no longer OPEN
    other = Segment.attach(seg.name)
    try:
        assert other.state == L.SEG_UNLINKED
    finally:
        other.close()


@pytest.mark.parametrize("new_size,text", [
    (1024, "is 1024 bytes but its header says 4096: it was truncated or resized"),
    (8192, "is 8192 bytes but its header says 4096: it was truncated or resized"),
    (100, "is truncated (100 bytes, smaller than a header)"),     # waits ~1 s for a creator first
])
def test_truncated_or_resized_file(seg, new_size, text):
    os.truncate(_path(seg.name), new_size)
    # Our own mapping now extends past the end of a shrunk file: do not touch it.
    with pytest.raises(CorruptSegment) as ei:
        Segment.attach(seg.name)
    assert text in str(ei.value)


def test_init_state_with_a_dead_creator(seg):
    dead = _dead_pid()
    seg.w[L.SEG_CREATOR_PID >> 3] = dead
    _reseal(seg)                                          # only the state word is wrong
    W.store(seg.w, L.SEG_STATE >> 3, L.SEG_INIT)
    with pytest.raises(CorruptSegment) as ei:
        Segment.attach(seg.name)
    assert f"was never finished: its creator (pid {dead}) died" in str(ei.value)


def test_init_state_with_a_live_creator_is_waited_for(seg):
    # The creator (this process) is alive: an opener waits until it marks the segment OPEN.
    W.store(seg.w, L.SEG_STATE >> 3, L.SEG_INIT)
    opener = threading.Timer(0.05, W.store, (seg.w, L.SEG_STATE >> 3, L.SEG_OPEN))
    opener.start()
    try:
        other = Segment.attach(seg.name)
        other.close()
    finally:
        opener.cancel()
        opener.join()
    assert seg.state == L.SEG_OPEN


def test_asking_for_more_than_dev_shm_can_hold():
    st = os.statvfs(SHM)
    size = st.f_blocks * st.f_frsize + 2**30
    name = _test_name()
    with pytest.raises(OutOfSharedMemory) as ei:
        Segment.create(kind=L.KIND_BLOB, size=size, name=name)
    e = ei.value
    assert isinstance(e, MemoryError) and isinstance(e, SegmentError)
    assert e.errno == errno.ENOSPC
    msg = str(e)
    assert f"asked for {size / 2**30:.1f} GiB" in msg      # more than /dev/shm by 1 GiB
    assert re.search(r"/dev/shm has (\d+\.\d [KMG]iB|\d+ bytes) free", msg)
    assert "--shm-size" in msg
    assert not _exists(name)


@pytest.mark.parametrize("content", [b"not an shm segment\n" * 200, None], ids=["text", "random"])
def test_foreign_file_in_dev_shm(content):
    name = f"test-junk-{secrets.token_hex(4)}"
    data = content if content is not None else secrets.token_bytes(4096)
    fd = os.open(_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 4096)
        os.write(fd, data[:4096])
        os.close(fd)
        for kind in (None, L.KIND_CHANNEL):
            with pytest.raises(IncompatibleSegment, match="not an shm structure"):
                Segment.attach(name, kind=kind)
        with open(_path(name), "rb") as f:
            assert f.read() == data[:4096].ljust(4096, b"\0")  # looked at, never written
    finally:
        os.unlink(_path(name))


# --------------------------------------------------------------------------
# close() and resource tracking.

def test_close_is_idempotent(seg):
    seg.close()
    seg.close()
    assert seg.closed and seg.u8 is None and seg.w is None and seg.addr == 0
    Segment.__new__(Segment).close()                      # even a half-built Segment closes


def test_close_with_a_live_view(seg):
    view = seg.u8[300:310]
    view[:] = 7
    seg.close()                                           # must not raise BufferError
    assert seg.closed
    assert view.tolist() == [7] * 10                      # the view keeps its mapping alive
    del view


def test_no_resource_tracker_registration_in_process(monkeypatch, seg):
    from multiprocessing import resource_tracker
    calls = []
    monkeypatch.setattr(resource_tracker, "register", lambda *a: calls.append(a))
    s = Segment.create(kind=L.KIND_BLOB, size=4096)
    try:
        Segment.attach(s.name).close()
        Segment.attach(seg.name).close()
    finally:
        s.close()
        s.unlink()
    assert calls == []


def test_spawned_child_that_attaches_and_exits_leaves_the_segment(seg):
    import multiprocessing as mp
    p = mp.get_context("spawn").Process(target=FW.attach_and_exit, args=(seg.name,))
    p.start()
    p.join(120)
    if p.is_alive():
        p.kill()
        p.join()
    assert p.exitcode == 0
    assert _exists(seg.name)
    Segment.attach(seg.name).close()


def test_fresh_interpreter_that_creates_and_attaches_leaves_both(seg):
    """A process with its own resource tracker would unlink tracked segments when it exits."""
    code = ("from shm.segment import Segment\nfrom kernels import layout as L\n"
            f"Segment.attach({seg.name!r})\n"
            "s = Segment.create(kind=L.KIND_BLOB, size=4096)\nprint(s.name)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    created = r.stdout.strip()
    try:
        assert r.returncode == 0, r.stderr
        assert re.fullmatch(r"shm_[a-z2-7]{10}", created)
        assert "resource_tracker" not in r.stderr
        assert _exists(seg.name) and _exists(created)
    finally:
        if created:
            unlink_name(created)
