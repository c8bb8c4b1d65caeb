"""docs/protocol.md §3-9 over real sockets: join/leave, publish/ack/fan-out, offsets, idempotence,
replacement, history and recovery, presence, status, broadcasts and channel admin effects."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

from tests.conftest import Server
from tests.integration.helpers import (
    drain,
    expect,
    expect_error,
    joined,
    member,
    no_new_server_errors,  # noqa: F401 (autouse fixture)
    send_msg,
)
from tests.integration.wsclient import Client


def _iso_utc(text: str) -> dt.datetime:
    assert isinstance(text, str) and text.endswith(("Z", "+00:00")), text
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert when.utcoffset() == dt.timedelta(0)
    now = dt.datetime.now(dt.UTC)
    assert abs((now - when).total_seconds()) < 10, (text, now)
    return when


# -- join, leave, first frame ------------------------------------------------------------------


def test_first_frame_without_channel(server: Server) -> None:
    with Client(server.ws_url, token=server.token("alice"), client_id="first-1") as c:
        data = joined(c)
        assert data["client_id"] == "first-1"
        assert data["user_id"] == "alice"
        assert data["channel"] is None
    with Client(server.ws_url, token=server.token("alice")) as c:
        data = joined(c)
        assert isinstance(data["client_id"], str) and data["client_id"]  # made by the server
        assert data["user_id"] == "alice"


def test_first_frame_with_url_channel(server: Server) -> None:
    with Client(
        server.ws_url, token=server.token("bob"), client_id="first-2", channel="msg.first"
    ) as c:
        data = joined(c, "msg.first")
        assert data["client_id"] == "first-2"
        assert data["user_id"] == "bob"
        assert data["offset"] == 0
        assert isinstance(data["epoch"], str) and data["epoch"]
        c.quiet()  # exactly one frame at open


def test_join_and_leave_replies(server: Server) -> None:
    with (
        Client(server.ws_url, token=server.token("alice"), client_id="jl") as c,
        Client(server.ws_url, token=server.token("bob"), channel="msg.jl") as b,
    ):
        joined(c)
        joined(b, "msg.jl")
        c.join("msg.jl")
        data = joined(c, "msg.jl")
        assert data["client_id"] == "jl" and data["user_id"] == "alice"
        assert data["offset"] == 0 and isinstance(data["epoch"], str)
        b.publish("msg.jl", "one")
        expect(b, "message", "ack")
        assert expect(c, "message", "send")["data"]["content"] == "one"

        c.leave("msg.jl")
        bye = expect(c, "connection", "disconnect")
        assert bye["data"]["channel"] == "msg.jl"
        b.publish("msg.jl", "two")
        expect(b, "message", "ack")
        c.quiet()  # no longer a member: no delivery

        c.publish("msg.jl", "not a member now")
        err = expect_error(c, "NOT_A_MEMBER")
        assert err["details"]["channel"] == "msg.jl"
        c.leave("msg.jl")
        expect_error(c, "NOT_A_MEMBER")
        b.quiet()

        # joining again works, and the reply has the channel's current offset
        c.join("msg.jl")
        assert joined(c, "msg.jl")["offset"] == 2


def test_joining_twice_does_not_double_deliveries(server: Server) -> None:
    with member(server, "alice", "msg.twice") as a, member(server, "bob", "msg.twice") as b:
        a.join("msg.twice")
        msg = a.recv()  # a second reply, or an error saying it is already a member
        assert msg["type"] in ("connection", "error"), msg
        b.publish("msg.twice", "once")
        expect(b, "message", "ack")
        assert expect(a, "message", "send")["data"]["content"] == "once"
        a.quiet()
        a.leave("msg.twice")
        expect(a, "connection", "disconnect")
        b.publish("msg.twice", "after leave")
        expect(b, "message", "ack")
        a.quiet()  # one leave undoes the membership, however many joins


# -- publish, ack, fan-out ----------------------------------------------------------------------


def test_publish_ack_and_fan_out(server: Server) -> None:
    tok = server.token
    with (
        Client(server.ws_url, token=tok("alice"), client_id="snd", channel="msg.fan") as sender,
        Client(server.ws_url, token=tok("bob"), client_id="m1", channel="msg.fan") as m1,
        Client(server.ws_url, token=tok("carol"), client_id="m2", channel="msg.fan") as m2,
        Client(server.ws_url, token=tok("dave"), client_id="nm", channel="msg.other") as outsider,
    ):
        for c in (sender, m1, m2, outsider):
            joined(c)
        sender.send(
            {
                "type": "message",
                "action": "send",
                "extra_top": "ignored",
                "data": {
                    "channel": "msg.fan",
                    "content": "héllo ✓",
                    "metadata": {"sequence": 7, "timestamp": "1999-01-01T00:00:00Z", "x": 1},
                    "smuggled": {"a": 1},
                },
            }
        )
        ack = expect(sender, "message", "ack")
        assert ack["data"]["channel"] == "msg.fan"
        meta = ack["data"]["metadata"]
        assert meta["sequence"] == 7
        assert meta["offset"] == 1
        _iso_utc(meta["timestamp"])

        for receiver in (m1, m2):
            got = expect(receiver, "message", "send")
            data = got["data"]
            assert set(data) == {"channel", "content", "metadata"}, data  # known fields only
            assert data["channel"] == "msg.fan"
            assert data["content"] == "héllo ✓"
            m = data["metadata"]
            assert set(m) == {"sequence", "timestamp", "offset", "client_id", "user_id"}, m
            assert m["sequence"] == 7
            assert m["offset"] == 1
            assert m["client_id"] == "snd" and m["user_id"] == "alice"
            assert m["timestamp"] == meta["timestamp"]  # the server's time, not the client's
        outsider.quiet()
        sender.quiet()  # no copy of its own message without echo=1


def test_echo_gives_the_sender_its_own_copy(server: Server) -> None:
    with (
        member(server, "alice", "msg.echo", echo=1) as sender,
        member(server, "bob", "msg.echo") as bob,
    ):
        sender.publish("msg.echo", "mirror")
        got = {(m["type"], m["action"]): m for m in (sender.recv(), sender.recv())}
        assert set(got) == {("message", "ack"), ("message", "send")}, got
        copy = got[("message", "send")]["data"]
        assert copy["content"] == "mirror" and copy["metadata"]["user_id"] == "alice"
        assert copy["metadata"]["offset"] == got[("message", "ack")]["data"]["metadata"]["offset"]
        assert expect(bob, "message", "send")["data"]["content"] == "mirror"
        sender.quiet()


def test_offsets_have_no_gaps_across_publishers(server: Server) -> None:
    with (
        member(server, "alice", "msg.off") as a,
        member(server, "bob", "msg.off") as b,
        member(server, "carol", "msg.off") as reader,
    ):
        seen_acks = []
        others: dict[str, list[int]] = {"a": [], "b": []}
        for pub, text in ((a, "a1"), (b, "b1"), (a, "a2")):
            pub.publish("msg.off", text)
            while True:
                msg = pub.recv()
                if msg["action"] == "ack":
                    seen_acks.append(msg["data"]["metadata"]["offset"])
                    break
                others["a" if pub is a else "b"].append(msg["data"]["metadata"]["offset"])
        assert seen_acks == [1, 2, 3]
        # a and b also get each other's messages
        while len(others["a"]) < 1:
            others["a"].append(expect(a, "message", "send")["data"]["metadata"]["offset"])
        while len(others["b"]) < 2:
            others["b"].append(expect(b, "message", "send")["data"]["metadata"]["offset"])
        assert others == {"a": [2], "b": [1, 3]}

        # 20 more without waiting: every offset 4..23 once, in order at the reader
        for i in range(10):
            a.publish("msg.off", f"a-burst-{i}")
            b.publish("msg.off", f"b-burst-{i}")
        acked = []
        for pub, other_count in ((a, 10), (b, 10)):
            got = [pub.recv() for _ in range(20)]  # its 10 acks and the other's 10 messages
            acks = [m for m in got if m["action"] == "ack"]
            assert len(acks) == 10 and len(got) - len(acks) == other_count, got
            acked += [m["data"]["metadata"]["offset"] for m in acks]
        assert sorted(acked) == list(range(4, 24))
        offsets = [
            expect(reader, "message", "send")["data"]["metadata"]["offset"] for _ in range(23)
        ]
        assert offsets == list(range(1, 24))
        reader.quiet()


def test_publish_without_joining_is_not_a_member(server: Server) -> None:
    with (
        Client(server.ws_url, token=server.token("alice")) as c,
        member(server, "bob", "msg.nam") as bob,
    ):
        joined(c)
        c.send(send_msg("msg.nam", "hi", 42))
        err = expect_error(c, "NOT_A_MEMBER")
        assert err["details"]["channel"] == "msg.nam"
        assert err["details"]["sequence"] == 42
        bob.quiet()


# -- idempotence ---------------------------------------------------------------------------------


def test_duplicate_sequence_is_acked_again_not_delivered_twice(server: Server) -> None:
    with member(server, "bob", "msg.dup") as bob:
        with member(server, "alice", "msg.dup", client_id="dup-c") as a:
            a.publish("msg.dup", "first", sequence=5)
            ack = expect(a, "message", "ack")["data"]["metadata"]
            assert bob.recv()["data"]["content"] == "first"
            for action in ("retry", "send"):
                a.publish("msg.dup", "first", sequence=5, action=action)
                again = expect(a, "message", "ack")["data"]["metadata"]
                assert again["sequence"] == 5
                assert again["offset"] == ack["offset"]
            bob.quiet()

        # after a reconnect with the same client_id the window is still there
        with member(server, "alice", "msg.dup", client_id="dup-c") as a2:
            a2.publish("msg.dup", "first", sequence=5, action="retry")
            again = expect(a2, "message", "ack")["data"]["metadata"]
            assert again["offset"] == ack["offset"]
            bob.quiet()
            a2.publish("msg.dup", "second", sequence=6)
            assert expect(a2, "message", "ack")["data"]["metadata"]["offset"] == ack["offset"] + 1
            assert bob.recv()["data"]["content"] == "second"

        # another client_id of the same user has its own sequences
        with member(server, "alice", "msg.dup", client_id="dup-other") as a3:
            a3.publish("msg.dup", "other", sequence=5)
            assert expect(a3, "message", "ack")["data"]["metadata"]["offset"] == ack["offset"] + 2
            got = bob.recv()["data"]
            assert got["content"] == "other" and got["metadata"]["client_id"] == "dup-other"


def test_second_connection_with_same_client_id_replaces_the_first(server: Server) -> None:
    with (
        member(server, "alice", "msg.rep", client_id="rep") as old,
        member(server, "bob", "msg.rep", client_id="rep") as bob_same_id,
        member(server, "alice", "msg.rep", client_id="rep") as new,  # replaces `old`
    ):
        _, close = drain(old)
        assert close == 4009
        new.publish("msg.rep", "from the new one")
        expect(new, "message", "ack")
        got = expect(bob_same_id, "message", "send")  # another user: not replaced
        assert got["data"]["content"] == "from the new one"
        bob_same_id.publish("msg.rep", "bob still here")
        expect(bob_same_id, "message", "ack")
        assert expect(new, "message", "send")["data"]["content"] == "bob still here"


def test_anonymous_client_id_is_not_a_credential(server: Server) -> None:
    """Issue 12: client_ids are public (every publication carries one). A second anonymous
    connection naming a victim's client_id replaces nobody and gets its own dedupe window:
    the victim stays open and keeps receiving, and the attacker's publish with the victim's
    sequence is a new publication, not acked as the victim's duplicate."""
    server.create_channel(name="anon.room", require_auth=False)
    url = server.ws_url
    with (
        Client(url, client_id="victim", channel="anon.room") as victim,
        Client(url, token=server.token("watcher"), channel="anon.room") as watcher,
    ):
        joined(victim)
        joined(watcher)
        victim.publish("anon.room", "mine", sequence=1)
        first = expect(victim, "message", "ack")["data"]["metadata"]["offset"]
        assert expect(watcher, "message", "send")["data"]["content"] == "mine"
        with Client(url, client_id="victim", channel="anon.room") as attacker:
            assert joined(attacker)["client_id"] == "victim"
            attacker.publish("anon.room", "forged", sequence=1)
            ack = expect(attacker, "message", "ack")["data"]["metadata"]
            assert ack["offset"] == first + 1  # published, not the victim's duplicate
            assert expect(watcher, "message", "send")["data"]["content"] == "forged"
            assert expect(victim, "message", "send")["data"]["content"] == "forged"
            # the victim was not replaced: still open, still receiving, its window its own
            watcher.publish("anon.room", "still there?")
            expect(watcher, "message", "ack")
            assert expect(victim, "message", "send")["data"]["content"] == "still there?"
            assert expect(attacker, "message", "send")["data"]["content"] == "still there?"
            victim.publish("anon.room", "mine", sequence=1)  # a retry: its own duplicate
            assert expect(victim, "message", "ack")["data"]["metadata"]["offset"] == first
            victim.publish("anon.room", "next", sequence=2)
            assert expect(victim, "message", "ack")["data"]["metadata"]["offset"] == first + 3
            assert expect(watcher, "message", "send")["data"]["content"] == "next"
            # the attacker got the victim's publication once; the retry was not delivered
            assert expect(attacker, "message", "send")["data"]["content"] == "next"
            attacker.quiet()


# -- history and recovery ------------------------------------------------------------------------


def _publish_n(c: Client, channel: str, texts: list[str]) -> list[int]:
    offsets = []
    for t in texts:
        c.publish(channel, t)
        offsets.append(expect(c, "message", "ack")["data"]["metadata"]["offset"])
    return offsets


def test_recovery_with_since_and_epoch(server: Server) -> None:
    url, tok = server.ws_url, server.token
    ch = "msg.rec"
    with Client(url, token=tok("alice"), client_id="pub", channel=ch) as pub:
        joined(pub)
        with Client(url, token=tok("bob"), client_id="reader", channel=ch) as r:
            epoch = joined(r)["epoch"]
            assert _publish_n(pub, ch, ["m1", "m2", "m3"]) == [1, 2, 3]
            assert [r.recv()["data"]["metadata"]["offset"] for _ in range(3)] == [1, 2, 3]
        assert _publish_n(pub, ch, ["m4", "m5", "m6"]) == [4, 5, 6]

        # URL query
        with Client(
            url, token=tok("bob"), client_id="reader", channel=ch, since=3, epoch=epoch
        ) as r:
            data = joined(r, ch)
            assert data["recovered"] is True
            assert data["offset"] == 6 and data["epoch"] == epoch
            got = [r.recv()["data"] for _ in range(3)]
            assert [g["content"] for g in got] == ["m4", "m5", "m6"]
            assert [g["metadata"]["offset"] for g in got] == [4, 5, 6]
            pub.publish(ch, "live")
            expect(pub, "message", "ack")
            live = r.recv()["data"]
            assert live["content"] == "live" and live["metadata"]["offset"] == 7
            r.quiet()

        # join message
        with Client(url, token=tok("bob"), client_id="reader2") as r:
            joined(r)
            r.join(ch, since=5, epoch=epoch)
            data = joined(r, ch)
            assert data["recovered"] is True and data["offset"] == 7
            assert [r.recv()["data"]["content"] for _ in range(2)] == ["m6", "live"]
            r.quiet()

        # nothing missed
        with Client(
            url, token=tok("bob"), client_id="reader3", channel=ch, since=7, epoch=epoch
        ) as r:
            data = joined(r, ch)
            assert data["recovered"] is True and data["offset"] == 7
            r.quiet()

        # a wrong epoch: not recovered, the current position, no replay
        with Client(
            url, token=tok("bob"), client_id="reader4", channel=ch, since=3, epoch="not-the-epoch"
        ) as r:
            data = joined(r, ch)
            assert data["recovered"] is False
            assert data["offset"] == 7 and data["epoch"] == epoch
            r.quiet()
        with Client(url, token=tok("bob"), client_id="reader5") as r:
            joined(r)
            r.join(ch, since=1, epoch="bogus")
            data = joined(r, ch)
            assert data["recovered"] is False and data["offset"] == 7 and data["epoch"] == epoch
            r.quiet()


def test_recovery_beyond_history_size_is_not_recovered(server: Server) -> None:
    ch = "msg.shorthist"
    server.create_channel(name=ch, history_size=2)
    with Client(server.ws_url, token=server.token("alice"), channel=ch) as pub:
        epoch = joined(pub)["epoch"]
        assert _publish_n(pub, ch, [f"h{i}" for i in range(1, 6)]) == [1, 2, 3, 4, 5]
        with Client(
            server.ws_url, token=server.token("bob"), channel=ch, since=1, epoch=epoch
        ) as r:
            data = joined(r, ch)
            assert data["recovered"] is False  # 2..3 are gone
            assert data["offset"] == 5 and data["epoch"] == epoch
            r.quiet()
        with Client(
            server.ws_url, token=server.token("bob"), channel=ch, since=3, epoch=epoch
        ) as r:
            data = joined(r, ch)
            assert data["recovered"] is True
            assert [r.recv()["data"]["content"] for _ in range(2)] == ["h4", "h5"]


def test_recovery_after_restart_is_not_recovered(make_server: Callable[..., Server]) -> None:
    srv = make_server()
    ch = "msg.restart"
    with Client(srv.ws_url, token=srv.token("alice"), channel=ch) as pub:
        epoch = joined(pub)["epoch"]
        _publish_n(pub, ch, ["x1", "x2"])
        srv.restart()
    with Client(srv.ws_url, token=srv.token("bob"), channel=ch, since=1, epoch=epoch) as r:
        data = joined(r, ch)
        assert data["recovered"] is False
        assert isinstance(data["epoch"], str) and data["epoch"] != epoch
        r.quiet()  # nothing replayed
        # the new history starts over under the new epoch
        with Client(srv.ws_url, token=srv.token("alice"), channel=ch) as pub:
            joined(pub)
            pub.publish(ch, "fresh")
            offset = expect(pub, "message", "ack")["data"]["metadata"]["offset"]
            got = r.recv()["data"]
            assert got["content"] == "fresh" and got["metadata"]["offset"] == offset


# -- presence --------------------------------------------------------------------------------------


def test_presence_notices(server: Server) -> None:
    server.create_channel(name="msg.pres", presence=True)
    url, tok = server.ws_url, server.token
    with (
        Client(url, token=tok("alice"), client_id="pa", channel="msg.pres") as a,
        Client(url, token=tok("carol"), client_id="pc", channel="msg.nopres") as c1,
    ):
        joined(a)
        joined(c1)
        with Client(url, token=tok("bob"), client_id="pb") as b:
            joined(b)
            b.join("msg.pres")
            joined(b, "msg.pres")
            note = expect(a, "connection", "connect")
            assert note["data"]["client_id"] == "pb"
            assert note["data"]["user_id"] == "bob"
            assert note["data"]["channel"] == "msg.pres"
            b.leave("msg.pres")
            expect(b, "connection", "disconnect")
            note = expect(a, "connection", "disconnect")
            assert note["data"]["client_id"] == "pb"
            assert note["data"]["user_id"] == "bob"
            assert note["data"]["channel"] == "msg.pres"
            b.join("msg.pres")
            joined(b, "msg.pres")
            assert expect(a, "connection", "connect")["data"]["client_id"] == "pb"
            b.quiet()  # no presence notice about itself
        # closing the socket is a leave too
        note = expect(a, "connection", "disconnect")
        assert note["data"]["client_id"] == "pb" and note["data"]["channel"] == "msg.pres"

        # a channel without presence says nothing about joins and leaves
        with Client(url, token=tok("dave"), client_id="pd", channel="msg.nopres") as d:
            joined(d)
            d.leave("msg.nopres")
            expect(d, "connection", "disconnect")
        c1.quiet()
        a.quiet()


# -- system messages -------------------------------------------------------------------------------


def test_system_status_reply(server: Server) -> None:
    with Client(server.ws_url, token=server.token("alice")) as c:
        joined(c)
        c.send({"type": "system", "action": "status", "data": {}})
        msg = expect(c, "system", "status")
        assert msg["data"]["severity"] == "info"
        assert isinstance(msg["data"]["message"], str)
        c.send({"type": "system", "action": "status"})  # data may be left out
        expect(c, "system", "status")


def test_system_broadcast_from_admin(server: Server) -> None:
    url, tok = server.ws_url, server.token
    with (
        Client(url, token=server.admin(), client_id="adm") as admin,
        Client(url, token=tok("alice"), channel="msg.bc") as alice,
        Client(url, token=tok("bob"), channel="msg.bc-other") as other,
        Client(url, token=tok("carol")) as lonely,
        Client(url) as anon,
    ):
        for c in (admin, alice, other, lonely, anon):
            joined(c)

        admin.send(
            {
                "type": "system",
                "action": "broadcast",
                "data": {"message": "maintenance at 5", "severity": "warning"},
            }
        )
        for c in (admin, alice, other, lonely, anon):
            msg = expect(c, "system", "broadcast")
            assert msg["data"]["message"] == "maintenance at 5"
            assert msg["data"]["severity"] == "warning"

        admin.send(
            {
                "type": "system",
                "action": "broadcast",
                "data": {"message": "only msg.bc", "severity": "info", "channel": "msg.bc"},
            }
        )
        msg = expect(alice, "system", "broadcast")
        assert msg["data"]["message"] == "only msg.bc" and msg["data"]["severity"] == "info"
        for c in (other, lonely, admin, anon):
            c.quiet()

        alice.send(
            {
                "type": "system",
                "action": "broadcast",
                "data": {"message": "i am not admin", "severity": "error"},
            }
        )
        expect_error(alice, "FORBIDDEN")
        for c in (other, lonely, admin):
            c.quiet()


def test_admin_delete_channel_removes_members(server: Server) -> None:
    server.create_channel(name="msg.del")
    url, tok = server.ws_url, server.token
    with (
        Client(url, token=tok("alice"), client_id="d1", channel="msg.del") as a,
        Client(url, token=tok("bob"), client_id="d2", channel="msg.del") as b,
        Client(url, token=tok("carol"), channel="msg.keep") as outsider,
    ):
        for c in (a, b, outsider):
            joined(c)
        status, body, _ = server.http("DELETE", "/ws/channels/msg.del", token=server.admin())
        assert status == 200, body
        for c, cid in ((a, "d1"), (b, "d2")):
            note = c.recv_until("connection", "disconnect", limit=3)
            assert note["data"]["channel"] == "msg.del"
            assert note["data"]["client_id"] == cid
        # no longer members: publishing is refused and nothing is delivered
        for c in (a, b):  # after the disconnect, the notice
            note = c.recv_until("system", "status", limit=1)
            assert note["data"]["severity"] == "warning", note
        a.publish("msg.del", "into the void")
        assert expect_error(a, "NOT_A_MEMBER")["details"]["channel"] == "msg.del"
        for c in (a, b, outsider):
            c.quiet()
        # the connections are still usable
        for c in (a, b):
            c.send({"type": "system", "action": "status", "data": {}})
            c.recv_until("system", "status", limit=3)


def test_channel_full(server: Server) -> None:
    server.create_channel(name="msg.full", max_connections=2)
    url, tok = server.ws_url, server.token
    with (
        Client(url, token=tok("alice"), channel="msg.full") as a,
        Client(url, token=tok("bob"), channel="msg.full") as b,
        Client(url, token=tok("carol")) as c,
    ):
        joined(a)
        joined(b)
        joined(c)
        c.join("msg.full")
        err = expect_error(c, "CHANNEL_FULL")
        assert err["details"]["channel"] == "msg.full"
        a.publish("msg.full", "members only")
        expect(a, "message", "ack")
        expect(b, "message", "send")
        c.quiet()
        # a member leaving makes room
        a.leave("msg.full")
        expect(a, "connection", "disconnect")
        c.join("msg.full")
        joined(c, "msg.full")
        a.join("msg.full")
        expect_error(a, "CHANNEL_FULL")
        # so does a member whose connection closes
        b.close()
        deadline = time.monotonic() + 5
        while True:
            a.join("msg.full")
            msg = a.recv()
            if msg["type"] == "connection":
                assert msg["data"]["channel"] == "msg.full"
                break
            assert msg.get("code") == "CHANNEL_FULL", msg
            assert time.monotonic() < deadline, "the closed member's place was not released"
            time.sleep(0.02)


def test_channel_not_found_without_auto_create(make_server: Callable[..., Server]) -> None:
    srv = make_server(CHANNEL_AUTO_CREATE="false")
    with Client(srv.ws_url, token=srv.token("alice")) as c:
        joined(c)
        c.join("nowhere")
        err = expect_error(c, "CHANNEL_NOT_FOUND")
        assert err["details"]["channel"] == "nowhere"
        c.publish("nowhere", "x")
        expect_error(c, "NOT_A_MEMBER")
        assert srv.create_channel(name="configured") == 201
        c.join("configured")
        joined(c, "configured")
    with Client(srv.ws_url, token=srv.token("bob"), channel="nowhere2") as c:
        # the URL's channel does not exist: an error (after, or instead of, a first frame
        # that joined nothing), and no membership
        msg = c.recv()
        if msg["type"] == "connection":
            assert msg["action"] == "connect" and msg["data"]["channel"] is None, msg
            msg = c.recv()
        assert msg["type"] == "error" and msg["code"] == "CHANNEL_NOT_FOUND", msg
        assert msg["details"]["channel"] == "nowhere2"
        c.publish("nowhere2", "x")
        expect_error(c, "NOT_A_MEMBER")
