"""The reflector: list, then watch, resume, relist; feeding a store and a Distributor.

client-go splits this into a Reflector, a DeltaFIFO and a sharedIndexInformer;
with one consumer (the distributor) the FIFO adds nothing, so one thread does it
all in order: decode a line, update the store, distribute the notification.
Per-key order follows: every notification for an object leaves in the order
the API server sent its changes. A second thread only re-sends the store for
resync, each object under the lock the first holds while it changes one.

Reconciliation (a relist, or a streaming list) offers each listed object: an
object the store does not hold becomes an ``Add``, one whose resourceVersion
differs an ``Update``, an unchanged one nothing; at the end of the list each
stored object the list did not name becomes a ``Delete`` of its last known
state. Objects are applied as they are offered, so a list interrupted halfway
is finished by the next one without repeating what did not change.

``fanout.kube.informer.Informer`` checks its arguments, owns the two threads and
answers the public questions; the loops they run and their state are here.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
from urllib3.exceptions import HTTPError as _HTTPError

from fanout.core.distributor import Distributor
from fanout.errors import DistributorStopped
from fanout.kube._client import ApiError, Request, close_api_client, status_error
from fanout.kube.store import Store
from fanout.notifications import Add, Delete, Notification, Update

__all__ = ["INITIAL_EVENTS_END", "SILENCE_GRACE", "Backoff", "Reflector"]

log = logging.getLogger("fanout.kube")

# The annotation on the bookmark that ends a streaming list's initial events.
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
GONE = 410
# Silence allowed past the server-side watch timeout before a watch counts as dead.
SILENCE_GRACE = 30.0
# What a broken connection or a garbled body raises: retried after a backoff.
TRANSIENT = (
    ApiError,
    OSError,
    _HTTPError,
    http.client.HTTPException,
    msgspec.DecodeError,
)


class _Gone(Exception):
    """The version the informer holds is gone: list again."""


class _Silent(Exception):
    """The watch said nothing for silence_timeout."""


class _Fatal(Exception):
    """User code (transform, an indexer) failed or the distributor stopped: end the informer."""


class Backoff:
    """Exponential backoff with full jitter, client-go's 800 ms to 30 s by default."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high
        self.delay = low

    def reset(self) -> None:
        """Start again from the smallest delay."""
        self.delay = self.low

    def wait(self, stopping: threading.Event) -> None:
        """Sleep the current delay plus up to as much again, unless stopping; then double it."""
        stopping.wait(self.delay * (1.0 + random.random()))
        self.delay = min(self.delay * 2.0, self.high)


def _meta(obj: Any) -> tuple[str, str]:
    """Return an object's store key (``namespace/name`` or ``name``) and resourceVersion."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or not meta.get("name"):
        raise ApiError(500, "BadObject", f"object without metadata.name: {str(obj)[:200]}")
    namespace = meta.get("namespace")
    key = f"{namespace}/{meta['name']}" if namespace else str(meta["name"])
    return key, str(meta.get("resourceVersion") or "")


class _Sync:
    """One list reconciled against the store (see the module docstring)."""

    def __init__(self, reflector: Reflector) -> None:
        self.reflector = reflector
        self.seen: set[str] = set()

    def offer(self, obj: Any) -> None:
        ref = self.reflector
        key, version = _meta(obj)
        self.seen.add(key)
        store = ref.store
        if key in store and store.version(key) == version:
            return
        new = ref._apply_transform(obj)
        with ref._delivering:
            old = store.get(key, _ABSENT)
            ref._put(key, new, version)
            if old is _ABSENT:
                ref._send(Add(new, not ref.synced.is_set()))
            else:
                ref._send(Update(old, new))

    def finish(self) -> None:
        ref = self.reflector
        for key in ref.store.keys():
            if key not in self.seen:
                with ref._delivering:
                    ref._send(Delete(ref.store._pop(key)))


_ABSENT = object()


class Reflector:
    """One resource's list/watch loop and resync loop, and the state they share.

    The informer's thread runs ``run``; its resync thread runs ``resync_loop``.
    ``stopping`` ends both; ``abort_request`` ends the request in flight.
    ``synced``, ``ended``, ``error``, ``counts``, ``rv``, ``rv_at`` and
    ``last_error`` are what ``Informer`` reports.
    """

    def __init__(
        self,
        distributor: Distributor,
        store: Store,
        api_client: Any,
        path: str,
        selectors: list[tuple[str, str]],
        transform: Callable[[Any], Any] | None,
        page_size: int,
        watch_timeout: int,
        silence: float,
        streaming: bool,
        backoff: Backoff,
    ) -> None:
        """``api_client``: ``None`` until ``Informer.start`` makes one, which ``run`` closes."""
        self.store = store
        self._distributor = distributor
        self._path = path
        self._selectors = selectors
        self._transform = transform
        self._page_size = page_size
        self._watch_timeout = watch_timeout
        self._silence = silence
        self._streaming = streaming
        self._backoff = backoff
        self._decode = msgspec.json.Decoder().decode
        self.api_client = api_client
        self.owns_client = api_client is None

        self._lock = threading.Lock()  # guards _request
        self._request: Request | None = None
        self.stopping = threading.Event()
        self.synced = threading.Event()
        self.ended = threading.Event()
        # Held while the store changes and the change is distributed, and while a
        # resync sends an object: a resync never sends an object older than one
        # already distributed for the same key.
        self._delivering = threading.Lock()
        self._need_list = True
        self._watched = False
        self.error: BaseException | None = None
        self.rv = ""
        self.rv_at: float | None = None
        self.last_error = ""
        self.counts = dict.fromkeys(
            (
                "lists",
                "list_restarts",
                "relists",
                "watch_restarts",
                "gone",
                "silent_watches",
                "events",
                "bookmarks",
                "errors",
                "resyncs",
            ),
            0,
        )

    def abort_request(self) -> None:
        """End the request in flight, if any (``stopping`` is set first)."""
        with self._lock:
            request = self._request
        if request is not None:
            request.abort()

    # The informer's thread

    def run(self) -> None:
        """List, then watch; after a failure back off and go again, until ``stopping``."""
        counts = self.counts
        try:
            while not self.stopping.is_set():
                listing = self._need_list
                try:
                    if listing:
                        counts["relists"] += counts["lists"] > 0
                        self._sync()
                        continue
                    counts["watch_restarts"] += self._watched
                    if self._watch(initial=False):
                        continue
                    # Ended by the server with nothing said: do not hammer it.
                except _Gone as exc:
                    counts["gone"] += 1
                    counts["list_restarts"] += self._need_list
                    self._need_list = True
                    self._note(f"410 Gone ({exc}); listing again")
                except _Silent as exc:
                    counts["silent_watches"] += 1
                    counts["list_restarts"] += self._need_list
                    self._note(str(exc))
                except TRANSIENT as exc:
                    if self.stopping.is_set():
                        break
                    counts["errors"] += 1
                    counts["list_restarts"] += self._need_list
                    self._note(f"{type(exc).__name__}: {exc}", level=logging.WARNING)
                self._backoff.wait(self.stopping)
        except _Fatal as exc:
            self.error = exc.__cause__ or exc
            if isinstance(self.error, DistributorStopped):
                log.info("informer %s: the distributor stopped; the informer ends", self._path)
            else:
                log.error("informer %s ends: %s", self._path, exc)
                self.last_error = str(exc)
        except Exception as exc:  # a bug, or a server answer nothing above expects
            self.error = exc
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("informer %s ends on an unexpected error", self._path)
        finally:
            self.ended.set()
            if self.owns_client and self.api_client is not None:
                close_api_client(self.api_client)

    def resync_loop(self) -> None:
        """Every check period, send the store to the listeners whose resync is due.

        client-go's resync: ``Update(obj, obj)`` with ``sync=True`` for every
        stored object, so only the due listeners get them. The period is the
        distributor's ``resync_check_period`` (0: no resync).
        """
        d = self._distributor
        while not self.stopping.wait(d.resync_check_period or 1.0):
            if not d.resync_check_period or not self.synced.is_set():
                continue
            if self.ended.is_set():
                return
            try:
                if not d.should_resync():
                    continue
                self.counts["resyncs"] += 1
                for key in self.store.keys():
                    with self._delivering:
                        obj = self.store.get(key, _ABSENT)
                        if obj is not _ABSENT:
                            self._send(Update(obj, obj), sync=True)
                    if self.stopping.is_set():
                        return
            except _Fatal as exc:
                if not isinstance(exc.__cause__, DistributorStopped):
                    log.error("informer %s: resync failed: %s", self._path, exc)
                return

    def _note(self, text: str, level: int = logging.INFO) -> None:
        self.last_error = text
        log.log(level, "informer %s: %s", self._path, text)

    def _sync(self) -> None:
        """List (streaming if the server can, else paged) and reconcile the store."""
        if self._streaming:
            try:
                self._watch(initial=True)
                return
            except ApiError as exc:
                # A 4xx before the list is done is the server refusing the request;
                # after it, the error is the watch's, and is retried as such.
                if not 400 <= exc.code < 500 or exc.code in (GONE, 429) or not self._need_list:
                    raise
                self._streaming = False
                log.info(
                    "informer %s: the server refused a streaming list (%s); "
                    "using list + watch from now on",
                    self._path,
                    exc,
                )
        self._list()

    def _list(self) -> None:
        sync = _Sync(self)
        cont = ""
        while True:
            query: list[tuple[str, Any]] = [("limit", self._page_size), *self._selectors]
            if cont:
                query.append(("continue", cont))
            with self._in_flight():
                doc = self._open(query).read_json()
            if self.stopping.is_set():
                return
            items = doc.get("items") or ()
            kind = str(doc.get("kind") or "")
            kind = kind[:-4] if kind.endswith("List") else ""
            api_version = doc.get("apiVersion")
            for item in items:
                # Items of a list carry no kind; watch events' objects do. Fill
                # it in so old and new objects look alike.
                if kind and "kind" not in item:
                    item["kind"] = kind
                    item["apiVersion"] = api_version
                sync.offer(item)
            meta = doc.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                break
        self._set_rv(str(meta.get("resourceVersion") or ""))
        self._finish(sync)

    def _watch(self, initial: bool) -> bool:
        """Run one watch request to its end; ``initial``: a streaming list first.

        Returns whether the server sent anything (an event or a bookmark).
        """
        query: list[tuple[str, Any]] = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", self._watch_timeout),
            *self._selectors,
        ]
        if initial:
            query += [("sendInitialEvents", "true"), ("resourceVersionMatch", "NotOlderThan")]
            sync: _Sync | None = _Sync(self)
        else:
            query.append(("resourceVersion", self.rv))
            sync = None
        self._watched = True
        silence = self._silence
        last = time.monotonic()
        said = False
        with self._in_flight():
            try:
                request = self._open(query)
                buffer = bytearray()
                for chunk in request.chunks():
                    buffer += chunk
                    start = 0
                    while (end := buffer.find(b"\n", start)) >= 0:
                        if end > start:
                            sync = self._event(self._decode(memoryview(buffer)[start:end]), sync)
                            last = time.monotonic()
                            said = True
                        start = end + 1
                    if start:
                        del buffer[:start]
                    if time.monotonic() - last > silence:
                        raise _Silent(f"no event or bookmark for {silence:g} s; watching again")
                    if self.stopping.is_set():
                        return said
                if sync is not None:
                    raise ApiError(
                        0, "StreamEnded", "streaming list ended before its last bookmark"
                    )
                return said
            except (OSError, _HTTPError, http.client.HTTPException) as exc:
                if self.stopping.is_set():
                    return said
                if time.monotonic() - last >= silence:
                    raise _Silent(
                        f"no event or bookmark for {silence:g} s; watching again"
                    ) from exc
                raise

    def _event(self, event: Any, sync: _Sync | None) -> _Sync | None:
        """Apply one watch event; return the streaming list's sync while it lasts."""
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise ApiError(500, "BadEvent", f"not a watch event: {str(event)[:200]}")
        kind = event.get("type")
        obj = event["object"]
        if kind == "BOOKMARK":
            self.counts["bookmarks"] += 1
            meta = obj.get("metadata")
            if not isinstance(meta, dict):
                raise ApiError(500, "BadEvent", f"bookmark without metadata: {str(obj)[:200]}")
            self._set_rv(str(meta.get("resourceVersion") or self.rv))
            self._backoff.reset()
            if sync is not None and (meta.get("annotations") or {}).get(INITIAL_EVENTS_END):
                self._finish(sync)
                return None
            return sync
        if kind == "ERROR":
            raise status_error(obj)
        if sync is not None:
            sync.offer(obj)
            return sync
        key, version = _meta(obj)
        store = self.store
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise ApiError(500, "BadEvent", f"watch event of unknown type {kind!r}")
        new = self._apply_transform(obj)
        with self._delivering:
            if kind == "DELETED":
                store._pop(key)
                self._send(Delete(new))
            else:
                old = store.get(key, _ABSENT)
                self._put(key, new, version)
                self._send(Add(new) if old is _ABSENT else Update(old, new))
        self.counts["events"] += 1
        self._set_rv(version)
        self._backoff.reset()
        return None

    # Helpers

    def _open(self, query: list[tuple[str, Any]]) -> Request:
        request = Request(self.api_client, self._path, query, (self._silence, self._silence))
        with self._lock:
            self._request = request
        if self.stopping.is_set():
            request.abort()
        return request

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        """Around one request: a 410 means listing again; the request is released after."""
        try:
            yield
        except ApiError as exc:
            if exc.code == GONE:
                raise _Gone(exc) from exc
            raise
        finally:
            self._request_done()

    def _request_done(self) -> None:
        with self._lock:
            request, self._request = self._request, None
        if request is not None:
            request.close()

    def _set_rv(self, version: str) -> None:
        if version:
            self.rv = version
            self.rv_at = time.monotonic()

    def _finish(self, sync: _Sync) -> None:
        """End a list: deletions, the count, then the watch; the first one marks synced."""
        sync.finish()
        self.counts["lists"] += 1
        self._need_list = False
        if not self.synced.is_set():
            try:
                self._distributor.mark_synced()
            except DistributorStopped as exc:
                raise _Fatal("the distributor stopped") from exc
            self.synced.set()

    def _apply_transform(self, obj: Any) -> Any:
        if self._transform is None:
            return obj
        try:
            return self._transform(obj)
        except Exception as exc:
            raise _Fatal(f"transform raised {type(exc).__name__}: {exc}") from exc

    def _put(self, key: str, obj: Any, version: str) -> None:
        try:
            self.store._put(key, obj, version)
        except Exception as exc:
            raise _Fatal(f"an indexer raised {type(exc).__name__} for {key!r}: {exc}") from exc

    def _send(self, n: Notification, sync: bool = False) -> None:
        try:
            self._distributor.distribute(n, sync=sync)
        except DistributorStopped as exc:
            raise _Fatal("the distributor stopped") from exc
        except Exception as exc:
            raise _Fatal(f"distribute raised {type(exc).__name__}: {exc}") from exc
