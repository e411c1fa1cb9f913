"""A distributor's lifecycle states, as ``Distributor.state`` reports them.

The state machine itself lives in ``fanout.core.lifecycle``; ``State`` is public here.
"""

from fanout.core.lifecycle import State

__all__ = ["State"]
