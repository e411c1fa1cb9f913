"""The three notifications a producer distributes, as client-go's informer has them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Add", "Delete", "Notification", "Update"]


@dataclass(frozen=True, slots=True)
class Add:
    """An object appeared; ``is_in_initial_list`` marks the initial listing."""

    obj: Any
    is_in_initial_list: bool = False


@dataclass(frozen=True, slots=True)
class Update:
    """An object changed from ``old`` to ``new``."""

    old: Any
    new: Any


@dataclass(frozen=True, slots=True)
class Delete:
    """An object went away (``obj`` is its last known state)."""

    obj: Any


Notification = Add | Update | Delete
NOTIFICATION_TYPES = (Add, Update, Delete)
