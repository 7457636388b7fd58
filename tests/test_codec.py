"""shm.codec: every codec round-trips what it promises and refuses the rest cleanly.

A message goes through ``encode`` (what a channel writes: a bytes-like
message of the codec's kind, or a kind and buffers whose concatenation is
the message) and comes back through ``decode(kind, buffer)``. Refusals are typed: ``EncodeError`` (a TypeError)
when sending, ``DecodeError`` (a ValueError) when receiving, never a crash,
and pickle data is only ever unpickled by the pickle codec.
"""
from __future__ import annotations

import math
import pickle
import struct
import threading

import numpy as np
import pytest

import shm
from shm import codec as C
from shm.errors import DecodeError, EncodeError

CODEC_NAMES = ["bytes", "msgpack", "pickle", "numpy"]


def _part_bytes(part) -> bytes:
    if isinstance(part, np.ndarray):
        assert part.flags.c_contiguous            # a channel copies array parts as raw bytes
        return part.reshape(-1).view(np.uint8).tobytes()
    return bytes(part)


def wire(codec, obj):
    """(kind, payload bytes) as a channel carries them.

    ``encode`` returns a bytes-like message of the codec's default kind, or
    ``(kind, [buffers])`` whose concatenation is the message.
    """
    enc = codec.encode(obj)
    if isinstance(enc, tuple):
        kind, parts = enc
        return kind, b"".join(_part_bytes(p) for p in parts)
    return codec.kind, bytes(enc)


def expect(exc, case, fn, *args):
    """Call ``fn(*args)``; fail, naming ``case``, unless it raises ``exc``. Returns the exception."""
    try:
        fn(*args)
    except exc as e:
        return e
    except Exception as e:          # noqa: BLE001 - reported as the failure
        pytest.fail(f"{case}: raised {type(e).__name__} ({e}), not {exc.__name__}")
    pytest.fail(f"{case}: did not raise {exc.__name__}")


def round_trip(codec, obj):
    kind, payload = wire(codec, obj)
    return codec.decode(kind, payload)


# --------------------------------------------------------------------------
# Round trips of ordinary values.

SCALARS = [
    None, True, False, 0, 1, -1, 2**31, 2**63 - 1, -2**63, 2**64 - 1, 0.0, -0.0, 1.5, -2.25e-300,
    1e308, math.inf, -math.inf, "", "x", "h\u00e9llo \u2603 \U0001F600", "a\0b", b"", b"\0\xff" * 100,
]
CONTAINERS = [
    [], {}, [1, [2, [3, [4, []]]]], {"a": 1, "b": [1, 2, {"c": None}], "d": {"e": {"f": b"g"}}},
    {1: "int key", 2.5: "float key", None: "nil key", False: "bool key"},
    ["mixed", 1, 2.0, None, True, b"raw", {"k": []}], list(range(1000)), {str(i): i for i in range(300)},
    "long string " * 10_000, b"\x01" * 100_000,
]


def _same(a, b):
    """Equality that also tells 0.0 from -0.0, True from 1 and bytes from str, recursively."""
    if isinstance(a, float) and isinstance(b, float):
        return math.copysign(1, a) == math.copysign(1, b) and (a == b or (math.isnan(a) and math.isnan(b)))
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("name", ["msgpack", "pickle", "numpy"])
def test_round_trip_values(name):
    codec = C.get_codec(name)
    for obj in SCALARS + CONTAINERS:
        assert _same(round_trip(codec, obj), obj), (name, repr(obj)[:80])
    assert math.isnan(round_trip(codec, math.nan))


def test_msgpack_turns_tuples_into_lists():
    # Documented: msgpack has one array type, so a tuple comes back as a list
    # (nested ones too). Use codec="pickle" to keep tuples.
    codec = C.get_codec("msgpack")
    assert round_trip(codec, (1, (2, 3), [4, (5,)])) == [1, [2, 3], [4, [5]]]
    assert type(round_trip(codec, ())) is list
    assert round_trip(C.get_codec("pickle"), (1, (2, 3))) == (1, (2, 3))


def test_msgpack_bytes_like_come_back_as_bytes():
    codec = C.get_codec("msgpack")
    assert round_trip(codec, bytearray(b"abc")) == b"abc"
    assert round_trip(codec, memoryview(b"abc")) == b"abc"


class Point:
    """A module-level class: picklable."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


def test_pickle_round_trips_any_picklable_object():
    codec = C.get_codec("pickle")
    rec = [1, 2]
    rec.append(rec)
    objs = [(1, "a"), {1, 2}, frozenset({3}), 3 + 4j, Point(1, [2]), 2**200, -2**200, slice(1, 9, 2),
            np.arange(6).reshape(2, 3), bytearray(b"x"), range(5)]
    for obj in objs:
        out = round_trip(codec, obj)
        assert type(out) is type(obj)
        if isinstance(obj, np.ndarray):
            assert np.array_equal(out, obj)
        else:
            assert out == obj
    out = round_trip(codec, rec)
    assert out[2] is out                                  # recursive structures survive


def test_bytes_codec_round_trip():
    codec = C.get_codec("bytes")
    for obj in (b"", b"abc", bytearray(b"\0\1\2"), memoryview(b"xyz"), np.arange(10, dtype=np.uint8),
                np.arange(6, dtype=np.int32).reshape(2, 3), memoryview(np.arange(4, dtype=np.float64))):
        out = round_trip(codec, obj)
        assert type(out) is bytes
        assert out == bytes(memoryview(obj).cast("B")), repr(obj)


# --------------------------------------------------------------------------
# Unencodable objects.

def _encode_error(codec_name, obj):
    e = expect(EncodeError, f"{codec_name} codec, {type(obj).__name__}", C.get_codec(codec_name).encode, obj)
    assert isinstance(e, TypeError) and isinstance(e, shm.ShmError) and isinstance(e, shm.EncodeError)
    return str(e)


def test_msgpack_refuses_what_it_cannot_encode():
    for obj in ({1, 2}, object(), [1, {"a": {2}}], 2**64, -2**63 - 1, np.int64(5)):
        msg = _encode_error("msgpack", obj)
        assert "'msgpack' codec" in msg
        assert "codec='pickle'" in msg                     # the fix


def test_msgpack_encoder_is_usable_after_a_refusal():
    # A failed pack must not leave half an object in the packer's buffer.
    codec = C.get_codec("msgpack")
    with pytest.raises(EncodeError):
        codec.encode(["a" * 100, 1, 2, {3}])
    assert bytes(codec.encode(5)) == b"\x05"
    assert codec.decode(C.K_MSGPACK, bytes(codec.encode([1, "x"]))) == [1, "x"]


def test_pickle_refuses_unpicklable_objects():
    for obj in (lambda: 1, threading.Lock(), (i for i in range(3))):
        msg = _encode_error("pickle", obj)
        assert "'pickle' codec" in msg and "make it picklable" in msg


def test_bytes_codec_refuses_non_buffers():
    for obj in ("a str", 5, None, [b"in a list"]):
        msg = _encode_error("bytes", obj)
        assert "'bytes' codec" in msg and "codec='msgpack' or 'pickle'" in msg


def test_bytes_codec_refuses_non_contiguous_buffers():
    msg = _encode_error("bytes", memoryview(np.arange(10, dtype=np.uint8))[::2])
    assert "'bytes' codec" in msg and "bytes(obj)" in msg


def test_numpy_codec_refuses_object_arrays():
    msg = _encode_error("numpy", np.array([1, "a", None], dtype=object))
    assert "dtype=object" in msg and "codec='pickle'" in msg


def test_numpy_codec_object_array_error_names_the_codec():
    assert "'numpy'" in _encode_error("numpy", np.array([object()], dtype=object))


def test_numpy_codec_refuses_what_msgpack_cannot_encode():
    msg = _encode_error("numpy", {1, 2})
    assert "codec='pickle'" in msg


# --------------------------------------------------------------------------
# numpy arrays.

DTYPES = [
    np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128, ">i4", ">f8", "<U7", "S5",
    "datetime64[ns]", "datetime64[D]", "timedelta64[ms]",
    np.dtype([("a", "<i4"), ("b", "<f8", (2,)), ("c", "S3")]),
    np.dtype([("x", "u1"), ("y", "<i8")], align=True),                        # with padding
    np.dtype({"names": ["p", "q"], "formats": ["<i2", "<f4"], "offsets": [0, 8], "itemsize": 16}),
    np.dtype([("outer", [("inner", "<i2"), ("z", "?")]), ("w", "<c8")]),      # nested
]


def _sample(dtype, shape):
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    raw = np.random.default_rng(abs(hash(dtype.str)) % 2**32).integers(0, 256, n * dtype.itemsize, np.uint8)
    if dtype.kind in "fc":
        a = (np.arange(n) * 1.25 - 3).astype(dtype)
        if n > 2:
            a[1] = np.nan
            a[2] = -np.inf
    elif dtype.kind == "U":
        a = np.array([f"\u00e9{i}x" for i in range(n)], dtype)
    elif dtype.kind in "Mm":
        a = np.arange(n).astype(dtype)
        if n > 1:
            a[1] = np.datetime64("NaT") if dtype.kind == "M" else np.timedelta64("NaT")
    elif dtype.kind == "b":
        a = (np.arange(n) % 3 == 0).astype(dtype)
    else:
        a = raw.view(dtype)[:n].copy()          # any bit pattern, padding included
    return a.reshape(shape)


def _assert_same_array(out, arr):
    what = f"{arr.dtype} {arr.shape}"
    assert isinstance(out, np.ndarray), what
    assert (out.dtype, out.shape) == (arr.dtype, arr.shape), what
    assert out.tobytes() == np.ascontiguousarray(arr).tobytes(), what


@pytest.mark.parametrize("name", ["numpy", "pickle"])
def test_numpy_dtypes_round_trip(name):
    codec = C.get_codec(name)
    for dtype in DTYPES:
        for shape in ((7,), (0,), (3, 0, 2), (2, 3, 4)):
            arr = _sample(dtype, shape)
            _assert_same_array(round_trip(codec, arr), arr)


def test_numpy_codec_sends_arrays_raw():
    codec = C.get_codec("numpy")
    arr = np.arange(5, dtype=np.int32)
    kind, parts = codec.encode(arr)
    assert kind == C.K_NDARRAY
    head = parts[0]
    assert len(head) % 16 == 0                            # the array data starts 16-byte aligned
    assert b"".join(_part_bytes(p) for p in parts)[len(head):] == arr.tobytes()
    enc = codec.encode([1, 2])                            # anything else: msgpack, the default kind
    assert codec.kind == C.K_MSGPACK and codec.decode(codec.kind, bytes(enc)) == [1, 2]


def test_non_contiguous_arrays_round_trip():
    arrays = [
        np.asfortranarray(np.arange(24, dtype=np.int32).reshape(2, 3, 4)),
        np.arange(60, dtype=np.float64).reshape(6, 10)[::2, ::-3],
        np.arange(20, dtype=np.int16)[3:17:4],
        np.arange(12, dtype=np.uint8).reshape(3, 4).T,
        np.broadcast_to(np.arange(3), (4, 3)),
    ]
    for name in ("numpy", "pickle"):
        for arr in arrays:
            assert not arr.flags.c_contiguous
            out = round_trip(C.get_codec(name), arr)
            _assert_same_array(out, arr)
            assert np.array_equal(out, arr)


def test_decoded_array_is_a_fresh_writable_copy():
    codec = C.get_codec("numpy")
    arr = np.arange(16, dtype=np.int64)
    kind, payload = wire(codec, arr)
    buf = bytearray(payload)
    out = codec.decode(kind, memoryview(buf))
    assert out.flags.writeable and out.flags.c_contiguous
    buf[-8:] = b"\xff" * 8                                # the receive buffer is reused...
    assert out[-1] == 15                                  # ...without changing what was received
    out[0] = 99
    assert arr[0] == 0


def test_decoding_from_an_unaligned_buffer():
    codec = C.get_codec("numpy")
    arr = np.arange(10, dtype=np.float64)
    kind, payload = wire(codec, arr)
    buf = bytearray(b"\0" + payload)
    _assert_same_array(codec.decode(kind, memoryview(buf)[1:]), arr)


def test_zero_dimensional_array_round_trips():
    # (np.ascontiguousarray turns a 0-d array into a 1-d one: easy to get wrong.)
    for name in ("numpy", "pickle"):
        for arr in (np.array(3.5), np.array(b"xy"), np.array((1, 2.0), "<i4,<f8")):
            _assert_same_array(round_trip(C.get_codec(name), arr), arr)


# --------------------------------------------------------------------------
# Kinds a codec does not accept.

class _Tripwire:
    """Unpickling this sets FIRED: proof that a payload was (or was not) unpickled."""

    def __reduce__(self):
        return (_fire, ())


FIRED = []


def _fire():
    FIRED.append(1)
    return "fired"


@pytest.mark.parametrize("name", ["msgpack", "numpy", "bytes"])
def test_pickle_payloads_are_never_unpickled_by_other_codecs(name):
    payload = pickle.dumps(_Tripwire(), protocol=5)
    FIRED.clear()
    with pytest.raises(DecodeError) as ei:
        C.get_codec(name).decode(C.K_PICKLE, payload)
    assert FIRED == []
    msg = str(ei.value)
    assert f"kind {C.K_PICKLE}" in msg and repr(name) in msg
    # Control: the pickle codec does unpickle it.
    assert C.get_codec("pickle").decode(C.K_PICKLE, payload) == "fired"
    assert FIRED == [1]


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_unaccepted_kinds_raise_decode_error(name):
    codec = C.get_codec(name)
    samples = {C.K_RAW: b"raw", C.K_MSGPACK: b"\x92\x01\x02", C.K_PICKLE: pickle.dumps(1),
               C.K_NDARRAY: wire(C.get_codec("numpy"), np.arange(3))[1], 7: b"?", 255: b""}
    for kind, payload in samples.items():
        if kind in codec.kinds:
            codec.decode(kind, payload)
            continue
        e = expect(DecodeError, f"kind {kind}", codec.decode, kind, payload)
        assert isinstance(e, ValueError) and isinstance(e, shm.ShmError)


def test_corrupt_payloads_raise_decode_error():
    for name, payload in [("msgpack", b"\xc1"), ("msgpack", b"\x92\x01"), ("msgpack", b"\x01\x02"),
                          ("numpy", b"\xdc\xff"), ("pickle", b"\x80\x05garbage"), ("pickle", b"")]:
        codec = C.get_codec(name)
        expect(DecodeError, f"{name} {payload!r}", codec.decode, codec.kind, payload)


def _head(ndim, descr: bytes, shape, version=1, data=b""):
    body = C._ND_HEAD.pack(version, ndim, len(descr), 0) + descr + struct.pack(f"<{len(shape)}q", *shape)
    return body + b"\0" * ((-len(body)) % 16) + data


CORRUPT_HEADERS = {
    "empty": b"",
    "short": b"\x01\x01",
    "version-2": _head(1, b"<i4", (1,), version=2, data=b"\0" * 4),
    "descr-cut": _head(1, b"<i4", (1,))[:10],
    "descr-not-utf8": _head(1, b"\xff\xfe", (1,), data=b"\0" * 8),
    "descr-not-a-dtype": _head(1, b"zz", (1,), data=b"\0" * 8),
    "descr-object": _head(1, b"|O", (1,), data=b"\0" * 8),
    "descr-object-field": _head(1, b"[('a', '|O')]", (1,), data=b"\0" * 8),
    "descr-code": _head(1, b"[__import__('os').getpid()]", (1,), data=b"\0" * 8),
    "descr-bad-list": _head(1, b"[1, 2]", (1,), data=b"\0" * 8),
    "negative-shape": _head(2, b"<i4", (-1, 4), data=b"\0" * 16),
    "shape-cut": _head(200, b"<i4", (1,)),
    "data-short": _head(2, b"<f8", (3, 3), data=b"\0" * 71),
    "huge-shape": _head(1, b"|u1", (2**62,), data=b"\0" * 64),
}


@pytest.mark.parametrize("name", ["numpy", "pickle"])
def test_corrupt_array_headers_raise_decode_error(name):
    codec = C.get_codec(name)
    for case, payload in CORRUPT_HEADERS.items():
        expect(DecodeError, case, codec.decode, C.K_NDARRAY, payload)


def test_array_header_with_overflowing_shape_raises_decode_error():
    with pytest.raises(DecodeError):
        C.get_codec("numpy").decode(C.K_NDARRAY, _head(2, b"|u1", (2**32, 2**32), data=b"\0" * 16))


def test_huge_structured_dtype_raises_encode_error():
    dt = np.dtype([(f"field_{i:05d}", "<i4") for i in range(4000)])
    arr = np.zeros(2, dt)
    arr["field_00007"] = 7
    try:
        out = round_trip(C.get_codec("numpy"), arr)
    except EncodeError:
        return                                # refusing it cleanly is fine too
    _assert_same_array(out, arr)


# --------------------------------------------------------------------------
# get_codec

def test_get_codec():
    for name, cls in C.CODECS.items():
        c = C.get_codec(name)
        assert type(c) is cls and c.name == name
        assert type(C.get_codec(cls.id)) is cls
        assert C.get_codec(c) is c
    assert sorted(c.id for c in C.CODECS.values()) == [0, 1, 2, 3]     # ids are stored in segments


def test_get_codec_rejects_unknown():
    for bad in ("json", "", "MSGPACK", 4, -1, None, 1.0, b"msgpack"):
        msg = str(expect(ValueError, repr(bad), C.get_codec, bad))
        assert "unknown codec" in msg and "msgpack" in msg
