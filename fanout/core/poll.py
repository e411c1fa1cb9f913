"""Waiting for a condition by asking it again and again: fanout's one poll loop.

The things fanout waits for (a worker saying ready, a ring drained, a worker
reaped, room in a bounded lane) change in other threads and processes that
signal nothing this thread could block on, so it asks, then naps a little longer
each time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["poll_until"]


def poll_until(
    done: Callable[[], bool],
    timeout: float | None,
    *,
    first: float = 0.0005,
    longest: float = 0.01,
) -> bool:
    """Call ``done`` until it returns true or ``timeout`` seconds have passed.

    ``done`` is called at once, then after naps that start at ``first`` seconds and
    double up to ``longest``: a condition that holds soon is seen within a fraction
    of a millisecond, and one that takes long costs a call every ``longest``
    seconds. ``done`` may do a step of the work it waits for (ack a ring, kill a
    worker past its grace) before it answers.

    Args:
        done: Returns true when the wait is over.
        timeout: Seconds to wait at most (checked after each false answer); None
            waits as long as it takes.
        first: The first nap, in seconds.
        longest: The longest nap, in seconds.

    Returns:
        True once ``done`` returned true; False if ``timeout`` passed first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = first
    while not done():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, longest)
    return True
