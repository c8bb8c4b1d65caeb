"""The JS client's own tests (clients/js/test/*.test.mjs, Node's test runner against real
servers, and a redis-server of their own for the Redis tests), run from pytest so that
`make test` covers them. Node and npm are required: a missing one fails this test rather
than skipping it (.ci/run installs them)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, Server
from tests.integration.helpers import no_new_server_errors  # noqa: F401 (autouse fixture)
from tests.integration.rawhttp import exchange

JS = ROOT / "clients" / "js"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (apt-get install nodejs npm); .ci/run installs it")
    return path


def test_served_client_is_the_package_file(server: Server) -> None:
    """`GET /client.js` answers the bytes of clients/js/aether-client.js, the one source (an
    installed wheel serves the build's copy: test_operations.py's Dockerfile build checks it)."""
    resp = exchange(server.port, b"GET /client.js HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 200
    assert resp.body == (JS / "aether-client.js").read_bytes()


def test_node_test_runner() -> None:
    node = _need("node")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(re.match(r"v(\d+)", version.stdout).group(1))  # type: ignore[union-attr]
    assert major >= 18, f"node {version.stdout.strip()} is too old for node --test"
    if not (JS / "node_modules" / "ws" / "package.json").exists():
        npm = _need("npm")
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tests = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.mjs"))
    assert tests, "no JS test files"
    env = {**os.environ, "AETHER_PYTHON": sys.executable}
    done = subprocess.run(
        [node, "--test", "--test-reporter=spec", *tests],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    passed = re.search(r"pass (\d+)", out)
    failed = re.search(r"fail (\d+)", out)
    assert passed is not None and int(passed.group(1)) > 0, out[-3000:]
    assert failed is not None and int(failed.group(1)) == 0, out[-3000:]
