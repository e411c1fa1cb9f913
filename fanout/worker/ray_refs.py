"""A Ray actor's side of the object store: the references of the batch it handles.

Each batch the producer sends to an actor carries the ``ObjectRef`` of every big
buffer its frames refer to (``EXT_RAY_REF``, ``fanout.wire.refs``), so Ray counts
the actor as a borrower; while the actor handles the batch, its codec resolves those
references here, with ``ray.get`` (read-only, zero-copy for an array on the same
node). The producer's side is ``fanout.buffers.ray_store``: the two share only the
wire modules.
"""

from __future__ import annotations

from typing import Any

from fanout.wire.protocol import EXT_RAY_REF
from fanout.wire.refs import add_resolver, ray_token

__all__ = ["use_batch_refs"]

# The references of the batch this actor is handling (token -> ObjectRef).
_batch_refs: dict[int, Any] = {}


def use_batch_refs(refs: dict[int, Any] | None) -> None:
    """The references the frames of the next batch may use (None: no batch)."""
    _batch_refs.clear()
    if refs:
        _batch_refs.update(refs)


def _resolve_in_batch(body: bytes) -> Any:
    """The buffer of a reference of the running batch, else None."""
    ref = _batch_refs.get(ray_token(body))
    if ref is None:
        return None
    import ray

    return ray.get(ref)


add_resolver(EXT_RAY_REF, _resolve_in_batch)
