"""MsgpackCodec and MsgspecCodec put the same bytes on the wire.

The wire is MessagePack whichever package writes it, so a producer on either codec
can feed workers decoding with either. Property-generated values of every type
fanout encodes itself are packed by both codecs and the bytes compared, datetimes
and dates (which msgspec would write its own way) included; types msgspec knows
but fanout does not list (sets, Decimal, UUID) are refused by both. What neither
takes fails with the same message.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import msgpack
import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fanout

MSGPACK, MSGSPEC = fanout.MsgpackCodec(), fanout.MsgspecCodec()

# Every width change of MessagePack's integer, string, binary, array and map formats.
INT_EDGES = [
    0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
    -1, -31, -32, -33, -127, -128, -129, -32767, -32768, -32769,
    -(2**31) + 1, -(2**31), -(2**31) - 1, -(2**63) + 1, -(2**63),
]  # fmt: skip
SIZE_EDGES = [0, 1, 15, 16, 31, 32, 255, 256, 65535, 65536]

ints = st.integers(-(2**63), 2**64 - 1) | st.sampled_from(INT_EDGES)
texts = st.text() | st.sampled_from(SIZE_EDGES).map(lambda n: "é" * (n // 2) + "x" * (n % 2))
binaries = st.binary() | st.sampled_from(SIZE_EDGES).map(bytes)
scalars = (
    st.none()
    | st.booleans()
    | ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | texts
    | binaries
)
arrays = hnp.arrays(
    dtype=hnp.integer_dtypes()
    | hnp.unsigned_integer_dtypes()
    | hnp.floating_dtypes()
    | hnp.boolean_dtypes()
    | hnp.complex_number_dtypes()
    | hnp.byte_string_dtypes()
    | hnp.unicode_string_dtypes(),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
)
keys = texts | ints | binaries
values = st.recursive(
    scalars | arrays,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=5).map(tuple)
        | st.dictionaries(keys, inner, max_size=5)
    ),
    max_leaves=20,
)


def nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def same_bytes(obj: Any) -> bytes:
    packed = MSGPACK.pack(obj)
    assert MSGSPEC.pack(obj) == packed, obj
    return packed


@settings(max_examples=400, deadline=None)
@given(values)
def test_every_supported_value_packs_to_the_same_bytes(obj: Any) -> None:
    same_bytes(obj)


@settings(max_examples=100, deadline=None)
@given(values, values, st.integers(0, 2**63 - 1))
def test_notifications_encode_to_the_same_payload(old: Any, new: Any, t_ns: int) -> None:
    for n in (fanout.Update(old, new), fanout.Update(new, new), fanout.Add(old, True)):
        assert MSGSPEC.encode(n, t_ns) == MSGPACK.encode(n, t_ns)
    note, stamp = MSGSPEC.decode(MSGPACK.encode(fanout.Add(old, False), t_ns))
    assert stamp == t_ns and note.is_in_initial_list is False  # type: ignore[union-attr]


@pytest.mark.parametrize("n", [*SIZE_EDGES, 65537])
def test_containers_at_every_size_boundary(n: int) -> None:
    same_bytes(list(range(n)))
    same_bytes({str(i): i for i in range(n)})


@given(arrays)
@settings(max_examples=200, deadline=None)
def test_arrays_decode_alike_through_either_codec(arr: np.ndarray) -> None:
    packed = same_bytes(arr)
    for codec in (MSGPACK, MSGSPEC):
        got = codec.unpack(packed)
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert got.tobytes() == np.ascontiguousarray(arr).tobytes()


def test_numpy_scalars_travel_as_plain_numbers() -> None:
    for value in (np.int64(-5), np.uint64(2**64 - 1), np.float32(1.5), np.bool_(True)):
        same_bytes(value)


AWARE = dt.datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=dt.timezone.utc)
NAIVE = dt.datetime(2024, 5, 1, 12, 30, 15, 123456)
DAY = dt.date(2024, 5, 1)


@pytest.mark.parametrize("value", [AWARE, NAIVE, DAY], ids=["aware", "naive", "date"])
def test_datetimes_and_dates_pack_alike_and_come_back_as_themselves(value: Any) -> None:
    """msgspec would write them itself (a timestamp, or ISO text a handler would get
    as a str): MsgspecCodec hands them to msgpack, so both send fanout's ext 2 and 3."""
    packed = same_bytes({"at": [value], "n": 1})
    for codec in (MSGPACK, MSGSPEC):
        assert codec.unpack(packed) == {"at": [value], "n": 1}


@pytest.mark.parametrize(
    "value",
    [
        [AWARE],
        {"a": {"b": [DAY, np.arange(3)]}},
        {(1, 2): NAIVE},
        np.float64(2.5),
        {"k": np.int32(7)},
        fanout.Add,  # a type: refused by both alike
        nested(100, DAY),  # deeper than MsgspecCodec looks
    ],
    ids=["nested", "deep-mix", "tuple-key", "np-scalar", "np-scalar-in-dict", "type", "deep"],
)
def test_whatever_msgspec_does_not_encode_plainly_is_packed_as_msgpack_packs_it(
    value: Any,
) -> None:
    try:
        expected: Any = MSGPACK.pack(value)
    except TypeError as exc:
        with pytest.raises(TypeError) as info:
            MSGSPEC.pack(value)
        assert str(info.value) == str(exc)
        return
    assert MSGSPEC.pack(value) == expected


@pytest.mark.parametrize(
    "value",
    [2**64, -(2**63) - 1, [1, {"deep": (2**70,)}], 1j, object(), np.array([object()])],
    ids=["2**64", "-2**63-1", "nested-int", "complex", "object", "object-array"],
)
def test_what_neither_codec_takes_fails_with_the_same_message(value: Any) -> None:
    errors = []
    for codec in (MSGPACK, MSGSPEC):
        with pytest.raises(TypeError) as info:
            codec.pack(value)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert errors[0].startswith("cannot encode ")


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        frozenset({3}),
        decimal.Decimal("1.5"),
        uuid.UUID(int=5),
        dt.time(1),
        dt.timedelta(1),
    ],
    ids=["set", "frozenset", "decimal", "uuid", "time", "timedelta"],
)
def test_types_msgspec_knows_but_fanout_does_not_list_are_refused_by_both(value: Any) -> None:
    """msgspec would encode these itself (sets as arrays, the rest as text), where
    msgpack refuses them: both codecs take the same objects, so both refuse."""
    errors = []
    for codec in (MSGPACK, MSGSPEC):
        with pytest.raises(TypeError, match="cannot encode an object of type") as info:
            codec.pack({"v": [value]})
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_ext_values_of_either_package_pack_alike() -> None:
    for ext in (msgpack.ExtType(70, b"abc"), msgspec.msgpack.Ext(70, b"abc")):
        same_bytes({"e": ext})


NOT_PLAIN = [
    {"at": DAY},
    [1, (2, {3: NAIVE})],
    {1.5: "float key"},
    {None: 1},
    bytearray(b"x"),
    {"s": {1}},
    np.float64(1.0),
    nested(65, 1),
]


@settings(max_examples=200, deadline=None)
@given(values)
def test_the_native_walk_and_its_twin_agree(obj: Any) -> None:
    native = pytest.importorskip("fanout.native._ring")
    from fanout.native import _ring_py

    leaves = (msgspec.msgpack.Ext, np.ndarray)
    for value in (obj, *NOT_PLAIN, nested(64, 1), {"a": [obj]}):
        want = _ring_py.plain(value, 64, leaves)
        assert native.plain(value, 64, leaves) is want, value
    assert all(not _ring_py.plain(v, 64, leaves) for v in NOT_PLAIN)
    assert _ring_py.plain(nested(64, 1), 64, leaves)


# What the one-pass packer gives up on: the walk and msgspec then take it (and
# raise for the first three, as msgspec does).
NOT_PACKED = [2**64, -(2**63) - 1, "\ud800", [np.int8(1)], {1.5: 1}, nested(65, 1)]


@settings(max_examples=300, deadline=None)
@given(values)
def test_the_one_pass_packer_and_its_twin_write_msgpacks_bytes(obj: Any) -> None:
    native = pytest.importorskip("fanout.native._ring")
    from fanout.native import _ring_py

    edges = [*INT_EDGES, *SIZE_EDGES, 0.0, -0.0, float("nan"), float("-inf"), True, False]
    for value in (obj, {"a": [obj]}, edges, nested(64, 1), *NOT_PACKED):
        want = _ring_py.pack_plain(value, 64)
        assert native.pack_plain(value, 64) == want, value
        refused = any(value is v for v in NOT_PACKED)
        assert (want is None) == (refused or not _ring_py.plain(value, 64, ()))
        if want is not None:
            assert want == msgpack.packb(value, use_bin_type=True) == MSGPACK.pack(value)


@pytest.mark.parametrize("n", [*SIZE_EDGES, 65537])
def test_the_one_pass_packer_writes_every_size_boundary(n: int) -> None:
    native = pytest.importorskip("fanout.native._ring")
    for value in (list(range(n)), {str(i): i for i in range(n)}, "é" * n, b"x" * n):
        assert native.pack_plain(value, 64) == msgpack.packb(value, use_bin_type=True)
