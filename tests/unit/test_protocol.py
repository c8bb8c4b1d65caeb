"""One home for each fact about the wire (docs/protocol.md): the channel-name rule and its
words, and every server message the control plane builds, byte for byte the documented
shape."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from aether_fast._core import channel_name_ok
from aether_fast.protocol import CHANNEL_NAME_RE, NAME_RULE, valid_channel

ROOT = Path(__file__).resolve().parents[2]

# the allowed characters, their neighbours in ASCII, and a few that look like them
_EDGES = "AZaz09_.:-@[`{/ \t\n\x00\x7féÀ٣ａ０𝟘"
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
