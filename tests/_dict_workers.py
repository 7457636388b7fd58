"""Functions that child processes run in the SharedDict tests (importable under spawn)."""
from __future__ import annotations

import os
import signal
import time

import shm
from _workers import check_msg, make_msg

N_COUNTERS = 100


# --------------------------------------------------------------------------
# Counting: every increment must land exactly once.

def bump_counters(d, rounds: int, wid: int):
    """incr on 100 shared counters, plus alter and compare_and_set on a few."""
    for r in range(rounds):
        d.incr(f"c{(r + wid) % N_COUNTERS}")
        if r % 20 == 0:
            d.alter("altered", lambda v: v + 1, default=0)
            while True:
                old = d["cas"]
                if d.compare_and_set("cas", old, old + 1):
                    break
    d.close()


def pool_hit(d) -> int:
    """A task run by Pool / ProcessPoolExecutor: the dict arrives pickled."""
    d.incr("hits")
    d[f"pid-{os.getpid()}"] = os.getpid()
    return os.getpid()


def process_hit(d, name: str):
    pool_hit(d)
    with shm.SharedDict.open(name) as again:      # and by name, from the same process
        again.incr("by-name")


# --------------------------------------------------------------------------
# Growth under readers.

def stable_value(k: int):
    return f"v{k}:" + "s" * (k % 40)


def read_while_growing(d, n_stable: int, fd: int):
    """Read the stable keys and iterate until "done" appears; report (reads, iterations) or a failure."""
    reads = iters = 0
    try:
        while "done" not in d:
            for k in range(0, n_stable, 7):
                got = d.get(k)
                if got != stable_value(k):
                    raise AssertionError(f"key {k}: {got!r}")
                reads += 1
            seen = [k for k in d if isinstance(k, int) and k < n_stable]
            if sorted(seen) != list(range(n_stable)):
                raise AssertionError(f"iteration saw {len(seen)} stable keys, {len(set(seen))} distinct")
            iters += 1
        os.write(fd, f"ok {reads} {iters}".encode())
    except BaseException as e:      # report, so the parent shows the cause
        os.write(fd, f"fail {type(e).__name__}: {e}"[:4000].encode())
    os.close(fd)


# --------------------------------------------------------------------------
# Kill tests.

def die():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_alter(d, key):
    """Hold the shard lock inside alter's function, and die there."""
    d.alter(key, lambda old: die())


def kill_at(d, point: str, start: int):
    """Insert keys until a growth step reaches ``point``, and die there.

    The points: "frozen" (generation marked COMPACTING, the new one made, not
    yet filled), "copied" (filled, not published), "replaced" (old one marked
    REPLACED, new one not yet published: inside publish_at), "published" (new
    one published, old name not yet unlinked).
    """
    import shm.dict as D
    from kernels import layout as L

    real_compact, real_state, real_unlink = D._COMPACT, D._SET_STATE, D.unlink_name
    if point == "frozen":
        D._COMPACT = lambda *a: die()
    elif point == "copied":
        D._COMPACT = lambda *a: (real_compact(*a), die())[0]
    elif point == "replaced":
        # publish_at's first store, then death: what a SIGKILL between its two stores leaves.
        D._PUBLISH = lambda daddr, s, gen: (real_state(daddr, s, L.SHARD_REPLACED), die())
    elif point == "published":
        def unlink(name):
            if any(name == d._gen_name(s, d._table_gen(s) - 1) for s in range(d._nshards)):
                die()
            return real_unlink(name)
        D.unlink_name = unlink
    else:
        raise ValueError(point)
    for i in range(start, start + 1_000_000):
        d[("c", i)] = "x" * 50
    raise AssertionError("no growth happened")


def chaos_writer(d, wid: int, seed: int):
    """Write, overwrite, delete, incr and alter until killed.

    Values are checked messages (tag = wid) so a torn or misplaced value is
    caught. After each incr (alter) of ("c", wid) (("a", wid)), the count is
    recorded in ("last", wid) (("alast", wid)): a kill between the two leaves
    the counter exactly one ahead, never behind, never two ahead.
    """
    import random
    rng = random.Random(seed)
    # A predecessor killed between an incr and its record left the counter
    # one ahead: acknowledge that first, so the invariant holds across kills.
    d[("last", wid)] = d.get(("c", wid), 0)
    d[("alast", wid)] = d.get(("a", wid), 0)
    i = 0
    while True:
        i += 1
        j = rng.randrange(40)
        op = rng.random()
        if op < 0.5:
            d[(wid, j)] = make_msg(wid, j + 40 * i, big_every=9)
        elif op < 0.6:
            d.pop((wid, j), None)
        elif op < 0.85:
            n = d.incr(("c", wid))
            d[("last", wid)] = n
        else:
            a = d.alter(("a", wid), lambda v: v + 1, default=0)
            d[("alast", wid)] = a


def check_chaos(d, wids) -> int:
    """Check what chaos writers left; returns the number of values checked."""
    snap = d.copy()
    checked = 0
    for k, v in snap.items():
        if isinstance(k, tuple) and len(k) == 2 and isinstance(k[0], int):
            wid, j = k
            assert wid in wids, f"unexpected key {k!r}"
            tag, seq = check_msg(v)
            assert tag == wid and seq % 40 == j, f"value of {k!r} belongs to ({tag}, {seq})"
            checked += 1
    for w in wids:
        c, last = snap.get(("c", w), 0), snap.get(("last", w), 0)
        assert c - last in (0, 1), f"writer {w}: counter {c}, last acknowledged {last}"
        a, alast = snap.get(("a", w), 0), snap.get(("alast", w), 0)
        assert a - alast in (0, 1), f"writer {w}: altered {a}, last acknowledged {alast}"
    return checked


def idle(seconds: float):
    time.sleep(seconds)


# --------------------------------------------------------------------------
# Chaos-test writers (tests/test_chaos.py): a writer's operations are a pure
# function of (wid, seed, n_ops), so the test replays them into a model and
# checks what the table holds against it.

N_OWN = 40          # keys (wid, 0..39) per writer
N_SHARED = 4        # ("total", 0..3): counters every writer increments


def model_ops(wid: int, seed: int, n_ops: int):
    """The writer's operations: (op, key, seq) with op in set/pop/incr/alter/shared."""
    import random
    rng = random.Random(seed)
    for i in range(n_ops):
        j = rng.randrange(N_OWN)
        x = rng.random()
        if x < 0.45:
            yield "set", (wid, j), j + N_OWN * i
        elif x < 0.55:
            yield "pop", (wid, j), None
        elif x < 0.75:
            yield "incr", ("c", wid), None
        elif x < 0.85:
            yield "alter", ("a", wid), None
        else:
            yield "shared", ("total", j % N_SHARED), None


def model_value(wid: int, seq: int) -> bytes:
    return make_msg(wid, seq, big_every=37)     # one value in 37 is ~70 KB


def model_writer(d, wid: int, seed: int, n_ops: int):
    """Mark ("started", wid), then run model_ops on the dict, in order."""
    d[("started", wid)] = 1
    for op, key, seq in model_ops(wid, seed, n_ops):
        if op == "set":
            d[key] = model_value(wid, seq)
        elif op == "pop":
            d.pop(key, None)
        elif op == "alter":
            d.alter(key, lambda v: v + 1, default=0)
        else:
            d.incr(key)
    d.close()


def match_model(snap: dict, wid: int, seed: int, n_ops: int) -> list[tuple[int, tuple]]:
    """Every prefix length m whose model state equals what ``snap`` holds for
    writer ``wid``'s own keys, with the shared increments of that prefix:
    [(m, (shared counts...)), ...]. Values are checked messages: a corrupt
    one, or one of another writer, raises AssertionError."""
    actual = {}
    for k, v in snap.items():
        if not isinstance(k, tuple) or len(k) != 2:
            continue
        if k[0] == wid and isinstance(k[0], int):
            tag, seq = check_msg(v)
            assert tag == wid and seq % N_OWN == k[1], f"value of {k!r} belongs to ({tag}, {seq})"
            actual[k] = seq
        elif k in (("c", wid), ("a", wid)):
            actual[k] = v
    model: dict = {}
    shared = [0] * N_SHARED
    bad = len(actual)           # keys where actual != model (the model starts empty)
    out = [(0, tuple(shared))] if bad == 0 else []
    for m, (op, key, seq) in enumerate(model_ops(wid, seed, n_ops), 1):
        if op == "shared":
            shared[key[1]] += 1
        else:
            before = actual.get(key) == model.get(key)
            if op == "set":
                model[key] = seq
            elif op == "pop":
                model.pop(key, None)
            else:
                model[key] = model.get(key, 0) + 1
            bad += (before) - (actual.get(key) == model.get(key))
        if bad == 0:
            out.append((m, tuple(shared)))
    return out
