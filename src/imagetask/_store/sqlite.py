"""The SQLite store: its connections, group commit, loop-thread commits and checkpoints, and the
store's methods, each one transaction handed to that machinery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiosqlite

from .._dbcheck import check_database
from .._exceptions import ImageTaskError, StoreError
from .._models import StoredImage, Task, TaskError, TaskEvent, now_ms
from .commit import (
    _CHECKPOINT_PAGES,
    _INLINE_MAX_ROWS,
    _PAGES_PER_WRITE,
    _batch_transaction,
    _checkpoint_file,
    _checkpoint_quietly,
    _coalesce,
    _fail_all,
    _is_busy,
    _Queued,
    _read_transaction,
    _settle_outcomes,
)
from .connections import configure, connect_fast, connect_inline, connect_threaded
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
    _synchronous,
    list_sql,
    pending_sql,
)
from .records import WOULD_WAIT, Changes, Claimed, SubmitRow, Submitted, Versions, _WouldWait
from .rows import Rows
from .schema import MIGRATIONS, migrate
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

if TYPE_CHECKING:
    from ..testing import Faults

__all__ = ["Store"]

log = logging.getLogger("imagetask")
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
        #: The test hook: faults injected into this store's transactions (None in production).
        self.faults = faults
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        #: A read-only connection used on the event loop's own thread for point reads.
        self._inline: sqlite3.Connection | None = None
        #: A write connection on the event loop's own thread for small writes while the
        #: threaded writer is idle: no thread hop. Never waits for a lock, never checkpoints
        #: (see `_write_small`). None with durability="full" (an fsync per commit).
        self._fast: sqlite3.Connection | None = None
        self._fast_commits = 0
        self._wal_pages = 0
        #: The bulk of a checkpoint is done; the writer copies the rest after its next commit.
        self._finish_checkpoint = False
        #: Small writes waiting for the end of this turn of the event loop.
        self._small: list[_Queued] = []
        self._small_rows = 0
        self._checkpoint: asyncio.Task[None] | None = None
        self._queue: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        self._committer: asyncio.Task[None] | None = None
        #: A commit is in flight (a caller's own, or the committer task's).
        self._busy = False

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
            self._writer = await self._connect(query_only=False)
            await self._run(self._writer, self._migrate)
            self._reader = await self._connect(query_only=True)
            self._inline = connect_inline(self.path)
            if self.durability == "normal":
                self._fast = connect_fast(self.path)
        except BaseException:
            await self.close()
            raise

    async def _connect(self, *, query_only: bool) -> aiosqlite.Connection:
        conn = await connect_threaded(self.path)
        try:
            await self._run(conn, configure, self.path, self.durability, query_only)
        except BaseException:
            await conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        migrate(conn, self.path)

    async def close(self) -> None:
        """Finish queued writes, then close the connections (safe to call twice)."""
        self._flush_small()
        if self._committer is not None:
            try:
                await self._committer
            except Exception:
                pass  # its callers got the error
        if self._checkpoint is not None:
            with contextlib.suppress(Exception):
                await self._checkpoint
        for attr in ("_inline", "_fast"):
            conn = getattr(self, attr)
            setattr(self, attr, None)
            if conn is not None:
                conn.close()
        for attr in ("_reader", "_writer"):
            conn = getattr(self, attr)
            setattr(self, attr, None)
            if conn is not None:
                await conn.close()

    # -- plumbing --

    async def _run(self, conn: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(sqlite3_connection, *args)`` on the connection's thread, in one hop.

        aiosqlite has no public way to run a callable on its thread; ``_execute`` is the
        one private call we depend on (pinned in pyproject.toml).
        """
        try:
            return await conn._execute(fn, conn._conn, *args)  # type: ignore[no-untyped-call,no-any-return]
        except ImageTaskError:
            raise
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in a write transaction and return its result.

        Group commit: writes that are queued together (concurrent submits, the finishes of
        attempts that end at once, claims, heartbeats) run in one ``BEGIN IMMEDIATE`` ...
        ``COMMIT`` on the writer's thread, in one hop, each inside its own savepoint. An
        operation that raises is rolled back alone and its caller gets the error; every
        caller is answered only after the commit that holds its changes.
        """
        if self._writer is None:
            raise StoreError("the store is closed")
        if not self._busy:
            # The writer is idle: commit this operation at once, in this coroutine (one hop,
            # no task switch). Its batch is itself alone, so a cancellation of this caller can
            # strand no one else; writes that arrive meanwhile queue for the committer task.
            self._busy = True
            finish, self._finish_checkpoint = self._finish_checkpoint, False
            try:
                ((ok, value),) = await self._run(
                    self._writer, _batch_transaction, [(fn, args)], finish, self.faults
                )
            finally:
                self._busy = False
                if self._queue:
                    self._start_committer()
            self._count_wal(_PAGES_PER_WRITE)
            if self.faults is not None:
                self.faults.committed("writer")
            if not ok:
                raise (
                    StoreError(f"{self.path}: {value}") if isinstance(value, sqlite3.DatabaseError) else value
                )
            result: T = value
            return result
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((fn, args, fut))
        return await fut  # type: ignore[no-any-return]

    async def _write_small(self, rows: int, fn: Callable[..., T], *args: Any) -> T:
        """Like `_write`, for a write of a few rows, committed on the event loop's thread.

        Small writes made in the same turn of the event loop are committed together, at
        the end of that turn, by the fast connection: no thread hop (a WAL commit with
        synchronous=NORMAL writes pages but does not fsync). They go to the threaded
        writer's group commit instead when it is busy, when they add up to more than
        ``_INLINE_MAX_ROWS`` rows (the loop would be held too long), or when another
        connection holds the lock (the threaded writer may wait for it; the loop must not).
        """
        if self._fast is None:
            return await self._write(fn, *args)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._small.append((fn, args, fut))
        self._small_rows += rows
        if len(self._small) == 1:
            loop.call_soon(self._flush_small)
        return await fut  # type: ignore[no-any-return]

    def _flush_small(self) -> None:
        batch, self._small = self._small, []
        rows, self._small_rows = self._small_rows, 0
        if not batch:
            return
        if self._fast is None or self._busy or rows > _INLINE_MAX_ROWS:
            self._hand_to_writer(batch)
            return
        ops, waiters = _coalesce(batch)
        try:
            outcomes = _batch_transaction(self._fast, ops, faults=self.faults)
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):  # another connection holds the lock: wait for it on the thread
                self._hand_to_writer(batch)
            else:
                _fail_all(batch, StoreError(f"{self.path}: {exc}"))
            return
        except BaseException as exc:
            _fail_all(batch, StoreError(f"{self.path}: {exc}") if isinstance(exc, sqlite3.Error) else exc)
            if not isinstance(exc, Exception):
                raise
            return
        _settle_outcomes(outcomes, waiters, self.path)
        self._fast_commits += 1
        if self.faults is not None:
            self.faults.committed("loop")
        # Roughly the pages this commit appended to the WAL: each touched b-tree leaf, once.
        self._count_wal(_PAGES_PER_WRITE + rows // 4)
        if self._finish_checkpoint and not self._busy:
            self._finish_checkpoint = False
            self._checkpoint = asyncio.create_task(self._finish_checkpoint_now(), name="imagetask-checkpoint")

    def _count_wal(self, pages: int) -> None:
        """Add an estimate of the pages a commit appended to the WAL; past about 1,000, start
        a checkpoint (unless one is under way)."""
        self._wal_pages += pages
        if self._wal_pages >= _CHECKPOINT_PAGES and (self._checkpoint is None or self._checkpoint.done()):
            self._wal_pages = 0
            self._checkpoint = asyncio.create_task(self._run_checkpoint(), name="imagetask-checkpoint")

    def _hand_to_writer(self, batch: list[_Queued]) -> None:
        if self._writer is None:
            _fail_all(batch, StoreError("the store is closed"))
            return
        self._queue.extend(batch)
        if not self._busy:
            self._start_committer()

    async def _run_checkpoint(self) -> None:
        """Copy the WAL back into the database without holding up writes for long.

        First the bulk, on a short-lived connection in a worker thread, while writes go on
        (a PASSIVE checkpoint takes no lock a writer needs): about 50 ms for 1,000 pages
        here, mostly two fsyncs. Then the writer copies the few pages that arrived meanwhile
        (a few ms), right after its next commit, or at once if it is idle: with every frame
        copied, the next write starts the WAL over from its beginning, so the file stops
        growing. (SQLite's own automatic checkpoint would do all of it inside a commit.)
        """
        try:
            await asyncio.to_thread(_checkpoint_file, self.path, self.durability)
        except Exception as exc:
            log.warning("checkpointing %s failed: %s", self.path, exc)
            return
        if self._busy:
            self._finish_checkpoint = True  # the committer does it after its next batch
        else:
            await self._finish_checkpoint_now()

    async def _finish_checkpoint_now(self) -> None:
        if self._writer is None or self._busy:
            self._finish_checkpoint = True
            return
        self._busy = True
        try:
            await self._run(self._writer, _checkpoint_quietly)
        finally:
            self._busy = False
            if self._queue:
                self._start_committer()

    def _start_committer(self) -> None:
        self._busy = True
        self._committer = asyncio.create_task(self._commit_all(), name="imagetask-commit")

    async def _commit_all(self) -> None:
        try:
            await self._commit_queued()
        finally:
            self._busy = False

    async def _commit_queued(self) -> None:
        assert self._writer is not None
        while self._queue:
            batch, self._queue = self._queue, []
            ops, waiters = _coalesce(batch)
            finish, self._finish_checkpoint = self._finish_checkpoint, False
            try:
                outcomes = await self._run(self._writer, _batch_transaction, ops, finish, self.faults)
            except BaseException as exc:
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            _settle_outcomes(outcomes, waiters, self.path)
            self._count_wal(_PAGES_PER_WRITE * len(batch))
            if self.faults is not None:
                self.faults.committed("writer")

    async def _read(self, operation: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in one read transaction (one consistent snapshot) on the reader."""
        if self._reader is None:
            raise StoreError("the store is closed")
        result: T = await self._run(self._reader, _read_transaction, fn, self.faults, operation, *args)
        self._after_read(operation)
        return result

    def _read_small(self, operation: str, fn: Callable[..., T], *args: Any) -> T | _WouldWait:
        """Run a small read (a few hundred rows at most) in one read transaction on the
        loop's own read connection: no thread hop, which costs more than the read. It never
        waits: `WOULD_WAIT` when SQLite says it would (then use `_read`)."""
        conn = self._inline
        if conn is None:
            raise StoreError("the store is closed")
        try:
            conn.execute("BEGIN")
            try:
                if self.faults is not None:
                    self.faults.before(operation)
                result = fn(conn, *args)
            finally:
                conn.execute("COMMIT")
        except sqlite3.OperationalError:  # busy or locked
            return WOULD_WAIT
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        self._after_read(operation)
        return result

    def _after_read(self, operation: str) -> None:
        if self.faults is not None:
            error = self.faults.after_commit(operation)
            if isinstance(error, sqlite3.DatabaseError):
                raise StoreError(f"{self.path}: {error}") from error
            if error is not None:
                raise error

    # -- submit --

    async def submit(self, rows: Sequence[SubmitRow], *, atomic: bool) -> list[Submitted | ImageTaskError]:
        """Insert tasks in one transaction, a savepoint each.

        With ``atomic`` the first error rolls everything back and is raised; otherwise
        each row succeeds or fails on its own and its error is returned in its place.
        ``created_at`` is the time inside the transaction (`Submitted.at`).
        """
        refs = [
            [_image_row(r.id, "reference", 0, self._rows.relative(im), im) for im in r.references]
            for r in rows
        ]
        pairs = list(zip(rows, refs, strict=True))
        if len(rows) <= _INLINE_MAX_ROWS:
            return await self._write_small(len(rows), _submit_rows, pairs, atomic)
        return await self._write(_submit_rows, pairs, atomic)

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
        raw, ended, next_run = await self._write(
            _claim, worker, limit, per_owner, int(lease * 1000), frozenset(held), gone, provider
        )
        claimed = [self._rows.claimed(row, refs, retries) for row, refs, retries in raw]
        return claimed, ended, next_run

    async def heartbeat(self, worker: str, held: Sequence[tuple[str, int]], lease: float) -> set[str]:
        """Renew the leases of ``held`` (id, attempt) pairs; return the ids still held."""
        if not held:
            return set()
        return await self._write(_heartbeat, worker, held, int(lease * 1000))

    async def succeed(self, task_id: str, attempt: int, worker: str, images: Sequence[StoredImage]) -> bool:
        """Mark an attempt succeeded with its images; False if the attempt lost its claim."""
        rows = [_image_row(task_id, "output", attempt, self._rows.relative(im), im) for im in images]
        return await self._write(_succeed, task_id, attempt, worker, rows)

    async def retry(self, task_id: str, attempt: int, worker: str, error: TaskError, delay: float) -> bool:
        """Put a failed attempt back in the queue after ``delay`` seconds."""
        return await self._write(_retry, task_id, attempt, worker, error, int(delay * 1000))

    async def fail(self, task_id: str, attempt: int, worker: str, error: TaskError) -> bool:
        """Fail a task for good (refunding any charge); False if the attempt lost its claim."""
        return await self._write(_fail, task_id, attempt, worker, error)

    async def release(self, task_id: str, attempt: int, worker: str) -> bool:
        """Give a running task back to the queue at once (graceful shutdown); the attempt
        does not count against ``max_attempts``."""
        return await self._write(_release, task_id, attempt, worker)

    async def cancel(self, task_id: str, reason: str) -> bool:
        """Cancel a queued or running task (refunding any charge); False if it had ended."""
        return await self._write_small(1, _cancel, task_id, reason)

    # -- credits --

    async def grant(self, owner: str, amount: int) -> int:
        """Add ``amount`` credits (negative to take away); return the new balance."""
        return await self._write_small(1, _grant, owner, amount)

    async def balance(self, owner: str) -> int:
        """The owner's balance (0 for an unknown owner)."""
        return await self._read("balance", _balance, owner)

    # -- reads --

    async def get(self, task_id: str) -> Task | None:
        """One task by id, or None: one statement, served on the loop's thread when possible."""
        task = self.try_get(task_id)
        if task is WOULD_WAIT:  # let the threaded reader wait for the lock
            rows = await self._read("get", _get_one, task_id)
            return self._rows.task_from_join(rows) if rows else None
        return task

    def try_get(self, task_id: str) -> Task | _WouldWait | None:
        """`get` on the loop's thread, without waiting: `WOULD_WAIT` if SQLite says it would
        have to wait for a lock (then call `get`)."""
        if self._inline is None:
            raise StoreError("the store is closed")
        try:
            if self.faults is not None:
                self.faults.before("get")
            rows = self._inline.execute(_GET_ONE, (task_id,)).fetchall()
        except sqlite3.OperationalError:  # busy or locked
            return WOULD_WAIT
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        self._after_read("get")
        return self._rows.task_from_join(rows) if rows else None

    async def pending(self, owner: str | None) -> list[Task]:
        """Queued and running tasks, newest first: on the loop's thread when there are few
        (a bounded first read), else the whole set on the reader's thread."""
        sql, args = pending_sql(owner)
        found = self._read_small("pending", _select_tasks, f"{sql} LIMIT {_INLINE_READ_ROWS + 1}", args)
        if found is WOULD_WAIT or len(found[0]) > _INLINE_READ_ROWS:
            found = await self._read("pending", _select_tasks, sql, args)
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
        if self._inline is None or self._writer is None:
            raise StoreError("the store is closed")
        try:
            current = _data_version(self._inline)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        seen = token if isinstance(token, Versions) else None
        if seen is not None and seen.reader == current:
            return seen, Changes.NONE
        return Versions.compare(seen, current, await self._writer_versions())

    async def _writer_versions(self) -> tuple[int, ...]:
        assert self._writer is not None
        threaded = await self._run(self._writer, _data_version)
        if self._fast is None:
            return (threaded,)
        try:
            return (threaded, _data_version(self._fast))
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    async def events(self, task_id: str) -> list[TaskEvent]:
        """The event log of one task, oldest first."""
        return await self._read("events", _events, task_id)

    async def health(self) -> dict[str, Any]:
        """What `TaskManager.health` reports: schema version, integrity, WAL size, counts."""
        found = await self._read("health", _health, _now())
        if self._writer is None:
            raise StoreError("the store is closed")
        synchronous = await self._run(self._writer, _synchronous)
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
            deleted, batch = await self._write(_prune_batch, before_ms, 500)
            count += deleted
            paths.extend(batch)
            if deleted < 500:
                return count, paths

    async def file_state(self, task_ids: Sequence[str]) -> tuple[dict[str, tuple[str, int]], set[str]]:
        """For the image sweep: (id -> (status, attempt)) and every referenced path."""
        return await self._read("file_state", _file_state, list(task_ids))
