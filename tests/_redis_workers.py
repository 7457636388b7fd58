"""Programs for tests/test_redis_backend.py that share nothing with the test but a Redis URL.

``python tests/_redis_workers.py producer URL CHANNEL DICT N``: makes the
channel and the dict, sends N checksummed messages, closes its sender, and
waits until the consumer has counted them all in the dict.

``python tests/_redis_workers.py consumer URL CHANNEL DICT``: opens both by
name (waiting for them to exist), receives until the producer is gone,
checks every message, counts them in the dict and prints a summary line.
"""
from __future__ import annotations

import hashlib
import sys
import time

import shm


def _payload(i: int) -> dict:
    return {"i": i, "sum": hashlib.sha1(str(i).encode()).hexdigest()[:8], "pad": "x" * (i % 300)}


def producer(url, chan, dname, n):
    ns = shm.connect(url, lease=3)
    tx, rx = ns.bounded(64, name=chan)
    d = ns.SharedDict(name=dname)
    d["expected"] = n
    for i in range(n):
        tx.send(_payload(i), timeout=60)
    tx.close()
    deadline = time.monotonic() + 60
    while d.get("received", 0) < n:
        if time.monotonic() > deadline:
            print("producer: consumer did not finish", d.copy(), flush=True)
            return 1
        time.sleep(0.05)
    print(f"producer: sent {n}", flush=True)
    rx.close()
    d.close()
    return 0


def consumer(url, chan, dname):
    ns = shm.connect(url, lease=3)
    deadline = time.monotonic() + 60
    while True:
        try:
            rx = ns.Receiver.open(chan)
            d = ns.SharedDict.open(dname)
            break
        except shm.SegmentNotFound:
            if time.monotonic() > deadline:
                return 1
            time.sleep(0.05)
    seen = set()
    for msg in rx:
        assert msg == _payload(msg["i"]), msg
        assert msg["i"] not in seen
        seen.add(msg["i"])
        d.incr("received")
    rx.close()
    print(f"consumer: received {len(seen)} distinct, max {max(seen)}", flush=True)
    d.close()
    return 0


if __name__ == "__main__":
    role, url, chan, dname = sys.argv[1:5]
    sys.exit(producer(url, chan, dname, int(sys.argv[5])) if role == "producer" else consumer(url, chan, dname))
