"""Builds the compiled hot path: ext/core.pyx (and its included .pxi) -> aether_fast._core.

AETHER_DEBUG_BUILD=1 switches on a debug build: bounds checks, line tracing for profilers and
C asserts. The release build is the default. The mode of the last build is kept in
build/aether-build-mode: switching mode regenerates the C file and recompiles, which Cython's
and setuptools' timestamp checks alone would not do (the sources did not change).
"""

from __future__ import annotations

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("AETHER_DEBUG_BUILD", "") not in ("", "0")
mode = "debug" if debug else "release"
stamp = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "aether-build-mode")
try:
    with open(stamp) as fh:
        mode_changed = fh.read().strip() != mode
except OSError:
    mode_changed = True

directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "cdivision": True,
    "initializedcheck": debug,
    "embedsignature": True,
    "linetrace": debug,
    "profile": debug,
}
macros = [("CYTHON_TRACE_NOGIL", "1")] if debug else []
cflags = ["-O0", "-g"] if debug else ["-O3"]

extensions = [
    Extension(
        "aether_fast._core",
        ["ext/core.pyx"],
        define_macros=macros,
        extra_compile_args=cflags,
    )
]

ext_modules = cythonize(
    extensions, compiler_directives=directives, include_path=["ext"], force=mode_changed
)
if mode_changed:
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp, "w") as fh:
        fh.write(mode + "\n")
setup(ext_modules=ext_modules)
