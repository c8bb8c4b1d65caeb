"""RFC 6455 conformance: kosoku runs the Autobahn TestSuite's cases against ECHO_PATH, an
echo served through the same frame layer (ext/connection.pxi) as WS_PATH.

The compression cases (12.*, 13.*: permessage-deflate, RFC 7692) run in their own test: a
representative subset in CI (every offer of 13.*, small and large messages, fragmented ones,
binary data), all 216 of them with AETHER_KOSOKU_FULL=1 (`make conformance-deflate`, about
7 minutes here). Known and documented (docs/conformance.md): 7.1.2 (two CLOSE frames in one
read) fails inside picows, which parses the second CLOSE before handing us the first and
answers 1002.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Server

KNOWN_PICOWS_FAILURES = {"7.1.2"}
#: The echo server sends no pings of its own: an Autobahn case ends itself (close, and the
#: 12.* ones count as FAILED) on any ping it did not ask for (`Case.onPing` runs
#: `finishWhenDone`), and the server pings a connection that has sent no whole frame since
#: the last ping round: one that opened just before the 20 s round (seen once: 12.3.10)
NO_PINGS = {"PING_INTERVAL_S": "0"}
#: 12.*/13.* in CI: the five data sets of 12.* at one size each (fragmented, binary, text),
#: every client offer / server answer of 13.* (13.1 - 13.7: window bits 9 and 15, no context
#: takeover), and sizes from 16 bytes to 128 KiB
COMPRESSION_SUBSET = [
    "12.1.1",
    "12.1.4",
    "12.2.11",
    "12.3.5",
    "12.4.9",
    "12.5.18",
    "13.1.1",
    "13.2.1",
    "13.3.1",
    "13.3.4",
    "13.4.1",
    "13.5.1",
    "13.5.4",
    "13.6.1",
    "13.7.1",
    "13.7.4",
    "13.7.11",
]


def test_autobahn_cases_pass(make_server: Callable[..., Server], tmp_path: Path) -> None:
    srv = make_server(
        ECHO_PATH="/",
        MAX_MESSAGE_BYTES=str(20 * 1024 * 1024),
        SEND_BUFFER_LIMIT_BYTES=str(100 * 1024 * 1024),
        **NO_PINGS,
    )
    kosoku = str(Path(sys.executable).with_name("kosoku"))  # the dev extra installs it
    run = subprocess.run(
        [
            kosoku,
            f"127.0.0.1:{srv.port}",
            "-p",
            "4",
            "-x",
            "12.*",
            "-x",
            "13.*",
            "-o",
            str(tmp_path / "reports"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    index = json.loads((tmp_path / "reports" / "index.json").read_text())
    (results,) = index.values()
    assert len(results) > 290, run.stdout[-2000:]
    failed = {
        case
        for case, r in results.items()
        if r["behavior"] not in ("OK", "NON-STRICT", "INFORMATIONAL")
        or r["behaviorClose"] not in ("OK", "INFORMATIONAL")
    }
    assert failed <= KNOWN_PICOWS_FAILURES, run.stdout[-3000:]
    # the server is still serving after the whole suite
    status, body, _ = srv.http("GET", "/health")
    assert status == 200 and body["status"] == "healthy"


def test_autobahn_compression_cases_pass(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    # COMPRESSION_MIN_BYTES=0: every echo is compressed. kosoku 0.1.0 fails its own text
    # cases on an uncompressed text message of a deflate connection ("Strings must be
    # encoded before hashing"), which RFC 7692 allows and the default 512 would send
    srv = make_server(
        ECHO_PATH="/",
        MAX_MESSAGE_BYTES=str(20 * 1024 * 1024),
        SEND_BUFFER_LIMIT_BYTES=str(100 * 1024 * 1024),
        COMPRESSION_MIN_BYTES="0",
        **NO_PINGS,
    )
    full = os.environ.get("AETHER_KOSOKU_FULL", "") not in ("", "0")
    cases = ["12.*", "13.*"] if full else COMPRESSION_SUBSET
    kosoku = str(Path(sys.executable).with_name("kosoku"))
    run = subprocess.run(
        [kosoku, f"127.0.0.1:{srv.port}", "-p", "4", "-o", str(tmp_path / "reports")]
        + [arg for case in cases for arg in ("-i", case)],
        capture_output=True,
        text=True,
        timeout=1800 if full else 300,
    )
    index = json.loads((tmp_path / "reports" / "index.json").read_text())
    (results,) = index.values()
    assert len(results) == (216 if full else len(COMPRESSION_SUBSET)), run.stdout[-2000:]
    # none failed, none unimplemented: every case negotiated deflate and echoed right
    bad = {
        case: (r["behavior"], r["behaviorClose"])
        for case, r in results.items()
        if r["behavior"] != "OK" or r["behaviorClose"] != "OK"
    }
    assert not bad, (bad, run.stdout[-3000:])
    # and the echoes went out compressed (an OK alone would also follow plain echoes)
    status, body, _ = srv.http("GET", "/metrics/messages")
    assert status == 200 and body["compression"]["compressions"] > 0
