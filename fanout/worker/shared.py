"""A worker's side of the shared-memory arena: map it read-only, read references from it.

The producer's side (``fanout.buffers.arena``) copies big buffers into blocks of one
sealed memfd; a worker maps that memfd read-only once, before its handler is loaded,
and from then on decodes each ``EXT_SHARED`` reference (``fanout.wire.refs``) as a
read-only numpy view of the block, or a ``bytes`` copy of it for a bytes-like
buffer. The two sides share only the wire modules.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Any

from fanout.wire.protocol import EXT_SHARED
from fanout.wire.refs import add_resolver, read_shared
from fanout.worker.isolation import mmap_shared

__all__ = ["decode_worker", "map_worker_view"]

# The arena as this worker mapped it (read-only), once ``map_worker_view`` ran.
_worker_view: memoryview | None = None


def map_worker_view(fd: int, size: int) -> memoryview:
    """Map the arena read-only for this worker's decoder (the worker closes ``fd``).

    The mapping lives as long as the process; from now on the codecs resolve
    ``EXT_SHARED`` references from it. Returns a read-only byte view of it.
    """
    global _worker_view
    addr = mmap_shared(fd, size, mmap.PROT_READ, 0, "shared-memory arena")
    view = memoryview((ctypes.c_char * size).from_address(addr)).cast("B").toreadonly()
    _worker_view = view
    add_resolver(EXT_SHARED, decode_worker)
    return view


def decode_worker(body: bytes) -> Any:
    """A worker's object for a reference: a read-only array view, or bytes."""
    if _worker_view is None:
        return None  # no arena mapped here: not a reference this process can read
    return read_shared(body, _worker_view, copy=False)
