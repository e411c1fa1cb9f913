"""A distributor's lifecycle: one state, moved forward by one function.

``new -> started -> stopping -> stopped``, where stopping has two stages: while
``draining`` a ``stop(drain=True)`` waits for what was accepted (workers still run
and restart), and while ``closing`` the workers and threads are being stopped (no
restarts, nothing waits for them). A stop before ``start()`` goes from ``new``
straight to ``closing``. Every public method of the distributor names the states it
accepts (``require``); a refusal names the state it found.
"""

from __future__ import annotations

import enum

from fanout.errors import DistributorStopped

__all__ = ["State", "require", "transition"]


class State(enum.Enum):
    """Where a ``Distributor`` is in its life; it only ever moves forward."""

    NEW = "new"  # listeners may be added; distribute buffers until start()
    STARTED = "started"  # the pump, the supervisor and the workers run
    DRAINING = "draining"  # stop(drain=True) waits for what was accepted; nothing new
    CLOSING = "closing"  # stop() stops the workers and threads: no restarts
    STOPPED = "stopped"  # nothing of the distributor runs any more

    @property
    def accepting(self) -> bool:
        """New notifications and listeners are taken."""
        return self in (State.NEW, State.STARTED)

    @property
    def stopping(self) -> bool:
        """``stop()`` began (the states ``draining``, ``closing`` and ``stopped``)."""
        return not self.accepting


# The only moves there are. A stop interrupted midway (Ctrl-C) is finished by the
# next stop() from the state it reached.
_NEXT: dict[State, tuple[State, ...]] = {
    State.NEW: (State.STARTED, State.CLOSING),
    State.STARTED: (State.DRAINING, State.CLOSING),
    State.DRAINING: (State.CLOSING,),
    State.CLOSING: (State.STOPPED,),
    State.STOPPED: (),
}


def transition(current: State, to: State) -> State:
    """Return ``to`` if a distributor in ``current`` may move there, else raise.

    Raises:
        RuntimeError: Not a forward move of the lifecycle (a fanout bug).
    """
    if to not in _NEXT[current]:
        raise RuntimeError(
            f"fanout bug: a distributor cannot go from {current.value} to {to.value}"
        )
    return to


def require(operation: str, current: State, *accepted: State) -> None:
    """Raise ``DistributorStopped`` naming ``current`` unless it is one of ``accepted``."""
    if current in accepted:
        return
    raise DistributorStopped(
        f"{operation} refused: the distributor is {current.value} (it accepts "
        f"{' or '.join(s.value for s in accepted)}); stop() is final, build a new "
        f"Distributor to go on"
    )
