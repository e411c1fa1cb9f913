"""``fanout bench``: fanout against the alternatives, measured the same way in one run.

Modules: ``payloads`` (what is sent), ``contenders`` (one session class per
mechanism: fanout process / thread, a hand-written pipe baseline,
``multiprocessing.Queue``, faster-fifo, pyzmq, a thread + deque listener),
``scenarios`` (throughput, CPU-bound handlers, latency, a stalled listener,
crash recovery) and ``report`` (text and markdown tables, JSON, chart).
"""
