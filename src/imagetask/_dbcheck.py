"""The read-only check a database file must pass before imagetask writes anything to it."""

from __future__ import annotations

import logging
import os
import shlex
import sqlite3
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ._exceptions import StoreError

__all__ = ["check_database"]

log = logging.getLogger("imagetask")

_MAGIC = b"SQLite format 3\x00"

#: imagetask's ``schema_migrations`` as ``PRAGMA table_info`` reports it: (name, type, notnull, pk).
_MIGRATIONS_COLUMNS = [
    ("version", "INTEGER", 0, 1),
    ("description", "TEXT", 1, 0),
    ("applied_at", "INTEGER", 1, 0),
]

#: Files up to this size (main file plus WAL) get a whole ``PRAGMA quick_check``: about
#: 0.2 s with the file in the OS cache, about 1 s read from disk.
FULL_CHECK_MAX_BYTES = 64 * 1024 * 1024

#: Bigger files are checked table by table until this many seconds are spent.
CHECK_BUDGET_S = 0.25

#: The order tables are checked in on a big file: the ones every open, submit and claim
#: read first, then the history tables, then any others.
_PRIORITY = (
    "sqlite_master",
    "schema_migrations",
    "accounts",
    "tasks",
    "ledger",
    "tokens",
    "task_images",
    "task_events",
)

#: How many lines of quick_check's report a damage message quotes.
_SHOWN = 3

#: Primary SQLite result codes that say nothing about the file's content.
_NOT_DAMAGE = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_INTERRUPT,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_PERM,
    sqlite3.SQLITE_AUTH,
    sqlite3.SQLITE_MISUSE,
}


def check_database(
    path: Path,
    migrations: Sequence[tuple[int, str, Sequence[str]]],
    *,
    full_check_max_bytes: int = FULL_CHECK_MAX_BYTES,
    budget: float = CHECK_BUDGET_S,
) -> None:
    """Refuse a file imagetask must not open, without writing anything to it.

    Run before any write connection; it blocks for up to about 0.3 s on a big file, so
    call it off the event loop (``asyncio.to_thread``). A missing or empty file passes (it
    becomes a new database). Anything else must be an SQLite database with no tables, or
    one imagetask wrote: a ``schema_migrations`` table with exactly imagetask's columns,
    whose rows are, version by version, the ``(version, description)`` pairs of
    ``migrations``, and every table, column, index, view and trigger those migrations
    create. Tables, columns and indexes added beside them are allowed; SQLite's own
    ``sqlite_*`` tables are ignored.

    Then the pages are checked. A file of up to 64 MiB (main file plus WAL) gets a whole
    ``PRAGMA quick_check``: every page of every b-tree, the freelist, pages used twice or
    never. Measured where this was written, that costs about 2.5 ms per MiB with the file
    in the OS cache and up to 20 ms per MiB read from disk: 0.5-0.8 s (4 s from disk) for
    1,000,000 finished tasks alone, 2-2.6 s (9-18 s) with their events and images. So a
    bigger file gets a bounded check instead, within 0.25 s (opening must stay quick: a
    notebook reopens its database at every kernel restart): ``PRAGMA quick_check(table)``
    table by table, first the tables open, submit and claim read (``sqlite_master``,
    ``schema_migrations``, ``accounts``, ``tasks``, ``ledger``), then ``task_images``,
    ``task_events`` and any others, and the table in progress when the budget runs out
    is interrupted (``sqlite3_interrupt`` from a timer thread: SQLite has no check bounded
    by pages, ``PRAGMA quick_check(N)`` only bounds the number of errors reported, and a
    progress handler is not called inside the b-tree walk). The tables left unchecked are
    logged (INFO) with the command that checks the whole file. The budget bounds how much
    is checked, never the verdict: damage found is refused, a check cut short is not.

    Nothing is written. A database in rollback-journal mode, and a WAL database whose
    ``-wal`` file exists (it is open elsewhere, or its last user was killed), are opened
    with ``mode=ro``: a hot journal is reported, never rolled back, and a WAL is read,
    never checkpointed. A WAL database with no ``-wal`` file is opened read-write with
    ``query_only`` on and only read: a ``mode=ro`` connection would leave empty ``-wal``
    and ``-shm`` files behind, which a read-write one removes on close, and with no WAL
    frames its close copies nothing into the file.

    Args:
        path: The database file.
        migrations: imagetask's migrations, oldest first: (version, description, SQL statements).
        full_check_max_bytes: The size (main file plus WAL) up to which the whole file is
            checked; above it, the bounded check (tests set it low to take that path on a
            small file).
        budget: The seconds the bounded check may spend.

    Raises:
        StoreError: the path is a folder or not a regular file, cannot be read, is not
            SQLite, is another program's database, has a schema version newer than
            ``migrations``, lacks a table, column or index its recorded version creates,
            is damaged, or is locked by another program. The message says what to do.
    """
    wal = _read_header(path)
    if wal is None:
        return
    conn: sqlite3.Connection | None = None
    try:
        conn = _connect(path, wal)
        tables = _check_schema(conn, path, migrations)
        _check_pages(conn, path, tables, full_check_max_bytes, budget)
    except sqlite3.Error as exc:
        raise _sqlite_error(path, exc) from exc
    finally:
        if conn is not None:
            conn.close()


def _read_header(path: Path) -> bool | None:
    """Refuse a file that is not SQLite; None for a new database, else whether it is WAL."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}; check the path and its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path} is a folder; pass the path of a database file")
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path} is not a regular file; pass the path of a database file")
    try:
        with path.open("rb") as f:
            head = f.read(100)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}; check the path and its permissions") from None
    if not head:
        return None
    if head[:16] != _MAGIC:
        raise StoreError(
            f"{path} is not an SQLite database (it may be corrupt or another kind of file); "
            "move it away or pass another path; imagetask never writes to it"
        )
    # Bytes 18 and 19 are the read and write format versions: 2 means WAL.
    return head[18:20] == b"\x02\x02"


def _connect(path: Path, wal: bool) -> sqlite3.Connection:
    """A connection that writes nothing to the file (see `check_database`)."""
    mode = "rw" if wal and not os.path.exists(f"{path}-wal") else "ro"
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode={mode}", uri=True, isolation_level=None)
    try:
        if mode == "rw":
            conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _check_schema(
    conn: sqlite3.Connection, path: Path, migrations: Sequence[tuple[int, str, Sequence[str]]]
) -> list[str]:
    """Refuse another program's database or a newer one; return the tables to check."""
    objects = _schema(conn)
    tables = sorted(name for kind, name in objects if kind == "table")
    if "schema_migrations" not in tables:
        others = sorted(name for kind, name in objects if kind in ("table", "view"))
        if others:
            raise _foreign(path, f"it has tables {', '.join(others)} and no schema_migrations")
        return tables

    columns = [
        (name, str(decl).upper(), notnull, pk)
        for _, name, decl, notnull, _, pk in conn.execute("PRAGMA table_info(schema_migrations)")
    ]
    if columns != _MIGRATIONS_COLUMNS:
        shown = ", ".join(f"{name} {decl}".strip() for name, decl, _, _ in columns)
        raise _foreign(
            path,
            f"its schema_migrations table ({shown}) is not imagetask's "
            "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at INTEGER NOT NULL); "
            "another migration tool made it",
        )

    rows = [
        tuple(r) for r in conn.execute("SELECT version, description FROM schema_migrations ORDER BY version")
    ]
    if any(not isinstance(version, int) for version, _ in rows):
        raise _foreign(path, "its schema_migrations table holds versions that are not integers")
    newest = migrations[-1][0] if migrations else 0
    current: int = rows[-1][0] if rows else 0
    if current > newest:
        raise StoreError(
            f"{path} has schema version {current}, newer than this imagetask "
            f"understands ({newest}); upgrade imagetask to open it"
        )
    known = [(version, description) for version, description, _ in migrations]
    if rows != known[: len(rows)]:
        found = ", ".join(f"{v} {d!r}" for v, d in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise _foreign(path, f"its schema_migrations rows ({found}) are not imagetask's migrations")
    if not rows and len(tables) > 1:
        listed = ", ".join(t for t in tables if t != "schema_migrations")
        raise _foreign(path, f"it has tables {listed} but no migration recorded in schema_migrations")

    missing: list[str] = []
    for (kind, name), expected in sorted(_expected_schema(migrations, current).items()):
        if (kind, name) not in objects:
            missing.append(f"{kind} {name}")
        else:
            missing += [f"column {name}.{column}" for column in sorted(expected - objects[kind, name])]
    if missing:
        shown = ", ".join(missing)
        raise StoreError(
            f"{path} records imagetask schema version {current} but has no {shown}: it was "
            "changed by something other than imagetask; restore it from a backup, or move it "
            "away or pass another path; imagetask never writes to it"
        )
    return tables


def _expected_schema(
    migrations: Sequence[tuple[int, str, Sequence[str]]], version: int
) -> dict[tuple[str, str], set[str]]:
    """What migrations up to ``version`` create, run on an empty database.

    Returns:
        (type, name) of every table, index, view and trigger, mapped to a table's column
        names (an empty set for the others).
    """
    mem = sqlite3.connect(":memory:")
    try:
        for number, _, statements in migrations:
            if number > version:
                break
            for statement in statements:
                mem.execute(statement)
        return _schema(mem)
    except sqlite3.Error as exc:
        # A bug in a migration, not a problem of the file: keep it out of the file's errors.
        raise RuntimeError(f"imagetask's migrations do not run on an empty database: {exc}") from exc
    finally:
        mem.close()


def _schema(conn: sqlite3.Connection) -> dict[tuple[str, str], set[str]]:
    """(type, name) of the schema's objects, SQLite's own left out, with each table's columns."""
    objects = [
        (kind, name)
        for kind, name in conn.execute("SELECT type, name FROM sqlite_master")
        # Names starting with sqlite_ are SQLite's own: sqlite_sequence, sqlite_stat1, ...
        if not name.lower().startswith("sqlite_")
    ]
    return {
        (kind, name): (
            {row[1] for row in conn.execute("SELECT * FROM pragma_table_info(?)", (name,))}
            if kind == "table"
            else set()
        )
        for kind, name in objects
    }


def _check_pages(
    conn: sqlite3.Connection, path: Path, tables: list[str], full_max: int, budget: float
) -> None:
    """Refuse a damaged file: whole quick_check up to ``full_max`` bytes, else per table
    within ``budget`` seconds."""
    size = path.stat().st_size
    try:
        size += os.stat(f"{path}-wal").st_size
    except OSError:
        pass
    if size <= full_max:
        _verdict(path, conn.execute("PRAGMA quick_check").fetchall())
        return
    rank = {name: i for i, name in enumerate(_PRIORITY)}
    order = sorted(["sqlite_master", *tables], key=lambda t: (rank.get(t, len(rank)), t))
    deadline = time.monotonic() + budget
    for i, table in enumerate(order):
        quoted = table.replace("'", "''")
        rows = _bounded(conn, f"PRAGMA quick_check('{quoted}')", deadline)
        if rows is None:
            log.info(
                "%s: %d MiB, checked tables %s within %.1f s and left %s unchecked; "
                "to check the whole file: sqlite3 %s 'PRAGMA quick_check'",
                path,
                size // (1024 * 1024),
                ", ".join(order[:i]) or "none",
                budget,
                ", ".join(order[i:]),
                shlex.quote(str(path)),
            )
            return
        _verdict(path, rows)


def _bounded(conn: sqlite3.Connection, sql: str, deadline: float) -> list[tuple[str]] | None:
    """``sql``'s rows, or None when ``deadline`` (time.monotonic) passes first."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    # sqlite3_interrupt from another thread: the progress handler is not called inside the
    # b-tree walk of an integrity check, the interrupt flag is.
    timer = threading.Timer(remaining, conn.interrupt)
    timer.daemon = True
    timer.start()
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_INTERRUPT:
            return None
        raise
    finally:
        timer.cancel()
        timer.join()


def _verdict(path: Path, rows: list[tuple[str]]) -> None:
    if rows != [("ok",)]:
        lines = [str(line).replace("\n", " ") for (line,) in rows[:_SHOWN]]
        more = f" and {len(rows) - _SHOWN} more" if len(rows) > _SHOWN else ""
        raise _damaged(path, "PRAGMA quick_check: " + "; ".join(lines) + more)


def _foreign(path: Path, why: str) -> StoreError:
    return StoreError(
        f"{path} is an SQLite database but not an imagetask one ({why}); "
        "move it away or pass another path; imagetask never writes to it"
    )


def _damaged(path: Path, detail: str) -> StoreError:
    recovered = path.with_name(f"{path.stem}-recovered{path.suffix or '.db'}")
    return StoreError(
        f"{path} is damaged ({detail}); imagetask will not open it and has not written to it. "
        "Restore it from a backup, or copy what SQLite can still read into a new file with "
        f'`sqlite3 {shlex.quote(str(path))} ".recover" | sqlite3 {shlex.quote(str(recovered))}` '
        "and pass that file instead"
    )


def _sqlite_error(path: Path, exc: sqlite3.Error) -> StoreError:
    """What an SQLite error raised while checking means for the user."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_READONLY_ROLLBACK:
        return StoreError(
            f"{path} has a transaction another program left unfinished (a hot journal, "
            f"{path}-journal), so it is not an imagetask database (imagetask uses WAL); "
            "move it away or pass another path; imagetask never writes to it"
        )
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreError(f"{path} is locked by another program ({exc}); close it or try again later")
    if primary is None or primary in _NOT_DAMAGE:
        return StoreError(f"cannot check {path} before opening it: {exc}; check the file and its folder")
    return _damaged(path, str(exc))
