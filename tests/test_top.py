"""``fanout top`` against a real metrics endpoint: ``--once`` in a pipe, the live view in a pty."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import Recorder, obj, wait_for

import fanout
from fanout.metrics import serve
from fanout.tools.top import quantile

TOP = [sys.executable, "-m", "fanout", "top"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][AB0-9]|\r")


@pytest.fixture
def busy(make_dist, tmp_path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A running distributor with two listeners, a producer thread, and its endpoint."""
    d = make_dist()
    flaky = d.add_listener(Recorder(tmp_path / "r"), name="pods-flaky", executor="process")
    fast = d.add_listener(fanout.Handler(), name="cache", executor="thread")
    d.start()
    assert flaky.wait_ready(60)
    for v in range(5):
        d.distribute(fanout.Update(obj("x", v), obj("x", v + 1, **{"raise": True})))
    assert wait_for(lambda: flaky.stats().errors == 5, 60)
    stop = threading.Event()

    def produce() -> None:
        v = 0
        while not stop.is_set():
            d.distribute(fanout.Add(obj(f"o{v}", v)))
            v += 1
            stop.wait(0.002)

    producer = threading.Thread(target=produce)
    producer.start()
    server = serve(d, 0)
    try:
        yield server.url, {"pods-flaky": flaky, "cache": fast}
    finally:
        stop.set()
        producer.join()
        server.close()


def test_once_prints_a_plain_snapshot(busy):
    url, regs = busy
    proc = subprocess.run(
        [*TOP, "--once", "--interval", "0.5", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout  # plain text for scripts
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"fanout top {url}: rates and percentiles over 0.")
    header = lines[1].split()
    assert header == [
        "listener",
        "recv/s",
        "dlvr/s",
        "pending",
        "pend",
        "bytes",
        "p50",
        "p99",
        "errors",
        "dead",
        "drops",
        "restarts",
        "workers",
    ]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"cache", "pods-flaky"}
    for name, reg in regs.items():
        _, recv, dlvr, _, _, p50, p99, errors, dead, drops, restarts, workers = rows[name]
        s = reg.stats()
        assert float(recv) > 0 and float(dlvr) > 0  # the producer runs all along
        assert p50 != "-" and p99 != "-"
        assert re.fullmatch(r"[\d.]+(ns|us|ms|s)", p50), p50
        assert (int(errors), int(dead), int(drops), int(restarts), int(workers)) == (
            s.errors,
            s.dead_lettered,
            s.dropped,
            s.restarts,
            s.workers,
        )
    assert rows["pods-flaky"][7] == "5"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_says_so_and_fails(no_leaks):
    url = f"http://127.0.0.1:{_free_port()}/metrics"
    proc = subprocess.run([*TOP, "--once", url], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert f"fanout top: cannot reach {url}" in proc.stderr
    assert "fanout.metrics.serve" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_endpoint_without_fanout_metrics_is_named(no_leaks):
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    registry = CollectorRegistry()
    Counter("unrelated", "something else", registry=registry).inc()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        proc = subprocess.run([*TOP, "--once", url], capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert proc.returncode == 1
    assert "serves no fanout metrics" in proc.stderr


def test_bad_url_is_refused_by_the_parser(no_leaks):
    proc = subprocess.run([*TOP, "ftp://x/"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "expected a metrics URL like http://127.0.0.1:9100/metrics" in proc.stderr


# Make the pty (stdin) the controlling terminal of the new session, then run the
# command: so Ctrl-C typed on it sends SIGINT, as in a real terminal. SIGINT gets its
# default action back first: a suite started in the background by a shell without job
# control (`.ci/run &`) inherits it ignored, and so would the command.
CONTROLLING_TTY = (
    "import fcntl, os, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


class Terminal:
    """``fanout top`` in a pseudo-terminal of 40 x 160: read its screen, type keys."""

    def __init__(self, url: str) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self.master, self.slave = master, slave
        self.initial = termios.tcgetattr(slave)
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CONTROLLING_TTY, *TOP, "--interval", "0.2", url],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        self.output = ""

    def read_until(self, predicate: Any, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate(self.output):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.master], [], [], min(left, 0.1))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    return bool(predicate(self.output))
                self.output += ANSI.sub("", chunk.decode(errors="replace"))
        return True

    def shows(self, text: str, timeout: float = 30.0) -> bool:
        """Wait until ``text`` was shown, even if the view wrapped it across lines."""
        return self.read_until(lambda out: text in re.sub(r"\s+", " ", out), timeout)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self) -> int:
        code = self.proc.wait(timeout=30)
        self.read_until(lambda _: False, timeout=0.2)  # what it wrote on the way out
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.mark.parametrize(("key", "how"), [(b"q", "q"), (b"\x03", "Ctrl-C")])
def test_live_view_in_a_terminal_refreshes_and_quits(busy, key, how):
    url, _ = busy
    term = Terminal(url)
    try:
        assert term.read_until(lambda out: "pods-flaky" in out and "cache" in out), term.output
        # A second frame: rates are there once two scrapes were taken.
        assert term.read_until(lambda out: out.count("pods-flaky") >= 3), term.output
        assert "q quits" in term.output
        term.type(key)
        assert term.wait() == 0, f"{how}: {term.output[-2000:]}"
        assert "Traceback" not in term.output
        # The terminal is as it was: canonical input and echo are back.
        assert termios.tcgetattr(term.slave)[3] == term.initial[3]
    finally:
        term.close()


def test_live_view_survives_a_lost_endpoint(make_dist):
    d = make_dist()
    d.add_listener(fanout.Handler(), name="lonely", executor="thread")
    d.start()
    server = serve(d, 0)
    term = Terminal(server.url)
    try:
        assert term.read_until(lambda out: "lonely" in out), term.output
        server.close()
        assert term.shows("Connection refused"), term.output[-2000:]
        assert term.shows("retrying")
        term.proc.send_signal(signal.SIGINT)
        assert term.wait() == 0
    finally:
        server.close()
        term.close()


def test_quantile_interpolates_like_prometheus():
    inf = float("inf")
    buckets = [(0.001, 0.0), (0.002, 50.0), (0.004, 100.0), (inf, 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.002)
    assert quantile(0.25, buckets) == pytest.approx(0.0015)
    assert quantile(0.99, buckets) == pytest.approx(0.002 + 0.002 * 49 / 50)
    assert quantile(0.5, [(0.001, 0.0), (inf, 0.0)]) is None
    assert quantile(0.5, [(0.001, 0.0), (inf, 4.0)]) == 0.001  # beyond the last bound
    assert quantile(0.5, []) is None
