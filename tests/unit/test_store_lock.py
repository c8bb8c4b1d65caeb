"""DATA_DIR's lock (a server's store holds it shared, `aether-fast restore` exclusive) and
`read_backup`, the check a restore makes before it touches anything."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from aether_fast.stores.base import StoreError, StoreLocked
from aether_fast.stores.sqlite import DB_FILE, LOCK_FILE, ChannelStore, DataDirLock, read_backup
from tests.conftest import ROOT
from tests.unit.support import cfg, open_store


def test_open_store_blocks_an_exclusive_lock_until_closed(tmp_path: Path) -> None:
    store = ChannelStore(str(tmp_path))
    store.open()
    assert (tmp_path / LOCK_FILE).is_file()
    lock = DataDirLock(str(tmp_path))
    with pytest.raises(StoreLocked, match="running aether-fast") as info:
        lock.acquire(exclusive=True)
    assert str(tmp_path / LOCK_FILE) in str(info.value)
    assert not lock.held
    # readers share: a backup while the server runs
    reader = ChannelStore(str(tmp_path))
    reader.open()
    reader.close()
    store.close()
    lock.acquire(exclusive=True)
    assert lock.held
    lock.release()


def test_exclusive_lock_keeps_a_server_from_opening(tmp_path: Path) -> None:
    lock = DataDirLock(str(tmp_path))
    lock.acquire(exclusive=True)
    with pytest.raises(StoreLocked, match="restore"):
        ChannelStore(str(tmp_path)).open()
    # the holder itself can open a store under its lock
    mine = ChannelStore(str(tmp_path), lock=lock)
    mine.open()
    mine.put(cfg("chat"))
    mine.close()
    assert lock.held, "closing a store must not drop a lock it was lent"
    lock.release()
    again = ChannelStore(str(tmp_path))
    again.open()
    assert [c.name for c in again.list()] == ["chat"]
    again.close()


def test_a_failed_open_drops_the_lock(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="not an SQLite database"):
        ChannelStore(str(tmp_path)).open()
    lock = DataDirLock(str(tmp_path))
    lock.acquire(exclusive=True)  # nothing left holding it
    lock.release()


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from aether_fast.stores.sqlite import ChannelStore\n"
            f"s = ChannelStore({str(tmp_path)!r}); s.open()\n"
            "print('open', flush=True); time.sleep(60)\n",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        lock = DataDirLock(str(tmp_path))
        with pytest.raises(StoreLocked):
            lock.acquire(exclusive=True)
        holder.kill()  # a crash, not a clean close
        holder.wait(10)
        deadline = time.monotonic() + 5
        while True:
            try:
                lock.acquire(exclusive=True)
                break
            except StoreLocked:
                assert time.monotonic() < deadline, "the lock outlived its holder"
                time.sleep(0.05)
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_lock_file_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create lock file"):
        DataDirLock(str(blocker)).acquire()


def test_read_backup_returns_the_configs(tmp_path: Path) -> None:
    news, chat = cfg("news", presence=True), cfg("chat", max_connections=0)
    store = open_store(tmp_path / "data", news, chat)
    store.backup(str(tmp_path / "b.sqlite3"))
    store.close()
    assert read_backup(str(tmp_path / "b.sqlite3")) == [chat, news]


def test_read_backup_refuses_what_restore_refuses(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such backup"):
        read_backup(str(tmp_path / "missing"))
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(StoreError, match="not an SQLite database"):
        read_backup(str(garbage))
