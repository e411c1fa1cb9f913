"""A bounded HTTP endpoint for metrics: one thread, one selector, a cap on connections.

``prometheus_client``'s own server spends a thread per connection and keeps idle ones
forever: a few hundred idle sockets cost hundreds of threads and descriptors, and can
take the last descriptors the distributor needs to start workers. Here one thread
serves every connection from a selector. At most ``max_connections`` are open; when
one more arrives, the oldest connection that has not sent a whole request yet is
closed for it (a scrape finishing its answer is never cut), so idle or slow clients
cannot lock scrapers out. A connection gets ``idle_timeout`` seconds in all to send
its request and take its answer. Each answer closes its connection.
"""

from __future__ import annotations

import errno
import logging
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


class _Conn:
    __slots__ = ("deadline", "inbuf", "out", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
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
            self._sock.listen(min(BACKLOG, max(max_connections, 1)))
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
        self._accept_paused_until = 0.0
        self.evicted = 0  # connections closed early to make room (for tests and stats)

    def close(self) -> None:
        """Stop serving, close every socket and wait for the thread to end."""
        self._closing = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self.is_alive():
            self.join()
        else:
            self._cleanup()

    def _cleanup(self) -> None:
        for conn in self._conns.values():
            conn.sock.close()
        self._conns.clear()
        self._sock.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._sock, selectors.EVENT_READ, None)
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._loop(sel)
        finally:
            sel.close()
            self._cleanup()

    def _loop(self, sel: selectors.BaseSelector) -> None:
        listening = True
        while not self._closing:
            now = time.monotonic()
            if not listening and now >= self._accept_paused_until:
                sel.register(self._sock, selectors.EVENT_READ, None)
                listening = True
            timeout = self._next_deadline(now)
            for key, _ in sel.select(timeout):
                if key.data == "wake":
                    continue
                if key.data is None:
                    if not self._accept(sel):
                        sel.unregister(self._sock)
                        listening = False
                    continue
                conn = self._conns.get(key.fd)
                if conn is not None:
                    self._serve(sel, conn)
            self._expire(sel, time.monotonic())

    def _next_deadline(self, now: float) -> float | None:
        deadlines = [c.deadline for c in self._conns.values()]
        if self._accept_paused_until > now:
            deadlines.append(self._accept_paused_until)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _accept(self, sel: selectors.BaseSelector) -> bool:
        """Take every queued connection; False to pause accepting (no fds to spare)."""
        while True:
            if len(self._conns) >= self._max and not self._evict(sel):
                return True  # all busy answering: new ones wait in the backlog
            try:
                sock, _ = self._sock.accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if self._evict(sel):
                        continue
                    self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
                    return False
                if exc.errno in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO):
                    continue
                raise
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self._idle)
            self._conns[sock.fileno()] = conn
            sel.register(sock, selectors.EVENT_READ, "conn")

    def _evict(self, sel: selectors.BaseSelector) -> bool:
        """Close the oldest connection still sending its request; False if none is."""
        for conn in self._conns.values():
            if conn.out is None:
                self._drop(sel, conn)
                self.evicted += 1
                return True
        return False

    def _drop(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        del self._conns[conn.sock.fileno()]
        sel.unregister(conn.sock)
        conn.sock.close()

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
                self._respond(sel, conn, self._handle(bytes(conn.inbuf[:end])))
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

    def _handle(self, request: bytes) -> bytes:
        method = request.split(b" ", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _answer("405 Method Not Allowed", b"", "text/plain", False)
        try:
            body, content_type = self._render()
        except Exception:  # a failing collector fails this scrape, not the endpoint
            log.exception("fanout metrics: collecting failed")
            return _answer("500 Internal Server Error", b"", "text/plain", False)
        return _answer("200 OK", body, content_type, method == b"HEAD")
