"""POSIX shared-memory segments with a validated header.

Design notes
------------
Every structure shm builds lives in one or more segments: ``/dev/shm``
files made with ``shm_open`` (through posix_ipc), mapped with ``mmap``. This
module creates, attaches, closes and unlinks them, and owns the common
header (``kernels/layout.py``: ``SEGMENT``):

* magic and layout version, so a segment of another program or another
  version of shm is refused with ``IncompatibleSegment``;
* kind (channel, ring, blob, dict), so a dict opened as a channel raises
  ``WrongKind``;
* size, creator (pid and start time), creation time, name, a *family* (the
  short random prefix of every segment derived from this one) and eight
  kind-specific parameters, all covered by a CRC: a scribbled header raises
  ``CorruptSegment`` instead of steering a kernel out of bounds;
* a mutable state word: INIT while the creator fills the segment in, OPEN,
  then UNLINKED when the last participant has left.

Names are short and unguessable by default (``shm_`` + 10 base32 characters,
50 random bits), contain no slash, and fit macOS's 31-character limit;
segments are created with mode 0600, so other users cannot open them.

Pages are reserved at creation (``posix_fallocate``): tmpfs overcommits, and
a segment created on a full ``/dev/shm`` would otherwise kill the process
with SIGBUS when a page is first touched. Here creation fails cleanly with
``OutOfSharedMemory`` and leaves nothing behind.

Segments are never registered with CPython's ``resource_tracker`` (which
would unlink them when *any* attached process exits, CPython gh-82300).
Instead each structure keeps a participant table and the last participant to
leave unlinks (see ``shm/_registry.py``); ``python -m shm gc`` removes what
SIGKILLed processes leave behind.

``close()`` unmaps this process's view and never destroys the segment;
``unlink()`` removes the name (processes that mapped it keep their mapping),
and should be called once, by whoever decides the structure is finished.
"""
from __future__ import annotations

import base64
import errno
import mmap
import os
import re
import secrets
import time
import zlib

import numpy as np
import posix_ipc

from kernels import layout as L
from kernels import words as W

from . import _liveness
from .errors import (AccessDenied, CorruptSegment, IncompatibleSegment, OutOfSharedMemory, SegmentExists,
                     SegmentNotFound, WrongKind)

__all__ = ["Segment", "new_name", "check_name", "unlink_name", "shm_free_bytes"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")
_PREFIX = "shm_"
_INIT_WAIT = 5.0          # seconds an opener waits for a creator to finish initialising
_YOUNG = 2.0              # a segment this new may still be getting its header
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_POPULATE_MIN = 1 << 20   # prefault mappings of at least this size


def new_name() -> str:
    """A fresh unguessable name: ``shm_`` + 10 base32 characters (50 random bits)."""
    raw = base64.b32encode(secrets.token_bytes(7)).decode().lower().rstrip("=")
    return _PREFIX + raw[:10]


def check_name(name) -> str:
    """Validate a user-given name and return it without a leading slash."""
    if not isinstance(name, str):
        raise TypeError(f"a segment name must be a str, not {type(name).__name__}")
    n = name[1:] if name.startswith("/") else name
    if not _NAME_RE.match(n):
        raise ValueError(
            f"invalid name {name!r}: use 1-63 characters from A-Z a-z 0-9 _ . - "
            "(no slash), not starting with '.' or '-'; keep it under 20 characters "
            "if the program must also run on macOS")
    return n


def shm_free_bytes() -> int | None:
    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize
    except OSError:
        return None


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _enospc(size: int, what: str) -> OutOfSharedMemory:
    free = shm_free_bytes()
    free_s = f"{_bytes(free)} free" if free is not None else "free space unknown"
    return OutOfSharedMemory(
        errno.ENOSPC,
        f"not enough shared memory for {what}: asked for {_bytes(size)}, "
        f"/dev/shm has {free_s}. Free space in /dev/shm (python -m shm gc removes "
        "segments of dead processes), or enlarge it: in Docker, run with "
        "--shm-size=1g (the default is 64 MiB); on a host, "
        "mount -o remount,size=4G /dev/shm.")


def unlink_name(name: str) -> bool:
    """Unlink the segment ``name`` if it exists; True if it did."""
    try:
        posix_ipc.unlink_shared_memory("/" + name)
        return True
    except posix_ipc.ExistentialError:
        return False


def _header_bytes_with_magic(buf) -> bytes:
    """The CRC-covered header bytes, with the magic as it will read once published."""
    b = bytearray(buf[:L.SEG_CRC])
    b[L.SEG_MAGIC:L.SEG_MAGIC + 8] = L.MAGIC.to_bytes(8, "little")
    return bytes(b)


def _crc(buf) -> int:
    return zlib.crc32(bytes(buf[:L.SEG_CRC]))


class Segment:
    """A mapped shared-memory segment with a validated shm header.

    Attributes: ``name`` (public, no slash), ``size``, ``kind``, ``params``
    (the eight kind-specific words), ``family``, ``u8``/``w`` (uint8 and
    int64 numpy views of the whole mapping) and ``addr`` (its address).
    """

    # Defaults, so close() works after a partial __init__ (as CPython's SharedMemory).
    name: str = ""
    size: int = 0
    kind: int = 0
    params: tuple = ()
    family: str = ""
    u8 = None
    w = None
    addr: int = 0
    _mm = None

    @property
    def mm(self) -> mmap.mmap:
        """The mapping itself (slicing it returns ``bytes``)."""
        return self._mm

    def __init__(self, name: str, mm: mmap.mmap, size: int):
        self.name = name
        self._mm = mm
        self.size = size
        self.u8 = np.frombuffer(mm, np.uint8, size)
        self.w = self.u8.view(np.int64)
        self.addr = self.u8.ctypes.data

    # ------------------------------------------------------------------
    @classmethod
    def create(cls, kind: int, size: int, *, name: str | None = None, family: str | None = None,
               public_name: str | None = None, params=(), init=None) -> "Segment":
        """Create, reserve, map and initialise a new segment.

        ``init(seg)`` fills in the kind-specific part before the segment is
        marked OPEN. On any failure the segment is unlinked and the error
        re-raised. Raises ``SegmentExists`` if the name is taken and
        ``OutOfSharedMemory`` if ``/dev/shm`` is too small.
        """
        name = check_name(name) if name is not None else new_name()
        if family is None:
            family = name if len(name) <= L.FAMILY_LEN else new_name()
        if len(family.encode("ascii")) > L.FAMILY_LEN:
            raise ValueError(f"a segment family is at most {L.FAMILY_LEN} ASCII characters, got {family!r}")
        size = max(int(size), L.SEG_HEADER)
        try:
            shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=0)
        except posix_ipc.ExistentialError:
            raise SegmentExists(errno.EEXIST, f"a shared-memory segment named {name!r} already exists") from None
        except OSError as e:
            raise _enospc(size, f"segment {name!r}") if e.errno == errno.ENOSPC else e
        fd = shm.fd
        try:
            try:
                os.ftruncate(fd, size)
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                    raise _enospc(size, f"segment {name!r}") from None
                raise
            mm = _map(fd, size)
        except BaseException:
            os.close(fd)
            unlink_name(name)
            raise
        os.close(fd)
        seg = cls(name, mm, size)
        try:
            seg._write_header(kind, family, public_name or name, params)
            if init is not None:
                init(seg)
            W.store(seg.w, L.SEG_STATE >> 3, L.SEG_OPEN)
        except BaseException:
            seg.close()
            unlink_name(name)
            raise
        seg.kind = kind
        seg.params = tuple(int(p) for p in params) + (0,) * (8 - len(params))
        seg.family = family
        return seg

    def _write_header(self, kind, family, public_name, params):
        ident = _liveness.me()
        h = self.w
        h[L.SEG_VERSION >> 3] = L.LAYOUT_VERSION
        h[L.SEG_KIND >> 3] = kind
        h[L.SEG_SIZE >> 3] = self.size
        h[L.SEG_CREATOR_PID >> 3] = ident.pid
        h[L.SEG_CREATOR_START >> 3] = ident.start
        h[L.SEG_CREATED_NS >> 3] = time.time_ns()
        p = list(params) + [0] * (8 - len(params))
        h[(L.SEG_PARAMS >> 3):(L.SEG_PARAMS >> 3) + 8] = p
        fam = family.encode("ascii")[:L.FAMILY_LEN]
        self.u8[L.SEG_FAMILY:L.SEG_FAMILY + L.FAMILY_LEN] = 0
        self.u8[L.SEG_FAMILY:L.SEG_FAMILY + len(fam)] = np.frombuffer(fam, np.uint8)
        nm = public_name.encode("ascii")[:L.NAME_LEN]
        self.u8[L.SEG_NAME:L.SEG_NAME + L.NAME_LEN] = 0
        self.u8[L.SEG_NAME:L.SEG_NAME + len(nm)] = np.frombuffer(nm, np.uint8)
        # The magic goes in last: an opener that sees it sees the whole header.
        h[L.SEG_CRC >> 3] = zlib.crc32(_header_bytes_with_magic(self.u8))
        W.store(h, L.SEG_MAGIC >> 3, L.MAGIC)

    # ------------------------------------------------------------------
    @classmethod
    def attach(cls, name: str, *, kind: int | None = None, what: str = "segment",
               populate: bool = True) -> "Segment":
        """Map an existing segment and validate its header.

        ``populate=False``: fault its pages in as they are touched, not now
        (a large message read in place, or copied out on two threads).

        Raises ``SegmentNotFound``, ``AccessDenied`` (another user's),
        ``IncompatibleSegment`` (not ours, or
        another layout version), ``WrongKind``, ``CorruptSegment``.
        """
        name = check_name(name)
        try:
            shm = posix_ipc.SharedMemory("/" + name)
        except posix_ipc.ExistentialError:
            raise SegmentNotFound(errno.ENOENT, f"no {what} named {name!r} (no such shared-memory segment)") from None
        except posix_ipc.PermissionsError:
            raise AccessDenied(errno.EACCES, f"{what} {name!r} belongs to another user: shm segments are "
                               "created mode 0600, so only their owner's processes can open them. Run this "
                               "process as that user.") from None
        fd = shm.fd
        try:
            size = _wait_for_size(fd, name, what)
            mm = _map(fd, size, populate)
        finally:
            os.close(fd)
        seg = cls(name, mm, size)
        try:
            seg._validate(kind, what)
        except BaseException:
            seg.close()
            raise
        return seg

    def _validate(self, kind, what):
        h = self.w
        name = self.name
        # A creator writes the magic last; wait for a young segment to get it.
        while W.load(h, L.SEG_MAGIC >> 3) == 0 and self._young():
            time.sleep(0.0005)
        if int(h[L.SEG_MAGIC >> 3]) != L.MAGIC:
            raise IncompatibleSegment(
                f"segment {name!r} is not an shm structure (bad magic number); "
                "it was made by another program, or is corrupt")
        version = int(h[L.SEG_VERSION >> 3])
        if version != L.LAYOUT_VERSION:
            raise IncompatibleSegment(
                f"segment {name!r} has layout version {version}, this shm reads version "
                f"{L.LAYOUT_VERSION}: open it with the shm release that created it")
        deadline = time.monotonic() + _INIT_WAIT
        while W.load(h, L.SEG_STATE >> 3) == L.SEG_INIT:
            cpid, cstart = int(h[L.SEG_CREATOR_PID >> 3]), int(h[L.SEG_CREATOR_START >> 3])
            if not _liveness.alive(cpid, cstart) or time.monotonic() > deadline:
                raise CorruptSegment(
                    f"segment {name!r} was never finished: its creator (pid {cpid}) "
                    "died or stalled while initialising it; remove it with python -m shm gc")
            time.sleep(0.001)
        if int(h[L.SEG_CRC >> 3]) != _crc(self.u8):
            raise CorruptSegment(f"segment {name!r} has a corrupt header (CRC mismatch)")
        if int(h[L.SEG_SIZE >> 3]) != self.size:
            raise CorruptSegment(
                f"segment {name!r} is {self.size} bytes but its header says "
                f"{int(h[L.SEG_SIZE >> 3])}: it was truncated or resized")
        k = int(h[L.SEG_KIND >> 3])
        if kind is not None and k != kind:
            raise WrongKind(
                f"segment {name!r} holds a {L.KIND_NAMES.get(k, f'kind-{k}')}, not a "
                f"{L.KIND_NAMES.get(kind, f'kind-{kind}')}: open it with the matching class")
        self.kind = k
        self.params = tuple(int(x) for x in h[(L.SEG_PARAMS >> 3):(L.SEG_PARAMS >> 3) + 8])
        family = bytes(self.u8[L.SEG_FAMILY:L.SEG_FAMILY + L.FAMILY_LEN]).rstrip(b"\0").decode("ascii", "replace")
        if not _NAME_RE.match(family):
            # Derived segments are named from it: never let a header steer names (a CRC can be forged).
            raise CorruptSegment(f"segment {name!r} has an invalid family {family!r} in its header")
        self.family = family

    def _young(self) -> bool:
        try:
            st = os.stat("/dev/shm/" + self.name)
        except OSError:
            return False
        return time.time() - st.st_ctime < _YOUNG

    # ------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._mm is None

    @property
    def state(self) -> int:
        return W.load(self.w, L.SEG_STATE >> 3)

    def set_state(self, expected: int, new: int) -> bool:
        return W.cas(self.w, L.SEG_STATE >> 3, expected, new) == expected

    @property
    def public_name(self) -> str:
        return bytes(self.u8[L.SEG_NAME:L.SEG_NAME + L.NAME_LEN]).rstrip(b"\0").decode("ascii", "replace")

    @property
    def creator(self) -> tuple[int, int]:
        return int(self.w[L.SEG_CREATOR_PID >> 3]), int(self.w[L.SEG_CREATOR_START >> 3])

    def close(self) -> None:
        """Unmap this process's view. Does not destroy the segment.

        If numpy views of the mapping are still alive elsewhere (a zero-copy
        message the user kept), the mapping stays until they are collected.
        """
        mm = self._mm
        if mm is None:
            return
        self._mm = None
        self.u8 = self.w = None
        self.addr = 0
        try:
            mm.close()
        except BufferError:
            pass        # exported views keep it mapped until they die

    def unlink(self) -> bool:
        """Remove the segment's name. Mappings stay valid until closed."""
        return unlink_name(self.name)

    def __repr__(self):
        state = "closed" if self.closed else f"{self.size} bytes"
        return f"<Segment {self.name!r} {L.KIND_NAMES.get(self.kind, self.kind)} {state}>"


def _map(fd: int, size: int, populate: bool = True) -> mmap.mmap:
    flags = mmap.MAP_SHARED
    if populate and size >= _POPULATE_MIN:
        flags |= _MAP_POPULATE
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _wait_for_size(fd: int, name: str, what: str) -> int:
    """The segment's size, waiting briefly for a creator between shm_open and ftruncate.

    Only a young segment is waited for: one that has been too small for more
    than a second lost its creator.
    """
    while True:
        st = os.fstat(fd)
        size = st.st_size
        if size >= L.SEG_HEADER:
            return size
        if size >= 8 and os.pread(fd, 8, 0) != b"\0" * 8 and \
                int.from_bytes(os.pread(fd, 8, 0), "little") != L.MAGIC:
            raise IncompatibleSegment(f"{what} {name!r} is not an shm structure (a {size}-byte file "
                                      "made by another program)")
        if time.time() - st.st_ctime > 1.0:
            if size == 0:
                raise CorruptSegment(f"{what} {name!r} is empty: its creator died before sizing it; "
                                     "remove it with python -m shm gc")
            raise CorruptSegment(f"{what} {name!r} is truncated ({size} bytes, smaller than a header)")
        time.sleep(0.001)

