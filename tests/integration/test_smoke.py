from __future__ import annotations

from tests.conftest import Server
from tests.integration.wsclient import Client


def test_two_clients_exchange_a_message(server: Server) -> None:
    with (
        Client(server.ws_url, token=server.token("alice"), client_id="a", channel="room") as a,
        Client(server.ws_url, token=server.token("bob"), client_id="b", channel="room") as b,
    ):
        assert a.recv()["data"]["channel"] == "room"
        assert b.recv()["data"]["channel"] == "room"
        a.publish("room", "hello")
        ack = a.recv()
        assert ack["action"] == "ack" and ack["data"]["metadata"]["offset"] == 1
        got = b.recv()
        assert got["data"]["content"] == "hello"
        assert got["data"]["metadata"]["user_id"] == "alice"
        a.nothing()
