"""Start multiprocessing's helpers so that workers import this process's fanout.

The forkserver runs ``python -c ...``, which puts the current directory first on
its ``sys.path`` (Python 3.11's forkserver ignores the parent's path), so a
``fanout/`` folder in the current directory would shadow the installed package
in every worker. Started with ``PYTHONSAFEPATH=1`` it gets no such entry.
Python 3.10 has no ``PYTHONSAFEPATH``: there, when the current directory holds a
``fanout``, the forkserver preloads nothing, and each worker imports fanout after
it took its producer's ``sys.path``.
"""

from __future__ import annotations

import os
import sys
import threading
from importlib.machinery import PathFinder

__all__ = ["ensure_forkserver", "preload_in_forkserver"]

_env_lock = threading.Lock()


def _alive(pid: int | None) -> bool:
    """Tell whether ``pid`` runs (a zombie does not), without reaping it."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _preloaded() -> list[str]:
    from multiprocessing import forkserver

    return list(getattr(forkserver._forkserver, "_preload_modules", None) or [])


def preload_in_forkserver(module: str) -> None:
    """Add ``module`` to what the forkserver preloads, keeping the program's own list."""
    from multiprocessing import forkserver

    modules = _preloaded()
    if module not in modules:
        forkserver.set_forkserver_preload([*modules, module])


def ensure_forkserver() -> None:
    """Start the forkserver if it does not run, with no current directory on its path."""
    from multiprocessing import forkserver

    if _alive(getattr(forkserver._forkserver, "_forkserver_pid", None)):
        forkserver.ensure_running()  # running: touch nothing process-wide
        return
    if sys.version_info < (3, 11) and PathFinder.find_spec("fanout", [os.getcwd()]):
        # fanout's modules only: the program's own preloads stay.
        forkserver.set_forkserver_preload(
            [m for m in _preloaded() if m != "fanout" and not m.startswith("fanout.")]
        )
    with _env_lock:
        saved = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"  # read by Python >= 3.11
        try:
            forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONSAFEPATH"]
            else:
                os.environ["PYTHONSAFEPATH"] = saved
