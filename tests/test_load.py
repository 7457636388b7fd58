"""Load: more processes than cores, and waiters that park.

* Eight processes (four producers, four consumers) on a two-core machine
  hammer one bounded channel and one SharedDict for ``SHM_LOAD_SECONDS``
  seconds (default 10; ``make stress``: 60). Every message is checksummed
  (``_workers.make_msg``) and logged by the consumer that received it, so
  the test counts every one: each producer's sequence 0..n-1 arrives exactly
  once (no loss, no duplication), with n what the producer reports it sent.
  Each send and each receive also ``incr``s one of eight dict counters, and
  the counters must come out exact. No deadlock: everything joins within a
  generous hang guard (timeouts here are hang guards, never assertions
  about speed).
* Parked waiters use no CPU: receivers blocked on an empty channel and a
  sender blocked on a full one, read from /proc/PID/stat (utime + stime)
  over two seconds, use a small fraction of the wall time (a spinning
  waiter would use all of it). That is CPU time, not a timing assertion: it
  does not depend on how busy the machine is.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import numpy as np
import pytest

import shm
import _report
import _workers as W

FORK = mp.get_context("fork")

LOAD_SECONDS = float(os.environ.get("SHM_LOAD_SECONDS", "10"))
PRODUCERS = CONSUMERS = 4
HANG = LOAD_SECONDS + 180          # a hang guard, not a timing assertion


def _read_pipes(fds) -> dict[int, bytes]:
    """Read every pipe concurrently until EOF (a full pipe must never block its writer)."""
    out: dict[int, bytes] = {}

    def reader(fd):
        chunks = []
        while True:
            c = os.read(fd, 1 << 16)
            if not c:
                break
            chunks.append(c)
        os.close(fd)
        out[fd] = b"".join(chunks)

    ts = [threading.Thread(target=reader, args=(fd,), daemon=True) for fd in fds]
    for t in ts:
        t.start()
    return out, ts


@pytest.mark.timeout(int(HANG) + 120)
def test_eight_processes_on_two_cores_one_channel_one_dict():
    tx, rx = shm.bounded(64, codec="bytes")
    d = shm.SharedDict(shards=2)               # fewer shards than writers: the locks are contended
    cpipes = [os.pipe() for _ in range(CONSUMERS)]
    ppipes = [os.pipe() for _ in range(PRODUCERS)]
    out, readers = _read_pipes([r for r, _ in cpipes + ppipes])
    procs = [FORK.Process(target=W.load_consumer, args=(rx, d, w)) for _, w in cpipes]
    procs += [FORK.Process(target=W.load_producer, args=(tx, d, tag, LOAD_SECONDS, w))
              for tag, (_, w) in enumerate(ppipes)]
    for p in procs:
        p.start()
    for _, w in cpipes + ppipes:
        os.close(w)         # the children hold the write ends now
    tx.close()
    rx.close()
    t0 = time.monotonic()
    for p in procs:
        p.join(max(1.0, t0 + HANG - time.monotonic()))
        assert p.exitcode == 0, f"a load process hung or failed (exit code {p.exitcode}): deadlock?"
    for t in readers:
        t.join(30)
        assert not t.is_alive()

    sent = {}
    for r, _ in ppipes:
        tag, n = W.REC.unpack(out[r])
        sent[tag] = n
    recs = np.frombuffer(b"".join(out[r] for r, _ in cpipes), np.dtype([("tag", "<i4"), ("seq", "<i8")]))
    keys = recs["tag"].astype(np.int64) << 40 | recs["seq"]
    uniq, counts = np.unique(keys, return_counts=True)
    assert (counts == 1).all(), f"{int((counts > 1).sum())} messages delivered more than once"
    for tag, n in sent.items():
        got = np.sort(recs["seq"][recs["tag"] == tag])
        assert got.size == n and (got == np.arange(n)).all(), \
            f"producer {tag}: sent {n}, received {got.size} distinct"
    assert set(np.unique(recs["tag"]).tolist()) <= set(sent)
    total = sum(sent.values())
    assert total > 0

    # Every send and every receive incremented counter (seq % 8): exact.
    want = [sum(len(range(k, n, 8)) for n in sent.values()) for k in range(8)]
    assert [d.get(("sent", k), 0) for k in range(8)] == want
    assert [d.get(("received", k), 0) for k in range(8)] == want
    _report.add("load: messages counted (8 processes, 2 cores)", total)
    _report.add("load: dict increments counted", 2 * total)
    _report.set("load: seconds of load", int(LOAD_SECONDS))
    d.close()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")    # utime + stime


@pytest.mark.timeout(300)
def test_parked_waiters_use_no_cpu():
    empty_tx, empty_rx = shm.bounded(4)
    ub_tx, ub_rx = shm.unbounded()
    full_tx, full_rx = shm.bounded(2)
    r, w = os.pipe()
    procs = [FORK.Process(target=W.parked_receiver, args=(empty_tx.name, w)) for _ in range(3)]
    procs.append(FORK.Process(target=W.parked_receiver, args=(ub_tx.name, w)))
    procs.append(FORK.Process(target=W.parked_sender, args=(full_tx.name, w, 2)))
    for p in procs:
        p.start()
    os.close(w)
    got = b""
    while len(got) < len(procs):
        c = os.read(r, 16)
        assert c, "a waiter died before it was ready"
        got += c
    os.close(r)
    deadline = time.monotonic() + 60
    while (empty_tx.stats().waiting_receivers, ub_tx.stats().waiting_receivers,
           full_rx.stats().waiting_senders) != (3, 1, 1):
        assert time.monotonic() < deadline, "the waiters never parked"
        time.sleep(0.01)
    time.sleep(0.2)                 # past the spin phase
    c0 = {p.pid: _cpu_seconds(p.pid) for p in procs}
    t0 = time.monotonic()
    time.sleep(2.0)
    c1 = {p.pid: _cpu_seconds(p.pid) for p in procs}
    wall = time.monotonic() - t0
    fractions = {pid: (c1[pid] - c0[pid]) / wall for pid in c0}
    assert all(f < 0.10 for f in fractions.values()), f"parked waiters used CPU: {fractions}"
    # Still parked (nothing ended their wait), and they wake up when their peers go.
    assert (empty_tx.stats().waiting_receivers, full_rx.stats().waiting_senders) == (3, 1)
    empty_tx.close()
    ub_tx.close()
    full_rx.close()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    _report.set("load: parked waiters' CPU over 2 s, % of one core (max)",
                int(round(100 * max(fractions.values()))))
    _report.add("load: parked waiters checked", len(procs))
    for h in (empty_rx, ub_rx, full_tx):
        h.close()
