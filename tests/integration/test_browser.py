"""Real browser tests: Debian's chromium, headless, driven by playwright's Python package.

- /demo: two pages exchange messages; the server is stopped while both type (their
  messages queue), started again; both pages reconnect and recover, and each page shows
  every message of the other exactly once.
- /dashboard: shows the numbers /ws/status reports, and says when the server is gone;
  channel names only once an admin token is entered.
- permessage-deflate: a page on /client.js receives a ~2 KB JSON publication intact, and it
  crossed the wire compressed: the browser's handshake answer (DevTools protocol) names
  permessage-deflate, and the server's counters show that delivery sent compressed.

Screenshots go to a temporary directory, or to docs/demo.png and docs/dashboard.png with
UPDATE_SCREENSHOTS=1. These tests fail (not skip) when chromium or playwright is missing:
.ci/run installs both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Server
from tests.integration.wsclient import Client

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1100, "height": 760}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]'")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium (.ci/run does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def shot_path(name: str, tmp_path: Path) -> Path:
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        return ROOT / "docs" / name
    return tmp_path / name


class Watched:
    """A page whose console errors and uncaught exceptions are collected."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda exc: self.problems.append(f"pageerror: {exc}"))
        self.page.on("console", self._console)

    def _console(self, msg: Any) -> None:
        # a refused WebSocket connection while the server is down is expected
        if msg.type == "error" and "WebSocket connection to" not in msg.text:
            self.problems.append(f"console: {msg.text}")

    def close(self) -> None:
        self.context.close()


def wait_for(cond: Callable[[], Any], timeout: float = 15, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.05)


# -- /demo ---------------------------------------------------------------------------------


def _others(page: Any) -> list[str]:
    texts: list[str] = page.eval_on_selector_all(
        "#messages li.other .text", "els => els.map(e => e.textContent)"
    )
    return texts


def _say(page: Any, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def _exactly_once(got: list[str], want: list[str]) -> bool:
    counts = Counter(got)
    assert all(n == 1 for n in counts.values()), f"doubled: {counts.most_common(3)}"
    return sorted(got) == sorted(want)


def test_demo_chat_survives_a_server_restart(
    browser: Any, make_server: Callable[..., Server], tmp_path: Path
) -> None:
    srv = make_server()
    a, b = Watched(browser), Watched(browser)
    try:
        for page, sub in ((a.page, "alice"), (b.page, "bob")):
            page.goto(
                f"http://127.0.0.1:{srv.port}/demo"
                f"#token={srv.token(sub)}&channel=browser&client_id={sub}-page"
            )
            page.wait_for_selector("body[data-state=open]", timeout=15000)
        assert "alice" in a.page.inner_text("#who")

        sent_a, sent_b = ["hello bob", "how are you?"], ["hi alice", "fine, thanks"]
        for ta, tb in zip(sent_a, sent_b, strict=True):
            _say(a.page, ta)
            _say(b.page, tb)
        wait_for(lambda: _exactly_once(_others(b.page), sent_a), what="bob sees alice")
        wait_for(lambda: _exactly_once(_others(a.page), sent_b), what="alice sees bob")

        # the server goes away; both keep typing, their messages wait in the client's queue
        assert srv.stop() == 0
        a.page.wait_for_selector("body[data-state=reconnecting]", timeout=10000)
        b.page.wait_for_selector("body[data-state=reconnecting]", timeout=10000)
        down_a, down_b = ["while you were away", "still there?"], ["typed offline"]
        for text in down_a:
            _say(a.page, text)
        for text in down_b:
            _say(b.page, text)
        assert a.page.get_attribute("body", "data-pending") == "2"
        assert b.page.get_attribute("body", "data-pending") == "1"

        srv.start()
        for w in (a, b):
            w.page.wait_for_selector("body[data-state=open]", timeout=30000)
            w.page.wait_for_selector("body[data-pending='0']", timeout=15000)
        after_a, after_b = ["back again"], ["welcome back"]
        _say(a.page, after_a[0])
        _say(b.page, after_b[0])

        want_b = sent_a + down_a + after_a  # what bob must see from alice
        want_a = sent_b + down_b + after_b
        wait_for(lambda: _exactly_once(_others(b.page), want_b), what="bob sees all once")
        wait_for(lambda: _exactly_once(_others(a.page), want_a), what="alice sees all once")
        time.sleep(0.5)  # nothing more arrives (no late duplicate)
        assert _others(b.page) == want_b, "bob: lost, doubled or out of order"
        assert _others(a.page) == want_a, "alice: lost, doubled or out of order"
        own = a.page.eval_on_selector_all("#messages li.own.pending", "els => els.length")
        assert own == 0, "every own message was acknowledged"
        a.page.screenshot(path=str(shot_path("demo.png", tmp_path)))
        assert a.problems == [] and b.problems == [], a.problems + b.problems
    finally:
        a.close()
        b.close()


# -- /dashboard ----------------------------------------------------------------------------


def _shown(page: Any) -> dict[str, str]:
    ids = ["connections-active", "connections-total", "channels-active", "messages-per-second"]
    values: dict[str, str] = page.evaluate(
        "ids => Object.fromEntries(ids.map(id => [id, document.getElementById(id).textContent]))",
        ids,
    )
    return values


def _reported(srv: Server) -> dict[str, str]:
    status, body, _ = srv.http("GET", "/ws/status")
    assert status == 200, body

    def fmt(x: float) -> str:  # the page's Intl.NumberFormat('en', max 2 decimals)
        text = f"{round(float(x), 2):,.2f}".rstrip("0").rstrip(".")
        return text or "0"

    return {
        "connections-active": fmt(body["connections"]["active"]),
        "connections-total": fmt(body["connections"]["total"]),
        "channels-active": fmt(body["channels"]["active"]),
        "messages-per-second": fmt(body["channels"]["messages_per_second"]),
    }


def test_dashboard_shows_what_status_reports(
    browser: Any, make_server: Callable[..., Server], tmp_path: Path
) -> None:
    srv = make_server()
    w = Watched(browser)
    clients: list[Client] = []
    try:
        for i, (sub, channel) in enumerate(
            [("alice", "lobby"), ("bob", "lobby"), ("carol", "news"), ("dave", None)]
        ):
            c = Client(srv.ws_url, token=srv.token(sub), client_id=f"dash-{i}", channel=channel)
            c.recv()
            clients.append(c)
        for n in range(12):
            clients[0].publish("lobby", f"message {n}")
        clients[2].publish("news", "headline")
        clients[3].send("not json")  # one INVALID_JSON error

        w.page.goto(f"http://127.0.0.1:{srv.port}/dashboard")
        w.page.wait_for_selector("body[data-updates]", timeout=10000)

        def same() -> bool:
            return _shown(w.page) == _reported(srv)

        wait_for(same, timeout=15, what="dashboard equals /ws/status")
        assert _shown(w.page)["connections-active"] == "4"
        assert w.page.inner_text("#status") == "healthy"
        _, errors, _ = srv.http("GET", "/metrics/errors")
        wait_for(lambda: w.page.inner_text("#errors-total") == str(errors["total"]))
        assert errors["total"] >= 1 and "INVALID_JSON" in w.page.inner_text("#errors")
        # channel names are not public (issue 12): without the admin token none is shown
        w.page.wait_for_selector("#channels-locked", state="visible", timeout=5000)
        page_text = w.page.inner_text("body")
        assert "lobby" not in page_text and "news" not in page_text
        # a token without admin rights is refused, forgotten, and shows nothing
        w.page.fill("#admin-token", srv.token("alice"))
        w.page.click("#admin-save")
        w.page.wait_for_selector("#admin-token[placeholder^='token refused']", timeout=5000)
        assert w.page.evaluate("() => sessionStorage.getItem('aether-admin-token')") is None
        assert "lobby" not in w.page.inner_text("body")
        # the admin token shows them, and is kept in this tab's sessionStorage only
        admin = srv.admin()
        w.page.fill("#admin-token", admin)
        w.page.click("#admin-save")
        wait_for(lambda: "lobby" in w.page.inner_text("#channels"), what="channel names")
        table = w.page.inner_text("#channels")
        assert "lobby" in table and "news" in table
        assert w.page.is_hidden("#channels-locked")
        assert w.page.evaluate("() => sessionStorage.getItem('aether-admin-token')") == admin
        assert w.page.evaluate("() => localStorage.length") == 0
        w.page.reload()
        w.page.wait_for_selector("body[data-updates]", timeout=10000)
        wait_for(lambda: "news" in w.page.inner_text("#channels"), what="names after reload")
        drawn = w.page.evaluate(
            "() => { const c = document.getElementById('rate-chart');"
            " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }"
        )
        assert drawn > 500, "the chart was drawn"
        for n in range(16):  # a few seconds of traffic for the chart (under the rate limit)
            clients[1].publish("lobby", f"more {n}")
            if n % 3 == 0:
                clients[2].publish("news", f"flash {n}")
            time.sleep(0.25)
        w.page.screenshot(path=str(shot_path("dashboard.png", tmp_path)), full_page=True)
        wait_for(same, timeout=15, what="dashboard equals /ws/status again")

        # a closed connection shows up within a poll or two
        _drain_and_close(clients.pop())
        wait_for(lambda: _shown(w.page)["connections-active"] == "3", what="3 connections")
        wait_for(same, timeout=10, what="dashboard equals /ws/status after a close")

        # the server goes away: the page says so, and recovers when it is back
        for c in clients:
            _drain_and_close(c)
        clients.clear()
        assert srv.stop() == 0
        w.page.wait_for_selector("body[data-status=unreachable]", timeout=10000)
        srv.start()
        w.page.wait_for_selector("body[data-status=healthy]", timeout=10000)
        wait_for(same, timeout=10, what="dashboard equals /ws/status after a restart")
        # the refused non-admin token: one 403 in the console
        fetch_errors = [
            p for p in w.problems if "Failed to fetch" not in p and "status of 403" not in p
        ]
        # a poll during the outage fails with net::ERR_CONNECTION_REFUSED in the console
        assert [p for p in fetch_errors if "ERR_CONNECTION_REFUSED" not in p] == []
    finally:
        for c in clients:
            _drain_and_close(c)
        w.close()


def _drain_and_close(c: Client) -> None:
    # websockets' reader stops at max_queue unread frames and would then wait
    # close_timeout for the server's close frame: read what is queued first
    with contextlib.suppress(Exception):
        while True:
            c.ws.recv(timeout=0.05)
    c.close()


# -- permessage-deflate with Chromium ------------------------------------------------------

_OPEN_WS = """async ([url, channel]) => {
  const ws = new WebSocket(url);
  window.got = [];
  ws.onmessage = (e) => window.got.push(JSON.parse(e.data));
  await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = fail; });
  window.ws = ws;
  ws.send(JSON.stringify({type: "connection", action: "connect", data: {channel}}));
  return ws.extensions;
}"""


def test_chromium_negotiates_deflate_both_ways(
    browser: Any, make_server: Callable[..., Server]
) -> None:
    """Chromium offers permessage-deflate: it gets it, reads a compressed publication and
    sends compressed messages the server inflates (docs/protocol.md §16)."""
    srv = make_server(RATE_LIMIT_MESSAGES="100000")
    big = "chromium and aether, compressed once " * 100
    w = Watched(browser)
    try:
        # a page of the server's origin (its favicon, which the server has not, stubbed)
        w.page.route("**/favicon.ico", lambda route: route.fulfill(status=204, body=""))
        w.page.goto(f"http://127.0.0.1:{srv.port}/health")
        url = f"ws://127.0.0.1:{srv.port}/ws?token={srv.token('chrome')}"
        extensions = w.page.evaluate(_OPEN_WS, [url, "browser.deflate"])
        assert extensions == (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        )
        wait_for(
            lambda: any(m.get("action") == "connect" for m in w.page.evaluate("window.got")),
            what="the page's join",
        )
        before = srv.http("GET", "/metrics/messages")[1]["compression"]["compressions"]
        with Client(srv.ws_url, token=srv.token("py"), channel="browser.deflate") as c:
            joined = c.recv()
            assert joined["action"] == "connect"
            c.publish("browser.deflate", big)

            def page_got_it() -> bool:
                got = w.page.evaluate("window.got")
                return any(m.get("data", {}).get("content") == big for m in got)

            wait_for(page_got_it, what="the compressed publication in the page")
            after = srv.http("GET", "/metrics/messages")[1]["compression"]
            assert after["compressions"] > before and after["deliveries"] >= 1
            # the page publishes a large message: Chromium compresses it, the server inflates it
            w.page.evaluate(
                """(content) => window.ws.send(JSON.stringify({type: "message", action: "send",
                   data: {channel: "browser.deflate", content,
                          metadata: {sequence: 1}}}))""",
                big + "from the page",
            )
            msg = c.recv_until("message", "send")  # after its own publication's ack
            assert msg["data"]["content"] == big + "from the page"
            figures = srv.http("GET", "/metrics/messages")[1]["compression"]
            assert figures["inflated"] > after["inflated"]  # it came compressed
        assert not w.problems, w.problems
    finally:
        w.close()


# -- permessage-deflate ----------------------------------------------------------------------

PAGE_CLIENT = """async ({url, token}) => {
  const { AetherClient } = await import('/client.js');
  window.got = [];
  const client = new AetherClient(url, {token, clientId: 'deflate-page', channels: ['dz.page']});
  client.on('message', (m) => window.got.push(m.content));
  await client.connect();
  window.client = client;
  return client.state;
}"""


def test_browser_receives_a_publication_compressed(
    browser: Any, make_server: Callable[..., Server]
) -> None:
    """The browser negotiates permessage-deflate by itself (the JS client does nothing for
    it): shown by the handshake's response headers as DevTools reports them, and by the
    server's counters (bytes sent below the plain bytes, one compressed delivery)."""
    srv = make_server(WORKERS="1")
    w = Watched(browser)
    handshakes: list[dict[str, Any]] = []
    try:
        cdp = w.context.new_cdp_session(w.page)
        cdp.on("Network.webSocketHandshakeResponseReceived", lambda e: handshakes.append(e))
        cdp.send("Network.enable")
        w.page.goto(f"http://127.0.0.1:{srv.port}/demo")  # a page of the server: its origin
        state = w.page.evaluate(PAGE_CLIENT, {"url": srv.ws_url, "token": srv.token("pat")})
        assert state == "open"
        answer = [
            value
            for event in handshakes
            for name, value in event["response"]["headers"].items()
            if name.lower() == "sec-websocket-extensions"
        ]
        assert len(answer) == 1 and answer[0].startswith("permessage-deflate"), handshakes

        content = json.dumps(
            {"rows": [{"id": i, "name": f"row {i}", "state": "ok"} for i in range(45)]}
        )
        assert 1800 < len(content) < 2500
        _, before, _ = srv.http("GET", "/metrics/messages")
        with Client(srv.ws_url, token=srv.token("sam"), channel="dz.page") as sam:
            sam.recv()  # connected, joined
            sam.publish("dz.page", content)
            assert sam.recv_until("message", "ack")["data"]["metadata"]["offset"] == 1
            wait_for(lambda: w.page.evaluate("() => window.got.length") == 1, what="delivery")
        assert w.page.evaluate("() => window.got") == [content]
        _, after, _ = srv.http("GET", "/metrics/messages")
        assert after["delivered"] - before["delivered"] == 1  # the page's copy only
        assert after["compression"]["deliveries"] - before["compression"]["deliveries"] == 1
        sent = after["bytes_out"] - before["bytes_out"]
        plain = after["bytes_out_uncompressed"] - before["bytes_out_uncompressed"]
        assert sent < plain / 2 and plain > len(content), (sent, plain)
        w.page.evaluate("() => window.client.close()")
        assert w.problems == [], w.problems
    finally:
        w.close()
