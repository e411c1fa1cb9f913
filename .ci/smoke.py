"""Smoke test of an installed fanout: one notification through a worker process.

Run from outside the source tree, so that ``import fanout`` finds the installed
package: ``python .ci/smoke.py [--native | --pure]``. ``--native`` fails unless the
native extensions are in use, ``--pure`` unless the pure-Python twins are (then
``fanout.IMPORT_ERROR`` must say why).
"""

import sys
import tempfile
from pathlib import Path

import fanout


class Mark(fanout.Handler):
    """Writes what it was given to a file: proof that a worker process ran it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_add(self, obj, is_in_initial_list):
        Path(self.path).write_text(obj["v"])


def main() -> int:
    if "--native" in sys.argv and not fanout.NATIVE:
        print(f"smoke: the native extensions are not in use: {fanout.IMPORT_ERROR}")
        return 1
    if "--pure" in sys.argv and (fanout.NATIVE or not fanout.IMPORT_ERROR):
        print(f"smoke: expected the pure-Python twins, with a reason: {fanout.IMPORT_ERROR}")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp, "delivered"))
        with fanout.Distributor() as d:  # stop(drain=True) on exit
            reg = d.add_listener(Mark(path))
            d.distribute(fanout.Add({"v": "hello"}))
        stats = reg.stats()
        if stats.delivered != 1 or Path(path).read_text() != "hello":
            print(f"smoke: the notification was not delivered: {stats}")
            return 1
    print(
        f"smoke: fanout {fanout.__version__} from {Path(fanout.__file__).parent} delivered a "
        f"notification through a worker process (native={fanout.NATIVE})"
    )
    if not fanout.NATIVE:
        print(f"smoke: fanout.IMPORT_ERROR: {fanout.IMPORT_ERROR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
