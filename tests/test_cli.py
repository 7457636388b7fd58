"""``python -m shm ls / inspect / gc`` on real structures of live and SIGKILLed processes."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import shm
import _report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args) -> object:
    out = subprocess.run([sys.executable, "-m", "shm", *args, "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _owner(fd):
    """Make a channel (2 messages queued) and a dict (3 keys), report their names, wait to be killed."""
    tx, rx = shm.bounded(4)
    tx.send("a")
    tx.send("b")
    d = shm.SharedDict(shards=2)
    d.update({"x": 1, "y": 2, "z": 3})
    os.write(fd, f"{tx.name} {d.name}".encode())
    os.close(fd)
    time.sleep(600)


def test_ls_inspect_gc_after_sigkill():
    mine = shm.SharedDict()             # alive: gc must leave it alone
    mine["k"] = 1
    r, w = os.pipe()
    p = mp.get_context("fork").Process(target=_owner, args=(w,))
    p.start()
    os.close(w)
    chan, dname = os.read(r, 200).decode().split()
    os.close(r)
    try:
        rows = {row["name"]: row for row in cli("ls")}
        assert rows[chan]["kind"] == "channel" and rows[chan]["depth"] == 2
        assert [x["pid"] for x in rows[chan]["participants"]] == [p.pid] * len(rows[chan]["participants"])
        assert all(x["alive"] for x in rows[chan]["participants"])
        assert rows[dname]["kind"] == "dict" and rows[dname]["keys"] == 3 and rows[dname]["shards"] == 2
        assert rows[dname]["participants"] == [{"index": 0, "pid": p.pid, "alive": True}]
        assert rows[mine.name]["keys"] == 1
        info = cli("inspect", dname)
        assert sum(info["per_shard_keys"]) == 3 and info["codec"] == "msgpack"
        family = {n for n in rows if n.startswith(rows[dname]["family"]) or n.startswith(rows[chan]["family"])}
        assert len(family) >= 4                 # two control segments, a ring, two shards
        assert not family & set(cli("gc", "--dry-run")), "gc would remove a live process's structures"
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    assert p.exitcode == -signal.SIGKILL
    rows = {row["name"]: row for row in cli("ls")}
    assert not any(x["alive"] for x in rows[dname]["participants"])
    removed = set(cli("gc"))
    assert family <= removed, f"gc left {sorted(family - removed)}"
    assert not any(n.startswith(mine._family) for n in removed)
    assert mine["k"] == 1
    _report.add("segments reclaimed by gc", len(family))
    mine.unlink()
    mine.close()
