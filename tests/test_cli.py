"""``python -m shm ls / inspect / top / gc`` on real structures of live and SIGKILLed processes."""
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


def _busy(tx_b, rx_b, tx_u, rx_u, d, stop):
    """Keep two channels and a dict busy until ``stop`` is set."""
    i = 0
    while not stop.is_set():
        for tx, rx in ((tx_b, rx_b), (tx_u, rx_u)):
            tx.send(i)
            rx.recv(timeout=10)
        d.incr("n")
        d.get("n")
        i += 1


def test_top_reports_live_rates():
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    tx_b, rx_b = shm.bounded(8)
    tx_u, rx_u = shm.unbounded()
    busy, quiet = shm.SharedDict(shards=2), shm.SharedDict(shards=2)
    quiet.update({"a": 1, "b": 2})
    for i in range(3000):           # the unbounded channel grows: its tail is a later generation
        tx_u.send(i)
    p = ctx.Process(target=_busy, args=(tx_b, rx_b, tx_u, rx_u, busy, stop))
    p.start()
    try:
        out = subprocess.run([sys.executable, "-m", "shm", "top", "--json", "--count", "2", "--interval", "0.5"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        frames = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(frames) == 2
        rows = {r["name"]: r for r in frames[-1]["structures"]}
        for ch in (tx_b.name, tx_u.name):
            assert rows[ch]["kind"] == "channel" and rows[ch]["pids"] == 2    # us and the busy child
            assert rows[ch]["sent_per_s"] > 0 and rows[ch]["received_per_s"] > 0
        # Read received-then-sent while the child sends-then-receives: never below the true depth.
        assert 0 <= rows[tx_b.name]["depth"] <= 8 and rows[tx_u.name]["depth"] >= 3000
        assert rows[busy.name]["ops_per_s"] > 0 and rows[busy.name]["keys"] == 1
        assert rows[quiet.name]["ops_per_s"] == 0 and rows[quiet.name]["keys"] == 2
        text = subprocess.run([sys.executable, "-m", "shm", "top", "--count", "1", "--interval", "0.2"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert text.returncode == 0, text.stderr
        assert "OPS/s" in text.stdout and busy.name in text.stdout and tx_u.name in text.stdout
    finally:
        stop.set()
        p.join(60)
    assert p.exitcode == 0
    # The same figures from Python: ops only grow, and count what this process did too.
    before = busy.stats().ops
    busy["x"] = 1
    assert busy.stats().ops >= before + 1 and busy.stats().ops > 0
    while True:
        try:
            rx_u.try_recv()
        except shm.Empty:
            break
    for h in (tx_b, rx_b, tx_u, rx_u):
        h.close()
    for d in (busy, quiet):
        d.unlink()
        d.close()


def _hold(d, fd):
    d["x"] = 1
    os.write(fd, b"r")
    time.sleep(600)


def _open_close(name):
    shm.SharedDict.open(name).close()


def test_a_closing_process_counts_the_dead_it_reaps():
    """inspect's `reaped` counts participants reaped by any sweep, including one in close()."""
    ctx = mp.get_context("fork")
    d = shm.SharedDict()
    r, w = os.pipe()
    p = ctx.Process(target=_hold, args=(d, w))
    p.start()
    os.close(w)
    assert os.read(r, 1) == b"r"
    os.close(r)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    c = ctx.Process(target=_open_close, args=(d.name,))
    c.start()
    c.join(60)
    try:
        assert c.exitcode == 0
        assert cli("inspect", d.name)["reaped"] == 1
    finally:
        d.unlink()
        d.close()


def _broadcast_owner(fd):
    tx, rx = shm.broadcast(8)
    tx.send("a")
    w = shm.watch({"v": 1})
    os.write(fd, f"{tx.name} {w.name}".encode())
    os.close(fd)
    time.sleep(600)


def test_ls_and_gc_know_broadcasts_and_watches():
    r, w = os.pipe()
    p = mp.get_context("fork").Process(target=_broadcast_owner, args=(w,))
    p.start()
    os.close(w)
    bname, wname = os.read(r, 200).decode().split()
    os.close(r)
    try:
        rows = {row["name"]: row for row in cli("ls")}
        assert rows[bname]["kind"] == "broadcast" and rows[bname]["type"] == "broadcast"
        assert rows[bname]["published"] == 1 and rows[bname]["capacity"] == 8
        roles = {(x["publisher"], x["subscriber"]) for x in rows[bname]["participants"]}
        assert roles == {(True, False), (False, True)}
        assert rows[wname]["type"] == "watch" and rows[wname]["published"] == 1
        assert not {bname, wname} & set(cli("gc", "--dry-run"))
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    removed = set(cli("gc"))
    assert {bname, wname} <= removed
    _report.add("segments reclaimed by gc", 2)
