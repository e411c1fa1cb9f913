"""Pick the ring and pump implementations: native unless told or unable.

``FANOUT_NO_EXTENSIONS=1`` (at build or run time) selects the pure-Python twins;
so does a missing or broken extension build, which ``IMPORT_ERROR`` then explains.
"""

from __future__ import annotations

import os

IMPORT_ERROR: str | None = None

if os.environ.get("FANOUT_NO_EXTENSIONS", "") not in ("", "0"):
    from fanout import _pump_py as pump_impl
    from fanout import _ring_py as ring_impl

    IMPORT_ERROR = "FANOUT_NO_EXTENSIONS is set"
else:
    try:
        from fanout import _pump as pump_impl  # type: ignore[no-redef]
        from fanout import _ring as ring_impl  # type: ignore[no-redef]
    except ImportError as exc:  # built with FANOUT_NO_EXTENSIONS=1, or no compiler
        from fanout import _pump_py as pump_impl
        from fanout import _ring_py as ring_impl

        IMPORT_ERROR = f"native extensions unavailable: {exc}"

NATIVE: bool = ring_impl.NATIVE and pump_impl.NATIVE
Ring = ring_impl.Ring
FrameRing = ring_impl.FrameRing
Pump = pump_impl.Pump

__all__ = ["IMPORT_ERROR", "NATIVE", "FrameRing", "Pump", "Ring"]
