"""A bounded HTTP endpoint for metrics: one thread, one selector, a cap on connections.

``prometheus_client``'s own server spends a thread per connection and keeps idle ones
forever: a few hundred idle sockets cost hundreds of threads and descriptors, and can
take the last descriptors the distributor needs to start workers. Here one thread
serves every connection from a selector. At most ``max_connections`` are open; when
one more arrives, the oldest connection that has not sent a whole request yet is
closed for it (a scrape finishing its answer is never cut, and a connection gets
``EVICT_AGE`` to send its request), so idle or slow clients cannot lock scrapers out.
With no connection to close, new ones wait in the kernel's backlog. A connection gets
``idle_timeout`` seconds in all to send its request and take its answer. Each answer
closes its connection.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["BACKLOG", "Endpoint"]

log = logging.getLogger("fanout")

BACKLOG = 64  # connections the kernel queues before this thread accepts them
MAX_REQUEST = 8192  # bytes of request line and headers; more is refused
ACCEPT_PAUSE = 0.1  # after EMFILE/ENFILE with nothing to close: accept again after this
# accept() errors that concern one connection, not the endpoint: accept(2) says to
# retry the network ones as EAGAIN; EPERM is a firewall refusing that one client.
_ACCEPT_RETRY = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EINTR",
        "EPROTO",
        "ENETDOWN",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENOPROTOOPT",
        "EOPNOTSUPP",
        "EPERM",
    )
    if hasattr(errno, name)
)
EVICT_AGE = 0.25  # a connection this young is not closed to make room for a newer one


class _Conn:
    __slots__ = ("deadline", "inbuf", "out", "since", "sock")

    def __init__(self, sock: socket.socket, since: float, idle: float) -> None:
        self.sock = sock
        self.since = since
        self.deadline = since + idle
        self.inbuf = bytearray()
        self.out: memoryview | None = None  # the answer, once the request is whole


def _answer(status: str, body: bytes, content_type: str, head: bool) -> bytes:
    header = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return header if head else header + body


class Endpoint(threading.Thread):
    """Serve ``render()`` over HTTP on ``(addr, port)`` until ``close()``.

    ``render()`` returns ``(body, content_type)``; it runs in this thread, one
    request at a time.
    """

    def __init__(
        self,
        addr: str,
        port: int,
        render: Callable[[], tuple[bytes, str]],
        max_connections: int,
        idle_timeout: float,
    ) -> None:
        super().__init__(daemon=True)
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((addr, port))
            self._sock.listen(BACKLOG)
            self._sock.setblocking(False)
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except BaseException:
            self._sock.close()
            raise
        self.address: tuple[Any, ...] = self._sock.getsockname()
        self.name = f"fanout-metrics-{self.address[1]}"
        self._render = render
        self._max = max_connections
        self._idle = idle_timeout
        self._conns: dict[int, _Conn] = {}  # by fd, oldest first
        self._closing = False
        self._listening = False
        self._accept_paused_until = 0.0
        self.evicted = 0  # connections closed early to make room (for tests and stats)

    def close(self) -> None:
        """Stop serving, close every socket and wait for the thread to end."""
        self._closing = True
        if self._wake_w < 0:  # closed before
            return
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self.is_alive():
            self.join()
        self._cleanup()
        # The wake pipe last, and only here: the thread never closes it, so no
        # write above can reach a descriptor number reused by someone else.
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1

    def _cleanup(self) -> None:
        """Close the listening socket and every connection (idempotent)."""
        for conn in self._conns.values():
            conn.sock.close()
        self._conns.clear()
        self._sock.close()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            self._listen(sel, True)
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._loop(sel)
        finally:
            sel.close()
            self._cleanup()

    def _loop(self, sel: selectors.BaseSelector) -> None:
        while not self._closing:
            now = time.monotonic()
            if not self._listening and now >= self._accept_paused_until:
                self._listen(sel, True)
            for key, _ in sel.select(self._next_deadline(now)):
                if key.data == "wake":
                    continue
                if key.data is None:
                    self._accept(sel)
                    continue
                conn = self._conns.get(key.fd)
                if conn is not None:
                    self._serve(sel, conn)
            self._expire(sel, time.monotonic())

    def _listen(self, sel: selectors.BaseSelector, on: bool) -> None:
        if on and not self._listening:
            sel.register(self._sock, selectors.EVENT_READ, None)
        elif not on and self._listening:
            sel.unregister(self._sock)
        self._listening = on

    def _next_deadline(self, now: float) -> float | None:
        deadlines = [c.deadline for c in self._conns.values()]
        if not self._listening and self._accept_paused_until < math.inf:
            deadlines.append(self._accept_paused_until)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _accept(self, sel: selectors.BaseSelector) -> None:
        """Take every queued connection while there is room, or pause accepting.

        Paused, new connections wait in the kernel's backlog (no descriptor here)
        until a connection closes, or one becomes old enough to be evicted.
        """
        while True:
            now = time.monotonic()
            if len(self._conns) >= self._max and not self._evict(sel, now):
                return
            try:
                sock, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if self._evict(sel, now):
                        continue
                    self._pause(sel, now + ACCEPT_PAUSE)
                    return
                if exc.errno in _ACCEPT_RETRY:
                    continue
                raise
            sock.setblocking(False)
            self._conns[sock.fileno()] = _Conn(sock, now, self._idle)
            sel.register(sock, selectors.EVENT_READ, "conn")

    def _pause(self, sel: selectors.BaseSelector, until: float) -> None:
        self._accept_paused_until = until
        self._listen(sel, False)

    def _evict(self, sel: selectors.BaseSelector, now: float) -> bool:
        """Close the oldest connection still sending its request, to make room.

        Only one at least ``EVICT_AGE`` old: a scraper gets that long to send its
        request, however fast others connect. False (and accepting paused) if
        there is none.
        """
        for conn in self._conns.values():
            if conn.out is None:
                if now - conn.since < EVICT_AGE:
                    self._pause(sel, conn.since + EVICT_AGE)
                    return False
                self._drop(sel, conn)
                self.evicted += 1
                return True
        self._pause(sel, math.inf)  # all answering: the first to finish resumes
        return False

    def _drop(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        del self._conns[conn.sock.fileno()]
        sel.unregister(conn.sock)
        conn.sock.close()
        if not self._listening and self._accept_paused_until == math.inf:
            self._listen(sel, True)  # room again

    def _expire(self, sel: selectors.BaseSelector, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self._drop(sel, conn)

    def _serve(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        try:
            if conn.out is None:
                data = conn.sock.recv(4096)
                if not data:
                    self._drop(sel, conn)
                    return
                conn.inbuf += data
                end = conn.inbuf.find(b"\r\n\r\n")
                if end < 0:
                    if len(conn.inbuf) > MAX_REQUEST:
                        self._respond(
                            sel, conn, _answer("431 Too Large", b"", "text/plain", False)
                        )
                    return
                self._respond(sel, conn, self._request(bytes(conn.inbuf[:end])))
            else:
                sent = conn.sock.send(conn.out)
                conn.out = conn.out[sent:]
                if not conn.out:
                    self._drop(sel, conn)
        except BlockingIOError:
            pass
        except OSError:  # reset by the client, and the like
            self._drop(sel, conn)

    def _respond(self, sel: selectors.BaseSelector, conn: _Conn, answer: bytes) -> None:
        conn.out = memoryview(answer)
        conn.inbuf = bytearray()
        sel.modify(conn.sock, selectors.EVENT_WRITE, "conn")

    def _request(self, request: bytes) -> bytes:
        method = request.split(b" ", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _answer("405 Method Not Allowed", b"", "text/plain", False)
        try:
            body, content_type = self._render()
        except Exception:  # a failing collector fails this scrape, not the endpoint
            log.exception("fanout metrics: collecting failed")
            return _answer("500 Internal Server Error", b"", "text/plain", False)
        return _answer("200 OK", body, content_type, method == b"HEAD")
