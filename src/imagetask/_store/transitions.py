"""Every write transition: one function each, pure and synchronous, run inside a transaction on
any sqlite3 connection (the store's writer, or a test's own)."""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from .. import _config
from .._exceptions import ImageTaskError, InsufficientCredits, StoreError, TooManyPending, ValidationError
from .._models import StoredImage, TaskError, now_ms
from .reads import _balance
from .records import SubmitRow, Submitted
from .rows import _INSERT_TASK, TASK_COLUMNS, _task_values, insert_tasks, provenance_json
from .tokens import _add_token, _revoke_tokens

log = logging.getLogger("imagetask")
_now = now_ms


def _event(
    conn: sqlite3.Connection,
    task_id: str,
    attempt: int,
    event: str,
    status: str,
    now: int,
    worker: str | None = None,
    detail: str | None = None,
) -> None:
    conn.execute(_INSERT_EVENT, (task_id, now, attempt, event, status, worker, detail))


_INSERT_EVENT = (
    "INSERT INTO task_events (task_id, at, attempt, event, status, worker, detail)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _image_row(task_id: str, role: str, attempt: int, rel: str, im: StoredImage) -> tuple[Any, ...]:
    return (
        task_id,
        role,
        im.index,
        attempt,
        rel,
        im.mime,
        im.width,
        im.height,
        im.sha256,
        im.size,
        provenance_json(im.provenance),
    )


_INSERT_IMAGE = (
    "INSERT INTO task_images (task_id, role, idx, attempt, path, mime, width, height, sha256,"
    " size, provenance) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _submit_rows(
    conn: sqlite3.Connection,
    rows: Sequence[tuple[SubmitRow, list[tuple[Any, ...]]]],
    atomic: bool,
) -> list[Submitted | ImageTaskError]:
    """Insert a batch of submits; results in the order of ``rows``.

    Rows with no idempotency key and no charge cannot fail on their own (their ids are
    new), so they are inserted in bulk. The others each get a savepoint (unless the batch
    is atomic, where any error rolls back the whole transaction). Submits of several
    callers share this batch, so when the bulk insert fails anyway (a value SQLite cannot
    store that validation let through), the rows are inserted again one by one and only
    the row at fault gets the error.
    """
    now = _now()
    results: list[Submitted | ImageTaskError | None] = [None] * len(rows)
    plain = [i for i, (row, _) in enumerate(rows) if not _can_fail(row)]
    if plain and atomic:  # an error rolls the whole transaction back: no savepoint needed
        inserted = _insert_plain(conn, rows if len(plain) == len(rows) else [rows[i] for i in plain], now)
        for i, submitted in zip(plain, inserted, strict=True):
            results[i] = submitted
    elif plain:
        conn.execute("SAVEPOINT submit_plain")
        try:
            inserted = _insert_plain(conn, [rows[i] for i in plain], now)
        except Exception:
            conn.execute("ROLLBACK TO submit_plain")
            conn.execute("RELEASE submit_plain")
        else:
            conn.execute("RELEASE submit_plain")
            for i, submitted in zip(plain, inserted, strict=True):
                results[i] = submitted
    for i, (row, refs) in enumerate(rows):
        if results[i] is not None:
            continue
        if atomic:
            results[i] = _submit_one(conn, row, refs, now)
            continue
        conn.execute("SAVEPOINT submit_one")
        try:
            results[i] = _submit_one(conn, row, refs, now)
        except ImageTaskError as exc:
            conn.execute("ROLLBACK TO submit_one")
            results[i] = exc
        except Exception as exc:  # not this row's validation: the database refused its values
            conn.execute("ROLLBACK TO submit_one")
            results[i] = StoreError(f"task {row.id} could not be written: {type(exc).__name__}: {exc}")
        conn.execute("RELEASE submit_one")
    return [r for r in results if r is not None]


def _can_fail(row: SubmitRow) -> bool:
    """Whether a submit can fail on its own: a key may be taken, a balance may be short, the
    owner may have too many unfinished tasks."""
    return row.idempotency_key is not None or (row.charge and row.cost > 0) or row.max_pending is not None


def _insert_plain(
    conn: sqlite3.Connection, rows: Sequence[tuple[SubmitRow, list[tuple[Any, ...]]]], now: int
) -> list[Submitted]:
    """Rows that cannot fail on their own (`_can_fail`): nothing to look up, so insert them
    in bulk."""
    insert_tasks(conn, [row for row, _ in rows], now)
    images = [ref for _, refs in rows for ref in refs]
    if images:
        conn.executemany(_INSERT_IMAGE, images)
    return [Submitted(row.id, created=True, at=now) for row, _ in rows]


def _submit_one(conn: sqlite3.Connection, row: SubmitRow, refs: list[tuple[Any, ...]], now: int) -> Submitted:
    if row.idempotency_key is not None:
        found = conn.execute(
            "SELECT id, fingerprint FROM tasks WHERE owner = ? AND idempotency_key = ?",
            (row.owner, row.idempotency_key),
        ).fetchone()
        if found is not None:
            if found["fingerprint"] != row.fingerprint:
                raise ValidationError(
                    "idempotency_key",
                    f"{row.idempotency_key!r} was already used by owner {row.owner!r} for a "
                    f"different request (task {found['id']}); use a new key for a new request",
                )
            return Submitted(found["id"], created=False, at=now)
    if row.max_pending is not None:
        # Counted inside this transaction (rows of the same batch included): two processes
        # submitting for one owner at once cannot both pass the limit.
        pending = conn.execute(
            "SELECT count(*) FROM tasks WHERE owner = ? AND status IN ('queued', 'running')", (row.owner,)
        ).fetchone()[0]
        if pending >= row.max_pending:
            raise TooManyPending(row.owner, pending, row.max_pending)
    if row.charge and row.cost > 0:
        paid = conn.execute(
            "UPDATE accounts SET balance = balance - ?, updated_at = ?"
            " WHERE owner = ? AND balance >= ? RETURNING balance",
            (row.cost, now, row.owner, row.cost),
        ).fetchone()
        if paid is None:
            raise InsufficientCredits(row.owner, row.cost, _balance(conn, row.owner))
    conn.execute(_INSERT_TASK, _task_values(row, now))
    if row.charge and row.cost > 0:
        conn.execute(
            "INSERT INTO ledger (owner, task_id, kind, amount, at) VALUES (?, ?, 'charge', ?, ?)",
            (row.owner, row.id, -row.cost, now),
        )
    if refs:
        conn.executemany(_INSERT_IMAGE, refs)
    # No event row: the task row itself records the submit (created_at), and the event log
    # holds transitions. One row fewer per submit is a third less work for the commit.
    return Submitted(row.id, created=True, at=now)


def _refund(conn: sqlite3.Connection, task_id: str, now: int) -> None:
    """Refund a task's charge, once: the ledger's unique (task_id, kind) makes it so."""
    charge = conn.execute(
        "SELECT owner, amount FROM ledger WHERE task_id = ? AND kind = 'charge'", (task_id,)
    ).fetchone()
    if charge is None:
        return
    refunded = conn.execute(
        "INSERT INTO ledger (owner, task_id, kind, amount, at) VALUES (?, ?, 'refund', ?, ?)"
        " ON CONFLICT (task_id, kind) DO NOTHING RETURNING amount",
        (charge["owner"], task_id, -charge["amount"], now),
    ).fetchone()
    if refunded is not None:
        conn.execute(
            "UPDATE accounts SET balance = balance + ?, updated_at = ? WHERE owner = ?",
            (refunded["amount"], now, charge["owner"]),
        )


#: A task's reference images, in order (read only for tasks that have any: ``refs > 0``).
_REFERENCES = "SELECT * FROM task_images WHERE task_id = ? AND role = 'reference' ORDER BY idx"

_CLAIM = """
UPDATE tasks
   SET status = 'running', attempt = attempt + 1, worker = :worker, lease_until = :lease_until,
       started_at = coalesce(started_at, :now), updated_at = :now
 WHERE status = 'queued'
   AND id = (
       SELECT t.id FROM tasks t INDEXED BY tasks_queue
        WHERE t.status = 'queued' AND t.run_after <= :now AND t.provider IN ('', :provider)
          AND t.owner NOT IN (SELECT value FROM json_each(:full))
        ORDER BY t.run_after, t.id
        LIMIT 1)
RETURNING id, owner, prompt, model, params, attempt, max_attempts, released, refs
"""

#: Running tasks by owner, for the per-owner cap (running rows are few: one small index).
_RUNNING_BY_OWNER = (
    "SELECT owner, count(*) FROM tasks INDEXED BY tasks_running WHERE status = 'running' GROUP BY owner"
)


_NEXT_RUN = "SELECT min(run_after) FROM tasks INDEXED BY tasks_queue WHERE status = 'queued'"
_EXPIRED = (
    "SELECT id, attempt, max_attempts, released, worker FROM tasks INDEXED BY tasks_running"
    " WHERE status = 'running' AND lease_until < ?"
)
#: Every running row, for the check of holders that are gone (running rows are few).
_RUNNING = (
    "SELECT id, attempt, max_attempts, released, worker FROM tasks INDEXED BY tasks_running"
    " WHERE status = 'running'"
)


def _claim(
    conn: sqlite3.Connection,
    worker: str,
    limit: int,
    per_owner: int,
    lease_ms: int,
    held: frozenset[tuple[str, int]],
    gone: Callable[[str], bool] | None,
    provider: str = "",
) -> tuple[list[tuple[sqlite3.Row, list[sqlite3.Row], dict[str, int]]], list[str], int | None]:
    now = _now()  # inside the transaction: waiting for the lock never shortens a lease
    ended = _reap(conn, now, worker, lease_ms, held, gone)
    claimed: list[tuple[sqlite3.Row, list[sqlite3.Row], dict[str, int]]] = []
    # The per-owner cap: count running tasks once, in this transaction (so across every
    # process), then keep the counts as this loop claims; owners at the cap are skipped by
    # the claim statement itself, so it never tests a count per queued row.
    if per_owner < 1:  # no owner may run anything
        limit = 0
    running = dict(conn.execute(_RUNNING_BY_OWNER).fetchall()) if limit > 0 else {}
    full = [owner for owner, count in running.items() if count >= per_owner]
    args = {
        "worker": worker, "lease_until": now + lease_ms, "now": now, "provider": provider,
        "full": json.dumps(full),
    }  # fmt: skip
    while len(claimed) < limit:
        # With owners at their cap, first ask whether any other owner has a runnable task:
        # a few index seeks, where the claim statement would walk every queued row of the
        # owners at their cap to find nothing (the usual case: one owner, its cap reached).
        if full and not _claimable_beside(conn, full, now, provider):
            break
        row = conn.execute(_CLAIM, args).fetchone()
        if row is None:
            break
        running[row["owner"]] = count = running.get(row["owner"], 0) + 1
        if count >= per_owner:
            full.append(row["owner"])
            args["full"] = json.dumps(full)
        refs = []
        if row["refs"]:  # most tasks have none: skip the lookup
            refs = conn.execute(_REFERENCES, (row["id"],)).fetchall()
        retries: dict[str, int] = {}
        if row["attempt"] > 1:
            for (detail,) in conn.execute(
                "SELECT detail FROM task_events WHERE task_id = ? AND event = 'retry'", (row["id"],)
            ):
                code = (detail or "").split(":", 1)[0]
                retries[code] = retries.get(code, 0) + 1
        claimed.append((row, refs, retries))
    conn.executemany(
        _INSERT_EVENT,
        [(row["id"], now, row["attempt"], "claimed", "running", worker, None) for row, _, _ in claimed],
    )
    next_run = conn.execute(_NEXT_RUN).fetchone()[0]
    return claimed, ended, next_run


_CLAIMABLE = (
    "SELECT 1 FROM tasks INDEXED BY tasks_active WHERE status IN ('queued', 'running') AND {range}"
    " AND status = 'queued' AND run_after <= ? AND provider IN ('', ?) LIMIT 1"
)


def _claimable_beside(conn: sqlite3.Connection, full: Sequence[str], now: int, provider: str) -> bool:
    """Whether an owner not in ``full`` has a runnable task: one range of the active-rows
    index (ordered by owner) between each two owners of ``full`` (SQLite's text order is the
    code point order Python sorts by)."""
    bounds: list[str | None] = [None, *sorted(full), None]
    for low, high in itertools.pairwise(bounds):
        terms, args = [], []
        if low is not None:
            terms.append("owner > ?")
            args.append(low)
        if high is not None:
            terms.append("owner < ?")
            args.append(high)
        query = _CLAIMABLE.format(range=" AND ".join(terms))
        if conn.execute(query, (*args, now, provider)).fetchone() is not None:
            return True
    return False


def _reap(
    conn: sqlite3.Connection,
    now: int,
    worker: str,
    lease_ms: int,
    held: frozenset[tuple[str, int]],
    gone: Callable[[str], bool] | None,
) -> list[str]:
    """Take back tasks whose lease expired, or whose holder is provably gone: re-queue, or
    fail ``interrupted`` if their attempts are spent. An expired lease of an attempt the
    reaping worker still runs itself (``held``) is renewed instead."""
    ended = []
    rows = conn.execute(_EXPIRED, (now,)).fetchall()
    why = dict.fromkeys((row["id"] for row in rows), "expired")
    if gone is not None:
        holders: dict[str, bool] = {}
        for row in conn.execute(_RUNNING).fetchall():
            holder = row["worker"]
            if row["id"] in why or holder is None or holder == worker:
                continue
            if holder not in holders:
                holders[holder] = gone(holder)
            if holders[holder]:
                rows.append(row)
                why[row["id"]] = "holder_gone"
    for row in rows:
        if row["worker"] == worker and (row["id"], row["attempt"]) in held:
            conn.execute(
                "UPDATE tasks SET lease_until = ? WHERE id = ? AND attempt = ? AND status = 'running'",
                (now + lease_ms, row["id"], row["attempt"]),
            )
            log.info("task %s: attempt %d outlived its lease in a stall; renewed", row["id"], row["attempt"])
            continue
        expired = why[row["id"]] == "expired"
        guard: tuple[Any, ...] = (now, now, row["id"], row["attempt"], row["worker"])
        where = " WHERE id = ? AND attempt = ? AND status = 'running' AND worker IS ?"
        if expired:
            where += " AND lease_until < ?"
            guard = (*guard, now)
        where += " RETURNING id"
        lost = "lease_expired" if expired else "holder_gone"
        if row["attempt"] - row["released"] < row["max_attempts"]:
            done = conn.execute(
                "UPDATE tasks SET status = 'queued', worker = NULL, lease_until = NULL,"
                " run_after = ?, updated_at = ?" + where,
                guard,
            ).fetchone()
            if done:
                _event(conn, row["id"], row["attempt"], "lease_expired", "queued", now, row["worker"], lost)
                log.info("task %s: attempt %d taken back (%s), re-queued", row["id"], row["attempt"], lost)
        else:
            message = (
                f"the worker running attempt {row['attempt'] - row['released']} of {row['max_attempts']} "
                "stopped (crash, kill or shutdown) and no attempts are left"
            )
            done = conn.execute(
                "UPDATE tasks SET status = 'failed', worker = NULL, lease_until = NULL,"
                " error_code = 'interrupted', error_message = ?, error_retryable = 1,"
                " finished_at = ?, updated_at = ?" + where,
                (message, *guard),
            ).fetchone()
            if done:
                _refund(conn, row["id"], now)
                _event(
                    conn, row["id"], row["attempt"], "lease_expired", "failed", now, row["worker"], message
                )
                log.info("task %s: taken back (%s) with no attempts left, failed", row["id"], lost)
                ended.append(row["id"])
    return ended


def _heartbeat(
    conn: sqlite3.Connection, worker: str, held: Sequence[tuple[str, int]], lease_ms: int
) -> set[str]:
    until = _now() + lease_ms  # from inside the transaction: a full lease from the commit
    alive = set()
    for task_id, attempt in held:
        row = conn.execute(
            "UPDATE tasks SET lease_until = ? WHERE id = ? AND attempt = ? AND status = 'running'"
            " AND worker = ? RETURNING id",
            (until, task_id, attempt, worker),
        ).fetchone()
        if row is not None:
            alive.add(task_id)
    return alive


_FENCE = " WHERE id = ? AND attempt = ? AND status = 'running' AND worker = ?"
_GUARD = _FENCE + " RETURNING id"
#: A terminal transition returns the task as it committed (the waiters get it without a read).
_RETURNING_TASK = " RETURNING " + ", ".join(TASK_COLUMNS)
_ENDED = _FENCE + _RETURNING_TASK

#: What a terminal transition of the worker returns: the task's row (`TASK_COLUMNS`) and
#: its reference images' rows, or None when the attempt no longer held the task.
Ended = tuple[sqlite3.Row, list[sqlite3.Row]] | None


def _ended(conn: sqlite3.Connection, row: sqlite3.Row | None) -> Ended:
    if row is None:
        return None
    refs = []
    if row["refs"]:  # most tasks have none: skip the lookup
        refs = conn.execute(_REFERENCES, (row["id"],)).fetchall()
    return row, refs


def _succeed(
    conn: sqlite3.Connection, task_id: str, attempt: int, worker: str, rows: list[tuple[Any, ...]]
) -> Ended:
    now = _now()
    done = conn.execute(
        "UPDATE tasks SET status = 'succeeded', worker = NULL, lease_until = NULL,"
        " error_code = NULL, error_message = NULL, error_retryable = NULL,"
        " finished_at = ?, updated_at = ?" + _ENDED,
        (now, now, task_id, attempt, worker),
    ).fetchone()
    if done is None:
        return None
    conn.executemany(_INSERT_IMAGE, rows)
    _event(conn, task_id, attempt, "succeeded", "succeeded", now, worker)
    return _ended(conn, done)


def _retry(
    conn: sqlite3.Connection, task_id: str, attempt: int, worker: str, error: TaskError, delay_ms: int
) -> bool:
    detail = f"{error.code}: {error.message}"
    return _requeue(conn, task_id, attempt, worker, delay_ms, "retry", detail, released=False)


def _requeue(
    conn: sqlite3.Connection,
    task_id: str,
    attempt: int,
    worker: str,
    delay_ms: int,
    event: str,
    detail: str,
    *,
    released: bool,
) -> bool:
    """Put the current attempt's task back in the queue (a retry, or a release at shutdown,
    which hands the attempt back: it does not count against max_attempts)."""
    now = _now()
    done = conn.execute(
        "UPDATE tasks SET status = 'queued', worker = NULL, lease_until = NULL, run_after = ?,"
        " released = released + ?, updated_at = ?" + _GUARD,
        (now + delay_ms, int(released), now, task_id, attempt, worker),
    ).fetchone()
    if done is None:
        return False
    _event(conn, task_id, attempt, event, "queued", now, worker, detail)
    return True


def _fail(conn: sqlite3.Connection, task_id: str, attempt: int, worker: str, error: TaskError) -> Ended:
    now = _now()
    done = conn.execute(
        "UPDATE tasks SET status = 'failed', worker = NULL, lease_until = NULL, error_code = ?,"
        " error_message = ?, error_retryable = ?, finished_at = ?, updated_at = ?" + _ENDED,
        (error.code, error.message, int(error.retryable), now, now, task_id, attempt, worker),
    ).fetchone()
    if done is None:
        return None
    _refund(conn, task_id, now)
    _event(conn, task_id, attempt, "failed", "failed", now, worker, f"{error.code}: {error.message}")
    return _ended(conn, done)


def _release(conn: sqlite3.Connection, task_id: str, attempt: int, worker: str) -> bool:
    return _requeue(conn, task_id, attempt, worker, 0, "released", "the worker shut down", released=True)


def _cancel(conn: sqlite3.Connection, task_id: str, reason: str) -> Ended:
    now = _now()
    row = conn.execute(
        "UPDATE tasks SET status = 'cancelled', worker = NULL, lease_until = NULL,"
        " error_code = 'cancelled', error_message = ?, error_retryable = 0,"
        " finished_at = ?, updated_at = ?"
        " WHERE id = ? AND status IN ('queued', 'running')" + _RETURNING_TASK,
        (reason, now, now, task_id),
    ).fetchone()
    if row is None:
        return None
    _refund(conn, task_id, now)
    _event(conn, task_id, row["attempt"], "cancelled", "cancelled", now, None, reason)
    return _ended(conn, row)


def _grant(conn: sqlite3.Connection, owner: str, amount: int) -> int:
    now = _now()
    row = conn.execute(
        "INSERT INTO accounts (owner, balance, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (owner) DO UPDATE SET balance = accounts.balance + excluded.balance,"
        " updated_at = excluded.updated_at RETURNING balance",
        (owner, amount, now),
    ).fetchone()
    if row["balance"] < 0:
        raise ValidationError("amount", f"would leave {owner!r} with a negative balance ({row['balance']})")
    if amount > 0:
        # Refunds of the owner's unfinished charged tasks may still come back: count them,
        # so that no refund can ever take the balance past the limit.
        held = conn.execute(
            "SELECT coalesce(sum(cost), 0) FROM tasks INDEXED BY tasks_active"
            " WHERE owner = ? AND status IN ('queued', 'running')"
            " AND EXISTS (SELECT 1 FROM ledger WHERE task_id = tasks.id AND kind = 'charge')",
            (owner,),
        ).fetchone()[0]
        if row["balance"] + held > _config.MAX_CREDITS:
            raise ValidationError(
                "amount",
                f"would take {owner!r}'s balance to {row['balance']} (plus {held} charged to "
                "unfinished tasks), past the limit of 10**12",
            )
    conn.execute(
        "INSERT INTO ledger (owner, task_id, kind, amount, at) VALUES (?, NULL, 'grant', ?, ?)",
        (owner, amount, now),
    )
    return int(row["balance"])


def _prune_batch(conn: sqlite3.Connection, before_ms: int, size: int) -> tuple[int, list[str]]:
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?"
            " AND status IN ('succeeded', 'failed', 'cancelled') LIMIT ?",
            (before_ms, size),
        )
    ]
    if not ids:
        return 0, []
    marks = ",".join("?" * len(ids))
    paths = [r[0] for r in conn.execute(f"SELECT path FROM task_images WHERE task_id IN ({marks})", ids)]
    conn.execute(f"DELETE FROM task_images WHERE task_id IN ({marks})", ids)
    conn.execute(f"DELETE FROM task_events WHERE task_id IN ({marks})", ids)
    conn.execute(f"DELETE FROM tasks WHERE id IN ({marks})", ids)
    return len(ids), paths


#: The name of each write operation, for the fault hook (`imagetask.testing.OPERATIONS`).
_OPERATIONS: dict[Callable[..., Any], str] = {
    _submit_rows: "submit",
    _claim: "claim",
    _heartbeat: "heartbeat",
    _succeed: "succeed",
    _retry: "retry",
    _fail: "fail",
    _release: "release",
    _cancel: "cancel",
    _grant: "grant",
    _prune_batch: "prune",
    _add_token: "tokens",
    _revoke_tokens: "tokens",
}
