"""Pick the ring and pump implementations: native unless told or unable.

``FANOUT_NO_EXTENSIONS=1`` (at build or run time) selects the pure-Python twins;
so does a missing or broken extension build, which ``IMPORT_ERROR`` then explains.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from fanout import _pump_py, _ring_py

IMPORT_ERROR: str | None = None
pump_impl: Any = _pump_py
ring_impl: Any = _ring_py
serve: Any = None
watch_lifeline: Any = None
guard_forks: Any = None

if os.environ.get("FANOUT_NO_EXTENSIONS", "") not in ("", "0"):
    IMPORT_ERROR = "FANOUT_NO_EXTENSIONS is set"
else:
    try:
        from fanout import _pump, _ring, _worker
    except ImportError as exc:  # built with FANOUT_NO_EXTENSIONS=1, or no compiler
        IMPORT_ERROR = f"native extensions unavailable: {exc}"
    else:
        pump_impl, ring_impl, serve = _pump, _ring, _worker.serve
        watch_lifeline, guard_forks = _worker.watch_lifeline, _worker.guard_forks

if serve is None:
    from fanout._worker_py import guard_forks, serve, watch_lifeline

NATIVE: bool = ring_impl is not _ring_py
if TYPE_CHECKING:
    # Typed through the native stubs (fanout/_ring.pyi, _pump.pyi), which
    # stubtest keeps true to the built modules; the twins share the API.
    from fanout._pump import Pump as Pump
    from fanout._ring import FrameRing as FrameRing
    from fanout._ring import Ring as Ring
    from fanout._ring import append_all as append_all
    from fanout._ring import plain as plain
else:
    Ring = ring_impl.Ring
    FrameRing = ring_impl.FrameRing
    Pump = pump_impl.Pump
    append_all = ring_impl.append_all
    plain = ring_impl.plain

__all__ = [
    "IMPORT_ERROR",
    "NATIVE",
    "FrameRing",
    "Pump",
    "Ring",
    "append_all",
    "guard_forks",
    "plain",
    "serve",
    "watch_lifeline",
]
