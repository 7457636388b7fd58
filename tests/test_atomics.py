"""kernels.atomics, kernels.syscalls and kernels.memory.copy, in and out of numba.

* Each atomic's plain-Python reference body (its specification) and its
  jitted version agree, on int64 and uint64 words, for every ordering the
  operation accepts (one generated function per operation holds one call
  per ordering literal, so this costs one compile per operation and word
  type, not one per ordering).
* Bad orderings and bad arrays are refused at compile time with a message.
* The emitted x86 assembly holds the locked instruction we expect.
* Two real processes hammering one word of a real segment lose no update.
* futex wait/wake work within and across processes; the clock is the
  interpreter's clock; copy refuses what it must refuse.

Test kernels are compiled without ``cache=True``: they inline kernels/*.py
and numba's cache key covers only this file, so a cached copy could go stale.
"""
from __future__ import annotations

import ctypes
import errno
import platform
import re
import time

import numba
import numpy as np
import pytest
from numba.core.errors import TypingError

import _foundation_workers as FW
from kernels import atomics as A
from kernels import layout as L
from kernels import memory as M
from kernels import syscalls as S
from shm.segment import Segment

IS_X86 = platform.machine().lower() in ("x86_64", "amd64")
x86_only = pytest.mark.skipif(not IS_X86, reason="asserts on x86-64 assembly")

ALL_ORDERS = ("relaxed", "monotonic", "acquire", "release", "acq_rel", "seq_cst")
LOAD_ORDERS = ("relaxed", "monotonic", "acquire", "seq_cst")
STORE_ORDERS = ("relaxed", "monotonic", "release", "seq_cst")
FENCE_ORDERS = ("acquire", "release", "acq_rel", "seq_cst")

I64_MAX = 2**63 - 1
I64_MIN = -2**63
U64_MAX = 2**64 - 1

# (initial word, operand) pairs: zero, signs, both int64 boundaries, bit patterns.
I64_CASES = [
    (0, 0), (0, 1), (7, -3), (-1, 1), (-1, -1), (I64_MAX, 1), (I64_MIN, -1), (I64_MAX, I64_MAX),
    (I64_MIN, I64_MIN), (I64_MAX, I64_MIN), (0x5555_5555_5555_5555, 0x3333_3333_3333_3333),
    (-0x0F0F_0F0F_0F0F_0F10, 0x7F00_FF00_00FF_00FF), (123_456_789, 987_654_321),
]
U64_CASES = [
    (0, 0), (0, 1), (U64_MAX, 1), (U64_MAX, U64_MAX), (2**63, 2**63), (I64_MAX, 1),
    (0xAAAA_AAAA_AAAA_AAAA, 0x0F0F_0F0F_0F0F_0F0F), (2**63 + 5, 2**64 - 7), (42, 2**40),
]
DTYPE_CASES = [(np.int64, I64_CASES), (np.uint64, U64_CASES)]


# --------------------------------------------------------------------------
# Jitted drivers: one compiled function per operation applies it once per
# ordering, to word k for the k-th ordering. The bodies are written out (not
# looped with literal_unroll, which compiles twice as slowly).

def _unrolled(line: str, orders):
    """``njit(def drive(a, x, y, out))`` whose body is ``line`` once per ordering.

    ``line`` is formatted with ``k`` (word index) and ``o`` (ordering).
    """
    src = "def drive(a, x, y, out):\n" + "".join(
        "    " + line.format(k=k, o=repr(o)) + "\n" for k, o in enumerate(orders))
    ns: dict = {}
    exec(src, {"A": A}, ns)
    return numba.njit(ns["drive"])


j_load = _unrolled("out[{k}] = A.load(a, {k}, {o})", LOAD_ORDERS)
j_store = _unrolled("A.store(a, {k}, x[{k}], {o})", STORE_ORDERS)
j_cas = _unrolled("out[{k}] = A.cas(a, {k}, x[{k}], y[{k}], {o})", ALL_ORDERS)
# store, fence, load back: a fence must not disturb the data.
j_fence = _unrolled("A.store(a, {k}, x[{k}], 'relaxed'); A.fence({o}); out[{k}] = A.load(a, {k}, 'relaxed')",
                    FENCE_ORDERS)
RMW_OPS = {
    name: (getattr(A, name), _unrolled(f"out[{{k}}] = A.{name}(a, {{k}}, x[{{k}}], {{o}})", ALL_ORDERS))
    for name in ("fetch_add", "fetch_or", "fetch_and", "exchange")
}


@numba.njit
def j_pause(n):
    for _ in range(n):
        A.pause()
    return n


def _words(dtype, value, n):
    return np.full(n, value, dtype=dtype)


# --------------------------------------------------------------------------
# Reference body == jitted version.

@pytest.mark.parametrize("dtype,cases", DTYPE_CASES, ids=["int64", "uint64"])
def test_load_agrees(dtype, cases):
    n = len(LOAD_ORDERS)
    for init, _ in cases:
        a = np.array([init ^ k for k in range(n)], dtype)     # a distinct value in each word
        ref = np.zeros(n, dtype)
        for k, o in enumerate(LOAD_ORDERS):
            ref[k] = A.load(a, k, o)
        out = np.zeros(n, dtype)
        j_load(a, a, a, out)
        assert out.tolist() == ref.tolist() == a.tolist()


@pytest.mark.parametrize("dtype,cases", DTYPE_CASES, ids=["int64", "uint64"])
def test_store_agrees(dtype, cases):
    n = len(STORE_ORDERS)
    for init, v in cases:
        vs = _words(dtype, v, n)
        ref = _words(dtype, init, n)
        for k, o in enumerate(STORE_ORDERS):
            assert A.store(ref, k, vs[k], o) is None
        jit = _words(dtype, init, n)
        j_store(jit, vs, vs, vs)
        assert jit.tolist() == ref.tolist() == [v] * n


@pytest.mark.parametrize("dtype,cases", DTYPE_CASES, ids=["int64", "uint64"])
def test_cas_agrees_on_success_and_failure(dtype, cases):
    n = len(ALL_ORDERS)
    for init, v in cases:
        for succeed in (True, False):
            expected = init if succeed else init ^ 1       # ^ 1: differs, stays in range
            exp, new = _words(dtype, expected, n), _words(dtype, v, n)
            ref, ref_out = _words(dtype, init, n), np.zeros(n, dtype)
            for k, o in enumerate(ALL_ORDERS):
                ref_out[k] = A.cas(ref, k, exp[k], new[k], o)
            jit, jit_out = _words(dtype, init, n), np.zeros(n, dtype)
            j_cas(jit, exp, new, jit_out)
            assert jit_out.tolist() == ref_out.tolist() == [init] * n   # always the old value
            assert jit.tolist() == ref.tolist() == [v if succeed else init] * n


def _model(op, dtype, init, v):
    """(new word, returned value) computed with Python ints, wrapping to the word's width."""
    new = {"fetch_add": init + v, "fetch_or": init | v, "fetch_and": init & v, "exchange": v}[op]
    new &= U64_MAX
    if dtype is np.int64 and new > I64_MAX:
        new -= 2**64
    return new, init


@pytest.mark.parametrize("op", sorted(RMW_OPS))
@pytest.mark.parametrize("dtype,cases", DTYPE_CASES, ids=["int64", "uint64"])
def test_rmw_agrees(op, dtype, cases):
    py, jitted = RMW_OPS[op]
    n = len(ALL_ORDERS)
    for init, v in cases:
        vs = _words(dtype, v, n)
        ref, ref_out = _words(dtype, init, n), np.zeros(n, dtype)
        with np.errstate(over="ignore"):        # the reference wraps, as numpy scalars do
            for k, o in enumerate(ALL_ORDERS):
                ref_out[k] = py(ref, k, vs[k], o)
        jit, jit_out = _words(dtype, init, n), np.zeros(n, dtype)
        jitted(jit, vs, vs, jit_out)
        new, old = _model(op, dtype, init, v)
        assert jit_out.tolist() == ref_out.tolist() == [old] * n, (op, init, v)
        assert jit.tolist() == ref.tolist() == [new] * n, (op, init, v)


@numba.njit
def j_fetch_add_scalar(a, i, v):
    return A.fetch_add(a, i, v, "seq_cst")


def test_fetch_add_wraps_at_the_int64_boundary():
    a = np.array([0, I64_MAX, 0], np.int64)
    assert j_fetch_add_scalar(a, 1, 1) == I64_MAX
    assert a[1] == I64_MIN
    assert j_fetch_add_scalar(a, 1, -1) == I64_MIN
    assert a[1] == I64_MAX
    assert a[0] == a[2] == 0                   # neighbours untouched
    with np.errstate(over="ignore"):
        assert A.fetch_add(a, 1, 1, "seq_cst") == I64_MAX
    assert a[1] == I64_MIN


@numba.njit
def j_cas_scalar(a, i, e, v):
    return A.cas(a, i, e, v, "seq_cst")


def _outcome(fn, a, *args):
    """(returned value, words after) or the exception type: what one call did."""
    try:
        with np.errstate(over="ignore"):
            r = fn(a, *args)
    except Exception as e:          # noqa: BLE001 - compared, not hidden
        return type(e).__name__
    return int(r), a.tolist()


def test_out_of_range_operands_agree():
    cases = [
        (j_fetch_add_scalar, A.fetch_add, np.uint64, 5, (-1,)),
        (j_fetch_add_scalar, A.fetch_add, np.int64, 5, (U64_MAX,)),
        (j_cas_scalar, A.cas, np.uint64, U64_MAX, (-1, 7)),
    ]
    # Typed scalars: otherwise numba's dispatcher may reuse an int64 specialization
    # compiled by an earlier test and refuse 2**64-1 before the atomic runs.
    def typed(x):
        return np.uint64(x) if x > 2**63 - 1 else np.int64(x)

    for jitted, py, dtype, init, args in cases:
        ref = _outcome(lambda a, *x: py(a, 0, *x, "seq_cst"), np.full(2, init, dtype), *args)
        jit = _outcome(lambda a, *x: jitted(a, 0, *(typed(v) for v in x)), np.full(2, init, dtype), *args)
        assert jit == ref, (py.__name__, dtype.__name__, init, args)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_fence_agrees(dtype):
    n = len(FENCE_ORDERS)
    vs = np.arange(1, n + 1, dtype=dtype) * dtype(1_000_003)
    ref, ref_out = np.zeros(n, dtype), np.zeros(n, dtype)
    for k, o in enumerate(FENCE_ORDERS):
        A.store(ref, k, vs[k], "relaxed")
        assert A.fence(o) is None
        ref_out[k] = A.load(ref, k, "relaxed")
    jit, jit_out = np.zeros(n, dtype), np.zeros(n, dtype)
    j_fence(jit, vs, vs, jit_out)
    assert jit.tolist() == ref.tolist() == vs.tolist()
    assert jit_out.tolist() == ref_out.tolist() == vs.tolist()


def test_pause_runs_and_returns_nothing():
    assert A.pause() is None
    assert j_pause(1000) == 1000


# --------------------------------------------------------------------------
# Compile-time rejection.

def _typing_error(fn, *args) -> str:
    with pytest.raises(TypingError) as ei:
        fn(*args)
    msg = str(ei.value)
    assert "NumbaTypeError" in msg
    return msg


@pytest.mark.parametrize("order", ["release", "acq_rel"])
def test_load_rejects_release_orderings(order):
    @numba.njit
    def f(a):
        return A.load(a, 0, order)
    msg = _typing_error(f, np.zeros(2, np.int64))
    assert f"atomics.load: ordering {order!r} is not allowed here" in msg


@pytest.mark.parametrize("order", ["acquire", "acq_rel"])
def test_store_rejects_acquire_orderings(order):
    @numba.njit
    def f(a):
        A.store(a, 0, 1, order)
    msg = _typing_error(f, np.zeros(2, np.int64))
    assert f"atomics.store: ordering {order!r} is not allowed here" in msg


def test_fence_rejects_relaxed():
    @numba.njit
    def f():
        A.fence("relaxed")
    assert "atomics.fence: ordering 'relaxed' is not allowed here" in _typing_error(f)


def test_unknown_ordering_is_rejected():
    @numba.njit
    def f(a):
        return A.cas(a, 0, 0, 1, "sequential")
    assert "atomics.cas: ordering 'sequential' is not allowed here" in _typing_error(f, np.zeros(2, np.int64))


def test_non_literal_ordering_is_rejected():
    @numba.njit
    def f(a, order):
        return A.load(a, 0, order)
    msg = _typing_error(f, np.zeros(2, np.int64), "acquire")
    assert "atomics.load: the ordering must be a string literal" in msg


@numba.njit
def j_fetch_add_any(a):
    return A.fetch_add(a, 0, 1, "seq_cst")


@pytest.mark.parametrize("array,problem", [
    (np.zeros(4, np.float64), "expected a 1-D int64 or uint64 array, got array(float64, 1d, C)"),
    (np.zeros(4, np.int32), "expected a 1-D int64 or uint64 array, got array(int32, 1d, C)"),
    (np.zeros((2, 2), np.int64), "expected a 1-D int64 or uint64 array, got array(int64, 2d, C)"),
    (np.zeros(8, np.int64)[::2], "the array must be C-contiguous"),
], ids=["float64", "int32", "2-D", "strided"])
def test_bad_arrays_are_rejected(array, problem):
    assert f"atomics.fetch_add: {problem}" in _typing_error(j_fetch_add_any, array)


def test_read_only_array_is_rejected():
    a = np.zeros(4, np.int64)
    a.flags.writeable = False
    assert "atomics.fetch_add: the array is read-only" in _typing_error(j_fetch_add_any, a)


# --------------------------------------------------------------------------
# Emitted assembly.

def _asm(dispatcher, *args) -> str:
    dispatcher(*args)
    sig = dispatcher.signatures[0]
    return re.sub(r"\s+", " ", dispatcher.inspect_asm(sig))


@numba.njit
def asm_fetch_add(a, v):
    return A.fetch_add(a, 1, v, "seq_cst")      # result used: must be xadd, not `lock add`


@numba.njit
def asm_cas(a, e, v):
    return A.cas(a, 1, e, v, "acq_rel")


@numba.njit
def asm_exchange(a, v):
    return A.exchange(a, 1, v, "seq_cst")


@numba.njit
def asm_fetch_or(a, v):
    return A.fetch_or(a, 1, v, "seq_cst")


@numba.njit
def asm_fetch_and(a, v):
    return A.fetch_and(a, 1, v, "seq_cst")


@numba.njit
def asm_pause():
    A.pause()


@numba.njit
def asm_fence():
    A.fence("seq_cst")


@x86_only
@pytest.mark.parametrize("fn,args,pattern", [
    (asm_fetch_add, (1,), r"lock xadd[qlwb]? "),
    (asm_cas, (0, 1), r"lock cmpxchg[qlwb]? "),
    (asm_exchange, (5,), r"(?<!cmp)xchg[qlwb]? "),
    # A fetch_or/fetch_and whose result is used has no x86 instruction of its
    # own: LLVM emits a `lock cmpxchg` loop (or `lock or`/`lock and` if it can).
    (asm_fetch_or, (4,), r"lock (or|cmpxchg)[qlwb]? "),
    (asm_fetch_and, (4,), r"lock (and|cmpxchg)[qlwb]? "),
    (asm_pause, (), r"\bpause\b"),
    (asm_fence, (), r"\bmfence\b|lock or[qlwb]? "),
], ids=["fetch_add", "cas", "exchange", "fetch_or", "fetch_and", "pause", "fence"])
def test_emitted_assembly(fn, args, pattern):
    a = np.arange(4, dtype=np.int64)
    asm = _asm(fn, *((a,) + args if args else ()))
    assert re.search(pattern, asm), f"{fn.__name__}: no {pattern!r} in the assembly"


# --------------------------------------------------------------------------
# Two processes, one word of one segment.

N_ADDS = 1_000_000
BARRIER_WORD = 512 // 8        # beyond the 256-byte header, each on its own cache line
COUNTER_WORD = 1024 // 8
TIMES_WORD = 1536 // 8         # a count, then (start, end) of each child's loop


def _run_children(ctx, target, args, n=2, timeout=120):
    procs = [ctx.Process(target=target, args=args) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)         # hang guard only
        assert [p.exitcode for p in procs] == [0] * n
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def _counter_segment():
    seg = Segment.create(kind=L.KIND_BLOB, size=4096)
    assert seg.w[BARRIER_WORD] == seg.w[COUNTER_WORD] == seg.w[TIMES_WORD] == 0
    return seg


def _overlap_ms(seg):
    """How long the two children's loops ran at the same time (the scheduler decides)."""
    (a0, a1), (b0, b1) = seg.w[TIMES_WORD + 1:TIMES_WORD + 5].reshape(2, 2).tolist()
    return max(0, min(a1, b1) - max(a0, b0)) / 1e6


def test_two_processes_fetch_add_lose_nothing(ctx):
    seg = _counter_segment()
    try:
        _run_children(ctx, FW.count, (seg.name, BARRIER_WORD, COUNTER_WORD, N_ADDS, "atomic", TIMES_WORD))
        assert seg.w[BARRIER_WORD] == 2                 # both really met at the barrier
        assert seg.w[TIMES_WORD] == 2
        assert seg.w[COUNTER_WORD] == 2 * N_ADDS
        # Not asserted (timing): whether the loops contended at all.
        print(f"fetch_add, 2 processes x {N_ADDS}: loops overlapped for {_overlap_ms(seg):.2f} ms")
    finally:
        seg.close()
        seg.unlink()


@pytest.mark.parametrize("mode", ["plain", "split"])
def test_lost_update_control(mode):
    """Informational: non-atomic increments from two processes lose updates.

    ``plain`` is ``a[i] += 1`` in a loop, which LLVM folds into one ``add n``,
    so it rarely loses anything; ``split`` is an atomic load then an atomic
    store, which races on every iteration. Neither is asserted, only reported
    (a skip says so when no update was lost).
    """
    import multiprocessing as mp
    seg = _counter_segment()
    try:
        _run_children(mp.get_context("fork"), FW.count,
                      (seg.name, BARRIER_WORD, COUNTER_WORD, N_ADDS, mode, TIMES_WORD))
        final = int(seg.w[COUNTER_WORD])
        overlap = _overlap_ms(seg)
    finally:
        seg.close()
        seg.unlink()
    assert 0 < final <= 2 * N_ADDS
    info = (f"{mode} non-atomic increments, 2 processes x {N_ADDS}: ended at {final} "
            f"({2 * N_ADDS - final} updates lost; loops overlapped for {overlap:.2f} ms)")
    print(info)
    if final == 2 * N_ADDS:
        pytest.skip(f"info: {info}: no loss this run (the race is real, a loss is not guaranteed)")


# --------------------------------------------------------------------------
# kernels.syscalls

@numba.njit
def j_futex_wait(a, i, expected, timeout_ns):
    return S.futex_wait(a, i, expected, timeout_ns)


@numba.njit
def j_futex_wake(a, i, n):
    return S.futex_wake(a, i, n)


@numba.njit
def j_monotonic_ns():
    return S.monotonic_ns()


@numba.njit
def j_sched_yield():
    S.sched_yield()
    return 1


needs_futex = pytest.mark.skipif(not S.HAVE_FUTEX, reason="no futex on this platform")


@needs_futex
def test_futex_wake_without_waiter_returns_0():
    a = np.zeros(4, np.int64)
    assert S.futex_wake(a, 1, 1) == 0
    assert S.futex_wake(a, 1, 1 << 30) == 0
    assert j_futex_wake(a, 1, 1) == 0


@needs_futex
@pytest.mark.parametrize("impl", ["interp", "jit"])
def test_futex_wait_on_changed_value_returns_at_once(impl):
    a = np.zeros(4, np.int64)
    a[2] = 5
    timeout = 30_000_000_000        # a wait that actually slept would take this long
    t0 = time.monotonic()
    if impl == "interp":
        assert S.futex_wait(a, 2, 4, timeout) == -1
        assert ctypes.get_errno() == errno.EAGAIN
    else:
        assert j_futex_wait(a, 2, 4, timeout) == -1
    assert time.monotonic() - t0 < timeout / 2e9


@needs_futex
@pytest.mark.parametrize("impl", ["interp", "jit"])
def test_futex_wait_times_out(impl):
    a = np.zeros(4, np.int64)
    t0 = time.monotonic_ns()
    r = (S.futex_wait if impl == "interp" else j_futex_wait)(a, 1, 0, 50_000_000)
    elapsed = time.monotonic_ns() - t0
    assert r == -1
    if impl == "interp":
        assert ctypes.get_errno() == errno.ETIMEDOUT
    assert elapsed >= 40_000_000


@needs_futex
@pytest.mark.parametrize("waker", ["interp", "jit"])
def test_futex_wake_wakes_a_parked_child(ctx, waker):
    word, result = 512 // 8, 1024 // 8
    seg = Segment.create(kind=L.KIND_BLOB, size=4096)
    p = ctx.Process(target=FW.futex_parker, args=(seg.name, word, result, 60_000_000_000))
    try:
        p.start()
        wake = S.futex_wake if waker == "interp" else j_futex_wake
        deadline = time.monotonic() + 60        # hang guard
        woke = 0
        while woke == 0 and time.monotonic() < deadline and p.is_alive():
            woke = wake(seg.w, word, 1)         # 1 once the child is parked and we woke it
            if woke == 0:
                time.sleep(0.001)
        p.join(60)
        assert woke == 1
        assert p.exitcode == 0
        assert seg.w[result] == 100             # the child's futex_wait returned 0: woken, not timed out
    finally:
        if p.is_alive():
            p.kill()
            p.join()
        seg.close()
        seg.unlink()


def test_monotonic_ns_is_the_interpreters_clock():
    j_monotonic_ns()                            # compile first
    for _ in range(100):
        t0 = time.monotonic_ns()
        t = j_monotonic_ns()
        t1 = time.monotonic_ns()
        assert t0 <= t <= t1                    # one clock: exact containment, no tolerance
    t0 = time.monotonic_ns()
    assert t0 <= S.monotonic_ns() <= time.monotonic_ns()


def test_sched_yield():
    assert S.sched_yield() is None
    assert j_sched_yield() == 1


# --------------------------------------------------------------------------
# kernels.memory.copy

@numba.njit
def j_copy(dst, doff, src, soff, n):
    return M.copy(dst, doff, src, soff, n)


SRC = np.arange(1, 17, dtype=np.uint8)


IN_RANGE = [(0, 0, 16), (0, 0, 0), (3, 5, 7), (15, 0, 1), (0, 15, 1), (16, 16, 0), (8, 0, 8)]
BAD_RANGES = [
    (0, 0, -1), (0, 0, -(2**63)), (-1, 0, 1), (0, -1, 1), (13, 0, 4), (0, 13, 4), (16, 0, 1),
    (0, 16, 1), (0, 0, 17), (17, 0, 0), (0, 17, 0), (-(2**63), 0, 0),
]


@pytest.mark.parametrize("impl", ["interp", "jit"])
def test_copy_in_range(impl):
    copy = M.copy if impl == "interp" else j_copy
    for doff, soff, n in IN_RANGE:
        dst = np.zeros(16, np.uint8)
        assert copy(dst, doff, SRC, soff, n) == n, (doff, soff, n)
        expected = np.zeros(16, np.uint8)
        expected[doff:doff + n] = SRC[soff:soff + n]
        assert dst.tolist() == expected.tolist(), (doff, soff, n)


@pytest.mark.parametrize("impl", ["interp", "jit"])
def test_copy_refuses_bad_ranges(impl):
    copy = M.copy if impl == "interp" else j_copy
    for doff, soff, n in BAD_RANGES:
        dst = np.full(16, 0xEE, np.uint8)
        assert copy(dst, doff, SRC, soff, n) == -1, (doff, soff, n)
        assert (dst == 0xEE).all(), (doff, soff, n)     # nothing copied


# Ranges whose end overflows int64: doff + n wraps negative inside njit.
OVERFLOWING = [(2**62, 2**62, 2**62), (1, 1, 2**63 - 1)]


def test_copy_refuses_overflowing_ranges_interp():
    for doff, soff, n in OVERFLOWING:
        dst = np.full(16, 0xEE, np.uint8)
        assert M.copy(dst, doff, SRC, soff, n) == -1
        assert (dst == 0xEE).all()


def _copy_in_child(doff, soff, n):
    import faulthandler
    import resource
    faulthandler.disable()                              # pytest's handler would dump a traceback
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # a crash here must not leave a core file
    dst = np.full(16, 0xEE, np.uint8)
    r = j_copy(dst, doff, SRC, soff, n)
    raise SystemExit(0 if r == -1 and (dst == 0xEE).all() else 1)


@pytest.mark.parametrize("doff,soff,n", OVERFLOWING)
def test_copy_refuses_overflowing_ranges_jit(doff, soff, n):
    import multiprocessing as mp
    j_copy(np.zeros(16, np.uint8), 0, SRC, 0, 1)       # compile here, not in the child
    p = mp.get_context("fork").Process(target=_copy_in_child, args=(doff, soff, n))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        p.join()
    assert p.exitcode == 0, f"child exit code {p.exitcode} (negative: killed by that signal)"


@pytest.mark.parametrize("dst,src,problem", [
    (np.zeros(16, np.int64), SRC, "dst must be a 1-D C-contiguous uint8 array"),
    (np.zeros(16, np.uint8), np.zeros(32, np.uint8)[::2], "src must be a 1-D C-contiguous uint8 array"),
    (np.zeros((4, 4), np.uint8), SRC, "dst must be a 1-D C-contiguous uint8 array"),
], ids=["int64-dst", "strided-src", "2-D-dst"])
def test_copy_rejects_bad_arrays_at_compile_time(dst, src, problem):
    assert f"memory.copy: {problem}" in _typing_error(j_copy, dst, 0, src, 0, 1)
