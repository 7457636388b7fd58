"""Figures the fault tests report at the end of the suite (kills survived, messages checked...)."""
from __future__ import annotations

import collections

_figures: "collections.Counter[str]" = collections.Counter()


def add(name: str, n: int = 1) -> None:
    _figures[name] += n


def set(name: str, value: int) -> None:
    _figures[name] = value


def lines() -> list[str]:
    return [f"{k}: {v}" for k, v in sorted(_figures.items())]
