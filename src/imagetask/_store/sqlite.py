"""The SQLite store: its read connections, and every method of the contract, each one
transaction handed to the `Writer` or one read."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiosqlite

from .._dbcheck import check_database
from .._exceptions import ImageTaskError, StoreClosed, StoreError
from .._models import StoredImage, Task, TaskError, TaskEvent, now_ms
from .commit import (
    _INLINE_MAX_ROWS,
    _read_transaction,
    store_error,
)
from .connections import connect_inline
from .reads import (
    _GET_ONE,
    _balance,
    _data_version,
    _events,
    _file_state,
    _get_one,
    _health,
    _select_tasks,
    _statuses,
    list_sql,
    pending_sql,
)
from .records import WOULD_WAIT, Changes, Claimed, SubmitRow, Submitted, Versions, _WouldWait
from .rows import Rows
from .schema import MIGRATIONS, migrate
from .tokens import TokenRow, _add_token, _events_after, _last_event, _revoke_tokens, _token, _tokens
from .transitions import (
    _cancel,
    _claim,
    _fail,
    _grant,
    _heartbeat,
    _image_row,
    _prune_batch,
    _release,
    _retry,
    _submit_rows,
    _succeed,
)
from .writer import Writer, connect_configured, run_on

if TYPE_CHECKING:
    from ..testing import Faults

__all__ = ["Store"]

log = logging.getLogger("imagetask")
#: The reference rows of a submit without reference images (shared, never mutated).
_NO_REFS: list[tuple[Any, ...]] = []
T = TypeVar("T")
_now = now_ms
#: The most rows a read may return on the loop's thread (a page of `list`, a small `pending`).
_INLINE_READ_ROWS = 200


class Store:
    """The SQLite store of one database file.

    Args:
        path: The database file (created if missing).
        images_root: Folder the relative image paths in the database are under.
        durability: ``"normal"`` (synchronous=NORMAL: survives a process crash) or
            ``"full"`` (synchronous=FULL: also survives power loss).
        faults: Faults to inject, for tests (see `imagetask.testing`).
    """

    def __init__(
        self, path: Path, images_root: Path, durability: str = "normal", faults: Faults | None = None
    ) -> None:
        if durability not in ("normal", "full"):
            raise ValueError("durability: must be 'normal' or 'full'")
        self.path = path
        self.images_root = images_root
        self._rows = Rows(images_root)
        self.durability = durability
        #: The write side: both write connections, group commit, checkpoints.
        self._writer = Writer(path, durability, faults)
        self._reader: aiosqlite.Connection | None = None
        #: A read-only connection used on the event loop's own thread for point reads.
        self._inline: sqlite3.Connection | None = None

    @property
    def faults(self) -> Faults | None:
        """The test hook: faults injected into this store's operations (None in production)."""
        return self._writer.faults

    @faults.setter
    def faults(self, faults: Faults | None) -> None:
        self._writer.faults = faults

    # -- lifecycle --

    async def open(self) -> None:
        """Connect, check the file, and run pending migrations.

        Raises:
            StoreError: the file is not SQLite, not an imagetask database, or newer
                than this version of imagetask.
        """
        # Read-only, before any connection that could write: a foreign or damaged file is
        # refused untouched (not even switched to WAL). In a thread: a big file takes a while.
        await asyncio.to_thread(check_database, self.path, MIGRATIONS)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the folder of the database {self.path}: {exc.strerror or exc}"
            ) from None
        try:
            await self._writer.open(self._migrate)
            self._reader = await connect_configured(self.path, self.durability, query_only=True)
            self._inline = connect_inline(self.path)
        except BaseException:
            await self.close()
            raise

    def _migrate(self, conn: sqlite3.Connection) -> None:
        migrate(conn, self.path)

    async def close(self) -> None:
        """Finish queued writes, then close the connections (safe to call twice)."""
        await self._writer.close()
        inline, self._inline = self._inline, None
        if inline is not None:
            inline.close()
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()

    # -- reads --

    async def _read(self, operation: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in one read transaction (one consistent snapshot) on the reader."""
        if self._reader is None:
            raise StoreClosed()
        result: T = await run_on(
            self._reader, self.path, _read_transaction, fn, self.faults, operation, *args
        )
        self._after_read(operation)
        return result

    def _read_small(
        self, operation: str, fn: Callable[..., T], *args: Any, snapshot: bool = True
    ) -> T | _WouldWait:
        """Run a small read (a few hundred rows at most) in one read transaction on the
        loop's own read connection: no thread hop, which costs more than the read. It never
        waits: `WOULD_WAIT` when SQLite says it would (then use `_read`). With ``snapshot``
        False, each statement is its own read transaction (two statements fewer, for reads
        whose statements need no common snapshot)."""
        conn = self._inline
        if conn is None:
            raise StoreClosed()
        try:
            if snapshot:
                conn.execute("BEGIN")
            try:
                if self.faults is not None:
                    self.faults.before(operation)
                result = fn(conn, *args)
            finally:
                if snapshot:
                    conn.execute("COMMIT")
        except sqlite3.OperationalError:  # busy or locked
            return WOULD_WAIT
        except sqlite3.DatabaseError as exc:
            raise store_error(self.path, exc) from exc
        return result  # the caller runs `_after_read` once it keeps the result

    def _after_read(self, operation: str) -> None:
        """The test hook's point once a read has answered: a planned error (or whatever a
        planned call raises) reaches the caller as the database's own error would."""
        if self.faults is None:
            return
        try:
            error = self.faults.after_commit(operation)
        except sqlite3.DatabaseError as exc:
            raise store_error(self.path, exc) from exc
        if isinstance(error, sqlite3.DatabaseError):
            raise store_error(self.path, error) from error
        if error is not None:
            raise error

    # -- submit --

    def submit(
        self, rows: Sequence[SubmitRow], *, atomic: bool
    ) -> Awaitable[list[Submitted | ImageTaskError]]:
        """Insert tasks in one transaction, a savepoint each.

        With ``atomic`` the first error rolls everything back and is raised; otherwise
        each row succeeds or fails on its own and its error is returned in its place.
        ``created_at`` is the time inside the transaction (`Submitted.at`).

        A plain method returning the write's future, not a coroutine: a web app's burst
        holds a hundred submits in flight at once, and every object each one keeps alive
        until its commit is work for the garbage collector.
        """
        if any(r.references for r in rows):
            relative = self._rows.relative
            pairs = [
                (r, [_image_row(r.id, "reference", 0, relative(im), im) for im in r.references]) for r in rows
            ]
        else:
            pairs = [(r, _NO_REFS) for r in rows]
        if len(rows) <= _INLINE_MAX_ROWS:
            return self._writer.write_small(len(rows), _submit_rows, pairs, atomic)
        return self._writer.write(_submit_rows, pairs, atomic)

    # -- worker transitions --

    async def claim(
        self,
        worker: str,
        limit: int,
        per_owner: int,
        lease: float,
        *,
        held: Sequence[tuple[str, int]] = (),
        gone: Callable[[str], bool] | None = None,
        provider: str = "",
    ) -> tuple[list[Claimed], list[str], int | None]:
        """See `TaskStore.claim`; one transaction on the writer's thread."""
        raw, ended, next_run = await self._writer.write(
            _claim, worker, limit, per_owner, int(lease * 1000), frozenset(held), gone, provider
        )
        claimed = [self._rows.claimed(row, refs, retries) for row, refs, retries in raw]
        return claimed, ended, next_run

    async def heartbeat(self, worker: str, held: Sequence[tuple[str, int]], lease: float) -> set[str]:
        """Renew the leases of ``held`` (id, attempt) pairs; return the ids still held."""
        if not held:
            return set()
        return await self._writer.write(_heartbeat, worker, held, int(lease * 1000))

    async def succeed(
        self, task_id: str, attempt: int, worker: str, images: Sequence[StoredImage]
    ) -> Task | None:
        """Mark an attempt succeeded with its images: the task as committed, or None if the
        attempt lost its claim."""
        rows = [_image_row(task_id, "output", attempt, self._rows.relative(im), im) for im in images]
        return self._rows.ended(await self._writer.write(_succeed, task_id, attempt, worker, rows), images)

    async def retry(self, task_id: str, attempt: int, worker: str, error: TaskError, delay: float) -> bool:
        """Put a failed attempt back in the queue after ``delay`` seconds."""
        return await self._writer.write(_retry, task_id, attempt, worker, error, int(delay * 1000))

    async def fail(self, task_id: str, attempt: int, worker: str, error: TaskError) -> Task | None:
        """Fail a task for good (refunding any charge): the task as committed, or None if the
        attempt lost its claim."""
        return self._rows.ended(await self._writer.write(_fail, task_id, attempt, worker, error))

    async def release(self, task_id: str, attempt: int, worker: str) -> bool:
        """Give a running task back to the queue at once (graceful shutdown); the attempt
        does not count against ``max_attempts``. A small write: the hand-backs of a shutdown,
        made in one turn of the loop, commit together."""
        return await self._writer.write_small(1, _release, task_id, attempt, worker)

    async def cancel(self, task_id: str, reason: str) -> Task | None:
        """Cancel a queued or running task (refunding any charge): the task as committed, or
        None if it had ended (or does not exist)."""
        return self._rows.ended(await self._writer.write_small(1, _cancel, task_id, reason))

    # -- credits --

    async def grant(self, owner: str, amount: int) -> int:
        """Add ``amount`` credits (negative to take away); return the new balance."""
        return await self._writer.write_small(1, _grant, owner, amount)

    async def balance(self, owner: str) -> int:
        """The owner's balance (0 for an unknown owner)."""
        return await self._read("balance", _balance, owner)

    # -- reads --

    async def get(self, task_id: str) -> Task | None:
        """One task by id, or None: one statement on the reader's thread, which may wait for
        a lock (`try_get` is the loop-thread read that never waits; call it first)."""
        rows = await self._read("get", _get_one, task_id)
        return self._rows.task_from_join(rows) if rows else None

    def try_get(self, task_id: str) -> Task | _WouldWait | None:
        """`get` on the loop's thread, without waiting: `WOULD_WAIT` if SQLite says it would
        have to wait for a lock (then call `get`)."""
        if self._inline is None:
            raise StoreClosed()
        try:
            if self.faults is not None:
                self.faults.before("get")
            rows = self._inline.execute(_GET_ONE, (task_id,)).fetchall()
        except sqlite3.OperationalError:  # busy or locked
            return WOULD_WAIT
        except sqlite3.DatabaseError as exc:
            raise store_error(self.path, exc) from exc
        self._after_read("get")
        return self._rows.task_from_join(rows) if rows else None

    async def pending(self, owner: str | None) -> list[Task]:
        """Queued and running tasks, newest first: on the loop's thread when there are few
        (a bounded first read), else the whole set on the reader's thread."""
        sql, args = pending_sql(owner)
        # No snapshot needed: a second statement, when there is one, is for the reference
        # images of queued and running tasks, which never change; output images it may see
        # (a success committed between the two statements) are dropped (`Rows.tasks`).
        found = self._read_small(
            "pending", _select_tasks, f"{sql} LIMIT {_INLINE_READ_ROWS + 1}", args, snapshot=False
        )
        if found is WOULD_WAIT or len(found[0]) > _INLINE_READ_ROWS:
            found = await self._read("pending", _select_tasks, sql, args)
        else:
            self._after_read("pending")
        return self._rows.tasks(found)

    async def list_tasks(
        self, owner: str | None, status: str | None, limit: int, before: str | None
    ) -> list[Task]:
        """Tasks newest first, filtered, one page of ``limit`` ids lower than ``before`` (a
        page of up to 200 is read on the loop's thread)."""
        sql, args = list_sql(owner, status, limit, before)
        found = (
            self._read_small("list", _select_tasks, sql, args) if limit <= _INLINE_READ_ROWS else WOULD_WAIT
        )
        if found is WOULD_WAIT:
            found = await self._read("list", _select_tasks, sql, args)
        else:
            self._after_read("list")
        return self._rows.tasks(found)

    async def statuses(self, ids: Sequence[str]) -> dict[str, str]:
        """The status of each of ``ids`` that exists, read in one snapshot."""
        return await self._read("statuses", _statuses, list(ids))

    async def changes_since(self, token: object | None) -> tuple[object, Changes]:
        """Compare ``PRAGMA data_version`` values, which move when another connection commits.

        First the point-read connection's (a pragma takes no lock, so it is read inline):
        unchanged means nothing committed. Otherwise the write connections' tell whose
        commit it was. Each of them moves only for the *other* connections' commits; with
        two writers here (the threaded one, and the fast one on the loop's thread), a commit
        from anywhere else moves both, while this store's own commits each move only one.
        So if either is unchanged since the baseline, only this store wrote. The baseline
        moves only when OTHERS is answered: a foreign commit is never skipped past.
        """
        if self._inline is None:
            raise StoreClosed()
        try:
            current = _data_version(self._inline)
        except sqlite3.DatabaseError as exc:
            raise store_error(self.path, exc) from exc
        seen = token if isinstance(token, Versions) else None
        if seen is not None and seen.reader == current:
            return seen, Changes.NONE
        return Versions.compare(seen, current, await self._writer.versions())

    async def events(self, task_id: str) -> list[TaskEvent]:
        """The event log of one task, oldest first."""
        return await self._read("events", _events, task_id)

    async def health(self) -> dict[str, Any]:
        """What `TaskManager.health` reports: schema version, integrity, WAL size, counts."""
        found = await self._read("health", _health, _now())
        synchronous = await self._writer.synchronous()
        found["durability"] = {1: "normal", 2: "full"}.get(synchronous, f"synchronous={synchronous}")
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            found["wal_bytes"] = wal.stat().st_size
        except FileNotFoundError:
            found["wal_bytes"] = 0
        return found

    # -- housekeeping --

    async def prune(self, before_ms: int) -> tuple[int, list[str]]:
        """Delete terminal tasks that finished before ``before_ms``, in batches.

        Returns:
            (tasks deleted, relative paths of their images, references included).
        """
        count, paths = 0, []
        while True:
            deleted, batch = await self._writer.write(_prune_batch, before_ms, 500)
            count += deleted
            paths.extend(batch)
            if deleted < 500:
                return count, paths

    async def file_state(self, task_ids: Sequence[str]) -> tuple[dict[str, tuple[str, int]], set[str]]:
        """For the image sweep: (id -> (status, attempt)) and every referenced path."""
        return await self._read("file_state", _file_state, list(task_ids))

    # -- the web door: API tokens, and the event feed --

    async def add_token(self, token_id: str, owner: str, digest: str, label: str | None) -> int:
        """Store a token's digest; returns when it was created (ms)."""
        return await self._writer.write_small(1, _add_token, token_id, owner, digest, label)

    def try_token(self, token_id: str) -> TokenRow | _WouldWait | None:
        """One token row, read on the loop's thread (`WOULD_WAIT` if that would wait)."""
        found = self._read_small("token", _token, token_id)
        if found is not WOULD_WAIT:
            self._after_read("token")
        return found

    async def token(self, token_id: str) -> TokenRow | None:
        """One token row, on the reader's thread."""
        return await self._read("token", _token, token_id)

    async def tokens(self, owner: str | None) -> list[TokenRow]:
        """Every token row (of ``owner``), oldest first."""
        return await self._read("token", _tokens, owner)

    async def revoke_tokens(self, token_id: str | None, owner: str | None) -> int:
        """Revoke one token by id, or every live one of ``owner``."""
        return await self._writer.write_small(1, _revoke_tokens, token_id, owner)

    def try_events_after(self, after: int, owner: str | None, limit: int) -> list[TaskEvent] | _WouldWait:
        """Events after ``after``, on the loop's thread (up to 200 at a time)."""
        found = self._read_small("feed", _events_after, after, owner, min(limit, _INLINE_READ_ROWS))
        if found is not WOULD_WAIT:
            self._after_read("feed")
        return found

    async def events_after(self, after: int, owner: str | None, limit: int) -> list[TaskEvent]:
        """Events after ``after``, on the reader's thread."""
        return await self._read("feed", _events_after, after, owner, limit)

    async def last_event(self) -> int:
        """The highest event ``seq``."""
        return await self._read("feed", _last_event)
