"""The static files the server ships: the JS client, the dashboard and the demo chat.

What it owns: the table of servable files (URL path -> file in `aether_fast/static/`, content
type), their caching headers and the conditional answers (ETag / 304). Rule: only a file
named in `FILES` is ever read, so no request path reaches the file system and no traversal
is possible; everything is same-origin with no CDN, which the Content-Security-Policy of
the pages enforces. The JS client has one source, `clients/js/aether-client.js`: the build
copies it into the package (setup.py) and a source checkout serves it from there
(`FROM_REPOSITORY`), so no second copy is committed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final

from aether_fast.http.front import Request, Response
from aether_fast.protocol import ErrorCode

#: URL path -> (file under aether_fast/static/, content type)
FILES: Final[dict[str, tuple[str, str]]] = {
    "/client.js": ("aether-client.js", "text/javascript; charset=utf-8"),
    "/dashboard": ("dashboard.html", "text/html; charset=utf-8"),
    "/demo": ("demo.html", "text/html; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/demo.js": ("demo.js", "text/javascript; charset=utf-8"),
    "/static/aether.css": ("aether.css", "text/css; charset=utf-8"),
}

#: Files of `FILES` whose source lives elsewhere in the repository; setup.py's build copies
#: each into the package's static/. A source checkout (`make install` is an editable install)
#: has no such copy and reads the source itself; an installed package has no repository
#: around it and reads the build's copy.
FROM_REPOSITORY: Final[dict[str, str]] = {"aether-client.js": "clients/js/aether-client.js"}
_REPOSITORY: Final = Path(__file__).resolve().parents[2]

#: The pages load scripts, styles and data from their own origin only (no CDN, no inline
#: code); connect-src 'self' covers the same-origin WebSocket as well (CSP level 3).
_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: str
    etag: str


class StaticFiles:
    """Serves the files of `FILES`, read once from the package and kept in memory.

    Answers carry an ETag and `Cache-Control: no-cache`: a browser keeps its copy but asks
    each time whether it is current (a 304 costs a few bytes), so an upgraded server never
    runs next to a stale client script."""

    def __init__(self) -> None:
        self._cache: dict[str, _File] = {}

    def _load(self, path: str) -> _File | None:
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        entry = FILES.get(path)
        if entry is None:
            return None
        name, content_type = entry
        body = _read(name)
        loaded = _File(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
        self._cache[path] = loaded
        return loaded

    def serve(self, request: Request, _: str = "") -> Response:
        """The answer to a GET/HEAD of one of `FILES` (404 for any other path)."""
        try:
            found = self._load(request.path)
        except OSError as exc:  # a broken install: say which file is missing
            return Response.error(
                500, ErrorCode.INTERNAL_ERROR, "static file unavailable", type(exc).__name__
            )
        if found is None:
            return Response.error(
                404, ErrorCode.INVALID_MESSAGE, "not found", "no such file", path=request.path
            )
        headers: list[tuple[str, str]] = [
            ("ETag", found.etag),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
        ]
        if found.content_type.startswith("text/html"):
            headers += [("Content-Security-Policy", _CSP), ("Referrer-Policy", "no-referrer")]
        if _matches(request.header("if-none-match"), found.etag):
            return Response(304, b"", found.content_type, tuple(headers))
        return Response(200, found.body, found.content_type, tuple(headers))


def _read(name: str) -> bytes:
    source = FROM_REPOSITORY.get(name)
    if source is not None and (_REPOSITORY / source).is_file():
        return (_REPOSITORY / source).read_bytes()
    return resources.files("aether_fast").joinpath("static", name).read_bytes()


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or etag in tags
