"""Security: other users cannot open our segments, and pickle data is never unpickled unless chosen.

Segments (every one of a structure: control, ring generations, blobs, dict
shards) are created mode 0600 with unguessable default names, so a process
of another user gets ``shm.AccessDenied``, not the data. The pickle codec
runs only when the structure's creator chose it: a record or message of the
pickle kind written into a msgpack structure's memory by someone else is
refused (``DecodeError``), never unpickled, because unpickling runs
arbitrary code.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import stat

import pytest

import shm
from shm.codec import K_PICKLE
from shm.errors import AccessDenied, DecodeError

NOBODY = 65534


class _Tripwire:
    """Unpickling this appends to FIRED: proof that a payload was (or was not) unpickled."""

    def __reduce__(self):
        return (FIRED.append, (1,))


FIRED: list = []


def _family_entries(family: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(family))


def test_every_segment_of_every_structure_is_owner_only():
    tx, rx = shm.unbounded()
    for i in range(2000):                       # ring generations beyond the first
        tx.send(i)
    tx.send(b"x" * 200_000)                     # a blob segment
    d = shm.SharedDict(shards=4)
    d.update({i: "v" * 100 for i in range(5000)})
    try:
        names = _family_entries(tx._c.family) + _family_entries(d._family)
        assert len(names) >= 2 + 1 + 1 + 4, names    # controls, a ring generation, a blob, shards
        for n in names:
            st = os.stat("/dev/shm/" + n)
            assert stat.S_IMODE(st.st_mode) == 0o600, f"{n} has mode {oct(stat.S_IMODE(st.st_mode))}"
            assert st.st_uid == os.getuid()
    finally:
        for _ in range(2001):
            rx.recv(timeout=10)
        tx.close()
        rx.close()
        d.unlink()
        d.close()


def _as_nobody(conn):
    """Drop to user nobody, then try to open each structure named to us, and its raw file.

    Forked before the structures exist, so nothing is inherited: like an
    unrelated process of another user (with shm already imported).
    """
    out = {}
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        names = conn.recv()
        for what, name in names.items():
            opener = {"sender": shm.Sender.open, "receiver": shm.Receiver.open, "queue": shm.Queue.open,
                      "dict": shm.SharedDict.open}[what]
            try:
                opener(name)
                out[what] = "opened"
            except AccessDenied as e:
                out[what] = "denied: " + str(e)
            except Exception as e:              # noqa: BLE001 - reported to the parent, which fails
                out[what] = f"{type(e).__name__}: {e}"
            try:
                os.open("/dev/shm/" + name, os.O_RDONLY)
                out[what + " file"] = "opened"
            except PermissionError:
                out[what + " file"] = "denied"
    finally:
        conn.send(out)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a child as another user")
def test_another_user_cannot_open_them():
    shm.SharedDict                              # imported (kernels loaded) before forking
    here, there = mp.get_context("fork").Pipe()
    p = mp.get_context("fork").Process(target=_as_nobody, args=(there,))
    p.start()
    tx, rx = shm.bounded(4)
    q = shm.Queue()
    d = shm.SharedDict(shards=2)
    d["secret"] = 1
    tx.send("secret")
    here.send({"sender": tx.name, "receiver": tx.name, "queue": q.name, "dict": d.name})
    out = here.recv()
    p.join(60)
    try:
        for what in ("sender", "receiver", "queue", "dict"):
            assert out[what].startswith("denied: "), f"{what}: {out}"
            assert "another user" in out[what] and "0600" in out[what]
            assert out[what + " file"] == "denied"
        assert rx.recv(timeout=10) == "secret" and d["secret"] == 1     # untouched
    finally:
        tx.close()
        rx.close()
        q.close()
        d.unlink()
        d.close()


def test_a_pickle_record_in_a_msgpack_dict_is_never_unpickled():
    from shm import dict as D
    d = shm.SharedDict(shards=1)
    try:
        kb = d._key("k")
        payload = pickle.dumps(_Tripwire(), protocol=5)
        FIRED.clear()
        # Write it the way any writer with access to the memory could: a record of the pickle kind.
        r = D._PUT(d._daddr, id(kb) + D._OFF, len(kb), K_PICKLE, id(payload) + D._OFF, len(payload), 0)
        assert r >= 0
        with pytest.raises(DecodeError):
            d["k"]
        with pytest.raises(DecodeError):
            d.copy()
        assert FIRED == []
        d["k"] = "fine"                         # the dict stays usable
        assert d["k"] == "fine"
    finally:
        d.unlink()
        d.close()


def test_the_pickle_codec_is_the_creators_choice():
    d = shm.SharedDict(codec="pickle")
    tx, rx = shm.bounded(2, codec="pickle")
    try:
        o = shm.SharedDict.open(d.name)
        assert o._codec.name == "pickle"                           # the opener cannot change it...
        o.close()
        with shm.Receiver.open(tx.name) as r2:
            assert r2.stats().codec == "pickle"
        m = shm.SharedDict(codec="msgpack")
        try:
            o = shm.SharedDict.open(m.name)
            assert o._codec.name == "msgpack"                      # ...nor turn it on
            with pytest.raises(TypeError, match="pickle"):
                o["k"] = {1, 2}                                    # msgpack refuses, naming the fix
            o.close()
        finally:
            m.unlink()
            m.close()
    finally:
        tx.close()
        rx.close()
        d.unlink()
        d.close()


def _locators_as_nobody(tmp_ok: str, tmp_planted: str, conn):
    import tempfile
    from kernels import _jit, ring
    out = {}
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        fn = ring.counter_at.py_func
        src = fn.__code__.co_filename
        out["in_tree"] = _jit._InTreeLocator.from_function(fn, src) is not None
        tempfile.tempdir = tmp_ok
        loc = _jit._PrivateTempLocator.from_function(fn, src)
        out["private"] = loc.get_cache_path() if loc is not None else None
        tempfile.tempdir = tmp_planted
        out["planted"] = _jit._PrivateTempLocator.from_function(fn, src) is not None
    finally:
        conn.send(out)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a child as another user")
def test_kernel_cache_for_a_user_who_cannot_write_the_package():
    """numba refuses to decorate when no cache directory is writable; ours falls back to a private one.

    Only a directory owned by the user and closed to others is used: one
    someone else could write would let them plant the machine code we run.
    """
    import pathlib
    import shutil
    import tempfile
    top = pathlib.Path(tempfile.mkdtemp())          # not pytest's tmp_path: its parent is closed to others
    top.chmod(0o755)
    try:
        _check_locators(top / "ok", top / "planted")
    finally:
        shutil.rmtree(top)


def _check_locators(ok, planted):
    for d in (ok, planted):
        d.mkdir()
        d.chmod(0o777)
    (planted / f"shm-numba-{NOBODY}").mkdir(mode=0o777)      # made by root, writable by all
    (planted / f"shm-numba-{NOBODY}").chmod(0o777)
    here, there = mp.get_context("fork").Pipe()
    p = mp.get_context("fork").Process(target=_locators_as_nobody, args=(str(ok), str(planted), there))
    p.start()
    out = here.recv()
    p.join(60)
    assert out["in_tree"] is False                  # the package's __pycache__ is root's
    root = ok / f"shm-numba-{NOBODY}"
    assert out["private"] and out["private"].startswith(str(root))
    st = os.stat(root)
    assert st.st_uid == NOBODY and stat.S_IMODE(st.st_mode) == 0o700
    assert out["planted"] is False
