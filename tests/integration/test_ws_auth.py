"""docs/protocol.md §1 and §10 over real sockets: where the token comes from, refused tokens,
anonymous access, the `channels` claim, expiry while connected and refresh."""

from __future__ import annotations

import base64
import contextlib
import json
import time
import warnings
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import SECRET, Server
from tests.integration.helpers import (
    HClient,
    collect,
    drain,
    expect,
    expect_error,
    no_new_server_errors,  # noqa: F401 (autouse fixture)
)
from tests.integration.wsclient import Client

OTHER_SECRET = "another-secret-another-secret-another-0123"


def _b64(obj: dict[str, Any]) -> str:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _alg_none(sub: str = "alice") -> str:
    payload = {"sub": sub, "exp": int(time.time()) + 3600}
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(payload)}."


def _no_exp(sub: str = "alice") -> str:
    return jwt.encode({"sub": sub, "iat": int(time.time())}, SECRET, algorithm="HS256")


def _no_sub() -> str:
    return jwt.encode({"exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


def _hs512() -> str:
    # Right secret, but the token's header asks for another algorithm: JWT_ALGORITHM is pinned.
    with warnings.catch_warnings():  # PyJWT warns: the test secret is short for HS512
        warnings.simplefilter("ignore")
        return jwt.encode(
            {"sub": "alice", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS512"
        )


BAD_TOKENS: dict[str, tuple[Callable[[Server], str], str]] = {
    "invalid-signature": (lambda s: s.token("alice", secret=OTHER_SECRET), "AUTH_INVALID"),
    "garbage": (lambda s: "garbage-not-a-jwt", "AUTH_INVALID"),
    "three-garbage-parts": (lambda s: "aaa.bbb.ccc", "AUTH_INVALID"),
    "alg-none": (lambda s: _alg_none(), "AUTH_INVALID"),
    "alg-hs512-not-pinned": (lambda s: _hs512(), "AUTH_INVALID"),
    "expired": (lambda s: s.token("alice", ttl=-30), "TOKEN_EXPIRED"),
    "missing-exp": (lambda s: _no_exp(), "AUTH_INVALID"),
    "missing-sub": (lambda s: _no_sub(), "AUTH_INVALID"),
}


def _refused(c: Client, code: str) -> None:
    """Exactly one error message with `code`, then close 4001."""
    msgs, close = drain(c)
    assert len(msgs) == 1, msgs
    assert msgs[0]["type"] == "error" and msgs[0]["code"] == code, msgs
    assert close == 4001, (close, msgs)


def _still_serves(server: Server, channel: str) -> None:
    """Another client with a good token can join and exchange a message."""
    with (
        Client(server.ws_url, token=server.token("carol"), channel=channel) as a,
        Client(server.ws_url, token=server.token("dave"), channel=channel) as b,
    ):
        expect(a, "connection", "connect")
        expect(b, "connection", "connect")
        a.publish(channel, "still here")
        assert expect(a, "message", "ack")["data"]["metadata"]["sequence"] == 1
        assert expect(b, "message", "send")["data"]["content"] == "still here"


# -- where the token comes from ------------------------------------------------------------------


def test_token_in_query_parameter(server: Server) -> None:
    with Client(
        server.ws_url, token=server.token("alice"), client_id="q1", channel="auth.query"
    ) as c:
        first = expect(c, "connection", "connect")
        assert first["data"]["user_id"] == "alice"
        assert first["data"]["client_id"] == "q1"
        assert first["data"]["channel"] == "auth.query"
        c.publish("auth.query", "hi")
        assert expect(c, "message", "ack")["data"]["channel"] == "auth.query"


def test_token_in_authorization_header(server: Server) -> None:
    headers = {"Authorization": f"Bearer {server.token('bob')}"}
    with (
        HClient(server.ws_url, headers=headers, channel="auth.header") as c,
        Client(server.ws_url, token=server.token("alice"), channel="auth.header") as peer,
    ):
        first = expect(c, "connection", "connect")
        assert first["data"]["user_id"] == "bob"
        expect(peer, "connection", "connect")
        c.publish("auth.header", "from bob")
        expect(c, "message", "ack")
        got = expect(peer, "message", "send")
        assert got["data"]["metadata"]["user_id"] == "bob"


def test_header_token_without_channel_first_frame(server: Server) -> None:
    headers = {"Authorization": f"Bearer {server.token('erin')}"}
    with HClient(server.ws_url, headers=headers) as c:
        first = expect(c, "connection", "connect")
        assert first["data"]["user_id"] == "erin"
        assert first["data"]["channel"] is None


# -- refused tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
def test_bad_token_in_query_gets_one_error_then_4001(server: Server, kind: str) -> None:
    make, code = BAD_TOKENS[kind]
    with Client(server.ws_url, token=make(server), channel="auth.bad") as c:
        _refused(c, code)
    _still_serves(server, "auth.after-bad")


@pytest.mark.parametrize("kind", ["invalid-signature", "expired", "alg-none"])
def test_bad_token_in_header_gets_one_error_then_4001(server: Server, kind: str) -> None:
    make, code = BAD_TOKENS[kind]
    with HClient(server.ws_url, headers={"Authorization": f"Bearer {make(server)}"}) as c:
        _refused(c, code)


def test_bad_token_refused_even_without_a_channel(server: Server) -> None:
    with Client(server.ws_url, token=server.token("alice", secret=OTHER_SECRET)) as c:
        _refused(c, "AUTH_INVALID")


# -- anonymous -------------------------------------------------------------------------------


def test_anonymous_on_channel_requiring_auth_gets_auth_required_and_4001(server: Server) -> None:
    with Client(server.ws_url, channel="auth.private") as c:
        _refused(c, "AUTH_REQUIRED")
    _still_serves(server, "auth.private")


def test_anonymous_join_message_on_channel_requiring_auth_is_refused(server: Server) -> None:
    with (
        Client(server.ws_url) as anon,
        Client(server.ws_url, token=server.token("alice"), channel="auth.private2") as member,
    ):
        first = expect(anon, "connection", "connect")
        assert first["data"]["user_id"] is None
        expect(member, "connection", "connect")
        anon.join("auth.private2")
        err = expect_error(anon, "AUTH_REQUIRED")
        assert err["details"]["channel"] == "auth.private2"
        # not a member: a message published there does not reach it (whether the server
        # keeps the anonymous connection open or closes it 4001 is not checked here)
        member.publish("auth.private2", "secret")
        expect(member, "message", "ack")
        msgs, _, _ = collect(anon, 0.4)
        assert not [m for m in msgs if m.get("type") == "message"], msgs


def test_anonymous_may_join_a_channel_without_require_auth(server: Server) -> None:
    status, body, _ = server.http(
        "POST", "/ws/channels", {"name": "auth.public", "require_auth": False}, token=server.admin()
    )
    assert status == 201, body
    assert body["require_auth"] is False
    with (
        Client(server.ws_url, channel="auth.public") as anon,
        Client(server.ws_url, token=server.token("alice"), channel="auth.public") as alice,
    ):
        first = expect(anon, "connection", "connect")
        assert first["data"]["channel"] == "auth.public"
        assert first["data"]["user_id"] is None
        expect(alice, "connection", "connect")
        alice.publish("auth.public", "hello anon")
        expect(alice, "message", "ack")
        got = expect(anon, "message", "send")
        assert got["data"]["content"] == "hello anon"
        # an anonymous member may publish too
        anon.publish("auth.public", "hello alice")
        expect(anon, "message", "ack")
        got = expect(alice, "message", "send")
        assert got["data"]["content"] == "hello alice"
        assert got["data"]["metadata"]["user_id"] is None


# -- the channels claim ---------------------------------------------------------------------------


def test_channels_claim_globs(server: Server) -> None:
    token = server.token("gina", channels=["chat.*", "ops"])
    with (
        Client(server.ws_url, token=token) as c,
        Client(server.ws_url, token=server.token("hank"), channel="news.today") as other,
    ):
        expect(c, "connection", "connect")
        expect(other, "connection", "connect")
        c.join("chat.room1")
        assert expect(c, "connection", "connect")["data"]["channel"] == "chat.room1"
        c.join("ops")
        assert expect(c, "connection", "connect")["data"]["channel"] == "ops"
        for outside in ("news.today", "chat", "opsx", "xchat.room1"):
            c.join(outside)
            err = expect_error(c, "FORBIDDEN")
            assert err["details"]["channel"] == outside
        # the refused join made it no member: publishing there is refused and not delivered
        c.publish("news.today", "sneaky")
        err = expect_error(c, "NOT_A_MEMBER")
        assert err["details"]["channel"] == "news.today"
        other.nothing(0.2)
        # still connected and allowed inside its globs
        c.publish("chat.room1", "fine")
        assert expect(c, "message", "ack")["data"]["channel"] == "chat.room1"


def test_channels_claim_refuses_url_channel_outside(server: Server) -> None:
    token = server.token("ivan", channels=["chat.*"])
    with Client(server.ws_url, token=token, channel="news.x") as c:
        msgs, close = drain(c)
        assert [m.get("code") for m in msgs] == ["FORBIDDEN"], msgs
        assert msgs[0]["details"]["channel"] == "news.x"
        assert close == 4003, (close, msgs)
    with Client(server.ws_url, token=token, channel="chat.x") as c:
        assert expect(c, "connection", "connect")["data"]["channel"] == "chat.x"


# -- expiry while connected ------------------------------------------------------------------------


def test_token_expiry_while_connected(make_server: Callable[..., Server]) -> None:
    srv = make_server(TOKEN_REFRESH_NOTICE_S="2")
    # 3 s before the warning to open three connections on a busy machine
    exp = time.time() + 5.0
    short_a = srv.token("alice", exp=exp)
    short_b = srv.token("bob", exp=exp)
    with (
        Client(srv.ws_url, token=short_a, channel="exp.room") as active,
        Client(srv.ws_url, token=short_b, channel="exp.room") as silent,
        Client(srv.ws_url, token=srv.token("carol"), channel="exp.room") as watcher,
    ):
        for c in (active, silent, watcher):
            expect(c, "connection", "connect")
        opened = time.time()

        # the warning comes about TOKEN_REFRESH_NOTICE_S before expiry, not at once, not late
        for c in (active, silent):
            note = expect(c, "system", "status", timeout=10)
            got_at = time.time()
            assert note["data"]["severity"] == "warning", note
            assert got_at < exp, (got_at, exp)
            assert got_at >= exp - 2.0 - 0.3, (got_at - opened, "warning came too early")

        # before expiry the active one may still publish
        active.publish("exp.room", "before")
        expect(active, "message", "ack")
        assert expect(watcher, "message", "send")["data"]["content"] == "before"
        assert expect(silent, "message", "send")["data"]["content"] == "before"

        # the silent one is not closed before its expiry
        try:
            msg = silent.ws.recv(timeout=max(0.05, exp - time.time() - 0.2))
            raise AssertionError(f"silent connection got {msg!r} before expiry")
        except TimeoutError:
            pass

        while time.time() < exp + 0.05:
            time.sleep(0.01)
        # a message after expiry is refused with TOKEN_EXPIRED and close 4001 (whether the
        # message or the expiry timer gets there first, the client sees the same)
        with contextlib.suppress(ConnectionClosed):  # the timer may have closed it already
            active.publish("exp.room", "after")
        msgs, close = drain(active)
        assert [m.get("code") for m in msgs] == ["TOKEN_EXPIRED"], msgs
        assert close == 4001

        # the silent connection is closed by the timer at expiry
        msgs, close = drain(silent, timeout=10)
        assert close == 4001, (close, msgs)
        assert [m.get("code") for m in msgs if m["type"] == "error"] == ["TOKEN_EXPIRED"], msgs

        # the message sent after expiry was not published
        watcher.nothing(0.2)
        watcher.send({"type": "system", "action": "status", "data": {}})
        expect(watcher, "system", "status")


def test_refresh(server: Server) -> None:
    exp = time.time() + 5.0  # time for four connections and the refreshes on a busy machine
    with (
        Client(
            server.ws_url, token=server.token("alice", exp=exp), client_id="r1", channel="ref.room"
        ) as good,
        Client(
            server.ws_url, token=server.token("alice", exp=exp), client_id="r2", channel="ref.room"
        ) as other_sub,
        Client(
            server.ws_url, token=server.token("alice", exp=exp), client_id="r3", channel="ref.room"
        ) as bad_token,
        Client(server.ws_url, token=server.token("zed"), channel="ref.room") as watcher,
    ):
        for c in (good, other_sub, bad_token, watcher):
            expect(c, "connection", "connect")

        def reply(c: Client) -> dict[str, Any]:
            # the default TOKEN_REFRESH_NOTICE_S (60) makes the server warn these short tokens
            while True:
                msg = c.recv()
                if (msg["type"], msg.get("action")) != ("system", "status"):
                    return msg

        new = server.token("alice", ttl=3600)
        new_exp = jwt.decode(new, options={"verify_signature": False})["exp"]
        good.send({"type": "connection", "action": "refresh", "data": {"token": new}})
        msg = reply(good)
        assert (msg["type"], msg["action"]) == ("connection", "refresh"), msg
        assert msg["data"]["expires_at"] == pytest.approx(new_exp)

        other_sub.send(
            {"type": "connection", "action": "refresh", "data": {"token": server.token("mallory")}}
        )
        err = reply(other_sub)
        assert err["type"] == "error" and err["code"] == "AUTH_INVALID", err
        assert err["details"]["reason"] == "the new token has another sub", err

        bad_token.send(
            {
                "type": "connection",
                "action": "refresh",
                "data": {"token": server.token("alice", secret=OTHER_SECRET)},
            }
        )
        err = reply(bad_token)
        assert err["type"] == "error" and err["code"] == "AUTH_INVALID", err
        bad_token.send(
            {
                "type": "connection",
                "action": "refresh",
                "data": {"token": server.token("alice", ttl=-30)},
            }
        )
        err = reply(bad_token)
        assert err["type"] == "error" and err["code"] == "TOKEN_EXPIRED", err

        # after refused refreshes both keep their old token: still alice, still working
        other_sub.publish("ref.room", "old token 2")
        assert reply(other_sub)["action"] == "ack"
        got = reply(bad_token)
        assert got["data"]["content"] == "old token 2"
        bad_token.publish("ref.room", "old token 3")
        assert reply(bad_token)["action"] == "ack"
        assert reply(other_sub)["data"]["content"] == "old token 3"
        for text in ("old token 2", "old token 3"):
            for c in (watcher, good):
                got = reply(c)
                assert got["data"]["content"] == text
                assert got["data"]["metadata"]["user_id"] == "alice"

        # the refused ones die with their old token (at its expiry, whenever that comes) ...
        for c in (other_sub, bad_token):
            msgs, close = drain(c, timeout=exp - time.time() + 10)
            assert close == 4001, (close, msgs)
        assert time.time() >= exp
        # ... the refreshed one, whose old expiry came at the same time, outlives it
        good.publish("ref.room", "after old expiry")
        ack = reply(good)
        assert ack["type"] == "message" and ack["action"] == "ack", ack
        got = reply(watcher)
        assert got["data"]["content"] == "after old expiry"
        assert got["data"]["metadata"]["user_id"] == "alice"


# -- authorization follows changes: a narrower refresh, a channel switched to require_auth -------


def _removed(c: Client, channel: str, reason: str) -> None:
    """The notice of a removal: connection/disconnect with the reason, then the warning."""
    gone = expect(c, "connection", "disconnect")
    assert gone["data"]["channel"] == channel and gone["data"]["reason"] == reason, gone
    note = expect(c, "system", "status")
    assert note["data"]["severity"] == "warning" and channel in note["data"]["message"], note


def test_refresh_with_a_narrower_channels_claim_removes_the_member(server: Server) -> None:
    wide = server.token("nina", channels=["rfn.*"])
    with (
        Client(server.ws_url, token=wide, client_id="nina-1") as c,
        Client(server.ws_url, token=server.token("otto"), channel="rfn.b") as other,
    ):
        expect(c, "connection", "connect")
        expect(other, "connection", "connect")
        for name in ("rfn.a", "rfn.b"):
            c.join(name)
            assert expect(c, "connection", "connect")["data"]["channel"] == name
        narrow = server.token("nina", channels=["rfn.a"], ttl=7200)
        c.send({"type": "connection", "action": "refresh", "data": {"token": narrow}})
        expect(c, "connection", "refresh")
        _removed(c, "rfn.b", "not allowed by the new token")
        # it no longer receives rfn.b's publications, may not publish or join there again
        other.publish("rfn.b", "after the refresh")
        expect(other, "message", "ack")
        c.nothing(0.3)
        c.publish("rfn.b", "refused")
        assert expect_error(c, "NOT_A_MEMBER")["details"]["channel"] == "rfn.b"
        c.join("rfn.b")
        assert expect_error(c, "FORBIDDEN")["details"]["channel"] == "rfn.b"
        # the channel the new token still allows keeps working
        c.publish("rfn.a", "still mine")
        expect(c, "message", "ack")
        # a refresh that allows everything the connection holds removes nothing
        c.send({"type": "connection", "action": "refresh", "data": {"token": wide}})
        expect(c, "connection", "refresh")
        c.nothing(0.3)


def test_require_auth_switch_removes_anonymous_members(server: Server) -> None:
    admin = server.admin()
    cfg = {"name": "ras.room", "require_auth": False, "presence": True}
    status, body, _ = server.http("POST", "/ws/channels", cfg, token=admin)
    assert status == 201, body
    with (
        Client(server.ws_url, channel="ras.room") as anon,
        Client(server.ws_url, token=server.token("alice"), channel="ras.room") as alice,
    ):
        expect(anon, "connection", "connect")
        expect(alice, "connection", "connect")
        expect(anon, "connection", "connect")  # presence: alice joined
        status, body, _ = server.http(
            "POST", "/ws/channels", {**cfg, "require_auth": True}, token=admin
        )
        assert status == 200 and body["require_auth"] is True, body
        _removed(anon, "ras.room", "channel requires auth")
        left = expect(alice, "connection", "disconnect")  # presence: the anonymous one left
        assert left["data"]["user_id"] is None and "reason" not in left["data"], left
        alice.publish("ras.room", "members only")
        expect(alice, "message", "ack")
        anon.nothing(0.3)
        anon.join("ras.room")
        assert expect_error(anon, "AUTH_REQUIRED")["details"]["channel"] == "ras.room"
        # the anonymous connection stays open; the authenticated member stays in
        anon.send({"type": "system", "action": "status", "data": {}})
        expect(anon, "system", "status")
        code, view, _ = server.http("GET", "/ws/channels/ras.room", token=admin)
        assert code == 200 and view["members"] == 1, view


def test_channels_claim_star_stays_in_one_segment(server: Server) -> None:
    token = server.token("glen", channels=["gl.*", "deep.**"])
    with Client(server.ws_url, token=token) as c:
        expect(c, "connection", "connect")
        for allowed in ("gl.room1", "deep.a", "deep.a.b:admin"):
            c.join(allowed)
            assert expect(c, "connection", "connect")["data"]["channel"] == allowed
        for outside in ("gl.a.b", "gl.room1:admin", "gl"):
            c.join(outside)
            assert expect_error(c, "FORBIDDEN")["details"]["channel"] == outside
    # refused in the URL as well: 4003
    with Client(server.ws_url, token=token, channel="gl.a:admin") as c:
        msgs, close = drain(c)
        assert [m.get("code") for m in msgs] == ["FORBIDDEN"], msgs
        assert msgs[0]["details"]["channel"] == "gl.a:admin"
        assert close == 4003, (close, msgs)
