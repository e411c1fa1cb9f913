"""Build fanout's native extensions (fanout/native/_ring.pyx, _pump.pyx, _worker.pyx).

When they cannot be built (no C compiler, no Python headers), the install goes on
without them, as msgpack's does: fanout then runs on its pure-Python twins, the
build prints one warning, and ``fanout.IMPORT_ERROR`` says why at import (from the
note this file leaves in the package, ``NATIVE_BUILD_NOTE``).

FANOUT_NO_EXTENSIONS=1 builds a pure-Python install on purpose.
FANOUT_REQUIRE_EXTENSIONS=1 makes a failed build an error instead (the release
wheels and CI set it: a wheel without its extensions must not ship).
FANOUT_CYTHON_ANNOTATE=1 writes Cython's HTML annotation next to each .pyx;
FANOUT_CYTHON_TRACE=1 builds with line tracing for coverage.
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

# Read by fanout/native/pick.py; the name is repeated there (setup.py cannot import fanout).
NATIVE_BUILD_NOTE = "_native_build_failed.txt"


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def extensions():
    if _flag("FANOUT_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize

    trace = _flag("FANOUT_CYTHON_TRACE")
    macros = [("CYTHON_TRACE_NOGIL", "1")] if trace else []
    mods = [
        Extension(f"fanout.native.{name}", [f"fanout/native/{name}.pyx"], define_macros=macros)
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


class OptionalBuildExt(build_ext):
    """Build the extensions, or, failing that, leave a note and install without them."""

    def run(self):
        inplace = self.inplace or self.editable_mode
        notes = [Path(self.build_lib, "fanout", "native", NATIVE_BUILD_NOTE)]
        if inplace:  # pip install -e / build_ext --inplace: the package is the source tree
            notes.append(Path("fanout", "native", NATIVE_BUILD_NOTE))
        for note in notes:
            note.unlink(missing_ok=True)  # a successful build clears an old failure
        try:
            super().run()
        except (CCompilerError, ExecError, PlatformError, OSError) as exc:
            if _flag("FANOUT_REQUIRE_EXTENSIONS"):
                raise
            self._fall_back(exc, notes, inplace)

    def _fall_back(self, exc, notes, inplace):
        # All three or none: a half-built set would mix native and twin parts.
        for ext in self.extensions:
            built = Path(self.get_ext_fullpath(ext.name))
            built.unlink(missing_ok=True)
            if inplace:
                Path("fanout", "native", built.name).unlink(missing_ok=True)
        # Short for the note (IMPORT_ERROR quotes it); the warning gives it in full.
        compiler = getattr(getattr(self, "compiler", None), "compiler_so", None)
        if isinstance(exc, CCompilerError) and compiler:
            reason = f"the C compiler {compiler[0]!r} failed"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        for note in notes:
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(reason + "\n")
        bar = "=" * 78
        sys.stderr.write(
            f"\n{bar}\nWARNING: fanout's native extensions could not be built: {reason}.\n"
            f"{type(exc).__name__}: {exc}\n"
            "fanout is installed with its pure-Python twins instead: the same behaviour,\n"
            "slower. For the native build, install a C compiler and the Python headers\n"
            "(Debian/Ubuntu: apt-get install gcc python3-dev) and reinstall, or install\n"
            "a wheel. fanout.IMPORT_ERROR repeats this at run time.\n"
            f"{bar}\n\n"
        )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
