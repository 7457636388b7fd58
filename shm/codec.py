"""How Python objects become bytes in shared memory, and back.

A channel is created with one codec and every handle reads it from the
channel's header, so both ends always agree. Each message carries a *kind*
byte in its slot, so a codec can use more than one encoding (the numpy codec
sends arrays raw and anything else as msgpack), and a receiver refuses kinds
its channel's codec does not allow: in particular pickle data is only ever
unpickled on a channel whose creator chose ``codec="pickle"`` (unpickling
runs arbitrary code, so a process that can write into a segment must not be
able to make a msgpack reader unpickle).

=========  =======  ===================================================
codec      id       what
=========  =======  ===================================================
msgpack    1        the default: safe, fast, cross-language; tuples come
                    back as lists, dict keys may be any msgpack scalar
pickle     2        any picklable object (protocol 5)
bytes      0        raw bytes-like objects, received as ``bytes``
numpy      3        ndarrays with dtype and shape (one copy into shared
                    memory, the receiver gets a fresh ndarray); other
                    objects as msgpack
=========  =======  ===================================================

An object the codec cannot encode raises ``EncodeError`` (a ``TypeError``)
naming the codec and the fix; nothing is sent and the channel stays usable.
"""
from __future__ import annotations

import ast
import functools
import math
import pickle
import struct

import msgpack
import numpy as np

from .errors import DecodeError, EncodeError

__all__ = ["Codec", "get_codec", "CODECS", "K_RAW", "K_MSGPACK", "K_PICKLE", "K_NDARRAY"]

K_RAW = 0
K_MSGPACK = 1
K_PICKLE = 2
K_NDARRAY = 3

_ND_HEAD = struct.Struct("<BBHI")   # version, ndim, dtype-descr length, reserved


class Codec:
    """Base class.

    ``encode(obj)`` returns either ``bytes`` (a message of the codec's
    default ``kind``: the channels' one-call fast path) or a tuple
    ``(kind, [buffers])`` whose concatenation is the message (the numpy
    codec's arrays: header, then the array itself, copied once into shared
    memory). ``decode(kind, buf)`` turns a message back into an object.
    """

    id = -1
    name = "?"
    kind = K_RAW
    kinds = frozenset()
    # C-level callables for the channels' fast path (exceptions are turned into
    # the codec's EncodeError/DecodeError by calling encode/decode again);
    # None where there is no faster way than encode/decode.
    fast_encode = None
    fast_decode = None

    def encode(self, obj):
        raise NotImplementedError

    def decode(self, kind, buf):
        raise NotImplementedError

    def check_kind(self, kind):
        if kind not in self.kinds:
            raise DecodeError(
                f"a message of kind {kind} arrived on a channel whose codec is {self.name!r}; "
                "it was not sent by shm with this channel's codec (or the segment is corrupt)")

    def __repr__(self):
        return f"<codec {self.name}>"


class BytesCodec(Codec):
    id = 0
    name = "bytes"
    kind = K_RAW
    kinds = frozenset({K_RAW})

    def encode(self, obj):
        if type(obj) is bytes:
            return obj
        try:
            m = memoryview(obj)
        except TypeError:
            raise EncodeError(
                f"the 'bytes' codec sends bytes-like objects only, not {type(obj).__name__}: "
                "encode it yourself, or create the channel with codec='msgpack' or 'pickle'") from None
        if not m.c_contiguous:
            raise EncodeError("the 'bytes' codec needs a C-contiguous buffer; pass bytes(obj)")
        return m.cast("B") if m.ndim != 1 or m.format != "B" else m

    def decode(self, kind, buf):
        if kind != K_RAW:
            self.check_kind(kind)
        return bytes(buf)


class MsgpackCodec(Codec):
    id = 1
    name = "msgpack"
    kind = K_MSGPACK
    kinds = frozenset({K_MSGPACK})

    def __init__(self):
        self._pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
        self.fast_encode = self._pack
        # Bare unpackb (raw=False is msgpack 1.x's default) costs half what the
        # same call with keywords does. Its strict_map_key refuses maps with
        # non-str keys; every caller of fast_decode falls back to decode()
        # on any exception, which takes them.
        self.fast_decode = msgpack.unpackb

    def encode(self, obj):
        try:
            return self._pack(obj)
        except (TypeError, ValueError, OverflowError) as e:
            raise EncodeError(
                f"the {self.name!r} codec cannot encode this {type(obj).__name__} ({e}): msgpack "
                "takes None, bool, int (64-bit), float, str, bytes, lists, tuples and dicts of "
                "those; convert it, or create the channel or SharedDict with codec='pickle' "
                "for any picklable object (or a channel with codec='numpy' for arrays)") from None

    def decode(self, kind, buf):
        if kind != K_MSGPACK:
            self.check_kind(kind)
        try:
            return msgpack.unpackb(buf, raw=False, strict_map_key=False)
        except Exception as e:
            raise DecodeError(f"a message could not be decoded as msgpack: {e}") from None


class PickleCodec(Codec):
    id = 2
    name = "pickle"
    kind = K_PICKLE
    kinds = frozenset({K_PICKLE, K_NDARRAY})
    fast_encode = staticmethod(functools.partial(pickle.dumps, protocol=5))
    fast_decode = staticmethod(pickle.loads)

    def encode(self, obj):
        try:
            return pickle.dumps(obj, protocol=5)
        except Exception as e:
            raise EncodeError(
                f"the 'pickle' codec cannot pickle this {type(obj).__name__} ({e}): "
                "make it picklable (module-level classes and functions, no open files, "
                "locks or sockets)") from None

    def decode(self, kind, buf):
        if kind == K_NDARRAY:
            return decode_ndarray(buf)
        if kind != K_PICKLE:
            self.check_kind(kind)
        try:
            return pickle.loads(buf)
        except Exception as e:
            raise DecodeError(f"a message could not be unpickled: {e}") from None


class NumpyCodec(MsgpackCodec):
    id = 3
    name = "numpy"
    kind = K_MSGPACK
    kinds = frozenset({K_MSGPACK, K_NDARRAY})

    def __init__(self):
        super().__init__()
        self.fast_encode = None      # arrays need encode()

    def encode(self, obj):
        if isinstance(obj, np.ndarray):
            head, arr = encode_ndarray(obj)
            return K_NDARRAY, [head, arr]
        return super().encode(obj)

    def decode(self, kind, buf):
        if kind == K_NDARRAY:
            return decode_ndarray(buf)
        return super().decode(kind, buf)


def _descr(dtype: np.dtype) -> bytes:
    if dtype.hasobject:
        raise EncodeError(
            "the 'numpy' codec cannot send arrays of Python objects (dtype=object) raw: "
            "use codec='pickle', or convert the array to a numeric or string dtype")
    if dtype.fields is None and dtype.subdtype is None:
        d = dtype.str.encode()
    else:
        d = repr(np.lib.format.dtype_to_descr(dtype)).encode()
    if len(d) > 0xFFFF:
        raise EncodeError(
            f"the 'numpy' codec cannot describe this dtype in 64 KiB ({len(d)} bytes of description): "
            "use codec='pickle', or fewer fields")
    return d


def encode_ndarray(arr: np.ndarray):
    """(header bytes, C-contiguous array); the header's length is a multiple of 16."""
    # (np.ascontiguousarray would turn a 0-d array into a 1-d one.)
    a = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr).reshape(arr.shape)
    descr = _descr(a.dtype)
    body = _ND_HEAD.pack(1, a.ndim, len(descr), 0) + descr + struct.pack(f"<{a.ndim}q", *a.shape)
    pad = (-len(body)) % 16
    return body + b"\0" * pad, a


def ndarray_header(buf):
    """(dtype, shape, data offset) parsed from a message made by encode_ndarray."""
    try:
        ver, ndim, dlen, _ = _ND_HEAD.unpack_from(buf, 0)
        if ver != 1:
            raise ValueError(f"array header version {ver}")
        off = _ND_HEAD.size
        descr = bytes(buf[off:off + dlen]).decode()
        off += dlen
        shape = struct.unpack_from(f"<{ndim}q", buf, off)
        off += 8 * ndim
        off += (-off) % 16
        if descr.startswith(("[", "(")):
            dtype = np.lib.format.descr_to_dtype(ast.literal_eval(descr))
        else:
            dtype = np.dtype(descr)
        if dtype.hasobject or any(s < 0 for s in shape):
            raise ValueError("bad array header")
        nbytes = math.prod(shape) * dtype.itemsize     # Python ints: cannot wrap
        if off + nbytes > len(buf):
            raise ValueError("array data shorter than its header says")
        return dtype, shape, off
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"a message could not be decoded as an array: {e}") from None


def decode_ndarray(buf):
    dtype, shape, off = ndarray_header(buf)
    out = np.empty(shape, dtype)
    if out.nbytes:
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(buf, np.uint8, out.nbytes, off)
    return out


CODECS = {"bytes": BytesCodec, "msgpack": MsgpackCodec, "pickle": PickleCodec, "numpy": NumpyCodec}
_BY_ID = {c.id: c for c in CODECS.values()}


def get_codec(codec) -> Codec:
    """A codec instance from its name (or id, or an instance)."""
    if isinstance(codec, Codec):
        return codec
    if isinstance(codec, int) and not isinstance(codec, bool) and codec in _BY_ID:
        return _BY_ID[codec]()
    if isinstance(codec, str) and codec in CODECS:
        return CODECS[codec]()
    raise ValueError(f"unknown codec {codec!r}: choose one of {sorted(CODECS)}")
