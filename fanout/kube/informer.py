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
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from urllib3.exceptions import HTTPError as _HTTPError

from fanout.core.distributor import Distributor
from fanout.errors import DistributorStopped
from fanout.kube._client import (
    ApiError,
    Request,
    close_api_client,
    default_api_client,
    resource_path,
    status_error,
)
from fanout.kube.store import IndexFunc, Store
from fanout.notifications import Add, Delete, Notification, Update

__all__ = ["INITIAL_EVENTS_END", "Informer", "InformerStats"]

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


@dataclass(frozen=True, slots=True)
class InformerStats:
    """A snapshot of one informer's counters (``Informer.stats()``).

    Attributes:
        resource: the resource name the informer watches (``pods``).
        synced: the first list has been delivered and ``mark_synced`` called.
        store_size: objects in the store.
        lists: lists (paged or streaming) that ran to their end.
        list_restarts: lists abandoned before their end (an expired continue
            token, a dropped connection, a 410) and started again.
        relists: lists after the first, each reconciled against the store.
        watch_restarts: watches started again after the first one, for any
            reason (server timeout, drop, silence, 410).
        gone: "410 Gone" answers (too old a resourceVersion, an expired
            continue token), on watch or list.
        silent_watches: watches restarted because nothing, not even a
            bookmark, arrived for ``silence_timeout``.
        events: watch events delivered (ADDED, MODIFIED, DELETED; not bookmarks).
        bookmarks: bookmarks received.
        errors: failed requests (each retried after a backoff).
        resyncs: times the store was sent to listeners whose resync was due.
        resource_version: the last resourceVersion seen ("" before the first).
        resource_version_age: seconds since the last resourceVersion arrived
            (an event, a bookmark or a list); ``None`` before the first.
        last_error: the text of the last error, "" if none.
    """

    resource: str
    synced: bool
    store_size: int
    lists: int
    list_restarts: int
    relists: int
    watch_restarts: int
    gone: int
    silent_watches: int
    events: int
    bookmarks: int
    errors: int
    resyncs: int
    resource_version: str
    resource_version_age: float | None
    last_error: str


class _Gone(Exception):
    """The version the informer holds is gone: list again."""


class _Silent(Exception):
    """The watch said nothing for silence_timeout."""


class _Fatal(Exception):
    """User code (transform, an indexer) failed or the distributor stopped: end the informer."""


class _Backoff:
    """Exponential backoff with full jitter, client-go's 800 ms to 30 s by default."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high
        self.delay = low

    def reset(self) -> None:
        self.delay = self.low

    def wait(self, stopping: threading.Event) -> None:
        """Sleep the current delay plus up to as much again, unless stopping; then double it."""
        stopping.wait(self.delay * (1.0 + random.random()))
        self.delay = min(self.delay * 2.0, self.high)


def _left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (never negative); None for no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


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

    def __init__(self, informer: Informer) -> None:
        self.informer = informer
        self.seen: set[str] = set()

    def offer(self, obj: Any) -> None:
        inf = self.informer
        key, version = _meta(obj)
        self.seen.add(key)
        store = inf.store
        if key in store and store.version(key) == version:
            return
        new = inf._apply_transform(obj)
        with inf._delivering:
            old = store.get(key, _ABSENT)
            inf._put(key, new, version)
            if old is _ABSENT:
                inf._send(Add(new, not inf._synced.is_set()))
            else:
                inf._send(Update(old, new))

    def finish(self) -> None:
        inf = self.informer
        for key in inf.store.keys():
            if key not in self.seen:
                with inf._delivering:
                    inf._send(Delete(inf.store._pop(key)))


_ABSENT = object()


class Informer:
    """client-go's reflector and indexed store for one resource, feeding a Distributor.

    ``start()`` lists the resource (as a streaming list where the server
    offers one, else paged), delivers each object as
    ``Add(obj, is_in_initial_list=True)``, calls ``distributor.mark_synced()``,
    then watches from the list's resourceVersion: ADDED, MODIFIED and DELETED
    become ``Add``, ``Update(old, new)`` (``old`` from the store) and
    ``Delete``. A dropped watch resumes from the last resourceVersion seen,
    bookmarks included; "410 Gone" means a relist reconciled against the
    store; a silent watch is restarted. Failed requests are retried with
    jittered exponential backoff. Objects are plain dicts, decoded by msgspec.
    Listeners with a ``resync_period`` get the store again as
    ``Update(obj, obj)`` when due (client-go's resync).

    Args:
        distributor: the ``fanout.Distributor`` to feed; starting and stopping
            it stays the caller's job. ``None``: the informer makes one
            (``Informer.distributor``: add listeners to it before ``start()``),
            starts it in ``start()`` and stops it, draining, in ``stop()``.
        resource: the resource's plural name, as in its URL: ``pods``,
            ``deployments``, ``widgets`` (a custom resource).
        api_client: a ``kubernetes.client.ApiClient`` carrying host, TLS and
            credentials. ``None``: one built from the kubeconfig
            (``KUBECONFIG`` or ``~/.kube/config``), else from the in-cluster
            service account, and closed by ``stop()``.
        namespace: watch one namespace; ``None`` watches all namespaces (and is
            the only choice for a cluster-scoped resource).
        group: the API group; ``""`` for the core group (pods, services, ...),
            ``"apps"`` for deployments, ``"example.com"`` for a custom resource.
        version: the API version within the group (``"v1"``).
        label_selector: a label selector (``"app=web,tier!=db"``), or ``None``.
        field_selector: a field selector (``"spec.nodeName=node-1"``), or ``None``.
        transform: called on each object (a dict) before it reaches the store
            and the distributor (client-go ``SetTransform``); return the object
            to keep, for example without ``managedFields``. Keep ``metadata``'s
            ``name`` and ``namespace`` if listeners use the default ``key``.
            If it raises, the informer logs the error and ends (``error``).
        page_size: objects per list page (``limit``).
        watch_timeout: seconds a watch request lasts (``timeoutSeconds``, ended
            by the server); the informer then resumes from where it was.
        silence_timeout: a watch that sends nothing, not even a bookmark, for
            this many seconds is restarted; also the read timeout of every
            request. ``None``: ``watch_timeout`` plus 30 s.
        indexers: named index functions for the store (client-go ``Indexers``),
            each ``obj -> iterable of str``; the ``namespace`` index is built in.
        streaming: try a streaming list (one watch with
            ``sendInitialEvents=true``) for every list, falling back to paged
            list + watch for good if the server refuses it.
        min_backoff: the first retry delay in seconds after a failure; it
            doubles (plus up to as much jitter) up to ``max_backoff`` and
            resets once a watch delivers something.
        max_backoff: the largest retry delay in seconds.

    Raises:
        TypeError: ``distributor``, ``api_client``, ``transform`` or an indexer
            is not what it should be.
        ValueError: a name, size or timeout is out of range.
    """

    def __init__(
        self,
        distributor: Distributor | None,
        resource: str,
        api_client: Any = None,
        namespace: str | None = None,
        group: str = "",
        version: str = "v1",
        label_selector: str | None = None,
        field_selector: str | None = None,
        transform: Callable[[Any], Any] | None = None,
        page_size: int = 500,
        watch_timeout: float = 300.0,
        silence_timeout: float | None = None,
        indexers: Mapping[str, IndexFunc] | None = None,
        streaming: bool = True,
        min_backoff: float = 0.8,
        max_backoff: float = 30.0,
    ) -> None:
        if distributor is not None and not isinstance(distributor, Distributor):
            raise TypeError(
                f"distributor must be a fanout.Distributor, or None for one the informer "
                f"makes, got {type(distributor).__name__}"
            )
        for name, value in (("resource", resource), ("version", version)):
            if not isinstance(value, str) or not value or "/" in value:
                raise ValueError(f"{name} must be a non-empty name without '/', got {value!r}")
        if not isinstance(group, str) or "/" in group:
            raise ValueError(f"group must be an API group name ('' for core), got {group!r}")
        if namespace is not None and (not isinstance(namespace, str) or not namespace):
            raise ValueError(
                f"namespace must be a non-empty string, or None for all, got {namespace!r}"
            )
        for name, sel in (("label_selector", label_selector), ("field_selector", field_selector)):
            if sel is not None and not isinstance(sel, str):
                raise TypeError(f"{name} must be a string or None, got {type(sel).__name__}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be a function obj -> obj, got {transform!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        _check_seconds("watch_timeout", watch_timeout)
        if silence_timeout is not None:
            _check_seconds("silence_timeout", silence_timeout)
        _check_seconds("min_backoff", min_backoff)
        _check_seconds("max_backoff", max_backoff)
        if max_backoff < min_backoff:
            raise ValueError(f"max_backoff ({max_backoff}) is below min_backoff ({min_backoff})")
        if api_client is not None and not hasattr(api_client, "param_serialize"):
            raise TypeError(
                "api_client must be a kubernetes.client.ApiClient (kubernetes>=37), got "
                f"{type(api_client).__name__}; for a Configuration c pass ApiClient(c)"
            )
        self.store = Store(indexers)
        self.resource = resource
        self._owns_distributor = distributor is None
        self._distributor = Distributor() if distributor is None else distributor
        self._api_client = api_client
        self._owns_client = api_client is None
        self._path = resource_path(group, version, resource, namespace)
        self._selectors = [
            (name, sel)
            for name, sel in (("labelSelector", label_selector), ("fieldSelector", field_selector))
            if sel
        ]
        self._transform = transform
        self._page_size = page_size
        self._watch_timeout = max(1, round(watch_timeout))
        self._silence = (
            silence_timeout if silence_timeout is not None else (watch_timeout + SILENCE_GRACE)
        )
        self._streaming = streaming
        self._backoff = _Backoff(min_backoff, max_backoff)
        self._decode = msgspec.json.Decoder().decode

        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._ended = threading.Event()
        self._request: Request | None = None
        # Held while the store changes and the change is distributed, and while a
        # resync sends an object: a resync never sends an object older than one
        # already distributed for the same key.
        self._delivering = threading.Lock()
        self._resyncer: threading.Thread | None = None
        self._need_list = True
        self._watched = False
        self.error: BaseException | None = None
        self._rv = ""
        self._rv_at: float | None = None
        self._last_error = ""
        self._counts = dict.fromkeys(
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

    @property
    def distributor(self) -> Distributor:
        """The Distributor this informer feeds (the one it made, if given ``None``)."""
        return self._distributor

    @property
    def path(self) -> str:
        """The collection's URL path, e.g. ``/api/v1/namespaces/prod/pods``."""
        return self._path

    def __repr__(self) -> str:
        state = "synced" if self.has_synced() else "syncing"
        if self._ended.is_set():
            state = "ended"
        return f"<fanout.kube.Informer {self._path} {state}, {len(self.store)} objects>"

    # Public API

    def start(self) -> Informer:
        """Start listing and watching in a thread of its own; return at once.

        Returns:
            The informer, so ``inf = Informer(d, "pods").start()`` reads naturally.

        Raises:
            RuntimeError: the informer was started (or stopped) before.
            fanout.WorkerStartError: the informer made its distributor and a
                listener's workers could not build their handler.
            kubernetes.config.ConfigException: ``api_client`` is ``None`` and no
                kubeconfig or in-cluster configuration was found.
        """
        with self._lock:
            if self._thread is not None or self._stopping.is_set():
                raise RuntimeError(
                    f"{self!r} was started or stopped already; an informer runs once"
                )
            if self._api_client is None:
                self._api_client = default_api_client()
            if self._owns_distributor and not self._distributor.started:
                self._distributor.start()
            self._thread = threading.Thread(
                target=self._run, name=f"fanout-kube-{self.resource}", daemon=True
            )
            self._resyncer = threading.Thread(
                target=self._resync_loop, name=f"fanout-kube-{self.resource}-resync", daemon=True
            )
            self._thread.start()
            self._resyncer.start()
        return self

    def has_synced(self) -> bool:
        """Say whether the first list is in the store and ``mark_synced`` was called.

        Returns:
            True once the informer has synced; it stays true.
        """
        return self._synced.is_set()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until ``has_synced()``, the informer ends, or ``timeout`` seconds pass.

        Args:
            timeout: seconds to wait; ``None`` waits as long as it takes.

        Returns:
            ``has_synced()`` at return: False on timeout, or if the informer
            ended first (see ``error``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._synced.is_set() and not self._ended.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._synced.wait(0.05 if left is None else min(left, 0.05))
        return self._synced.is_set()

    def stop(self, timeout: float | None = None) -> bool:
        """End the list or watch in flight and the informer's thread. Idempotent.

        A request waiting for the server's first byte can take up to
        ``silence_timeout`` to give up; one reading a body ends at once. A
        ``distribute`` blocked by a full listener (``overflow="block"``) keeps
        the thread until that listener makes room or the distributor stops.
        The caller's distributor is left running: it is the caller's to stop.
        One the informer made is stopped after the thread ends, delivering what
        it holds first (within ``timeout``).

        Args:
            timeout: seconds to wait for the thread; ``None`` waits as long as
                it takes.

        Returns:
            True if the thread has ended (or never started) and, for a
            distributor the informer made, its stop delivered everything.

        Raises:
            RuntimeError: called from a handler running on the informer's own
                thread (it would wait for itself).
        """
        self._stopping.set()
        with self._lock:
            thread, resyncer, request = self._thread, self._resyncer, self._request
        if request is not None:
            request.abort()
        if thread is None or resyncer is None:
            self._ended.set()
            return self._stop_own_distributor(timeout)
        if threading.current_thread() in (thread, resyncer):
            raise RuntimeError(
                "Informer.stop() called on the informer's own thread; call it from another one"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        thread.join(timeout)
        resyncer.join(_left(deadline))
        ended = not thread.is_alive() and not resyncer.is_alive()
        return self._stop_own_distributor(_left(deadline)) and ended

    def _stop_own_distributor(self, timeout: float | None) -> bool:
        """Stop, draining, the distributor this informer made; True when nothing was lost."""
        if not self._owns_distributor:
            return True
        return self._distributor.stop(drain=True, timeout=timeout)

    def stats(self) -> InformerStats:
        """Read the informer's counters.

        Returns:
            A snapshot (``InformerStats``); reading it changes nothing.
        """
        rv_at = self._rv_at
        return InformerStats(
            resource=self.resource,
            synced=self._synced.is_set(),
            store_size=len(self.store),
            resource_version=self._rv,
            resource_version_age=None if rv_at is None else time.monotonic() - rv_at,
            last_error=self._last_error,
            **self._counts,
        )

    def __enter__(self) -> Informer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # The informer's thread

    def _run(self) -> None:
        counts = self._counts
        try:
            while not self._stopping.is_set():
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
                    if self._stopping.is_set():
                        break
                    counts["errors"] += 1
                    counts["list_restarts"] += self._need_list
                    self._note(f"{type(exc).__name__}: {exc}", level=logging.WARNING)
                self._backoff.wait(self._stopping)
        except _Fatal as exc:
            self.error = exc.__cause__ or exc
            if isinstance(self.error, DistributorStopped):
                log.info("informer %s: the distributor stopped; the informer ends", self._path)
            else:
                log.error("informer %s ends: %s", self._path, exc)
                self._last_error = str(exc)
        except Exception as exc:  # a bug, or a server answer nothing above expects
            self.error = exc
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.exception("informer %s ends on an unexpected error", self._path)
        finally:
            self._ended.set()
            if self._owns_client and self._api_client is not None:
                close_api_client(self._api_client)

    def _resync_loop(self) -> None:
        """Every check period, send the store to the listeners whose resync is due.

        client-go's resync: ``Update(obj, obj)`` with ``sync=True`` for every
        stored object, so only the due listeners get them. The period is the
        distributor's ``resync_check_period`` (0: no resync).
        """
        d = self._distributor
        while not self._stopping.wait(d.resync_check_period or 1.0):
            if not d.resync_check_period or not self._synced.is_set():
                continue
            if self._ended.is_set():
                return
            try:
                if not d.should_resync():
                    continue
                self._counts["resyncs"] += 1
                for key in self.store.keys():
                    with self._delivering:
                        obj = self.store.get(key, _ABSENT)
                        if obj is not _ABSENT:
                            self._send(Update(obj, obj), sync=True)
                    if self._stopping.is_set():
                        return
            except _Fatal as exc:
                if not isinstance(exc.__cause__, DistributorStopped):
                    log.error("informer %s: resync failed: %s", self._path, exc)
                return

    def _note(self, text: str, level: int = logging.INFO) -> None:
        self._last_error = text
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
            if self._stopping.is_set():
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
            query.append(("resourceVersion", self._rv))
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
                    if self._stopping.is_set():
                        return said
                if sync is not None:
                    raise ApiError(
                        0, "StreamEnded", "streaming list ended before its last bookmark"
                    )
                return said
            except (OSError, _HTTPError, http.client.HTTPException) as exc:
                if self._stopping.is_set():
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
            self._counts["bookmarks"] += 1
            meta = obj.get("metadata")
            if not isinstance(meta, dict):
                raise ApiError(500, "BadEvent", f"bookmark without metadata: {str(obj)[:200]}")
            self._set_rv(str(meta.get("resourceVersion") or self._rv))
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
        self._counts["events"] += 1
        self._set_rv(version)
        self._backoff.reset()
        return None

    # Helpers

    def _open(self, query: list[tuple[str, Any]]) -> Request:
        request = Request(self._api_client, self._path, query, (self._silence, self._silence))
        with self._lock:
            self._request = request
        if self._stopping.is_set():
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
            self._rv = version
            self._rv_at = time.monotonic()

    def _finish(self, sync: _Sync) -> None:
        """End a list: deletions, the count, then the watch; the first one marks synced."""
        sync.finish()
        self._counts["lists"] += 1
        self._need_list = False
        if not self._synced.is_set():
            try:
                self._distributor.mark_synced()
            except DistributorStopped as exc:
                raise _Fatal("the distributor stopped") from exc
            self._synced.set()

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


def _check_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
