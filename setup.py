"""Build fanout's native extensions (fanout/_ring.pyx, _pump.pyx, _worker.pyx).

FANOUT_NO_EXTENSIONS=1 builds a pure-Python install (fanout then uses its
pure-Python twins). FANOUT_CYTHON_ANNOTATE=1 writes Cython's HTML annotation next
to each .pyx; FANOUT_CYTHON_TRACE=1 builds with line tracing for coverage.
"""

import os

from setuptools import Extension, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def extensions():
    if _flag("FANOUT_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize

    trace = _flag("FANOUT_CYTHON_TRACE")
    macros = [("CYTHON_TRACE_NOGIL", "1")] if trace else []
    mods = [
        Extension(f"fanout.{name}", [f"fanout/{name}.pyx"], define_macros=macros)
        for name in ("_ring", "_pump", "_worker")
    ]
    # Every compiler directive lives here; per-function ones (boundscheck) are
    # set in the .pyx only where tests cover the function.
    return cythonize(
        mods,
        compiler_directives={
            "language_level": 3,
            "embedsignature": True,
            # Signatures in the clinic format: inspect.signature (and stubtest)
            # can read them even with binding=False.
            "embedsignature.format": "clinic",
            "autotestdict": False,  # no __test__ dict: the stubs need not name it
            # Plain C methods: a bound method call is a direct METH_O / NOARGS call
            # (cyfunction binding costs ~10 ns a call on the hot path).
            "binding": False,
            "cdivision": True,
            "initializedcheck": False,
            "linetrace": trace,
        },
        annotate=_flag("FANOUT_CYTHON_ANNOTATE"),
    )


setup(ext_modules=extensions())
