"""Push and pop from inside your own @njit loops, in two processes.

    python examples/njit_pipeline.py [N]

The producer process runs a numba loop of ``kernels.ring.try_push`` and the
consumer a loop of ``try_pop``: no Python call per message at all.
"""
import multiprocessing as mp
import sys
import time

import numba
import numpy as np

import shm
from kernels import ring


@numba.njit
def produce(d, n):
    msg = np.zeros(64, np.uint8)
    i = 0
    misses = 0
    while i < n:
        for k in range(8):
            msg[k] = (i >> (8 * k)) & 0xFF
        r = ring.try_push(d, msg, 64)
        if r == ring.OK:
            i += 1
            misses = 0
        elif r == ring.FULL:
            # Wait ~64 pauses before retrying (then yield the CPU after 6
            # misses): retrying at once pulls the slot's cache line away
            # from the consumer about to free it.
            misses += 1
            ring.backoff(6 if misses < 6 else 7)
        else:
            return r                # DISCONNECTED: nobody left to receive
    return 0


@numba.njit
def consume(d, n):
    buf = np.zeros(256, np.uint8)
    total = 0
    got = 0
    misses = 0
    while got < n:
        r = ring.try_pop(d, buf)
        if r >= 0:
            v = 0
            for k in range(8):
                v |= np.int64(buf[k]) << (8 * k)
            total += v
            got += 1
            misses = 0
        elif r == ring.EMPTY:
            misses += 1
            ring.backoff(6 if misses < 6 else 7)
        else:
            return -1
    return total


def producer(tx, n):
    produce(tx.kernel(), n)         # the descriptor is taken in the process that uses it
    tx.close()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000_000
    tx, rx = shm.bounded(4096, codec="bytes")
    d = rx.kernel()
    produce(tx.kernel(), 0)         # compile before timing
    consume(d, 0)
    p = mp.get_context("fork").Process(target=producer, args=(tx, n))
    t0 = time.perf_counter()
    p.start()
    tx.close()
    total = consume(d, n)
    dt = time.perf_counter() - t0
    p.join()
    assert total == n * (n - 1) // 2
    print(f"{n:,} messages of 64 B from an @njit producer to an @njit consumer: {n / dt / 1e6:.1f} M msgs/s")
    rx.close()
