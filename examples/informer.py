"""Watch one Kubernetes resource and print every change, through a fanout Distributor.

    python examples/informer.py --kubeconfig ~/.kube/config pods
    python examples/informer.py --namespace kube-system --group apps deployments
    python examples/informer.py --selector app=web --workers 2 pods

Needs ``pip install 'fanout-informer[kube]'``. Without ``--kubeconfig`` the
client's defaults apply: ``$KUBECONFIG`` or ``~/.kube/config``, else the
in-cluster service account. Credentials (tokens, client certificates, exec
plugins) are the client's business; fanout only reads what it is sent.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

import fanout
from fanout.kube import Informer

# Each line goes out in one write: print() writes a line and its newline apart
# when the stream is unbuffered (PYTHONUNBUFFERED, python -u), and the worker
# processes' lines would land between them. The lock keeps a process's threads
# (the handler's and the main one) from mixing their writes.
_print_lock = threading.Lock()


def emit(line: str, file: Any = None) -> None:
    out = file or sys.stdout
    with _print_lock:
        out.write(line + "\n")
        out.flush()


def describe(obj: Any) -> str:
    meta = obj["metadata"]
    name = f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]
    return f"{name} rv={meta.get('resourceVersion', '?')}"


class Printer(fanout.Handler):
    """Print one line per notification (in a worker process with --workers)."""

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        emit(f"ADD{' (initial)' if is_in_initial_list else ''} {describe(obj)}")

    def on_update(self, old: Any, new: Any) -> None:
        emit(f"UPDATE {describe(new)}")

    def on_delete(self, obj: Any) -> None:
        emit(f"DELETE {describe(obj)}")


class Counter(fanout.Handler):
    """Set ``done`` once ``limit`` notifications were handled (for --count)."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.done = threading.Event()

    def _one(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.done.set()

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        self._one()

    def on_update(self, old: Any, new: Any) -> None:
        self._one()

    def on_delete(self, obj: Any) -> None:
        self._one()


def drop_managed_fields(obj: Any) -> Any:
    """A transform: managedFields is most of a typical object's size and rarely read."""
    obj["metadata"].pop("managedFields", None)
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("resource", help="plural resource name: pods, deployments, ...")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: the client's default)")
    parser.add_argument("--context", help="kubeconfig context (default: its current one)")
    parser.add_argument("--namespace", "-n", help="one namespace (default: all)")
    parser.add_argument("--group", default="", help="API group ('' for core, 'apps', ...)")
    parser.add_argument("--version", default="v1", help="API version (default v1)")
    parser.add_argument("--selector", "-l", help="label selector, e.g. app=web")
    parser.add_argument(
        "--workers", type=int, default=0, help="print from N worker processes (default: a thread)"
    )
    parser.add_argument("--count", type=int, help="exit after this many notifications")
    args = parser.parse_args(argv)

    api_client = None
    if args.kubeconfig or args.context:
        from kubernetes import config

        api_client = config.new_client_from_config(
            config_file=args.kubeconfig, context=args.context
        )

    with fanout.Distributor() as d:
        if args.workers:
            d.add_listener(Printer(), workers=args.workers)
        else:
            d.add_listener(Printer(), executor="thread")
        counter = Counter(args.count or 0)
        if args.count:
            d.add_listener(counter, executor="thread")
        inf = Informer(
            d,
            args.resource,
            api_client=api_client,
            namespace=args.namespace,
            group=args.group,
            version=args.version,
            label_selector=args.selector,
            transform=drop_managed_fields,
        )
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with inf:
            if inf.wait_synced(timeout=60):
                emit(f"synced: {len(inf.store)} {args.resource}")
            else:
                emit(f"not synced after 60 s: {inf.stats().last_error}", sys.stderr)
            while not stop.is_set() and not counter.done.is_set() and not inf.error:
                stop.wait(0.2)
        if inf.error:
            emit(f"informer ended: {inf.error}", sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
