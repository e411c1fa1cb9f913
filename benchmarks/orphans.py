"""How fast a SIGKILLed producer's workers and helpers go, backlog or not.

A producer subprocess (the one tests/test_orphans.py runs: two slow workers, a
full pipe) is SIGKILLed; this reports, per kind of descendant, the seconds until
the last one of that kind was gone, and how many handler calls started after the
kill (the contract: none, and every descendant gone within 1 s).

Run: python benchmarks/orphans.py [forkserver|spawn] [runs]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import test_orphans  # noqa: E402  (the producer and handler the test uses)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kind(p: psutil.Process, producer: int) -> str:
    cmd = " ".join(p.cmdline())
    if "resource_tracker" in cmd:
        return "resource tracker"
    # Forked workers share the forkserver's command line: its children are workers.
    if "forkserver import main" in cmd and p.ppid() == producer:
        return "forkserver"
    return "worker"


def one(method: str, tmp: Path) -> tuple[dict[str, float], int]:
    script = tmp / "producer.py"
    script.write_text(test_orphans.PRODUCER.format(frames=test_orphans.FRAMES))
    log = tmp / "starts"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(script), method, str(log), str(REPO / "tests")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    family = [psutil.Process(pid) for pid in json.loads(proc.stdout.readline())]
    kinds = {p.pid: _kind(p, proc.pid) for p in family}
    while len({line.split()[0] for line in log.read_text().splitlines()}) < 2:
        time.sleep(0.01)  # both workers are inside a handler call
    proc.kill()
    proc.wait()
    t0 = time.monotonic()
    calls = len(log.read_text().splitlines())
    last: dict[str, float] = {}
    while any(_alive(p) for p in family) and time.monotonic() - t0 < 10:
        for p in family:
            if _alive(p):
                last[kinds[p.pid]] = time.monotonic() - t0
        time.sleep(0.002)
    proc.stdout.close()
    for kind in kinds.values():  # gone before the first look
        last.setdefault(kind, 0.0)
    return last, len(log.read_text().splitlines()) - calls


def main() -> None:
    method = sys.argv[1] if len(sys.argv) > 1 else "forkserver"
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            gone, late = one(method, Path(tmp))
            seen = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in sorted(gone.items()))
            print(f"{method}: last seen alive after the kill: {seen or 'none'}; "
                  f"handler calls started after it: {late}")  # fmt: skip


if __name__ == "__main__":
    main()
