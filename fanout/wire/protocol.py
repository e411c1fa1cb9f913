"""The contract between the producer and its workers, in one place.

Three channels, each written by one side only:

* **Frames** (producer -> worker, the data pipe): a 12-byte header (payload
  length u32, sequence number u64, little endian; ``HEADER``, defined with the
  rings that write it) and a payload, the MessagePack array
  ``[kind, t_ns, a, b]``: kind ``ADD`` = Add(obj=a, is_in_initial_list=b),
  ``UPDATE`` = Update(old=a, new=b), ``DELETE`` = Delete(obj=a),
  ``UPDATE_SAME`` = Update(old=a, new=a) (the object travels once); ``t_ns`` is
  ``time.monotonic_ns()`` at ``distribute``. Objects MessagePack has no type for
  travel as extension values: codes 1-5 are fanout's (``EXT_*``), 64-127 the user's.
* **The progress slot** (worker -> producer, shared memory): ``SLOT_WORDS``
  unsigned 64-bit words per lane, on pages of their own. Only the worker writes
  it, except the words the producer sets while no worker runs (``STARTED`` /
  ``DONE`` before a spawn) and ``STOP``.
* **The return pipe** (worker -> producer): rare messages, each a u32 length
  (``RETURN_HEADER``) and a MessagePack map whose ``"t"`` says what it is.

A worker's own exit codes are trusted only after it announced them.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import msgpack

from fanout.native._ring_common import HEADER, HEADER_SIZE
from fanout.notifications import Add, Delete, Notification, Update

__all__ = [
    "ADD",
    "DELETE",
    "DONE",
    "ERRORS",
    "EXIT_ORPHANED",
    "EXIT_START_FAILED",
    "EXT_DATE",
    "EXT_DATETIME",
    "EXT_NDARRAY",
    "EXT_RAY_REF",
    "EXT_SHARED",
    "HANDLED",
    "HEADER",
    "HEADER_SIZE",
    "HIST",
    "MAX_RETURN_MESSAGE",
    "MAX_T_NS",
    "MSG_ERROR",
    "MSG_FATAL",
    "MSG_READY",
    "MSG_UNDECODABLE",
    "MSG_WORKER",
    "NBUCKETS",
    "PID",
    "RETURN_HEADER",
    "SLOT_BYTES",
    "SLOT_WORDS",
    "STARTED",
    "START_NS",
    "STOP",
    "UPDATE",
    "UPDATE_SAME",
    "USER_EXT_CODES",
    "from_wire",
    "send_message",
    "slot_stride",
    "to_wire",
    "wire_fields_error",
    "wire_shape_error",
]

# -- frames: payload kinds ----------------------------------------------------------------

ADD, UPDATE, DELETE, UPDATE_SAME = 0, 1, 2, 3
MAX_T_NS = (1 << 63) - 1


def to_wire(n: Notification) -> tuple[int, Any, Any]:
    """The kind and the two objects a payload carries for ``n``."""
    cls = type(n)
    if cls is Update:
        if n.old is n.new:  # type: ignore[union-attr]
            return UPDATE_SAME, n.new, None  # type: ignore[union-attr]
        return UPDATE, n.old, n.new  # type: ignore[union-attr]
    if cls is Add:
        return ADD, n.obj, n.is_in_initial_list  # type: ignore[union-attr]
    if cls is Delete:
        return DELETE, n.obj, None  # type: ignore[union-attr]
    raise TypeError(
        f"distribute takes fanout.Add, fanout.Update or fanout.Delete, not "
        f"{type(n).__name__} ({n!r:.80})"
    )


def from_wire(kind: int, a: Any, b: Any) -> Notification:
    """Rebuild the notification a payload carried."""
    if kind == UPDATE:
        return Update(a, b)
    if kind == ADD:
        return Add(a, bool(b))
    if kind == DELETE:
        return Delete(a)
    if kind == UPDATE_SAME:
        return Update(a, a)
    raise ValueError(f"unknown notification kind {kind!r} in payload")


def wire_fields_error(kind: Any, t_ns: Any) -> ValueError:
    """The one error both worker loops raise for a payload with bad header fields."""
    return ValueError(
        f"bad payload fields: kind={kind!r} (must be 0, 1, 2 or 3), "
        f"t_ns={t_ns!r} (must be an int from 0 to 2**63-1)"
    )


def wire_shape_error(fields: Any) -> ValueError:
    """The one error both worker loops raise for a payload that is no 4-item array."""
    size = len(fields) if isinstance(fields, (list, tuple)) else None
    what = f"an array of {size} items" if size is not None else type(fields).__name__
    return ValueError(f"payload must be an array [kind, t_ns, a, b], got {what}")


# -- frames: MessagePack extension codes ----------------------------------------------------

EXT_NDARRAY = 1  # a numpy array: [dtype, shape, raw bytes] (fanout.wire.dtypes)
EXT_DATETIME = 2  # a datetime, as ISO 8601 text
EXT_DATE = 3  # a date, as ISO 8601 text
EXT_SHARED = 4  # a block of the producer's shared-memory arena (fanout.wire.refs)
EXT_RAY_REF = 5  # an object in Ray's object store, for a Ray listener (fanout.wire.refs)
USER_EXT_CODES = range(64, 128)  # a codec's user hooks make and read these

# -- the progress slot: word indexes ------------------------------------------------------

STARTED = 0  # seq of the last frame whose handler call began
DONE = 1  # seq of the last frame whose handler call returned (or raised)
START_NS = 2  # monotonic_ns when the running call began; 0 when idle
HANDLED = 3  # handler calls finished (returned or raised)
ERRORS = 4  # handler calls that raised
STOP = 5  # set by the parent: exit before the next frame
PID = 6  # the worker's pid, once it runs
HIST = 8  # first latency bucket
NBUCKETS = 160  # 4 buckets per power of two, from 1 ns to ~1,000 s
SLOT_WORDS = 256  # 2 KiB per lane, a whole number of cache lines
SLOT_BYTES = SLOT_WORDS * 8

# -- the return pipe ----------------------------------------------------------------------

RETURN_HEADER = struct.Struct("<I")
MAX_RETURN_MESSAGE = 16 * 1024 * 1024
MSG_WORKER = "worker"  # from the warden, first: {"t", "pid", "subreaper"}
MSG_READY = "ready"  # the handler is built: {"t", "pid"}
MSG_FATAL = "fatal"  # the handler cannot be built: {"t", "text"}, then EXIT_START_FAILED
MSG_ERROR = "error"  # a handler call raised: {"t", "seq", "text", "payload"}
MSG_UNDECODABLE = "undecodable"  # a frame cannot be decoded: {"t", "seq", "text", "payload"}

EXIT_START_FAILED = 3  # after MSG_FATAL
EXIT_ORPHANED = 4  # the producer died (nobody is left to read it)


def send_message(fd: int, msg: dict[str, Any]) -> None:
    """Write one length-prefixed MessagePack message to the return pipe."""
    body = msgpack.packb(msg, use_bin_type=True)
    data = memoryview(RETURN_HEADER.pack(len(body)) + body)
    while data:
        data = data[os.write(fd, data) :]


def slot_stride(slot_bytes: int) -> int:
    """Bytes between two lanes' slots: whole pages, so a worker can map its own alone."""
    page = mmap.PAGESIZE
    return -(-slot_bytes // page) * page
