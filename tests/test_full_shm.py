"""A really full /dev/shm: every structure raises OutOfSharedMemory, loses nothing, and stays usable.

No mocks: the child runs in its own mount namespace over a 3 MiB tmpfs
mounted on /dev/shm (needs root and ``unshare``; skipped otherwise), and
fills it through each structure in turn: creating one too large, growing
an unbounded channel, a message larger than what is free, and a dict
growing until its shards cannot. Each time the error names the size asked,
the space free and how to enlarge /dev/shm; what was acknowledged before
is all there, the structure keeps working once there is room, and closing
everything leaves the tmpfs empty.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import _report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import os, shm
from shm.errors import OutOfSharedMemory

def entries():
    return sorted(os.listdir("/dev/shm"))

def check(e):
    msg = str(e)
    assert "asked for" in msg and "free" in msg and "--shm-size" in msg, msg
    assert isinstance(e, MemoryError) and isinstance(e, shm.SegmentError)

assert entries() == [], entries()
figures = {}

# 1. A structure larger than /dev/shm: refused, nothing left behind.
try:
    shm.bounded(1 << 20)
    raise SystemExit("a 512 MiB channel fitted in 3 MiB")
except OutOfSharedMemory as e:
    check(e)
assert entries() == [], entries()
# reserve=: the third of four 1 MiB blobs does not fit; the two made are removed with the channel.
try:
    shm.bounded(4, codec="bytes", reserve=1 << 20)
    raise SystemExit("four 1 MiB blobs fitted in 3 MiB")
except OutOfSharedMemory as e:
    check(e)
assert entries() == [], entries()

# 2. An unbounded channel grows until /dev/shm is full; everything sent arrives, in order.
tx, rx = shm.unbounded()
sent = 0
try:
    while True:
        tx.send(("x" * 1000, sent))      # over the inline size: a blob each
        sent += 1
except OutOfSharedMemory as e:
    check(e)
assert sent > 50, sent
for i in range(sent):
    m = rx.recv(timeout=10)
    assert m == ["x" * 1000, i], (i, m[1])
try:
    rx.try_recv()
    raise SystemExit("a message arrived that was never acknowledged")
except shm.Empty:
    pass
for i in range(2000):                    # room again: it grows again
    tx.send(i)
assert [rx.recv(timeout=10) for _ in range(2000)] == list(range(2000))
figures["unbounded messages before full"] = sent

# 3. One message larger than what is free: refused; the channel goes on.
a, b = shm.bounded(4)
a.send("before")
try:
    a.send(b"y" * (10 << 20))
    raise SystemExit("a 10 MiB message fitted")
except OutOfSharedMemory as e:
    check(e)
a.send("after")
assert [b.recv(timeout=10), b.recv(timeout=10)] == ["before", "after"]

# 4. A dict grows until its shards cannot: every acknowledged key is there; deletes make room.
d = shm.SharedDict(shards=2)
k = 0
try:
    while True:
        d[k] = "v" * 200
        k += 1
except OutOfSharedMemory as e:
    check(e)
assert k > 500 and len(d) == k, (k, len(d))
assert all(d[i] == "v" * 200 for i in range(k))
assert d.get(k) is None
for i in range(k // 2):
    del d[i]
d["again"] = 1
assert d["again"] == 1 and len(d) == k - k // 2 + 1
figures["dict keys before full"] = k

for h in (tx, rx, a, b):
    h.close()
d.close()
assert entries() == [], entries()
print(figures["unbounded messages before full"], figures["dict keys before full"])
'''


def _can_mount() -> bool:
    if os.getuid() != 0 or shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs root and unshare to mount a small private /dev/shm")
def test_every_structure_in_a_full_dev_shm():
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount -t tmpfs -o size=3m tmpfs /dev/shm && exec "$0" -c "$1"', sys.executable, CHILD],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    messages, keys = map(int, p.stdout.split())
    _report.add("full /dev/shm: messages sent before OutOfSharedMemory, all received", messages)
    _report.add("full /dev/shm: dict keys stored before OutOfSharedMemory, all read back", keys)
