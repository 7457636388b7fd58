"""Functions that child processes run in the channel tests (importable under spawn)."""
from __future__ import annotations

import os
import struct
import time
import zlib

import shm

# A checked message: producer id, sequence number, payload length, crc32, payload.
_HEAD = struct.Struct("<iqiI")


def payload_len(seq: int, big_every: int = 0) -> int:
    """Message sizes vary: most fit a slot inline, some straddle it, a few are blobs."""
    if big_every and seq % big_every == big_every - 1:
        return 70_000 + (seq % 7) * 1000
    return (seq * 37) % 300


def make_msg(pid_tag: int, seq: int, big_every: int = 0) -> bytes:
    n = payload_len(seq, big_every)
    body = bytes((seq + k) & 0xFF for k in range(min(n, 64))) * (n // 64 + 1)
    body = body[:n]
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<iq", pid_tag, seq)))
    return _HEAD.pack(pid_tag, seq, n, crc) + body


def check_msg(m: bytes) -> tuple[int, int]:
    """(producer tag, seq) of a checked message; raises AssertionError if corrupt."""
    tag, seq, n, crc = _HEAD.unpack_from(m, 0)
    body = m[_HEAD.size:]
    assert len(body) == n, f"length {len(body)} != {n}"
    assert zlib.crc32(body, zlib.crc32(struct.pack("<iq", tag, seq))) == crc, f"corrupt message {tag}/{seq}"
    return tag, seq


# --------------------------------------------------------------------------
# Simple roles.

def produce(tx, tag: int, n: int, big_every: int = 0, close: bool = True):
    for i in range(n):
        tx.send(make_msg(tag, i, big_every))
    if close:
        tx.close()


def produce_ints(tx, start: int, n: int):
    for i in range(start, start + n):
        tx.send(i)
    tx.close()


def produce_by_name(name: str, start: int, n: int):
    with shm.Sender.open(name) as tx:
        for i in range(start, start + n):
            tx.send(i)


def collect(rx, out_tx):
    """Receive until disconnected; send back the list of what arrived."""
    got = list(rx)
    rx.close()
    out_tx.send(got)
    out_tx.close()


def collect_count(rx, out_tx):
    n = 0
    for _ in rx:
        n += 1
    out_tx.send(n)


def echo(rx, tx, n: int):
    for _ in range(n):
        tx.send(rx.recv())


def block_recv_report(rx, out_tx):
    """Block in recv; report what ended the wait."""
    try:
        out_tx.send(("msg", rx.recv(timeout=60)))
    except shm.Disconnected:
        out_tx.send(("disconnected", None))
    except shm.Empty:
        out_tx.send(("timeout", None))


def block_send_report(tx, out_tx, n_fill: int):
    try:
        for i in range(n_fill + 1):
            tx.send(i, timeout=60)
        out_tx.send(("sent", None))
    except shm.Disconnected as e:
        out_tx.send(("disconnected", e.message))
    except shm.Full:
        out_tx.send(("timeout", None))


def linearizable(tx, rx, rounds: int, out_tx):
    """crossbeam's `linearizable`: send, then try_recv must find something."""
    bad = 0
    for i in range(rounds):
        tx.send(i)
        try:
            rx.try_recv()
        except shm.Empty:
            bad += 1
    out_tx.send(bad)


def pool_task(args):
    tx, i = args
    tx.send(i * i)
    return i


def pool_consume(rx, n):
    return sorted(rx.recv(timeout=30) for _ in range(n))


# --------------------------------------------------------------------------
# Kill-test roles: results go through a raw pipe of fixed-size records, so a
# SIGKILL can never corrupt or wedge the reporting channel.

REC = struct.Struct("<iq")


def checked_consumer(rx, fd: int, close_fds=()):
    """Receive checked messages until disconnected, logging (tag, seq) to a pipe."""
    for other in close_fds:
        os.close(other)     # inherited write ends of the other consumers' pipes
    for m in rx:
        tag, seq = check_msg(m)
        os.write(fd, REC.pack(tag, seq))
    os.close(fd)


def read_all_records(fds) -> list[tuple[int, int]]:
    """Read every pipe concurrently (a full pipe must never block its writer) until EOF."""
    import threading
    out: list = [None] * len(fds)

    def reader(i, fd):
        out[i] = read_records(fd)

    ts = [threading.Thread(target=reader, args=(i, fd)) for i, fd in enumerate(fds)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return [r for part in out for r in part]


def read_records(fd: int) -> list[tuple[int, int]]:
    data = bytearray()
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    os.close(fd)
    n = len(data) // REC.size
    return [REC.unpack_from(data, i * REC.size) for i in range(n)]


def parked_receiver(name: str, fd: int):
    rx = shm.Receiver.open(name)
    os.write(fd, b"r")
    try:
        rx.recv(timeout=120)
    except shm.ShmError:
        pass


def spin_forever():
    while True:
        time.sleep(1)


# --------------------------------------------------------------------------
# Chaos-test roles (tests/test_chaos.py): shm.Queue producers and consumers,
# and a process that owns a whole structure until it is killed.

def queue_produce(q, tag: int, n: int, big_every: int = 0):
    for i in range(n):
        q.put(make_msg(tag, i, big_every))
    q.close()


def queue_consume(q, fd: int):
    """Get checked messages until a None sentinel, logging (tag, seq) to a pipe."""
    while True:
        m = q.get()
        if m is None:
            break
        tag, seq = check_msg(m)
        os.write(fd, REC.pack(tag, seq))
    q.close()
    os.close(fd)


def leak_owner(fd: int):
    """Make a channel (ring generations, blob slots) and a SharedDict, share both
    with a forked child, report ``pid child-pid channel dict`` on ``fd``, then
    keep using them until killed: the test kills both processes, leaving
    structures that only ``python -m shm gc`` can reclaim."""
    tx, rx = shm.unbounded(codec="bytes")
    d = shm.SharedDict()
    for i in range(200):                        # past the first generation, blobs included
        tx.send(make_msg(-9, i, big_every=20))
    d.update({("leak", i): make_msg(-9, i, big_every=10) for i in range(200)})
    child = os.fork()
    if child == 0:                              # the child: a receiver, parked once drained
        try:
            while True:
                check_msg(rx.recv())
                d.incr("child")
        finally:
            os._exit(1)
    os.write(fd, f"{os.getpid()} {child} {tx.name} {d.name}\n".encode())
    os.close(fd)
    i = 0
    while True:
        i += 1
        d.incr("owner")
        if i % 50 == 0:
            tx.send(make_msg(-9, i, big_every=3))
        time.sleep(0.001)


# --------------------------------------------------------------------------
# Load-test roles (tests/test_load.py): more processes than cores, one
# channel and one SharedDict, for a fixed time.

def load_producer(tx, d, tag: int, seconds: float, fd: int):
    """Send checked messages and incr shared counters until ``seconds`` pass;
    report (messages sent, increments) as one record on ``fd``."""
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        for _ in range(64):
            tx.send(make_msg(tag, i, big_every=997))
            d.incr(("sent", i % 8))
            i += 1
    tx.close()
    d.close()
    os.write(fd, REC.pack(tag, i))
    os.close(fd)


def load_consumer(rx, d, fd: int):
    """Receive until disconnected, checking each message, logging (tag, seq) to
    ``fd`` and counting it in the dict."""
    buf = bytearray()
    for m in rx:
        tag, seq = check_msg(m)
        d.incr(("received", seq % 8))
        buf += REC.pack(tag, seq)
        if len(buf) >= 1 << 14:
            _write_all(fd, buf)
            buf.clear()
    _write_all(fd, buf)
    rx.close()
    d.close()
    os.close(fd)


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def parked_sender(name: str, fd: int, n_fill: int):
    """Fill the bounded channel ``name``, say so on ``fd``, then block in send."""
    tx = shm.Sender.open(name)
    for i in range(n_fill):
        tx.send(i)
    os.write(fd, b"s")
    try:
        tx.send(n_fill, timeout=120)
    except shm.ShmError:
        pass


def send_arrays_by_name(name: str, n: int, length: int, q):
    """Open a Sender by name, report how many reserved blobs it found mapped, send ``n`` filled arrays."""
    import numpy as np
    tx = shm.Sender.open(name)
    q.put(len(tx._c.blobs))
    for k in range(n):
        tx.send(np.full(length, k, np.float64), timeout=60)
    tx.close()


def blob_sender(tx):
    """Send 300 KB messages (blobs), each one byte repeated, until killed."""
    k = 0
    while True:
        tx.send(bytes([k % 256]) * 300_000, timeout=60)
        k += 1


def die_while_growing_a_blob(tx):
    """Send a 5000 B blob message, then SIGKILL ourselves right after unlinking that blob to grow it."""
    import signal
    from shm import _chan
    tx.send(b"a" * 5000, timeout=30)

    real = _chan._Chan._unlink_blob

    def unlink_then_die(self, *args, **kw):
        real(self, *args, **kw)
        os.kill(os.getpid(), signal.SIGKILL)
    _chan._Chan._unlink_blob = unlink_then_die
    tx.send(b"b" * 100_000, timeout=30)


def recv_by_name(name: str, q):
    with shm.Receiver.open(name) as rx:
        q.put(rx.recv(timeout=30))


def cold_blobs_after_first_use(rx, q):
    """A forked child: which inherited blobs are still to be mapped afresh, before and after a first try_recv."""
    before = sorted(rx._c.cold)
    try:
        rx.try_recv()
    except shm.Empty:
        pass
    q.put((before, sorted(rx._c.cold)))
