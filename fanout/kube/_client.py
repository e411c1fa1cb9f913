"""Raw list and watch requests through the official client's ``ApiClient``.

The client does everything that is configuration: host, TLS, client
certificates, bearer tokens and their refresh (exec plugins, in-cluster token
files). fanout asks it for a serialised GET, sends it with the client's own
REST layer, and reads the body itself: JSON decoded by msgspec into plain
dicts, never into the client's model classes.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import msgspec  # a core dependency of fanout

from fanout._version import DISTRIBUTION

try:
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config
    from kubernetes.client.exceptions import ApiException
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        f"fanout.kube needs the official Kubernetes client: pip install "
        f"'{DISTRIBUTION}[kube]' (or pip install kubernetes)"
    ) from exc

__all__ = ["ApiError", "Request", "close_api_client", "default_api_client", "resource_path"]

# The auth scheme of every Kubernetes endpoint in the client's OpenAPI spec;
# naming it makes the client add the token (refreshed by exec plugins first).
AUTH_SETTINGS = ["BearerToken"]
READ_SIZE = 1 << 16


class ApiError(Exception):
    """The API server answered a request with an error status (or an ERROR event)."""

    def __init__(self, code: int, reason: str, message: str = "") -> None:
        super().__init__(f"{code} {reason}: {message}" if message else f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.message = message


def default_api_client() -> Any:
    """Build an ``ApiClient`` from the kubeconfig, else from the in-cluster service account."""
    try:
        # persist_config=False: refreshed credentials stay in memory; fanout
        # never writes the user's kubeconfig.
        return k8s_config.new_client_from_config(persist_config=False)
    except k8s_config.ConfigException as kube_error:
        configuration = k8s_client.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except k8s_config.ConfigException as cluster_error:
            raise k8s_config.ConfigException(
                f"no Kubernetes configuration: kubeconfig: {kube_error}; "
                f"in-cluster: {cluster_error}. Pass api_client= (a kubernetes.client.ApiClient)"
            ) from cluster_error
        return k8s_client.ApiClient(configuration)


def close_api_client(api_client: Any) -> None:
    """Close an ``ApiClient`` and every connection it keeps.

    ``ApiClient.close()`` clears urllib3's pool manager, which (urllib3 2)
    forgets its pools without closing them: their sockets stay open until the
    garbage collector finds them. Close each pool first.
    """
    pools = api_client.rest_client.pool_manager.pools
    for key in pools.keys():
        pool = pools.get(key)
        if pool is not None:
            pool.close()
    api_client.close()


def resource_path(group: str, version: str, resource: str, namespace: str | None) -> str:
    """Return the collection's URL path: ``/api/v1/...`` for core, ``/apis/g/v/...`` else."""
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    if namespace:
        return f"{base}/namespaces/{namespace}/{resource}"
    return f"{base}/{resource}"


def _status_error(status: int, body: bytes) -> ApiError:
    """Turn an error response (a ``Status`` object, usually) into an ``ApiError``."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        doc = None
    if isinstance(doc, dict):
        return ApiError(
            int(doc.get("code") or status),
            str(doc.get("reason") or ""),
            str(doc.get("message") or ""),
        )
    return ApiError(status, "", body[:200].decode("utf-8", "replace"))


def status_error(obj: Any) -> ApiError:
    """Turn a watch ERROR event's object (a ``Status``) into an ``ApiError``."""
    if not isinstance(obj, dict):
        return ApiError(500, "InternalError", f"watch ERROR event with object {obj!r}")
    return ApiError(
        int(obj.get("code") or 500), str(obj.get("reason") or ""), str(obj.get("message") or "")
    )


class Request:
    """One GET in flight: its body read whole or chunk by chunk.

    ``abort()`` shuts the socket down from any thread, which wakes a reader
    blocked in ``recv``: that is how ``Informer.stop()`` ends a watch or a
    list's body at once. The reading thread ``close()``s the response.
    """

    def __init__(
        self,
        api_client: Any,
        path: str,
        query: list[tuple[str, Any]],
        timeout: tuple[float, float] | None,
    ) -> None:
        self._lock = threading.Lock()
        self._aborted = False
        method, url, headers, body, post = api_client.param_serialize(
            "GET",
            path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=AUTH_SETTINGS,
        )
        try:
            rest = api_client.call_api(method, url, headers, body, post, _request_timeout=timeout)
        except ApiException as exc:  # raised by the REST layer for some statuses
            raise ApiError(exc.status or 0, str(exc.reason or ""), str(exc.body or "")) from exc
        self._resp = rest.response
        if not 200 <= rest.status <= 299:
            data = self._resp.read()
            self.close()
            raise _status_error(rest.status, data)

    def read_json(self) -> Any:
        """Read the whole body and decode it."""
        try:
            return msgspec.json.decode(self._resp.read())
        finally:
            self.close()

    def chunks(self) -> Iterator[bytes]:
        """Yield the body's bytes as they arrive (chunked transfer: one chunk at a time)."""
        resp = self._resp
        if resp.chunked:
            yield from resp.read_chunked(decode_content=True)
        else:
            while data := resp.read1(READ_SIZE):
                yield data

    def abort(self) -> None:
        """Wake the reader: shut the socket down. Safe from any thread, any number of times."""
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
        sock = _socket_of(self._resp)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone: nothing left to wake

    def close(self) -> None:
        """Release the response; only the thread that reads it calls this."""
        resp = self._resp
        try:
            resp.close()
            resp.release_conn()
        except Exception:  # a half-read response may complain; it is closed anyway
            pass


def _socket_of(resp: Any) -> socket.socket | None:
    """Return the socket under a urllib3 response, if it still has one."""
    conn = getattr(resp, "connection", None) or getattr(resp, "_connection", None)
    sock = getattr(conn, "sock", None)
    if isinstance(sock, socket.socket):
        return sock
    # TLS sockets are socket subclasses; anything else has no shutdown we trust.
    return None
