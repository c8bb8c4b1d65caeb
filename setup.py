"""Builds the compiled hot path: ext/core.pyx (and its included .pxi) -> aether_fast._core.

AETHER_DEBUG_BUILD=1 switches on a debug build: bounds checks, line tracing for profilers and
C asserts. The release build is the default.
"""

from __future__ import annotations

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("AETHER_DEBUG_BUILD", "") not in ("", "0")

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

setup(ext_modules=cythonize(extensions, compiler_directives=directives, include_path=["ext"]))
