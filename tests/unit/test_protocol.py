"""One home for each fact about the wire (docs/protocol.md): the channel-name rule and its
words, and every server message the control plane builds, byte for byte the documented
shape."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from aether_fast import protocol
from aether_fast._core import channel_name_ok, encode_ack, encode_publication
from aether_fast.protocol import CHANNEL_NAME_RE, NAME_RULE, valid_channel

ROOT = Path(__file__).resolve().parents[2]

# the allowed characters, their neighbours in ASCII, and a few that look like them
_EDGES = "AZaz09_.:-@[`{/ \t\n\x00\x7f\u00e9\u00c0\u0663\uff41\uff10\U0001d7d8"
_NAMES = st.text(alphabet=st.sampled_from(_EDGES), max_size=130) | st.text(max_size=130)


def _regex(name: object) -> bool:
    return isinstance(name, str) and CHANNEL_NAME_RE.fullmatch(name) is not None


@settings(max_examples=3000)
@given(_NAMES)
def test_compiled_name_check_agrees_with_the_regex(name: str) -> None:
    assert channel_name_ok(name) is _regex(name) is valid_channel(name)


def test_compiled_name_check_agrees_on_every_character_and_length() -> None:
    for cp in [*range(0x3000), 0xFF10, 0xFF21, 0x1D7D8, 0x10FFFF]:
        name = chr(cp)
        assert channel_name_ok(name) is _regex(name), repr(name)
    for n in (0, 1, 127, 128, 129, 1000):
        assert channel_name_ok("a" * n) is _regex("a" * n), n
    for other in (None, 3, b"chat", ["chat"], 1.5):
        assert channel_name_ok(other) is False and valid_channel(other) is False


def test_the_name_rule_is_worded_once() -> None:
    """Every error about a name says protocol.NAME_RULE; no module writes its own copy."""
    sources = [*ROOT.joinpath("aether_fast").rglob("*.py"), *ROOT.joinpath("ext").glob("*.p*")]
    holders = [
        str(p.relative_to(ROOT)) for p in sources if "1-128 characters" in p.read_text("utf-8")
    ]
    assert holders == ["aether_fast/protocol.py"], holders
    assert NAME_RULE == "1-128 characters of A-Z a-z 0-9 _ . : -"


# -- every server message, byte for byte the documented lines ----------------------------------


def _payload(frame: bytes) -> bytes:
    n = frame[1] & 0x7F
    return frame[2 + {126: 2, 127: 8}.get(n, 0) :]


def _rebuilt(msg: dict[str, Any]) -> bytes | None:
    """The documented server message `msg` made again by the encoder the server uses for it
    (None: a client's message, which the server never builds)."""
    kind, d = (msg["type"], msg.get("action")), msg.get("data", {})
    if kind == ("message", "send") and "offset" in d.get("metadata", {}):
        m = d["metadata"]
        return _payload(
            encode_publication(
                d["channel"],
                d["content"],
                m["sequence"],
                m["timestamp"],
                m["offset"],
                m["client_id"],
                m["user_id"],
            )
        )
    if kind == ("message", "ack"):
        m = d["metadata"]
        return _payload(encode_ack(d["channel"], m["sequence"], m["offset"], m["timestamp"]))
    if kind == ("connection", "connect") and "client_id" in d:
        if "offset" in d:
            return orjson.dumps(protocol.connected(**d))
        return orjson.dumps(protocol.presence("connect", **d))
    if kind == ("connection", "disconnect") and "client_id" in d:
        return orjson.dumps(protocol.disconnected(**d))
    if kind == ("connection", "refresh") and "expires_at" in d:
        return orjson.dumps(protocol.refreshed(**d))
    if kind == ("system", "status") and "message" in d:
        return orjson.dumps(protocol.status(**d))
    if kind == ("system", "broadcast") and "channel" in d:
        return orjson.dumps(protocol.broadcast(**d))
    if msg["type"] == "error":
        det = dict(msg["details"])
        component, reason = det.pop("component"), det.pop("reason")
        return orjson.dumps(
            protocol.error_body(msg["code"], msg["message"], component, reason, **det)
        )
    return None


def test_every_documented_server_message_is_what_its_encoder_makes() -> None:
    text = ROOT.joinpath("docs", "protocol.md").read_text("utf-8")
    lines = re.findall(r'^\s*(?:[←→] )?(\{"type":.*\})\s*$', text, re.MULTILINE)
    checked: set[tuple[str, str | None]] = set()
    for line in lines:
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a template with "…" in it, not a captured message
        rebuilt = _rebuilt(msg)
        if rebuilt is not None:
            assert rebuilt.decode() == line
            checked.add((msg["type"], msg.get("action")))
    # each kind of server message is documented, and checked, at least once
    assert checked >= {
        ("message", "send"),
        ("message", "ack"),
        ("connection", "connect"),
        ("connection", "disconnect"),
        ("connection", "refresh"),
        ("system", "status"),
        ("system", "broadcast"),
        ("error", None),
    }, checked


def test_the_control_plane_writes_no_message_of_its_own() -> None:
    """node.py and operations.py send what protocol.py's builders make; neither (nor
    status.py) spells out a message shape."""
    read = {n: ROOT.joinpath("aether_fast", n).read_text("utf-8") for n in CONTROL_PLANE}
    for name, source in read.items():
        assert '"type":' not in source, name
    assert "protocol.status(" in read["node.py"] and "protocol.connected(" in read["node.py"]
    assert "protocol.disconnected(" in read["operations.py"]
    assert "protocol.broadcast(" in read["operations.py"]


CONTROL_PLANE = ("node.py", "operations.py", "status.py")
