"""Every read statement: point reads, pages, statuses, events, health, the prune sweep's state."""

from __future__ import annotations

import sqlite3
from typing import Any

from .._models import TaskEvent
from .rows import TASK_COLUMNS as _TASK_COLUMNS

#: Ids per ``IN (...)`` statement: well under SQLite's variable limit (32,766, or 999 before 3.32).
_IN_CHUNK = 500
_STATUS = _TASK_COLUMNS.index("status")
_REFS = _TASK_COLUMNS.index("refs")

_SELECT_TASKS = "SELECT " + ", ".join(_TASK_COLUMNS) + " FROM tasks"
#: A point read in one statement (one snapshot, no explicit transaction): the task's
#: columns, repeated on each of its image rows (or once, with NULL image columns).
_GET_ONE = (
    "SELECT " + ", ".join(f"t.{c}" for c in _TASK_COLUMNS) + ","
    " i.role, i.idx, i.path, i.mime, i.width, i.height, i.sha256, i.size, i.provenance"
    " FROM tasks t LEFT JOIN task_images i ON i.task_id = t.id"
    " WHERE t.id = ? ORDER BY i.role, i.idx"
)


def pending_sql(owner: str | None) -> tuple[str, tuple[Any, ...]]:
    """The statement of `Store.pending`: the active rows only, through a partial index (with
    an owner) or the status index (without), so finished rows never cost it."""
    if owner is None:
        where = "INDEXED BY tasks_status WHERE status IN ('queued', 'running')"
        return f"{_SELECT_TASKS} {where} ORDER BY id DESC", ()
    where = "INDEXED BY tasks_active WHERE owner = ? AND status IN ('queued', 'running')"
    return f"{_SELECT_TASKS} {where} ORDER BY id DESC", (owner,)


def list_sql(
    owner: str | None, status: str | None, limit: int, before: str | None
) -> tuple[str, tuple[Any, ...]]:
    """The statement of `Store.list_tasks`: each shape walks an index in id order and stops
    after ``limit`` rows (the owner's index, the status index, or the primary key)."""
    where: list[str] = []
    args: list[Any] = []
    index = "tasks_owner" if owner is not None else "tasks_status" if status is not None else None
    for column, value in (("owner", owner), ("status", status)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if before is not None:
        where.append("id < ?")
        args.append(before)
    sql = _SELECT_TASKS + (f" INDEXED BY {index}" if index else "")
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(limit)
    return sql, tuple(args)


def _get_one(conn: sqlite3.Connection, task_id: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(_GET_ONE, (task_id,))]


def _balance(conn: sqlite3.Connection, owner: str) -> int:
    row = conn.execute("SELECT balance FROM accounts WHERE owner = ?", (owner,)).fetchone()
    return 0 if row is None else int(row["balance"])


def _select_tasks(
    conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]
) -> tuple[list[Any], list[sqlite3.Row]]:
    """The tasks of ``sql`` (rows of `TASK_COLUMNS`, the id first) and their images (rows by
    name), in the caller's transaction."""
    rows = conn.execute(sql, args).fetchall()
    # Only a succeeded task has output images, and only one with references has those:
    # a page of queued and running tasks (a pending set) needs no second statement.
    ids = [r[0] for r in rows if r[_STATUS] == "succeeded" or r[_REFS]]
    if not ids:
        return rows, []
    images = conn.cursor()
    images.row_factory = sqlite3.Row
    if len(ids) == 1:
        return rows, images.execute(
            "SELECT * FROM task_images WHERE task_id = ? ORDER BY role, idx", (ids[0],)
        ).fetchall()
    found: list[sqlite3.Row] = []
    for start in range(0, len(ids), _IN_CHUNK):  # well under SQLite's variable limit
        chunk = ids[start : start + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        found += images.execute(
            f"SELECT * FROM task_images WHERE task_id IN ({marks}) ORDER BY role, idx", chunk
        ).fetchall()
    return rows, found


_ACTIVE = frozenset({"queued", "running"})


def _statuses(conn: sqlite3.Connection, ids: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        found.update(conn.execute(f"SELECT id, status FROM tasks WHERE id IN ({marks})", chunk).fetchall())
    return found


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def _synchronous(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


def _events(conn: sqlite3.Connection, task_id: str) -> list[TaskEvent]:
    rows = conn.execute("SELECT * FROM task_events WHERE task_id = ? ORDER BY id", (task_id,))
    return [TaskEvent._from_row(r) for r in rows]


def _health(conn: sqlite3.Connection, now: int) -> dict[str, Any]:
    checked = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
    return {
        "schema_version": conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0],
        "integrity": "ok" if checked == ["ok"] else "; ".join(checked),
        "counts": dict(conn.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall()),
        "expired_leases": conn.execute(
            "SELECT count(*) FROM tasks INDEXED BY tasks_running"
            " WHERE status = 'running' AND lease_until < ?",
            (now,),
        ).fetchone()[0],
    }


def _file_state(conn: sqlite3.Connection, ids: list[str]) -> tuple[dict[str, tuple[str, int]], set[str]]:
    known: dict[str, tuple[str, int]] = {}
    referenced: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for r in conn.execute(f"SELECT id, status, attempt FROM tasks WHERE id IN ({marks})", chunk):
            known[r[0]] = (r[1], r[2])
        referenced.update(
            r[0] for r in conn.execute(f"SELECT path FROM task_images WHERE task_id IN ({marks})", chunk)
        )
    return known, referenced
