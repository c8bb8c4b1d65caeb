"""logs.py: line shape, levels, library loggers and redaction of credentials."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from aether_fast.logs import LIBRARY_LOGGERS, LOGGER_NAME, log, redact, setup_logging

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiJhbGljZSIsImV4cCI6MTcwMDAwMDAwMH0"
    ".c2lnbmF0dXJlLWJ5dGVz_-x"
)
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    names = (LOGGER_NAME, *LIBRARY_LOGGERS)
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in names}
    out = io.StringIO()
    setup_logging("debug", out)
    yield out
    for n, (level, handlers) in saved.items():
        logger = logging.getLogger(n)
        logger.setLevel(level)
        logger.handlers[:] = handlers


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_shape(stream: io.StringIO) -> None:
    log("info", "connection_opened", "session", client_id="c1", channels=["a", "b"], n=3)
    (line,) = lines(stream)
    assert set(line) == {"timestamp", "level", "event", "data"}
    assert TIMESTAMP.match(line["timestamp"])
    assert line["level"] == "info"
    assert line["event"] == "connection_opened"
    assert line["data"] == {
        "component": "session",
        "details": {"client_id": "c1", "channels": ["a", "b"], "n": 3},
    }
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1


@pytest.mark.parametrize(
    ("level", "name"), [("debug", "debug"), ("info", "info"), ("warn", "warn"), ("error", "error")]
)
def test_levels(stream: io.StringIO, level: str, name: str) -> None:
    log(level, "e", "c")
    assert lines(stream)[0]["level"] == name


def test_warning_alias_and_unknown_level(stream: io.StringIO) -> None:
    log("warning", "e", "c")
    assert lines(stream)[0]["level"] == "warn"
    with pytest.raises(ValueError):
        log("loud", "e", "c")
    with pytest.raises(ValueError):
        setup_logging("loud", stream)


def test_disabled_level_writes_nothing_and_is_cheap(stream: io.StringIO) -> None:
    setup_logging("warn", stream)

    class Exploding:
        def __repr__(self) -> str:
            raise AssertionError("formatted while disabled")

        __str__ = __repr__

    log("info", "skipped", "c", obj=Exploding())
    log("debug", "skipped", "c")
    log("warn", "kept", "c")
    assert [line["event"] for line in lines(stream)] == ["kept"]


def test_setup_twice_does_not_duplicate(stream: io.StringIO) -> None:
    setup_logging("info", stream)
    setup_logging("info", stream)
    log("info", "once", "c")
    assert len(lines(stream)) == 1


def test_unserialisable_values_become_text(stream: io.StringIO) -> None:
    log("info", "e", "c", obj=object(), when=1.5, nothing=None, flag=True, raw=b"bytes")
    details = lines(stream)[0]["data"]["details"]
    assert details["obj"].startswith("<object object")
    assert details["when"] == 1.5 and details["nothing"] is None and details["flag"] is True
    assert details["raw"] == "bytes"


def test_library_loggers_at_warn_and_above(stream: io.StringIO) -> None:
    logging.getLogger("asyncio").info("chatty")
    logging.getLogger("asyncio").error("Task exception was never retrieved")
    logging.getLogger("picows").warning("bad frame from %s", "1.2.3.4")
    got = lines(stream)
    assert [(g["level"], g["data"]["component"]) for g in got] == [
        ("error", "asyncio"),
        ("warn", "picows"),
    ]
    assert got[0]["event"] == "library_log"
    assert got[1]["data"]["details"] == {"message": "bad frame from 1.2.3.4"}


def test_exceptions_are_included(stream: io.StringIO) -> None:
    try:
        raise RuntimeError(f"boom with ?token={JWT}")
    except RuntimeError:
        logging.getLogger("asyncio").exception("Unhandled error in callback")
    (line,) = lines(stream)
    exception = line["data"]["details"]["exception"]
    assert "RuntimeError: boom" in exception and "Traceback" in exception
    assert JWT not in stream.getvalue()


def test_plain_calls_on_our_logger(stream: io.StringIO) -> None:
    logging.getLogger("aether_fast.http").warning("origin_refused")
    (line,) = lines(stream)
    assert line["event"] == "origin_refused"
    assert line["data"] == {"component": "aether_fast.http", "details": {}}


# -- redaction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "token",
        "Token",
        "JWT",
        "authorization",
        "Authorization",
        "password",
        "secret",
        "admin_token",
        "ADMIN_TOKEN",
        "refresh_token",
        "jwt_secret",
    ],
)
def test_secret_keys(stream: io.StringIO, key: str) -> None:
    log("warn", "auth_failed", "auth", **{key: "hunter2", "user": "bob"})
    details = lines(stream)[0]["data"]["details"]
    assert details == {key: "***", "user": "bob"}
    assert "hunter2" not in stream.getvalue()


def test_jwt_shaped_values(stream: io.StringIO) -> None:
    log("warn", "auth_failed", "auth", reason=f"bad {JWT} here", header=f"Bearer {JWT}")
    text = stream.getvalue()
    assert JWT not in text and "eyJ" not in text
    details = lines(stream)[0]["data"]["details"]
    assert details["reason"] == "bad *** here"
    assert details["header"] == "Bearer ***"


def test_query_strings(stream: io.StringIO) -> None:
    log(
        "info",
        "upgrade",
        "http",
        path="/ws?client_id=c1&token=opaque-value&channel=main",
        url="wss://h/ws?access_token=abc123#x",
        other="password=pw1 and secret=s3",
        form="csrf_token=t1&client_secret=c2&keep=1",
    )
    details = lines(stream)[0]["data"]["details"]
    assert details["path"] == "/ws?client_id=c1&token=***&channel=main"
    assert details["url"] == "wss://h/ws?access_token=***#x"
    assert details["other"] == "password=*** and secret=***"
    assert details["form"] == "csrf_token=***&client_secret=***&keep=1"


def test_bearer_opaque(stream: io.StringIO) -> None:
    log("warn", "admin_refused", "http", header="Bearer static-admin-token")
    assert "static-admin-token" not in stream.getvalue()


def test_nested(stream: io.StringIO) -> None:
    log(
        "info",
        "e",
        "c",
        request={"headers": {"Authorization": "Bearer x", "Host": "h"}, "query": {"token": JWT}},
        items=[{"password": "p"}, (JWT, "ok"), {"deeper": [{"secret": "s"}]}],
        absent={"token": None},
    )
    details = lines(stream)[0]["data"]["details"]
    assert details["request"] == {
        "headers": {"Authorization": "***", "Host": "h"},
        "query": {"token": "***"},
    }
    assert details["items"] == [{"password": "***"}, ["***", "ok"], {"deeper": [{"secret": "***"}]}]
    assert details["absent"] == {"token": None}
    assert JWT not in stream.getvalue()


def test_event_is_redacted_too(stream: io.StringIO) -> None:
    log("info", f"weird {JWT}", "c")
    assert JWT not in stream.getvalue()


def test_redact_leaves_ordinary_values() -> None:
    value = {"client_id": "c1", "n": 1, "tokens_used": 3, "channel": "eyJ-not-a-jwt"}
    assert redact(value) == value
    assert redact("token_count=3") == "token_count=3"


def test_throttle_one_line_a_second_per_kind_and_a_summary(stream: io.StringIO) -> None:
    from aether_fast.logs import Throttle

    t = Throttle("security", "held_back")
    for i in range(100):
        t.log_at(10.0 + i / 1000, "warn", "auth_failed", None, {"peer": f"p{i}", "reason": "x"})
    t.log_at(10.05, "warn", "rate_limited", None, {"peer": "q"})
    got = lines(stream)
    assert [o["event"] for o in got] == ["auth_failed", "rate_limited"]
    t.flush(now=10.5)  # too soon: the oldest held line is not a second old
    t.flush(now=11.001)
    t.log_at(11.002, "warn", "auth_failed", None, {})  # a second after the first: written
    t.log_at(11.6, "warn", "auth_failed", None, {})  # held
    t.flush(now=12.0)  # too soon
    t.flush(now=12.6)
    t.flush(now=13.0)  # nothing held: nothing written
    summaries = [o["data"]["details"] for o in lines(stream) if o["event"] == "held_back"]
    assert [s["suppressed"] for s in summaries] == [{"auth_failed": 99}, {"auth_failed": 1}]
    assert len(summaries[0]["peers"]) == 10  # a sample, bounded
    assert [o["event"] for o in lines(stream)].count("auth_failed") == 2


def test_throttle_is_bounded_in_kinds_and_detail_size(stream: io.StringIO) -> None:
    from aether_fast.logs import DETAIL_CHARS, Throttle

    t = Throttle("security", "held_back", max_kinds=4)
    for i in range(1000):
        t.log_at(1.0, "warn", "refused", f"k{i % 500}", {"origin": "o" * 10_000})
    t.flush(now=5.0)
    assert len(t._last) <= 5
    got = lines(stream)
    assert len(got) == 6  # k0..k3, other, one summary
    assert got[-1]["data"]["details"]["suppressed"] == {f"k{i}": 1 for i in range(4)} | {
        "other": 991  # 1000 = 5 written + 4 + 991 held
    }
    assert all(len(o["data"]["details"].get("origin", "")) <= DETAIL_CHARS + 3 for o in got)
