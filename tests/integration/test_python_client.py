"""aether_fast.client against a real server: acks and fan-out, the queue while disconnected,
unacked messages resent with `retry`, recovery from history, a server restart in the middle
of a stream (nothing lost, nothing doubled), rate limits, the token rules (no reconnect
after 4001 without a new token; refresh before expiry), and Redis behind a relay that slows
its pub/sub so that acks beat copies (docs/protocol.md §7): no copy lost, with echo off a
recovery asks for none of one's own messages, a gap on a live socket is asked for again."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar

import jwt
import pytest

from aether_fast.client import (
    GAP_WINDOW,
    Ack,
    AetherClient,
    AetherError,
    ClientClosed,
    JoinResult,
    Message,
    State,
)
from tests.conftest import Server
from tests.integration.cluster_helpers import only_expected_errors
from tests.integration.redis_fixture import RedisServer, db_of
from tests.integration.slow_pubsub import SlowPubSubRelay
from tests.integration.wiretap import Tapped, WireTap

T = TypeVar("T")


class Backoff(TypedDict):
    backoff_initial: float
    backoff_max: float


class Handlers(TypedDict):
    on_message: Callable[[Message], object]
    on_state: Callable[[State], object]
    on_join: Callable[[JoinResult], object]
    on_error: Callable[[AetherError], object]
    on_system: Callable[[dict[str, Any]], object]


#: Fast reconnects for tests: the default backoff starts at 0.5 s and caps at 30 s.
FAST: Backoff = {"backoff_initial": 0.05, "backoff_max": 0.5}


class Refresher:
    """A `token_refresh` callback: an hour-long token of `user`; `calls` counts the calls."""

    def __init__(self, server: Server, user: str) -> None:
        self.server = server
        self.user = user
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return self.server.token(self.user, ttl=3600)


def run(coro: Awaitable[T], timeout: float = 60) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


class Recorder:
    """Callbacks that keep what they were given."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.states: list[State] = []
        self.joins: list[JoinResult] = []
        self.errors: list[AetherError] = []
        self.system: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    def kwargs(self) -> Handlers:
        return {
            "on_message": self.on_message,
            "on_state": self.states.append,
            "on_join": self.joins.append,
            "on_error": self.errors.append,
            "on_system": self.system.append,
        }

    def on_message(self, msg: Message) -> None:
        self.messages.append(msg)
        self.arrived.set()

    async def wait_count(self, n: int, timeout: float = 20) -> None:
        async def loop() -> None:
            while len(self.messages) < n:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(loop(), timeout)

    def contents(self) -> list[str]:
        return [m.content for m in self.messages]


def client(srv: Server, sub: str, rec: Recorder | None = None, **kw: Any) -> AetherClient:
    params: dict[str, Any] = {"token": srv.token(sub), **FAST, **kw}
    if rec is not None:
        params.update(rec.kwargs())
    return AetherClient(srv.ws_url, **params)


async def until(cond: Callable[[], bool], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def assert_once_in_order(got: list[str], sent: list[str]) -> None:
    doubled = [c for c, n in Counter(got).items() if n > 1]
    assert not doubled, f"delivered twice: {doubled[:5]}"
    missing = sorted(set(sent) - set(got))
    assert not missing, f"lost: {missing[:5]} ({len(missing)})"
    assert got == sent, "out of order"


# -- basics ------------------------------------------------------------------------------------


def test_publish_ack_and_fanout(server: Server) -> None:
    async def main() -> None:
        rb = Recorder()
        async with (
            client(server, "alice", client_id="pc-a", channels=["pc.basic"]) as alice,
            client(server, "bob", rb, client_id="pc-b", channels=["pc.basic"]) as bob,
        ):
            assert alice.state == "open" and alice.client_id == "pc-a"
            assert alice.user_id == "alice"
            sent = [f"m{i}" for i in range(20)]
            acks: list[Ack] = [await alice.publish("pc.basic", text) for text in sent]
            assert [a.offset for a in acks] == list(range(1, 21))
            assert all(a.channel == "pc.basic" and a.timestamp for a in acks)
            assert len({a.sequence for a in acks}) == 20
            await rb.wait_count(20)
            assert_once_in_order(rb.contents(), sent)
            first = rb.messages[0]
            assert (first.user_id, first.client_id, first.offset) == ("alice", "pc-a", 1)
            assert first.sequence == acks[0].sequence and not first.replayed
            assert bob.position("pc.basic")[0] == 20
        assert rb.states[-1] == "closed" and "open" in rb.states

    run(main())


def test_messages_iterator_and_echo(server: Server) -> None:
    async def main() -> None:
        async with client(server, "carol", channels=["pc.iter"], echo=True) as c:
            await c.publish("pc.iter", "one")
            await c.publish("pc.iter", "two")
            got: list[str] = []
            async for msg in c.messages():
                got.append(msg.content)
                if len(got) == 2:
                    break
            assert got == ["one", "two"]

    run(main())


def test_server_made_client_id_is_kept(server: Server) -> None:
    async def main() -> None:
        rec = Recorder()
        c = client(server, "dave", rec)
        await c.connect()
        made = c.client_id
        assert isinstance(made, str) and made
        c.reconnect()  # at once, without a backoff wait
        await until(lambda: rec.states.count("open") == 2)
        assert rec.states == ["connecting", "open", "reconnecting", "open"]
        assert c.client_id == made
        await c.close()

    run(main())


def test_queue_while_disconnected(server: Server) -> None:
    """Publications made before the first connect go out, in order, once joined."""

    async def main() -> None:
        rb = Recorder()
        async with client(server, "bob", rb, channels=["pc.queue"]):
            alice = client(server, "alice", channels=["pc.queue"])
            futures = [alice.publish_nowait("pc.queue", f"q{i}") for i in range(5)]
            assert alice.pending == 5
            await alice.connect()
            acks = await asyncio.gather(*futures)
            assert [a.offset for a in acks] == [1, 2, 3, 4, 5]
            await rb.wait_count(5)
            assert rb.contents() == [f"q{i}" for i in range(5)]
            await alice.close()

    run(main())


def test_join_leave_and_refusals(server: Server) -> None:
    async def main() -> None:
        async with client(server, "erin", channels=["pc.jl1"]) as c:
            joined = await c.join("pc.jl2")
            assert (joined.channel, joined.offset, joined.recovered) == ("pc.jl2", 0, None)
            assert set(c.channels) == {"pc.jl1", "pc.jl2"}
            await c.leave("pc.jl2")
            assert c.channels == ["pc.jl1"]
            with pytest.raises(AetherError) as err:
                await c.publish("pc.jl2", "not a member")
            assert err.value.code == "NOT_A_MEMBER"
            assert c.pending == 0
            # the token's channels claim refuses another channel: the join fails, the
            # connection stays
        limited = AetherClient(
            server.ws_url, token=server.token("frank", channels=["pc.ok.*"]), **FAST
        )
        async with limited:
            with pytest.raises(AetherError) as err:
                await limited.join("pc.other")
            assert err.value.code == "FORBIDDEN"
            assert "pc.other" not in limited.channels
            assert (await limited.join("pc.ok.1")).channel == "pc.ok.1"

    run(main())


# -- recovery, retry, restart ------------------------------------------------------------------


def test_reconnect_recovers_missed_messages(server: Server) -> None:
    async def main() -> None:
        rb = Recorder()
        # a slow first reconnect, so that bob misses messages while he is away
        bob = client(server, "bob", rb, channels=["pc.rec"], backoff_initial=1.5, jitter=0.0)
        async with client(server, "alice", channels=["pc.rec"]) as alice:
            await bob.connect()
            await alice.publish("pc.rec", "before")
            await rb.wait_count(1)
            assert bob._transport is not None
            bob._transport.disconnect(graceful=False)  # the network drops
            await until(lambda: bob.state == "reconnecting")
            for i in range(5):
                await alice.publish("pc.rec", f"missed{i}")
            await bob.connect(timeout=10)
            await alice.publish("pc.rec", "after")
            await rb.wait_count(7)
            assert_once_in_order(
                rb.contents(), ["before", *[f"missed{i}" for i in range(5)], "after"]
            )
            assert [m.replayed for m in rb.messages] == [False] + [True] * 5 + [False]
            last = rb.joins[-1]
            assert last.recovered is True and not last.new_epoch and last.offset == 6
            await bob.close()

    run(main())


def test_unacked_messages_resent_with_retry(make_server: Callable[..., Server]) -> None:
    """Drop the sender's socket right after a burst: what the server accepted but never
    acked is resent with `retry`, acked with its original offset, published once. A relay
    between client and server shows the retries on the wire and the server's acks."""
    srv = make_server(RATE_LIMIT_MESSAGES="100000")

    async def main(tap: WireTap) -> None:
        rb = Recorder()
        async with (
            client(srv, "bob", rb, channels=["pc.retry"]),
            AetherClient(
                tap.url(),
                token=srv.token("alice"),
                client_id="pc-retry",
                channels=["pc.retry"],
                **FAST,
            ) as alice,
        ):
            sent = [f"r{i}" for i in range(200)]
            futures = [alice.publish_nowait("pc.retry", text) for text in sent]
            alice.reconnect()  # the socket goes while most acks are still on the way
            acks = await asyncio.wait_for(asyncio.gather(*futures), 20)
            assert sorted(a.offset for a in acks) == list(range(1, 201))
            await rb.wait_count(200)
            await asyncio.sleep(0.2)
            assert_once_in_order(rb.contents(), sent)
            final = {a.sequence: a.offset for a in acks}
        assert_retried_and_acked_once(tap.snapshot(), final)

    with WireTap(("127.0.0.1", srv.port)) as tap:
        run(main(tap))


def assert_retried_and_acked_once(conns: list[Tapped], final: dict[int, int]) -> None:
    """The first socket carried `send`s; the next one `retry`s of some of those sequences,
    each acked once by the server, with the offset the client reported (the original one
    when the server had already published it on the first socket)."""
    assert len(conns) >= 2, conns

    def publications(msgs: list[dict[str, Any]], action: str) -> list[int]:
        return [
            m["data"]["metadata"]["sequence"]
            for m in msgs
            if (m.get("type"), m.get("action")) == ("message", action)
        ]

    def acks(msgs: list[dict[str, Any]]) -> Counter[tuple[int, int]]:
        return Counter(
            (m["data"]["metadata"]["sequence"], m["data"]["metadata"]["offset"])
            for m in msgs
            if (m.get("type"), m.get("action")) == ("message", "ack")
        )

    first, second = conns[0], conns[1]
    sent_first = publications(first.up, "send")
    assert sent_first and not publications(first.up, "retry"), first.up[:5]
    retried = publications(second.up, "retry")
    assert retried, "no retry on the second socket"
    assert len(set(retried)) == len(retried) and set(retried) <= set(sent_first), retried
    # what the first socket never carried goes out as a plain send
    assert set(publications(second.up, "send")).isdisjoint(sent_first)
    second_acks = acks(second.down)
    first_acks = {seq: off for seq, off in acks(first.down)}
    for seq in retried:
        got = [(s, o) for s, o in second_acks.elements() if s == seq]
        assert got == [(seq, final[seq])], (seq, got)  # acked once, as the client saw it
        if seq in first_acks:  # published on the first socket: the retry is no new one
            assert first_acks[seq] == final[seq], (seq, first_acks[seq], final[seq])


def test_server_restart_mid_stream(make_server: Callable[..., Server]) -> None:
    """docs/protocol.md §8 with the in-memory broker: the server restarts (history and dedupe memory
    lost, new epoch) while alice publishes; both clients reconnect by themselves; every
    message reaches bob exactly once."""
    srv = make_server(RATE_LIMIT_MESSAGES="100000")

    async def main() -> None:
        rb, ra = Recorder(), Recorder()
        async with (
            client(srv, "bob", rb, client_id="pc-bob", channels=["pc.restart"]),
            client(srv, "alice", ra, client_id="pc-alice", channels=["pc.restart"]) as alice,
        ):
            sent: list[str] = []
            futures: list[asyncio.Future[Ack]] = []

            async def stream() -> None:
                for i in range(300):
                    sent.append(f"s{i}")
                    futures.append(alice.publish_nowait("pc.restart", f"s{i}"))
                    await asyncio.sleep(0.01)

            streaming = asyncio.create_task(stream())
            await asyncio.sleep(0.8)
            await asyncio.to_thread(srv.restart)
            await streaming
            await asyncio.wait_for(asyncio.gather(*futures), 30)
            await rb.wait_count(300, timeout=30)
            await asyncio.sleep(0.3)
            assert_once_in_order(rb.contents(), sent)
            assert "reconnecting" in rb.states and rb.states[-1] == "open"
            assert any(j.new_epoch for j in rb.joins), rb.joins

    run(main(), timeout=90)


def test_rate_limited_messages_are_resent(make_server: Callable[..., Server]) -> None:
    srv = make_server(RATE_LIMIT_MESSAGES="5", RATE_LIMIT_WINDOW_S="1")

    async def main() -> None:
        rb = Recorder()
        async with (
            client(srv, "bob", rb, channels=["pc.rl"]),
            client(srv, "alice", channels=["pc.rl"]) as alice,
        ):
            sent = [f"l{i}" for i in range(12)]
            acks = await asyncio.gather(*(alice.publish_nowait("pc.rl", t) for t in sent))
            assert sorted(a.offset for a in acks) == list(range(1, 13))
            await rb.wait_count(12)
            assert sorted(rb.contents()) == sorted(sent)
            assert len(rb.contents()) == 12

    run(main(), timeout=30)


def test_too_large_publications_are_refused_and_hold_nothing_up(server: Server) -> None:
    """MESSAGE_TOO_LARGE names no publication: the client ties it to the oldest one out that
    is over `limit` and rejects that one; more of them than the window (8) do not stop the
    publications behind them."""

    async def main() -> None:
        async with client(server, "ivy", channels=["pc.big"]) as c:
            big = [c.publish_nowait("pc.big", "x" * 70_000) for _ in range(10)]
            ack = await asyncio.wait_for(c.publish("pc.big", "small"), 10)
            assert ack.offset == 1
            for fut in big:
                with pytest.raises(AetherError) as refused:
                    await fut
                assert refused.value.code == "MESSAGE_TOO_LARGE"
                assert refused.value.details["limit"] == 65536
            assert c.pending == 0

    run(main(), timeout=30)


def _flood_closed(srv: Server) -> bool:
    """Whether the server closed a connection as a flood (1008, logged `rate_limit_close`)."""
    return any(line.get("event") == "rate_limit_close" for line in srv.log_lines())


def _members(srv: Server, channels: list[str]) -> list[int]:
    views = [srv.http("GET", f"/ws/channels/{name}", token=srv.admin()) for name in channels]
    return [body["members"] if status == 200 else -1 for status, body, _ in views]


#: a budget of 5 frames per 2 s (RATE_LIMIT_MESSAGES, every frame): the flood close comes after
#: max(10, 5) = 10 strikes, refilled at 3 x 5 per 2 s
SMALL_BUDGET = {"RATE_LIMIT_MESSAGES": "5", "RATE_LIMIT_WINDOW_S": "2"}


def test_joins_past_the_budget_are_paced_and_retried(make_server: Callable[..., Server]) -> None:
    """A client in more channels than its budget allows at once (12 against 5): connecting,
    and again after its socket drops (the budget does not refill on reconnect), it ends up
    in every channel; joins refused with RATE_LIMITED are sent again after
    `retry_after_ms`, never so many at once that the server closes it as a flood."""
    srv = make_server(**SMALL_BUDGET)
    channels = [f"pc.many.{i}" for i in range(12)]

    async def main() -> None:
        rec = Recorder()
        alice = client(srv, "alice", rec, client_id="pc-many", channels=channels)
        await alice.connect(timeout=30)
        assert sorted(j.channel for j in rec.joins) == sorted(channels)
        assert await asyncio.to_thread(_members, srv, channels) == [1] * 12
        alice.reconnect()  # the socket drops; the budget is still spent
        await until(lambda: rec.states.count("open") == 2, timeout=30)
        assert sorted(j.channel for j in rec.joins[12:]) == sorted(channels)
        assert all(j.recovered is True for j in rec.joins[12:]), rec.joins[12:]
        assert await asyncio.to_thread(_members, srv, channels) == [1] * 12
        assert rec.errors == []  # refusals were retried, not reported
        assert rec.states.count("reconnecting") == 1  # the drop we made, no other
        await alice.close()

    run(main(), timeout=60)
    assert not _flood_closed(srv)


def test_publish_burst_past_the_budget(make_server: Callable[..., Server]) -> None:
    """A burst of 20 publications against a budget of 5: every one is acked exactly once and
    delivered once, the publications refused with RATE_LIMITED are sent again, paced, and
    the connection is never closed as a flood."""
    srv = make_server(**SMALL_BUDGET)

    async def main() -> None:
        rb, ra = Recorder(), Recorder()
        async with (
            client(srv, "bob", rb, channels=["pc.burst"]),
            client(srv, "alice", ra, client_id="pc-burst", channels=["pc.burst"]) as alice,
        ):
            sent = [f"b{i}" for i in range(20)]
            futures = [alice.publish_nowait("pc.burst", text) for text in sent]
            acks = await asyncio.wait_for(asyncio.gather(*futures), 40)
            assert sorted(a.offset for a in acks) == list(range(1, 21))
            assert sorted(a.sequence for a in acks) == sorted({a.sequence for a in acks})
            await rb.wait_count(20, timeout=10)
            await asyncio.sleep(0.3)
            assert Counter(rb.contents()) == Counter(sent)  # each once, none lost
            assert ra.states.count("open") == 1  # never dropped
            assert ra.errors == []

    run(main(), timeout=60)
    assert not _flood_closed(srv)


def test_too_large_publications_on_an_empty_budget_hold_nothing_up(
    make_server: Callable[..., Server],
) -> None:
    """Oversized publications sent once the budget is empty (3 per 3 s: the join and two
    publications spend it) are refused MESSAGE_TOO_LARGE all the same, each answering its
    place in the window: eight of them (the whole window) do not stop the publication
    behind them, which is acked once the budget refills."""
    srv = make_server(RATE_LIMIT_MESSAGES="3", RATE_LIMIT_WINDOW_S="3")

    async def main() -> None:
        async with client(srv, "ann", channels=["pc.bigempty"]) as c:
            small = [c.publish_nowait("pc.bigempty", f"s{i}") for i in range(2)]
            big = [c.publish_nowait("pc.bigempty", "x" * 70_000) for _ in range(8)]
            last = c.publish_nowait("pc.bigempty", "last")
            ack = await asyncio.wait_for(last, 15)
            assert ack.offset == 3
            assert [(await f).offset for f in small] == [1, 2]
            for fut in big:
                with pytest.raises(AetherError) as refused:
                    await fut
                assert refused.value.code == "MESSAGE_TOO_LARGE"
            assert c.pending == 0

    run(main(), timeout=30)
    assert not _flood_closed(srv)


def test_leave_refused_by_the_budget_is_sent_again(make_server: Callable[..., Server]) -> None:
    """A leave the budget refuses (2 per 4 s: the join and a publication spend it) is sent
    again after `retry_after_ms`: leave() returns, and the server no longer counts the
    client as a member."""
    srv = make_server(RATE_LIMIT_MESSAGES="2", RATE_LIMIT_WINDOW_S="4")

    async def main() -> None:
        rec = Recorder()
        async with client(srv, "ann", rec, channels=["pc.leave"]) as c:
            await c.publish("pc.leave", "s1")
            await asyncio.wait_for(c.leave("pc.leave"), 15)
            assert c.channels == []
            assert await asyncio.to_thread(_members, srv, ["pc.leave"]) in ([0], [-1])
            assert rec.errors == []  # the refusal was retried, not reported

    run(main(), timeout=30)
    assert not _flood_closed(srv)


# -- tokens ------------------------------------------------------------------------------------


def test_no_reconnect_after_4001(server: Server) -> None:
    server.allow_errors = False

    async def main() -> None:
        rec = Recorder()
        bad = AetherClient(server.ws_url, token="not-a-jwt", **FAST, **rec.kwargs())
        with pytest.raises(ClientClosed) as closed:
            await bad.connect(timeout=10)
        assert closed.value.close_code == 4001
        assert bad.state == "closed"
        assert [e.code for e in rec.errors] == ["AUTH_INVALID"]
        await asyncio.sleep(0.3)
        assert rec.states.count("connecting") == 1  # no second attempt
        with pytest.raises(ClientClosed):
            bad.publish_nowait("x", "y")
        # a new token brings it back
        bad.set_token(server.token("alice"))
        await bad.connect(timeout=10)
        assert (bad.state, bad.user_id) == ("open", "alice")
        await bad.close()

    run(main())


def test_4001_with_token_refresh_reconnects(server: Server) -> None:
    async def main() -> None:
        calls: list[int] = []

        async def fresh() -> str:
            calls.append(1)
            return server.token("gina")

        c = AetherClient(
            server.ws_url, token=server.token("gina", ttl=-60), token_refresh=fresh, **FAST
        )
        await c.connect(timeout=10)
        assert c.user_id == "gina" and calls == [1]
        await c.close()

        # a callback that has nothing new: stop
        same = server.token("gina", ttl=-60)
        d = AetherClient(server.ws_url, token=same, token_refresh=lambda: same, **FAST)
        with pytest.raises(ClientClosed):
            await d.connect(timeout=10)

    run(main())


def test_token_refresh_refused_by_the_budget_is_sent_again(
    make_server: Callable[..., Server],
) -> None:
    """A token refresh the budget refuses (2 per 20 s: the join and a publication spend it;
    the refresh comes half-way to the token's exp) is sent again after `retry_after_ms`,
    before the token expires: the connection is never closed 4001 and reopened."""
    srv = make_server(RATE_LIMIT_MESSAGES="2", RATE_LIMIT_WINDOW_S="20")

    async def main() -> None:
        fresh = Refresher(srv, "hana")
        rec = Recorder()
        c = AetherClient(
            srv.ws_url,
            token=srv.token("hana", ttl=12),
            token_refresh=fresh,
            channels=["pc.tokbudget"],
            refresh_before_s=30,
            **FAST,
            **rec.kwargs(),
        )
        await c.connect()
        await c.publish("pc.tokbudget", "spends the budget")
        await asyncio.sleep(13.5)  # past the first token's exp
        assert fresh.calls == 1
        assert c.state == "open" and rec.states.count("open") == 1, rec.states  # never closed
        await c.close()

    run(main())
    assert not _flood_closed(srv)


def test_token_refreshed_before_expiry(server: Server) -> None:
    async def main() -> None:
        fresh = Refresher(server, "hana")
        rec = Recorder()
        first = server.token("hana", ttl=6)
        exp = jwt.decode(first, options={"verify_signature": False})["exp"]
        c = AetherClient(
            server.ws_url,
            token=first,
            token_refresh=fresh,
            channels=["pc.tok"],
            refresh_before_s=3,  # margin for the refresh round trip on a busy machine
            **FAST,
            **rec.kwargs(),
        )
        await c.connect()
        while time.time() < exp + 0.5:  # past the first token's exp
            await asyncio.sleep(0.1)
        assert fresh.calls == 1
        assert c.state == "open" and rec.states.count("open") == 1  # never reconnected
        ack = await c.publish("pc.tok", "still here")
        assert ack.offset == 1
        await c.close()

    run(main())


# -- close codes that stop the client or slow it down --------------------------------------------


def test_stops_for_good_on_4009(server: Server) -> None:
    async def main() -> None:
        rec = Recorder()
        first = client(server, "quinn", rec, client_id="dev-1")
        await first.connect(timeout=10)
        second = client(server, "quinn", client_id="dev-1")  # replaces the first
        await second.connect(timeout=10)
        await until(lambda: first.state == "closed")
        await asyncio.sleep(0.5)  # time for a reconnect that must not come
        assert rec.states.count("connecting") == 1 and "reconnecting" not in rec.states
        assert second.state == "open"
        await second.close()

    run(main())


def test_backs_off_longer_after_4029(make_server: Callable[..., Server]) -> None:
    srv = make_server(RATE_LIMIT_CONNECTIONS="1")

    async def main() -> None:
        holder = client(srv, "ursa")
        await holder.connect(timeout=10)
        rec = Recorder()
        over = client(srv, "ursa", rec, backoff_initial=0.05, backoff_max=60)
        task = asyncio.ensure_future(over.connect(timeout=30))
        await until(lambda: over.attempts >= 1)
        # after 4029 the attempt count jumps to at least 6: the next wait is the 6th step of
        # the backoff (0.05 * 2**5 = 1.6 s before jitter), not the first (0.05 s)
        assert over.attempts >= 6, over.attempts
        assert over.backoff_delay(over.attempts) >= 0.05 * 2**5 * 0.5
        assert "CONNECTION_LIMIT" in [e.code for e in rec.errors]
        await over.close()
        with contextlib.suppress(Exception):
            await task
        await holder.close()

    run(main())


# -- acks before copies: the Redis broker (docs/protocol.md §7) ----------------------------------


@dataclass
class Race:
    srv: Server
    broker: str  # "memory" or "redis"


@pytest.fixture(params=["memory", "redis"])
def race(request: pytest.FixtureRequest, make_server: Callable[..., Server]) -> Iterator[Race]:
    """A server whose acks beat the copies they acknowledge: the Redis broker behind a relay
    that delays Redis' pub/sub (tests/integration/slow_pubsub.py); or the memory broker,
    which queues the copy before the ack."""
    env = {"RATE_LIMIT_MESSAGES": "100000"}
    if request.param == "memory":
        yield Race(make_server(**env), "memory")
        return
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    db = db_of(request.getfixturevalue("redis_url"))
    with SlowPubSubRelay(("127.0.0.1", redis_server.port)) as relay:
        srv = make_server(BROKER_URL=relay.url(db), **env)
        yield Race(srv, "redis")
        srv.stop()  # before the relay goes


RACE_CHANNELS = [f"pc.race.{i}" for i in range(20)]
RACE_ROUNDS = 4


def test_acks_before_copies_lose_nothing(race: Race) -> None:
    """echo=1, two members publishing to 20 channels at once: with Redis the ack of a
    publication comes before its own copy and before the copies of lower offsets published
    by the other member. Each member gets every copy, its own and the other's, once, in
    offset order, and its position is the last offset."""
    srv = race.srv

    async def main() -> None:
        got: dict[str, list[Message]] = {"a": [], "b": []}
        acked: dict[str, set[str]] = {"a": set(), "b": set()}
        top: dict[tuple[str, str], int] = {}  # (member, channel): highest offset acked
        beaten = Counter[str]()  # copies that came after an ack of theirs or of a higher one

        def on_message(me: str) -> Callable[[Message], None]:
            def record(msg: Message) -> None:
                if msg.content in acked[me]:
                    beaten["own"] += 1
                elif msg.offset < top.get((me, msg.channel), 0):
                    beaten["lower"] += 1
                got[me].append(msg)

            return record

        def on_ack(me: str, content: str) -> Callable[[asyncio.Future[Ack]], None]:
            def record(fut: asyncio.Future[Ack]) -> None:
                ack = fut.result()
                acked[me].add(content)
                top[me, ack.channel] = max(top.get((me, ack.channel), 0), ack.offset)

            return record

        total = 2 * RACE_ROUNDS * len(RACE_CHANNELS)

        def racer(me: str) -> AetherClient:
            """A member of every race channel, with echo, recording what it receives."""
            return client(
                srv,
                f"race-{me}",
                client_id=f"race-{me}",
                channels=RACE_CHANNELS,
                echo=True,
                on_message=on_message(me),
            )

        async with racer("a") as a, racer("b") as b:
            futures = []
            for r in range(RACE_ROUNDS):
                for ch in RACE_CHANNELS:
                    for me, c in (("a", a), ("b", b)):
                        content = f"{me}:{ch}:{r}"
                        fut = c.publish_nowait(ch, content)
                        fut.add_done_callback(on_ack(me, content))
                        futures.append(fut)
            await asyncio.wait_for(asyncio.gather(*futures), 30)
            with contextlib.suppress(AssertionError):
                await until(lambda: len(got["a"]) >= total and len(got["b"]) >= total, 20)
            await asyncio.sleep(0.3)  # a copy too many would show
            for me, c in (("a", a), ("b", b)):
                for ch in RACE_CHANNELS:
                    offsets = [m.offset for m in got[me] if m.channel == ch]
                    want = list(range(1, 2 * RACE_ROUNDS + 1))
                    assert offsets == want, f"{me} on {ch}: {offsets} (lost or doubled)"
                    assert c.position(ch)[0] == 2 * RACE_ROUNDS
                assert sorted(m.content for m in got[me]) == sorted(
                    f"{w}:{ch}:{r}"
                    for w in "ab"
                    for ch in RACE_CHANNELS
                    for r in range(RACE_ROUNDS)
                )
        if race.broker == "redis":
            # the races this test is about did happen: own copies after their acks, copies
            # of the other member after an ack of a higher offset
            assert beaten["own"] > 0 and beaten["lower"] > 0, beaten

    run(main())


def test_echo_off_position_passes_own_messages(race: Race) -> None:
    """echo off: a member's own publications never come back as copies, but its position
    passes their offsets (as acked), so a reconnect's recovery asks for nothing it already
    has: the server replays none of its own messages, and reports no gap. The other
    member's messages, some of lower offsets arriving after an ack, all arrive once."""
    srv = race.srv
    channels = [f"pc.quiet.{i}" for i in range(5)]
    rounds = 4

    async def main(tap: WireTap) -> None:
        ra = Recorder()
        async with (
            AetherClient(
                tap.url(),
                token=srv.token("quiet-a"),
                client_id="quiet-a",
                channels=channels,
                **FAST,
                **ra.kwargs(),
            ) as a,
            client(srv, "quiet-b", client_id="quiet-b", channels=channels) as b,
        ):
            futures = [
                c.publish_nowait(ch, f"{who}:{ch}:{r}")
                for r in range(rounds)
                for ch in channels
                for who, c in (("a", a), ("b", b))
            ]
            await asyncio.wait_for(asyncio.gather(*futures), 30)
            theirs = sorted(f"b:{ch}:{r}" for ch in channels for r in range(rounds))
            await ra.wait_count(len(theirs))
            epochs = {}
            for ch in channels:
                floor, epochs[ch] = a.position(ch)
                assert floor == 2 * rounds, (ch, floor, a._channels[ch].above)
            a.reconnect()
            await until(lambda: len(ra.joins) == 2 * len(channels), 20)
            await asyncio.sleep(0.3)  # a replayed message would show
            assert all(j.recovered is True for j in ra.joins[len(channels) :]), ra.joins
            assert sorted(ra.contents()) == theirs  # once each, none of its own
        conns = tap.snapshot()
        assert len(conns) == 2, conns
        since = {
            m["data"]["channel"]: (m["data"].get("since"), m["data"].get("epoch"))
            for m in conns[1].up
            if (m.get("type"), m.get("action")) == ("connection", "connect")
        }
        assert since == {ch: (2 * rounds, epochs[ch]) for ch in channels}, since
        replayed = [
            m for m in conns[1].down if (m.get("type"), m.get("action")) == ("message", "send")
        ]
        assert replayed == [], replayed[:3]

    with WireTap(("127.0.0.1", srv.port)) as tap:
        run(main(tap))


async def open_a_gap(
    relay: SlowPubSubRelay, a: AetherClient, ra: Recorder, b: AetherClient, ch: str
) -> list[str]:
    """`b` publishes on `ch` three messages that `a` gets (recorded by `ra`), then five (offsets
    4 to 8) while the server's Redis subscriber is cut, which never reach `a`, then more until
    one reaches `a` above that gap: `a`'s position stays 3. Returns what `b` sent."""
    sent = [f"m{i}" for i in range(8)]
    for text in sent[:3]:
        await b.publish(ch, text)
    await ra.wait_count(3)
    relay.cut_subscribers()
    missed = [await b.publish(ch, text) for text in sent[3:8]]
    assert [ack.offset for ack in missed] == [4, 5, 6, 7, 8]
    relay.refusing = False
    # the server subscribes again: what it publishes now comes, above the gap
    while not ra.messages[3:]:
        sent.append(f"m{len(sent)}")
        await b.publish(ch, sent[-1])
        await asyncio.sleep(0.05)
    assert a.position(ch)[0] == 3
    return sent


def gap_server(
    make_server: Callable[..., Server], relay: SlowPubSubRelay, redis_url: str
) -> Server:
    """A server on the Redis behind `relay`, whose history holds a gap test's messages."""
    srv = make_server(
        BROKER_URL=relay.url(db_of(redis_url)),
        RATE_LIMIT_MESSAGES="100000",
        HISTORY_SIZE="5000",
    )
    srv.allow_errors = True  # the cut subscriber: broker_degraded (checked after)
    return srv


def test_a_gap_on_a_live_socket_is_recovered(
    make_server: Callable[..., Server], redis_server: RedisServer, redis_url: str
) -> None:
    """Publications the server's Redis subscriber missed (it was cut for a while) never
    reach the member: its position stays below the gap while later offsets come. Once
    GAP_WINDOW of them are kept, the client joins again with `since` and the server
    replays what is missing: every message once, in the end, without a reconnect."""
    with SlowPubSubRelay(("127.0.0.1", redis_server.port), delay=0.02) as relay:
        srv = gap_server(make_server, relay, redis_url)

        async def main() -> None:
            ra = Recorder()
            async with (
                client(srv, "gap-a", ra, client_id="gap-a", channels=["pc.gap"]) as a,
                client(srv, "gap-b", client_id="gap-b", channels=["pc.gap"]) as b,
            ):
                sent = await open_a_gap(relay, a, ra, b, "pc.gap")
                more = [f"m{i}" for i in range(len(sent), len(sent) + GAP_WINDOW + 20)]
                sent += more  # more than GAP_WINDOW come above the gap
                await asyncio.gather(*(b.publish_nowait("pc.gap", t) for t in more))
                await ra.wait_count(len(sent), timeout=30)
                await asyncio.sleep(0.3)  # a double would show
                assert_once_in_order(
                    [m.content for m in sorted(ra.messages, key=lambda m: m.offset)], sent
                )
                assert a.position("pc.gap")[0] == len(sent)
                assert ra.states.count("open") == 1  # no reconnect
                assert [j.recovered for j in ra.joins] == [None, True], ra.joins
                assert {m.content for m in ra.messages if m.replayed} >= set(sent[3:8])

        try:
            run(main())
        finally:
            srv.stop()  # before the relay goes
    only_expected_errors(srv, "broker_degraded")


def test_a_gap_whose_rejoin_goes_unanswered_is_recovered_by_a_reconnect(
    make_server: Callable[..., Server], redis_server: RedisServer, redis_url: str
) -> None:
    """The same gap, but the join with `since` that GAP_WINDOW offsets above it send is
    lost on the way (a relay between client and server passes nothing more of that
    socket: tests/integration/wiretap.py). At twice GAP_WINDOW the client drops the
    socket; the reconnect's join recovers from the position: every message once."""
    with SlowPubSubRelay(("127.0.0.1", redis_server.port), delay=0.02) as relay:
        srv = gap_server(make_server, relay, redis_url)

        async def main(tap: WireTap) -> None:
            ra = Recorder()
            async with (
                AetherClient(
                    tap.url(),
                    token=srv.token("gap-a"),
                    client_id="gap-a",
                    channels=["pc.gap2"],
                    **FAST,
                    **ra.kwargs(),
                ) as a,
                client(srv, "gap-b", client_id="gap-b", channels=["pc.gap2"]) as b,
            ):
                sent = await open_a_gap(relay, a, ra, b, "pc.gap2")
                tap.stall_up(0)  # from now on the server hears nothing of a's first socket
                more = [f"m{i}" for i in range(len(sent), len(sent) + 2 * GAP_WINDOW + 20)]
                sent += more  # more than twice GAP_WINDOW come above the gap
                await asyncio.gather(*(b.publish_nowait("pc.gap2", t) for t in more))
                await ra.wait_count(len(sent), timeout=30)
                await asyncio.sleep(0.3)  # a double would show
                assert_once_in_order(
                    [m.content for m in sorted(ra.messages, key=lambda m: m.offset)], sent
                )
                assert a.position("pc.gap2")[0] == len(sent)
                assert ra.states.count("open") == 2  # one reconnect
                assert [j.recovered for j in ra.joins] == [None, True], ra.joins
                assert {m.content for m in ra.messages if m.replayed} >= set(sent[3:8])
            first, second = tap.snapshot()[:2]
            since = [
                m["data"].get("since")
                for m in first.up + second.up
                if (m["type"], m["action"]) == ("connection", "connect")
            ]
            # the first join, the rejoin that was lost, the reconnect's join
            assert since == [None, 3, 3], since

        try:
            with WireTap(("127.0.0.1", srv.port)) as tap:
                run(main(tap))
        finally:
            srv.stop()  # before the relay goes
    only_expected_errors(srv, "broker_degraded")
