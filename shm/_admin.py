"""What ``python -m shm ls / inspect / top / gc`` do: read segments without joining them.

Listing reads headers and participant tables through read-only kernels; it
never registers as a participant, so it cannot keep a structure alive or
change when it is unlinked. ``gc`` removes a structure only when every
process that was attached to it is dead (and no handle is in transit from a
live process), plus any derived segment (ring generation, blob) whose
structure is gone. Segments that are not shm's, or belong to live
processes, are never touched.
"""
from __future__ import annotations

import os
import time

import numpy as np

from kernels import layout as L
from kernels import ring as R

from . import _liveness
from .errors import SegmentError, ShmError
from .segment import Segment, unlink_name

SHM_DIR = "/dev/shm"


def _names() -> list[str]:
    try:
        return sorted(os.listdir(SHM_DIR))
    except OSError:
        return []


def _attach(name: str):
    try:
        return Segment.attach(name)
    except (ShmError, OSError, ValueError):
        return None


def _participants(seg: Segment) -> list[dict]:
    from ._registry import Registry
    p = seg.params
    if seg.kind == L.KIND_BROADCAST:
        reg = Registry(seg, p[L.PC_PARTICIPANTS], p[L.PC_TOKENS], (L.BC_TX_ROLES, L.BC_RX_ROLES),
                       (L.BC_TX_TOKENS, L.BC_RX_TOKENS), (L.BC_WAITERS, L.BC_WAITERS2))
        out = []
        for idx, pid, alive in reg.pids():
            roles = int(seg.w[(p[L.PC_PARTICIPANTS] + idx * L.PT_SIZE + L.PT_ROLES) >> 3])
            out.append({"index": idx, "pid": pid, "alive": alive,
                        "publisher": bool(roles & 1), "subscriber": bool(roles & 2)})
        return out, reg
    if seg.kind == L.KIND_SYNC:
        reg = Registry(seg, p[L.PY_PARTICIPANTS], p[L.PY_TOKENS], (L.SY_ROLES, L.SY_ROLES2),
                       (L.SY_TOKENS, L.SY_TOKENS2), (L.SY_WAITERS, L.SY_WAITERS2))
        return [{"index": i, "pid": pid, "alive": alive} for i, pid, alive in reg.pids()], reg
    if seg.kind == L.KIND_DICT:
        reg = Registry(seg, p[L.PD_PARTICIPANTS], p[L.PD_TOKENS], (L.DC_ROLES, L.DC_ROLES2),
                       (L.DC_TOKENS, L.DC_TOKENS2), (L.DC_WAITERS, L.DC_WAITERS2))
        return [{"index": i, "pid": pid, "alive": alive} for i, pid, alive in reg.pids()], reg
    reg = Registry(seg, p[L.P_PARTICIPANTS], p[L.P_TOKENS], (L.CH_TX_ROLES, L.CH_RX_ROLES),
                   (L.CH_TX_TOKENS, L.CH_RX_TOKENS), (L.CH_RX_WAITERS, L.CH_TX_WAITERS))
    out = []
    for idx, pid, alive in reg.pids():
        roles = int(seg.w[(p[L.P_PARTICIPANTS] + idx * L.PT_SIZE + L.PT_ROLES) >> 3])
        out.append({"index": idx, "pid": pid, "alive": alive,
                    "sender": bool(roles & 1), "receiver": bool(roles & 2)})
    return out, reg


def _dict_figures(seg: Segment, reg) -> dict:
    """Keys per shard (read from each shard's current generation), growths, repairs."""
    p = seg.params
    table = p[L.PD_TABLE]
    per_shard = []
    for s in range(p[L.PD_SHARDS]):
        gen = int(seg.w[(table + s * L.SE_SIZE + L.SE_GEN) >> 3])
        g = _attach(f"{seg.family}s{s:x}g{gen:x}")
        if g is None:
            per_shard.append(None)
            continue
        try:
            per_shard.append(int(g.w[L.SH_COUNT >> 3]))
        finally:
            g.close()
    w = seg.w
    return {"codec": {0: "bytes", 1: "msgpack", 2: "pickle", 3: "numpy"}.get(p[L.PD_CODEC], "?"),
            "numeric": bool(p[L.PD_KEY_TYPE]), "shards": p[L.PD_SHARDS],
            "keys": sum(n for n in per_shard if n is not None), "per_shard_keys": per_shard,
            "ops": reg.ops_total(),
            "growths": int(w[L.DC_GROWTHS >> 3]), "repairs": int(w[L.DC_REPAIRS >> 3]),
            "reaped": int(w[L.DC_REAPED >> 3])}


def _ring_counter(ctrl: Segment, ring: Segment, ring_off: int, cap: int, slot: int, which: int) -> int:
    """Counter ``which`` of a ring (0: sent, 1: received; global positions) read without joining."""
    d = np.zeros(R.D_LEN, np.int64)
    d[R.D_BASE] = ring.addr
    d[R.D_SIZE] = ring.size
    d[R.D_RING] = ring_off
    d[R.D_CAP] = cap
    d[R.D_SLOT] = slot
    d[R.D_ME] = -1
    d[R.D_CTRL] = ctrl.addr
    d[R.D_CTRL_SIZE] = ctrl.size
    return int(R.counter_at(d.ctypes.data, which))


def _positions(seg: Segment) -> tuple[int, int] | None:
    """(sent, received) of a channel; an unbounded one's from its tail and head generations.

    Received is read first, then sent, back to back (rings mapped before), so
    while others keep sending and receiving the depth read is never below
    the true depth at the first read, and never negative.
    """
    p = seg.params
    rings = []
    try:
        for gen_off in (L.CH_HEAD_GEN, L.CH_TAIL_GEN):
            gen = 0 if p[L.P_FLAVOR] != L.FLAVOR_UNBOUNDED else int(seg.w[gen_off >> 3])
            if gen == 0:            # a bounded ring, or an unbounded one's first generation: in the control segment
                rings.append((seg, p[L.P_RING], p[L.P_RING_CAP], False))
                continue
            ring = _attach(f"{seg.family}r{gen:x}")
            if ring is None or ring.kind != L.KIND_RING:
                if ring is not None:
                    ring.close()
                return None         # between generations, or gone: no figure this time
            rings.append((ring, ring.params[L.PR_RING], ring.params[L.PR_CAP], True))
        received = _ring_counter(seg, rings[0][0], rings[0][1], rings[0][2], p[L.P_SLOT], 1)
        sent = _ring_counter(seg, rings[1][0], rings[1][1], rings[1][2], p[L.P_SLOT], 0)
        return sent, received
    finally:
        for ring, _, _, mine in rings:
            if mine:
                ring.close()


def _channel_figures(seg: Segment) -> dict:
    p = seg.params
    flavor = {L.FLAVOR_BOUNDED: "bounded", L.FLAVOR_UNBOUNDED: "unbounded",
              L.FLAVOR_RENDEZVOUS: "rendezvous"}.get(p[L.P_FLAVOR], "?")
    w = seg.w
    fig = {"flavor": flavor, "capacity": p[L.P_CAPACITY], "slot": p[L.P_SLOT],
           "codec": {0: "bytes", 1: "msgpack", 2: "pickle", 3: "numpy"}.get(p[L.P_CODEC], "?"),
           "generations": [int(w[L.CH_HEAD_GEN >> 3]), int(w[L.CH_TAIL_GEN >> 3])],
           "recovered": int(w[L.CH_TOMBSTONES >> 3]), "lost": int(w[L.CH_DROPPED >> 3]),
           "reaped": int(w[L.CH_REAPED >> 3]), "blob_bytes": int(w[L.CH_BLOB_BYTES >> 3])}
    pos = _positions(seg)
    if pos is not None:
        sent, received = pos
        depth = max(0, sent - received)
        if flavor != "unbounded":
            depth = min(depth, p[L.P_CAPACITY])
        fig.update(sent=sent, received=received, depth=depth)
    return fig


def describe(name: str) -> dict | None:
    """A dict describing segment ``name``, or None if it is not an shm segment we can read."""
    seg = _attach(name)
    if seg is None:
        return None
    try:
        cpid, cstart = seg.creator
        info = {"name": name, "kind": L.KIND_NAMES.get(seg.kind, str(seg.kind)), "size": seg.size,
                "family": seg.family, "of": seg.public_name,
                "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(seg.w[L.SEG_CREATED_NS >> 3]) / 1e9)),
                "creator": {"pid": cpid, "alive": _liveness.alive(cpid, cstart)},
                "state": {L.SEG_OPEN: "open", L.SEG_UNLINKED: "unlinked", L.SEG_INIT: "init"}.get(
                    seg.state & L.SEG_STATE_MASK, "closing")}
        if seg.kind == L.KIND_CHANNEL:
            parts, reg = _participants(seg)
            info["participants"] = parts
            info["tokens"] = reg.live_tokens()
            info["waiting"] = {"receivers": reg.waiting_count(R.SIDE_RX), "senders": reg.waiting_count(R.SIDE_TX)}
            info.update(_channel_figures(seg))
        elif seg.kind == L.KIND_DICT:
            parts, reg = _participants(seg)
            info["participants"] = parts
            info.update(_dict_figures(seg, reg))
        elif seg.kind == L.KIND_BROADCAST:
            parts, reg = _participants(seg)
            p = seg.params
            info["participants"] = parts
            info["tokens"] = reg.live_tokens()
            info.update(type="watch" if p[L.PC_WATCH] else "broadcast", capacity=p[L.PC_CAPACITY],
                        slot=p[L.PC_SLOT], published=int(seg.w[L.BC_TAIL >> 3]),
                        waiting=reg.waiting_count(0), reaped=int(seg.w[L.BC_REAPED >> 3]),
                        recovered=int(seg.w[L.BC_RECOVERED >> 3]))
        elif seg.kind == L.KIND_POOL:
            info["participants"] = _pool_workers(seg)
            info.update(workers=seg.params[L.PP_WORKERS], pushed=int(seg.w[L.PO_PUSHED >> 3]),
                        replaced=int(seg.w[L.PO_REPLACED >> 3]))
        elif seg.kind == L.KIND_SYNC:
            parts, reg = _participants(seg)
            info["participants"] = parts
            info["tokens"] = reg.live_tokens()
            info["type"] = _SYNC_TYPES.get(seg.params[L.PY_TYPE], "?")
            info["value"] = int(seg.w[L.SY_VALUE >> 3])
            info["waiting"] = reg.waiting_count(0)
        return info
    finally:
        seg.close()


# Names of the KIND_SYNC types (shm/sync.py), without importing its kernels.
_SYNC_TYPES = {L.SYNC_ATOMIC_INT: "AtomicInt", L.SYNC_ATOMIC_FLOAT: "AtomicFloat", L.SYNC_LOCK: "Lock",
               L.SYNC_RLOCK: "RLock", L.SYNC_SEMAPHORE: "Semaphore", L.SYNC_EVENT: "Event",
               L.SYNC_CONDITION: "Condition", L.SYNC_BARRIER: "Barrier", L.SYNC_WAITGROUP: "WaitGroup",
               L.SYNC_NOTIFY: "Notify", L.SYNC_RWLOCK: "RWLock"}


def list_segments() -> list[dict]:
    out = []
    for name in _names():
        info = describe(name)
        if info is not None:
            out.append(info)
    return out


def inspect(name: str) -> dict:
    info = describe(name.lstrip("/"))
    if info is None:
        raise SystemExit(f"{name!r}: no readable shm segment by that name")
    return info


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("no shm segments")
        return
    print(f"{'NAME':<28} {'KIND':<10} {'SIZE':>10}  {'OF':<22} PIDS (alive*)  DEPTH/KEYS")
    for r in rows:
        pids = " ".join(f"{p['pid']}{'*' if p['alive'] else ''}" for p in r.get("participants", []))
        depth = r.get("depth", f"{r['keys']} keys" if "keys" in r else r.get("type", ""))
        print(f"{r['name']:<28} {r['kind']:<10} {r['size']:>10}  {r['of']:<22} {pids or '-':<14} {depth}")


def format_info(info: dict) -> str:
    lines = []
    for k, v in info.items():
        if k == "participants":
            lines.append("participants:")
            for p in v:
                role = "+".join(x for x in ("sender", "receiver", "publisher", "subscriber") if p.get(x)) or "-"
                lines.append(f"  [{p['index']}] pid {p['pid']} {'alive' if p['alive'] else 'DEAD'} {role}")
        else:
            lines.append(f"{k}: {v}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# top: rates from two readings of the same monotonic counters.

def _readings() -> dict[str, dict]:
    """Every channel and dict, described (derived segments left out), by name."""
    out = {}
    for name in _names():
        info = describe(name)
        if info is not None and info["kind"] in ("channel", "dict"):
            out[name] = info
    return out


def _rate(now: dict, before: dict | None, key: str, dt: float) -> float | None:
    if before is None or key not in now or key not in before or dt <= 0:
        return None
    return max(0, now[key] - before[key]) / dt


def rates(before: dict[str, dict], now: dict[str, dict], dt: float) -> list[dict]:
    """One row per structure in ``now``: counts and per-second rates over ``dt``."""
    rows = []
    for name, info in now.items():
        prev = before.get(name)
        row = {"name": name, "kind": info["kind"], "of": info["of"],
               "pids": sum(p["alive"] for p in info.get("participants", []))}
        if info["kind"] == "channel":
            row.update(flavor=info["flavor"], depth=info.get("depth"),
                       sent_per_s=_rate(info, prev, "sent", dt), received_per_s=_rate(info, prev, "received", dt))
        else:
            row.update(keys=info["keys"], ops_per_s=_rate(info, prev, "ops", dt))
        rows.append(row)
    return rows


def _fmt_rate(v) -> str:
    if v is None:
        return "-"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.1f}{unit}"
    return f"{v:.0f}"


def format_top(rows: list[dict], interval: float) -> str:
    lines = [f"shm top  {time.strftime('%H:%M:%S')}  every {interval:g} s  (Ctrl-C quits)",
             f"{'NAME':<16} {'KIND':<9} {'OF':<22} {'PIDS':>4} {'SENT/s':>8} {'RECV/s':>8} {'DEPTH':>7} "
             f"{'OPS/s':>8} {'KEYS':>9}"]
    if not rows:
        lines.append("no shm channels or dicts")
    for r in sorted(rows, key=lambda r: (r["kind"], r["of"])):
        kind = r.get("flavor", r["kind"])
        if r["kind"] == "channel":
            cells = (_fmt_rate(r["sent_per_s"]), _fmt_rate(r["received_per_s"]),
                     "-" if r["depth"] is None else str(r["depth"]), "", "")
        else:
            cells = ("", "", "", _fmt_rate(r["ops_per_s"]), str(r["keys"]))
        lines.append(f"{r['name']:<16} {kind:<9} {r['of'][:22]:<22} {r['pids']:>4} "
                     f"{cells[0]:>8} {cells[1]:>8} {cells[2]:>7} {cells[3]:>8} {cells[4]:>9}")
    return "\n".join(lines)


def top(interval: float = 1.0, count: int | None = None, as_json: bool = False, out=None) -> None:
    """Print live rates every ``interval`` seconds, ``count`` times (None: until interrupted).

    As JSON, one object per line: ``{"time", "interval", "structures": [rows]}``.
    On a terminal the table redraws in place.
    """
    import json
    import sys
    out = out or sys.stdout
    clear = out.isatty() and not as_json
    before, t0 = _readings(), time.monotonic()
    shown = 0
    while count is None or shown < count:
        time.sleep(interval)
        now, t1 = _readings(), time.monotonic()
        rows = rates(before, now, t1 - t0)
        if as_json:
            out.write(json.dumps({"time": time.time(), "interval": t1 - t0, "structures": rows}) + "\n")
        else:
            out.write(("\x1b[H\x1b[2J" if clear else "") + format_top(rows, interval) + "\n\n")
        out.flush()
        before, t0 = now, t1
        shown += 1


# Kinds with a participant table (the others are derived segments of one of these).
_STRUCTURES = (L.KIND_CHANNEL, L.KIND_DICT, L.KIND_SYNC, L.KIND_BROADCAST, L.KIND_POOL)


def _pool_workers(seg: Segment) -> list[dict]:
    """A pool's worker table (shm/pool.py): slot, pid, state, and whether that process is alive."""
    out = []
    table = seg.params[L.PP_TABLE]
    names = {L.WS_IDLE: "idle", L.WS_BUSY: "busy", L.WS_DEAD: "dead", L.WS_EXITED: "exited"}
    for i in range(min(int(seg.params[L.PP_WORKERS]), L.MAX_PARTICIPANTS)):
        base = (table + i * L.WK_SIZE) >> 3
        state = int(seg.w[base + (L.WK_STATE >> 3)])
        pid = int(seg.w[base + (L.WK_PID >> 3)])
        start = int(seg.w[base + (L.WK_START >> 3)])
        alive = pid > 0 and state in (L.WS_IDLE, L.WS_BUSY) and _liveness.alive(pid, start)
        out.append({"index": i, "pid": pid, "alive": alive, "state": names.get(state, "?"),
                    "done": int(seg.w[base + (L.WK_DONE >> 3)])})
    return out


def _dead_structure(seg: Segment) -> bool:
    """No participant alive, no token in transit from a live process, no live creator mid-init."""
    if seg.kind not in _STRUCTURES:
        return False
    if seg.kind == L.KIND_POOL:          # a pool lives as long as its parent (its creator) or a worker
        cpid, cstart = seg.creator
        return not _liveness.alive(cpid, cstart) and not any(w["alive"] for w in _pool_workers(seg))
    parts, reg = _participants(seg)
    if any(p["alive"] for p in parts) or reg.live_tokens():
        return False
    cpid, cstart = seg.creator
    return not (seg.state & L.SEG_STATE_MASK == L.SEG_INIT and _liveness.alive(cpid, cstart))


def gc(dry_run: bool = False) -> list[str]:
    """Remove shm structures whose processes are all dead; returns the names removed."""
    names = _names()
    removed: list[str] = []
    live_families = set()
    dead_families = set()
    for name in names:
        seg = _attach(name)
        if seg is None:
            continue
        try:
            if seg.kind in _STRUCTURES:
                if _dead_structure(seg):
                    dead_families.add(seg.family)
                    removed.append(name)
                    if not dry_run:
                        seg.set_state(seg.state, L.SEG_UNLINKED)
                        unlink_name(name)
                else:
                    live_families.add(seg.family)
        finally:
            seg.close()
    for name in names:
        if name in removed:
            continue
        seg = _attach(name)
        if seg is None:
            # A segment stuck before its header (creator died): ours only if it carries our prefix.
            if name.startswith("shm_") and _stale_headerless(name):
                removed.append(name)
                if not dry_run:
                    unlink_name(name)
            continue
        try:
            if seg.kind in (L.KIND_RING, L.KIND_BLOB, L.KIND_SHARD) and (
                    seg.family in dead_families or seg.family not in live_families):
                removed.append(name)
                if not dry_run:
                    unlink_name(name)
        finally:
            seg.close()
    return removed


def _stale_headerless(name: str) -> bool:
    try:
        st = os.stat(os.path.join(SHM_DIR, name))
    except OSError:
        return False
    if time.time() - st.st_ctime < 10:
        return False
    try:
        with open(os.path.join(SHM_DIR, name), "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return len(head) < 8 or head == b"\0" * 8


__all__ = ["list_segments", "describe", "inspect", "gc", "top", "rates", "print_table", "format_info",
           "format_top", "SegmentError"]
