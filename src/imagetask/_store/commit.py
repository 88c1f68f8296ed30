"""The commit machinery's pure parts: batching writes into one transaction, a savepoint each;
answering their callers; checkpoints; telling busy and damaged databases apart."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .._exceptions import ImageTaskError, StoreError
from .transitions import _OPERATIONS, _submit_rows

if TYPE_CHECKING:
    from ..testing import Faults

log = logging.getLogger("imagetask")
T = TypeVar("T")

_Queued = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


def _coalesce(
    batch: list[_Queued],
) -> tuple[
    list[tuple[Callable[..., Any], tuple[Any, ...]]], list[tuple[list[asyncio.Future[Any]], list[int] | None]]
]:
    """Merge runs of non-atomic submits into one bulk submit (its rows that cannot fail on
    their own, see `_can_fail`, are then inserted with multi-row statements); other
    operations pass through one by one.

    Returns the operations to run and, for each, the futures to answer and (for a merged
    submit) how many result rows belong to each future.
    """
    ops: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
    waiters: list[tuple[list[asyncio.Future[Any]], list[int] | None]] = []
    # The merged submit at the end of ``ops``, if any: its rows, its futures, their sizes
    # (extended in place: a batch of n submits costs n, not n squared).
    merged: tuple[list[Any], list[asyncio.Future[Any]], list[int]] | None = None
    for fn, args, fut in batch:
        if fn is _submit_rows and not args[1]:
            if merged is None:
                merged = ([], [], [])
                ops.append((_submit_rows, (merged[0], False)))
                waiters.append((merged[1], merged[2]))
            merged[0].extend(args[0])
            merged[1].append(fut)
            merged[2].append(len(args[0]))
            continue
        merged = None
        ops.append((fn, args))
        waiters.append(([fut], None))
    return ops, waiters


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any, path: Path) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    elif isinstance(value, sqlite3.DatabaseError):
        fut.set_exception(store_error(path, value))
    else:
        fut.set_exception(value)


def _settle_outcomes(outcomes: list[tuple[bool, Any]], waiters: list[Any], path: Path) -> None:
    """Answer each caller of a committed batch (see `_coalesce`)."""
    for (ok, value), (futures, sizes) in zip(outcomes, waiters, strict=True):
        if ok and sizes is not None:  # a merged submit: each caller gets its slice
            start = 0
            for fut, size in zip(futures, sizes, strict=True):
                _settle(fut, True, value[start : start + size], path)
                start += size
        else:
            for fut in futures:
                _settle(fut, ok, value, path)


def _fail_all(batch: Sequence[_Queued], exc: BaseException) -> None:
    for _, _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)


def _batch_transaction(
    conn: sqlite3.Connection,
    ops: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]],
    checkpoint: bool = False,
    faults: Faults | None = None,
) -> list[tuple[bool, Any]]:
    """Run write operations in one transaction, each in a savepoint; (ok, result or error)
    each. With ``checkpoint``, finish a checkpoint after the commit (in the same hop).
    ``faults``: the test hook (see `imagetask.testing.Faults`)."""
    try:
        return _batch(conn, ops, faults)
    finally:
        if checkpoint:
            _checkpoint_quietly(conn)


def _run_op(
    conn: sqlite3.Connection, op: tuple[Callable[..., Any], tuple[Any, ...]], faults: Faults | None
) -> Any:
    fn, args = op
    if faults is not None:
        faults.before(_OPERATIONS[fn])
    return fn(conn, *args)


def _batch(
    conn: sqlite3.Connection,
    ops: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]],
    faults: Faults | None,
) -> list[tuple[bool, Any]]:
    outcomes: list[tuple[bool, Any]] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        if len(ops) == 1:  # nothing to isolate it from: the transaction is its savepoint
            try:
                outcomes.append((True, _run_op(conn, ops[0], faults)))
            except ImageTaskError as exc:
                conn.execute("ROLLBACK")
                return [(False, exc)]
        else:
            for op in ops:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, _run_op(conn, op, faults)))
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    outcomes.append((False, exc))
                conn.execute("RELEASE op")
        if faults is not None:
            for fn, _ in ops:
                faults.before_commit(_OPERATIONS[fn])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if faults is not None:
        for i, (fn, _) in enumerate(ops):
            try:
                error = faults.after_commit(_OPERATIONS[fn])
            except Exception as exc:  # a planned call raised: this operation's outcome alone
                error = exc
            if error is not None and outcomes[i][0]:
                outcomes[i] = (False, error)
    return outcomes


#: The most task rows one commit on the event loop's thread may insert (a few ms of work at
#: most); bigger submits, or more at once, go to the writer's thread so the loop is not held.
_INLINE_MAX_ROWS = 128

#: The store checkpoints once its commits have added about this many pages to the WAL
#: (SQLite's own default). A write touches about one leaf per b-tree it changes (the task
#: table and its indexes, images, events), plus a page per four more submitted rows.
_CHECKPOINT_PAGES = 1000
_PAGES_PER_WRITE = 6
#: SQLite's automatic checkpoint in the committing writer, kept only in case the estimate
#: above is far off.
_SAFETY_CHECKPOINT_PAGES = 20_000


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _checkpoint_quietly(conn: sqlite3.Connection) -> None:
    """A checkpoint after writes that have committed: a failure is logged, never raised
    (it must not turn their callers' success into an error)."""
    try:
        _checkpoint(conn)
    except Exception as exc:
        log.warning("checkpointing the WAL failed: %s", exc)


def _checkpoint_file(path: Path, durability: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
        _checkpoint(conn)
    finally:
        conn.close()


def is_damage(exc: BaseException) -> bool:
    """Whether an error (a `StoreError` or the sqlite3 error under it) says the database
    file is damaged: SQLITE_CORRUPT or SQLITE_NOTADB."""
    cause = exc if isinstance(exc, sqlite3.Error) else exc.__cause__
    return isinstance(cause, sqlite3.Error) and getattr(cause, "sqlite_errorcode", 0) & 0xFF in (11, 26)


#: How long a writer or reader connection waits for a lock (``PRAGMA busy_timeout``).
BUSY_TIMEOUT = 10.0


def store_error(path: Path, exc: sqlite3.Error) -> StoreError:
    """The `StoreError` for a database error on ``path`` (``exc`` is its cause); a lock
    waited out says so and what to do."""
    message = f"{path}: {exc}"
    if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
        message += (
            f" (another connection held the write lock for more than {BUSY_TIMEOUT:.0f} s;"
            " try again once it lets go)"
        )
    error = StoreError(message)
    error.__cause__ = exc
    return error


def is_locked(exc: BaseException) -> bool:
    """Whether an error (a `StoreError` or the sqlite3 error under it) says another
    connection held the lock for longer than the busy timeout."""
    cause = exc if isinstance(exc, sqlite3.Error) else exc.__cause__
    return isinstance(cause, sqlite3.OperationalError) and _is_busy(cause)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (any extended code): another connection has the lock."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in (5, 6)


def _read_transaction(
    conn: sqlite3.Connection, fn: Callable[..., T], faults: Faults | None, operation: str, *args: Any
) -> T:
    conn.execute("BEGIN")
    try:
        if faults is not None:
            faults.before(operation)
        return fn(conn, *args)
    finally:
        conn.execute("COMMIT")
