"""Start multiprocessing's helpers so that workers import this process's fanout.

The forkserver runs ``python -c ...``, which puts the current directory first on
its ``sys.path`` (Python 3.11's forkserver ignores the parent's path), so a
``fanout/`` folder in the current directory would shadow the installed package
in every worker. Started with ``PYTHONSAFEPATH=1`` it gets no such entry.
"""

from __future__ import annotations

import os
import threading

__all__ = ["ensure_forkserver"]

_env_lock = threading.Lock()


def ensure_forkserver() -> None:
    """Start the forkserver if it does not run, with no current directory on its path."""
    from multiprocessing import forkserver

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
