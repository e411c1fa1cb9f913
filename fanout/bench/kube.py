"""Scenario ``kube``: Pod watch events, from the raw lines on the wire to a handler.

One loopback HTTP server (127.0.0.1, a thread of the bench process) answers a
Pod list (empty) and a Pod watch: ``n`` MODIFIED events of the packaged real Pod,
cycling through ``VARIANTS`` pre-encoded copies with different names, then the
end of the stream. Contenders, in one run, each counting ``n`` handler calls:

* ``fanout-informer``: ``fanout.kube.Informer`` (lines decoded by msgspec into
  dicts, the store updated) feeding a thread listener of a ``Distributor``;
* ``fanout-informer-slim``: the same with a ``transform=`` keeping five fields,
  so the store and the listener hold a fraction of each Pod;
* ``kubernetes-watch``: the official client's ``watch.Watch().stream()`` over
  ``CoreV1Api.list_pod_for_all_namespaces``, with its default deserialisation
  into ``V1Pod`` models, calling the handler in the watching thread.

Events/s runs from the watch request to the ``n``-th handler call; each round
also records the process's CPU seconds per event (``cpu_s_per_event``), a
figure a busy machine disturbs far less than a rate.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import fanout
from fanout._version import DISTRIBUTION
from fanout.bench.model import MAX_COUNT, Bench, Case, Metric

__all__ = ["CONTENDERS", "LoopbackServer", "WatchServer", "cases", "measure"]

VARIANTS = 256
LINES_PER_CHUNK = 64
ROUND_TIMEOUT = 120.0
EMPTY_LIST = b'{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":[]}'


def _pod_lines() -> list[bytes]:
    pod = json.loads(resources.files("fanout").joinpath("data/pod.json").read_text())
    lines = []
    for i in range(VARIANTS):
        pod["metadata"]["name"] = f"pod-{i}"
        pod["metadata"]["resourceVersion"] = str(1000 + i)
        lines.append(json.dumps({"type": "MODIFIED", "object": pod}).encode() + b"\n")
    return lines


class LoopbackServer(ThreadingHTTPServer):
    """A threaded HTTP server on 127.0.0.1 that serves from its own thread until closed.

    ``close()`` ends every connection, idle keep-alive ones included, and joins
    every thread it started: nothing outlives it.

    Args:
        handler: the ``BaseHTTPRequestHandler`` subclass answering requests.
    """

    daemon_threads = False  # server_close() joins them
    block_on_close = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-http"
        )
        self._thread.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close(self) -> None:
        """Stop serving, cut every connection, and join the threads."""
        self.shutdown()
        with self._conns_lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by its client
        self.server_close()
        self._thread.join()


class WatchServer:
    """A loopback server answering a Pod list (empty) and Pod watches of ``n`` events each."""

    def __init__(self, n: int) -> None:
        self.lines = _pod_lines()
        self.n = n
        bench = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                if query.get("watch", ["false"])[0] != "true":
                    body = EMPTY_LIST
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                lines, n = bench.lines, bench.n
                try:
                    for start in range(0, n, LINES_PER_CHUNK):
                        stop = min(n, start + LINES_PER_CHUNK)
                        data = b"".join(lines[i % VARIANTS] for i in range(start, stop))
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    self.close_connection = True

        self.httpd = LoopbackServer(Handler)
        self.url = self.httpd.url

    def api_client(self) -> Any:
        from kubernetes import client

        return client.ApiClient(client.Configuration(host=self.url))

    def close(self) -> None:
        self.httpd.close()


class _Count(fanout.Handler):
    """Count handler calls; set ``done`` at ``n``. Touches the name, as a handler would."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = 0
        self.done = threading.Event()

    def on_update(self, old: Any, new: Any) -> None:
        self.call(new["metadata"]["name"])

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        self.call(obj["metadata"]["name"])

    def call(self, name: str) -> None:
        self.seen += 1
        if self.seen >= self.n:
            self.done.set()


def slim(pod: Any) -> Any:
    """Keep the five fields a typical controller reads."""
    meta = pod["metadata"]
    return {
        "metadata": {
            "name": meta["name"],
            "namespace": meta.get("namespace"),
            "labels": meta.get("labels", {}),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "spec": {"nodeName": pod["spec"].get("nodeName")},
        "status": {"phase": pod["status"].get("phase")},
    }


class _Contender:
    name = "?"
    kind = "thread"

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import kubernetes  # noqa: F401
            import msgspec  # noqa: F401
        except ImportError as exc:
            return f"needs pip install '{DISTRIBUTION}[kube]' ({exc})"
        return None

    @classmethod
    def run(cls, server: WatchServer, n: int) -> float:
        """Events/s from the watch request to the ``n``-th handler call."""
        raise NotImplementedError


class FanoutInformer(_Contender):
    name = "fanout-informer"
    transform: Any = None

    @classmethod
    def run(cls, server: WatchServer, n: int) -> float:
        from fanout.kube import Informer
        from fanout.kube._client import close_api_client

        api = server.api_client()
        counter = _Count(n)
        d = fanout.Distributor()
        d.add_listener(counter, executor="thread")
        d.start()
        inf = Informer(d, "pods", api_client=api, transform=cls.transform, streaming=False)
        try:
            t0 = time.perf_counter()
            inf.start()
            if not counter.done.wait(ROUND_TIMEOUT):
                raise RuntimeError(f"{cls.name}: {counter.seen} of {n} events in time")
            return n / (time.perf_counter() - t0)
        finally:
            inf.stop()
            d.stop()
            close_api_client(api)


class FanoutInformerSlim(FanoutInformer):
    name = "fanout-informer-slim"
    transform = staticmethod(slim)


class OfficialWatch(_Contender):
    name = "kubernetes-watch"

    @classmethod
    def run(cls, server: WatchServer, n: int) -> float:
        from kubernetes import client, watch

        from fanout.kube._client import close_api_client

        api = server.api_client()
        counter = _Count(n)
        v1 = client.CoreV1Api(api)
        w = watch.Watch()
        try:
            t0 = time.perf_counter()
            for event in w.stream(
                v1.list_pod_for_all_namespaces, resource_version="1", timeout_seconds=300
            ):
                counter.call(event["object"].metadata.name)
                if counter.seen >= n:
                    break
            if counter.seen < n:
                raise RuntimeError(f"{cls.name}: {counter.seen} of {n} events")
            return n / (time.perf_counter() - t0)
        finally:
            w.stop()
            close_api_client(api)
            # The watch's own client deserialises; it never connects, but holds a pool.
            inner = getattr(w, "_api_client", None)
            if inner is not None:
                close_api_client(inner)


CONTENDERS: list[type[_Contender]] = [FanoutInformer, FanoutInformerSlim, OfficialWatch]


def measure(cls: Any, n: int) -> tuple[float, float]:
    """One contender over ``n`` events, against a server of its own.

    Returns events/s and the CPU time the whole process spent per event (the
    server's share included, the same for every contender), which other load
    on the machine barely changes.
    """
    server = WatchServer(n)
    try:
        cpu = time.process_time()
        rate = float(cls.run(server, n))
        return rate, (time.process_time() - cpu) / n
    finally:
        server.close()


def cases(suite: Bench) -> list[Case]:
    """The scenario's one case for ``suite``."""
    chosen = []
    for cls in CONTENDERS:
        reason = cls.unavailable()
        if reason:
            suite.skipped[cls.name] = reason
        else:
            chosen.append(cls)
    if not chosen:
        return []

    def calibrate(cls: Any) -> int:  # a small probe, then a fifth of a round
        n = 100
        for share in (0.2, 1.0):
            rate, _ = measure(cls, n)
            n = int(min(MAX_COUNT, max(100, rate * suite.opts.duration * share)))
        return n

    def run_round(cls: Any, n: int) -> dict[str, Any]:
        rate, cpu = measure(cls, n)
        return {"events": rate, "cpu_s_per_event": cpu}

    return [
        Case(
            "kube",
            {"payload": "pod", "events": "MODIFIED"},
            "Pod watch events, raw lines to a handler",
            [Metric("events", "events/s", "higher", "events/s")],
            chosen,
            run_round,
            calibrate=calibrate,
            round_s=suite.opts.duration,
            calibrate_s=0.3 * suite.opts.duration + 0.25,
        )
    ]
