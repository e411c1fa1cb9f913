"""Handler errors in the log: each distinct error once in full, repeats as counts.

The end-to-end tests make a real distributor's handler raise many times and
read what reached the ``fanout`` logger; ``on_error`` still sees every error.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import pytest
from helpers import Recorder, obj, wait_for

import fanout
from fanout.listeners import errorlog as _logs
from fanout.listeners.errorlog import ErrorLog, error_kind

SUMMARY = re.compile(r"^(\w+) in listener '([^']+)': (\d+) more in the last \d+ s at (.+?) \(")


class Counter:
    """An ``on_error`` callback that counts (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0

    def __call__(self, reg: Any, n: Any, text: str) -> None:
        with self.lock:
            self.count += 1


def fanout_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "fanout" and r.levelno >= logging.ERROR]


def summaries(records: list[logging.LogRecord]) -> list[tuple[str, str, int, str]]:
    out = []
    for r in records:
        m = SUMMARY.match(r.getMessage())
        if m:
            out.append((m[1], m[2], int(m[3]), m[4]))
    return out


def raising(v: int) -> fanout.Update:
    """An update whose handler raises ValueError (its message names the object)."""
    return fanout.Update(obj(f"o{v}", v), obj(f"o{v}", v + 1, **{"raise": True}))


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_many_errors_give_one_traceback_and_a_count(make_dist, tmp_path, caplog, executor):
    caplog.set_level(logging.ERROR, logger="fanout")
    errors = Counter()
    d = make_dist()
    reg = d.add_listener(
        Recorder(tmp_path / "r"), name="flaky", executor=executor, on_error=errors
    )
    d.start()
    for v in range(120):
        d.distribute(raising(v))
    assert wait_for(lambda: errors.count == 120, 60)
    assert d.stop(drain=True, timeout=60)  # stop writes the summary still waiting
    assert reg.stats().errors == 120

    records = fanout_errors(caplog)
    assert len(records) <= 4, [r.getMessage()[:80] for r in records]
    full = [r for r in records if "Traceback (most recent call last)" in r.getMessage()]
    assert len(full) == 1
    text = full[0].getMessage()
    assert text.startswith("listener 'flaky': handler raised on Update(")
    assert "ValueError: asked to raise by o0" in text
    assert "in _steer" in text  # the whole traceback, down to the raising frame
    found = summaries(records)
    assert found and {(t, name) for t, name, _, _ in found} == {("ValueError", "flaky")}
    assert sum(count for _, _, count, _ in found) == 119
    assert all(where.startswith("helpers.py:") for _, _, _, where in found)
    assert "(latest: ValueError: asked to raise by o119)" in records[-1].getMessage()
    for r in records:  # every record names its listener, in the text and as a field
        assert r.listener == "flaky"  # type: ignore[attr-defined]
        assert "'flaky'" in r.getMessage()


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_summaries_come_periodically_while_running(
    make_dist, tmp_path, caplog, monkeypatch, executor
):
    monkeypatch.setattr(_logs.error_log, "interval", 0.2)
    caplog.set_level(logging.ERROR, logger="fanout")
    errors = Counter()
    d = make_dist()
    d.add_listener(Recorder(tmp_path / "r"), name="ticker", executor=executor, on_error=errors)
    d.start()
    for v in range(30):
        d.distribute(raising(v))
    assert wait_for(lambda: errors.count == 30, 60)
    # No stop(): the supervisor's ticks must write them.
    assert wait_for(lambda: sum(c for _, _, c, _ in summaries(fanout_errors(caplog))) == 29, 30), [
        r.getMessage()[:100] for r in fanout_errors(caplog)
    ]


def test_distinct_errors_each_get_their_traceback(make_dist, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="fanout")
    errors = Counter()
    d = make_dist()
    d.add_listener(
        fanout.FuncHandler(on_add=fail_by_kind),
        name="two-bugs",
        executor="thread",
        on_error=errors,
    )
    d.add_listener(Recorder(tmp_path / "r"), name="other", executor="thread", on_error=errors)
    d.start()
    for v in range(50):
        d.distribute(fanout.Add(obj(f"o{v}", v, **{"raise": True})))
    assert wait_for(lambda: errors.count == 100, 60)
    assert d.stop(drain=True, timeout=60)
    records = fanout_errors(caplog)
    full = [r.getMessage() for r in records if "Traceback" in r.getMessage()]
    assert len(full) == 3  # KeyError and ValueError of two-bugs, ValueError of other
    assert sum("listener 'two-bugs'" in t for t in full) == 2
    counts: dict[tuple[str, str], int] = {}
    for t, name, c, _ in summaries(records):
        counts[t, name] = counts.get((t, name), 0) + c
    assert counts == {
        ("KeyError", "two-bugs"): 24,
        ("ValueError", "two-bugs"): 24,
        ("ValueError", "other"): 49,
    }


def fail_by_kind(o: Any, initial: bool) -> None:
    """Raise KeyError for even versions, ValueError (elsewhere) for odd ones."""
    if o["v"] % 2 == 0:
        raise KeyError(f"missing {o['v']}")
    _fail_value(o["v"])


def _fail_value(v: int) -> None:
    raise ValueError(f"bad {v}")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


TRACE = """Traceback (most recent call last):
  File "/app/handlers.py", line 12, in on_add
    check(obj)
  File "/app/checks.py", line 40, in check
    raise ValueError(f"bad {obj}")
ValueError: bad {n}
"""


def test_error_log_counts_repeats_summarises_and_forgets(caplog):
    caplog.set_level(logging.ERROR, logger="fanout")
    clock = Clock()
    elog = ErrorLog(interval=10.0, clock=clock)
    owner = object()
    woken: list[int] = []
    for n in range(5):
        elog.report(owner, "x", n, TRACE.replace("{n}", str(n)), lambda: woken.append(1))
    assert len(caplog.records) == 1 and "ValueError: bad 0" in caplog.records[0].getMessage()
    assert woken == [1]  # once, when the first repeat began waiting
    assert elog.due_in(owner) == 10.0
    elog.flush(owner)  # not due yet
    assert len(caplog.records) == 1
    clock.now += 10
    elog.flush(owner)
    assert caplog.records[1].getMessage() == (
        "ValueError in listener 'x': 4 more in the last 10 s at checks.py:40 in check "
        "(latest: ValueError: bad 4)"
    )
    assert elog.due_in(owner) is None
    clock.now += 10
    elog.flush(owner)  # quiet for a whole interval: forgotten
    assert len(caplog.records) == 2
    elog.report(owner, "x", 9, TRACE.replace("{n}", "9"))
    assert "Traceback" in caplog.records[2].getMessage()  # in full again
    elog.report(owner, "x", 10, TRACE.replace("{n}", "10"))
    elog.report(object(), "x", 11, TRACE.replace("{n}", "11"))  # another distributor
    elog.flush(owner, final=True)
    assert "1 more in the last 1 s" in caplog.records[-1].getMessage()
    assert len(caplog.records) == 5


def test_error_kind():
    assert error_kind(TRACE.replace("{n}", "1")) == (
        "ValueError",
        "/app/checks.py:40 in check",
        "ValueError: bad 1",
    )
    chained = (
        TRACE.replace("{n}", "1")
        + "\nDuring handling of the above exception, another exception occurred:\n\n"
        + 'Traceback (most recent call last):\n  File "/app/h.py", line 3, in f\n'
        + "    raise pkg.errors.Boom()\npkg.errors.Boom\n"
    )
    assert error_kind(chained) == ("pkg.errors.Boom", "/app/h.py:3 in f", "pkg.errors.Boom")
    multiline = TRACE.replace("{n}", "1\nsecond\nthird line")
    assert error_kind(multiline) == (
        "ValueError",
        "/app/checks.py:40 in check",
        "ValueError: bad 1",
    )
    # Not a traceback: alike when only numbers differ.
    a = error_kind("could not start a worker: OSError(24); retrying in 0.2 s")
    b = error_kind("could not start a worker: OSError(24); retrying in 0.4 s")
    assert a[:2] == b[:2] and a[1] == ""
