"""tools/system_deps.sh (`make system-deps`, run first by `make install` and by .ci/run): it finds
the tools the build and the tests need, installs the missing ones' Debian packages with apt-get
when it can, and otherwise says exactly what to install and fails.

The script runs for real with a PATH of its own: a directory holding the tools a test wants
present (placeholders: the script only looks them up), and, where a test wants apt-get or sudo,
small recorders standing in for them, so that nothing is ever installed on this machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Set as AbstractSet
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "system_deps.sh"
# the tools the script looks up, each with the Debian package it installs for it
TOOLS = {
    "gcc": "gcc",
    "make": "make",
    "redis-server": "redis-server",
    "promtool": "prometheus",
    "curl": "curl",
    "node": "nodejs",
    "npm": "npm",
}
# the real interpreter (not the venv's): it has venv, ensurepip and Python.h as `make install` needs
PYTHON = getattr(sys, "_base_executable", sys.executable)


def _bin(tmp_path: Path, without: AbstractSet[str] = frozenset(), apt: bool = False) -> Path:
    """A PATH directory: bash, env and true for real, placeholders for TOOLS minus `without`,
    a chromium placeholder, and with `apt` an apt-get that logs its arguments and "installs" a
    placeholder for each missing tool, plus a sudo that runs its command."""
    d = tmp_path / "bin"
    d.mkdir()
    for real in ("bash", "env", "true"):
        found = shutil.which(real)
        assert found, real
        (d / real).symlink_to(found)
    for tool in set(TOOLS) - without:
        _placeholder(d / tool)
    _placeholder(tmp_path / "chromium")
    if apt:
        log = tmp_path / "apt.log"
        installs = " ".join(sorted(without))
        chmod = shutil.which("chmod")
        (d / "apt-get").write_text(
            "#!/bin/sh\n"
            f'echo "$*" >> {log}\n'
            'case "$1" in install)\n'
            f"  for t in {installs}; do printf '#!/bin/sh\\n' > {d}/$t; {chmod} +x {d}/$t; done;;\n"
            "esac\n"
        )
        (d / "apt-get").chmod(0o755)
        (d / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
        (d / "sudo").chmod(0o755)
    return d


def _placeholder(path: Path) -> None:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)


def _run(tmp_path: Path, bindir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(bindir), "PYTHON": PYTHON, "CHROMIUM": str(tmp_path / "chromium")}
    return subprocess.run(
        [str(bindir / "bash"), str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def _apt_log(tmp_path: Path) -> list[str]:
    log = tmp_path / "apt.log"
    return log.read_text().splitlines() if log.exists() else []


def test_nothing_missing_passes_and_installs_nothing(tmp_path: Path) -> None:
    out = _run(tmp_path, _bin(tmp_path, apt=True))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "system-deps: every system package is there" in out.stdout
    assert _apt_log(tmp_path) == []


def test_without_apt_get_it_names_the_packages_and_fails(tmp_path: Path) -> None:
    out = _run(tmp_path, _bin(tmp_path, without={"promtool", "node"}))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "promtool (checks deploy/ in the tests)" in out.stdout
    assert "node (the JS client's tests)" in out.stdout
    assert "no apt-get here" in out.stdout
    assert "  apt-get update && apt-get install -y prometheus nodejs\n" in out.stdout


def test_a_missing_browser_and_interpreter_headers_are_named(tmp_path: Path) -> None:
    bindir = _bin(tmp_path)
    (tmp_path / "chromium").unlink()
    out = _run(tmp_path, bindir)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "apt-get install -y chromium\n" in out.stdout
    # an interpreter that is not there: its venv module and headers are missing with it
    env = {"PATH": str(bindir), "PYTHON": "python3.missing", "CHROMIUM": str(tmp_path / "nope")}
    out = subprocess.run(
        [str(bindir / "bash"), str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert "apt-get install -y python3 python3-venv python3-dev chromium\n" in out.stdout


def test_with_apt_get_it_installs_exactly_the_missing_packages(tmp_path: Path) -> None:
    out = _run(tmp_path, _bin(tmp_path, without={"promtool", "redis-server"}, apt=True))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "system-deps: installing: redis-server prometheus" in out.stdout
    assert _apt_log(tmp_path) == ["update -q", "install -y -q redis-server prometheus"]
    # it checked again after installing
    assert out.stdout.rstrip().endswith("system-deps: every system package is there")


def test_dry_run_says_what_it_would_run_and_installs_nothing(tmp_path: Path) -> None:
    out = _run(tmp_path, _bin(tmp_path, without={"gcc"}, apt=True), "--dry-run")
    assert out.returncode == 1, out.stdout + out.stderr
    sudo = "" if os.geteuid() == 0 else "sudo "
    assert (
        f"system-deps: would run: {sudo}apt-get update -q && "
        f"{sudo}env DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc"
    ) in out.stdout
    assert _apt_log(tmp_path) == []


def test_a_package_that_does_not_bring_its_tool_fails_after_installing(tmp_path: Path) -> None:
    bindir = _bin(tmp_path, without={"npm"}, apt=True)
    # this apt-get installs nothing
    (bindir / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "apt.log"}\n')
    out = _run(tmp_path, bindir)
    assert out.returncode == 1
    assert _apt_log(tmp_path) == ["update -q", "install -y -q npm"]
    assert "apt-get installed npm but the tools above are still missing" in out.stderr


def test_make_test_and_ci_run_it_first() -> None:
    # under `make test` itself, the outer make's flags would add "Entering directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    dry = subprocess.run(
        ["make", "-n", "--no-print-directory", "test"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert "bash tools/system_deps.sh" in lines[0], lines
    assert any("pytest" in line for line in lines[1:]), lines
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("\nbash tools/system_deps.sh\n") < ci.index("\nmake install\n")
