# The producer's fast path: Encoder (msgspec's encode of a notification, with the
# arena's size check) and Feed (stamp, encode, pick each listener's lane, append to
# every ring, wake the pump), so a plain notification to unbounded process and Ray
# listeners runs one Python frame, the caller's. Included by _ring.pyx; twin:
# fanout/native/_feed_py.py.
#
# Everything that is not the common case goes back to Python callables given at
# construction, with what was already computed, so nothing is encoded twice.

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from fanout.notifications import Add as _Add_cls
from fanout.notifications import Delete as _Delete_cls
from fanout.notifications import Update as _Update_cls
from fanout.wire.protocol import ADD as _ADD_code
from fanout.wire.protocol import DELETE as _DELETE_code
from fanout.wire.protocol import UPDATE as _UPDATE_code
from fanout.wire.protocol import UPDATE_SAME as _UPDATE_SAME_code

cdef object _Add = _Add_cls
cdef object _Update = _Update_cls
cdef object _Delete = _Delete_cls
cdef object _ADD = _ADD_code
cdef object _DELETE = _DELETE_code
cdef object _UPDATE = _UPDATE_code
cdef object _UPDATE_SAME = _UPDATE_SAME_code


cdef inline object _monotonic_ns():
    # time.monotonic_ns() reads this very clock on Linux.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef list _wire(object n, object t_ns):
    """``[kind, t_ns, a, b]`` for a notification (fanout.wire.protocol.to_wire), or None."""
    cdef object cls = type(n)
    if cls is _Update:
        old = n.old
        new = n.new
        if old is new:
            return [_UPDATE_SAME, t_ns, new, None]
        return [_UPDATE, t_ns, old, new]
    if cls is _Add:
        return [_ADD, t_ns, n.obj, n.is_in_initial_list]
    if cls is _Delete:
        return [_DELETE, t_ns, n.obj, None]
    return None


# Past this size, the reused output shrinks back to _OUT_BYTES after the call.
cdef Py_ssize_t _KEEP_BYTES = 1 << 20


cdef void _shrink(_wbuf* b) noexcept:
    cdef unsigned char* p = <unsigned char*>PyMem_Realloc(b.p, _OUT_BYTES)
    if p != NULL:
        b.p = p
        b.cap = _OUT_BYTES
    b.n = 0


cdef class Encoder:
    """Encoder(encoder, leaves, depth, arena, other, failed)
--

    The encode of a notification, with the shared arena's size check.

    ``encoder(n, t_ns)`` returns the payload: ``pack_plain``'s bytes of the wire
    list when it is plain without leaves; else ``encoder``'s (a
    ``msgspec.msgpack.Encoder``) when ``plain`` accepts it with ``leaves[0]``
    (the leaf types, read at each call). That is for bytes under
    ``arena.min_bytes`` (read once) while no encode met a big buffer
    (``arena._events`` unchanged); ``other(n, t_ns, payload, events)`` gets a
    bigger one, ``other(n, t_ns)`` one that is not plain or no notification; a
    failed encode calls ``failed(obj, events, exc)``, which raises.
    """

    cdef object _enc, _arena, _other, _failed
    cdef list _leaves
    cdef int _depth
    cdef Py_ssize_t _min_bytes
    # Feed's reused output: pack_plain writes into it and the rings copy from it,
    # so the common case allocates nothing. One caller at a time (``_held``).
    cdef _wbuf _out
    cdef bint _held

    def __cinit__(self, *args, **kwargs):
        if _wbuf_init(&self._out, _OUT_BYTES) < 0:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self._out.p)

    def __init__(self, encoder, list leaves, int depth, arena, other, failed):
        self._enc = encoder.encode
        self._leaves = leaves
        self._depth = depth
        self._arena = arena
        self._min_bytes = arena.min_bytes
        self._other = other
        self._failed = failed

    def __call__(self, n, t_ns):
        obj = _wire(n, t_ns)
        if obj is None:
            return self._other(n, t_ns)  # raises the full path's TypeError
        return self._encode(obj, n, t_ns, False)

    cdef object _encode(self, list obj, object n, object t_ns, bint into):
        # With ``into`` (the caller holds ``_out``): None for the common case,
        # whose bytes are then in ``_out``.
        cdef object leaves
        arena = self._arena
        events = arena._events
        if into:
            self._out.n = 0
            if _pack(&self._out, <PyObject*>obj, self._depth) == 0:
                if self._out.n < self._min_bytes:
                    return None
                payload = PyBytes_FromStringAndSize(<char*>self._out.p, self._out.n)
                return self._other(n, t_ns, payload, events)
        else:
            payload = _pack_bytes(obj, self._depth)
            if payload is not None:
                if len(payload) < self._min_bytes:
                    return payload
                return self._other(n, t_ns, payload, events)
        # Leaf types (numpy arrays, Ext), or what msgspec refuses: its own path.
        leaves = self._leaves[0]
        if not _plain(<PyObject*>obj, self._depth, <PyObject*>leaves):
            return self._other(n, t_ns)  # packed by msgpack: the arena's own path
        try:
            payload = self._enc(obj)
        except BaseException as exc:
            self._failed(obj, events, exc)
            raise  # (failed raises)
        if arena._events == events and len(payload) < self._min_bytes:
            return payload
        return self._other(n, t_ns, payload, events)


def default_key(obj):
    """``(namespace, name)`` of ``obj``'s ``metadata`` when present, else None."""
    if type(obj) is dict:
        md = (<dict>obj).get("metadata")
        if type(md) is dict:
            name = (<dict>md).get("name")
            if name is not None:
                return ((<dict>md).get("namespace"), name)
    return None


cdef class Router:
    """Router(count, key=None)
--

    Which of a listener's ``count`` lanes a notification goes to.

    ``index(n)`` is ``hash(key(obj)) % count`` (Python's modulo), ``obj`` being
    the notification's object (an ``Update``'s new one) and ``key`` the
    listener's key function, or ``default_key`` when None. Objects whose key is
    None take the lanes in turn. With one lane, no key is computed. A
    listener's ``route`` and ``distribute``'s ``Feed`` ask the same router, so
    they pick alike and share the turn.
    """

    cdef readonly Py_ssize_t count
    cdef readonly object key
    cdef Py_ssize_t rr

    def __init__(self, Py_ssize_t count, key=None):
        if count < 1:
            raise ValueError(f"a router needs at least one lane, got count={count}")
        if key is not None and not callable(key):
            raise TypeError(f"key must be callable or None, not {key!r}")
        self.count = count
        self.key = key

    cpdef Py_ssize_t index(self, object n) except -1:
        """The lane of notification ``n``: from 0 to ``count - 1``."""
        cdef Py_hash_t h
        if self.count == 1:
            return 0
        obj = n.new if type(n) is _Update else n.obj
        key = self.key(obj) if self.key is not None else default_key(obj)
        if key is None:
            self.rr += 1
            return self.rr % self.count
        h = hash(key)
        return ((h % self.count) + self.count) % self.count  # Python's modulo


cdef class _Route:
    # One routed listener of a Feed: its lanes' rings and its router.
    cdef tuple rings
    cdef Router router


cdef class Feed:
    """Feed(rings, encode, notify, finish, closed, routes=())
--

    ``distribute``'s fast path for a plan of unbounded process (and Ray) listeners.

    ``feed(n)`` stamps ``n`` with ``time.monotonic_ns()`` and encodes it once
    with ``encode(n, t_ns)`` (an ``Encoder`` is called without a Python call,
    into a buffer it reuses). It picks the lane of each routed listener in
    ``routes`` (``(rings, router, after)``: its lanes' rings, the listener's
    ``Router``, and a callable to run after its append or None); a key that
    raises stops it before any ring took anything. Then it appends the bytes to
    every open ring of ``rings`` and to each picked ring, runs the ``after``
    callables, calls ``closed()`` when a ring refused them as closed, and
    ``notify()``. A payload that is not ``bytes`` (big buffers in shared
    memory) goes to ``finish(n, t_ns, payload)`` instead. Returns False, having
    done nothing, when ``n`` is no notification.
    """

    cdef tuple _rings, _routes, _afters
    cdef Py_ssize_t _count
    cdef object _encode, _notify, _finish, _closed
    cdef Encoder _inline

    def __init__(self, tuple rings, encode, notify, finish, closed, routes=()):
        cdef _Route route
        self._rings = rings
        self._count = len(rings)
        self._encode = encode
        self._inline = encode if type(encode) is Encoder else None
        self._notify = notify
        self._finish = finish
        self._closed = closed
        built = []
        afters = []
        for lane_rings, router, after in routes:
            route = _Route()
            route.rings = tuple(lane_rings)
            if not route.rings:
                raise ValueError("a routed listener needs at least one lane")
            if type(router) is not Router or (<Router>router).count != len(route.rings):
                raise ValueError(
                    f"a routed listener needs a Router of its {len(route.rings)} lanes, "
                    f"not {router!r}"
                )
            route.router = router
            built.append(route)
            if after is not None:
                afters.append(after)
        self._routes = tuple(built)
        self._afters = tuple(afters)

    def feed(self, n):
        """Deliver ``n`` as described above; False: ``n`` is no notification."""
        cdef object cls = type(n)
        cdef Encoder inline = self._inline
        cdef Py_buffer view
        if cls is not _Update and cls is not _Add and cls is not _Delete:
            return False
        t_ns = _monotonic_ns()
        if inline is None:
            payload = self._encode(n, t_ns)
        elif inline._held:  # another thread is between its encode and its appends
            payload = inline._encode(_wire(n, t_ns), n, t_ns, False)
        else:
            inline._held = True
            try:
                payload = inline._encode(_wire(n, t_ns), n, t_ns, True)
                if payload is None:  # the common case: the bytes are in inline._out
                    self._deliver(n, inline._out.p, inline._out.n)
            finally:
                inline._held = False
                if inline._out.cap > _KEEP_BYTES:
                    _shrink(&inline._out)
            if payload is None:
                return True
        if type(payload) is not bytes:
            self._finish(n, t_ns, payload)
            return True
        _get_frame(payload, &view)  # append_all's checks and errors
        try:
            self._deliver(n, <const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return True

    cdef int _deliver(self, object n, const unsigned char* data, Py_ssize_t size) except -1:
        # ``data`` stays put: a payload held by the caller, or ``_out`` while held.
        cdef _Route route
        cdef Py_ssize_t taken, want = self._count
        picked = None
        if self._routes:  # every lane picked before any ring takes the frame
            picked = [route.rings[route.router.index(n)] for route in self._routes]
            want += len(picked)
        taken = _append_data(self._rings, data, size)
        if picked is not None:
            taken += _append_data(picked, data, size)
            for after in self._afters:
                after()
        if taken < want:
            self._closed()  # a ring was closed under us
        self._notify()
        return 0
