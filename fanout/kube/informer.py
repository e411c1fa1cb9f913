"""The Informer: client-go's informer for one resource, feeding a Distributor.

``Informer`` checks its arguments, starts and stops the two threads, and
answers ``has_synced``, ``wait_synced`` and ``stats``. What the threads run,
listing, watching, reconciling the store and resyncing, is the reflector in
``fanout.kube.reflector``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fanout.core.distributor import Distributor
from fanout.kube._client import default_api_client, resource_path
from fanout.kube.reflector import SILENCE_GRACE, Backoff, Reflector
from fanout.kube.store import IndexFunc, Store

__all__ = ["Informer", "InformerStats"]


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
        _check_distributor(distributor)
        _check_location(resource, version, group, namespace)
        _check_filters(label_selector, field_selector, transform)
        _check_pacing(page_size, watch_timeout, silence_timeout, min_backoff, max_backoff)
        _check_api_client(api_client)
        self.store = Store(indexers)
        self.resource = resource
        self._owns_distributor = distributor is None
        self._distributor = Distributor() if distributor is None else distributor
        self._path = resource_path(group, version, resource, namespace)
        selectors = [
            (name, sel)
            for name, sel in (("labelSelector", label_selector), ("fieldSelector", field_selector))
            if sel
        ]
        self._reflector = Reflector(
            self._distributor,
            self.store,
            api_client,
            self._path,
            selectors,
            transform,
            page_size,
            max(1, round(watch_timeout)),
            silence_timeout if silence_timeout is not None else (watch_timeout + SILENCE_GRACE),
            streaming,
            Backoff(min_backoff, max_backoff),
        )
        self._lock = threading.Lock()  # guards the two threads
        self._thread: threading.Thread | None = None
        self._resyncer: threading.Thread | None = None

    @property
    def error(self) -> BaseException | None:
        """The exception that ended the informer's thread, or ``None``."""
        return self._reflector.error

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
        if self._reflector.ended.is_set():
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
        reflector = self._reflector
        with self._lock:
            if self._thread is not None or reflector.stopping.is_set():
                raise RuntimeError(
                    f"{self!r} was started or stopped already; an informer runs once"
                )
            if reflector.api_client is None:
                reflector.api_client = default_api_client()
            if self._owns_distributor and not self._distributor.started:
                self._distributor.start()
            self._thread = threading.Thread(
                target=reflector.run, name=f"fanout-kube-{self.resource}", daemon=True
            )
            self._resyncer = threading.Thread(
                target=reflector.resync_loop,
                name=f"fanout-kube-{self.resource}-resync",
                daemon=True,
            )
            self._thread.start()
            self._resyncer.start()
        return self

    def has_synced(self) -> bool:
        """Say whether the first list is in the store and ``mark_synced`` was called.

        Returns:
            True once the informer has synced; it stays true.
        """
        return self._reflector.synced.is_set()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until ``has_synced()``, the informer ends, or ``timeout`` seconds pass.

        Args:
            timeout: seconds to wait; ``None`` waits as long as it takes.

        Returns:
            ``has_synced()`` at return: False on timeout, or if the informer
            ended first (see ``error``).
        """
        synced, ended = self._reflector.synced, self._reflector.ended
        deadline = None if timeout is None else time.monotonic() + timeout
        while not synced.is_set() and not ended.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            synced.wait(0.05 if left is None else min(left, 0.05))
        return synced.is_set()

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
        self._reflector.stopping.set()
        with self._lock:
            thread, resyncer = self._thread, self._resyncer
        self._reflector.abort_request()
        if thread is None or resyncer is None:
            self._reflector.ended.set()
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
        reflector = self._reflector
        rv_at = reflector.rv_at
        return InformerStats(
            resource=self.resource,
            synced=reflector.synced.is_set(),
            store_size=len(self.store),
            resource_version=reflector.rv,
            resource_version_age=None if rv_at is None else time.monotonic() - rv_at,
            last_error=reflector.last_error,
            **reflector.counts,
        )

    def __enter__(self) -> Informer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (never negative); None for no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _check_distributor(distributor: Any) -> None:
    """Raise unless ``distributor`` is a Distributor or None."""
    if distributor is not None and not isinstance(distributor, Distributor):
        raise TypeError(
            f"distributor must be a fanout.Distributor, or None for one the informer "
            f"makes, got {type(distributor).__name__}"
        )


def _check_location(resource: Any, version: Any, group: Any, namespace: Any) -> None:
    """Raise unless the names that make the resource's URL path are names."""
    for name, value in (("resource", resource), ("version", version)):
        if not isinstance(value, str) or not value or "/" in value:
            raise ValueError(f"{name} must be a non-empty name without '/', got {value!r}")
    if not isinstance(group, str) or "/" in group:
        raise ValueError(f"group must be an API group name ('' for core), got {group!r}")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise ValueError(
            f"namespace must be a non-empty string, or None for all, got {namespace!r}"
        )


def _check_filters(label_selector: Any, field_selector: Any, transform: Any) -> None:
    """Raise unless the selectors are strings (or None) and ``transform`` a function."""
    for name, sel in (("label_selector", label_selector), ("field_selector", field_selector)):
        if sel is not None and not isinstance(sel, str):
            raise TypeError(f"{name} must be a string or None, got {type(sel).__name__}")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be a function obj -> obj, got {transform!r}")


def _check_pacing(
    page_size: Any,
    watch_timeout: Any,
    silence_timeout: Any,
    min_backoff: Any,
    max_backoff: Any,
) -> None:
    """Raise unless the page size, timeouts and backoff bounds are in range."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    _check_seconds("watch_timeout", watch_timeout)
    if silence_timeout is not None:
        _check_seconds("silence_timeout", silence_timeout)
    _check_seconds("min_backoff", min_backoff)
    _check_seconds("max_backoff", max_backoff)
    if max_backoff < min_backoff:
        raise ValueError(f"max_backoff ({max_backoff}) is below min_backoff ({min_backoff})")


def _check_api_client(api_client: Any) -> None:
    """Raise unless ``api_client`` is None or looks like a kubernetes ApiClient."""
    if api_client is not None and not hasattr(api_client, "param_serialize"):
        raise TypeError(
            "api_client must be a kubernetes.client.ApiClient (kubernetes>=37), got "
            f"{type(api_client).__name__}; for a Configuration c pass ApiClient(c)"
        )


def _check_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
