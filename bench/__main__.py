"""``python -m bench [group ...] [--quick] [--reps N] [--seconds S] [--cases a,b]``.

With no group, every group runs. ``--quick`` uses short runs and one
repetition and writes to ``bench/results/quick/`` (never mistaken for the
reference results in ``bench/results/``).
"""
from __future__ import annotations

import argparse
import os
import sys

from . import channels
from .common import log

GROUPS = {"channels": channels}
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
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    rc = 0
    for g in groups:
        rc |= GROUPS[g].main(opts)
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    new = sorted(after - before)
    log(f"/dev/shm: {len(before)} entries before, {len(after)} after; new: {new[:10] if new else 'none'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
