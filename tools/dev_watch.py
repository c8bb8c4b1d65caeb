"""`make dev-watch`: the server with debug logging, restarted when a source file changes.

    python tools/dev_watch.py [--no-build] [PATH ...]      # default: aether_fast ext

Watches the paths for changes to .py, .pyx, .pxi, .pxd and .pyi files (build outputs such as
ext/core.c, the .so and .pyc files are ignored). On a change the running server gets SIGINT
and drains (at most SHUTDOWN_TIMEOUT_S), then the extension is rebuilt in place (about a
second when ext/ did not change) and a new server starts. The rebuild runs only once the old
server has exited: overwriting a loaded .so under a running process can crash it. When the
build fails the compiler's message is on stderr and no server runs until the next change.
Settings come from the environment as for `aether-fast serve`; LOG_LEVEL defaults to debug.
Ctrl-C or SIGTERM stops the server, then the watcher. `--no-build` skips the rebuild (the
tests use it so as not to rewrite the work tree's extension under other running servers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from watchfiles import Change, watch

ROOT = Path(__file__).resolve().parent.parent
WATCHED = ("aether_fast", "ext")
SOURCES = (".py", ".pyx", ".pxi", ".pxd", ".pyi")


def source_changed(change: Change, path: str) -> bool:
    """The watch filter: a source file, not a build output or an editor's temporary file."""
    name = os.path.basename(path)
    return name.endswith(SOURCES) and not name.startswith(".") and "__pycache__" not in path


def say(text: str) -> None:
    print(f"dev-watch: {text}", file=sys.stderr, flush=True)


class Server:
    """The one server process this watcher runs."""

    def __init__(self, build: bool) -> None:
        self.build = build
        self.proc: subprocess.Popen[bytes] | None = None
        self.drain_s = float(os.environ.get("SHUTDOWN_TIMEOUT_S") or 10) + 5

    def start(self) -> None:
        if self.build:
            build = subprocess.run(
                [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            if build.returncode != 0:
                say("the build failed: waiting for the next change")
                return
        self.proc = subprocess.Popen([sys.executable, "-m", "aether_fast", "serve"], cwd=ROOT)
        say(f"server started (pid {self.proc.pid})")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(self.drain_s)
        except subprocess.TimeoutExpired:
            say(f"server {proc.pid} still running after {self.drain_s:g} s: killing it")
            proc.kill()
            proc.wait()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    build = "--no-build" not in argv
    paths = [a for a in argv if a != "--no-build"] or [str(ROOT / p) for p in WATCHED]
    os.environ.setdefault("LOG_LEVEL", "debug")
    signal.signal(signal.SIGTERM, _interrupt)
    server = Server(build)
    try:
        server.start()
        for changes in watch(*paths, watch_filter=source_changed):
            names = sorted({os.path.relpath(path, ROOT) for _, path in changes})
            say(f"changed {', '.join(names)}: restarting")
            server.stop()
            server.start()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
