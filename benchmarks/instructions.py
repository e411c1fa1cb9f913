"""Instructions per ``distribute`` and per worker frame, under callgrind.

The noise-free measure of fanout's hot paths: run it before and after a change
to the producer or the worker loop, and compare. The work is done by
``fanout.bench.instructions`` (also behind ``fanout bench --instructions``)::

    python benchmarks/instructions.py --iterations 2000
    python benchmarks/instructions.py --no-extensions   # the pure-Python twins
"""

from __future__ import annotations

import sys

from fanout.bench.instructions import main

if __name__ == "__main__":
    sys.exit(main())
