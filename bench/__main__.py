"""``python -m bench [group ...] [--quick] [--reps N] [--seconds S] [--cases a,b]``.

With no group, every group runs. ``--quick`` uses short runs and one
repetition and writes to ``bench/results/quick/`` (never mistaken for the
reference results in ``bench/results/``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import aio, channels, dicts, pool, sync
from . import redis as redis_group
from .common import log

GROUPS = {"channels": channels, "dicts": dicts, "sync": sync, "aio": aio, "pool": pool, "redis": redis_group}
DEFAULT_REPS = 5
DEFAULT_SECONDS = 1.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="*", help=f"groups to run (default: all of {', '.join(GROUPS)})")
    ap.add_argument("--quick", action="store_true", help="short runs, 1 repetition (results/quick/)")
    ap.add_argument("--reps", type=int, default=None, help=f"measured runs per peer and case (default {DEFAULT_REPS}; 1 with --quick)")
    ap.add_argument("--seconds", type=float, default=None, help=f"target seconds per run (default {DEFAULT_SECONDS}; 0.25 with --quick)")
    ap.add_argument("--out", default=None, help="output directory (default bench/results[/quick|/partial])")
    ap.add_argument("--list", action="store_true", help="list groups and cases, then exit")
    ap.add_argument("--cases", default="", help="comma-separated case keys (default: all); "
                    + "; ".join(f"{n}: {','.join(c.key for c in g.make_cases())}" for n, g in GROUPS.items()))
    ap.add_argument("--no-profile", action="store_true", help="skip the 'where the time goes' sections")
    for g in GROUPS.values():
        g.add_args(ap)
    opts = ap.parse_args(argv)
    if opts.list:
        for name, g in GROUPS.items():
            print(name)
            for c in g.make_cases():
                print(f"  {c.key:8s} {c.title}")
        return 0
    opts.reference = not opts.quick and opts.reps is None and opts.seconds is None and not opts.cases
    if opts.reps is None:
        opts.reps = 1 if opts.quick else DEFAULT_REPS
    if opts.seconds is None:
        opts.seconds = 0.25 if opts.quick else DEFAULT_SECONDS
    groups = opts.groups or list(GROUPS)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        ap.error(f"unknown group(s) {bad}; choose from {list(GROUPS)}")
    if opts.cases:
        # Each group runs the keys it knows; a group none of them names is skipped.
        want = {k.strip() for k in opts.cases.split(",") if k.strip()}
        known = {g: {c.key for c in GROUPS[g].make_cases()} for g in groups}
        unknown = want - set().union(*known.values())
        if unknown:
            ap.error(f"unknown case(s) {sorted(unknown)}; the groups {groups} have "
                     + "; ".join(f"{g}: {','.join(sorted(k))}" for g, k in known.items()))
        groups = [g for g in groups if known[g] & want]
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    rc = 0
    for g in groups:
        rc |= GROUPS[g].main(opts)
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    new = sorted(after - before)
    others = _mapped_elsewhere(new)
    ours = [n for n in new if n not in others]
    if ours:            # another session's short-lived names (e.g. its semaphores) may be between uses: look again
        time.sleep(2)
        still = set(os.listdir("/dev/shm"))
        ours = [n for n in ours if n in still and not _mapped_elsewhere([n])]
    log(f"/dev/shm: {len(before)} entries before, {len(after)} after; new and mapped by no other process "
        f"(left by this run): {ours[:10] if ours else 'none'}"
        + (f"; new but in use by other processes (other sessions): {len(others)}" if others else ""))
    return rc


def _mapped_elsewhere(names) -> set:
    """Those of ``names`` (/dev/shm entries) that a process other than this one has mapped."""
    want, found = set(names), set()
    for pid in os.listdir("/proc") if want else ():
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    _, hit, rest = line.partition("/dev/shm/")
                    if hit and rest.split()[0] in want:
                        found.add(rest.split()[0])
        except OSError:
            pass
    return found


if __name__ == "__main__":
    sys.exit(main())
