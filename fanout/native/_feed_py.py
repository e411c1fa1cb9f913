"""``distribute``'s fast path in pure Python: the twin of the native ``Encoder`` and ``Feed``.

Compiled from ``_feed.pxi`` into ``fanout.native._ring``; ``fanout.native._ring_py``
names these beside the other twins. ``append_all`` (one frame into many rings),
which ``Feed`` calls, lives here too. Both do the same steps and call back the same
Python callables for everything but the common case.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

from fanout.errors import RingClosed
from fanout.native._plain_py import pack_plain, plain
from fanout.native._ring_common import frame_length
from fanout.notifications import NOTIFICATION_TYPES, Update
from fanout.wire.protocol import to_wire

__all__ = ["Encoder", "Feed", "Router", "append_all", "default_key", "wire"]


def wire(n: Any, t_ns: int) -> list[Any] | None:
    """``[kind, t_ns, a, b]`` for a notification (``fanout.wire.protocol.to_wire``), or None."""
    if type(n) not in NOTIFICATION_TYPES:
        return None
    kind, a, b = to_wire(n)
    return [kind, t_ns, a, b]


def append_all(rings: Any, frame: Any) -> int:
    """Append one frame to every open ring of a sequence, in one call.

    Args:
        rings: A sequence of ``FrameRing``; closed ones are skipped.
        frame: A contiguous bytes-like object of 1 byte to 4 GiB.

    Returns:
        How many rings took the frame.

    Raises:
        TypeError: ``frame`` is not a contiguous bytes-like object.
        ValueError: ``frame`` is empty or larger than 4 GiB.
        RingFull: A bounded ring has no room; the rings before it keep the frame.
    """
    frame_length(frame)
    taken = 0
    for ring in rings:
        try:
            ring.append(frame)
        except RingClosed:
            continue
        taken += 1
    return taken


class Encoder:
    """The encode of a notification, with the shared arena's size check.

    ``encoder(n, t_ns)`` returns the payload: ``pack_plain``'s bytes of the wire
    list when it is plain without leaves; else ``encoder``'s (a
    ``msgspec.msgpack.Encoder``) when ``plain`` accepts it with ``leaves[0]``
    (the leaf types, read at each call). That is for bytes under
    ``arena.min_bytes`` (read once) while no encode met a big buffer
    (``arena._events`` unchanged); ``other(n, t_ns, payload, events)`` gets a
    bigger one, ``other(n, t_ns)`` one that is not plain or no notification; a
    failed encode calls ``failed(obj, events, exc)``, which raises. (The native
    one encodes into a buffer it reuses when ``Feed`` calls it; this one has no
    such step.)

    Args:
        encoder: A ``msgspec.msgpack.Encoder`` (or anything with its ``encode``).
        leaves: A list whose first item is the tuple of leaf types ``plain`` accepts.
        depth: How deep ``plain`` looks.
        arena: The ``fanout.buffers.arena.Arena`` encoded for.
        other: The arena's full encode.
        failed: Raises the error for a failed ``enc``.
    """

    def __init__(
        self,
        encoder: Any,
        leaves: list[tuple[type, ...]],
        depth: int,
        arena: Any,
        other: Callable[..., Any],
        failed: Callable[[Any, int, BaseException], Any],
    ) -> None:
        self._enc = encoder.encode
        self._leaves = leaves
        self._depth = depth
        self._arena = arena
        self._min_bytes = arena.min_bytes
        self._other = other
        self._failed = failed

    def __call__(self, n: Any, t_ns: int) -> Any:
        obj = wire(n, t_ns)
        if obj is None:
            return self._other(n, t_ns)  # raises the full path's TypeError
        return self._encode(obj, n, t_ns)

    def _encode(self, obj: list[Any], n: Any, t_ns: int) -> Any:
        """Encode ``obj``, the wire list of ``n``, as ``__call__`` does."""
        arena = self._arena
        events = arena._events
        payload = pack_plain(obj, self._depth)
        if payload is not None:
            if len(payload) < self._min_bytes:
                return payload
            return self._other(n, t_ns, payload, events)
        # Leaf types (numpy arrays, Ext), or what msgspec refuses: its own path.
        if not plain(obj, self._depth, self._leaves[0]):
            return self._other(n, t_ns)  # packed by msgpack: the arena's own path
        try:
            payload = self._enc(obj)
        except BaseException as exc:
            self._failed(obj, events, exc)
            raise  # (failed raises)
        if type(payload) is bytes and arena._events == events:
            if len(payload) < self._min_bytes:
                return payload
        return self._other(n, t_ns, payload, events)


def default_key(obj: Any) -> Hashable | None:
    """``(namespace, name)`` of ``obj``'s ``metadata`` when present, else None."""
    if type(obj) is dict:
        md = obj.get("metadata")
        if type(md) is dict:
            name = md.get("name")
            if name is not None:
                return (md.get("namespace"), name)
    return None


class Router:
    """Which of a listener's ``count`` lanes a notification goes to.

    ``index(n)`` is ``hash(key(obj)) % count``, ``obj`` being the notification's
    object (an ``Update``'s new one) and ``key`` the listener's key function, or
    ``default_key`` when None. Objects whose key is None take the lanes in turn.
    With one lane, no key is computed. A listener's ``route`` and
    ``distribute``'s ``Feed`` ask the same router, so they pick alike and share
    the turn.

    Args:
        count: How many lanes (at least 1).
        key: ``obj -> hashable``, or None for ``default_key``.

    Raises:
        ValueError: ``count`` is below 1.
        TypeError: ``key`` is neither callable nor None.
    """

    def __init__(self, count: int, key: Callable[[Any], Any] | None = None) -> None:
        if count < 1:
            raise ValueError(f"a router needs at least one lane, got count={count}")
        if key is not None and not callable(key):
            raise TypeError(f"key must be callable or None, not {key!r}")
        self.count = count
        self.key = key
        self._rr = 0

    def index(self, n: Any) -> int:
        """The lane of notification ``n``: from 0 to ``count - 1``."""
        if self.count == 1:
            return 0
        obj = n.new if type(n) is Update else n.obj
        key = self.key(obj) if self.key is not None else default_key(obj)
        if key is None:
            self._rr += 1
            return self._rr % self.count
        return hash(key) % self.count


class _Route:
    """One routed listener of a ``Feed``: its lanes' rings, its router, its wake."""

    def __init__(self, rings: Any, router: Any, after: Any) -> None:
        self.rings = tuple(rings)
        if not self.rings:
            raise ValueError("a routed listener needs at least one lane")
        if type(router) is not Router or router.count != len(self.rings):
            raise ValueError(
                f"a routed listener needs a Router of its {len(self.rings)} lanes, not {router!r}"
            )
        self.router = router
        self.after = after

    def pick(self, n: Any) -> Any:
        """The ring of ``n``'s lane."""
        return self.rings[self.router.index(n)]


class Feed:
    """``distribute``'s fast path for a plan of unbounded process (and Ray) listeners.

    ``feed(n)`` stamps ``n`` with ``time.monotonic_ns()`` and encodes it once
    with ``encode(n, t_ns)``. It picks the lane of each routed listener in
    ``routes`` with the listener's ``Router``; a key that raises stops it
    before any ring took anything. Then it appends the bytes to every open ring
    of ``rings`` and to each picked ring, runs the ``after`` callables, calls
    ``closed()`` when a ring refused them as closed, and ``notify()``. A
    payload that is not ``bytes`` (big buffers in shared memory) goes to
    ``finish(n, t_ns, payload)`` instead. Returns False, having done nothing,
    when ``n`` is no notification.

    Args:
        rings: The ``FrameRing`` of each single-lane listener.
        encode: ``(n, t_ns) -> payload``.
        notify: Wakes the pump.
        finish: Delivers a payload that is not ``bytes``.
        closed: Called when a ring was closed (raises if the distributor stopped).
        routes: ``(rings, router, after)`` of each routed listener: its lanes'
            rings, its ``Router``, and a callable to run after its append or None.
    """

    def __init__(
        self,
        rings: tuple[Any, ...],
        encode: Callable[[Any, int], Any],
        notify: Callable[[], Any],
        finish: Callable[[Any, int, Any], Any],
        closed: Callable[[], Any],
        routes: Any = (),
    ) -> None:
        self._rings = rings
        self._encode = encode
        self._notify = notify
        self._finish = finish
        self._closed = closed
        self._routes = tuple(_Route(*route) for route in routes)
        self._afters = tuple(r.after for r in self._routes if r.after is not None)

    def feed(self, n: Any) -> bool:
        """Deliver ``n`` as described above; False: ``n`` is no notification."""
        if type(n) not in NOTIFICATION_TYPES:
            return False
        t_ns = time.monotonic_ns()
        payload = self._encode(n, t_ns)
        if type(payload) is not bytes:
            self._finish(n, t_ns, payload)
            return True
        picked = [route.pick(n) for route in self._routes]  # before any ring takes it
        taken = append_all(self._rings, payload)
        if picked:
            taken += append_all(picked, payload)
            for after in self._afters:
                after()
        if taken < len(self._rings) + len(picked):
            self._closed()  # a ring was closed under us
        self._notify()
        return True
