"""The informer's indexed store (client-go ``cache.Indexer``), filled by one reflector.

One writer (the informer's thread) and any number of readers. Index functions
are user code, so the writer computes an object's index values before it takes
the lock, and keeps them per key: removing or replacing an object never calls
an index function on the old object again.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["NAMESPACE_INDEX", "IndexFunc", "Store"]

IndexFunc = Callable[[Any], Iterable[str]]

NAMESPACE_INDEX = "namespace"


class Store:
    """A thread-safe map from key to the informer's latest view of each object.

    Keys are ``namespace/name``, or ``name`` for a cluster-scoped object. The
    values are the objects as handlers see them (after the informer's
    ``transform``). Reads never block the informer for longer than a dict copy.

    The ``namespace`` index is built in: ``by_index("namespace", "ns")`` lists
    the objects of one namespace (``""`` for cluster-scoped ones), read from
    the key, so it works whatever ``transform`` keeps.

    Args:
        indexers: named index functions (client-go ``Indexers``): each takes an
            object (as stored) and returns the index values it belongs under,
            an iterable of strings. ``namespace`` is reserved for the built-in
            index.

    Raises:
        ValueError: an indexer is named ``namespace``.
        TypeError: an indexer is not callable.
    """

    def __init__(self, indexers: Mapping[str, IndexFunc] | None = None) -> None:
        indexers = dict(indexers or {})
        for name, func in indexers.items():
            if name == NAMESPACE_INDEX:
                raise ValueError(
                    f"indexer name {name!r} is built in (the namespace index); "
                    "give your indexer another name"
                )
            if not callable(func):
                raise TypeError(
                    f"indexer {name!r} must be a function obj -> iterable of str, "
                    f"got {type(func).__name__}"
                )
        self._indexers: dict[str, IndexFunc] = indexers
        self._lock = threading.Lock()
        self._items: dict[str, Any] = {}
        # key -> resourceVersion, kept apart: transform may drop the metadata.
        self._versions: dict[str, str] = {}
        # index name -> value -> keys, and index name -> key -> its values.
        self._indices: dict[str, dict[str, set[str]]] = {
            name: {} for name in (NAMESPACE_INDEX, *indexers)
        }
        self._values: dict[str, dict[str, tuple[str, ...]]] = {
            name: {} for name in (NAMESPACE_INDEX, *indexers)
        }

    def __repr__(self) -> str:
        return f"<fanout.kube.Store {len(self)} objects, indexes {sorted(self._indices)}>"

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: str, default: Any = None) -> Any:
        """Look an object up by key.

        Args:
            key: ``namespace/name``, or ``name`` for a cluster-scoped object.
            default: what to return when nothing is stored under ``key``.

        Returns:
            The stored object (after the informer's ``transform``), else ``default``.
        """
        return self._items.get(key, default)

    def list(self) -> builtins.list[Any]:
        """List the stored objects.

        Returns:
            A new list of every stored object, in no particular order.
        """
        with self._lock:
            return list(self._items.values())

    def keys(self) -> builtins.list[str]:
        """List the keys.

        Returns:
            A new list of every key, in no particular order.
        """
        with self._lock:
            return list(self._items)

    def index_names(self) -> builtins.list[str]:
        """Name the indexes.

        Returns:
            The index names, the built-in ``namespace`` first.
        """
        return list(self._indices)

    def index_keys(self, index: str, value: str) -> builtins.list[str]:
        """Look keys up in an index.

        Args:
            index: the index's name (``namespace``, or one of ``indexers``).
            value: the index value, e.g. a namespace's name.

        Returns:
            The keys of the objects that ``index`` files under ``value``.

        Raises:
            KeyError: no index has that name.
        """
        with self._lock:
            return list(self._index(index).get(value, ()))

    def by_index(self, index: str, value: str) -> builtins.list[Any]:
        """Look objects up in an index (client-go ``ByIndex``).

        Args:
            index: the index's name (``namespace``, or one of ``indexers``).
            value: the index value, e.g. a namespace's name.

        Returns:
            The objects that ``index`` files under ``value`` (a new list).

        Raises:
            KeyError: no index has that name.
        """
        with self._lock:
            items = self._items
            return [items[k] for k in self._index(index).get(value, ())]

    def _index(self, index: str) -> dict[str, set[str]]:
        try:
            return self._indices[index]
        except KeyError:
            raise KeyError(
                f"no index named {index!r}; this store has {sorted(self._indices)} "
                "(pass indexers= to the Informer to add one)"
            ) from None

    def version(self, key: str) -> str | None:
        """Look an object's resourceVersion up.

        Args:
            key: ``namespace/name``, or ``name`` for a cluster-scoped object.

        Returns:
            The resourceVersion of the object stored under ``key``, else None.
        """
        return self._versions.get(key)

    # The writer side: only the informer's thread calls these.

    def _put(self, key: str, obj: Any, version: str) -> None:
        """Store ``obj`` under ``key`` and re-file it in every index."""
        values = self._index_values(key, obj)
        with self._lock:
            self._items[key] = obj
            self._versions[key] = version
            for name, new in values.items():
                self._refile(name, key, new)

    def _pop(self, key: str) -> Any:
        """Remove ``key`` and return what was stored under it (None if nothing)."""
        with self._lock:
            self._versions.pop(key, None)
            for name in self._indices:
                self._refile(name, key, ())
            return self._items.pop(key, None)

    def _index_values(self, key: str, obj: Any) -> dict[str, tuple[str, ...]]:
        namespace = key.rpartition("/")[0]
        values: dict[str, tuple[str, ...]] = {NAMESPACE_INDEX: (namespace,)}
        for index, func in self._indexers.items():
            got = func(obj)
            if isinstance(got, str):
                # A bare string would be filed under each of its characters.
                raise TypeError(
                    f"indexer {index!r} returned the string {got!r} for {key!r}; "
                    "it must return an iterable of strings, e.g. [value]"
                )
            values[index] = tuple(got)
        return values

    def _refile(self, index: str, key: str, new: tuple[str, ...]) -> None:
        old = self._values[index].pop(key, ())
        if old == new:
            if new:
                self._values[index][key] = new
            return
        buckets = self._indices[index]
        for value in old:
            bucket = buckets.get(value)
            if bucket is not None:
                bucket.discard(key)
                if not bucket:
                    del buckets[value]
        for value in new:
            buckets.setdefault(value, set()).add(key)
        if new:
            self._values[index][key] = new
