"""numpy dtypes on the wire, and arrays rebuilt over raw bytes without a copy.

A frame describes an array's dtype with plain MessagePack values (``dtype_to_wire``)
so that the other side rebuilds it exactly (``dtype_from_wire``), structured dtypes
included; numpy is imported only when an array is met.
"""

from __future__ import annotations

from typing import Any

__all__ = ["array_over", "dtype_from_wire", "dtype_to_wire"]


def dtype_to_wire(dt: Any) -> Any:
    """A numpy dtype as plain MessagePack values that ``dtype_from_wire`` rebuilds exactly.

    A plain dtype is its ``str`` (``"<f8"``); a structured one (``"|V12"`` as a
    ``str``, its fields lost) is a map of names, formats (recursively), offsets,
    itemsize, alignment and titles; a subarray field is ``[base, shape]``.
    """
    if dt.fields is None:
        if dt.subdtype is not None:
            base, shape = dt.subdtype
            return [dtype_to_wire(base), list(shape)]
        return dt.str
    names = list(dt.names)
    fields = [dt.fields[name] for name in names]
    wire = {
        "names": names,
        "formats": [dtype_to_wire(f[0]) for f in fields],
        "offsets": [f[1] for f in fields],
        "itemsize": dt.itemsize,
        "aligned": dt.isalignedstruct,
    }
    if any(len(f) > 2 for f in fields):
        wire["titles"] = [f[2] if len(f) > 2 else None for f in fields]
    return wire


def dtype_from_wire(wire: Any) -> Any:
    """The numpy dtype ``dtype_to_wire`` described."""
    import numpy as np

    if type(wire) is str:
        return np.dtype(wire)
    if type(wire) is list:
        return np.dtype((dtype_from_wire(wire[0]), tuple(wire[1])))
    spec: Any = dict(wire)
    aligned = spec.pop("aligned", False)
    spec["formats"] = [dtype_from_wire(f) for f in spec["formats"]]
    return np.dtype(spec, align=aligned)


def array_over(raw: Any, dtype: Any, shape: Any, fortran: bool) -> Any:
    """An array of ``dtype`` and ``shape`` over the buffer ``raw`` (no copy)."""
    import numpy as np

    count = 1
    for dim in shape:
        count *= dim
    arr = np.frombuffer(raw, dtype=dtype, count=count)
    return arr.reshape(shape, order="F" if fortran else "C")
