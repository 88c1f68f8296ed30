"""The write side of the SQLite store, one object the store composes: its two write
connections (the writer's thread, and the loop's own for small writes), group commit, and
the checkpoint schedule."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiosqlite

from .._exceptions import ImageTaskError, StoreClosed
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
    _settle_outcomes,
    store_error,
)
from .connections import configure, connect_fast, connect_threaded
from .reads import _data_version, _synchronous

if TYPE_CHECKING:
    from ..testing import Faults

__all__ = ["Writer", "run_on"]

log = logging.getLogger("imagetask")
T = TypeVar("T")


async def run_on(conn: aiosqlite.Connection, path: Path, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(sqlite3_connection, *args)`` on the connection's thread, in one hop; a
    database error is a `StoreError` naming ``path``.

    aiosqlite has no public way to run a callable on its thread; ``_execute`` is the
    one private call we depend on (pinned in pyproject.toml).
    """
    try:
        return await conn._execute(fn, conn._conn, *args)  # type: ignore[no-untyped-call,no-any-return]
    except ImageTaskError:
        raise
    except sqlite3.DatabaseError as exc:
        raise store_error(path, exc) from exc


async def connect_configured(path: Path, durability: str, *, query_only: bool) -> aiosqlite.Connection:
    """A threaded connection to ``path``, set up (`configure`) for its role."""
    conn = await connect_threaded(path)
    try:
        await run_on(conn, path, configure, path, durability, query_only)
    except BaseException:
        await conn.close()
        raise
    return conn


class Writer:
    """Every write of one store goes through here: one transaction per batch, each caller
    answered after the commit that holds its change. Never both write connections at once:
    the loop's own commits only while the writer's thread is idle.

    Args:
        path: The database file.
        durability: ``"normal"`` or ``"full"`` (then no loop-thread commits: each fsyncs).
        faults: The test hook (see `imagetask.testing.Faults`), or None.
    """

    def __init__(self, path: Path, durability: str, faults: Faults | None) -> None:
        self.path = path
        self.durability = durability
        self.faults = faults
        self._writer: aiosqlite.Connection | None = None
        #: A write connection on the event loop's own thread for small writes while the
        #: threaded writer is idle: no thread hop. Never waits for a lock, never checkpoints
        #: (see `write_small`). None with durability="full" (an fsync per commit).
        self._fast: sqlite3.Connection | None = None
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
        #: Clear while a caller's own commit (`write` finding the writer idle) is in flight:
        #: `close` waits for it, and for the writes queued behind it.
        self._own_done = asyncio.Event()
        self._own_done.set()

    async def open(self, migrate: Callable[[sqlite3.Connection], None]) -> None:
        """Connect, and run ``migrate`` on the writer's connection before anything else."""
        self._writer = await connect_configured(self.path, self.durability, query_only=False)
        await run_on(self._writer, self.path, migrate)
        if self.durability == "normal":
            self._fast = connect_fast(self.path)

    async def close(self) -> None:
        """Commit and answer what is queued, then disconnect (safe twice)."""
        self._flush_small()
        # Until nothing is in flight: a caller's own commit starts the committer for the
        # writes queued behind it, and a checkpoint's end may too. (asyncio.wait: a
        # cancelled close does not cancel the commits; their callers get their answers.)
        while True:
            if not self._own_done.is_set():
                await self._own_done.wait()
            elif self._committer is not None and not self._committer.done():
                await asyncio.wait([self._committer])
            elif self._checkpoint is not None and not self._checkpoint.done():
                await asyncio.wait([self._checkpoint])
            else:
                break
        for task in (self._committer, self._checkpoint):
            if task is not None and not task.cancelled():
                task.exception()  # retrieved: its callers got the error (or it logged it)
        fast, self._fast = self._fast, None
        if fast is not None:
            fast.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.close()

    async def synchronous(self) -> int:
        """The writer's ``PRAGMA synchronous`` (1 NORMAL, 2 FULL)."""
        if self._writer is None:
            raise StoreClosed()
        return await run_on(self._writer, self.path, _synchronous)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in a write transaction and return its result.

        Group commit: writes that are queued together (concurrent submits, the finishes of
        attempts that end at once, claims, heartbeats) run in one ``BEGIN IMMEDIATE`` ...
        ``COMMIT`` on the writer's thread, in one hop, each inside its own savepoint. An
        operation that raises is rolled back alone and its caller gets the error; every
        caller is answered only after the commit that holds its changes.
        """
        if self._writer is None:
            raise StoreClosed()
        if not self._busy:
            # The writer is idle: commit this operation at once, in this coroutine (one hop,
            # no task switch). Its batch is itself alone, so a cancellation of this caller can
            # strand no one else; writes that arrive meanwhile queue for the committer task.
            self._busy = True
            self._own_done.clear()
            finish, self._finish_checkpoint = self._finish_checkpoint, False
            try:
                ((ok, value),) = await run_on(
                    self._writer, self.path, _batch_transaction, [(fn, args)], finish, self.faults
                )
            finally:
                self._busy = False
                self._own_done.set()
                if self._queue:
                    self._start_committer()
            self._count_wal(_PAGES_PER_WRITE)
            if self.faults is not None:
                self.faults.committed("writer")
            if not ok:
                raise (store_error(self.path, value) if isinstance(value, sqlite3.DatabaseError) else value)
            result: T = value
            return result
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((fn, args, fut))
        return await fut  # type: ignore[no-any-return]

    def write_small(self, rows: int, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Like `write`, for a write of a few rows, committed on the event loop's thread;
        returns the future of its result (a plain method: no coroutine kept alive per write).

        Small writes made in the same turn of the event loop are committed together, at
        the end of that turn, by the fast connection: no thread hop (a WAL commit with
        synchronous=NORMAL writes pages but does not fsync). They go to the threaded
        writer's group commit instead when it is busy, when they add up to more than
        ``_INLINE_MAX_ROWS`` rows (the loop would be held too long), or when another
        connection holds the lock (the threaded writer may wait for it; the loop must not).
        """
        if self._fast is None:
            return self.write(fn, *args)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._small.append((fn, args, fut))
        self._small_rows += rows
        if len(self._small) == 1:
            loop.call_soon(self._flush_small)
        return fut

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
                _fail_all(batch, store_error(self.path, exc))
            return
        except BaseException as exc:
            _fail_all(batch, store_error(self.path, exc) if isinstance(exc, sqlite3.Error) else exc)
            if not isinstance(exc, Exception):
                raise
            return
        _settle_outcomes(outcomes, waiters, self.path)
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
            _fail_all(batch, StoreClosed())
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
            await run_on(self._writer, self.path, _checkpoint_quietly)
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
        while self._queue:
            batch, self._queue = self._queue, []
            if self._writer is None:  # closed meanwhile (never by `close`, which waits for us)
                _fail_all(batch, StoreClosed())
                return
            ops, waiters = _coalesce(batch)
            finish, self._finish_checkpoint = self._finish_checkpoint, False
            try:
                outcomes = await run_on(self._writer, self.path, _batch_transaction, ops, finish, self.faults)
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

    async def versions(self) -> tuple[int, ...]:
        """``PRAGMA data_version`` of each write connection (see `Store.changes_since`)."""
        assert self._writer is not None
        threaded = await run_on(self._writer, self.path, _data_version)
        if self._fast is None:
            return (threaded,)
        try:
            return (threaded, _data_version(self._fast))
        except sqlite3.DatabaseError as exc:
            raise store_error(self.path, exc) from exc
