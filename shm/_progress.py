"""A dependency-free text progress bar for ``Pool.map(..., progress=True)``.

Drawn on a stream (stderr) with carriage returns, at most ten times a
second; on a stream that is not a terminal, one line every few seconds.
"""
from __future__ import annotations

import time


def _fmt_rate(r: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if r >= div:
            return f"{r / div:.1f}{unit}"
    return f"{r:.0f}"


class Bar:
    WIDTH = 30

    def __init__(self, stream):
        self.stream = stream
        self.t0 = time.monotonic()
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.last = 0.0
        self.drawn = False

    def __enter__(self):
        return self

    def line(self, done: int, total: int) -> str:
        el = time.monotonic() - self.t0
        frac = done / total if total else 1.0
        fill = int(frac * self.WIDTH)
        rate = done / el if el > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("inf")
        eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
        return (f"[{'#' * fill}{'.' * (self.WIDTH - fill)}] {frac * 100:5.1f}% {done}/{total} "
                f"{_fmt_rate(rate)} tasks/s, {el:.1f}s elapsed, eta {eta_s}")

    def show(self, done: int, total: int) -> None:
        now = time.monotonic()
        final = done >= total
        if not final and now - self.last < (0.1 if self.tty else 5.0):
            return
        self.last = now
        text = self.line(done, total)
        self.stream.write(("\r" + text) if self.tty else (text + "\n"))
        self.drawn = True
        self.stream.flush()

    def __exit__(self, *exc):
        if self.drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()
