"""64-bit hashes that every process computes alike.

Python's ``hash()`` is salted per process (``PYTHONHASHSEED``), so a shared
table needs its own. ``hash_bytes`` is xxHash64's structure (four lanes of
multiply-rotate over 32-byte stripes, then the tail and an avalanche);
``hash_i64`` is the murmur3/splitmix finaliser of one word, for the
numeric mode's int64 keys. Both are deterministic across processes,
machines and runs; neither is meant to resist a chosen-key flood (keys
come from the program, not from an adversary).

The shared dict uses the hash's top bits to pick a shard and its low bits
to probe within it, keeping the two apart as dashmap does, so a shard's
keys still spread over its whole index.
"""
from __future__ import annotations

from ._jit import jit

P1 = -7046029288634856825          # 0x9E3779B185EBCA87 as int64
P2 = -4417276706812531889          # 0xC2B2AE3D27D4EB4F
P3 = 1609587929392839161           # 0x165667B19E3779F9
P4 = -8796714831421723037          # 0x85EBCA77C2B2AE63
P5 = 2870177450012600261           # 0x27D4EB2F165667C5
SEED = 0x5348_4D44_4943_5431       # "SHMDICT1"


@jit(inline="always")
def _rotl(x, r):
    return (x << r) | ((x >> (64 - r)) & ((1 << r) - 1))


@jit(inline="always")
def _round(acc, lane):
    acc = acc + lane * P2
    acc = _rotl(acc, 31)
    return acc * P1


@jit(inline="always")
def _merge(acc, v):
    acc = acc ^ _round(0, v)
    return acc * P1 + P4


@jit(inline="always")
def _u64(b, i):
    v = 0
    for k in range(8):
        v |= (b[i + k] & 0xFF) << (8 * k)
    return v


@jit(inline="always")
def _u32(b, i):
    v = 0
    for k in range(4):
        v |= (b[i + k] & 0xFF) << (8 * k)
    return v


@jit(inline="always")
def avalanche(h):
    h = h ^ ((h >> 33) & 0x7FFFFFFF)
    h = h * P2
    h = h ^ ((h >> 29) & 0x7FFFFFFFF)
    h = h * P3
    h = h ^ ((h >> 32) & 0xFFFFFFFF)
    return h


@jit
def hash_bytes(b, start, n):
    """xxHash64-shaped hash of ``b[start:start+n]`` (a uint8 array)."""
    i = start
    end = start + n
    if n >= 32:
        v1 = SEED + P1 + P2
        v2 = SEED + P2
        v3 = SEED
        v4 = SEED - P1
        while i + 32 <= end:
            v1 = _round(v1, _u64(b, i))
            v2 = _round(v2, _u64(b, i + 8))
            v3 = _round(v3, _u64(b, i + 16))
            v4 = _round(v4, _u64(b, i + 24))
            i += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = SEED + P5
    h = h + n
    while i + 8 <= end:
        h = h ^ _round(0, _u64(b, i))
        h = _rotl(h, 27) * P1 + P4
        i += 8
    if i + 4 <= end:
        h = h ^ (_u32(b, i) * P1)
        h = _rotl(h, 23) * P2 + P3
        i += 4
    while i < end:
        h = h ^ ((b[i] & 0xFF) * P5)
        h = _rotl(h, 11) * P1
        i += 1
    return avalanche(h)


@jit(inline="always")
def hash_i64(x):
    """A well-mixed hash of one int64 (splitmix64's finaliser)."""
    z = x + (-7046029254386353131)    # 0x9E3779B97F4A7C15
    z = (z ^ ((z >> 30) & 0x3FFFFFFFF)) * (-4658895280553007687)   # 0xBF58476D1CE4E5B9
    z = (z ^ ((z >> 27) & 0x1FFFFFFFFF)) * (-7723592293110705685)  # 0x94D049BB133111EB
    return z ^ ((z >> 31) & 0x1FFFFFFFF)
