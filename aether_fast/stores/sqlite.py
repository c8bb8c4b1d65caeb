"""The embedded channel store: channel configs in SQLite under `DATA_DIR` (one worker).

The store writes synchronously, one small transaction per REST call or first join, in
`DATA_DIR/channels.sqlite3` (WAL mode); any SQLite or filesystem failure surfaces as one
StoreError naming the file and the cause, never as a half-open store. An open store holds
`DATA_DIR/channels.lock` shared; `aether-fast restore` takes it exclusive (DataDirLock), so a
restore never rewrites the store under a running server. Validation and the `Store`
contract are in `base.py`.
"""

from __future__ import annotations

import builtins
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from aether_fast.stores.base import ChannelConfig, StoreError, StoreLocked

DB_FILE: Final = "channels.sqlite3"
LOCK_FILE: Final = "channels.lock"
SCHEMA_VERSION: Final = 2

_COLUMNS: Final = (
    "name",
    "max_connections",
    "message_rate_limit",
    "require_auth",
    "history_size",
    "presence",
    "compression",
)
#: schema 1 (before `compression`): opened, the column is added (on by default)
_COLUMNS_V1: Final = _COLUMNS[:-1]

_CREATE: Final = """
CREATE TABLE IF NOT EXISTS channels (
    name TEXT PRIMARY KEY NOT NULL,
    max_connections INTEGER NOT NULL,
    message_rate_limit REAL NOT NULL,
    require_auth INTEGER NOT NULL,
    history_size INTEGER NOT NULL,
    presence INTEGER NOT NULL,
    compression INTEGER NOT NULL DEFAULT 1
) WITHOUT ROWID
"""

_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM channels"


def _row(row: tuple[Any, ...]) -> ChannelConfig:
    name, max_conn, rate, require_auth, history, presence, compression = row
    return ChannelConfig(
        name=str(name),
        max_connections=int(max_conn),
        message_rate_limit=float(rate),
        require_auth=bool(require_auth),
        history_size=int(history),
        presence=bool(presence),
        compression=bool(compression),
    )


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)


class DataDirLock:
    """An advisory lock (flock) on `DATA_DIR/channels.lock`.

    A server holds it shared for as long as its store is open, and so does a backup taken
    while it runs; `aether-fast restore` holds it exclusive. So a restore never rewrites the
    store under a running server and a server never starts in the middle of a restore. The
    kernel drops the lock when its process exits, however it exits: nothing goes stale.
    """

    def __init__(self, data_dir: str) -> None:
        self.path = os.path.join(data_dir, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, exclusive: bool = False) -> None:
        """Take the lock without waiting, or raise StoreLocked (held by another process in a
        conflicting mode) or StoreError (the lock file cannot be created)."""
        if self._fd is not None:
            return
        try:
            # Read-only is enough for flock, and works on a lock file someone else created.
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create lock file: {_describe(e)}") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if exclusive:
                raise StoreLocked(
                    f"{os.path.dirname(self.path)}: in use by a running aether-fast (it holds "
                    f"{self.path}); stop the server first"
                ) from None
            raise StoreLocked(
                f"{os.path.dirname(self.path)}: locked by `aether-fast restore` (it holds "
                f"{self.path} exclusively); start the server when the restore is done"
            ) from None
        except OSError as e:
            os.close(fd)
            raise StoreError(f"{self.path}: cannot lock: {_describe(e)}") from None
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock


#: Names whose `get` answer ChannelStore remembers before it starts over.
KNOWN_CONFIGS = 50_000


class ChannelStore:
    """Channel configs in `data_dir/channels.sqlite3`. Call `open()` before anything else.

    `open()` takes DATA_DIR's lock shared and `close()` drops it, unless the caller passes a
    `lock` it already holds (restore holds it exclusive and keeps it across the store's life).
    """

    def __init__(self, data_dir: str, *, lock: DataDirLock | None = None) -> None:
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, DB_FILE)
        self._conn: sqlite3.Connection | None = None
        self._own_lock = lock is None
        self._lock = lock if lock is not None else DataDirLock(data_dir)
        #: what `get` answered, by name (None: not stored). This process is the only writer
        #: (WORKERS > 1 needs the Redis store; restore takes the lock exclusively), so the
        #: copy stays exact; it spares every join of an unconfigured channel a query.
        self._known: dict[str, ChannelConfig | None] = {}
        #: True while `_known` holds every stored config (read at open when there are at
        #: most KNOWN_CONFIGS): a name it lacks is not stored, with no query at all
        self._complete = False

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory and database if needed and check them.

        After calling this method the store is readable and writable, or StoreError was
        raised (corrupt or foreign file, unwritable directory or file) and nothing is open.
        """
        if self._conn is not None:
            return
        if os.path.exists(self.data_dir) and not os.path.isdir(self.data_dir):
            raise StoreError(f"{self.data_dir}: DATA_DIR exists and is not a directory")
        try:
            os.makedirs(self.data_dir, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"{self.data_dir}: cannot create data directory: {_describe(e)}"
            ) from None
        if self._own_lock:
            self._lock.acquire(exclusive=False)
        try:
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        except sqlite3.Error as e:
            self._release()
            raise StoreError(f"{self.path}: cannot open: {_describe(e)}") from None
        self._conn = conn
        try:
            self._check_and_prepare(conn)
            self._read_known()
        except (sqlite3.Error, StoreError) as e:
            self._conn = None
            conn.close()
            self._release()
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"{self.path}: {self._explain(e)}") from None

    def _read_known(self) -> None:
        """Hold every stored config in memory when there are at most KNOWN_CONFIGS."""
        self._known.clear()
        self._complete = False
        try:
            (count,) = self._db().execute("SELECT COUNT(*) FROM channels").fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: read failed: {self._explain(e)}") from None
        if int(count) > KNOWN_CONFIGS:
            return
        try:
            stored = self.list()
        except (ValueError, TypeError):
            return  # a row that cannot be read: each name is answered by a query, as before
        self._known.update((c.name, c) for c in stored)
        self._complete = True

    def _release(self) -> None:
        if self._own_lock:
            self._lock.release()

    def _explain(self, error: sqlite3.Error) -> str:
        text = str(error)
        if isinstance(error, sqlite3.DatabaseError) and (
            "not a database" in text or "malformed" in text
        ):
            return f"corrupt or not an SQLite database ({text}); restore it from a backup"
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            return f"not writable ({text})"
        return text

    def _check_and_prepare(self, conn: sqlite3.Connection) -> None:
        (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
        # Config writes are rare and must survive a crash: pay for a full sync.
        conn.execute("PRAGMA synchronous=FULL")
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise StoreError(
                f"{self.path}: corrupt database ({'; '.join(problems[:3])}); "
                "restore it from a backup"
            )
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if int(version) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: written by a newer aether-fast (schema {version} > {SCHEMA_VERSION})"
            )
        _check_schema(self.path, conn)
        # This write also proves the file and directory are writable.
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_CREATE)
            columns = [str(r[1]) for r in conn.execute("PRAGMA table_info(channels)")]
            if tuple(columns) == _COLUMNS_V1:
                conn.execute(
                    "ALTER TABLE channels ADD COLUMN compression INTEGER NOT NULL DEFAULT 1"
                )
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the database; the store may be opened again."""
        conn, self._conn = self._conn, None
        self._known.clear()
        self._complete = False
        if conn is not None:
            conn.close()
        self._release()

    # -- queries -----------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self.path}: store is not open")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: write failed: {self._explain(e)}") from None

    def get(self, name: str) -> ChannelConfig | None:
        """The stored config of `name`, or None."""
        if name in self._known:
            return self._known[name]
        if self._complete:
            return None
        try:
            row = self._db().execute(f"{_SELECT} WHERE name = ?", (name,)).fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: read failed: {self._explain(e)}") from None
        cfg = None if row is None else _row(row)
        if len(self._known) >= KNOWN_CONFIGS:
            self._known.clear()
        self._known[name] = cfg
        return cfg

    def list(self) -> builtins.list[ChannelConfig]:
        """Every stored config, sorted by name."""
        try:
            rows = self._db().execute(f"{_SELECT} ORDER BY name").fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: read failed: {self._explain(e)}") from None
        return [_row(r) for r in rows]

    def put(self, cfg: ChannelConfig) -> bool:
        """Store `cfg`; True if the channel was created, False if it was updated."""
        values = (
            cfg.name,
            cfg.max_connections,
            cfg.message_rate_limit,
            int(cfg.require_auth),
            cfg.history_size,
            int(cfg.presence),
            int(cfg.compression),
        )
        with self._write() as conn:
            created = (
                conn.execute(
                    f"INSERT OR IGNORE INTO channels ({', '.join(_COLUMNS)}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    values,
                ).rowcount
                == 1
            )
            if not created:
                conn.execute(
                    "UPDATE channels SET max_connections = ?, message_rate_limit = ?, "
                    "require_auth = ?, history_size = ?, presence = ?, compression = ? "
                    "WHERE name = ?",
                    (*values[1:], cfg.name),
                )
        self._known[cfg.name] = cfg
        if len(self._known) > KNOWN_CONFIGS:
            self._complete = False
        return created

    def delete(self, name: str) -> bool:
        """Remove `name`; True if it existed."""
        with self._write() as conn:
            existed = conn.execute("DELETE FROM channels WHERE name = ?", (name,)).rowcount == 1
        if self._complete:
            self._known.pop(name, None)
        else:
            self._known[name] = None
        return existed

    # -- backup ------------------------------------------------------------------------------

    def _not_self(self, path: str) -> None:
        if os.path.realpath(path) == os.path.realpath(self.path):
            raise StoreError(f"{path}: is the live database itself")

    def backup(self, path: str) -> None:
        """Copy the live database to `path` (an SQLite file) with SQLite's online backup."""
        conn = self._db()
        self._not_self(path)
        try:
            dest = sqlite3.connect(path)
        except sqlite3.Error as e:
            raise StoreError(f"{path}: cannot create backup: {_describe(e)}") from None
        try:
            conn.backup(dest)
            # A backup is one self-contained file: no -wal/-shm beside it.
            dest.execute("PRAGMA journal_mode=DELETE")
        except sqlite3.Error as e:
            raise StoreError(f"{path}: backup failed: {self._explain(e)}") from None
        finally:
            dest.close()

    def restore(self, path: str) -> None:
        """Replace every stored config with those of the backup at `path`.

        The backup is checked first (a readable SQLite file of our schema); a bad one raises
        StoreError and leaves the store unchanged.
        """
        conn = self._db()
        self._not_self(path)
        src = _open_backup(path)
        self._known.clear()
        self._complete = False
        try:
            src.backup(conn)
        except sqlite3.Error as e:
            raise StoreError(f"{path}: restore failed: {self._explain(e)}") from None
        finally:
            src.close()
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: {self._explain(e)}") from None
        self._read_known()


def _open_backup(path: str) -> sqlite3.Connection:
    """A read-only connection to the backup at `path`, checked: an intact SQLite file of our
    schema. Raises StoreError otherwise; the caller closes the connection."""
    if not os.path.isfile(path):
        raise StoreError(f"{path}: no such backup file")
    try:
        src = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot open backup: {_describe(e)}") from None
    try:
        problems = [str(r[0]) for r in src.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise StoreError(f"{path}: corrupt backup ({'; '.join(problems[:3])})")
        (version,) = src.execute("PRAGMA user_version").fetchone()
        if int(version) != SCHEMA_VERSION:
            raise StoreError(f"{path}: not a channel store backup (schema {version})")
        _check_schema(path, src, required=True)
    except sqlite3.Error as e:
        src.close()
        raise StoreError(f"{path}: corrupt or not an SQLite database ({e})") from None
    except StoreError:
        src.close()
        raise
    return src


def read_backup(path: str) -> builtins.list[ChannelConfig]:
    """The channel configs in the backup at `path`, after the checks `restore` makes."""
    src = _open_backup(path)
    try:
        return [_row(r) for r in src.execute(f"{_SELECT} ORDER BY name").fetchall()]
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot read backup: {e}") from None
    finally:
        src.close()


def _check_schema(path: str, conn: sqlite3.Connection, *, required: bool = False) -> None:
    columns = [str(r[1]) for r in conn.execute("PRAGMA table_info(channels)").fetchall()]
    if not columns and not required:
        return
    if tuple(columns) not in (_COLUMNS, _COLUMNS_V1):
        raise StoreError(f"{path}: unexpected schema of table channels: {columns}")
