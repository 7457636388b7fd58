"""Canonical bytes for SharedDict keys, so equal keys are one key in every process.

Python's dict treats ``1``, ``1.0`` and ``True`` as one key (they are equal
and hash alike), and so must a table shared by processes that do not share
``hash()`` (it is salted per process). Keys are therefore encoded to bytes
canonically, and those bytes are what is hashed and compared:

=========  =================================================================
``s``      str, as UTF-8 (lone surrogates kept with ``surrogatepass``)
``b``      bytes
``i``      int in int64 range, 8 bytes little-endian; also bool, and any
           float with an integral value in that range (so 1 == 1.0 == True)
``I``      larger ints, two's complement; also integral floats beyond int64
``f``      other floats, 8 bytes IEEE 754 (every NaN is the one canonical NaN)
``n``      None
``t``      tuple: each element's encoding prefixed by its 4-byte length
=========  =================================================================

Keys come back in canonical form: ``True`` as ``1``, ``2.0`` as ``2``.
Anything else (lists, dicts, sets, objects) is refused with a ``TypeError``
that names the fix: a mutable or arbitrary object has no stable encoding.
"""
from __future__ import annotations

import math
import struct

__all__ = ["encode_key", "decode_key", "KeyTypeError"]

_F64 = struct.Struct("<d")
_LEN = struct.Struct("<I")
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_NAN = _F64.pack(float("nan"))


class KeyTypeError(TypeError):
    """A key of a type SharedDict cannot store."""


def _int(v: int) -> bytes:
    if _I64_MIN <= v <= _I64_MAX:
        return b"i" + v.to_bytes(8, "little", signed=True)
    return b"I" + v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)


def encode_key(k) -> bytes:
    """The canonical bytes of key ``k`` (see the module docstring)."""
    t = type(k)
    if t is str:
        return b"s" + k.encode("utf-8", "surrogatepass")
    if t is int or t is bool:
        return _int(int(k))
    if t is bytes:
        return b"b" + k
    if k is None:
        return b"n"
    if t is float:
        if math.isnan(k):
            return b"f" + _NAN
        if k.is_integer():          # 1e20 == 10**20, as in a dict
            return _int(int(k))
        return b"f" + _F64.pack(k)
    if t is tuple:
        parts = [b"t"]
        for e in k:
            b = encode_key(e)
            parts.append(_LEN.pack(len(b)))
            parts.append(b)
        return b"".join(parts)
    # Subclasses (str enums, IntEnum, NamedTuple) by their base type.
    for base in (bool, int, str, bytes, float, tuple):
        if isinstance(k, base):
            return encode_key(base(k) if base is not tuple else tuple(k))
    raise KeyTypeError(
        f"SharedDict keys must be str, bytes, int, float, bool, None or tuples of these, "
        f"not {t.__name__}: convert the key (a list to a tuple, an object to a str or an id)")


def decode_key(b: bytes):
    """The key whose canonical bytes are ``b``."""
    tag = b[:1]
    if tag == b"s":
        return b[1:].decode("utf-8", "surrogatepass")
    if tag == b"i":
        return int.from_bytes(b[1:9], "little", signed=True)
    if tag == b"b":
        return b[1:]
    if tag == b"n":
        return None
    if tag == b"f":
        return _F64.unpack_from(b, 1)[0]
    if tag == b"I":
        return int.from_bytes(b[1:], "little", signed=True)
    if tag == b"t":
        out = []
        i = 1
        while i < len(b):
            (n,) = _LEN.unpack_from(b, i)
            out.append(decode_key(b[i + 4:i + 4 + n]))
            i += 4 + n
        return tuple(out)
    raise ValueError(f"not a canonical key encoding: {b[:16]!r}")
