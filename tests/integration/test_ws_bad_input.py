"""docs/protocol.md §3 and §11 (validation) over real sockets: every malformed message gets an
error and the connection stays open; RFC 6455 violations close it with the RFC's code. After
each bad input the server is shown to still serve: the same connection (when open) and other
clients."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import Server
from tests.integration.helpers import (
    Op,
    RawWS,
    drain,
    expect,
    expect_error,
    join_msg,
    no_new_server_errors,  # noqa: F401 (autouse fixture)
    send_msg,
)
from tests.integration.wsclient import Client

_ids = itertools.count(1)
MAX_MESSAGE_BYTES = 65536  # the default


@dataclass
class Pair:
    server: Server
    channel: str
    sender: Client
    peer: Client

    def alive(self, who: Client | None = None) -> None:
        """`who` (default: the sender) publishes and gets its ack; the peer receives it."""
        who = who or self.sender
        seq = who.publish(self.channel, "alive?")
        ack = expect(who, "message", "ack")
        assert ack["data"]["metadata"]["sequence"] == seq
        got = expect(self.peer, "message", "send")
        assert got["data"]["content"] == "alive?"

    def refused(self, frame: dict[str, Any], sequence: int | None = None) -> None:
        """The sender's `frame` gets INVALID_MESSAGE naming the channel (and `sequence`, when
        given), the peer gets nothing, and the connection still works."""
        self.sender.send(frame)
        err = expect_error(self.sender, "INVALID_MESSAGE")
        assert err["details"]["channel"] == self.channel
        if sequence is not None:
            assert err["details"]["sequence"] == sequence
        self.peer.nothing(0.05)
        self.alive()

    def others_alive(self) -> None:
        """A fresh connection can still join and exchange messages with the peer."""
        with Client(
            self.server.ws_url, token=self.server.token("newcomer"), channel=self.channel
        ) as c:
            expect(c, "connection", "connect")
            self.alive(c)
            self.peer.publish(self.channel, "to newcomer")
            expect(self.peer, "message", "ack")
            assert expect(c, "message", "send")["data"]["content"] == "to newcomer"


@pytest.fixture
def pair(server: Server) -> Iterator[Pair]:
    channel = f"bad.{next(_ids)}"
    with (
        Client(
            server.ws_url, token=server.token("alice"), client_id="sender", channel=channel
        ) as sender,
        Client(server.ws_url, token=server.token("bob"), client_id="peer", channel=channel) as peer,
    ):
        expect(sender, "connection", "connect")
        expect(peer, "connection", "connect")
        yield Pair(server, channel, sender, peer)


def _raw(p: Pair) -> RawWS:
    raw = RawWS(p.server.port, query={"token": p.server.token("raw"), "channel": p.channel})
    assert raw.status == 101, raw.status_line
    first = raw.recv_json()
    assert (first["type"], first["action"]) == ("connection", "connect"), first
    return raw


# -- not a message ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["{not json", "", '{"type": "message",}', "nul", "{'a': 1}"])
def test_invalid_json(pair: Pair, text: str) -> None:
    pair.sender.send(text)
    expect_error(pair.sender, "INVALID_JSON")
    pair.peer.nothing(0.05)
    pair.alive()


@pytest.mark.parametrize("text", ["[1, 2]", "[]", '"a string"', "42", "-1.5", "null", "true"])
def test_json_but_not_an_object(pair: Pair, text: str) -> None:
    pair.sender.send(text)
    expect_error(pair.sender, "INVALID_MESSAGE")
    pair.alive()


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "foo", "action": "bar", "data": {}},
        {"type": "message", "action": "delete", "data": {}},
        {"type": "connection", "action": "send", "data": {}},
        {"type": "system", "action": "reboot", "data": {}},
        {"action": "send", "data": {}},
        {"type": "message", "data": {}},
        {"type": 5, "action": "send", "data": {}},
        {"type": "message", "action": ["send"], "data": {}},
        {},
    ],
    ids=lambda m: json.dumps(m)[:40],
)
def test_unknown_type_or_action(pair: Pair, msg: dict[str, Any]) -> None:
    pair.sender.send(msg)
    expect_error(pair.sender, "INVALID_MESSAGE")
    pair.alive()


@pytest.mark.parametrize("data", [[], "text", 5, True, [{"channel": "x"}]], ids=repr)
@pytest.mark.parametrize(
    "kind", [("message", "send"), ("connection", "connect"), ("system", "status")]
)
def test_data_not_an_object(pair: Pair, kind: tuple[str, str], data: Any) -> None:
    pair.sender.send({"type": kind[0], "action": kind[1], "data": data})
    expect_error(pair.sender, "INVALID_MESSAGE")
    pair.peer.nothing(0.05)
    pair.alive()


# -- field validation ------------------------------------------------------------------------

BAD_CHANNELS = [
    "",
    "a" * 129,
    "with space",
    "café",
    "чат",
    "a/b",
    "a\u0000b",
    "tab\t",
    5,
    None,
    ["x"],
]


@pytest.mark.parametrize("name", BAD_CHANNELS, ids=lambda n: repr(n)[:20])
def test_bad_channel_name_in_send(pair: Pair, name: Any) -> None:
    pair.sender.send(send_msg(name, "hi", 1))
    expect_error(pair.sender, "INVALID_MESSAGE")
    pair.alive()


@pytest.mark.parametrize("name", BAD_CHANNELS, ids=lambda n: repr(n)[:20])
def test_bad_channel_name_in_join_and_leave(pair: Pair, name: Any) -> None:
    pair.sender.send(join_msg(name))
    expect_error(pair.sender, "INVALID_MESSAGE")
    pair.sender.send({"type": "connection", "action": "disconnect", "data": {"channel": name}})
    expect_error(pair.sender, "INVALID_MESSAGE")
    pair.alive()  # still a member of its channel


def test_channel_name_limits_accepted(pair: Pair) -> None:
    for name in ("a" * 128, "A-z_0.9:x", "x"):
        pair.sender.join(name)
        assert expect(pair.sender, "connection", "connect")["data"]["channel"] == name
        pair.sender.publish(name, "ok")
        assert expect(pair.sender, "message", "ack")["data"]["channel"] == name
    pair.alive()


def test_missing_channel(pair: Pair) -> None:
    pair.sender.send(
        {"type": "message", "action": "send", "data": {"content": "x", "metadata": {"sequence": 1}}}
    )
    expect_error(pair.sender, "INVALID_MESSAGE")
    pair.sender.send({"type": "connection", "action": "connect", "data": {}})
    expect_error(pair.sender, "INVALID_MESSAGE")
    pair.alive()


@pytest.mark.parametrize("content", [5, None, {"a": 1}, ["x"], True, 1.5], ids=repr)
def test_content_not_a_string(pair: Pair, content: Any) -> None:
    pair.refused(send_msg(pair.channel, content, 77), sequence=77)


def test_content_missing(pair: Pair) -> None:
    frame = send_msg(pair.channel, None, 78)
    del frame["data"]["content"]
    pair.refused(frame, sequence=78)


@pytest.mark.parametrize("sequence", [-1, 1.5, "1", True, False, None, [1], {"n": 1}], ids=repr)
def test_bad_sequence(pair: Pair, sequence: Any) -> None:
    pair.refused(send_msg(pair.channel, "x", sequence))


@pytest.mark.parametrize("metadata", ["missing", None, [], "seq", 5, {}], ids=repr)
def test_bad_metadata(pair: Pair, metadata: Any) -> None:
    data: dict[str, Any] = {"channel": pair.channel, "content": "x"}
    if metadata != "missing":
        data["metadata"] = metadata
    pair.refused({"type": "message", "action": "send", "data": data})


@pytest.mark.parametrize("ts", [123, {}, True, ["2024"]], ids=repr)
def test_timestamp_not_a_string(pair: Pair, ts: Any) -> None:
    frame = send_msg(pair.channel, "x", 9)
    frame["data"]["metadata"]["timestamp"] = ts
    pair.refused(frame, sequence=9)


def test_timestamp_string_accepted(pair: Pair) -> None:
    frame = send_msg(pair.channel, "x", 10)
    frame["data"]["metadata"]["timestamp"] = "2024-01-01T00:00:00Z"
    pair.sender.send(frame)
    assert expect(pair.sender, "message", "ack")["data"]["metadata"]["sequence"] == 10
    assert expect(pair.peer, "message", "send")["data"]["content"] == "x"


@pytest.mark.parametrize(
    "data",
    [
        {"channel": "bad.x", "since": -1},
        {"channel": "bad.x", "since": "3"},
        {"channel": "bad.x", "since": 1.5},
        {"channel": "bad.x", "since": True},
        {"channel": "bad.x", "epoch": 5},
    ],
    ids=lambda d: json.dumps(d)[:40],
)
def test_bad_join_fields(pair: Pair, data: dict[str, Any]) -> None:
    pair.sender.send({"type": "connection", "action": "connect", "data": data})
    err = expect_error(pair.sender, "INVALID_MESSAGE")
    assert err["details"]["channel"] == "bad.x"
    pair.alive()


@pytest.mark.parametrize("data", [{}, {"token": 5}, {"token": ""}], ids=repr)
def test_bad_refresh_fields(pair: Pair, data: dict[str, Any]) -> None:
    pair.sender.send({"type": "connection", "action": "refresh", "data": data})
    expect_error(pair.sender, "INVALID_MESSAGE")
    pair.alive()


@pytest.mark.parametrize(
    "data",
    [
        {"message": "hi", "severity": "critical"},
        {"message": "hi", "severity": 1},
        {"severity": "info"},
        {"message": "", "severity": "info"},
        {"message": 5, "severity": "info"},
        {"message": "hi", "severity": "info", "channel": "bad name"},
    ],
    ids=lambda d: json.dumps(d)[:40],
)
def test_bad_admin_broadcast_fields(pair: Pair, data: dict[str, Any]) -> None:
    with Client(pair.server.ws_url, token=pair.server.admin()) as admin:
        expect(admin, "connection", "connect")
        admin.send({"type": "system", "action": "broadcast", "data": data})
        expect_error(admin, "INVALID_MESSAGE")
        pair.peer.nothing(0.1)  # nothing was broadcast
        admin.send({"type": "system", "action": "status", "data": {}})
        expect(admin, "system", "status")
    pair.alive()


def test_errors_answering_a_message_carry_channel_and_sequence(pair: Pair) -> None:
    pair.sender.send(send_msg("bad.not-joined", "x", 1234))
    err = expect_error(pair.sender, "NOT_A_MEMBER")
    assert err["details"]["channel"] == "bad.not-joined"
    assert err["details"]["sequence"] == 1234
    pair.sender.send(send_msg(pair.channel, 5, 4321))
    err = expect_error(pair.sender, "INVALID_MESSAGE")
    assert err["details"]["channel"] == pair.channel
    assert err["details"]["sequence"] == 4321
    pair.alive()


# -- frames: binary, size, UTF-8 --------------------------------------------------------------


def test_binary_frame_refused(pair: Pair) -> None:
    pair.sender.send(json.dumps(send_msg(pair.channel, "as binary", 1)).encode())
    err = expect_error(pair.sender, "INVALID_MESSAGE")
    assert err["code"] == "INVALID_MESSAGE"
    pair.peer.nothing(0.1)
    pair.alive()


def _message_of_size(channel: str, size: int, sequence: int) -> str:
    base = json.dumps(send_msg(channel, "", sequence), separators=(",", ":"))
    text = json.dumps(send_msg(channel, "x" * (size - len(base)), sequence), separators=(",", ":"))
    assert len(text.encode()) == size
    return text


def test_message_at_the_size_limit_is_accepted(pair: Pair) -> None:
    pair.sender.send(_message_of_size(pair.channel, MAX_MESSAGE_BYTES, 1))
    assert expect(pair.sender, "message", "ack")["data"]["metadata"]["sequence"] == 1
    got = expect(pair.peer, "message", "send")
    assert len(got["data"]["content"]) > MAX_MESSAGE_BYTES - 200


def test_message_over_the_size_limit(pair: Pair) -> None:
    pair.sender.send(_message_of_size(pair.channel, MAX_MESSAGE_BYTES + 1, 1))
    expect_error(pair.sender, "MESSAGE_TOO_LARGE")
    pair.sender.send(_message_of_size(pair.channel, 200_000, 2))
    expect_error(pair.sender, "MESSAGE_TOO_LARGE")
    pair.peer.nothing(0.1)
    pair.alive()


def test_fragmented_message_over_the_size_limit(pair: Pair) -> None:
    text = _message_of_size(pair.channel, MAX_MESSAGE_BYTES + 5000, 1)
    pair.sender.ws.send(iter([text[i : i + 8192] for i in range(0, len(text), 8192)]))
    expect_error(pair.sender, "MESSAGE_TOO_LARGE")
    pair.peer.nothing(0.1)
    pair.alive()


def test_frame_far_over_the_hard_limit_closes_1009(pair: Pair) -> None:
    with Client(pair.server.ws_url, token=pair.server.token("big"), channel=pair.channel) as c:
        expect(c, "connection", "connect")
        with contextlib.suppress(ConnectionClosed, OSError):  # closed while sending
            c.ws.send(_message_of_size(pair.channel, 8 * 1024 * 1024, 1))
        msgs, close = drain(c)
        assert close == 1009, (close, msgs)
        assert not [m for m in msgs if m.get("action") == "ack"], msgs
    pair.peer.nothing(0.1)
    pair.alive()
    pair.others_alive()


def test_invalid_utf8_text_frame_closes_1007(pair: Pair) -> None:
    with Client(pair.server.ws_url, token=pair.server.token("utf"), channel=pair.channel) as c:
        expect(c, "connection", "connect")
        bad = json.dumps(send_msg(pair.channel, "PLACEHOLDER", 1)).encode()
        c.ws.send(bad.replace(b"PLACEHOLDER", b"\xff\xfe\xc3("), text=True)
        msgs, close = drain(c)
        assert close == 1007, (close, msgs)
    pair.peer.nothing(0.1)
    pair.alive()
    pair.others_alive()


@pytest.mark.parametrize(
    "payload",
    [b"\xff", b'{"type": "\xed\xa0\x80"}', b'{"a":"\xc0\xaf"}', b"\xf4\x90\x80\x80"],
    ids=["ff", "surrogate", "overlong", "above-max"],
)
def test_invalid_utf8_raw(pair: Pair, payload: bytes) -> None:
    with _raw(pair) as raw:
        raw.send_frame(Op.TEXT, payload)
        assert raw.close_code() == 1007
    pair.alive()


def test_invalid_utf8_across_fragments_raw(pair: Pair) -> None:
    with _raw(pair) as raw:
        raw.send_frame(Op.TEXT, b'{"type":"system","action":"status","data":{"x":"\xc3', fin=False)
        raw.send_frame(Op.CONT, b'("}}', fin=True)
        assert raw.close_code() == 1007
    pair.alive()


# -- fragmentation -------------------------------------------------------------------------------


def test_fragmented_message_is_reassembled(pair: Pair) -> None:
    text = json.dumps(send_msg(pair.channel, "fragmented ✓ héllo " * 50, 900), ensure_ascii=False)
    pieces = [text[i : i + 17] for i in range(0, len(text), 17)]
    pair.sender.ws.send(iter(pieces))
    assert expect(pair.sender, "message", "ack")["data"]["metadata"]["sequence"] == 900
    assert expect(pair.peer, "message", "send")["data"]["content"] == "fragmented ✓ héllo " * 50
    pair.alive()


def test_fragments_split_inside_a_utf8_character_raw(pair: Pair) -> None:
    body = json.dumps(send_msg(pair.channel, "é✓€", 1), ensure_ascii=False).encode()
    cut = body.index("✓".encode()) + 1  # in the middle of a 3-byte character
    with _raw(pair) as raw:
        raw.send_frame(Op.TEXT, body[:cut], fin=False)
        raw.send_frame(Op.PING, b"between")  # control frames may come between fragments
        raw.send_frame(Op.CONT, body[cut : cut + 2], fin=False)
        raw.send_frame(Op.CONT, body[cut + 2 :], fin=True)
        seen: list[tuple[int, bytes]] = []
        while True:
            _, op, payload = raw.recv_frame()
            seen.append((op, payload))
            if op == Op.TEXT:
                msg = json.loads(payload)
                assert (msg["type"], msg["action"]) == ("message", "ack"), msg
                break
        assert (Op.PONG, b"between") in seen, seen
    for member in (pair.peer, pair.sender):
        got = expect(member, "message", "send")
        assert got["data"]["content"] == "é✓€"
        assert got["data"]["metadata"]["user_id"] == "raw"
    pair.alive()


# -- RFC 6455 violations: close 1002 -------------------------------------------------------------


@pytest.mark.parametrize("rsv", [4, 2, 1], ids=["rsv1", "rsv2", "rsv3"])
def test_reserved_bits_close_1002(pair: Pair, rsv: int) -> None:
    with _raw(pair) as raw:
        raw.send_frame(Op.TEXT, json.dumps(send_msg(pair.channel, "rsv", 1)).encode(), rsv=rsv)
        assert raw.close_code() == 1002
    pair.peer.nothing(0.1)
    pair.alive()


def test_continuation_without_start_closes_1002(pair: Pair) -> None:
    with _raw(pair) as raw:
        raw.send_frame(Op.CONT, json.dumps(send_msg(pair.channel, "cont", 1)).encode())
        assert raw.close_code() == 1002
    pair.peer.nothing(0.1)
    pair.alive()
    pair.others_alive()


def test_new_message_inside_a_fragmented_one_closes_1002(pair: Pair) -> None:
    with _raw(pair) as raw:
        raw.send_frame(Op.TEXT, b'{"type":"system",', fin=False)
        raw.send_frame(Op.TEXT, b'{"type":"system","action":"status"}')
        assert raw.close_code() == 1002
    pair.alive()


def test_unmasked_client_frame_closes_1002(pair: Pair) -> None:
    with _raw(pair) as raw:
        raw.send_frame(
            Op.TEXT, json.dumps(send_msg(pair.channel, "unmasked", 1)).encode(), mask=False
        )
        assert raw.close_code() == 1002
    pair.peer.nothing(0.1)
    pair.alive()


@pytest.mark.parametrize("opcode", [0x3, 0x7, 0xB, 0xF], ids=hex)
def test_unknown_opcode_closes_1002(pair: Pair, opcode: int) -> None:
    with _raw(pair) as raw:
        raw.send_frame(opcode, b"x")
        assert raw.close_code() == 1002
    pair.alive()


def test_fragmented_control_frame_closes_1002(pair: Pair) -> None:
    with _raw(pair) as raw:
        raw.send_frame(Op.PING, b"frag", fin=False)
        assert raw.close_code() == 1002
    pair.alive()


def test_control_frame_over_125_bytes_closes_1002(pair: Pair) -> None:
    with _raw(pair) as raw:
        raw.send_frame(Op.PING, b"p" * 126)
        assert raw.close_code() == 1002
    pair.alive()


def test_close_frame_with_invalid_code_closes_1002(pair: Pair) -> None:
    with _raw(pair) as raw:
        raw.send_frame(Op.CLOSE, (1005).to_bytes(2, "big"))
        assert raw.close_code() == 1002
    pair.alive()


def test_clean_close_is_echoed(pair: Pair) -> None:
    with _raw(pair) as raw:
        raw.send_frame(Op.CLOSE, (1000).to_bytes(2, "big") + b"bye")
        assert raw.close_code() == 1000
    pair.alive()


def test_binary_raw_frame_error_and_stays_open(pair: Pair) -> None:
    with _raw(pair) as raw:
        raw.send_frame(Op.BINARY, b"\x00\x01\x02")
        err = raw.recv_json()
        assert err["type"] == "error" and err["code"] == "INVALID_MESSAGE", err
        raw.send_json({"type": "system", "action": "status", "data": {}})
        msg = raw.recv_json()
        assert (msg["type"], msg["action"]) == ("system", "status"), msg
    pair.alive()
