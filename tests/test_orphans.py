"""No orphans: when the producer dies, its workers and helpers follow at once.

The producer runs in a subprocess with a slow listener whose pipe is full, and is
SIGKILLed: no ``stop()``, no atexit. Every process it had started (workers,
multiprocessing's forkserver and resource tracker) must be gone shortly after, and no
handler call may start after the kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from helpers import wait_for

import fanout

CALL_SECONDS = 0.2  # each call sleeps this long: the backlog lasts minutes
FRAMES = 600  # of about 4 KiB each: fills the 1 MiB pipe and the worker's buffer
GONE_WITHIN = 5.0  # the promise is about 1 s; this bound leaves room on a busy machine

PRODUCER = """
import json, sys, time
sys.path.insert(0, sys.argv[3])
import psutil
import fanout
from test_orphans import SlowStarter

if __name__ == "__main__":
    d = fanout.Distributor(start_method=sys.argv[1])
    reg = d.add_listener(SlowStarter(sys.argv[2]), name="slow", workers=2)
    d.start()
    assert reg.wait_ready(60)
    pad = "x" * 4096
    for i in range({frames}):
        d.distribute(fanout.Add({{"i": i, "pad": pad}}))
    pids = [p.pid for p in psutil.Process().children(recursive=True)]
    print(json.dumps(pids), flush=True)
    time.sleep(3600)
"""


class SlowStarter(fanout.Handler):
    """Appends ``<pid> <i>`` to a file when a call starts, then takes its time."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {obj['i']}\n".encode())
        finally:
            os.close(fd)
        time.sleep(CALL_SECONDS)


def _starts(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_workers_and_helpers_exit_when_the_producer_is_killed(tmp_path, start_method, no_leaks):
    log = tmp_path / "starts"
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER.format(frames=FRAMES))
    tests_dir = str(Path(__file__).parent)
    # The producer imports the fanout under test, wherever it was imported from.
    paths = [str(Path(fanout.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    with open(tmp_path / "stderr", "wb") as err:
        producer = subprocess.Popen(
            [sys.executable, str(script), start_method, str(log), tests_dir],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
        )
    family: list[psutil.Process] = []
    try:
        assert producer.stdout is not None
        line = producer.stdout.readline()
        producer.stdout.close()
        assert line, (tmp_path / "stderr").read_text()
        family = [psutil.Process(pid) for pid in json.loads(line)]
        commands = [" ".join(p.cmdline()) for p in family]
        assert any("resource_tracker" in c for c in commands), commands
        if start_method == "forkserver":
            assert any("forkserver" in c for c in commands), commands
        # Both workers are inside a call, with frames queued behind it.
        assert wait_for(lambda: len({s.split()[0] for s in _starts(log)}) == 2, 60)

        producer.send_signal(signal.SIGKILL)
        producer.wait()
        killed = time.monotonic()
        started = _starts(log)
        gone = wait_for(lambda: not any(_alive(p) for p in family), GONE_WITHIN)
        elapsed = time.monotonic() - killed
        survivors = [(p.pid, " ".join(p.cmdline())) for p in family if _alive(p)]
        assert gone, f"alive {elapsed:.1f} s after the producer's death: {survivors}"
        assert _starts(log) == started, "a handler call started after the producer died"
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()
        for p in family:  # never leave a failed run's orphans behind
            if _alive(p):
                p.kill()
