"""A loopback list/watch server that speaks the Kubernetes API protocol the way the apiserver does.

No kube-apiserver can run in CI, so the informer's tests point the official
client at this one (``Configuration(host=server.url)``). It binds 127.0.0.1
only and models what the reflector depends on:

* one resourceVersion counter for every write, increasing by one;
* ``GET`` list of a collection, namespaced or across namespaces, with
  ``labelSelector`` (``k=v``, ``k!=v``, comma-joined) and ``fieldSelector``
  (``metadata.name`` / ``metadata.namespace``), ``limit`` / ``continue`` over a
  consistent snapshot, continue tokens that expire (410 ``Expired``), and a
  list at a compacted ``resourceVersion`` answered 410 too;
* ``watch=true`` from a resourceVersion: the history after it, then live
  events; a compacted version gets an ``ERROR`` event with a 410 ``Status``
  (what the watch cache sends); an unset or ``"0"`` version gets synthetic
  ADDED events for the current state first (the legacy semantics);
  ``allowWatchBookmarks``; ``timeoutSeconds`` (the stream ends cleanly);
  objects that start or stop matching the label selector arrive as ADDED or
  DELETED, as the apiserver's filtered watch sends them;
* streaming lists: ``sendInitialEvents=true`` with ``resourceVersionMatch=
  NotOlderThan``: ADDED for every object, then a bookmark annotated
  ``k8s.io/initial-events-end``; with ``streaming=False`` the request is
  refused with 422 as by a server without the WatchList feature;
* faults on demand: abrupt disconnects of every open watch, a watch that goes
  silent, a burst of 410s, a list body that stalls halfway.

Responses are JSON with list items lacking ``kind``/``apiVersion``, as for
built-in types. Watches use chunked transfer encoding, one event per line.
"""

from __future__ import annotations

import base64
import itertools
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec

from fanout.bench.kube import LoopbackServer

INITIAL_EVENTS_END = "k8s.io/initial-events-end"
_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: loopback
  cluster:
    server: {url}
users:
- name: tester
  user:
{user}
contexts:
- name: loopback
  context:
    cluster: loopback
    user: tester
current-context: loopback
"""


def kubeconfig(url: str, user: str = "    token: example-token") -> str:
    """A kubeconfig whose one context sends the official client to ``url``.

    ``user``: the YAML lines of its user entry, indented four spaces (a token,
    an exec credential plugin, ...).
    """
    return _KUBECONFIG.format(url=url, user=user)


@dataclass
class Resource:
    """One collection the server serves."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


@dataclass
class Event:
    rv: int
    resource: str
    type: str
    obj: dict[str, Any]
    old: dict[str, Any] | None = None


@dataclass
class Snapshot:
    """What a paged list walks: the matching objects at one version."""

    rv: int
    items: list[dict[str, Any]]
    made: float = field(default_factory=time.monotonic)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _selector(text: str) -> list[tuple[str, bool, str]]:
    terms = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "!=" in part:
            k, v = part.split("!=", 1)
            terms.append((k.strip(), False, v.strip()))
        else:
            k, v = part.split("==", 1) if "==" in part else part.split("=", 1)
            terms.append((k.strip(), True, v.strip()))
    return terms


class _Query:
    def __init__(self, qs: dict[str, list[str]]) -> None:
        self.raw = {k: v[-1] for k, v in qs.items()}
        self.labels = _selector(self.raw.get("labelSelector", ""))
        self.fields = _selector(self.raw.get("fieldSelector", ""))

    def get(self, name: str, default: str = "") -> str:
        return self.raw.get(name, default)

    def flag(self, name: str) -> bool:
        return self.raw.get(name, "").lower() in ("true", "1")

    def matches(self, obj: dict[str, Any], namespace: str | None) -> bool:
        meta = obj["metadata"]
        if namespace and meta.get("namespace") != namespace:
            return False
        labels = meta.get("labels") or {}
        for k, eq, v in self.labels:
            if (labels.get(k) == v) != eq:
                return False
        for k, eq, v in self.fields:
            got = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}
            if (got.get(k) == v) != eq:
                return False
        return True


class KubeServer:
    """The model and its HTTP front; see the module docstring.

    Args:
        streaming: accept streaming lists (``sendInitialEvents=true``).
        continue_ttl: seconds a continue token stays valid.
        bookmark_interval: send a bookmark to every watch this often
            (seconds); ``None``: only when ``send_bookmarks()`` is called.
    """

    def __init__(
        self,
        streaming: bool = True,
        continue_ttl: float = 300.0,
        bookmark_interval: float | None = None,
    ) -> None:
        self.streaming = streaming
        self.continue_ttl = continue_ttl
        self.bookmark_interval = bookmark_interval
        self.resources: dict[str, Resource] = {}
        for r in (
            Resource("", "v1", "pods", "Pod"),
            Resource("", "v1", "namespaces", "Namespace", namespaced=False),
            Resource("example.com", "v1", "widgets", "Widget"),
        ):
            self.add_resource(r)
        self.cond = threading.Condition()
        self.rv = 100
        self.compacted = 0
        self.objects: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in self.resources}
        self.history: list[Event] = []
        self.snapshots: dict[int, Snapshot] = {}
        self._snapshot_ids = itertools.count(1)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.authorizations: list[str] = []
        # Fault switches.
        self.silent = False
        self.gone_watches = 0
        self.expire_continues = 0
        self._garbage: list[Any] = [0, b""]
        self._failing = {"list": [0, 500], "watch": [0, 500]}
        self.stall_lists = threading.Event()
        self.stall_list_headers = threading.Event()
        self.list_stalled = threading.Event()
        self._drops = 0
        self._bookmarks = 0
        self._closing = False
        self._uids = itertools.count(1)

        handler = type("Handler", (_Handler,), {"kube": self})
        self.httpd = LoopbackServer(handler)
        self.url = self.httpd.url

    def add_resource(self, r: Resource) -> None:
        self.resources[r.plural] = r
        if hasattr(self, "objects"):
            self.objects.setdefault(r.plural, {})

    # Writes (each takes the next resourceVersion)

    def _write(self, resource: str, kind: str, obj: dict[str, Any], old: Any = None) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        key = _key(obj)
        if kind == "DELETED":
            del self.objects[resource][key]
        else:
            self.objects[resource][key] = obj
        # Stored objects are never changed in place (writes replace them), so
        # the history may share them.
        self.history.append(Event(self.rv, resource, kind, obj, old))
        self.cond.notify_all()

    def create(
        self,
        resource: str,
        name: str,
        namespace: str | None = "default",
        labels: dict[str, str] | None = None,
        spec: Any = None,
    ) -> dict[str, Any]:
        r = self.resources[resource]
        meta: dict[str, Any] = {"name": name, "uid": f"uid-{next(self._uids)}"}
        if r.namespaced:
            meta["namespace"] = namespace
        if labels:
            meta["labels"] = dict(labels)
        obj = {"kind": r.kind, "apiVersion": r.api_version, "metadata": meta, "spec": spec or {}}
        with self.cond:
            if _key(obj) in self.objects[resource]:
                raise ValueError(f"{resource} {_key(obj)} exists")
            self._write(resource, "ADDED", obj)
            return _copy(obj)

    def create_many(self, resource: str, count: int, namespace: str = "default") -> None:
        """Create ``count`` objects named ``obj-<i>`` in one go (one lock, one notify)."""
        r = self.resources[resource]
        with self.cond:
            objects, history = self.objects[resource], self.history
            for i in range(count):
                self.rv += 1
                meta = {"name": f"obj-{i}", "uid": f"uid-{next(self._uids)}"}
                if r.namespaced:
                    meta["namespace"] = namespace
                meta["resourceVersion"] = str(self.rv)
                obj = {
                    "kind": r.kind,
                    "apiVersion": r.api_version,
                    "metadata": meta,
                    "spec": {"i": i, "containers": [{"name": "c", "image": "img:1"}]},
                }
                objects[_key(obj)] = obj
                history.append(Event(self.rv, resource, "ADDED", obj))
            self.cond.notify_all()

    def update(
        self,
        resource: str,
        name: str,
        namespace: str | None = "default",
        spec: Any = None,
        labels: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        with self.cond:
            key = f"{namespace}/{name}" if self.resources[resource].namespaced else name
            old = self.objects[resource][key]
            obj = _copy(old)
            if spec is not None:
                obj["spec"] = spec
            if labels is not None:
                obj["metadata"]["labels"] = dict(labels)
            self._write(resource, "MODIFIED", obj, _copy(old))
            return _copy(obj)

    def delete(self, resource: str, name: str, namespace: str | None = "default") -> None:
        with self.cond:
            key = f"{namespace}/{name}" if self.resources[resource].namespaced else name
            obj = _copy(self.objects[resource][key])
            self._write(resource, "DELETED", obj)

    # Faults and server-side housekeeping

    def compact(self) -> int:
        """Forget the history up to now: older versions answer 410. Returns the version."""
        with self.cond:
            self.compacted = self.rv
            self.history = [e for e in self.history if e.rv > self.compacted]
            return self.compacted

    def expire_continue_tokens(self, next_requests: int = 0) -> None:
        """Expire every continue token handed out, and the next ``next_requests`` too."""
        with self.cond:
            self.snapshots.clear()
            self.expire_continues += next_requests

    def drop_watches(self) -> None:
        """Cut every open watch connection, with no terminating chunk."""
        with self.cond:
            self._drops += 1
            self.cond.notify_all()

    def send_bookmarks(self) -> None:
        with self.cond:
            self._bookmarks += 1
            self.cond.notify_all()

    def set_silent(self, silent: bool) -> None:
        """While silent, watches send nothing at all (but keep the connection open)."""
        with self.cond:
            self.silent = silent
            self.cond.notify_all()

    def garble_watches(self, watches: int, line: bytes = b"{not json") -> None:
        """Start the next ``watches`` watch streams with ``line``, then carry on normally."""
        with self.cond:
            self._garbage = [watches, line]

    def answer_gone(self, watches: int) -> None:
        """Answer the next ``watches`` watch requests with a 410 ERROR event."""
        with self.cond:
            self.gone_watches += watches

    def fail_lists(self, count: int, code: int) -> None:
        """Answer the next ``count`` list requests with ``code`` (a Status body)."""
        with self.cond:
            self._failing["list"] = [count, code]

    def fail_watches(self, count: int, code: int) -> None:
        """Answer the next ``count`` watch requests with an ERROR event of ``code``."""
        with self.cond:
            self._failing["watch"] = [count, code]

    def _failure(self, verb: str) -> int:
        with self.cond:
            count, code = self._failing[verb]
            if count <= 0:
                return 0
            self._failing[verb][0] -= 1
            return code

    def watches(self) -> list[dict[str, str]]:
        """The queries of every watch request so far."""
        with self.cond:
            return [q for verb, _, q in self.requests if verb == "watch"]

    def lists(self) -> list[dict[str, str]]:
        with self.cond:
            return [q for verb, _, q in self.requests if verb == "list"]

    def close(self) -> None:
        with self.cond:
            self._closing = True
            self.stall_lists.clear()
            self.stall_list_headers.clear()
            self.cond.notify_all()
        self.httpd.close()

    def __enter__(self) -> KubeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Serving

    def _route(self, path: str) -> tuple[Resource, str | None]:
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _Fail(404, "NotFound", f"the server could not find the requested path {path}")
        namespace = None
        if len(rest) == 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        r = self.resources.get(rest[0]) if len(rest) == 1 else None
        if r is None or (r.group, r.version) != (group, version):
            raise _Fail(
                404, "NotFound", f"the server could not find the requested resource {path}"
            )
        if namespace and not r.namespaced:
            raise _Fail(404, "NotFound", f"{r.plural} is not namespaced")
        return r, namespace

    def list(self, r: Resource, namespace: str | None, q: _Query) -> dict[str, Any]:
        limit = int(q.get("limit") or 0)
        token = q.get("continue")
        with self.cond:
            if token:
                sid, offset = msgspec.json.decode(base64.urlsafe_b64decode(token))
                snap = self.snapshots.get(sid)
                if self.expire_continues > 0:
                    self.expire_continues -= 1
                    snap = None
                if snap is None or time.monotonic() - snap.made > self.continue_ttl:
                    raise _Fail(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter.",
                    )
            else:
                rv = q.get("resourceVersion")
                if rv not in ("", "0") and int(rv) <= self.compacted:
                    raise _Fail(
                        410, "Expired", f"too old resource version: {rv} ({self.compacted})"
                    )
                items = sorted(
                    (o for o in self.objects[r.plural].values() if q.matches(o, namespace)),
                    key=_key,
                )
                sid, offset = next(self._snapshot_ids), 0
                snap = Snapshot(self.rv, items)
                self.snapshots[sid] = snap
        end = offset + limit if limit else len(snap.items)
        page = [_item(o) for o in snap.items[offset:end]]
        meta: dict[str, Any] = {"resourceVersion": str(snap.rv)}
        if end < len(snap.items):
            meta["continue"] = base64.urlsafe_b64encode(msgspec.json.encode([sid, end])).decode()
            meta["remainingItemCount"] = len(snap.items) - end
        else:
            with self.cond:
                self.snapshots.pop(sid, None)
        return {
            "kind": f"{r.kind}List",
            "apiVersion": r.api_version,
            "metadata": meta,
            "items": page,
        }


class _Fail(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = _status(code, reason, message)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    kube: KubeServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        kube = self.kube
        url = urlsplit(self.path)
        q = _Query(parse_qs(url.query, keep_blank_values=True))
        watch = q.flag("watch")
        try:
            r, namespace = kube._route(url.path)
            with kube.cond:
                kube.requests.append(("watch" if watch else "list", r.plural, dict(q.raw)))
                kube.authorizations.append(self.headers.get("Authorization", ""))
            if watch:
                self._watch(r, namespace, q)
                return
            while kube.stall_list_headers.is_set() and not kube._closing:
                time.sleep(0.01)
            code = kube._failure("list")
            if code:
                raise _Fail(code, "Injected", f"injected failure {code}")
            doc = kube.list(r, namespace, q)
        except _Fail as fail:
            self._send_json(fail.status["code"], fail.status)
            return
        body = msgspec.json.encode(doc)
        if kube.stall_lists.is_set() and len(body) > 2:
            # Headers and half the body, then nothing until un-stalled or closed.
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            kube.list_stalled.set()
            while kube.stall_lists.is_set() and not kube._closing:
                time.sleep(0.01)
            self.close_connection = True
            return
        self._send_json(200, doc, body)

    def _send_json(self, code: int, doc: Any, body: bytes | None = None) -> None:
        body = msgspec.json.encode(doc) if body is None else body
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, r: Resource, namespace: str | None, q: _Query) -> None:
        kube = self.kube
        initial = q.flag("sendInitialEvents")
        if initial and not kube.streaming:
            raise _Fail(
                422,
                "Invalid",
                "sendInitialEvents is forbidden for watch unless the "
                "WatchList feature gate is enabled",
            )
        if initial and q.get("resourceVersionMatch") != "NotOlderThan":
            raise _Fail(
                422, "Invalid", "sendInitialEvents requires resourceVersionMatch=NotOlderThan"
            )
        if not initial and q.get("resourceVersionMatch"):
            raise _Fail(422, "Invalid", "resourceVersionMatch is forbidden for watch")
        bookmarks = q.flag("allowWatchBookmarks")
        timeout = float(q.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        rv_text = q.get("resourceVersion")
        encode = msgspec.json.encode
        lines: list[bytes] = []
        failure = kube._failure("watch")
        with kube.cond:
            garbage = kube._garbage[1] if kube._garbage[0] > 0 else b""
            kube._garbage[0] -= bool(garbage)
            gone = kube.gone_watches > 0
            if gone:
                kube.gone_watches -= 1
            start_rv = kube.rv
            if rv_text not in ("", "0") and not gone:
                start_rv = int(rv_text)
                gone = start_rv < kube.compacted
            if not gone and (initial or rv_text in ("", "0")):
                current = sorted(
                    (o for o in kube.objects[r.plural].values() if q.matches(o, namespace)),
                    key=_key,
                )
                lines = [encode({"type": "ADDED", "object": o}) for o in current]
                if initial and bookmarks:
                    lines.append(encode(_bookmark(r, start_rv, end=True)))
            drops, marks = kube._drops, kube._bookmarks
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if failure:
            status = _status(failure, "Injected", f"injected failure {failure}")
            self._chunk(encode({"type": "ERROR", "object": status}) + b"\n")
            self._end()
            return
        if gone:
            status = _status(
                410, "Expired", f"too old resource version: {rv_text} ({kube.compacted})"
            )
            self._chunk(encode({"type": "ERROR", "object": status}) + b"\n")
            self._end()
            return
        if garbage:
            self._chunk(garbage + b"\n")
        interval = kube.bookmark_interval
        next_mark = time.monotonic() + interval if interval else float("inf")
        # Every event up to seen_rv has been considered for this watch.
        seen_rv = start_rv
        try:
            for i in range(0, len(lines), 1000):
                self._chunk(b"\n".join(lines[i : i + 1000]) + b"\n")
            while True:
                with kube.cond:
                    while True:
                        now = time.monotonic()
                        if kube._closing or kube._drops != drops:
                            self._abort()
                            return
                        if now >= deadline:
                            break
                        if not kube.silent and (
                            kube.rv > seen_rv or kube._bookmarks != marks or now >= next_mark
                        ):
                            break
                        wait = 0.05 if kube.silent else min(deadline, next_mark) - now
                        kube.cond.wait(wait)
                    if now >= deadline:
                        break
                    if seen_rv < kube.compacted:
                        # Compacted past this watch's position: the apiserver ends it with 410.
                        status = _status(410, "Expired", f"too old resource version: {seen_rv}")
                        self._chunk(encode({"type": "ERROR", "object": status}) + b"\n")
                        break
                    events = kube.history[_after(kube.history, seen_rv) :]
                    seen_rv = kube.rv
                    mark = kube._bookmarks != marks or now >= next_mark
                    marks = kube._bookmarks
                out = []
                for e in events:
                    if e.resource == r.plural and (line := _filtered(e, q, namespace)):
                        out.append(encode(line))
                if mark and bookmarks:
                    out.append(encode(_bookmark(r, seen_rv)))
                if mark:
                    next_mark = time.monotonic() + interval if interval else float("inf")
                if out:
                    self._chunk(b"\n".join(out) + b"\n")
            self._end()
        except OSError:
            self.close_connection = True

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _abort(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _filtered(e: Event, q: _Query, namespace: str | None) -> dict[str, Any] | None:
    """The event a filtered watch sends for ``e``: objects entering or leaving the selector."""
    now = q.matches(e.obj, namespace)
    if e.type == "MODIFIED" and e.old is not None:
        before = q.matches(e.old, namespace)
        if before and not now:
            return {"type": "DELETED", "object": e.obj}
        if now and not before:
            return {"type": "ADDED", "object": e.obj}
    return {"type": e.type, "object": e.obj} if now else None


def _bookmark(r: Resource, rv: int, end: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"resourceVersion": str(rv)}
    if end:
        meta["annotations"] = {INITIAL_EVENTS_END: "true"}
    return {
        "type": "BOOKMARK",
        "object": {"kind": r.kind, "apiVersion": r.api_version, "metadata": meta},
    }


def _after(history: list[Event], rv: int) -> int:
    lo, hi = 0, len(history)
    while lo < hi:
        mid = (lo + hi) // 2
        if history[mid].rv <= rv:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    ns = meta.get("namespace")
    return f"{ns}/{meta['name']}" if ns else meta["name"]


def _item(obj: dict[str, Any]) -> dict[str, Any]:
    """A list item: built-in types' items carry no kind or apiVersion."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _copy(obj: Any) -> Any:
    """A deep copy (objects here are JSON)."""
    return msgspec.json.decode(msgspec.json.encode(obj))
