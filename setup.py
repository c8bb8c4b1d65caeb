"""Builds the compiled hot path: ext/core.pyx (and its included .pxi) -> aether_fast._core,
and copies the JS client (clients/js/aether-client.js, its one source) into the built package
as aether_fast/static/aether-client.js, the file an installed server answers `/client.js` with.
An editable install copies nothing: aether_fast/http/static.py reads clients/js/ itself.

AETHER_DEBUG_BUILD=1 switches on a debug build: bounds checks, line tracing for profilers and
C asserts. The release build is the default. The mode of the last build is kept in
build/aether-build-mode: switching mode regenerates the C file and recompiles, which Cython's
and setuptools' timestamp checks alone would not do (the sources did not change).
"""

from __future__ import annotations

import os
import shutil

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
#: source in the repository -> its place in the built package (aether_fast/http/static.py's
#: FROM_REPOSITORY names the same files, for a source checkout)
COPIED = {"clients/js/aether-client.js": "aether_fast/static/aether-client.js"}


class BuildPy(build_py):
    """setuptools' build_py, plus the files of `COPIED` (a missing source fails the build)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for source, target in COPIED.items():
            dest = os.path.join(self.build_lib, target)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(os.path.join(HERE, source), dest)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs += [os.path.join(self.build_lib, t) for t in COPIED.values()]
        return outputs


debug = os.environ.get("AETHER_DEBUG_BUILD", "") not in ("", "0")
mode = "debug" if debug else "release"
stamp = os.path.join(HERE, "build", "aether-build-mode")
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
        libraries=["z"],  # zlib: permessage-deflate (ext/deflate.pxi)
    )
]

ext_modules = cythonize(
    extensions, compiler_directives=directives, include_path=["ext"], force=mode_changed
)
if mode_changed:
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp, "w") as fh:
        fh.write(mode + "\n")
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPy})
