"""The three notifications a producer distributes, as client-go's informer has them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Add", "Delete", "Notification", "RawFrame", "Update"]


# Frozen dataclasses with slots. Their generated __init__ sets each field through
# object.__setattr__; these set the slots directly (a third faster), since a
# notification is built for every distribute.


@dataclass(frozen=True, slots=True, init=False)
class Add:
    """An object appeared (client-go ``addNotification``).

    Immutable; the arguments become attributes of the same names.

    Args:
        obj: The object (anything the distributor's codec can encode).
        is_in_initial_list: True for an object of the initial listing (fanout sets
            it for a listener's ``initial_list``); False for a live add.
    """

    obj: Any
    is_in_initial_list: bool = False

    def __init__(self, obj: Any, is_in_initial_list: bool = False) -> None:
        _set_add_obj(self, obj)
        _set_add_initial(self, is_in_initial_list)


@dataclass(frozen=True, slots=True, init=False)
class Update:
    """An object changed (client-go ``updateNotification``).

    Immutable; the arguments become attributes of the same names. A resync is
    usually distributed as ``Update(obj, obj)`` with ``sync=True``.

    Args:
        old: The object's previous state.
        new: The object's new state; the default ``key`` reads its metadata.
    """

    old: Any
    new: Any

    def __init__(self, old: Any, new: Any) -> None:
        _set_update_old(self, old)
        _set_update_new(self, new)


@dataclass(frozen=True, slots=True, init=False)
class Delete:
    """An object went away (client-go ``deleteNotification``).

    Immutable; the argument becomes an attribute of the same name.

    Args:
        obj: The last known state of the object.
    """

    obj: Any

    def __init__(self, obj: Any) -> None:
        _set_delete_obj(self, obj)


@dataclass(frozen=True, slots=True, repr=False)
class RawFrame:
    """A frame a worker could not decode, handed to ``on_dead_letter`` in its place.

    Attributes:
        payload: the encoded notification exactly as it travelled (MessagePack).
        error: why decoding it failed.
    """

    payload: bytes
    error: str

    def __repr__(self) -> str:
        # A payload may be megabytes: show its size and start, not all of it.
        head = self.payload[:32]
        more = "..." if len(self.payload) > 32 else ""
        return (
            f"RawFrame(payload=<{len(self.payload)} bytes: {head!r}{more}>, error={self.error!r})"
        )


_set_add_obj = Add.__dict__["obj"].__set__
_set_add_initial = Add.__dict__["is_in_initial_list"].__set__
_set_update_old = Update.__dict__["old"].__set__
_set_update_new = Update.__dict__["new"].__set__
_set_delete_obj = Delete.__dict__["obj"].__set__


Notification = Add | Update | Delete
"""Any of the three notifications: the type ``distribute`` takes."""
NOTIFICATION_TYPES = (Add, Update, Delete)
