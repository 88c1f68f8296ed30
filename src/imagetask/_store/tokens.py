"""API tokens and the event feed: their SQL, as plain functions on a `sqlite3` connection."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

from .._models import _STATUSES, TaskEvent, now_ms

__all__ = ["TokenRow", "_add_token", "_events_after", "_last_event", "_revoke_tokens", "_token", "_tokens"]

#: (id, owner, digest, label, created_at ms, revoked_at ms or None)
TokenRow = tuple[str, str, str, str | None, int, int | None]

_TOKEN_COLUMNS = "id, owner, digest, label, created_at, revoked_at"


def _add_token(conn: sqlite3.Connection, token_id: str, owner: str, digest: str, label: str | None) -> int:
    """Store a new token's digest (never the token); returns when it was created (ms)."""
    now = now_ms()
    conn.execute(
        "INSERT INTO tokens (id, owner, digest, label, created_at) VALUES (?, ?, ?, ?, ?)",
        (token_id, owner, digest, label, now),
    )
    return now


def _revoke_tokens(conn: sqlite3.Connection, token_id: str | None, owner: str | None) -> int:
    """Revoke one token by id, or every live token of ``owner``; how many were revoked."""
    now = now_ms()
    if token_id is not None:
        cur = conn.execute(
            "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, token_id)
        )
    else:
        cur = conn.execute(
            "UPDATE tokens SET revoked_at = ? WHERE owner = ? AND revoked_at IS NULL", (now, owner)
        )
    return cur.rowcount


def _token(conn: sqlite3.Connection, token_id: str) -> TokenRow | None:
    row = conn.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = ?", (token_id,)).fetchone()
    return None if row is None else tuple(row)


def _tokens(conn: sqlite3.Connection, owner: str | None) -> list[TokenRow]:
    if owner is None:
        rows = conn.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id")
    else:
        rows = conn.execute(
            f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE owner = ? ORDER BY created_at, id", (owner,)
        )
    return [tuple(r) for r in rows]


def _events_after(conn: sqlite3.Connection, after: int, owner: str | None, limit: int) -> list[TaskEvent]:
    """Events with an id above ``after``, oldest first (of ``owner``'s tasks only, if named)."""
    sql = (
        "SELECT e.id, e.task_id, e.at, e.event, e.attempt, e.status, e.worker, e.detail, t.owner"
        " FROM task_events e JOIN tasks t ON t.id = e.task_id WHERE e.id > ?"
    )
    args: list[Any] = [after]
    if owner is not None:
        sql += " AND t.owner = ?"
        args.append(owner)
    sql += " ORDER BY e.id LIMIT ?"
    args.append(limit)
    return [
        TaskEvent(
            task_id=task_id,
            at=datetime.fromtimestamp(at / 1000, tz=UTC),
            kind=kind,
            attempt=attempt,
            status=_STATUSES[status],
            worker=worker,
            detail=detail,
            seq=seq,
            owner=task_owner,
        )
        for seq, task_id, at, kind, attempt, status, worker, detail, task_owner in conn.execute(sql, args)
    ]


def _last_event(conn: sqlite3.Connection) -> int:
    """The highest event id so far (0 when there is none)."""
    return int(conn.execute("SELECT coalesce(max(id), 0) FROM task_events").fetchone()[0])
