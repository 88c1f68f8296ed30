"""The schema: every table and index, as numbered forward-only migrations, and how they run."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from .._exceptions import StoreError
from .._models import now_ms

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

log = logging.getLogger("imagetask")

# Every index is paid for on each transition, so there are few, most of them partial. The hot
# queries name theirs (INDEXED BY): left to itself, SQLite's planner may pick another and then
# sort every queued row on each claim. A PostgreSQL store would use the same indexes through
# its own planner.
# Migrations are numbered, forward-only, and recorded in schema_migrations. Never edit one
# that has shipped: append a new one.

_V1 = [
    """
    CREATE TABLE tasks (
        id              TEXT PRIMARY KEY,
        owner           TEXT NOT NULL,
        prompt          TEXT NOT NULL,
        model           TEXT NOT NULL,
        params          TEXT NOT NULL,
        status          TEXT NOT NULL
                        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
        attempt         INTEGER NOT NULL DEFAULT 0,
        max_attempts    INTEGER NOT NULL,
        cost            INTEGER NOT NULL,
        refs            INTEGER NOT NULL DEFAULT 0,
        idempotency_key TEXT,
        fingerprint     TEXT,
        metadata        TEXT NOT NULL,
        error_code      TEXT,
        error_message   TEXT,
        error_retryable INTEGER,
        worker          TEXT,
        lease_until     INTEGER,
        run_after       INTEGER NOT NULL,
        created_at      INTEGER NOT NULL,
        started_at      INTEGER,
        finished_at     INTEGER,
        updated_at      INTEGER NOT NULL
    )
    """,
    "CREATE UNIQUE INDEX tasks_idempotency ON tasks (owner, idempotency_key)"
    " WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX tasks_queue ON tasks (run_after, id) WHERE status = 'queued'",
    # Running rows are few (at most every process's concurrency): one small index serves the
    # per-owner count of a claim and the scan for expired leases.
    "CREATE INDEX tasks_running ON tasks (owner, lease_until) WHERE status = 'running'",
    "CREATE INDEX tasks_active ON tasks (owner, id) WHERE status IN ('queued', 'running')",
    "CREATE INDEX tasks_owner ON tasks (owner, id)",
    "CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL",
    """
    CREATE TABLE task_images (
        task_id    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
        role       TEXT NOT NULL CHECK (role IN ('output', 'reference')),
        idx        INTEGER NOT NULL,
        attempt    INTEGER NOT NULL,
        path       TEXT NOT NULL,
        mime       TEXT NOT NULL,
        width      INTEGER NOT NULL,
        height     INTEGER NOT NULL,
        sha256     TEXT NOT NULL,
        size       INTEGER NOT NULL,
        provenance TEXT NOT NULL,
        PRIMARY KEY (task_id, role, idx)
    )
    """,
    """
    CREATE TABLE task_events (
        id      INTEGER PRIMARY KEY,
        task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
        at      INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        event   TEXT NOT NULL,
        status  TEXT NOT NULL,
        worker  TEXT,
        detail  TEXT
    )
    """,
    "CREATE INDEX task_events_task ON task_events (task_id, id)",
    """
    CREATE TABLE accounts (
        owner      TEXT PRIMARY KEY,
        balance    INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    )
    """,
    # Append-only. Balance = sum(amount) per owner. task_id has no foreign key on purpose:
    # pruning a task never touches the money it moved.
    """
    CREATE TABLE ledger (
        id      INTEGER PRIMARY KEY,
        owner   TEXT NOT NULL,
        task_id TEXT,
        kind    TEXT NOT NULL CHECK (kind IN ('grant', 'charge', 'refund')),
        amount  INTEGER NOT NULL,
        at      INTEGER NOT NULL,
        UNIQUE (task_id, kind)
    )
    """,
    "CREATE INDEX ledger_owner ON ledger (owner, id)",
]

# Attempts handed back by a clean close do not count against max_attempts; ``attempt``
# (the fencing token) still only grows, so a task's claims left are
# ``max_attempts - (attempt - released)``.
_V2 = ["ALTER TABLE tasks ADD COLUMN released INTEGER NOT NULL DEFAULT 0"]

# pending() of every owner and list(status=...) read tasks of one status, newest first: without
# this index they read the whole table (half a second at 1,000,000 rows).
_V3 = ["CREATE INDEX tasks_status ON tasks (status, id)"]

# A task is run only by workers of the provider that validated it: a worker on FakeProvider
# never answers a task meant for Gemini with a fake picture, and a task submitted for the
# offline provider is never sent (and billed) to Gemini. '' (tasks from before): any worker.
_V4 = ["ALTER TABLE tasks ADD COLUMN provider TEXT NOT NULL DEFAULT ''"]

# API tokens of the web door: only a digest of each is kept; revoked ones stay, marked.
_V5 = [
    """
    CREATE TABLE tokens (
        id         TEXT PRIMARY KEY,
        owner      TEXT NOT NULL,
        digest     TEXT NOT NULL,
        label      TEXT,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    )
    """,
    "CREATE INDEX tokens_owner ON tokens (owner, created_at)",
]

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "tasks, images, events, accounts, ledger", _V1),
    (2, "tasks.released: attempts handed back at shutdown", _V2),
    (3, "tasks_status index: reads by status, newest first", _V3),
    (4, "tasks.provider: only that provider's workers run a task", _V4),
    (5, "tokens: digests of the web door's API tokens", _V5),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Run the migrations this database lacks, in one transaction (refusing a newer one).

    A database already at this version is only read: opening it takes no write lock, so
    a manager that only reads (``workers=False``, the CLI's ``ls``) opens while another
    connection holds the lock for as long as it likes.
    """
    if _current_version(conn) == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_migrations" not in tables:
            if tables - {"sqlite_sequence"}:
                raise StoreError(
                    f"{path} is an SQLite database but not an imagetask one "
                    f"(it has tables {', '.join(sorted(tables))}); pass another path"
                )
            conn.execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                " description TEXT NOT NULL, applied_at INTEGER NOT NULL)"
            )
        current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {current}, newer than this imagetask "
                f"understands ({SCHEMA_VERSION}); upgrade imagetask to open it"
            )
        for version, description, statements in MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                (version, description, now_ms()),
            )
            log.info("migrated %s to schema version %d", path, version)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _current_version(conn: sqlite3.Connection) -> int | None:
    """The recorded schema version, read without a lock (None: no imagetask schema yet)."""
    conn.execute("BEGIN")
    try:
        if (
            conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
            ).fetchone()
            is None
        ):
            return None
        version: int = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]
        return version
    finally:
        conn.execute("ROLLBACK")
