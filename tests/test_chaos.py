"""Kill chaos across every structure at once: a bounded channel, an unbounded
channel (with blob-sized messages, over 64 KiB), an ``shm.Queue`` and a
``SharedDict``, each driven by real processes that a supervisor SIGKILLs at
random moments and replaces, hundreds of times in one run, while a fifth
structure is leaked on purpose (every process attached to it is killed) for
``python -m shm gc`` to reclaim.

Workers are forked (cheap); some Queue producers and dict writers are
spawned, and those are killed only once they are seen at work (a spawned
child killed before it unpickles its handles leaves a token that counts while
its parent lives, by design: see README, "Processes").

Accounting, as in test_channel_kill.py:

* Every message is checksummed (``_workers.make_msg``); a consumer checks it
  (``check_msg``) and logs (tag, seq) to a pipe, one atomic 12-byte write,
  right after receiving it. A corrupt message fails the consumer, and so the test.
* Every producer incarnation has its own tag. One that finished sent all its
  ``n`` messages; one that was killed sent a prefix 0..k-1. A consumer killed
  between ``recv`` and its log write loses the message it held (so does one
  killed inside the receive kernel: ``stats().lost``): at most one message
  per consumer kill. So, per channel: nothing is duplicated, no sequence
  number is out of range, and the messages missing from finished producers
  plus the gaps in killed producers' prefixes are at most the consumer kills.
* Dict writers run a deterministic sequence of operations (sets of checked
  values, pops, ``incr``, ``alter``, and ``incr`` of counters shared by all
  writers; ``_dict_workers.model_ops``) that the test replays into a model.
  Each writer's own keys must equal the model after *all* its operations if
  it finished, and after *some* prefix of them if it was killed (each
  operation is atomic: the one in flight happened or did not). Each shared
  counter lies between the sums of the shared increments of the writers'
  matching prefixes (exact when every writer finished).

Afterwards the survivors still work (probes sent during and after the chaos
arrive; a fresh sender, receiver and dict operation work), ``shm._admin.gc()``
(what ``python -m shm gc`` runs) reclaimed the leaked structure, every
segment of it, while touching nothing alive (it also runs during the chaos),
and closing the live structures leaves /dev/shm as it was.

Size: at least ``SHM_CHAOS_SECONDS`` seconds of chaos (default 30; 240 under
``SHM_STRESS``), and on until ``SHM_CHAOS_KILLS`` kills (default 200; 1000
under ``SHM_STRESS``) have landed, so a slow machine gets the same coverage.
"""
from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import random
import select
import signal
import time

import numpy as np
import pytest

import shm
import shm._admin
import _dict_workers as DW
import _report
import _workers as W
from conftest import STRESS

FORK = mp.get_context("fork")
SPAWN = mp.get_context("spawn")

CHAOS_SECONDS = float(os.environ.get("SHM_CHAOS_SECONDS", "240" if STRESS else "30"))
MIN_KILLS = int(os.environ.get("SHM_CHAOS_KILLS", "1000" if STRESS else "200"))
CHAOS_HANG = 600                   # the chaos goes on past CHAOS_SECONDS until MIN_KILLS kills
GC_EVERY = 3.0                     # seconds between gc runs during the chaos

REC_DTYPE = np.dtype([("tag", "<i4"), ("seq", "<i8")])
assert REC_DTYPE.itemsize == W.REC.size

PROBE = -1                         # tag of the probes the test itself sends


# --------------------------------------------------------------------------
# Pipes of (tag, seq) records, drained by the supervisor as it goes.

class Log:
    """One pipe that every consumer of a structure logs to (12-byte writes are atomic)."""

    def __init__(self):
        self.r, self.w = os.pipe()
        try:
            fcntl.fcntl(self.r, fcntl.F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass
        os.set_blocking(self.r, False)
        self.chunks: list[bytes] = []
        self.tail = b""
        self.tags: set[int] = set()     # tags seen so far (filled only while someone asks)

    def drain(self, want_tags: bool = False) -> None:
        while True:
            try:
                data = os.read(self.r, 1 << 20)
            except BlockingIOError:
                return
            if not data:
                return
            data = self.tail + data
            cut = len(data) - len(data) % W.REC.size
            self.tail = data[cut:]
            self.chunks.append(data[:cut])
            if want_tags:
                self.tags.update(np.unique(np.frombuffer(data[:cut], REC_DTYPE)["tag"]).tolist())

    def records(self) -> np.ndarray:
        assert not self.tail, "a torn record in a consumer log"
        return np.frombuffer(b"".join(self.chunks), REC_DTYPE)

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


# --------------------------------------------------------------------------
# Workers and the groups that replace them.

class Worker:
    def __init__(self, proc, tag: int, spawned: bool):
        self.proc = proc
        self.tag = tag
        self.spawned = spawned
        self.kill_at: float | None = None
        self.started = time.monotonic()
        self.attached = not spawned


class Role:
    """``count`` workers doing one job on one structure, killed and replaced."""

    def __init__(self, group, name, count, start, kill_prob, life, spawn_every=0, finite=True):
        self.group, self.name, self.count = group, name, count
        self.start_fn = start               # (tag, ctx) -> Process (not started)
        self.kill_prob, self.life = kill_prob, life
        self.spawn_every = spawn_every
        self.finite = finite                # finishes on its own (producers, writers)
        self.live: list[Worker] = []
        self.outcomes: dict[int, str] = {}  # tag -> "done" | "killed"
        self.kills = 0
        self.started = 0
        self.spawned = 0

    def launch(self, sup) -> None:
        tag = sup.new_tag()
        spawned = bool(self.spawn_every) and self.started % self.spawn_every == self.spawn_every - 1
        ctx = SPAWN if spawned else FORK
        p = self.start_fn(tag, ctx)
        p.start()
        self.started += 1
        self.spawned += spawned
        w = Worker(p, tag, spawned)
        if w.attached:
            self.schedule(sup, w)
        self.live.append(w)

    def schedule(self, sup, w: Worker) -> None:
        if sup.chaos and sup.rng.random() < self.kill_prob:
            w.kill_at = time.monotonic() + sup.rng.uniform(*self.life)

    def poll(self, sup) -> None:
        now = time.monotonic()
        for w in list(self.live):
            code = w.proc.exitcode
            if code is None and not w.attached and self.group.attached(w):
                w.attached = True
                self.schedule(sup, w)
            if code is None and w.kill_at is not None and now >= w.kill_at and sup.chaos:
                os.kill(w.proc.pid, signal.SIGKILL)
                w.proc.join(30)
                code = w.proc.exitcode
                assert code in (0, -signal.SIGKILL), f"{self.group.name} {self.name}: exit code {code}"
            if code is None:
                continue
            self.live.remove(w)
            w.proc.close()
            if code == -signal.SIGKILL:
                self.outcomes[w.tag] = "killed"
                self.kills += 1
            else:
                assert code == 0, f"{self.group.name} {self.name} {w.tag} failed: exit code {code}"
                assert self.finite or not sup.chaos, \
                    f"{self.group.name} {self.name} {w.tag} ended during the chaos (a spurious disconnection?)"
                self.outcomes[w.tag] = "done"
        if sup.chaos or not self.finite:
            while len(self.live) < self.count:
                self.launch(sup)

    def join_all(self, timeout: float) -> None:
        for w in self.live:
            w.proc.join(timeout)
            assert w.proc.exitcode == 0, f"{self.group.name} {self.name} {w.tag}: exit code {w.proc.exitcode} (hung?)"
            self.outcomes[w.tag] = "done"
            w.proc.close()
        self.live.clear()


class ChannelGroup:
    """A channel (or shm.Queue) with producers and consumers; consumers log to one pipe."""

    def __init__(self, name, tx, rx, n, big_every, producers=2, consumers=2, queue=None, spawn_every=0):
        self.name, self.tx, self.rx, self.queue = name, tx, rx, queue
        self.n, self.big_every = n, big_every
        self.log = Log()
        self.probes = 0
        if queue is None:
            prod = lambda tag, ctx: ctx.Process(target=W.produce, args=(tx, tag, n, big_every))
            cons = lambda tag, ctx: ctx.Process(target=W.checked_consumer, args=(rx, self.log.w))
        else:
            prod = lambda tag, ctx: ctx.Process(target=W.queue_produce, args=(queue, tag, n, big_every))
            cons = lambda tag, ctx: ctx.Process(target=W.queue_consume, args=(queue, self.log.w))
        self.producers = Role(self, "producer", producers, prod, 0.7, (0.02, 0.5), spawn_every)
        self.consumers = Role(self, "consumer", consumers, cons, 1.0, (0.05, 0.6), finite=False)
        self.roles = [self.producers, self.consumers]

    def attached(self, w: Worker) -> bool:
        return w.tag in self.log.tags           # a spawned producer is at work once its messages arrive

    def drain(self) -> None:
        self.log.drain(want_tags=any(not w.attached for w in self.producers.live))

    def probe(self, seq: int, big: bool) -> None:
        m = W.make_msg(PROBE, seq, big_every=1 if big else 0)
        if self.queue is not None:
            self.queue.put(m, timeout=60)
        else:
            self.tx.send(m, timeout=60)
        self.probes += 1

    def finish_consumers(self) -> float:
        """End the consumers (disconnection, or a sentinel each for the Queue); seconds it took."""
        t0 = time.monotonic()
        if self.queue is not None:
            for _ in self.consumers.live:
                self.queue.put(None, timeout=60)
        else:
            self.tx.close()
        return t0

    def check(self) -> int:
        recs = self.log.records()
        keys = recs["tag"].astype(np.int64) << 40 | recs["seq"]
        uniq, counts = np.unique(keys, return_counts=True)
        dups = uniq[counts > 1]
        assert dups.size == 0, f"{self.name}: {dups.size} messages delivered twice, e.g. " \
            f"tag {dups[0] >> 40} seq {dups[0] & ((1 << 40) - 1)}"
        probes = np.sort(recs["seq"][recs["tag"] == PROBE])
        assert probes.tolist() == list(range(self.probes)), f"{self.name}: probes {probes.tolist()}"
        tags, per_tag = np.unique(recs["tag"], return_counts=True)
        last = {int(t): int(recs["seq"][recs["tag"] == t].max()) for t in tags}
        count = dict(zip(tags.tolist(), per_tag.tolist()))
        unknown = set(count) - set(self.producers.outcomes) - {PROBE}
        assert not unknown, f"{self.name}: messages from unknown producers {sorted(unknown)[:5]}"
        missing = gaps = 0
        for tag, outcome in self.producers.outcomes.items():
            got = count.get(tag, 0)
            if got:
                assert 0 <= int(recs["seq"][recs["tag"] == tag].min()) and last[tag] < self.n, \
                    f"{self.name}: producer {tag} sequence numbers out of range"
            if outcome == "done":
                missing += self.n - got
            else:
                gaps += (last[tag] + 1 - got) if got else 0
        allowed = self.consumers.kills
        assert missing + gaps <= allowed, (
            f"{self.name}: {missing} messages missing from finished producers and {gaps} gaps in "
            f"killed producers' prefixes, but only {allowed} consumers were killed")
        _report.add(f"chaos {self.name}: messages lost with killed consumers (<= 1 per kill)", missing + gaps)
        return len(recs)


class DictGroup:
    """A SharedDict with model writers (see _dict_workers.model_ops)."""

    def __init__(self, d, writers, n_ops, spawn_every=0):
        self.name, self.d, self.n_ops = "dict", d, n_ops
        self.seeds: dict[int, int] = {}
        start = lambda tag, ctx: ctx.Process(target=DW.model_writer, args=(d, tag, self._seed(tag), n_ops))
        self.writers = Role(self, "writer", writers, start, 0.75, (0.02, 0.5), spawn_every)
        self.roles = [self.writers]

    def _seed(self, tag):
        self.seeds[tag] = tag * 7919 + 17
        return self.seeds[tag]

    def attached(self, w: Worker) -> bool:
        return self.d.get(("started", w.tag)) == 1

    def drain(self) -> None:
        pass

    def check(self) -> int:
        snap = self.d.copy()
        lo = [0] * DW.N_SHARED
        hi = [0] * DW.N_SHARED
        ops = 0
        for wid, outcome in self.writers.outcomes.items():
            matches = DW.match_model(snap, wid, self.seeds[wid], self.n_ops)
            if outcome == "done":
                assert matches and matches[-1][0] == self.n_ops, \
                    f"writer {wid} finished but the table matches only prefixes {[m for m, _ in matches][-3:]}"
                matches = matches[-1:]
            else:
                assert matches, f"killed writer {wid}: its keys match no prefix of its operations"
            ops += matches[-1][0]
            for s in range(DW.N_SHARED):
                lo[s] += min(m[1][s] for m in matches)
                hi[s] += max(m[1][s] for m in matches)
        for s in range(DW.N_SHARED):
            v = snap.get(("total", s), 0)
            assert lo[s] <= v <= hi[s], f"shared counter {s} is {v}, outside [{lo[s]}, {hi[s]}]"
        wids = set(self.writers.outcomes)
        for k in snap:
            if isinstance(k, tuple) and len(k) == 2 and isinstance(k[0], int):
                assert k[0] in wids, f"key {k!r} of no writer"
        return ops


# --------------------------------------------------------------------------
# The supervisor.

class Supervisor:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.chaos = True
        self.next_tag = 1000

    def new_tag(self) -> int:
        self.next_tag += 1
        return self.next_tag


def _start_leak():
    """A process and its forked child sharing a channel and a dict; names reported on a pipe."""
    r, w = os.pipe()
    p = FORK.Process(target=W.leak_owner, args=(w,))
    p.start()
    os.close(w)
    data = b""
    deadline = time.monotonic() + 60
    while not data.endswith(b"\n") and time.monotonic() < deadline:
        chunk = os.read(r, 256)
        if not chunk:
            break
        data += chunk
    os.close(r)
    owner, child, chan, dct = data.split()
    return p, int(child), chan.decode(), dct.decode()


def _kill_leak(p, child: int) -> None:
    os.kill(child, signal.SIGKILL)          # the parked receiver (a grandchild: init reaps it)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break               # a zombie counts as dead
        except OSError:
            break
        time.sleep(0.01)


def _say_slow(groups) -> None:
    import sys
    for g in groups:
        for r in g.roles:
            for w in r.live:
                if w.proc.exitcode is None:
                    try:
                        with open(f"/proc/{w.proc.pid}/wchan") as f:
                            wchan = f.read()
                    except OSError:
                        wchan = "?"
                    print(f"slow to finish: {g.name} {r.name} {w.tag} pid {w.proc.pid} "
                          f"spawned={w.spawned} wchan={wchan}", file=sys.stderr)


def _family_names(names, family: str) -> set[str]:
    return {n for n in names if n.startswith(family)}


def _gc_checked(leak_families: set[str], leak_dead: bool) -> tuple[list[str], list[str]]:
    """Run gc: (segments of the leaked structures it removed, headerless orphans it removed).

    It may remove the leaked structures' segments, only once their processes
    are dead, and segments a creator killed before it wrote their header
    (a blob or ring generation of a live channel whose producer was killed
    inside Segment.create: nothing can ever use it). Nothing else.
    """
    headerless = []
    real = shm._admin._stale_headerless

    def stale(name):
        r = real(name)
        if r:
            headerless.append(name)
        return r

    shm._admin._stale_headerless = stale
    try:
        removed = shm._admin.gc()
    finally:
        shm._admin._stale_headerless = real
    leaked = [n for n in removed if any(n.startswith(f) for f in leak_families)]
    stray = [n for n in removed if n not in leaked and n not in headerless]
    assert not stray, f"gc removed segments of live structures: {stray}"
    if not leak_dead:
        assert not leaked, f"gc removed segments of a live structure: {leaked}"
    return leaked, [n for n in removed if n not in leaked]


@pytest.mark.timeout(int(CHAOS_SECONDS) + CHAOS_HANG + 400)
def test_kill_chaos_across_every_structure():
    sup = Supervisor(seed=int(os.environ.get("SHM_CHAOS_SEED", "6")))
    before = set(os.listdir("/dev/shm"))
    btx, brx = shm.bounded(16, codec="bytes")
    utx, urx = shm.unbounded(codec="bytes")
    q = shm.Queue(32)
    d = shm.SharedDict(shards=4)
    groups = [
        ChannelGroup("bounded", btx, brx, n=6000, big_every=41),
        ChannelGroup("unbounded", utx, urx, n=10000, big_every=25),
        ChannelGroup("queue", None, None, n=3000, big_every=0, queue=q, spawn_every=6),
        DictGroup(d, writers=3, n_ops=12000, spawn_every=6),
    ]
    roles = [r for g in groups for r in g.roles]
    leak, leak_child, leak_chan, leak_dict = _start_leak()
    leak_families = {leak_chan, leak_dict}
    leak_at = time.monotonic() + CHAOS_SECONDS * sup.rng.uniform(0.2, 0.5)
    leak_dead = False
    reclaimed: set[str] = set()
    orphaned: set[str] = set()
    gc_runs = 0
    try:
        t0 = time.monotonic()
        next_gc = t0 + GC_EVERY
        while time.monotonic() < t0 + CHAOS_SECONDS or sum(r.kills for r in roles) + 2 < MIN_KILLS:
            assert time.monotonic() < t0 + CHAOS_HANG, f"only {sum(r.kills for r in roles)} kills landed"
            for r in roles:
                r.poll(sup)
            for g in groups:
                g.drain()
            if not leak_dead and time.monotonic() >= leak_at:
                leak_names = {n for f in leak_families for n in _family_names(os.listdir("/dev/shm"), f)}
                assert len(leak_names) >= 4, f"the leaked structures have too few segments: {leak_names}"
                _kill_leak(leak, leak_child)
                leak_dead = True
            if time.monotonic() >= next_gc:
                got, orphans = _gc_checked(leak_families, leak_dead)
                reclaimed.update(got)
                orphaned.update(orphans)
                gc_runs += 1
                next_gc = time.monotonic() + GC_EVERY
                for g in groups[:3]:            # survivors take fresh messages while the chaos goes on
                    g.probe(g.probes, big=g.probes % 2 == 1)
            select.select([g.log.r for g in groups[:3]], [], [], 0.005)

        # The chaos ends: no more kills; producers and writers finish, consumers stay.
        sup.chaos = False
        t_end = time.monotonic()
        hang = t_end + 180
        said = False            # past 15 s, name the slow ones (stderr, shown on failure)
        while any(w.proc.exitcode is None for g in groups for r in g.roles if r.finite for w in r.live):
            assert time.monotonic() < hang, "producers or writers hung after the chaos"
            if not said and time.monotonic() > t_end + 15:
                said = True
                _say_slow(groups)
            for r in roles:
                r.poll(sup)
            for g in groups:
                g.drain()
            time.sleep(0.005)
        for r in roles:
            r.poll(sup)
        _report.set("chaos: seconds of chaos", int(t_end - t0))
        _report.set("chaos: ms for producers and writers to finish after it", int((time.monotonic() - t_end) * 1000))
        assert leak_dead, "the leak was never killed"
        got, orphans = _gc_checked(leak_families, True)
        reclaimed.update(got)
        orphaned.update(orphans)
        leaked_left = {n for f in leak_families for n in _family_names(os.listdir("/dev/shm"), f)}
        assert not leaked_left, f"gc left segments of the dead structure: {sorted(leaked_left)}"
        assert len(reclaimed) >= 4, f"gc reclaimed only {sorted(reclaimed)}"

        # Survivors work: probes (one blob-sized) reach the surviving consumers, then consumers end.
        for g in groups[:3]:
            g.probe(g.probes, big=False)
            g.probe(g.probes, big=True)
        disconnect = {}
        for g in groups[:3]:
            disconnect[g.name] = g.finish_consumers()
        for g in groups[:3]:
            hang = time.monotonic() + 120
            while any(w.proc.exitcode is None for w in g.consumers.live):
                assert time.monotonic() < hang, f"{g.name}: consumers never ended (no disconnection?)"
                g.drain()
                time.sleep(0.005)
            disconnect[g.name] = time.monotonic() - disconnect[g.name]
            g.consumers.join_all(30)
            g.drain()

        # Fresh handles and operations on every structure.
        for g, rx in ((groups[0], brx), (groups[1], urx)):
            with shm.Sender.open(rx.name) as tx2:
                tx2.send(W.make_msg(PROBE, 0, big_every=1))
                assert W.check_msg(rx.recv(timeout=30)) == (PROBE, 0)
            with pytest.raises(shm.Disconnected):
                rx.recv(timeout=30)
            s = rx.stats()
            _report.add(f"chaos {g.name}: dead participants reaped", s.reaped)
        q2 = shm.Queue.open(q.name)
        q2.put(b"after")
        assert q.get(timeout=30) == b"after"
        q2.close()
        with shm.SharedDict.open(d.name) as d2:
            d2.incr(("probe", 0))
            d2[("probe", 1)] = "after"
        assert d[("probe", 0)] == 1 and d[("probe", 1)] == "after"

        # The accounting.
        messages = {g.name: g.check() for g in groups[:3]}
        ops = groups[3].check()
        kills = {g.name: sum(r.kills for r in g.roles) for g in groups}
        total = sum(kills.values()) + 2
        for g in groups:
            for r in g.roles:
                _report.add(f"chaos {g.name}: {r.name}s SIGKILLed", r.kills)
                if r.spawned:
                    _report.add(f"chaos {g.name}: {r.name}s spawned", r.spawned)
        for name, n in messages.items():
            _report.add(f"chaos {name}: messages checked (crc32)", n)
            _report.set(f"chaos {name}: ms for consumers to see the end", int(disconnect[name] * 1000))
        _report.add("chaos dict: operations checked against the model", ops)
        _report.add("chaos: leaked structures' segments reclaimed by gc", len(reclaimed))
        _report.add("chaos: headerless segments of killed creators reclaimed by gc", len(orphaned))
        _report.add("chaos: gc runs during the chaos (touching nothing alive)", gc_runs)
        _report.add("chaos: kills survived in one run", total)
        assert total >= MIN_KILLS, f"only {total} kills in {CHAOS_SECONDS} s: {kills}"
    finally:
        for r in roles:
            for w in r.live:
                if w.proc.exitcode is None:
                    w.proc.kill()
                w.proc.join(10)
        if not leak_dead:
            _kill_leak(leak, leak_child)
            shm._admin.gc()
        for g in groups[:3]:
            g.log.close()
        for h in (btx, brx, utx, urx):
            h.close()
        q.close()
        d.close()
    # Closing every live structure's last handle unlinks all of its segments.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = set(os.listdir("/dev/shm")) - before
        if not left:
            break
        time.sleep(0.05)
    assert not left, f"segments left after every structure was closed: {sorted(left)[:10]}"


def _hold_then_sleep(tx, fd):
    tx.send(b"x")
    os.write(fd, b"r")
    time.sleep(600)


def _open_and_close(name):
    shm.Sender.open(name).close()


def test_reaped_counts_participants_reaped_by_a_closing_process():
    """stats().reaped counts a dead participant whoever reaps it: here the
    process that closes its handle next (its leaving sweep) rather than a
    parked waiter."""
    tx, rx = shm.bounded(4, codec="bytes")
    r, w = os.pipe()
    p = FORK.Process(target=_hold_then_sleep, args=(tx, w))
    p.start()
    os.close(w)
    assert os.read(r, 1) == b"r"
    os.close(r)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert rx.stats().senders == 2            # the dead one counts until someone reaps it
    c = FORK.Process(target=_open_and_close, args=(tx.name,))
    c.start()
    c.join(30)
    assert c.exitcode == 0
    s = rx.stats()
    assert s.senders == 1, "the closing process did not reap the dead sender"
    assert s.reaped == 1, f"stats().reaped is {s.reaped} after one participant was reaped"
    assert rx.recv(timeout=10) == b"x"
    tx.close()
    rx.close()


def _send_and_close(tx, m):
    tx.send(m)
    tx.close()


def _die_creating_a_blob(tx, m):
    """Send ``m`` (a blob that needs a new, larger segment) and die inside Segment.create."""
    import shm._chan
    from kernels import layout as L
    real = shm._chan.Segment.create

    def create(kind, *a, **k):
        if kind == L.KIND_BLOB:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(kind, *a, **k)

    shm._chan.Segment.create = create
    tx.send(m)


def test_blob_generation_never_goes_back_after_a_producer_dies_creating_one():
    """A producer killed while creating a slot's new blob leaves the slot with a
    blob generation and no blob. The next producer must take a fresh
    generation, not restart at 1: a reader that still maps the old blob of
    that name would read the old message (found by the chaos test as a
    message whose length disagreed with its header)."""
    tx, rx = shm.bounded(1, codec="bytes")          # one slot: every message goes through it
    m1 = W.make_msg(1, 1) + b"1" * 1000             # out of band (over 224 bytes), in a 4 KiB blob
    big = b"2" * 100_000                            # needs a larger blob: the slot's generation 2
    m3 = W.make_msg(3, 3) + b"3" * 1000
    p = FORK.Process(target=_send_and_close, args=(tx, m1))
    p.start()
    assert rx.recv(timeout=30) == m1                # this process now maps the slot's blob 1
    p.join(30)
    p = FORK.Process(target=_die_creating_a_blob, args=(tx, big))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    with pytest.raises(shm.Empty):
        rx.recv(timeout=2)                          # reaps the dead producer, skips its tombstone
    p = FORK.Process(target=_send_and_close, args=(tx, m3))
    p.start()
    got = rx.recv(timeout=30)
    p.join(30)
    assert got == m3, f"received {got[:40]!r}... (the old blob's message?), sent {m3[:40]!r}..."
    tx.close()
    rx.close()
