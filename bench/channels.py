"""Channel benchmarks: shm against multiprocessing, faster-fifo, pyzmq and iceoryx2.

Every producer and consumer is its own forked process. A run times from the
moment every role of it is set up (one barrier) to the moment the last
consumer holds its last message. Each (case, peer) first gets a short pilot
run, which sizes the message count so a measured run takes about
``--seconds`` for that peer; the measured runs then repeat ``--reps`` times,
interleaved across peers (so slow drifts of a noisy machine hit everyone
alike), and the tables report the median with the min-max spread.

Targets are ratios between medians of the same run. See README-style notes
at the top of ``results/channels.md`` for what each peer does per message.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from dataclasses import dataclass, field

import numpy as np

from . import peers as P
from .common import (REPO, ForeignLoad, LoadSampler, QuietGate, RunError, SampleStats, ShmWatch, Unavailable,
                     best_ns, calibrate, elapsed, fmt_rate, log, machine, median, now, results_dir, run_info,
                     run_roles, select_cases)

KiB, MiB = 1 << 10, 1 << 20
RUN_TIMEOUT = 60.0


def make_obj(i):
    return {"id": i, "name": "abc", "vals": [1, 2, 3], "x": 1.5, "ok": True}


# --------------------------------------------------------------------------
# Roles (each runs in its own forked process).

def _profiled(enabled):
    if not enabled:
        return None
    pr = cProfile.Profile()
    return pr


def _profile_text(pr, top=12):
    if pr is None:
        return None
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime").print_stats(top)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    # Drop pstats' preamble up to the header row; shorten paths.
    for i, ln in enumerate(lines):
        if ln.lstrip().startswith("ncalls"):
            lines = lines[i:]
            break
    return "\n".join(ln.replace(REPO + "/", "") for ln in lines)


def tp_producer(R, ep, k, n, spec, many, profile=False):
    tx = ep.sender(k)
    tx.settle()
    payload = None if spec.objects else b"\x5a" * spec.size
    pr = _profiled(profile)
    t0 = R.ready()
    if pr:
        pr.enable()
    if many:
        send_many = tx.send_many
        if spec.objects:
            for base in range(0, n, P.BATCH):
                send_many([make_obj(i) for i in range(base, base + P.BATCH)])
        else:
            chunk = [payload] * P.BATCH
            for _ in range(n // P.BATCH):
                send_many(chunk)
    elif spec.objects:
        send = tx.send
        for i in range(n):
            send({"id": i, "name": "abc", "vals": [1, 2, 3], "x": 1.5, "ok": True})
    else:
        send = tx.send
        for _ in range(n):
            send(payload)
    tx.finish()
    t1 = now()
    if pr:
        pr.disable()
    R.report(t0=t0, t1=t1, profile=_profile_text(pr))
    tx.close()


def tp_consumer(R, ep, j, n, spec, many, multi, profile=False):
    rx = ep.receiver(j)
    rx.settle()
    pr = _profiled(profile)
    t0 = R.ready()
    if pr:
        pr.enable()
    m = None
    got = 0
    if multi:
        stops = 0
        need = ep.stops_needed
        recv = rx.recv
        while True:
            m = recv()
            if not m:                  # end-of-stream marker
                stops += 1
                if stops == need:
                    break
                continue
            got += 1
            last = m
        m = last if got else None
    elif many:
        recv_many = rx.recv_many
        while got < n:
            batch = recv_many()
            got += len(batch)
        m = batch[-1]
    else:
        recv = rx.recv
        for _ in range(n):
            m = recv()
        got = n
    t1 = now()
    if pr:
        pr.disable()
    # Check what arrived: count, size, and (1 -> 1, objects) FIFO order.
    if spec.objects:
        ok = isinstance(m, dict) and (multi or many or m.get("id") == n - 1)
    elif isinstance(m, int):
        ok = m == spec.size              # iceoryx2 zero-copy read reports the length only
    else:
        ok = m is not None and len(m) == spec.size
    if not ok:
        raise RunError(f"consumer {j}: unexpected last message {str(m)[:80]!r}")
    if not multi and got != n:
        raise RunError(f"consumer {j}: got {got} of {n} messages")
    R.report(t0=t0, t1=t1, consumer=True, got=got, profile=_profile_text(pr))
    rx.close()


def pp_ping(R, a, b, n, warm, size):
    tx = a.sender(0)
    rx = b.receiver(0)
    rx.settle()
    tx.settle()
    payload = b"\x5a" * size
    send, recv = tx.send, rx.recv
    clock = time.perf_counter_ns
    t0 = R.ready()
    for _ in range(warm):
        send(payload)
        recv()
    rtt = [0] * n
    for i in range(n):
        t = clock()
        send(payload)
        recv()
        rtt[i] = clock() - t
    t1 = now()
    rtt.sort()
    R.report(t0=t0, t1=t1, consumer=True, n=n,
             p50=rtt[n // 2] / 1e3, p99=rtt[min(n - 1, int(n * 0.99))] / 1e3,
             mean=sum(rtt) / n / 1e3)
    tx.close()
    rx.close()


def pp_pong(R, a, b, total, size):
    rx = a.receiver(0)
    tx = b.sender(0)
    rx.settle()
    tx.settle()
    payload = b"\xa5" * size
    send, recv = tx.send, rx.recv
    t0 = R.ready()
    for _ in range(total):
        recv()
        send(payload)
    R.report(t0=t0, t1=now())
    tx.close()
    rx.close()


# @njit loops over the ring kernels (compiled in the parent before forking).

_NJ = {}


def _njit_funcs():
    if _NJ:
        return _NJ
    import numba

    from kernels import ring as KR
    FULL, EMPTY = KR.FULL, KR.EMPTY
    try_push, try_pop, backoff = KR.try_push, KR.try_pop, KR.backoff

    @numba.njit(cache=True)
    def nj_push(d, payload, n):
        """Push ``n`` messages; on FULL back off (64 pauses, then sched_yield).

        The first wait is already 64 pauses (~1-2 us): retrying at once keeps
        pulling the slot's cache line away from the consumer that is about to
        free it. Measured here: 2.2 M msgs/s in some runs with crossbeam's
        1, 2, 4... pauses (on both sides), 13.8-14.5 M with this.

        Returns the FULL count, or an error status (< 0).
        """
        m = payload.shape[0]
        fulls = 0
        i = 0
        k = 0
        while i < n:
            r = try_push(d, payload, m)
            if r == 0:
                i += 1
                k = 0
            elif r == FULL:
                fulls += 1
                k += 1
                backoff(6 if k < 6 else 7)
            else:
                return r
        return fulls

    @numba.njit(cache=True)
    def nj_pop(d, out, n, stats):
        """Pop ``n`` messages, backing off on EMPTY. stats = [got, empties, bytes, checksum]."""
        got = 0
        empties = 0
        nbytes = 0
        chk = 0
        k = 0
        while got < n:
            r = try_pop(d, out)
            if r >= 0:
                ln = r >> 8
                nbytes += ln
                chk += out[ln - 1] if ln > 0 else 0
                got += 1
                k = 0
            elif r == EMPTY:
                empties += 1
                k += 1
                backoff(6 if k < 6 else 7)
            else:
                stats[0] = got
                return r
        stats[0] = got
        stats[1] = empties
        stats[2] = nbytes
        stats[3] = chk
        return 0

    @numba.njit(cache=True)
    def nj_pairs(dtx, drx, payload, out, n, k):
        """One process: ``n`` rounds of ``k`` pushes then ``k`` pops (kernel cost, no contention)."""
        m = payload.shape[0]
        bad = 0
        for _ in range(n):
            for _ in range(k):
                if try_push(dtx, payload, m) != 0:
                    bad += 1
            for _ in range(k):
                if try_pop(drx, out) < 0:
                    bad += 1
        return bad

    @numba.njit(cache=True)
    def nj_push_only(dtx, payload, k):
        m = payload.shape[0]
        bad = 0
        for _ in range(k):
            if try_push(dtx, payload, m) != 0:
                bad += 1
        return bad

    @numba.njit(cache=True)
    def nj_pop_only(drx, out, k):
        bad = 0
        for _ in range(k):
            if try_pop(drx, out) < 0:
                bad += 1
        return bad

    # Compile now, in the parent, so forked children inherit the machine code.
    d0 = np.zeros(16, np.int64)
    p0 = np.zeros(64, np.uint8)
    nj_push(d0, p0, 0)
    nj_pop(d0, p0, 0, np.zeros(4, np.int64))
    nj_pairs(d0, d0, p0, p0, 0, 0)
    nj_push_only(d0, p0, 0)
    nj_pop_only(d0, p0, 0)
    _NJ.update(push=nj_push, pop=nj_pop, pairs=nj_pairs, push_only=nj_push_only, pop_only=nj_pop_only)
    return _NJ


def nj_producer(R, ep, k, n, spec):
    nj = _njit_funcs()
    d = ep.tx.kernel()            # the descriptor belongs to the process that uses it
    payload = np.full(spec.size, 0x5A, np.uint8)
    t0 = R.ready()
    r = nj["push"](d, payload, n)
    t1 = now()
    if r < 0:
        raise RunError(f"try_push returned status {r}")
    R.report(t0=t0, t1=t1, fulls=int(r))
    ep.tx.close()


def nj_consumer(R, ep, j, n, spec):
    nj = _njit_funcs()
    d = ep.rx.kernel()
    out = np.zeros(4096, np.uint8)
    stats = np.zeros(4, np.int64)
    t0 = R.ready()
    r = nj["pop"](d, out, n, stats)
    t1 = now()
    if r < 0:
        raise RunError(f"try_pop returned status {r} after {stats[0]} messages")
    if stats[0] != n or stats[2] != n * spec.size or stats[3] != n * 0x5A:
        raise RunError(f"njit consumer: got {stats[0]} messages, {stats[2]} bytes, checksum {stats[3]}")
    R.report(t0=t0, t1=t1, consumer=True, empties=int(stats[1]))
    ep.rx.close()


# --------------------------------------------------------------------------
# Cases.

class Batched(P.Peer):
    """A peer's batched API (send_many/recv_many, put_many/get_many)."""

    def __init__(self, inner: P.Peer, name: str):
        self.inner = inner
        self.key = inner.key + "-many"
        self.name = name
        self.mpmc = inner.mpmc
        self.note = f"batches of {P.BATCH}"

    def check(self):
        self.inner.check()

    def endpoint(self, spec):
        return self.inner.endpoint(spec)


@dataclass
class Case:
    key: str
    title: str
    kind: str                   # "tp" (msgs/s), "single" (one message, GB/s), "rtt", "njit"
    spec: P.Spec
    peers: list
    ref: str | None             # key of the reference peer for the ratio column
    pilot: int = 0
    lo: int = 0
    hi: int = 0
    reps: int | None = None     # overrides --reps (single-message case)
    about: str = ""
    rows: dict = field(default_factory=dict)      # peer key -> Row

    @property
    def multi(self):
        return self.spec.producers > 1 or self.spec.consumers > 1


@dataclass
class Row(SampleStats):
    peer: P.Peer
    status: str = "ok"          # ok | unavailable | error
    reason: str = ""
    n: int = 0
    samples: list = field(default_factory=list)   # dicts of metrics per measured run
    extra: dict = field(default_factory=dict)


def all_peers():
    shm = P.ShmPeer()
    return dict(
        shm=shm, mpq=P.MpQueuePeer(), sq=P.SimpleQueuePeer(), pipe=P.PipePeer(), ff=P.FasterFifoPeer(),
        zmq=P.ZmqPeer(), iox=P.IceoryxPeer(), ioxzc=P.IceoryxPeer(zero_copy=True),
        shm4k=P.ShmPeer(slot_size=4096, key="shm-slot4k", name="shm, slot_size=4096",
                        note="4 KiB messages inline in the ring instead of a blob segment"),
        shmpk=P.ShmPeer(codec="pickle", key="shm-pickle", name="shm, codec=pickle"),
        shmzc=P.ShmPeer(zero_copy=True, key="shm-zc", name="shm, recv_view (zero-copy read)",
                        note="consumer takes `rx.recv_view()`, reads its length and releases it, as the "
                             "iceoryx2 zero-copy consumer does with its sample"),
        shmres=P.ShmPeer(reserve=True, key="shm-reserve", name="shm, reserve=size",
                         note="`bounded(2, reserve=64 MiB)`: the channel's blobs are made with it, before "
                              "the run, as iceoryx2's publisher (every iceoryx2 row) is made with "
                              "`initial_max_slice_len` = the message size"),
        shmreszc=P.ShmPeer(reserve=True, zero_copy=True, key="shm-reserve-zc",
                           name="shm, reserve=size, recv_view",
                           note="reserve=size and the consumer as in *shm, recv_view*"),
    )


def make_cases():
    p = all_peers()
    basic = [p["shm"], p["mpq"], p["sq"], p["pipe"], p["ff"], p["zmq"], p["iox"]]
    shm_many = Batched(p["shm"], "shm send_many/recv_many")
    ff_many = Batched(p["ff"], "faster-fifo put_many/get_many")
    return [
        Case("b64", "64 B messages, 1 producer -> 1 consumer, one call per message", "tp",
             P.Spec(64, 1024), basic, "mp.Queue", 50_000, 20_000, 10_000_000,
             about="shm: `bounded(1024, codec=\"bytes\")`, `send`/`recv`."),
        Case("b64many", "64 B messages, 1 -> 1, batched API", "tp",
             P.Spec(64, 1024), [shm_many, ff_many], "faster-fifo-many", 102_400, 51_200, 50_000_000,
             about=f"Batches of {P.BATCH}: shm `send_many`/`recv_many({P.BATCH})`, "
                   f"faster-fifo `put_many`/`get_many(max_messages_to_get={P.BATCH})`."),
        Case("k4", "4 KiB messages, 1 -> 1", "tp",
             P.Spec(4 * KiB, 256), basic[:1] + [p["shm4k"]] + basic[1:], "mp.Queue", 10_000, 5_000, 5_000_000,
             about="shm's default slot carries 480 B inline, so 4 KiB goes through a blob "
                   "segment; `slot_size=4096` keeps it inline."),
        Case("m1", "1 MiB messages, 1 -> 1", "tp",
             P.Spec(MiB, 16), basic[:1] + [p["shmzc"]] + basic[1:] + [p["ioxzc"]], "iceoryx2", 300, 200, 200_000,
             about="Capacity 16 messages everywhere (a 16 MiB ring)."),
        Case("m64", "one 64 MiB message, 1 -> 1 (cold: fresh processes and channel)", "single",
             P.Spec(64 * MiB, 2), basic[:1] + [p["shmzc"], p["shmres"], p["shmreszc"]] + basic[1:] + [p["ioxzc"]],
             "iceoryx2", reps=7,
             about="One message per run (at least 7 runs), timed from the barrier to the consumer "
                   "holding it as bytes; each run starts fresh processes and a fresh channel (made "
                   "before the barrier, like iceoryx2's service and publisher, which is told the "
                   "message size: the *reserve=size* rows tell shm too)."),
        Case("dict", "dict-shaped objects, 1 -> 1", "tp",
             P.Spec(0, 1024, objects=True),
             [p["shm"], p["shmpk"], Batched(p["shm"], "shm send_many/recv_many"), p["mpq"], p["sq"], p["pipe"],
              p["ff"], Batched(p["ff"], "faster-fifo put_many/get_many"), p["zmq"], p["iox"]],
             "mp.Queue", 20_000, 20_000, 10_000_000,
             about="`{\"id\": i, \"name\": \"abc\", \"vals\": [1, 2, 3], \"x\": 1.5, \"ok\": True}`, built "
                   "per message by the producer. shm: default msgpack codec; the others pickle "
                   "(iceoryx2: pickle into a byte slice)."),
        Case("rtt", "ping-pong round trip, 64 B, two processes", "rtt",
             P.Spec(64, 16), basic, "iceoryx2", 2_000, 2_000, 300_000,
             about="Two channels; process A sends and waits for B's reply; per-round-trip "
                   "`perf_counter_ns`; p50/p99 over the run after a warm-up."),
        Case("mpmc", "2 producers + 2 consumers, 64 B", "tp",
             P.Spec(64, 1024, producers=2, consumers=2),
             [p["shm"], p["mpq"], p["sq"], p["ff"], p["zmq"], p["pipe"], p["iox"]], "pyzmq",
             20_000, 20_000, 10_000_000,
             about="Consumers compete for messages. pyzmq: each producer has a PUSH socket per consumer "
                   "and deals round robin."),
        Case("njit", "@njit loops: kernels.ring.try_push / try_pop, 64 B", "njit",
             P.Spec(64, 1024), [P.ShmPeer(key="shm-njit", name="shm kernels from @njit")], None,
             2_000_000, 2_000_000, 400_000_000,
             about="`bounded(1024, codec=\"bytes\")`. Producer: an @njit loop of `try_push(d, payload, 64)` "
                   "with `d = tx.kernel()` taken in the child; consumer: an @njit loop of `try_pop(d, out)` "
                   "with `d = rx.kernel()`. Both wait on FULL/EMPTY with `kernels.ring.backoff(6)` (64 pauses; "
                   "`sched_yield` after 6 misses in a row, so two spinning processes that land on one core "
                   "still make progress). Retrying sooner (crossbeam's 1, 2, 4... pauses) keeps pulling the "
                   "slot's cache line away from the other side: 2.2 M msgs/s in some runs here."),
    ]


def _roles(case: Case, peer, ep_or_pair, n, profile=False):
    spec = case.spec
    many = isinstance(peer, Batched)
    if case.kind == "rtt":
        a, b = ep_or_pair
        warm = min(1000, max(100, n // 10))
        return [(pp_ping, (a, b, n, warm, spec.size)), (pp_pong, (a, b, n + warm, spec.size))]
    ep = ep_or_pair
    if case.kind == "njit":
        return [(nj_consumer, (ep, 0, n, spec)), (nj_producer, (ep, 0, n, spec))]
    per = n // spec.producers
    roles = [(tp_consumer, (ep, j, n, spec, many, case.multi, profile)) for j in range(spec.consumers)]
    roles += [(tp_producer, (ep, k, per, spec, many, profile)) for k in range(spec.producers)]
    return roles


GATE = QuietGate()


def run_once(case: Case, peer, n, watch: ShmWatch, profile=False) -> dict:
    """One run of ``peer`` on ``case`` with ``n`` messages; returns its metrics.

    ``other`` in the result: cores used by other processes on the machine during the run.
    """
    GATE.wait()
    with ForeignLoad() as fl:
        out = _run_once(case, peer, n, watch, profile)
    out["other"] = fl.cores
    return out


def _run_once(case: Case, peer, n, watch: ShmWatch, profile=False) -> dict:
    spec = case.spec
    eps = []
    try:
        eps.append(peer.endpoint(spec))
        if case.kind == "rtt":
            eps.append(peer.endpoint(spec))
        target = tuple(eps) if case.kind == "rtt" else eps[0]

        def after_start():
            for e in eps:
                e.after_start()

        res = run_roles(_roles(case, peer, target, n, profile), RUN_TIMEOUT, after_start)
    finally:
        for e in eps:
            try:
                e.after_start()      # idempotent: the parent's own handles are closed either way
            except Exception:
                pass
            try:
                e.destroy()
            except Exception:
                pass
            watch.sweep(peer.name, e.shm_prefixes, is_bug=e.leak_is_bug)
    dt = elapsed(res)
    out = {"seconds": dt, "n": n}
    if case.kind == "rtt":
        r = res[0]
        out.update(p50=r["p50"], p99=r["p99"], mean=r["mean"], rate=n / (r["t1"] - r["t0"]))
    else:
        got = sum(r.get("got", 0) for r in res if r.get("consumer"))
        if case.kind != "njit" and got != n:
            raise RunError(f"consumers got {got} of {n} messages")
        out["rate"] = n / dt
        if not spec.objects:
            out["gbps"] = n * spec.size / dt / 1e9
        if case.kind == "single":
            out["ms"] = dt * 1e3
        if case.kind == "njit":
            out["fulls"] = sum(r.get("fulls", 0) for r in res)
            out["empties"] = sum(r.get("empties", 0) for r in res)
        profs = [(("consumer" if r.get("consumer") else "producer"), r.get("profile")) for r in res]
        if any(p for _, p in profs):
            out["profiles"] = profs
    return out


def _fail_reason(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    tail = [ln for ln in s if ln.strip()][-1:] if s else []
    head = s[0] if s else type(e).__name__
    msg = head if not tail or tail[0] == head else f"{head} ... {tail[0].strip()}"
    return msg[:300]


def run_case(case: Case, opts, watch: ShmWatch):
    log(f"\n== {case.title}")
    rows = case.rows
    for peer in case.peers:
        row = rows[peer.key] = Row(peer)
        try:
            peer.check()
            if case.multi and not peer.mpmc:
                raise Unavailable("no competing consumers (point to point / fan-out only)")
        except Unavailable as e:
            row.status, row.reason = "unavailable", str(e)
        except Exception as e:
            row.status, row.reason = "unavailable", f"{type(e).__name__}: {e}"
    live = [r for r in rows.values() if r.status == "ok"]
    multiple = P.BATCH * case.spec.producers if any(isinstance(r.peer, Batched) for r in live) else case.spec.producers
    # Pilot: sizes each peer's message count (and warms caches).
    for row in live:
        if case.kind == "single":
            row.n = 1
            continue
        try:
            m = run_once(case, row.peer, calibrate(0, 0, case.pilot, case.pilot, multiple), watch)
            row.n = calibrate(m["rate"], opts.seconds, case.lo, case.hi, multiple)
            log(f"   pilot {row.peer.name:34s} {fmt_rate(m['rate'])}/s -> n={row.n}")
        except Unavailable as e:
            row.status, row.reason = "unavailable", str(e)
        except Exception as e:
            row.status, row.reason = "error", _fail_reason(e)
            log(f"   pilot {row.peer.name:34s} FAILED: {row.reason}")
    reps = opts.reps if opts.quick else max(case.reps or 0, opts.reps)
    for rep in range(reps):
        for row in [r for r in rows.values() if r.status == "ok"]:
            try:
                m = run_once(case, row.peer, row.n, watch)
                row.samples.append(m)
                val = f"p50 {m['p50']:.1f} us p99 {m['p99']:.1f} us" if case.kind == "rtt" else \
                    f"{fmt_rate(m['rate'])}/s" + (f" {m['gbps']:.2f} GB/s" if "gbps" in m else "")
                log(f"   run {rep + 1}/{reps} {row.peer.name:34s} {val}  ({m['seconds']:.2f} s, "
                    f"other load {m['other']:.2f} cores)")
            except Exception as e:
                log(f"   run {rep + 1}/{reps} {row.peer.name:34s} FAILED: {_fail_reason(e)}")
                row.extra.setdefault("failures", []).append(_fail_reason(e))
                if not row.samples and rep == reps - 1:
                    row.status, row.reason = "error", _fail_reason(e)


# --------------------------------------------------------------------------
# Targets.

@dataclass
class Target:
    text: str
    case: str
    peer: str
    other: str | None
    metric: str
    factor: float
    lower_is_better: bool = False
    short: str = ""            # label of the target line in the chart


TARGETS = [
    Target("64 B per message: shm >= 10x mp.Queue", "b64", "shm", "mp.Queue", "rate", 10, short="10x mp.Queue"),
    Target("64 B per message: shm >= 2x pyzmq", "b64", "shm", "pyzmq", "rate", 2, short="2x pyzmq"),
    Target("batched: shm send_many/recv_many >= 5x faster-fifo put_many/get_many",
           "b64many", "shm-many", "faster-fifo-many", "rate", 5, short="5x faster-fifo"),
    Target("2 producers + 2 consumers: shm >= 2x pyzmq", "mpmc", "shm", "pyzmq", "rate", 2, short="2x pyzmq"),
    Target("round trip p50: shm below iceoryx2", "rtt", "shm", "iceoryx2", "p50", 1, lower_is_better=True,
           short="iceoryx2 p50"),
    Target("1 MiB: shm GB/s >= iceoryx2 (consumer gets bytes, both)", "m1", "shm", "iceoryx2", "gbps", 1,
           short="1x iceoryx2"),
    Target("1 MiB: shm recv_view GB/s >= iceoryx2 zero-copy read (both read in place)",
           "m1", "shm-zc", "iceoryx2-zc", "gbps", 1, short="1x zero-copy"),
    Target("one 64 MiB message, both told the size up front (shm reserve=, iceoryx2 initial_max_slice_len): "
           "shm GB/s >= 2x iceoryx2 (consumer gets bytes, both)", "m64", "shm-reserve", "iceoryx2",
           "gbps", 2, short="2x iceoryx2"),
    Target("one 64 MiB message, both told the size up front: shm recv_view GB/s >= 2x iceoryx2 zero-copy "
           "read (both read in place)", "m64", "shm-reserve-zc", "iceoryx2-zc", "gbps", 2, short="2x zero-copy"),
    Target("@njit loops: > 10 M messages/s", "njit", "shm-njit", None, "rate", 10e6, short="10 M/s"),
]


def target_lines(case) -> list[tuple[str, str, float]]:
    """(metric, label, threshold) of every target on ``case`` whose reference was measured."""
    out = []
    for t in TARGETS:
        if t.case != case.key:
            continue
        if t.other is None:
            out.append((t.metric, t.short, t.factor))
            continue
        o = case.rows.get(t.other)
        if o is not None and o.samples:
            out.append((t.metric, t.short, o.med(t.metric) * (1 if t.lower_is_better else t.factor)))
    return out


def judge(cases: dict) -> list[dict]:
    out = []
    for t in TARGETS:
        c = cases.get(t.case)
        row = c.rows.get(t.peer) if c else None
        other = c.rows.get(t.other) if (c and t.other) else None
        verdict, measured = "NOT RUN", "-"
        if c is None:
            pass
        elif row is None or not row.samples:
            verdict, measured = "FAIL", f"shm side has no result ({row.reason if row else 'missing'})"
        elif t.other is None:
            v = row.med(t.metric)
            measured = f"{fmt_rate(v)} msgs/s"
            verdict = "PASS" if v > t.factor else "FAIL"
        elif other is None or not other.samples:
            verdict = "N/A"
            measured = f"reference unavailable ({other.reason if other else 'missing'})"
        else:
            a, b = row.med(t.metric), other.med(t.metric)
            if t.lower_is_better:
                measured = f"{a:.1f} us vs {b:.1f} us ({b / a:.2f}x faster)" if a > 0 else "-"
                verdict = "PASS" if a < b else "FAIL"
            else:
                ratio = a / b if b > 0 else float("inf")
                unit = "GB/s" if t.metric == "gbps" else "msgs/s"
                va = f"{a:.2f}" if t.metric == "gbps" else fmt_rate(a)
                vb = f"{b:.2f}" if t.metric == "gbps" else fmt_rate(b)
                measured = f"{va} vs {vb} {unit} = {ratio:.2f}x (need {t.factor:g}x)"
                verdict = "PASS" if ratio >= t.factor else "FAIL"
        out.append({"target": t.text, "measured": measured, "verdict": verdict})
    return out


# --------------------------------------------------------------------------
# Where shm's time goes (single process, no contention) and a profiled 1 -> 1 run.



def breakdown(watch: ShmWatch, cases: dict) -> dict:
    import shm
    from shm.codec import get_codec
    out = {}
    K = 512
    nj = _njit_funcs()
    payload = b"\x5a" * 64
    obj = make_obj(7)
    tx, rx = shm.bounded(1024, codec="bytes")
    txo, rxo = shm.bounded(1024)
    try:
        names = (tx.name, txo.name)
        send, recv = tx.send, rx.recv

        def sends():
            for _ in range(K):
                send(payload)

        def recvs():
            for _ in range(K):
                recv()

        # Interleave so the ring never fills: time K sends, drain untimed; fill untimed, time K recvs.
        s_ns, r_ns = [], []
        for _ in range(20):
            t = time.perf_counter_ns()
            sends()
            s_ns.append((time.perf_counter_ns() - t) / K)
            t = time.perf_counter_ns()
            recvs()
            r_ns.append((time.perf_counter_ns() - t) / K)
        out["send 64 B (Python, ring not full)"] = min(s_ns)
        out["recv 64 B (Python, message waiting)"] = min(r_ns)
        batch = [payload] * P.BATCH
        sm, rm = [], []
        for _ in range(20):
            t = time.perf_counter_ns()
            tx.send_many(batch)
            sm.append((time.perf_counter_ns() - t) / P.BATCH)
            t = time.perf_counter_ns()
            got = rx.recv_many(P.BATCH)
            rm.append((time.perf_counter_ns() - t) / P.BATCH)
            assert len(got) == P.BATCH
        out[f"send_many 64 B, per message (batches of {P.BATCH})"] = min(sm)
        out[f"recv_many 64 B, per message (batches of {P.BATCH})"] = min(rm)
        bc = get_codec("bytes")
        out["bytes codec encode + decode"] = best_ns(lambda: [bc.decode(0, bc.encode(payload)) for _ in range(K)], K)
        sendo, recvo = txo.send, rxo.recv
        so, ro = [], []
        for _ in range(20):
            t = time.perf_counter_ns()
            for i in range(K):
                sendo(obj)
            so.append((time.perf_counter_ns() - t) / K)
            t = time.perf_counter_ns()
            for _ in range(K):
                recvo()
            ro.append((time.perf_counter_ns() - t) / K)
        out["send dict (msgpack)"] = min(so)
        out["recv dict (msgpack)"] = min(ro)
        mc = get_codec("msgpack")
        enc = mc.encode(obj)
        out["msgpack encode (dict)"] = best_ns(lambda: [mc.encode(obj) for _ in range(K)], K)
        out["msgpack decode (dict)"] = best_ns(lambda: [mc.decode(1, enc) for _ in range(K)], K)
        import pickle
        out["pickle dumps + loads (dict), for reference"] = best_ns(
            lambda: [pickle.loads(pickle.dumps(obj, 5)) for _ in range(K)], K)
        # Kernels alone: an @njit loop in this process (no Python, no contention).
        dtx, drx = tx.kernel(), rx.kernel()
        p = np.full(64, 0x5A, np.uint8)
        o = np.zeros(4096, np.uint8)
        ps, pp = [], []
        for _ in range(50):
            t = time.perf_counter_ns()
            nj["push_only"](dtx, p, K)
            ps.append((time.perf_counter_ns() - t) / K)
            t = time.perf_counter_ns()
            nj["pop_only"](drx, o, K)
            pp.append((time.perf_counter_ns() - t) / K)
        out["kernel try_push 64 B (@njit loop)"] = min(ps)
        out["kernel try_pop 64 B (@njit loop)"] = min(pp)
    finally:
        for h in (tx, rx, txo, rxo):
            h.close()
        watch.sweep("shm", names, is_bug=True)
    return out


def breakdown_large(watch: ShmWatch) -> dict:
    """Big messages in one process: shm send and recv, cold (new blob) and warm, against plain copies."""
    import shm
    out = {}
    for size, label in ((MiB, "1 MiB"), (64 * MiB, "64 MiB")):
        payload = b"\x5a" * size
        tx, rx = shm.bounded(1, codec="bytes")      # one slot: every message reuses its blob
        try:
            name = tx.name
            sends, recvs = [], []
            for _ in range(6):          # the first message creates the blob; the rest reuse it
                t = time.perf_counter_ns()
                tx.send(payload)
                t1 = time.perf_counter_ns()
                m = rx.recv()
                t2 = time.perf_counter_ns()
                assert len(m) == size
                del m
                sends.append(t1 - t)
                recvs.append(t2 - t1)
            for what, xs in (("send", sends), ("recv", recvs)):
                cold, warm = xs[0], min(xs[1:])
                out[f"{label} {what}, first message" + (" (creates a blob)" if what == "send" else "")] = \
                    (cold / 1e6, size / cold)
                out[f"{label} {what}, later messages (best of 5)"] = (warm / 1e6, size / warm)
        finally:
            tx.close()
            rx.close()
            watch.sweep("shm", (name,), is_bug=True)
        src = np.frombuffer(payload, np.uint8)
        fresh, mapped, objs = [], [], []
        dst = np.empty_like(src)
        for _ in range(6):
            t = time.perf_counter_ns()
            d2 = src.copy()                          # a new array: its pages are faulted in
            t1 = time.perf_counter_ns()
            np.copyto(dst, src)                      # destination already mapped
            t2 = time.perf_counter_ns()
            b = bytes(src)                           # what a consumer's new bytes object costs
            t3 = time.perf_counter_ns()
            del d2, b
            fresh.append(t1 - t)
            mapped.append(t2 - t1)
            objs.append(t3 - t2)
        del dst
        for what, xs in (("memcpy into a new array (page faults included)", fresh),
                         ("memcpy into mapped memory (np.copyto)", mapped),
                         ("bytes(buffer): a new bytes object", objs)):
            out[f"{label} {what}, first"] = (xs[0] / 1e6, size / xs[0])
            out[f"{label} {what}, best of 5"] = (min(xs[1:]) / 1e6, size / min(xs[1:]))
    return out


def profiled_run(watch: ShmWatch, n: int) -> dict:
    """The 64 B 1 -> 1 shm run again, each side under cProfile (slower: for proportions only)."""
    case = Case("prof", "profile", "tp", P.Spec(64, 1024), [], None)
    try:
        m = run_once(case, P.ShmPeer(), n, watch, profile=True)
    except Exception as e:
        return {"error": _fail_reason(e)}
    return {"n": n, "rate": m["rate"], "profiles": m.get("profiles", [])}


# --------------------------------------------------------------------------
# Reports.

def _ratio(case: Case, row: Row, metric: str, lower_better=False):
    ref = case.rows.get(case.ref) if case.ref else None
    if ref is None or not ref.samples or not row.samples:
        return "-"
    a, b = row.med(metric), ref.med(metric)
    if a != a or b != b or a <= 0 or b <= 0:
        return "-"
    r = (b / a) if lower_better else (a / b)
    return f"{r:.2f}x"


def case_table(case: Case) -> list[str]:
    L = []
    refname = case.rows[case.ref].peer.name if case.ref in case.rows else None
    rcol = f"vs {refname}" if refname else "vs (no reference)"
    if case.kind == "rtt":
        head = ["peer", "p50 (us)", "p99 (us)", "mean (us)", f"p50 {rcol}", "p50 over runs (us)", "round trips/run"]
    elif case.kind == "single":
        head = ["peer", "GB/s", "ms", rcol, "GB/s over runs", "runs"]
    elif case.spec.objects:
        head = ["peer", "msgs/s", rcol, "msgs/s over runs", "msgs/run"]
    else:
        head = ["peer", "msgs/s", "GB/s", rcol, "msgs/s over runs", "msgs/run"]
    head.append("other load")
    L.append("| " + " | ".join(head) + " |")
    L.append("|---|" + "|".join("---" if "over runs" in h else "---:" for h in head[1:]) + "|")
    blank = " |" * (len(head) - 2)
    for row in case.rows.values():
        name = f"**{row.peer.name}**" if row.peer.key.startswith("shm") else row.peer.name
        if not row.samples:
            what = "unavailable" if row.status == "unavailable" else "unavailable (failed)"
            L.append(f"| {name} | {what}: {row.reason.replace('|', '/')} |" + blank)
            continue
        other = f"{row.med('other'):.2f}"
        if case.kind == "rtt":
            lo, hi = row.span("p50")
            cells = [f"{row.med('p50'):.1f}", f"{row.med('p99'):.1f}", f"{row.med('mean'):.1f}",
                     _ratio(case, row, "p50", True), f"{lo:.1f}-{hi:.1f}", str(row.n)]
        elif case.kind == "single":
            lo, hi = row.span("gbps")
            cells = [f"{row.med('gbps'):.2f}", f"{row.med('ms'):.1f}", _ratio(case, row, "gbps"),
                     f"{lo:.2f}-{hi:.2f}", str(len(row.samples))]
        elif case.spec.objects:
            lo, hi = row.span("rate")
            cells = [fmt_rate(row.med("rate")), _ratio(case, row, "rate"), f"{fmt_rate(lo)}-{fmt_rate(hi)}", str(row.n)]
        else:
            lo, hi = row.span("rate")
            cells = [fmt_rate(row.med("rate")), f"{row.med('gbps'):.3f}", _ratio(case, row, "rate"),
                     f"{fmt_rate(lo)}-{fmt_rate(hi)}", str(row.n)]
        L.append(f"| {name} | " + " | ".join(cells + [other]) + " |")
        fails = row.extra.get("failures")
        if fails:
            L.append(f"| ↳ {len(fails)} failed run(s): {fails[0].replace('|', '/')} |" + blank)
    return L


def limits(cases, bd, bdl) -> list[str]:
    """Plain statements tying each failed target to a measured cost."""
    out = []

    def med(case, peer, metric):
        c = cases.get(case)
        r = c.rows.get(peer) if c else None
        return r.med(metric) if (r and r.samples) else None

    s, r = bd.get("send 64 B (Python, ring not full)"), bd.get("recv 64 B (Python, message waiting)")
    kp, kq = bd.get("kernel try_push 64 B (@njit loop)"), bd.get("kernel try_pop 64 B (@njit loop)")
    b64, mpq, zmq = med("b64", "shm", "rate"), med("b64", "mp.Queue", "rate"), med("b64", "pyzmq", "rate")
    need = max(10 * mpq if mpq else 0, 2 * zmq if zmq else 0)
    if s and r and b64 and b64 < need:
        out.append(
            f"64 B per message: with one consumer the rate cannot exceed 1/recv = {1e3 / r:.2f} M/s "
            f"(recv {r:.0f} ns, of which {kq:.0f} ns in the ring kernel; send {s:.0f} ns, {kp:.0f} ns in the kernel). "
            f"Measured {b64 / 1e6:.2f} M/s; the targets need {need / 1e6:.2f} M/s, i.e. recv under "
            f"{1e9 / need:.0f} ns, so the Python layer around the kernels has to shrink.")
    sm, rm = (bd.get(f"send_many 64 B, per message (batches of {P.BATCH})"),
              bd.get(f"recv_many 64 B, per message (batches of {P.BATCH})"))
    bm, ffm = med("b64many", "shm-many", "rate"), med("b64many", "faster-fifo-many", "rate")
    if sm and rm and bm and ffm and bm < 5 * ffm:
        out.append(
            f"Batched: send_many costs {sm:.0f} ns and recv_many {rm:.0f} ns per message in one process "
            f"(ceiling ~{1e3 / max(sm, rm):.1f} M/s per side); 5x faster-fifo needs {5 * ffm / 1e6:.2f} M/s.")
    nj = med("njit", "shm-njit", "rate")
    njrow = cases["njit"].rows.get("shm-njit") if "njit" in cases else None
    if nj and kq and njrow is not None and nj <= 10e6:
        fulls = median([s.get("fulls", 0) for s in njrow.samples])
        empties = median([s.get("empties", 0) for s in njrow.samples])
        side = ("the consumer is the bottleneck (the producer met FULL more often than the consumer met EMPTY)"
                if fulls > empties else
                "the producer is the bottleneck (the consumer met EMPTY more often than the producer met FULL)")
        lo, hi = njrow.span("rate")
        spread = (f" The runs spread from {lo / 1e6:.2f} to {hi / 1e6:.2f} M/s: on this VM a spinning pair "
                  "sometimes settles into a slow mode for tens of seconds." if hi > 2 * lo else "")
        out.append(
            f"@njit: {nj / 1e6:.2f} M/s is {1e9 / nj:.0f} ns per message across two processes, against "
            f"{kp:.0f} ns (push) and {kq:.0f} ns (pop) with both ends in one process and the ring in L1; "
            f"{side}.{spread}")
    g1, g1zc = med("m1", "shm", "gbps"), med("m1", "shm-zc", "gbps")
    i1, i1zc = med("m1", "iceoryx2", "gbps"), med("m1", "iceoryx2-zc", "gbps")
    if bdl and g1zc and i1zc and (g1zc < i1zc or (g1 and i1 and g1 < i1)):
        sw1 = next((v for k, v in bdl.items() if k.startswith("1 MiB send, later")), None)
        row = cases["m1"].rows.get("shm")
        lo, hi = row.span("gbps") if row is not None and row.samples else (None, None)
        irow = cases["m1"].rows.get("iceoryx2")
        ilo, ihi = irow.span("gbps") if irow is not None and irow.samples else (None, None)
        out.append(
            f"1 MiB: with `recv_view` the consumer copies nothing, so {g1zc:.1f} GB/s "
            f"({1e6 / (g1zc * 1e9 / MiB):.0f} us a message) is the producer's send: the copy into a "
            "blob plus the Python send path" +
            (f" (in one process, with the blob in cache, a send takes {sw1[0] * 1e3:.0f} us, {sw1[1]:.0f} GB/s)"
             if sw1 else "") +
            ". The producer takes the blob freed last from the ring's pool, as iceoryx2 hands out its most "
            f"recently freed sample ({i1zc:.1f} GB/s), so both write into memory still in cache." +
            (f" With a copy into bytes on the consumer, runs spread widely for both shm ({lo:.1f}-{hi:.1f} "
             f"GB/s) and iceoryx2 ({ilo:.1f}-{ihi:.1f}): each message is a new 1 MiB bytes object, and its "
             "cost depends on where malloc finds the memory." if lo and ilo else ""))
    m64, iox = med("m64", "shm-reserve", "ms"), med("m64", "iceoryx2", "ms")
    m64zc, ioxzc = med("m64", "shm-reserve-zc", "ms"), med("m64", "iceoryx2-zc", "ms")
    plain, plainzc = med("m64", "shm", "ms"), med("m64", "shm-zc", "ms")
    if bdl and m64 and not (iox and m64 * 2 <= iox and (not m64zc or not ioxzc or m64zc * 2 <= ioxzc)):
        sc = next((v for k, v in bdl.items() if k.startswith("64 MiB send, first")), None)
        sw = next((v for k, v in bdl.items() if k.startswith("64 MiB send, later")), None)
        bb = next((v for k, v in bdl.items() if k.startswith("64 MiB bytes(buffer)") and "best" in k), None)
        if sc and sw and bb:
            out.append(
                f"One 64 MiB message with `reserve=`: {m64:.0f} ms end to end" +
                (f" (iceoryx2 {iox:.0f} ms)" if iox else "") +
                (f", {m64zc:.0f} ms with `recv_view` (iceoryx2's zero-copy read {ioxzc:.0f} ms)"
                 if m64zc and ioxzc else "") +
                (f"; without it {plain:.0f} ms and {plainzc:.0f} ms" if plain and plainzc else "") +
                f". Without `reserve=` the first send creates the 64 MiB blob ({sc[0]:.0f} ms in one process: "
                "its pages are reserved with `posix_fallocate`, so that a full /dev/shm raises "
                "OutOfSharedMemory instead of SIGBUS, at about 2.4 us per 4 KiB page, serially in the kernel). "
                "With it the blob exists before the run; the forked sender maps it afresh with MAP_POPULATE "
                "(~6 ms: fork() does not copy the page tables of shared mappings, and faulting the pages in "
                f"one by one costs ~22 ms) and copies ({sw[0]:.0f} ms in one process, mapped). The consumer's "
                f"new 64 MiB bytes object costs ~{bb[0]:.0f} ms to fill on one thread, page faults included; "
                "recv fills it on two.")
    return out


def write_markdown(path, cases, verdicts, info, bd, bdl, prof, watch, opts, wall):
    L = []
    title = "# Channel benchmarks"
    if opts.quick:
        title += " (QUICK RUN: small counts, 1 repetition; not the reference results)"
    L += [title, ""]
    L.append("Generated by `python -m bench channels`" + (" --quick" if opts.quick else "") +
             f" in {wall / 60:.1f} min. Every producer and consumer is a separate forked process; a run "
             "is timed from the moment all its processes are set up (one barrier) to the moment the last "
             "consumer holds its last message. Each peer first gets a pilot run that sizes its message "
             f"count to about {opts.seconds:g} s per run; then {opts.reps} measured run(s) per peer, "
             "interleaved across peers; the tables give the **median** and the min-max over runs. "
             "Ratios are between medians of this same run. This machine is shared: before each run the "
             "harness waits (briefly, within a budget) for other processes to go quiet, and the "
             "*other load* column is the median number of cores that processes outside the benchmark "
             "used during the runs (0 = undisturbed; with 2 cores, 0.5 already means a peer's process "
             "shared a core some of the time).")
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    for k, v in info.items():
        L.append(f"| {k} | {v} |")
    L.append("")
    L.append("## Targets")
    L.append("")
    L.append("| target | measured (medians) | verdict |")
    L.append("|---|---|---|")
    for v in verdicts:
        L.append(f"| {v['target']} | {v['measured']} | **{v['verdict']}** |")
    L.append("")
    for case in cases.values():
        L.append(f"## {case.title}")
        L.append("")
        if case.about:
            L.append(case.about)
            L.append("")
        L += case_table(case)
        if case.kind == "njit":
            row = next(iter(case.rows.values()))
            if row.samples:
                L.append("")
                L.append(f"FULL retries (producer) per run: {median([s.get('fulls', 0) for s in row.samples]):.0f}; "
                         f"EMPTY polls (consumer): {median([s.get('empties', 0) for s in row.samples]):.0f}.")
        L.append("")
    L.append("## Peer notes")
    L.append("")
    seen = set()
    for case in cases.values():
        for row in case.rows.values():
            if row.peer.key in seen or not row.peer.note:
                continue
            seen.add(row.peer.key)
            L.append(f"- **{row.peer.name}**: {row.peer.note}")
    L.append("")
    if bd or prof:
        L.append("## Where shm's time goes")
        L.append("")
    if bd:
        L.append("Single process, no contention (best of several loops of 512 calls):")
        L.append("")
        L.append("| operation | ns per message |")
        L.append("|---|---:|")
        for k, v in bd.items():
            if v is not None:
                L.append(f"| {k} | {v:.0f} |")
        L.append("")
        s, r = bd.get("send 64 B (Python, ring not full)"), bd.get("recv 64 B (Python, message waiting)")
        kp, kq = bd.get("kernel try_push 64 B (@njit loop)"), bd.get("kernel try_pop 64 B (@njit loop)")
        if s and r and kp and kq:
            L.append(f"So from Python, `send` spends ~{kp:.0f} ns in the ring itself and ~{s - kp:.0f} ns in "
                     f"the interpreter and the call of the builtin bound to the ring (kernels/pycall.py); `recv` "
                     f"~{kq:.0f} ns in the ring and ~{r - kq:.0f} ns around it (the call, the new bytes object).")
            L.append("")
    lim = limits(cases, bd, bdl)
    if lim:
        L.append("What the numbers say about the failures (computed from this run):")
        L.append("")
        L += [f"- {x}" for x in lim]
        L.append("")
    if bdl:
        L.append("Large messages, single process (`bounded(1, codec=\"bytes\")`: every message reuses "
                 "one blob), against plain copies of the same size:")
        L.append("")
        L.append("| operation | ms | GB/s |")
        L.append("|---|---:|---:|")
        for k, (ms, gbps) in bdl.items():
            L.append(f"| {k} | {ms:.2f} | {gbps:.2f} |")
        L.append("")
    if prof:
        if "error" in prof:
            L.append(f"Profiled run failed: {prof['error']}")
        else:
            L.append(f"The 64 B 1 -> 1 run again with each side under cProfile ({prof['n']} messages, "
                     f"{fmt_rate(prof['rate'])} msgs/s: profiling slows it; read it for proportions and "
                     "for how often the slow paths run). Top functions by own time:")
            L.append("")
            for role, text in prof.get("profiles", []):
                if text:
                    L.append(f"{role}:")
                    L.append("")
                    L.append("```")
                    L += text.splitlines()[:14]
                    L.append("```")
                    L.append("")
    L.append("## Hygiene")
    L.append("")
    leaks = ShmWatch.summary(watch.leaks)
    removed = ShmWatch.summary(watch.removed)
    L.append("- shm segments left in /dev/shm after a run (a bug if any): " + ("; ".join(leaks) if leaks else "none"))
    L.append("- removed after peers (their own leftovers): " + ("; ".join(removed) if removed else "none"))
    new = watch.new_since_start()
    L.append(f"- /dev/shm entries before the run: {len(watch.before)}; new entries still there at the end: "
             f"{len(new)}" + (f" ({', '.join(new[:5])}{', ...' if len(new) > 5 else ''}: none is a segment of a "
                              "channel this benchmark made, those are checked and removed after every run; other "
                              "sessions on this shared machine make channels too)" if new else ""))
    L.append("- processes: every run's children are joined (or killed by pid after a timeout) before the next run")
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def write_png(path, cases, info, opts):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [c for c in cases.values() if any(r.samples for r in c.rows.values())]
    if not shown:
        return
    ncol = 3
    nrow = (len(shown) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 3.4 * nrow), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    py64 = cases.get("b64").rows.get("shm") if cases.get("b64") else None
    for ax, case in zip(axes.flat, shown):
        rows = list(case.rows.values())
        if case.key == "njit" and py64 is not None and py64.samples:
            rows.append(Row(P.Peer(), samples=py64.samples))
            rows[-1].peer.name = "shm send/recv from Python (64 B case)"
            rows[-1].peer.key = "ref"
        names, vals, errs, colors = [], [], [], []
        metric = {"rtt": "p50", "single": "gbps"}.get(case.kind, "gbps" if case.key in ("m1",) else "rate")
        for r in rows:
            names.append(r.peer.name)
            if r.samples:
                v = r.med(metric)
                lo, hi = r.span(metric)
                vals.append(v)
                errs.append((v - lo, hi - v))
            else:
                vals.append(0)
                errs.append((0, 0))
            colors.append("#d62728" if r.peer.key.startswith("shm") else "#7f7f7f")
        y = np.arange(len(rows))
        xerr = np.array(errs).T if errs else None
        ax.barh(y, vals, color=colors, xerr=xerr, capsize=2)
        ax.set_yticks(y)
        ax.set_yticklabels([n + ("" if v else "  (n/a)") for n, v in zip(names, vals)], fontsize=7)
        ax.invert_yaxis()
        pos = [v for v in vals if v > 0]
        if pos and max(pos) / min(pos) > 20:
            ax.set_xscale("log")
        lines = [x for x in target_lines(case) if x[0] == metric]
        for (tm, label, thr), ls in zip(lines, ("--", ":")):
            ax.axvline(thr, color="#1f77b4", linestyle=ls, linewidth=1.2, label=f"target: {label}")
            ax.set_xlim(right=max(ax.get_xlim()[1], thr * (1.5 if ax.get_xscale() == "log" else 1.12)))
        if lines:
            ax.legend(fontsize=6.5, loc="best", framealpha=0.85)
        unit = {"p50": "round trip p50, us (lower is better)", "gbps": "GB/s", "rate": "messages/s"}[metric]
        ax.set_xlabel(unit, fontsize=8)
        ax.set_title(case.title, fontsize=8.5)
        ax.tick_params(axis="x", labelsize=7)
        for yi, v in zip(y, vals):
            if v > 0:
                lab = f"{v:.1f}" if metric == "p50" else (f"{v:.2f}" if metric == "gbps" else fmt_rate(v))
                ax.text(v, yi, " " + lab, va="center", fontsize=6.5)
    fig.suptitle(f"shm channels vs peers ({'quick run' if opts.quick else 'medians of ' + str(opts.reps) + ' runs'}; "
                 f"{info['cpu']}, {info['cores']} cores, Python {info['python']}, {info['date']})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path, cases, verdicts, info, bd, bdl, prof):
    data = {"machine": info, "targets": verdicts, "breakdown_ns": bd,
            "breakdown_large_ms_gbps": bdl, "cases": {}}
    for c in cases.values():
        data["cases"][c.key] = {
            "title": c.title, "kind": c.kind, "ref": c.ref,
            "rows": {k: {"name": r.peer.name, "status": r.status, "reason": r.reason, "n": r.n,
                         "samples": [{kk: vv for kk, vv in s.items() if kk != "profiles"} for s in r.samples],
                         "failures": r.extra.get("failures", [])}
                     for k, r in c.rows.items()},
        }
    if prof:
        data["profiled_run"] = prof
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


# --------------------------------------------------------------------------
# Entry point.

def add_args(ap: argparse.ArgumentParser):
    """--cases and --no-profile are common to every group (``bench/__main__.py``)."""


def main(opts) -> int:
    t_start = time.monotonic()
    cases = select_cases({c.key: c for c in make_cases()}, opts)
    if not cases:
        return 0
    out_dir = results_dir(opts)
    watch = ShmWatch()
    info = machine()
    log(f"channels: {len(cases)} case(s), reps={opts.reps}, ~{opts.seconds:g} s per run; results -> {out_dir}")
    if "njit" in cases or not opts.no_profile:
        t = time.monotonic()
        _njit_funcs()
        log(f"compiled the @njit loops in {time.monotonic() - t:.1f} s")
    bd, bdl, prof = {}, {}, {}
    with LoadSampler() as load:
        for case in cases.values():
            try:
                run_case(case, opts, watch)
            except KeyboardInterrupt:
                raise
            except Exception as e:        # a bug in the harness must not lose the other cases
                log(f"case {case.key} failed: {e!r}")
        if not opts.no_profile:
            log("\n== where shm's time goes")
            try:
                bd = breakdown(watch, cases)
            except Exception as e:
                log(f"breakdown failed: {e!r}")
            try:
                bdl = breakdown_large(watch)
            except Exception as e:
                log(f"large-message breakdown failed: {e!r}")
            prof = profiled_run(watch, 100_000 if opts.quick else 300_000)
    run_info(info, GATE, load)
    # Anything of iceoryx2's still around (its global management segment outlives nodes).
    watch.sweep("iceoryx2", (P.IOX_PREFIX,))
    import shutil
    shutil.rmtree(P.IOX_ROOT, ignore_errors=True)
    verdicts = judge(cases)
    wall = time.monotonic() - t_start
    md = os.path.join(out_dir, "channels.md")
    write_markdown(md, cases, verdicts, info, bd, bdl, prof, watch, opts, wall)
    write_json(os.path.join(out_dir, "channels.json"), cases, verdicts, info, bd, bdl, prof)
    try:
        write_png(os.path.join(out_dir, "channels.png"), cases, info, opts)
    except Exception as e:
        log(f"plot failed: {e!r}")
    log("\n== targets")
    for v in verdicts:
        log(f"  {v['verdict']:7s} {v['target']}: {v['measured']}")
    leaks = ShmWatch.summary(watch.leaks)
    if leaks:
        log("  shm left segments in /dev/shm: " + "; ".join(leaks))
    log(f"\nwrote {md} (+ .png, .json) in {wall / 60:.1f} min")
    return 0
