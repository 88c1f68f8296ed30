"""How each of the store's connections is opened and set up: the writer and the reader (on
aiosqlite's threads, made daemons), and the event loop's point-read and small-write ones."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import aiosqlite

from .._exceptions import StoreError
from .commit import _SAFETY_CHECKPOINT_PAGES, BUSY_TIMEOUT, _is_busy

__all__ = ["configure", "connect_fast", "connect_inline", "daemonize"]


def configure(conn: sqlite3.Connection, path: Path, durability: str, query_only: bool) -> None:
    """Set up a writer or reader connection (run on its thread): WAL, busy timeout, durability."""
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    mode = _journal_mode_wal(conn)
    if mode.lower() != "wal":
        raise StoreError(f"{path}: could not switch to WAL journal mode (got {mode!r})")
    conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys = ON")
    if query_only:
        conn.execute("PRAGMA query_only = ON")
    else:
        # The store checkpoints itself, mostly off the writer (see `_run_checkpoint`);
        # SQLite's own checkpoint in the committing writer stays only as a safety net.
        conn.execute(f"PRAGMA wal_autocheckpoint = {_SAFETY_CHECKPOINT_PAGES}")


def _journal_mode_wal(conn: sqlite3.Connection) -> str:
    """Switch to WAL (a no-op once the file is in WAL mode), waiting as a lock would.

    SQLite answers the switch with "database is locked" at once, without waiting out
    ``busy_timeout``, while another connection holds a lock on a file not yet in WAL mode:
    that happens when processes create the same new database together (a `generate` and an
    `ls` started at once). The switch is tried again until the busy timeout has passed.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            mode: str = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            return mode
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.005)


def connect_inline(path: Path) -> sqlite3.Connection:
    """The point-read connection, used only on the thread that opened the store.

    It never waits for a lock (busy_timeout 0): in WAL mode a read takes no lock a
    writer holds, so it answers in microseconds; in the rare moments it would have to
    wait (a WAL reset or recovery), the read goes to the threaded reader instead, so the
    event loop is never blocked on another process.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 0")
    conn.execute("PRAGMA query_only = ON")
    return conn


def connect_fast(path: Path) -> sqlite3.Connection:
    """The small-write connection, used only on the thread that opened the store.

    ``busy_timeout`` 0: when another connection holds the write lock, the write goes to
    the threaded writer (which may wait) instead of blocking the event loop. Automatic
    checkpoints are off here (one would copy pages and fsync on the loop's thread); the
    store runs its own (see `_run_checkpoint`).
    """
    conn = sqlite3.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row  # the transaction functions read columns by name
    try:
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
    except BaseException:
        conn.close()
        raise
    return conn


async def connect_threaded(path: Path) -> aiosqlite.Connection:
    """An aiosqlite connection (its own thread, a daemon), rows by column name; `configure`
    sets it up. Raises `StoreError` naming the file when SQLite cannot open it."""
    conn = aiosqlite.connect(path, isolation_level=None, check_same_thread=False)
    daemonize(conn)
    try:
        await conn
    except sqlite3.Error as exc:
        # aiosqlite stops the thread of a connection that failed to open, and the thread
        # then answers this loop: wait for it, so it never answers a loop closed meanwhile.
        await asyncio.to_thread(_thread_of(conn).join)
        raise StoreError(
            f"cannot open the database {path}: {exc}; check that its folder exists, is "
            "writable, and is not a dangling link"
        ) from None
    conn.row_factory = sqlite3.Row
    return conn


def daemonize(conn: aiosqlite.Connection) -> None:
    """Make a connection's thread a daemon before it starts, so a manager that is never
    closed does not keep the process alive at exit (Python waits for every other thread).
    Ending a daemon thread mid-transaction is safe: SQLite rolls it back, as after a crash.
    aiosqlite keeps its thread private (``_thread``; before 0.21 the connection was the
    thread itself): this is the second private name we rely on, pinned in pyproject.toml."""
    _thread_of(conn).daemon = True


def _thread_of(conn: aiosqlite.Connection) -> threading.Thread:
    return getattr(conn, "_thread", None) or conn  # type: ignore[return-value]
