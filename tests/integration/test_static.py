"""The static files as the server serves them: /client.js (clients/js/aether-client.js, its
one source), /dashboard, /demo and their assets (aether_fast/static/); content types, caching
(ETag, 304), security headers, only known files, and the API answers keep
`Cache-Control: no-store`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, Server
from tests.integration.helpers import no_new_server_errors  # noqa: F401 (autouse fixture)
from tests.integration.rawhttp import exchange

STATIC = ROOT / "aether_fast" / "static"
CLIENT = ROOT / "clients" / "js" / "aether-client.js"

FILES = [
    ("/client.js", CLIENT, "text/javascript"),
    ("/dashboard", STATIC / "dashboard.html", "text/html"),
    ("/demo", STATIC / "demo.html", "text/html"),
    ("/static/dashboard.js", STATIC / "dashboard.js", "text/javascript"),
    ("/static/demo.js", STATIC / "demo.js", "text/javascript"),
    ("/static/aether.css", STATIC / "aether.css", "text/css"),
]


@pytest.mark.parametrize(("path", "source", "ctype"), FILES)
def test_served_file(server: Server, path: str, source: Path, ctype: str) -> None:
    status, body, headers = server.http("GET", path)
    assert status == 200
    assert body == source.read_text()
    assert headers["Content-Type"] == f"{ctype}; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Content-Type-Options"] == "nosniff"
    etag = headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    # a browser revalidating its copy gets a 304 without a body
    status, body, headers = server.http("GET", path, headers={"If-None-Match": etag})
    assert (status, body, headers["ETag"]) == (304, "", etag)
    status, body, _ = server.http("GET", path, headers={"If-None-Match": '"other"'})
    assert status == 200 and body


def test_pages_forbid_foreign_code(server: Server) -> None:
    for path in ("/dashboard", "/demo"):
        _, body, headers = server.http("GET", path)
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "http" not in body.replace("http://www.w3.org", "")  # no CDN, no remote asset


def test_head_and_methods(server: Server) -> None:
    status, body, headers = server.http("HEAD", "/client.js")
    assert status == 200 and body == ""
    assert int(headers["Content-Length"]) == len(CLIENT.read_bytes())
    status, body, headers = server.http("POST", "/demo", raw=b"x")
    assert status == 405 and headers["Allow"] == "GET"
    assert body["code"] == "INVALID_MESSAGE"


@pytest.mark.parametrize(
    "path",
    [
        "/static/",
        "/static/missing.js",
        "/static/../pyproject.toml",
        "/static/%2e%2e/aether_fast/config.py",
        "/static/aether-client.js",
        "/aether-client.js",
        "/dashboard.html",
        "/static//etc/passwd",
        "/client.js/",
    ],
)
def test_only_known_files(server: Server, path: str) -> None:
    status, body, _ = server.http("GET", path)
    assert status == 404, (path, body)
    assert body["code"] == "INVALID_MESSAGE"


def test_raw_traversal_is_not_found(server: Server) -> None:
    resp = exchange(server.port, b"GET /static/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 404, resp


def test_api_answers_are_not_cached(server: Server) -> None:
    _, _, headers = server.http("GET", "/ws/status")
    assert headers["Cache-Control"] == "no-store"


def test_static_files_are_package_data() -> None:
    """Every file of the table is package data: committed under static/, or copied there by
    the build from its one source elsewhere in the repository (never committed twice)."""
    import tomllib

    committed = subprocess.run(
        ["git", "ls-files", "aether_fast/static", "clients/js"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    clients = [p for p in committed if Path(p).name == "aether-client.js"]
    assert clients == ["clients/js/aether-client.js"], f"the JS client committed twice: {clients}"

    data = tomllib.loads(Path(ROOT / "pyproject.toml").read_text())
    assert "static/*" in data["tool"]["setuptools"]["package-data"]["aether_fast"]
    from aether_fast.http import static

    copied = static.FROM_REPOSITORY
    assert copied == {"aether-client.js": "clients/js/aether-client.js"}
    names = {Path(p).name for p in committed if p.startswith("aether_fast/static/")}
    assert not names & set(copied), "a copy of a file whose source is elsewhere"
    assert {name for name, _ in static.FILES.values()} == names | set(copied)
