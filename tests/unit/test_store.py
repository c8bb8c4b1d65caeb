"""stores/base.py: ChannelConfig validation; stores/sqlite.py: the SQLite ChannelStore (files
under tmp_path)."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from aether_fast.config import Config, load_config
from aether_fast.protocol import valid_channel
from aether_fast.stores.base import (
    ChannelConfig,
    FieldError,
    StoreError,
    default_channel_config,
    parse_channel_config,
)
from aether_fast.stores.sqlite import DB_FILE, ChannelStore
from tests.unit.support import cfg, open_store

CONFIG = load_config({"JWT_SECRET": "k" * 32})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChannelStore]:
    s = open_store(tmp_path / "data")
    yield s
    s.close()


def connect(path: object) -> closing[sqlite3.Connection]:
    # sqlite3's own context manager commits but does not close.
    return closing(sqlite3.connect(str(path), isolation_level=None))


# -- names and parsing -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "chat.lobby", "room:42", "x_y-z", "A" * 128])
def test_valid_names(name: str) -> None:
    assert valid_channel(name)


@pytest.mark.parametrize("name", ["", "A" * 129, "with space", "slash/no", "é", None, 3, ["a"]])
def test_invalid_names(name: object) -> None:
    assert not valid_channel(name)


def test_to_json() -> None:
    assert cfg().to_json() == {
        "name": "chat",
        "max_connections": 10,
        "message_rate_limit": 5.0,
        "require_auth": True,
        "history_size": 50,
        "presence": False,
        "compression": True,
    }


def test_defaults_from_config() -> None:
    config = load_config(
        {
            "CHANNEL_DEFAULT_REQUIRE_AUTH": "false",
            "CHANNEL_DEFAULT_MAX_CONNECTIONS": "7",
            "CHANNEL_DEFAULT_MESSAGE_RATE_LIMIT": "2.5",
            "CHANNEL_DEFAULT_PRESENCE": "true",
            "HISTORY_SIZE": "9",
        }
    )
    expected = ChannelConfig("c", 7, 2.5, False, 9, True)
    assert default_channel_config("c", config) == expected
    assert parse_channel_config({"name": "c"}, config) == expected


def test_parse_full_body() -> None:
    body = {
        "name": "chat",
        "max_connections": 3,
        "message_rate_limit": 1,
        "require_auth": False,
        "history_size": 0,
        "presence": True,
    }
    parsed = parse_channel_config(body, CONFIG)
    assert parsed == ChannelConfig("chat", 3, 1.0, False, 0, True)
    assert isinstance(parsed.message_rate_limit, float)


def test_parse_update_keeps_existing_values() -> None:
    existing = cfg(max_connections=99, presence=True, history_size=7)
    parsed = parse_channel_config({"name": "chat", "require_auth": False}, CONFIG, existing)
    assert parsed == ChannelConfig("chat", 99, 5.0, False, 7, True)
    with pytest.raises(FieldError) as info:
        parse_channel_config({"name": "other"}, CONFIG, existing)
    assert info.value.field == "name"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ("chat", "body"),
        (None, "body"),
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": 5}, "name"),
        ({"name": "bad name"}, "name"),
        ({"name": "c", "colour": "red"}, "colour"),
        ({"name": "c", "max_connections": -1}, "max_connections"),
        ({"name": "c", "max_connections": 1.5}, "max_connections"),
        ({"name": "c", "max_connections": 2.0}, "max_connections"),
        ({"name": "c", "max_connections": True}, "max_connections"),
        ({"name": "c", "max_connections": "3"}, "max_connections"),
        ({"name": "c", "max_connections": None}, "max_connections"),
        ({"name": "c", "max_connections": 2**31}, "max_connections"),
        ({"name": "c", "message_rate_limit": -0.1}, "message_rate_limit"),
        ({"name": "c", "message_rate_limit": "5"}, "message_rate_limit"),
        ({"name": "c", "message_rate_limit": False}, "message_rate_limit"),
        ({"name": "c", "message_rate_limit": float("nan")}, "message_rate_limit"),
        ({"name": "c", "message_rate_limit": float("inf")}, "message_rate_limit"),
        ({"name": "c", "require_auth": 1}, "require_auth"),
        ({"name": "c", "require_auth": "true"}, "require_auth"),
        ({"name": "c", "require_auth": None}, "require_auth"),
        ({"name": "c", "history_size": 100001}, "history_size"),
        ({"name": "c", "history_size": -1}, "history_size"),
        ({"name": "c", "history_size": True}, "history_size"),
        ({"name": "c", "presence": 0}, "presence"),
        ({"name": "c", "presence": "yes"}, "presence"),
    ],
)
def test_parse_errors_name_the_field(body: object, field: str) -> None:
    with pytest.raises(FieldError) as info:
        parse_channel_config(body, CONFIG)
    assert info.value.field == field
    assert info.value.reason
    assert str(info.value) == f"{field}: {info.value.reason}"
    assert isinstance(info.value, ValueError)


def test_history_size_bounds_inclusive() -> None:
    assert (
        parse_channel_config({"name": "c", "history_size": 100000}, CONFIG).history_size == 100000
    )


# -- the store -------------------------------------------------------------------------------


def test_open_creates_directory_and_file(tmp_path: Path) -> None:
    data = tmp_path / "a" / "b"
    s = ChannelStore(str(data))
    s.open()
    assert (data / DB_FILE).is_file()
    assert s.list() == []
    s.close()
    s.close()  # idempotent


def test_wal_mode(store: ChannelStore) -> None:
    with connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_put_get_list_delete(store: ChannelStore) -> None:
    assert store.get("chat") is None
    assert store.put(cfg("chat")) is True
    assert store.put(cfg("alpha", presence=True)) is True
    assert store.get("chat") == cfg("chat")
    assert store.put(cfg("chat", max_connections=0, require_auth=False)) is False
    assert store.get("chat") == cfg("chat", max_connections=0, require_auth=False)
    assert [c.name for c in store.list()] == ["alpha", "chat"]
    assert store.delete("chat") is True
    assert store.delete("chat") is False
    assert store.get("chat") is None
    assert store.list() == [cfg("alpha", presence=True)]


def test_persists_across_reopen(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    open_store(
        data, cfg("chat", message_rate_limit=0.25), cfg("news", require_auth=False, presence=True)
    ).close()
    again = ChannelStore(data)
    again.open()
    assert again.list() == [
        cfg("chat", message_rate_limit=0.25),
        cfg("news", require_auth=False, presence=True),
    ]
    again.close()


@pytest.mark.parametrize("known_limit", [50_000, 1])
def test_reopened_store_answers_from_memory_when_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, known_limit: int
) -> None:
    """Stored configs are read once at open (when there are at most KNOWN_CONFIGS): a join
    of an unconfigured channel costs no query. Past the limit every answer still holds."""
    monkeypatch.setattr("aether_fast.stores.sqlite.KNOWN_CONFIGS", known_limit)
    data = str(tmp_path / "data")
    open_store(data, cfg("chat"), cfg("news")).close()
    again = ChannelStore(data)
    again.open()
    queries: list[str] = []
    again._db().set_trace_callback(queries.append)
    assert again.get("chat") == cfg("chat")
    assert again.get("lobby") is None
    assert again.get("lobby") is None
    again.put(cfg("lobby", presence=True))
    assert again.get("lobby") == cfg("lobby", presence=True)
    assert again.delete("news") is True
    assert again.get("news") is None
    reads = [q for q in queries if q.lstrip().upper().startswith("SELECT")]
    if known_limit > 2:
        assert reads == []
    else:
        assert len(reads) == 2  # "chat" and "lobby" once each, then remembered
    again.close()


def test_use_before_open_is_an_error(tmp_path: Path) -> None:
    s = ChannelStore(str(tmp_path))
    with pytest.raises(StoreError, match="not open"):
        s.get("x")
    s.open()
    s.close()
    with pytest.raises(StoreError, match="not open"):
        s.put(cfg())


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).write_bytes(b"this is not a database at all" * 200)
    s = ChannelStore(str(tmp_path))
    with pytest.raises(StoreError) as info:
        s.open()
    message = str(info.value)
    assert str(tmp_path / DB_FILE) in message and "not an SQLite database" in message
    assert "\n" not in message
    # nothing half-open
    with pytest.raises(StoreError, match="not open"):
        s.list()


def test_damaged_database_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path, *(cfg(f"channel.{i:04d}") for i in range(400))).close()
    path = tmp_path / DB_FILE
    data = bytearray(path.read_bytes())
    assert len(data) > 4096 * 3
    data[4096 + 8 : 4096 * 3] = b"\xa5" * (4096 * 2 - 8)  # scribble over pages 2 and 3
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt"):
        ChannelStore(str(tmp_path)).open()


def test_data_dir_under_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create data directory") as info:
        ChannelStore(str(blocker / "data")).open()
    assert str(blocker / "data") in str(info.value)


def test_data_dir_is_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match=str(blocker)):
        ChannelStore(str(blocker)).open()


def test_database_path_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).mkdir()
    with pytest.raises(StoreError, match=DB_FILE):
        ChannelStore(str(tmp_path)).open()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    with connect(tmp_path / DB_FILE) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(StoreError, match="newer"):
        ChannelStore(str(tmp_path)).open()


def test_schema_1_gets_the_compression_column(tmp_path: Path) -> None:
    """A DATA_DIR written before channel configs had `compression` opens; its channels
    read as compression on, and a change of the switch is stored."""
    with connect(tmp_path / DB_FILE) as conn:
        conn.execute(
            "CREATE TABLE channels (name TEXT PRIMARY KEY NOT NULL, max_connections INTEGER "
            "NOT NULL, message_rate_limit REAL NOT NULL, require_auth INTEGER NOT NULL, "
            "history_size INTEGER NOT NULL, presence INTEGER NOT NULL) WITHOUT ROWID"
        )
        conn.execute("INSERT INTO channels VALUES ('old', 3, 1.5, 1, 7, 0)")
        conn.execute("PRAGMA user_version=1")
    store = ChannelStore(str(tmp_path))
    store.open()
    old = store.get("old")
    assert old is not None and old.compression is True and old.history_size == 7
    store.put(dataclasses.replace(old, compression=False))
    store.close()
    store = ChannelStore(str(tmp_path))
    store.open()
    again = store.get("old")
    assert again is not None and again.compression is False
    store.close()


def test_foreign_table_is_refused(tmp_path: Path) -> None:
    with connect(tmp_path / DB_FILE) as conn:
        conn.execute("CREATE TABLE channels (name TEXT, colour TEXT)")
    with pytest.raises(StoreError, match="schema"):
        ChannelStore(str(tmp_path)).open()


def test_backup_and_restore(tmp_path: Path) -> None:
    s = open_store(tmp_path / "data", cfg("chat"), cfg("news", history_size=0))
    backup = tmp_path / "backup.sqlite3"
    s.backup(str(backup))
    assert backup.is_file()
    assert not (tmp_path / "backup.sqlite3-wal").exists()

    s.delete("chat")
    s.put(cfg("later"))
    s.restore(str(backup))
    assert [c.name for c in s.list()] == ["chat", "news"]
    assert s.get("news") == cfg("news", history_size=0)
    # still writable and in WAL mode after a restore
    assert s.put(cfg("after")) is True
    s.close()
    with connect(s.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened = open_store(tmp_path / "data")
    assert [c.name for c in reopened.list()] == ["after", "chat", "news"]
    reopened.close()


def test_restore_refuses_bad_backups_and_keeps_data(tmp_path: Path, store: ChannelStore) -> None:
    store.put(cfg("keep"))
    missing = tmp_path / "missing.sqlite3"
    with pytest.raises(StoreError, match="no such backup"):
        store.restore(str(missing))
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(StoreError, match=str(garbage)):
        store.restore(str(garbage))
    foreign = tmp_path / "foreign.sqlite3"
    with connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a channel store backup"):
        store.restore(str(foreign))
    with pytest.raises(StoreError, match="live database"):
        store.restore(store.path)
    with pytest.raises(StoreError, match="live database"):
        store.backup(store.path)
    assert [c.name for c in store.list()] == ["keep"]


def test_backup_to_unwritable_place(tmp_path: Path, store: ChannelStore) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match=str(blocker / "b.sqlite3")):
        store.backup(str(blocker / "b.sqlite3"))


def test_store_config_type_is_config() -> None:
    assert isinstance(CONFIG, Config)
