"""``fanout bench``: fanout against the alternatives, measured the same way in one run.

Modules: ``payloads`` (what is sent); ``sessions`` (what every contender
session shares), ``contenders`` (fanout process / thread, and the list of all)
and ``baselines`` (a hand-written pipe, ``multiprocessing.Queue``,
faster-fifo, pyzmq, a thread + deque listener); ``model`` (options, metrics,
figures, cases: what the scenarios share); the scenarios ``delivery``
(throughput, CPU-bound handlers, latency, a stalled listener), ``recovery``,
``schema``, ``arrays`` (with ``array_contenders``), ``stalled_arrays``,
``kube`` and ``ray``; ``scenarios`` (their list, and the suite that runs
them); ``report`` (text and markdown tables, JSON) with ``formatting``,
``targets`` and ``chart``; ``instructions`` (instruction counts under
callgrind).
"""
