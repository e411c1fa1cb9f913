"""A Kubernetes informer feeding a ``Distributor`` (extra ``kube``).

``Informer`` lists and watches one resource through the official ``kubernetes``
client, keeps an indexed ``Store`` of it, and distributes every change as
``Add`` / ``Update`` / ``Delete``. Needs ``pip install 'fanout-informer[kube]'``.
"""

from fanout.kube._client import ApiError
from fanout.kube.informer import Informer, InformerStats
from fanout.kube.reflector import INITIAL_EVENTS_END
from fanout.kube.store import NAMESPACE_INDEX, Store

__all__ = [
    "INITIAL_EVENTS_END",
    "NAMESPACE_INDEX",
    "ApiError",
    "Informer",
    "InformerStats",
    "Store",
]
