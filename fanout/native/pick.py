"""Pick the ring and pump implementations: native unless told or unable.

``FANOUT_NO_EXTENSIONS=1`` (at build or run time) selects the pure-Python twins;
so does a missing or broken extension build, which ``IMPORT_ERROR`` then explains.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fanout.native import _pump_py, _ring_py

NATIVE_MODULES = ("_ring", "_pump", "_worker")
# Left in the package by setup.py when compiling the extensions failed at install.
NATIVE_BUILD_NOTE = Path(__file__).with_name("_native_build_failed.txt")
HOW_TO_BUILD = (
    "fanout runs on its pure-Python twins: the same behaviour, slower. For the native "
    "build, install a C compiler and the Python headers (Debian/Ubuntu: apt-get install "
    "gcc python3-dev) and reinstall fanout-informer (pip install --force-reinstall "
    "--no-cache-dir ...), or install one of its wheels."
)


def why_not_native(exc: ImportError) -> str:
    """Say in plain words why the native extensions did not import, and what to do."""
    missing = [m for m in NATIVE_MODULES if importlib.util.find_spec(f"fanout.native.{m}") is None]
    if not missing:  # present but unloadable: built for another Python, or damaged
        return (
            f"fanout's native extensions are installed but do not load ({exc}); "
            "rebuild them for this Python. " + HOW_TO_BUILD
        )
    try:
        note = NATIVE_BUILD_NOTE.read_text().strip()
    except OSError:
        note = ""
    if note:
        why = f"compiling them failed when fanout was installed ({note})"
    else:
        why = (
            "they were not built: installed with FANOUT_NO_EXTENSIONS=1, or run from a "
            "source tree where `python setup.py build_ext --inplace` has not run"
        )
    return f"fanout's native extensions ({', '.join(missing)}) are missing: {why}. " + HOW_TO_BUILD


IMPORT_ERROR: str | None = None
pump_impl: Any = _pump_py
ring_impl: Any = _ring_py
serve: Any = None
serve_batch: Any = None
watch_lifeline: Any = None
guard_forks: Any = None

if os.environ.get("FANOUT_NO_EXTENSIONS", "") not in ("", "0"):
    IMPORT_ERROR = (
        "FANOUT_NO_EXTENSIONS is set: fanout runs on its pure-Python twins; "
        "unset it for the native extensions."
    )
else:
    try:
        from fanout.native import _pump, _ring, _worker
    except ImportError as exc:  # built with FANOUT_NO_EXTENSIONS=1, or no compiler
        IMPORT_ERROR = why_not_native(exc)
    else:
        pump_impl, ring_impl, serve = _pump, _ring, _worker.serve
        serve_batch = _worker.serve_batch
        watch_lifeline, guard_forks = _worker.watch_lifeline, _worker.guard_forks

if serve is None:
    from fanout.native._worker_py import guard_forks, serve, serve_batch, watch_lifeline

NATIVE: bool = ring_impl is not _ring_py
if TYPE_CHECKING:
    # Typed through the native stubs (fanout/native/_ring.pyi, _pump.pyi), which
    # stubtest keeps true to the built modules; the twins share the API.
    from fanout.native._pump import Pump as Pump
    from fanout.native._ring import Encoder as Encoder
    from fanout.native._ring import Feed as Feed
    from fanout.native._ring import FrameRing as FrameRing
    from fanout.native._ring import Ring as Ring
    from fanout.native._ring import Router as Router
    from fanout.native._ring import append_all as append_all
    from fanout.native._ring import default_key as default_key
    from fanout.native._ring import frame_span as frame_span
    from fanout.native._ring import pack_plain as pack_plain
    from fanout.native._ring import plain as plain
    from fanout.native._ring import slot_progress as slot_progress
else:
    Ring = ring_impl.Ring
    Router = ring_impl.Router
    FrameRing = ring_impl.FrameRing
    Pump = pump_impl.Pump
    Encoder = ring_impl.Encoder
    Feed = ring_impl.Feed
    append_all = ring_impl.append_all
    default_key = ring_impl.default_key
    frame_span = ring_impl.frame_span
    pack_plain = ring_impl.pack_plain
    plain = ring_impl.plain
    slot_progress = ring_impl.slot_progress

__all__ = [
    "IMPORT_ERROR",
    "NATIVE",
    "Encoder",
    "Feed",
    "FrameRing",
    "Pump",
    "Ring",
    "Router",
    "append_all",
    "default_key",
    "frame_span",
    "guard_forks",
    "pack_plain",
    "plain",
    "serve",
    "serve_batch",
    "slot_progress",
    "watch_lifeline",
]
