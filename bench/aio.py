"""asyncio and broadcast benchmarks: shm against aioprocessing, run_in_executor and iceoryx2 (issue 4).

Cases, each side its own forked process (``common.run_roles``), 64-byte
messages:

* ``artt``: ping-pong round trip. The measuring side sends with a plain
  (sync) send and waits for the reply in each peer's way: shm
  ``await rx.recv_async()``, shm ``rx.recv()`` (the sync path the target is
  judged against), aioprocessing ``await q.coro_get()`` on an ``AioQueue``,
  ``await loop.run_in_executor(None, q.get)`` on a ``multiprocessing.Queue``,
  and ``q.get()`` (the sync path of those two). The answering side is sync
  everywhere. Per-round-trip ``perf_counter_ns``; p50/p99 after a warm-up.
* ``atp``: one producer process, one consumer: shm ``async for msg in rx``
  (and ``for msg in rx`` for reference), aioprocessing ``coro_get``,
  ``run_in_executor`` over ``mp.Queue`` (and its sync ``get``). msgs/s.
* ``fan1``/``fan2``/``fan4``: one publisher, 1/2/4 subscriber processes each
  receiving every message: ``shm.broadcast`` with the subscribers' sync
  ``recv`` and their ``recv_async``, against iceoryx2 publish-subscribe.
  The broadcast ring holds the whole run (capacity >= messages), so no
  subscriber can lag; a ``Lagged`` would still be counted and reported.
  iceoryx2 keeps 1024 samples per subscriber with ``RetryUntilDelivered``
  backpressure (its lossless mode).

Target (issue 4): async recv within 2x of the sync path's latency, judged
on the round-trip p50 medians of the same run (p99 reported beside it).
Fan-out and throughput have no target: the ratios are reported.
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import os
import time
from dataclasses import dataclass, field

from . import peers as P
from .common import (CTX, ForeignLoad, LoadSampler, QuietGate, RunError, SampleStats, ShmWatch, Unavailable,
                     _version, best_ns, calibrate, elapsed, fmt_rate, log, machine, median, now, results_dir,
                     run_info, run_roles, select_cases)

GATE = QuietGate()
RUN_TIMEOUT = 90.0
SIZE = 64
CAP = 1024                  # bounded channel / iceoryx2 per-subscriber buffer
BC_SLOT = 128               # broadcast slot: 64 B payload + header
BC_MAX = 1 << 21            # most messages in one fan-out run (ring of 256 MiB at 128 B slots)


# --------------------------------------------------------------------------
# Peers. A queue peer makes an Endpoint (bench/peers.py's interface) in the
# parent; ``mode`` says how the measuring side receives.

class AioQueuePeer(P.Peer):
    key = "aioprocessing"
    name = "aioprocessing AioQueue, await coro_get()"
    note = "AioQueue (a multiprocessing.Queue whose coro_get runs get() in its own ThreadPoolExecutor)"

    def check(self):
        try:
            import aioprocessing  # noqa: F401
        except Exception as e:
            raise Unavailable(f"import aioprocessing: {e} (pip install aioprocessing)") from None

    def endpoint(self, spec):
        return _AioEnd(spec)


class _AioEnd(P.Endpoint):
    def __init__(self, spec):
        super().__init__(spec)
        import aioprocessing
        self.q = aioprocessing.AioQueue()

    def sender(self, k):
        t = P.Tx()
        t.send = self.q.put
        return t

    def receiver(self, j):
        r = P.Rx()
        r.recv = self.q.get
        r.handle = self.q
        return r

    def destroy(self):
        self.q.close()


@dataclass
class QPeer:
    """One row of artt/atp: a channel peer and the way the measuring side receives."""
    key: str
    name: str
    inner: P.Peer
    mode: str                   # sync | shm-async | aiop | executor
    note: str = ""

    def check(self):
        self.inner.check()


def queue_peers():
    shm, mpq = P.ShmPeer(), P.MpQueuePeer()
    return [
        QPeer("shm-async", "shm, await rx.recv_async()", shm, "shm-async",
              "`bounded(1024, codec=\"bytes\")`; the coroutine retries for 50 us, then hands the wait to "
              "the bridge thread"),
        QPeer("shm", "shm, rx.recv() (sync)", shm, "sync", "the same channel, sync recv"),
        QPeer("aioprocessing", "aioprocessing, await q.coro_get()", AioQueuePeer(), "aiop",
              "`AioQueue()`; put() is the plain multiprocessing put"),
        QPeer("executor", "mp.Queue, await run_in_executor(None, q.get)", mpq, "executor",
              "the loop's default ThreadPoolExecutor"),
        QPeer("mpq", "mp.Queue, q.get() (sync)", mpq, "sync", "unbounded multiprocessing.Queue"),
    ]


def queue_peers_tp():
    ps = {p.key: p for p in queue_peers()}
    ps["shm-async"] = QPeer("shm-async", "shm, async for msg in rx", P.ShmPeer(), "shm-async", ps["shm-async"].note)
    ps["shm"] = QPeer("shm", "shm, for msg in rx (sync)", P.ShmPeer(), "sync", "the same channel, sync iteration")
    return [ps[k] for k in ("shm-async", "shm", "aioprocessing", "executor", "mpq")]


class _BcEnd:
    """shm.broadcast made in the parent (whose subscriber closes at once); children use the inherited sender."""
    leak_is_bug = True

    def __init__(self, n, k):
        import shm
        self.tx, rx = shm.broadcast(max(n, CAP), codec="bytes", slot_size=BC_SLOT)
        rx.close()
        self.name = self.tx.name
        self.prefixes = (self.name,)

    def after_start(self):
        self.tx.close()

    def destroy(self):
        self.tx.close()


class _IoxFanEnd:
    """iceoryx2 publish-subscribe to ``k`` subscribers (bench/peers.py's node setup)."""
    leak_is_bug = False
    prefixes = (P.IOX_PREFIX,)

    def __init__(self, n, k):
        self.k = k
        self.service = f"shmbench/aio/{os.getpid()}/{next(P._iox_seq)}"
        self.pub_made = CTX.Event()
        self.subs_ready = CTX.Semaphore(0)

    def after_start(self):
        pass

    def destroy(self):
        import shutil
        shutil.rmtree(P.IOX_ROOT, ignore_errors=True)

    def _svc(self):
        iox2, node = P._iox_node()
        svc = (node.service_builder(iox2.ServiceName.new(self.service))
               .publish_subscribe(iox2.Slice[ctypes.c_uint8])
               .max_subscribers(max(2, self.k)).subscriber_max_buffer_size(CAP).history_size(0)
               .enable_safe_overflow(False).open_or_create())
        return iox2, node, svc


@dataclass
class BcPeer:
    key: str
    name: str
    kind: str                   # shm | shm-async | iox
    note: str = ""

    def check(self):
        if self.kind == "iox":
            P.IceoryxPeer().check()
        else:
            import shm  # noqa: F401

    def endpoint(self, n, k):
        return _IoxFanEnd(n, k) if self.kind == "iox" else _BcEnd(n, k)


def bc_peers():
    return [
        BcPeer("shm", "shm.broadcast, rx.recv()", "shm",
               f"`broadcast(capacity >= messages, codec=\"bytes\", slot_size={BC_SLOT})`: the ring holds the "
               "whole run, so nobody can lag (Lagged would be counted)"),
        BcPeer("shm-async", "shm.broadcast, await rx.recv_async()", "shm-async", "the same, subscribers await"),
        BcPeer("iceoryx2", "iceoryx2 publish-subscribe", "iox",
               f"Slice[u8], {CAP} samples per subscriber, RetryUntilDelivered (lossless: the publisher waits "
               "for the slowest subscriber); loan + memmove + send; subscribers poll receive(), sched_yield() "
               "when empty, and copy the payload into bytes"),
    ]


# --------------------------------------------------------------------------
# Roles.

def _get_fn(mode, r):
    """An async function returning the next message the way ``mode`` receives it."""
    if mode == "shm-async":
        return r.handle.recv_async
    if mode == "aiop":
        return r.handle.coro_get
    if mode == "executor":
        recv = r.recv
        loop = asyncio.get_running_loop()
        return lambda: loop.run_in_executor(None, recv)
    raise ValueError(mode)


def rtt_ping(R, a, b, n, warm, mode):
    tx = a.sender(0)
    rx = b.receiver(0)
    rx.settle()
    tx.settle()
    payload = b"\x5a" * SIZE
    send = tx.send
    clock = time.perf_counter_ns
    rtt = [0] * n

    def sync():
        recv = rx.recv
        R.ready()
        for _ in range(warm):
            send(payload)
            recv()
        t0 = now()
        for i in range(n):
            t = clock()
            send(payload)
            recv()
            rtt[i] = clock() - t
        return t0

    async def run_async():
        get = _get_fn(mode, rx)
        R.ready()               # blocks the loop, which has nothing else to do yet
        for _ in range(warm):
            send(payload)
            await get()
        t0 = now()
        for i in range(n):
            t = clock()
            send(payload)
            m = await get()
            rtt[i] = clock() - t
        if len(m) != SIZE:
            raise RunError(f"unexpected reply {m[:40]!r}")
        return t0

    t0 = sync() if mode == "sync" else asyncio.run(run_async())
    t1 = now()
    rtt.sort()
    R.report(t0=t0, t1=t1, consumer=True, n=n, p50=rtt[n // 2] / 1e3, p99=rtt[min(n - 1, int(n * 0.99))] / 1e3,
             mean=sum(rtt) / n / 1e3)
    tx.close()
    rx.close()


def rtt_pong(R, a, b, total):
    rx = a.receiver(0)
    tx = b.sender(0)
    rx.settle()
    tx.settle()
    payload = b"\xa5" * SIZE
    send, recv = tx.send, rx.recv
    t0 = R.ready()
    for _ in range(total):
        recv()
        send(payload)
    R.report(t0=t0, t1=now())
    tx.close()
    rx.close()


def tp_producer(R, ep, n):
    tx = ep.sender(0)
    tx.settle()
    payload = b"\x5a" * SIZE
    send = tx.send
    t0 = R.ready()
    for _ in range(n):
        send(payload)
    R.report(t0=t0, t1=now())
    tx.close()


def tp_consumer(R, ep, n, mode):
    rx = ep.receiver(0)
    rx.settle()
    got = 0
    m = None

    async def run_async():
        nonlocal got, m
        if mode == "shm-async":
            async for m in rx.handle:
                got += 1
                if got == n:
                    break
        else:
            get = _get_fn(mode, rx)
            for _ in range(n):
                m = await get()
            got = n

    if mode == "sync" and hasattr(rx, "handle"):
        t0 = R.ready()
        for m in rx.handle:
            got += 1
            if got == n:
                break
    elif mode == "sync":
        recv = rx.recv
        t0 = R.ready()
        for _ in range(n):
            m = recv()
        got = n
    else:
        t0 = R.ready()
        asyncio.run(run_async())
    t1 = now()
    if got != n or m is None or len(m) != SIZE:
        raise RunError(f"consumer got {got} of {n} messages, last {str(m)[:40]}")
    R.report(t0=t0, t1=t1, consumer=True, got=got)
    rx.close()


def bc_publisher(R, ep, n, k):
    payload = b"\x5a" * SIZE
    if isinstance(ep, _IoxFanEnd):
        iox2, node, svc = ep._svc()
        pub = (svc.publisher_builder().backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
               .initial_max_slice_len(SIZE).create())
        ep.pub_made.set()
        for _ in range(k):
            if not ep.subs_ready.acquire(timeout=60):
                raise RunError("iceoryx2: a subscriber never connected")
        pub.update_connections()
        loan, mm = pub.loan_slice_uninit, ctypes.memmove
        t0 = R.ready()
        for _ in range(n):
            s = loan(SIZE)
            mm(s.payload_ptr, payload, SIZE)
            if s.assume_init().send() != k:
                raise RunError(f"iceoryx2: a sample reached fewer than {k} subscribers")
        t1 = now()
        R.report(t0=t0, t1=t1)
        pub.delete()
        return
    tx = ep.tx
    send = tx.send
    t0 = R.ready()
    for _ in range(n):
        send(payload)
    t1 = now()
    R.report(t0=t0, t1=t1)
    tx.close()


def bc_subscriber(R, ep, n, kind):
    got = lost = 0
    m = None
    if kind == "iox":
        iox2, node, svc = ep._svc()
        sub = svc.subscriber_builder().buffer_size(CAP).create()
        if not ep.pub_made.wait(60):
            raise RunError("iceoryx2: the publisher was never created")
        if sub.receive() is not None:           # connects to the publisher's data segment
            raise RunError("iceoryx2: unexpected sample before the start")
        ep.subs_ready.release()
        rcv, sa, yld = sub.receive, ctypes.string_at, os.sched_yield
        t0 = R.ready()
        while got < n:
            s = rcv()
            if s is None:
                yld()
                continue
            m = sa(s.payload_ptr, s.header.number_of_elements)
            s.delete()
            got += 1
        t1 = now()
        R.report(t0=t0, t1=t1, consumer=True, got=got, lost=0)
        sub.delete()
        return
    import shm
    rx = shm.BroadcastReceiver.open(ep.name)
    ep.tx.close()                                # the inherited publisher handle: not ours
    Lagged = shm.Lagged

    async def run_async():
        nonlocal got, lost, m
        recv = rx.recv_async
        while got + lost < n:
            try:
                m = await recv()
                got += 1
            except Lagged as e:
                lost += e.skipped

    t0 = R.ready()
    if kind == "shm-async":
        asyncio.run(run_async())
    else:
        recv = rx.recv
        while got + lost < n:
            try:
                m = recv()
                got += 1
            except Lagged as e:
                lost += e.skipped
    t1 = now()
    if got and (m is None or len(m) != SIZE):
        raise RunError(f"subscriber: unexpected last message {str(m)[:40]}")
    R.report(t0=t0, t1=t1, consumer=True, got=got, lost=lost)
    rx.close()


# --------------------------------------------------------------------------
# Cases and runs.

@dataclass
class Case:
    key: str
    title: str
    kind: str                   # rtt | tp | fan
    peers: list
    ref: str                    # key the ratio column divides by
    subs: int = 1
    pilot: int = 2000
    lo: int = 2000
    hi: int = 2_000_000
    about: str = ""
    rows: dict = field(default_factory=dict)


@dataclass
class Row(SampleStats):
    peer: object
    status: str = "ok"          # ok | unavailable | error
    reason: str = ""
    n: int = 0
    samples: list = field(default_factory=list)
    failures: list = field(default_factory=list)


def make_cases():
    cases = [
        Case("artt", "async recv latency: ping-pong round trip, 64 B, two processes", "rtt", queue_peers(), "shm",
             pilot=2000, lo=2000, hi=300_000,
             about="Process A sends (sync) and awaits B's reply the row's way; B answers with a sync "
                   "recv/send. Two channels (queues), one each way."),
        Case("atp", "async recv throughput: 64 B, 1 producer -> 1 consumer", "tp", queue_peers_tp(), "shm",
             pilot=5000, lo=5000, hi=5_000_000,
             about="The producer sends with the peer's plain send/put; the consumer receives the row's way "
                   "and stops after the last message."),
    ]
    for k in (1, 2, 4):
        cases.append(Case(f"fan{k}", f"broadcast fan-out: 1 publisher -> {k} subscriber process{'es' if k > 1 else ''}"
                          ", 64 B, every subscriber gets every message", "fan", bc_peers(), "iceoryx2", subs=k,
                          pilot=20_000, lo=20_000, hi=BC_MAX,
                          about="msgs/s per subscriber = messages / (barrier to the last subscriber holding its "
                                "last message); delivered/s = that times the subscriber count."))
    return cases


def _roles(case, row_peer, ep, n):
    if case.kind == "rtt":
        a, b = ep
        warm = min(1000, max(100, n // 10))
        return [(rtt_ping, (a, b, n, warm, row_peer.mode)), (rtt_pong, (a, b, n + warm))]
    if case.kind == "tp":
        return [(tp_consumer, (ep, n, row_peer.mode)), (tp_producer, (ep, n))]
    return ([(bc_subscriber, (ep, n, row_peer.kind)) for _ in range(case.subs)]
            + [(bc_publisher, (ep, n, case.subs))])


def _run_once(case, peer, n, watch) -> dict:
    eps = []
    try:
        if case.kind == "fan":
            eps.append(peer.endpoint(n, case.subs))
            target = eps[0]
        else:
            spec = P.Spec(SIZE, CAP)
            eps.append(peer.inner.endpoint(spec))
            if case.kind == "rtt":
                eps.append(peer.inner.endpoint(spec))
            target = tuple(eps) if case.kind == "rtt" else eps[0]

        def after_start():
            for e in eps:
                e.after_start()

        res = run_roles(_roles(case, peer, target, n), RUN_TIMEOUT, after_start)
    finally:
        for e in eps:
            for f in (e.after_start, e.destroy):
                try:
                    f()
                except Exception:
                    pass
            prefixes = getattr(e, "prefixes", None) or getattr(e, "shm_prefixes", ())
            watch.sweep(peer.name, prefixes, is_bug=e.leak_is_bug)
    out = {"n": n, "seconds": elapsed(res)}
    if case.kind == "rtt":
        r = res[0]
        out.update(p50=r["p50"], p99=r["p99"], mean=r["mean"], rate=n / (r["t1"] - r["t0"]))
    elif case.kind == "tp":
        out["rate"] = n / out["seconds"]
    else:
        subs = [r for r in res if r.get("consumer")]
        out["rate"] = n / out["seconds"]                  # per subscriber (the slowest)
        out["delivered"] = sum(r["got"] for r in subs) / out["seconds"]
        out["lost"] = sum(r["lost"] for r in subs)
        out["pub_rate"] = n / (res[-1]["t1"] - res[-1]["t0"])
    return out


def run_once(case, peer, n, watch) -> dict:
    GATE.wait()
    with ForeignLoad() as fl:
        out = _run_once(case, peer, n, watch)
    out["other"] = fl.cores
    return out


def _reason(e) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    msg = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}"
    return msg[:300]


def _show(case, m) -> str:
    if case.kind == "rtt":
        return f"p50 {m['p50']:.1f} us p99 {m['p99']:.1f} us"
    s = f"{fmt_rate(m['rate'])}/s"
    if case.kind == "fan":
        s += f" per subscriber, publisher {fmt_rate(m['pub_rate'])}/s, lost {m['lost']}"
    return s


def run_case(case, opts, watch):
    log(f"\n== {case.key}: {case.title}")
    for peer in case.peers:
        row = case.rows[peer.key] = Row(peer)
        try:
            peer.check()
        except Unavailable as e:
            row.status, row.reason = "unavailable", str(e)
        except Exception as e:
            row.status, row.reason = "unavailable", f"{type(e).__name__}: {e}"
        if row.status != "ok":
            log(f"   {peer.name:44s} unavailable: {row.reason}")
    for row in [r for r in case.rows.values() if r.status == "ok"]:
        try:
            m = max((run_once(case, row.peer, case.pilot, watch) for _ in range(2)), key=lambda x: x["rate"])
            row.n = calibrate(m["rate"], opts.seconds, case.lo, case.hi)
            log(f"   pilot {row.peer.name:44s} {_show(case, m)} -> n={row.n}")
        except Unavailable as e:
            row.status, row.reason = "unavailable", str(e)
        except Exception as e:
            row.status, row.reason = "error", _reason(e)
            log(f"   pilot {row.peer.name:44s} FAILED: {row.reason}")
    for rep in range(opts.reps):
        for row in [r for r in case.rows.values() if r.status == "ok"]:
            try:
                m = run_once(case, row.peer, row.n, watch)
                row.samples.append(m)
                log(f"   run {rep + 1}/{opts.reps} {row.peer.name:44s} {_show(case, m)}  ({m['seconds']:.2f} s, "
                    f"other load {m['other']:.2f} cores)")
            except Exception as e:
                row.failures.append(_reason(e))
                log(f"   run {rep + 1}/{opts.reps} {row.peer.name:44s} FAILED: {_reason(e)}")
                if not row.samples and rep == opts.reps - 1:
                    row.status, row.reason = "error", _reason(e)


# --------------------------------------------------------------------------
# Where the time goes: one process, no other side.

def breakdown() -> dict:
    import shm
    out = {}
    K = 512
    payload = b"\x5a" * SIZE
    tx, rx = shm.bounded(CAP, codec="bytes")
    try:
        send, recv, try_recv, recv_async = tx.send, rx.recv, rx.try_recv, rx.recv_async

        def fill():
            for _ in range(K):
                send(payload)

        def timed(fn, reps=20):
            best = float("inf")
            for _ in range(reps):
                fill()
                t = time.perf_counter_ns()
                fn()
                best = min(best, (time.perf_counter_ns() - t) / K)
            return best

        def sends():
            for _ in range(K):
                send(payload)

        def drain():
            for _ in range(K):
                recv()

        s = []
        for _ in range(20):
            t = time.perf_counter_ns()
            sends()
            s.append((time.perf_counter_ns() - t) / K)
            drain()
        out["tx.send 64 B (ring not full)"] = min(s)

        def recvs():
            for _ in range(K):
                recv()

        def tries():
            for _ in range(K):
                try_recv()
        out["rx.recv() (message waiting)"] = timed(recvs)
        out["rx.try_recv() (message waiting)"] = timed(tries)         # the channel is empty again
        Empty = shm.Empty

        def misses():
            for _ in range(K):
                try:
                    try_recv()
                except Empty:
                    pass
        out["rx.try_recv() on an empty channel, Empty caught (one retry of recv_async's spin)"] = best_ns(
            misses, K, 20)

        def yields():
            for _ in range(K):
                os.sched_yield()
        out["os.sched_yield() (the spin's other half)"] = best_ns(yields, K, 20)

        loop = asyncio.new_event_loop()
        try:
            async def awaits():
                for _ in range(K):
                    await recv_async()

            async def afor():
                i = 0
                async for _ in rx:
                    i += 1
                    if i == K:
                        break

            async def noop_coro():
                return None

            async def noops():
                for _ in range(K):
                    await noop_coro()

            out["await rx.recv_async() (message waiting)"] = timed(lambda: loop.run_until_complete(awaits()))
            out["async for msg in rx, per message (messages waiting)"] = timed(lambda: loop.run_until_complete(afor()))
            out["(await of an empty coroutine, for scale)"] = best_ns(lambda: loop.run_until_complete(noops()), K, 20)

            def noop():
                return None

            async def hops():
                for _ in range(64):
                    await loop.run_in_executor(None, noop)
            loop.run_until_complete(hops())            # start the pool's thread
            out["await loop.run_in_executor(None, noop) (thread hop, no queue)"] = best_ns(
                lambda: loop.run_until_complete(hops()), 64, 10)
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
    finally:
        tx.close()
        rx.close()
    try:
        out.update(_bc_breakdown(K, payload))
    except Exception as e:                  # private parts moved: the public figures above stand
        log(f"broadcast breakdown failed: {e!r}")
    return out


def _bc_breakdown(K, payload) -> dict:
    """shm.broadcast's send and recv, and the parts of them (private attributes, for diagnosis only)."""
    import shm
    out = {}
    tx, rx = shm.broadcast(1 << 16, codec="bytes", slot_size=BC_SLOT)
    try:
        port = tx._port
        send, recv = tx.send, rx.recv

        def sends():
            for _ in range(K):
                send(payload)
        out["broadcast tx.send 64 B"] = best_ns(sends, K, 20)
        out["  of which port.subscribers() (the count send returns)"] = best_ns(
            lambda: [port.subscribers() for _ in range(K)], K, 20)
        out["  of which port.encode + port.publish (the message itself)"] = best_ns(
            lambda: [port.publish(*port.encode(payload)) for _ in range(K)], K, 20)
        rx._cur = port.tail()
        best = float("inf")
        for _ in range(20):
            for _ in range(K):
                port.publish(*port.encode(payload))
            t = time.perf_counter_ns()
            for _ in range(K):
                recv()
            best = min(best, (time.perf_counter_ns() - t) / K)
        out["broadcast rx.recv() 64 B (message waiting)"] = best
        buf = rx._port.buf
        out["  of which port.buf.ctypes.data (taken on every read)"] = best_ns(
            lambda: [buf.ctypes.data for _ in range(K)], K, 20)
    finally:
        tx.close()
        rx.close()
    return out


# --------------------------------------------------------------------------
# Verdicts and reports.

def judge(cases) -> list[dict]:
    c = cases.get("artt")
    out = []
    if c is None:
        return out
    a, s = c.rows.get("shm-async"), c.rows.get("shm")
    for metric, text in (("p50", "async recv within 2x of the sync path's latency (round trip p50)"),
                         ("p99", "the same at p99 (stricter reading, not the issue's wording)")):
        if not (a and a.samples and s and s.samples):
            out.append({"target": text, "verdict": "FAIL" if not (a and a.samples) else "N/A",
                        "measured": "not measured"})
            continue
        va, vs = a.med(metric), s.med(metric)
        ratio = va / vs
        out.append({"target": text, "verdict": "PASS" if ratio <= 2.0 else "FAIL", "ratio": ratio,
                    "measured": f"{va:.1f} us vs {vs:.1f} us = {ratio:.2f}x (need <= 2x)"})
    return out


def ratios(cases) -> list[str]:
    """The ratios the issue asks to report (no targets)."""
    out = []

    def med(ck, pk, metric="rate"):
        c = cases.get(ck)
        r = c.rows.get(pk) if c else None
        return r.med(metric) if r is not None and r.samples else None

    a, s, ai, ex = med("atp", "shm-async"), med("atp", "shm"), med("atp", "aioprocessing"), med("atp", "executor")
    if a and s:
        out.append(f"async throughput: shm `async for` {fmt_rate(a)} msgs/s = {a / s:.2f}x shm's sync `for`"
                   + (f", {a / ai:.0f}x aioprocessing" if ai else "") + (f", {a / ex:.0f}x run_in_executor" if ex else ""))
    a, ai, ex = med("artt", "shm-async", "p50"), med("artt", "aioprocessing", "p50"), med("artt", "executor", "p50")
    if a and (ai or ex):
        out.append(f"async round trip p50: shm {a:.1f} us" + (f", aioprocessing {ai:.0f} us ({ai / a:.0f}x)" if ai else "")
                   + (f", run_in_executor {ex:.0f} us ({ex / a:.0f}x)" if ex else ""))
    for k in (1, 2, 4):
        s, sa, io = med(f"fan{k}", "shm"), med(f"fan{k}", "shm-async"), med(f"fan{k}", "iceoryx2")
        if s and io:
            out.append(f"fan-out to {k}: shm {fmt_rate(s)} msgs/s per subscriber = {s / io:.2f}x iceoryx2 "
                       f"({fmt_rate(io)})" + (f"; subscribers awaiting: {fmt_rate(sa)} = {sa / io:.2f}x" if sa else ""))
    return out


def where_time_goes(cases, bd) -> list[str]:
    out = []
    c = cases.get("artt")
    a = c.rows.get("shm-async") if c else None
    s = c.rows.get("shm") if c else None
    r, ra = bd.get("rx.recv() (message waiting)"), bd.get("await rx.recv_async() (message waiting)")
    if a and a.samples and s and s.samples and r and ra:
        d = a.med("p50") - s.med("p50")
        out.append(f"In one process with the message already there, `await rx.recv_async()` costs {ra:.0f} ns "
                   f"against {r:.0f} ns for `rx.recv()`: {ra - r:.0f} ns of coroutine, closure and "
                   f"`get_running_loop()`/`perf_counter()` around the same `try_recv`. The round trips differ by "
                   f"{d * 1e3:.0f} ns at p50; a reply that arrives within the 50 us spin never reaches the bridge "
                   "thread, one that arrives later costs two thread wake-ups (the p99 column).")
    miss = next((v for k, v in bd.items() if k.startswith("rx.try_recv() on an empty")), None)
    yld = next((v for k, v in bd.items() if k.startswith("os.sched_yield()")), None)
    if miss and yld:
        out.append(f"While the reply is on its way, `recv_async` spins in Python: each retry is a `try_recv` "
                   f"that raises and catches `Empty` ({miss:.0f} ns) plus an `os.sched_yield()` ({yld:.0f} ns), "
                   f"so the coroutine notices a reply up to ~{(miss + yld) / 1e3:.1f} us after it lands; the sync "
                   "`recv` spins inside one kernel call (pause instructions, no exception) and notices it within "
                   "tens of ns.")
    bs = bd.get("broadcast tx.send 64 B")
    bsub = bd.get("  of which port.subscribers() (the count send returns)")
    bpub = bd.get("  of which port.encode + port.publish (the message itself)")
    br = bd.get("broadcast rx.recv() 64 B (message waiting)")
    bct = bd.get("  of which port.buf.ctypes.data (taken on every read)")
    if bs and bsub and bpub:
        out.append(f"Fan-out is publisher-bound: `BroadcastSender.send` costs {bs / 1e3:.1f} us, of which "
                   f"{bsub / 1e3:.1f} us count the subscribers for its return value (a Python scan of the "
                   f"participant table) and {bpub:.0f} ns encode and publish the message. iceoryx2's loan + "
                   "memmove + send is well under that.")
    if br and bct:
        out.append(f"A broadcast `recv` costs {br / 1e3:.1f} us, of which ~{bct / 1e3:.1f} us is "
                   "`numpy.ndarray.ctypes.data` evaluated on every read for the receive buffer's address.")
    h = bd.get("await loop.run_in_executor(None, noop) (thread hop, no queue)")
    if h:
        out.append(f"aioprocessing and run_in_executor pay a thread-pool hop per message ({h / 1e3:.0f} us for a "
                   "no-op in one process) on top of mp.Queue's pipe and its feeder thread.")
    return out


def _cell(row, metric, digits=1, rate=False):
    if not row.samples:
        return "-"
    v = row.med(metric)
    lo, hi = row.span(metric)
    f = fmt_rate if rate else (lambda x: f"{x:.{digits}f}")
    return f"{f(v)} ({f(lo)}-{f(hi)})"


def case_table(case) -> list[str]:
    ref = case.rows.get(case.ref)
    L = []
    if case.kind == "rtt":
        L += ["| peer | p50 us (min-max) | p99 us (min-max) | p50 vs shm sync | round trips | other load |",
              "|---|---:|---:|---:|---:|---:|"]
    elif case.kind == "tp":
        L += ["| peer | msgs/s (min-max) | vs shm sync | messages | other load |", "|---|---:|---:|---:|---:|"]
    else:
        L += ["| peer | msgs/s per subscriber (min-max) | delivered/s, all subscribers | publisher msgs/s | "
              "vs iceoryx2 | lost (Lagged) | messages | other load |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in case.rows.values():
        if not row.samples:
            what = "unavailable" if row.status == "unavailable" else "failed"
            cols = 5 if case.kind == "rtt" else (4 if case.kind == "tp" else 7)
            L.append(f"| {row.peer.name} | {what}: {row.reason} |" + " |" * (cols - 1))
            continue
        other = f"{median([x['other'] for x in row.samples]):.2f}"
        if case.kind == "rtt":
            vs = f"{row.med('p50') / ref.med('p50'):.2f}x" if ref and ref.samples else "-"
            L.append(f"| {row.peer.name} | {_cell(row, 'p50')} | {_cell(row, 'p99')} | {vs} | {row.n} | {other} |")
        elif case.kind == "tp":
            vs = f"{row.med('rate') / ref.med('rate'):.2f}x" if ref and ref.samples else "-"
            L.append(f"| {row.peer.name} | {_cell(row, 'rate', rate=True)} | {vs} | {row.n} | {other} |")
        else:
            vs = f"{row.med('rate') / ref.med('rate'):.2f}x" if ref and ref.samples else "-"
            lost = max(x["lost"] for x in row.samples)
            L.append(f"| {row.peer.name} | {_cell(row, 'rate', rate=True)} | {fmt_rate(row.med('delivered'))} | "
                     f"{fmt_rate(row.med('pub_rate'))} | {vs} | {lost} | {row.n} | {other} |")
    return L


def write_markdown(path, cases, verdicts, info, bd, watch, opts, wall):
    L = ["# asyncio and broadcast: shm vs aioprocessing, run_in_executor and iceoryx2"
         + (" (QUICK RUN: not the reference results)" if opts.quick else ""), ""]
    L.append(f"Generated by `python -m bench aio`{' --quick' if opts.quick else ''} in {wall / 60:.1f} min. Every "
             "side is its own forked process; a run is timed from the moment all its processes are set up (one "
             "barrier). Each peer first gets a pilot run that sizes its count to about "
             f"{opts.seconds:g} s; then {opts.reps} measured run(s) per peer, interleaved across peers. Tables give "
             "the **median** and the min-max over runs; ratios are between medians of this same run. The machine "
             "is shared: before each run the harness waits (within a budget) for other processes to go quiet, "
             "and *other load* is the median number of cores other processes used during the runs (2 cores "
             "here). 64-byte messages throughout.")
    L += ["", "## Targets", "", "| target | measured (medians) | verdict |", "|---|---|---|"]
    L += [f"| {v['target']} | {v['measured']} | **{v['verdict']}** |" for v in verdicts]
    rs = ratios(cases)
    if rs:
        L += ["", "No target, reported as asked (medians of this run):", ""] + [f"- {x}" for x in rs]
    for case in cases.values():
        L += ["", f"## {case.title}", ""]
        if case.about:
            L += [case.about, ""]
        L += case_table(case)
    L += ["", "## Peer notes", ""]
    seen = set()
    for case in cases.values():
        for row in case.rows.values():
            if row.peer.name not in seen and row.peer.note:
                seen.add(row.peer.name)
                L.append(f"- **{row.peer.name}**: {row.peer.note}")
    if bd:
        L += ["", "## Where the time goes", "", "One process, nothing on the other side (best of 20 loops of 512):",
              "", "| operation | ns per call |", "|---|---:|"]
        L += [f"| {k} | {v:.0f} |" for k, v in bd.items()]
        L += [""] + [f"- {x}" for x in where_time_goes(cases, bd)]
    L += ["", "## Machine", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()]
    leaks, removed = ShmWatch.summary(watch.leaks), ShmWatch.summary(watch.removed)
    L += ["", "## Hygiene", "",
          "- shm segments left in /dev/shm after a run (a bug if any): " + ("; ".join(leaks) if leaks else "none"),
          "- removed after peers (their own leftovers): " + ("; ".join(removed) if removed else "none"),
          "- processes: every run's children are joined (or killed by pid after a timeout) before the next run", ""]
    with open(path, "w") as f:
        f.write("\n".join(L))


def write_json(path, cases, verdicts, info, bd):
    data = {"machine": info, "targets": verdicts, "ratios": ratios(cases), "breakdown_ns": bd, "cases": {}}
    for c in cases.values():
        data["cases"][c.key] = {
            "title": c.title, "kind": c.kind, "ref": c.ref, "subscribers": c.subs if c.kind == "fan" else None,
            "rows": {k: {"name": r.peer.name, "status": r.status, "reason": r.reason, "n": r.n,
                         "samples": r.samples, "failures": r.failures} for k, r in c.rows.items()}}
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


def write_png(path, cases, info, opts):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    panels = [k for k in ("artt", "atp") if k in cases] + (["fan"] if any(k.startswith("fan") for k in cases) else [])
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 3.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "fan":
            fans = [c for k, c in cases.items() if k.startswith("fan")]
            peers = [p for p in fans[0].peers]
            w = 0.8 / len(peers)
            x = np.arange(len(fans))
            for i, p in enumerate(peers):
                vals, errs = [], []
                for c in fans:
                    r = c.rows.get(p.key)
                    v = r.med("rate") if r and r.samples else 0
                    lo, hi = r.span("rate") if r and r.samples else (0, 0)
                    vals.append(v)
                    errs.append((v - lo, hi - v))
                color = {"shm": "#d62728", "shm-async": "#ff9896"}.get(p.key, "#7f7f7f")
                ax.bar(x + (i - (len(peers) - 1) / 2) * w, vals, w, yerr=np.array(errs).T, capsize=2,
                       label=p.name, color=color)
                for xi, v in zip(x, vals):
                    if v:
                        ax.text(xi + (i - (len(peers) - 1) / 2) * w, v, fmt_rate(v), ha="center", va="bottom",
                                fontsize=6)
            ax.set_xticks(x)
            ax.set_xticklabels([f"{c.subs} subscriber{'s' if c.subs > 1 else ''}" for c in fans], fontsize=8)
            ax.set_ylabel("messages/s per subscriber", fontsize=8)
            ax.set_title("broadcast fan-out, 64 B", fontsize=9)
            ax.legend(fontsize=7)
            continue
        case = cases[key]
        metric = "p50" if case.kind == "rtt" else "rate"
        rows = list(case.rows.values())
        vals, errs, names, colors = [], [], [], []
        for r in rows:
            v = r.med(metric) if r.samples else 0
            lo, hi = r.span(metric) if r.samples else (0, 0)
            vals.append(v)
            errs.append((v - lo, hi - v))
            names.append(r.peer.name + ("" if r.samples else "  (n/a)"))
            colors.append("#d62728" if r.peer.key.startswith("shm") else "#7f7f7f")
        y = np.arange(len(rows))
        ax.barh(y, vals, xerr=np.array(errs).T, capsize=2, color=colors)
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        pos = [v for v in vals if v > 0]
        if pos and max(pos) / min(pos) > 20:
            ax.set_xscale("log")
        if case.kind == "rtt":
            s = case.rows.get("shm")
            if s and s.samples:
                thr = 2 * s.med("p50")
                ax.axvline(thr, color="#1f77b4", linestyle="--", linewidth=1.2, label="target: 2x shm sync p50")
                ax.legend(fontsize=6.5)
            ax.set_xlabel("round trip p50, us (lower is better)", fontsize=8)
        else:
            ax.set_xlabel("messages/s", fontsize=8)
        ax.set_title(case.title, fontsize=8.5)
        for yi, v in zip(y, vals):
            if v > 0:
                ax.text(v, yi, " " + (f"{v:.1f}" if metric == "p50" else fmt_rate(v)), va="center", fontsize=6.5)
    fig.suptitle(f"shm asyncio and broadcast vs peers ({'quick run' if opts.quick else f'medians of {opts.reps} runs'}; "
                 f"{info['cpu']}, {info['cores']} cores, Python {info['python']}, {info['date']})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------
# Entry point.

def add_args(ap):
    pass


def main(opts) -> int:
    t_start = time.monotonic()
    cases = select_cases({c.key: c for c in make_cases()}, opts)
    if not cases:
        return 0
    out_dir = results_dir(opts)
    watch = ShmWatch()
    info = machine()
    info["peers"] = ", ".join(f"{d} {_version(d)}" for d in ("aioprocessing", "iceoryx2"))
    log(f"aio: {len(cases)} case(s), reps={opts.reps}, ~{opts.seconds:g} s per run; results -> {out_dir}")
    bd = {}
    with LoadSampler() as load:
        for case in cases.values():
            try:
                run_case(case, opts, watch)
            except KeyboardInterrupt:
                raise
            except Exception as e:                  # a harness bug must not lose the other cases
                log(f"case {case.key} failed: {e!r}")
        if not opts.no_profile:
            try:
                bd = breakdown()
            except Exception as e:
                log(f"breakdown failed: {e!r}")
    run_info(info, GATE, load)
    watch.sweep("iceoryx2", (P.IOX_PREFIX,))
    import shutil
    shutil.rmtree(P.IOX_ROOT, ignore_errors=True)
    verdicts = judge(cases)
    wall = time.monotonic() - t_start
    md = os.path.join(out_dir, "aio.md")
    write_markdown(md, cases, verdicts, info, bd, watch, opts, wall)
    write_json(os.path.join(out_dir, "aio.json"), cases, verdicts, info, bd)
    try:
        write_png(os.path.join(out_dir, "aio.png"), cases, info, opts)
    except Exception as e:
        log(f"plot failed: {e!r}")
    log("\n== targets")
    for v in verdicts:
        log(f"  {v['verdict']:7s} {v['target']}: {v['measured']}")
    for x in ratios(cases):
        log(f"  {x}")
    leaks = ShmWatch.summary(watch.leaks)
    if leaks:
        log("  shm left segments in /dev/shm: " + "; ".join(leaks))
    log(f"\nwrote {md} (+ .png, .json) in {wall / 60:.1f} min")
    return 0
