"""The session control plane (node.py) and the parts it uses (operations.py, status.py),
without sockets: a real Hub, MemoryBroker, SQLite store and Authenticator, built by
`app.control_plane` and wired by `app.wire` as in the server, and real Sessions on picows'
WSTransport over a transport that keeps the bytes written (tests/unit/support.py). Every
client message goes in as a WebSocket frame through `Session.on_ws_frame`; every assertion
is on the frames that client would read (docs/protocol.md §4), decoded from those bytes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from picows import WSMsgType, WSTransport
from picows.picows import _make_test_ws_frame

from aether_fast._core import Session
from aether_fast.app import ControlPlane, control_plane, wire
from aether_fast.auth import Authenticator, Claims, mint_token
from aether_fast.brokers.base import BrokerUnavailable, Recovery
from aether_fast.brokers.cluster import SingleWorker
from aether_fast.brokers.memory import MemoryBroker
from aether_fast.config import Config, load_config
from aether_fast.metrics import Metrics
from aether_fast.status import total
from aether_fast.stores.base import ChannelConfig, parse_channel_config
from aether_fast.stores.sqlite import ChannelStore
from tests.unit.support import NullTransport, make_hub, server_frames

SECRET = "node-secret-node-secret-node-secret-0123456789"


class Client:
    """One connection as its client sees it: frames in, the frames written to it out."""

    def __init__(self, world: World, session: Session) -> None:
        self.world = world
        self.session = session
        self.null = NullTransport(record=True)
        self.transport = WSTransport(  # type: ignore[call-arg]
            False, self.null, logging.getLogger("test_node"), world.loop
        )
        self._read = 0

    def send(self, mtype: str, action: str, data: dict[str, Any]) -> None:
        payload = orjson.dumps({"type": mtype, "action": action, "data": data})
        frame = _make_test_ws_frame(WSMsgType.TEXT, payload, True, False)
        self.session.on_ws_frame(self.transport, frame)

    def received(self) -> list[dict[str, Any]]:
        """The frames written to this client since the last call: JSON messages, and a
        close frame as {"close": code}."""
        for _ in range(4):  # a replay continues after each flush
            self.world.hub.flush()
        assert self.null.data is not None
        data = self.null.data[self._read :]
        self._read = len(self.null.data)
        out: list[dict[str, Any]] = []
        for opcode, payload in server_frames(data):
            if opcode == 0x8:
                out.append({"close": int.from_bytes(payload[:2], "big")})
            else:
                assert opcode == 0x1, opcode
                out.append(orjson.loads(payload))
        return out

    def gone(self) -> None:
        """The TCP connection ends (picows' `on_ws_disconnected`)."""
        self.session.on_ws_disconnected(self.transport)


class World:
    """One worker's parts, as `app.start` builds them, minus the sockets."""

    def __init__(
        self, tmp_path: Path, env: dict[str, str], broker: Any = None, cluster: Any = None
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.config: Config = load_config({"JWT_SECRET": SECRET, "DATA_DIR": str(tmp_path), **env})
        self.hub = make_hub(
            self.loop,
            conn_capacity=float(self.config.rate_limit_messages),
            conn_window=float(self.config.rate_limit_window_s),
        )
        self.broker = (
            broker(self.hub) if broker else MemoryBroker(self.hub, history_ttl_s=60, dedup_ttl_s=60)
        )
        self.store = ChannelStore(str(tmp_path))
        self.store.open()
        self.auth = Authenticator(self.config)
        self.cluster = cluster if cluster is not None else SingleWorker()
        self.parts: ControlPlane = control_plane(
            self.config, self.hub, self.broker, self.cluster, self.store, self.auth
        )
        wire(self.hub, self.parts.node, self.broker, self.cluster)

    def close(self) -> None:
        self.store.close()
        self.loop.close()

    def token(self, sub: str, channels: list[str] | None = None, admin: bool = False) -> str:
        return mint_token(self.config, sub, channels=channels, admin=admin, ttl_s=3600)

    def claims(self, sub: str, channels: list[str] | None = None, admin: bool = False) -> Claims:
        return self.auth.verify(self.token(sub, channels, admin))

    def open(
        self,
        client_id: str,
        user: str | None = None,
        *,
        channels: list[str] | None = None,
        admin: bool = False,
        peer: str = "10.0.0.1",
        channel: str | None = None,
    ) -> Client:
        """A connection whose upgrade succeeded (the upgrader's work done by hand):
        `on_ws_connected`, so the Node's `on_open`. `channel`: the URL's channel."""
        claims = self.claims(user, channels, admin) if user is not None else None
        session = Session(self.hub, client_id, claims, peer)
        if channel is not None:
            session.initial = {"channel": channel, "since": None, "epoch": None}
        client = Client(self, session)
        session.on_ws_connected(client.transport)
        return client

    def configure(self, name: str, **fields: Any) -> ChannelConfig:
        cfg = parse_channel_config({"name": name, **fields}, self.config, self.store.get(name))
        self.loop.run_until_complete(self.parts.operations.configure_channel(cfg))
        return cfg


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path, {})
    yield w
    w.close()


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Any]:
    made: list[World] = []

    def make(env: dict[str, str], broker: Any = None, sub: str = "w", cluster: Any = None) -> World:
        path = tmp_path / f"{sub}{len(made)}"
        path.mkdir()
        made.append(World(path, env, broker, cluster))
        return made[-1]

    yield make
    for w in made:
        w.close()


def joined(client: Client, channel: str) -> dict[str, Any]:
    """Join `channel` and return the reply's data (asserting it is the join reply)."""
    client.send("connection", "connect", {"channel": channel})
    [reply] = client.received()
    assert (reply["type"], reply["action"]) == ("connection", "connect"), reply
    assert reply["data"]["channel"] == channel
    data: dict[str, Any] = reply["data"]
    return data


def error(frame: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    assert frame["type"] == "error", frame
    return frame["code"], frame["details"]


# -- open ----------------------------------------------------------------------------------


def test_open_is_welcomed_with_connection_connect(world: World) -> None:
    alice = world.open("a1", "alice")
    anon = world.open("x1")
    assert alice.received() == [
        {
            "type": "connection",
            "action": "connect",
            "data": {
                "client_id": "a1",
                "user_id": "alice",
                "channel": None,
                "offset": None,
                "epoch": None,
            },
        }
    ]
    [welcome] = anon.received()
    assert welcome["data"]["client_id"] == "x1" and welcome["data"]["user_id"] is None
    assert world.parts.status.connections_of("u:alice") == 1
    assert world.parts.status.connections_of("ip:10.0.0.1") == 1


def test_url_channel_is_joined_at_open_and_a_forbidden_one_closes_4003(world: World) -> None:
    alice = world.open("a1", "alice", channel="chat")
    [reply] = alice.received()
    assert reply["data"]["channel"] == "chat" and reply["data"]["offset"] == 0
    assert alice.session.is_member("chat")

    bob = world.open("b1", "bob", channels=["chat.*"], channel="news")
    code, details = error(bob.received()[0])
    assert code == "FORBIDDEN" and details["channel"] == "news"
    assert bob.received() == [] and bob.session.close_code == 4003
    anon = world.open("x1", channel="chat")  # chat requires auth (the default)
    frames = anon.received()
    assert error(frames[0])[0] == "AUTH_REQUIRED" and frames[1:] == [{"close": 4001}]


def test_connection_limit_counts_every_connection_of_the_user(make_world: Any) -> None:
    world = make_world({"RATE_LIMIT_CONNECTIONS": "2"})
    first, second = world.open("a1", "alice"), world.open("a2", "alice")
    third = world.open("a3", "alice")
    assert first.received()[0]["action"] == "connect"
    assert second.received()[0]["action"] == "connect"
    frames = third.received()
    code, details = error(frames[0])
    assert (code, details["limit"]) == ("CONNECTION_LIMIT", 2)
    assert frames[1:] == [{"close": 4029}]
    third.gone()
    first.gone()
    assert world.open("a4", "alice").received()[0]["action"] == "connect"  # room again
    assert world.parts.status.connections_of("u:alice") == 2


def test_a_second_connection_with_the_same_client_id_replaces_the_first(world: World) -> None:
    old = world.open("a1", "alice")
    old.received()
    new = world.open("a1", "alice")
    assert old.received() == [
        {
            "type": "system",
            "action": "status",
            "data": {"message": "replaced by a newer connection", "severity": "warning"},
        },
        {"close": 4009},
    ]
    assert new.received()[0]["data"]["client_id"] == "a1"
    assert world.parts.node.local_session("alice", "a1") is new.session
    assert world.parts.status.connections_of("u:alice") == 1  # the old one no longer counts
    old.gone()  # the old one's close does not take the new one's place or count
    assert world.parts.node.local_session("alice", "a1") is new.session
    assert world.parts.status.connections_of("u:alice") == 1
    # anonymous clients prove nothing: the same client_id replaces nobody
    x1, x2 = world.open("x"), world.open("x")
    assert x1.received()[0]["action"] == "connect" and x1.received() == []
    assert x2.received()[0]["action"] == "connect"


# -- join ----------------------------------------------------------------------------------


def test_join_auto_creates_the_channel_with_the_defaults(world: World) -> None:
    alice = world.open("a1", "alice")
    alice.received()
    assert world.hub.channel("chat") is None
    data = joined(alice, "chat")
    assert data["offset"] == 0 and isinstance(data["epoch"], str) and "recovered" not in data
    ch = world.hub.channel("chat")
    assert ch is not None and ch.member_count == 1
    assert ch.history_size == world.config.history_size
    joined(alice, "chat")  # a re-join just gets the reply
    assert ch.member_count == 1


def test_join_of_an_unknown_channel_without_auto_create(make_world: Any) -> None:
    world = make_world({"CHANNEL_AUTO_CREATE": "false"})
    alice = world.open("a1", "alice")
    alice.received()
    alice.send("connection", "connect", {"channel": "chat"})
    code, details = error(alice.received()[0])
    assert (code, details["channel"]) == ("CHANNEL_NOT_FOUND", "chat")
    assert world.hub.channel("chat") is None
    world.configure("chat")
    assert joined(alice, "chat")["offset"] == 0


def test_join_refused_by_the_acl(world: World) -> None:
    anon = world.open("x1")
    alice = world.open("a1", "alice", channels=["chat.*"])
    anon.received()
    alice.received()
    anon.send("connection", "connect", {"channel": "chat.1"})
    [refusal] = anon.received()
    assert error(refusal) == (
        "AUTH_REQUIRED",
        {"component": "channel", "reason": "this channel needs a token", "channel": "chat.1"},
    )
    alice.send("connection", "connect", {"channel": "chat.1.sub"})
    code, details = error(alice.received()[0])
    assert (code, details["channel"]) == ("FORBIDDEN", "chat.1.sub")
    assert alice.session.close_code == 0 and not alice.session.closing  # stays open
    assert world.hub.channel("chat.1") is None and world.hub.channel("chat.1.sub") is None
    joined(alice, "chat.1")
    world.configure("lobby", require_auth=False)
    joined(anon, "lobby")


def test_channel_caps_refuse_with_channel_limit(make_world: Any) -> None:
    world = make_world({"MAX_CHANNELS_PER_CONNECTION": "2", "MAX_CHANNELS": "3"})
    alice, bob, carol = world.open("a1", "alice"), world.open("b1", "bob"), world.open("c1", "c")
    for c in (alice, bob, carol):
        c.received()
    joined(alice, "a")
    joined(alice, "b")
    joined(alice, "a")  # a channel it is in never counts
    alice.send("connection", "connect", {"channel": "c"})
    code, details = error(alice.received()[0])
    assert code == "CHANNEL_LIMIT"
    assert (details["reason"], details["limit"]) == ("channels_per_connection", 2)
    assert not alice.session.is_member("c") and not alice.session.closing

    alice.send("connection", "disconnect", {"channel": "b"})  # b stays, empty
    alice.received()
    joined(bob, "a")  # an existing channel: no new live channel
    joined(bob, "c")  # the 3rd live channel
    joined(carol, "d")  # at the cap: the empty b is dropped to make room
    assert world.hub.channel("b") is None
    carol.send("connection", "connect", {"channel": "e"})  # a 4th live channel
    code, details = error(carol.received()[0])
    assert (code, details["reason"], details["limit"]) == (
        "CHANNEL_LIMIT",
        "channels_per_worker",
        3,
    )
    assert world.hub.channel("e") is None and world.hub.channel_count == 3


def test_join_with_since_recovers_the_missed_publications(world: World) -> None:
    alice, bob = world.open("a1", "alice"), world.open("b1", "bob")
    alice.received()
    bob.received()
    epoch = joined(alice, "news")["epoch"]
    for seq in (1, 2, 3):
        alice.send(
            "message",
            "send",
            {"channel": "news", "content": f"m{seq}", "metadata": {"sequence": seq}},
        )
    assert [f["data"]["metadata"]["offset"] for f in alice.received()] == [1, 2, 3]  # acks

    bob.send("connection", "connect", {"channel": "news", "since": 1, "epoch": epoch})
    reply, *replay = bob.received()
    assert reply["data"] == {
        "client_id": "b1",
        "user_id": "bob",
        "channel": "news",
        "offset": 3,
        "epoch": epoch,
        "recovered": True,
    }
    assert [
        (f["action"], f["data"]["content"], f["data"]["metadata"]["offset"]) for f in replay
    ] == [
        ("send", "m2", 2),
        ("send", "m3", 3),
    ]
    bob.send("connection", "connect", {"channel": "news", "since": 1, "epoch": "other"})
    [reply] = bob.received()  # another epoch: nothing replayed
    assert reply["data"]["recovered"] is False and reply["data"]["offset"] == 3


def test_what_comes_while_the_initial_join_waits_is_answered_after_it(world: World) -> None:
    """`Session.hold_messages` / `release_messages`, which the Node calls around a URL
    channel's join that waits for an asynchronous broker (the real one, Redis, in
    tests/integration/test_ws_first_frame.py): nothing is answered meanwhile, then each
    message in order. The memory broker answers the join at once: nothing is held."""
    alice = world.open("a1", "alice", channel="chat")
    assert not alice.session.holds_messages
    [reply] = alice.received()
    assert reply["data"]["channel"] == "chat"

    alice.session.hold_messages()
    alice.send("message", "send", {"channel": "chat", "content": "x", "metadata": {"sequence": 1}})
    alice.send("system", "status", {})
    alice.send("message", "send", {"channel": "other", "content": "x", "metadata": {"sequence": 2}})
    assert alice.received() == []
    alice.session.release_messages()
    ack, status, refused = alice.received()
    assert (ack["action"], ack["data"]["metadata"]["offset"]) == ("ack", 1)
    assert (status["type"], status["action"]) == ("system", "status")
    code, details = error(refused)
    assert (code, details["channel"], details["sequence"]) == ("NOT_A_MEMBER", "other", 2)
    assert not alice.session.holds_messages
    alice.send("system", "status", {})  # not held any more
    assert [f["action"] for f in alice.received()] == ["status"]


def test_more_held_than_the_bound_closes_1008(world: World) -> None:
    """HELD_MESSAGES (64) held messages, refused ones included (the budget is 50): one more
    closes the connection (1008) and drops them."""
    alice = world.open("a1", "alice", channel="chat")
    alice.received()
    alice.session.hold_messages()
    for _ in range(64):
        alice.send("system", "status", {})
    assert alice.received() == []
    alice.send("system", "status", {})
    assert alice.received() == [{"close": 1008}]
    assert not alice.session.holds_messages
    alice.session.release_messages()  # as the Node does once the join is answered: nothing
    assert alice.received() == []


class LateBroker(MemoryBroker):
    """The memory broker, except that a join's position comes when the test says
    (`answer`), as an asynchronous broker's (Redis) does: its `recover` returns a future."""

    def __init__(self, hub: Any) -> None:
        super().__init__(hub, history_ttl_s=60, dedup_ttl_s=60)
        self.waiting: dict[str, tuple[asyncio.Future[Recovery], int | None, str | None]] = {}

    def recover(  # type: ignore[override]
        self, channel: str, since: int | None, epoch: str | None
    ) -> asyncio.Future[Recovery]:
        future: asyncio.Future[Recovery] = asyncio.get_running_loop().create_future()
        self.waiting[channel] = (future, since, epoch)
        return future

    def answer(self, world: World, channel: str, fail: bool = False) -> None:
        """The join of `channel` reads the position now (or fails), and the Node's task
        that waits for it runs."""
        future, since, epoch = self.waiting.pop(channel)
        if fail:
            future.set_exception(BrokerUnavailable("broker down"))
        else:
            future.set_result(MemoryBroker.recover(self, channel, since, epoch))
        for _ in range(5):
            world.loop.run_until_complete(asyncio.sleep(0))


def sent_in_loop(world: World, client: Client, *messages: tuple[str, str, dict[str, Any]]) -> None:
    """`client` sends `messages`, inside the running loop (a join that waits spawns a task)."""

    async def send() -> None:
        for message in messages:
            client.send(*message)

    world.loop.run_until_complete(send())


def publication(channel: str, seq: int) -> tuple[str, str, dict[str, Any]]:
    return ("message", "send", {"channel": channel, "content": "x", "metadata": {"sequence": seq}})


def join(channel: str) -> tuple[str, str, dict[str, Any]]:
    return ("connection", "connect", {"channel": channel})


def labels(frames: list[dict[str, Any]]) -> list[str]:
    """`join:chat` (with its offset), `copy:chat:1` (offset), `ack:1`, `status` or the code."""
    out = []
    for f in frames:
        if f["type"] == "error":
            out.append(f"{f['code']}:{f['details']['channel']}")
        elif (f["type"], f["action"]) == ("connection", "connect"):
            out.append(f"join:{f['data']['channel']}@{f['data']['offset']}")
        elif f["action"] == "send":
            out.append(f"copy:{f['data']['channel']}:{f['data']['metadata']['offset']}")
        elif f["action"] == "ack":
            out.append(f"ack:{f['data']['metadata']['offset']}")
        else:
            out.append(f["action"])
    return out


def test_a_publication_right_after_a_later_join_comes_after_its_reply(
    make_world: Any,
) -> None:
    """docs/protocol.md §2: a join that waits for the broker holds what the client sends
    next; once it is answered, the reply comes first (offset 0), then the own copy and the
    ack of the publication (offset 1): not dropped as at or below the join's position."""
    world = make_world({}, broker=LateBroker)
    alice = world.open("a1", "alice")
    alice.session.echo = True
    alice.received()
    sent_in_loop(world, alice, join("chat"), publication("chat", 1), ("system", "status", {}))
    assert alice.received() == [] and alice.session.holds_messages
    world.broker.answer(world, "chat")
    assert labels(alice.received()) == ["join:chat@0", "copy:chat:1", "ack:1", "status"]
    assert not alice.session.holds_messages


def test_joins_behind_a_join_start_with_it_and_what_follows_waits_for_all(
    make_world: Any,
) -> None:
    """A join that comes while nothing is held starts beside the one waiting; a message
    waits for every join waiting when it came; a join held behind it starts once it is
    handled, and holds what follows. A failed join releases what it held too."""
    world = make_world({}, broker=LateBroker)
    alice = world.open("a1", "alice")
    alice.received()
    sent_in_loop(
        world,
        alice,
        join("a"),
        join("b"),  # starts at once
        publication("a", 1),  # held: waits for a and b
        join("c"),  # held behind it
        publication("c", 2),
        join("d"),
        publication("d", 3),
    )
    assert set(world.broker.waiting) == {"a", "b"}
    world.broker.answer(world, "b")
    assert labels(alice.received()) == ["join:b@0"]  # the reply is not held, the rest is
    world.broker.answer(world, "a")
    assert labels(alice.received()) == ["join:a@0", "ack:1"]
    assert set(world.broker.waiting) == {"c"}
    world.broker.answer(world, "c", fail=True)
    assert labels(alice.received()) == ["INTERNAL_ERROR:c", "NOT_A_MEMBER:c"]
    world.broker.answer(world, "d")
    assert labels(alice.received()) == ["join:d@0", "ack:1"]
    assert not alice.session.holds_messages and not world.broker.waiting


# -- leave, publish, presence --------------------------------------------------------------


def test_leave_replies_and_ends_the_membership(world: World) -> None:
    alice = world.open("a1", "alice")
    alice.received()
    joined(alice, "chat")
    alice.send("connection", "disconnect", {"channel": "chat"})
    assert alice.received() == [
        {
            "type": "connection",
            "action": "disconnect",
            "data": {"client_id": "a1", "user_id": "alice", "channel": "chat"},
        }
    ]
    ch = world.hub.channel("chat")
    assert not alice.session.is_member("chat") and ch is not None and ch.member_count == 0
    alice.send("connection", "disconnect", {"channel": "chat"})
    assert error(alice.received()[0])[0] == "NOT_A_MEMBER"


def test_a_publication_reaches_the_other_member_and_the_sender_gets_the_ack(
    world: World,
) -> None:
    alice, bob, carol = (
        world.open("a1", "alice"),
        world.open("b1", "bob"),
        world.open("c1", "carol"),
    )
    for c in (alice, bob, carol):
        c.received()
    joined(alice, "chat")
    joined(bob, "chat")
    joined(carol, "elsewhere")
    alice.send("message", "send", {"channel": "chat", "content": "hi", "metadata": {"sequence": 7}})
    [ack] = alice.received()
    assert (ack["action"], ack["data"]["metadata"]["sequence"]) == ("ack", 7)
    [pub] = bob.received()
    assert pub["type"] == "message" and pub["action"] == "send"
    assert pub["data"]["content"] == "hi" and pub["data"]["channel"] == "chat"
    meta = pub["data"]["metadata"]
    assert (meta["client_id"], meta["user_id"], meta["offset"], meta["sequence"]) == (
        "a1",
        "alice",
        1,
        7,
    )
    assert carol.received() == []


def test_presence_on_join_leave_and_close(world: World) -> None:
    world.configure("room", presence=True)
    alice, bob = world.open("a1", "alice"), world.open("b1", "bob")
    alice.received()
    bob.received()
    joined(alice, "room")
    joined(bob, "room")
    seen = {"client_id": "b1", "user_id": "bob", "channel": "room"}
    assert alice.received() == [{"type": "connection", "action": "connect", "data": seen}]
    bob.send("connection", "disconnect", {"channel": "room"})
    assert bob.received()[0]["data"] == seen  # its own leave's reply
    assert alice.received() == [{"type": "connection", "action": "disconnect", "data": seen}]
    joined(bob, "room")
    alice.received()
    bob.gone()
    assert alice.received() == [{"type": "connection", "action": "disconnect", "data": seen}]
    assert world.parts.status.connections_of("u:bob") == 0


# -- refresh -------------------------------------------------------------------------------


def test_refresh_replaces_the_claims_and_leaves_what_they_no_longer_allow(world: World) -> None:
    alice = world.open("a1", "alice", channels=["chat.*", "ops"])
    alice.received()
    joined(alice, "chat.1")
    joined(alice, "ops")
    alice.send("connection", "refresh", {"token": world.token("alice", ["chat.*"])})
    refreshed, removed, notice = alice.received()
    assert (refreshed["action"], type(refreshed["data"]["expires_at"])) == ("refresh", float)
    assert removed["data"] == {
        "client_id": "a1",
        "user_id": "alice",
        "channel": "ops",
        "reason": "not allowed by the new token",
    }
    assert notice["data"] == {
        "message": "removed from channel ops: the refreshed token does not allow it",
        "severity": "warning",
    }
    assert alice.session.claims.channels == ("chat.*",)
    assert alice.session.is_member("chat.1") and not alice.session.is_member("ops")
    alice.send("connection", "connect", {"channel": "ops"})  # the new claims decide
    assert error(alice.received()[0])[0] == "FORBIDDEN"

    alice.send("connection", "refresh", {"token": world.token("mallory")})
    assert error(alice.received()[0]) == (
        "AUTH_INVALID",
        {"component": "auth", "reason": "the new token has another sub"},
    )
    assert alice.session.user_id == "alice" and alice.session.claims.channels == ("chat.*",)
    anon = world.open("x1")
    anon.received()
    anon.send("connection", "refresh", {"token": world.token("alice")})
    code, details = error(anon.received()[0])
    assert (code, details["reason"]) == ("AUTH_INVALID", "an anonymous connection cannot refresh")
    assert anon.session.claims is None


# -- operations ----------------------------------------------------------------------------


def test_delete_removes_every_member_and_tells_each(world: World) -> None:
    world.configure("news")
    alice, bob = world.open("a1", "alice"), world.open("b1", "bob")
    alice.received()
    bob.received()
    joined(alice, "news")
    joined(bob, "news")
    ops = world.parts.operations
    assert world.loop.run_until_complete(ops.delete_channel("news")) is True
    for c, cid, user in ((alice, "a1", "alice"), (bob, "b1", "bob")):
        assert c.received() == [
            {
                "type": "connection",
                "action": "disconnect",
                "data": {
                    "client_id": cid,
                    "user_id": user,
                    "channel": "news",
                    "reason": "channel deleted",
                },
            },
            {
                "type": "system",
                "action": "status",
                "data": {"message": "channel news was deleted", "severity": "warning"},
            },
        ]
        assert not c.session.is_member("news") and not c.session.closing
    assert world.hub.channel("news") is None and world.store.get("news") is None
    assert world.loop.run_until_complete(ops.delete_channel("news")) is False


def test_a_config_change_from_another_worker_removes_anonymous_members(world: World) -> None:
    world.configure("lobby", require_auth=False)
    anon, alice = world.open("x1"), world.open("a1", "alice")
    anon.received()
    alice.received()
    joined(anon, "lobby")
    joined(alice, "lobby")
    cfg = parse_channel_config({"name": "lobby", "require_auth": True}, world.config, None)
    world.parts.node.on_config_change("lobby", cfg)  # ClusterEvents, as the broker calls it
    removed, notice = anon.received()
    assert removed["data"]["reason"] == "channel requires auth"
    assert notice["data"]["message"] == "removed from channel lobby: it now requires a token"
    assert alice.received() == [] and alice.session.is_member("lobby")
    world.parts.node.on_config_change("lobby", None)  # deleted elsewhere
    assert alice.received()[0]["data"]["reason"] == "channel deleted"


def test_client_broadcast_needs_an_admin_token(world: World) -> None:
    admin, bob = world.open("ad", "root", admin=True), world.open("b1", "bob")
    admin.received()
    bob.received()
    bob.send("system", "broadcast", {"message": "hi"})
    assert error(bob.received()[0])[0] == "FORBIDDEN"
    admin.send("system", "broadcast", {"message": "at 22:00", "severity": "warning"})
    notice = {
        "type": "system",
        "action": "broadcast",
        "data": {"message": "at 22:00", "severity": "warning", "channel": None},
    }
    assert bob.received() == [notice] and admin.received() == [notice]


def test_shutdown_notice_closes_everyone_and_refuses_newcomers(world: World) -> None:
    alice = world.open("a1", "alice")
    alice.received()
    assert world.parts.status.health() == ("healthy", "")
    assert world.parts.operations.begin_shutdown() == 1
    assert alice.received() == [
        {
            "type": "system",
            "action": "status",
            "data": {"message": "server shutting down", "severity": "warning"},
        },
        {"close": 1001},
    ]
    late = world.open("b1", "bob")
    frames = late.received()
    assert error(frames[0])[0] == "SERVER_BUSY" and frames[1:] == [{"close": 1001}]
    assert world.parts.node.shutting_down
    assert world.parts.status.health() == ("down", "shutting_down")


# -- status --------------------------------------------------------------------------------


def test_system_status_answers_the_counts(world: World) -> None:
    alice, bob = world.open("a1", "alice"), world.open("b1", "bob")
    alice.received()
    bob.received()
    joined(alice, "chat")
    joined(bob, "chat")
    world.open("c1", "carol").gone()  # closed: counted in total only
    alice.send("system", "status", {})
    assert alice.received() == [
        {
            "type": "system",
            "action": "status",
            "data": {
                "message": "ok",
                "severity": "info",
                "connections": {"active": 2, "total": 3},
                "channels": {"active": 1, "messages_per_second": 0.0},
            },
        }
    ]


class _ClusterTable(SingleWorker):
    """A cluster with a table: the rows other workers published (what the Redis cluster's
    heartbeat reads; here they are set by the test)."""

    rows: dict[str, dict[str, Any]] = {}

    def remote_table(self) -> dict[str, dict[str, Any]]:
        return dict(self.rows)


def test_figures_are_summed_over_this_worker_and_the_others(make_world: Any) -> None:
    other = make_world({})  # a second worker of this node, with its own figures
    other.open("o0", "u")
    for i in (1, 2):
        member = other.open(f"o{i}", f"user{i}")
        member.received()
        joined(member, "other-room")
    here = make_world({}, cluster=_ClusterTable())
    for c in (here.open("a1", "alice"), here.open("b1", "bob")):
        c.received()
        joined(c, "chat")
    row = other.parts.node.local_figures()  # what its cluster publishes (ClusterEvents)
    assert row["conns"] == {"u:u": 1, "u:user1": 1, "u:user2": 1}
    assert row["members"] == {"other-room": 2}
    mine = here.parts.status.local_figures()
    assert total("connections_active", [mine, row]) == 5
    assert total("connections_active", [mine, {"stats": {}}]) == 2  # an older row: 0

    _ClusterTable.rows = {"other-worker": row}
    try:
        status = here.parts.status
        counts = status.status_counts()
        assert counts["connections"] == {"active": 5, "total": 5}
        assert counts["channels"]["active"] == 2  # chat here, other-room there
        body = status.status()
        assert body["cluster"] == {"workers": 2, "nodes": 1, "connections": 5}
        assert len(body["workers"]) == 2
        metrics = Metrics(here.hub, status)
        assert metrics.view("connections")["active"] == 5
        assert metrics.view("connections")["workers"] == 2
        assert metrics.view("messages")["published"] == 0
    finally:
        _ClusterTable.rows = {}
