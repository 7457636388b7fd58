"""Who is attached: the participant table, role bitmaps, tokens and reaping.

Design notes
------------
A structure in shared memory must know which processes use it, for three
reasons: to tell a receiver that every sender is gone (disconnection), to
recover what a SIGKILLed process held (a claimed ring slot, a shard lock),
and to know when the last user has left so the segments can be unlinked.

*Participants.* Each process attached to a structure claims one entry of its
participant table (``kernels/layout.py``: ``PARTICIPANT``, 256 entries).
The entry's state word packs ``incarnation << 40 | pid << 8 | code`` and
changes only by CAS, so a claimant, the owner and reapers cannot interleave
badly, and the incarnation defeats ABA when an entry is freed and reused.
The entry index is what ring stamps and shard locks record as "owner".

*Roles.* A participant that holds at least one Sender sets its bit in the
``tx_roles`` bitmap (``rx_roles`` for Receivers). "Any sender left?" is four
word loads, cheap enough for every receive. Per-process handle counts stay
in this process; shared memory only holds "at least one", which a reaper can
clear idempotently with fetch_and. (A shared *count* cannot be repaired
after a process dies between two of its updates.)

*Tokens.* A handle that was pickled to another process, or inherited across
fork, and not yet claimed there, still counts while the process that lent it
is alive: otherwise a parent that closes its own handle right after
``Process.start()`` would disconnect the channel (or, if it was the last
participant, unlink it) before the child attaches; with spawn that takes
most of a second. A token is an entry in the token table (with the lender's
pid and start time) plus a bit in the role's token word. It is retired by
whoever wins a CAS that marks it: the claiming child, a sweep that finds
its lender dead, or the clock for fork tokens nobody claimed within
``FORK_TOKEN_TTL``. Only the winner clears the bit, then frees the entry,
so a bit is never cleared under a newer token.

*Reaping.* A participant is dead when its process is (``_liveness``). The
first survivor to notice moves the entry ALIVE -> REAPING(its own pid) by
CAS, recovers what the dead one held (a callback: ring slots, locks), clears
its role and waiter bits and tokens, and frees the entry. One reaper at a
time: a REAPING entry whose reaper has died is taken over by CAS. Every
recovery step is idempotent, so a reaper killed half-way leaves nothing
inconsistent behind. Reaping runs on slow paths only: while a waiter is
parked (every ``PEER_CHECK`` seconds), when the table is full, and when a
participant leaves and must decide whether it is the last.
"""
from __future__ import annotations

import os
import secrets
import threading
import time

from kernels import layout as L
from kernels import words as W

from . import _liveness
from .errors import TooManyParticipants

__all__ = ["Registry", "PEER_CHECK", "FORK_TOKEN_TTL"]

PEER_CHECK = 0.5             # seconds between liveness sweeps while blocked
FORK_TOKEN_TTL = 30.0        # an inherited handle's token expires if no child claims it
_CLAIM_STUCK = 1.0           # a token mid-retirement for this long lost its retirer

# Token word: 0 when free; when lent, role (bit 12), kind (bits 16-19) and a
# serial (bits 20-51); while being retired, bit 62 is set and bits 20-51 hold
# the retirement time (monotonic ns >> 26, ~67 ms). The lender's pid and start
# time are in the entry's other words.
_TK_CLAIM_BIT = 1 << 62
_TK_LENDING_BIT = 1 << 61    # being lent: the lender's words are not written yet
_LENDING_STUCK = 60.0
_TK_ROLE_SHIFT = 12
_TK_KIND_SHIFT = 16
_TK_LOW_MASK = (1 << 20) - 1
_TK_SERIAL_SHIFT = 20
_TK_SERIAL_MASK = (1 << 32) - 1


def _coarse_now() -> int:
    return (time.monotonic_ns() >> 26) & _TK_SERIAL_MASK


def _code(s: int) -> int:
    return s & L.PS_CODE_MASK


def _pid_of(s: int) -> int:
    return (s >> L.PS_PID_SHIFT) & L.PS_PID_MASK


def _inc(s: int) -> int:
    return s >> L.PS_INC_SHIFT


def _state(inc: int, pid: int, code: int) -> int:
    s = ((inc & 0xFFFFFF) << L.PS_INC_SHIFT) | ((pid & L.PS_PID_MASK) << L.PS_PID_SHIFT) | code
    # As the int64 word reads back: incarnations from 2**23 on set the sign bit.
    return s - (1 << 64) if s >> 63 else s


class Registry:
    """The participant table, role bitmaps and tokens of one control segment."""

    def __init__(self, seg, table_off: int, tokens_off: int, role_words: tuple[int, int],
                 token_words: tuple[int, int], waiter_words: tuple[int, int]):
        self.seg = seg
        self.table = table_off
        self.tokens = tokens_off
        self.role_words = role_words          # byte offsets of the tx/rx role bitmaps
        self.token_words = token_words        # byte offsets of the tx/rx token words
        self.waiter_words = waiter_words      # byte offsets of the rx/tx waiter bitmaps
        self._serial = secrets.randbits(32)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------
    # Participant entries.

    def _sw(self, idx: int) -> int:
        return (self.table + idx * L.PT_SIZE + L.PT_STATE) >> 3

    def state(self, idx: int) -> int:
        return W.load(self.seg.w, self._sw(idx))

    def entry(self, idx: int) -> tuple[int, int, int, int]:
        """(state, pid, start, pidns) of entry ``idx``."""
        s = self.state(idx)
        base = (self.table + idx * L.PT_SIZE) >> 3
        w = self.seg.w
        return s, int(w[base + (L.PT_PID >> 3)]), int(w[base + (L.PT_START >> 3)]), int(w[base + (L.PT_PIDNS >> 3)])

    def register(self, on_reap=None) -> int:
        """Claim an entry for this process; returns its index.

        If the table is full, dead participants are reaped first, with
        ``on_reap`` recovering what they held: an entry must never be freed
        (and reused) while ring slots still carry its index.
        """
        for attempt in range(2):
            idx = self._claim()
            if idx >= 0:
                return idx
            if attempt == 0:
                self.sweep(on_reap=on_reap, recover_required=True)
        raise TooManyParticipants(
            f"all {L.MAX_PARTICIPANTS} participant slots of {self.seg.name!r} are held by live processes")

    def _claim(self) -> int:
        ident = _liveness.me()
        w = self.seg.w
        for idx in range(L.MAX_PARTICIPANTS):
            s = self.state(idx)
            if _code(s) != L.PS_FREE:
                continue
            claiming = _state(_inc(s) + 1, ident.pid, L.PS_CLAIMING)
            if W.cas(w, self._sw(idx), s, claiming) != s:
                continue
            base = (self.table + idx * L.PT_SIZE) >> 3
            w[base + (L.PT_PID >> 3)] = ident.pid
            w[base + (L.PT_START >> 3)] = ident.start
            w[base + (L.PT_PIDNS >> 3)] = ident.pidns
            W.store(w, base + (L.PT_ROLES >> 3), 0)
            W.store(w, self._sw(idx), _state(_inc(s) + 1, ident.pid, L.PS_ALIVE))
            return idx
        return -1

    def unregister(self, idx: int) -> None:
        """Free this process's entry (its role and waiter bits must be clear)."""
        s = self.state(idx)
        if _code(s) == L.PS_ALIVE and _pid_of(s) == (os.getpid() & L.PS_PID_MASK):
            W.cas(self.seg.w, self._sw(idx), s, _state(_inc(s), 0, L.PS_FREE))

    def mine(self, idx: int) -> bool:
        """Whether entry ``idx`` is an ALIVE entry of this very process."""
        s = self.state(idx)
        if _code(s) != L.PS_ALIVE or _pid_of(s) != (os.getpid() & L.PS_PID_MASK):
            return False
        _, pid, start, _ = self.entry(idx)
        return start == _liveness.me().start

    def live_entries(self):
        """Indices of entries not FREE (alive, being claimed, or being reaped)."""
        return [i for i in range(L.MAX_PARTICIPANTS) if _code(self.state(i)) != L.PS_FREE]

    def claim_last_out(self) -> bool:
        """Whether we are the last participant, claiming the right to unlink if so.

        Call after unregistering. On True the segment is marked UNLINKED and
        the caller removes the structure's names.
        """
        if self.live_entries() or self.live_tokens():
            return False
        seg = self.seg
        closing = (os.getpid() << 8) | L.SEG_CLOSING
        if not seg.set_state(L.SEG_OPEN, closing):
            return False
        # Dekker with a newcomer's register: it registers, then reads the
        # state; we set CLOSING, then read the table. One of us sees the other.
        if self.live_entries():
            seg.set_state(closing, L.SEG_OPEN)
            return False
        seg.set_state(closing, L.SEG_UNLINKED)
        return True

    def ops_total(self) -> int:
        """Operations counted in every entry (``PT_OPS``, ticked by the dict kernels).

        Entries are never reset, so the sum only grows: ``python -m shm top``
        takes rates from its differences.
        """
        w = self.seg.w
        first = (self.table + L.PT_OPS) >> 3
        step = L.PT_SIZE >> 3
        return int(w[first:first + step * L.MAX_PARTICIPANTS:step].sum())

    def pids(self) -> list[tuple[int, int, bool]]:
        """(index, pid, alive) for every non-free entry."""
        out = []
        for i in self.live_entries():
            s, pid, start, ns = self.entry(i)
            code = _code(s)
            if code == L.PS_REAPING:
                out.append((i, pid, False))
            elif code == L.PS_CLAIMING:
                out.append((i, _pid_of(s), _liveness.pid_alive(_pid_of(s))))
            else:
                out.append((i, pid, _liveness.alive(pid, start, ns)))
        return out

    # ------------------------------------------------------------------
    # Roles and waiters.

    def set_role(self, idx: int, role: int) -> None:
        W.bit_set(self.seg.w, self.role_words[role] >> 3, idx)
        W.fetch_or(self.seg.w, (self.table + idx * L.PT_SIZE + L.PT_ROLES) >> 3, 1 << role)

    def clear_role(self, idx: int, role: int) -> None:
        W.bit_clear(self.seg.w, self.role_words[role] >> 3, idx)
        W.fetch_and(self.seg.w, (self.table + idx * L.PT_SIZE + L.PT_ROLES) >> 3, ~(1 << role))

    def has_role(self, role: int) -> bool:
        w = self.seg.w
        base = self.role_words[role] >> 3
        if any(W.load(w, base + k) for k in range(L.BITMAP_WORDS)):
            return True
        return W.load(w, self.token_words[role] >> 3) != 0

    def role_holders(self, role: int) -> list[int]:
        w = self.seg.w
        base = self.role_words[role] >> 3
        out = []
        for k in range(L.BITMAP_WORDS):
            v = W.load(w, base + k) & 0xFFFFFFFFFFFFFFFF
            for b in range(64):
                if v >> b & 1:
                    out.append(k * 64 + b)
        return out

    def token_count(self, role: int) -> int:
        return bin(W.load(self.seg.w, self.token_words[role] >> 3) & 0xFFFFFFFFFFFFFFFF).count("1")

    def set_waiting(self, idx: int, side: int) -> None:
        W.bit_set(self.seg.w, self.waiter_words[side] >> 3, idx)

    def clear_waiting(self, idx: int, side: int) -> None:
        W.bit_clear(self.seg.w, self.waiter_words[side] >> 3, idx)

    def waiting_count(self, side: int) -> int:
        w = self.seg.w
        base = self.waiter_words[side] >> 3
        return sum(bin(W.load(w, base + k) & 0xFFFFFFFFFFFFFFFF).count("1") for k in range(L.BITMAP_WORDS))

    # ------------------------------------------------------------------
    # Tokens.

    def _tw(self, t: int) -> int:
        return (self.tokens + t * L.TK_SIZE + L.TK_STATE) >> 3

    def lend(self, role: int, kind: int) -> tuple[int, int] | None:
        """Lend a token of ``role`` from this process: (token index, value), or None if full."""
        w = self.seg.w
        ident = _liveness.me()
        with self._lock:
            self._serial = (self._serial + 1) & _TK_SERIAL_MASK
            serial = self._serial
        value = (serial << _TK_SERIAL_SHIFT) | (kind << _TK_KIND_SHIFT) | (role << _TK_ROLE_SHIFT) | 1
        lending = _TK_LENDING_BIT | (_coarse_now() << _TK_SERIAL_SHIFT) | (value & _TK_LOW_MASK)
        for t in range(L.MAX_TOKENS):
            if W.load(w, self._tw(t)) != 0:
                continue
            if W.cas(w, self._tw(t), 0, lending) != 0:
                continue
            base = (self.tokens + t * L.TK_SIZE) >> 3
            w[base + (L.TK_CREATED >> 3)] = time.monotonic_ns()
            w[base + (L.TK_LENDER_PID >> 3)] = ident.pid
            w[base + (L.TK_LENDER_START >> 3)] = ident.start
            W.store(w, self._tw(t), value)
            W.bit_set(w, self.token_words[role] >> 3, t)
            return t, value
        return None

    def lend_fork(self, role: int, lent: list) -> tuple[int, int] | None:
        """``lend(role, TOKEN_FORK)`` just before a fork, remembered in ``lent`` for
        ``retire_orphaned_forks`` (which needs the time of the lend)."""
        since = _liveness.boot_ticks()
        tok = self.lend(role, L.TOKEN_FORK)
        if tok is not None:
            if len(lent) >= 64:     # a process that forks all day: forget the claimed ones
                lent[:] = [x for x in lent if self.holds(x[0], x[1])]
            lent.append((*tok, since))
        return tok

    def holds(self, t: int, value: int) -> bool:
        """Whether token ``t`` is still the one lent as ``value`` (not yet retired)."""
        return W.load(self.seg.w, self._tw(t)) == value

    def retire_orphaned_forks(self, lent: list) -> None:
        """Retire the fork tokens this process lent that no running child can still claim.

        ``lent``: (token, value, ``_liveness.boot_ticks()`` just before the
        fork). A child forked after the lend started at or after that time;
        if no running (non-zombie) child of ours did, the child the token
        was lent to died before it registered (SIGKILLed while starting, say),
        and the token would otherwise keep the channel alive, and its segments
        linked, for ``FORK_TOKEN_TTL`` after we leave. Called when our last
        handle closes. Unknown (no /proc): left to the clock.
        """
        live = [x for x in lent if self.holds(x[0], x[1])]
        if not live:
            return
        kids = _liveness.children_started_since()
        if kids is None:
            return
        for t, v, since in live:
            if not any(k >= since for k in kids):
                self.retire(t, v)

    def retire(self, t: int, value: int) -> bool:
        """Retire token ``t`` if it still holds ``value``: True if this call retired it.

        Only the process whose CAS marks the token clears its bit, then frees
        the entry, so no bit is ever cleared under a newer token.
        """
        w = self.seg.w
        if value == 0:
            return False
        claimed = _TK_CLAIM_BIT | (value & _TK_LOW_MASK) | (_coarse_now() << _TK_SERIAL_SHIFT)
        if W.cas(w, self._tw(t), value, claimed) != value:
            return False
        role = (value >> _TK_ROLE_SHIFT) & 1
        W.bit_clear(w, self.token_words[role] >> 3, t)
        W.cas(w, self._tw(t), claimed, 0)
        return True

    def _token_lender(self, t: int) -> tuple[int, int]:
        base = (self.tokens + t * L.TK_SIZE) >> 3
        w = self.seg.w
        return int(w[base + (L.TK_LENDER_PID >> 3)]), int(w[base + (L.TK_LENDER_START >> 3)])

    def live_tokens(self) -> int:
        """How many lent tokens have a living lender."""
        n = 0
        for t in range(L.MAX_TOKENS):
            v = W.load(self.seg.w, self._tw(t))
            if v and not v & (_TK_CLAIM_BIT | _TK_LENDING_BIT) and _liveness.alive(*self._token_lender(t)):
                n += 1
        return n

    def _sweep_tokens(self) -> None:
        w = self.seg.w
        now = time.monotonic_ns()
        for t in range(L.MAX_TOKENS):
            v = W.load(w, self._tw(t))
            if not v:
                continue
            if v & _TK_LENDING_BIT:
                # Its lender died between taking the entry and lending it (no bit was set).
                since = (_coarse_now() - ((v >> _TK_SERIAL_SHIFT) & _TK_SERIAL_MASK)) & _TK_SERIAL_MASK
                if since * (1 << 26) / 1e9 > _LENDING_STUCK:
                    W.cas(w, self._tw(t), v, 0)
                continue
            if v & _TK_CLAIM_BIT:
                # Being retired. If for more than _CLAIM_STUCK, its retirer died
                # between marking it and clearing its bit: take the retirement over.
                since = (_coarse_now() - ((v >> _TK_SERIAL_SHIFT) & _TK_SERIAL_MASK)) & _TK_SERIAL_MASK
                if since * (1 << 26) / 1e9 > _CLAIM_STUCK:
                    self.retire(t, v)
                continue
            kind = (v >> _TK_KIND_SHIFT) & 0xF
            age = (now - int(w[(self.tokens + t * L.TK_SIZE + L.TK_CREATED) >> 3])) / 1e9
            if not _liveness.alive(*self._token_lender(t)):
                self.retire(t, v)
            elif kind == L.TOKEN_FORK and age > FORK_TOKEN_TTL:
                self.retire(t, v)

    # ------------------------------------------------------------------
    # Reaping.

    def _dead(self, idx: int, s: int) -> bool:
        code = _code(s)
        if code == L.PS_FREE:
            return False
        if code == L.PS_CLAIMING:
            return not _liveness.pid_alive(_pid_of(s))
        if code == L.PS_REAPING:
            return not _liveness.pid_alive(_pid_of(s))     # the reaper's pid
        _, pid, start, ns = self.entry(idx)
        return not _liveness.alive(pid, start, ns)

    def sweep(self, on_reap=None, skip: int = -1, recover_required: bool = False) -> int:
        """Reap every dead participant; returns how many were reaped.

        ``on_reap(idx)`` recovers what ``idx`` held (ring slots, locks); it
        runs while this process owns the entry's REAPING state. Without it
        (``recover_required`` false) only entries that never held anything
        (CLAIMING) may be freed.
        """
        reaped = 0
        ident = _liveness.me()
        w = self.seg.w
        for idx in self.live_entries():
            if idx == skip:
                continue
            s = self.state(idx)
            if not self._dead(idx, s):
                continue
            if on_reap is None and _code(s) != L.PS_CLAIMING:
                continue            # it may hold slots: only a sweep that can recover them frees it
            reaping = _state(_inc(s), ident.pid, L.PS_REAPING)
            if W.cas(w, self._sw(idx), s, reaping) != s:
                continue
            if on_reap is not None and _code(s) != L.PS_CLAIMING:
                on_reap(idx)
            for role in (L.ROLE_TX, L.ROLE_RX):
                W.bit_clear(w, self.role_words[role] >> 3, idx)
            for side in (0, 1):
                W.bit_clear(w, self.waiter_words[side] >> 3, idx)
            W.cas(w, self._sw(idx), reaping, _state(_inc(s), 0, L.PS_FREE))
            reaped += 1
        self._sweep_tokens()
        return reaped
