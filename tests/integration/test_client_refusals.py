"""aether_fast.client against a real server: what test_python_client.py leaves out of the
rules of docs/clients.md — close 4003 stops the client until it has a new token, and the
publication past `max_pending` is refused at once (QUEUE_FULL) while the queued ones are sent.
The JS client's side is clients/js/test/close-codes.test.mjs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from aether_fast.client import AetherClient, AetherError, ClientClosed, Message, State
from tests.conftest import Server
from tests.integration.helpers import no_new_server_errors  # noqa: F401 (autouse fixture)
from tests.integration.test_python_client import Backoff

T = TypeVar("T")

#: Fast reconnects for tests: the default backoff starts at 0.5 s and caps at 30 s.
FAST: Backoff = {"backoff_initial": 0.05, "backoff_max": 0.5}


def run(coro: Awaitable[T], timeout: float = 60) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def test_stops_on_4003_until_a_token_allows_it(server: Server) -> None:
    async def main() -> None:
        states: list[State] = []
        errors: list[AetherError] = []
        # the client joins with messages; only a URL that names a channel can earn a 4003
        url = server.ws_url + "?channel=py.secret"
        c = AetherClient(
            url,
            token=server.token("ivy", channels=["py.open"]),
            on_state=states.append,
            on_error=errors.append,
            **FAST,
        )
        with pytest.raises(ClientClosed) as closed:
            await c.connect(timeout=10)
        assert closed.value.close_code == 4003
        assert c.state == "closed" and c.last_close_code == 4003
        assert [e.code for e in errors] == ["FORBIDDEN"]
        await asyncio.sleep(0.5)  # time for a reconnect that must not come
        assert states.count("connecting") == 1 and "reconnecting" not in states, states
        with pytest.raises(ClientClosed):
            c.publish_nowait("py.open", "x")
        # a token that allows the channel starts it again
        c.set_token(server.token("ivy", channels=["py.open", "py.secret"]))
        await c.connect(timeout=10)
        assert (c.state, c.user_id) == ("open", "ivy")  # (a tuple: mypy keeps c.state "closed")
        await c.close()

    run(main())


def test_publication_past_max_pending_is_refused_and_the_queued_ones_are_sent(
    server: Server,
) -> None:
    ch = "py.qfull"

    async def main() -> None:
        got: list[Message] = []
        watcher = AetherClient(
            server.ws_url, token=server.token("lee-w"), channels=[ch], on_message=got.append
        )
        await watcher.connect(timeout=10)
        c = AetherClient(
            server.ws_url, token=server.token("lee"), channels=[ch], max_pending=3, **FAST
        )
        queued = [c.publish_nowait(ch, text) for text in ("q0", "q1", "q2")]  # not connected
        assert c.pending == 3
        with pytest.raises(AetherError) as full:
            c.publish_nowait(ch, "q3")
        assert full.value.code == "QUEUE_FULL"
        assert c.pending == 3  # the refused one took no place and pushed none out
        await c.connect(timeout=10)
        assert [ack.offset for ack in await asyncio.gather(*queued)] == [1, 2, 3]
        assert c.pending == 0
        assert (await c.publish(ch, "q4")).offset == 4  # acked ones free their places
        while len(got) < 4:
            await asyncio.sleep(0.02)
        assert [m.content for m in got] == ["q0", "q1", "q2", "q4"]
        await c.close()
        await watcher.close()

    run(main())
