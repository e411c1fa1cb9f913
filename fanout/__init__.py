"""fanout: fan notifications out from one producer to many isolated listeners.

The Python answer to client-go's ``sharedProcessor``: every listener has its own
growable ring, so a slow handler never slows the producer or other listeners,
and (by default) its handler runs in its own worker processes.
"""

from fanout._version import __version__
from fanout.buffers.arena import SharedStats
from fanout.core.distributor import Distributor
from fanout.errors import (
    DistributorStopped,
    FanoutError,
    ListenerFull,
    RingClosed,
    RingFull,
    WorkerStartError,
)
from fanout.handlers import FuncHandler, Handler
from fanout.listeners.base import Registration
from fanout.native.pick import IMPORT_ERROR, NATIVE, FrameRing, Ring
from fanout.notifications import Add, Delete, Notification, RawFrame, Update
from fanout.stats import ListenerStats
from fanout.wire.codec import Codec, MsgpackCodec, MsgspecCodec

__all__ = [
    "IMPORT_ERROR",
    "NATIVE",
    "Add",
    "Codec",
    "Delete",
    "Distributor",
    "DistributorStopped",
    "FanoutError",
    "FrameRing",
    "FuncHandler",
    "Handler",
    "ListenerFull",
    "ListenerStats",
    "MsgpackCodec",
    "MsgspecCodec",
    "Notification",
    "RawFrame",
    "Registration",
    "Ring",
    "RingClosed",
    "RingFull",
    "SharedStats",
    "Update",
    "WorkerStartError",
    "__version__",
]
