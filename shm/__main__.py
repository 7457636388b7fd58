"""``python -m shm``: demo, list, inspect and clean up shm structures.

    python -m shm demo [N]        run the pipeline demo (what `make demo` runs)
    python -m shm ls [--json]     list shm segments in /dev/shm
    python -m shm inspect NAME    show one structure in detail
    python -m shm top [--json]    live rates: messages/s per channel, ops/s per dict
    python -m shm gc [--dry-run]  remove segments whose processes are all dead
"""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m shm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the multi-process pipeline demo")
    d.add_argument("n", nargs="?", type=int, default=None, help="records to send")
    ls = sub.add_parser("ls", help="list shm segments")
    ls.add_argument("--json", action="store_true")
    ins = sub.add_parser("inspect", help="show one structure")
    ins.add_argument("name")
    ins.add_argument("--json", action="store_true")
    tp = sub.add_parser("top", help="live rates per channel and dict")
    tp.add_argument("--interval", "-n", type=float, default=1.0, help="seconds between refreshes")
    tp.add_argument("--count", "-c", type=int, default=None, help="refreshes before exiting (default: forever)")
    tp.add_argument("--json", action="store_true", help="one JSON object per refresh, one per line")
    gc = sub.add_parser("gc", help="remove segments of dead processes")
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    if a.cmd == "demo":
        from . import demo
        return demo.main([] if a.n is None else [str(a.n)])
    from . import _admin
    if a.cmd == "ls":
        rows = _admin.list_segments()
        if a.json:
            print(json.dumps(rows, indent=2))
        else:
            _admin.print_table(rows)
        return 0
    if a.cmd == "inspect":
        info = _admin.inspect(a.name)
        print(json.dumps(info, indent=2) if a.json else _admin.format_info(info))
        return 0
    if a.cmd == "top":
        if a.interval <= 0:
            p.error("--interval must be a positive number of seconds")
        try:
            _admin.top(a.interval, a.count, a.json)
        except KeyboardInterrupt:
            pass
        return 0
    if a.cmd == "gc":
        removed = _admin.gc(dry_run=a.dry_run)
        if a.json:
            print(json.dumps(removed, indent=2))
        else:
            verb = "would remove" if a.dry_run else "removed"
            print(f"{verb} {len(removed)} segments" + (": " + ", ".join(removed) if removed else ""))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
